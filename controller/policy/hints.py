"""The arrays that spare the data path its lookups (bpf/xknock_hints.h),
computed from one bank's policy and written with it.

port_flags: per bank and transport (tcp, udp, icmp), the PORT_* flags of
every port's entry in `ports`, a byte each (0: none), eight to a word. list_bits: per bank and list (allow, deny), the IPv4
/16s, the hashes of the IPv6 /32s (entries shorter than /48) and of the IPv6
/48s (the others) that an entry covers. A set bit
only tells the data path to look, so a bitmap may cover more than its list
(a prefix shorter than the bits, too many addresses to enumerate: all set),
never less.
"""

import ctypes
import ipaddress

from ..kernel import bpfsys, layout
from ..kernel.firsts import mix32

BITS = layout.BITMAP_WORDS * 64
ALL = (1 << BITS) - 1
PORT_CLASS = {layout.PROTO_TCP: 0, layout.PROTO_UDP: 1, layout.PROTO_ICMP: 2}
# IPv6 prefixes shorter than /32 set the hash of every /32 they hold, up to
# this many per list; past it the whole bitmap is set (the trie decides).
IPV6_ENUMERATION = 1 << 16


def port_flag_words(ports):
    """The words of one bank's part of port_flags, of ports: (proto, port) -> layout.PortVal."""
    words = [0] * (layout.PORT_CLASSES * layout.PORT_FLAG_WORDS)
    for (proto, port), val in ports.items():
        if val.flags & ~0xFF:
            raise ValueError(f"port flags {val.flags:#x} do not fit port_flags' byte")
        words[PORT_CLASS[proto] * layout.PORT_FLAG_WORDS + (port >> 3)] |= val.flags << ((port & 7) * 8)
    return words


def _word(address_bytes, start):
    """A 32-bit word of an address as the data path loads it (host order)."""
    return int.from_bytes(address_bytes[start:start + 4], "little")


def ipv6_bits(address):
    """(bit of its /32, bit of its /48) of an IPv6 address, as xknock_hints.h hashes them."""
    raw = ipaddress.IPv6Address(address).packed
    h32 = mix32(_word(raw, 0))
    h48 = mix32(h32 ^ (_word(raw, 4) & 0xFFFF))
    return h32 >> 16, h48 >> 16


def list_bitmaps(networks):
    """[IPv4 bitmap, IPv6 /32 bitmap, IPv6 /48 bitmap] of the networks of one list."""
    v4 = v6_32 = v6_48 = 0
    v4_units = set()   # the /16s of entries of /16 and longer, set at once: one OR per entry is slow
    budget = IPV6_ENUMERATION
    for network in networks:
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            network = ipaddress.ip_network(network)   # ip_network() of a network is slow: not called on those
        top = int(network.network_address)
        if network.version == 4 and network.prefixlen >= 16:
            v4_units.add(top >> 16)
        elif network.version == 4:
            v4 |= ((1 << (1 << (16 - network.prefixlen))) - 1) << (top >> 16)
        elif network.prefixlen >= 48:
            v6_48 |= 1 << ipv6_bits(network.network_address)[1]
        else:
            count = 1 << (32 - min(network.prefixlen, 32))
            if count > budget:
                v6_32 = ALL
                continue
            budget -= count
            for first32 in range(top >> 96, (top >> 96) + count):
                v6_32 |= 1 << ipv6_bits(first32 << 96)[0]
    units = bytearray(BITS // 8)
    for unit in v4_units:
        units[unit >> 3] |= 1 << (unit & 7)
    return [v4 | int.from_bytes(units, "little"), v6_32, v6_48]


def _words(bitmaps):
    words = []
    for bitmap in bitmaps:
        raw = bitmap.to_bytes(BITS // 8, "little")
        words.extend(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))
    return words


def bank_words(policy_ports, allow, deny):
    """(port_flags words, list_bits words) of one bank, in the maps' order."""
    lists = [*list_bitmaps(allow), *list_bitmaps(deny)]   # LIST_ALLOW * 3 + kind, LIST_DENY * 3 + kind
    return port_flag_words(policy_ports), _words(lists)


def write(array, bank, words):
    """The bank's part of a hint array, all of it in one batch (zeros clear)."""
    n = len(words)
    keys = (ctypes.c_uint32 * n)(*range(bank * n, (bank + 1) * n))
    bpfsys.map_update_batch(array.fd, keys, (ctypes.c_uint64 * n)(*words), n)


def clear(maps, bank):
    write(maps.port_flags, bank, [0] * (layout.PORT_CLASSES * layout.PORT_FLAG_WORDS))
    write(maps.list_bits, bank, [0] * (layout.LIST_BITMAPS * layout.BITMAP_WORDS))
