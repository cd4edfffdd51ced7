"""The TC build (bpf/xknock_hook.h: tc_knock, SCHED_CLS) through the same
cases as the XDP build: the table of verdicts, knocks, malformed frames and
answers as closed ports, run with BPF_PROG_TEST_RUN on an skb. The tests are
the XDP ones, imported; only the program under them changes (the `harness`
fixture below), its verdicts read as XDP's (TC_ACT_UNSPEC passes, TC_ACT_SHOT
drops, TC_ACT_REDIRECT sends the answer back)."""

import errno

import pytest

from test_answers import (  # noqa: F401  (collected here, on the TC build)
    kernel, closed, test_banned_sources, test_deny_listed_and_malformed_drop_silently,
    test_granted_and_allowed_sources_see_the_service, test_icmp_errors_keep_linuxs_per_destination_limit,
    test_knock_ports_nobody_listens_on_are_answered_by_the_host, test_tcp_answers_match_the_kernel,
    test_udp_answers_match_the_kernel, test_vlan_tagged_answers_carry_the_tags,
)
from test_datapath import MALFORMED_CASES
from test_datapath import test_malformed_and_fragmented as _malformed
from test_datapath import (  # noqa: F401
    test_completion_opens_every_port_of_the_sequence, test_deny_list_beats_a_grant_and_knocks,
    test_knock_opens_guarded_port_for_the_knocker_only, test_monitor_mode_counts_but_drops_nothing, test_stateless_verdicts, test_wrong_knock_resets_without_opening,
)
from test_spa_datapath import (  # noqa: F401
    spa, test_a_candidate_is_dropped_and_queued_byte_for_byte, test_ipv6_candidates_are_queued_too,
    test_the_ip_length_not_the_frame_decides_the_payload, test_what_cannot_be_spa_stays_in_the_kernel,
)


@pytest.fixture(scope="module")
def harness():
    """The TC build with the test clock, for this module's tests."""
    from xknock_dev.testrun import Harness

    with Harness(hook="tc") as h:
        yield h


def test_the_program_under_these_tests_is_the_tc_build(harness):
    from xknock.controller.kernel import bpfsys

    info = bpfsys.prog_info(harness.fd)
    assert (info.name, info.type) == (b"tc_knock", 3)   # BPF_PROG_TYPE_SCHED_CLS


# BPF_PROG_TEST_RUN builds no skb of a frame cut inside the network header it
# announces (EINVAL), so these two run on the XDP build only; the TC hook
# itself does meet them (it runs before ip_rcv), and the parser is one copy.
SKB_TEST_RUN_REFUSES = {"Ethernet header alone, IPv4 type", "truncated IPv4 header"}
TC_MALFORMED = [case for case in MALFORMED_CASES if case[0] not in SKB_TEST_RUN_REFUSES]


@pytest.mark.parametrize("description,frame,verdict,reason", TC_MALFORMED, ids=[c[0] for c in TC_MALFORMED])
def test_malformed_and_fragmented(xk, description, frame, verdict, reason):
    _malformed(xk, description, frame, verdict, reason)


@pytest.mark.parametrize("description", sorted(SKB_TEST_RUN_REFUSES))
def test_the_skb_test_run_refuses_what_is_left_out(xk, description):
    from xknock.controller.kernel import bpfsys

    [frame] = [case[1] for case in MALFORMED_CASES if case[0] == description]
    with pytest.raises(bpfsys.BpfError) as refused:
        xk.run(frame)
    assert refused.value.errno == errno.EINVAL
