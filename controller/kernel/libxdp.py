"""Sharing an interface with other XDP programs through libxdp's dispatcher.

libxdp (xdp-tools' library, used by xdp-filter, xdp-loader and others) runs
several programs on one interface: its dispatcher is the XDP program the
interface runs, and calls each component in the order of their priorities
(lowest first); a component's verdict ends the chain unless it is one of its
chain-call actions (ours: XDP_PASS only). Components are freplace programs
(BPF_PROG_TYPE_EXT) linked to the dispatcher's slots, and libxdp keeps them
linked by pinning the links under /sys/fs/bpf/xdp/ (lib/libxdp/protocol.org).

BCC loads our program as an XDP program, which cannot be linked there; it
does load it with BTF and the function's record, which is what an extension
needs. load_component() loads the same instructions once more as an
extension, with that BTF, and libxdp (libxdp.so.1, through ctypes) joins it
to the interface's dispatcher, or makes one.

A component is found from its interface without libxdp and without pins: the
kernel's freplace links name their target program, so every link whose
target is the interface's dispatcher is one of its components.
"""

import ctypes
import ctypes.util
import errno
import os

from ..errors import XknockError
from . import bpfsys

DISPATCHER_NAME = "xdp_dispatcher"
DEFAULT_PRIORITY = 50   # libxdp's own default
MAX_PRIORITY = 1000     # xdp-loader's range is 0..1000 too

BPF_PROG_TYPE_EXT = 28
BPF_LINK_TYPE_TRACING = 2
XDP_PASS = 2

# enum xdp_attach_mode
_MODES = {"native": 1, "generic": 2}


class BpfProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts from libbpf's bpf.h (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    ]


class BpfFuncInfo(ctypes.Structure):
    _fields_ = [("insn_off", ctypes.c_uint32), ("type_id", ctypes.c_uint32)]


class BpfLinkInfo(ctypes.Structure):
    """struct bpf_link_info's head and its tracing member (freplace links)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),          # the union is 8-byte aligned
        ("attach_type", ctypes.c_uint32),
        ("target_obj_id", ctypes.c_uint32),
        ("target_btf_id", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 52),     # the union's larger members
    ]


def _libbpf():
    lib = bpfsys.lib()
    if not getattr(lib, "_xknock_ext_declared", False):
        c_int, c_uint, vp = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
        for name, args, res in [
            ("bpf_prog_load", [c_int, ctypes.c_char_p, ctypes.c_char_p, vp, ctypes.c_size_t, vp], c_int),
            ("bpf_btf_get_fd_by_id", [c_uint], c_int),
            ("bpf_link_get_next_id", [c_uint, ctypes.POINTER(ctypes.c_uint32)], c_int),
            ("bpf_link_get_fd_by_id", [c_uint], c_int),
        ]:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        lib._xknock_ext_declared = True
    return lib


_xdp = None


def _libxdp():
    global _xdp
    if _xdp is None:
        try:
            lib = ctypes.CDLL("libxdp.so.1", use_errno=True)
        except OSError:
            raise XknockError("sharing an interface needs libxdp: install the libxdp1 package") from None
        vp, c_int, c_uint = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
        for name, args, res in [
            ("xdp_program__from_fd", [c_int], vp),
            ("xdp_program__from_id", [c_uint], vp),
            ("xdp_program__close", [vp], None),
            ("xdp_program__set_run_prio", [vp, c_uint], c_int),
            ("xdp_program__set_chain_call_enabled", [vp, c_uint, ctypes.c_bool], c_int),
            ("xdp_program__attach", [vp, c_int, c_int, c_uint], c_int),
            ("xdp_program__detach", [vp, c_int, c_int, c_uint], c_int),
            ("libxdp_get_error", [vp], ctypes.c_long),
            ("libxdp_strerror", [c_int, ctypes.c_char_p, ctypes.c_size_t], c_int),
            ("libxdp_set_print", [vp], vp),
        ]:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        lib.libxdp_set_print(None)   # its warnings on stderr would not be one line; we say what failed
        _xdp = lib
    return _xdp


def _xdp_error(err):
    buf = ctypes.create_string_buffer(256)
    _libxdp().libxdp_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace") or os.strerror(-err)


def is_dispatcher(prog_name):
    return prog_name == DISPATCHER_NAME


def components(dispatcher_id):
    """The programs linked to the dispatcher dispatcher_id: [(slot btf id, program id)],
    in slot order (the order they run)."""
    lib = _libbpf()
    found, link_id = [], ctypes.c_uint32(0)
    while lib.bpf_link_get_next_id(link_id.value, ctypes.byref(link_id)) == 0:
        fd = lib.bpf_link_get_fd_by_id(link_id.value)
        if fd < 0:
            continue   # gone meanwhile
        try:
            info = BpfLinkInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
                continue
        finally:
            os.close(fd)
        if info.type == BPF_LINK_TYPE_TRACING and info.target_obj_id == dispatcher_id:
            found.append((info.target_btf_id, info.prog_id))
    return sorted(found)


def component(dispatcher_id, name):
    """(slot, program id) of the dispatcher's component named name, or None."""
    for slot, (_, prog_id) in enumerate(components(dispatcher_id)):
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except OSError:
            continue   # gone meanwhile
        try:
            if bpfsys.prog_info(fd).name.decode(errors="replace") == name:
                return slot, prog_id
        finally:
            os.close(fd)
    return None


class DispatcherConfig(ctypes.Structure):
    """struct xdp_dispatcher_config, version 2 (protocol.org): the dispatcher's
    read-only data, where libxdp keeps every slot's priority."""

    _fields_ = [
        ("magic", ctypes.c_uint8),
        ("dispatcher_version", ctypes.c_uint8),
        ("num_progs_enabled", ctypes.c_uint8),
        ("is_xdp_frags", ctypes.c_uint8),
        ("chain_call_actions", ctypes.c_uint32 * 10),
        ("run_prios", ctypes.c_uint32 * 10),
        ("program_flags", ctypes.c_uint32 * 10),
    ]


DISPATCHER_MAGIC = 236


def run_priority(dispatcher_id, slot):
    """The priority libxdp gave the component in slot (None when the
    dispatcher is not one of libxdp's version 2)."""
    fd = bpfsys.prog_fd_by_id(dispatcher_id)
    try:
        map_ids = bpfsys.prog_map_ids(fd)
    finally:
        os.close(fd)
    for map_id in map_ids:
        map_fd = bpfsys.map_fd_by_id(map_id)
        try:
            info = bpfsys.map_info(map_fd)
            if not info.name.decode(errors="replace").endswith(".rodata") or \
                    info.value_size < ctypes.sizeof(DispatcherConfig):
                continue
            config = DispatcherConfig()
            if bpfsys.map_lookup(map_fd, ctypes.c_uint32(0), config) and config.magic == DISPATCHER_MAGIC:
                return config.run_prios[slot]
        finally:
            os.close(map_fd)
    return None


def bpffs_outlives_process(path="/sys/fs/bpf"):
    """Is a bpffs mounted at path before this process mounts one? libxdp keeps
    a dispatcher's slots linked by pins there. Under `ip netns exec` the
    process has a mount namespace and a fresh /sys of its own, with no bpffs:
    one mounted there (datapath.ensure_bpffs) goes with the process, and its
    pins with it."""
    try:
        with open("/proc/self/mounts") as mounts:
            return any(fields[1] == path and fields[2] == "bpf" for fields in map(str.split, mounts))
    except OSError:
        return False


def load_component(xdp_fd, insns, name):
    """Load insns (the instructions of the XDP program xdp_fd, as compiled) as
    an extension that can take a dispatcher's slot: with xdp_fd's BTF and
    function record, and xdp_fd's own function as its first target (libxdp
    links it to the dispatcher's slot after). Returns its fd."""
    lib = _libbpf()
    head = bpfsys.prog_info(xdp_fd)
    if not head.btf_id or not head.nr_func_info:
        raise XknockError("the XDP program was loaded without BTF, which libxdp's dispatcher needs: "
                          "this kernel or BCC does not give it (attach without --priority)")
    records = (BpfFuncInfo * head.nr_func_info)()
    info = bpfsys.BpfProgInfo()
    info.nr_func_info = head.nr_func_info
    info.func_info_rec_size = ctypes.sizeof(BpfFuncInfo)
    info.func_info = ctypes.addressof(records)
    size = ctypes.c_uint32(ctypes.sizeof(info))
    bpfsys._check(lib.bpf_obj_get_info_by_fd(xdp_fd, ctypes.byref(info), ctypes.byref(size)), "program BTF records")
    btf_fd = bpfsys._check(lib.bpf_btf_get_fd_by_id(head.btf_id), "open the program's BTF")
    try:
        code = ctypes.create_string_buffer(bytes(insns), len(insns))
        opts = BpfProgLoadOpts(sz=ctypes.sizeof(BpfProgLoadOpts), prog_btf_fd=btf_fd,
                               attach_prog_fd=xdp_fd, attach_btf_id=records[0].type_id,
                               func_info=ctypes.addressof(records), func_info_cnt=head.nr_func_info,
                               func_info_rec_size=ctypes.sizeof(BpfFuncInfo))
        fd = lib.bpf_prog_load(BPF_PROG_TYPE_EXT, name.encode(), b"GPL", code, len(insns) // 8, ctypes.byref(opts))
        if fd < 0:
            # Once more for the verifier's reason: the log's last line (it keeps the tail).
            log = ctypes.create_string_buffer(1 << 16)
            opts.log_level, opts.log_size, opts.log_buf = 1, len(log), ctypes.cast(log, ctypes.c_char_p)
            retry = lib.bpf_prog_load(BPF_PROG_TYPE_EXT, name.encode(), b"GPL", code, len(insns) // 8,
                                      ctypes.byref(opts))
            if retry >= 0:
                return retry
            lines = [line for line in log.value.decode(errors="replace").splitlines() if line.strip()]
            if -fd == errno.EPERM and not lines:
                raise XknockError(
                    "this kernel refuses extension (freplace) programs, which libxdp's dispatcher is made of "
                    "(loading one: Operation not permitted, as root; a security policy?): no program can share "
                    "an interface here, and libxdp itself falls back to one program per interface "
                    "(`xdp-loader status` shows no priority). Attach without --priority")
            raise XknockError(f"loading the filter as a libxdp component failed: {os.strerror(-fd)}"
                              + (f" ({lines[-1]})" if lines else ""))
        return fd
    finally:
        os.close(btf_fd)


def join(ifindex, prog_fd, priority, mode):
    """Add the extension prog_fd to the dispatcher of ifindex (made when the
    interface runs none) at priority, XDP_PASS its one chain-call action:
    a packet it passes goes on to the next program, any other verdict is final.
    libxdp swaps the dispatcher atomically."""
    lib = _libxdp()
    prog = lib.xdp_program__from_fd(prog_fd)
    err = lib.libxdp_get_error(prog)
    if err:
        raise XknockError(f"libxdp cannot use the filter's program: {_xdp_error(err)}")
    try:
        lib.xdp_program__set_run_prio(prog, priority)
        lib.xdp_program__set_chain_call_enabled(prog, XDP_PASS, True)
        err = lib.xdp_program__attach(prog, ifindex, _MODES.get(mode, 0), 0)
        if err:
            raise XknockError(_join_failure(err))
    finally:
        lib.xdp_program__close(prog)


def _join_failure(err):
    if -err == errno.EOPNOTSUPP or -err == errno.EINVAL:
        return (f"libxdp's dispatcher refused the filter ({_xdp_error(err)}): the dispatcher this libxdp "
                "makes may not take a program that changes the packet's size on this kernel")
    return f"joining libxdp's dispatcher failed: {_xdp_error(err)}"


def leave(ifindex, prog_id, mode):
    """Remove the component prog_id from the dispatcher of ifindex; the others
    keep running (libxdp removes the dispatcher with its last component)."""
    lib = _libxdp()
    prog = lib.xdp_program__from_id(prog_id)
    err = lib.libxdp_get_error(prog)
    if err:
        raise XknockError(f"libxdp cannot open program {prog_id}: {_xdp_error(err)}")
    try:
        err = lib.xdp_program__detach(prog, ifindex, _MODES.get(mode, 0), 0)
        if err:
            raise XknockError(f"leaving libxdp's dispatcher failed: {_xdp_error(err)}")
    finally:
        lib.xdp_program__close(prog)
