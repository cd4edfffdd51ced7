"""controller/cluster/: one node against a real three-member etcd on
loopback, writing into the real program's maps (the test harness): grants of
other nodes resynced and watched with their deadlines on this node's clock,
keys written by something else ignored with one line, unreachable
endpoints and bad certificates as one line, the replay claim won once.

Each test runs in a child process of its own (in_child): gRPC, once it runs
in a process, makes that process's later fork()s hang or abort, and the lab
tests after this module fork (pyroute2) in the pytest process. The product
forks only through vfork (subprocess), which gRPC's fork handlers never see."""

import functools
import ipaddress
import os
import traceback
import logging
import threading
import time

import pytest

from xknock.controller.cluster import records
from xknock.controller.cluster.etcd import ClusterUnavailable, Connection, check_files
from xknock.controller.cluster.node import ClusterNode
from xknock.controller.config.cluster_config import Cluster
from xknock.controller.kernel import layout
from xknock.controller.kernel.clock import monotonic_ns
from xknock.controller.kernel.maps import to_addr
from xknock.controller.spa.spa import ReplayClaimLost
from xknock.controller.spa.spa_replay import ReplayCacheError
from xknock.controller.state import grants
from xknock_dev.etcd import EtcdCluster, free_port, make_tls
from xknock_dev.lab import wait_for

PREFIX = "/xknock/t/"


def in_child(test):
    """Runs test in a forked child; its failure, with its traceback, fails the test here."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: never returns into pytest
            os.close(read)
            code, message = 0, b""
            try:
                test(*args, **kwargs)
            except BaseException:   # noqa: BLE001 (everything goes back to the parent)
                code, message = 1, traceback.format_exc().encode()
            try:
                with os.fdopen(write, "wb") as out:
                    out.write(message)
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as source:
            message = source.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            pytest.fail(message.decode(errors="replace") or f"the test's child process ended with status {status}",
                        pytrace=False)
    return wrapper
SECOND = 1_000_000_000


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with EtcdCluster.loopback(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def cluster_of(etcd, node="me", **kw):
    endpoints = tuple(("http", "127.0.0.1", m.client_port) for m in etcd.members)
    return Cluster(endpoints=endpoints, node=node, prefix=PREFIX, **kw)


@pytest.fixture
def clean(etcd):
    etcd.ctl("del", "--prefix", PREFIX)
    yield
    etcd.ctl("del", "--prefix", PREFIX)


def grant_of(maps, source, port=22):
    return maps.grants.lookup(layout.GrantKey(src=to_addr(ipaddress.ip_address(source)), proto=layout.PROTO_TCP,
                                              port=port))


def publish(etcd, source, open_for_s, node="other", port=22):
    now = time.time_ns()
    record = records.GrantRecord(ipaddress.ip_address(source), "tcp", port, now + open_for_s * SECOND, now,
                                 60 * SECOND, 7, 0, node)
    with Connection(cluster_of(etcd, node=node)) as connection:
        connection.put_grants([record])


@in_child
def test_grants_of_other_nodes_are_resynced_then_watched_with_deadlines_on_this_clock(xk, etcd, clean):
    publish(etcd, "192.0.2.1", 30)            # before the node starts: found by the resync
    publish(etcd, "192.0.2.9", 30, node="me")  # its own: already in its maps, not written again
    node = ClusterNode(cluster_of(etcd), xk.maps).start()
    try:
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.1") is not None, 10)
        publish(etcd, "192.0.2.2", 90)        # after: found by the watch
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.2") is not None, 10)
        assert grant_of(xk.maps, "192.0.2.9") is None
        first, second = grant_of(xk.maps, "192.0.2.1"), grant_of(xk.maps, "192.0.2.2")
        now = monotonic_ns()
        # Wall-clock deadlines carried, each converted to this node's monotonic clock.
        assert 25 * SECOND < first.window_end_ns - now <= 30 * SECOND
        assert 85 * SECOND < second.window_end_ns - now <= 90 * SECOND
        assert (second.idle_timeout_ns, second.seq_uid) == (60 * SECOND, 7)
        assert node.status()["reachable"] and node.counts["resyncs"] == 1 and node.counts["received"] == 2
    finally:
        node.close()


@in_child
def test_a_revoke_published_elsewhere_ends_the_grant_here(xk, etcd, clean):
    node = ClusterNode(cluster_of(etcd), xk.maps).start()
    try:
        publish(etcd, "192.0.2.3", 30)
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.3") is not None, 10)
        with Connection(cluster_of(etcd, node="other")) as connection:
            connection.revoke("192.0.2.3", "other")
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.3") is None, 10)
        assert etcd.get_prefix(PREFIX + "grants/") == {}
        assert node.counts["revokes_received"] == 1
    finally:
        node.close()


@in_child
def test_keys_written_by_something_else_are_ignored_one_line_each(xk, etcd, clean, caplog):
    for key, value in ((PREFIX + "grants/not-an-address/tcp:22", "{}"),
                       (PREFIX + "grants/192.0.2.4/tcp:22", "not json"),
                       (PREFIX + "grants/192.0.2.5/tcp:22", '{"v":1,"node":"x"}'),
                       (PREFIX + "config/something", "else")):
        assert etcd.ctl("put", key, value).returncode == 0
    with caplog.at_level(logging.WARNING, logger="xknock.cluster"):
        node = ClusterNode(cluster_of(etcd), xk.maps).start()
        try:
            assert wait_for(lambda: node.counts["resyncs"] == 1, 10)
            assert node.counts["bad_records"] == 4 and node.counts["received"] == 0
            assert grant_of(xk.maps, "192.0.2.4") is None and grant_of(xk.maps, "192.0.2.5") is None
        finally:
            node.close()
    ignored = [r for r in caplog.records if "did not write" in r.getMessage()]
    assert len(ignored) == 4 and not any(r.exc_info for r in caplog.records)


@in_child
def test_unreachable_endpoints_are_one_line_and_the_node_decides_alone(xk, caplog):
    dead = Cluster(endpoints=(("http", "127.0.0.1", free_port()), ("http", "127.0.0.1", free_port())), node="me",
                   prefix=PREFIX, timeout_ns=SECOND)
    with pytest.raises(ClusterUnavailable) as caught:
        Connection(dead)
    assert str(caught.value).startswith("etcd unreachable: http://127.0.0.1:") and "\n" not in str(caught.value)
    with caplog.at_level(logging.WARNING, logger="xknock.cluster"):
        node = ClusterNode(dead, xk.maps).start()
        try:
            assert wait_for(lambda: node.counts["outages"] == 1 and node.last_error, 10)
            assert not node.status()["reachable"]
            with pytest.raises(ReplayCacheError, match="spa_unreachable"):
                node.claim(b"\1" * 32, 0)            # refuse, the default
            local = ClusterNode(Cluster(endpoints=dead.endpoints, node="me", prefix=PREFIX, spa_unreachable="local"),
                                xk.maps)
            local.claim(b"\1" * 32, 0)                 # the local cache alone decides
        finally:
            node.close()
    assert [r.getMessage() for r in caplog.records].count(
        "cluster: etcd unreachable; this node decides alone until it returns") == 1


@in_child
def test_bad_certificates_are_one_line(tmp_path, etcd):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ClusterUnavailable, match=r"ca_file .*: not a PEM file"):
        check_files(Cluster(endpoints=(("https", "127.0.0.1", 1),), node="me", ca_file=str(bogus)))
    # A PEM that is no CA of this etcd (which speaks plain HTTP): the handshake fails, one line.
    pem = tmp_path / "other-ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    tls = Cluster(endpoints=(("https", "127.0.0.1", etcd.members[0].client_port),), node="me", ca_file=str(pem),
                  timeout_ns=SECOND)
    with pytest.raises(ClusterUnavailable) as caught:
        Connection(tls)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


@in_child
def test_one_digest_claimed_by_two_nodes_at_once_is_won_once(etcd, clean):
    digest = bytes(range(32))
    results = []
    barrier = threading.Barrier(2)
    connections = [Connection(cluster_of(etcd, node=name), start_at=i) for i, name in enumerate(("x", "y"))]

    def claim(connection):
        barrier.wait()
        results.append(connection.claim_digest(digest, 10, connection.cluster.node))

    try:
        threads = [threading.Thread(target=claim, args=(c,)) for c in connections]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        for connection in connections:
            connection.close()
    assert sorted(results) == [False, True]
    assert list(etcd.get_prefix(PREFIX + "spa/")) == [PREFIX + "spa/" + digest.hex()]


@in_child
def test_a_lost_claim_is_a_replay(xk, etcd, clean):
    node = ClusterNode(cluster_of(etcd), xk.maps).start()
    try:
        assert wait_for(lambda: node.reachable, 10)
        with Connection(cluster_of(etcd, node="other")) as connection:
            assert connection.claim_digest(b"\2" * 32, 10, "other")
        with pytest.raises(ReplayClaimLost):
            node.claim(b"\2" * 32, 0)
        node.claim(b"\3" * 32, 0)   # a new one: won
        assert (node.counts["claims_lost"], node.counts["claims_won"]) == (1, 1)
    finally:
        node.close()


@in_child
def test_tls_with_a_client_certificate_works_and_a_wrong_ca_or_no_certificate_is_one_line(tmp_path):
    server = make_tls(tmp_path, "etcd")
    other = make_tls(tmp_path, "stranger")
    with EtcdCluster.loopback(tmp_path, size=1, tls=server) as etcd:
        port = etcd.members[0].client_port

        def cluster(ca, cert=None, key=None):
            return Cluster(endpoints=(("https", "127.0.0.1", port),), node="me", prefix=PREFIX, ca_file=ca,
                           cert_file=cert, key_file=key, timeout_ns=2 * SECOND)

        good = cluster(server["ca"], server["cert"], server["key"])
        check_files(good)
        with Connection(good) as connection:
            assert connection.claim_digest(b"\4" * 32, 10, "me")
        assert list(etcd.get_prefix(PREFIX + "spa/")) == [PREFIX + "spa/" + (b"\4" * 32).hex()]
        for bad, says in ((cluster(other["ca"], server["cert"], server["key"]), "certificate verify failed"),
                          (cluster(server["ca"]), ""),                                # no client certificate
                          (cluster(server["ca"], other["cert"], other["key"]), "")):  # one etcd does not trust
            with pytest.raises(ClusterUnavailable) as caught:
                Connection(bad)
            assert str(caught.value).startswith(f"etcd unreachable: https://127.0.0.1:{port}: ")
            assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def tiny():
    """The real program with a grants map of 4 entries (built here, in the
    pytest process: no gRPC yet), for the node whose map is full."""
    from xknock_dev.testrun import Harness

    with Harness(cflags=["-DXK_GRANT_ENTRIES=4"]) as harness:
        yield harness


def values_of(maps):
    return {bytes(key): bytes(value) for key, value in maps.grants.items()}


@in_child
def test_a_grant_that_does_not_fit_is_counted_logged_and_nothing_else_changes(tiny, etcd, clean, caplog):
    tiny.reset_state()
    for i in range(3):   # this node's own grants: one entry left
        grants.write_grants(tiny.maps, f"198.51.100.{i}", [("tcp", 22)], 60 * SECOND, 60 * SECOND, seq_uid=5)
    own = values_of(tiny.maps)
    publish(etcd, "192.0.2.30", 30)
    publish(etcd, "192.0.2.31", 30)   # found by the resync with no room left
    with caplog.at_level(logging.WARNING, logger="xknock.cluster"):
        node = ClusterNode(cluster_of(etcd), tiny.maps).start()
        try:
            assert wait_for(lambda: node.counts["resyncs"] == 1 and node.counts["grants_full"] == 1, 10), \
                node.status()
            # Two more in one transaction, seen by the watch: neither fits,
            # and the revoke after them in the stream is applied all the same.
            now = time.time_ns()
            with Connection(cluster_of(etcd, node="other")) as connection:
                connection.put_grants([records.GrantRecord(ipaddress.ip_address(f"192.0.2.{i}"), "tcp", 22,
                                                           now + 30 * SECOND, now, 60 * SECOND, 7, 0, "other")
                                       for i in (32, 33)])
                assert wait_for(lambda: node.counts["grants_full"] == 3, 10), node.status()
                fitted = "192.0.2.30" if grant_of(tiny.maps, "192.0.2.30") is not None else "192.0.2.31"
                assert len(values_of(tiny.maps)) == 4 and node.counts["received"] == 1
                assert {k: v for k, v in values_of(tiny.maps).items() if k in own} == own   # untouched
                connection.revoke(fitted, "other")
            assert wait_for(lambda: grant_of(tiny.maps, fitted) is None, 10)
            publish(etcd, "192.0.2.34", 30)   # room again: written
            assert wait_for(lambda: grant_of(tiny.maps, "192.0.2.34") is not None, 10)
            status = node.status()
            assert status["reachable"] and (status["resyncs"], status["outages"]) == (1, 0), status
        finally:
            node.close()
    full = [r for r in caplog.records if "did not fit" in r.getMessage()]
    assert len(full) == 1 and not any(r.exc_info for r in caplog.records)   # one line a minute at most


@in_child
def test_a_restarted_node_applies_the_revokes_made_while_it_was_down(xk, etcd, clean):
    """Its maps outlive its controller: a grant revoked elsewhere meanwhile
    must not stay open here. Its own grants made after such a revoke stay."""
    node = ClusterNode(cluster_of(etcd), xk.maps).start()
    try:
        for source in ("192.0.2.40", "192.0.2.41"):
            publish(etcd, source, 60)
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.41") is not None, 10)
    finally:
        node.close()   # the controller is gone; the maps keep the grants
    with Connection(cluster_of(etcd, node="other")) as connection:
        connection.revoke("192.0.2.40", "other")
        connection.revoke("192.0.2.42", "other")
    publish(etcd, "192.0.2.43", 60)               # made while it was down
    # This node's own grant of a source revoked before it: made after, kept.
    grants.write_grants(xk.maps, "192.0.2.42", [("tcp", 22)], 60 * SECOND, 60 * SECOND, seq_uid=7)
    publish(etcd, "192.0.2.42", 60, node="me")
    assert grant_of(xk.maps, "192.0.2.40") is not None   # still open here, for now
    node = ClusterNode(cluster_of(etcd), xk.maps).start()
    try:
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.43") is not None, 10)
        assert wait_for(lambda: grant_of(xk.maps, "192.0.2.40") is None, 10)
        assert grant_of(xk.maps, "192.0.2.41") is not None and grant_of(xk.maps, "192.0.2.42") is not None
        assert node.counts["revokes_received"] == 2
    finally:
        node.close()


@in_child
def test_a_resync_reads_a_prefix_bigger_than_one_grpc_message(xk, etcd, clean):
    """gRPC refuses a message over 4 MB: 25,000 grants are some 5 MB, read in pages."""
    now = time.time_ns()
    with Connection(cluster_of(etcd, node="other")) as connection:
        for start in range(0, 25_000, 128):   # etcd's default --max-txn-ops
            connection.put_grants([records.GrantRecord(ipaddress.ip_address(0x0A000000 + i), "tcp", 22,
                                                       now + 60 * SECOND, now, 60 * SECOND, 7, 0, "other" * 20)
                                   for i in range(start, min(start + 128, 25_000))])
        revision, kvs = connection.read_prefix(PREFIX)
    assert len(kvs) == 25_000 and len({kv.key for kv in kvs}) == 25_000
    assert sum(len(kv.key) + len(kv.value) for kv in kvs) > 4 << 20
    assert revision >= max(kv.mod_revision for kv in kvs)


def test_grpc_never_ran_in_the_pytest_process():
    """The guard of in_child: the tests after this module fork safely."""
    import sys

    assert "grpc" not in sys.modules and "etcd3" not in sys.modules


def queue_grants(maps, node, count, first=0x0A100000, window_s=30):
    """count grants in the maps, each handed to node as a completed knock's."""
    sources = [ipaddress.ip_address(first + i) for i in range(count)]
    for source in sources:
        grants.write_grants(maps, source, [("tcp", 22)], window_s * SECOND, 60 * SECOND, seq_uid=5)
        node.publish_local_grants(source, 5)
    return sources


@in_child
def test_grants_waiting_together_go_out_in_few_transactions_under_shared_leases(xk, etcd, clean):
    node = ClusterNode(cluster_of(etcd), xk.maps)
    sources = queue_grants(xk.maps, node, 300)   # queued before the node connects: they wait together
    # One source again, with a longer window: one key, as queued last (etcd
    # refuses a key twice in one transaction).
    grants.write_grants(xk.maps, sources[0], [("tcp", 22)], 45 * SECOND, 60 * SECOND, seq_uid=5)
    node.publish_local_grants(sources[0], 5)
    node.start()
    try:
        assert wait_for(lambda: node.counts["published"] == 300, 20), node.status()
        assert (node.counts["publish_txns"], node.counts["publish_failed"]) == (3, 0)   # 128 + 128 + 44 puts
        with Connection(cluster_of(etcd, node="other")) as connection:
            _, kvs = connection.read_prefix(PREFIX + "grants/")
            assert len(kvs) == 300
            leases = {kv.lease for kv in kvs if kv.key != records.grant_key(PREFIX, sources[0], "tcp", 22).encode()}
            assert len(leases) <= 2   # their deadlines fall in one second (or two, straddling one)
            [longer] = [kv for kv in kvs if kv.key == records.grant_key(PREFIX, sources[0], "tcp", 22).encode()]
            record = records.decode_grant(PREFIX, longer.key.decode(), longer.value)
            assert 40 * SECOND < record.window_end_wall_ns - time.time_ns() <= 45 * SECOND
            # Each key lives at least until its grant is dead, and under two seconds longer.
            for kv in (kvs[0], longer):
                record = records.decode_grant(PREFIX, kv.key.decode(), kv.value)
                ttl = connection.client.get_lease_info(kv.lease).TTL
                left = (record.end_wall_ns - time.time_ns()) / SECOND
                assert left - 1 <= ttl <= left + 2, (ttl, left)
    finally:
        node.close()


@in_child
def test_a_batch_etcd_fails_halfway_is_kept_and_published_whole_on_return(xk, etcd, clean, caplog):
    from xknock.controller.cluster import etcd as etcd_module

    calls = []
    put_all = etcd_module.Connection.put_all

    def fails_second(self, entries):
        calls.append(len(entries))
        if len(calls) == 2:
            raise ConnectionError("etcd went away mid-batch")
        return put_all(self, entries)

    etcd_module.Connection.put_all = fails_second   # this child's alone
    node = ClusterNode(cluster_of(etcd), xk.maps)
    queue_grants(xk.maps, node, 300)
    node.start()
    try:
        assert wait_for(lambda: len(etcd.get_prefix(PREFIX + "grants/")) == 300, 30), node.status()
        assert node.counts["publish_failed"] == 1 and node.counts["outages"] == 1 and node.counts["resyncs"] == 2
        assert node.counts["published"] == 300 and calls[:2] == [128, 128]
    finally:
        node.close()


@in_child
def test_a_lost_claim_leaves_the_shared_lease_and_the_keys_on_it(etcd, clean):
    """Claims share leases (one per second of expiry): a lost claim must not
    revoke the lease, which holds other packets' claims."""
    with Connection(cluster_of(etcd, node="x")) as x, Connection(cluster_of(etcd, node="y")) as y:
        assert x.claim_digest(b"\5" * 32, 30, "x")
        assert y.claim_digest(b"\6" * 32, 30, "y")        # y's lease for that second
        assert not y.claim_digest(b"\5" * 32, 30, "y")    # a replay to y: lost, on the same lease
        assert y.claim_digest(b"\7" * 32, 30, "y")
        _, kvs = y.read_prefix(PREFIX + "spa/")
        by_digest = {kv.key.decode().rpartition("/")[2]: kv for kv in kvs}
        assert set(by_digest) == {(b"\5" * 32).hex(), (b"\6" * 32).hex(), (b"\7" * 32).hex()}
        assert y.client.get_lease_info(by_digest[(b"\6" * 32).hex()].lease).TTL >= 29
