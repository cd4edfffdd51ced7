"""Frame builders for the data-path tests (scapy underneath)."""

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw, raw

SERVER4 = "10.77.0.1"
SERVER6 = "fd00:77::1"


def ether(vlans=()):
    """Ethernet with the given VLAN ids as stacked tags (outer first)."""
    frame = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
    for i, vid in enumerate(vlans):
        frame = frame / (Dot1AD(vlan=vid) if i == 0 and len(vlans) > 1 else Dot1Q(vlan=vid))
    return frame


def ip(src, dst=None, **kw):
    if ":" in src:
        return IPv6(src=src, dst=dst or SERVER6, **kw)
    return IP(src=src, dst=dst or SERVER4, **kw)


def tcp(src, dport, flags="S", vlans=(), **ipkw):
    return raw(ether(vlans) / ip(src, **ipkw) / TCP(sport=40000, dport=dport, flags=flags))


def udp(src, dport, vlans=(), payload=b"knock", **ipkw):
    return raw(ether(vlans) / ip(src, **ipkw) / UDP(sport=40000, dport=dport) / Raw(payload))


def icmp_echo(src, vlans=()):
    if ":" in src:
        return raw(ether(vlans) / IPv6(src=src, dst=SERVER6) / ICMPv6EchoRequest())
    return raw(ether(vlans) / IP(src=src, dst=SERVER4) / ICMP(type=8))


def step(src, text, flags="S"):
    """A frame for a knock step written like the config ("tcp:7000", "icmp")."""
    if text == "icmp":
        return icmp_echo(src)
    proto, port = text.split(":")
    return tcp(src, int(port), flags=flags) if proto == "tcp" else udp(src, int(port))


def arp():
    return raw(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.77.0.2", pdst=SERVER4))


__all__ = [
    "ARP", "Dot1AD", "Dot1Q", "Ether", "ICMP", "ICMPv6EchoRequest", "IP", "IPv6", "IPv6ExtHdrDestOpt",
    "IPv6ExtHdrFragment", "IPv6ExtHdrHopByHop", "IPv6ExtHdrRouting", "Raw", "TCP", "UDP", "raw",
    "arp", "ether", "icmp_echo", "ip", "step", "tcp", "udp",
]
