"""The control plane's costs, through the real CLI in a throwaway network namespace:
attach time (BCC compile included), reload time with a large allow list, and
the foreground controller's resident memory."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from . import common
from .datapath import EXAMPLE_CONFIG

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
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def ip(self, *args):
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def command(self, *args):
        return ["ip", "netns", "exec", self.name, XKNOCK, *args]

    def xknock(self, *args, check=True):
        """Run xknock in the namespace; returns seconds taken."""
        started = time.monotonic()
        done = subprocess.run(self.command(*args), capture_output=True, text=True)
        took = time.monotonic() - started
        if check and done.returncode != 0:
            raise SystemExit(f"bench: xknock {' '.join(args)} failed: {done.stderr.strip()}")
        return took


def allow_config_text(count):
    sources = [f"10.{128 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(count)]
    head, _, tail = EXAMPLE_CONFIG.partition("[allow]")
    _, _, tail = tail.partition("\n\n")
    return head + "[allow]\nsources = [" + ", ".join(f'"{s}"' for s in sources) + "]\n\n" + tail


def controller_rss_kib(ns, config, timeout=120):
    """Start the foreground controller, wait for "attached" on its stderr, read
    VmRSS, then SIGTERM it."""
    proc = subprocess.Popen(ns.command("attach", ns.iface, "-c", config), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "attached" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"bench: the controller exited before attaching: {''.join(seen)}")
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise SystemExit("bench: no VmRSS in /proc status")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ns.xknock("detach", ns.iface, check=False)


def run_controlplane(quick):
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
            attach_s = []
            for _ in range(repeats):
                attach_s.append(ns.xknock("attach", ns.iface, "-c", small, "--once"))
                ns.xknock("detach", ns.iface)
            ns.xknock("attach", ns.iface, "-c", small, "--once")
            reload_s = [ns.xknock("reload", ns.iface, "-c", big) for _ in range(repeats)]
            reload_back_s = ns.xknock("reload", ns.iface, "-c", small)
            ns.xknock("detach", ns.iface)
            rss_kib = controller_rss_kib(ns, small)

    rows = [
        ("attach --once, example config (compile + load + attach + policy)",
         f"{common.median(attach_s):.2f} s", f"median of {repeats}: " + ", ".join(f"{s:.2f}" for s in attach_s)),
        (f"reload to {allow_entries} allow entries",
         f"{common.median(reload_s):.2f} s", f"median of {repeats}: " + ", ".join(f"{s:.2f}" for s in reload_s)),
        (f"reload from {allow_entries} back to the example", f"{reload_back_s:.2f} s", "one run"),
        ("foreground controller VmRSS after attach", f"{rss_kib / 1024:.1f} MiB", f"{rss_kib} KiB"),
    ]
    text = "\n".join([
        f"# xknock control plane benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        *common.machine(),
        "- wall time of the whole `xknock` process (Python start-up included), on a veth in a fresh netns"
        + (" — QUICK run, numbers are not meaningful" if quick else ""),
        "",
        common.markdown_table(["what", "result", "detail"], rows),
        "",
    ])
    print(text)
    print(f"written to {common.write_results('controlplane', text)}")
