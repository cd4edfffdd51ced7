"""[cluster] end to end: three server namespaces (srv, srv2, srv3: nodes A, B,
C, each its own address on the lab's bridge, its own filter and controller),
a real three-member etcd (one member in each server's namespace, so that the
controllers reach it over the lab's network), a client and an attacker.

The client knocks or sends its SPA packet to A and then connects to B and C,
another node than the one it knocked, as a 5-tuple hash behind ECMP would
send it. Captured packets replayed to the other nodes open nothing; one
packet sent to two nodes at once is accepted once; a revoke on C closes A
and B; with etcd SIGKILLed every node still enforces and local knocks still
open locally, and when etcd returns the nodes converge.
"""

import base64
import errno
import ipaddress
import os
import signal
import subprocess
import threading
import time
import types

import pytest
from xknock_dev.e2e import Foreground, TcpEchoServer, check, knock, status_json, write_config, xknock
from xknock_dev.etcd import EtcdCluster
from xknock_dev.lab import HELPER_PYTHON, can_connect, lab, wait_for

pytestmark = pytest.mark.netns

GUARDED = 22
SPA_PORT = 62201
SEQUENCE = ("tcp:7000", "udp:8000", "tcp:9000")
KEY, HMAC_KEY = os.urandom(32), os.urandom(64)
KEY_B64, HMAC_B64 = base64.b64encode(KEY).decode(), base64.b64encode(HMAC_KEY).decode()
FWKNOP = "/usr/bin/fwknop"
PREFIX = "/xknock/test/"

CONFIG = """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:{guarded}"]
open_for = "60s"
idle_timeout = "1m"
on_open = ["/bin/sh", "-c", 'echo "open $XKNOCK_SOURCE" >> {hook_log}']
on_close = ["/bin/sh", "-c", 'echo "close $XKNOCK_SOURCE" >> {hook_log}']

[spa]
port = {spa_port}
replay_cache = "{cache}"

[[spa.user]]
name = "alice"
key = "{key}"
hmac_key = "{hmac}"
username = "alice"
open = ["tcp:{guarded}"]
open_for = "60s"

[ban]
after = 2
within = "1m"
for = "10m"
scope = "all"

[cluster]
endpoints = [{endpoints}]
prefix = "{prefix}"
node = "{node}"
timeout = "1s"
share_bans = true
"""
METRICS = "127.0.0.1:9477"   # node A's, in A's namespace

# The metrics text of argv[1], on stdout.
FETCH = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""

# The bytes of a file, one UDP datagram to each (address, port) given, back to back.
SEND_FILE = r"""
import socket, sys
data = open(sys.argv[1], "rb").read().strip()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for target in sys.argv[2:]:
    sock.sendto(data, (target, %d))
""" % SPA_PORT


def fwknop(host, server, save=None, allow=None):
    argv = [FWKNOP, "-A", f"tcp/{GUARDED}", "-D", server, "--use-hmac", "--key-base64-rijndael", KEY_B64,
            "--key-base64-hmac", HMAC_B64, "-U", "alice", "--no-save-args", "--no-rc-file"]
    argv += ["-a", allow] if allow else ["-s"]
    if save:
        argv += ["-B", save]
    result = host.run(argv, env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, f"fwknop failed: {result.stdout}{result.stderr}"


def opens(host, server, timeout=5.0):
    return wait_for(lambda: can_connect(host, server, GUARDED, timeout=0.5), timeout=timeout)


def shut(host, server):
    return not can_connect(host, server, GUARDED, timeout=0.5)


def closes(host, server, timeout=5.0):
    return wait_for(lambda: shut(host, server), timeout=timeout)


def counters(node):
    return status_json(node.host)[0]["counters"]


class Node:
    def __init__(self, name, host, config_path, *args):
        self.name, self.host, self.config_path = name, host, config_path
        self.controller = Foreground(types.SimpleNamespace(server=host, server_iface=host.iface), config_path, *args)

    def restart(self):
        """A new controller over the filter the last one left attached."""
        self.controller = Foreground(types.SimpleNamespace(server=self.host, server_iface=self.host.iface),
                                     self.config_path)
        # It logs "replaced program" (its own), not "attached"; the cluster's
        # thread may say "etcd reachable" before the loop says "running".
        for said in ("controller running", "etcd reachable"):
            self.controller.log.consumed = 0
            assert self.controller.log.wait_for(lambda line: said in line, 240), self.controller.log.read_all(0.5)

    def hook_lines(self, tmp):
        try:
            with open(tmp / f"hooks-{self.name}.log") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def cluster_status(self):
        return status_json(self.host)[0]["cluster"]

    def metric(self, name):
        """The value of name{node=...} on A's /metrics."""
        text = check(self.host.run([HELPER_PYTHON, "-c", FETCH, f"http://{METRICS}/metrics"])).stdout
        for line in text.splitlines():
            if line.startswith(f'{name}{{node="{self.name}"}}'):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not on /metrics:\n{text}")

    @property
    def addr(self):
        return self.host.ipv4

    def xknock(self, *args):
        return xknock(self.host, *args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not os.access(FWKNOP, os.X_OK):
        pytest.fail("the fwknop client is not installed: scripts/setup installs fwknop-client")
    tmp = tmp_path_factory.mktemp("cluster")
    with lab("xkcl", ipv6=False, servers=3) as net:
        echoes = [TcpEchoServer(host, GUARDED) for host in net.servers]
        etcd = EtcdCluster.on_hosts(tmp, net.servers)
        nodes = []
        try:
            etcd.start(timeout=60)
            endpoints = ", ".join(f'"{url}"' for url in etcd.endpoints)
            for name, host in zip("abc", net.servers):
                path = write_config(tmp, f"{name}.toml", CONFIG.format(
                    guarded=GUARDED, spa_port=SPA_PORT, cache=tmp / f"replay-{name}", key=KEY_B64, hmac=HMAC_B64,
                    endpoints=endpoints, prefix=PREFIX, node=name, hook_log=tmp / f"hooks-{name}.log"))
                os.chmod(path, 0o600)
                nodes.append(Node(name, host, path, *(["--metrics-addr", METRICS] if name == "a" else [])))
            for node in nodes:
                node.controller.wait_ready(timeout=240)
            for node in nodes:
                assert node.controller.log.wait_for(lambda line: "etcd reachable" in line, 30), \
                    node.controller.log.read_all(0.5)
            yield types.SimpleNamespace(net=net, etcd=etcd, nodes=nodes, tmp=tmp)
        finally:
            for node in nodes:
                node.controller.stop()
            etcd.stop()
            for echo in echoes:
                echo.stop()
            for host in net.servers:
                xknock(host, "detach", host.iface)


def fresh(cluster):
    """No grant of the client or attacker anywhere: revoked on A, for everyone."""
    a = cluster.nodes[0]
    for who in (cluster.net.client, cluster.net.attacker):
        check(a.xknock("revoke", a.host.iface, who.ipv4, "-c", a.config_path))
    for node in cluster.nodes:
        assert closes(cluster.net.client, node.addr), node.controller.log.read_all(0.5)


def test_a_knock_on_a_opens_b_and_c_for_the_knocker_only(cluster):
    a, b, c = cluster.nodes
    client, attacker = cluster.net.client, cluster.net.attacker
    fresh(cluster)
    knock(client, a.addr, *SEQUENCE)   # the knock goes to A; the connections go to B and C
    for node in (a, b, c):
        assert opens(client, node.addr), node.controller.log.read_all(0.5)
        assert shut(attacker, node.addr)
    published = cluster.etcd.get_prefix(PREFIX + "grants/")
    assert list(published) == [f"{PREFIX}grants/{client.ipv4}/tcp:{GUARDED}"]
    assert '"node":"a"' in published[f"{PREFIX}grants/{client.ipv4}/tcp:{GUARDED}"]


def test_spa_accepted_on_a_opens_b_and_c_and_its_replays_open_nothing(cluster):
    a, b, c = cluster.nodes
    client, attacker = cluster.net.client, cluster.net.attacker
    fresh(cluster)
    saved = str(cluster.tmp / "packet-a")
    before = {node.name: counters(node) for node in (a, b, c)}
    fwknop(client, a.addr, save=saved)   # -s: the packet's source is whom it opens for
    assert opens(client, a.addr), a.controller.log.read_all(0.5)
    accepted = time.monotonic()
    for node in (b, c):
        assert opens(client, node.addr, timeout=1.0), node.controller.log.read_all(0.5)
    print(f"SPA accepted on A -> connected to B and C after {time.monotonic() - accepted:.3f}s")
    # The captured packet, replayed by the attacker to B and C: each claims
    # its digest in etcd and loses, so nothing opens for the attacker.
    attacker.run([HELPER_PYTHON, "-c", SEND_FILE, saved, b.addr, c.addr])
    for node in (b, c):
        assert wait_for(lambda: counters(node)["spa_replayed"] == before[node.name]["spa_replayed"] + 1, 5), \
            node.controller.log.read_all(0.5)
        assert counters(node)["spa_accepted"] == before[node.name]["spa_accepted"]
    for node in (a, b, c):
        assert shut(attacker, node.addr)


def test_one_packet_at_two_nodes_at_once_is_accepted_once(cluster):
    a, b, c = cluster.nodes
    client = cluster.net.client
    fresh(cluster)
    saved = str(cluster.tmp / "packet-bc")
    # fwknop's own send goes to an address nobody has; the saved packet then
    # goes to B and C back to back, as two paths of an anycast address would.
    fwknop(client, "10.77.0.254", save=saved, allow=client.ipv4)
    before = {node.name: counters(node) for node in (b, c)}
    client.run([HELPER_PYTHON, "-c", SEND_FILE, saved, b.addr, c.addr])
    def judged():
        now = {node.name: counters(node) for node in (b, c)}
        return sum(now[n]["spa_accepted"] - before[n]["spa_accepted"] + now[n]["spa_replayed"]
                   - before[n]["spa_replayed"] for n in now) == 2 and now

    now = wait_for(judged, 5)
    assert now, {node.name: node.controller.log.read_all(0.2) for node in (b, c)}
    now = judged()
    accepted = sum(now[n]["spa_accepted"] - before[n]["spa_accepted"] for n in now)
    replayed = sum(now[n]["spa_replayed"] - before[n]["spa_replayed"] for n in now)
    assert (accepted, replayed) == (1, 1)
    for node in (a, b, c):   # granted once, on one node, and published to all
        assert opens(client, node.addr), node.controller.log.read_all(0.5)


def test_a_revoke_on_c_closes_a_and_b(cluster):
    a, b, c = cluster.nodes
    client = cluster.net.client
    fresh(cluster)
    knock(client, a.addr, *SEQUENCE)
    for node in (a, b, c):
        assert opens(client, node.addr)
    result = check(c.xknock("revoke", c.host.iface, client.ipv4, "-c", c.config_path))
    assert "published to the cluster" in result.stdout
    for node in (a, b, c):
        assert closes(client, node.addr), node.controller.log.read_all(0.5)
    assert not cluster.etcd.get_prefix(f"{PREFIX}grants/{client.ipv4}/")


def test_an_operator_grant_on_b_opens_a_and_c_with_its_window(cluster):
    a, b, c = cluster.nodes
    client = cluster.net.client
    fresh(cluster)
    result = check(b.xknock("grant", b.host.iface, client.ipv4, "--for", "45s", "-c", b.config_path))
    assert "(published to the cluster)" in result.stdout
    for node in (a, b, c):
        assert opens(client, node.addr), node.controller.log.read_all(0.5)
    # Both clocks kept: the window B gave, counted on C's own clock.
    [shown] = [g for g in status_json(c.host)[0]["grants"] if g["source"] == client.ipv4]
    assert 30 < shown["window_left_s"] <= 45 and shown["sequence"] == "operator"


def test_bans_are_shared_and_an_unban_on_c_lifts_them_everywhere(cluster):
    a, b, c = cluster.nodes
    attacker = cluster.net.attacker
    for _ in range(2):   # two failed sequences on A: banned there
        knock(attacker, a.addr, "tcp:7000", "tcp:9000")
    for node in (a, b, c):
        assert wait_for(lambda: [ban["source"] for ban in status_json(node.host)[0]["bans"]] == [attacker.ipv4], 5), \
            node.controller.log.read_all(0.5)
    # Banned on B too: its right knock opens nothing there.
    knock(attacker, b.addr, *SEQUENCE)
    assert shut(attacker, b.addr)
    result = check(c.xknock("unban", c.host.iface, attacker.ipv4, "-c", c.config_path))
    assert "published to the cluster" in result.stdout
    for node in (a, b, c):
        assert wait_for(lambda: status_json(node.host)[0]["bans"] == [], 5), node.controller.log.read_all(0.5)


def test_status_and_metrics_show_the_cluster(cluster):
    a, b, c = cluster.nodes
    fresh(cluster)
    knock(cluster.net.client, a.addr, *SEQUENCE)
    assert opens(cluster.net.client, c.addr)
    # the node writes its report about once a second: the grant's arrival may be in the next one
    assert wait_for(lambda: c.cluster_status()["received"] >= 1, 5)
    shown = c.cluster_status()
    assert shown["node"] == "c" and shown["reachable"] and not shown["stale"] and shown["received"] >= 1
    text = check(xknock(c.host, "status", c.host.iface)).stdout
    assert "cluster: node c, etcd reachable at http://" in text, text
    assert a.metric("xknock_cluster_etcd_reachable") == 1
    assert a.metric("xknock_cluster_grants_published_total") >= 1
    assert a.metric("xknock_cluster_resyncs_total") >= 1


def test_a_bad_certificate_refuses_the_attach_in_one_line_and_attaches_nothing(cluster):
    client = cluster.net.client   # a namespace with no filter
    bogus = cluster.tmp / "bogus-ca.pem"
    bogus.write_text("not a certificate\n")
    text = open(cluster.nodes[0].config_path).read().replace(
        "[cluster]\n", f'[cluster]\nca_file = "{bogus}"\n').replace('"http://', '"https://')
    path = write_config(cluster.tmp, "bad-ca.toml", text)
    os.chmod(path, 0o600)
    result = xknock(client, "attach", client.iface, "-c", path, "--once")
    assert result.returncode == 1, result
    assert result.stderr.strip() == f"xknock: [cluster] ca_file {bogus}: not a PEM file (expected -----BEGIN ...)"
    assert status_json(client) == []


def test_etcd_killed_every_node_enforces_alone_and_converges_when_it_returns(cluster):
    a, b, c = cluster.nodes
    client, attacker = cluster.net.client, cluster.net.attacker
    fresh(cluster)
    cluster.etcd.sigkill()
    try:
        for node in (a, b, c):
            assert node.controller.log.wait_for(lambda line: "etcd unreachable" in line, 30), \
                node.controller.log.read_all(0.5)
            assert shut(attacker, node.addr) and shut(client, node.addr)
        assert a.metric("xknock_cluster_etcd_reachable") == 0
        assert wait_for(lambda: not a.cluster_status()["reachable"], 5)   # the node's report: written on change
        # A local knock still opens locally, at once: the kernel never waits on etcd.
        knock(client, b.addr, *SEQUENCE)
        assert opens(client, b.addr)
        assert shut(client, a.addr) and shut(client, c.addr)
        # SPA refuses while its digest cannot be claimed (spa_unreachable = "refuse").
        refused = counters(a)["spa_grant_failed"]
        fwknop(client, a.addr, allow=client.ipv4)
        assert wait_for(lambda: counters(a)["spa_grant_failed"] == refused + 1, 5), a.controller.log.read_all(0.5)
        # The CLI's operator grant is refused as a whole: nothing written anywhere.
        result = a.xknock("grant", a.host.iface, attacker.ipv4, "-c", a.config_path)
        assert result.returncode == 1 and "etcd unreachable" in result.stderr and "Traceback" not in result.stderr
        assert shut(attacker, a.addr)
    finally:
        cluster.etcd.start(timeout=60)
    # Back: every node resyncs; B publishes the grant it made meanwhile.
    for node in (a, b, c):
        assert node.controller.log.wait_for(lambda line: "etcd reachable" in line, 30), \
            node.controller.log.read_all(0.5)
    for node in (a, c):
        assert opens(client, node.addr, timeout=10), node.controller.log.read_all(0.5)
    assert shut(attacker, a.addr)
    assert a.metric("xknock_cluster_etcd_reachable") == 1 and a.metric("xknock_cluster_outages_total") >= 1


def test_hooks_run_on_every_node_the_grant_is_written_on(cluster):
    """[cluster] hooks = "every_node", the default: a hook that opens
    something per node (a cloud security group) runs where the grant lands."""
    client = cluster.net.client
    fresh(cluster)
    opened = {node.name: node.hook_lines(cluster.tmp).count(f"open {client.ipv4}") for node in cluster.nodes}
    closed = {node.name: node.hook_lines(cluster.tmp).count(f"close {client.ipv4}") for node in cluster.nodes}
    knock(client, cluster.nodes[0].addr, *SEQUENCE)
    for node in cluster.nodes:
        assert wait_for(lambda: node.hook_lines(cluster.tmp).count(f"open {client.ipv4}") == opened[node.name] + 1,
                        10), node.controller.log.read_all(0.5)
    a = cluster.nodes[0]
    check(a.xknock("revoke", a.host.iface, client.ipv4, "-c", a.config_path))
    for node in cluster.nodes:   # each node's sweep sees the grant gone (every 10 s; slower on a loaded machine)
        assert wait_for(lambda: node.hook_lines(cluster.tmp).count(f"close {client.ipv4}") == closed[node.name] + 1,
                        40), node.controller.log.read_all(0.5)


def test_a_reload_that_changes_cluster_is_refused_and_one_that_changes_its_hooks_applies(cluster):
    a, b, c = cluster.nodes
    client = cluster.net.client
    original = open(c.config_path).read()
    try:
        with open(c.config_path, "w") as f:
            f.write(original.replace(f'prefix = "{PREFIX}"', 'prefix = "/xknock/elsewhere/"'))
        c.controller.send_signal(signal.SIGHUP)
        line = c.controller.log.wait_for(lambda line: "reload refused" in line, 10)
        assert line and "[cluster] changed (prefix)" in line and "restart" in line, c.controller.log.read_all(0.5)
        fresh(cluster)   # C still follows the prefix it started with
        knock(client, a.addr, *SEQUENCE)
        assert opens(client, c.addr), c.controller.log.read_all(0.5)
        # hooks = "origin": a reload applies it; then only A runs on_open.
        with open(c.config_path, "w") as f:
            f.write(original.replace("[cluster]\n", '[cluster]\nhooks = "origin"\n'))
        c.controller.send_signal(signal.SIGHUP)
        assert c.controller.log.wait_for(lambda line: "reloaded" in line, 10), c.controller.log.read_all(0.5)
        fresh(cluster)
        before = {node.name: node.hook_lines(cluster.tmp).count(f"open {client.ipv4}") for node in (a, c)}
        knock(client, a.addr, *SEQUENCE)
        assert opens(client, c.addr)
        assert wait_for(lambda: a.hook_lines(cluster.tmp).count(f"open {client.ipv4}") == before["a"] + 1, 10)
        time.sleep(1)   # an on_open on C would have run by now: the one on A did
        assert c.hook_lines(cluster.tmp).count(f"open {client.ipv4}") == before["c"]
    finally:
        with open(c.config_path, "w") as f:
            f.write(original)
        c.controller.send_signal(signal.SIGHUP)
        assert c.controller.log.wait_for(lambda line: "reloaded" in line, 10), c.controller.log.read_all(0.5)


def test_a_node_sigkilled_and_restarted_resyncs_what_was_granted_and_revoked_meanwhile(cluster):
    a, b, c = cluster.nodes
    client, attacker = cluster.net.client, cluster.net.attacker
    fresh(cluster)
    knock(client, a.addr, *SEQUENCE)
    assert opens(client, c.addr)
    c.controller.send_signal(signal.SIGKILL)
    c.controller.wait()
    # Meanwhile: the client revoked on A, another source granted on B.
    check(a.xknock("revoke", a.host.iface, client.ipv4, "-c", a.config_path))
    check(b.xknock("grant", b.host.iface, attacker.ipv4, "--for", "45s", "-c", b.config_path))
    assert closes(client, a.addr) and opens(attacker, a.addr)
    assert opens(client, c.addr) and shut(attacker, c.addr)   # C's filter alone: its maps as they were
    c.restart()
    assert closes(client, c.addr), c.controller.log.read_all(0.5)
    assert opens(attacker, c.addr), c.controller.log.read_all(0.5)
    fresh(cluster)


PARTITION = "xkpart"   # an nft table in C's namespace, which is the test run's own


def test_a_node_cut_from_etcd_converges_when_reconnected(cluster):
    """C's namespace drops every packet to etcd's client port (its own
    member included; the members' peer traffic passes): C decides alone,
    then catches up with a grant and a revoke made elsewhere meanwhile."""
    a, b, c = cluster.nodes
    client, attacker = cluster.net.client, cluster.net.attacker
    fresh(cluster)
    check(a.xknock("grant", a.host.iface, attacker.ipv4, "--for", "45s", "-c", a.config_path))
    assert opens(attacker, c.addr), c.controller.log.read_all(0.5)
    cut = [["nft", "add", "table", "inet", PARTITION],
           ["nft", "add", "chain", "inet", PARTITION, "out", "{ type filter hook output priority 0 ; }"],
           ["nft", "add", "rule", "inet", PARTITION, "out", "tcp", "dport", "2379", "drop"]]
    try:
        for argv in cut:
            check(c.host.run(argv))
        assert wait_for(lambda: not c.cluster_status()["reachable"], 20), c.controller.log.read_all(0.5)
        check(a.xknock("revoke", a.host.iface, attacker.ipv4, "-c", a.config_path))
        knock(client, a.addr, *SEQUENCE)
        assert opens(client, b.addr) and closes(attacker, b.addr)
        time.sleep(1)   # what reached B had time to reach C, were C not cut off
        assert shut(client, c.addr) and not shut(attacker, c.addr)
    finally:
        c.host.run(["nft", "delete", "table", "inet", PARTITION])
    assert wait_for(lambda: c.cluster_status()["reachable"], 30), c.controller.log.read_all(0.5)
    assert opens(client, c.addr, timeout=10), c.controller.log.read_all(0.5)
    assert closes(attacker, c.addr), c.controller.log.read_all(0.5)


def fill_grants(host, count):
    """count grants of sources 10.200.0.0 and up (within 10.200.0.0/15), written straight into
    host's grants map (its program found from the interface), alive for an
    hour: a full map in one system call."""
    import ctypes

    from xknock.controller.kernel import bpfsys, layout
    from xknock.controller.kernel.maps import FilterMaps, to_addr
    from xknock_dev.e2e import xdp_prog_id

    with FilterMaps.from_prog(xdp_prog_id(host, host.iface)) as maps:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        keys = (layout.GrantKey * count)(*(layout.GrantKey(src=to_addr(ipaddress.ip_address(0x0AC80000 + i)),
                                                           proto=6, port=GUARDED) for i in range(count)))
        value = layout.Grant(window_end_ns=now + 3600 * 10**9, idle_timeout_ns=3600 * 10**9, last_seen_ns=now)
        values = (layout.Grant * count)(*([value] * count))
        written, err = bpfsys.map_update_batch_from(maps.grants.fd, keys, values, 0, count)
        return written, err


def empty_filler(host):
    from xknock.controller.kernel.maps import FilterMaps, from_addr
    from xknock_dev.e2e import xdp_prog_id

    filler = ipaddress.ip_network("10.200.0.0/15")
    with FilterMaps.from_prog(xdp_prog_id(host, host.iface)) as maps:
        maps.grants.delete_where(lambda key: from_addr(key.src) in filler)


def test_a_grant_that_does_not_fit_a_full_node_is_refused_there_alone(cluster):
    """C's grants map full: a grant made on B opens A and B, is counted and
    logged on C, whose sync goes on: once C has room, the next grant arrives."""
    a, b, c = cluster.nodes
    client, attacker = cluster.net.client, cluster.net.attacker
    fresh(cluster)
    before = c.cluster_status()["grants_full"]
    try:
        written, err = fill_grants(c.host, 65536 + 1)   # one more than the map holds: full, whatever was there
        assert err == errno.E2BIG and written > 60000, (written, err)
        check(b.xknock("grant", b.host.iface, attacker.ipv4, "--for", "45s", "-c", b.config_path))
        for node in (a, b):
            assert opens(attacker, node.addr), node.controller.log.read_all(0.5)
        assert c.controller.log.wait_for(lambda line: "a grant of another node did not fit here" in line, 10), \
            c.controller.log.read_all(0.5)
        assert wait_for(lambda: c.cluster_status()["grants_full"] == before + 1, 5)
        assert shut(attacker, c.addr)
    finally:
        empty_filler(c.host)
    knock(client, a.addr, *SEQUENCE)   # C has room again: the watch goes on
    assert opens(client, c.addr), c.controller.log.read_all(0.5)
    fresh(cluster)


def test_keys_under_the_prefix_written_by_something_else_are_ignored_and_the_sync_goes_on(cluster):
    a, b, c = cluster.nodes
    client = cluster.net.client
    fresh(cluster)
    foreign = {f"{PREFIX}grants/not-an-address/tcp:{GUARDED}": "{}", f"{PREFIX}grants/{client.ipv4}/tcp:{GUARDED}":
               "not json", f"{PREFIX}elsewhere/thing": "x"}
    before = {node.name: node.cluster_status()["bad_records"] for node in (b, c)}
    try:
        for key, value in foreign.items():
            result = cluster.etcd.ctl("put", key, value)
            assert result.returncode == 0, result.stderr
        for node in (b, c):
            assert wait_for(lambda: node.cluster_status()["bad_records"] == before[node.name] + len(foreign), 10), \
                node.controller.log.read_all(0.5)
            assert shut(client, node.addr)   # a grant's key with a value xknock did not write opens nothing
        knock(client, a.addr, *SEQUENCE)
        for node in (b, c):
            assert opens(client, node.addr), node.controller.log.read_all(0.5)
    finally:
        for key in foreign:
            cluster.etcd.ctl("del", key)
    fresh(cluster)
