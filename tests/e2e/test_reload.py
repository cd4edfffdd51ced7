"""One reload path, an honest status (issue 19 item 2): `xknock reload`
goes through the controller serving the interface (SIGHUP, then the result
it records), so SPA users follow; a bad file is refused with the
controller's message and the old policy kept; with no controller the command
writes the maps itself and says so; `status` names the controller or says
plainly there is none; a stale or recycled record is never trusted; STATUS=
for systemd says the mode and the last reload's result. The real CLI against
real controllers in a namespace lab."""

import base64
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from xknock_dev.e2e import Foreground, check, config_text, served_lab, status_json, write_config, xknock
from xknock_dev.e2e import XKNOCK

from xknock_dev.lab import can_connect, wait_for
from xknock.controller.kernel.maps import FilterMaps
from xknock.controller.state import controller_record

pytestmark = pytest.mark.netns

GUARDED = 22
SPA_PORT = 62201
USER = """
[[spa.user]]
name = "{name}"
key = "{key}"
hmac_key = "{hmac}"
open = ["tcp:{guarded}"]
open_for = "30s"
"""


def keys():
    return base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode()


ALICE, BOB = keys(), keys()


def spa_config(tmp_path, *users):
    text = config_text(opens=(f"tcp:{GUARDED}",)) + f'\n[spa]\nport = {SPA_PORT}\nreplay_cache = "{tmp_path}/replay"\n'
    for name, (key, hmac) in users:
        text += USER.format(name=name, key=key, hmac=hmac, guarded=GUARDED)
    return text


def spa(net, user, key_pair):
    key, hmac = key_pair
    return check(xknock(net.client, "spa", net.server.ipv4, "-A", f"tcp/{GUARDED}", "--key-base64", key,
                        "--hmac-key-base64", hmac, "--user", user, "--port", str(SPA_PORT)))


def opens(net, timeout=3.0):
    return wait_for(lambda: can_connect(net.client, net.server.ipv4, GUARDED, timeout=0.5), timeout=timeout)


def control_id(net):
    prog = status_json(net.server)[0]["interfaces"][0]["prog_id"]
    with FilterMaps.from_prog(prog) as maps:
        return maps.control.id


@pytest.fixture(scope="module")
def net():
    with served_lab("xkreload", GUARDED, ipv6=False) as built:
        yield built


def test_reload_goes_through_the_controller_and_a_new_spa_user_gets_in(net, tmp_path):
    path = write_config(tmp_path, "spa.toml", spa_config(tmp_path, ("alice", ALICE)))
    xknock(net.server, "detach", net.server_iface)
    with Foreground(net, path) as controller:
        controller.wait_ready()
        [shown] = status_json(net.server)
        running = shown["controller"]
        assert running["pid"] == controller.process.pid and running["config"] == path
        assert running["last_reload"] is None and running["mode"] == "enforce" and running["version"]
        text = check(xknock(net.server, "status", net.server_iface)).stdout
        assert f"controller: PID {controller.process.pid}, xknock " in text and f"config {path} (hash " in text
        assert "spa: udp:62201 (verified by the controller)" in text

        spa(net, "bob", BOB)
        assert not opens(net, timeout=1.0), "bob got in before he was a user"
        write_config(tmp_path, "spa.toml", spa_config(tmp_path, ("alice", ALICE), ("bob", BOB)))
        result = check(xknock(net.server, "reload", net.server_iface, "--json"))   # no -c: the controller's file
        reloaded = json.loads(result.stdout)
        assert reloaded["controller"]["pid"] == controller.process.pid and reloaded["config"] == path
        assert reloaded["sequences"] == 1 and reloaded["mode"] == "enforce"
        assert controller.log.wait_for(lambda line: line.startswith("info reloaded"), timeout=5)
        spa(net, "bob", BOB)
        assert opens(net), "the new SPA user did not get in after the reload"

        last = status_json(net.server)[0]["controller"]["last_reload"]
        assert last["ok"] and last["message"] == ""
        assert ", last reload ok at " in check(xknock(net.server, "status", net.server_iface)).stdout

        other = write_config(tmp_path, "other.toml", spa_config(tmp_path, ("alice", ALICE)))
        refused = xknock(net.server, "reload", net.server_iface, "-c", other)
        assert refused.returncode == 1
        assert f"reloads {path}, not {other}" in refused.stderr and "nothing was reloaded" in refused.stderr


def test_a_bad_config_is_refused_with_the_controllers_message_and_the_old_policy_kept(net, tmp_path):
    path = write_config(tmp_path, "good.toml", config_text(name="kept"))
    xknock(net.server, "detach", net.server_iface)
    with Foreground(net, path) as controller:
        controller.wait_ready()
        write_config(tmp_path, "good.toml", config_text(knock=("tcp:70000",), name="broken"))
        result = xknock(net.server, "reload", net.server_iface, "-c", path)
        assert result.returncode == 1 and result.stdout == ""
        lines = result.stderr.splitlines()
        assert any("port out of range" in line and line.startswith("xknock: ") for line in lines), result.stderr
        assert lines[-1] == (f"xknock: the controller serving {net.server_iface} (PID {controller.process.pid}) "
                             f"refused the reload of {path}: the running policy is unchanged")
        assert controller.log.wait_for(lambda line: "reload refused" in line, timeout=5)
        [shown] = status_json(net.server)
        assert [s["name"] for s in shown["sequences"]] == ["kept"]
        last = shown["controller"]["last_reload"]
        assert not last["ok"] and "port out of range" in last["message"]
        text = check(xknock(net.server, "status", net.server_iface)).stdout
        assert ", last reload REFUSED at " in text and "(the running policy is unchanged)" in text
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(timeout=20) == 0
    # Stopped: its record is gone, and status says plainly what no longer happens.
    [shown] = status_json(net.server)
    assert shown["controller"] is None and "controller_record_ignored" not in shown
    assert not os.path.exists(controller_record.record_path(control_id(net)))


def test_without_a_controller_reload_writes_the_maps_and_says_so(net, tmp_path):
    path = write_config(tmp_path, "once.toml", config_text(name="first"))
    xknock(net.server, "detach", net.server_iface)
    check(xknock(net.server, "attach", net.server_iface, "-c", path, "--once"))
    text = check(xknock(net.server, "status", net.server_iface)).stdout
    assert controller_record.NO_CONTROLLER in text.splitlines()
    assert controller_record.NO_CONTROLLER == ("no controller: SPA packets are not verified, hooks do not run, "
                                               "time-based sequences do not rotate")
    write_config(tmp_path, "once.toml", config_text(name="second"))
    result = check(xknock(net.server, "reload", net.server_iface, "-c", path))
    assert result.stdout == (f"reloaded {net.server_iface} by writing its maps: 1 sequences, mode enforce; "
                             f"{controller_record.NO_CONTROLLER}\n")
    assert [s["name"] for s in status_json(net.server)[0]["sequences"]] == ["second"]
    reloaded = json.loads(check(xknock(net.server, "reload", net.server_iface, "-c", path, "--json")).stdout)
    assert reloaded["controller"] is None and reloaded["note"] == controller_record.NO_CONTROLLER


def test_a_stale_or_recycled_record_is_never_trusted(net, tmp_path):
    """A controller killed by SIGKILL leaves its record; its PID may be another
    process's by now. Neither is a controller: status says so and reload
    writes the maps itself, signalling nobody."""
    path = write_config(tmp_path, "stale.toml", config_text(name="stale"))
    xknock(net.server, "detach", net.server_iface)
    check(xknock(net.server, "attach", net.server_iface, "-c", path, "--once"))
    record = controller_record.record_path(control_id(net))
    bystander = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    real_ticks = controller_record.start_ticks(bystander.pid)
    cases = [
        (dead.pid, 1, f"a stale controller record: PID {dead.pid} is not running"),
        # A recycled PID: another start time.
        (bystander.pid, real_ticks + 1, f"a stale controller record: PID {bystander.pid} is another process now"),
        # The right start time, but the process holds no map of this filter.
        (bystander.pid, real_ticks, f"a stale controller record: PID {bystander.pid} is another process now"),
    ]
    try:
        for pid, ticks, why in cases:
            os.makedirs(os.path.dirname(record), mode=0o700, exist_ok=True)
            write_config(os.path.dirname(record), os.path.basename(record), json.dumps({
                "pid": pid, "start_ticks": ticks, "version": "0", "config": path, "config_hash": "x",
                "mode": "enforce", "sequences": 1, "started_at": time.time(), "last_reload": None}))
            [shown] = status_json(net.server)
            assert shown["controller"] is None and shown["controller_record_ignored"] == why
            text = check(xknock(net.server, "status", net.server_iface)).stdout
            assert f"{controller_record.NO_CONTROLLER} ({why}, not trusted)" in text
            result = check(xknock(net.server, "reload", net.server_iface, "-c", path))
            assert "by writing its maps" in result.stdout and f"({why}, not trusted)" in result.stdout
        assert bystander.poll() is None, "the bystander was signalled"
    finally:
        bystander.kill()
        bystander.wait()
        if os.path.exists(record):
            os.unlink(record)


def test_a_record_others_could_write_is_not_read(tmp_path, monkeypatch):
    """Only a file root's alone is read: one writable by others, or a link, is no record."""
    monkeypatch.setattr(controller_record, "LOCK_DIR", str(tmp_path))
    path = controller_record.record_path(1)
    fields = {"pid": os.getpid(), "start_ticks": controller_record.start_ticks(os.getpid())}
    with open(path, "w") as f:
        json.dump(fields, f)
    os.chmod(path, 0o622)
    assert controller_record._read(path) is None
    os.chmod(path, 0o600)
    assert controller_record._read(path) == fields
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)
    assert controller_record._read(path) is None


def test_status_for_systemd_tells_the_mode_and_the_last_reload(net, tmp_path):
    notify = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify)
    sock.settimeout(30)
    path = write_config(tmp_path, "monitor.toml", config_text().replace('mode = "enforce"', 'mode = "monitor"'))
    xknock(net.server, "detach", net.server_iface)
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    process = net.server.popen([XKNOCK, "attach", net.server_iface, "-c", path], env=env,
                               stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def next_status():
        while True:
            message = sock.recv(512).decode()
            for line in message.splitlines():
                if line.startswith("STATUS="):
                    return message, line.removeprefix("STATUS=")

    try:
        message, status = next_status()
        assert message.startswith("READY=1\n")
        assert status.startswith(f"monitor on {net.server_iface}: counting, refusing nothing, 1 sequence(s)")
        assert "enforc" not in status
        check(xknock(net.server, "reload", net.server_iface, "-c", path))
        _, status = next_status()
        assert status.startswith(f"monitor on {net.server_iface}") and "; last reload ok at " in status
        write_config(tmp_path, "monitor.toml", config_text(knock=("tcp:70000",)))
        assert xknock(net.server, "reload", net.server_iface, "-c", path).returncode == 1
        _, status = next_status()
        assert "REFUSED, the running policy is unchanged" in status and status.startswith("monitor on")
        write_config(tmp_path, "monitor.toml", config_text())
        check(xknock(net.server, "reload", net.server_iface, "-c", path))
        _, status = next_status()
        assert status.startswith(f"enforce on {net.server_iface}, 1 sequence(s)") and "last reload ok" in status
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        sock.close()
