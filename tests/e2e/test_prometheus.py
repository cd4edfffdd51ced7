"""The metrics, the dashboard and the alert rules against a real Prometheus.

A namespace lab; in the server's namespace a foreground controller
(`xknock attach IFACE --metrics-addr 127.0.0.1:9798`) and a Prometheus server
scraping it every second with dashboards/alerts.yml loaded. Both listen on the
namespace's own loopback (ports there are free by construction), which the
host cannot reach, so every HTTP request is made from inside the namespace by
a small helper. The attacker knocks wrongly and tries the guarded port; the
client knocks and connects. Then every PromQL expression of every dashboard
panel, template variable and alert rule goes through Prometheus' HTTP API.

Needs the `prometheus` Debian package (prometheus and promtool); without it
the module is skipped, loudly.
"""

import json
import os
import re
import shutil
import signal
import subprocess

import bcrypt
import pytest
from tls_helpers import make_certs

from xknock_dev.e2e import (
    XKNOCK, LineReader, TcpEchoServer, check, config_text, knock, status_json, write_config, xknock,
)
from xknock_dev.etcd import EtcdCluster
from xknock_dev.lab import HELPER_PYTHON, can_connect, lab, stop_process, wait_for
from repo_paths import REPO

pytestmark = pytest.mark.netns

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if not (PROMETHEUS and PROMTOOL):
    pytest.skip("PROMETHEUS IS NOT INSTALLED: the dashboard and alert rules are NOT checked against a real "
                "Prometheus. Install the Debian package `prometheus` (it brings prometheus and promtool).",
                allow_module_level=True)

DASHBOARD = os.path.join(REPO, "dashboards", "xknock.json")
ALERTS = os.path.join(REPO, "dashboards", "alerts.yml")
METRICS_PORT = 9798
PROMETHEUS_PORT = 9090
GUARDED, UNGUARDED = 22, 80
SEQUENCE = ("tcp:7000", "udp:8000", "tcp:9000")
# Grafana's macros and the dashboard's variables, as "All" selects them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$job": "xknock", "$instance": ".*",
                     "$iface": ".*"}

# The controller serves its metrics over TLS behind basic auth
# (--metrics-web-config), and Prometheus scrapes it so.
SCRAPER = ("prometheus", "scrape pass")

# GET requests (path, params) given as JSON on stdin, made from inside the
# namespace; prints [{"status": ..., "body": ...}] (bodies as JSON when they are).
# argv: the base URL, then for https the CA file and optionally "user:password".
HTTP_HELPER = r"""
import base64, json, ssl, sys, urllib.error, urllib.parse, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
out = []
for path, params in json.load(sys.stdin):
    url = sys.argv[1] + path + ("?" + urllib.parse.urlencode(params) if params else "")
    request = urllib.request.Request(url)
    if len(sys.argv) > 3:
        request.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[3].encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    except OSError as e:
        status, body = 0, str(e)
    try:
        body = json.loads(body)
    except ValueError:
        pass
    out.append({"status": status, "body": body})
print(json.dumps(out))
"""


class Stack:
    def __init__(self, net, config_path, controller, prometheus, log_path, ca_file):
        self.net = net
        self.ca_file = ca_file
        self.config_path = config_path
        self.controller = controller
        self.controller_log = LineReader(controller.stderr)
        self.prometheus = prometheus
        self.prometheus_log = log_path

    def get(self, requests, port=PROMETHEUS_PORT, auth=":".join(SCRAPER)):
        """From Prometheus over HTTP; from the controller over TLS, with auth ("user:password" or None)."""
        argv = [f"http://127.0.0.1:{port}"]
        if port == METRICS_PORT:
            argv = [f"https://127.0.0.1:{port}", self.ca_file] + ([auth] if auth else [])
        result = self.net.server.run([HELPER_PYTHON, "-c", HTTP_HELPER, *argv],
                                     input=json.dumps(requests), timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def queries(self, expressions):
        """{expression: the API's answer} for instant queries, in one helper run."""
        answers = self.get([["/api/v1/query", {"query": expr}] for expr in expressions])
        return {expr: answer["body"] for expr, answer in zip(expressions, answers)}

    def query(self, expr):
        body = self.queries([expr])[expr]
        assert isinstance(body, dict) and body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr):
        """The single value of expr, or None when it returns nothing."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None

    def diagnostics(self):
        with open(self.prometheus_log) as f:
            prom = f.read()[-3000:]
        return f"controller log:\n{self.controller_log.read_all(0.2)}\nprometheus log:\n{prom}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    with lab("xkprom") as net:
        echo = TcpEchoServer(net.server, GUARDED, UNGUARDED)
        # A one-member etcd in the server's namespace: the controller is a
        # cluster node, so that the dashboard's Cluster row has data too.
        etcd = EtcdCluster.on_hosts(workdir, [net.server])
        try:
            etcd.start(timeout=60)
        except BaseException:
            etcd.stop()
            echo.stop()
            raise
        cluster = f'\n[cluster]\nendpoints = ["{etcd.endpoints[0]}"]\nnode = "prom"\n'
        config_path = write_config(workdir, "xknock.toml", config_text(knock=SEQUENCE) + cluster)
        certs = make_certs(workdir)
        hashed = bcrypt.hashpw(SCRAPER[1].encode(), bcrypt.gensalt(4)).decode()
        (workdir / "web.yml").write_text(f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                         f"basic_auth_users:\n  {SCRAPER[0]}: {hashed}\n")
        controller = net.server.popen(
            [XKNOCK, "attach", net.server_iface, "-c", config_path, "--metrics-addr", f"127.0.0.1:{METRICS_PORT}",
             "--metrics-web-config", str(workdir / "web.yml")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        prom_config = os.path.join(workdir, "prometheus.yml")
        with open(prom_config, "w") as f:
            json.dump({   # JSON is YAML
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [ALERTS],
                "scrape_configs": [{"job_name": "xknock", "scheme": "https",
                                    "tls_config": {"ca_file": str(certs / "ca.crt")},
                                    "basic_auth": {"username": SCRAPER[0], "password": SCRAPER[1]},
                                    "static_configs": [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]}],
            }, f)
        log_path = os.path.join(workdir, "prometheus.log")
        with open(log_path, "w") as log:
            prometheus = net.server.popen(
                [PROMETHEUS, f"--config.file={prom_config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        built = Stack(net, config_path, controller, prometheus, log_path, str(certs / "ca.crt"))
        try:
            served = built.controller_log.wait_for(lambda line: "serving metrics" in line, timeout=30)
            assert served, f"the controller does not serve metrics:\n{built.diagnostics()}"
            assert wait_for(lambda: built.get([["/-/ready", None]])[0]["status"] == 200, timeout=20, interval=0.2), \
                f"Prometheus is not ready:\n{built.diagnostics()}"
            # Two scrapes before any traffic, so that rates see it arrive.
            assert wait_for(lambda: (built.value("count_over_time(xknock_scrape_success[1m])") or 0) >= 2,
                            timeout=20, interval=0.3), \
                f"Prometheus does not scrape the controller:\n{built.diagnostics()}"
            yield built
        finally:
            stop_process(prometheus)
            stop_process(controller)
            etcd.stop()
            echo.stop()
            xknock(net.server, "detach", net.server_iface)


@pytest.fixture(scope="module")
def traffic(stack):
    """The attacker is turned away, the client knocks and connects; returns
    once Prometheus has scraped it all, twice over."""
    net = stack.net
    server = net.server.ipv4
    for _ in range(3):
        assert not can_connect(net.attacker, server, GUARDED, timeout=0.3)
    knock(net.attacker, server, "tcp:7000", "tcp:9000", delay=0.05)          # a reset
    knock(net.client, server, *SEQUENCE, delay=0.05)
    assert can_connect(net.client, server, GUARDED, timeout=3.0)
    assert wait_for(lambda: stack.value("xknock_grants_live") == 1
                    and (stack.value('sum(xknock_packets_total{reason="pass_grant"})') or 0) > 0,
                    timeout=10, interval=0.3), stack.diagnostics()
    ingested = stack.value('count_over_time(xknock_scrape_success[1h])')
    assert wait_for(lambda: stack.value('count_over_time(xknock_scrape_success[1h])') >= ingested + 2, timeout=10,
                    interval=0.3)
    return stack


def panel_expressions():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["refId"], target["expr"]))
    return found


def variable_queries():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [(v["name"], v["definition"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]


def alert_rules(stack):
    """The rules of dashboards/alerts.yml as Prometheus loaded them (name, query,
    duration, labels, annotations, health), once each has been evaluated."""
    def evaluated():
        [answer] = stack.get([["/api/v1/rules", None]])
        loaded = [r for g in answer["body"]["data"]["groups"] for r in g["rules"]]
        return loaded if loaded and all(r["health"] != "unknown" for r in loaded) else None

    rules = wait_for(evaluated, timeout=10, interval=0.5)
    assert rules, f"Prometheus did not load and evaluate {ALERTS}:\n{stack.diagnostics()}"
    return rules


def grafana(expr):
    for name, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, replacement)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


def test_promtool_checks_the_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", ALERTS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_a_scrape_of_the_controller(traffic):
    [answer] = traffic.get([["/metrics", None]], port=METRICS_PORT)
    assert answer["status"] == 200
    body = answer["body"]
    assert "xknock_packets_total" in body
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_over_tls_with_basic_auth_and_nobody_else_gets_in(traffic):
    served = traffic.controller_log.read_all(0.2)
    assert "serving metrics url=https://127.0.0.1:9798/metrics basic_auth_users=1" in served, served
    assert traffic.value('up{job="xknock"}') == 1
    [anonymous, wrong] = (traffic.get([["/metrics", None]], port=METRICS_PORT, auth=auth)[0]
                          for auth in (None, f"{SCRAPER[0]}:wrong"))
    assert anonymous["status"] == 401 and wrong["status"] == 401


def test_every_dashboard_panel_query_returns_data(traffic):
    panels = panel_expressions()
    assert len(panels) >= 20
    answers = traffic.queries([grafana(expr) for _, _, expr in panels])
    for title, ref, expr in panels:
        body = answers[grafana(expr)]
        assert isinstance(body, dict) and body.get("status") == "success", f"panel {title!r} {ref}: {body}"
        assert body["data"]["result"], f"panel {title!r} {ref} returns no data: {expr}\n{traffic.diagnostics()}"


def test_dashboard_variables_find_the_instance_and_the_interface(traffic):
    found = {}
    for name, definition in variable_queries():
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
        assert match, f"variable {name}: {definition}"
        series = traffic.query(grafana(match.group(1)))
        found[name] = {s["metric"].get(match.group(2)) for s in series}
    assert found == {"job": {"xknock"}, "instance": {f"127.0.0.1:{METRICS_PORT}"},
                     "iface": {traffic.net.server_iface}}


def test_dashboard_values_are_sane_after_the_traffic(traffic):
    s = traffic
    iface = f'iface="{s.net.server_iface}"'
    assert s.value(f'sum(rate(xknock_packets_total{{{iface}, reason="drop_no_grant"}}[1m]))') > 0, \
        "the attacker's dropped SYNs do not show as a drop rate"
    assert s.value(f'sum(rate(xknock_packets_total{{{iface}, verdict="drop"}}[1m]))') > 0
    assert s.value(f'sum(rate(xknock_packets_total{{{iface}, reason="pass_grant"}}[1m]))') > 0
    assert s.value(f'xknock_knocks_total{{{iface}, sequence="ssh", result="completed"}}') == 1
    assert s.value(f'xknock_knocks_total{{{iface}, sequence="ssh", result="reset"}}') == 1
    assert s.value(f'increase(xknock_knocks_total{{{iface}, sequence="ssh", result="completed"}}[1m])') > 0
    assert s.value('xknock_grants_live') == 1
    assert s.value('xknock_grants_created_total') == 1
    assert s.value('xknock_scrape_success') == 1
    assert s.value('xknock_config_last_reload_success') == 1
    assert 0 < s.value('time() - xknock_config_last_reload_timestamp_seconds') < 120
    assert 0 <= s.value('max(xknock_scrape_duration_seconds)') < 0.5
    for series in s.query('xknock_map_entries / xknock_map_capacity_entries'):
        assert 0 <= float(series["value"][1]) <= 1, series
    [info] = s.query('xknock_filter_info')
    [running] = status_json(s.net.server)
    [attached] = running["interfaces"]
    assert info["metric"]["prog_id"] == str(attached["prog_id"])
    assert info["metric"]["xdp_mode"] == attached["xdp_mode"]
    assert info["metric"]["mode"] == "enforce" and info["metric"]["device"] == s.net.server_iface
    [controller] = s.query('xknock_controller_info')
    import importlib.metadata

    assert controller["metric"]["version"] == importlib.metadata.version("xknock")


def test_every_alert_rule_evaluates_and_none_fires_while_all_is_well(traffic):
    rules = alert_rules(traffic)
    with open(ALERTS) as f:
        assert len(rules) == f.read().count("- alert: ")
    assert {r["name"] for r in rules} >= {"XknockControllerDown", "XknockFilterDetached", "XknockMapNearlyFull",
                                          "XknockKnockFailureSurge", "XknockReloadFailed", "XknockControllerFlapping",
                                          "XknockMonitorModeLeftOn", "XknockBanFailures", "XknockEventsLost",
                                          "XknockSpaRefusalSurge"}
    with open(os.path.join(REPO, "docs", "runbook.md")) as f:
        runbook = f.read()
    answers = traffic.queries([r["query"] for r in rules])
    for rule in rules:
        name = rule["name"]
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        body = answers[rule["query"]]
        assert isinstance(body, dict) and body.get("status") == "success", f"{name}: {body}"
        assert body["data"]["result"] == [], f"{name} fires on a healthy controller: {body['data']}"
        assert rule["state"] == "inactive", rule
        assert rule["labels"].get("severity") in ("critical", "warning"), rule
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule
        assert f"runbook.md#{name.lower()}" in rule["annotations"]["description"], name
        assert rule["annotations"].get("runbook_url", "").endswith(f"/docs/runbook.md#{name.lower()}"), name
        assert f"\n## {name}\n" in runbook, f"docs/runbook.md has no section for {name}"
        assert rule["duration"] > 0, f"{name} has no `for`"


def test_a_refused_reload_and_a_detached_filter_fire_their_alerts(traffic):
    """Last, since it breaks the controller's config and detaches its filter."""
    s = traffic
    with open(s.config_path, "w") as f:
        f.write('[[sequence]]\nname = "ssh"\nknock = ["tcp:70000"]\n')
    s.controller.send_signal(signal.SIGHUP)
    assert s.controller_log.wait_for(lambda line: "reload refused" in line, timeout=10), s.diagnostics()
    rules = {r["name"]: r["query"] for r in alert_rules(s)}
    reload_failed = rules["XknockReloadFailed"]
    assert wait_for(lambda: s.query(reload_failed), timeout=10, interval=0.3), "XknockReloadFailed does not fire"

    check(xknock(s.net.server, "detach", s.net.server_iface))
    detached = rules["XknockFilterDetached"]
    fired = wait_for(lambda: s.query(detached), timeout=10, interval=0.3)
    assert fired, f"XknockFilterDetached does not fire after a detach:\n{s.diagnostics()}"
    assert fired[0]["metric"]["device"] == s.net.server_iface
    # The controller still answers and still counts: only the filter is gone.
    assert s.value('up{job="xknock"}') == 1


def test_the_controller_stops_cleanly_with_its_metrics_server(traffic):
    """Last: SIGTERM ends the controller, its metrics server and sampler with it."""
    traffic.controller.send_signal(signal.SIGTERM)
    assert traffic.controller.wait(15) == 0
    log = traffic.controller_log.read_all(2)
    assert "the filter stays attached and enforcing" in log and "Traceback" not in log, log
    [answer] = traffic.get([["/metrics", None]], port=METRICS_PORT)
    assert answer["status"] == 0, "the metrics port still answers after the controller stopped"
