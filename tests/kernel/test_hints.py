"""The arrays that spare the data path its lookups (bpf/xknock_hints.h,
controller/policy/hints.py): port_flags classifies every port alone; the
list bitmaps cover every address of their lists, and
the program reads the very bit the controller computes, so a clear bit
spares the lookup and a set one sends the packet to it."""

import ctypes
import ipaddress
import random

import pytest
from xknock_dev.packets import tcp, udp

from xknock.controller.config import parse_config
from xknock.controller.kernel import layout
from xknock.controller.kernel.layout import Reason
from xknock.controller.policy import hints
from xknock_dev.testrun import XDP_DROP, XDP_PASS


def address_bit(address):
    """(kind, bit) pairs the data path reads for a source."""
    address = ipaddress.ip_address(address)
    if address.version == 4:
        return [(layout.BITS_IPV4, int(address) >> 16)]
    h32, h48 = hints.ipv6_bits(address)
    return [(layout.BITS_IPV6_32, h32), (layout.BITS_IPV6_48, h48)]


def covered(bitmaps, address):
    return any(bitmaps[kind] >> bit & 1 for kind, bit in address_bit(address))


def random_network(rng):
    if rng.random() < 0.5:
        length = rng.randint(0, 32)
        return ipaddress.ip_network((rng.getrandbits(32), length), strict=False)
    length = rng.choice([0, 8, 20, 24, 31, 32, 40, 47, 48, 56, 64, 128])
    return ipaddress.ip_network((rng.getrandbits(128), length), strict=False)


def test_a_list_s_bitmaps_cover_every_address_of_its_entries():
    rng = random.Random(16)
    for _ in range(30):
        networks = [random_network(rng) for _ in range(rng.randint(1, 6))]
        bitmaps = hints.list_bitmaps(networks)
        for network in networks:
            for offset in (0, network.num_addresses - 1, rng.randrange(network.num_addresses)):
                assert covered(bitmaps, network.network_address + offset), (network, offset)


def test_a_list_s_bitmaps_leave_most_other_addresses_clear():
    bitmaps = hints.list_bitmaps([ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:bad::/48")])
    assert not covered(bitmaps, "198.51.100.7")
    assert not covered(bitmaps, "2001:db8:77::7")    # the same /32 as the /48 entry: its own /48 decides
    assert covered(bitmaps, "2001:db8:bad:1::1")


def test_ipv6_prefixes_too_short_to_enumerate_set_the_whole_bitmap():
    bitmaps = hints.list_bitmaps([ipaddress.ip_network("2000::/3")])
    assert bitmaps[layout.BITS_IPV6_32] == hints.ALL
    assert bitmaps[layout.BITS_IPV4] == 0


CONFIG = """
[filter]
answer = "drop"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000"]
open = ["tcp:22"]

[deny]
sources = ["203.0.113.0/24", "2001:db8:b00::/40", "2001:db8:feed:1::/64"]
"""


def set_only(harness, array, words_per_bank, index, bit):
    """The live bank's part of a bitmap array cleared but for one bit."""
    bank = harness.maps.active_bank()
    words = [0] * words_per_bank
    if bit is not None:
        words[index * layout.BITMAP_WORDS + (bit >> 6)] = 1 << (bit & 63)
    hints.write(array, bank, words)


@pytest.mark.parametrize("source", ["203.0.113.5", "2001:db8:b00:ff::1", "2001:db8:feed:1::9"])
def test_the_program_reads_the_bit_the_controller_computes_for_a_source(harness, source):
    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    frame = udp(source, 53)
    assert harness.run(frame) == XDP_DROP
    words = layout.LIST_BITMAPS * layout.BITMAP_WORDS
    for kind, bit in address_bit(source):
        set_only(harness, harness.maps.list_bits, words, layout.LIST_DENY * 3 + kind, bit)
        if harness.run(frame) == XDP_DROP:
            break
    else:
        pytest.fail("no bit the controller computes sends the source to the deny-list")
    set_only(harness, harness.maps.list_bits, words, 0, None)
    assert harness.run(frame) == XDP_PASS   # a clear bit: the trie is not asked
    harness.apply(parse_config(CONFIG, listening=set()))


def live_port_flags(harness, proto, port):
    """The flags the live bank's port_flags holds for (proto, port)."""
    index = ((harness.maps.active_bank() * layout.PORT_CLASSES + hints.PORT_CLASS[proto]) * layout.PORT_FLAG_WORDS
             + (port >> 3))
    return harness.maps.port_flags.lookup(ctypes.c_uint32(index)).value >> ((port & 7) * 8) & 0xFF


def test_port_flags_hold_each_port_s_flags_and_nothing_else(harness):
    harness.apply(parse_config(CONFIG, listening=set()))
    assert live_port_flags(harness, layout.PROTO_TCP, 22) == layout.PORT_GUARDED
    assert live_port_flags(harness, layout.PROTO_TCP, 7000) == layout.PORT_KNOCK
    assert live_port_flags(harness, layout.PROTO_UDP, 8000) == layout.PORT_KNOCK
    # neighbours in the same word, and the same port of another transport
    for proto, port in [(layout.PROTO_TCP, 23), (layout.PROTO_TCP, 7001), (layout.PROTO_UDP, 22),
                        (layout.PROTO_UDP, 7000), (layout.PROTO_ICMP, 22), (layout.PROTO_TCP, 8000)]:
        assert live_port_flags(harness, proto, port) == 0, (proto, port)


def test_the_program_classifies_a_port_by_port_flags_alone(harness):
    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    words = layout.PORT_CLASSES * layout.PORT_FLAG_WORDS
    tcp_22 = hints.PORT_CLASS[layout.PROTO_TCP] * layout.PORT_FLAG_WORDS + (22 >> 3)
    assert harness.run(tcp("198.51.100.7", 22)) == XDP_DROP
    hints.write(harness.maps.port_flags, harness.maps.active_bank(), [0] * words)
    before = harness.counters()[Reason.PASS_UNGUARDED]
    assert harness.run(tcp("198.51.100.7", 22)) == XDP_PASS   # no flags: unguarded, whatever `ports` holds
    assert harness.counters()[Reason.PASS_UNGUARDED] == before + 1
    flagged = [0] * words
    flagged[tcp_22] = layout.PORT_GUARDED << ((23 & 7) * 8)   # guarded 23, in 22's word
    hints.write(harness.maps.port_flags, harness.maps.active_bank(), flagged)
    assert harness.run(tcp("198.51.100.7", 23)) == XDP_DROP   # `ports` has no entry for 23
    assert harness.run(tcp("198.51.100.7", 22)) == XDP_PASS
    harness.apply(parse_config(CONFIG, listening=set()))


def test_a_knock_port_whose_entry_is_missing_is_refused_and_advances_nothing(harness):
    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    words = [0] * (layout.PORT_CLASSES * layout.PORT_FLAG_WORDS)
    words[hints.PORT_CLASS[layout.PROTO_TCP] * layout.PORT_FLAG_WORDS + (7001 >> 3)] = (
        layout.PORT_KNOCK << ((7001 & 7) * 8))
    hints.write(harness.maps.port_flags, harness.maps.active_bank(), words)
    before = harness.counters()
    assert harness.run(tcp("198.51.100.7", 7001)) == XDP_DROP
    after = harness.counters()
    assert after[Reason.DROP_KNOCK] == before[Reason.DROP_KNOCK] + 1
    assert all(after[r] == before[r] for r in Reason if r.name.startswith("KNOCK_")), "a knock was judged"
    harness.apply(parse_config(CONFIG, listening=set()))


def test_a_reload_clears_the_old_bank_s_bitmaps(harness):
    harness.apply(parse_config(CONFIG, listening=set()))
    old = harness.maps.active_bank()
    harness.apply(parse_config(CONFIG, listening=set()))
    n = layout.LIST_BITMAPS * layout.BITMAP_WORDS
    assert all(harness.maps.list_bits.lookup(ctypes.c_uint32(old * n + i)).value == 0 for i in range(n))
    n = layout.PORT_CLASSES * layout.PORT_FLAG_WORDS
    assert all(harness.maps.port_flags.lookup(ctypes.c_uint32(old * n + i)).value == 0 for i in range(n))
