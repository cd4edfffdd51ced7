"""IPsec and the transports xknock cannot open, through BPF_PROG_TEST_RUN
(issue 13 item 6; docs/datapath.md, "IPsec and other transports").

The kernel decrypts ESP (and ESP in UDP to port 4500, NAT-T) after XDP, and
SCTP, DCCP and UDP-Lite reach sockets on ports no grant opens. By default
([filter] ipsec = "drop", other_transports = "drop") they are refused unless
the source is on the allow-list; "pass" lets them through, except that what
AH carries is judged in both families (AH does not encrypt). Every case runs
for IPv4 and IPv6, untagged, under one VLAN tag and under QinQ.
"""

import dataclasses
import struct

import pytest
from xknock_dev.packets import IP, TCP, UDP, IPv6, Raw, ether, raw

from xknock.controller.config import parse_config
from xknock.controller.kernel.layout import Reason
from xknock_dev.testrun import XDP_DROP, XDP_PASS
from monitor_mode import assert_monitor_passes_what_enforce_refuses

STRANGER = {4: "198.51.100.7", 6: "2001:db8:77::7"}
ALLOWED = {4: "192.0.2.10", 6: "2001:db8:a::99"}
DENIED = {4: "203.0.113.5", 6: "2001:db8:bad::5"}
VLANS = [(), (10,), (10, 20)]
ESP, AH, DCCP, SCTP, UDPLITE, GRE = 50, 51, 33, 132, 136, 47


def frame(src, proto, payload, vlans=(), **ipkw):
    """Ethernet (tagged as asked) / IPv4 or IPv6 carrying protocol proto."""
    if ":" in src:
        l3 = IPv6(src=src, dst="fd00:77::1", nh=proto, **ipkw)
    else:
        l3 = IP(src=src, dst="10.77.0.1", proto=proto, **ipkw)
    return raw(ether(vlans) / l3 / Raw(payload))


def ah(next_proto, inner):
    """An AH header (RFC 4302, a 12-byte ICV: 24 bytes, a multiple of 8 for
    IPv6 too) in front of inner."""
    return struct.pack("!BBHII", next_proto, 24 // 4 - 2, 0, 0x1001, 1) + b"\xaa" * 12 + inner


def syn(dport):
    return raw(TCP(sport=40000, dport=dport, flags="S", chksum=0))


def ports(dport, size):
    """A transport header that starts with source and destination ports."""
    return struct.pack("!HH", 40000, dport) + b"\x00" * (size - 4)


def natt(src, vlans=()):
    return raw(ether(vlans) / (IPv6(src=src, dst="fd00:77::1") if ":" in src else IP(src=src, dst="10.77.0.1"))
               / UDP(sport=4500, dport=4500) / Raw(b"\x00\x00\x10\x01" + b"\x00" * 28))


# (description, frame builder of (source, vlans), reason by default, reason with "pass")
CASES = [
    ("ESP", lambda s, v: frame(s, ESP, b"\x00\x00\x10\x01" + b"\x00" * 28, v),
     Reason.DROP_IPSEC, Reason.PASS_OTHER_L4),
    ("AH carrying a SYN to an unguarded port", lambda s, v: frame(s, AH, ah(6, syn(80)), v),
     Reason.DROP_IPSEC, Reason.PASS_UNGUARDED),
    ("AH carrying a SYN to the guarded port", lambda s, v: frame(s, AH, ah(6, syn(22)), v),
     Reason.DROP_IPSEC, Reason.DROP_NO_GRANT),
    ("AH carrying ESP", lambda s, v: frame(s, AH, ah(ESP, b"\x00" * 16), v),
     Reason.DROP_IPSEC, Reason.PASS_OTHER_L4),
    ("NAT-T: ESP in UDP to port 4500", natt, Reason.DROP_IPSEC, Reason.PASS_UNGUARDED),
    ("SCTP to the guarded port number", lambda s, v: frame(s, SCTP, ports(22, 12), v),
     Reason.DROP_TRANSPORT, Reason.PASS_OTHER_L4),
    ("SCTP to an unguarded port number", lambda s, v: frame(s, SCTP, ports(80, 12), v),
     Reason.DROP_TRANSPORT, Reason.PASS_OTHER_L4),
    ("DCCP to the guarded port number", lambda s, v: frame(s, DCCP, ports(22, 16), v),
     Reason.DROP_TRANSPORT, Reason.PASS_OTHER_L4),
    ("UDP-Lite to the guarded port number", lambda s, v: frame(s, UDPLITE, ports(443, 8), v),
     Reason.DROP_TRANSPORT, Reason.PASS_OTHER_L4),
    ("AH carrying SCTP", lambda s, v: frame(s, AH, ah(SCTP, ports(22, 12)), v),
     Reason.DROP_IPSEC, Reason.PASS_OTHER_L4),
    ("GRE, which the host decapsulates onto another interface", lambda s, v: frame(s, GRE, b"\x00" * 8, v),
     Reason.PASS_OTHER_L4, Reason.PASS_OTHER_L4),
    ("UDP to port 4501", lambda s, v: raw(ether(v) / (IPv6(src=s, dst="fd00:77::1") if ":" in s
                                                         else IP(src=s, dst="10.77.0.1")) / UDP(dport=4501)),
     Reason.PASS_UNGUARDED, Reason.PASS_UNGUARDED),
]
PASSING = {Reason.PASS_OTHER_L4, Reason.PASS_UNGUARDED, Reason.PASS_ALLOWLIST}
GRID = [(c, family, vlans) for c in CASES for family in (4, 6) for vlans in VLANS]
IDS = [f"{c[0]}-ipv{family}-{len(vlans)}tags" for c, family, vlans in GRID]


def verdict_of(reason):
    return XDP_PASS if reason in PASSING else XDP_DROP


def only_verdict(xk):
    """The one verdict reason counted since the state was cleared."""
    counted = {r: n for r, n in xk.counters().items() if r < Reason.KNOCK_ADVANCED and n}
    assert len(counted) == 1 and sum(counted.values()) == 1, counted
    [reason] = counted
    return reason


@pytest.mark.parametrize("case,family,vlans", GRID, ids=IDS)
def test_by_default_ipsec_and_other_transports_are_refused(xk, case, family, vlans):
    description, build, refused, _ = case
    assert xk.run(build(STRANGER[family], vlans)) == verdict_of(refused), description
    assert only_verdict(xk) == refused


@pytest.mark.parametrize("case,family,vlans", GRID, ids=IDS)
def test_pass_lets_them_through_and_judges_what_ah_carries(xk, example_config, case, family, vlans):
    description, build, _, passed = case
    xk.apply(dataclasses.replace(example_config, ipsec="pass", other_transports="pass"))
    assert xk.run(build(STRANGER[family], vlans)) == verdict_of(passed), description
    assert only_verdict(xk) == passed


@pytest.mark.parametrize("case", CASES[:-2], ids=[c[0] for c in CASES[:-2]])
@pytest.mark.parametrize("family", (4, 6))
def test_allow_listed_sources_pass_and_deny_listed_ones_drop(xk, case, family):
    description, build, _, _ = case
    assert xk.run(build(ALLOWED[family], ())) == XDP_PASS, description
    assert xk.run(build(DENIED[family], (10,))) == XDP_DROP, description
    c = xk.counters()
    assert (c[Reason.PASS_ALLOWLIST], c[Reason.DROP_DENYLIST]) == (1, 1)


def test_each_setting_covers_its_own_protocols(xk, example_config):
    xk.apply(dataclasses.replace(example_config, ipsec="pass"))
    assert xk.run(frame(STRANGER[4], ESP, b"\x00" * 16)) == XDP_PASS
    assert xk.run(frame(STRANGER[4], SCTP, ports(22, 12))) == XDP_DROP
    xk.apply(dataclasses.replace(example_config, other_transports="pass"))
    assert xk.run(frame(STRANGER[6], ESP, b"\x00" * 16)) == XDP_DROP
    assert xk.run(frame(STRANGER[6], SCTP, ports(22, 12))) == XDP_PASS
    c = xk.counters()
    assert (c[Reason.DROP_IPSEC], c[Reason.DROP_TRANSPORT], c[Reason.PASS_OTHER_L4]) == (1, 1, 2)


def test_nothing_is_refused_where_nothing_is_guarded(xk):
    xk.apply(parse_config("[filter]\nanswer = \"drop\"\n", listening=set()))
    assert xk.run(frame(STRANGER[4], ESP, b"\x00" * 16)) == XDP_PASS
    assert xk.run(frame(STRANGER[6], SCTP, ports(22, 12))) == XDP_PASS
    assert xk.run(natt(STRANGER[4])) == XDP_PASS
    assert xk.counters()[Reason.PASS_OTHER_L4] == 2


def test_monitor_mode_counts_the_refusal_and_passes(xk, example_config):
    assert_monitor_passes_what_enforce_refuses(xk, example_config, frame(STRANGER[4], ESP, b"\x00" * 16),
                                               Reason.DROP_IPSEC)


def test_a_later_fragment_of_esp_passes_its_first_was_judged(xk):
    later = raw(ether() / IP(src=STRANGER[4], dst="10.77.0.1", proto=ESP, frag=100) / Raw(b"\x00" * 40))
    first = raw(ether() / IP(src=STRANGER[4], dst="10.77.0.1", proto=ESP, flags="MF") / Raw(b"\x00" * 40))
    assert xk.run(later) == XDP_PASS
    assert xk.run(first) == XDP_DROP
    c = xk.counters()
    assert (c[Reason.PASS_FRAGMENT], c[Reason.DROP_IPSEC]) == (1, 1)


@pytest.mark.parametrize("family", (4, 6))
def test_ah_cut_short_is_malformed(xk, example_config, family):
    xk.apply(dataclasses.replace(example_config, ipsec="pass"))
    whole = frame(STRANGER[family], AH, ah(6, syn(22)))
    assert xk.run(whole[:-20 - 20]) == XDP_DROP    # the frame ends inside the AH header
    assert only_verdict(xk) == Reason.DROP_MALFORMED


@pytest.mark.parametrize("family", (4, 6))
def test_an_ah_header_longer_than_its_packet_is_judged_as_ah(xk, example_config, family):
    """The IP header says the packet ends inside AH (nmap -sO sends such
    AH): what it carries is unseen, so it is refused as IPsec by default
    (answered as the kernel answers AH: tests/test_answers.py) and passed
    with ipsec = "pass" to the kernel, which cannot deliver it."""
    short = frame(STRANGER[family], AH, b"\x06\x04")
    xk.apply(example_config)
    assert xk.run(short) == XDP_DROP
    assert only_verdict(xk) == Reason.DROP_IPSEC
    xk.reset_state()
    xk.apply(dataclasses.replace(example_config, ipsec="pass"))
    assert xk.run(short) == XDP_PASS
    assert only_verdict(xk) == Reason.PASS_OTHER_L4


def test_a_knock_carried_by_ah_counts_with_ipsec_pass(xk, example_config):
    xk.apply(dataclasses.replace(example_config, ipsec="pass"))
    assert xk.run(frame(STRANGER[4], AH, ah(6, syn(7000)))) == XDP_DROP
    c = xk.counters()
    assert (c[Reason.DROP_KNOCK], c[Reason.KNOCK_ADVANCED]) == (1, 1)


def test_answers_nat_t_as_an_unused_port_and_drops_the_rest_silently(xk, example_config):
    """answer = "closed": nothing listens on udp:4500 here, so the host's stack
    answers it (passed, ANSWER_BY_HOST); ESP and SCTP get no answer from a
    kernel that has them (tests/test_answers.py: one that lacks them)."""
    from xknock.controller.policy import answers, policy

    policy.apply_policy(xk.maps, dataclasses.replace(example_config, answer="closed"), host=answers.HostAnswers())
    assert xk.run(natt(STRANGER[4])) == XDP_PASS
    assert xk.run(natt(STRANGER[6], vlans=(10,))) == XDP_PASS
    assert xk.run(frame(STRANGER[4], ESP, b"\x00" * 16)) == XDP_DROP
    assert xk.run(frame(STRANGER[6], SCTP, ports(22, 12))) == XDP_DROP
    c = xk.counters()
    assert (c[Reason.DROP_IPSEC], c[Reason.DROP_TRANSPORT], c[Reason.ANSWER_BY_HOST]) == (3, 1, 2)
    assert c[Reason.ANSWER_NONE] == 2   # ESP and SCTP: refused, and this kernel would send nothing
    assert c[Reason.ANSWER_RST] == c[Reason.ANSWER_UNREACH] == 0


def test_an_ipsec_host_is_warned_at_attach(example_config):
    from xknock.controller.policy.ipsec import ipsec_warnings

    assert ipsec_warnings(example_config, states=0) == []
    [drop] = ipsec_warnings(example_config, states=2)
    assert "2 IPsec state(s)" in drop and 'ipsec = "drop"' in drop and "allow-list" in drop
    [passed] = ipsec_warnings(dataclasses.replace(example_config, ipsec="pass"), states=1)
    assert "not guarded" in passed and "nftables" in passed
    assert ipsec_warnings(parse_config("", listening=set()), states=2) == []   # nothing guarded, nothing dropped

