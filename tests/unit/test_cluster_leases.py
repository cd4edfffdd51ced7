"""controller/cluster/etcd.py's SharedLeases, with a client that counts
lease grants: one lease per wall-clock second of deadline, never one that
ends before its keys' deadline, never one about to end."""

import types

import pytest

from xknock.controller.cluster import etcd

SECOND = 1_000_000_000
NOW = 1_800_000_000 * SECOND + 300_000_000   # a wall-clock time, 0.3 s into a second


class Client:
    def __init__(self):
        self.ttls = []

    def lease(self, ttl):
        self.ttls.append(ttl)
        return types.SimpleNamespace(id=len(self.ttls))


@pytest.fixture
def monotonic(monkeypatch):
    clock = types.SimpleNamespace(now=5_000 * SECOND)
    monkeypatch.setattr(etcd.time, "monotonic_ns", lambda: clock.now)
    return clock


def test_keys_whose_deadlines_fall_in_one_second_share_a_lease(monotonic):
    client = Client()
    leases = etcd.SharedLeases(client)
    first = leases.until(NOW + 30 * SECOND, NOW)
    assert leases.until(NOW + 30 * SECOND + 600_000_000, NOW) == first   # 30.9 s: the same second
    assert leases.until(NOW + 31 * SECOND, NOW) != first                  # 31.3 s: the next one
    assert len(client.ttls) == 2


def test_a_lease_ends_after_its_second_and_under_two_seconds_past_a_deadline(monotonic):
    client = Client()
    leases = etcd.SharedLeases(client)
    for deadline in (NOW + 30 * SECOND, NOW + 30 * SECOND + 650_000_000, NOW + 3_600 * SECOND):
        leases.until(deadline, NOW)
        second_end = -(-deadline // SECOND) * SECOND
        assert NOW + client.ttls[-1] * SECOND >= second_end              # never before the deadline's second ends
        assert NOW + client.ttls[-1] * SECOND < deadline + 2 * SECOND    # and under two seconds past the deadline


def test_a_deadline_about_to_pass_gets_a_lease_that_outlives_its_transaction(monotonic):
    client = Client()
    leases = etcd.SharedLeases(client)
    leases.until(NOW + 100_000_000, NOW)   # 0.1 s left
    assert client.ttls[-1] * SECOND >= etcd.LEASE_MARGIN_NS


def test_a_lease_near_its_end_is_not_handed_out_again_even_when_the_wall_clock_stepped_back(monotonic):
    client = Client()
    leases = etcd.SharedLeases(client)
    first = leases.until(NOW + 5 * SECOND, NOW)
    # 4.5 s later on the monotonic clock, the wall clock stepped back as much:
    # the same deadline's second, but its lease ends within the margin.
    monotonic.now += 4_500_000_000
    assert leases.until(NOW + 5 * SECOND, NOW) != first
    assert len(client.ttls) == 2
