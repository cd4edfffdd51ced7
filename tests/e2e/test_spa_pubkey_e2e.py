"""The public-key SPA end to end: `xknock spa --identity` in a namespace lab,
the real filter and controller on the server, packets through the SPA port's
ring buffer. One packet sent over IPv6 opens the port over IPv4 too, for the
client only; the client reads the server's sealed answer; a forged packet gets
no answer at all while an authentic refused one hears why; a captured packet
replayed after a controller restart opens nothing."""

import base64
import ipaddress
import os
import signal
import sys

import pytest
from xknock_dev.e2e import Foreground, TcpEchoServer, spa_verdicts, write_config, xknock

from xknock_dev.lab import can_connect, lab, wait_for

from xknock.controller.wire import spa_pubkey, spa_pubkey_keys as keys

pytestmark = pytest.mark.netns

GUARDED, OTHER, SSH, SPA_PORT = 22, 2222, 2022, 62201
ALICE_KEY, EVE_KEY = keys.generate(keys.USER), keys.generate(keys.USER)

CONFIG = """
[spa]
port = {port}
replay_cache = "{cache}"
server_key = "{server_key}"

[[spa.user]]
name = "alice"
public_keys = ["{alice}"]
open = ["tcp:{guarded}", "tcp:{ssh}"]
open_for = "30s"

[[spa.user]]
name = "eve"
public_keys = ["{eve}"]
open = ["tcp:{other}"]
"""

# In the attacker's namespace: a forged packet (a key no user has) and then
# eve's authentic one asking for a port she may not open, both asking for an
# answer on one socket. Prints what the first datagram back was.
FORGED_THEN_REFUSED = r"""
import ipaddress, select, socket, sys
from xknock.controller.wire import spa_pubkey, spa_pubkey_keys as keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
server, port, server_public, eve_file = sys.argv[1], int(sys.argv[2]), keys.read_public(sys.argv[3]), sys.argv[4]
eve = keys.load_private(eve_file, keys.USER)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
me = ipaddress.ip_address("10.77.0.3")
forged, forged_secret = spa_pubkey.seal_packet(server_public, Ed25519PrivateKey.generate(), [("tcp", 22)], ipv4=me,
                                               acknowledge=True, ack_port=sock.getsockname()[1])
refused, refused_secret = spa_pubkey.seal_packet(server_public, eve, [("tcp", 22)], ipv4=me, acknowledge=True,
                                                 ack_port=sock.getsockname()[1])
sock.sendto(forged, (server, port))
sock.sendto(refused, (server, port))
if not select.select([sock], [], [], 10)[0]:
    print("nothing"); sys.exit()
data = sock.recv(2048)
for name, secret in (("forged", forged_secret), ("refused", refused_secret)):
    try:
        ack = spa_pubkey.open_ack(secret, data)
    except spa_pubkey.SpaPubkeyError:
        continue
    print(name, "granted" if ack.granted else "refused", ack.detail); break
else:
    print("unreadable")
"""

SEND_FILE = r"""
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(open(sys.argv[1], "rb").read(), (sys.argv[2], int(sys.argv[3])))
"""


verdicts = spa_verdicts


def shut(host, address, port=GUARDED):
    return not can_connect(host, address, port, timeout=0.5)


@pytest.fixture(scope="module")
def net():
    with lab("xkpk") as built:
        echo = TcpEchoServer(built.server, GUARDED, OTHER)
        try:
            yield built
        finally:
            echo.stop()
            xknock(built.server, "detach", built.server_iface)


@pytest.fixture
def setup(net, tmp_path):
    xknock(net.server, "detach", net.server_iface)
    server_key = str(tmp_path / "server.key")
    keys.write_pair(server_key, keys.SERVER)
    for name, key in (("alice", ALICE_KEY), ("eve", EVE_KEY)):
        keys.write_pair(str(tmp_path / f"{name}.key"), keys.USER, key)
    b64 = lambda key: base64.b64encode(keys.raw_public(key)).decode()
    path = write_config(tmp_path, "spa.toml", CONFIG.format(port=SPA_PORT, cache=tmp_path / "state" / "replay",
                                                           server_key=server_key, alice=b64(ALICE_KEY),
                                                           eve=b64(EVE_KEY), guarded=GUARDED, other=OTHER, ssh=SSH))
    os.chmod(path, 0o600)
    return path, tmp_path


def test_a_knock_over_ipv6_opens_ipv4_too_and_the_client_reads_the_answer(net, setup):
    path, tmp = setup
    with Foreground(net, path) as controller:
        controller.wait_ready()
        assert shut(net.client, net.server.ipv4) and shut(net.client, net.server.ipv6)
        result = xknock(net.client, "spa", net.server.ipv6, "-A", f"tcp/{GUARDED}", "--identity",
                        str(tmp / "alice.key"), "--server-key", str(tmp / "server.key.pub"),
                        "-a", net.client.ipv4, "-a", net.client.ipv6)
        assert result.returncode == 0, result.stdout + result.stderr + controller.log.read_all(0.5)
        assert f"granted by {net.server.ipv6}: tcp/{GUARDED} for {net.client.ipv4} and {net.client.ipv6}" \
            in result.stdout
        assert can_connect(net.client, net.server.ipv4, GUARDED)     # knocked over IPv6, connected over IPv4
        assert can_connect(net.client, net.server.ipv6, GUARDED)
        assert shut(net.attacker, net.server.ipv4) and shut(net.attacker, net.server.ipv6)
        assert wait_for(lambda: verdicts(net).get("accepted") == 1, timeout=3), verdicts(net)   # flushed once a second


def test_the_refused_hear_why_and_the_unauthenticated_hear_nothing(net, setup):
    path, tmp = setup
    with Foreground(net, path) as controller:
        controller.wait_ready()
        refused = xknock(net.client, "spa", net.server.ipv4, "-A", "tcp/23", "--identity", str(tmp / "alice.key"),
                         "--server-key", str(tmp / "server.key.pub"))
        assert refused.returncode == 1 and "refused: not allowed: tcp:23" in refused.stderr, refused
        # The forged packet went first: had it been answered, that answer would be the first datagram back.
        heard = net.attacker.run([sys.executable, "-c", FORGED_THEN_REFUSED, net.server.ipv4, str(SPA_PORT),
                                  str(tmp / "server.key.pub"), str(tmp / "eve.key")])
        assert heard.stdout.strip() == "refused refused not allowed: tcp:22", heard.stdout + heard.stderr
        assert wait_for(lambda: verdicts(net).get("unknown_user") == 1 and verdicts(net).get("port_denied") == 2,
                        timeout=3), verdicts(net)   # flushed once a second
        assert shut(net.attacker, net.server.ipv4)


def test_a_wrong_server_key_gets_no_answer(net, setup):
    path, tmp = setup
    wrong = str(tmp / "wrong.key")
    keys.write_pair(wrong, keys.SERVER)
    with Foreground(net, path) as controller:
        controller.wait_ready()
        result = xknock(net.client, "spa", net.server.ipv4, "-A", f"tcp/{GUARDED}", "--identity",
                        str(tmp / "alice.key"), "--server-key", wrong + ".pub", "--tries", "2")
        assert result.returncode == 2 and "no answer" in result.stderr, result
        assert wait_for(lambda: verdicts(net).get("bad_hmac") == 2, timeout=5), verdicts(net)
        assert shut(net.client, net.server.ipv4)


def test_a_captured_packet_replayed_after_a_restart_opens_nothing(net, setup):
    path, tmp = setup
    server_public = keys.read_public(str(tmp / "server.key.pub"))
    # Sealed for the client's address, sent by the client; the attacker resends it.
    datagram, _ = spa_pubkey.seal_packet(server_public, ALICE_KEY, [("tcp", GUARDED)],
                                         ipv4=ipaddress.ip_address(net.client.ipv4))
    saved = tmp / "packet"
    saved.write_bytes(datagram)
    with Foreground(net, path) as controller:
        controller.wait_ready()
        net.client.run([sys.executable, "-c", SEND_FILE, str(saved), net.server.ipv4, str(SPA_PORT)])
        assert wait_for(lambda: can_connect(net.client, net.server.ipv4, GUARDED, timeout=0.5), timeout=5), \
            controller.log.read_all(0.5)
    with Foreground(net, path) as controller:   # a new controller: the cache on disk still knows it
        assert controller.log.wait_for(lambda line: "replaced program" in line, 20), controller.log.read_all(0.5)
        assert wait_for(lambda: controller.handles(signal.SIGTERM), timeout=5)
        net.attacker.run([sys.executable, "-c", SEND_FILE, str(saved), net.server.ipv4, str(SPA_PORT)])
        assert wait_for(lambda: verdicts(net).get("replayed") == 1, timeout=5), verdicts(net)
        assert shut(net.attacker, net.server.ipv4)


def test_the_standalone_client_on_the_system_python_opens_the_port(net, setup):
    from xknock_dev.lab import HELPER_PYTHON
    from xknock_dev.standalone import CLIENT

    path, tmp = setup
    with Foreground(net, path) as controller:
        controller.wait_ready()
        result = net.client.run([HELPER_PYTHON, "-I", CLIENT, net.server.ipv4, "-A", f"tcp/{GUARDED}",
                                 "--identity", str(tmp / "alice.key"), "--server-key", str(tmp / "server.key.pub"),
                                 "-a", net.client.ipv4, "-a", net.client.ipv6], env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stdout + result.stderr + controller.log.read_all(0.5)
        assert f"for {net.client.ipv4} and {net.client.ipv6}" in result.stdout
        assert can_connect(net.client, net.server.ipv6, GUARDED)    # knocked over IPv4, connected over IPv6
        assert shut(net.attacker, net.server.ipv4)


SSHD_CONFIG = """Port {port}
ListenAddress 0.0.0.0
ListenAddress ::
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
"""


def test_ssh_through_ssh_proxy_to_a_real_sshd(net, setup):
    """A real ssh client with `xknock ssh-proxy` as its ProxyCommand, a real sshd behind the filter."""
    import subprocess

    from xknock_dev.e2e import XKNOCK, LineReader
    from xknock_dev.lab import stop_process

    path, tmp = setup
    sshd_dir = tmp / "sshd"
    sshd_dir.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_dir / name)], check=True)
    (sshd_dir / "authorized_keys").write_text((sshd_dir / "id.pub").read_text())
    (sshd_dir / "sshd_config").write_text(SSHD_CONFIG.format(port=SSH, dir=sshd_dir))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege-separation directory
    sshd = net.server.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(sshd_dir / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert LineReader(sshd.stderr).wait_for(lambda line: "Server listening on" in line, 10), "sshd did not start"
        with Foreground(net, path) as controller:
            controller.wait_ready()
            assert shut(net.client, net.server.ipv4, SSH)
            proxy = (f"{XKNOCK} ssh-proxy %h %p --identity {tmp / 'alice.key'} "
                     f"--server-key {tmp / 'server.key.pub'}")
            result = net.client.run(["ssh", "-F", "/dev/null", "-i", str(sshd_dir / "id"), "-p", str(SSH),
                                     "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                     "-o", "UserKnownHostsFile=/dev/null", "-o", f"ProxyCommand={proxy}",
                                     f"root@{net.server.ipv4}", "echo", "hello-through-xknock"], timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr + controller.log.read_all(0.5)
            assert result.stdout.strip() == "hello-through-xknock"
            assert shut(net.attacker, net.server.ipv4, SSH)
            wrong = net.client.run(["ssh", "-F", "/dev/null", "-i", str(sshd_dir / "id"), "-p", str(SSH),
                                    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                    "-o", "UserKnownHostsFile=/dev/null",
                                    "-o", f"ProxyCommand={XKNOCK} ssh-proxy %h 2222 --identity {tmp / 'alice.key'} "
                                          f"--server-key {tmp / 'server.key.pub'}",
                                    f"root@{net.server.ipv4}", "true"], timeout=60)
            assert wrong.returncode != 0 and "refused: not allowed: tcp:2222" in wrong.stderr, wrong.stderr
    finally:
        stop_process(sshd)


# From the client's namespace: the message names an ack port nobody listens on,
# as when a NAT rewrote the source port; the answer must still come back to
# the port the packet really came from.
NAT_LIKE = r"""
import ipaddress, select, socket, sys
from xknock.controller.wire import spa_pubkey, spa_pubkey_keys as keys
server, port, server_public, identity = sys.argv[1], int(sys.argv[2]), keys.read_public(sys.argv[3]), sys.argv[4]
me = ipaddress.ip_address(sys.argv[5])
sock = socket.socket(socket.AF_INET if me.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0" if me.version == 4 else "::", 0))
packet, secret = spa_pubkey.seal_packet(server_public, keys.load_private(identity, keys.USER), [("tcp", 22)],
                                        **{"ipv%d" % me.version: me}, acknowledge=True,
                                        ack_port=sock.getsockname()[1] ^ 1)
sock.sendto(packet, (server, port))
if not select.select([sock], [], [], 10)[0]:
    print("nothing"); sys.exit()
data, sender = sock.recvfrom(2048)
ack = spa_pubkey.open_ack(secret, data)
print("granted" if ack.granted else "refused", "from port", sender[1])
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_answer_goes_to_the_port_the_packet_came_from_and_comes_from_the_spa_port(net, setup, family):
    path, tmp = setup
    with Foreground(net, path) as controller:
        controller.wait_ready()
        heard = net.client.run([sys.executable, "-c", NAT_LIKE, getattr(net.server, family), str(SPA_PORT),
                                str(tmp / "server.key.pub"), str(tmp / "alice.key"), getattr(net.client, family)])
        assert heard.stdout.strip() == f"granted from port {SPA_PORT}", \
            heard.stdout + heard.stderr + controller.log.read_all(0.5)
