"""Fault tolerance (issue 6): the filter in the kernel must not care what
happens to the user-space parts. The namespace lab, the real CLI.

- The foreground controller, or a separate `xknock reload`, is SIGKILLed in
  the middle of a reload, while a client holds a grant and a session and an
  attacker keeps trying the guarded port: the filter stays attached and
  enforcing, the grant survives, the live policy is exactly the old config or
  exactly the new one (never a mix), and a restarted `attach --once`
  converges to the file on disk. Config B carries a 20,000-entry allow-list,
  so every reload either writes or clears 20,000 entries: a long window to
  land in. Kill moments are seeded-random, plus some aimed exactly at the
  middle of the write (the first allow entry appears in the idle bank) and
  just after the flip (the live bank changed, the old one is not cleared).
- `attach --once` replaces the program atomically under traffic: a session
  exchanging data without pause never misses an echo, the grant survives,
  the attacker never connects.
- With no controller at all, knocks still open ports and a grant's window
  still closes on time.
"""

import random
import signal
import subprocess
import time

import pytest

from xknock_dev.e2e import (
    ACCEPTED, DROPPED, Foreground, HeldConnection, XKNOCK, check, fresh_attach, knock, served_lab, status_json,
    xdp_prog_id, xknock,
)
from fault_helpers import (
    Attacker, Exchanges, Policy, Seq, allow_sources, census, parallel, wait_until, which_policy, write_atomically,
)
from xknock.controller.policy import policy as xk_policy
from xknock_dev.lab import can_connect, wait_for
from xknock.controller.kernel.maps import FilterMaps

pytestmark = pytest.mark.netns

GUARDED, UNGUARDED = 22, 80
SEED = 6
BIG = 20_000

A = Policy("A", (
    Seq("alpha", ("tcp:7000", "udp:8000", "tcp:9000"), ("tcp:22",)),
    Seq("alpha2", ("udp:7001", "udp:7002"), ("tcp:22",)),
))
B = Policy("B", (
    Seq("beta", ("udp:7100", "tcp:7200", "udp:7300"), ("tcp:22", "tcp:2222")),
    Seq("beta2", ("tcp:7400", "tcp:7401", "udp:7402"), ("tcp:22",), open_for="1m"),
    Seq("beta3", ("udp:7500", "udp:7501"), ("tcp:2222",), step_timeout="3s"),
), allow=allow_sources(BIG))
CLIENT_KNOCK = A.sequences[0].knock

# How each iteration's kill is timed: a seeded-random delay after the reload
# starts, or aimed at a moment. The reloads alternate A -> B, B -> A, so
# "mid-write" (iteration 2) falls on writing B's 20,000 entries and
# "after-flip" (iteration 3) on clearing them from the old bank.
KILL_PLAN = ("random", "random", "mid-write", "after-flip", "random")
SIGHUP_DELAY_S = (0.0, 0.5)      # the controller reads and applies B in ~0.35 s
RELOAD_DELAY_S = (0.0, 0.6)      # a `xknock reload` process lives ~0.25-0.5 s


@pytest.fixture(scope="module")
def net():
    with served_lab("xkfault", GUARDED, UNGUARDED) as built:
        yield built


def connects(host, addr, port=GUARDED):
    return can_connect(host, addr, port, timeout=ACCEPTED)


def blocked(host, addr, port=GUARDED):
    return not can_connect(host, addr, port, timeout=DROPPED)


def wait_running(controller, timeout=30.0):
    """A (re)started foreground controller: attached or replaced, and in its loop."""
    line = controller.log.wait_for(lambda l: " attached on " in l or "replaced program" in l, timeout)
    assert line, f"the controller did not start:\n{controller.log.read_all(0.5)}"
    assert wait_for(lambda: controller.handles(signal.SIGHUP, signal.SIGTERM), timeout=5), \
        "the controller never installed its signal handlers"


def xknock_processes(host):
    pids = host.run(["ip", "netns", "pids", host.name]).stdout.split()
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue   # gone meanwhile (`ip netns pids` itself)
        if any(arg.endswith(b"/xknock") for arg in argv[:2]):
            found.append((pid, argv))
    return found


def prog_id(net):
    return xdp_prog_id(net.server, net.server_iface)


def assert_enforcing_and_granted(net, session=None):
    """The filter is attached and drops the attacker, the client's grant lives
    and it connects; returns the one filter of `status --json`."""
    server, client = net.server.ipv4, net.client.ipv4
    attacker_blocked, client_connects, filters, attached_prog = parallel(
        lambda: blocked(net.attacker, server), lambda: connects(net.client, server),
        lambda: status_json(net.server), lambda: prog_id(net))
    assert attached_prog, "the filter is no longer attached"
    assert len(filters) == 1, f"expected one filter: {filters}"
    assert attacker_blocked, "the attacker reached the guarded port"
    grants = [(g["source"], g["port"]) for g in filters[0]["grants"]]
    assert (client, f"tcp:{GUARDED}") in grants, f"the client's grant is gone: {filters[0]['grants']}"
    assert client_connects, "the client's grant no longer lets it connect"
    if session:
        assert session.exchange("still-there") == "echo still-there", "the client's session broke"
    return filters[0]


def aimed_at(moment, maps, before, target):
    """A predicate that becomes true at the moment to kill a reload to target."""
    idle = 1 - before.active
    if moment == "mid-write":   # B's allow-list is being written into the idle bank
        key = xk_policy.lpm_key(target.allow[0], idle)
        return lambda: maps.allow.lookup(key) is not None
    if moment == "after-flip":  # the new bank is live, the old one (B's 20,000 entries) not yet cleared
        return lambda: maps.active_bank() == idle
    raise ValueError(moment)


def kill_when(moment, rng, delay_range, prog, before, target, kill):
    """Kill at a random moment or the aimed one; returns what was aimed at."""
    if moment == "random":
        time.sleep(rng.uniform(*delay_range))
        kill()
        return "random"
    with FilterMaps.from_prog(prog) as maps:
        hit = wait_until(aimed_at(moment, maps, before, target), timeout=10)
        kill()
    assert hit, f"the reload never reached the moment '{moment}'"
    return moment


def check_after_kill(net, prog, old, new, aimed, session):
    """Every promise after a kill; returns (aimed, what the kill interrupted)."""
    running = assert_enforcing_and_granted(net, session)
    live = which_policy(running, (old, new))
    after = census(prog)
    assert after.matches(live), f"the live bank holds a mix: {dict(after.live)} for policy {live.name}"
    stage = {(old, False): "before the write", (old, True): "mid-write",
             (new, True): "after the flip, mid-clear", (new, False): "after the reload"}[(live, after.idle_entries > 0)]
    if aimed == "mid-write":
        assert stage == "mid-write" and 0 < after.idle["allow"] < BIG, (stage, dict(after.idle))
    if aimed == "after-flip":
        assert stage == "after the flip, mid-clear", (stage, dict(after.idle))
    return aimed, stage


def converge(net, config_path, want):
    """`attach --once` again: the file on disk is live, the idle bank is empty."""
    check(xknock(net.server, "attach", net.server_iface, "-c", str(config_path), "--once"))
    [running] = status_json(net.server)
    assert which_policy(running, (A, B)) is want, f"attach --once did not converge to {want.name}"
    settled = census(prog_id(net))
    assert settled.matches(want) and settled.idle_entries == 0, (dict(settled.live), dict(settled.idle))


def setup_client(net, config_path):
    write_atomically(config_path, A.toml())
    fresh_attach(net, str(config_path))
    knock(net.client, net.server.ipv4, *CLIENT_KNOCK)
    session = HeldConnection(net.client, net.server.ipv4, GUARDED)
    attacker = Attacker(net.attacker, GUARDED, net.server.ipv4, net.server.ipv6)
    return session, attacker


def stop_traffic(session, attacker):
    """Stop the client's session and the attacker loop: (attempts, breaches)."""
    session.close()
    return attacker.finish()


def assert_survived(stages, attempts, breaches):
    print(f"\nkills (aimed, interrupted): {stages}\nattacker: {attempts} attempts, {len(breaches)} breaches")
    assert not breaches, f"the attacker connected to the guarded port: {breaches}"
    assert attempts >= 10, "the attacker loop hardly ran"
    interrupted = [stage for _, stage in stages if stage in ("mid-write", "after the flip, mid-clear")]
    assert interrupted, "no kill landed inside a reload: the test proved little"


def test_controller_killed_during_sighup_reloads(net, tmp_path):
    config_path = tmp_path / "xknock.toml"
    session, attacker = setup_client(net, config_path)
    rng = random.Random(SEED)
    current, stages = A, []
    try:
        for i, moment in enumerate(KILL_PLAN):
            target = B if current is A else A
            controller = Foreground(net, str(config_path))
            try:
                wait_running(controller)
                prog = prog_id(net)
                before = census(prog)
                assert before.idle_entries == 0 and before.matches(current), (i, dict(before.live), dict(before.idle))
                write_atomically(config_path, target.toml())
                controller.send_signal(signal.SIGHUP)
                aimed = kill_when(moment, rng, SIGHUP_DELAY_S, prog, before, target,
                                  lambda: controller.send_signal(signal.SIGKILL))
                assert controller.wait(10) == -signal.SIGKILL
            finally:
                controller.stop()
            stages.append(check_after_kill(net, prog, current, target, aimed, session))
            converge(net, config_path, target)
            current = target
    finally:
        attempts, breaches = stop_traffic(session, attacker)
    assert_survived(stages, attempts, breaches)


def test_reload_process_killed_midway(net, tmp_path):
    config_path = tmp_path / "xknock.toml"
    session, attacker = setup_client(net, config_path)
    rng = random.Random(SEED + 1)
    current, stages = A, []
    try:
        for i, moment in enumerate(KILL_PLAN):
            target = B if current is A else A
            prog = prog_id(net)
            before = census(prog)
            assert before.idle_entries == 0 and before.matches(current), (i, dict(before.live), dict(before.idle))
            write_atomically(config_path, target.toml())
            reload = net.server.popen([XKNOCK, "reload", net.server_iface, "-c", str(config_path)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            aimed = kill_when(moment, rng, RELOAD_DELAY_S, prog, before, target, reload.kill)
            reload.wait(10)
            reload.stderr.close()
            stages.append(check_after_kill(net, prog, current, target, aimed, session))
            converge(net, config_path, target)
            current = target
    finally:
        attempts, breaches = stop_traffic(session, attacker)
    assert_survived(stages, attempts, breaches)


def test_atomic_replacement_under_traffic_keeps_the_session_and_passes_nothing(net, tmp_path):
    config_path = tmp_path / "xknock.toml"
    session, attacker = setup_client(net, config_path)
    exchanges = Exchanges(session)
    exchanges.start()
    replaced = []
    try:
        assert wait_for(lambda: exchanges.ok >= 20, timeout=5), "the session exchanges nothing"
        for _ in range(4):
            old = prog_id(net)
            out = check(xknock(net.server, "attach", net.server_iface, "-c", str(config_path), "--once"))
            assert f"replaced program {old}" in out.stderr, out.stderr
            replaced.append((old, prog_id(net)))
            time.sleep(0.1)
    finally:
        ok, failures = exchanges.stop()
        session_alive = not failures and session.exchange("after") == "echo after"
        attempts, breaches = stop_traffic(session, attacker)
    print(f"\nreplaced {replaced}; {ok} echoes; attacker {attempts} attempts")
    assert len({new for _, new in replaced}) == 4, f"the program was not replaced each time: {replaced}"
    assert not failures, f"the session missed echoes across a replacement: {failures[:5]}"
    assert ok >= 100 and session_alive
    assert not breaches, f"the attacker connected during a replacement: {breaches}"
    assert attempts >= 10, "the attacker loop hardly ran"
    [running] = status_json(net.server)
    assert (net.client.ipv4, f"tcp:{GUARDED}") in [(g["source"], g["port"]) for g in running["grants"]], \
        "the grant did not survive the replacements"
    assert connects(net.client, net.server.ipv4)


def test_the_kernel_enforces_with_no_controller_at_all(net, tmp_path):
    config_path = tmp_path / "short.toml"
    short = Policy("short", (Seq("alpha", CLIENT_KNOCK, ("tcp:22",), open_for="2s", idle_timeout="30s"),))
    write_atomically(config_path, short.toml())
    fresh_attach(net, str(config_path))            # attach --once: nothing stays running
    assert not xknock_processes(net.server), "an xknock process runs in the server's namespace"

    assert all(parallel(lambda: blocked(net.client, net.server.ipv4), lambda: blocked(net.client, net.server.ipv6)))
    knock(net.client, net.server.ipv4, *CLIENT_KNOCK)
    knock(net.client, net.server.ipv6, *CLIENT_KNOCK)
    knocked = time.monotonic()
    v4, v6, attacker_blocked = parallel(lambda: connects(net.client, net.server.ipv4),
                                        lambda: connects(net.client, net.server.ipv6),
                                        lambda: blocked(net.attacker, net.server.ipv4))
    assert v4 and v6, "with no controller running, the knock opened nothing"
    assert attacker_blocked

    time.sleep(max(0.0, knocked + 2.3 - time.monotonic()))
    assert all(parallel(lambda: blocked(net.client, net.server.ipv4), lambda: blocked(net.client, net.server.ipv6))), \
        "a new connection was accepted after open_for = 2s"
    [running_filter] = status_json(net.server)
    for grant in running_filter["grants"]:
        assert grant["window_left_s"] == 0 and grant["idle_left_s"] > 0, grant
    assert {g["source"] for g in running_filter["grants"]} == {net.client.ipv4, net.client.ipv6}

    knock(net.client, net.server.ipv4, *CLIENT_KNOCK)
    assert connects(net.client, net.server.ipv4), "knocking again after the window did not reopen"
