"""[cluster] behind a real ECMP router: three server namespaces (nodes A, B,
C, each with the service address on its lo and xknock on its veth, one etcd
member each) and a router namespace whose multipath route spreads the service
address over them with an L4 hash (Lab(router=True), xknock_dev/lab.py).

The client sends one SPA packet to the service address (it lands on one
node), then opens many TCP connections to it from new source ports: the
router spreads them over the nodes, and each node's listener answers with its
name. A knock, whose steps come from different source ports, is spread too.
"""

import base64
import json
import os
import subprocess
import time
import types

import pytest
from xknock_dev.e2e import Foreground, check, knock, status_json, write_config, xknock
from xknock_dev.etcd import EtcdCluster
from xknock_dev.lab import HELPER_PYTHON, lab, stop_process, wait_for

pytestmark = pytest.mark.netns

GUARDED = 22
SPA_PORT = 62201
SEQUENCE = ("tcp:7000", "udp:8000", "tcp:9000")
STEP_TIMEOUT_S = 1
KEY_B64, HMAC_B64 = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode()
FWKNOP = "/usr/bin/fwknop"
PREFIX = "/xknock/ecmp/"
CONNECTIONS = 30

# No [ban]: the steps of a knock spread over the nodes are failed sequences
# on some of them, and the test would ban its own client.
CONFIG = """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "{step_timeout}s"
open = ["tcp:{guarded}"]
open_for = "60s"

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

[cluster]
endpoints = [{endpoints}]
prefix = "{prefix}"
node = "{node}"
timeout = "1s"
"""

# Accepts on argv[1] and answers every connection with argv[2], its node's name.
NAME_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    try:
        conn.sendall(sys.argv[2].encode())
    except OSError:
        pass
    conn.close()
"""

# argv: service, port, count, budget in seconds[, SPA packet file, SPA port].
# Sends the SPA packet (if given), then opens count connections one after
# another, each from a new source port, each retried until it is answered or
# the budget since the start is spent. Prints [[name or null, seconds since
# the start or the last error], ...] as JSON.
CONNECT_MANY = r"""
import json, socket, sys, time
service, port, count, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
if len(sys.argv) > 5:
    data = open(sys.argv[5], "rb").read().strip()
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(data, (service, int(sys.argv[6])))
results = []
for _ in range(count):
    while True:
        try:
            conn = socket.create_connection((service, port), timeout=0.25)
            name = conn.recv(64).decode()
            conn.close()
            results.append([name, time.monotonic() - start])
            break
        except OSError as err:
            if time.monotonic() - start > budget:
                results.append([None, type(err).__name__])
                break
            time.sleep(0.01)
print(json.dumps(results))
"""

# argv: service, port, count: the outcome of count connections, one per new source port.
OUTCOMES = r"""
import json, socket, sys
outcomes = []
for _ in range(int(sys.argv[3])):
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
        outcomes.append("open")
    except ConnectionRefusedError:
        outcomes.append("refused")
    except OSError as err:
        outcomes.append(type(err).__name__)
print(json.dumps(outcomes))
"""


def counters(host):
    return status_json(host)[0]["counters"]


def total(hosts, name):
    return {host.name: counters(host)[name] for host in hosts}


def run_json(host, *argv, timeout=60):
    result = check(host.run([HELPER_PYTHON, "-c", *map(str, argv)], timeout=timeout))
    return json.loads(result.stdout)


class NameServer:
    def __init__(self, host, name):
        self.process = host.popen([HELPER_PYTHON, "-c", NAME_SERVER, str(GUARDED), name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.process.stdout.readline() != "ready\n":
            raise RuntimeError(f"name server in {host.name}: {self.process.stderr.read()}")

    def stop(self):
        stop_process(self.process)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not os.access(FWKNOP, os.X_OK):
        pytest.fail("the fwknop client is not installed: scripts/setup installs fwknop-client")
    tmp = tmp_path_factory.mktemp("ecmp")
    with lab("xkecmp", ipv6=False, servers=3, router=True) as net:
        names = [NameServer(host, name) for name, host in zip("abc", net.servers)]
        etcd = EtcdCluster.on_hosts(tmp, net.servers)
        controllers = []
        try:
            etcd.start(timeout=60)
            endpoints = ", ".join(f'"{url}"' for url in etcd.endpoints)
            for name, host in zip("abc", net.servers):
                path = write_config(tmp, f"{name}.toml", CONFIG.format(
                    guarded=GUARDED, spa_port=SPA_PORT, cache=tmp / f"replay-{name}", key=KEY_B64, hmac=HMAC_B64,
                    endpoints=endpoints, prefix=PREFIX, node=name, step_timeout=STEP_TIMEOUT_S))
                controllers.append(Foreground(types.SimpleNamespace(server=host, server_iface=host.iface), path))
            for controller in controllers:
                controller.wait_ready(timeout=240)
            for controller in controllers:
                assert controller.log.wait_for(lambda line: "etcd reachable" in line, 30), controller.log.read_all(0.5)
            yield types.SimpleNamespace(net=net, etcd=etcd, controllers=controllers, tmp=tmp,
                                        service=net.service[0], configs=[tmp / f"{n}.toml" for n in "abc"])
        finally:
            for controller in controllers:
                controller.stop()
            etcd.stop()
            for server in names:
                server.stop()
            for host in net.servers:
                xknock(host, "detach", host.iface)


def revoke_everywhere(fleet, *hosts):
    a = fleet.net.servers[0]
    for host in hosts:
        check(xknock(a, "revoke", a.iface, host.ipv4, "-c", str(fleet.configs[0])))
    for host in hosts:   # closed on every node: each of 10 connections refused, wherever it lands
        assert wait_for(lambda: set(run_json(host, OUTCOMES, fleet.service, GUARDED, 10)) == {"refused"}, 5), \
            log_of(fleet)


def log_of(fleet):
    return "\n".join(controller.log.read_all(0.2) for controller in fleet.controllers)


def test_one_spa_packet_opens_the_service_on_every_node_it_is_spread_over(fleet):
    net, servers = fleet.net, fleet.net.servers
    revoke_everywhere(fleet, net.client)
    packet = str(fleet.tmp / "spa-packet")
    # The packet made for the client, sent by fwknop to an address nobody has;
    # CONNECT_MANY sends it to the service address and times from there.
    result = net.client.run([FWKNOP, "-A", f"tcp/{GUARDED}", "-D", "10.77.0.250", "--use-hmac",
                             "--key-base64-rijndael", KEY_B64, "--key-base64-hmac", HMAC_B64, "-U", "alice",
                             "--no-save-args", "--no-rc-file", "-a", net.client.ipv4, "-B", packet],
                            env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    before = total(servers, "spa_accepted")
    results = run_json(net.client, CONNECT_MANY, fleet.service, GUARDED, CONNECTIONS, 3.0, packet, SPA_PORT)
    after = total(servers, "spa_accepted")
    landed = [name for name, host in zip("abc", servers) if after[host.name] > before[host.name]]
    served = sorted({name for name, _ in results if name})
    slowest = max(t for name, t in results if name) if any(name for name, _ in results) else None
    print(f"SPA packet accepted on {landed}; {CONNECTIONS} connections served by {served}, "
          f"the last one {slowest:.3f}s after the packet" if slowest else results)
    assert len(landed) == 1 and sum(after.values()) - sum(before.values()) == 1, (before, after, log_of(fleet))
    assert all(name for name, _ in results), results
    assert len(served) >= 2, results   # the router spread them: grants reached other nodes than the SPA's
    assert slowest <= 1.0, results


def test_the_attacker_without_spa_is_refused_on_every_node(fleet):
    net, servers = fleet.net, fleet.net.servers
    before = total(servers, "answer_rst")
    outcomes = run_json(net.attacker, OUTCOMES, fleet.service, GUARDED, CONNECTIONS)
    after = total(servers, "answer_rst")
    assert outcomes == ["refused"] * CONNECTIONS, outcomes
    # Each node answered some of them: the router spread them over all three.
    assert all(after[host.name] > before[host.name] for host in servers), (before, after)


def knocks_completed(fleet, attempts):
    """Knock attempts from the client to the service address, each after the
    last one's progress timed out: how many completed on some node."""
    servers = fleet.net.servers
    before = total(servers, "knock_completed")
    for _ in range(attempts):
        time.sleep(STEP_TIMEOUT_S + 0.2)
        knock(fleet.net.client, fleet.service, *SEQUENCE)
    time.sleep(0.2)
    after = total(servers, "knock_completed")
    return sum(after.values()) - sum(before.values()), {h.name[-4:]: after[h.name] - before[h.name] for h in servers}


def test_a_knock_through_the_l4_hash_does_not_open_reliably_and_through_an_l3_hash_it_does(fleet):
    """The steps of a knock come from different source ports: an L4 hash
    sends them to different nodes, and a knock completes only when all three
    hash to one node (1 in 9 by chance). Hashing on addresses only sends every
    step of a source to one node."""
    net = fleet.net
    revoke_everywhere(fleet, net.client)
    attempts = 18
    completed, per_node = knocks_completed(fleet, attempts)
    print(f"L4 hash: {completed} of {attempts} knocks completed ({per_node})")
    assert completed < attempts, per_node
    try:
        net.set_multipath_hash(0)
        completed, per_node = knocks_completed(fleet, 3)
        print(f"L3 hash: {completed} of 3 knocks completed ({per_node})")
        assert completed == 3 and sum(1 for n in per_node.values() if n) == 1, per_node
    finally:
        net.set_multipath_hash(1)
