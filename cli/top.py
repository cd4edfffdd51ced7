"""`xknock top`: a live terminal view of the running filters, for the operator
without Grafana.

Every interval it reads the kernel's counters (per-CPU, summed: the same reads
as a metrics scrape, a few dozen lookups whatever the traffic) and shows the
change since the last read divided by the time between the two reads: packets
per second by verdict reason, knock outcomes per second by sequence. Live grants
are counted from the counters as the metrics do (created + operator - expired -
removed).

The lists (up to LISTED live grants with their time left, knocks in progress)
need a read of the grants and progress maps, in batches (kernel/batch.py:
a quarter of a second with a million sources tracked, bench/run controlplane).
So the read is repeated only when at least its own duration times
WALK_EVERY_X_ITS_COST has passed: every frame as a rule, less often on a
kernel without batch lookup, while the rates keep coming every interval. A
frame says how old its lists are when they are not fresh.

The screen is redrawn with ANSI escapes (home, clear to the end), no curses.
"""

import ctypes
import json
import os
import sys
import time
from dataclasses import dataclass

import click

from xknock.cli.common import fail_cleanly
from xknock.cli.params import IFACE, SECONDS_OR_DURATION
from xknock.controller.daemon import lifecycle
from xknock.controller.kernel import datapath, layout
from xknock.controller.kernel.maps import FilterMaps, live_sequences
from xknock.controller.state import grants

LISTED = 10                   # grants and knocks in progress listed per filter
WALK_EVERY_X_ITS_COST = 10    # a map walk uses at most about a tenth of the time
CLEAR = "\x1b[H\x1b[2J"       # cursor home, clear the screen
KNOCK_RESULTS = ("advanced", "completed", "reset", "timed_out")
EVENTS = (("repeated", layout.Reason.KNOCK_REPEATED), ("ignored", layout.Reason.KNOCK_IGNORED),
          ("contended", layout.Reason.KNOCK_CONTENDED))
VERDICTS = [r for r in layout.Reason if layout.is_verdict(r)]


@dataclass
class Reading:
    """The counters of one filter at one moment."""

    at: float                                       # time.monotonic()
    counters: dict                                  # layout.Reason -> total
    sequences: dict                                 # uid -> (name, layout.SeqStats summed over CPUs)
    mode: str                                       # enforce / monitor


def read(maps):
    sequences = {}
    for seq in live_sequences(maps).values():
        stats = maps.sequence_stats(seq.uid) or layout.SeqStats()
        sequences[seq.uid] = (seq.name.decode(errors="replace"), stats)
    settings = maps.settings.lookup(ctypes.c_uint32(maps.active_bank()))
    mode = "monitor" if settings is not None and settings.mode == layout.MODE_MONITOR else "enforce"
    return Reading(time.monotonic(), maps.counters_by_reason(), sequences, mode)


def live_grants(counters):
    """Grants in the map by the kernel's counts, as xknock_grants_live."""
    R = layout.Reason
    return max(0, counters[R.GRANT_CREATED] + counters[R.GRANT_OPERATOR]
               - counters[R.GRANT_EXPIRED] - counters[R.GRANT_REMOVED])


def per_second(now, before, elapsed):
    """The rate between two counter values; None when there is no earlier read
    (or the counter went back: the filter was attached afresh, or a reload
    changed the sequence's knock)."""
    if before is None or elapsed <= 0 or now < before:
        return None
    return (now - before) / elapsed


def fmt_rate(value, width=10):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


@dataclass
class Lists:
    """What a walk of the grants and progress maps found."""

    at: float
    took: float
    grants: list                     # live GrantViews, at most LISTED
    grants_alive: int                # live grants the walk saw
    in_progress: int
    knocks: list                     # [(source, sequence, next step, seconds since)], at most LISTED


def walk(maps):
    started = time.monotonic()
    alive, listed = grants.first_live_grants(maps, LISTED)
    in_progress, knocks = grants.knocks_in_progress(maps, limit=LISTED)
    done = time.monotonic()
    return Lists(done, done - started, listed, alive, in_progress, knocks)


@dataclass
class FilterView:
    """One running filter (one set of maps), followed from frame to frame."""

    atts: list
    maps: FilterMaps
    previous: Reading | None = None
    current: Reading | None = None
    lists: Lists | None = None

    def refresh(self, interval, lists=True):
        """Read the counters; walk the maps for the lists too when asked and due."""
        self.previous, self.current = self.current, read(self.maps)
        if lists and (self.lists is None or time.monotonic() - self.lists.at
                      >= max(interval, self.lists.took * WALK_EVERY_X_ITS_COST) * 0.95):
            self.lists = walk(self.maps)

    def render(self, interval):
        cur, prev = self.current, self.previous
        elapsed = cur.at - prev.at if prev else 0.0
        before = prev.counters if prev else {}
        lines = []
        ifaces = ", ".join(f"{a.ifname} ({a.mode}, prog {a.prog_id})" for a in self.atts)
        lines.append(f"filter on {ifaces}: {cur.mode}")

        rates = {r: per_second(cur.counters[r], before.get(r), elapsed) for r in layout.Reason}
        passed = _sum_rates(rates[r] for r in VERDICTS if not layout.is_drop(r))
        dropped = _sum_rates(rates[r] for r in VERDICTS if layout.is_drop(r))
        over = f"over {elapsed:.2f} s" if prev else "(rates from the next frame)"
        lines.append(f"  packets/s {over}: passed {fmt_rate(passed, 0)}, dropped {fmt_rate(dropped, 0)}")
        lines.append(f"    {'reason':<18} {'per s':>10} {'total':>14}")
        for r in VERDICTS:
            lines.append(f"    {r.name.lower():<18} {fmt_rate(rates[r])} {cur.counters[r]:>14}")
        if cur.mode == "monitor" or cur.counters[layout.Reason.MONITOR_PASSED]:
            r = layout.Reason.MONITOR_PASSED
            lines.append(f"    {'monitor_passed':<18} {fmt_rate(rates[r])} {cur.counters[r]:>14}"
                         "   (counted as drops above, passed)")

        lines.append(f"  knocks/s by sequence {''.join(f'{k:>11}' for k in KNOCK_RESULTS)}")
        if not cur.sequences:
            lines.append("    (no live sequence)")
        old = prev.sequences if prev else {}
        for uid, (name, stats) in sorted(cur.sequences.items(), key=lambda item: item[1][0]):
            earlier = old.get(uid, (None, None))[1]
            cells = "".join(
                " " + fmt_rate(per_second(getattr(stats, k), getattr(earlier, k) if earlier else None, elapsed))
                for k in KNOCK_RESULTS)
            lines.append(f"    {name:<18}{cells}")
        lines.append("  knock events/s: " + ", ".join(
            f"{name} {fmt_rate(rates[r], 0)}" for name, r in EVENTS))

        R = layout.Reason
        lines.append(f"  grants live: {live_grants(cur.counters)}   issued/s {fmt_rate(rates[R.GRANT_ISSUED], 0)}, "
                     f"expired/s {fmt_rate(rates[R.GRANT_EXPIRED], 0)}, failed (map full)/s "
                     f"{fmt_rate(rates[R.GRANT_FAILED], 0)}")
        lists = self.lists
        if lists is None:
            return lines
        # Times left and since, as of now rather than as of the walk.
        age = max(0.0, cur.at - lists.at)
        if age > interval * 1.5:
            lines.append(f"  (the lists below are {age:.0f} s old: walking the maps took {lists.took:.1f} s, so "
                         f"they are refreshed every {max(interval, lists.took * WALK_EVERY_X_ITS_COST):.0f} s)")
        for g in lists.grants:
            lines.append(f"    {str(g.source):<40} {g.proto}:{g.port:<6} {g.sequence:<14} "
                         f"window {max(0.0, g.window_left_s - age):>7.1f}s  idle {max(0.0, g.idle_left_s - age):>7.1f}s")
        if lists.grants_alive > len(lists.grants):
            lines.append(f"    ... and {lists.grants_alive - len(lists.grants)} more")
        lines.append(f"  knocks in progress: {lists.in_progress} (sources at their first step are counted, not listed)")
        for source, name, step, since in lists.knocks:
            lines.append(f"    {str(source):<40} {name:<14} next step {step} ({since + age:.1f} s ago)")
        if lists.in_progress > len(lists.knocks):
            lines.append(f"    ... and {lists.in_progress - len(lists.knocks)} more")
        return lines


    def snapshot(self):
        """The frame's numbers as a dict (--json): rates per second over the interval, totals, lists."""
        cur, prev = self.current, self.previous
        elapsed = cur.at - prev.at if prev else 0.0
        before = prev.counters if prev else {}
        rates = {r: per_second(cur.counters[r], before.get(r), elapsed) for r in layout.Reason}
        old = prev.sequences if prev else {}
        sequences = {}
        for uid, (name, stats) in cur.sequences.items():
            earlier = old.get(uid, (None, None))[1]
            sequences[name] = {k: per_second(getattr(stats, k), getattr(earlier, k) if earlier else None, elapsed)
                               for k in KNOCK_RESULTS}
        lists = self.lists
        return {
            "interfaces": [{"name": a.ifname, "xdp_mode": a.mode, "prog_id": a.prog_id} for a in self.atts],
            "mode": cur.mode,
            "over_s": round(elapsed, 3),
            "packets_per_s": {"passed": _sum_rates(rates[r] for r in VERDICTS if not layout.is_drop(r)),
                              "dropped": _sum_rates(rates[r] for r in VERDICTS if layout.is_drop(r))},
            "reasons": {r.name.lower(): {"per_s": rates[r], "total": cur.counters[r]} for r in layout.Reason},
            "knocks_per_s": sequences,
            "grants_live": live_grants(cur.counters),
            "grants": [] if lists is None else [
                {"source": str(g.source), "port": f"{g.proto}:{g.port}", "sequence": g.sequence,
                 "window_left_s": round(g.window_left_s, 1), "idle_left_s": round(g.idle_left_s, 1)}
                for g in lists.grants],
            "knocks_in_progress": None if lists is None else lists.in_progress,
            "knocks": [] if lists is None else [
                {"source": str(source), "sequence": name, "next_step": step, "since_s": round(since, 1)}
                for source, name, step, since in lists.knocks],
        }


def _sum_rates(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


class Top:
    """The filters of this network namespace (or the one on iface), found
    afresh every frame: one attached or detached meanwhile comes or goes."""

    def __init__(self, iface=None):
        self.iface = iface
        self.views = {}          # control map id -> FilterView

    def discover(self):
        found = {}
        for control, atts in datapath.attached_filters():
            if self.iface and self.iface not in [a.ifname for a in atts]:
                continue
            view = self.views.pop(control, None)
            if view is None:
                view = FilterView(atts, FilterMaps.from_prog(atts[0].prog_id))
            view.atts = atts
            found[control] = view
        self.close()             # what is left was detached
        self.views = found

    def refresh(self, interval, lists=True):
        self.discover()
        for view in self.views.values():
            view.refresh(interval, lists)

    def frame(self, interval):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"xknock top   {stamp}   every {interval:g} s"]
        if not self.views:
            where = f"on {self.iface}" if self.iface else "in this network namespace"
            lines.append(f"no xknock filter is attached {where} now")
        for view in sorted(self.views.values(), key=lambda v: v.atts[0].ifname):
            lines.append("")
            lines += view.render(interval)
        return "\n".join(lines)

    def close(self):
        for view in self.views.values():
            view.maps.close()
        self.views = {}


def run(iface, interval, once, out=sys.stdout, as_json=False):
    """Show frames until Ctrl-C (or one, with once); as_json: one snapshot as JSON."""
    view = Top(iface)
    once = once or as_json
    clear = not once and out.isatty()
    try:
        view.refresh(interval, lists=False)    # the first counters; the lists come with the first frame
        if not view.views and not iface:
            if as_json:
                out.write(json.dumps({"interval_s": interval, "filters": []}) + "\n")
                return
            click.echo("no xknock filter is attached in this network namespace", file=out)
            return
        next_at = time.monotonic() + interval
        while True:
            time.sleep(max(0.0, next_at - time.monotonic()))
            view.refresh(interval)
            if as_json:
                snapshot = [v.snapshot() for v in sorted(view.views.values(), key=lambda v: v.atts[0].ifname)]
                out.write(json.dumps({"at": time.time(), "interval_s": interval, "filters": snapshot}, indent=2) + "\n")
                out.flush()
                return
            text = view.frame(interval)
            out.write((CLEAR if clear else "") + text + "\n" + ("" if clear or once else "\n"))
            out.flush()
            if once:
                return
            # The next frame one interval after this one; a slow frame pushes it back, rates use the real time.
            next_at = max(next_at + interval, time.monotonic())
    finally:
        view.close()


@click.command(epilog="""\b
Examples:
  xknock top                        # every filter in this network namespace, redrawn every second
  xknock top eth0 --interval 5      # rates over 5 s
  xknock top eth0 --once            # one frame after one interval, then exit (scripts)
  xknock top eth0 --json            # one snapshot after one interval, as JSON""")
@click.argument("iface", required=False, type=IFACE)
@click.option("--interval", "interval_ns", type=SECONDS_OR_DURATION, default="1s", show_default=True,
              help="Time between frames (500ms, 2s; a bare number is seconds); rates are counted over this time.")
@click.option("--once", is_flag=True, help="Print one frame after one interval and exit.")
@click.option("--json", "as_json", is_flag=True,
              help="One snapshot after one interval as JSON (rates per second, totals, lists), then exit.")
@fail_cleanly
def top(iface, interval_ns, once, as_json):
    """Live packet rates by reason, knocks per sequence, grants, knocks in progress."""
    if interval_ns < 100_000_000:
        raise click.BadParameter("at least 100ms", param_hint="--interval")
    interval = interval_ns / 1e9
    try:
        lifecycle.require_root()
        if iface:
            lifecycle.open_filter(iface).close()   # a clear error when nothing runs there
        run(iface, interval, once, as_json=as_json)
    except KeyboardInterrupt:   # Ctrl-C is how one leaves top: no traceback, status 0
        click.echo("")
    except BrokenPipeError:     # `xknock top | head`: the reader is gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
