"""The second timing harness: `bpftool prog run` on the attached production
program (no test clock, the example policy, a real grant), beside an empty
XDP_DROP program on the same frame, in interleaved rounds.

bench/datapath.py times a test-clock build through the project's own
BPF_PROG_TEST_RUN binding; this one times what `xknock attach` loaded, with
the tool every BPF developer has, so that the two harnesses can be compared.
"""

import json
import sys
import os
import re
import shutil
import subprocess
import tempfile
import time

from xknock.controller.config import parse_config
from xknock_dev.example import EXAMPLE_CONFIG
from xknock_dev.packets import step, tcp, udp

from . import common
from .lists import revision_tree, tree_environ

XKNOCK = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "xknock")
FLOOR_C = "int xk_floor(struct xdp_md *ctx) { return XDP_DROP; }"
GRANTED, STRANGER = "198.51.100.9", "198.51.100.7"
FRAMES = {   # the common paths of issue 16's goal, on the example policy
    "unguarded TCP pass": lambda: tcp(STRANGER, 80),
    "unguarded UDP pass": lambda: udp(STRANGER, 53),
    "guarded drop": lambda: tcp(STRANGER, 22),
    "granted pass": lambda: tcp(GRANTED, 22),
    "allow-list pass": lambda: tcp("192.0.2.10", 22),
    "deny-list drop": lambda: tcp("203.0.113.5", 80),
    "knock repeated": lambda: step("198.51.100.8", "tcp:7000"),
}
VERDICTS = {1: "DROP", 2: "PASS", 3: "TX"}


def _run(*argv, env=None):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode:
        raise SystemExit(f"bench: {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def prog_run(spec, frame_path, repeat):
    """(mean ns, verdict) of `bpftool prog run` on spec (["id", N] or ["pinned", PATH])."""
    done = _run("bpftool", "prog", "run", *spec, "data_in", frame_path, "repeat", str(repeat))
    out = done.stdout + done.stderr
    duration = re.search(r"duration[^:]*:\s*(\d+)", out)
    verdict = re.search(r"[Rr]eturn value:?\s*(\d+)", out)
    if not duration or not verdict:
        raise RuntimeError(f"bpftool prog run said: {out.strip()}")
    return int(duration.group(1)), int(verdict.group(1))


def _pin_floor(path):
    from bcc import BPF

    from xknock.controller.kernel import bpfsys

    floor = BPF(text=FLOOR_C)
    bpfsys.obj_pin(floor.load_func(b"xk_floor", BPF.XDP).fd, path)


class Attached:
    """One build of xknock attached with the example policy and a grant, in a
    namespace of its own (its pins apart from any other build's)."""

    def __init__(self, netns, config, tree=None):
        self.netns, self.env = netns, tree_environ(tree)
        self.inside = ["nsenter", f"--net=/run/netns/{netns}"]   # one bpffs for attach and grant
        self.attached = False
        _run("ip", "netns", "add", netns)
        try:
            _run(*self.inside, "ip", "link", "add", "xkbt0", "type", "veth", "peer", "name", "xkbt1")
            for name in ("xkbt0", "xkbt1"):
                _run(*self.inside, "ip", "link", "set", name, "up")
            self.attached = True   # from here on, whatever attach left is detached
            _run(*self.inside, XKNOCK, "attach", "xkbt0", "-c", config, "--once", "--xdp-mode", "native", env=self.env)
            _run(*self.inside, XKNOCK, "grant", "xkbt0", GRANTED, "--port", "tcp:22", "--for", "30m", "-c", config,
                 env=self.env)
            [link] = json.loads(_run("ip", "-n", netns, "-j", "-d", "link", "show", "xkbt0").stdout)
            self.spec = ["id", str(link["xdp"]["prog"]["id"])]
        except BaseException:
            self.close()
            raise

    def close(self):
        # the pins live in the host's bpffs, under the namespace's id: a later
        # namespace given the same id would find them
        if self.attached:
            subprocess.run([*self.inside, XKNOCK, "detach", "xkbt0"], capture_output=True, env=self.env)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def warm_up(builds, frame_path):
    """A new program reads strict mode's `recent` slots beside its `knocking`
    words until the longest step timeout has passed since its first packet
    (bpf/xknock_strict.h): the first packet, then that wait, so that every
    round times the program as it runs from then on."""
    for build in builds.values():
        prog_run(build.spec, frame_path, 1)
    config = parse_config(EXAMPLE_CONFIG, listening=set())
    time.sleep(max(seq.step_timeout_ns for seq in config.sequences) / 1e9 + 0.2)


def run(quick, against=None):
    """{"rows": [...]}; with against (a git revision), that revision's build
    attached beside this one and timed in the same rounds."""
    if not shutil.which("bpftool"):
        raise SystemExit("bpftool is not installed (scripts/setup test installs it)")

    floor_pin = f"/sys/fs/bpf/xkbt-floor-{os.getpid()}"
    work = tempfile.mkdtemp(prefix="xkbt-")
    repeat, rounds = (20_000, 2) if quick else (300_000, 21)   # many short rounds: a median the machine's swings move less
    builds = {}
    try:
        config = os.path.join(work, "example.toml")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(EXAMPLE_CONFIG)
        builds["xknock"] = Attached(f"xkbt-{os.getpid()}", config)
        if against:
            tree = revision_tree(against, tempfile.mkdtemp(prefix="tree-", dir=work))
            builds[against] = Attached(f"xkbt-{os.getpid()}-rev", config, tree)
        _pin_floor(floor_pin)
        paths = {}
        for name, frame in FRAMES.items():
            paths[name] = os.path.join(work, name.replace(" ", "-"))
            with open(paths[name], "wb") as f:
                f.write(bytes(frame()))
        programs = [(which, build.spec) for which, build in builds.items()] + [("floor", ["pinned", floor_pin])]
        warm_up(builds, paths["unguarded TCP pass"])
        variants = [((name, which), (spec, path)) for name, path in paths.items() for which, spec in programs]
        results = common.interleaved(variants, rounds, lambda v: prog_run(v[0], v[1], repeat))
    finally:
        for build in builds.values():
            build.close()
        if os.path.exists(floor_pin):
            os.unlink(floor_pin)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name in FRAMES:
        row = {"path": name, "verdict": VERDICTS.get(results[(name, "xknock")][-1][1], "?")}
        for which in [*builds, "floor"]:
            row[f"{which}_ns"] = common.median([ns for ns, _ in results[(name, which)]])
        if against:
            row["against_verdict"] = VERDICTS.get(results[(name, against)][-1][1], "?")
        rows.append(row)
    return {"rows": rows, "repeat": repeat, "rounds": rounds, "against": against}


# Issue 16's own measurement (bpftool prog run, best of three, an earlier run):
# the "before" of its goals, quoted beside this run's ratios.
ISSUE_BASELINE = {"unguarded TCP pass": "4.4x", "unguarded UDP pass": "4.4x", "guarded drop": "5.9x",
                  "granted pass": "6.3x", "knock repeated": "7.3x"}
GOALS = {"knock repeated": "3x"}


def markdown(data):
    against = data.get("against")
    lines = ["# bpftool prog run: the attached program beside an empty one", "", *common.machine(),
             f"- method: `bpftool prog run` with repeat={data['repeat']}, median of {data['rounds']} interleaved "
             "rounds (every program in turn on the same frame); xknock attached by `xknock attach --once` with the "
             "example policy (answer = \"drop\"), production build (kernel clock), a grant from `xknock grant`",
             "- floor: an XDP program returning XDP_DROP, loaded by BCC and pinned",
             *([f"- {against}: that revision's build, attached the same way in a namespace of its own, timed in "
                "the same rounds"] if against else []),
             "- issue 16: the ratios the issue measured when it was filed (an earlier run, so only a hint); "
             "goal: the issue's bound for the path", ""]
    header = ["path", "xknock ns", "floor ns", "vs floor"]
    if against:
        header[2:2] = [f"{against} ns"]
        header += [f"{against} vs floor", f"this / {against}"]
    header += ["issue 16", "goal", "verdict"]
    rows = []
    for r in data["rows"]:
        cells = [r["path"], r["xknock_ns"]]
        if against:
            cells.append(r[f"{against}_ns"])
        cells += [r["floor_ns"], common.ratio(r["xknock_ns"], r["floor_ns"])]
        if against:
            cells += [common.ratio(r[f"{against}_ns"], r["floor_ns"]), common.ratio(r["xknock_ns"], r[f"{against}_ns"])]
        verdict = r["verdict"] if not against or r["against_verdict"] == r["verdict"] else \
            f"{r['verdict']} ({against}: {r['against_verdict']})"
        cells += [ISSUE_BASELINE.get(r["path"], "-"), GOALS.get(r["path"], "2.5x"), verdict]
        rows.append(cells)
    lines.append(common.markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def run_bpftool(quick, against=None):
    text = markdown(run(quick, against))
    print(text)
    print(f"written to {common.write_results('bpftool', text)}")
