"""What the side-by-side benchmarks share: the lab's client that knocks and
then connects, the CPU meters, and the servers' firewall plumbing.

The client is one helper process in the lab's client namespace (the system
Python), fed one JSON job per line. A job either sends the knocks itself
through plain sockets (`plain`: a TCP step is one SYN from a non-blocking
connect, closed at once; a UDP step one datagram), the same sender for every
daemon, timed from the return of the last step's syscall; or runs a real
client command (`knock`, `xknock knock`, `fwknop`), timed from its return.
Then it opens a fresh connection to the guarded port every 2 ms (every 20 ms
after the first 200 ms), all of them outstanding at once, until one completes
its handshake or the deadline passes: the time to the first completed
handshake is the try's latency (it includes one round trip of the lab).
"""

import contextlib
import ctypes
import json
import os
import re
import socket
import struct
import subprocess
import time

from xknock_dev import traffic
from xknock_dev.e2e import Foreground, LineReader, status_json, xknock
from xknock_dev.lab import HELPER_PYTHON, stop_process

from . import common

SEQUENCE = ("tcp:7000", "udp:8000", "tcp:9000")
GUARDED = 22
DEADLINE = 3.0        # seconds from the last knock to a connection, or the try failed

CLIENT = r"""
import json, select, socket, subprocess, sys, time
server, port = sys.argv[1], int(sys.argv[2])

def send_steps(steps, delay):
    for i, step in enumerate(steps):
        if i:
            time.sleep(delay)
        proto, _, number = step.partition(":")
        if proto == "tcp":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((server, int(number)))   # the SYN leaves inside this call
            s.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"knock", (server, int(number)))
            s.close()

def first_connection(deadline):
    t0 = time.monotonic()
    pending, next_at, opened = [], t0, 0
    try:
        while True:
            now = time.monotonic()
            if now - t0 > deadline:
                return None, opened
            if now >= next_at:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((server, port))
                pending.append(s)
                opened += 1
                next_at = now + (0.002 if now - t0 < 0.2 else 0.02)
            _, ready, _ = select.select([], pending, [], max(0.0, next_at - time.monotonic()))
            for s in ready:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return time.monotonic(), opened
                pending.remove(s)
                s.close()
    finally:
        for s in pending:
            s.close()

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    rc, err = 0, ""
    if job.get("command"):
        run = subprocess.run(job["command"], capture_output=True, text=True, env=job.get("env"))
        rc, err = run.returncode, run.stderr.strip()[-300:]
    else:
        send_steps(job["steps"], job["delay"])
    last = time.monotonic()
    done, opened = first_connection(job["deadline"])
    print(json.dumps({"ok": done is not None, "latency_s": None if done is None else done - last,
                      "connects": opened, "rc": rc, "err": err}), flush=True)
"""


class Client:
    """The client's helper process: one knock (plain or by command) and connect per try()."""

    def __init__(self, net):
        self.process = net.client.popen([HELPER_PYTHON, "-c", CLIENT, net.server.ipv4, str(GUARDED)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = LineReader(self.process.stdout)
        if not self.out.wait_for(lambda l: l == "ready", 10):
            raise RuntimeError("the side-by-side client helper did not start")

    def try_once(self, steps=SEQUENCE, delay=0.02, command=None, env=None, deadline=DEADLINE):
        job = {"steps": list(steps), "delay": delay, "command": command, "env": env, "deadline": deadline}
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        self.process.stdin.flush()
        line = self.out.wait_for(lambda l: l.startswith("{"), deadline + 60)
        if line is None:
            raise RuntimeError("the side-by-side client helper gave no answer")
        result = json.loads(line)
        if result["rc"] != 0:
            raise RuntimeError(f"client command {command} failed: {result['err']}")
        return result

    def close(self):
        stop_process(self.process)


def summarize(results):
    """Success count and latency percentiles (ms) of a list of try results."""
    times = sorted(r["latency_s"] * 1000 for r in results if r["ok"])
    return {"ok": len(times), "tries": len(results),
            "median_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
            "times_ms": times}


def percentile(sorted_values, pct):
    """Nearest-rank percentile of sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


# --- CPU -------------------------------------------------------------------------------

def proc_stat():
    """(total, idle + iowait, softirq) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4], fields[6]


def process_cpu_s(pid):
    """User + system seconds of pid and its waited-for children (the commands a daemon runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class Meter:
    """Over a with-block: the daemon's process CPU seconds, the machine's busy
    and softirq CPU seconds (/proc/stat, all CPUs, tick-sampled), and for an
    XDP program id its run time (kernel bpf stats, enabled around the block)."""

    def __init__(self, pid=None, prog_id=None):
        self.pid, self.prog_id = pid, prog_id
        self.stats_fd = None

    def _prog(self):
        return common.prog_run_time(self.prog_id)

    def __enter__(self):
        if self.prog_id:
            from xknock.controller.kernel import bpfsys

            fn = bpfsys.lib().bpf_enable_stats
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            fd = fn(0)   # BPF_STATS_RUN_TIME, on while the fd is open
            self.stats_fd = fd if fd >= 0 else None
            self.p0 = self._prog()
        self.t0, self.s0, self.c0 = time.monotonic(), proc_stat(), process_cpu_s(self.pid) if self.pid else None
        return self

    def __exit__(self, *exc):
        self.t1, self.s1, self.c1 = time.monotonic(), proc_stat(), process_cpu_s(self.pid) if self.pid else None
        if self.prog_id:
            self.p1 = self._prog()
        if self.stats_fd is not None:
            os.close(self.stats_fd)
            self.stats_fd = None

    def result(self):
        hz = os.sysconf("SC_CLK_TCK")
        total = self.s1[0] - self.s0[0]
        out = {"wall_s": self.t1 - self.t0,
               "busy_cpu_s": (total - (self.s1[1] - self.s0[1])) / hz,
               "softirq_cpu_s": (self.s1[2] - self.s0[2]) / hz}
        if self.c0 is not None and self.c1 is not None:
            out["daemon_cpu_s"] = self.c1 - self.c0
        if self.prog_id and self.stats_fd is None and hasattr(self, "p1"):
            runs = self.p1[1] - self.p0[1]
            out["xdp_cpu_s"] = (self.p1[0] - self.p0[0]) / 1e9
            out["xdp_runs"] = runs
        return out


# --- the server side ---------------------------------------------------------------------

def port_tx(net, host):
    """(sent, dropped) by host's bridge port: frames it could not put into
    host's full receive ring are dropped there."""
    out = subprocess.run(["ip", "-n", net.switch, "-s", "-j", "link", "show", "dev", traffic.lab_peer(net, host)[1]],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    tx = json.loads(out)[0]["stats64"]["tx"]
    return tx["packets"], tx["dropped"]


SOL_PACKET, PACKET_STATISTICS = 263, 6
SYS_PIDFD_GETFD = 438        # x86_64 and most others (asm-generic)


def packet_socket_stats(netns, pid):
    """(packets, dropped) by pid's packet sockets (pcap) in netns since the
    last call: PACKET_STATISTICS read through a copy of its socket
    (pidfd_getfd). Reading resets the kernel's counters, which the daemons
    here never read themselves. None when it cannot be had."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-0", "-a", "-p", "-n"],
                         capture_output=True, text=True, timeout=30).stdout
    fds = [int(m.group(1)) for m in re.finditer(rf"pid={pid},fd=(\d+)", out)]
    if not fds:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    packets = dropped = 0
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        for fd in fds:
            copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
            if copy < 0:
                return None
            with socket.socket(fileno=copy) as sock:
                raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
            got, lost = struct.unpack("II", raw[:8])
            packets += got
            dropped += lost
    finally:
        os.close(pidfd)
    return packets, dropped


def pass_xdp(net, host):
    """An XDP_PASS program on host's interface: frames the generator sends
    straight to it (path "direct") reach its kernel stack as packets."""
    traffic.attach_peer(host.name, host.iface, "bridge")


def no_xdp(host):
    subprocess.run(["ip", "-n", host.name, "link", "set", "dev", host.iface, "xdp", "off"],
                   capture_output=True, timeout=30)


def run_in(host, argv, check=True):
    result = host.run(argv)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} in {host.name}: {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def flood(net, ports, rate=None, path="direct", src_prefix="0.0.0.0/0", proto="tcp"):
    """A running FloodProcess against the server; yields it, stops it; its
    result (pps) is left in .result()."""
    process = traffic.lab_flood(net, ports, rate=rate, path=path, src_prefix=src_prefix, proto=proto).start()
    try:
        yield process
    finally:
        process.stop()


def tool_version(argv, pattern=r"\d+(\.\d+)+"):
    """The version a tool prints, or 'not found'."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "not found"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(0) if match else "unknown"


def package_version(name):
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "not installed"


def start_xknock(net, config_path):
    """A foreground xknock controller on the lab's server with config_path, on
    a freshly detached interface: (controller, prog_id, controller pid)."""
    xknock(net.server, "detach", net.server_iface)
    controller = Foreground(net, config_path)
    controller.wait_ready()
    return controller, status_json(net.server)[0]["interfaces"][0]["prog_id"], controller.process.pid
