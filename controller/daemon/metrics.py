"""Prometheus metrics of a running filter, read from the kernel at scrape time.

XknockCollector is a prometheus-client custom collector: every scrape builds
its metric families afresh from the filter's maps. The data path counts in
per-CPU maps; a scrape sums them (FilterMaps.counters_by_reason, one lookup per
reason) and never touches a packet. Nothing in a scrape walks a map that grows
with traffic (progress, grants, allow, deny): a scrape costs the same with
every map full.

What can only be known by walking those maps (how full they are, how many
knocks are in progress) is counted by MapSampler, a background thread, every
SAMPLE_EVERY_S seconds with BPF_MAP_LOOKUP_BATCH (thousands of entries per
system call), falling back to get_next_key where the map type has no batch
operations (LPM tries), within a time budget per map. A scrape reports the
last sample and its age (xknock_map_sample_age_seconds).

docs/metrics.md lists every metric; docs/runbook.md says what to do when the
alerts in dashboards/alerts.yml fire.
"""

import ctypes
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..config import config_hash
from ..errors import XknockError
from ..kernel import bpfsys, datapath, layout
from ..kernel.batch import NoBatch, OverBudget, batches
from ..kernel.clock import monotonic_ns
from ..kernel.maps import live_sequences
from . import build
from .links import EVENTS as INTERFACE_EVENTS

log = logging.getLogger("xknock.metrics")

DEFAULT_PORT = 9798          # the docs' example port (not registered); metrics are off unless --metrics-addr is given
SAMPLE_EVERY_S = 30.0
SAMPLE_BUDGET_S = 5.0        # per map and round: beyond it the map keeps its previous count

# Maps whose number of entries changes: counted by the sampler. The arrays
# (control, settings, seqs, counters) are always full by construction.
SAMPLED_MAPS = ("ports", "progress", "firsts", "grants", "allow", "deny", "seqstats")

KNOCK_RESULTS = ("advanced", "completed", "reset", "timed_out")     # layout.SeqStats fields
# SPA: what the kernel did with each packet to the SPA port, and what the
# controller judged of those it queued (two families: their sums differ).
SPA_CANDIDATES = {
    "queued": layout.Reason.SPA_QUEUED,
    "not_candidate": layout.Reason.SPA_NOT_CANDIDATE,
    "rate_limited": layout.Reason.SPA_RATE_LIMITED,
    "overloaded": layout.Reason.SPA_OVERLOADED,
    "lost": layout.Reason.SPA_LOST,
}
SPA_VERDICTS = {reason.name.lower().removeprefix("spa_"): reason for reason in (
    layout.Reason.SPA_ACCEPTED, layout.Reason.SPA_BAD_HMAC, layout.Reason.SPA_REPLAYED, layout.Reason.SPA_STALE,
    layout.Reason.SPA_MALFORMED, layout.Reason.SPA_UNKNOWN_USER, layout.Reason.SPA_PORT_DENIED,
    layout.Reason.SPA_SOURCE_DENIED, layout.Reason.SPA_GRANT_FAILED)}
# answer = "closed": how the refused packets were answered
ANSWERS = {
    "rst": layout.Reason.ANSWER_RST,
    "unreachable": layout.Reason.ANSWER_UNREACH,
    "by_host": layout.Reason.ANSWER_BY_HOST,
    "rate_limited": layout.Reason.ANSWER_RATE_LIMITED,
    "none": layout.Reason.ANSWER_NONE,
}
# daemon/hooks.py's HookRunner counters, by the `result` label of xknock_hooks_total.
HOOK_RESULTS = ("started", "failed", "timed_out", "dropped")
KNOCK_EVENTS = {
    "repeated": layout.Reason.KNOCK_REPEATED,
    "ignored": layout.Reason.KNOCK_IGNORED,
    "contended": layout.Reason.KNOCK_CONTENDED,
}
# Counters of layout.Reason that become a metric of their own.
SIMPLE_COUNTERS = (
    ("xknock_grants_issued_total", layout.Reason.GRANT_ISSUED,
     "Grant entries written by completed knocks, including refreshes of a grant that already existed."),
    ("xknock_grants_created_total", layout.Reason.GRANT_CREATED,
     "Grant entries completed knocks added that were not in the grants map before."),
    ("xknock_grants_expired_total", layout.Reason.GRANT_EXPIRED,
     "Grants dead on both clocks that the data path deleted when it met them."),
    ("xknock_grants_operator_total", layout.Reason.GRANT_OPERATOR,
     "Grants the operator created with `xknock grant` that were not in the grants map before."),
    ("xknock_grants_spa_total", layout.Reason.SPA_GRANT_CREATED,
     "Grants accepted SPA packets created that were not in the grants map before."),
    ("xknock_spa_known_passed_total", layout.Reason.SPA_KNOWN_PASSED,
     "SPA packets over the total rate queued anyway because their source had an accepted SPA packet before."),
    ("xknock_grants_removed_total", layout.Reason.GRANT_REMOVED,
     "Grants the controller deleted: revoked by the operator or swept after expiry."),
    ("xknock_grant_failures_total", layout.Reason.GRANT_FAILED,
     "Grant entries a completed knock could not write because the grants map was full."),
    ("xknock_bans_issued_total", layout.Reason.BAN_ISSUED,
     "Sources banned after too many failed knocks."),
    ("xknock_bans_operator_total", layout.Reason.BAN_OPERATOR,
     "Sources the operator banned with `xknock ban` that were not banned before."),
    ("xknock_bans_expired_total", layout.Reason.BAN_EXPIRED,
     "Bans over that the data path deleted when the source came back."),
    ("xknock_bans_removed_total", layout.Reason.BAN_REMOVED,
     "Bans the controller deleted: lifted by the operator or swept after they ended."),
    ("xknock_ban_failures_total", layout.Reason.BAN_FAILED,
     "Bans the data path could not write because the bans map was full."),
    ("xknock_bans_spared_total", layout.Reason.BAN_SPARED,
     "Allow-listed sources that reached the ban threshold and were not banned."),
    ("xknock_knock_strict_resets_total", layout.Reason.KNOCK_STRICT_RESET,
     "Knock progress ended by a packet from the source to another port (strict mode); also counted as resets."),
    ("xknock_events_lost_total", layout.Reason.EVENT_LOST,
     "Events the data path could not put on the ring buffer because it was full."),
    ("xknock_monitor_passed_total", layout.Reason.MONITOR_PASSED,
     "Packets that would have been dropped but passed because the filter is in monitor mode."),
)


def package_version():
    return build.version()


def parse_addr(text):
    """"HOST:PORT", "[V6]:PORT" or ":PORT" (all IPv4 addresses) -> (host, port);
    XknockError with a one-line reason."""
    hint = f"expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}, [::1]:{DEFAULT_PORT} or :{DEFAULT_PORT}"
    spec = (text or "").strip()
    if spec.startswith("["):
        host, bracket, port = spec[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise XknockError(f"--metrics-addr {text!r}: {hint}")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise XknockError(f"--metrics-addr {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port = spec.rpartition(":")
        if not colon:
            raise XknockError(f"--metrics-addr {text!r}: {hint}")
        if ":" in host:
            raise XknockError(f"--metrics-addr {text!r}: write an IPv6 address in brackets, e.g. [::1]:{DEFAULT_PORT}")
        host = host or "0.0.0.0"
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise XknockError(f"--metrics-addr {text!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


# --- counting map entries ------------------------------------------------------

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


# --- the collector ---------------------------------------------------------------

class ControllerInfo:
    """What the controller knows of itself: version, live config, last reload."""

    def __init__(self, version=None, config=None, clock=time.time):
        self.version = version or package_version()
        self.config_hash = config_hash(config) if config is not None else ""
        self.clock = clock
        self.last_reload_success = None
        self.last_reload_timestamp = None
        self.interface_events = {}   # (device, event) -> count, from the LinkWatcher
        self.hooks = None            # the controller's hooks.HookRunner, once it runs

    def record_reload(self, success, config=None):
        """The outcome of loading a config (the first one at attach, too)."""
        self.last_reload_success = bool(success)
        self.last_reload_timestamp = self.clock()
        if success and config is not None:
            self.config_hash = config_hash(config)

    def record_interface_event(self, device, event):
        key = (device, event)
        self.interface_events[key] = self.interface_events.get(key, 0) + 1


def running_filter(ifname, control_map_id):
    """(prog_id, xdp_mode) when ifname runs the xknock filter whose control map
    is control_map_id; None when it runs nothing, another program, another
    xknock filter (other maps) or the interface is gone."""
    try:
        att = datapath.attachment(ifname)
        if not datapath.is_xknock(att):
            return None
        if datapath.running_map_ids(att.prog_id).get("control") != control_map_id:
            return None
        return att.prog_id, att.mode
    except (XknockError, OSError):
        return None
    except Exception as err:   # netlink errors
        log.debug("interface lookup failed", extra={"fields": {"iface": ifname, "error": str(err)}})
        return None


class XknockCollector:
    """A prometheus-client collector for one filter (one group of interfaces
    sharing one set of maps).

    maps_provider: a callable returning the filter's FilterMaps.
    ifaces: the interface names of the filter; the `iface` label of every
      per-filter metric is their comma-joined list (one set of series per
      filter, since the counters are per filter, not per interface).
    info: a ControllerInfo.
    sampler: a MapSampler, or None for no map-fill metrics.
    attachment: (ifname, control map id) -> (prog_id, xdp_mode) or None.
    """

    def __init__(self, maps_provider, ifaces, info, sampler=None, attachment=running_filter, clock=time.monotonic):
        self.maps_provider = maps_provider
        self.ifaces = list(ifaces)
        self.iface = ",".join(self.ifaces)
        self.info = info
        self.sampler = sampler
        self.attachment = attachment
        self.clock = clock
        self._failing = False

    def collect(self):
        started = self.clock()
        try:
            maps = self.maps_provider()
            if maps is None:
                raise XknockError("no filter is attached yet")
            families = self._kernel(maps)
            success = 1
            if self._failing:
                log.info("metrics: reading the filter's maps works again")
                self._failing = False
        except Exception as err:   # node_exporter style: report it, never fail the scrape
            families, success = [], 0
            if not self._failing:
                log.warning("metrics: reading the filter's maps failed; xknock_scrape_success is 0",
                            extra={"fields": {"error": str(err)}})
                self._failing = True
        yield from self._controller()
        yield from families
        yield self._gauge("xknock_scrape_success",
                          "Whether the last scrape read the filter's maps: 1 if it did, 0 if reading them failed.",
                          success)
        yield self._gauge("xknock_scrape_duration_seconds",
                          "How long the last scrape took to read the filter's maps, in seconds.",
                          self.clock() - started)

    # -- families ------------------------------------------------------------

    @staticmethod
    def _gauge(name, doc, value, labels=None, values=None):
        family = GaugeMetricFamily(name, doc, labels=labels)
        if labels is None:
            family.add_metric([], value)
        else:
            for label_values, v in values:
                family.add_metric(label_values, v)
        return family

    def _controller(self):
        built = GaugeMetricFamily("xknock_build_info",
                                  "The build of xknock this controller runs: its version and the source revision it "
                                  "was installed from; always 1.", labels=["version", "revision"])
        built.add_metric([self.info.version, build.revision()], 1)
        yield built
        info = GaugeMetricFamily("xknock_controller_info",
                                 "The controller's version and the hash of the config it last applied; always 1.",
                                 labels=["version", "config_hash"])
        info.add_metric([self.info.version, self.info.config_hash], 1)
        yield info
        if self.info.last_reload_success is not None:
            yield self._gauge("xknock_config_last_reload_success",
                              "Whether the last config load (at attach or on SIGHUP) was applied: 1 if it was, 0 if "
                              "it was refused and the previous policy still runs.",
                              1 if self.info.last_reload_success else 0)
            yield self._gauge("xknock_config_last_reload_timestamp_seconds",
                              "When the controller last tried to load the config, successful or not, in seconds "
                              "since the Unix epoch.",
                              self.info.last_reload_timestamp)
        events = CounterMetricFamily(
            "xknock_interface_events",
            "What happened to the filter's interfaces while the controller ran: vanished (deleted or moved "
            "away), reattached (came back under the same name and got the filter again), reattach_failed "
            "(came back unfiltered), renamed, filter_removed (someone took the filter off).",
            labels=["iface", "device", "event"])
        for device in self.ifaces:
            for event in INTERFACE_EVENTS:
                events.add_metric([self.iface, device, event], self.info.interface_events.get((device, event), 0))
        yield events
        if self.info.hooks is not None:
            runner = self.info.hooks
            hooks = CounterMetricFamily(
                "xknock_hooks",
                "Hook commands (on_open, on_close, on_ban) since the controller started, by how they went: "
                "started, failed (could not start, or ended with a non-zero status or a signal), timed_out "
                "(killed at the hooks' timeout), dropped (max_running were already running).",
                labels=["iface", "result"])
            for result in HOOK_RESULTS:
                hooks.add_metric([self.iface, result], getattr(runner, result))
            yield hooks
            yield self._gauge("xknock_hooks_running", "Hook commands running now.", None, ["iface"],
                              [([self.iface], runner.running)])

    def _kernel(self, maps):
        """Every per-filter family, read now; raises when a read fails."""
        iface = self.iface
        counters = maps.counters_by_reason()
        families = []

        packets = CounterMetricFamily(
            "xknock_packets_total",
            "Packets the filter judged, by verdict and the reason for it; every packet counts once.",
            labels=["iface", "verdict", "reason"])
        for reason in layout.Reason:
            if layout.is_verdict(reason):
                verdict = "drop" if layout.is_drop(reason) else "pass"
                packets.add_metric([iface, verdict, reason.name.lower()], counters[reason])
        families.append(packets)

        sequences = live_sequences(maps)
        knocks = CounterMetricFamily(
            "xknock_knocks_total",
            "Knocks of each live sequence by what they did: advanced a step, completed the sequence, reset "
            "progress with a wrong step, or came after the step timeout.",
            labels=["iface", "sequence", "result"])
        by_name = {}   # a time-based sequence is live twice (two windows): one series each
        for seq in sequences.values():
            stats = maps.sequence_stats(seq.uid) or layout.SeqStats()
            total = by_name.setdefault(seq.name.decode(errors="replace"), dict.fromkeys(KNOCK_RESULTS, 0))
            for result in KNOCK_RESULTS:
                total[result] += getattr(stats, result)
        for name, total in sorted(by_name.items()):
            for result in KNOCK_RESULTS:
                knocks.add_metric([iface, name, result], total[result])
        families.append(knocks)

        events = CounterMetricFamily(
            "xknock_knock_events_total",
            "Knock packets that changed no progress: a repeat of the step just taken, a knock with nothing in "
            "progress that is not a first step (or a TCP knock without SYN), or one that lost every "
            "compare-and-swap to other CPUs.",
            labels=["iface", "result"])
        for result, reason in KNOCK_EVENTS.items():
            events.add_metric([iface, result], counters[reason])
        families.append(events)

        for name, doc, results in (
            ("xknock_spa_candidates_total",
             "Packets to the SPA port by what the kernel did: queued for the controller, not shaped like SPA "
             "(size, base64), over the source's rate, over this CPU's share of the total rate, or lost to a full "
             "ring buffer. Every one is dropped.", SPA_CANDIDATES),
            ("xknock_spa_verdicts_total",
             "Queued SPA packets by the controller's verdict: accepted (grants written) or why not.", SPA_VERDICTS),
            ("xknock_answers_total",
             'Refused packets on guarded, knock and SPA ports by how they were answered (answer = "closed"): a '
             "TCP reset or ICMP port unreachable made here, passed for the host's own stack to answer (knock and "
             "SPA ports nobody listens on), nothing over the ICMP rate limits, or nothing where Linux sends "
             "nothing.", ANSWERS)):
            family = CounterMetricFamily(name, doc, labels=["iface", "result"])
            for result, reason in results.items():
                family.add_metric([iface, result], counters[reason])
            families.append(family)

        for name, reason, doc in SIMPLE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["iface"])
            family.add_metric([iface], counters[reason])
            families.append(family)

        banned = (counters[layout.Reason.BAN_ISSUED] + counters[layout.Reason.BAN_OPERATOR]
                  - counters[layout.Reason.BAN_EXPIRED] - counters[layout.Reason.BAN_REMOVED])
        families.append(self._gauge(
            "xknock_bans_live",
            "Banned sources by the kernel's counts: issued plus operator minus expired minus removed; bans over but not yet "
            "removed still count.",
            None, ["iface"], [([iface], max(banned, 0))]))
        live = (counters[layout.Reason.GRANT_CREATED] + counters[layout.Reason.GRANT_OPERATOR]
                + counters[layout.Reason.SPA_GRANT_CREATED] - counters[layout.Reason.GRANT_EXPIRED] - counters[layout.Reason.GRANT_REMOVED])
        families.append(self._gauge(
            "xknock_grants_live",
            "Grants in the map by the kernel's counts: created by knocks, by the operator and by SPA, minus "
            "expired, minus removed; dead grants not yet removed still count.",
            None, ["iface"], [([iface], max(live, 0))]))

        filters = GaugeMetricFamily(
            "xknock_filter_info",
            "The xknock program attached to each interface of the filter, with its id, XDP attach mode and "
            "policy mode; always 1, and absent for an interface the filter is no longer attached to.",
            labels=["iface", "device", "prog_id", "xdp_mode", "mode"])
        settings = maps.settings.lookup(ctypes.c_uint32(maps.active_bank()))
        mode = "monitor" if settings is not None and settings.mode == layout.MODE_MONITOR else "enforce"
        for device in self.ifaces:
            running = self.attachment(device, maps.control.id)
            if running:
                prog_id, xdp_mode = running
                filters.add_metric([iface, device, str(prog_id), xdp_mode or "unknown", mode], 1)
        families.append(filters)

        capacity = GaugeMetricFamily("xknock_map_capacity_entries",
                                     "How many entries each map of the filter can hold.", labels=["iface", "map"])
        for name in SAMPLED_MAPS:
            capacity.add_metric([iface, name], getattr(maps, name).max_entries)
        families.append(capacity)
        families += self._sampled(iface)
        return families

    def _sampled(self, iface):
        entries = GaugeMetricFamily(
            "xknock_map_entries",
            "Entries in each map of the filter, as counted by the controller's background sampler.",
            labels=["iface", "map"])
        age = GaugeMetricFamily(
            "xknock_map_sample_age_seconds",
            "Seconds since the background sampler last counted each map's entries.", labels=["iface", "map"])
        progress = GaugeMetricFamily(
            "xknock_knocks_in_progress",
            "Sources part way through a live sequence, neither completed nor timed out, as counted by the "
            "background sampler.", labels=["iface"])
        if self.sampler is not None:
            sample = self.sampler.latest()
            now = time.monotonic()
            for name in SAMPLED_MAPS:
                if name in sample.entries:
                    entries.add_metric([iface, name], sample.entries[name])
                    age.add_metric([iface, name], max(0.0, now - sample.taken_at[name]))
            if sample.knocks_in_progress is not None:
                progress.add_metric([iface], sample.knocks_in_progress)
        return [entries, age, progress]


# --- serving -----------------------------------------------------------------------

class _Handler(WSGIRequestHandler):
    timeout = 10.0   # a client that sends nothing (or never finishes its TLS handshake) is dropped

    def log_message(self, format, *args):   # not one line per scrape
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """A client that breaks off, or fails its TLS handshake: one debug
        line, not socketserver's traceback on stderr."""
        import sys

        log.debug("metrics request failed", extra={"fields": {"client": client_address[0],
                                                              "error": str(sys.exc_info()[1])}})


def serve(host, port, registry, web_config=None):
    """(server, thread): prometheus-client's WSGI app for registry on
    host:port in a thread, behind TLS and basic auth as web_config says.
    TLS handshakes happen in each connection's own thread, so a slow client
    holds up nobody."""
    from prometheus_client import make_wsgi_app

    from .webconfig import BasicAuth

    app = make_wsgi_app(registry)
    if web_config is not None and web_config.users:
        app = BasicAuth(app, web_config.users)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(_Server):
        address_family = family

    httpd = make_server(host, port, app, Server, handler_class=_Handler)
    if web_config is not None and web_config.tls is not None:
        httpd.socket = web_config.tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="xknock-metrics", daemon=True)
    thread.start()
    return httpd, thread


class MetricsServer:
    """The /metrics endpoint of `xknock attach --metrics-addr`.

    Binding happens on construction, so a bad or busy address fails before
    anything is attached; start() then serves one filter. The registry holds
    only xknock's collector and the process collector (process_*)."""

    def __init__(self, host, port, web_config=None):
        """web_config: a webconfig.WebConfig (TLS, basic auth), or None for plain HTTP."""
        from prometheus_client import ProcessCollector

        self.host, self.port = host, port
        self.web_config = web_config
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.sampler = None
        self.info = None
        try:
            self.httpd, self.thread = serve(host, port, self.registry, web_config)
        except OSError as err:
            reason = err.strerror or str(err)
            raise XknockError(f"--metrics-addr {host}:{port}: cannot listen there: {reason}") from None
        self.port = self.httpd.server_port

    def start(self, maps, ifaces, config, hooks=None):
        """hooks: the controller's hooks.HookRunner, for xknock_hooks_total."""
        self.info = ControllerInfo(config=config)
        self.info.record_reload(True, config)
        self.info.hooks = hooks
        self.sampler = MapSampler(lambda: maps).start()
        self.registry.register(XknockCollector(lambda: maps, ifaces, self.info, sampler=self.sampler))
        scheme = self.web_config.scheme if self.web_config else "http"
        fields = {"url": f"{scheme}://{self._hostport()}/metrics"}
        if self.web_config and self.web_config.users:
            fields["basic_auth_users"] = len(self.web_config.users)
        if self.web_config and self.web_config.tls and self.web_config.tls.verify_mode == ssl.CERT_REQUIRED:
            fields["client_certs"] = "required"
        log.info("serving metrics", extra={"fields": fields})
        return self

    def _hostport(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def record_reload(self, success, config=None):
        if self.info is not None:
            self.info.record_reload(success, config)

    def record_interface_event(self, device, event):
        if self.info is not None:
            self.info.record_interface_event(device, event)

    def close(self):
        if self.sampler is not None:
            self.sampler.stop()
        self.httpd.shutdown()
        self.httpd.server_close()
