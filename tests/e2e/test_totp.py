"""Time-based knock sequences: ports from HMAC(secret, window), two windows live,
a used window spent at once; in the real program and end to end."""

import base64
import dataclasses
import hashlib
import hmac
import os
import signal
import time

import pytest
from xknock_dev.packets import step, tcp

from xknock.controller.policy import policy, totp
from xknock.controller.kernel.maps import live_sequences
from xknock.controller.config import ConfigError, parse_config
from xknock_dev.testrun import XDP_DROP, XDP_PASS

SECRET = base64.b32encode(b"s" * 20).decode()
WINDOW_S = 60


def totp_config(protos='["tcp", "udp", "tcp"]', window="60s", port_range="20000-29999", extra=""):
    # answer = "drop": these cases read plain verdicts (answers: test_answers.py, test_scans.py)
    return parse_config(f"""
[filter]
answer = "drop"

[[sequence]]
name = "ssh"
totp = true
secret = "{SECRET}"
knock = {protos}
window = "{window}"
port_range = "{port_range}"
open = ["tcp:22"]
{extra}""", listening=set())


def test_ports_come_from_hmac_of_name_and_window():
    seq = totp_config().sequences[0]
    window = 29_000_000
    ports = totp.derive_ports("ssh", seq.totp, window)
    # An independent computation of the first port: the first 4 bytes of block 0.
    block = hmac.new(b"s" * 20, b"ssh\0" + window.to_bytes(8, "big") + (0).to_bytes(4, "big"), hashlib.sha256).digest()
    assert ports[0] == 20000 + int.from_bytes(block[:4], "big") % 10000
    assert len(ports) == 3 and all(20000 <= p <= 29999 for p in ports)
    assert totp.derive_ports("ssh", seq.totp, window) == ports                # deterministic
    assert totp.derive_ports("ssh", seq.totp, window + 1) != ports            # another window, other ports
    assert totp.derive_ports("web", seq.totp, window) != ports                # another sequence, other ports
    other_secret = dataclasses.replace(seq.totp, secret=b"t" * 20)
    assert totp.derive_ports("ssh", other_secret, window) != ports


def test_no_port_repeats_the_one_before_it():
    # A range of 1000 ports and 16 knocks: over many windows a repeat would be
    # drawn often; it must always be skipped.
    seq = totp_config(protos='["udp"]', port_range="20000-20999").sequences[0]
    single = dataclasses.replace(seq.totp, protos=("udp",) * 16)
    for window in range(2000):
        ports = totp.derive_ports("ssh", single, window)
        assert all(a != b for a, b in zip(ports, ports[1:])), window


def test_two_windows_are_live_this_one_and_the_nearer_neighbour():
    w = 60 * 10**9
    assert totp.live_windows(100 * w, w) == (99, 100)
    assert totp.live_windows(100 * w + w // 2 - 1, w) == (99, 100)
    assert totp.live_windows(100 * w + w // 2, w) == (100, 101)
    assert totp.next_change_ns(100 * w + 1, w) == 100 * w + w // 2
    assert totp.next_change_ns(100 * w + w // 2, w) == 101 * w


@pytest.mark.parametrize("changes, expected", [
    ({"protos": '["tcp:7000"]'}, 'with totp = true, write just "tcp" or "udp"'),
    ({"protos": '["icmp"]'}, 'write just "tcp" or "udp"'),
    ({"window": "5s"}, "window must be from 10s to 24h"),
    ({"port_range": "20000-20010"}, "at least 1000 ports"),
    ({"port_range": "30000-20000"}, "need 1 <= LOW < HIGH <= 65535"),
    ({"port_range": "20000"}, 'write it "LOW-HIGH"'),
    ({"extra": 'spent_file = "spent"'}, "spent_file 'spent': must be an absolute path"),
    ({"extra": '[[sequence]]\nname = "x"\nknock = ["tcp:25000", "tcp:1", "tcp:2"]\nopen = ["tcp:23"]\n'},
     "port_range 20000-29999 holds tcp:25000, a knock step of sequence \"x\""),
    ({"protos": '["tcp", "tcp"]',   # another protocol's port in the range: no clash
      "extra": '[[sequence]]\nname = "x"\nknock = ["udp:25000", "tcp:1", "tcp:2"]\nopen = ["tcp:23"]\n'}, None),
])
def test_time_based_mistakes_are_named(changes, expected):
    if expected is None:
        totp_config(**changes)
        return
    with pytest.raises(ConfigError) as caught:
        totp_config(**changes)
    assert any(expected in error for error in caught.value.errors), caught.value.errors


def test_a_secret_needs_totp_and_totp_needs_a_good_secret():
    with pytest.raises(ConfigError, match="secret belongs to time-based sequences"):
        parse_config(f'[[sequence]]\nname = "a"\nknock = ["tcp:1", "tcp:2", "tcp:3"]\nopen = ["tcp:22"]\n'
                     f'secret = "{SECRET}"\n', listening=set())
    short = base64.b32encode(b"s" * 8).decode()
    with pytest.raises(ConfigError, match="is 8 bytes; at least 16"):
        parse_config(f'[[sequence]]\nname = "a"\ntotp = true\nsecret = "{short}"\nknock = ["tcp"]\n'
                     'open = ["tcp:22"]\n', listening=set())


def test_secret_files_must_be_root_only(tmp_path):
    secret_file = tmp_path / "ssh.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o644)
    text = (f'[[sequence]]\nname = "a"\ntotp = true\nsecret_file = "{secret_file}"\nknock = ["tcp", "udp"]\n'
            'open = ["tcp:22"]\n')
    with pytest.raises(ConfigError, match=r"readable by group or others \(mode 0644\) but it holds secrets \(chmod 600 "):
        parse_config(text, listening=set())
    secret_file.chmod(0o600)
    assert parse_config(text, listening=set()).sequences[0].totp.secret == b"s" * 20


# --- the real program ---------------------------------------------------------------


def frozen(config, unix_s):
    return totp.Rotation(config, wall_clock_ns=lambda: int(unix_s * 1e9))


def knock_all(harness, source, steps):
    for s in steps:
        harness.run(step(source, str(s)))
        harness.advance(0.1)


@pytest.fixture
def timed(harness):
    harness.reset_state()
    harness.set_clock(1_000_000_000_000)
    return harness


def test_this_windows_knock_opens_and_last_hours_does_not(timed):
    config = totp_config()
    now = 1_800_000_000 + 10   # early in a window: the previous window is live too
    rotation = frozen(config, now)
    timed.apply(rotation.concrete())
    seq = config.sequences[0]
    window = totp.window_of(int(now * 1e9), seq.totp.window_ns)

    hour_ago = totp.variant(seq, window - 60).knock
    knock_all(timed, "198.51.100.9", hour_ago)
    assert timed.run(tcp("198.51.100.9", 22)) == XDP_DROP

    knock_all(timed, "198.51.100.7", totp.variant(seq, window).knock)
    assert timed.run(tcp("198.51.100.7", 22)) == XDP_PASS

    knock_all(timed, "198.51.100.8", totp.variant(seq, window - 1).knock)   # clock skew: the neighbour
    assert timed.run(tcp("198.51.100.8", 22)) == XDP_PASS

    knock_all(timed, "198.51.100.10", totp.variant(seq, window + 1).knock)   # not the nearer neighbour yet
    assert timed.run(tcp("198.51.100.10", 22)) == XDP_DROP


def test_a_spent_window_opens_nothing_more(timed):
    config = totp_config()
    now = 1_800_000_000 + 40   # late in a window: this one and the next are live
    rotation = frozen(config, now)
    timed.apply(rotation.concrete())
    seq = config.sequences[0]
    concrete = totp.variant(seq, totp.window_of(int(now * 1e9), seq.totp.window_ns))
    knock_all(timed, "198.51.100.7", concrete.knock)
    assert timed.run(tcp("198.51.100.7", 22)) == XDP_PASS
    assert rotation.spend(policy.sequence_uid(concrete))
    timed.apply(rotation.concrete())
    knock_all(timed, "203.0.113.50", concrete.knock)   # the sniffed knock, replayed at once
    assert timed.run(tcp("203.0.113.50", 22)) == XDP_DROP
    assert timed.run(tcp("198.51.100.7", 22)) == XDP_PASS   # the grant itself stays


def test_a_spent_window_stays_spent_for_a_new_controller_and_a_stateless_apply(timed, private_spent_file):
    # Spent windows lived in the controller's memory only: a restart, a
    # reload or an attach brought a used knock back (issue 13.4).
    config = totp_config()
    seq = config.sequences[0]
    window = totp.window_of(time.time_ns(), seq.totp.window_ns)   # live for half a window at least
    spent_uid = policy.sequence_uid(totp.variant(seq, window))
    first = totp.Rotation(config)
    first.concrete()
    assert first.spend(spent_uid)
    restarted = totp.Rotation(config).concrete()
    assert spent_uid not in {policy.sequence_uid(s) for s in restarted.sequences} and len(restarted.sequences) == 1
    timed.apply(config)   # `xknock reload`, `attach`: no rotation object
    live = {s.uid for s in live_sequences(timed.maps).values()}
    assert spent_uid not in live and len(live) == 1
    assert os.stat(private_spent_file).st_mode & 0o777 == 0o600
    assert seq.totp.secret.hex() not in open(private_spent_file).read()


@pytest.mark.parametrize("damage", ["garbage", "others may write"])
def test_a_spent_file_not_to_be_trusted_writes_no_time_based_policy(private_spent_file, damage):
    from xknock.controller.errors import XknockError

    config = totp_config()
    with open(private_spent_file, "w") as f:
        f.write("xknock-totp-spent 1\nnot a line\n" if damage == "garbage" else "xknock-totp-spent 1\n")
    os.chmod(private_spent_file, 0o600 if damage == "garbage" else 0o666)
    with pytest.raises(XknockError, match="move the file away"):
        policy.compile_policy(config, 0)


def test_a_stateless_apply_writes_the_current_windows(timed):
    config = totp_config()
    timed.apply(config)   # `xknock reload`, `attach --once`: no rotation object
    live = {seq.uid for seq in live_sequences(timed.maps).values()}
    now = time.time_ns()
    expected = {policy.sequence_uid(totp.variant(config.sequences[0], w))
                for w in totp.live_windows(now, config.sequences[0].totp.window_ns)}
    assert live == expected


# --- end to end ------------------------------------------------------------------


@pytest.mark.netns
def test_end_to_end_the_client_computes_the_window_and_a_replay_fails(tmp_path):
    from xknock_dev.e2e import Foreground, TcpEchoServer, check, status_json, write_config, xknock

    from xknock_dev.lab import can_connect, lab, wait_for

    text = f"""
[[sequence]]
name = "ssh"
totp = true
secret = "{SECRET}"
knock = ["tcp", "udp", "tcp"]
window = "10s"
port_range = "20000-29999"
open = ["tcp:22"]
open_for = "30s"
spent_file = "{tmp_path / 'spent'}"
"""
    path = write_config(tmp_path, "totp.toml", text)
    os.chmod(path, 0o600)
    with lab("xktotp") as net:
        echo = TcpEchoServer(net.server, 22)
        try:
            with Foreground(net, path) as controller:
                controller.wait_ready()
                # Knock from the client with the shared config: the client computes the ports.
                knocked = check(xknock(net.client, "knock", net.server.ipv4, "--sequence", "ssh", "-c", path))
                assert wait_for(lambda: can_connect(net.client, net.server.ipv4, 22, timeout=1.0), timeout=5)
                # The attacker sniffed those knocks and replays them: that window is spent
                # (taken out of the maps when the controller reads the grant's event).
                steps = knocked.stdout.split(":", 1)[1].split()
                assert wait_for(lambda: steps not in [s["knock"] for s in status_json(net.server)[0]["sequences"]],
                                timeout=2)
                check(xknock(net.attacker, "knock", net.server.ipv4, *steps))
                assert not can_connect(net.attacker, net.server.ipv4, 22, timeout=1.0)
                # Last hour's knock opens nothing either.
                seq = parse_config(text, listening=set()).sequences[0]
                old = totp.variant(seq, totp.window_of(time.time_ns(), seq.totp.window_ns) - 360).knock
                check(xknock(net.attacker, "knock", net.server.ipv4, *map(str, old)))
                assert not can_connect(net.attacker, net.server.ipv4, 22, timeout=1.0)
                # In the next window (this one is spent) the sequence opens again: the
                # controller rotated it in.
                window_ns = seq.totp.window_ns
                time.sleep((window_ns - time.time_ns() % window_ns) / 1e9 + 0.3)
                check(xknock(net.attacker, "knock", net.server.ipv4, "--sequence", "ssh", "-c", path))
                assert wait_for(lambda: can_connect(net.attacker, net.server.ipv4, 22, timeout=1.0), timeout=5)
        finally:
            echo.stop()
            xknock(net.server, "detach", net.server_iface)


@pytest.mark.netns
def test_end_to_end_a_spent_window_stays_spent_after_a_restart_and_xknock_reload(tmp_path):
    from xknock_dev.e2e import Foreground, TcpEchoServer, check, status_json, write_config, xknock

    from xknock_dev.lab import can_connect, lab, wait_for

    text = f"""
[[sequence]]
name = "ssh"
totp = true
secret = "{base64.b32encode(os.urandom(20)).decode()}"
knock = ["tcp", "udp", "tcp"]
window = "10m"
open = ["tcp:22"]
spent_file = "{tmp_path / 'state' / 'spent'}"
"""
    path = write_config(tmp_path, "totp.toml", text)
    os.chmod(path, 0o600)

    def live_knocks(net):
        return [s["knock"] for s in status_json(net.server)[0]["sequences"]]

    with lab("xktotp") as net:
        echo = TcpEchoServer(net.server, 22)
        try:
            with Foreground(net, path) as controller:
                controller.wait_ready()
                knocked = check(xknock(net.client, "knock", net.server.ipv4, "--sequence", "ssh", "-c", path))
                assert wait_for(lambda: can_connect(net.client, net.server.ipv4, 22, timeout=1.0), timeout=5)
                steps = knocked.stdout.split(":", 1)[1].split()
                assert wait_for(lambda: steps not in live_knocks(net), timeout=2)   # spent
            with Foreground(net, path) as controller:   # a new controller: attach writes the policy afresh
                assert controller.log.wait_for(lambda line: "replaced program" in line, 20), controller.log.read_all(0.5)
                assert wait_for(lambda: controller.handles(signal.SIGTERM), timeout=5)
                assert steps not in live_knocks(net) and len(live_knocks(net)) == 1
                check(xknock(net.server, "reload", net.server_iface, "-c", path))
                assert steps not in live_knocks(net) and len(live_knocks(net)) == 1
                check(xknock(net.attacker, "knock", net.server.ipv4, *steps))   # the sniffed knock
                assert not can_connect(net.attacker, net.server.ipv4, 22, timeout=1.0)
        finally:
            echo.stop()
            xknock(net.server, "detach", net.server_iface)


def test_the_client_needs_only_the_secret(tmp_path):
    import subprocess
    import sys

    xknock_cli = os.path.join(os.path.dirname(sys.executable), "xknock")
    secret_file = tmp_path / "ssh.totp"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    argv = [xknock_cli, "knock", "127.0.0.1", "--sequence", "ssh", "--secret-file", str(secret_file),
            "--protos", "tcp,udp,tcp", "--port-range", "20000-29999", "--delay", "0"]
    before = time.time_ns()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    after = time.time_ns()
    assert result.returncode == 0, result.stderr
    seq = totp_config().sequences[0]   # the server's view of the same sequence
    expected = {" ".join(map(str, totp.variant(seq, totp.window_of(t, seq.totp.window_ns)).knock))
                for t in (before, after)}
    assert result.stdout.split(": ", 1)[1].strip() in expected

    for extra, message in (([], "--secret-file needs --protos"),
                           (["--protos", "tcp,icmp"], 'knock[1] \'icmp\': with totp = true, write just "tcp" or "udp"')):
        bad = [a for a in argv if a not in ("--protos", "tcp,udp,tcp")] + extra
        result = subprocess.run(bad, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    secret_file.chmod(0o644)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "chmod 600" in result.stderr, result.stderr
