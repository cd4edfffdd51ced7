"""Typed access to the maps of a running filter.

A Map wraps one map fd with the ctypes key and value types of layout.py and
the sentinel errors of bpfsys (KeyNotFound, KeyExists, MapFull). FilterMaps
opens all of a program's maps by id, so it needs no pins and no compiler.
"""

import ctypes
import ipaddress
import os

from ..errors import XknockError
from . import batch, bpfsys, layout, stamp
from .datapath import running_map_ids
from .epochs import Epochs


def to_addr(ip):
    """An ipaddress address as the maps store it: 16 bytes, IPv4 mapped."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 4:
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    addr = layout.Addr()
    ctypes.memmove(addr.b, ip.packed, 16)
    return addr


def from_addr(addr):
    ip = ipaddress.IPv6Address(bytes(addr.b))
    return ip.ipv4_mapped or ip


class Map:
    def __init__(self, fd, name, key_type, value_type):
        self.fd = fd
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        info = bpfsys.map_info(fd)
        self.id = info.id
        self.max_entries = info.max_entries
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(value_type):
            raise XknockError(
                f"map {name} has key/value sizes {info.key_size}/{info.value_size}, this xknock expects "
                f"{ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}: the running filter is another version; "
                "run `xknock attach` with this version to replace it"
            )

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, key):
        value = self.value_type()
        return value if bpfsys.map_lookup(self.fd, key, value) else None

    def update(self, key, value, flags=bpfsys.BPF_ANY):
        bpfsys.map_update(self.fd, key, value, flags)

    def delete(self, key):
        return bpfsys.map_delete(self.fd, key)

    def chunks(self):
        """(n, keys, values) buffers of every entry, thousands per system call
        (kernel/batch.py); values laid out as the system calls do."""
        return batch.chunks(self.fd, ctypes.sizeof(self.key_type), self.element_size())

    def element_size(self):
        return ctypes.sizeof(self.value_type)

    def value_at(self, values, offset):
        return self.value_type.from_buffer_copy(values, offset)

    def delete_where(self, doomed):
        """Delete every entry whose key doomed(key) picks; returns how many
        went. The keys are read first and deleted after: deleting while
        walking a BPF hash can restart the walk."""
        removed = 0
        for raw in [bytes(k) for k in self.keys()]:
            key = self.key_type.from_buffer_copy(raw)
            if doomed(key) and self.delete(key):
                removed += 1
        return removed

    def items(self):
        """Every (key, value) now. Entries written or deleted meanwhile may
        be seen or not; on a map without batch lookup (LPM tries) a key
        deleted meanwhile restarts the walk, so callers must tolerate repeats."""
        key_size, element = ctypes.sizeof(self.key_type), self.element_size()
        for n, keys, values in self.chunks():
            for i in range(n):
                yield self.key_type.from_buffer_copy(keys, i * key_size), self.value_at(values, i * element)

    def keys(self):
        """Every key (as items())."""
        for key, _ in self.items():
            yield key


class GrantsMap(Map):
    """`grants`: every change made through it is followed by a new controller
    epoch (kernel/epochs.py), so that no CPU's copy of a grant changed
    or removed here passes another packet. Writers that use the fd directly
    (batch updates) call changed() themselves."""

    epochs = None   # FilterMaps' Epochs (it closes it), once it has one

    def update(self, key, value, flags=bpfsys.BPF_ANY):
        try:
            super().update(key, value, flags)
        finally:   # a failed update may still have replaced the entry
            self.changed()

    def delete(self, key):
        try:
            return super().delete(key)
        finally:
            self.changed()

    def changed(self):
        if self.epochs is not None:
            self.epochs.advance(layout.EPOCH_GRANTS_CONTROLLER)


class _PerCpu:
    """Per-CPU values as the system calls lay them out: each rounded up to 8 bytes."""

    def element_size(self):
        return (ctypes.sizeof(self.cpu_value_type) + 7) // 8 * 8 * self.cpus

    def value_at(self, values, offset):
        stride = (ctypes.sizeof(self.cpu_value_type) + 7) // 8 * 8
        return [self.cpu_value_type.from_buffer_copy(values, offset + cpu * stride) for cpu in range(self.cpus)]


class PerCpuArray(_PerCpu, Map):
    """A per-CPU array of u64: total() sums over CPUs."""

    def __init__(self, fd, name):
        super().__init__(fd, name, ctypes.c_uint32, ctypes.c_uint64)
        self.cpus = bpfsys.possible_cpus()
        self.cpu_value_type = ctypes.c_uint64

    def per_cpu(self, index):
        values = (ctypes.c_uint64 * self.cpus)()
        bpfsys.map_lookup(self.fd, ctypes.c_uint32(index), values)
        return list(values)

    def total(self, index):
        return sum(self.per_cpu(index))

    def zero(self, index):
        bpfsys.map_update(self.fd, ctypes.c_uint32(index), (ctypes.c_uint64 * self.cpus)())


class PerCpuHash(_PerCpu, Map):
    """A per-CPU hash: lookup returns one value per CPU."""

    def __init__(self, fd, name, key_type, value_type):
        self.cpus = bpfsys.possible_cpus()
        self.cpu_value_type = value_type
        super().__init__(fd, name, key_type, value_type)

    def lookup(self, key):
        values = (self.cpu_value_type * self.cpus)()
        return list(values) if bpfsys.map_lookup(self.fd, key, values) else None

    def update(self, key, per_cpu_values, flags=bpfsys.BPF_ANY):
        values = (self.cpu_value_type * self.cpus)(*per_cpu_values)
        bpfsys.map_update(self.fd, key, values, flags)


class FilterMaps:
    """All the maps of one running filter, opened by id from its program."""

    def __init__(self, maps):
        self._maps = maps
        self.epoch_writer = None   # an Epochs on the `epochs` map, when the program has one

    def advance_epoch(self, word):
        """No CPU's copy taken under word (layout.EPOCH_*) counts after this (kernel/epochs.py)."""
        if self.epoch_writer is not None:
            self.epoch_writer.advance(word)

    @classmethod
    def from_prog(cls, prog_id, expected_layout=None):
        """The maps of a running program, refused when their layout stamp is
        not expected_layout (this version's by default): equal sizes would
        still be misread. Maps of a version before stamps (0) pass on sizes."""
        ids = running_map_ids(prog_id)
        missing = [name for name in layout.MAPS if name not in ids]
        if missing:
            raise XknockError(f"program {prog_id} lacks the maps {', '.join(missing)}: is it xknock's?")
        control = bpfsys.map_fd_by_id(ids["control"])
        try:
            found = stamp.read(control)
        finally:
            os.close(control)
        if found not in (0, expected_layout or layout.fingerprint()):
            raise XknockError(f"the running filter (program {prog_id}) is another version of xknock: its maps have "
                              "another layout. Run `xknock attach` with this version: it carries its grants over")
        return cls.from_fds({name: bpfsys.map_fd_by_id(ids[name]) for name in layout.MAPS})

    @classmethod
    def from_pins(cls, directory):
        return cls.from_fds({name: bpfsys.obj_get(os.path.join(directory, name)) for name in layout.MAPS})

    @classmethod
    def from_fds(cls, fds):
        maps = {}
        try:
            for name, fd in fds.items():
                if name == "counters":
                    maps[name] = PerCpuArray(fd, name)
                elif name == "seqstats":
                    maps[name] = PerCpuHash(fd, name, *layout.MAPS[name])
                elif name == "grants":
                    maps[name] = GrantsMap(fd, name, *layout.MAPS[name])
                else:
                    key_type, value_type = layout.MAPS[name]
                    maps[name] = Map(fd, name, key_type, value_type)
        except Exception:
            for fd in fds.values():
                os.close(fd)
            raise
        filter_maps = cls(maps)
        if "epochs" in maps:
            filter_maps.epoch_writer = Epochs(maps["epochs"])
            if "grants" in maps:
                maps["grants"].epochs = filter_maps.epoch_writer
        return filter_maps

    def __getattr__(self, name):
        try:
            return self._maps[name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self):
        return iter(self._maps.values())

    def close(self):
        for m in self._maps.values():
            m.close()
        if self.epoch_writer is not None:
            self.epoch_writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # The few reads every tool needs.

    def active_bank(self):
        return self.control.lookup(ctypes.c_uint32(0)).active_bank & 1

    def counters_by_reason(self):
        return {reason: self.counters.total(reason) for reason in layout.Reason}

    def count_by_controller(self, reason, n):
        """Add to one of the counters only the controller writes
        (layout.CONTROLLER_REASONS): the data path never touches them, and callers hold
        policy.map_lock, so this read-modify-write races with nobody."""
        assert reason in layout.CONTROLLER_REASONS
        if n:
            values = self.counters.per_cpu(reason)
            values[0] += n
            bpfsys.map_update(self.counters.fd, ctypes.c_uint32(reason), (ctypes.c_uint64 * self.counters.cpus)(*values))

    def sequence_stats(self, uid):
        """Knock outcomes of one sequence, summed over CPUs, or None."""
        per_cpu = self.seqstats.lookup(ctypes.c_uint32(uid))
        if per_cpu is None:
            return None
        total = layout.SeqStats()
        for value in per_cpu:
            for field, _ in layout.SeqStats._fields_:
                setattr(total, field, getattr(total, field) + getattr(value, field))
        return total


def live_sequences(maps):
    """slot -> layout.Seq for the live bank's sequences."""
    bank = maps.active_bank()
    found = {}
    for i in range(layout.MAX_SEQUENCES):
        slot = bank * layout.MAX_SEQUENCES + i
        seq = maps.seqs.lookup(ctypes.c_uint32(slot))
        if seq is not None and seq.nsteps:
            found[slot] = seq
    return found
