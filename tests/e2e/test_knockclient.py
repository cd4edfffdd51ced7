"""The knock client on the wire: from the client's namespace, send_knocks()
puts exactly one TCP SYN, one UDP datagram and one ICMP echo request on the
server's interface, in that order, over IPv4 and IPv6. No BPF involved."""

import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether

from xknock.controller.config import Step
from xknock.controller.client.knockclient import (
    REPEAT_GAP, KnockError, copy_pauses, echo_request, internet_checksum, send_knocks,
)
from xknock_dev.lab import lab, stop_process, wait_for

KNOCKS = [Step("tcp", 7000), Step("udp", 8000), Step("icmp", 0)]
EXPECTED = [("tcp", 7000, "S"), ("udp", 8000), ("icmp",)]

# Run by the venv's Python inside the client's namespace.
SEND_KNOCKS = """
import sys
from xknock.controller.config import Step
from xknock.controller.client.knockclient import send_knocks
send_knocks(sys.argv[1], [Step("tcp", 7000), Step("udp", 8000), Step("icmp", 0)], delay=0.05,
            repeat=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
"""


class Capture:
    """tcpdump on a host's interface, inbound frames only, collected as they
    arrive: --immediate-mode hands over each packet at once (not a ring block
    a second later), -U writes its pcap record at once."""

    def __init__(self, host):
        self.host = host
        self._data = bytearray()
        self._lock = threading.Lock()

    def __enter__(self):
        self.process = self.host.popen(
            ["tcpdump", "-i", self.host.iface, "-Q", "in", "-nn", "--immediate-mode", "-U", "-w", "-"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            self._wait_until_listening()
        except BaseException:
            stop_process(self.process)
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _wait_until_listening(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stderr, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(deadline - time.monotonic()):
                    line = self.process.stderr.readline()
                    if b"listening on" in line:
                        return
                    if not line:
                        break
        raise RuntimeError(f"tcpdump did not start in {self.host.name}")

    def _read(self):
        while chunk := self.process.stdout.read1(65536):
            with self._lock:
                self._data += chunk

    def __exit__(self, *exc):
        try:
            self.process.terminate()
            self.process.wait(5)
            self._reader.join(5)
        finally:
            stop_process(self.process)

    def frames(self):
        """The frames captured so far, from the pcap stream."""
        with self._lock:
            data = bytes(self._data)
        if len(data) < 24:
            return []
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        frames, offset = [], 24
        while offset + 16 <= len(data):
            _, _, length, _ = struct.unpack(order + "IIII", data[offset:offset + 16])
            if offset + 16 + length > len(data):
                break  # a record still being written
            frames.append(data[offset + 16:offset + 16 + length])
            offset += 16 + length
        return frames


def knocks_seen(capture, server_addr):
    """What reached server_addr, as (proto, port[, TCP flags]): every TCP and
    UDP packet, and echo requests; neighbour discovery and the like aside."""
    seen = []
    for frame in capture.frames():
        packet = Ether(frame)
        ip = packet.getlayer(IP) or packet.getlayer(IPv6)
        if ip is None or ip.dst != server_addr:
            continue
        if TCP in packet:
            seen.append(("tcp", packet[TCP].dport, str(packet[TCP].flags)))
        elif UDP in packet:
            seen.append(("udp", packet[UDP].dport))
        elif (ICMP in packet and packet[ICMP].type == 8) or ICMPv6EchoRequest in packet:
            seen.append(("icmp",))
    return seen


@pytest.fixture(scope="module")
def net():
    with lab() as built:
        yield built


@pytest.mark.netns
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_knocks_reach_the_server_once_each_in_order(net, family):
    server_addr = getattr(net.server, family)
    with Capture(net.server) as capture:
        sent = net.client.run([sys.executable, "-c", SEND_KNOCKS, server_addr], timeout=20)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(knocks_seen(capture, server_addr)) >= len(EXPECTED), timeout=3)
        # A moment more, to catch what should not be there (a second SYN).
        time.sleep(0.3)
    assert knocks_seen(capture, server_addr) == EXPECTED


@pytest.mark.netns
def test_repeat_sends_each_knock_that_many_times_before_the_next(net):
    server_addr = net.server.ipv4
    expected = [knock for knock in EXPECTED for _ in range(3)]
    with Capture(net.server) as capture:
        sent = net.client.run([sys.executable, "-c", SEND_KNOCKS, server_addr, "3"], timeout=20)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(knocks_seen(capture, server_addr)) >= len(expected), timeout=3)
        time.sleep(0.3)
    assert knocks_seen(capture, server_addr) == expected


def test_copies_are_spread_over_the_delay_the_last_just_before_the_next_knock():
    assert copy_pauses(0.1, 1) == (0.0, 0.1)                    # one copy: the plain delay
    between, before_next = copy_pauses(0.5, 3)
    assert before_next == REPEAT_GAP
    assert between * 2 + before_next == pytest.approx(0.5)      # knock to knock: still the delay
    assert copy_pauses(0.005, 3) == (0.0, 0.005)                # a delay below the gap: back to back


def test_a_step_twice_in_a_row_cannot_be_repeated():
    with pytest.raises(KnockError, match=r"knock\[1\] udp:8000 is knock\[0\] again"):
        send_knocks("127.0.0.1", [Step("udp", 8000), Step("udp", 8000)], repeat=2)


def test_an_unresolvable_host_is_a_knock_error():
    with pytest.raises(KnockError, match="cannot resolve 'no-such-host.invalid'"):
        send_knocks("no-such-host.invalid", KNOCKS)


def test_a_forced_family_the_address_lacks_is_a_knock_error():
    with pytest.raises(KnockError, match=r"cannot resolve '::1' \(IPv4\)"):
        send_knocks("::1", KNOCKS, family=socket.AF_INET)


def test_an_unknown_protocol_fails_before_any_knock():
    with pytest.raises(KnockError, match="unknown protocol 'sctp'"):
        send_knocks("127.0.0.1", [Step("tcp", 7000), Step("sctp", 9)])


def test_an_icmp_echo_request_carries_a_valid_checksum():
    packet = echo_request(v6=False, ident=0x1234, seq=1)
    assert packet[0] == 8 and internet_checksum(packet) == 0
    assert echo_request(v6=True, ident=0x1234)[0] == 128
