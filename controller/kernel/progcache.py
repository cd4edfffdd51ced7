"""Loaded programs kept across attaches, so that attaching again compiles nothing.

Compiling the program (clang inside BCC) and verifying it is almost all of
a first attach's time. So the program an attach loads is pinned beside its
maps, in the filter's pin directory (root's alone: datapath.make_private_dirs),
as program-<key>-<tag>: key hashes everything that decides what the compiler
makes (the C text, the compiler flags, BCC's version, the kernel, the maps'
layout), tag is the kernel's hash of the program's instructions. An attach
with the same key re-uses the pinned program instead of compiling, once it
has checked that the pin is what its name says: a program pin of ours, of
type XDP, named xdp_knock, with that tag, whose maps are the maps pinned
beside it. Anything else is removed and compiled afresh.

A new source, other flags or another BCC make another key: they compile.
bpffs lives in memory, so a reboot (a new kernel) empties the cache, and
`xknock detach` removes it with the maps' pins (datapath.remove_pins removes
every pin of the directory). One program is kept per pin directory.
"""

import contextlib
import hashlib
import importlib.util
import logging
import os
import stat

from . import bpfsys, layout

log = logging.getLogger("xknock")

PREFIX = "program-"
BPF_PROG_TYPE_XDP = 6
FORMAT = "1"     # bump when what the key covers changes


def bcc_version():
    """BCC's version without importing it (importing loads libbcc): the text
    of its version.py, or None without BCC."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            return f.read().strip()
    except OSError:
        return None


def key(source, cflags, bcc=None):
    """The hash of what decides the compiled program. cflags: every flag but
    the pin directory's (the maps are checked by id instead, and an upgrade
    moves them from its staging directory)."""
    uname = os.uname()
    parts = [FORMAT, source, repr(sorted(cflags)), bcc if bcc is not None else bcc_version(),
             uname.release, uname.version, uname.machine, str(layout.fingerprint())]
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:32]


def cached(directory):
    """The names of the programs kept in directory."""
    with contextlib.suppress(OSError):
        return sorted(name for name in os.listdir(directory) if name.startswith(PREFIX))
    return []


def _fdinfo(fd):
    """The kernel's own account of an fd (/proc/self/fdinfo): prog_type, prog_tag..."""
    fields = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    return fields


def _pinned_map_ids(directory):
    """name -> id of this version's maps pinned in directory (only those there)."""
    ids = {}
    for name in layout.MAPS:
        with contextlib.suppress(OSError):
            fd = bpfsys.obj_get(os.path.join(directory, name))
            try:
                ids[name] = bpfsys.map_info(fd).id
            finally:
                os.close(fd)
    return ids


def program_map_ids(fd):
    """name -> id of the maps a loaded program uses."""
    ids = {}
    for map_id in bpfsys.prog_map_ids(fd):
        map_fd = bpfsys.map_fd_by_id(map_id)
        try:
            ids[bpfsys.map_info(map_fd).name.decode(errors="replace")] = map_id
        finally:
            os.close(map_fd)
    return ids


def _distrust(path, fd, prog_name):
    """Why the program pinned at path (open as fd) must not be used, or None."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        return "not a pin of ours alone"
    kernel = _fdinfo(fd)
    if "prog_type" not in kernel:
        return "not a program"
    if kernel["prog_type"] != str(BPF_PROG_TYPE_XDP):
        return f"a program of type {kernel['prog_type']}, not XDP"
    if kernel.get("prog_tag") != os.path.basename(path).rsplit("-", 1)[-1]:
        return f"its tag {kernel.get('prog_tag')} is not the one its name records"
    if bpfsys.prog_info(fd).name.decode(errors="replace") != prog_name:
        return f"not named {prog_name}"
    pinned, used = _pinned_map_ids(os.path.dirname(path)), program_map_ids(fd)
    if set(pinned) != set(layout.MAPS) or any(used.get(name) != map_id for name, map_id in pinned.items()):
        return "its maps are not the maps pinned beside it"
    return None


def find(directory, wanted, prog_name):
    """An fd of the program kept in directory under key wanted, verified, or
    None. Pins that fail a check, and programs of other keys, stay until
    keep() replaces them; an untrusted pin of this key is removed at once."""
    for name in cached(directory):
        if not name.startswith(f"{PREFIX}{wanted}-"):
            continue
        path = os.path.join(directory, name)
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.BpfError as err:
            why, fd = f"cannot open it ({err})", None
        else:
            try:
                why = _distrust(path, fd, prog_name)
            except (OSError, bpfsys.BpfError) as err:
                why = f"cannot read it ({err})"
        if why is None:
            return fd
        if fd is not None:
            os.close(fd)
        log.warning(f"not re-using the program kept at {path}: {why}; compiling afresh",
                    extra={"fields": {"event": "program_cache_refused", "pin": path}})
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def keep(directory, wanted, fd):
    """Pin the program open as fd in directory under key wanted, in place of
    any program kept there before."""
    tag = _fdinfo(fd)["prog_tag"]
    name = f"{PREFIX}{wanted}-{tag}"
    for old in cached(directory):
        if old != name:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, old))
    path = os.path.join(directory, name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    bpfsys.obj_pin(fd, path)
    return name
