"""Which IP protocols this host's kernel refuses with an ICMP error, asked of
the kernel itself.

The data path refuses IPsec and the transports it cannot open ([filter]
ipsec, other_transports). Dropped silently, an IP protocol scan (`nmap -sO`)
would see them `open|filtered` where this kernel, lacking the protocol,
answers "protocol unreachable" (IPv4) or "unrecognized next header" (IPv6)
and the scan says `closed`. So the filter answers as the kernel would, for
exactly the protocols the kernel would answer, and this module finds them:
one packet of each protocol sent to the loopback address, and the kernel's
ICMP errors read back. Loopback is exempt from ICMP rate limits, so no answer
means the kernel handles the protocol (a module loaded, a raw socket open).
"""

import contextlib
import dataclasses
import select
import socket
import struct
import time

# The protocols the data path may refuse, and so may have to answer for.
ESP, AH, DCCP, SCTP = 50, 51, 33, 132
PROBED = (ESP, AH, DCCP, SCTP)
ICMP_DEST_UNREACH, ICMP_PROT_UNREACH = 3, 2
ICMPV6_PARAMPROB, ICMPV6_UNK_NEXTHDR = 4, 1
IPV6_NEXTHDR_OFFSET = 6      # the pointer of an "unrecognized next header" for the fixed header
WAIT_S = 0.1                 # answers on loopback come at once; this bounds a handled protocol's wait
PAYLOAD = bytes(8)


@dataclasses.dataclass(frozen=True)
class Unreachable:
    """The protocols the kernel answers as unknown, per family."""

    ipv4: frozenset = frozenset()
    ipv6: frozenset = frozenset()


def probe(wait_s=WAIT_S):
    """Ask this network namespace's kernel. A family that cannot be asked (no
    loopback, IPv6 disabled) answers for nothing, so its packets stay dropped."""
    return Unreachable(ipv4=frozenset(_probe_family(socket.AF_INET, wait_s)),
                       ipv6=frozenset(_probe_family(socket.AF_INET6, wait_s)))


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
                if family == socket.AF_INET:
                    sender.sendto(_ipv4_packet(proto, ident), ("127.0.0.1", 0))
                else:
                    sender.sendto(_ipv6_packet(proto, ident), ("::1", 0))
        except OSError:
            return set()
        return _read_answers(listener, family, ident, wait_s)


def _ipv4_packet(proto, ident):
    loopback = socket.inet_aton("127.0.0.1")
    # IP_HDRINCL (implied by IPPROTO_RAW): the kernel fills in the checksum
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(PAYLOAD), ident, 0, 64, proto, 0,
                       loopback, loopback) + PAYLOAD


def _ipv6_packet(proto, ident):
    loopback = socket.inet_pton(socket.AF_INET6, "::1")
    # the flow label carries our mark, so an answer to someone else's probe is not ours
    return struct.pack("!IHBB16s16s", (6 << 28) | ident, len(PAYLOAD), proto, 64,
                       loopback, loopback) + PAYLOAD


def _read_answers(listener, family, ident, wait_s):
    answered = set()
    deadline = time.monotonic() + wait_s
    while len(answered) < len(PROBED):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([listener], [], [], left)[0]:
            break
        with contextlib.suppress(OSError):
            proto = _answered_protocol(listener.recv(2048), family, ident)
            if proto in PROBED:
                answered.add(proto)
    return answered


def _answered_protocol(data, family, ident):
    """The protocol a kernel's ICMP error refuses, if it answers our probe."""
    if family == socket.AF_INET:
        ihl = (data[0] & 15) * 4   # an IPv4 raw socket reads the IP header too
        icmp, quoted = data[ihl:ihl + 8], data[ihl + 8:]
        if len(icmp) < 8 or len(quoted) < 20 or icmp[0] != ICMP_DEST_UNREACH or icmp[1] != ICMP_PROT_UNREACH:
            return None
        if struct.unpack("!H", quoted[4:6])[0] != ident:
            return None
        return quoted[9]
    icmp, quoted = data[:8], data[8:]
    if len(icmp) < 8 or len(quoted) < 40 or icmp[0] != ICMPV6_PARAMPROB or icmp[1] != ICMPV6_UNK_NEXTHDR:
        return None
    if struct.unpack("!I", icmp[4:8])[0] != IPV6_NEXTHDR_OFFSET:
        return None
    if struct.unpack("!I", quoted[:4])[0] & 0xfffff != ident:
        return None
    return quoted[6]
