"""End to end at the TC hook (`xknock attach --hook tc`): the cases of
test_e2e.py that make the promise of the TC mode (same maps, same policy,
same commands), imported and run in a lab of their own whose every attach
asks for the TC hook; and what only this mode has to show: the program runs
at the TC ingress (tcx here) with no XDP program, a refused connection is
answered as a closed port is (the client's connect is refused, not timed
out), and detach takes off ours and no one else's. SPA end to end too
(test_spa_e2e.py's cases of the real fwknop client and `xknock spa` against
the real controller): the classifier hands the SPA packet to the controller,
whose grant opens the port to the sender."""

import sys

import pytest

from test_e2e import (  # noqa: F401  (collected here, at the TC hook)
    GUARDED, UNGUARDED, blocked, configs, family, test_a_wrong_step_in_the_middle_opens_nothing,
    test_correct_knock_opens_the_port_to_that_source_only, test_detach_restores_plain_traffic,
    test_guarded_port_is_dark_to_everyone_and_other_ports_are_not, test_the_running_controller_has_left_bcc_behind,
)
from test_spa_e2e import (  # noqa: F401  (SPA at the TC hook: fwknop's client and `xknock spa`)
    setup, test_fwknop_opens_the_port_for_the_sender_only, test_xknock_spa_client_opens_the_port_too,
)
from xknock_dev.e2e import (
    SEQUENCE, addr_of, check, config_text, filter_prog_id, fresh_attach, knock, served_lab, status_json,
    write_config, xdp_prog_id, xknock,
)
from xknock_dev.lab import connect_outcome, udp_outcome

pytestmark = pytest.mark.netns

GUARDED_UDP = 5000


@pytest.fixture(scope="module")
def net():
    with served_lab("xktc", GUARDED, UNGUARDED) as built:
        built.hook = "tc"
        yield built


def test_the_filter_runs_at_tc_ingress_and_not_at_xdp(net, configs):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    [running] = status_json(net.server)
    [iface] = running["interfaces"]
    assert iface["xdp_mode"] == "tc"
    assert filter_prog_id(net) == iface["prog_id"] != 0
    assert xdp_prog_id(net.server, net.server_iface) == 0


def test_a_guarded_port_answers_like_a_closed_one(net, configs, family):
    fresh_attach(net, write_config(configs, "closed.toml", config_text(opens=(f"tcp:{GUARDED}",
                                                                              f"udp:{GUARDED_UDP}"))))
    server = addr_of(net.server, family)
    # A reset and a port unreachable made by the program and sent back out of
    # the interface: the client's own stack takes them (checksums, lengths).
    assert connect_outcome(net.attacker, server, GUARDED) == "refused"
    assert udp_outcome(net.attacker, server, GUARDED_UDP) == "refused"
    assert connect_outcome(net.attacker, server, 23) == "refused"   # as an unused port
    knock(net.client, server, *SEQUENCE)
    assert connect_outcome(net.client, server, GUARDED) == "open"
    counters = status_json(net.server)[0]["counters"]
    assert counters["answer_rst"] >= 1 and counters["answer_unreach"] >= 1


def test_re_attaching_keeps_the_hook_and_a_change_of_hook_is_refused(net, configs):
    config = write_config(configs, "basic.toml", config_text())
    fresh_attach(net, config)
    before = filter_prog_id(net)
    out = check(xknock(net.server, "attach", net.server_iface, "-c", config, "--once"))   # no --hook: kept
    assert f"replaced program {before}" in out.stderr
    assert filter_prog_id(net) not in (0, before) and xdp_prog_id(net.server, net.server_iface) == 0
    refused = xknock(net.server, "attach", net.server_iface, "-c", config, "--once", "--hook", "xdp")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "runs xknock at the tc hook; detach it before attaching at the xdp hook" in refused.stderr
    assert xdp_prog_id(net.server, net.server_iface) == 0


# Another tool's classifier at the same ingress, which must outlive ours.
FOREIGN_TC = r"""
import sys
from bcc import BPF
from xknock.controller.kernel import bpfsys, datapath, tc
b = BPF(text="int other(struct __sk_buff *skb) { return -1; }")
fn = b.load_func(b"other", BPF.SCHED_CLS)
tc.attach(datapath.interface_index(sys.argv[1]), fn.fd)
print(bpfsys.prog_info(fn.fd).id)
"""


def test_detach_takes_off_ours_and_leaves_another_tools_program(net, configs):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    foreign = int(check(net.server.run([sys.executable, "-c", FOREIGN_TC, net.server_iface],
                                       timeout=120)).stdout)
    try:
        assert blocked(net.attacker, net.server.ipv4), "the filter stopped filtering beside another program"
        check(xknock(net.server, "detach", net.server_iface))
        assert filter_prog_id(net) == 0
        ingress = check(net.server.run([sys.executable, "-c",
                                        "import sys; from xknock.controller.kernel import datapath, tc; "
                                        "print(tc.programs(datapath.interface_index(sys.argv[1])))",
                                        net.server_iface])).stdout
        assert str(foreign) in ingress
    finally:
        net.server.run([sys.executable, "-c",
                        "import sys; from xknock.controller.kernel import datapath, tc; "
                        "tc.detach(datapath.interface_index(sys.argv[1]), int(sys.argv[2]))",
                        net.server_iface, str(foreign)])
