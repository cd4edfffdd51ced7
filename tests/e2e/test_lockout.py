"""Attach does not lock out established sessions (the operator's own first).

Unit tests of the /proc parsing and the at-risk rule, then end to end: a
client holds a TCP session to the guarded port while the server attaches."""

import ipaddress
import sys

import pytest
from xknock_dev.e2e import DROPPED, HeldConnection, config_text, served_lab, status_json, write_config, xknock

from xknock.controller.kernel import procnet
from xknock.controller.state import lockout
from xknock.controller.config import parse_config
from xknock_dev.lab import can_connect

CLIENT = ipaddress.ip_address("10.77.0.2")
GUARDED = 22


def test_proc_net_addresses_parse_in_host_order():
    assert procnet.decode_address("0100007F:0016") == (ipaddress.ip_address("127.0.0.1"), 22)
    v6 = "0000000000000000FFFF00000200A8C0:1F90"   # ::ffff:192.168.0.2 as /proc/net/tcp6 prints it
    assert procnet.decode_address(v6) == (ipaddress.ip_address("192.168.0.2"), 8080)
    assert procnet.decode_address("B80D0120000000000000000001000000:0050") == (
        ipaddress.ip_address("2001:db8::1"), 80)


# 10.77.0.1:22 <- 10.77.0.2:54321 established, and ::1 <- 2001:db8::2, as a
# host of each byte order prints them: every 32-bit word a native integer.
PROC_TCP = {
    "little": ("01004D0A:0016", "02004D0A:D431", "00000000000000000000000001000000:0016",
               "B80D0120000000000000000002000000:D431"),
    "big": ("0A4D0001:0016", "0A4D0002:D431", "00000000000000000000000000000001:0016",
            "20010DB8000000000000000000000002:D431"),
}


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_established_sessions_decode_in_the_hosts_byte_order(tmp_path, monkeypatch, byteorder):
    local, remote, local6, remote6 = PROC_TCP[byteorder]
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    rest = "00000000:00000000 00:00000000 00000000     0        0 1 1\n"
    (tmp_path / "tcp").write_text(header + f"   0: {local} {remote} 01 {rest}"
                                  + f"   1: {local} 00000000:0000 0A {rest}")   # a listener: not a session
    (tmp_path / "tcp6").write_text(header + f"   0: {local6} {remote6} 01 {rest}")
    monkeypatch.setattr(sys, "byteorder", byteorder)
    assert lockout.established_sessions(str(tmp_path)) == {
        (ipaddress.ip_address("10.77.0.2"), 22), (ipaddress.ip_address("2001:db8::2"), 22)}


def test_ssh_connection_names_your_session():
    env = {"SSH_CONNECTION": "192.0.2.7 51234 10.0.0.1 22"}
    assert lockout.your_session(env) == (ipaddress.ip_address("192.0.2.7"), 22)
    assert lockout.your_session({}) is None
    assert lockout.your_session({"SSH_CONNECTION": "garbage"}) is None


@pytest.mark.parametrize("allow,sessions,yours,expected", [
    ([], {(CLIENT, 22)}, None, ["10.77.0.2 -> tcp:22"]),
    ([], {(CLIENT, 80)}, None, []),                                    # port not guarded
    (["10.77.0.0/24"], {(CLIENT, 22)}, None, []),                      # source allowed
    (["::/0"], {(CLIENT, 22)}, None, ["10.77.0.2 -> tcp:22"]),        # an IPv6 entry allows no IPv4 source
    ([], set(), (ipaddress.ip_address("192.0.2.7"), 22), ["192.0.2.7 -> tcp:22 (your session)"]),
])
def test_sessions_at_risk(allow, sessions, yours, expected):
    config = parse_config(config_text(allow=allow) if allow else config_text(), listening=set())
    assert [str(s) for s in lockout.sessions_at_risk(config, sessions=sessions, yours=yours)] == expected


@pytest.fixture(scope="module")
def net():
    with served_lab("xklock", GUARDED) as built:
        yield built


@pytest.fixture
def session(net):
    xknock(net.server, "detach", net.server_iface)
    held = HeldConnection(net.client, net.server.ipv4, GUARDED)
    assert held.exchange("before") == "echo before"
    yield held
    held.close()
    xknock(net.server, "detach", net.server_iface)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, "lock.toml", config_text())


def attach(net, config, *flags):
    return xknock(net.server, "attach", net.server_iface, "-c", config, "--once", *flags)


def test_attach_refuses_to_cut_an_established_session(net, session, config):
    result = attach(net, config)
    assert result.returncode == 1
    assert "would cut 1 established session(s) to guarded ports: 10.77.0.2 -> tcp:22" in result.stderr
    assert "Traceback" not in result.stderr
    assert status_json(net.server) == []                      # nothing attached
    assert session.exchange("still") == "echo still"


def test_keep_sessions_grants_the_session_but_no_new_connection(net, session, config):
    result = attach(net, config, "--keep-sessions")
    assert result.returncode == 0, result.stderr
    assert "kept established session 10.77.0.2 -> tcp:22" in result.stderr
    assert session.exchange("after attach") == "echo after attach"
    assert not can_connect(net.client, net.server.ipv4, GUARDED, timeout=DROPPED)
    [running] = status_json(net.server)
    [grant] = running["grants"]
    assert (grant["source"], grant["port"], grant["window_left_s"]) == ("10.77.0.2", "tcp:22", 0)


@pytest.mark.parametrize("flag", ["--cut-sessions", "--force"])
def test_cut_sessions_cuts_the_session(net, session, config, flag):
    """--force is the deprecated spelling of --replace --cut-sessions."""
    result = attach(net, config, flag)
    assert result.returncode == 0, result.stderr
    assert "cutting established session 10.77.0.2 -> tcp:22 (--cut-sessions)" in result.stderr
    assert ("--force is deprecated" in result.stderr) == (flag == "--force")
    assert session.exchange("cut") != "echo cut"


def test_replace_alone_does_not_cut_the_session(net, session, config):
    result = attach(net, config, "--replace")
    assert result.returncode == 1 and "would cut 1 established session(s)" in result.stderr, result.stderr
    assert status_json(net.server) == []
    assert session.exchange("kept") == "echo kept"


def test_keep_sessions_and_cut_sessions_together_are_refused(net, session, config):
    result = attach(net, config, "--keep-sessions", "--cut-sessions")
    assert result.returncode == 2 and "give one" in result.stderr, result.stderr
    assert status_json(net.server) == []


def test_an_allow_listed_session_is_not_at_risk(net, session, tmp_path):
    allowed = write_config(tmp_path, "allow.toml", config_text(allow=["10.77.0.2"]))
    result = attach(net, allowed)
    assert result.returncode == 0, result.stderr
    assert session.exchange("allowed") == "echo allowed"
