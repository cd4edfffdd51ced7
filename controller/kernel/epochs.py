"""The controller's words of `epochs` (bpf/xknock_hints.h): each CPU keeps
copies of what its packets found in `grants` (grant_cache) and in the
allow- and deny-lists (list_cache), and a copy counts only under the epochs
it was taken under. After every change to `grants`, and before it writes a
bank of the lists, the controller writes the word a value it never held
before, so that no copy taken before counts after. Written through mmap
with one aligned 8-byte store: a reader never sees half of it."""

import ctypes
import mmap
import time

from . import layout


class Epochs:
    """The array mapped into this process (at the first advance)."""

    def __init__(self, array):
        self._array = array
        self._mem = None

    def advance(self, word):
        """A new value for word (layout.EPOCH_*): the monotonic clock's, and above the last."""
        if self._mem is None:
            self._mem = mmap.mmap(self._array.fd, layout.EPOCH_WORDS * 8, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        value = ctypes.c_uint64.from_buffer(self._mem, word * 8)
        try:
            value.value = max(time.monotonic_ns(), value.value + 1)
        finally:
            del value   # the mapping cannot close while a ctypes view of it lives

    def close(self):
        if self._mem is not None:
            self._mem.close()
            self._mem = None
