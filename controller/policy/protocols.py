"""Which IP protocols this host's kernel refuses with an ICMP error, asked of
the kernel itself.

The data path refuses IPsec and the transports it cannot open ([filter]
ipsec, other_transports). Dropped silently, an IP protocol scan (`nmap -sO`)
would see them `open|filtered` where this kernel, lacking the protocol,
answers "protocol unreachable" (IPv4) or "unrecognized next header" (IPv6)
and the scan says `closed`. So the filter answers as the kernel would, for
exactly the protocols the kernel would answer, and this module finds them:
one packet of each protocol sent to the loopback address, and the kernel's
ICMP errors read back. UDP-Lite, refused too (other_transports), is a
transport this kernel usually has: it answers an unused UDP-Lite port with a
port unreachable, as for UDP; one datagram to port 0 (no socket is ever
bound there) asks whether it does. Loopback is exempt from ICMP rate limits, so no answer
means the kernel handles the protocol (a module loaded, a raw socket open).
"""

import contextlib
import dataclasses
import select
import socket
import struct
import time

# The protocols the data path may refuse, and so may have to answer for.
ESP, AH, DCCP, SCTP, UDPLITE = 50, 51, 33, 132, 136
PROBED = (ESP, AH, DCCP, SCTP)
ICMP_DEST_UNREACH, ICMP_PROT_UNREACH, ICMP_PORT_UNREACH = 3, 2, 3
ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH = 1, 4
ICMPV6_PARAMPROB, ICMPV6_UNK_NEXTHDR = 4, 1
IPV6_NEXTHDR_OFFSET = 6      # the pointer of an "unrecognized next header" for the fixed header
WAIT_S = 0.1                 # answers on loopback come at once; this bounds a handled protocol's wait
PAYLOAD = bytes(8)


@dataclasses.dataclass(frozen=True)
class Unreachable:
    """The protocols the kernel answers as unknown, per family, and whether
    it answers an unused UDP-Lite port with a port unreachable."""

    ipv4: frozenset = frozenset()
    ipv6: frozenset = frozenset()
    udplite_ipv4: bool = False
    udplite_ipv6: bool = False


def probe(wait_s=WAIT_S):
    """Ask this network namespace's kernel. A family that cannot be asked (no
    loopback, IPv6 disabled) answers for nothing, so its packets stay dropped."""
    ipv4, ipv6 = _probe_family(socket.AF_INET, wait_s), _probe_family(socket.AF_INET6, wait_s)
    return Unreachable(ipv4=frozenset(ipv4 - {UDPLITE}), ipv6=frozenset(ipv6 - {UDPLITE}),
                       udplite_ipv4=UDPLITE in ipv4, udplite_ipv6=UDPLITE in ipv6)


def _probe_family(family, wait_s):
    try:
        listener = socket.socket(family, socket.SOCK_RAW,
                                 socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6)
        sender = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError:
        return set()
    with listener, sender:
        ident = int(time.monotonic_ns()) & 0xffff
        try:
            for proto in PROBED:
                _send(sender, family, proto, PAYLOAD, ident)
            _send(sender, family, UDPLITE, _udplite_datagram(family), ident)
        except OSError:
            return set()
        return _read_answers(listener, family, ident, wait_s)


def _send(sender, family, proto, payload, ident):
    if family == socket.AF_INET:
        sender.sendto(_ipv4_packet(proto, ident, payload), ("127.0.0.1", 0))
    else:
        sender.sendto(_ipv6_packet(proto, ident, payload), ("::1", 0))


def _udplite_datagram(family):
    """To port 0, all of it covered by the checksum (RFC 3828), which the
    kernel checks before it answers."""
    loopback = socket.inet_pton(family, "127.0.0.1" if family == socket.AF_INET else "::1")
    header = struct.pack("!HHHH", 0, 0, 0, 0) + PAYLOAD
    if family == socket.AF_INET:
        pseudo = struct.pack("!4s4sBBH", loopback, loopback, 0, UDPLITE, len(header))
    else:
        pseudo = struct.pack("!16s16sI3xB", loopback, loopback, len(header), UDPLITE)
    return header[:6] + struct.pack("!H", _checksum(pseudo + header) or 0xffff) + header[8:]


def _checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff


def _ipv4_packet(proto, ident, payload=PAYLOAD):
    loopback = socket.inet_aton("127.0.0.1")
    # IP_HDRINCL (implied by IPPROTO_RAW): the kernel fills in the checksum
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
                       loopback, loopback) + payload


def _ipv6_packet(proto, ident, payload=PAYLOAD):
    loopback = socket.inet_pton(socket.AF_INET6, "::1")
    # the flow label carries our mark, so an answer to someone else's probe is not ours
    return struct.pack("!IHBB16s16s", (6 << 28) | ident, len(payload), proto, 64,
                       loopback, loopback) + payload


def _read_answers(listener, family, ident, wait_s):
    answered = set()
    deadline = time.monotonic() + wait_s
    while len(answered) < len(PROBED) + 1:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([listener], [], [], left)[0]:
            break
        with contextlib.suppress(OSError):
            proto = _answered_protocol(listener.recv(2048), family, ident)
            if proto in (*PROBED, UDPLITE):
                answered.add(proto)
    return answered


def _answered_protocol(data, family, ident):
    """The protocol a kernel's ICMP error answers, if it answers our probe:
    a protocol unreachable for PROBED, a port unreachable for UDP-Lite."""
    if family == socket.AF_INET:
        ihl = (data[0] & 15) * 4   # an IPv4 raw socket reads the IP header too
        icmp, quoted = data[ihl:ihl + 8], data[ihl + 8:]
        if len(icmp) < 8 or len(quoted) < 20 or icmp[0] != ICMP_DEST_UNREACH:
            return None
        if struct.unpack("!H", quoted[4:6])[0] != ident:
            return None
        proto = quoted[9]
        return proto if icmp[1] == (ICMP_PORT_UNREACH if proto == UDPLITE else ICMP_PROT_UNREACH) else None
    icmp, quoted = data[:8], data[8:]
    if len(icmp) < 8 or len(quoted) < 40 or struct.unpack("!I", quoted[:4])[0] & 0xfffff != ident:
        return None
    proto = quoted[6]
    if proto == UDPLITE:
        return proto if (icmp[0], icmp[1]) == (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH) else None
    if icmp[0] != ICMPV6_PARAMPROB or icmp[1] != ICMPV6_UNK_NEXTHDR:
        return None
    if struct.unpack("!I", icmp[4:8])[0] != IPV6_NEXTHDR_OFFSET:
        return None
    return proto
