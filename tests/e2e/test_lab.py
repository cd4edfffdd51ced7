"""The namespace lab itself: every host reaches the server over both
families, and nothing of a lab is left once its context is gone."""

import os
import pwd
import subprocess

import pytest

from xknock_dev.lab import Lab, can_connect, can_ping, lab, tcp_listen, udp_echo, udp_roundtrip

pytestmark = pytest.mark.netns


def namespaces_with(token):
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if token in line]


def links_with(token):
    """Interfaces of the lab that ended up in the caller's namespace (none should)."""
    listing = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if token in line]


def test_hosts_reach_the_server_over_ipv4_and_ipv6():
    with lab() as net:
        token = net.token
        assert len(namespaces_with(token)) == 4
        assert links_with(token) == []
        with tcp_listen(net.server, 2222), udp_echo(net.server, 5353):
            for host in (net.client, net.attacker):
                for addr in (net.server.ipv4, net.server.ipv6):
                    assert can_ping(host, addr), f"{host.name} cannot ping {addr}"
                    assert can_connect(host, addr, 2222), f"{host.name} cannot connect to [{addr}]:2222"
                    assert udp_roundtrip(host, addr, 5353), f"no UDP echo from [{addr}]:5353 to {host.name}"
                    # Nothing listens there: refused at once, not a timeout.
                    assert not can_connect(host, addr, 2223)
    assert namespaces_with(token) == []


def test_ipv4_only_lab():
    with lab(ipv6=False) as net:
        assert net.server.ipv6 is None
        assert can_ping(net.client, net.server.ipv4)
        assert not can_ping(net.client, "fd00:77::1", timeout=0.2)


def test_teardown_after_a_failing_step_leaves_nothing():
    with pytest.raises(RuntimeError, match="boom"):
        with lab() as net:
            token = net.token
            raise RuntimeError("boom")
    assert namespaces_with(token) == []


def test_processes_left_running_are_stopped():
    with lab() as net:
        sleeper = net.server.popen(["sleep", "600"])
    assert sleeper.poll() is not None


def test_a_failed_build_removes_what_it_made(monkeypatch):
    half_built = Lab()

    def fail():
        raise RuntimeError("interfaces never came up")

    monkeypatch.setattr(half_built, "_wait_until_ready", fail)
    with pytest.raises(RuntimeError, match="never came up"):
        with half_built:
            pass
    assert namespaces_with(half_built.token) == []


def test_labs_side_by_side_do_not_clash():
    with lab() as first, lab() as second:
        assert first.token != second.token
        assert first.server_iface != second.server_iface
        assert can_ping(first.client, first.server.ipv4)
        assert can_ping(second.client, second.server.ipv6)


def test_commands_see_the_tests_home_not_roots(home):
    # conftest gives every test a fresh HOME; what runs in the lab inherits it.
    real_home = pwd.getpwuid(os.geteuid()).pw_dir
    assert os.path.realpath(home) != os.path.realpath(real_home)
    assert subprocess.run(["sh", "-c", 'echo "$HOME"'], capture_output=True, text=True).stdout.strip() == str(home)
    with lab(ipv6=False) as net:
        assert net.client.run(["sh", "-c", 'echo "$HOME"']).stdout.strip() == str(home)
