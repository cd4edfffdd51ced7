"""Carrying a filter's state into the maps of a program of another layout.

An upgrade across a change of map layout loads the new program with maps of
its own and copies what users would miss from the running filter's maps,
read by field name from their BTF (kernel/btf.py): a field of the same name
and size is copied, one the new version added starts at zero, one it
dropped is dropped.

What is carried, map by map:
  grants, bans, failures, spa_known   keyed state: copied before the swap (the
                                      new program enforces them from its first
                                      packet), and once more after it for what
                                      the old program wrote meanwhile
  counters, seqstats                  counts: added after the swap, when the
                                      old program counts no more (counters by
                                      reason number, seqstats for the
                                      sequences the new policy has)
What is not:
  control, settings, ports, seqs, allow, deny   the policy: written afresh
                                      from the config
  progress, firsts, recent            knocks in progress and strict mode's
                                      memory: a knock under way starts again
"""

import ctypes
import functools
import os

from ..errors import XknockError
from ..kernel import batch, bpfsys, btf, datapath, layout
from ..kernel.lock import control_lock
from . import grants

KEYED = ("grants", "bans", "failures", "spa_known")
COUNTS = ("counters", "seqstats")
PER_CPU = {"counters", "seqstats"}


class OldMap:
    """One map of the running filter, read as bytes with the layout of its BTF."""

    def __init__(self, name, fd):
        self.name, self.fd = name, fd
        info = bpfsys.map_info(fd)
        self.key_size, self.value_size = info.key_size, info.value_size
        self.key_leaves, self.value_leaves = btf.map_layout(fd)
        self.cpus = bpfsys.possible_cpus() if name in PER_CPU else 1
        self.stride = (self.value_size + 7) & ~7 if name in PER_CPU else self.value_size

    def items(self):
        """(key bytes, [value bytes per CPU]) of every entry (kernel/batch.py chunks())."""
        element = self.stride * self.cpus
        for n, keys, values in batch.chunks(self.fd, self.key_size, element):
            all_keys, all_values = bytes(keys), bytes(values)   # one copy per batch
            for i in range(n):
                raw = all_values[i * element:(i + 1) * element]
                yield all_keys[i * self.key_size:(i + 1) * self.key_size], \
                    [raw[c * self.stride:c * self.stride + self.value_size] for c in range(self.cpus)]


def convert(old_leaves, raw, new_type):
    """A new_type made from raw (bytes laid out as old_leaves) field by field:
    a leaf of the same name and size is copied, any other starts at zero."""
    out = bytearray(ctypes.sizeof(new_type))
    for new_offset, old_offset, size in _plan(old_leaves, new_type):
        out[new_offset:new_offset + size] = raw[old_offset:old_offset + size]
    return new_type.from_buffer(out)


@functools.lru_cache(maxsize=64)
def _plan(old_leaves, new_type):
    """[(new offset, old offset, size)] of the leaves both layouts have, by name."""
    old = {name: (offset, size) for name, offset, size in old_leaves}
    return tuple((offset, old[name][0], size) for name, offset, size in layout.shape(new_type)
                 if name in old and old[name][1] == size)


class OldFilter:
    """The running filter's maps, opened by id. lock() takes its writers'
    lock until the end of the with block: no reload, grant or revoke (an
    old controller's) changes them while they are carried over."""

    def __init__(self, prog_id):
        self.maps, self._lock, self._held = {}, None, False
        try:
            for name, map_id in datapath.running_map_ids(prog_id).items():
                if name in (*KEYED, *COUNTS, "control"):
                    self.maps[name] = OldMap(name, bpfsys.map_fd_by_id(map_id))
        except btf.NoBtf as err:
            self.close()
            raise XknockError(f"the running filter's maps have another layout and no BTF to read them by ({err}): "
                              "detach it first (`xknock detach IFACE`, which drops its grants), then attach") from None
        except BaseException:
            self.close()
            raise
        if "control" in self.maps:
            self._lock = control_lock(bpfsys.map_info(self.maps["control"].fd).id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if self._held:
                self._lock.__exit__(*exc)
        finally:
            self.close()

    def lock(self):
        """Hold the old filter's writers' lock from now on (taken once)."""
        if self._lock and not self._held:
            self._lock.__enter__()
            self._held = True

    def close(self):
        for old in self.maps.values():
            os.close(old.fd)
        self.maps = {}

    def carry_keyed(self, maps, only_missing=False):
        """Copy grants, bans, failures and spa_known into maps (a FilterMaps of
        this version). only_missing: keys the new maps do not have yet (the
        second pass, after the swap). Returns {name: entries copied}."""
        copied, carried = {}, set()
        for name in KEYED:
            old, new = self.maps.get(name), getattr(maps, name)
            copied[name] = 0
            if old is None:
                continue
            present = {key for key, _ in OldMap(name, new.fd).items()} if only_missing else set()
            same_keys = old.key_leaves == layout.shape(new.key_type)
            for raw_key, (raw_value,) in old.items():
                if same_keys and raw_key in present:
                    continue
                key = convert(old.key_leaves, raw_key, new.key_type)
                value = convert(old.value_leaves, raw_value, new.value_type)
                try:
                    new.update(key, value, bpfsys.BPF_NOEXIST if only_missing else bpfsys.BPF_ANY)
                except bpfsys.KeyExists:
                    continue
                except bpfsys.MapFull:
                    raise XknockError(f"the new program's {name} map is full ({new.max_entries} entries) before "
                                      f"every entry of the running filter's was carried: nothing was attached")
                copied[name] += 1
                if name == "grants":
                    carried.add(bytes(key.src.b))
        grants.mark_granted(maps, carried)   # as after every grant write: the sources' bytes
        return copied

    def add_counts(self, maps):
        """Add the old counters (by reason number) and the old per-sequence
        stats (of the sequences the new maps have) to the new ones."""
        added = 0
        old = self.maps.get("counters")
        if old is not None:
            for raw_key, per_cpu in old.items():
                index = int.from_bytes(raw_key, "little")
                if index >= maps.counters.max_entries:
                    continue
                values = maps.counters.per_cpu(index)
                for cpu, raw in enumerate(per_cpu):
                    values[cpu] += int.from_bytes(raw[:8], "little")
                bpfsys.map_update(maps.counters.fd, ctypes.c_uint32(index),
                                  (ctypes.c_uint64 * maps.counters.cpus)(*values))
                added += 1
        old = self.maps.get("seqstats")
        if old is not None:
            for raw_key, per_cpu in old.items():
                key = convert(old.key_leaves, raw_key, maps.seqstats.key_type)
                current = maps.seqstats.lookup(key)
                if current is None:
                    continue   # a sequence the new policy does not have
                for cpu, raw in enumerate(per_cpu):
                    carried = convert(old.value_leaves, raw, layout.SeqStats)
                    for field, _ in layout.SeqStats._fields_:
                        setattr(current[cpu], field, getattr(current[cpu], field) + getattr(carried, field))
                maps.seqstats.update(key, current)
                added += 1
        return added
