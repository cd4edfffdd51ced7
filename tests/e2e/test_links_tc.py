"""Interfaces that come and go at the TC hook (`xknock attach --hook tc`):
the cases of test_links.py, imported and run in a lab of their own whose
every attach asks for the TC hook. A deleted interface takes its tcx
attachment (or its clsact qdisc) with it; the watcher must put the same
program back at the new interface's TC ingress within a second, grants
kept, and report a rename or a filter taken off, as it does at XDP."""

import pytest

from test_links import (  # noqa: F401  (collected here, at the TC hook)
    GUARDED, controller, test_a_filter_taken_off_by_xknock_detach_is_reported_and_left_off,
    test_a_renamed_interface_is_reported_and_keeps_the_filter,
    test_an_interface_moved_to_another_namespace_is_reported_and_filtered_when_back,
    test_an_interface_deleted_and_made_again_gets_the_filter_back_with_its_grants,
)
from xknock_dev.e2e import filter_prog_id, served_lab, xdp_prog_id

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def net():
    with served_lab("xklinkstc", GUARDED, ipv6=False) as built:
        built.hook = "tc"
        yield built


def test_the_controller_runs_the_filter_at_tc_ingress(net, controller):
    # What makes the cases above TC cases: no XDP program at all.
    assert filter_prog_id(net) != 0
    assert xdp_prog_id(net.server, net.server_iface) == 0
