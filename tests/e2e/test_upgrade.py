"""Upgrades keep state (issue 13): `xknock attach` over a running filter whose
maps have another layout carries its grants, bans and SPA-known sources into
the new program's maps and swaps the program atomically.

The old filter is a build of another layout (xknock_dev.testrun.OTHER_LAYOUT:
grants with two fields of the same size swapped, which a size check cannot
tell), attached by this process in the lab's server namespace; the upgrade is
the real CLI's `attach --once` there, while a client keeps exchanging data on
its grant and an attacker keeps trying the guarded port."""

import ctypes
import ipaddress
import os
import time

import pytest

from fault_helpers import Attacker, Exchanges
from xknock.controller.config import parse_config
from xknock.controller.daemon import lifecycle
from xknock.controller.errors import XknockError
from xknock.controller.kernel import datapath, layout, stamp
from xknock.controller.kernel.clock import monotonic_ns
from xknock.controller.kernel.maps import FilterMaps, to_addr
from xknock_dev.e2e import (
    DROPPED, SEQUENCE, HeldConnection, TcpEchoServer, check, config_text, knock, remove_xdp, status_json,
    write_config, xknock,
)
from xknock_dev.lab import can_connect, in_netns, lab, wait_for
from xknock_dev.testrun import OTHER_LAYOUT

pytestmark = pytest.mark.netns

GUARDED = 22
BANNED = "192.0.2.66"
SPA_KNOWN = "192.0.2.77"


@pytest.fixture(scope="module")
def net():
    with lab("xkupg") as built:
        server = TcpEchoServer(built.server, GUARDED)
        try:
            yield built
        finally:
            server.stop()


@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path, "upgrade.toml", config_text(open_for="5m", idle_timeout="5m"))


@pytest.fixture
def old_filter(net, config_path):
    """The filter of the other layout, attached to the server's interface,
    with the client's grant (from its knock), a ban and an SPA-known source.
    Removed afterwards, pins and all."""
    with in_netns(net.server.name):
        config = parse_config(open(config_path).read(), listening=set())
        attached = lifecycle.attach([net.server_iface], config, cflags=[OTHER_LAYOUT])
        old_pins = attached.pin_dir
    try:
        now = monotonic_ns()
        ban = layout.Ban(until_ns=now + 600 * 10**9, since_ns=now)
        attached.maps.bans.update(to_addr(ipaddress.ip_address(BANNED)), ban)   # the same layout in both builds
        attached.maps.spa_known.update(to_addr(ipaddress.ip_address(SPA_KNOWN)), ctypes.c_uint64(now))
        assert not can_connect(net.client, net.server.ipv4, GUARDED, timeout=DROPPED)
        knock(net.client, net.server.ipv4, *SEQUENCE)
        assert can_connect(net.client, net.server.ipv4, GUARDED, timeout=3.0), "the old filter's knock opened nothing"
        yield attached
    finally:
        attached.maps.close()
        xknock(net.server, "detach", net.server_iface)
        remove_xdp(net.server, net.server_iface)
        with in_netns(net.server.name):
            datapath.remove_pins(old_pins)


def _grant_sources(filter_status):
    return {(g["source"], g["port"]) for g in filter_status["grants"]}


def test_an_upgrade_across_a_layout_change_keeps_every_grant_and_passes_no_attacker(net, config_path, old_filter):
    old_prog = old_filter.loaded.prog_id
    assert stamp.read(old_filter.maps.control.fd) != layout.fingerprint()
    refused = xknock(net.server, "status", net.server_iface)   # this version cannot read the old maps
    assert refused.returncode == 1 and "another version of xknock" in refused.stderr, refused.stderr
    session = HeldConnection(net.client, net.server.ipv4, GUARDED)
    exchanges = Exchanges(session)
    attacker = Attacker(net.attacker, GUARDED, net.server.ipv4)
    exchanges.start()
    try:
        assert wait_for(lambda: exchanges.ok >= 20, timeout=5), "the session exchanges nothing"
        before, started = exchanges.ok, time.monotonic()
        out = check(xknock(net.server, "attach", net.server_iface, "-c", config_path, "--once"))
        during, took = exchanges.ok - before, time.monotonic() - started
    finally:
        ok, failures = exchanges.stop()
        attempts, breaches = attacker.finish()
    assert f"replaced program {old_prog}" in out.stderr, out.stderr
    assert "carried the old filter's state into maps of the new layout: grants 1, bans 1" in out.stderr, out.stderr
    print(f"\nupgrade (the whole `attach --once`) {took:.2f} s; {ok} echoes ({during} during it); "
          f"attacker {attempts} attempts")

    [running] = status_json(net.server)
    new_prog = running["interfaces"][0]["prog_id"]
    assert new_prog != old_prog
    with FilterMaps.from_prog(new_prog) as maps:
        assert stamp.read(maps.control.fd) == layout.fingerprint(), "the new maps are this version's"
        assert maps.spa_known.lookup(to_addr(ipaddress.ip_address(SPA_KNOWN))) is not None
        assert maps.counters.total(layout.Reason.GRANT_CREATED) >= 1, "the old counters were not added"
    assert not failures, f"the session missed echoes across the upgrade: {failures[:5]}"
    assert session.exchange("after") == "echo after"
    assert not breaches, f"the attacker connected during the upgrade: {breaches}"
    assert attempts >= 5, "the attacker loop hardly ran"
    assert (net.client.ipv4, f"tcp:{GUARDED}") in _grant_sources(running), "the grant did not survive"
    assert BANNED in [b["source"] for b in running["bans"]], "the ban did not survive"
    # The grant's window, read right: new connections still open (a misread
    # window, the idle timeout taken for it, would have closed it long ago).
    assert can_connect(net.client, net.server.ipv4, GUARDED, timeout=3.0)
    assert not can_connect(net.attacker, net.server.ipv4, GUARDED, timeout=DROPPED)
    session.close()


def test_a_refused_upgrade_leaves_the_old_filter_attached_and_untouched(net, config_path, old_filter):
    old_prog = old_filter.loaded.prog_id
    grants_before = {bytes(k): bytes(v) for k, v in old_filter.maps.grants.items()}
    assert grants_before

    def refuse(maps):
        assert len(list(maps.grants.keys())) == 1, "carried before the check, so the check sees the grant"
        raise XknockError("refused for the test")

    with in_netns(net.server.name):
        config = parse_config(open(config_path).read(), listening=set())
        with pytest.raises(XknockError, match="refused for the test"):
            lifecycle.attach([net.server_iface], config, before_attach=refuse)
        assert datapath.attachment(net.server_iface).prog_id == old_prog
        staging = os.path.join(old_filter.pin_dir, datapath.STAGING)
        assert not os.path.exists(staging), f"the new maps' pins stayed: {os.listdir(staging)}"
        assert "grants" in os.listdir(old_filter.pin_dir), "the old filter's pins were touched"
    assert {bytes(k): bytes(v) for k, v in old_filter.maps.grants.items()} == grants_before
    assert can_connect(net.client, net.server.ipv4, GUARDED, timeout=3.0)
