"""Strict mode end to end: in the namespace lab, a client that knocks step 1,
then connects to an unguarded port of the server, then knocks the rest,
opens nothing when [filter] strict = true, and the guarded port when not."""

import pytest
from xknock_dev.e2e import DROPPED, config_text, fresh_attach, knock, served_lab, status_json, write_config

from xknock_dev.lab import can_connect

pytestmark = pytest.mark.netns

GUARDED, UNGUARDED = 22, 80


@pytest.fixture(scope="module")
def net():
    with served_lab("xkstrict", GUARDED, UNGUARDED) as built:
        yield built


def strict_config(tmp_path, strict):
    text = config_text()
    text = text.replace('mode = "enforce"', f'mode = "enforce"\nstrict = {"true" if strict else "false"}', 1)
    return write_config(tmp_path, f"strict-{strict}.toml", text)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not strict"])
def test_a_connection_to_another_port_between_knocks(net, tmp_path, strict):
    fresh_attach(net, strict_config(tmp_path, strict))
    server = net.server.ipv4
    knock(net.client, server, "tcp:7000")
    assert can_connect(net.client, server, UNGUARDED)           # the intervening packets
    knock(net.client, server, "udp:8000", "tcp:9000")
    if strict:
        assert not can_connect(net.client, server, GUARDED, timeout=DROPPED)
    else:
        assert can_connect(net.client, server, GUARDED)
    [running] = status_json(net.server)
    assert running["strict"] is strict
    assert running["counters"].get("knock_strict_reset", 0) == (1 if strict else 0)


def test_strict_mode_still_opens_for_a_quiet_client(net, tmp_path):
    fresh_attach(net, strict_config(tmp_path, True))
    server = net.server.ipv4
    assert can_connect(net.client, server, UNGUARDED)           # before the knock: harmless
    knock(net.client, server, "tcp:7000", "udp:8000", "tcp:9000")
    assert can_connect(net.client, server, GUARDED)
    assert status_json(net.server)[0]["counters"].get("knock_strict_reset", 0) == 0
