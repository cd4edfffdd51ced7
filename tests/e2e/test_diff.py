"""`xknock diff IFACE -c FILE` and `xknock reload --dry-run`: what a reload
would change in the live policy, read from the running filter's maps,
changing nothing. The views are checked pure first, then end to end."""

import os
import re
import subprocess

import pytest

from xknock.controller.config.spa_config import default_total_rate
from xknock_dev.e2e import XKNOCK, check, config_text, fresh_attach, remove_xdp, status_json, write_config, xknock
from xknock_dev.lab import lab

from xknock.controller.config import parse_config
from xknock.controller.state.policy_diff import changes, config_view

LIVE = config_text(allow=("10.9.0.0/16",))
WEB = """
[[sequence]]
name = "web"
knock = ["tcp:7100", "udp:8100", "tcp:9100"]
open = ["tcp:80"]
"""
# Every kind of change at once: a setting, a sequence added, one changed,
# a guarded port added, an allow entry removed, a deny entry added.
NEXT = (config_text(open_for="1m", deny=("192.0.2.0/24",)).replace('mode = "enforce"', 'mode = "monitor"') + WEB)
EXPECTED = [
    "~ mode: enforce -> monitor",
    "+ sequence web: tcp:7100 udp:8100 tcp:9100 -> tcp:80 (step 5s, open 30s, idle 15m)",
    "~ sequence ssh: tcp:7000 udp:8000 tcp:9000 -> tcp:22 (step 2s, open 30s, idle 1m) => "
    "tcp:7000 udp:8000 tcp:9000 -> tcp:22 (step 2s, open 1m, idle 1m)",
    "+ guarded tcp:80",
    "- allow 10.9.0.0/16",
    "+ deny 192.0.2.0/24",
]


def view(text):
    return config_view(parse_config(text, listening=set()), 0)


def test_the_same_config_changes_nothing():
    assert changes(view(LIVE), view(LIVE)) == []


def test_every_kind_of_change_is_named():
    assert changes(view(LIVE), view(NEXT)) == EXPECTED


def test_a_changed_knock_says_progress_starts_afresh():
    [line] = changes(view(LIVE), view(config_text(knock=("tcp:7001", "udp:8000", "tcp:9000"),
                                                  allow=("10.9.0.0/16",))))
    assert line.startswith("~ sequence ssh: tcp:7000 ") and line.endswith("; knocks in progress start afresh")


def test_time_based_knocks_are_not_compared_port_by_port():
    totp = """
[[sequence]]
name = "t"
totp = true
secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
knock = ["tcp", "udp", "tcp"]
open = ["tcp:22"]
"""
    assert changes(view(totp), view(totp)) == []
    line, *guarded = changes(view(totp), view(totp.replace("tcp:22", "tcp:2222")))
    assert line == ("~ sequence t: time-based, 3 steps -> tcp:22 (step 5s, open 30s, idle 15m) => "
                    "time-based, 3 steps -> tcp:2222 (step 5s, open 30s, idle 15m)")
    assert guarded == ["- guarded tcp:22", "+ guarded tcp:2222"]


def spa_section(key_file, port=62201, rate=10):
    return f"""
[spa]
port = {port}
rate = {rate}

[[spa.user]]
name = "alice"
key_file = "{key_file}"
open = ["tcp:2222"]
"""


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "alice.keys"
    check(subprocess.run([XKNOCK, "keygen", "--key-file", str(path)], capture_output=True, text=True, timeout=60))
    return str(path)


def test_spa_port_rates_and_guarded_ports_are_compared(key_file):
    cpus = os.cpu_count()
    total = default_total_rate(1)   # one stanza: derived from the verifier's cost (config/spa_config.py)
    with_spa = view(LIVE + spa_section(key_file))
    assert changes(view(LIVE), with_spa) == [
        f"~ spa rates: none -> 10/s per source, {max(1, total // cpus)}/s per CPU",
        "+ guarded tcp:2222", "+ spa port udp:62201"]
    assert changes(with_spa, view(LIVE + spa_section(key_file, port=62202, rate=5))) == [
        f"~ spa rates: 10/s per source, {max(1, total // cpus)}/s per CPU -> 5/s per source, "
        f"{max(1, total // cpus)}/s per CPU",
        "- spa port udp:62201", "+ spa port udp:62202"]


# --- end to end: the live maps of a filter in the lab ------------------------------

@pytest.fixture(scope="module")
def net(tmp_path_factory):
    configs = tmp_path_factory.mktemp("diff")
    with lab("xkdiff") as built:
        built.live = write_config(configs, "live.toml", LIVE)
        built.next = write_config(configs, "next.toml", NEXT)
        fresh_attach(built, built.live)
        yield built
        remove_xdp(built.server, built.server_iface)


@pytest.mark.parametrize("command", ["diff", "reload --dry-run"])
def test_diff_shows_the_change_and_changes_nothing(net, command):
    before = status_json(net.server)
    name, *flags = command.split()
    result = check(xknock(net.server, name, net.server_iface, "-c", net.next, *flags))
    assert result.stdout.splitlines() == EXPECTED + [
        f"{len(EXPECTED)} change(s) on {net.server_iface} from {net.next}; nothing was changed"]
    after = status_json(net.server)
    assert [f["sequences"] for f in after] == [f["sequences"] for f in before]
    assert after[0]["mode"] == "enforce"


def test_diff_of_the_live_config_is_no_change(net):
    result = check(xknock(net.server, "diff", net.server_iface, "-c", net.live))
    assert result.stdout.strip() == f"no change: the live policy on {net.server_iface} is already {net.live}'s"


def test_diff_after_the_reload_is_no_change(net):
    try:
        check(xknock(net.server, "reload", net.server_iface, "-c", net.next))
        result = check(xknock(net.server, "diff", net.server_iface, "-c", net.next))
        assert result.stdout.startswith("no change")
    finally:
        check(xknock(net.server, "reload", net.server_iface, "-c", net.live))


def test_diff_where_nothing_runs_is_one_line(net):
    result = xknock(net.server, "diff", "lo", "-c", net.next)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"xknock: .*\blo\b.*\n", result.stderr), result.stderr


def test_diff_says_spa_users_are_not_compared(net, key_file, tmp_path):
    path = write_config(tmp_path, "spa.toml", LIVE + spa_section(key_file))
    result = check(xknock(net.server, "diff", net.server_iface, "-c", path))
    assert "+ spa port udp:62201" in result.stdout.splitlines()
    assert "SPA users and their keys live in the running controller" in result.stderr
    assert "SPA users" not in check(xknock(net.server, "diff", net.server_iface, "-c", net.live)).stderr


def test_a_ban_is_shown_as_the_file_writes_it():
    banned = LIVE + '\n[ban]\nafter = 5\nwithin = "10m"\nfor = "1h"\nscope = "knock"\n'
    assert changes(view(LIVE), view(banned)) == ["~ ban: none -> after 5 within 10m for 1h, scope knock"]
