"""Bans end to end: an attacker guessing knocks is banned, `xknock status`
lists it, `xknock unban` lifts it; the operator bans with `xknock ban` and
lists with `xknock bans`."""

import json

import pytest
from xknock_dev.e2e import DROPPED, check, config_text, knock, served_lab, status_json, write_config, xknock

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


def test_the_operator_bans_lists_and_unbans(net, tmp_path):
    """`xknock ban IFACE ADDR --for`, `xknock bans` (text and --json), `xknock unban --json`."""
    config = write_config(tmp_path, "ban.toml", config_text() + BAN)
    check(xknock(net.server, "attach", net.server_iface, "-c", config, "--once"))
    try:
        server = net.server.ipv4
        banned = check(xknock(net.server, "ban", net.server_iface, net.attacker.ipv4, "--for", "1h"))
        assert banned.stdout.strip() == f"banned {net.attacker.ipv4} for 3600s on every port"
        assert not can_connect(net.attacker, server, 80, timeout=DROPPED)
        assert can_connect(net.client, server, 80)

        listed = json.loads(check(xknock(net.server, "bans", net.server_iface, "--json")).stdout)["bans"]
        assert [b["source"] for b in listed] == [net.attacker.ipv4] and 3590 < listed[0]["left_s"] <= 3600
        text = check(xknock(net.server, "bans", net.server_iface)).stdout.splitlines()
        assert text[0] == "bans: 1" and text[1].split()[0] == net.attacker.ipv4
        again = json.loads(check(xknock(net.server, "ban", net.server_iface, net.attacker.ipv4, "--for", "2m",
                                        "--json")).stdout)
        assert again == {"banned": net.attacker.ipv4, "for_s": 120.0, "scope": "all", "was_banned": True}
        assert 110 < status_json(net.server)[0]["bans"][0]["left_s"] <= 120   # shortened, not a second entry

        lifted = json.loads(check(xknock(net.server, "unban", net.server_iface, net.attacker.ipv4, "--json")).stdout)
        assert lifted == {"unbanned": net.attacker.ipv4, "was_banned": True}
        assert can_connect(net.attacker, server, 80)
        assert check(xknock(net.server, "bans", net.server_iface)).stdout.strip() == "bans: 0"
        counters = status_json(net.server)[0]["counters"]
        assert (counters["ban_operator"], counters["ban_removed"]) == (1, 1)
    finally:
        xknock(net.server, "detach", net.server_iface)


def test_a_ban_without_a_ban_table_is_refused(net, tmp_path):
    """The data path reads no bans without [ban]: the entry would do nothing."""
    config = write_config(tmp_path, "noban.toml", config_text())
    check(xknock(net.server, "attach", net.server_iface, "-c", config, "--once"))
    try:
        result = xknock(net.server, "ban", net.server_iface, net.attacker.ipv4, "--for", "1h")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("xknock: the live policy has no [ban]") and len(result.stderr.splitlines()) == 1
        assert status_json(net.server)[0]["bans"] == []
        bad = xknock(net.server, "ban", net.server_iface, net.attacker.ipv4, "--for", "5")
        assert bad.returncode == 2 and "no unit" in bad.stderr
    finally:
        xknock(net.server, "detach", net.server_iface)
