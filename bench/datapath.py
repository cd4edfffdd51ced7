"""Per-packet cost of xknock's XDP program, through BPF_PROG_TEST_RUN.

Every number is the kernel's mean ns per run over `repeat` runs of one frame
(BPF_PROG_TEST_RUN's duration), and the table shows the median over `rounds`
rounds in which all variants of a row group run in turn (A B C A B C ...).
Reference points, timed the same way on the same frame in the same rounds:
- floor: a BCC-loaded XDP program that only returns XDP_DROP;
- xdp-filter: xdp-tools' stateless filter with the rule "drop dst tcp port 22".

With `--against=REV`, the same paths also run through the data path of the
git revision REV on the same maps, in the same rounds (bench/against.py).

Also the entry point of bench/run: `bench/run [datapath|controlplane|flood|knockd|nft|spa|answers|report|all] [--quick]`.
"""

import ctypes
import dataclasses
import ipaddress
import random
import time

from xknock.controller.config import parse_config
from xknock.controller.kernel import bpfsys, layout
from xknock.controller.kernel.maps import live_sequences, to_addr
from xknock.controller.state import grants
from xknock_dev.testrun import VERDICT_NAMES, XDP_DROP, XDP_PASS, Harness

from . import against as revisions
from . import common, xdpfilter

from xknock_dev.example import EXAMPLE_CONFIG
from xknock_dev.packets import tcp, udp

STRANGER4, STRANGER6 = "198.51.100.7", "2001:db8:77::7"
GRANTED4 = "198.51.100.20"
KNOCKER4 = "198.51.100.30"
FRESH4 = "198.51.100.40"
ALLOWED4, ALLOWED6 = "192.0.2.10", "2001:db8:a::99"
DENIED4 = "203.0.113.5"
FLOOR_SOURCE = b"int f(struct xdp_md *ctx) { return XDP_DROP; }"


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.repeat = 2000 if quick else 100_000
        self.rounds = 3 if quick else 7
        self.single_runs = 50 if quick else 2000
        self.progress_sizes = [10, 1000] if quick else [10, 1000, 100_000, 1_000_000]
        self.allow_sizes = [1, 100] if quick else [1, 100, 10_000, 100_000]
        self.sequence_counts = [1, 4] if quick else [1, 2, 4, 8, 16, 32, 64]


def load_floor():
    from bcc import BPF

    bpf = BPF(text=FLOOR_SOURCE)
    return bpf, bpf.load_func(b"f", BPF.XDP).fd


def example_harness(cflags=(), strict=False):
    h = Harness(cflags=cflags)
    h.trust_knocking()   # strict mode's words as a program has them a step timeout after its first packet
    config = parse_config(EXAMPLE_CONFIG, listening=set())
    h.apply(dataclasses.replace(config, strict=strict))
    return h


def timed(fd, frame, repeat):
    """(verdict, mean ns per run)."""
    verdict, duration, _ = bpfsys.test_run(fd, frame, repeat=repeat)
    return verdict, duration


def measure_group(programs, frame, settings, repeat=None):
    """{name: (verdict, median ns)} for one frame on several programs, interleaved."""
    repeat = repeat or settings.repeat
    runs = common.interleaved(list(programs.items()), settings.rounds, lambda fd: timed(fd, frame, repeat))
    return {name: (results[0][0], common.median([ns for _, ns in results])) for name, results in runs.items()}


def verdict_name(verdict):
    return VERDICT_NAMES.get(verdict, str(verdict))


def check(name, got, expected):
    if got != expected:
        raise SystemExit(f"bench: {name}: xknock returned {verdict_name(got)}, expected {verdict_name(expected)}")


# --- the paths with the example policy ---------------------------------------

PATHS = [
    # (row, frame, expected verdict, what exactly runs)
    ("unguarded pass, IPv4", lambda: tcp(STRANGER4, 80), XDP_PASS, "TCP SYN to port 80 (no rule)"),
    ("unguarded pass, IPv6", lambda: tcp(STRANGER6, 80), XDP_PASS, "TCP SYN to port 80 (no rule)"),
    ("guarded drop, IPv4", lambda: tcp(STRANGER4, 22), XDP_DROP, "SYN to guarded tcp:22, no grant"),
    ("guarded drop, IPv6", lambda: tcp(STRANGER6, 22), XDP_DROP, "SYN to guarded tcp:22, no grant"),
    ("granted pass, IPv4", lambda: tcp(GRANTED4, 22), XDP_PASS, "SYN to tcp:22 from a source with a grant"),
    ("knock repeated, IPv4", lambda: tcp(KNOCKER4, 7000), XDP_DROP,
     "SYN to tcp:7000 (ssh step 1) from a source already at step 1: every timed run "
     "finds its progress and counts a repeat (no write)"),
    ("knock, 2 sequences, IPv4", lambda: udp(KNOCKER4, 8000), XDP_DROP,
     "UDP to 8000 (step 2 of ssh, step 1 of web) from a source at ssh step 1, web step 1: "
     "the very first timed run advances ssh to step 2, every later run repeats on both sequences"),
    ("deny-list drop, IPv4", lambda: tcp(DENIED4, 80), XDP_DROP, "source in 203.0.113.0/24"),
    ("allow-list pass, IPv4", lambda: tcp(ALLOWED4, 22), XDP_PASS, "allow-listed /32 to guarded tcp:22"),
    ("allow-list pass, IPv6", lambda: tcp(ALLOWED6, 22), XDP_PASS, "allow-listed /48 to guarded tcp:22"),
]


def bench_paths(h, floor_fd, xf, settings):
    grants.grant(h.maps, GRANTED4, (), for_ns=3600 * 10**9, now=h.now_ns)
    h.run(tcp(KNOCKER4, 7000))     # KNOCKER4 now at step 1 of ssh
    h.run(udp(KNOCKER4, 8000))     # ...and at step 1 of web (ssh: 2)
    h.run(tcp(KNOCKER4, 7000))     # ssh: wrong step, back to step 1
    rows = []
    for row, build, expected, what in PATHS:
        frame = build()
        programs = {"xknock": h.fd, "floor": floor_fd}
        if xf:
            programs["xdp-filter"] = xf.fd
        got = measure_group(programs, frame, settings)
        check(row, got["xknock"][0], expected)
        rows.append((row, got, what))
    return rows


def bench_against(h, floor_fd, rev, settings):
    """PATHS through this build, revision rev's build on the same maps and the
    floor, in the same rounds; (rows, note). Run after bench_paths (its state)."""
    try:
        old = revisions.Revision(rev, h)
    except Exception as err:   # another layout, a revision git does not know, a build that fails
        return [], f"not measured: {rev}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    try:
        rows = []
        for row, build, expected, what in PATHS:
            frame = build()
            got = measure_group({"before": old.fd, "after": h.fd, "floor": floor_fd}, frame, settings)
            check(row, got["after"][0], expected)
            check(row + f" ({rev})", got["before"][0], expected)
            rows.append((row, got))
        return rows, f"{rev} (`git describe`: {describe(rev)})"
    finally:
        old.close()


def describe(rev):
    import subprocess

    found = subprocess.run(["git", "describe", "--always", rev], capture_output=True, text=True)
    return found.stdout.strip() or rev


def bench_single_advance(h, floor_fd, settings):
    """A real advance on every run: repeat=1, the source's progress deleted
    before each run. Single runs include BPF_PROG_TEST_RUN's fixed overhead,
    so compare with the floor timed the same way."""
    frame = tcp(FRESH4, 7000)
    uid = next(seq.uid for seq in live_sequences(h.maps).values() if seq.name == b"ssh")
    key = layout.ProgressKey(src=to_addr(FRESH4), uid=uid)
    xknock, floor = [], []
    for _ in range(settings.single_runs):
        h.maps.progress.delete(key)
        verdict, ns = timed(h.fd, frame, 1)
        check("knock advance", verdict, XDP_DROP)
        xknock.append(ns)
        floor.append(timed(floor_fd, frame, 1)[1])
    return common.median(xknock), common.median(floor)


# --- strict mode ----------------------------------------------------------------

STRICT_PATHS = [
    # (row, frame, expected verdict, what exactly runs with strict = true)
    ("unguarded pass, IPv4", lambda: tcp(STRANGER4, 80), XDP_PASS,
     "TCP SYN to port 80 from a source that is not knocking: strict mode reads its `knocking` word (old: no `recent` slot), writes nothing"),
    ("unguarded pass, knocking source, IPv4", lambda: tcp(KNOCKER4, 80), XDP_PASS,
     "TCP SYN to port 80 from a source at step 1: strict mode writes the touch into its slot"),
    ("guarded drop, IPv4", lambda: tcp(STRANGER4, 22), XDP_DROP, "SYN to guarded tcp:22, no grant: a `knocking` word read too"),
    ("knock repeated, IPv4", lambda: tcp(KNOCKER4, 7000), XDP_DROP,
     "SYN to tcp:7000 from a source at step 1: strict mode reads the slot before and writes its knock after"),
]


def bench_strict(plain, floor_fd, settings):
    """The same paths in two programs side by side, one without strict mode
    (plain: the example policy with strict = false) and one with it (the default)."""
    rows = []
    with example_harness(strict=True) as strict:
        for h in (plain, strict):
            h.run(tcp(KNOCKER4, 7000))     # KNOCKER4 at step 1 of ssh in both
        for row, build, expected, what in STRICT_PATHS:
            frame = build()
            got = measure_group({"plain": plain.fd, "strict": strict.fd, "floor": floor_fd}, frame, settings)
            check(row + " (strict)", got["strict"][0], expected)
            check(row, got["plain"][0], expected)
            rows.append((row, got, what))
        # A source never seen before on every run: strict mode inserts nothing
        # (the former `touched` LRU did: +76 ns), single runs.
        runs = {"plain": [], "strict": [], "floor": []}
        for i in range(settings.single_runs):
            frame = tcp(f"198.18.{i // 250 % 250}.{1 + i % 250}", 80)
            for name, fd in (("plain", plain.fd), ("strict", strict.fd), ("floor", floor_fd)):
                runs[name].append(timed(fd, frame, 1)[1])
        rows.append(("unguarded pass, new source, IPv4 (repeat=1)",
                     {name: (XDP_PASS, common.median(values)) for name, values in runs.items()},
                     f"TCP SYN to port 80 from a source never seen before: a `knocking` word read, no insert; median of "
                     f"{settings.single_runs} single runs, each including the fixed cost of one BPF_PROG_TEST_RUN"))
    return rows


# --- scaling ------------------------------------------------------------------

def fill_progress(h, count, uid, now_us, rng):
    """Insert count random IPv6 sources at step 1 of the sequence uid, in
    batches; returns a sample of the keys written."""
    state = layout.progress_state(1, now_us)
    chunk = 65536
    sample = []
    done = 0
    while done < count:
        n = min(chunk, count - done)
        keys = (layout.ProgressKey * n)()
        values = (ctypes.c_uint64 * n)(*([state] * n))
        for i in range(n):
            ctypes.memmove(keys[i].src.b, rng.randbytes(16), 16)
            keys[i].uid = uid
        try:
            bpfsys.map_update_batch(h.maps.progress.fd, keys, values, n)
        except bpfsys.BpfError as err:
            raise SystemExit(f"bench: filling progress failed: {err}") from err
        sample.extend(layout.ProgressKey.from_buffer_copy(keys[i]) for i in range(0, n, max(1, n // 100)))
        done += n
    return sample


def retained(h, sample):
    """The fraction of sampled keys still in the (LRU) map."""
    return sum(h.maps.progress.lookup(k) is not None for k in sample) / max(1, len(sample))


def bench_progress_scaling(floor_fd, settings):
    """Guarded drop and knock (repeat) with many sources tracked, in one
    program built with room for 1M; the map is filled cumulatively."""
    rng = random.Random(7)
    rows = []
    with example_harness(cflags=["-DXK_PROGRESS_ENTRIES=1048576"]) as h:
        uid = next(seq.uid for seq in live_sequences(h.maps).values() if seq.name == b"ssh")
        sample, filled = [], 0
        for size in settings.progress_sizes:
            started = time.monotonic()
            sample += fill_progress(h, size - filled, uid, h.now_ns // 1000, rng)
            fill_s = time.monotonic() - started
            filled = size
            h.run(tcp(KNOCKER4, 7000))    # the measured knocker at step 1, after the fill
            drop = measure_group({"xknock": h.fd, "floor": floor_fd}, tcp(STRANGER4, 22), settings)
            knock = measure_group({"xknock": h.fd, "floor": floor_fd}, tcp(KNOCKER4, 7000), settings)
            check("guarded drop", drop["xknock"][0], XDP_DROP)
            check("knock", knock["xknock"][0], XDP_DROP)
            rows.append((size, drop, knock, retained(h, sample), fill_s))
    return rows


def allow_config(count):
    """The example config with count distinct /32 allow entries, ALLOWED4 among them."""
    sources = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.128.0.0")) + i)) for i in range(count - 1)]
    sources.insert(len(sources) // 2, ALLOWED4)
    head, _, tail = EXAMPLE_CONFIG.partition("[allow]")
    _, _, tail = tail.partition("\n\n")
    text = head + "[allow]\nsources = [" + ", ".join(f'"{s}"' for s in sources) + "]\n\n" + tail
    return parse_config(text, listening=set())


def bench_allow_scaling(h, floor_fd, settings):
    rows = []
    for size in settings.allow_sizes:
        config = allow_config(size)
        started = time.monotonic()
        h.apply(config)
        apply_s = time.monotonic() - started
        allow = measure_group({"xknock": h.fd, "floor": floor_fd}, tcp(ALLOWED4, 22), settings)
        drop = measure_group({"xknock": h.fd, "floor": floor_fd}, tcp(STRANGER4, 22), settings)
        check("allow-list pass", allow["xknock"][0], XDP_PASS)
        check("guarded drop", drop["xknock"][0], XDP_DROP)
        rows.append((size, allow, drop, apply_s))
    h.apply(parse_config(EXAMPLE_CONFIG, listening=set()))
    return rows


def sequences_config(count):
    """count sequences of three steps each on ports of their own (tcp, udp,
    tcp from 10000 on), all guarding tcp:22."""
    # answer = "drop": a repeated BPF_PROG_TEST_RUN runs on the frame its last
    # run left, and an answer rewrites it (bench/answers.py measures answers)
    blocks = ['[filter]\nmode = "enforce"\nanswer = "drop"\n']
    for i in range(count):
        base = 10000 + 3 * i
        blocks.append(f'[[sequence]]\nname = "s{i}"\nknock = ["tcp:{base}", "udp:{base + 1}", "tcp:{base + 2}"]\n'
                      f'step_timeout = "5s"\nopen = ["tcp:22"]\nopen_for = "30s"\nidle_timeout = "1m"\n')
    return parse_config("\n".join(blocks), listening=set()), 10000 + 3 * (count - 1)


def bench_sequence_scaling(floor_fd, settings):
    """Guarded drop, unguarded pass and a repeated first knock (on the last
    sequence's first port) with 1 to 64 sequences configured."""
    rows = []
    with Harness() as h:
        for count in settings.sequence_counts:
            config, last_port = sequences_config(count)
            h.apply(config)
            h.run(tcp(KNOCKER4, last_port))     # the knocker at step 1 of the last sequence
            cells = {}
            for name, frame, expected in (("guarded drop", tcp(STRANGER4, 22), XDP_DROP),
                                          ("unguarded pass", tcp(STRANGER4, 80), XDP_PASS),
                                          ("knock repeated", tcp(KNOCKER4, last_port), XDP_DROP)):
                got = measure_group({"xknock": h.fd, "floor": floor_fd}, frame, settings)
                check(f"{name}, {count} sequences", got["xknock"][0], expected)
                cells[name] = got
            rows.append((count, cells))
    return rows


# --- report -------------------------------------------------------------------

def ns(value):
    return f"{value:.0f}"


def report(settings, paths, single, progress_rows, allow_rows, xf_note, sequence_rows=(), strict_rows=(),
           against=((), "")):
    out = [f"# xknock data path benchmark ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    out += common.machine()
    out += [
        f"- method: BPF_PROG_TEST_RUN, repeat={settings.repeat} per measurement, median of "
        f"{settings.rounds} interleaved rounds (xknock, floor, xdp-filter in turn on the same frame)"
        + (" — QUICK run, numbers are not meaningful" if settings.quick else ""),
        "- xknock built with XK_TEST_CLOCK (time read from the control map, not bpf_ktime_get_ns)",
        "- floor: BCC-loaded XDP program returning XDP_DROP; "
        f"xdp-filter: {xf_note}",
        "- ns are means per run inside the kernel; only ratios within one row were measured side by side",
        "",
        "## Paths with the example policy",
        "",
    ]
    header = ["path", "xknock ns", "floor ns", "xdp-filter ns (verdict)", "vs floor", "vs xdp-filter", "what runs"]
    rows = []
    for row, got, what in paths:
        x, f = got["xknock"][1], got["floor"][1]
        if "xdp-filter" in got:
            xv, xns = got["xdp-filter"]
            xf_cell, xf_ratio = f"{ns(xns)} ({verdict_name(xv)})", common.ratio(x, xns)
        else:
            xf_cell = xf_ratio = "-"
        rows.append((row, ns(x), ns(f), xf_cell, common.ratio(x, f), xf_ratio, what))
    x, f = single
    rows.append(("knock advance, IPv4 (repeat=1)", ns(x), ns(f), "-", common.ratio(x, f), "-",
                 f"SYN to tcp:7000 from a source with no progress, which inserts it at step 1; "
                 f"progress deleted before each run; median of {settings.single_runs} single runs, "
                 "each including the fixed cost of one BPF_PROG_TEST_RUN"))
    out += [common.markdown_table(header, rows), ""]

    against_rows, against_note = against
    if against_note and not against_rows:
        out += ["## Before and after", "", against_note, ""]
    elif against_note:
        out += ["## Before and after",
                "",
                f"The paths above through the data path of {against_note} ('before') and this build ('after'), "
                "on the same maps, with the floor, in the same rounds.",
                ""]
        header = ["path", "before ns", "after ns", "floor ns", "before vs floor", "after vs floor", "after / before"]
        rows = []
        for row, got in against_rows:
            b, a, f = got["before"][1], got["after"][1], got["floor"][1]
            rows.append((row, ns(b), ns(a), ns(f), common.ratio(b, f), common.ratio(a, f), f"{a / b:.2f}"))
        out += [common.markdown_table(header, rows), ""]

    out += ["## Strict mode",
            "",
            "Two programs side by side on the same frame in the same rounds: the example policy without and with "
            "`strict = true` ([filter]). 'cost' is strict minus plain.",
            ""]
    header = ["path", "plain ns", "strict ns", "cost ns", "floor ns", "what runs"]
    rows = []
    for row, got, what in strict_rows:
        p, s, f = got["plain"][1], got["strict"][1], got["floor"][1]
        rows.append((row, ns(p), ns(s), f"{s - p:+.0f}", ns(f), what))
    out += [common.markdown_table(header, rows), ""]

    out += ["## Tracked sources in the progress map",
            "",
            "Built with XK_PROGRESS_ENTRIES=1048576 (default 262144) for every point; random IPv6 sources "
            "at step 1 of ssh, written with bpf_map_update_batch. The map is an LRU hash: 'retained' is "
            "the share of a sample of written keys still present after the fill.",
            ""]
    header = ["sources", "guarded drop ns", "floor ns", "vs floor", "knock repeated ns", "floor ns", "vs floor",
              "retained", "fill s"]
    rows = []
    for size, drop, knock, kept, fill_s in progress_rows:
        rows.append((size, ns(drop["xknock"][1]), ns(drop["floor"][1]), common.ratio(drop["xknock"][1], drop["floor"][1]),
                     ns(knock["xknock"][1]), ns(knock["floor"][1]), common.ratio(knock["xknock"][1], knock["floor"][1]),
                     f"{kept:.0%}", f"{fill_s:.1f}"))
    out += [common.markdown_table(header, rows), ""]

    out += ["## Allow-list entries",
            "",
            "Distinct /32 sources applied with policy.apply_policy (LIST_ENTRIES holds both banks); "
            "the allowed source is one of them, the guarded drop is a stranger missing the list.",
            ""]
    header = ["entries", "allow pass ns", "floor ns", "vs floor", "guarded drop ns", "floor ns", "vs floor", "apply s"]
    rows = []
    for size, allow, drop, apply_s in allow_rows:
        rows.append((size, ns(allow["xknock"][1]), ns(allow["floor"][1]), common.ratio(allow["xknock"][1], allow["floor"][1]),
                     ns(drop["xknock"][1]), ns(drop["floor"][1]), common.ratio(drop["xknock"][1], drop["floor"][1]),
                     f"{apply_s:.1f}"))
    out += [common.markdown_table(header, rows), ""]

    if sequence_rows:
        out += ["## Sequences configured",
                "",
                "count sequences of three steps on ports of their own, all guarding tcp:22; the repeated knock is "
                "a source already at step 1 of the last sequence knocking its first port again. No allow or deny "
                "lists here (the example policy above has both), hence the cheaper guarded drop.",
                ""]
        names = ("guarded drop", "unguarded pass", "knock repeated")
        header = ["sequences"] + [f"{n} ns" for n in names] + ["floor ns"] + [f"{n} vs floor" for n in names]
        rows = []
        for count, cells in sequence_rows:
            rows.append([count, *(ns(cells[n]["xknock"][1]) for n in names), ns(cells["guarded drop"]["floor"][1]),
                         *(common.ratio(cells[n]["xknock"][1], cells[n]["floor"][1]) for n in names)])
        out += [common.markdown_table(header, rows), ""]
    return "\n".join(out)


def run_datapath(quick, against=None):
    settings = Settings(quick)
    floor_bpf, floor_fd = load_floor()
    xf, xf_note = None, ""
    try:
        xf = xdpfilter.XdpFilter()
        xf.drop_dst_tcp_port(22)
        xf_note = f"{xdpfilter.object_path()} with the rule dst tcp port 22 (drop); its verdict is shown"
    except (xdpfilter.Unavailable, bpfsys.BpfError) as err:
        xf_note = f"not measured: {err}"
    try:
        with example_harness() as h:
            paths = bench_paths(h, floor_fd, xf, settings)
            against_result = bench_against(h, floor_fd, against, settings) if against else ((), "")
            single = bench_single_advance(h, floor_fd, settings)
            strict_rows = bench_strict(h, floor_fd, settings)
            allow_rows = bench_allow_scaling(h, floor_fd, settings)
        progress_rows = bench_progress_scaling(floor_fd, settings)
        sequence_rows = bench_sequence_scaling(floor_fd, settings)
    finally:
        if xf:
            xf.close()
        floor_bpf.cleanup()
    text = report(settings, paths, single, progress_rows, allow_rows, xf_note, sequence_rows, strict_rows,
                  against_result)
    print(text)
    print(f"written to {common.write_results('datapath', text)}")
    return {"settings": vars(settings), "paths": paths, "single": single, "progress": progress_rows,
            "allow": allow_rows, "sequences": sequence_rows, "xdp_filter": xf_note, "text": text}
