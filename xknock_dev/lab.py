"""A throw-away network for tests and the demo: a server, a client and an
attacker, each in a network namespace of its own, joined by a Linux bridge in
a fourth ("sw"), so that a filter on the server's one interface sees both.

    server  srv0-<tok> ─┐
    client  cli0-<tok> ─┼─ br-<tok>   (in the sw namespace)
    attacker atk0-<tok> ┘
    router  rtr0-<tok> ─┘   (Lab(router=True): ECMP to the servers' SERVICE address)

Every namespace and interface name carries a token unique to the lab
(namespaces: <prefix>-<pid>-<tok>-<role>), so labs of several processes live
side by side. Addresses are fixed, 10.77.0.1/.2/.3/24 and fd00:77::1/::2/::3/64:
each lab lives in namespaces of its own, so labs never see each other's.

Leaving the `lab()` context removes every namespace it made, whatever failed.
A process killed too hard for that (SIGKILL) leaves its namespaces behind; the
next lab of the same prefix removes them, knowing them by their dead pid.
"""

import contextlib
import os
import re
import secrets
import selectors
import subprocess
import sys
import time

from pyroute2 import NetNS, netns

# The small helper programs run inside namespaces by the system Python: it
# needs nothing from the venv.
UDP, UDPLITE = 17, 136   # IP protocols of udp_echo and udp_roundtrip
HELPER_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

ROLES = ("srv", "cli", "atk")
SWITCH = "sw"
IPV4_PREFIX = 24
IPV6_PREFIX = 64
ADDRESSES = {  # role: (IPv4, IPv6)
    "srv": ("10.77.0.1", "fd00:77::1"),
    "cli": ("10.77.0.2", "fd00:77::2"),
    "atk": ("10.77.0.3", "fd00:77::3"),
}
# More servers, for the cluster tests (Lab(servers=3)): srv2, srv3.
EXTRA_SERVERS = {
    "srv2": ("10.77.0.4", "fd00:77::4"),
    "srv3": ("10.77.0.5", "fd00:77::5"),
}
# The ECMP router of Lab(router=True), on the bridge too, and the service
# address it spreads over the servers (each has it on lo: anycast).
ROUTER = ("rtr", ("10.77.0.253", "fd00:77::fd"))
SERVICE = ("10.77.100.1", "fd00:77:100::1")
IFA_F_NODAD = 0x02  # the address is usable at once, no duplicate detection
IFA_F_TENTATIVE = 0x40
READY_TIMEOUT = 10.0


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Call predicate until it returns something true or timeout seconds pass;
    return its last result (so `assert wait_for(...)` reads naturally)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


class Host:
    """One end of the lab: a namespace and its one interface."""

    def __init__(self, name, iface, ipv4, ipv6):
        self.name = name  # the network namespace
        self.iface = iface  # its interface towards the bridge
        self.ipv4 = ipv4
        self.ipv6 = ipv6  # None in a lab built with ipv6=False
        self._processes = []

    def __repr__(self):
        return f"Host({self.name!r}, iface={self.iface!r}, ipv4={self.ipv4!r}, ipv6={self.ipv6!r})"

    def command(self, argv):
        """argv as run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, argv, **kw):
        """Run argv in this namespace to completion; output captured as text
        unless kw says otherwise."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.command(argv), **kw)

    def popen(self, argv, **kw):
        """Start argv in this namespace; the lab stops it when it is torn down."""
        process = subprocess.Popen(self.command(argv), **kw)
        self._processes.append(process)
        return process

    def stop_processes(self):
        """Stop everything popen() started here that is still running."""
        while self._processes:
            stop_process(self._processes.pop())


def stop_process(process, timeout=3.0):
    """Terminate, then kill if it does not go; close its pipes."""
    try:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe:
                pipe.close()


class Lab:
    """The namespaces, built on __enter__ and removed on __exit__."""

    def __init__(self, prefix="xk", ipv6=True, servers=1, router=False):
        if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
            raise ValueError(f"lab prefix {prefix!r}: use letters, digits and _ only")
        if not 1 <= servers <= 1 + len(EXTRA_SERVERS):
            raise ValueError(f"a lab has 1 to {1 + len(EXTRA_SERVERS)} servers")
        self.prefix = prefix
        self.ipv6 = ipv6
        self.token = secrets.token_hex(3)
        stem = f"{prefix}-{os.getpid()}-{self.token}"
        self.hosts = {
            role: Host(f"{stem}-{role}", f"{role}0-{self.token}", v4, v6 if ipv6 else None)
            for role, (v4, v6) in [*ADDRESSES.items(), *list(EXTRA_SERVERS.items())[:servers - 1],
                                   *([ROUTER] if router else [])]
        }
        self.router = self.hosts.get(ROUTER[0])
        self.switch = f"{stem}-{SWITCH}"
        self.bridge = f"br-{self.token}"
        self._namespaces = []  # made so far: what teardown removes
        # The hook every `xknock attach` of the e2e helpers (e2e.py) asks
        # for: None for the default (XDP), "tc" to run a module's cases at TC.
        self.hook = None
        self._unplugged_macs = {}  # iface -> its MAC, between unplug() and replug()

    server = property(lambda self: self.hosts["srv"])
    client = property(lambda self: self.hosts["cli"])
    attacker = property(lambda self: self.hosts["atk"])
    server_iface = property(lambda self: self.server.iface)

    @property
    def servers(self):
        """srv, then srv2, srv3 of a lab built with servers=2 or 3."""
        return [host for role, host in self.hosts.items() if role.startswith("srv")]

    @property
    def service(self):
        """The address the router spreads over the servers: (IPv4, IPv6 or None)."""
        return SERVICE[0], SERVICE[1] if self.ipv6 else None

    @property
    def namespaces(self):
        return [self.switch, *(host.name for host in self.hosts.values())]

    def __enter__(self):
        remove_stale_labs(self.prefix)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        self.teardown()

    def _build(self):
        for name in self.namespaces:
            self._namespaces.append(name)
            netns.create(name)
        # The bridge needs no IPv6: without it no DAD, router or MLD chatter
        # of its own reaches the hosts.
        self._sysctl(self.switch, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        for host in self.hosts.values():
            if self.ipv6:
                # Link-local addresses usable at once too, as the nodad ones.
                self._sysctl(host.name, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
            else:
                self._sysctl(host.name, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")

        with contextlib.closing(NetNS(self.switch)) as sw:
            sw.link("add", ifname=self.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
            for role, host in self.hosts.items():
                self._plug(sw, role, host)
            sw.link("set", index=sw.link_lookup(ifname=self.bridge)[0], state="up")
        self._pass_on_ports(*self.hosts)
        for host in self.hosts.values():
            self._configure(host)
        if self.router:
            self._route_service()
        self._wait_until_ready()

    def _route_service(self):
        """The service address on every server's lo; the router's multipath
        route to it over the servers' addresses, hashed on L4 (policy 1);
        client and attacker reach it through the router. Everything shares
        one bridge, so the router sends each packet back out where it came
        from: no redirects, or the client would learn to skip the router.
        The servers answer the client directly (direct server return)."""
        router, service = self.router, self.service
        families = [("-4", service[0], 32, [s.ipv4 for s in self.servers], "ipv4")]
        if self.ipv6:
            families.append(("-6", service[1], 128, [s.ipv6 for s in self.servers], "ipv6"))
        self._sysctl(router.name, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                     "net.ipv4.conf.default.send_redirects=0", f"net.ipv4.conf.{router.iface}.send_redirects=0",
                     "net.ipv4.fib_multipath_hash_policy=1")
        if self.ipv6:
            self._sysctl(router.name, "net.ipv6.conf.all.forwarding=1", "net.ipv6.fib_multipath_hash_policy=1")
        for host in (self.client, self.attacker):
            self._sysctl(host.name, "net.ipv4.conf.all.accept_redirects=0",
                         f"net.ipv4.conf.{host.iface}.accept_redirects=0")
            if self.ipv6:
                self._sysctl(host.name, "net.ipv6.conf.all.accept_redirects=0",
                             f"net.ipv6.conf.{host.iface}.accept_redirects=0")
        for flag, address, length, gateways, family in families:
            for server in self.servers:
                _ip(server.name, flag, "addr", "add", f"{address}/{length}", "dev", "lo")
            hops = [word for gateway in gateways for word in ("nexthop", "via", gateway, "dev", router.iface)]
            _ip(router.name, flag, "route", "add", f"{address}/{length}", *hops)
            router_address = router.ipv4 if family == "ipv4" else router.ipv6
            for host in (self.client, self.attacker):
                _ip(host.name, flag, "route", "add", f"{address}/{length}", "via", router_address)

    def set_multipath_hash(self, policy):
        """The router's hash: 0 on addresses only (L3), 1 on the 5-tuple (L4)."""
        settings = [f"net.ipv4.fib_multipath_hash_policy={policy}"]
        if self.ipv6:
            settings.append(f"net.ipv6.fib_multipath_hash_policy={policy}")
        self._sysctl(self.router.name, *settings)

    def _port(self, role):
        return f"{role}1-{self.token}"

    def _plug(self, sw, role, host, mac=None):
        """A veth from a bridge port (in the switch) to host's interface."""
        port = self._port(role)
        # Made in the sw namespace with the peer straight in the host's,
        # so no name ever appears in the caller's namespace.
        peer = {"ifname": host.iface, "net_ns_fd": host.name, **({"address": mac} if mac else {})}
        sw.link("add", ifname=port, kind="veth", peer=peer)
        sw.link("set", index=sw.link_lookup(ifname=port)[0], master=sw.link_lookup(ifname=self.bridge)[0],
                state="up")

    def _pass_on_ports(self, *roles):
        # A native XDP program's XDP_TX on a veth (the answers of answer =
        # "closed") reaches the other end only if that end runs an XDP
        # program too: the switch's ports run one that passes everything, as
        # a NIC would simply transmit.
        subprocess.run(["ip", "netns", "exec", self.switch, HELPER_PYTHON, "-c", _XDP_PASS,
                        *(self._port(role) for role in roles)],
                       check=True, capture_output=True, timeout=60)

    def _configure(self, host):
        with contextlib.closing(NetNS(host.name)) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            index = ns.link_lookup(ifname=host.iface)[0]
            ns.addr("add", index=index, address=host.ipv4, prefixlen=IPV4_PREFIX)
            if host.ipv6:
                ns.addr("add", index=index, address=host.ipv6, prefixlen=IPV6_PREFIX, flags=IFA_F_NODAD)
            ns.link("set", index=index, state="up")
        # Full checksums on the wire, as a NIC delivers them: a veth
        # would send partial ones (offload), which the filter, like the
        # kernel for frames from a real NIC, takes for corrupt and leaves
        # unanswered.
        _ethtool(host.name, host.iface, "tx", "off")

    def unplug(self, host):
        """Delete host's interface (its bridge port goes with it), as a
        recreated veth or a driver reload would."""
        role = next(r for r, h in self.hosts.items() if h is host)
        with contextlib.closing(NetNS(host.name)) as ns:
            self._unplugged_macs[host.iface] = ns.link("get", index=ns.link_lookup(ifname=host.iface)[0])[0] \
                .get_attr("IFLA_ADDRESS")
        with contextlib.closing(NetNS(self.switch)) as sw:
            sw.link("del", index=sw.link_lookup(ifname=self._port(role))[0])

    def replug(self, host):
        """Make host's interface again as it was (same name, MAC and
        addresses, as a reloaded NIC comes back; a new interface to the
        kernel) and wait until it is usable."""
        role = next(r for r, h in self.hosts.items() if h is host)
        with contextlib.closing(NetNS(self.switch)) as sw:
            self._plug(sw, role, host, mac=self._unplugged_macs.pop(host.iface, None))
        self._pass_on_ports(role)
        self._configure(host)
        with contextlib.closing(NetNS(host.name)) as ns:
            if not wait_for(lambda: _usable(ns, host.iface), READY_TIMEOUT):
                raise RuntimeError(f"lab: {host.iface} in netns {host.name} not up after {READY_TIMEOUT}s")

    def _sysctl(self, namespace, *settings):
        subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *settings],
                       check=True, capture_output=True, timeout=30)

    def _wait_until_ready(self):
        """Every interface up (carrier on both ends) and every address out of
        its tentative state: then the first packet of a test gets through."""
        pending = {self.switch: [self.bridge, *(f"{role}1-{self.token}" for role in self.hosts)]}
        pending.update({host.name: [host.iface] for host in self.hosts.values()})
        for namespace, ifaces in pending.items():
            with contextlib.closing(NetNS(namespace)) as ns:
                for iface in ifaces:
                    if not wait_for(lambda: _usable(ns, iface), READY_TIMEOUT):
                        raise RuntimeError(f"lab: {iface} in netns {namespace} not up after {READY_TIMEOUT}s")

    def teardown(self):
        """Stop the lab's processes and remove its namespaces; the veths go
        with them. Safe to call twice and after a half-done build."""
        errors = []
        for host in self.hosts.values():
            try:
                host.stop_processes()
            except Exception as e:  # keep going: the namespaces must go
                errors.append(f"stopping processes in {host.name}: {e}")
        while self._namespaces:
            name = self._namespaces.pop()
            try:
                netns.remove(name)
            except FileNotFoundError:
                pass
            except Exception as e:
                errors.append(f"removing netns {name}: {e}")
        if errors:
            raise RuntimeError("lab teardown: " + "; ".join(errors))


_XDP_PASS = r"""
import sys
from bcc import BPF
b = BPF(text=b"int xk_lab_pass(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func(b"xk_lab_pass", BPF.XDP)
for iface in sys.argv[1:]:
    BPF.attach_xdp(iface, fn, 0)
"""


def _ethtool(namespace, iface, *features):
    subprocess.run(["ip", "netns", "exec", namespace, "ethtool", "-K", iface, *features],
                   check=True, capture_output=True, timeout=30)


def _ip(namespace, *args):
    subprocess.run(["ip", "netns", "exec", namespace, "ip", *args], check=True, capture_output=True, timeout=30)


def _usable(ns, iface):
    links = ns.get_links(ifname=iface)
    if not links or links[0].get_attr("IFLA_OPERSTATE") != "UP":
        return False
    index = links[0]["index"]
    for addr in ns.get_addr(index=index):
        flags = addr.get_attr("IFA_FLAGS") or addr["flags"]
        if flags & IFA_F_TENTATIVE:
            return False
    return True


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name):
    """This thread in the network namespace name, then back. From the main
    thread, /proc/self/net and /proc/self/ns/net follow it too; the mount
    namespace stays the caller's, so pins made meanwhile outlive the block
    (under `ip netns exec` they go with the process's own bpffs)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def remove_stale_labs(prefix="xk"):
    """Remove namespaces left by labs of this prefix whose process is gone."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]{{6}}-(?:{'|'.join((*ROLES, *EXTRA_SERVERS, ROUTER[0], SWITCH))})")
    for name in netns.listnetns():
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                netns.remove(name)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def lab(prefix="xk", ipv6=True, servers=1, router=False):
    """Build a lab, yield it, remove it."""
    with Lab(prefix, ipv6, servers, router) as built:
        yield built


# --- small servers and probes, run inside namespaces by HELPER_PYTHON --------

# Dual-stack where the namespace has IPv6, IPv4 only where it has not.
_BIND = """
import socket, sys
def bind(kind, port, proto=0):
    try:
        s = socket.socket(socket.AF_INET6, kind, proto)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
    except OSError:
        s = socket.socket(socket.AF_INET, kind, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    return s
"""

_TCP_LISTEN = _BIND + """
s = bind(socket.SOCK_STREAM, int(sys.argv[1]))
s.listen(64)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.close()
"""

# argv: port [IP protocol: 17 UDP, the default, or 136 UDP-Lite]
_UDP_ECHO = _BIND + """
s = bind(socket.SOCK_DGRAM, int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

_CAN_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError:
    sys.exit(1)
"""

_CONNECT_OUTCOME = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timed out")
except OSError as e:
    print(e.strerror or e)
"""

_UDP_ROUNDTRIP = """
import socket, sys
addr, port, proto, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
family, kind, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_DGRAM)[0]
s = socket.socket(family, kind, proto)
s.settimeout(timeout)
try:
    s.sendto(b"xknock-lab", sockaddr)
    sys.exit(0 if s.recv(64) == b"xknock-lab" else 1)
except OSError:
    sys.exit(1)
"""

# One datagram on a connected socket: "answered", "refused" (an ICMP port
# unreachable came back) or "timed out".
_UDP_OUTCOME = """
import socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_DGRAM)[0]
s = socket.socket(family, kind, proto)
s.settimeout(timeout)
s.connect(sockaddr)
try:
    s.send(b"xknock-lab")
    s.recv(64)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timed out")
"""

# One ICMP(v6) echo over a raw socket, exit 0 on its reply.
_PING = """
import os, select, socket, struct, sys, time
addr, timeout = sys.argv[1], float(sys.argv[2])
family, _, _, _, sockaddr = socket.getaddrinfo(addr, None)[0]
v6 = family == socket.AF_INET6
s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
packet = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"xknock-lab"
if not v6:  # the kernel sums ICMPv6 itself, not ICMP
    total = sum(struct.unpack("!%dH" % (len(packet) // 2), packet))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    packet = packet[:2] + struct.pack("!H", ~total & 0xFFFF) + packet[4:]
s.sendto(packet, sockaddr)
deadline = time.monotonic() + timeout
while select.select([s], [], [], max(0, deadline - time.monotonic()))[0]:
    data = s.recv(2048)
    if not v6:
        data = data[(data[0] & 0x0F) * 4:]  # a raw IPv4 socket returns the IP header too
    if data[0] == (129 if v6 else 0) and struct.unpack("!H", data[4:6])[0] == ident:
        sys.exit(0)
sys.exit(1)
"""


@contextlib.contextmanager
def _server(host, script, port, *args, timeout=5.0):
    process = host.popen([HELPER_PYTHON, "-c", script, port, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if _read_line(process.stdout, timeout) != "ready\n":
            process.kill()
            raise RuntimeError(f"server on port {port} in {host.name} did not start: {process.stderr.read().strip()}")
        yield process
    finally:
        stop_process(process)


def _read_line(stream, timeout):
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return stream.readline()


def tcp_listen(host, port):
    """Context manager: a TCP server on port (all addresses) in host's
    namespace that accepts and closes every connection; listening on entry."""
    return _server(host, _TCP_LISTEN, port)


def udp_echo(host, port, proto=UDP):
    """Context manager: a UDP (or UDP-Lite, proto=UDPLITE) server on port in
    host's namespace that sends every datagram back; bound on entry."""
    return _server(host, _UDP_ECHO, port, str(proto))


def _probe(host, script, *args, timeout):
    result = host.run([HELPER_PYTHON, "-c", script, *args, timeout], timeout=timeout + 10)
    return result.returncode == 0


def can_connect(host_from, addr, port, timeout=1.0):
    """Does a TCP connection from host_from's namespace to (addr, port) succeed?"""
    return _probe(host_from, _CAN_CONNECT, addr, port, timeout=timeout)


def connect_outcome(host_from, addr, port, timeout=1.0):
    """"open", "refused" (a RST came back) or "timed out", from host_from's namespace."""
    result = host_from.run([HELPER_PYTHON, "-c", _CONNECT_OUTCOME, addr, str(port), str(timeout)],
                           timeout=timeout + 10)
    return result.stdout.strip()


def udp_outcome(host_from, addr, port, timeout=1.0):
    """"answered", "refused" (ICMP port unreachable) or "timed out" for one
    UDP datagram from host_from's namespace to (addr, port)."""
    result = host_from.run([HELPER_PYTHON, "-c", _UDP_OUTCOME, addr, str(port), str(timeout)], timeout=timeout + 10)
    return result.stdout.strip()


def udp_roundtrip(host_from, addr, port, timeout=1.0, proto=UDP):
    """Does a datagram (UDP, or UDP-Lite with proto=UDPLITE) from host_from to
    (addr, port) come back (udp_echo)?"""
    return _probe(host_from, _UDP_ROUNDTRIP, addr, port, proto, timeout=timeout)


def can_ping(host_from, addr, timeout=1.0):
    """Does an ICMP or ICMPv6 echo from host_from to addr get its reply?"""
    return _probe(host_from, _PING, addr, timeout=timeout)
