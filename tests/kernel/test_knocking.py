"""Strict mode's `knocking` words (bpf/xknock_strict.h): when a source of each
hash of the source last knocked. A new connection elsewhere reads its slot of
`recent` only when its word is younger than the longest step timeout, so a
flood of SYNs from sources that are not knocking reads a 64 KB array, not
`recent`'s slots. The words may only spare reads that find nothing: every
touch strict mode records without them, it records with them.

The `xk` fixture trusts the words from the first packet (testrun
trust_knocking), so every strict case of test_datapath and test_differential
runs through them; the cases here pin down what those cannot show."""

import ctypes
import ipaddress

import pytest
from model import recent_place
from xknock_dev.packets import step, tcp
from xknock_dev.testrun import TEST_RECENT_SLOTS, XDP_DROP, XDP_PASS

from xknock.controller.kernel import layout
from xknock.controller.kernel.layout import Reason

SOURCE = "198.51.100.7"   # knocks nothing in the example policy's lists
STEP_TIMEOUT_S = 5        # the example policy's longest step timeout


@pytest.fixture
def strict(xk):
    """The example policy (strict mode on), the words trusted (the xk fixture)."""
    return xk


def recent_of(xk, source):
    """(slot index, tag, the slot) of source in `recent`."""
    index, tag = recent_place(ipaddress.ip_address(source), TEST_RECENT_SLOTS)
    return index, tag, xk.maps.recent.lookup(ctypes.c_uint32(index))


def forge_knocking(xk, source):
    """A fresh knock of source in `recent` only, as a program before this one
    (an upgrade keeps `recent`) would have left it; its `knocking` word is
    not written."""
    index, tag, _ = recent_of(xk, source)
    slot = layout.Recent(knock=(tag << 40) | (xk.now_ns // 1000))
    xk.maps.recent.update(ctypes.c_uint32(index), slot)


def touched(xk, source):
    return recent_of(xk, source)[2].touch != 0


def knocking_word(xk, index):
    return xk.loaded.bpf[b"knocking"][ctypes.c_uint32(index)].value


def test_a_connection_from_a_source_that_has_not_knocked_reads_no_slot(strict):
    forge_knocking(strict, SOURCE)
    strict.advance(0.01)
    assert strict.run(tcp(SOURCE, 80)) == XDP_PASS
    assert not touched(strict, SOURCE)   # its word is old: the slot was never read


def test_a_new_program_reads_the_slots_until_a_step_timeout_has_passed(strict):
    """A new program's words are empty while `recent` holds the old one's
    knocks: until a step timeout has passed since its first packet, every
    new connection elsewhere reads its slot, as before the words."""
    strict.trust_knocking(0)   # as a new program finds them
    assert strict.run(tcp("192.0.2.99", 80)) == XDP_PASS   # its first packet: the words begin
    forge_knocking(strict, SOURCE)
    strict.advance(STEP_TIMEOUT_S - 0.5)
    assert strict.run(tcp(SOURCE, 80)) == XDP_PASS
    assert touched(strict, SOURCE)
    strict.advance(1)
    forge_knocking(strict, "198.51.100.8")
    strict.advance(0.01)
    assert strict.run(tcp("198.51.100.8", 80)) == XDP_PASS
    assert not touched(strict, "198.51.100.8")   # begun a step timeout ago: trusted now


def test_a_knock_writes_its_word_with_the_knocks_time(strict):
    assert strict.run(step(SOURCE, "tcp:7000")) == XDP_DROP
    words = {i: knocking_word(strict, i) for i in range(layout.KNOCKING_SLOTS)}
    assert [t for t in words.values() if t] == [strict.now_ns]


@pytest.mark.parametrize("wait", [0.1, STEP_TIMEOUT_S - 0.05], ids=["soon", "at the step timeout"])
def test_a_connection_between_steps_still_ends_the_knock(strict, wait):
    assert strict.run(step(SOURCE, "tcp:7000")) == XDP_DROP
    strict.advance(wait)
    assert strict.run(tcp(SOURCE, 80)) == XDP_PASS
    assert touched(strict, SOURCE)
    strict.advance(0.02)
    strict.run(step(SOURCE, "udp:8000"))
    strict.advance(0.02)
    strict.run(step(SOURCE, "tcp:9000"))
    assert strict.run(tcp(SOURCE, 22)) == XDP_DROP
    assert strict.counters()[Reason.KNOCK_STRICT_RESET] == 1


def test_words_left_ahead_of_a_clock_put_back_still_say_look(strict):
    """A word written at a later time than the packet's (the test clock put
    back; on the kernel's clock, another CPU's precise time against this
    one's coarse) is young, not old."""
    assert strict.run(step(SOURCE, "tcp:7000")) == XDP_DROP
    strict.set_clock(strict.now_ns - 100 * 10**9)
    assert strict.run(step(SOURCE, "tcp:7000")) == XDP_DROP   # its word stays at the later time
    strict.advance(0.1)
    assert strict.run(tcp(SOURCE, 80)) == XDP_PASS
    assert touched(strict, SOURCE)
    strict.advance(0.02)
    strict.run(step(SOURCE, "udp:8000"))
    assert strict.counters()[Reason.KNOCK_STRICT_RESET] == 1
