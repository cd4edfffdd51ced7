"""Carrying state into maps of another layout (state/carry.py), between two
real programs run with BPF_PROG_TEST_RUN: a build of another layout
(OTHER_LAYOUT: grants with their window and idle timeout swapped) and this
one. The end-to-end upgrade under traffic is tests/e2e/test_upgrade.py."""

import ctypes
import ipaddress

import pytest

from xknock.controller.kernel import layout
from xknock.controller.kernel.maps import live_sequences, to_addr
from xknock.controller.state import carry
from xknock_dev.packets import step, tcp
from xknock_dev.testrun import OTHER_LAYOUT, XDP_DROP, XDP_PASS, Harness

CLIENT, LATE = "198.51.100.7", "198.51.100.8"
SSH = ("tcp:7000", "udp:8000", "tcp:9000")   # the example's sequence opening tcp:22 for 30 s (idle 15 min)


@pytest.fixture(scope="module")
def other():
    with Harness(cflags=[OTHER_LAYOUT]) as h:
        yield h


@pytest.fixture
def old(other, example_config):
    other.reset_state()
    other.set_clock(1_000_000_000_000)
    other.apply(example_config)
    return other


def knock(h, src):
    for s in SSH:
        h.run(step(src, s))
        h.advance(0.1)


def test_convert_copies_fields_by_name_whatever_their_place():
    class Old(ctypes.Structure):
        _fields_ = [("b", ctypes.c_uint64), ("gone", ctypes.c_uint32), ("a", ctypes.c_uint32)]

    class New(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("added", ctypes.c_uint32), ("b", ctypes.c_uint64)]

    new = carry.convert(layout.shape(Old), bytes(Old(b=7, gone=9, a=5)), New)
    assert (new.a, new.added, new.b) == (5, 0, 7)


def test_a_grant_of_the_other_layout_keeps_its_window_in_this_one(old, xk):
    knock(old, CLIENT)
    assert old.run(tcp(CLIENT, 22)) == XDP_PASS, "the other build's knock opened nothing"
    xk.set_clock(old.now_ns)
    with carry.OldFilter(old.loaded.prog_id) as filt:
        assert filt.carry_keyed(xk.maps)["grants"] == 1
    assert xk.run(tcp(CLIENT, 22)) == XDP_PASS
    xk.advance(31)   # past open_for (30 s), well within idle_timeout (15 min)
    assert xk.run(tcp(CLIENT, 22)) == XDP_DROP, "the window was read as the idle timeout"
    assert xk.run(tcp(CLIENT, 22, flags="A")) == XDP_PASS, "the established flow lost its grant"


def test_the_second_pass_adds_what_the_old_program_wrote_after_the_first(old, xk):
    knock(old, CLIENT)
    xk.set_clock(old.now_ns)
    with carry.OldFilter(old.loaded.prog_id) as filt:
        filt.carry_keyed(xk.maps)
        knock(old, LATE)                         # between the first pass and the swap
        now = old.now_ns
        old.maps.bans.update(to_addr(ipaddress.ip_address(LATE)), layout.Ban(until_ns=now + 10**12, since_ns=now))
        assert filt.carry_keyed(xk.maps, only_missing=True) == {"grants": 1, "bans": 1, "failures": 0,
                                                                "spa_known": 0}
        filt.add_counts(xk.maps)
    xk.set_clock(old.now_ns)
    assert xk.run(tcp(LATE, 22)) == XDP_PASS, "the late grant was not carried"
    assert xk.maps.bans.lookup(to_addr(ipaddress.ip_address(LATE))).until_ns == now + 10**12
    assert xk.counters()[layout.Reason.GRANT_CREATED] == old.counters()[layout.Reason.GRANT_CREATED] == 2
    [ssh] = [seq for seq in live_sequences(xk.maps).values() if seq.name == b"ssh"]
    assert xk.maps.sequence_stats(ssh.uid).completed == 2


def test_knocks_in_progress_are_not_carried(old, xk):
    knock(old, CLIENT)
    for s in SSH[:2]:                            # a knock under way, past the first-step filter
        old.run(step(LATE, s))
    assert list(old.maps.progress.keys())
    with carry.OldFilter(old.loaded.prog_id) as filt:
        filt.carry_keyed(xk.maps)
        filt.add_counts(xk.maps)
    assert not list(xk.maps.progress.keys())    # it starts again
    assert xk.run(step(LATE, SSH[2])) == XDP_DROP and xk.run(tcp(LATE, 22)) == XDP_DROP


def test_the_old_filter_s_writers_wait_while_its_state_is_carried(old):
    from xknock.controller.errors import XknockError
    from xknock.controller.kernel.lock import map_lock

    with carry.OldFilter(old.loaded.prog_id) as filt:
        with map_lock(old.maps, timeout=0.05):
            pass                                 # not locked while the new program compiles
        filt.lock()
        with pytest.raises(XknockError, match="another xknock has held"):
            with map_lock(old.maps, timeout=0.05):
                pass
    with map_lock(old.maps, timeout=0.05):
        pass                                     # and free again after
