"""Interfaces that come and go (controller/daemon/links.py): an attached
interface deleted and created again under the same name gets the filter
back, with its maps, within a second; a rename, a move to another namespace and a
filter taken off by someone are reported, the moved one filtered again when
it is back. End to end in the lab, with the real
controller and real connections (at the XDP hook; test_links_tc.py runs
these cases at the TC hook)."""

import os
import subprocess
import sys
import time

import pytest

from xknock_dev.e2e import Foreground, check, config_text, filter_prog_id, served_lab, status_json, write_config, xknock
from xknock_dev.lab import IPV4_PREFIX, can_connect, wait_for

pytestmark = pytest.mark.netns

GUARDED = 22
ACCEPTED, DROPPED = 2.0, 0.5

CONFIG = config_text().replace('mode = "enforce"', 'mode = "enforce"\nanswer = "drop"')


@pytest.fixture(scope="module")
def net():
    with served_lab("xklinks", GUARDED, ipv6=False) as built:
        yield built


@pytest.fixture
def controller(net, tmp_path):
    xknock(net.server, "detach", net.server_iface)
    config = write_config(tmp_path, "links.toml", CONFIG)
    with Foreground(net, config, "--metrics-addr", METRICS) as running:
        running.wait_ready()
        yield running
    xknock(net.server, "detach", net.server_iface)


def blocked(host, addr):
    return not can_connect(host, addr, GUARDED, timeout=DROPPED)


METRICS = "127.0.0.1:9798"   # in the server's own namespace: nothing else listens there


def metrics_text(net):
    url = f"http://{METRICS}/metrics"
    out = net.server.run([sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"])
    return out.stdout


def test_an_interface_deleted_and_made_again_gets_the_filter_back_with_its_grants(net, controller, capsys):
    server = net.server.ipv4
    check(xknock(net.server, "grant", net.server_iface, net.client.ipv4, "--port", f"tcp:{GUARDED}", "--for", "5m"))
    assert can_connect(net.client, server, GUARDED, timeout=ACCEPTED)
    assert blocked(net.attacker, server)
    prog_id = filter_prog_id(net)

    net.unplug(net.server)
    assert controller.log.wait_for(lambda l: "the filter comes back if an interface of that name appears again" in l, timeout=5), controller.log.read_all(0.5)
    net.replug(net.server)
    made_again = time.monotonic()
    # Within a second the new interface runs the same program (so the same maps).
    assert wait_for(lambda: filter_prog_id(net) == prog_id, timeout=1.0), \
        f"not re-attached within 1 s:\n{controller.log.read_all(0.5)}"
    gap = time.monotonic() - made_again
    line = controller.log.wait_for(lambda l: "appeared again: the filter is attached" in l, timeout=5)
    assert line and f"iface={net.server_iface}" in line, controller.log.read_all(0.5)
    with capsys.disabled():
        print(f"\n  re-attached {gap * 1000:.0f} ms after the interface came back; {line.strip()}")

    # The grant was kept; everyone else is still kept out.
    assert can_connect(net.client, server, GUARDED, timeout=ACCEPTED)
    assert blocked(net.attacker, server)
    [filt] = status_json(net.server)
    assert [g["source"] for g in filt["grants"]] == [net.client.ipv4]
    text = metrics_text(net)
    assert f'device="{net.server_iface}",event="reattached"' in text, text
    assert f'device="{net.server_iface}",event="vanished"' in text, text


def test_a_filter_taken_off_by_xknock_detach_is_reported_and_left_off(net, controller):
    check(xknock(net.server, "detach", net.server_iface))
    line = controller.log.wait_for(lambda l: "was removed or replaced" in l, timeout=5)
    assert line, controller.log.read_all(0.5)
    time.sleep(1.5)   # more than a check interval: the controller must not put it back
    assert filter_prog_id(net) == 0
    assert "Traceback" not in controller.log.read_all(0.2)


def test_a_renamed_interface_is_reported_and_keeps_the_filter(net, controller):
    new_name = "ren-" + net.token
    prog_id = filter_prog_id(net)
    try:
        for argv in (["ip", "link", "set", net.server_iface, "down"],
                     ["ip", "link", "set", net.server_iface, "name", new_name],
                     ["ip", "link", "set", new_name, "up"]):
            check(net.server.run(argv))
        line = controller.log.wait_for(lambda l: " was renamed to " in l, timeout=5)
        assert line and f"new_name={new_name}" in line, controller.log.read_all(0.5)
        assert filter_prog_id(net, new_name) == prog_id
    finally:
        for argv in (["ip", "link", "set", new_name, "down"],
                     ["ip", "link", "set", new_name, "name", net.server_iface],
                     ["ip", "link", "set", net.server_iface, "up"]):
            net.server.run(argv)
    # Back under its name, it is the same interface: no second program, nothing lost.
    assert wait_for(lambda: filter_prog_id(net) == prog_id, timeout=2)


def test_an_interface_moved_to_another_namespace_is_reported_and_filtered_when_back(net, controller, capsys):
    iface, server = net.server_iface, net.server.ipv4
    check(xknock(net.server, "grant", iface, net.client.ipv4, "--port", f"tcp:{GUARDED}", "--for", "5m"))
    prog_id = filter_prog_id(net)
    elsewhere = f"xkmove-{os.getpid()}-{net.token}"
    check(subprocess.run(["ip", "netns", "add", elsewhere], capture_output=True, text=True))
    away = False
    try:
        check(net.server.run(["ip", "link", "set", "dev", iface, "netns", elsewhere]))
        away = True
        line = controller.log.wait_for(lambda l: "deleted or moved to another network namespace" in l, timeout=5)
        assert line and f"iface={iface}" in line, controller.log.read_all(0.5)
        check(subprocess.run(["ip", "-n", elsewhere, "link", "set", "dev", iface, "netns", net.server.name],
                             capture_output=True, text=True))
        away = False
    finally:
        if away:
            subprocess.run(["ip", "-n", elsewhere, "link", "set", "dev", iface, "netns", net.server.name])
        subprocess.run(["ip", "netns", "del", elsewhere])
    # Back (a move takes the addresses and the up state): filtered again, by
    # the same program, so the grant holds and no one else gets in.
    assert wait_for(lambda: filter_prog_id(net) == prog_id, timeout=1.0), controller.log.read_all(0.5)
    # Whether the program stayed on the device through the move or was put back, it is said.
    line = controller.log.wait_for(lambda l: "is back, with the filter" in l or "appeared again: the filter" in l)
    assert line, controller.log.read_all(0.5)
    with capsys.disabled():
        print(f"\n  moved back: {line.strip()}")
    for argv in (["ip", "addr", "add", f"{server}/{IPV4_PREFIX}", "dev", iface], ["ip", "link", "set", iface, "up"]):
        check(net.server.run(argv))
    assert wait_for(lambda: can_connect(net.client, server, GUARDED, timeout=ACCEPTED), timeout=10), \
        controller.log.read_all(0.5)
    assert blocked(net.attacker, server)
    assert "Traceback" not in controller.log.read_all(0.2)
