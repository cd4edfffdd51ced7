"""The XDP program's verdicts, run in the kernel with BPF_PROG_TEST_RUN.

Every case loads nothing new: one program (test clock) serves the session,
and each case starts from the example policy with no knocks, grants or
counters left behind (the `xk` fixture)."""

import pytest
from xknock_dev.packets import (
    ICMP, IP, TCP, UDP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Raw,
    arp, ether, icmp_echo, raw, step, tcp, udp,
)

from xknock.controller.errors import XknockError
from xknock.controller.kernel.layout import Reason
from xknock.controller.kernel.maps import from_addr
from xknock_dev.testrun import XDP_DROP, XDP_PASS
from monitor_mode import assert_monitor_passes_what_enforce_refuses

SSH = ["tcp:7000", "udp:8000", "tcp:9000"]
WEB = ["udp:8000", "icmp", "tcp:7001"]
STRANGER4 = "198.51.100.7"
STRANGER6 = "2001:db8:77::7"
ALLOWED4 = "192.0.2.10"
ALLOWED6 = "2001:db8:a::99"
DENIED4 = "203.0.113.5"
DENIED6 = "2001:db8:bad::5"


def knock(xk, src, steps, gap=0.1):
    verdicts = []
    for s in steps:
        verdicts.append(xk.run(step(src, s)))
        xk.advance(gap)
    return verdicts


def counted(xk, reason):
    return xk.counters()[reason]


# (description, frame, verdict, reason counted)
STATELESS_CASES = [
    ("ARP passes", arp(), XDP_PASS, Reason.PASS_NOT_IP),
    ("unguarded TCP passes", tcp(STRANGER4, 80), XDP_PASS, Reason.PASS_UNGUARDED),
    ("unguarded UDP passes over IPv6", udp(STRANGER6, 53), XDP_PASS, Reason.PASS_UNGUARDED),
    ("guarded SYN from a stranger drops", tcp(STRANGER4, 22), XDP_DROP, Reason.DROP_NO_GRANT),
    ("guarded ACK from a stranger drops", tcp(STRANGER4, 22, flags="A"), XDP_DROP, Reason.DROP_NO_GRANT),
    ("guarded SYN over IPv6 drops", tcp(STRANGER6, 22), XDP_DROP, Reason.DROP_NO_GRANT),
    ("guarded UDP drops", udp(STRANGER4, 443), XDP_DROP, Reason.DROP_NO_GRANT),
    ("guarded SYN under one VLAN tag drops", tcp(STRANGER4, 22, vlans=(10,)), XDP_DROP, Reason.DROP_NO_GRANT),
    ("guarded SYN under QinQ drops", tcp(STRANGER6, 22, vlans=(10, 20)), XDP_DROP, Reason.DROP_NO_GRANT),
    ("unguarded under QinQ passes", tcp(STRANGER4, 80, vlans=(10, 20)), XDP_PASS, Reason.PASS_UNGUARDED),
    ("three VLAN tags are malformed", tcp(STRANGER4, 80, vlans=(1, 2, 3)), XDP_DROP, Reason.DROP_MALFORMED),
    ("allow-listed IPv4 source reaches the guarded port", tcp(ALLOWED4, 22), XDP_PASS, Reason.PASS_ALLOWLIST),
    ("allow-listed IPv6 prefix reaches the guarded port", tcp(ALLOWED6, 22), XDP_PASS, Reason.PASS_ALLOWLIST),
    ("deny-listed source drops even unguarded", tcp(DENIED4, 80), XDP_DROP, Reason.DROP_DENYLIST),
    ("deny-listed IPv6 prefix drops", udp(DENIED6, 53), XDP_DROP, Reason.DROP_DENYLIST),
    ("deny-listed source drops on non-IP-port protocols", raw(ether() / IP(src=DENIED4, dst="10.77.0.1", proto=47)),
     XDP_DROP, Reason.DROP_DENYLIST),
    ("knock packets drop", step(STRANGER4, "tcp:7000"), XDP_DROP, Reason.DROP_KNOCK),
    ("ICMP echo is a knock: recorded, the host answers it", icmp_echo(STRANGER4), XDP_PASS, Reason.PASS_ECHO),
    ("ICMPv6 echo is a knock: recorded, the host answers it", icmp_echo(STRANGER6), XDP_PASS, Reason.PASS_ECHO),
    ("IPv6 from an IPv4-mapped source is malformed", tcp("::ffff:198.51.100.7", 80), XDP_DROP, Reason.DROP_MALFORMED),
    ("IPv6 from a multicast source is malformed", udp("ff02::1", 53), XDP_DROP, Reason.DROP_MALFORMED),
    ("ICMP echo reply is not a knock", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1") / ICMP(type=0)),
     XDP_PASS, Reason.PASS_OTHER_L4),
    ("GRE passes: no ports", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", proto=47) / Raw(b"x" * 8)),
     XDP_PASS, Reason.PASS_OTHER_L4),
]


@pytest.mark.parametrize("description,frame,verdict,reason", STATELESS_CASES, ids=[c[0] for c in STATELESS_CASES])
def test_stateless_verdicts(xk, description, frame, verdict, reason):
    assert xk.run(raw(frame) if not isinstance(frame, bytes) else frame) == verdict
    assert counted(xk, reason) == 1


@pytest.mark.parametrize("src", [STRANGER4, STRANGER6])
def test_knock_opens_guarded_port_for_the_knocker_only(xk, src):
    other = "198.51.100.8" if ":" not in src else "2001:db8:77::8"
    assert xk.run(tcp(src, 22)) == XDP_DROP
    assert knock(xk, src, SSH) == [XDP_DROP] * 3
    assert xk.run(tcp(src, 22)) == XDP_PASS
    assert xk.run(tcp(other, 22)) == XDP_DROP
    assert xk.run(tcp(src, 443)) == XDP_DROP   # another sequence's port stays shut
    assert counted(xk, Reason.KNOCK_COMPLETED) == 1
    assert counted(xk, Reason.GRANT_ISSUED) == 1
    [(addr, proto, port)] = xk.grants()
    assert (str(addr), proto, port) == (src, "tcp", 22)


def test_completion_opens_every_port_of_the_sequence(xk):
    knock(xk, STRANGER4, WEB)
    assert xk.run(tcp(STRANGER4, 443)) == XDP_PASS
    assert xk.run(udp(STRANGER4, 443)) == XDP_PASS
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(xk, Reason.GRANT_ISSUED) == 2


def test_wrong_knock_resets_without_opening(xk):
    # tcp:7000 after udp:8000 is wrong (a reset that starts anew at step 1),
    # then tcp:9000 is wrong again where udp:8000 was expected.
    knock(xk, STRANGER4, ["tcp:7000", "udp:8000", "tcp:7000", "tcp:9000"])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(xk, Reason.KNOCK_RESET) == 2
    assert xk.grants() == {}


def test_wrong_knock_that_is_a_first_step_starts_anew(xk):
    knock(xk, STRANGER4, ["tcp:7000", "tcp:9000", "tcp:7000", "udp:8000", "tcp:9000"])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS


def test_late_step_resets(xk):
    knock(xk, STRANGER4, SSH[:2])
    xk.advance(5.01)
    knock(xk, STRANGER4, SSH[2:])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(xk, Reason.KNOCK_TIMED_OUT) == 1


def test_step_exactly_at_timeout_still_counts(xk):
    knock(xk, STRANGER4, SSH[:2], gap=0)
    xk.advance(5.0)
    knock(xk, STRANGER4, SSH[2:])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS


def test_repeated_step_is_ignored(xk):
    knock(xk, STRANGER4, ["tcp:7000", "tcp:7000", "udp:8000", "udp:8000", "tcp:9000", "tcp:9000"])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS
    # udp:8000 is also web's first step: its repeat counts there too.
    assert counted(xk, Reason.KNOCK_REPEATED) == 4
    assert counted(xk, Reason.KNOCK_COMPLETED) == 1


def test_each_knock_sent_three_times_opens_and_fails_nothing(xk):
    """`xknock knock --repeat 3`: every knock three times, 10 ms apart. The
    copies are repeats, ignored; none resets, times out or counts a failure."""
    for s in SSH:
        knock(xk, STRANGER4, [s] * 3, gap=0.01)
        xk.advance(0.1)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS
    # two copies per step, and udp:8000's two again as web's first step
    assert counted(xk, Reason.KNOCK_REPEATED) == 8
    assert counted(xk, Reason.KNOCK_COMPLETED) == 1
    assert counted(xk, Reason.KNOCK_RESET) == counted(xk, Reason.KNOCK_TIMED_OUT) == 0


def test_tcp_knock_counts_syns_only(xk):
    for flags in ("A", "SA", "R", "F"):
        xk.run(tcp(STRANGER4, 7000, flags=flags))
    knock(xk, STRANGER4, SSH[1:])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    # four non-SYNs, then udp:8000 and tcp:9000 with nothing in progress for ssh
    assert counted(xk, Reason.KNOCK_IGNORED) == 6
    assert counted(xk, Reason.KNOCK_ADVANCED) == 1   # udp:8000 is web's first step


def test_sequences_sharing_a_port_progress_independently(xk):
    # udp:8000 is step 1 of ssh and step 0 of web: one packet serves both.
    knock(xk, STRANGER4, ["tcp:7000", "udp:8000", "icmp", "tcp:7001"])
    assert xk.run(tcp(STRANGER4, 443)) == XDP_PASS
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP


def test_sources_progress_independently(xk):
    a, b, c = "198.51.100.1", "198.51.100.2", "2001:db8:77::3"
    xk.run(step(a, "tcp:7000"))
    xk.run(step(b, "tcp:7000"))
    xk.run(step(b, "udp:8000"))
    xk.run(step(c, "tcp:7000"))
    xk.run(step(a, "tcp:9000"))            # a: wrong, resets only a
    xk.run(step(b, "tcp:9000"))            # b: completes
    xk.run(step(c, "udp:8000"))
    xk.run(step(c, "tcp:9000"))            # c: completes
    assert [xk.run(tcp(s, 22)) for s in (a, b, c)] == [XDP_DROP, XDP_PASS, XDP_PASS]


def test_window_closes_for_new_connections_but_idle_traffic_survives(xk):
    knock(xk, STRANGER4, SSH)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS
    xk.advance(31)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP             # new connection: window over
    assert xk.run(tcp(STRANGER4, 22, flags="A")) == XDP_PASS  # established: idle clock alive
    for _ in range(20):                                        # traffic keeps it alive past idle_timeout
        xk.advance(60)
        assert xk.run(tcp(STRANGER4, 22, flags="PA")) == XDP_PASS
    xk.advance(15 * 60 + 2)
    assert xk.run(tcp(STRANGER4, 22, flags="A")) == XDP_DROP  # idle: grant dead, removed
    assert counted(xk, Reason.GRANT_EXPIRED) == 1
    assert xk.grants() == {}


def test_idle_refresh_is_coarse(xk):
    knock(xk, STRANGER4, SSH)
    [grant] = xk.grants().values()
    first_seen = grant.last_seen_ns
    xk.advance(0.5)
    xk.run(tcp(STRANGER4, 22, flags="A"))
    assert list(xk.grants().values())[0].last_seen_ns == first_seen   # within a second: no write
    xk.advance(1.0)
    xk.run(tcp(STRANGER4, 22, flags="A"))
    assert list(xk.grants().values())[0].last_seen_ns == xk.now_ns


def test_udp_grant_lives_on_its_idle_clock(xk):
    knock(xk, STRANGER4, WEB)
    xk.advance(30)   # window (10s) over, idle (1m) alive
    assert xk.run(udp(STRANGER4, 443)) == XDP_PASS
    xk.advance(61)
    assert xk.run(udp(STRANGER4, 443)) == XDP_DROP


def test_revoke_ends_both_clocks(xk):
    knock(xk, STRANGER4, SSH)
    for key in list(xk.maps.grants.keys()):
        xk.maps.grants.delete(key)
    assert xk.run(tcp(STRANGER4, 22, flags="A")) == XDP_DROP
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP


def test_icmp_knocks_over_ipv6(xk):
    knock(xk, STRANGER6, WEB)
    assert xk.run(tcp(STRANGER6, 443)) == XDP_PASS


def test_deny_list_beats_a_grant_and_knocks(xk):
    knock(xk, DENIED4, SSH)
    assert counted(xk, Reason.KNOCK_ADVANCED) == 0
    assert xk.run(tcp(DENIED4, 22)) == XDP_DROP


@pytest.mark.parametrize("frame,reason", [
    (tcp(STRANGER4, 22), Reason.DROP_NO_GRANT),
    (step(STRANGER4, "tcp:7000"), Reason.DROP_KNOCK),
    (tcp(DENIED4, 80), Reason.DROP_DENYLIST),
], ids=["guarded", "knock", "denied"])
def test_monitor_mode_counts_but_drops_nothing(xk, example_config, frame, reason):
    assert_monitor_passes_what_enforce_refuses(xk, example_config, frame, reason)


def test_knocks_progress_in_monitor_mode(xk, example_config):
    import dataclasses

    xk.apply(dataclasses.replace(example_config, mode="monitor"))
    assert xk.run(step(STRANGER4, "tcp:7000")) == XDP_PASS
    assert xk.counters()[Reason.KNOCK_ADVANCED] == 1


def test_grants_survive_a_reload_and_removed_sequences_stop_progress(xk, example_config):
    import dataclasses

    knock(xk, STRANGER4, SSH)
    knock(xk, "198.51.100.9", WEB[:2])
    web_only = dataclasses.replace(example_config, sequences=example_config.sequences[1:])
    xk.apply(web_only)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS   # tcp:22 no longer guarded at all
    knock(xk, "198.51.100.9", WEB[2:])               # web unchanged: progress kept
    assert xk.run(tcp("198.51.100.9", 443)) == XDP_PASS
    xk.apply(example_config)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS   # guarded again, the grant is still there


# Malformed and tricky frames aimed at the guarded port 22: (description, frame, verdict, reason)
def _frag4(offset, mf, payload, proto=6):
    return raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", proto=proto, frag=offset, flags="MF" if mf else 0)
               / Raw(payload))


def _v6(*ext, l4=None):
    pkt = ether() / IPv6(src=STRANGER6, dst="fd00:77::1")
    for hdr in ext:
        pkt = pkt / hdr
    return raw(pkt / (l4 if l4 is not None else TCP(dport=22, flags="S")))


SYN22 = bytes(TCP(sport=40000, dport=22, flags="S"))
SYN80 = bytes(TCP(sport=40000, dport=80, flags="S"))

MALFORMED_CASES = [
    # (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header; so do NICs.)
    ("Ethernet header alone, IPv4 type", tcp(STRANGER4, 22)[:14], XDP_DROP, Reason.DROP_MALFORMED),
    ("truncated IPv4 header", tcp(STRANGER4, 22)[:14 + 12], XDP_DROP, Reason.DROP_MALFORMED),
    ("IPv4 ihl below 5", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", ihl=4) / TCP(dport=22)),
     XDP_DROP, Reason.DROP_MALFORMED),
    ("IPv4 version not 4", tcp(STRANGER4, 22)[:14] + bytes([0x65]) + tcp(STRANGER4, 22)[15:], XDP_DROP,
     Reason.DROP_MALFORMED),
    ("IPv4 total length below the header", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", len=10) / TCP(dport=22)),
     XDP_DROP, Reason.DROP_MALFORMED),
    ("IPv4 options cut short", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", ihl=15) / TCP(dport=22))[:14 + 40],
     XDP_DROP, Reason.DROP_MALFORMED),
    ("IPv4 with options, guarded", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", options=b"\x01" * 8)
                                       / TCP(dport=22, flags="S")), XDP_DROP, Reason.DROP_NO_GRANT),
    ("IPv4 with options, unguarded", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", options=b"\x01" * 8)
                                         / TCP(dport=80, flags="S")), XDP_PASS, Reason.PASS_UNGUARDED),
    ("TCP header cut short", tcp(STRANGER4, 22)[:14 + 20 + 10], XDP_DROP, Reason.DROP_MALFORMED),
    ("TCP header past the IP total length", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1", len=30)
                                                / TCP(dport=80)), XDP_DROP, Reason.DROP_MALFORMED),
    ("UDP header cut short", udp(STRANGER4, 443)[:14 + 20 + 4], XDP_DROP, Reason.DROP_MALFORMED),
    ("tiny first fragment to the guarded port", _frag4(0, True, SYN22[:8]), XDP_DROP, Reason.DROP_FRAGMENT),
    ("tiny first fragment to any port", _frag4(0, True, SYN80[:16]), XDP_DROP, Reason.DROP_FRAGMENT),
    ("first fragment with the whole header is judged", _frag4(0, True, SYN22), XDP_DROP, Reason.DROP_NO_GRANT),
    ("first fragment, unguarded, passes", _frag4(0, True, SYN80), XDP_PASS, Reason.PASS_UNGUARDED),
    ("later fragment passes: its first fragment decides", _frag4(100, False, b"x" * 64), XDP_PASS,
     Reason.PASS_FRAGMENT),
    ("later fragment overlapping the TCP header (RFC 1858)", _frag4(1, False, b"\x00" * 16), XDP_DROP,
     Reason.DROP_FRAGMENT),
    ("IPv6 hop-by-hop, dest-opts, routing to the guarded port",
     _v6(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting()), XDP_DROP, Reason.DROP_NO_GRANT),
    ("IPv6 ext headers to an unguarded port", _v6(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                                                  l4=TCP(dport=80, flags="S")), XDP_PASS, Reason.PASS_UNGUARDED),
    ("IPv6 atomic fragment to the guarded port", _v6(IPv6ExtHdrFragment(offset=0, m=0)), XDP_DROP,
     Reason.DROP_NO_GRANT),
    ("IPv6 first fragment without the TCP header", _v6(IPv6ExtHdrFragment(offset=0, m=1, nh=6), l4=Raw(SYN22[:8])),
     XDP_DROP, Reason.DROP_FRAGMENT),
    ("IPv6 later fragment passes", _v6(IPv6ExtHdrFragment(offset=100, m=0, nh=6), l4=Raw(b"x" * 40)), XDP_PASS,
     Reason.PASS_FRAGMENT),
    ("IPv6 later fragment overlapping the header", _v6(IPv6ExtHdrFragment(offset=1, m=0, nh=6), l4=Raw(b"x" * 40)),
     XDP_DROP, Reason.DROP_FRAGMENT),
    ("IPv6 chain longer than we walk", _v6(*[IPv6ExtHdrDestOpt() for _ in range(9)]), XDP_DROP,
     Reason.DROP_MALFORMED),
    ("IPv6 chain of eight, guarded", _v6(*[IPv6ExtHdrDestOpt() for _ in range(8)]), XDP_DROP,
     Reason.DROP_NO_GRANT),
    ("IPv6 ext header cut short", _v6(IPv6ExtHdrDestOpt(options=[]))[:14 + 40 + 4], XDP_DROP,
     Reason.DROP_MALFORMED),
    ("IPv6 payload length shorter than the ext headers",
     raw(ether() / IPv6(src=STRANGER6, dst="fd00:77::1", plen=4) / IPv6ExtHdrDestOpt() / TCP(dport=22)),
     XDP_DROP, Reason.DROP_MALFORMED),
    ("ICMPv4 inside IPv6", raw(ether() / IPv6(src=STRANGER6, dst="fd00:77::1", nh=1) / Raw(b"\x08" + b"\x00" * 7)),
     XDP_DROP, Reason.DROP_MALFORMED),
]


@pytest.mark.parametrize("description,frame,verdict,reason", MALFORMED_CASES, ids=[c[0] for c in MALFORMED_CASES])
def test_malformed_and_fragmented(xk, description, frame, verdict, reason):
    assert xk.run(frame) == verdict
    assert counted(xk, reason) == 1


def _stats(xk, name):
    from xknock.controller.kernel.maps import live_sequences

    [seq] = [s for s in live_sequences(xk.maps).values() if s.name.decode() == name]
    return xk.maps.sequence_stats(seq.uid)


def test_outcomes_are_counted_per_sequence(xk):
    knock(xk, STRANGER4, SSH)                                   # ssh: 2 advanced, 1 completed; web: 1 advanced
    knock(xk, "198.51.100.9", ["tcp:7000", "tcp:9000"])         # ssh: 1 advanced, 1 reset
    knock(xk, "198.51.100.10", ["tcp:7000"])
    xk.advance(6)
    knock(xk, "198.51.100.10", ["udp:8000"])                    # ssh: timed out; web: advanced
    ssh, web = _stats(xk, "ssh"), _stats(xk, "web")
    assert (ssh.advanced, ssh.completed, ssh.reset, ssh.timed_out) == (4, 1, 1, 1)
    assert (web.advanced, web.completed, web.reset, web.timed_out) == (2, 0, 0, 0)


def test_sequence_stats_survive_a_reload_that_keeps_the_sequence(xk, example_config):
    import dataclasses

    knock(xk, STRANGER4, SSH)
    xk.apply(dataclasses.replace(example_config, mode="monitor"))
    assert _stats(xk, "ssh").completed == 1
    ssh_only = dataclasses.replace(example_config, sequences=example_config.sequences[:1])
    xk.apply(ssh_only)
    assert len(list(xk.maps.seqstats.keys())) == 1   # web's counters went with it


def test_created_grants_are_told_from_refreshed_ones(xk):
    from xknock.controller.state import grants

    knock(xk, STRANGER4, SSH)
    xk.advance(6)
    knock(xk, STRANGER4, SSH)                        # the same grant, refreshed
    counters = xk.counters()
    assert counters[Reason.GRANT_ISSUED] == 2
    assert counters[Reason.GRANT_CREATED] == 1
    assert grants.revoke(xk.maps, STRANGER4) == 1
    knock(xk, STRANGER4, ["tcp:7000"])
    xk.advance(6)
    knock(xk, STRANGER4, SSH)
    assert grants.expire_grants(xk.maps, now=xk.now_ns + 16 * 60 * 10**9) == 1
    counters = xk.counters()
    assert counters[Reason.GRANT_CREATED] == 2
    assert counters[Reason.GRANT_REMOVED] == 2       # one revoked, one swept


def _with_ban(config, **kw):
    import dataclasses

    from xknock.controller.config import Ban

    ban = dict(after=3, within_ns=60 * 10**9, for_ns=600 * 10**9, scope="all") | kw
    return dataclasses.replace(config, ban=Ban(**ban))


def _fail(xk, src, times):
    for _ in range(times):   # a first step then a wrong one: one reset each
        knock(xk, src, ["tcp:7000", "tcp:9000"])


def test_failed_knocks_ban_a_source_everywhere(xk, example_config):
    xk.apply(_with_ban(example_config))
    _fail(xk, STRANGER4, 2)
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS           # two failures: not yet
    _fail(xk, STRANGER4, 1)
    assert counted(xk, Reason.BAN_ISSUED) == 1
    assert xk.run(tcp(STRANGER4, 80)) == XDP_DROP           # banned on every port
    assert counted(xk, Reason.DROP_BANNED) == 1
    knock(xk, STRANGER4, SSH)                                # and a right knock opens nothing
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert xk.run(tcp("198.51.100.8", 80)) == XDP_PASS      # others are not affected


def test_a_ban_ends_on_time_and_counting_starts_afresh(xk, example_config):
    xk.apply(_with_ban(example_config, for_ns=60 * 10**9))
    _fail(xk, STRANGER6, 3)
    assert xk.run(tcp(STRANGER6, 80)) == XDP_DROP
    xk.advance(61)
    assert xk.run(tcp(STRANGER6, 80)) == XDP_PASS
    assert counted(xk, Reason.BAN_EXPIRED) == 1
    _fail(xk, STRANGER6, 2)
    assert xk.run(tcp(STRANGER6, 80)) == XDP_PASS


def test_failures_outside_the_window_do_not_add_up(xk, example_config):
    xk.apply(_with_ban(example_config, within_ns=10 * 10**9))
    for _ in range(5):
        _fail(xk, STRANGER4, 1)
        xk.advance(11)
    assert counted(xk, Reason.BAN_ISSUED) == 0


def test_time_outs_count_as_failures(xk, example_config):
    xk.apply(_with_ban(example_config, after=2))
    for _ in range(2):
        knock(xk, STRANGER4, ["tcp:7000"])
        xk.advance(6)
        knock(xk, STRANGER4, ["udp:8000"])   # late: timed out
    # ssh times out twice; the second udp:8000 also ends web's progress from the first
    assert counted(xk, Reason.KNOCK_TIMED_OUT) == 3
    assert counted(xk, Reason.KNOCK_RESET) == 0
    assert xk.run(tcp(STRANGER4, 80)) == XDP_DROP


def test_knock_scope_bans_only_knock_and_guarded_ports(xk, example_config):
    xk.apply(_with_ban(example_config, scope="knock"))
    _fail(xk, STRANGER4, 3)
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS
    knock(xk, STRANGER4, SSH)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    # only the three failures' first steps advanced: the banned knocks never reached the state machine
    assert counted(xk, Reason.KNOCK_ADVANCED) == 3


def test_allow_listed_sources_are_never_banned(xk, example_config):
    xk.apply(_with_ban(example_config, after=1))
    _fail(xk, ALLOWED4, 3)
    assert counted(xk, Reason.BAN_ISSUED) == 0
    assert counted(xk, Reason.BAN_SPARED) == 3
    assert xk.run(tcp(ALLOWED4, 80)) == XDP_PASS
    assert xk.run(tcp(ALLOWED4, 22)) == XDP_PASS


def test_unban_lifts_the_ban_and_the_failures(xk, example_config):
    from xknock.controller.state import bans

    xk.apply(_with_ban(example_config))
    _fail(xk, STRANGER4, 3)
    [banned] = bans.list_bans(xk.maps, now=xk.now_ns)
    assert str(banned.source) == STRANGER4
    assert bans.unban(xk.maps, STRANGER4)
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS
    assert not bans.unban(xk.maps, STRANGER4)
    assert counted(xk, Reason.BAN_REMOVED) == 1


def test_an_operator_ban_drops_until_it_ends_and_counts_once(xk, example_config):
    from xknock.controller.state import bans

    xk.apply(_with_ban(example_config))
    assert not bans.ban(xk.maps, STRANGER4, 60 * 10**9, now=xk.now_ns)
    assert xk.run(tcp(STRANGER4, 80)) == XDP_DROP
    assert bans.ban(xk.maps, STRANGER4, 5 * 10**9, now=xk.now_ns)      # shortened: the same ban
    [banned] = bans.list_bans(xk.maps, now=xk.now_ns)
    assert (str(banned.source), banned.left_s) == (STRANGER4, 5.0)
    assert counted(xk, Reason.BAN_OPERATOR) == 1 and counted(xk, Reason.BAN_ISSUED) == 0
    xk.advance(6)
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS
    assert counted(xk, Reason.BAN_EXPIRED) == 1


def test_an_operator_ban_without_a_ban_table_is_refused(xk):
    from xknock.controller.state import bans

    with pytest.raises(XknockError, match=r"no \[ban\]"):
        bans.ban(xk.maps, STRANGER4, 60 * 10**9, now=xk.now_ns)
    assert bans.list_bans(xk.maps, now=xk.now_ns) == []


def test_without_a_ban_table_failures_ban_nobody(xk):
    _fail(xk, STRANGER4, 20)
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS
    assert counted(xk, Reason.BAN_ISSUED) == 0


# --- strict mode: a packet to another port resets the source's knocks ------------------

def _strict(config):
    import dataclasses

    return dataclasses.replace(config, strict=True)


def _lenient(config):
    import dataclasses

    return dataclasses.replace(config, strict=False)


def test_strict_is_the_default(example_config):
    assert example_config.strict is True


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_strict_a_packet_to_another_port_between_knocks_resets(xk, example_config, strict):
    if not strict:
        xk.apply(_lenient(example_config))
    knock(xk, STRANGER4, SSH[:1])
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS             # unguarded: passes, and intervenes
    xk.advance(0.1)
    knock(xk, STRANGER4, SSH[1:])
    assert xk.run(tcp(STRANGER4, 22)) == (XDP_DROP if strict else XDP_PASS)
    assert counted(xk, Reason.KNOCK_RESET) == counted(xk, Reason.KNOCK_STRICT_RESET) == (1 if strict else 0)


@pytest.mark.parametrize("description,frame,intervenes", [
    ("a SYN elsewhere", tcp(STRANGER4, 80), True),
    ("a UDP datagram elsewhere", udp(STRANGER4, 53), True),
    ("a ping that is no step", raw(ether() / IP(src=STRANGER4, dst="10.77.0.1") / ICMP(type=8)) , None),
    ("established TCP (ACK)", tcp(STRANGER4, 80, flags="A"), False),
    ("a FIN of an established connection", tcp(STRANGER4, 80, flags="FA"), False),
    ("a RST", tcp(STRANGER4, 80, flags="R"), False),
    ("a SYN to a guarded port", tcp(STRANGER4, 22), True),
    ("a datagram to the guarded UDP port", udp(STRANGER4, 443), True),
], ids=lambda v: v if isinstance(v, str) else "")
def test_strict_only_new_connections_intervene(xk, description, frame, intervenes):
    if intervenes is None:
        return   # icmp is a step of "web" in the example policy; see the next test
    knock(xk, STRANGER4, SSH[:2])
    xk.run(frame)
    xk.advance(0.1)
    knock(xk, STRANGER4, SSH[2:])
    assert xk.run(tcp(STRANGER4, 22)) == (XDP_DROP if intervenes else XDP_PASS)
    assert counted(xk, Reason.KNOCK_STRICT_RESET) == (1 if intervenes else 0)


@pytest.fixture(scope="module")
def production():
    """The program as attach builds it: the kernel's clocks, not the test clock."""
    from xknock_dev.testrun import Harness

    with Harness(test_clock=False) as h:
        yield h


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_with_the_kernel_clock_a_connection_right_after_a_step_intervenes(production, example_config, strict):
    """Back to back, as a scan sends them: step 1, a SYN elsewhere, the rest,
    microseconds apart. Strict mode orders them by time, which the coarse
    clock (a tick, 1-4 ms) cannot: knocks and touches read the precise one
    (bpf/xknock_clock.h). Without strict mode the knock opens as usual."""
    production.reset_state()
    production.apply(example_config if strict else _lenient(example_config))
    assert production.run(step(STRANGER4, SSH[0])) == XDP_DROP
    assert production.run(tcp(STRANGER4, 80)) == XDP_PASS
    for s in SSH[1:]:
        assert production.run(step(STRANGER4, s)) == XDP_DROP
    assert production.run(tcp(STRANGER4, 22)) == (XDP_DROP if strict else XDP_PASS)
    assert counted(production, Reason.KNOCK_STRICT_RESET) == (1 if strict else 0)
    assert counted(production, Reason.GRANT_ISSUED) == (0 if strict else 1)


SHORT_STEPS = """
[filter]
strict = {strict}
answer = "drop"

[[sequence]]
name = "quick"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "300ms"
open = ["tcp:22"]
"""


@pytest.mark.parametrize("strict", ["true", "false"], ids=["strict", "lenient"])
def test_with_the_kernel_clock_a_step_times_out(production, strict):
    """Strict knocks read the precise clock, lenient ones the coarse one
    (knock_now, bpf/xknock_clock.h): either way a step 400 ms after the last
    (a step timeout of 300 ms) starts over, and steps back to back open."""
    import time
    from xknock.controller.config import parse_config

    production.reset_state()
    production.apply(parse_config(SHORT_STEPS.format(strict=strict), listening=set()))
    production.run(step(STRANGER4, "tcp:7000"))
    production.run(step(STRANGER4, "udp:8000"))
    time.sleep(0.4)
    production.run(step(STRANGER4, "tcp:9000"))
    assert production.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(production, Reason.KNOCK_TIMED_OUT) == 1
    for knock in ("tcp:7000", "udp:8000", "tcp:9000"):
        production.run(step(STRANGER4, knock))
    assert production.run(tcp(STRANGER4, 22)) == XDP_PASS


def test_with_the_kernel_clock_a_grant_ends_on_time(production, example_config):
    """The coarse clock is cached per CPU for a jiffy (bpf/xknock_clock.h):
    a reading kept past its tick would let a grant outlive its deadline. A
    grant of 200 ms passes, then, 300 ms later (many ticks at any HZ), the
    same SYN finds it over on both clocks."""
    import time
    from xknock.controller.state import grants

    production.reset_state()
    production.apply(example_config)
    grants.grant(production.maps, STRANGER4, [("tcp", 22)], for_ns=200_000_000)
    assert production.run(tcp(STRANGER4, 22)) == XDP_PASS
    time.sleep(0.3)
    assert production.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(production, Reason.GRANT_EXPIRED) == 1


def test_strict_a_knock_of_another_sequence_intervenes(xk):
    """The seed's "no intervening packets": a knock no sequence of this
    source takes is an intervening packet like any other."""
    knock(xk, STRANGER4, ["tcp:7000", "icmp", "udp:8000", "tcp:9000"])   # icmp: web's step 2, out of turn
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(xk, Reason.KNOCK_STRICT_RESET) == 1


def test_strict_two_sequences_knocked_interleaved_both_open(xk):
    """A knock that one sequence takes does not reset the others: each packet
    here is the next step of one of them."""
    knock(xk, STRANGER4, ["tcp:7000", "udp:8000", "icmp", "tcp:9000", "tcp:7001"])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS
    assert xk.run(tcp(STRANGER4, 443)) == XDP_PASS
    assert counted(xk, Reason.KNOCK_STRICT_RESET) == 0


def test_strict_a_repeated_knock_does_not_intervene(xk):
    """knock --repeat: the copies of a step are taken (as repeats), not touches."""
    for s in SSH:
        for _ in range(3):
            xk.run(step(STRANGER4, s))
            xk.advance(0.01)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS
    assert counted(xk, Reason.KNOCK_STRICT_RESET) == 0


def test_strict_a_sequential_scan_opens_nothing(xk):
    """Every port from 6990 to 9010 in ascending order (the knock ports among
    them, in the sequence's order), TCP and UDP: no sequence completes."""
    for port in range(6990, 9011):
        xk.run(tcp(STRANGER4, port))
        xk.run(udp(STRANGER4, port))
        xk.advance(0.0001)
    xk.advance(0.001)
    assert xk.grants() == {}
    assert counted(xk, Reason.KNOCK_COMPLETED) == 0


def test_strict_a_dropped_packet_to_a_guarded_port_resets_progress_past_step_two(xk, example_config):
    xk.apply(_strict(example_config))
    knock(xk, STRANGER4, SSH[:2])                             # step 2: progress in the LRU
    assert xk.run(udp(STRANGER4, 443)) == XDP_DROP            # guarded, no grant
    knock(xk, STRANGER4, SSH[2:])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_DROP
    assert counted(xk, Reason.KNOCK_RESET) == counted(xk, Reason.KNOCK_STRICT_RESET) == 1


def test_strict_a_first_step_after_a_reset_starts_anew(xk, example_config):
    xk.apply(_strict(example_config))
    knock(xk, STRANGER4, SSH[:1])
    xk.run(udp(STRANGER4, 53))
    xk.advance(0.1)
    knock(xk, STRANGER4, SSH)                                 # its first knock: reset, then step 1 again
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS
    assert counted(xk, Reason.KNOCK_STRICT_RESET) == 1


def test_strict_other_sources_do_not_intervene(xk, example_config):
    xk.apply(_strict(example_config))
    knock(xk, STRANGER4, SSH[:2])
    xk.run(tcp("198.51.100.8", 80))
    xk.run(tcp(STRANGER6, 22))
    knock(xk, STRANGER4, SSH[2:])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS


def test_strict_a_packet_in_the_same_microsecond_as_the_step_does_not_reset(xk, example_config):
    """Both times are kept in microseconds: a touch in the step's microsecond
    cannot be told to come after it, so it does not count."""
    xk.apply(_strict(example_config))
    xk.run(step(STRANGER4, "tcp:7000"))
    xk.run(tcp(STRANGER4, 80))
    xk.advance(0.1)
    knock(xk, STRANGER4, SSH[1:])
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS


def test_strict_leaves_completed_progress_alone(xk, example_config):
    xk.apply(_strict(example_config))
    knock(xk, STRANGER4, SSH)
    assert xk.run(tcp(STRANGER4, 22)) == XDP_PASS             # the connection: a touch
    xk.advance(0.1)
    xk.run(step(STRANGER4, "tcp:9000"))                       # the last knock retransmitted
    assert counted(xk, Reason.KNOCK_REPEATED) == 1
    assert counted(xk, Reason.KNOCK_RESET) == 0


def test_strict_resets_never_count_towards_bans(xk, example_config):
    """Anyone can forge a SYN from a user's address: a strict reset must never
    get that user banned. Wrong knocks still count."""
    xk.apply(_with_ban(example_config, after=2))
    for _ in range(3):
        knock(xk, STRANGER4, SSH[:1])
        xk.run(tcp(STRANGER4, 80))
        xk.advance(0.1)
        knock(xk, STRANGER4, SSH[2:])   # strictly reset (then ignored: no first step)
    assert counted(xk, Reason.KNOCK_STRICT_RESET) == 3
    assert counted(xk, Reason.BAN_ISSUED) == 0
    assert xk.run(tcp(STRANGER4, 80)) == XDP_PASS
    knock(xk, STRANGER4, ["tcp:7000", "tcp:9000", "tcp:7000", "tcp:9000"])   # two wrong knocks
    assert counted(xk, Reason.BAN_ISSUED) == 1


def _recent_words(xk):
    return [(v.knock, v.touch) for _, v in xk.maps.recent.items() if v.knock or v.touch]


def test_strict_a_source_that_is_not_knocking_writes_nothing(xk, example_config):
    """The cost promise: new sources and their connections write no state."""
    for i in range(50):
        xk.run(tcp(f"198.51.100.{i + 1}", 80))
        xk.run(udp(f"2001:db8:77::{i + 1:x}", 53))
    assert _recent_words(xk) == []
    knock(xk, STRANGER4, SSH[:1])
    [(knocked, touched)] = _recent_words(xk)
    assert knocked and not touched
    xk.run(tcp(STRANGER4, 80))
    [(knocked, touched)] = _recent_words(xk)
    assert knocked and touched


def test_lenient_writes_no_strict_state(xk, example_config):
    xk.apply(_lenient(example_config))
    knock(xk, STRANGER4, SSH[:1])
    xk.run(tcp(STRANGER4, 80))
    assert _recent_words(xk) == []


def test_an_ipv4_mapped_source_cannot_get_an_allow_listed_ipv4_address_banned(xk, example_config):
    """Issue 13.2: ::ffff:192.0.2.10 was the same key as 192.0.2.10, and one
    wrong knock from it banned the allow-listed admin everywhere."""
    xk.apply(_with_ban(example_config, after=1))
    knock(xk, "::ffff:192.0.2.10", ["tcp:7000", "tcp:9000"])
    assert counted(xk, Reason.BAN_ISSUED) == 0 and counted(xk, Reason.KNOCK_ADVANCED) == 0
    assert list(xk.maps.bans.keys()) == [] and list(xk.maps.failures.keys()) == []
    assert xk.run(tcp("192.0.2.10", 22)) == XDP_PASS
