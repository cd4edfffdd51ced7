"""A full bans map, through BPF_PROG_TEST_RUN (issue 13 item 7).

Spoofers who know one first step can fill the bans map (a plain hash: nothing
evicts a ban) with sources of their own: a first step and a wrong one from
each. The program is built with room for 4 bans (-DXK_BAN_ENTRIES=4) and bans
after one failed sequence. A 5th source that fails must not be banned, must
be counted (BAN_FAILED), and must unban nobody; nothing opens for it. Its
next failure tries again, and succeeds once a ban has ended and been swept
(the controller's FullBansWatch sweeps at once and warns once).

The test clock drives time; nothing sleeps.
"""

import pytest
from xknock_dev.packets import step, tcp

from xknock.controller.config import parse_config
from xknock.controller.kernel.layout import Reason
from xknock.controller.state import bans
from xknock_dev.testrun import XDP_DROP, XDP_PASS, Harness

BAN_ENTRIES = 4
KNOCK = ["udp:7100", "tcp:7200", "tcp:7300"]
BAN_FOR_S = 60
CONFIG = f"""
[filter]
answer = "drop"

[[sequence]]
name = "tiny"
knock = {KNOCK!r}
step_timeout = "5s"
open = ["tcp:22"]

[ban]
after = 1
within = "1m"
for = "{BAN_FOR_S}s"
scope = "all"
""".replace("'", '"')
SPOOFED = [f"198.51.100.{i}" for i in range(1, BAN_ENTRIES + 1)]
FIFTH = "2001:db8:77::5"   # another family: the map is shared by both
T0 = 1_000_000_000_000


@pytest.fixture(scope="module")
def small():
    h = Harness(cflags=[f"-DXK_BAN_ENTRIES={BAN_ENTRIES}"])
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def tiny(small):
    small.reset_state()
    small.set_clock(T0)
    small.apply(parse_config(CONFIG, listening=set()))
    return small


def fail(h, src):
    """A first step, then a wrong one: one failed sequence."""
    assert h.run(step(src, KNOCK[0])) == XDP_DROP
    h.advance(0.1)
    assert h.run(step(src, KNOCK[2])) == XDP_DROP
    h.advance(0.1)


def banned(h):
    return {str(b.source) for b in bans.list_bans(h.maps, now=h.now_ns)}


def test_the_build_really_has_four_ban_slots(tiny):
    assert tiny.maps.bans.max_entries == BAN_ENTRIES


def test_a_full_bans_map_refuses_the_new_ban_and_unbans_nobody(tiny):
    for src in SPOOFED:
        fail(tiny, src)
    assert banned(tiny) == set(SPOOFED)
    before = {bytes(k): (v.until_ns, v.since_ns) for k, v in tiny.maps.bans.items()}

    fail(tiny, FIFTH)
    c = tiny.counters()
    assert (c[Reason.BAN_ISSUED], c[Reason.BAN_FAILED]) == (4, 1)
    assert {bytes(k): (v.until_ns, v.since_ns) for k, v in tiny.maps.bans.items()} == before
    for src in SPOOFED:
        assert tiny.run(tcp(src, 80)) == XDP_DROP, f"{src} was unbanned for the 5th"
    # The unbanned 5th is judged as anyone: nothing opened for it, unguarded ports pass.
    assert tiny.run(tcp(FIFTH, 22)) == XDP_DROP
    assert tiny.run(tcp(FIFTH, 80)) == XDP_PASS
    c = tiny.counters()
    assert (c[Reason.DROP_BANNED], c[Reason.DROP_NO_GRANT], c[Reason.PASS_UNGUARDED]) == (4, 1, 1)
    assert c[Reason.GRANT_ISSUED] == 0

    fail(tiny, FIFTH)   # its failures are kept: each next one tries again
    assert tiny.counters()[Reason.BAN_FAILED] == 2
    assert FIFTH not in banned(tiny)


def test_the_watch_warns_once_sweeps_ended_bans_and_the_next_failure_bans(tiny):
    watch = bans.FullBansWatch(tiny.maps)
    fail(tiny, SPOOFED[0])
    tiny.advance(BAN_FOR_S / 2)
    for src in SPOOFED[1:]:
        fail(tiny, src)
    assert watch.check(now=tiny.now_ns) is None   # bans written, none refused

    fail(tiny, FIFTH)
    assert FIFTH not in banned(tiny)
    tiny.advance(BAN_FOR_S / 2)   # the first spoofed ban is over; nobody met it
    warning = watch.check(now=tiny.now_ns)
    assert warning and "bans map is full (4 entries): 1 ban(s) could not be written" in warning
    assert "1 ended ban(s) swept" in warning
    assert tiny.counters()[Reason.BAN_REMOVED] == 1
    fail(tiny, FIFTH)   # still full of refusals in this episode: no second warning
    assert watch.check(now=tiny.now_ns) is None
    assert FIFTH in banned(tiny), "the swept room did not take the next ban"
    assert tiny.run(tcp(FIFTH, 80)) == XDP_DROP

    # a ban written re-arms the warning for the next episode
    for src in SPOOFED[1:]:
        assert bans.unban(tiny.maps, src)
    fail(tiny, "198.51.100.50")
    assert watch.check(now=tiny.now_ns) is None
    for src in ("198.51.100.51", "198.51.100.52", "198.51.100.53"):
        fail(tiny, src)
    assert watch.check(now=tiny.now_ns).startswith("the bans map is full")


def test_the_running_controller_logs_a_full_bans_map_once(tiny, monkeypatch, caplog):
    """The real Controller loop: its check every BAN_CHECK_EVERY_S (shortened
    here) logs the first refusals, not the ones after them."""
    import threading
    import types

    from xknock.controller.daemon import daemon
    from xknock_dev.lab import wait_for

    monkeypatch.setattr(daemon, "BAN_CHECK_EVERY_S", 0.01)
    monkeypatch.setattr(bans, "monotonic_ns", lambda: tiny.now_ns)   # its sweep on the test clock
    signals = daemon.Signals()   # not installed: the test sets its flags
    controller = daemon.Controller(types.SimpleNamespace(maps=tiny.maps), ["veth-test"], None,
                                   parse_config(CONFIG, listening=set()), signals=signals)
    for src in SPOOFED:
        fail(tiny, src)
    loop = threading.Thread(target=controller.run)
    loop.start()
    try:
        fail(tiny, FIFTH)
        assert wait_for(lambda: controller.full_bans.failed == 1)
        fail(tiny, FIFTH)
        assert wait_for(lambda: controller.full_bans.failed == 2)
    finally:
        signals.stop = True
        loop.join(10)
    assert not loop.is_alive()
    full = [r for r in caplog.records if r.getMessage().startswith("the bans map is full")]
    assert len(full) == 1 and full[0].levelname == "WARNING", [r.getMessage() for r in caplog.records]
