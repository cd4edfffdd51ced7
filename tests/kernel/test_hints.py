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


# -- granted: a byte per source slot in front of the grants hash ----------------------

GRANTED_SOURCES = ["198.51.100.21", "2001:db8:77::21", "0.0.0.1", "2001:db8:77:ffff::"]


def granted_view(harness):
    from xknock.controller.kernel.granted import GrantedView

    return GrantedView(harness.maps.granted)


def raw(source):
    from xknock.controller.kernel.maps import to_addr

    return bytes(to_addr(ipaddress.ip_address(source)).b)


def test_a_grant_written_by_the_controller_sets_its_source_s_byte_in_both_halves(harness):
    from xknock.controller.state import grants

    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    grants.rebuild_granted(harness.maps)
    with granted_view(harness) as view:
        for source in GRANTED_SOURCES:
            grants.write_grants(harness.maps, source, [("tcp", 22)], 30 * 10**9, 30 * 10**9, now=harness.now_ns)
            assert view.is_set(0, raw(source)) and view.is_set(1, raw(source)), source
            assert harness.run(tcp(source, 22)) == XDP_PASS, source


@pytest.mark.parametrize("source", GRANTED_SOURCES)
def test_the_program_reads_the_byte_the_controller_computes_for_a_source(harness, source):
    """The live half cleared but for the source's byte (kernel/granted.py's
    slot): its grant passes. Cleared: dropped, though the grant is there.
    Not built (selector 0): the grants hash decides again."""
    from xknock.controller.state import grants

    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    grants.write_grants(harness.maps, source, [("tcp", 22)], 30 * 10**9, 30 * 10**9, now=harness.now_ns)
    try:
        with granted_view(harness) as view:
            live = view.live_half
            view.clear(live)
            view.mark([raw(source)], halves=(live,))
            assert view.slots_set(live) == 1
            assert harness.run(tcp(source, 22)) == XDP_PASS
            view.clear(live)
            before = harness.counters()[Reason.DROP_NO_GRANT]
            assert harness.run(tcp(source, 22)) == XDP_DROP   # the byte alone decided
            assert harness.counters()[Reason.DROP_NO_GRANT] == before + 1
            view.set_not_built()
            assert harness.run(tcp(source, 22)) == XDP_PASS
    finally:
        grants.rebuild_granted(harness.maps)


def test_a_completed_knock_sets_its_source_s_byte_in_both_halves(harness):
    from xknock_dev.packets import step

    from xknock.controller.state import grants

    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    source = "198.51.100.33"
    with granted_view(harness) as view:
        for half in (0, 1):
            view.clear(half)
        view.set_live(0)
        assert harness.run(tcp(source, 22)) == XDP_DROP
        for knock in ("tcp:7000", "udp:8000"):
            harness.run(step(source, knock))
        assert view.is_set(0, raw(source)) and view.is_set(1, raw(source))
        assert view.slots_set(0) == view.slots_set(1) == 1
        assert harness.run(tcp(source, 22)) == XDP_PASS
    grants.rebuild_granted(harness.maps)


def test_a_rebuild_keeps_every_grant_s_byte_and_clears_the_rest(harness):
    from xknock.controller.state import grants

    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    kept, gone = "198.51.100.41", "2001:db8:77::42"
    for source in (kept, gone):
        grants.write_grants(harness.maps, source, [("tcp", 22)], 10**9, 10**9, now=harness.now_ns)
    grants.write_grants(harness.maps, kept, [("tcp", 22)], 60 * 10**9, 60 * 10**9, now=harness.now_ns)
    with granted_view(harness) as view:
        was = view.live_half
        harness.advance(5)
        assert grants.expire_grants(harness.maps, now=harness.now_ns) == 1   # the sweep rebuilds after removing
        assert view.live_half == 1 - was
        assert view.is_set(view.live_half, raw(kept)) and not view.is_set(view.live_half, raw(gone))
        assert view.slots_set(view.live_half) == 1
        assert harness.run(tcp(kept, 22)) == XDP_PASS
        assert harness.run(tcp(gone, 22)) == XDP_DROP
        assert grants.expire_grants(harness.maps, now=harness.now_ns) == 0
        assert view.live_half == 1 - was   # nothing removed: nothing rebuilt


def test_a_grant_the_data_path_writes_during_a_rebuild_keeps_its_byte(harness):
    """The two orders a knock's grant and a rebuild's clear can take: the
    clear after the knock's byte (the scan finds the grant), or before it
    (the byte stays)."""
    from xknock_dev.packets import step

    from xknock.controller.state import grants

    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    early, late = "198.51.100.51", "198.51.100.52"
    with granted_view(harness) as view:
        idle = 1 - view.live_half
        for knock in ("tcp:7000", "udp:8000"):
            harness.run(step(early, knock))
        view.clear(idle)                          # the rebuild's clear, after early's byte
        harness.run(step(late, "tcp:7000"))
        harness.run(step(late, "udp:8000"))       # late's grant and byte, after the clear
        view.mark({raw(str(src)) for src, _, _ in harness.grants()}, halves=(idle,))   # the scan
        view.set_live(idle)
        for source in (early, late):
            assert view.is_set(idle, raw(source))
            assert harness.run(tcp(source, 22)) == XDP_PASS, source
    grants.rebuild_granted(harness.maps)


def test_grants_written_in_a_batch_set_their_sources_bytes(harness):
    """write_batch: what the fleet (controller/cluster) and a resync write."""
    from xknock.controller.kernel.maps import to_addr
    from xknock.controller.state import grants

    harness.reset_state()
    harness.apply(parse_config(CONFIG, listening=set()))
    sources = [f"198.51.100.{60 + i}" for i in range(5)] + ["2001:db8:77::60"]
    entries = [(layout.GrantKey(src=to_addr(ipaddress.ip_address(s)), proto=layout.PROTO_TCP, port=22),
                layout.Grant(window_end_ns=harness.now_ns + 10**10, idle_timeout_ns=10**10, last_seen_ns=harness.now_ns))
               for s in sources]
    written, refused = grants.write_batch(harness.maps, entries)
    assert len(written) == len(sources) and not refused
    with granted_view(harness) as view:
        for source in sources:
            assert view.is_set(0, raw(source)) and view.is_set(1, raw(source)), source
            assert harness.run(tcp(source, 22)) == XDP_PASS, source
