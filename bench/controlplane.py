"""The control plane's costs, through the real CLI in a throwaway network namespace:
attach time (BCC compile included), reload time with a large allow list, and
the foreground controller's resident memory; and, in this process, the cost of
a metrics scrape and of one map-sampler pass with the maps full (1,000,000
sources in the progress map, the grants map at capacity)."""

import ctypes
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

from . import common
from .datapath import EXAMPLE_CONFIG, example_harness, fill_progress

XKNOCK = os.path.join(os.path.dirname(sys.executable), "xknock")


class Namespace:
    """A fresh netns holding one end of a veth pair, removed on exit."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.name = f"xkbench-{tag}"
        self.iface = f"xkb{tag}"

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.ip("link", "add", self.iface, "type", "veth", "peer", "name", self.iface + "p")
            self.ip("link", "set", self.iface, "up")
            self.ip("link", "set", self.iface + "p", "up")
            self.ip("link", "set", "lo", "up")     # the metrics endpoint is scraped on loopback
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        # pins live in the host's bpffs (nsenter): detach removes them and the kept program
        subprocess.run(self.command("detach", self.iface), capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def ip(self, *args):
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def command(self, *args):
        # nsenter, not `ip netns exec`: that gives each command a bpffs of its
        # own, so no pin (and no kept program) would outlive it; a host's has one.
        return ["nsenter", f"--net=/run/netns/{self.name}", XKNOCK, *args]

    def xknock(self, *args, check=True):
        """Run xknock in the namespace; returns seconds taken."""
        started = time.monotonic()
        done = subprocess.run(self.command(*args), capture_output=True, text=True)
        took = time.monotonic() - started
        if check and done.returncode != 0:
            raise SystemExit(f"bench: xknock {' '.join(args)} failed: {done.stderr.strip()}")
        return took


def attach_breakdown(config_path):
    """[(phase, seconds)] of a first attach: Python and the CLI's imports (a
    process of its own), BCC's import, the compile, the verifier, the policy;
    and what the kept program costs instead of the middle three."""
    from xknock.controller.config import load_config
    from xknock.controller.kernel import datapath, progcache
    from xknock.controller.kernel.maps import FilterMaps
    from xknock.controller.policy import policy

    def wall(code):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - started

    bare = wall("pass")
    phases = [("python start-up", bare),
              ("the CLI's imports (cli.main, lifecycle)", wall("import xknock.cli.main, xknock.controller.daemon.lifecycle") - bare),
              ("import bcc", wall("import bcc") - bare)]
    directory = f"{datapath.PIN_ROOT}/bench-{uuid.uuid4().hex[:8]}"
    from bcc import BPF

    try:
        datapath.make_private_dirs(directory)
        started = time.perf_counter()
        bpf = BPF(text=datapath.bpf_source().encode(), cflags=[f'-DXK_PIN_DIR="{directory}"'])
        compiled = time.perf_counter()
        fn = bpf.load_func(datapath.PROG_NAME.encode(), BPF.XDP)
        verified = time.perf_counter()
        phases += [("compile (clang inside BCC)", compiled - started), ("verify and load", verified - compiled)]
        wanted = progcache.key(datapath.bpf_source(), [])
        progcache.keep(directory, wanted, fn.fd)
        started = time.perf_counter()
        kept = progcache.find(directory, wanted, datapath.PROG_NAME)
        loaded = datapath.open_loaded_fd(kept)
        phases.append(("the kept program instead: found, checked, opened", time.perf_counter() - started))
        with FilterMaps.from_prog(loaded.prog_id) as maps:
            config = load_config(config_path)
            started = time.perf_counter()
            policy.apply_policy(maps, config)
            phases.append(("policy written (example config)", time.perf_counter() - started))
        os.close(kept)
        bpf.cleanup()
    finally:
        datapath.remove_pins(directory)
    return phases


def allow_config_text(count):
    sources = [f"10.{128 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(count)]
    head, _, tail = EXAMPLE_CONFIG.partition("[allow]")
    _, _, tail = tail.partition("\n\n")
    return head + "[allow]\nsources = [" + ", ".join(f'"{s}"' for s in sources) + "]\n\n" + tail


def controller_rss_kib(ns, config, timeout=120, detach=True):
    """Start the foreground controller with metrics, wait until it runs (after
    its hand-over to a process without BCC), scrape it once, read VmRSS, then
    SIGTERM it (the filter stays attached unless detach)."""
    port = 20000 + random.randrange(20000)
    proc = subprocess.Popen(ns.command("attach", ns.iface, "-c", config, "--metrics-addr", f"127.0.0.1:{port}"),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "controller running" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"bench: the controller exited before running: {''.join(seen)}")
        scrape = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read()"
        subprocess.run(["nsenter", f"--net=/run/netns/{ns.name}", sys.executable, "-c", scrape], check=True)
        return common.vmrss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if detach:
            ns.xknock("detach", ns.iface, check=False)


# --- the metrics scrape with full maps -------------------------------------------

class ScrapeSizes:
    def __init__(self, quick):
        self.cflags = [] if quick else ["-DXK_PROGRESS_ENTRIES=1048576"]
        self.progress = 1000 if quick else 1_000_000
        self.grants = 256 if quick else None      # None: the grants map's capacity
        self.scrapes = 3 if quick else 20


def fill_grants(h, count, now_ns, rng):
    """Write count operator grants (random IPv6 sources, tcp:22, open an hour)
    in batches, and count them as operator grants so that xknock_grants_live
    says what the map holds. Returns how many were written."""
    from xknock.controller.kernel import bpfsys, layout

    value = layout.Grant(window_end_ns=now_ns + 3600 * 10**9, idle_timeout_ns=3600 * 10**9, last_seen_ns=now_ns)
    done = 0
    while done < count:
        n = min(65536, count - done)
        keys = (layout.GrantKey * n)()
        values = (layout.Grant * n)(*([value] * n))
        for i in range(n):
            ctypes.memmove(keys[i].src.b, rng.randbytes(16), 16)
            keys[i].proto, keys[i].port = layout.PROTO_TCP, 22
        try:
            bpfsys.map_update_batch(h.maps.grants.fd, keys, values, n)
        except bpfsys.BpfError as err:
            raise SystemExit(f"bench: filling grants failed after {done} entries: {err}") from err
        done += n
    h.maps.count_by_controller(layout.Reason.GRANT_OPERATOR, done)
    return done


def _timed(fn, repeats):
    """[seconds per call] of fn() called repeats times."""
    took = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        took.append(time.perf_counter() - started)
    return took


def bench_scrape(quick):
    """Scrape and sampler costs with the progress and grants maps full, in a
    program loaded with BPF_PROG_TEST_RUN's harness (no interface needed)."""
    from prometheus_client import CollectorRegistry, generate_latest, start_http_server

    from xknock.controller.daemon import metrics
    from xknock.controller.kernel.maps import live_sequences
    from xknock.controller.state import grants
    from xknock.cli import top
    from xknock.controller.state.status import filter_status

    sizes = ScrapeSizes(quick)
    rng = random.Random(11)
    with example_harness(cflags=sizes.cflags) as h:
        uid = next(seq.uid for seq in live_sequences(h.maps).values() if seq.name == b"ssh")
        started = time.monotonic()
        fill_progress(h, sizes.progress, uid, h.now_ns // 1000, rng)
        granted = fill_grants(h, sizes.grants or h.maps.grants.max_entries, h.now_ns, rng)
        fill_s = time.monotonic() - started

        sampler = metrics.MapSampler(lambda: h.maps, now_ns=lambda: h.now_ns)
        sample_s = _timed(sampler.sample_once, 1 if quick else 3)
        sample = sampler.latest()
        # The collector of `xknock attach --metrics-addr`, with the real netlink
        # check of its interface (lo: it runs no XDP program, one query as for any).
        collector = metrics.XknockCollector(lambda: h.maps, ["lo"], metrics.ControllerInfo(version="bench"),
                                            sampler=sampler)
        sum(1 for _ in collector.collect())     # warm-up: first imports and netlink socket set-up
        collect_s = _timed(lambda: sum(1 for _ in collector.collect()), sizes.scrapes)
        registry = CollectorRegistry()
        registry.register(collector)
        exposition = generate_latest(registry)
        expose_s = _timed(lambda: generate_latest(registry), sizes.scrapes)
        httpd, thread = start_http_server(0, "127.0.0.1", registry=registry)
        try:
            url = f"http://127.0.0.1:{httpd.server_port}/metrics"

            def get():
                with urllib.request.urlopen(url, timeout=10) as response:
                    response.read()

            http_s = _timed(get, sizes.scrapes)
        finally:
            httpd.shutdown()
            httpd.server_close()
        # What one `xknock top` frame's lists (cli/top.py walk(), on the test
        # clock) and one `xknock status` cost, in batches and walked (get_next_key + lookup per entry: the fallback, as before batches).
        lists = {}
        for how in ("batch", "walked"):
            with _batches(how == "batch"):
                runs = 1 if quick or how == "walked" else 3
                lists[how] = (min(_timed(lambda: (grants.first_live_grants(h.maps, top.LISTED, now=h.now_ns),
                                                  grants.knocks_in_progress(h.maps, limit=top.LISTED, now=h.now_ns)),
                                         runs)),
                              min(_timed(lambda: filter_status(h.maps, [], now=h.now_ns), runs)))
        cap = {name: getattr(h.maps, name).max_entries for name in ("progress", "grants")}
    if b'xknock_scrape_success 1.0' not in exposition:
        raise SystemExit("bench: the scrape did not read the maps (xknock_scrape_success is not 1)")
    return {
        "progress": sample.entries.get("progress"), "progress_cap": cap["progress"],
        "grants": sample.entries.get("grants"), "grants_cap": cap["grants"], "granted": granted,
        "in_progress": sample.knocks_in_progress, "fill_s": fill_s,
        "sample_s": sample_s, "collect_s": collect_s, "expose_s": expose_s, "http_s": http_s,
        "exposition_bytes": len(exposition), "lists": lists,
    }


def scrape_rows(r):
    def ms(values):
        value = common.median(values) * 1000
        return f"{value:.0f} ms" if value >= 100 else f"{value:.2f} ms"

    def spread(values):
        return f"median of {len(values)}, min {min(values) * 1000:.2f}, max {max(values) * 1000:.2f} ms"

    full = (f"{r['progress']:,} progress entries (map of {r['progress_cap']:,}), "
            f"{r['grants']:,} grants (map of {r['grants_cap']:,})")
    return [
        ("metrics scrape, XknockCollector.collect() (maps read, families built)", ms(r["collect_s"]),
         f"{spread(r['collect_s'])}; {full}"),
        ("metrics scrape, generate_latest (collect + text exposition)", ms(r["expose_s"]),
         f"{spread(r['expose_s'])}; {r['exposition_bytes']:,} bytes"),
        ("metrics scrape, HTTP GET /metrics on loopback", ms(r["http_s"]),
         f"{spread(r['http_s'])}; prometheus_client's start_http_server"),
        ("map sampler, one pass (every sampled map, knocks in progress)", ms(r["sample_s"]),
         f"median of {len(r['sample_s'])}: " + ", ".join(f"{s * 1000:.0f}" for s in r["sample_s"]) + " ms"
         + f"; counted {r['progress']:,} progress ({r['in_progress']:,} knocks in progress), {r['grants']:,} grants"),
        ("`xknock top` lists (first_live_grants + knocks_in_progress, as cli/top.py walk()), BPF_MAP_LOOKUP_BATCH",
         ms([r["lists"]["batch"][0]]), f"best of 3 (quick: 1); walked once in the same run, the old way: {ms([r['lists']['walked'][0]])}"),
        ("`xknock status` of the filter (state.status.filter_status), BPF_MAP_LOOKUP_BATCH",
         ms([r["lists"]["batch"][1]]), f"best of 3 (quick: 1); walked once in the same run, the old way: {ms([r['lists']['walked'][1]])}"),
    ]


class _batches:
    """With on False, every batch lookup is refused as by a kernel without
    them: the maps are walked with get_next_key + lookup per entry."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        from xknock.controller.kernel import batch

        self.saved = batch._lookup_batch
        if not self.on:
            def refused(*args):
                ctypes.set_errno(22)
                return -22
            batch._lookup_batch = lambda: refused

    def __exit__(self, *exc):
        from xknock.controller.kernel import batch

        batch._lookup_batch = self.saved


def run_controlplane(quick):
    # An installed package has its bytecode; a checkout run with this set would compile every module every time.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    repeats = 1 if quick else 5
    allow_entries = 100 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="xkbench-") as tmp:
        small = os.path.join(tmp, "example.toml")
        big = os.path.join(tmp, "allow.toml")
        with open(small, "w") as f:
            f.write(EXAMPLE_CONFIG)
        with open(big, "w") as f:
            f.write(allow_config_text(allow_entries))
        with Namespace() as ns:
            ns.xknock("attach", ns.iface, "-c", small, "--once")   # warm-up: bytecode written
            ns.xknock("detach", ns.iface)
            attach_s, warm_s = [], []
            for _ in range(repeats):
                attach_s.append(ns.xknock("attach", ns.iface, "-c", small, "--once"))
                warm_s.append(ns.xknock("attach", ns.iface, "-c", small, "--once"))   # the kept program
                ns.xknock("detach", ns.iface)
            ns.xknock("attach", ns.iface, "-c", small, "--once")
            breakdown = attach_breakdown(small)
            reload_s = [ns.xknock("reload", ns.iface, "-c", big) for _ in range(repeats)]
            reload_back_s = ns.xknock("reload", ns.iface, "-c", small)
            ns.xknock("detach", ns.iface)
            try:
                rss_kib = controller_rss_kib(ns, small, detach=False)      # compiled, then handed over
                rss_warm_kib = controller_rss_kib(ns, small)               # the kept program: no BCC at all
            finally:
                ns.xknock("detach", ns.iface, check=False)
    scrape = bench_scrape(quick)

    rows = [
        ("attach --once, first (compile + verify + load + attach + policy)",
         f"{common.median(attach_s):.2f} s", f"median of {repeats}: " + ", ".join(f"{s:.2f}" for s in attach_s)),
        ("attach --once again, the kept program re-used (kernel/progcache.py)",
         f"{common.median(warm_s):.2f} s", f"median of {repeats}, each right after a first one: "
         + ", ".join(f"{s:.2f}" for s in warm_s)),
        *[(f"attach breakdown: {what}", f"{took:.2f} s", "one run, in the bench process") for what, took in breakdown],
        (f"reload to {allow_entries} allow entries",
         f"{common.median(reload_s):.2f} s", f"median of {repeats}: " + ", ".join(f"{s:.2f}" for s in reload_s)),
        (f"reload from {allow_entries} back to the example", f"{reload_back_s:.2f} s", "one run"),
        ("foreground controller VmRSS after its first attach (handed over) and a scrape", f"{rss_kib / 1024:.1f} MiB",
         f"{rss_kib} KiB"),
        ("foreground controller VmRSS attached again (kept program, no BCC loaded) and a scrape",
         f"{rss_warm_kib / 1024:.1f} MiB", f"{rss_warm_kib} KiB"),
        *scrape_rows(scrape),
    ]
    text = "\n".join([
        f"# xknock control plane benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        *common.machine(),
        "- load average at the end: %.1f %.1f %.1f (other work on the machine inflates every absolute time; "
        "compare rows measured side by side)" % os.getloadavg(),
        "- attach, reload, VmRSS: wall time of the whole `xknock` process (Python start-up included, bytecode "
        "cached), on a veth in a fresh netns entered with nsenter (the host's bpffs, as a host's service has)" + (" — QUICK run, numbers are not meaningful" if quick else ""),
        "- metrics scrape and sampler: in the bench process, on the program loaded with XK_TEST_CLOCK"
        + ("" if quick else " and XK_PROGRESS_ENTRIES=1048576")
        + f", maps filled with bpf_map_update_batch in {scrape['fill_s']:.1f} s; wall time per call",
        "",
        common.markdown_table(["what", "result", "detail"], rows),
        "",
    ])
    print(text)
    print(f"written to {common.write_results('controlplane', text)}")
    return text
