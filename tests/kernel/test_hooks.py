"""controller/daemon/hooks.py: hook commands run with an exact environment, never
through a shell of ours, killed at their timeout, dropped beyond max_running;
and, on the real program with the test clock, on_open / on_close / on_ban run
from ring-buffer events, the sweep and revoke."""

import logging
import os
import threading
import time
import types

import pytest
from xknock_dev.example import EXAMPLE_CONFIG
from xknock_dev.packets import step, tcp, udp

from xknock.controller.state import bans, grants
from xknock.controller.daemon import daemon
from xknock.controller.config import parse_config
from xknock.controller.daemon.events import EventReader
from xknock.controller.daemon.hooks import HOOK_PATH, HookDispatcher, HookRunner, hook_env, printable
from xknock_dev.testrun import XDP_DROP, XDP_PASS

SOURCE = "198.51.100.7"
SOURCE6 = "2001:db8:77::7"
SSH = ["tcp:7000", "udp:8000", "tcp:9000"]
WEB = ["udp:8000", "icmp", "tcp:7001"]
HOSTILE = "$(touch {d}/subst) `touch {d}/backtick`; touch {d}/semicolon | touch {d}/pipe\n touch {d}/newline"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def find(self, message):
        return [record for record in self.records if record.getMessage() == message]


@pytest.fixture
def hook_log():
    """Log records of xknock.hooks, whatever another test did to the xknock logger."""
    logger = logging.getLogger("xknock.hooks")
    handler = Records()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def runner():
    made = []

    def make(**kw):
        made.append(HookRunner(**kw))
        return made[-1]

    yield make
    for each in made:
        each.close()


def env_of(data):
    return dict(line.split("=", 1) for line in data.decode().splitlines())


# --- HookRunner -------------------------------------------------------------


def test_the_environment_is_exactly_the_hook_environment(runner):
    hooks = runner()
    env = hook_env("open", SOURCE, "ssh", ["tcp:22", "udp:443"], "eth0")
    assert env == {"PATH": HOOK_PATH, "XKNOCK_EVENT": "open", "XKNOCK_SOURCE": SOURCE, "XKNOCK_SEQUENCE": "ssh",
                   "XKNOCK_PORTS": "tcp:22 udp:443", "XKNOCK_IFACE": "eth0"}
    os.environ["XKNOCK_TEST_SECRET"] = "leaked"   # nothing of the controller's environment is passed on
    try:
        assert hooks.run("on_open", ["/usr/bin/env"], env)
        assert hooks.wait(5)
    finally:
        del os.environ["XKNOCK_TEST_SECRET"]
    [result] = hooks.recent
    assert result.returncode == 0 and not result.timed_out
    assert env_of(result.stdout) == env
    assert (hooks.started, hooks.failed, hooks.timed_out, hooks.dropped) == (1, 0, 0, 0)


def test_a_hostile_source_is_data_never_a_command(runner, tmp_path):
    hooks = runner()
    hostile = HOSTILE.format(d=tmp_path)
    env = hook_env("open", hostile, "ssh", ["tcp:22"], "eth0")
    out = tmp_path / "out"
    # argv is not interpreted: "$XKNOCK_SOURCE" stays those 14 characters
    hooks.run("on_open", ["/bin/echo", "$XKNOCK_SOURCE", "$(touch x)"], env)
    # the documented way to a shell: the variable is expanded as data, not parsed as code
    hooks.run("on_open", ["/bin/sh", "-c", 'printf "%s" "$XKNOCK_SOURCE" > "$1"', "sh", str(out)], env)
    assert hooks.wait(5)
    # in the order they ended, which is either
    [echoed] = [r for r in hooks.recent if r.argv[0] == "/bin/echo"]
    [shelled] = [r for r in hooks.recent if r.argv[0] == "/bin/sh"]
    assert echoed.stdout == b"$XKNOCK_SOURCE $(touch x)\n"
    assert shelled.returncode == 0
    assert out.read_text() == hostile
    assert sorted(os.listdir(tmp_path)) == ["out"]     # no subst, backtick, semicolon, pipe or newline file
    assert not os.path.exists("/x")


def test_a_slow_hook_is_killed_at_its_timeout(runner, hook_log):
    hooks = runner(timeout_s=1.0, kill_grace_s=0.5)
    started = time.monotonic()
    assert hooks.run("on_open", ["/bin/sleep", "30"], hook_env("open", SOURCE), {"source": SOURCE})
    assert hooks.running == 1                     # run() returned at once
    assert time.monotonic() - started < 0.5
    assert hooks.wait(3)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0, elapsed
    [result] = hooks.recent
    assert result.timed_out
    assert (hooks.started, hooks.failed, hooks.timed_out) == (1, 0, 1)
    [record] = hook_log.find("hook timed out: killed")
    assert record.levelno == logging.WARNING
    assert record.fields["command"] == "/bin/sleep" and record.fields["source"] == SOURCE


def test_a_hook_ignoring_sigterm_is_killed_with_its_children(runner, tmp_path):
    hooks = runner(timeout_s=0.3, kill_grace_s=0.3)
    marker = tmp_path / "survived"
    started = time.monotonic()
    # the shell ignores SIGTERM and so does its child sleep (ignored signals survive exec)
    hooks.run("on_close", ["/bin/sh", "-c", f"trap '' TERM; sleep 1.5; touch {marker}"], hook_env("close", SOURCE))
    assert hooks.wait(3)
    assert time.monotonic() - started < 1.2
    assert hooks.recent[0].timed_out
    time.sleep(1.5)
    assert not marker.exists()   # the whole process group was killed, not just the shell


def test_hooks_beyond_max_running_are_dropped_not_queued(runner, hook_log, tmp_path):
    hooks = runner(timeout_s=0.5, max_running=2)
    env = hook_env("ban", SOURCE)
    assert hooks.run("on_ban", ["/bin/sleep", "30"], env)
    assert hooks.run("on_ban", ["/bin/sleep", "30"], env)
    assert not hooks.run("on_ban", ["/bin/sh", "-c", f"touch {tmp_path}/third"], env, {"source": SOURCE})
    assert not hooks.run("on_ban", ["/bin/sh", "-c", f"touch {tmp_path}/fourth"], env)
    assert (hooks.started, hooks.dropped, hooks.running) == (2, 2, 2)
    [record] = hook_log.find("hook dropped")      # a flood of drops logs once a second
    assert record.levelno == logging.WARNING
    assert record.fields["reason"] == "2 hooks already running (max_running)"
    assert record.fields["source"] == SOURCE
    assert hooks.wait(3)
    assert not list(tmp_path.iterdir())           # the dropped ones never ran, not even later
    assert hooks.run("on_ban", ["/bin/true"], env)   # room again
    assert hooks.wait(3)
    assert (hooks.started, hooks.timed_out, hooks.dropped) == (3, 2, 2)


def test_a_failing_hook_is_logged_with_its_status_and_output(runner, hook_log):
    hooks = runner()
    hooks.run("on_open", ["/bin/sh", "-c", 'echo "no route"; echo "bad\x1b[31m thing" >&2; exit 3'],
              hook_env("open", SOURCE), {"sequence": "ssh"})
    assert hooks.wait(5)
    assert hooks.failed == 1 and hooks.recent[0].returncode == 3
    [record] = hook_log.find("hook failed")
    assert record.levelno == logging.WARNING
    assert record.fields["status"] == 3 and record.fields["sequence"] == "ssh"
    assert record.fields["stdout"] == "no route"
    assert record.fields["stderr"] == "bad\\x1b[31m thing"   # escaped: no terminal codes in the log


def test_a_successful_hook_is_logged_at_info(runner, hook_log):
    hooks = runner()
    hooks.run("on_open", ["/bin/true"], hook_env("open", SOURCE))
    assert hooks.wait(5)
    [record] = hook_log.find("hook finished")
    assert record.levelno == logging.INFO and record.fields["status"] == 0
    assert "stdout" not in record.fields and "stderr" not in record.fields


def test_a_hook_killed_by_a_signal_of_its_own_failed(runner, hook_log):
    hooks = runner()
    hooks.run("on_open", ["/bin/sh", "-c", "kill -SEGV $$"], hook_env("open", SOURCE))
    assert hooks.wait(5)
    assert hooks.failed == 1 and hooks.timed_out == 0
    assert hook_log.find("hook failed")[0].fields["signal"] == "SIGSEGV"


def test_a_hook_that_cannot_start_is_counted_and_logged(runner, hook_log, tmp_path):
    hooks = runner()
    script = tmp_path / "notify"
    script.write_text("#!/bin/sh\n")   # not executable
    assert not hooks.run("on_open", ["/nonexistent/notify"], hook_env("open", SOURCE))
    assert not hooks.run("on_open", [str(script)], hook_env("open", SOURCE))
    assert (hooks.started, hooks.failed) == (0, 2)
    errors = [record.fields["error"] for record in hook_log.find("hook could not start")]
    assert errors == ["No such file or directory", "Permission denied"]


def test_a_chatty_hook_never_blocks_and_its_output_is_cut(runner, hook_log):
    hooks = runner(timeout_s=5, output_limit=1000)
    # 1 MB: far more than a pipe holds, so the hook would block if nobody read it
    hooks.run("on_open", ["/bin/sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a"], hook_env("open", SOURCE))
    assert hooks.wait(4)
    [result] = hooks.recent
    assert result.returncode == 0 and not result.timed_out
    assert result.stdout == b"a" * 1000
    logged = hook_log.find("hook finished")[0].fields["stdout"]
    assert logged.startswith("a" * 100) and logged.endswith(f"...[{1_000_000 - 512} more]")


def test_close_lets_running_hooks_end_and_refuses_new_ones(tmp_path):
    hooks = HookRunner(timeout_s=5)
    done = tmp_path / "done"
    hooks.run("on_close", ["/bin/sh", "-c", f"sleep 0.3; touch {done}"], hook_env("close", SOURCE))
    hooks.close()
    assert done.exists()
    assert not hooks.run("on_close", ["/bin/true"], hook_env("close", SOURCE))
    assert hooks.dropped == 1


def test_printable():
    assert printable(b"line one\nline two\n") == "line one\\nline two"
    assert printable(b"\xff\x00ok") == "\ufffd\\x00ok"
    assert printable(b"x" * 10, limit=4) == "xxxx...[6 more]"
    assert printable(b"x" * 4, discarded=10, limit=4) == "xxxx...[10 more]"


# --- on the real program: events, sweep, revoke ------------------------------

# Each run writes its own file (hooks may run at once): PATH.<pid>
RECORD = ["/bin/sh", "-c", 'env | grep "^XKNOCK_" | sort > "$1.$$"', "sh"]


def hooked_text(tmp_path, ban="", web_open=None):
    """The example policy with every hook writing its XKNOCK_ variables to a file
    (web's on_open replaced by the argv web_open if given)."""
    def argv(name):
        return "[" + ", ".join(f"'{arg}'" for arg in RECORD + [str(tmp_path / name)]) + "]"

    text = EXAMPLE_CONFIG
    for name in ("ssh", "web"):
        on_open = argv(name + ".open")
        if name == "web" and web_open:
            on_open = "[" + ", ".join(f"'{arg}'" for arg in web_open) + "]"
        text = text.replace(f'name = "{name}"\n',
                            f'name = "{name}"\non_open = {on_open}\non_close = {argv(name + ".close")}\n')
    if ban:
        text += f"[ban]\n{ban}\non_ban = {argv('ban')}\n"
    return text


def hooked_config(tmp_path, ban=""):
    return parse_config(hooked_text(tmp_path, ban), listening=set())


def recorded(path):
    """Each finished run of a RECORD hook writing to path: a dict of its XKNOCK_ variables."""
    runs = sorted(path.parent.glob(path.name + ".*"), key=lambda run: run.stat().st_mtime_ns)
    return [env_of(run.read_bytes()) for run in runs if run.read_bytes().endswith(b"\n")]


@pytest.fixture(scope="module")
def reader(harness):
    """One reader of the session program's ring buffer (it can be opened once)."""
    return EventReader(harness.loaded, harness.maps)


@pytest.fixture
def hooked(xk, reader, tmp_path):
    """(harness, dispatcher, poll): the example policy with recording hooks live."""
    config = hooked_config(tmp_path)
    xk.apply(config)
    reader.hooks = None
    reader.poll(0)                # events of earlier tests: not ours
    dispatcher = HookDispatcher(xk.maps, config, ["veth-test"], runner=HookRunner(timeout_s=5))
    reader.hooks = dispatcher

    def poll():
        reader.poll(0)
        assert dispatcher.runner.wait(5)

    try:
        yield xk, dispatcher, poll
    finally:
        reader.hooks = None
        dispatcher.close()


def knock(xk, src, steps):
    for text in steps:
        # an echo knock passes: the host answers the ping
        assert xk.run(step(src, text)) == (XDP_PASS if text == "icmp" else XDP_DROP)
        xk.advance(0.1)


def test_knock_runs_on_open_and_the_data_path_expiry_runs_on_close(hooked, tmp_path):
    xk, dispatcher, poll = hooked
    knock(xk, SOURCE, SSH)
    poll()
    assert recorded(tmp_path / "ssh.open") == [{
        "XKNOCK_EVENT": "open", "XKNOCK_SOURCE": SOURCE, "XKNOCK_SEQUENCE": "ssh", "XKNOCK_PORTS": "tcp:22",
        "XKNOCK_IFACE": "veth-test"}]
    assert recorded(tmp_path / "ssh.close") == []
    xk.advance(16 * 60)          # past open_for (30s) and idle_timeout (15m)
    assert xk.run(tcp(SOURCE, 22)) == XDP_DROP   # the data path removes the dead grant: grant_expired
    poll()
    assert recorded(tmp_path / "ssh.close") == [{
        "XKNOCK_EVENT": "close", "XKNOCK_SOURCE": SOURCE, "XKNOCK_SEQUENCE": "ssh", "XKNOCK_PORTS": "tcp:22",
        "XKNOCK_IFACE": "veth-test"}]
    assert dispatcher.sweep() == 0               # once per grant
    assert (dispatcher.runner.started, dispatcher.runner.failed) == (2, 0)


def test_on_close_waits_for_the_last_port_of_the_grant(hooked, tmp_path):
    xk, dispatcher, poll = hooked
    knock(xk, SOURCE6, WEB)
    poll()
    [opened] = recorded(tmp_path / "web.open")
    assert opened["XKNOCK_PORTS"] == "tcp:443 udp:443" and opened["XKNOCK_SOURCE"] == SOURCE6
    xk.advance(2 * 60)           # past open_for (10s) and idle_timeout (1m)
    assert xk.run(udp(SOURCE6, 443)) == XDP_DROP  # one of the two ports removed by the data path
    poll()
    assert recorded(tmp_path / "web.close") == []  # tcp:443 is still in the map
    assert grants.expire_grants(xk.maps, now=xk.now_ns) == 1   # the controller's sweep takes the other
    assert dispatcher.sweep() == 1
    poll()
    [closed] = recorded(tmp_path / "web.close")
    assert closed["XKNOCK_PORTS"] == "tcp:443 udp:443" and closed["XKNOCK_EVENT"] == "close"


def test_a_revoked_grant_runs_on_close_at_the_next_sweep(hooked, tmp_path):
    xk, dispatcher, poll = hooked
    knock(xk, SOURCE, SSH)
    poll()
    assert dispatcher.sweep() == 0               # alive: nothing closes
    assert grants.revoke(xk.maps, SOURCE) == 1   # what `xknock revoke` does, from any process
    assert dispatcher.sweep() == 1
    poll()
    assert [run["XKNOCK_SOURCE"] for run in recorded(tmp_path / "ssh.close")] == [SOURCE]
    assert dispatcher.sweep() == 0


def test_a_renewed_grant_runs_on_open_again_and_on_close_once(hooked, tmp_path):
    xk, dispatcher, poll = hooked
    knock(xk, SOURCE, SSH)
    xk.advance(6)                # past step_timeout: a new attempt, not a repeat of the last step
    knock(xk, SOURCE, SSH)
    poll()
    assert len(recorded(tmp_path / "ssh.open")) == 2
    xk.advance(16 * 60)
    assert grants.expire_grants(xk.maps, now=xk.now_ns) == 1
    assert dispatcher.sweep() == 1
    poll()
    assert len(recorded(tmp_path / "ssh.close")) == 1


def test_operator_grants_run_no_hook(hooked, tmp_path):
    xk, dispatcher, poll = hooked
    grants.grant(xk.maps, SOURCE, [("tcp", 22)], 10**9, now=xk.now_ns)
    xk.advance(5)
    assert xk.run(tcp(SOURCE, 22)) == XDP_DROP
    poll()
    assert dispatcher.sweep() == 0
    assert dispatcher.runner.started == 0


def test_a_restarted_controller_closes_grants_opened_before(hooked, tmp_path):
    xk, dispatcher, poll = hooked
    knock(xk, SOURCE, SSH)
    poll()
    restarted = HookDispatcher(xk.maps, dispatcher.config, runner=HookRunner())   # follows what is in the map
    try:
        assert list(restarted.open) == [(SOURCE, next(iter(dispatcher.open))[1])]
        grants.revoke(xk.maps, SOURCE)
        assert restarted.sweep() == 1
        assert restarted.runner.wait(5)
        assert restarted.runner.started == 1 and restarted.runner.recent[0].env["XKNOCK_EVENT"] == "close"
    finally:
        restarted.close()


def test_a_ban_runs_on_ban(xk, reader, tmp_path):
    config = hooked_config(tmp_path, ban="after = 1")
    xk.apply(config)
    reader.hooks = None
    reader.poll(0)
    dispatcher = HookDispatcher(xk.maps, config, ["veth-test"], runner=HookRunner(timeout_s=5))
    reader.hooks = dispatcher
    try:
        knock(xk, SOURCE, ["tcp:7000", "tcp:9000"])   # a first step, then a wrong one: one failure
        reader.poll(0)
        assert dispatcher.runner.wait(5)
        assert recorded(tmp_path / "ban") == [{"XKNOCK_EVENT": "ban", "XKNOCK_SOURCE": SOURCE,
                                                "XKNOCK_SEQUENCE": "", "XKNOCK_PORTS": "", "XKNOCK_IFACE": "veth-test"}]
        assert bans.unban(xk.maps, SOURCE)
    finally:
        reader.hooks = None
        dispatcher.close()


def test_a_broken_dispatcher_never_stops_the_events(xk, reader):
    class Broken:
        def on_event(self, fields, seq_uid):
            raise RuntimeError("boom")

    reader.poll(0)
    reader.hooks = Broken()
    seen = []
    reader.on_event = seen.append
    try:
        knock(xk, SOURCE, SSH)
        knock(xk, "198.51.100.8", SSH)
        reader.poll(0)
    finally:
        reader.hooks = None
        reader.on_event = None
    assert [fields["event"] for fields in seen] == ["granted", "granted"]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_controller_loop_runs_the_hooks(xk, reader, tmp_path, monkeypatch):
    """The real Controller: events -> on_open, its sweep -> on_close of a revoked
    grant, a reload -> new hooks, and stopping waits for a running hook."""
    path = tmp_path / "xknock.toml"
    path.write_text(hooked_text(tmp_path))
    config = parse_config(path.read_text(), str(path), listening=set())
    xk.apply(config)
    reader.hooks = None
    reader.poll(0)
    monkeypatch.setattr(daemon, "SWEEP_EVERY_S", 0.1)
    monkeypatch.setattr(grants, "monotonic_ns", lambda: xk.now_ns)   # the sweeps on the test clock
    monkeypatch.setattr(bans, "monotonic_ns", lambda: xk.now_ns)
    signals = daemon.Signals()   # not installed: the test sets its flags
    controller = daemon.Controller(types.SimpleNamespace(maps=xk.maps), ["veth-test"], str(path), config,
                                   reader, signals=signals)
    assert reader.hooks is controller.hooks
    loop = threading.Thread(target=controller.run)
    loop.start()
    try:
        knock(xk, SOURCE, SSH)
        assert wait_for(lambda: recorded(tmp_path / "ssh.open"))
        grants.revoke(xk.maps, SOURCE)
        assert wait_for(lambda: recorded(tmp_path / "ssh.close"))
        assert recorded(tmp_path / "ssh.close")[0]["XKNOCK_SOURCE"] == SOURCE

        slow = tmp_path / "slow.done"
        path.write_text(hooked_text(tmp_path, web_open=["/bin/sh", "-c", f"sleep 0.5; touch {slow}"]))
        signals.reload = True
        # the loop thread sets the controller's config, then the hooks': wait for both
        assert wait_for(lambda: controller.config.sequences[1].on_open[-1] == f"sleep 0.5; touch {slow}")
        assert wait_for(lambda: controller.hooks.sequences["web"].on_open[-1] == f"sleep 0.5; touch {slow}")
        knock(xk, SOURCE6, WEB)
        assert wait_for(lambda: controller.hooks.runner.running == 1 or slow.exists())
    finally:
        signals.stop = True
        loop.join(10)
        reader.hooks = None
    assert not loop.is_alive()
    assert slow.exists()          # stopping let the running hook end
    runner = controller.hooks.runner
    assert (runner.started, runner.failed, runner.timed_out, runner.dropped) == (3, 0, 0, 0)
