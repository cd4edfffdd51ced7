"""Helpers for the end-to-end and CLI tests: the real `xknock` executable run
inside the lab's namespaces, and the small programs (a TCP echo server, a
client that keeps its connection, a plain-socket knocker, a foreign XDP
program) the tests run there with the system Python."""

import contextlib
import fcntl
import json
import os
import platform
import selectors
import signal
import subprocess
import sys
import time

from xknock_dev.lab import HELPER_PYTHON, in_netns, lab, stop_process, wait_for

# The console script next to the Python running the tests (the venv's).
XKNOCK = os.path.join(os.path.dirname(sys.executable), "xknock")

# Timeouts for probes: a dropped SYN is never answered, so a refused probe
# costs its whole timeout; keep that short. An accepted one returns at once;
# leave it room for one SYN retransmission (1 s) on a loaded machine.
DROPPED = 0.5
ACCEPTED = 3.0

SEQUENCE = ("tcp:7000", "udp:8000", "tcp:9000")


def config_text(*, knock=SEQUENCE, open_for="30s", idle_timeout="1m", step_timeout="2s",
                allow=(), deny=(), name="ssh", opens=("tcp:22",)):
    """A config with one sequence guarding `opens`."""
    def strings(items):
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    return f"""
[filter]
mode = "enforce"

[[sequence]]
name = "{name}"
knock = {strings(knock)}
step_timeout = "{step_timeout}"
open = {strings(opens)}
open_for = "{open_for}"
idle_timeout = "{idle_timeout}"

[allow]
sources = {strings(allow)}

[deny]
sources = {strings(deny)}
"""


def write_config(directory, name, text):
    """The config file, mode 0600 whatever the umask: xknock refuses a config
    others could change, or read when it holds keys (controller/kernel/trust.py)."""
    path = os.path.join(str(directory), name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    return path


def xknock(host, *args, timeout=60):
    """`xknock ARGS` inside host's namespace, to completion."""
    return host.run([XKNOCK, *args], timeout=timeout)


def check(result):
    """result, asserting it succeeded (with its output when it did not)."""
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def status_json(host, *args):
    return json.loads(check(xknock(host, "status", "--json", *args)).stdout)["filters"]


def spa_verdicts(net):
    """The SPA outcomes counted so far on the lab's server ({"accepted": 1, ...},
    nonzero only). The controller flushes them once a second: wait for them."""
    counters = status_json(net.server)[0]["counters"]
    return {k.removeprefix("spa_"): v for k, v in counters.items() if k.startswith("spa_") and v}


def fresh_attach(net, config_path):
    """Detach whatever a previous test left (its pins and state go with it),
    then attach with config_path: a filter with no grant and no knock."""
    xknock(net.server, "detach", net.server_iface)
    return check(xknock(net.server, "attach", net.server_iface, "-c", config_path, "--once", *attach_options(net)))


def attach_options(net):
    """The options every attach in net is given: its hook, when not the default."""
    hook = getattr(net, "hook", None)   # a lab, or a bare namespace naming a host
    return ("--hook", hook) if hook else ()


def knock(host, addr, *steps, delay=None):
    args = ["knock", addr, *steps]
    if delay is not None:
        args += ["--delay", str(delay)]
    return check(xknock(host, *args))


def addr_of(host, family):
    return host.ipv4 if family == "ipv4" else host.ipv6


# --- programs run inside the namespaces --------------------------------------

# Echoes every byte back on every connection, on every port given, dual-stack.
TCP_ECHO_SERVER = r"""
import socket, sys, threading

def serve(conn):
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)

def accept_loop(listener):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(port)))
    s.listen(64)
    threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# Connects once and keeps the socket; each line on stdin is sent, and its echo
# (or the error met) printed back.
HELD_CONNECTION = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print("connected", flush=True)
for line in sys.stdin:
    message = line.strip().encode()
    try:
        s.sendall(message)
        got = b""
        while len(got) < len(message):
            chunk = s.recv(len(message) - len(got))
            if not chunk:
                break
            got += chunk
        print("echo " + got.decode(), flush=True)
    except OSError as err:
        print("error " + type(err).__name__, flush=True)
"""

# What an existing client does: a non-blocking connect (one SYN) per TCP step,
# one datagram per UDP step.
PLAIN_KNOCKER = r"""
import socket, sys, time
addr = sys.argv[1]
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
for step in sys.argv[2:]:
    proto, port = step.split(":")
    if proto == "tcp":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((addr, int(port)))
        time.sleep(0.02)
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.sendto(b"knock", (addr, int(port)))
    s.close()
    time.sleep(0.1)
"""

# Another XDP program, attached in generic mode with BCC; it stays attached
# after this process exits. Prints its program id.
FOREIGN_XDP = r"""
import sys
from bcc import BPF
b = BPF(text=b"int other_prog(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func(b"other_prog", BPF.XDP)
BPF.attach_xdp(sys.argv[1], fn, BPF.XDP_FLAGS_SKB_MODE)
print("attached", flush=True)
"""


class LineReader:
    """Lines of a child's pipe, read without blocking past a deadline."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.fd = pipe.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.lines = []
        self.consumed = 0  # lines before this one were passed over by wait_for
        self.eof = False

    def _fill(self, timeout):
        with selectors.DefaultSelector() as selector:
            selector.register(self.fd, selectors.EVENT_READ)
            if not selector.select(timeout):
                return
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines += [line.decode(errors="replace") for line in complete]

    def wait_for(self, predicate, timeout=5.0):
        """The first line not yet passed over for which predicate is true, or
        None after timeout; the lines up to it are passed over."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self.consumed, len(self.lines)):
                if predicate(self.lines[index]):
                    self.consumed = index + 1
                    return self.lines[index]
            self.consumed = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return None
            self._fill(left)

    def read_all(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())
        return "\n".join(self.lines + ([self.buffer.decode(errors="replace")] if self.buffer else []))

    def text(self):
        return "\n".join(self.lines)


class Foreground:
    """`xknock attach` as a foreground controller in the server's namespace."""

    def __init__(self, net, config_path, *args):
        self.process = net.server.popen([XKNOCK, "attach", net.server_iface, "-c", config_path, *attach_options(net),
                                         *args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.log = LineReader(self.process.stderr)

    def wait_attached(self, timeout=60.0):
        line = self.log.wait_for(lambda l: " attached on " in l, timeout)
        assert line, f"the controller did not log 'attached':\n{self.log.read_all(0.5)}"
        return line

    def handles(self, *signums):
        """Has the controller installed its handlers for signums? (SigCgt in
        /proc: `ip netns exec` execs the command, so the pid is xknock's.)"""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                caught = next(int(l.split()[1], 16) for l in status if l.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        return all(caught & (1 << (signum - 1)) for signum in signums)

    def wait_ready(self, timeout=60.0):
        """Attached, and in its loop (after the handover to a process without
        BCC): SIGHUP reloads and SIGTERM stops it."""
        self.wait_attached(timeout)
        after_attached = self.log.consumed
        line = self.log.wait_for(lambda l: " controller running" in f" {l}", timeout)
        assert line, f"the controller did not log 'controller running':\n{self.log.read_all(0.5)}"
        self.log.consumed = after_attached   # what it logged meanwhile is the test's to read
        assert wait_for(lambda: self.handles(signal.SIGHUP, signal.SIGTERM), timeout=5), \
            f"the controller never installed its signal handlers:\n{self.log.read_all(0.5)}"

    def send_signal(self, signum):
        self.process.send_signal(signum)

    def wait(self, timeout=10.0):
        return self.process.wait(timeout)

    def stop(self):
        stop_process(self.process)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class TcpEchoServer:
    def __init__(self, host, *ports):
        self.process = host.popen([HELPER_PYTHON, "-c", TCP_ECHO_SERVER, *map(str, ports)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = LineReader(self.process.stdout)
        if not out.wait_for(lambda l: l == "ready", 10.0):
            stop_process(self.process)
            raise RuntimeError(f"TCP echo server on {ports} did not start")

    def stop(self):
        stop_process(self.process)


@contextlib.contextmanager
def served_lab(prefix, *ports, ipv6=True):
    """A lab whose server runs a TcpEchoServer on ports; on the way out the
    filter is detached (its pins go with it) and the lab removed."""
    with lab(prefix, ipv6=ipv6) as built:
        server = TcpEchoServer(built.server, *ports)
        try:
            yield built
        finally:
            server.stop()
            xknock(built.server, "detach", built.server_iface)


class HeldConnection:
    """A TCP connection from host's namespace kept open by a helper process."""

    def __init__(self, host, addr, port, timeout=ACCEPTED):
        self.process = host.popen([HELPER_PYTHON, "-c", HELD_CONNECTION, addr, str(port), str(timeout)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = LineReader(self.process.stdout)
        self.timeout = timeout
        if not self.out.wait_for(lambda l: l == "connected", timeout + 2):
            err = LineReader(self.process.stderr).read_all(1.0)
            stop_process(self.process)
            raise AssertionError(f"could not connect to [{addr}]:{port}: {err.strip().splitlines()[-1:]}")

    def exchange(self, message):
        """What came back for message: 'echo MESSAGE', or 'error ...'."""
        self.process.stdin.write(message.encode() + b"\n")
        self.process.stdin.flush()
        return self.out.wait_for(lambda l: l.startswith(("echo ", "error ")), self.timeout + 2)

    def close(self):
        stop_process(self.process)


def plain_knock(host, addr, *steps):
    result = host.run([HELPER_PYTHON, "-c", PLAIN_KNOCKER, addr, *steps], timeout=30)
    assert result.returncode == 0, result.stderr


def attach_foreign_xdp(host, iface):
    result = host.run([HELPER_PYTHON, "-c", FOREIGN_XDP, iface], timeout=120)
    assert result.returncode == 0 and "attached" in result.stdout, result.stderr


def xdp_prog_id(host, iface):
    """The id of the XDP program on iface (0 for none), as `ip link` sees it."""
    out = json.loads(check(host.run(["ip", "-j", "-d", "link", "show", "dev", iface])).stdout)[0]
    return (out.get("xdp") or {}).get("prog", {}).get("id", 0)


def filter_prog_id(net, iface=None):
    """The id of xknock's program on the server's iface at the lab's hook (0 for none)."""
    iface = iface or net.server_iface
    if net.hook != "tc":
        return xdp_prog_id(net.server, iface)
    # Read with BPF_PROG_QUERY (or from clsact) by this very process in the
    # server's namespace: tc(8) and Debian's bpftool 7.1 show no tcx
    # programs, and a Python child per look is too slow to time a re-attach.
    from xknock.controller.kernel import datapath

    with in_netns(net.server.name):
        return datapath.attachment(iface, hook=datapath.TC_MODE).prog_id


def remove_xdp(host, iface):
    host.run(["ip", "link", "set", "dev", iface, "xdpgeneric", "off"])
    host.run(["ip", "link", "set", "dev", iface, "xdp", "off"])



@contextlib.contextmanager
def full_pipe():
    """A pipe whose write end blocks on the first byte written: (read file, write fd)."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_fd, b"." * 4096)
    os.set_blocking(write_fd, True)
    with os.fdopen(read_fd, "rb") as read_end:
        try:
            yield read_end, write_fd
        finally:
            with contextlib.suppress(OSError):
                os.close(write_fd)


WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}.get(platform.machine())


def writing_to_stderr(pid):
    """Is pid blocked in write(2, ...)? (/proc/PID/syscall: number, then arguments.)"""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == str(WRITE_SYSCALL) and int(fields[1], 16) == 2
