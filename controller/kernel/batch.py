"""BPF_MAP_LOOKUP_BATCH through libbpf: a whole map in thousands of entries per
system call (the metrics sampler counts entries with it; firsts.fresh() reads
the first-step filter with it)."""

import ctypes
import errno
import os
import time

from . import bpfsys

BATCH_ENTRIES = 4096         # entries per BPF_MAP_LOOKUP_BATCH call


class _BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf)."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_NO_BATCH_ERRNOS = {errno.EINVAL, errno.EOPNOTSUPP, 524}   # 524: the kernel's ENOTSUPP
_batch_fn = None


def _lookup_batch():
    global _batch_fn
    if _batch_fn is None:
        fn = bpfsys.lib().bpf_map_lookup_batch
        vp = ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, vp, vp, vp, vp, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_BatchOpts)]
        fn.restype = ctypes.c_int
        _batch_fn = fn
    return _batch_fn


class NoBatch(Exception):
    """This map type has no batch operations."""


class OverBudget(Exception):
    """Counting went past its deadline."""


def batches(fd, key_size, value_size, deadline=None, chunk=BATCH_ENTRIES):
    """Yield (n, keys buffer, values buffer) chunks of a whole map through
    BPF_MAP_LOOKUP_BATCH. value_size is per element as the syscall lays it out
    (per-CPU maps: rounded up to 8 bytes, times the CPUs). Raises NoBatch when
    the map type does not support it, OverBudget past deadline."""
    fn = _lookup_batch()
    token_in = ctypes.create_string_buffer(max(key_size, 8))
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    keys = values = None
    first = True
    while True:
        if keys is None:
            keys = ctypes.create_string_buffer(key_size * chunk)
            values = ctypes.create_string_buffer(value_size * chunk)
        count = ctypes.c_uint32(chunk)
        ret = fn(fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), ctypes.byref(opts))
        err = bpfsys.errno_of(ret) if ret < 0 else 0
        if err in _NO_BATCH_ERRNOS and first:
            raise NoBatch()
        if err == errno.ENOSPC:        # one hash bucket holds more than chunk entries
            chunk *= 4
            keys = None
            continue
        if err not in (0, errno.ENOENT):
            raise bpfsys.BpfError(err, f"map batch lookup: {os.strerror(err)}")
        if count.value:
            yield count.value, keys, values
        if err == errno.ENOENT:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise OverBudget()
        ctypes.memmove(token_in, token_out, len(token_in))
        first = False
