"""The layout stamp: which map layout a filter's maps have.

compile_and_load() stamps control[0].layout with the fingerprint of the
loaded program's maps, read from their BTF (kernel/btf.py). Maps are
re-adopted (from a running program or from pins) only when that stamp is
this version's layout.fingerprint(): equal sizes are not enough, a same-size
reorder of fields or a renumbered reason would be misread. Maps of a version
before stamps (0) are fingerprinted from their BTF.
"""

import ctypes
import os

from . import bpfsys, btf, layout
from .lock import control_lock

STAMP_OFFSET = layout.Control.layout.offset   # the same in every version


def of_maps(fds):
    """The fingerprint of the maps open as fds (name -> fd), from their BTF;
    a map of this version missing there counts as such."""
    return layout.fingerprint({name: btf.map_layout(fds[name]) if name in fds else None for name in layout.MAPS})


def read(control_fd):
    """The stamp in control[0] (whatever its value's size), 0 when unstamped."""
    size = bpfsys.map_info(control_fd).value_size
    value = (ctypes.c_uint8 * size)()
    if size < STAMP_OFFSET + 4 or not bpfsys.map_lookup(control_fd, ctypes.c_uint32(0), value):
        return 0
    return int.from_bytes(bytes(value[STAMP_OFFSET:STAMP_OFFSET + 4]), "little")


def write(control_fd, stamp):
    """Stamp control[0]; under the filter's lock, as the bank flips of
    writers who may share these maps write the same word."""
    with control_lock(bpfsys.map_info(control_fd).id):
        value = (ctypes.c_uint8 * bpfsys.map_info(control_fd).value_size)()
        bpfsys.map_lookup(control_fd, ctypes.c_uint32(0), value)
        value[STAMP_OFFSET:STAMP_OFFSET + 4] = list(stamp.to_bytes(4, "little"))
        bpfsys.map_update(control_fd, ctypes.c_uint32(0), value)


def of_filter(fds):
    """The layout of a filter's maps (name -> fd): its stamp, or for maps of a
    version before stamps their BTF's fingerprint; None when neither tells."""
    found = read(fds["control"]) if "control" in fds else 0
    if found:
        return found
    try:
        return of_maps(fds)
    except btf.NoBtf:
        return None


def open_pins(directory):
    """name -> fd of the maps of this version pinned in directory (close them)."""
    fds = {}
    for name in layout.MAPS:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            fds[name] = bpfsys.obj_get(path)
    return fds


def close_all(fds):
    for fd in fds.values():
        os.close(fd)
