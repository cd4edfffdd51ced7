"""BPF_MAP_LOOKUP_BATCH through libbpf: a whole map in thousands of entries per
system call. chunks() is the one reader of whole maps (Map.items() and keys(),
the metrics sampler, the first-step filter, an upgrade's carry): batches where
the map type has them, get_next_key and a lookup per entry where not (LPM
tries, a kernel without batch operations)."""

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


def walk(fd, key_size, value_size, chunk=BATCH_ENTRIES):
    """The chunks of batches(), read with get_next_key and one lookup per entry.
    A key deleted under the walk restarts it (BPF hash iteration does): keys
    may repeat."""
    key_type, value_type = ctypes.c_uint8 * key_size, ctypes.c_uint8 * value_size
    keys, values, n = bytearray(key_size * chunk), bytearray(value_size * chunk), 0
    key = None
    while True:
        next_key = key_type()
        if not bpfsys.map_next_key(fd, key, next_key):
            break
        value = value_type()
        if bpfsys.map_lookup(fd, next_key, value):   # gone meanwhile: skipped
            keys[n * key_size:(n + 1) * key_size] = bytes(next_key)
            values[n * value_size:(n + 1) * value_size] = bytes(value)
            n += 1
            if n == chunk:
                yield n, keys, values
                keys, values, n = bytearray(key_size * chunk), bytearray(value_size * chunk), 0
        key = next_key
    if n:
        yield n, keys, values


def chunks(fd, key_size, value_size, deadline=None):
    """Yield (n, keys buffer, values buffer) for every entry of a map: in
    batches (batches()), or walked (walk()) where the map type or the kernel
    has no batch lookup. value_size as batches() says."""
    try:
        yield from batches(fd, key_size, value_size, deadline)
    except NoBatch:    # raised before the first chunk, never after
        yield from walk(fd, key_size, value_size)
