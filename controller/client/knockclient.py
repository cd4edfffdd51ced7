"""The knock client: sends a sequence of knocks (TCP SYNs, UDP datagrams,
ICMP echo requests) to a host. Knocks are fire and forget: the filter
answers them as unused ports (a reset, a port unreachable) or drops them, and
the client waits for neither. knock_until_open() knocks again until the
guarded port answers: the seed's resending "until the sequence is
acknowledged", for lossy networks."""

import errno
import os
import socket
import struct
import time

from ..config import Step
from ..errors import XknockError

UDP_PAYLOAD = b"xknock"
ICMP_PAYLOAD = b"xknock"
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
# The SYN leaves during connect(); this only gives it a moment on the wire.
# Far below the first SYN retransmission (1 s), which would knock twice.
TCP_HOLD = 0.01
# With --repeat, the last copy of a knock goes this long before the next
# knock: the two stay in order even across the receive queues of a server
# NIC (RSS), and a first step the server forgot under a flood is placed
# again just before the second step needs it.
REPEAT_GAP = 0.01


class KnockError(XknockError):
    """A knock could not be sent: the host does not resolve, or a socket
    could not be opened (ICMP: neither a raw socket, which needs root, nor
    a ping socket, which needs a group in net.ipv4.ping_group_range)."""


def send_knocks(host: str, steps: list[Step], delay: float = 0.1, family=None, repeat: int = 1) -> None:
    """Knock on host once per step, in order, delay seconds apart. The host is
    resolved once, so every knock goes to the same address; family
    (socket.AF_INET or AF_INET6) forces one address family.

    repeat sends every knock that many times, its copies spread evenly over
    the delay that follows it, the last REPEAT_GAP before the next knock:
    xknock ignores a repeat of the step it just accepted, so a copy lost on
    the way (a receive ring overflowing for tens of ms under a flood) no
    longer loses the knock, and the time from knock to knock stays the same."""
    if repeat < 1:
        raise KnockError(f"repeat must be at least 1, not {repeat}")
    for step in steps:
        if step.proto not in KNOCKERS:
            raise KnockError(f"knock {step}: unknown protocol {step.proto!r} (use tcp, udp or icmp)")
    if repeat > 1:
        for i in range(1, len(steps)):
            if steps[i] == steps[i - 1]:
                # The copies of the first would be taken for the second.
                raise KnockError(f"knock[{i}] {steps[i]} is knock[{i - 1}] again: it cannot be repeated "
                                 "(and xknock would take it for a retransmission)")
    address = resolve(host, family)
    between_copies, before_next = copy_pauses(delay, repeat)
    for i, step in enumerate(steps):
        if i:
            time.sleep(before_next)
        for copy in range(repeat):
            if copy:
                time.sleep(between_copies)
            try:
                KNOCKERS[step.proto](address, step)
            except KnockError:
                raise
            except (OSError, OverflowError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise KnockError(f"knock {step} to {address[0]} failed: {reason}") from e


def knock_until_open(host, steps_now, target, deadline, delay=0.1, family=None, repeat=1, probe_timeout=1.0,
                     on_attempt=None):
    """Knock, then try to connect to target (a tcp Step) on host; knock again
    until it accepts or deadline seconds have passed. steps_now() gives the
    knocks of each round (a time-based sequence changes its ports). Returns
    the number of rounds; raises KnockError when the port never opened. A
    refused or timed-out probe is itself a new connection, which in strict
    mode ends any progress: every round starts at the first knock."""
    if target.proto != "tcp":
        raise KnockError(f"--until-open {target}: only a tcp port can be seen to open")
    address = resolve(host, family)
    end = time.monotonic() + deadline
    rounds = 0
    while True:
        rounds += 1
        steps = steps_now()
        send_knocks(address[1][0], steps, delay=delay, family=address[0], repeat=repeat)
        outcome = probe_tcp(address, target.port, min(probe_timeout, max(end - time.monotonic(), 0.05)))
        if on_attempt:
            on_attempt(rounds, steps, outcome)
        if outcome == "open":
            return rounds
        if time.monotonic() >= end:
            raise KnockError(f"{target} on {address[1][0]} did not open within {deadline:g}s "
                             f"({rounds} rounds of knocks; the last probe was {outcome})")
        time.sleep(min(delay, max(end - time.monotonic(), 0)))


def probe_tcp(address, port, timeout):
    """"open", "refused" or "timed out": one connection attempt, closed at once."""
    family, _ = address
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(with_port(address, port))
        except ConnectionRefusedError:
            return "refused"
        except (TimeoutError, socket.timeout):
            return "timed out"
        except OSError as e:
            return e.strerror or str(e)
        return "open"


def copy_pauses(delay, repeat):
    """(pause between two copies of a knock, pause before the next knock)."""
    if repeat == 1:
        return 0.0, delay
    before_next = min(delay, REPEAT_GAP)
    return (delay - before_next) / (repeat - 1), before_next


def resolve(host, family=None):
    """(family, sockaddr without port) of the first address getaddrinfo gives."""
    try:
        infos = socket.getaddrinfo(host, None, family or socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        which = {socket.AF_INET: " (IPv4)", socket.AF_INET6: " (IPv6)"}.get(family, "")
        raise KnockError(f"cannot resolve {host!r}{which}: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def with_port(address, port):
    """The sockaddr to reach port; IPv6 keeps its flow info and scope id."""
    family, sockaddr = address
    return (sockaddr[0], port, *sockaddr[2:])


def knock_tcp(address, step):
    """One SYN: a non-blocking connect, closed before any handshake. Closing
    in SYN-SENT sends nothing more."""
    family, _ = address
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        result = sock.connect_ex(with_port(address, step.port))
        if result not in (0, errno.EINPROGRESS):
            raise OSError(result, os.strerror(result))
        time.sleep(TCP_HOLD)


def knock_udp(address, step):
    family, _ = address
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(UDP_PAYLOAD, with_port(address, step.port))


def knock_icmp(address, step):
    """One echo request: a raw socket as root, else the unprivileged ping
    socket where net.ipv4.ping_group_range allows it."""
    family, _ = address
    v6 = family == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    try:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    except PermissionError:
        try:
            # The kernel sets the identifier and checksum on a ping socket.
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        except PermissionError:
            raise KnockError(
                "an icmp knock needs root (raw socket) or a group in net.ipv4.ping_group_range"
            ) from None
    with sock:
        sock.sendto(echo_request(v6, ident=os.getpid() & 0xFFFF), with_port(address, 0))


def echo_request(v6, ident, seq=1, payload=ICMP_PAYLOAD):
    """An ICMP or ICMPv6 echo request. ICMPv6's checksum covers a
    pseudo-header only the kernel knows in full, so it fills that one in."""
    kind = ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if v6:
        return header + payload
    checksum = internet_checksum(header + payload)
    return header[:2] + struct.pack("!H", checksum) + header[4:] + payload


def internet_checksum(data):
    """RFC 1071: the ones' complement of the ones' complement sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF


KNOCKERS = {"tcp": knock_tcp, "udp": knock_udp, "icmp": knock_icmp}
