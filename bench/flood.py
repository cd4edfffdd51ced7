"""A legitimate knock under a flood of spoofed random-source traffic, in the
namespace lab (`bench/run flood [--quick]`).

The attacker's namespace floods the server with the generator of
xknock_dev.traffic (XDP live frames) while the client knocks with the
real `xknock knock` and connects to the guarded port, over and over. Floods:

- first knock port: SYNs to the sequence's first step from random sources,
  the worst case: every packet writes first-step state (an LRU insert into
  `progress`, or a slot of the `firsts` array in data paths that have one);
- knock ports: the three steps of the sequence, equally often;
- random ports: TCP and UDP to random ports (they pass xknock, unguarded).

Each flood runs unthrottled ("max") and throttled to 30% and 10% of the rate
max reached. For every try: did the connect succeed, the time from the knock
command's return to the connect, and what the client's state did, watched
every 2 ms from user space (a syscall lookup does not touch the LRU order):
which steps it reached, and whether it vanished before completing (evicted:
nothing else deletes it while a try runs) or stayed without advancing (a knock
lost on the way: the server's receive ring overflows when the flood outruns
the CPU judging it; those drops are counted at the server's bridge port).

Also measured: the generator's rate on each path (see traffic.attach_peer),
how long a client's state lives under the flood after step 1 and after step 2,
and a scale model: the same flood against knock-state maps 16 times smaller,
i.e. the default maps under a 16 times faster flood (this lab judges at most
one CPU's worth of flood, see traffic.py).

Server CPU: kernel.bpf_stats are switched on (BPF_ENABLE_STATS) during each
flood window of the full run, for xknock's own run time per packet and its
share of a CPU; /proc/stat gives the whole machine's busy and softirq shares
(all packet work of the lab, the generator's included, runs in softirq).
"""

import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from xknock.controller.client import knockclient
from xknock.controller.daemon import metrics
from xknock.controller.kernel import bpfsys, layout
from xknock.controller.kernel.batch import batches
from xknock.controller.kernel.maps import FilterMaps, live_sequences, to_addr
from xknock_dev import traffic
from xknock_dev.lab import HELPER_PYTHON, lab, stop_process

from . import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from xknock_dev.e2e import (
    XKNOCK, LineReader, TcpEchoServer, config_text, fresh_attach, status_json, write_config, xknock,
)

SEQUENCE = ("tcp:7000", "udp:8000", "tcp:9000")
GUARDED = 22
STEP_TIMEOUT = "5s"
CONNECT_TIMEOUT = 1.5      # one SYN retransmission (1 s) inside it
POLL = 0.002
TARGETS = {
    "first knock port": ["tcp:7000"],
    "knock ports": list(SEQUENCE),
    "random ports": ["tcp:*", "udp:*"],
}
SCALE = 16                 # the scale model's knock-state maps: 1/16 of the default


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.tries = 2 if quick else 20
        self.delays = [0.05] if quick else [0.05, 0.2]
        # The worst case gets the CLI's default delay and a slow client too.
        self.first_port_delays = [0.05] if quick else [0.05, 0.1, 0.2, 0.5]
        self.levels = [1.0] if quick else [1.0, 0.3, 0.1]
        self.targets = ["first knock port"] if quick else list(TARGETS)
        self.rate_seconds = 0.5 if quick else 2.0
        self.rate_paths = ["direct"] if quick else ["drop", "bridge", "direct"]
        self.probes = 1 if quick else 5
        self.life_limit = 1.0 if quick else 5.0
        self.scale_delays = [0.05] if quick else [0.05, 0.1, 0.2, 0.5]
        self.bpf_stats = not quick
        self.warmup = 0.3 if quick else 1.0

    def delays_for(self, target):
        return self.first_port_delays if target == "first knock port" else self.delays

    def repeats_for(self, target, level):
        """`xknock knock --repeat`: once, and three times (the flood advice) where it matters most."""
        return [1, 3] if target == "first knock port" and level >= 1.0 else [1]


# --- the client: knocks with the real CLI, then connects --------------------------

CLIENT = r"""
import json, socket, subprocess, sys, time
xknock, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.monotonic()
    knock = subprocess.run([xknock, "knock", server, *job["steps"], "--delay", str(job["delay"]),
                            "--repeat", str(job["repeat"])],
                           capture_output=True, text=True)
    t1 = time.monotonic()
    ok = None
    if job["connect"]:
        try:
            socket.create_connection((server, port), timeout=job["timeout"]).close()
            ok = True
        except OSError:
            ok = False
    t2 = time.monotonic()
    print(json.dumps({"rc": knock.returncode, "err": knock.stderr.strip()[-300:], "knock_s": t1 - t0,
                      "connect_s": t2 - t1, "ok": ok}), flush=True)
"""

# `xknock attach --once` with build-time defines (map sizes such as
# XK_PROGRESS_ENTRIES): the CLI has no option for them, attach() has cflags.
SCALED_ATTACH = r"""
import sys
from xknock.controller.config import load_config
from xknock.controller.daemon import lifecycle
lifecycle.attach([sys.argv[1]], load_config(sys.argv[2]), cflags=sys.argv[3:])
print("attached", flush=True)
"""


class Client:
    """The client's helper process: one knock (and connect) per job."""

    def __init__(self, net):
        self.process = net.client.popen([HELPER_PYTHON, "-c", CLIENT, XKNOCK, net.server.ipv4, str(GUARDED)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = LineReader(self.process.stdout)
        if not self.out.wait_for(lambda l: l == "ready", 10):
            raise RuntimeError("the client helper did not start")

    def job(self, steps, delay, connect=True, timeout=CONNECT_TIMEOUT, repeat=1):
        self.process.stdin.write((json.dumps({"steps": list(steps), "delay": delay, "connect": connect,
                                              "timeout": timeout, "repeat": repeat}) + "\n").encode())
        self.process.stdin.flush()
        line = self.out.wait_for(lambda l: l.startswith("{"), 60)
        if line is None:
            raise RuntimeError("the client helper gave no answer")
        return json.loads(line)

    def close(self):
        stop_process(self.process)


class Watch:
    """Polls the client's progress entry on a thread: the steps it reached
    (in order), and when it was first and last seen."""

    def __init__(self, maps, key, nsteps, first_held=None):
        self.maps, self.key, self.nsteps = maps, key, nsteps
        self.first_held = first_held   # where first steps live outside `progress`: is the client's held?
        self.steps = []           # distinct successive steps seen (0 = absent)
        self.seen_at = {}         # step -> first time seen
        self.gone_at = None       # first time absent after having been seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            value = self.maps.progress.lookup(self.key)
            now = time.monotonic()
            step = layout.progress_step(value.value) if value is not None else 0
            if not step and self.first_held and not any(s > 1 for s in self.steps) and self.first_held():
                step = 1
            if not self.steps or self.steps[-1] != step:
                if step == 0 and self.steps and self.gone_at is None:
                    self.gone_at = now
                if step:
                    self.seen_at.setdefault(step, now)
                if step or self.steps:
                    self.steps.append(step)
            time.sleep(POLL)

    def wait_gone(self, limit):
        deadline = time.monotonic() + limit
        while self.gone_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.gone_at

    def verdict(self, granted, gap):
        """What happened to the try's progress. The knock client sends step
        N+1 `gap` after step N (knock_gap()): progress gone before
        then was evicted before the next knock could arrive; progress that
        outlived that time without advancing never saw the next knock (lost
        on the way: the receive ring was full)."""
        reached = max([s for s in self.steps if s] or [0])
        if reached >= self.nsteps:
            return "completed" if granted else "completed, connect failed"
        if reached == 0:
            return "step 1 lost"
        vanished = 0 in self.steps[self.steps.index(reached):]
        if not vanished:
            return f"step {reached + 1} lost"
        life = self.gone_at - self.seen_at[reached]
        if life < gap:
            return f"evicted after step {reached}"
        if life > gap + 0.04:
            return f"step {reached + 1} lost, then evicted"
        return f"evicted after step {reached} (as step {reached + 1} came)"


class CpuMeter:
    """The machine's CPU shares (/proc/stat) and xknock's run time (bpf stats)."""

    def __init__(self, prog_id, bpf_stats):
        self.prog_id = prog_id
        self.stats_fd = None
        if bpf_stats:
            fn = bpfsys.lib().bpf_enable_stats
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            fd = fn(0)   # BPF_STATS_RUN_TIME: on while the fd is open
            self.stats_fd = fd if fd >= 0 else None

    @staticmethod
    def _stat():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4], fields[6]   # total, idle + iowait, softirq

    def _prog(self):
        return common.prog_run_time(self.prog_id)

    def __enter__(self):
        self.t0, self.s0, self.p0 = time.monotonic(), self._stat(), self._prog()
        return self

    def __exit__(self, *exc):
        self.t1, self.s1, self.p1 = time.monotonic(), self._stat(), self._prog()

    def close(self):
        if self.stats_fd is not None:
            os.close(self.stats_fd)
            self.stats_fd = None

    def result(self):
        total = self.s1[0] - self.s0[0]
        wall = self.t1 - self.t0
        run_ns, runs = self.p1[0] - self.p0[0], self.p1[1] - self.p0[1]
        out = {"busy": 1 - (self.s1[1] - self.s0[1]) / total if total else None,
               "softirq": (self.s1[2] - self.s0[2]) / total if total else None,
               "cpus": os.cpu_count()}
        if self.stats_fd is not None and runs:
            out["xknock_ns"] = run_ns / runs
            out["xknock_cpu"] = run_ns / 1e9 / wall
        return out


# --- the lab -----------------------------------------------------------------------------

class FloodLab:
    """A lab with xknock on the server (a TCP server behind guarded port 22),
    the maps opened from the running program, and the client's helper."""

    def __init__(self, cflags=(), bpf_stats=False, prefix="xkflood"):
        self.cflags = list(cflags)
        self.bpf_stats = bpf_stats
        self.prefix = prefix
        self._lab = None

    def __enter__(self):
        self._ctx = lab(self.prefix, ipv6=False)
        self.net = self._ctx.__enter__()
        try:
            self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _setup(self):
        net = self.net
        self.server = TcpEchoServer(net.server, GUARDED)
        self.config_dir = f"/tmp/xkflood-{os.getpid()}-{net.token}"
        os.makedirs(self.config_dir, exist_ok=True)
        path = write_config(self.config_dir, "flood.toml", config_text(knock=SEQUENCE, step_timeout=STEP_TIMEOUT))
        if self.cflags:
            xknock(net.server, "detach", net.server_iface)
            result = net.server.run([sys.executable, "-c", SCALED_ATTACH, net.server_iface, path, *self.cflags],
                                    timeout=180)
            assert "attached" in result.stdout, result.stderr
        else:
            fresh_attach(net, path)
        self.prog_id = status_json(net.server)[0]["interfaces"][0]["prog_id"]
        self.maps = FilterMaps.from_prog(self.prog_id)
        [seq] = live_sequences(self.maps).values()
        self.nsteps = seq.nsteps
        self.uid = seq.uid
        self.key = layout.ProgressKey(src=to_addr(net.client.ipv4), uid=seq.uid)
        # Where a first step is held: in `progress` (an LRU entry at step 1), or,
        # in data paths that have it, in the `firsts` array of hashed slots.
        self.firsts = None
        try:
            from xknock.controller.kernel import firsts

            self.maps.firsts
            self.firsts = firsts
        except (ImportError, AttributeError):
            pass
        first_map = self.maps.firsts if self.firsts else self.maps.progress
        self.state_slots = first_map.max_entries
        self.state_name = "firsts array" if self.firsts else "progress LRU"
        self.grant_key = layout.GrantKey(src=to_addr(net.client.ipv4), proto=layout.PROTO_TCP, port=GUARDED)
        self.client = Client(net)
        self.cpu = CpuMeter(self.prog_id, self.bpf_stats)

    def __exit__(self, *exc):
        for name in ("cpu", "client", "maps", "server"):
            thing = getattr(self, name, None)
            if thing is not None:
                (thing.stop if name == "server" else thing.close)()
        if getattr(self, "config_dir", None):
            subprocess.run(["rm", "-rf", self.config_dir], check=False)
        self._ctx.__exit__(*exc)

    def flood(self, ports, rate=None, seconds=None, path="direct"):
        """A FloodProcess, started."""
        self.flood_ports = list(ports)
        return traffic.lab_flood(self.net, ports, rate=rate, seconds=seconds, path=path).start()

    def first_held(self):
        return self.firsts.held(self.maps, self.net.client.ipv4, self.uid) is not None

    def watch(self):
        return Watch(self.maps, self.key, self.nsteps, self.first_held if self.firsts else None)

    def forget_client(self):
        """No grant, no progress for the client: the next try starts from nothing."""
        self.maps.grants.delete(self.grant_key)
        self.maps.progress.delete(self.key)
        if self.firsts:
            self.firsts.forget(self.maps, self.net.client.ipv4, [self.uid])

    def clear_progress(self):
        """Empty the progress map (batch deletes), so a flood's count starts from nothing."""
        m = self.maps.progress
        info = bpfsys.map_info(m.fd)
        chunks = [bytes(keys[:n * info.key_size])
                  for n, keys, _ in batches(m.fd, info.key_size, info.value_size)]
        delete = bpfsys.lib().bpf_map_delete_batch
        delete.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
        delete.restype = ctypes.c_int
        size = info.key_size
        for chunk in chunks:
            while chunk:
                count = ctypes.c_uint32(len(chunk) // size)
                buf = ctypes.create_string_buffer(chunk, len(chunk))
                if delete(m.fd, buf, ctypes.byref(count), None) == 0:
                    break
                # It stops at a key gone meanwhile (evicted): skip that one, go on.
                chunk = chunk[(count.value + 1) * size:]

    def counters(self):
        return self.maps.counters_by_reason()

    def server_port_tx(self):
        """(sent, dropped) by the server's bridge port: frames it could not
        put into the server's receive ring (full) are dropped there."""
        out = subprocess.run(["ip", "-n", self.net.switch, "-s", "-j", "link", "show", "dev",
                              traffic.lab_peer(self.net, self.net.server)[1]],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        tx = json.loads(out)[0]["stats64"]["tx"]
        return tx["packets"], tx["dropped"]

    @staticmethod
    def dropped_share(before, after):
        sent, dropped = after[0] - before[0], after[1] - before[1]
        return dropped / (sent + dropped) if sent + dropped else 0.0

    def seen(self, before, after):
        """Packets the filter judged between two counters_by_reason()."""
        return sum(after[r] - before[r] for r in layout.Reason if r < layout.VERDICT_REASONS)

    def entries(self):
        return metrics.count_entries(self.maps.progress, budget_s=10)

    def firsts_held(self):
        """First steps younger than the step timeout in `firsts`, or None without it."""
        if not self.firsts:
            return None
        return self.firsts.fresh(self.maps, 5_000_000, time.monotonic_ns() // 1000)

    def knock_try(self, delay, steps=SEQUENCE, repeat=1):
        """One knock (every step `repeat` times) and connect; returns a dict with the try's outcome."""
        self.forget_client()
        before = self.counters()
        with self.watch() as watch:
            result = self.client.job(steps, delay, repeat=repeat)
            granted = self.maps.grants.lookup(self.grant_key) is not None
        after = self.counters()
        if result["rc"] != 0:
            raise RuntimeError(f"xknock knock failed: {result['err']}")
        result["progress"] = watch.verdict(granted or bool(result["ok"]), knock_gap(delay, repeat))
        if not result["ok"] and getattr(self, "flood_ports", None) == TARGETS["first knock port"]:
            # A first-port flood's SYNs to a first step from random sources are never
            # ignored and never reset anything: these counts are the client's own knocks.
            if after[layout.Reason.KNOCK_RESET] > before[layout.Reason.KNOCK_RESET]:
                # progress "gone" after a knock that came in the wrong place: a step was lost
                result["progress"] += ", a later knock reset it"
            elif after[layout.Reason.KNOCK_IGNORED] > before[layout.Reason.KNOCK_IGNORED]:
                result["progress"] += ", later knocks found no progress"
        result["steps"] = watch.steps
        result["delay"] = delay
        result["repeat"] = repeat
        return result

    def lifetime(self, steps, limit=5.0):
        """Seconds the client's progress lives after its last step is seen;
        None past limit; "evicted" when an earlier step's progress was gone
        before the last step came, "lost" when the last step never showed."""
        self.forget_client()
        with self.watch() as watch:
            self.client.job(steps, 0.05, connect=False)
            last = len(steps)
            started = watch.seen_at.get(last)
            if started is None:
                time.sleep(0.05)
                started = watch.seen_at.get(last)
            if started is None:
                return "evicted" if watch.gone_at is not None else "lost"
            gone = watch.wait_gone(limit)
        return None if gone is None else gone - started


def knock_gap(delay, repeat):
    """About how long after a step's first copy the next step's first copy
    leaves the client: the delay (over which the copies are spread) and each
    copy's TCP_HOLD."""
    return delay + repeat * knockclient.TCP_HOLD


def run_tries(fl, delay, tries, stop_at_failure=False, repeat=1):
    results = []
    for _ in range(tries):
        results.append(fl.knock_try(delay, repeat=repeat))
        if stop_at_failure and not results[-1]["ok"]:
            break
    return results


def summarize(results):
    ok = [r for r in results if r["ok"]]
    times = sorted(r["connect_s"] * 1000 for r in ok)
    failures = {}
    for r in results:
        if not r["ok"]:
            failures[r["progress"]] = failures.get(r["progress"], 0) + 1
    return {"ok": len(ok), "tries": len(results),
            "connect_ms_median": statistics.median(times) if times else None,
            "connect_ms_max": times[-1] if times else None,
            "failures": failures}


# --- the benchmark ---------------------------------------------------------------------------

def bench_rates(fl, settings):
    """Generator rates: each path x each flood, unthrottled."""
    rows = []
    for path in settings.rate_paths:
        for target in settings.targets:
            before = fl.counters()
            flood = traffic.lab_flood(fl.net, TARGETS[target], seconds=settings.rate_seconds, path=path).start()
            result = flood.wait(60)
            seen = fl.seen(before, fl.counters())
            rows.append({"path": path, "target": target, "pps": result["pps"],
                         "reached": seen / result["packets"] if result["packets"] else 0})
            print(f"  rate: {path:6} {target:16} {result['pps']:>10,} pps, {rows[-1]['reached']:.0%} reached xknock",
                  flush=True)
    return rows


def bench_scenarios(fl, settings, targets=None, delays=None, levels=None, repeats=None, label=""):
    rows = []
    for target in targets or settings.targets:
        max_pps = None
        for level in levels or settings.levels:
            rate = None if level >= 1.0 else max(1000, int(max_pps * level))
            fl.clear_progress()
            flood = fl.flood(TARGETS[target], rate=rate)
            try:
                time.sleep(settings.warmup)   # the map fills (or keeps turning over) first
                before, tx_before = fl.counters(), fl.server_port_tx()
                with fl.cpu:
                    per_delay = {(d, n): run_tries(fl, d, settings.tries, repeat=n)
                                 for n in repeats or settings.repeats_for(target, level)
                                 for d in delays or settings.delays_for(target)}
                after, tx_after = fl.counters(), fl.server_port_tx()
                entries, held = fl.entries(), fl.firsts_held()
            finally:
                result = flood.stop()
            cpu = fl.cpu.result()
            wall = fl.cpu.t1 - fl.cpu.t0
            seen_pps = fl.seen(before, after) / wall
            if level >= 1.0:
                max_pps = result["pps"]
            for (delay, repeat), results in per_delay.items():
                s = summarize(results)
                rows.append({"target": target, "level": level, "flood_pps": result["pps"], "seen_pps": seen_pps,
                             "ring_drops": fl.dropped_share(tx_before, tx_after),
                             "delay": delay, "repeat": repeat, **s, "entries": entries, "firsts": held, **cpu,
                             "label": label})
                print(f"  {label}{target:16} {'max' if level >= 1 else f'{level:.0%}':>4} {result['pps']:>9,} pps "
                      f"delay {delay} repeat {repeat}: {s['ok']}/{s['tries']} ok, failures {s['failures'] or '-'}, "
                      f"entries {entries}", flush=True)
    return rows


def bench_lifetimes(fl, settings, label):
    """How long a step-1 and a step-2 entry of the client live under the max first-port flood."""
    flood = fl.flood(TARGETS["first knock port"])
    try:
        time.sleep(settings.warmup)
        before, t0 = fl.counters(), time.monotonic()
        after1 = [fl.lifetime(SEQUENCE[:1], settings.life_limit) for _ in range(settings.probes)]
        after2 = [fl.lifetime(SEQUENCE[:2], settings.life_limit) for _ in range(settings.probes)]
        after, t1 = fl.counters(), time.monotonic()
    finally:
        result = flood.stop()
    inserts = (after[layout.Reason.KNOCK_ADVANCED] - before[layout.Reason.KNOCK_ADVANCED]) / (t1 - t0)
    entries = fl.state_slots
    row = {"label": label, "entries": entries, "kind": fl.state_name, "flood_pps": result["pps"], "inserts_pps": inserts,
           "turnover_s": entries / inserts if inserts else None, "after_step1": after1, "after_step2": after2}
    print(f"  lifetimes {label}: {row}", flush=True)
    return row


def fmt_ms(value):
    return "-" if value is None else f"{value:.1f}"


def fmt_life(values, limit):
    known = [v for v in values if isinstance(v, float)]
    parts = []
    if known:
        parts.append(f"{statistics.median(known) * 1000:.0f} ({min(known) * 1000:.0f}-{max(known) * 1000:.0f})")
    if values.count(None):
        parts.append(f"{values.count(None)} of {len(values)} still there after {limit:g} s")
    if values.count("evicted"):
        parts.append(f"{values.count('evicted')} of {len(values)} evicted before this step came")
    if values.count("lost"):
        parts.append(f"{values.count('lost')} of {len(values)}: this knock lost")
    return ", ".join(parts)


def report(settings, rates, rows, lifetimes, scale_rows, source=(), scale_flags=()):
    lines = ["# xknock under floods (namespace lab)", "", *common.machine(), *source,
             f"- settings: {'quick' if settings.quick else 'full'}; {settings.tries} tries per cell; "
             f"sequence {', '.join(SEQUENCE)}, step timeout {STEP_TIMEOUT}, guarded tcp:{GUARDED}",
             "", "## The generator", "",
             "XDP live frames (BPF_PROG_TEST_RUN, batches of 64) out of the attacker's veth, one generator "
             "process; random IPv4 sources (0.0.0.0/0 without the lab's /24), IPv4 and TCP/UDP checksums "
             "correct. Path `drop`: the peer drops (the generator alone); `bridge`: frames cross the lab's "
             "bridge as packets; `direct`: redirected as XDP frames to the server's bridge port. 'reached' is "
             "the share the server's xknock counted.", ""]
    lines.append(common.markdown_table(
        ["path", "flood", "pps", "reached xknock"],
        [[r["path"], r["target"], f"{r['pps']:,}", "-" if r["path"] == "drop" else f"{r['reached']:.0%}"]
         for r in rates]))
    lines += ["", "## Knock success under the flood (path `direct`)", "",
              "Per cell: `xknock knock` (the delay given; 'repeat': every knock sent that many times, the "
              f"copies spread over the delay, the last just before the next knock) then a TCP connect (timeout {CONNECT_TIMEOUT} s) from "
              f"the client, {settings.tries} times while the flood runs; the progress map is emptied before each "
              "flood. 'flood pps': the generator's rate; 'xknock pps': what the server's filter judged; 'ring "
              "drops': the share of frames the server's bridge port dropped because the server's receive ring "
              "was full (xknock's CPU could not keep up). 'connect ms': from the knock command's return to the "
              "connection (median / max of the successes). 'failures': what the client's progress did, watched "
              "in the map every 2 ms: 'evicted after step N' = it vanished before step N+1 was sent; 'step N "
              "lost' = it stayed but never saw step N (the packet was dropped on the way, a full ring); 'step N "
              "lost, then evicted' = it vanished only after step N was due. A first step is watched where the "
              "data path holds it: in `progress`, or in the `firsts` array where there is one. 'entries': "
              "progress map entries at the end (+ first steps younger than the step timeout in `firsts`). CPU: busy and softirq shares of all the machine's CPUs (all packet work of the lab, the "
              "generator's included, is softirq); xknock: its run time per packet and the share of one CPU it "
              "used (kernel bpf stats).", ""]
    header = ["flood", "rate", "flood pps", "xknock pps", "ring drops", "delay s", "repeat", "success", "connect ms",
              "failures", "entries", "CPU busy", "softirq", "xknock ns/pkt", "xknock CPU"]

    def table(cells):
        return common.markdown_table(header, [[
            r["target"], "max" if r["level"] >= 1 else f"{r['level']:.0%}", f"{r['flood_pps']:,}",
            f"{r['seen_pps']:,.0f}", f"{r['ring_drops']:.0%}", r["delay"], r["repeat"], f"{r['ok']}/{r['tries']}",
            f"{fmt_ms(r['connect_ms_median'])} / {fmt_ms(r['connect_ms_max'])}",
            ", ".join(f"{k}: {v}" for k, v in r["failures"].items()) or "-",
            ("?" if r["entries"] is None else f"{r['entries']:,}")
            + ("" if r.get("firsts") is None else f" + {r['firsts']:,} firsts"),
            f"{r['busy']:.0%}", f"{r['softirq']:.0%}",
            f"{r['xknock_ns']:.0f}" if "xknock_ns" in r else "-",
            f"{r['xknock_cpu']:.0%}" if "xknock_cpu" in r else "-"] for r in cells])

    lines.append(table(rows))
    lines += ["", "## How long the client's progress lives under the first-port flood (max rate)", "",
              "The client knocks step 1 (or steps 1 and 2) only; ms until its state is gone: median "
              "(min-max). 'turnover' = places for first steps / first steps per second: the time the flood takes "
              "to write as many first steps as the data path can hold.", ""]
    lines.append(common.markdown_table(
        ["first steps held in", "flood pps", "first steps/s", "turnover ms", "life after step 1 ms",
         "life after step 2 ms"],
        [[f"{l['label']}: {l['kind']} of {l['entries']:,}", f"{l['flood_pps']:,}", f"{l['inserts_pps']:,.0f}",
          fmt_ms(l["turnover_s"] * 1000 if l["turnover_s"] else None), fmt_life(l["after_step1"], settings.life_limit),
          fmt_life(l["after_step2"], settings.life_limit)] for l in lifetimes]))
    default = next((l for l in lifetimes if l["label"] == "default"), None)
    lived = [v for v in default["after_step1"] if isinstance(v, float)] if default else []
    if lived and default["inserts_pps"]:
        entries = default["entries"]
        life = statistics.median(lived)
        gaps = ", ".join(f"{g:g} s: {entries / g / 1e6:.2f} M/s" for g in (0.06, 0.11, 0.21, 0.51))
        lines += ["", f"At {default['inserts_pps']:,.0f} first steps per second a client's untouched first step "
                  f"lived {life * 1000:.0f} ms (median), {life / default['turnover_s']:.2f} turnovers: a client "
                  "whose second knock comes later loses it. If it lives about one turnover, a gap g between the "
                  "first two knocks (the delay + 10 ms) survives floods of fewer first steps per second than "
                  f"{entries:,} / g ({gaps})."]
    lines += ["", f"## Scale model: knock state 1/{SCALE} of its size", "",
              f"Built with {' '.join(scale_flags)}: the flood below turns the first-step state over as fast as "
              f"a {SCALE} times faster flood turns over the default's.", ""]
    lines.append(table(scale_rows))
    return "\n".join(lines) + "\n"


def provenance():
    """Which data path was measured: the hash of the program's source as
    compiled, and the commit (with bpf/ changed or not) when git knows."""
    import hashlib

    from xknock.controller.kernel import datapath

    lines = [f"- xknock data path: sha256 {hashlib.sha256(datapath.bpf_source().encode()).hexdigest()[:12]} "
             "of the inlined bpf/ source"]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "bpf/"], capture_output=True, text=True)
        lines.append(f"- commit {head.stdout.strip()}" + (", bpf/ changed since" if dirty.stdout.strip() else ""))
    return lines


def run_flood(quick):
    settings = Settings(quick)
    print(f"flood benchmark ({'quick' if quick else 'full'})", flush=True)
    source = provenance()
    with FloodLab(bpf_stats=settings.bpf_stats) as fl:
        rates = bench_rates(fl, settings)
        rows = bench_scenarios(fl, settings)
        lifetimes = [bench_lifetimes(fl, settings, "default")]
        # Every map that holds knock state, 1/SCALE of its size (an unknown define is harmless).
        scale_flags = [f"-DXK_PROGRESS_ENTRIES={fl.maps.progress.max_entries // SCALE}"]
        if fl.firsts:
            scale_flags.append(f"-DXK_FIRST_SLOTS={fl.maps.firsts.max_entries // SCALE}")
    with FloodLab(cflags=scale_flags, bpf_stats=settings.bpf_stats) as fl:
        scale_rows = bench_scenarios(fl, settings, targets=["first knock port"], levels=[1.0],
                                     delays=settings.scale_delays, repeats=[1, 3], label="scale ")
        lifetimes.append(bench_lifetimes(fl, settings, "scale model"))
    if source != provenance():
        source.append("- warning: bpf/ changed while the benchmark ran")
    text = report(settings, rates, rows, lifetimes, scale_rows, source, scale_flags)
    print(text)
    print(f"written to {common.write_results('flood', text)}")
