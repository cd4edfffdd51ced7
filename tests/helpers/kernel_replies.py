"""What this kernel itself sends back for a port nobody listens on: frames
sent into a namespace whose stack has no listener, and the first frame that
comes back, captured. The oracle that the data path's answers are compared
with byte for byte (tests/kernel/test_answers.py).

The server namespace holds packets.SERVER4 / SERVER6 with the MAC that
packets.ether() sends to, a default route to a permanent neighbour with the
sender's MAC (so replies leave at once, no ARP), checksum offload off (so the
captured frames carry real checksums) and no ICMP rate limit per destination
(so every case gets its reply; test_answers checks the limits separately)."""

import os
import secrets
import subprocess
import sys

from xknock_dev.packets import SERVER4, SERVER6

SERVER_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:02"
GATEWAY4 = "10.77.0.2"
GATEWAY6 = "fd00:77::2"

# Runs in the client namespace: one hex frame a line in, the first frame
# back (or "-") a line out.
_CAPTURE = r"""
import select, socket, sys, time
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sock.bind((sys.argv[1], 0))
for line in sys.stdin:
    frame = bytes.fromhex(line.strip())
    while select.select([sock], [], [], 0)[0]:
        sock.recv(65535)
    sock.send(frame)
    deadline = time.monotonic() + float(sys.argv[2])
    reply = None
    while reply is None and (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, addr = sock.recvfrom(65535)
        if addr[2] != socket.PACKET_HOST:
            continue   # our own frame, and the server's multicast chatter (MLD, router solicitations)
        reply = data
    print(reply.hex() if reply is not None else "-", flush=True)
"""


def _ip(*args, ns=None):
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class KernelReplies:
    """with KernelReplies(vlan=None) as kernel: kernel.reply(frame) -> bytes | None"""

    def __init__(self, vlan=None, timeout=0.3):
        token = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.server, self.client = f"xkr-{token}-srv", f"xkr-{token}-cli"
        self.vlan = vlan
        self.timeout = timeout
        self._capture = None

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _build(self):
        for ns in (self.server, self.client):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
        for ns, sysctls in ((self.server, ["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0",
                                           "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                                           "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]),
                            (self.client, ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls],
                           check=True, capture_output=True, timeout=30)
        _ip("link", "add", "s0", "netns", self.server, "address", SERVER_MAC, "type", "veth",
            "peer", "name", "c0", "netns", self.client, "address", CLIENT_MAC)
        for ns, iface in ((self.server, "s0"), (self.client, "c0")):
            subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", iface, "tx", "off", "rx", "off"],
                           check=True, capture_output=True, timeout=30)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "set", iface, "up", ns=ns)
        iface = "s0"
        if self.vlan is not None:
            iface = f"s0.{self.vlan}"
            _ip("link", "add", "link", "s0", "name", iface, "type", "vlan", "id", str(self.vlan), ns=self.server)
            _ip("link", "set", iface, "up", ns=self.server)
        _ip("addr", "add", f"{SERVER4}/24", "dev", iface, ns=self.server)
        _ip("addr", "add", f"{SERVER6}/64", "dev", iface, "nodad", ns=self.server)
        _ip("neigh", "replace", GATEWAY4, "lladdr", CLIENT_MAC, "dev", iface, "nud", "permanent", ns=self.server)
        _ip("neigh", "replace", GATEWAY6, "lladdr", CLIENT_MAC, "dev", iface, "nud", "permanent", ns=self.server)
        _ip("route", "add", "default", "via", GATEWAY4, "dev", iface, ns=self.server)
        _ip("-6", "route", "add", "default", "via", GATEWAY6, "dev", iface, ns=self.server)
        self._capture = subprocess.Popen(
            ["ip", "netns", "exec", self.client, sys.executable, "-c", _CAPTURE, "c0", str(self.timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply(self, frame):
        """The first frame the kernel sends back for this one, or None."""
        self._capture.stdin.write(bytes(frame).hex() + "\n")
        self._capture.stdin.flush()
        line = self._capture.stdout.readline().strip()
        if not line:
            raise RuntimeError("kernel_replies: the capture process ended")
        return None if line == "-" else bytes.fromhex(line)

    def close(self):
        if self._capture is not None:
            self._capture.stdin.close()
            self._capture.wait(timeout=10)
            self._capture = None
        for ns in (self.server, self.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
