"""The Prometheus metrics: exact values after packets run through the real
program (BPF_PROG_TEST_RUN, test clock), read by a fresh registry per scrape;
the naming conventions; scrape health when the kernel cannot be read; the
HTTP endpoint and `xknock attach --metrics-addr` errors.

tests/e2e/test_prometheus.py runs the same metrics through a real Prometheus."""

import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import types
import urllib.request

import pytest
from xknock_dev.packets import arp, step, tcp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from xknock.controller.state import grants
from xknock.controller.kernel import layout
from xknock.controller.kernel.batch import NoBatch
from xknock.controller.daemon import hooks, map_sampler, metrics
from xknock.controller.errors import XknockError
from xknock.controller.kernel.maps import FilterMaps
from repo_paths import REPO

XKNOCK = os.path.join(os.path.dirname(sys.executable), "xknock")
IFACE = "eth0"
SSH = ["tcp:7000", "udp:8000", "tcp:9000"]
STRANGER = "198.51.100.7"
DENIED = "203.0.113.5"


def knock(xk, src, steps, gap=0.1):
    for s in steps:
        xk.run(step(src, s))
        xk.advance(gap)


def no_attachment(device, control_map_id):
    return None


def registry_for(xk, ifaces=(IFACE,), info=None, sampler=None, attachment=no_attachment, maps_provider=None):
    """A fresh registry holding only an XknockCollector over the harness."""
    registry = CollectorRegistry()
    registry.register(metrics.XknockCollector(
        maps_provider or (lambda: xk.maps), list(ifaces), info or metrics.ControllerInfo(version="test"),
        sampler=sampler, attachment=attachment))
    return registry


# Metrics of the controller itself carry no iface label; every other one does.
CONTROLLER_METRICS = {"xknock_scrape_success", "xknock_scrape_duration_seconds", "xknock_controller_info",
                      "xknock_config_last_reload_success", "xknock_config_last_reload_timestamp_seconds"}


def value(registry, name, **labels):
    """The sample's value, the iface label filled in for per-filter metrics."""
    if name not in CONTROLLER_METRICS:
        labels = {"iface": IFACE, **labels}
    return registry.get_sample_value(name, labels)


# --- values ---------------------------------------------------------------------

def test_packets_by_verdict_and_reason(xk):
    for _ in range(3):
        xk.run(tcp(STRANGER, 22))            # guarded, no grant
    xk.run(arp())
    xk.run(tcp(STRANGER, 80))                # unguarded
    xk.run(tcp(DENIED, 80))
    registry = registry_for(xk)
    assert value(registry, "xknock_packets_total", verdict="drop", reason="drop_no_grant") == 3
    assert value(registry, "xknock_packets_total", verdict="pass", reason="pass_not_ip") == 1
    assert value(registry, "xknock_packets_total", verdict="pass", reason="pass_unguarded") == 1
    assert value(registry, "xknock_packets_total", verdict="drop", reason="drop_denylist") == 1
    # Every verdict reason is a series from the start (zero), so rate() works at once.
    for reason in layout.Reason:
        if layout.is_verdict(reason):
            verdict = "drop" if layout.is_drop(reason) else "pass"
            assert value(registry, "xknock_packets_total", verdict=verdict, reason=reason.name.lower()) is not None
    assert value(registry, "xknock_scrape_success") == 1


def test_knocks_by_sequence_and_result(xk):
    knock(xk, STRANGER, SSH)                                   # ssh: 2 advanced, 1 completed; web: 1 advanced
    knock(xk, "198.51.100.9", ["tcp:7000", "tcp:9000"])        # ssh: 1 advanced, 1 reset
    knock(xk, "198.51.100.10", ["tcp:7000"])                   # ssh: 1 advanced
    xk.advance(6)
    knock(xk, "198.51.100.10", ["udp:8000"])                   # ssh: timed out; web: 1 advanced
    registry = registry_for(xk)
    got = {(seq, result): value(registry, "xknock_knocks_total", sequence=seq, result=result)
           for seq in ("ssh", "web") for result in ("advanced", "completed", "reset", "timed_out")}
    assert got == {
        ("ssh", "advanced"): 4, ("ssh", "completed"): 1, ("ssh", "reset"): 1, ("ssh", "timed_out"): 1,
        ("web", "advanced"): 2, ("web", "completed"): 0, ("web", "reset"): 0, ("web", "timed_out"): 0,
    }


def test_knock_events_that_changed_nothing(xk):
    knock(xk, STRANGER, ["tcp:7000", "tcp:7000"])              # ssh: repeated
    xk.run(tcp("198.51.100.20", 7000, flags="A"))              # TCP without SYN: ignored
    xk.run(step("198.51.100.21", "tcp:9000"))                  # not a first step, nothing in progress: ignored
    registry = registry_for(xk)
    assert value(registry, "xknock_knock_events_total", result="repeated") == 1
    assert value(registry, "xknock_knock_events_total", result="ignored") == 2
    assert value(registry, "xknock_knock_events_total", result="contended") == 0


def test_grant_counters_and_live_grants(xk):
    knock(xk, STRANGER, SSH)
    xk.advance(6)
    knock(xk, STRANGER, SSH)                                   # the same grant, refreshed: issued, not created
    knock(xk, "198.51.100.30", SSH)
    registry = registry_for(xk)
    assert value(registry, "xknock_grants_issued_total") == 3
    assert value(registry, "xknock_grants_created_total") == 2
    assert value(registry, "xknock_grants_live") == 2

    assert grants.revoke(xk.maps, STRANGER) == 1
    xk.advance(16 * 60)                                        # past ssh's window and idle timeout
    assert xk.run(tcp("198.51.100.30", 22)) == 1               # XDP_DROP, and the data path deletes the grant
    registry = registry_for(xk)
    assert value(registry, "xknock_grants_removed_total") == 1
    assert value(registry, "xknock_grants_expired_total") == 1
    assert value(registry, "xknock_grants_live") == 0
    assert value(registry, "xknock_grant_failures_total") == 0
    assert value(registry, "xknock_events_lost_total") == 0


def test_operator_bans_count_in_live_bans(xk, example_config):
    from xknock.controller.config import Ban
    from xknock.controller.state import bans

    xk.apply(dataclasses.replace(example_config, ban=Ban(after=3, within_ns=60 * 10**9, for_ns=600 * 10**9,
                                                         scope="all")))
    bans.ban(xk.maps, STRANGER, 60 * 10**9, now=xk.now_ns)
    registry = registry_for(xk)
    assert value(registry, "xknock_bans_operator_total") == 1
    assert value(registry, "xknock_bans_live") == 1
    bans.unban(xk.maps, STRANGER)
    assert value(registry_for(xk), "xknock_bans_live") == 0


def test_monitor_mode_is_labelled_and_its_passes_counted(xk, example_config):
    xk.apply(dataclasses.replace(example_config, mode="monitor"))
    xk.run(tcp(STRANGER, 22))
    registry = registry_for(xk, attachment=lambda device, control: (xk.loaded.prog_id, "generic"))
    assert value(registry, "xknock_monitor_passed_total") == 1
    assert value(registry, "xknock_packets_total", verdict="drop", reason="drop_no_grant") == 1
    assert value(registry, "xknock_filter_info", device=IFACE, prog_id=str(xk.loaded.prog_id),
                 xdp_mode="generic", mode="monitor") == 1


def test_filter_info_per_interface_of_the_group(xk):
    def attachment(device, control_map_id):
        assert control_map_id == xk.maps.control.id
        return (xk.loaded.prog_id, "native") if device == "eth0" else None   # eth1 lost its program

    registry = registry_for(xk, ifaces=("eth0", "eth1"), attachment=attachment)
    prog = str(xk.loaded.prog_id)
    group = {"iface": "eth0,eth1"}
    assert registry.get_sample_value("xknock_filter_info", {**group, "device": "eth0", "prog_id": prog,
                                                            "xdp_mode": "native", "mode": "enforce"}) == 1
    series = [s for f in registry.collect() if f.name == "xknock_filter_info" for s in f.samples]
    assert [s.labels["device"] for s in series] == ["eth0"]
    assert registry.get_sample_value("xknock_packets_total", {**group, "verdict": "drop",
                                                              "reason": "drop_no_grant"}) == 0


def test_running_filter_is_none_for_a_missing_interface(xk):
    assert metrics.running_filter("no-such-if0", xk.maps.control.id) is None


def test_controller_info_and_reload_results(xk, example_config):
    from xknock.controller.config import config_hash

    times = iter([1000.0, 2000.0])
    info = metrics.ControllerInfo(version="9.9.9", config=example_config, clock=lambda: next(times))
    registry = registry_for(xk, info=info)
    digest = config_hash(example_config)
    assert registry.get_sample_value("xknock_controller_info", {"version": "9.9.9", "config_hash": digest}) == 1
    assert registry.get_sample_value("xknock_config_last_reload_success") is None   # nothing loaded yet

    info.record_reload(True, example_config)
    assert registry.get_sample_value("xknock_config_last_reload_success") == 1
    assert registry.get_sample_value("xknock_config_last_reload_timestamp_seconds") == 1000.0

    other = dataclasses.replace(example_config, mode="monitor")
    info.record_reload(False, other)                            # refused: the hash stays the running one's
    assert registry.get_sample_value("xknock_config_last_reload_success") == 0
    assert registry.get_sample_value("xknock_config_last_reload_timestamp_seconds") == 2000.0
    assert registry.get_sample_value("xknock_controller_info", {"version": "9.9.9", "config_hash": digest}) == 1


def test_package_version_is_the_installed_one():
    import importlib.metadata

    assert metrics.ControllerInfo().version == importlib.metadata.version("xknock")


# --- the sampler ------------------------------------------------------------------

def test_sampler_counts_map_entries_and_knocks_in_progress(xk):
    # First steps are held in the first-step filter, further progress in `progress`.
    knock(xk, "198.51.100.40", ["tcp:7000"])
    xk.advance(6)                                    # .40's ssh first step is now timed out: not in progress
    knock(xk, "198.51.100.41", ["tcp:7000"])         # ssh at step 1
    knock(xk, "198.51.100.42", ["udp:8000"])         # web at step 1 (ssh: ignored)
    knock(xk, "198.51.100.43", SSH)                  # ssh completed; web at step 1 (udp:8000)
    knock(xk, "198.51.100.44", SSH[:2])              # ssh at step 2
    sampler = metrics.MapSampler(lambda: xk.maps, now_ns=lambda: xk.now_ns)
    registry = registry_for(xk, sampler=sampler)
    assert value(registry, "xknock_knocks_in_progress") is None     # nothing sampled yet
    assert value(registry, "xknock_map_entries", map="progress") is None
    assert value(registry, "xknock_map_capacity_entries", map="progress") == xk.maps.progress.max_entries

    sampler.sample_once()
    assert value(registry, "xknock_knocks_in_progress") == 5   # 4 first steps (.40 is stale) + .44 at step 2
    entries = {name: value(registry, "xknock_map_entries", map=name) for name in metrics.SAMPLED_MAPS}
    # firsts: .40 (stale), .41 ssh, .42 web, .43 web, .44 web (its udp:8000)
    assert entries == {"progress": 2, "firsts": 5, "grants": 1, "seqstats": 2, "allow": 2, "deny": 2,
                       "ports": len(list(xk.maps.ports.keys()))}
    for name in metrics.SAMPLED_MAPS:
        assert value(registry, "xknock_map_capacity_entries", map=name) == getattr(xk.maps, name).max_entries
        assert 0 <= value(registry, "xknock_map_sample_age_seconds", map=name) < 30


def test_sampler_thread_samples_at_once_and_stops(xk):
    from xknock_dev.lab import wait_for

    sampler = metrics.MapSampler(lambda: xk.maps, interval=60).start()
    try:
        assert wait_for(lambda: set(sampler.latest().entries) == set(metrics.SAMPLED_MAPS), timeout=5)
    finally:
        sampler.stop()
    assert not sampler._thread.is_alive()


def test_count_entries_batch_and_iteration_agree(xk):
    knock(xk, STRANGER, SSH)
    for name in metrics.SAMPLED_MAPS:
        m = getattr(xk.maps, name)
        assert metrics.count_entries(m) == len(list(m.keys())), name


def test_without_batch_lookup_entries_are_counted_by_iteration(xk, monkeypatch):
    def no_batch(*args, **kwargs):
        raise NoBatch()
        yield

    monkeypatch.setattr(map_sampler, "batches", no_batch)
    knock(xk, STRANGER, SSH)
    assert metrics.count_entries(xk.maps.progress) == 1     # ssh completed (web's first step is in `firsts`)
    sampler = metrics.MapSampler(lambda: xk.maps, now_ns=lambda: xk.now_ns)
    sampler.sample_once()
    sample = sampler.latest()
    assert sample.entries["progress"] == 1 and sample.knocks_in_progress is None


def test_counting_past_its_budget_keeps_the_previous_count(xk, monkeypatch):
    sampler = metrics.MapSampler(lambda: xk.maps, now_ns=lambda: xk.now_ns)
    sampler.sample_once()
    knock(xk, STRANGER, SSH)
    monkeypatch.setattr(map_sampler, "count_entries", lambda *args, **kwargs: None)
    sampler.sample_once()
    assert sampler.latest().entries["progress"] == 0


@pytest.mark.parametrize("slow", ["progress", "firsts"])
def test_knocks_in_progress_stay_put_while_a_map_is_over_its_budget(xk, monkeypatch, slow):
    knock(xk, "198.51.100.41", ["tcp:7000"])         # a first step, held in `firsts`
    knock(xk, "198.51.100.44", SSH[:2])              # ssh at step 2, in `progress`
    sampler = metrics.MapSampler(lambda: xk.maps, now_ns=lambda: xk.now_ns)
    sampler.sample_once()
    before = sampler.latest().knocks_in_progress
    assert before == 3                               # .41's and .44's first steps (ssh, web) + .44 at step 2

    count = metrics.count_entries
    monkeypatch.setattr(map_sampler, "count_entries",
                        lambda m, *args, **kwargs: None if m is getattr(xk.maps, slow) else count(m, *args, **kwargs))
    for _ in range(3):                               # the first steps must not pile up round after round
        sampler.sample_once()
        assert sampler.latest().knocks_in_progress == before


# --- what a scrape costs ------------------------------------------------------------

class NoWalk:
    """A map that fails the test when anyone walks it."""

    def __init__(self, m):
        self._m = m

    def __getattr__(self, name):
        if name in ("keys", "items"):
            raise AssertionError(f"a scrape walked the {self._m.name} map")
        return getattr(self._m, name)


def test_a_scrape_never_walks_the_maps_that_grow_with_traffic(xk):
    knock(xk, STRANGER, SSH)
    knock(xk, "198.51.100.50", ["tcp:7000"])
    growing = ("progress", "firsts", "grants", "allow", "deny", "ports")
    guarded = FilterMaps({name: NoWalk(m) if name in growing else m for name, m in xk.maps._maps.items()})
    sampler = metrics.MapSampler(lambda: xk.maps, now_ns=lambda: xk.now_ns)
    sampler.sample_once()
    registry = registry_for(xk, maps_provider=lambda: guarded, sampler=sampler)
    assert value(registry, "xknock_scrape_success") == 1, "a scrape walked a map (see the log)"
    assert value(registry, "xknock_knocks_total", sequence="ssh", result="completed") == 1
    assert value(registry, "xknock_map_entries", map="progress") == 1   # first steps are in `firsts`


# --- scrape health --------------------------------------------------------------------

def test_closed_maps_give_scrape_success_zero_not_an_exception(xk):
    broken = FilterMaps.from_prog(xk.loaded.prog_id)
    broken.close()
    info = metrics.ControllerInfo(version="test")
    info.record_reload(True)
    registry = registry_for(xk, maps_provider=lambda: broken, info=info)
    assert registry.get_sample_value("xknock_scrape_success") == 0
    assert registry.get_sample_value("xknock_scrape_duration_seconds") >= 0
    assert value(registry, "xknock_packets_total", verdict="drop", reason="drop_no_grant") is None
    # What the controller knows without the kernel is still there.
    assert registry.get_sample_value("xknock_controller_info", {"version": "test", "config_hash": ""}) == 1
    assert registry.get_sample_value("xknock_config_last_reload_success") == 1


@pytest.mark.parametrize("provider", [lambda: None, lambda: 1 / 0], ids=["no maps yet", "provider raises"])
def test_a_failing_provider_gives_scrape_success_zero(xk, provider):
    registry = registry_for(xk, maps_provider=provider)
    assert registry.get_sample_value("xknock_scrape_success") == 0


def test_the_scrape_recovers_after_a_failure(xk):
    state = {"maps": None}
    registry = registry_for(xk, maps_provider=lambda: state["maps"])
    assert registry.get_sample_value("xknock_scrape_success") == 0
    state["maps"] = xk.maps
    assert registry.get_sample_value("xknock_scrape_success") == 1


# --- naming conventions -----------------------------------------------------------------

FORBIDDEN_LABELS = {"source", "src", "addr", "address", "ip", "ipaddr", "client", "peer", "host"}


def every_family(xk):
    """Every family a scrape can yield: sampled, reload recorded, filter attached."""
    knock(xk, STRANGER, SSH)
    sampler = metrics.MapSampler(lambda: xk.maps, now_ns=lambda: xk.now_ns)
    sampler.sample_once()
    info = metrics.ControllerInfo(version="test")
    info.record_reload(True)
    info.hooks = types.SimpleNamespace(started=1, failed=0, timed_out=0, dropped=0, running=0)
    registry = registry_for(xk, info=info, sampler=sampler,
                            attachment=lambda device, control: (xk.loaded.prog_id, "native"))
    # A cluster node's families too (cluster/metrics.py), from a node's status.
    from xknock.controller.cluster.metrics import COUNTERS, ClusterCollector

    status = {"node": "a", "reachable": True, "sync_lag_s": 0.05, "pending": 0, **{key: 1 for key, _, _ in COUNTERS}}
    registry.register(ClusterCollector(types.SimpleNamespace(status=lambda: status)))
    return list(registry.collect())


def test_hook_counts_are_exported_from_the_controllers_runner(xk, example_config):
    """The HookRunner the controller's hooks run in, through a real /metrics."""
    runner = hooks.HookRunner(timeout_s=0.3, max_running=1)
    server = metrics.MetricsServer("127.0.0.1", 0)
    try:
        server.start(xk.maps, [IFACE], example_config, hooks=runner)
        assert runner.run("on_open", ["/bin/sleep", "5"], {})       # killed at its timeout
        assert not runner.run("on_open", ["/bin/true"], {})         # dropped: max_running
        assert runner.running == 1
        registry = server.registry
        assert value(registry, "xknock_hooks_running") == 1
        assert runner.wait(10)
        assert runner.run("on_close", ["/bin/false"], {}) and runner.wait(10)   # failed
        runner.run("on_ban", ["/nonexistent/hook"], {})                           # failed: could not start
        got = {result: value(registry, "xknock_hooks_total", result=result) for result in metrics.HOOK_RESULTS}
        assert got == {"started": 2, "failed": 2, "timed_out": 1, "dropped": 1}
        assert value(registry, "xknock_hooks_running") == 0
    finally:
        server.close()
        runner.close()


def test_without_a_hook_runner_there_are_no_hook_metrics(xk):
    registry = registry_for(xk)
    assert value(registry, "xknock_hooks_total", result="started") is None


def test_metric_names_labels_and_help_follow_the_conventions(xk):
    families = every_family(xk)
    assert len(families) >= 20
    for family in families:
        name = family.name
        assert name.startswith("xknock_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert family.samples, f"{name} has no samples"
        doc = family.documentation
        assert doc and doc[0].isupper() and doc.endswith("."), f"{name}: help must be a full sentence: {doc!r}"
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            else:
                assert not sample.name.endswith("_total"), f"{sample.name}: only counters end in _total"
            assert not FORBIDDEN_LABELS & set(sample.labels), f"{sample.name}: {sample.labels}"
            for label in sample.labels:
                assert re.fullmatch(r"[a-z][a-z_]*", label), label
        # Base units: seconds and entries, never milliseconds or bytes-as-kb.
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|percent)(_|$)", name), name


def test_every_metric_is_documented_and_every_query_uses_real_metrics(xk):
    collected = every_family(xk)
    exposed = {s.name for f in collected for s in f.samples}
    families = {f.name for f in collected}
    with open(os.path.join(REPO, "docs", "metrics.md")) as f:
        documented = f.read()
    for name in exposed:
        assert f"`{name}`" in documented, f"{name} is missing from docs/metrics.md"
    used = set()
    with open(os.path.join(REPO, "dashboards", "xknock.json")) as f:
        used |= set(re.findall(r"\bxknock_[a-z_]+", f.read()))
    with open(os.path.join(REPO, "dashboards", "alerts.yml")) as f:
        used |= set(re.findall(r"\bxknock_[a-z_]+\b", f.read()))
    unknown = {n for n in used if n not in exposed and n not in families} - {"xknock_"}
    assert not unknown, f"dashboards use metrics no scrape yields: {sorted(unknown)}"


# --- the HTTP endpoint and the CLI ------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9798", ("127.0.0.1", 9798)),
    ("[::1]:9798", ("::1", 9798)),
    (":9798", ("0.0.0.0", 9798)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_addr(text, expected):
    assert metrics.parse_addr(text) == expected


@pytest.mark.parametrize("text,message", [
    ("9798", "expected HOST:PORT"),
    ("localhost", "expected HOST:PORT"),
    ("127.0.0.1:0", "not a number from 1 to 65535"),
    ("127.0.0.1:70000", "not a number from 1 to 65535"),
    ("127.0.0.1:http", "not a number from 1 to 65535"),
    ("::1:9798", "IPv6 address in brackets"),
    ("[::1]9798", "expected HOST:PORT"),
    ("[foo]:9798", "not an IPv6 address"),
    ("", "expected HOST:PORT"),
])
def test_parse_addr_refuses_with_a_reason(text, message):
    with pytest.raises(XknockError, match=re.escape(message)):
        metrics.parse_addr(text)


def test_metrics_server_serves_the_collector_and_releases_its_port(xk, example_config):
    server = metrics.MetricsServer("127.0.0.1", 0)
    try:
        server.start(xk.maps, [IFACE], example_config)
        xk.run(tcp(STRANGER, 22))
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}
    key = ("xknock_packets_total", (("iface", IFACE), ("reason", "drop_no_grant"), ("verdict", "drop")))
    assert samples[key] == 1
    assert samples[("xknock_config_last_reload_success", ())] == 1
    assert any(name.startswith("process_") for name, _ in samples)
    with contextlib.closing(socket.socket()) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # past the served connection's TIME_WAIT
        s.bind(("127.0.0.1", server.port))
        s.listen()                                                # nobody listens there any more


def test_a_busy_address_is_one_clear_error():
    with contextlib.closing(socket.socket()) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(XknockError, match=rf"--metrics-addr 127.0.0.1:{port}: cannot listen there: .*in use"):
            metrics.MetricsServer("127.0.0.1", port)


@pytest.mark.parametrize("addr,message", [
    ("bogus", "xknock: --metrics-addr 'bogus': expected HOST:PORT"),
    ("no-such-host.invalid:9798", "xknock: --metrics-addr no-such-host.invalid:9798: cannot listen there: "),
])
def test_attach_refuses_a_bad_metrics_addr_before_attaching(tmp_path, addr, message):
    config = tmp_path / "x.toml"
    config.write_text('[[sequence]]\nname = "ssh"\nknock = ["udp:7000", "udp:8000", "udp:9000"]\nopen = ["tcp:22"]\n')
    # In a network namespace of its own: whatever happens, nothing is attached here.
    result = subprocess.run(["unshare", "--net", XKNOCK, "attach", "lo", "-c", str(config), "--metrics-addr", addr],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_gives_an_example_port_and_says_it_is_not_registered():
    result = subprocess.run([XKNOCK, "attach", "--help"], capture_output=True, text=True, timeout=30)
    text = " ".join(result.stdout.split())
    assert "--metrics-addr" in text and "9798" in text
    assert "not a registered port" in text and "conventional" not in text


def test_dashboard_is_valid_json_with_its_variables():
    with open(os.path.join(REPO, "dashboards", "xknock.json")) as f:
        dashboard = json.load(f)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "iface"} <= set(variables)
    assert variables["job"]["definition"] == "label_values(xknock_controller_info, job)"
    assert 'job=~"$job"' in variables["instance"]["definition"] and 'job=~"$job"' in variables["iface"]["definition"]
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Bans", "Live bans", "Ban changes", "Controller CPU", "Controller memory", "Hooks"} <= titles
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: no $instance selector"
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], f"{panel['title']}: no $job selector"
            assert 'job="' not in target["expr"], f"{panel['title']}: a job name written in"
