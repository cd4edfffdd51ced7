"""A full grants map, through BPF_PROG_TEST_RUN (issue 6, "state exhaustion").

The program is built with room for 4 grants (-DXK_GRANT_ENTRIES=4) and a
sequence that opens one port, so 4 sources fill the map. A 5th source that
completes its knock must be refused with a counted reason (GRANT_FAILED) and a
GRANT_FAILED event, must stay shut out, and no live grant may be evicted for
it. Once a grant is dead on both clocks and the data path meets it again, the
slot is free and the 5th source's next knock succeeds.

The test clock drives time; nothing sleeps.
"""

import ctypes

import pytest
from xknock_dev.packets import step, tcp

from xknock.controller.kernel import layout
from xknock.controller.config import parse_config
from xknock.controller.errors import XknockError
from xknock.controller.state.grants import grant as operator_grant
from xknock.controller.kernel.layout import Reason
from xknock.controller.kernel.maps import from_addr
from xknock_dev.testrun import XDP_DROP, XDP_PASS, Harness

GRANT_ENTRIES = 4
KNOCK = ["udp:7100", "tcp:7200"]
OPEN_FOR_S, IDLE_S, STEP_TIMEOUT_S = 10, 20, 5
# The grants map is the subject here: refusals drop (answers: test_answers.py).
CONFIG = f"""
[filter]
answer = "drop"

[[sequence]]
name = "tiny"
knock = {KNOCK!r}
step_timeout = "{STEP_TIMEOUT_S}s"
open = ["tcp:22"]
open_for = "{OPEN_FOR_S}s"
idle_timeout = "{IDLE_S}s"
""".replace("'", '"')
SOURCES = [f"198.51.100.{i}" for i in range(1, GRANT_ENTRIES + 1)]
FIFTH = "2001:db8:77::5"   # another family: the map is shared by both
T0 = 1_000_000_000_000


@pytest.fixture(scope="module")
def small():
    """The real program with a 4-entry grants map, and a reader of its events."""
    h = Harness(cflags=[f"-DXK_GRANT_ENTRIES={GRANT_ENTRIES}"])
    events = []

    def on_event(ctx, data, size):
        record = ctypes.cast(data, ctypes.POINTER(layout.EventRecord)).contents
        events.append((layout.Event(record.type), str(from_addr(record.src))))
        return 0

    h.loaded.bpf[b"events"].open_ring_buffer(on_event)
    h.events = events
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def tiny(small):
    small.reset_state()
    small.set_clock(T0)
    small.apply(parse_config(CONFIG, listening=set()))
    small.loaded.bpf.ring_buffer_poll(0)   # drain events of earlier tests
    small.events.clear()
    return small


def knock(h, src):
    for s in KNOCK:
        assert h.run(step(src, s)) == XDP_DROP, f"knock {s} from {src} was not dropped"
        h.advance(0.1)


def events(h):
    h.loaded.bpf.ring_buffer_poll(0)
    return list(h.events)


def grant_values(h):
    """{source: (window_end_ns, idle_timeout_ns, last_seen_ns, seq_uid)}: every grant in the map."""
    return {str(addr): (g.window_end_ns, g.idle_timeout_ns, g.last_seen_ns, g.seq_uid)
            for (addr, proto, port), g in h.grants().items()}


def test_the_build_really_has_four_grant_slots(tiny):
    assert tiny.maps.grants.max_entries == GRANT_ENTRIES


def test_a_full_grants_map_refuses_the_new_grant_and_evicts_no_live_one(tiny):
    for src in SOURCES:
        knock(tiny, src)
    assert sorted(grant_values(tiny)) == sorted(SOURCES)
    before = grant_values(tiny)
    c = tiny.counters()
    assert (c[Reason.GRANT_ISSUED], c[Reason.GRANT_CREATED], c[Reason.GRANT_FAILED]) == (4, 4, 0)

    knock(tiny, FIFTH)
    c = tiny.counters()
    assert c[Reason.KNOCK_COMPLETED] == 5, "the 5th knock did not even complete"
    assert c[Reason.GRANT_FAILED] == 1, "the refused grant was not counted"
    assert (c[Reason.GRANT_ISSUED], c[Reason.GRANT_CREATED]) == (4, 4)
    seen = events(tiny)
    assert (layout.Event.GRANT_FAILED, FIFTH) in seen, f"no GRANT_FAILED event for {FIFTH}: {seen}"
    assert [e for e in seen if e[0] == layout.Event.GRANTED] == [(layout.Event.GRANTED, s) for s in SOURCES]

    # No eviction: the same four grants, untouched.
    assert grant_values(tiny) == before
    assert tiny.run(tcp(FIFTH, 22)) == XDP_DROP, "the refused source reached the guarded port"
    for src in SOURCES:
        assert tiny.run(tcp(src, 22)) == XDP_PASS, f"{src} lost its grant to the 5th source"
    assert grant_values(tiny).keys() == before.keys()


def test_a_grant_dead_on_both_clocks_frees_its_slot_for_the_refused_source(tiny):
    first, *others = SOURCES
    knock(tiny, first)                      # its grant: window to +10 s, idle clock to +20 s
    tiny.advance(15)
    for src in others:                      # theirs: window to +25 s
        knock(tiny, src)
    knock(tiny, FIFTH)
    assert tiny.counters()[Reason.GRANT_FAILED] == 1
    assert tiny.run(tcp(FIFTH, 22)) == XDP_DROP

    # Past both clocks of the first grant, within the window of the others.
    tiny.set_clock(T0 + int((IDLE_S + 1) * 1e9))
    assert first in grant_values(tiny), "nothing should remove it before a packet meets it"
    assert tiny.run(tcp(first, 22)) == XDP_DROP, "a grant dead on both clocks still passed"
    assert tiny.counters()[Reason.GRANT_EXPIRED] == 1
    assert first not in grant_values(tiny), "the data path did not delete the dead grant it met"

    knock(tiny, FIFTH)
    c = tiny.counters()
    assert c[Reason.GRANT_FAILED] == 1, "the freed slot was not used"
    assert c[Reason.GRANT_ISSUED] == 5
    assert sorted(grant_values(tiny)) == sorted([*others, FIFTH])
    assert tiny.run(tcp(FIFTH, 22)) == XDP_PASS
    for src in others:
        assert tiny.run(tcp(src, 22)) == XDP_PASS
    assert tiny.run(tcp(first, 22)) == XDP_DROP


def test_renewing_a_grant_in_a_full_map_still_works(tiny):
    """Knocking again rewrites an existing entry: a full map must not refuse that."""
    for src in SOURCES:
        knock(tiny, src)
    tiny.advance(STEP_TIMEOUT_S + 1)
    knock(tiny, SOURCES[0])
    c = tiny.counters()
    assert c[Reason.GRANT_FAILED] == 0, "renewing an existing grant was refused in a full map"
    assert (c[Reason.GRANT_ISSUED], c[Reason.GRANT_CREATED]) == (5, 4)
    window_end = grant_values(tiny)[SOURCES[0]][0]
    assert window_end > T0 + int(OPEN_FOR_S * 1e9) + int(STEP_TIMEOUT_S * 1e9), "the grant was not renewed"


def test_an_operator_grant_into_a_full_map_is_refused_cleanly(tiny):
    for src in SOURCES:
        knock(tiny, src)
    before = grant_values(tiny)
    with pytest.raises(XknockError, match="grants map is full"):
        operator_grant(tiny.maps, FIFTH, [("tcp", 22)], for_ns=int(30e9), now=tiny.now_ns)
    assert grant_values(tiny) == before
    assert tiny.counters()[Reason.GRANT_OPERATOR] == 0


def test_a_refused_write_leaves_the_grants_that_already_existed_as_they_were(tiny):
    """Issue 13 item 16: a write of several ports that fails on a full map must
    not leave the ports that already had a grant rewritten (a longer window
    nobody granted)."""
    from xknock.controller.state.grants import write_grants
    for src in SOURCES:
        knock(tiny, src)
    before = {k: bytes(v) for k, v in tiny.grants().items()}
    with pytest.raises(XknockError, match="grants map is full"):
        # tcp:22 of SOURCES[0] exists and comes first; tcp:80 finds no room.
        write_grants(tiny.maps, SOURCES[0], [("tcp", 22), ("tcp", 80)], for_ns=int(3600e9),
                     idle_ns=int(3600e9), now=tiny.now_ns)
    after = {k: bytes(v) for k, v in tiny.grants().items()}
    assert after == before, "the refused write changed a grant that already existed"
    assert tiny.counters()[Reason.GRANT_OPERATOR] == 0
