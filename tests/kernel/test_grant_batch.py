"""grants.write_batch, which writes the grants a cluster node receives (the
resync, the watch): many under one map lock, through BPF_MAP_UPDATE_BATCH,
never shortening a longer grant held here, and on a full map skipping the
keys it refuses while writing the others. The real program's grants map,
built with room for 4."""

import ipaddress

import pytest
from xknock_dev.testrun import Harness

from xknock.controller.kernel import layout
from xknock.controller.kernel.layout import Reason
from xknock.controller.kernel.maps import to_addr
from xknock.controller.state import grants

S = 1_000_000_000
T0 = 1_000 * S


@pytest.fixture(scope="module")
def small():
    with Harness(cflags=["-DXK_GRANT_ENTRIES=4"]) as h:
        yield h


@pytest.fixture
def maps(small):
    small.reset_state()
    return small.maps


def key(n):
    return layout.GrantKey(src=to_addr(ipaddress.ip_address(f"198.51.100.{n}")), proto=6, port=22)


def grant(window_end_s, idle_s=10, last_seen_s=1_000, flags=0):
    return layout.Grant(window_end_ns=window_end_s * S, idle_timeout_ns=idle_s * S, last_seen_ns=last_seen_s * S,
                        seq_uid=7, flags=flags)


def stored(maps):
    return {bytes(k): (v.window_end_ns // S, v.idle_timeout_ns // S, v.last_seen_ns // S, v.seq_uid, v.flags)
            for k, v in maps.grants.items()}


def counted(maps):
    by_reason = maps.counters_by_reason()
    return by_reason[Reason.GRANT_OPERATOR], by_reason[Reason.SPA_GRANT_CREATED]


def test_a_batch_is_written_whole_both_clocks_kept_and_new_keys_counted(maps):
    entries = [(key(1), grant(1_060)), (key(2), grant(1_030, idle_s=60, last_seen_s=1_010)),
               (key(3), grant(1_045, flags=layout.GRANT_SPA))]
    assert grants.write_batch(maps, entries) == ([0, 1, 2], [])
    assert stored(maps) == {bytes(key(1)): (1_060, 10, 1_000, 7, 0), bytes(key(2)): (1_030, 60, 1_010, 7, 0),
                            bytes(key(3)): (1_045, 10, 1_000, 7, layout.GRANT_SPA)}
    assert counted(maps) == (2, 1)
    # Written again, longer: rewritten, not counted as new.
    assert grants.write_batch(maps, [(key(1), grant(1_090))]) == ([0], [])
    assert stored(maps)[bytes(key(1))][0] == 1_090 and counted(maps) == (2, 1)


def test_a_grant_held_here_at_least_as_long_on_both_clocks_is_never_shortened(maps):
    grants.write_batch(maps, [(key(1), grant(1_060, idle_s=60)), (key(2), grant(1_060, idle_s=10))])
    shorter_window = grant(1_030, idle_s=60)
    longer_idle = grant(1_030, idle_s=120)      # a shorter window, but alive longer on the idle clock
    assert grants.write_batch(maps, [(key(1), shorter_window), (key(2), longer_idle)]) == ([1], [])
    assert stored(maps)[bytes(key(1))][:2] == (1_060, 60)
    assert stored(maps)[bytes(key(2))][:2] == (1_030, 120)


def test_on_a_full_map_the_refused_keys_are_skipped_and_the_rest_written(maps):
    assert grants.write_batch(maps, [(key(n), grant(1_060)) for n in (1, 2, 3, 4)]) == ([0, 1, 2, 3], [])
    batch = [(key(1), grant(1_090)), (key(5), grant(1_090)), (key(2), grant(1_090)), (key(6), grant(1_090)),
             (key(3), grant(1_090))]
    assert grants.write_batch(maps, batch) == ([0, 2, 4], [1, 3])
    assert {bytes(key(n)) for n in (5, 6)}.isdisjoint(stored(maps))
    assert [stored(maps)[bytes(key(n))][0] for n in (1, 2, 3, 4)] == [1_090, 1_090, 1_090, 1_060]
    assert counted(maps) == (4, 0)
