"""The TC hook's fallback for kernels without tcx (kernel/tc.py): clsact and
a direct-action bpf filter of our own priority. This kernel has tcx, so the
filter is attached by this process in the lab's server namespace inside
tc.without_tcx(), as `attach --hook tc` would on an older kernel, beside a
classifier of another tool at the same ingress; then real connections: the
guarded port dark, a knock opening it to the knocker alone; an attach
again replacing our filter in its place, the grant kept; then detach:
our filter gone, the other tool's filter and the clsact qdisc left."""

import json

import pytest
from pyroute2 import IPRoute

from xknock.controller.config import parse_config
from xknock.controller.daemon import lifecycle
from xknock.controller.kernel import bpfsys, datapath, tc
from xknock_dev.e2e import DROPPED, SEQUENCE, TcpEchoServer, check, config_text, knock, write_config
from xknock_dev.lab import can_connect, in_netns, lab

pytestmark = pytest.mark.netns

GUARDED = 22
ACCEPTED = 3.0
OTHER_PRIO = 100   # runs before ours (0xC0DE) and hands every packet on (TC_ACT_UNSPEC)

OTHER_CLASSIFIER = b"int other(struct __sk_buff *skb) { return -1; }"


@pytest.fixture(scope="module")
def net():
    with lab("xkclsact", ipv6=False) as built:
        server = TcpEchoServer(built.server, GUARDED)
        try:
            yield built
        finally:
            server.stop()


@pytest.fixture
def other_filter(net):
    """Another tool's classifier at the server's clsact ingress: its program id."""
    from bcc import BPF

    program = BPF(text=OTHER_CLASSIFIER).load_func(b"other", BPF.SCHED_CLS)
    with in_netns(net.server.name), IPRoute() as ipr:
        index = datapath.interface_index(net.server_iface)
        ipr.tc("add", "clsact", index)
        ipr.tc("add-filter", "bpf", index, 1, fd=program.fd, name="other", parent=tc.INGRESS_PARENT,
               prio=OTHER_PRIO, protocol=tc.ETH_P_ALL, direct_action=True)
    try:
        yield bpfsys.prog_info(program.fd).id
    finally:
        with in_netns(net.server.name), IPRoute() as ipr:
            ipr.tc("del", "clsact", datapath.interface_index(net.server_iface))


def ingress_filters(net):
    """(priority, program name) of every filter tc(8) shows at the server's ingress."""
    out = check(net.server.run(["tc", "-j", "filter", "show", "dev", net.server_iface, "ingress"])).stdout
    return sorted({(f["pref"], f["options"]["bpf_name"].split(":")[0])
                   for f in json.loads(out) if f.get("kind") == "bpf" and "options" in f})


def qdiscs(net):
    out = check(net.server.run(["tc", "-j", "qdisc", "show", "dev", net.server_iface])).stdout
    return [q["kind"] for q in json.loads(out)]


def test_the_filter_works_through_clsact_and_detach_leaves_the_other_filter(net, other_filter, tmp_path):
    config = parse_config(open(write_config(tmp_path, "clsact.toml", config_text())).read(), listening=set())
    attached = None
    try:
        with in_netns(net.server.name), tc.without_tcx():
            attached = lifecycle.attach([net.server_iface], config, hook="tc")
        with in_netns(net.server.name):
            index = datapath.interface_index(net.server_iface)
            assert bpfsys.prog_query(index, tc.BPF_TCX_INGRESS) == [], "attached through tcx, not clsact"
            assert datapath.attachment(net.server_iface).prog_id == attached.loaded.prog_id
        assert ingress_filters(net) == [(OTHER_PRIO, "other"), (tc.FILTER_PRIO, datapath.TC_PROG_NAME)]

        server = net.server.ipv4
        assert not can_connect(net.attacker, server, GUARDED, timeout=DROPPED)
        assert not can_connect(net.client, server, GUARDED, timeout=DROPPED)
        knock(net.client, server, *SEQUENCE)
        assert can_connect(net.client, server, GUARDED, timeout=ACCEPTED), "the knock opened nothing"
        assert not can_connect(net.attacker, server, GUARDED, timeout=DROPPED)

        # Attaching again replaces our filter in its place (replace-filter), maps and grant kept.
        first = attached
        with in_netns(net.server.name), tc.without_tcx():
            attached = lifecycle.attach([net.server_iface], config, hook="tc")
        first.maps.close()
        assert attached.replaced == {net.server_iface: first.loaded.prog_id}
        assert ingress_filters(net) == [(OTHER_PRIO, "other"), (tc.FILTER_PRIO, datapath.TC_PROG_NAME)]
        assert can_connect(net.client, server, GUARDED, timeout=ACCEPTED), "the grant was lost in the replace"
        assert not can_connect(net.attacker, server, GUARDED, timeout=DROPPED)

        # Detached as any later command would: no without_tcx() here.
        with in_netns(net.server.name):
            lifecycle.detach(net.server_iface)
            assert datapath.attachment(net.server_iface).prog_id == 0
            assert other_filter in tc.programs(index)
        assert ingress_filters(net) == [(OTHER_PRIO, "other")]
        assert "clsact" in qdiscs(net)
        assert can_connect(net.attacker, server, GUARDED, timeout=ACCEPTED), "detach left the port dark"
    finally:
        if attached:
            attached.maps.close()
            with in_netns(net.server.name):
                if datapath.attachment(net.server_iface).prog_id:
                    lifecycle.detach(net.server_iface)
                datapath.remove_pins(attached.pin_dir)
