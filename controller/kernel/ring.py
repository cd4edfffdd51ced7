"""One BPF ring buffer read through a libbpf ring_buffer of its own, with a
budget: a poll hands at most `budget` records to the callback, then returns.

BCC puts every ring buffer of a program in one ring_buffer object, whose poll
consumes while records keep arriving: a flood on one ring holds the caller in
that poll for as long as it lasts. A ring of its own per reader, and a budget
per poll, give the caller its loop back between batches.
"""

import ctypes
import logging
import os

from ..errors import XknockError
from . import bpfsys

CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
# A callback's negative return stops libbpf's poll; the record it was given
# is consumed all the same (libbpf ringbuf_process_ring advances first).
STOP = -1

log = logging.getLogger("xknock")


def _declare(lib):
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__new.argtypes = [ctypes.c_int, CALLBACK, ctypes.c_void_p, ctypes.c_void_p]
    lib.ring_buffer__poll.restype = ctypes.c_int
    lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ring_buffer__free.restype = None
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
    return lib


class Ring:
    """handle(data, size) for each record; poll(timeout_ms) returns how many it handled."""

    def __init__(self, map_fd, handle, budget):
        self.handle = handle
        self.budget = budget
        self._lib = _declare(bpfsys.lib())
        self._left = budget
        self._callback = CALLBACK(self._on_record)   # kept: libbpf holds only its address
        self._ring = self._lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not self._ring:
            raise XknockError(f"cannot read ring buffer (map fd {map_fd}): {os.strerror(ctypes.get_errno())}")

    def _on_record(self, ctx, data, size):
        self._left -= 1
        try:
            self.handle(data, size)
        except Exception:   # ctypes would print it and go on: say it the way the rest is said
            log.exception("handling a ring buffer record failed")
        return STOP if self._left <= 0 else 0

    def poll(self, timeout_ms):
        """Waits up to timeout_ms for records; handles at most budget of them."""
        self._left = self.budget
        self._lib.ring_buffer__poll(self._ring, timeout_ms)
        return self.budget - self._left

    def close(self):
        if self._ring:
            self._lib.ring_buffer__free(self._ring)
            self._ring = None
