"""End to end: the real filter on the server's interface of a namespace lab,
the real `xknock` commands, real sockets, over IPv4 and IPv6.

One lab and one TCP echo server (guarded port 22, unguarded port 80) serve
the whole module; every test detaches what the one before left and attaches
its own config, so no grant or knock carries over.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from xknock_dev.e2e import (
    ACCEPTED, DROPPED, Foreground, HeldConnection, LineReader, SEQUENCE, XKNOCK, addr_of, attach_options, check,
    config_text,
    fresh_attach, full_pipe, knock, plain_knock, served_lab, status_json, write_config, writing_to_stderr, xknock,
)
from xknock_dev.lab import can_connect, stop_process, wait_for

pytestmark = pytest.mark.netns

GUARDED, UNGUARDED = 22, 80
FAMILIES = ["ipv4", "ipv6"]


@pytest.fixture(scope="module")
def net():
    with served_lab("xke2e", GUARDED, UNGUARDED) as built:
        yield built


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e-configs")


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def connects(host, addr, port=GUARDED):
    return can_connect(host, addr, port, timeout=ACCEPTED)


def blocked(host, addr, port=GUARDED):
    return not can_connect(host, addr, port, timeout=DROPPED)


def test_guarded_port_is_dark_to_everyone_and_other_ports_are_not(net, configs, family):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    server = addr_of(net.server, family)
    for host in (net.client, net.attacker):
        assert blocked(host, server), f"{host.name} reached guarded [{server}]:22 without knocking"
        assert connects(host, server, UNGUARDED), f"{host.name} cannot reach unguarded [{server}]:80"


def test_correct_knock_opens_the_port_to_that_source_only(net, configs, family):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    server = addr_of(net.server, family)
    assert blocked(net.client, server)
    knock(net.client, server, *SEQUENCE)
    assert connects(net.client, server)
    assert blocked(net.attacker, server)
    [grant] = status_json(net.server)[0]["grants"]
    assert (grant["source"], grant["port"], grant["sequence"]) == (addr_of(net.client, family), "tcp:22", "ssh")


@pytest.mark.slow
def test_window_closes_for_new_connections_but_an_established_session_lives_on(net, configs, family):
    open_for = 2.0
    fresh_attach(net, write_config(configs, "short.toml", config_text(open_for="2s", idle_timeout="30s")))
    server = addr_of(net.server, family)
    knock(net.client, server, *SEQUENCE)
    knocked = time.monotonic()
    session = HeldConnection(net.client, server, GUARDED)
    try:
        assert session.exchange("in-the-window") == "echo in-the-window"
        # Past the window: a new connection is refused, the session goes on.
        time.sleep(max(0.0, knocked + open_for + 0.3 - time.monotonic()))
        assert blocked(net.client, server), "a new connection was accepted after open_for"
        assert session.exchange("after-the-window") == "echo after-the-window"
        assert session.exchange("still-alive") == "echo still-alive"
    finally:
        session.close()


def test_a_wrong_step_in_the_middle_opens_nothing(net, configs, family):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    server = addr_of(net.server, family)
    # tcp:9000 where udp:8000 is due resets; the rest then leads nowhere.
    knock(net.client, server, "tcp:7000", "tcp:9000", "udp:8000", "tcp:9000")
    assert blocked(net.client, server)
    [running] = status_json(net.server)
    assert running["grants"] == [] and running["counters"]["knock_reset"] >= 1
    # The wrong step only reset the progress: a right knock afterwards opens.
    knock(net.client, server, "tcp:7000", "udp:8000", "tcp:9000")
    assert connects(net.client, server)


@pytest.mark.slow
def test_knocks_slower_than_step_timeout_open_nothing(net, configs):
    # One family: the clock does not care, and each run waits out two gaps.
    fresh_attach(net, write_config(configs, "slow.toml", config_text(step_timeout="1s")))
    server = net.server.ipv6
    knock(net.client, server, *SEQUENCE, delay=1.3)
    assert blocked(net.client, server)
    [running] = status_json(net.server)
    assert running["grants"] == [] and running["counters"]["knock_timed_out"] >= 1
    # The same knocks within step_timeout do open: the gap alone made the difference.
    knock(net.client, server, *SEQUENCE, delay=0.5)
    assert connects(net.client, server)


def test_allow_list_needs_no_knock_and_deny_list_reaches_nothing(net, configs, family):
    allow = (net.client.ipv4, net.client.ipv6)
    deny = (net.attacker.ipv4, net.attacker.ipv6)
    fresh_attach(net, write_config(configs, "lists.toml", config_text(allow=allow, deny=deny)))
    server = addr_of(net.server, family)
    assert connects(net.client, server), "an allow-listed source must not need to knock"
    assert connects(net.client, server, UNGUARDED)
    assert blocked(net.attacker, server, UNGUARDED), "a deny-listed source reached an unguarded port"
    knock(net.attacker, server, *SEQUENCE)
    assert blocked(net.attacker, server), "a deny-listed source knocked its way in"


def test_reload_changes_sequences_and_keeps_live_grants(net, configs, family):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    server = addr_of(net.server, family)
    knock(net.client, server, *SEQUENCE)
    assert connects(net.client, server)

    new_sequence = ("udp:7100", "tcp:7200", "udp:7300")
    reloaded = write_config(configs, "reloaded.toml", config_text(knock=new_sequence, name="ssh2"))
    check(xknock(net.server, "reload", net.server_iface, "-c", reloaded))
    [live] = status_json(net.server)[0]["sequences"]
    assert (live["name"], live["knock"]) == ("ssh2", list(new_sequence))

    assert connects(net.client, server), "reload dropped a live grant"
    knock(net.attacker, server, *SEQUENCE)
    assert blocked(net.attacker, server), "the old sequence still opens after reload"
    knock(net.attacker, server, *new_sequence)
    assert connects(net.attacker, server), "the new sequence does not open after reload"


def test_grant_and_revoke_by_the_operator(net, configs, family):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    server, client = addr_of(net.server, family), addr_of(net.client, family)
    out = check(xknock(net.server, "grant", net.server_iface, client, "--port", "tcp:22", "--for", "30s")).stdout
    assert "tcp:22" in out
    assert connects(net.client, server)
    assert blocked(net.attacker, server)
    [grant] = status_json(net.server)[0]["grants"]
    assert (grant["source"], grant["sequence"]) == (client, "operator")
    out = check(xknock(net.server, "revoke", net.server_iface, client)).stdout
    assert "1 grant(s) removed" in out
    assert blocked(net.client, server)


def test_grants_lists_and_json_answers(net, configs):
    """`xknock grants IFACE` (text, --json) shows what status shows; grant and revoke answer in JSON too."""
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    client = net.client.ipv4
    assert check(xknock(net.server, "grants", net.server_iface)).stdout.strip() == "grants: 0"
    granted = json.loads(check(xknock(net.server, "grant", net.server_iface, client, "--port", "tcp/22", "--for",
                                      "1m", "--json")).stdout)
    assert granted == {"granted": client, "ports": ["tcp:22"], "for_s": 60.0, "idle_s": 60.0}
    listed = json.loads(check(xknock(net.server, "grants", net.server_iface, "--json")).stdout)["grants"]
    assert listed == status_json(net.server)[0]["grants"] or \
        [g["source"] for g in listed] == [client]   # a tenth of a second may pass between the two reads
    assert (listed[0]["source"], listed[0]["port"], listed[0]["sequence"]) == (client, "tcp:22", "operator")
    text = check(xknock(net.server, "grants", net.server_iface)).stdout.splitlines()
    assert text[0] == "grants: 1" and text[1].split()[:3] == [client, "tcp:22", "operator"]
    revoked = json.loads(check(xknock(net.server, "revoke", net.server_iface, client, "--json")).stdout)
    assert revoked == {"revoked": client, "grants_removed": 1}


@pytest.mark.parametrize("family, stop", [("ipv4", signal.SIGTERM), ("ipv6", signal.SIGINT)],
                         ids=["ipv4-SIGTERM", "ipv6-SIGINT"])
def test_foreground_controller_logs_grants_and_stops_cleanly(net, configs, family, stop):
    config = write_config(configs, "basic.toml", config_text())
    xknock(net.server, "detach", net.server_iface)
    server, client = addr_of(net.server, family), addr_of(net.client, family)
    with Foreground(net, config) as controller:
        controller.wait_ready()
        knock(net.client, server, *SEQUENCE)
        granted = controller.log.wait_for(lambda line: " granted " in f"{line} ", timeout=5)
        assert granted, f"no 'granted' event logged:\n{controller.log.text()}"
        assert f"source={client}" in granted.split() and "sequence=ssh" in granted.split(), granted

        controller.send_signal(stop)
        assert controller.wait(10) == 0
        log = controller.log.read_all(2)
        assert "the filter stays attached and enforcing" in log
        assert "Traceback" not in log
    # ... and so it does.
    assert blocked(net.attacker, server)
    assert connects(net.client, server)


def test_filter_outlives_a_killed_controller_and_attach_readopts_its_grants(net, configs):
    config = write_config(configs, "basic.toml", config_text())
    xknock(net.server, "detach", net.server_iface)
    server, client = net.server.ipv6, net.client.ipv6
    with Foreground(net, config) as controller:
        controller.wait_attached()
        knock(net.client, server, *SEQUENCE)
        assert controller.log.wait_for(lambda line: "granted" in line and f"source={client}" in line, timeout=5)
        controller.send_signal(signal.SIGKILL)
        assert controller.wait(10) == -signal.SIGKILL

    assert blocked(net.attacker, server), "the filter stopped enforcing with its controller"
    assert connects(net.client, server), "the grant died with the controller"

    out = check(xknock(net.server, "attach", net.server_iface, "-c", config, "--once", *attach_options(net)))
    assert "replaced program" in out.stderr
    [grant] = status_json(net.server)[0]["grants"]
    assert (grant["source"], grant["port"], grant["sequence"]) == (client, "tcp:22", "ssh")
    assert connects(net.client, server)
    assert blocked(net.attacker, server)


def test_detach_restores_plain_traffic(net, configs):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    assert blocked(net.attacker, net.server.ipv4)
    out = check(xknock(net.server, "detach", net.server_iface)).stdout
    assert "no longer filtered" in out
    assert status_json(net.server) == []
    for family in FAMILIES:
        assert connects(net.attacker, addr_of(net.server, family))


def test_plain_sockets_knock_as_well_as_the_client(net, configs, family):
    fresh_attach(net, write_config(configs, "basic.toml", config_text()))
    server = addr_of(net.server, family)
    plain_knock(net.client, server, *SEQUENCE)
    assert wait_for(lambda: status_json(net.server)[0]["grants"], timeout=2)
    assert connects(net.client, server)
    assert blocked(net.attacker, server)


@pytest.mark.parametrize("how", [
    "sighup",
    "xknock reload",
])
def test_foreground_controller_names_the_sequences_of_a_reloaded_config(net, configs, how):
    config = write_config(configs, "foreground.toml", config_text())
    xknock(net.server, "detach", net.server_iface)
    server, client = net.server.ipv4, net.client.ipv4
    new_sequence = ("udp:7100", "tcp:7200", "udp:7300")
    with Foreground(net, config) as controller:
        controller.wait_ready()
        write_config(configs, "foreground.toml", config_text(knock=new_sequence, name="renamed"))
        if how == "sighup":
            controller.send_signal(signal.SIGHUP)
            assert controller.log.wait_for(lambda line: line.startswith("info reloaded"), timeout=5)
        else:
            check(xknock(net.server, "reload", net.server_iface, "-c", config))
        knock(net.client, server, *new_sequence)
        granted = controller.log.wait_for(lambda line: " granted " in f"{line} ", timeout=5)
        assert granted and f"source={client}" in granted.split(), controller.log.text()
        assert "sequence=renamed" in granted.split(), granted


def test_a_sigterm_sent_as_the_controller_logs_attached_is_handled(net, configs):
    """The "attached" line is all a supervisor sees of the controller's start.
    To hit the moment it is written every time, the controller's stderr is a
    full pipe: it blocks writing that line, and gets the SIGTERM there."""
    config = write_config(configs, "basic.toml", config_text())
    xknock(net.server, "detach", net.server_iface)
    with full_pipe() as (read_end, write_end):
        process = net.server.popen([XKNOCK, "attach", net.server_iface, "-c", config],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end)
        os.close(write_end)
        try:
            assert wait_for(lambda: writing_to_stderr(process.pid), timeout=20), "the controller never logged"
            process.send_signal(signal.SIGTERM)
            log = LineReader(read_end).read_all(10)
            assert process.wait(10) == 0, f"the controller died of signal {-process.returncode}"
            assert " attached on " in log and "the filter stays attached and enforcing" in log
        finally:
            stop_process(process)


def test_the_running_controller_has_left_bcc_behind(net, configs):
    """After attaching, the controller goes on in a process of its own that
    never loaded BCC or LLVM (cli/attach.py, the hand-over): same PID."""
    config = write_config(configs, "basic.toml", config_text())
    xknock(net.server, "detach", net.server_iface)
    with Foreground(net, config) as controller:
        controller.wait_ready()
        running = controller.log.wait_for(lambda line: " controller running" in f" {line}", timeout=5)
        assert running and "bcc=false" in running.split(), running
        with open(f"/proc/{controller.process.pid}/maps") as maps:
            loaded = maps.read()
        assert "libbcc" not in loaded and "libLLVM" not in loaded
        knock(net.client, net.server.ipv4, *SEQUENCE)   # and it still serves: the grant is logged
        assert controller.log.wait_for(lambda line: " granted " in f"{line} ", timeout=5), controller.log.text()
