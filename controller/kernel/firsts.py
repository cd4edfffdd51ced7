"""The first-step filter, seen from user space: where a (source, sequence)
first step is held in the `firsts` array (bpf/xknock_knock.h, first_hash and
the XK_FIRST_* macros, mirrored here), so that revoke can clear it and tests
can read it."""

import ctypes

from .batch import chunks
from .maps import to_addr

MASK32 = 0xFFFFFFFF


def mix32(h):
    """xk_mix32 of bpf/xknock_hash.h (murmur3's finaliser)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    h ^= h >> 16
    return h


def first_hash(source, uid):
    words = [int.from_bytes(bytes(to_addr(source).b)[i:i + 4], "little") for i in range(0, 16, 4)]
    h = (uid * 0x9E3779B1) & MASK32
    for word in words:
        h = mix32(h ^ word)
    return h


def placement(source, uid, slots):
    """(tag, slot1, slot2) of a source's first step of the sequence uid."""
    h = first_hash(source, uid)
    return mix32((h + 0x27D4EB2F) & MASK32) | 1, h & (slots - 1), mix32(h ^ 0x5BD1E995) & (slots - 1)


def held(maps, source, uid):
    """The low 32 bits of the time (us) of the source's first step held in
    `firsts`, or None."""
    tag, *slots = placement(source, uid, maps.firsts.max_entries)
    for slot in slots:
        word = maps.firsts.lookup(ctypes.c_uint32(slot))
        if word is not None and word.value >> 32 == tag:
            return word.value & MASK32
    return None


def fresh(maps, longest_timeout_us, now_us):
    """How many first steps the filter holds that are younger than
    longest_timeout_us (a slot does not say its sequence)."""
    now_low = now_us & MASK32
    count = 0
    for n, _, values in chunks(maps.firsts.fd, 4, 8):
        for word in memoryview(values).cast("B")[: n * 8].cast("Q"):
            if word and ((now_low - word) & MASK32) <= longest_timeout_us:
                count += 1
    return count


def forget(maps, source, uids):
    """Clear the source's first steps of these sequences; returns how many."""
    cleared = 0
    for uid in uids:
        tag, *slots = placement(source, uid, maps.firsts.max_entries)
        for slot in slots:
            key = ctypes.c_uint32(slot)
            word = maps.firsts.lookup(key)
            if word is not None and word.value >> 32 == tag:
                maps.firsts.update(key, ctypes.c_uint64(0))
                cleared += 1
    return cleared
