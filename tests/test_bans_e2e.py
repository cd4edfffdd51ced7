"""Bans end to end: an attacker guessing knocks is banned, `xknock status`
lists it, `xknock unban` lifts it."""

import pytest
from xknock_dev.e2e import DROPPED, config_text, knock, served_lab, status_json, write_config, xknock

from xknock_dev.lab import can_connect

BAN = """
[ban]
after = 2
within = "1m"
for = "10m"
scope = "all"
"""


@pytest.fixture(scope="module")
def net():
    with served_lab("xkban", 22, 80) as built:
        yield built


def test_guessing_knocks_gets_banned_and_unban_lifts_it(net, tmp_path):
    config = write_config(tmp_path, "ban.toml", config_text(allow=["10.77.0.2"]) + BAN)
    result = xknock(net.server, "attach", net.server_iface, "-c", config, "--once")
    assert result.returncode == 0, result.stderr
    server = net.server.ipv4
    assert can_connect(net.attacker, server, 80)
    for _ in range(2):
        knock(net.attacker, server, "tcp:7000", "tcp:9000")
    assert not can_connect(net.attacker, server, 80, timeout=DROPPED)
    [running] = status_json(net.server)
    assert [b["source"] for b in running["bans"]] == [net.attacker.ipv4]
    assert running["counters"]["drop_banned"] >= 1

    # the allow-listed client fails as often and is spared
    for _ in range(3):
        knock(net.client, server, "tcp:7000", "tcp:9000")
    assert can_connect(net.client, server, 80)

    result = xknock(net.server, "unban", net.server_iface, net.attacker.ipv4)
    assert result.returncode == 0 and "unbanned" in result.stdout
    assert can_connect(net.attacker, server, 80)
    assert status_json(net.server)[0]["bans"] == []
    xknock(net.server, "detach", net.server_iface)
