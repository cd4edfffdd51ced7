"""The `xknock` command's error paths, black-box: every expected failure is
one line on stderr and exit status 1 (click's 2 for usage errors), never a
traceback, and a refused command changes nothing."""

import importlib.metadata
import json
import re
import subprocess

import pytest

from xknock_dev.e2e import (
    XKNOCK, attach_foreign_xdp, check, config_text, remove_xdp, status_json, write_config, xdp_prog_id, xknock,
)
from xknock_dev.lab import lab
from xknock.controller.state.controller_record import NO_CONTROLLER

COMMANDS = ["attach", "detach", "status", "reload", "grant", "revoke", "grants", "ban", "unban", "bans", "knock", "top",
            "import", "spa", "keygen",
            "check", "diff"]
EX_CONFIG = 78   # attach's status on a config that does not load: the unit does not restart on it

BAD_CONFIGS = {
    "syntax": ('[filter]\nmode = enforce\n', [r"line 2: .*\(column \d+\)"]),
    "port out of range": (config_text(knock=("tcp:7000", "udp:8000", "tcp:70000")),
                          [re.escape('sequence "ssh": knock[2] "tcp:70000": port out of range 1-65535')]),
}


@pytest.fixture(scope="module")
def net():
    with lab("xkcli") as built:
        yield built


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-configs")


@pytest.fixture(scope="module")
def good_config(configs):
    return write_config(configs, "good.toml", config_text())


@pytest.fixture
def bare(net):
    """The server's interface with no XDP program on it, before and after."""
    remove_xdp(net.server, net.server_iface)
    yield net
    remove_xdp(net.server, net.server_iface)


@pytest.fixture
def attached(bare, good_config):
    check(xknock(bare.server, "attach", bare.server_iface, "-c", good_config, "--once"))
    return bare


def run_host(*args):
    """xknock ARGS in the test's own namespace (for what touches no interface)."""
    return subprocess.run([XKNOCK, *args], capture_output=True, text=True, timeout=60)


def assert_fails(result, *patterns, status=1):
    """Exit status `status`, no traceback, each pattern found on stderr; for
    status 1, stderr is a single `xknock: ...` line."""
    assert result.returncode == status, f"exit {result.returncode}, stdout {result.stdout!r}, stderr {result.stderr!r}"
    assert "Traceback" not in result.stderr, result.stderr
    if status == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xknock: "), result.stderr
    for pattern in patterns:
        assert re.search(pattern, result.stderr), f"{pattern!r} not in {result.stderr!r}"


def policy(net):
    """What must not change when a command is refused."""
    [running] = status_json(net.server)
    return running["interfaces"], running["mode"], running["sequences"], running["guarded"]


# --- version and help -----------------------------------------------------------

def test_version():
    result = run_host("--version")
    assert result.returncode == 0
    assert importlib.metadata.version("xknock") in result.stdout


def test_help_lists_every_command():
    result = run_host("--help")
    assert result.returncode == 0
    listed = re.findall(r"^  (\w+)\s", result.stdout.split("Commands:")[1], re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command):
    result = run_host(command, "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s*Examples?:", result.stdout, re.MULTILINE), result.stdout
    assert f"xknock {command} " in result.stdout.split("Example")[1]


# `import` is a group: its commands have --json.
NO_JSON = {"import"}


@pytest.mark.parametrize("command", [*sorted(set(COMMANDS) - NO_JSON), "import knockd", "import fwknop"])
def test_every_command_answers_in_json(command):
    assert "--json" in run_host(*command.split(), "--help").stdout


def test_ssh_proxy_has_no_json():
    """Its stdout is the SSH connection itself: a JSON line there would corrupt it."""
    result = run_host("ssh-proxy", "--help")
    assert result.returncode == 0 and "--json" not in result.stdout


def test_attach_says_each_interface_attached_in_a_json_line(bare, good_config):
    result = check(xknock(bare.server, "attach", bare.server_iface, "-c", good_config, "--once", "--json"))
    [line] = result.stdout.splitlines()
    attached = json.loads(line)
    assert attached["attached"] == bare.server_iface and attached["prog_id"] == xdp_prog_id(bare.server,
                                                                                         bare.server_iface)
    assert attached["xdp_mode"] in ("native", "generic") and attached["mode"] == "enforce"
    assert attached["sequences"] == 1 and attached["replaced"] is None and attached["pins"].startswith("/sys/fs/bpf/")


def test_reload_diff_and_detach_answer_in_json(attached, good_config):
    server, iface = attached.server, attached.server_iface
    diffed = json.loads(check(xknock(server, "diff", iface, "-c", good_config, "--json")).stdout)
    assert diffed == {"iface": iface, "config": good_config, "changes": []}
    dry = json.loads(check(xknock(server, "reload", iface, "-c", good_config, "--dry-run", "--json")).stdout)
    assert dry == diffed
    reloaded = json.loads(check(xknock(server, "reload", iface, "-c", good_config, "--json")).stdout)
    assert reloaded == {"reloaded": iface, "config": good_config, "sequences": 1, "mode": "enforce",
                        "controller": None, "note": NO_CONTROLLER}   # attached --once: nobody else to ask
    prog_id = xdp_prog_id(server, iface)
    [detached] = json.loads(check(xknock(server, "detach", iface, "--json")).stdout)["detached"]
    assert detached == {"iface": iface, "failsafe_removed": False, "prog_id": prog_id,
                        "xdp_mode": detached["xdp_mode"], "leftover_pins": {}}
    assert detached["xdp_mode"] in ("native", "generic")


# --- interfaces ------------------------------------------------------------------

def test_attach_to_a_missing_interface(net, good_config):
    assert_fails(xknock(net.server, "attach", "nosuch0", "-c", good_config, "--once"), "no such interface: nosuch0")


@pytest.mark.parametrize("args", [
    ["status", "{iface}"],
    ["grant", "{iface}", "10.77.0.2"],
    ["revoke", "{iface}", "10.77.0.2"],
    ["grants", "{iface}"],
    ["ban", "{iface}", "10.77.0.2"],
    ["bans", "{iface}", "--json"],
    ["reload", "{iface}", "-c", "{config}"],
    ["detach", "{iface}"],
], ids=lambda args: args[0])
def test_commands_on_an_interface_with_nothing_attached(bare, good_config, args):
    argv = [a.format(iface=bare.server_iface, config=good_config) for a in args]
    assert_fails(xknock(bare.server, *argv), re.escape(bare.server_iface))
    assert xdp_prog_id(bare.server, bare.server_iface) == 0


def test_status_with_nothing_attached_anywhere_is_not_an_error(bare):
    result = check(xknock(bare.server, "status"))
    assert "no xknock filter" in result.stdout
    assert status_json(bare.server) == []


# --- configs ---------------------------------------------------------------------

def test_missing_config_file(bare, configs):
    missing = str(configs / "missing.toml")
    assert_fails(xknock(bare.server, "attach", bare.server_iface, "-c", missing, "--once"),
                 re.escape(missing), "no such file", status=EX_CONFIG)
    assert xdp_prog_id(bare.server, bare.server_iface) == 0


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_attaches_nothing(bare, configs, case):
    text, patterns = BAD_CONFIGS[case]
    path = write_config(configs, "bad.toml", text)
    assert_fails(xknock(bare.server, "attach", bare.server_iface, "-c", path, "--once"), re.escape(path), *patterns,
                 status=EX_CONFIG)
    assert xdp_prog_id(bare.server, bare.server_iface) == 0


@pytest.mark.parametrize("command", ["attach", "reload"])
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_leaves_the_running_policy_untouched(attached, configs, command, case):
    text, patterns = BAD_CONFIGS[case]
    path = write_config(configs, "bad.toml", text)
    before = policy(attached)
    args = [command, attached.server_iface, "-c", path] + (["--once"] if command == "attach" else [])
    assert_fails(xknock(attached.server, *args), *patterns, status=EX_CONFIG if command == "attach" else 1)
    assert policy(attached) == before


@pytest.mark.parametrize("case", ["the same interface twice", "a second interface in another mode"])
def test_a_failed_attach_leaves_every_interface_as_it_was(bare, good_config, case):
    server, iface = bare.server, bare.server_iface
    try:
        if case == "the same interface twice":
            result = xknock(server, "attach", iface, iface, "-c", good_config, "--once")
        else:
            check(xknock(server, "attach", "lo", "-c", good_config, "--once", "--xdp-mode", "generic"))
            result = xknock(server, "attach", iface, "lo", "-c", good_config, "--once", "--xdp-mode", "native")
        assert "Traceback" not in result.stderr
        if result.returncode != 0:
            assert_fails(result)
            assert xdp_prog_id(server, iface) == 0, f"refused ({result.stderr.strip()}) yet attached to {iface}"
    finally:
        remove_xdp(server, "lo")


# --- another XDP program ---------------------------------------------------------

@pytest.mark.parametrize("flag", ["--replace", "--force"])
def test_another_xdp_program_is_replaced_only_with_replace(bare, good_config, flag):
    """--force is the deprecated spelling of --replace --cut-sessions."""
    server, iface = bare.server, bare.server_iface
    attach_foreign_xdp(server, iface)
    foreign = xdp_prog_id(server, iface)
    assert foreign

    refused = xknock(server, "attach", iface, "-c", good_config, "--once", "--cut-sessions")
    assert_fails(refused, "another XDP program", f"program {foreign} 'other_prog'", "--replace")
    assert xdp_prog_id(server, iface) == foreign
    # Nor do the other commands touch it.
    assert_fails(xknock(server, "detach", iface), f"{foreign} 'other_prog'", "not xknock")
    assert_fails(xknock(server, "status", iface), "not xknock")
    assert xdp_prog_id(server, iface) == foreign

    forced = check(xknock(server, "attach", iface, "-c", good_config, "--once", flag))
    assert f"replaced program {foreign}" in forced.stderr
    assert ("--force is deprecated" in forced.stderr) == (flag == "--force")
    [running] = status_json(server)
    assert running["interfaces"][0]["prog_id"] == xdp_prog_id(server, iface) != foreign
    check(xknock(server, "detach", iface))
    assert xdp_prog_id(server, iface) == 0


# --- grant -----------------------------------------------------------------------

def test_grant_on_an_unguarded_port_is_refused(attached):
    result = xknock(attached.server, "grant", attached.server_iface, "10.77.0.2", "--port", "tcp:80")
    assert_fails(result, "tcp:80 is not guarded")
    assert status_json(attached.server)[0]["grants"] == []


@pytest.mark.parametrize("args, pattern", [
    (["not-an-address"], "not an IPv4 or IPv6 address"),
    (["10.77.0.2", "--port", "tcp:70000"], "port out of range"),
    (["10.77.0.2", "--for", "5"], "no unit"),
], ids=["address", "port", "duration"])
def test_grant_usage_errors(attached, args, pattern):
    assert_fails(xknock(attached.server, "grant", attached.server_iface, *args), pattern, status=2)
    assert status_json(attached.server)[0]["grants"] == []


# --- knock -----------------------------------------------------------------------

@pytest.mark.parametrize("step, pattern", [
    ("tcp:70000", "port out of range 1-65535"),
    ("7000:tcp", "write it tcp:7000"),
    ("7000", "say tcp:7000 or udp:7000"),
    ("sctp:7000", "unknown protocol"),
])
def test_knock_with_a_bad_step(net, step, pattern):
    result = xknock(net.client, "knock", net.server.ipv4, "tcp:7000", step)
    assert_fails(result, re.escape(repr(step)), pattern, status=2)


def test_knock_without_steps(net):
    assert_fails(xknock(net.client, "knock", net.server.ipv4), "give the knock STEPS", status=2)


def test_knock_with_a_negative_delay(net):
    assert_fails(xknock(net.client, "knock", net.server.ipv4, "tcp:7000", "--delay", "-1"), "--delay", status=2)


def test_knock_with_a_repeat_below_one(net):
    assert_fails(xknock(net.client, "knock", net.server.ipv4, "tcp:7000", "--repeat", "0"), "--repeat", status=2)


def test_knock_repeated_with_a_step_twice_in_a_row(net):
    """The copies of the first tcp:7000 would be taken for the second."""
    result = xknock(net.client, "knock", net.server.ipv4, "tcp:7000", "tcp:7000", "udp:8000", "--repeat", "2")
    assert_fails(result, re.escape("knock[1] tcp:7000 is knock[0] again"))


@pytest.mark.parametrize("args", [["status"], ["attach", "lo"], ["grant", "lo", "192.0.2.1"], ["detach", "lo"],
                                  ["grants", "lo"], ["bans", "lo"], ["ban", "lo", "192.0.2.1"],
                                  ["diff", "lo"], ["reload", "lo", "--dry-run"]])
def test_not_root_is_one_clear_line(args):
    result = subprocess.run(["runuser", "-u", "nobody", "--", XKNOCK, *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == "xknock: must run as root: xknock loads XDP programs and opens BPF maps"
