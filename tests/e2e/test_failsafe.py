"""Fail closed (controller/policy/failsafe.py): when the filter cannot be
loaded, the guarded ports are refused by an nftables chain until a filter
attaches; `xknock detach` removes it. The load failure is a real one: the
kernel headers BCC needs are hidden (a private mount namespace binds an
empty directory over /lib/modules/$(uname -r)), as after a kernel upgrade
without headers."""

import os
import subprocess
import tempfile

import pytest

from xknock_dev.e2e import SEQUENCE, XKNOCK, check, config_text, knock, served_lab, write_config, xknock
from xknock_dev.lab import connect_outcome
from xknock.controller.config import load_config
from xknock.controller.policy import failsafe

pytestmark = pytest.mark.netns

GUARDED, UNGUARDED = 22, 80


def _config(tmp_path, **filter_keys):
    text = config_text(allow=["10.77.0.2"])   # the lab's client
    extra = "".join(f"\n{key} = {value}" for key, value in filter_keys.items())
    return write_config(tmp_path, "failsafe.toml", text.replace('mode = "enforce"', 'mode = "enforce"' + extra))


@pytest.fixture(scope="module")
def net():
    with served_lab("xkfailsafe", GUARDED, UNGUARDED, ipv6=False) as built:
        yield built


@pytest.fixture
def clean(net):
    xknock(net.server, "detach", net.server_iface)
    yield
    xknock(net.server, "detach", net.server_iface)


def attach_without_headers(host, iface, config_path):
    """`xknock attach --once` where BCC finds no kernel headers."""
    modules = f"/lib/modules/{os.uname().release}"
    with tempfile.TemporaryDirectory() as empty:
        script = f'mount --bind "{empty}" "{modules}" && exec "{XKNOCK}" attach {iface} -c "{config_path}" --once'
        return host.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=120)


def outcome(net, host, port=GUARDED):
    return connect_outcome(host, net.server.ipv4, port, timeout=1.0)


def test_the_ruleset_is_one_nft_accepts(tmp_path):
    text = config_text(allow=["192.0.2.10", "2001:db8:a::/48"], opens=("tcp:22", "udp:5000", "tcp:443"))
    for answer in ("closed", "drop"):
        path = write_config(tmp_path, f"{answer}.toml", text.replace('mode = "enforce"',
                                                                     f'mode = "enforce"\nanswer = "{answer}"'))
        script = failsafe.ruleset(["eth0", "eth0.100"], load_config(path))
        assert "tcp dport { 22, 443 }" in script and "udp dport { 5000 }" in script
        assert "ip saddr { 192.0.2.10/32 }" in script and "ip6 saddr { 2001:db8:a::/48 }" in script
        assert ("reject with tcp reset" in script) == (answer == "closed")
        # nft itself checks it (-c: parse and validate, apply nothing), in a namespace of its own.
        result = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=script, text=True,
                                capture_output=True, timeout=30)
        assert result.returncode == 0, (script, result.stderr)


def test_a_filter_that_cannot_load_leaves_the_guarded_ports_closed(net, clean, tmp_path):
    config = _config(tmp_path)
    assert outcome(net, net.attacker) == "open"       # nothing attached yet: the port is plain open
    result = attach_without_headers(net.server, net.server_iface, config)
    assert result.returncode == 1, result.stderr
    assert "kernel headers" in result.stderr
    assert f"the guarded ports tcp:{GUARDED} are closed to new connections" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Refused as an unused port is (answer = "closed"), but for the allow-list; other ports untouched.
    assert outcome(net, net.attacker) == "refused"
    assert outcome(net, net.client) == "open"
    assert outcome(net, net.attacker, UNGUARDED) == "open"

    # A filter that loads takes over, and the failsafe goes.
    attached = check(xknock(net.server, "attach", net.server_iface, "-c", config, "--once"))
    assert "removed the failsafe chain" in attached.stderr
    assert net.server.run(["nft", "list", "table", "inet", failsafe.TABLE]).returncode != 0
    assert outcome(net, net.attacker) == "refused"     # now the filter's answer
    knock(net.attacker, net.server.ipv4, *SEQUENCE)
    assert outcome(net, net.attacker) == "open"        # and knocks work: nothing in nft is in the way


def test_detach_removes_the_failsafe_and_opens_the_ports(net, clean, tmp_path):
    assert attach_without_headers(net.server, net.server_iface, _config(tmp_path)).returncode == 1
    assert outcome(net, net.attacker) == "refused"
    out = check(xknock(net.server, "detach", net.server_iface)).stdout
    assert "removed the failsafe chain" in out
    assert outcome(net, net.attacker) == "open"


@pytest.mark.parametrize("keys, reason", [({"fail_closed": "false"}, "fail_closed = false"),
                                          ({}, "monitor mode")])
def test_without_fail_closed_the_failure_says_the_ports_are_open(net, clean, tmp_path, keys, reason):
    config = _config(tmp_path, **keys)
    if reason == "monitor mode":
        with open(config) as f:
            text = f.read().replace('mode = "enforce"', 'mode = "monitor"')
        config = write_config(tmp_path, "monitor.toml", text)
    result = attach_without_headers(net.server, net.server_iface, config)
    assert result.returncode == 1
    assert f"{reason}: the guarded ports tcp:{GUARDED} are OPEN" in result.stderr, result.stderr
    assert outcome(net, net.attacker) == "open"
