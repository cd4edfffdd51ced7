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

from xknock_dev.example import EXAMPLE_CONFIG
from xknock_dev.packets import step, tcp, udp

from . import common

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


def _run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
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


def run(quick):
    if not shutil.which("bpftool"):
        raise SystemExit("bpftool is not installed (scripts/setup test installs it)")
    netns = f"xkbt-{os.getpid()}"
    floor_pin = f"/sys/fs/bpf/xkbt-floor-{os.getpid()}"
    work = tempfile.mkdtemp(prefix="xkbt-")
    repeat, rounds = (20_000, 2) if quick else (1_000_000, 5)
    inside = ["nsenter", f"--net=/run/netns/{netns}"]   # one bpffs for attach and grant
    _run("ip", "netns", "add", netns)
    try:
        _run(*inside, "ip", "link", "add", "xkbt0", "type", "veth", "peer", "name", "xkbt1")
        for name in ("xkbt0", "xkbt1"):
            _run(*inside, "ip", "link", "set", name, "up")
        config = os.path.join(work, "example.toml")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(EXAMPLE_CONFIG)
        _run(*inside, XKNOCK, "attach", "xkbt0", "-c", config, "--once", "--xdp-mode", "native")
        _run(*inside, XKNOCK, "grant", "xkbt0", GRANTED, "--port", "tcp:22", "--for", "30m", "-c", config)
        [link] = json.loads(_run("ip", "-n", netns, "-j", "-d", "link", "show", "xkbt0").stdout)
        prog_id = link["xdp"]["prog"]["id"]
        _pin_floor(floor_pin)
        paths = {}
        for name, frame in FRAMES.items():
            paths[name] = os.path.join(work, name.replace(" ", "-"))
            with open(paths[name], "wb") as f:
                f.write(bytes(frame()))
        variants = [((name, which), (spec, path)) for name, path in paths.items()
                    for which, spec in (("xknock", ["id", str(prog_id)]), ("floor", ["pinned", floor_pin]))]
        results = common.interleaved(variants, rounds, lambda v: prog_run(v[0], v[1], repeat))
    finally:
        # the pins live in the host's bpffs, under the namespace's id: a later
        # namespace given the same id would find them
        subprocess.run([*inside, XKNOCK, "detach", "xkbt0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if os.path.exists(floor_pin):
            os.unlink(floor_pin)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name in FRAMES:
        ours = common.median([ns for ns, _ in results[(name, "xknock")]])
        floor = common.median([ns for ns, _ in results[(name, "floor")]])
        verdict = results[(name, "xknock")][-1][1]
        rows.append({"path": name, "xknock_ns": ours, "floor_ns": floor, "verdict": VERDICTS.get(verdict, verdict)})
    return {"rows": rows, "repeat": repeat, "rounds": rounds}


def markdown(data):
    lines = ["# bpftool prog run: the attached program beside an empty one", "", *common.machine(),
             f"- method: `bpftool prog run` with repeat={data['repeat']}, median of {data['rounds']} interleaved "
             "rounds (xknock, floor in turn on the same frame); xknock attached by `xknock attach --once` with the "
             "example policy (answer = \"drop\"), production build (kernel clock), a grant from `xknock grant`",
             "- floor: an XDP program returning XDP_DROP, loaded by BCC and pinned", ""]
    lines.append(common.markdown_table(
        ["path", "xknock ns", "floor ns", "vs floor", "verdict"],
        [[r["path"], r["xknock_ns"], r["floor_ns"], common.ratio(r["xknock_ns"], r["floor_ns"]), r["verdict"]]
         for r in data["rows"]]))
    return "\n".join(lines) + "\n"


def run_bpftool(quick):
    text = markdown(run(quick))
    print(text)
    print(f"written to {common.write_results('bpftool', text)}")
