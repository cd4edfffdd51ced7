"""What only a walk of a map can tell (how full it is, how many knocks are in
progress), counted by MapSampler on a thread of its own every SAMPLE_EVERY_S
seconds, so that a scrape never walks a map that grows with traffic.

A walk is BPF_MAP_LOOKUP_BATCH (kernel/batch.py: thousands of entries per
system call), falling back to get_next_key where the map type has no batch
operations (LPM tries), within a time budget per map.
"""

import ctypes
import logging
import struct
import threading
import time
from dataclasses import dataclass, field

from ..kernel import bpfsys, layout
from ..kernel.batch import NoBatch, OverBudget, batches
from ..kernel.clock import monotonic_ns
from ..kernel.maps import live_sequences

log = logging.getLogger("xknock.metrics")

SAMPLE_EVERY_S = 30.0
SAMPLE_BUDGET_S = 5.0        # per map and round: beyond it the map keeps its previous count

# Maps whose number of entries changes: counted by the sampler. The arrays
# (control, settings, seqs, counters) are always full by construction.
SAMPLED_MAPS = ("ports", "progress", "firsts", "grants", "allow", "deny", "seqstats")


_PER_CPU_TYPES = {5, 6, 10}    # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH


def _value_size(info):
    if info.type in _PER_CPU_TYPES:
        return ((info.value_size + 7) // 8 * 8) * bpfsys.possible_cpus()
    return info.value_size


def count_entries(m, budget_s=SAMPLE_BUDGET_S, per_batch=None):
    """Entries of a Map now, or None when counting took longer than budget_s.
    per_batch(n, keys, values), when given, sees every batch; then a map
    without batch lookup raises NoBatch instead of being walked."""
    deadline = time.monotonic() + budget_s
    info = bpfsys.map_info(m.fd)
    try:
        total = 0
        for n, keys, values in batches(m.fd, info.key_size, _value_size(info), deadline):
            total += n
            if per_batch:
                per_batch(n, keys, values)
        return total
    except NoBatch:
        pass
    except OverBudget:
        return None
    if per_batch:
        raise NoBatch()
    total = 0
    for total, _ in enumerate(m.keys(), 1):
        if total % 1024 == 0 and time.monotonic() > deadline:
            return None
    return total


# --- the background sampler ----------------------------------------------------

@dataclass
class Sample:
    entries: dict = field(default_factory=dict)       # map name -> entries
    taken_at: dict = field(default_factory=dict)      # map name -> time.monotonic() of its count
    knocks_in_progress: int | None = None              # counted with the progress map


class MapSampler:
    """Counts the entries of the maps in SAMPLED_MAPS, and the knocks in
    progress, every `interval` seconds on a thread of its own; a scrape reads
    the last result. now_ns is the data path's clock (the test clock in tests)."""

    def __init__(self, maps_provider, interval=SAMPLE_EVERY_S, budget_s=SAMPLE_BUDGET_S, now_ns=monotonic_ns):
        self.maps_provider = maps_provider
        self.interval = interval
        self.budget_s = budget_s
        self.now_ns = now_ns
        self._lock = threading.Lock()
        self._sample = Sample()
        self._stop = threading.Event()
        self._thread = None

    def latest(self):
        with self._lock:
            return Sample(dict(self._sample.entries), dict(self._sample.taken_at), self._sample.knocks_in_progress)

    def sample_once(self):
        """Count every sampled map now (in the caller's thread)."""
        maps = self.maps_provider()
        if maps is None:
            return
        # Knocks in progress of this round alone, per map; a map over its
        # budget leaves its part None and the previous round's total stands.
        in_progress = {"progress": None, "firsts": None}
        for name in SAMPLED_MAPS:
            m = getattr(maps, name)
            started = time.monotonic()
            if name == "progress":
                counted, in_progress[name] = self._count_progress(maps, m)
            elif name == "firsts":
                counted, in_progress[name] = self._count_firsts(maps, m)
            else:
                counted = count_entries(m, self.budget_s)
            if counted is None:
                log.warning("counting map entries took too long: keeping the previous count",
                            extra={"fields": {"map": name, "budget_s": self.budget_s}})
                continue
            with self._lock:
                self._sample.entries[name] = counted
                self._sample.taken_at[name] = started
        if None in in_progress.values():
            return     # no batch lookup, or over budget: the previous total (or none) stands
        with self._lock:
            self._sample.knocks_in_progress = in_progress["progress"] + in_progress["firsts"]

    def _count_progress(self, maps, m):
        """(entries, knocks in progress): progress neither completed nor timed out."""
        seqs = {seq.uid: (seq.nsteps, seq.step_timeout_ns // 1000) for seq in live_sequences(maps).values()}
        now_us = self.now_ns() // 1000
        key_size = ctypes.sizeof(layout.ProgressKey)
        uid_of = struct.Struct("<16xI")
        in_progress = 0

        def per_batch(n, keys, values):
            nonlocal in_progress
            states = memoryview(values).cast("B")[: n * 8].cast("Q")
            for i, (uid,) in enumerate(uid_of.iter_unpack(keys.raw[: n * key_size])):
                seq = seqs.get(uid)
                if seq is None:
                    continue
                state = states[i]
                step = state & 0xFF
                if 0 < step < seq[0] and now_us - (state >> 8) <= seq[1]:
                    in_progress += 1

        try:
            counted = count_entries(m, self.budget_s, per_batch)
        except NoBatch:   # no batch lookup on this kernel: entries only
            return count_entries(m, self.budget_s), None
        return counted, (in_progress if counted is not None else None)

    def _count_firsts(self, maps, m):
        """(occupied slots, first steps still fresh) of the first-step filter.
        A slot does not say its sequence: fresh means younger than the
        longest step timeout of the live multi-step sequences."""
        timeouts = [seq.step_timeout_ns // 1000 for seq in live_sequences(maps).values() if seq.nsteps > 1]
        longest_us = max(timeouts, default=0)
        now_low = (self.now_ns() // 1000) & 0xFFFFFFFF
        occupied = fresh = 0

        def per_batch(n, keys, values):
            nonlocal occupied, fresh
            for word in memoryview(values).cast("B")[: n * 8].cast("Q"):
                if word:
                    occupied += 1
                    fresh += ((now_low - word) & 0xFFFFFFFF) <= longest_us

        try:
            counted = count_entries(m, self.budget_s, per_batch)
        except NoBatch:
            return None, None
        return (occupied, fresh) if counted is not None else (None, None)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as err:   # the filter may be gone; the next round tries again
                log.debug("map sample failed", extra={"fields": {"error": str(err)}})
            self._stop.wait(self.interval)

    def start(self):
        self._thread = threading.Thread(target=self._run, name="xknock-map-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(self.budget_s * len(SAMPLED_MAPS) + 1)
