"""Helpers for the fault-tolerance tests (tests/e2e/test_faults.py): configs with
several sequences and a long allow-list, the live policy as `status --json`
shows it, what each policy bank of a running filter holds, an attacker that
keeps trying a guarded port, and a client session that keeps exchanging data.
"""

import ctypes
import ipaddress
import os
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from xknock_dev.e2e import LineReader
from xknock.controller.kernel import layout
from xknock_dev.lab import HELPER_PYTHON, stop_process
from xknock.controller.kernel.maps import FilterMaps


@dataclass(frozen=True)
class Seq:
    name: str
    knock: tuple
    open: tuple
    step_timeout: str = "2s"
    open_for: str = "10m"
    idle_timeout: str = "10m"


@dataclass(frozen=True)
class Policy:
    """A config, and what the running filter must show for it."""

    name: str
    sequences: tuple
    allow: tuple = field(default=(), repr=False)

    def toml(self):
        def strings(items):
            return "[" + ", ".join(f'"{item}"' for item in items) + "]"

        parts = ['[filter]\nmode = "enforce"\n']
        for s in self.sequences:
            parts.append(f'[[sequence]]\nname = "{s.name}"\nknock = {strings(s.knock)}\n'
                         f'step_timeout = "{s.step_timeout}"\nopen = {strings(s.open)}\n'
                         f'open_for = "{s.open_for}"\nidle_timeout = "{s.idle_timeout}"\n')
        parts.append(f"[allow]\nsources = {strings(self.allow)}\n")
        return "\n".join(parts)

    def expected(self):
        """(sequences, guarded) exactly as `status --json` reports them."""
        sequences = [{"name": s.name, "knock": list(s.knock), "open": list(s.open)} for s in self.sequences]
        guarded = sorted({(p.split(":")[0], int(p.split(":")[1])) for s in self.sequences for p in s.open})
        return sequences, [f"{proto}:{port}" for proto, port in guarded]


def allow_sources(count, base="10.200.0.0"):
    """count host addresses far from the lab's 10.77.0.0/24."""
    start = ipaddress.ip_address(base)
    return tuple(str(start + i) for i in range(count))


def write_atomically(path, text):
    """Replace path whole, so that a reload never reads half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def live_policy(filter_status):
    """(sequences, guarded) of one filter of `status --json`, in the shape of Policy.expected()."""
    sequences = [{k: s[k] for k in ("name", "knock", "open")} for s in filter_status["sequences"]]
    return sequences, filter_status["guarded"]


def which_policy(filter_status, policies):
    """The one policy the filter runs, or an AssertionError describing the mix it runs."""
    live = live_policy(filter_status)
    for p in policies:
        if live == p.expected():
            return p
    raise AssertionError(f"the live policy is none of {[p.name for p in policies]}: {live}")


@dataclass
class Census:
    """What each bank of a running filter holds."""

    active: int
    banks: dict   # bank -> Counter(ports=, allow=, deny=, seqs=)

    @property
    def live(self):
        return self.banks[self.active]

    @property
    def idle(self):
        return self.banks[1 - self.active]

    @property
    def idle_entries(self):
        """Entries left in the bank that is not live (a reload cut short leaves some)."""
        return sum(self.idle[name] for name in ("ports", "allow", "deny", "seqs"))

    def matches(self, policy):
        """Does the live bank hold exactly this policy's counts (a half-written bank does not)?"""
        ports = {(step.split(":")[0], step.split(":")[-1]) for s in policy.sequences for step in (*s.knock, *s.open)}
        return (self.live["seqs"], self.live["allow"], self.live["ports"], self.live["has_allow"]) == \
            (len(policy.sequences), len(policy.allow), len(ports), int(bool(policy.allow)))


def census(prog_id):
    """Count, per policy bank, the entries of the filter whose program is prog_id."""
    with FilterMaps.from_prog(prog_id) as maps:
        active = maps.active_bank()
        banks = {0: Counter(), 1: Counter()}
        for m in (maps.ports, maps.allow, maps.deny):
            for key in {bytes(k): k for k in m.keys()}.values():
                banks[key.bank & 1][m.name] += 1
        for bank in (0, 1):
            for i in range(layout.MAX_SEQUENCES):
                seq = maps.seqs.lookup(ctypes.c_uint32(bank * layout.MAX_SEQUENCES + i))
                if seq is not None and seq.nsteps:
                    banks[bank]["seqs"] += 1
            settings = maps.settings.lookup(ctypes.c_uint32(bank))
            banks[bank]["has_allow"] = int(bool(settings is not None and settings.flags & layout.SET_HAS_ALLOW))
        return Census(active, banks)


def wait_until(predicate, timeout, interval=0.0005):
    """Poll predicate tightly (it is meant to catch a moment); True once it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def parallel(*calls):
    """Run the zero-argument callables at once; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


# Tries to connect to every target over and over, one SYN per try, until its
# stdin closes; prints "breach ADDR" for every connection that succeeded, then
# "done ATTEMPTS BREACHES".
ATTACKER_LOOP = r"""
import select, socket, sys
port, targets, timeout = int(sys.argv[1]), sys.argv[3:], float(sys.argv[2])
attempts = breaches = 0
print("ready", flush=True)
while not (select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline()):
    for addr in targets:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            breaches += 1
            print("breach " + addr, flush=True)
        except OSError:
            pass
        finally:
            s.close()
        attempts += 1
print("done %d %d" % (attempts, breaches), flush=True)
"""


class Attacker:
    """A process in host's namespace that keeps trying (addr, port) for every addr."""

    def __init__(self, host, port, *addrs, timeout=0.1):
        self.process = host.popen([HELPER_PYTHON, "-c", ATTACKER_LOOP, str(port), str(timeout), *addrs],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = LineReader(self.process.stdout)
        if not self.out.wait_for(lambda l: l == "ready", 10.0):
            stop_process(self.process)
            raise RuntimeError("the attacker loop did not start")

    def finish(self):
        """(attempts, [breach lines]) once it stopped."""
        self.process.stdin.close()
        done = self.out.wait_for(lambda l: l.startswith("done "), 10.0)
        lines = self.out.text().splitlines()
        stop_process(self.process)
        assert done, f"the attacker loop did not report: {lines[-5:]}"
        return int(done.split()[1]), [l for l in lines if l.startswith("breach ")]


class Exchanges(threading.Thread):
    """Sends a numbered message over a HeldConnection and checks its echo, over
    and over, until stopped. .ok counts echoes; .failures lists the others."""

    def __init__(self, session, gap=0.005):
        super().__init__(daemon=True)
        self.session, self.gap = session, gap
        self.ok, self.failures = 0, []
        self._halt = threading.Event()

    def run(self):
        n = 0
        while not self._halt.is_set():
            message = f"x{n}"
            got = self.session.exchange(message)
            if got == f"echo {message}":
                self.ok += 1
            else:
                self.failures.append((n, time.monotonic(), got))
                if got is None or got.startswith("error"):
                    return   # the session is gone: nothing more to learn
            n += 1
            time.sleep(self.gap)

    def stop(self):
        self._halt.set()
        self.join(10)
        return self.ok, self.failures
