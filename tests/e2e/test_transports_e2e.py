"""End to end: a transport xknock cannot open, in the namespace lab (issue 13
item 6). UDP-Lite is the one this kernel has (no SCTP, DCCP or ESP modules):
a UDP-Lite echo server on the server answers until xknock is attached with the
default [filter] other_transports = "drop"; then only allow-listed sources
reach it, and other_transports = "pass" lets everyone through again. NAT-T's
udp:4500, refused by the default ipsec = "drop", still reads as an unused
port (the host answers it). The datapath tests (test_datapath_transports.py)
cover SCTP, DCCP and IPsec with crafted frames.
"""

import pytest

from xknock_dev.e2e import ACCEPTED, DROPPED, addr_of, config_text, fresh_attach, status_json, write_config, xknock
from xknock_dev.lab import UDPLITE, lab, udp_echo, udp_outcome, udp_roundtrip

pytestmark = pytest.mark.netns

GUARDED_UDP, OTHER = 443, 5000
FAMILIES = ["ipv4", "ipv6"]


@pytest.fixture(scope="module")
def net():
    with lab("xktrn") as built:
        try:
            with udp_echo(built.server, GUARDED_UDP, proto=UDPLITE), udp_echo(built.server, OTHER, proto=UDPLITE):
                yield built
        finally:
            xknock(built.server, "detach", built.server_iface)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def config(tmp_path, allow=(), other_transports=None):
    text = config_text(opens=("tcp:22", f"udp:{GUARDED_UDP}"), allow=allow)
    if other_transports:
        text = text.replace('mode = "enforce"', f'mode = "enforce"\nother_transports = "{other_transports}"')
    return write_config(tmp_path, "transports.toml", text)


def reaches(host, addr, port):
    return udp_roundtrip(host, addr, port, timeout=ACCEPTED, proto=UDPLITE)


def blocked(host, addr, port):
    return not udp_roundtrip(host, addr, port, timeout=DROPPED, proto=UDPLITE)


def test_udplite_is_refused_by_default_on_every_port(net, tmp_path, family):
    server = addr_of(net.server, family)
    xknock(net.server, "detach", net.server_iface)   # the test before left one, or not
    assert reaches(net.client, server, GUARDED_UDP), "the lab's UDP-Lite echo does not answer without xknock"
    fresh_attach(net, config(tmp_path))
    for port in (GUARDED_UDP, OTHER):
        assert blocked(net.client, server, port), f"UDP-Lite reached [{server}]:{port} past xknock"
    [live] = status_json(net.server)
    assert live["counters"]["drop_transport"] >= 2


def test_allow_listed_sources_reach_it(net, tmp_path, family):
    server = addr_of(net.server, family)
    fresh_attach(net, config(tmp_path, allow=(net.client.ipv4, net.client.ipv6)))
    assert reaches(net.client, server, GUARDED_UDP)
    assert blocked(net.attacker, server, GUARDED_UDP)


def test_other_transports_pass_lets_everyone_through(net, tmp_path, family):
    server = addr_of(net.server, family)
    fresh_attach(net, config(tmp_path, other_transports="pass"))
    assert reaches(net.attacker, server, GUARDED_UDP)
    assert reaches(net.attacker, server, OTHER)


def test_refused_nat_t_reads_as_an_unused_port(net, tmp_path, family):
    server = addr_of(net.server, family)
    fresh_attach(net, config(tmp_path))
    assert udp_outcome(net.attacker, server, 4500, timeout=ACCEPTED) == "refused"
    assert udp_outcome(net.attacker, server, 4501, timeout=ACCEPTED) == "refused"
    counters = status_json(net.server)[0]["counters"]
    assert counters["drop_ipsec"] == 1 and counters["answer_by_host"] == 1
