"""The `granted` array seen from user space: a byte per source slot that says
whether the source may hold a grant (bpf/xknock_hints.h, granted_slot and
the XK_GRANTED_* macros, mirrored here). The data path sets a byte with an
atomic OR of its 64-bit word; user space writes single bytes through mmap,
so that neither side ever rewrites a byte the other is setting."""

import mmap

from . import layout
from .firsts import mix32

SELECTOR_OFFSET = layout.GRANTED_SELECTOR * 8
NOT_BUILT = 0   # the selector: every packet looks `grants` up


def slot(raw):
    """granted_slot() of 16 bytes of layout.Addr."""
    w = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
    return mix32(w[3] ^ mix32(w[0] ^ w[1] ^ w[2])) & (layout.GRANTED_SLOTS - 1)


class GrantedView:
    """The array mapped into this process, for byte stores."""

    def __init__(self, array):
        size = (layout.GRANTED_SELECTOR + 1) * 8
        self._mem = mmap.mmap(array.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self):
        self._mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def live_half(self):
        """0 or 1, or None when not built."""
        selector = int.from_bytes(self._mem[SELECTOR_OFFSET:SELECTOR_OFFSET + 8], "little")
        return selector - 1 if selector in (1, 2) else None

    def mark(self, raw_sources, halves=(0, 1)):
        """Set the byte of each source (16 bytes of layout.Addr) in halves."""
        for raw in raw_sources:
            at = slot(raw)
            for half in halves:
                self._mem[half * layout.GRANTED_SLOTS + at] = 1

    def clear(self, half):
        self._mem[half * layout.GRANTED_SLOTS:(half + 1) * layout.GRANTED_SLOTS] = bytes(layout.GRANTED_SLOTS)

    def set_live(self, half):
        """Only the selector's lowest byte ever changes: a reader sees the old one or the new."""
        self._mem[SELECTOR_OFFSET:SELECTOR_OFFSET + 8] = (half + 1).to_bytes(8, "little")

    def set_not_built(self):
        self._mem[SELECTOR_OFFSET:SELECTOR_OFFSET + 8] = NOT_BUILT.to_bytes(8, "little")

    def is_set(self, half, raw):
        return self._mem[half * layout.GRANTED_SLOTS + slot(raw)] != 0

    def slots_set(self, half):
        return layout.GRANTED_SLOTS - self._mem[half * layout.GRANTED_SLOTS:(half + 1) * layout.GRANTED_SLOTS].count(0)
