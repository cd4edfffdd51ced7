"""The BPF system calls the controller needs, through libbpf (ctypes).

BCC is only used to compile and load the program. Everything that reads or
writes a running filter goes through here, so that `status`, `grant` and
`revoke` need no compiler and work from any mount namespace.
"""

import ctypes
import ctypes.util
import errno
import os


class BpfError(OSError):
    """A BPF system call failed; errno and a message that says which."""


class KeyNotFound(BpfError):
    """The key is not in the map."""


class KeyExists(BpfError):
    """BPF_NOEXIST and the key is already there."""


class MapFull(BpfError):
    """The map has no room for another key."""


# bpf_map_update_elem flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_OBJ_NAME_LEN = 16


def _load_libbpf():
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise BpfError(errno.ENOENT, "libbpf.so.1 not found: install the libbpf1 package")


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load_libbpf()
        _declare(_lib)
    return _lib


def _declare(l):
    c_int, c_uint, vp = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
    signatures = {
        "bpf_map_lookup_elem": ([c_int, vp, vp], c_int),
        "bpf_map_update_elem": ([c_int, vp, vp, ctypes.c_uint64], c_int),
        "bpf_map_delete_elem": ([c_int, vp], c_int),
        "bpf_map_get_next_key": ([c_int, vp, vp], c_int),
        "bpf_map_get_fd_by_id": ([c_uint], c_int),
        "bpf_prog_get_fd_by_id": ([c_uint], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, vp, ctypes.POINTER(ctypes.c_uint32)], c_int),
        "bpf_obj_pin": ([c_int, ctypes.c_char_p], c_int),
        "bpf_obj_get": ([ctypes.c_char_p], c_int),
        "bpf_prog_test_run_opts": ([c_int, vp], c_int),
        "bpf_map_update_batch": ([c_int, vp, vp, ctypes.POINTER(ctypes.c_uint32), vp], c_int),
        "libbpf_num_possible_cpus": ([], c_int),
        "bpf_prog_attach_opts": ([c_int, c_int, c_uint, vp], c_int),
        "bpf_prog_detach2": ([c_int, c_int, c_uint], c_int),
        "bpf_prog_query_opts": ([c_int, c_uint, vp], c_int),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(l, name)
        fn.argtypes = args
        fn.restype = res


def errno_of(ret):
    """The errno of a failed libbpf call: libbpf 1.x returns -errno, older
    calls -1 with errno set."""
    return -ret if ret < -1 else ctypes.get_errno()


def _check(ret, what):
    """libbpf 1.x returns -errno; turn it into the matching exception."""
    if ret >= 0:
        return ret
    err = errno_of(ret)
    msg = f"{what}: {os.strerror(err)}"
    if err == errno.ENOENT:
        raise KeyNotFound(err, msg)
    if err == errno.EEXIST:
        raise KeyExists(err, msg)
    if err == errno.E2BIG:
        raise MapFull(err, msg)
    raise BpfError(err, msg)


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info from linux/bpf.h, up to verified_insns."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
    ]


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info from linux/bpf.h."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts from libbpf's bpf.h (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def prog_info(fd):
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info


def prog_map_ids(fd):
    """The ids of the maps a loaded program uses."""
    count = prog_info(fd).nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info = BpfProgInfo()
    info.nr_map_ids = count
    info.map_ids = ctypes.addressof(ids)
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program map ids")
    return list(ids[: min(count, info.nr_map_ids)])


def map_info(fd):
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_fd_by_id(prog_id):
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def map_fd_by_id(map_id):
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


def obj_pin(fd, path):
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin {path}")


def obj_get(path):
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"open pinned {path}")


class ProgAttachOpts(ctypes.Structure):
    """struct bpf_prog_attach_opts as libbpf 1.1 has it (the fields tcx adds
    in 1.3 are left out: opts are versioned by size, so newer ones take it)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("replace_prog_fd", ctypes.c_int)]


class ProgQueryOpts(ctypes.Structure):
    """struct bpf_prog_query_opts (libbpf 1.0)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_void_p),
        ("prog_cnt", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_void_p),
    ]


BPF_F_REPLACE = 1 << 2


def prog_attach(prog_fd, target, attach_type, replace_fd=None):
    """BPF_PROG_ATTACH (not a link: it stays until detached). With replace_fd
    (BPF_F_REPLACE) prog_fd takes that program's place, or nothing changes."""
    opts = ProgAttachOpts(sz=ctypes.sizeof(ProgAttachOpts))
    if replace_fd is not None:
        opts.flags, opts.replace_prog_fd = BPF_F_REPLACE, replace_fd
    _check(lib().bpf_prog_attach_opts(prog_fd, target, attach_type, ctypes.byref(opts)), "attach program")


def prog_detach(prog_fd, target, attach_type):
    """BPF_PROG_DETACH of that one program."""
    _check(lib().bpf_prog_detach2(prog_fd, target, attach_type), "detach program")


def prog_query(target, attach_type, most=64):
    """BPF_PROG_QUERY: the ids of the programs attached, in the order they run."""
    ids = (ctypes.c_uint32 * most)()
    opts = ProgQueryOpts(sz=ctypes.sizeof(ProgQueryOpts), prog_ids=ctypes.addressof(ids), prog_cnt=most)
    _check(lib().bpf_prog_query_opts(target, attach_type, ctypes.byref(opts)), "query programs")
    return list(ids[: min(opts.prog_cnt, most)])


def possible_cpus():
    return _check(lib().libbpf_num_possible_cpus(), "count possible CPUs")


def map_lookup(fd, key, value):
    """Fills value (a ctypes object) and returns True, or False when key is absent."""
    ret = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0 and errno_of(ret) == errno.ENOENT:
        return False
    _check(ret, "map lookup")
    return True


def map_update(fd, key, value, flags=BPF_ANY):
    _check(lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags), "map update")


def map_delete(fd, key):
    """Returns False when the key was not there."""
    ret = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0 and errno_of(ret) == errno.ENOENT:
        return False
    _check(ret, "map delete")
    return True


def map_next_key(fd, key, next_key):
    """Writes the key after key (or the first, when key is None); False at the end."""
    ret = lib().bpf_map_get_next_key(fd, None if key is None else ctypes.byref(key), ctypes.byref(next_key))
    if ret < 0 and errno_of(ret) == errno.ENOENT:
        return False
    _check(ret, "map iteration")
    return True


def map_update_batch(fd, keys, values, count):
    """BPF_MAP_UPDATE_BATCH: count (key, value) pairs from two ctypes arrays in one call."""
    written = ctypes.c_uint32(count)
    _check(lib().bpf_map_update_batch(fd, ctypes.byref(keys), ctypes.byref(values), ctypes.byref(written), None),
           "map batch update")
    return written.value


def map_update_batch_from(fd, keys, values, start, count):
    """BPF_MAP_UPDATE_BATCH of the pairs start .. start+count-1 of two ctypes
    arrays. The kernel writes them in order and stops at the first it
    refuses: returns (how many it wrote, 0 or the errno of the one it refused)."""
    written = ctypes.c_uint32(count)
    ret = lib().bpf_map_update_batch(fd, ctypes.byref(keys, start * ctypes.sizeof(keys._type_)),
                                     ctypes.byref(values, start * ctypes.sizeof(values._type_)),
                                     ctypes.byref(written), None)
    return written.value, (0 if ret >= 0 else errno_of(ret))


def test_run(prog_fd, data, repeat=1, flags=0, batch_size=0, ctx=None, data_out_size=None):
    """BPF_PROG_TEST_RUN: returns (retval, duration_ns, data_out)."""
    buf_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_size = data_out_size if data_out_size is not None else len(data) + 256
    buf_out = ctypes.create_string_buffer(max(out_size, 1))
    opts = BpfTestRunOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.data_in = ctypes.addressof(buf_in)
    opts.data_size_in = len(data)
    if out_size:
        opts.data_out = ctypes.addressof(buf_out)
        opts.data_size_out = out_size
    opts.repeat = repeat
    opts.flags = flags
    opts.batch_size = batch_size
    if ctx is not None:
        opts.ctx_in = ctypes.addressof(ctx)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, opts.duration, buf_out.raw[: opts.data_size_out] if out_size else b""
