"""XknockCollector: a prometheus-client custom collector that builds every
metric family afresh from the filter's maps at scrape time.

The data path counts in per-CPU maps; a scrape sums them
(FilterMaps.counters_by_reason, one lookup per reason) and never touches a
packet. Nothing in a scrape walks a map that grows with traffic (progress,
grants, allow, deny): a scrape costs the same with every map full. How full
those maps are comes from the last round of map_sampler.py, with its age.
"""

import ctypes
import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..config import config_hash
from ..errors import XknockError
from ..kernel import datapath, layout
from ..kernel.maps import live_sequences
from . import build
from .links import EVENTS as INTERFACE_EVENTS
from .map_sampler import SAMPLED_MAPS

log = logging.getLogger("xknock.metrics")

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
