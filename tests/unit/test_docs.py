"""The README and docs/ say what the code does: every `xknock ...` command they
show names a real command and only options its --help lists, the configs they
check pass `xknock check`, and the facts they repeat (Python version, metric
labels, the live-grants formula, status lines) are the code's."""

import functools
import glob
import os
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest
from xknock_dev.e2e import XKNOCK
from repo_paths import REPO

DOCS = sorted([os.path.join(REPO, "README.md"), os.path.join(REPO, "vagrant", "README.md"),
               *glob.glob(os.path.join(REPO, "docs", "*.md"))])
GROUP_OPTIONS = {"--log-format": 1, "-v": 0, "--verbose": 0, "--version": 0, "-h": 0, "--help": 0}
# Where a shell line ends: the command is before it.
SHELL_END = re.compile(r"\s(?:#|&&|\|\||\||;|>|<)(?:\s|$)|[`)]")


def read(path):
    with open(path) as f:
        return f.read()


def documented_commands():
    """(file, line, argv after `xknock`) for every xknock command line in a
    fenced block (not TOML or JSON) or an inline code span of the docs."""
    found = []
    for path in DOCS:
        text = read(path)
        name = os.path.relpath(path, REPO)
        snippets = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
                    if lang not in ("toml", "json")]
        outside = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
        # Inline spans that are a command, not prose that names xknock.
        snippets += [span for span in re.findall(r"`([^`\n]+)`", outside) if re.match(r"(sudo )?\S*xknock ", span)]
        for snippet in snippets:
            for line in snippet.splitlines():
                for match in re.finditer(r"(?:^|[\s/])xknock ((?:-|[a-z]).*)", line):
                    rest = SHELL_END.split(" " + match.group(1), maxsplit=1)[0]
                    try:
                        argv = shlex.split(rest)
                    except ValueError:
                        argv = rest.split()
                    if argv:
                        found.append((name, line.strip(), argv))
    return found


COMMANDS = documented_commands()


@functools.cache
def help_of(*command):
    result = subprocess.run([XKNOCK, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"xknock {' '.join(command)} --help: {result.stderr}"
    return result.stdout


def options_of(*command):
    options = help_of(*command).split("Options:")[1].split("\n\n  Example")[0]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", options))


def subcommands_of(*command):
    text = help_of(*command)
    if "Commands:" not in text:
        return set()
    return set(re.findall(r"^  ([a-z][\w-]*)\s", text.split("Commands:")[1], re.MULTILINE))


def split_command(argv):
    """(the command path, e.g. ("import", "knockd"), and the rest), past the group's own options."""
    i = 0
    while i < len(argv) and argv[i] in GROUP_OPTIONS:
        i += 1 + GROUP_OPTIONS[argv[i]]
    path = []
    while i < len(argv) and argv[i] in subcommands_of(*path):
        path.append(argv[i])
        i += 1
    return tuple(path), argv[i:]


def test_the_docs_show_commands():
    assert len(COMMANDS) > 50
    used = {split_command(argv)[0][:1] for _, _, argv in COMMANDS}
    assert {("attach",), ("check",), ("diff",), ("reload",), ("status",)} <= used


@pytest.mark.parametrize("where, line, argv", COMMANDS, ids=[f"{w}: {l}" for w, l, _ in COMMANDS])
def test_a_documented_command_exists_with_its_options(where, line, argv):
    path, rest = split_command(argv)
    if not path:
        assert argv[0] in GROUP_OPTIONS or argv[0] == "...", f"{where}: `{line}`: no command xknock {argv[0]}"
        return
    assert not subcommands_of(*path) or rest[:1] in ([], ["..."]) or rest[0].startswith("-"), \
        f"{where}: `{line}`: xknock {' '.join(path)} has no command {rest[0]}"
    known = options_of(*path)
    for token in rest:
        option = token.split("=", 1)[0]
        if re.fullmatch(r"--?[A-Za-z][\w-]*", option):
            assert option in known, f"{where}: `{line}`: xknock {' '.join(path)} has no option {option}"


# --- configs the docs check --------------------------------------------------

def documented_configs():
    """The repository's example configs: vagrant's, and configuration.md's Example."""
    text = read(os.path.join(REPO, "docs", "configuration.md"))
    example = re.search(r"^## Example\n.*?^```toml\n(.*?)^```", text, re.DOTALL | re.MULTILINE).group(1)
    return {"vagrant/xknock.toml": read(os.path.join(REPO, "vagrant", "xknock.toml")),
            "docs/configuration.md Example": example}


@pytest.mark.parametrize("name", documented_configs())
def test_a_documented_config_passes_check(tmp_path, name):
    path = tmp_path / "x.toml"
    path.write_text(documented_configs()[name])
    path.chmod(0o600)
    result = subprocess.run([XKNOCK, "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# --- facts the docs repeat ---------------------------------------------------

def test_the_python_the_readme_asks_for_is_the_one_pyproject_needs():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        needed = tomllib.load(f)["project"]["requires-python"]
    version = re.fullmatch(r">=(3\.\d+)", needed).group(1)
    requirements = read(os.path.join(REPO, "README.md")).split("## Requirements")[1].split("\n## ")[0]
    assert f"Python {version}" in requirements
    assert "22.04+" not in requirements   # Ubuntu 22.04's Python is 3.10: not a supported system


def label_values(label):
    text = read(os.path.join(REPO, "docs", "metrics.md")).split("## Labels")[1].split("\n## ")[0]
    row = re.search(rf"^\| `{label}` \|(.*)\|$", text, re.MULTILINE).group(1)
    return set(re.findall(r"`(\w+)`", row.split("(")[0] if label == "reason" else row))


def test_metrics_md_lists_every_label_value():
    from xknock.controller.daemon import metrics
    from xknock.controller.kernel import layout

    reasons = {r.name.lower() for r in layout.Reason if layout.is_verdict(r)}
    assert label_values("reason") == reasons
    assert label_values("map") == set(metrics.SAMPLED_MAPS)
    results = (set(metrics.KNOCK_RESULTS) | set(metrics.KNOCK_EVENTS) | set(metrics.SPA_CANDIDATES)
               | set(metrics.SPA_VERDICTS) | set(metrics.ANSWERS) | set(metrics.HOOK_RESULTS))
    assert label_values("result") == results


LIVE_GRANTS = "created + operator + SPA − expired − removed"


def test_the_live_grants_formula_is_written_one_way():
    source = read(os.path.join(REPO, "controller", "daemon", "collector.py"))
    help_text = re.search(r'"xknock_grants_live",\s*((?:"[^"]*"\s*)+)', source).group(1)
    assert "operator" in help_text and "SPA" in help_text, help_text
    for doc in ("architecture.md", "metrics.md"):
        text = read(os.path.join(REPO, "docs", doc))
        assert LIVE_GRANTS in text, doc
        assert "created + operator −" not in text and "count as created" not in text, doc


# The filter operations.md's "Reading status" shows: its block must be what
# `xknock status` prints for it.
STATUS_EXAMPLE = {
    "interfaces": [{"name": "eth0", "xdp_mode": "native", "prog_id": 2272}],
    "mode": "enforce", "strict": True, "answer": "closed",
    "guarded": ["tcp:22"], "spa_ports": [],
    "sequences": [{"name": "ssh", "knock": ["tcp:7000", "udp:8000", "tcp:9000"], "open": ["tcp:22"],
                   "step_timeout_s": 2.0, "open_for_s": 30.0, "idle_timeout_s": 60.0}],
    "counters": {"pass_not_ip": 3, "pass_unguarded": 2, "pass_other_l4": 6, "drop_knock": 10, "drop_no_grant": 0,
                 "knock_advanced": 6, "knock_completed": 2, "knock_reset": 2, "grant_issued": 2, "grant_created": 1,
                 "answer_by_host": 10},
    "grants": [{"source": "10.77.0.2", "port": "tcp:22", "sequence": "ssh", "window_left_s": 27.9,
                "idle_left_s": 57.9}],
    "bans": [], "knocks_in_progress": 0, "knocks": [],
    "controller": {"pid": 812, "version": "0.1.0", "config": "/etc/xknock/xknock.toml",
                   "config_hash": "3f9c2a7d1e8b4c60", "started_at": 1795511523,
                   "last_reload": {"ok": True, "at": 1795530641}},
}


def test_the_status_shown_in_operations_md_is_what_status_prints(monkeypatch):
    import time

    from xknock.cli.status import _render

    text = read(os.path.join(REPO, "docs", "operations.md")).split("## Reading status")[1]
    shown = re.search(r"^```\n(.*?)^```", text, re.DOTALL | re.MULTILINE).group(1)
    monkeypatch.setenv("TZ", "UTC")   # the times as the docs show them
    time.tzset()
    try:
        rendered = _render(STATUS_EXAMPLE)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert shown == rendered + "\n"


def test_the_runbook_fixes_the_service_with_systemd():
    """The controller runs as xknock@IFACE (docs/operations.md): the runbook
    restarts and reads it with systemctl and journalctl, not by hand."""
    runbook = read(os.path.join(REPO, "docs", "runbook.md"))
    assert "pgrep" not in runbook
    assert "systemctl restart xknock@IFACE" in runbook and "journalctl -u xknock@IFACE" in runbook
    for line, argv in ((line, argv) for where, line, argv in COMMANDS if where == "docs/runbook.md"):
        if argv[0] == "attach":
            assert "--once" in argv, f"`{line}`: a second controller beside the unit's"


def test_icmp_knocks_are_not_said_to_need_root():
    """They fall back to a ping socket (controller/client/knockclient.py)."""
    text = " ".join(help_of("knock").split())
    assert "needs root for ICMP" not in text and "ping socket" in text


def test_the_warnings_configuration_md_lists_are_the_loaders():
    """Each row's message, cut at its placeholders, is in controller/config's source."""
    source = "".join(read(p) for p in glob.glob(os.path.join(REPO, "controller", "config", "*.py")))
    source = re.sub(r"""["']\s*\n\s*f?["']""", "", source)   # strings continued on the next line
    table = read(os.path.join(REPO, "docs", "configuration.md")).split("## Warnings")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (`.*?) \| .* \|$", table, re.MULTILINE)
    assert len(rows) >= 8
    for row in rows:
        for message in re.findall(r"`([^`]+)`", row):
            for piece in re.split(r'\.\.\.|"[^"]*"|\b[ijN]\b|\[[ij]\]', message):
                piece = piece.strip(" ;,:()")
                if len(piece.split()) >= 2:
                    assert piece in source, f"configuration.md warns {message!r}: {piece!r} is not in the loader"


# --- the alert rules, read as a file (tests/e2e/test_prometheus.py evaluates them) ---------

ALERTS = os.path.join(REPO, "dashboards", "alerts.yml")
RUNBOOK_BASE = "file:///opt/xknock/src/docs/runbook.md"


def alert_rules(text=None):
    import yaml

    rules = yaml.safe_load(text if text is not None else read(ALERTS))
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_every_alert_is_of_mixin_grade():
    """severity, summary, description, a runbook_url to its own section, a `for`."""
    runbook = read(os.path.join(REPO, "docs", "runbook.md"))
    rules = alert_rules()
    assert len(rules) >= 13
    for rule in rules:
        name, annotations = rule["alert"], rule["annotations"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name
        assert f"docs/runbook.md#{name.lower()}" in annotations["description"], name
        assert f"\n## {name}\n" in runbook, f"docs/runbook.md has no section for {name}"
        assert rule.get("for"), f"{name} has no `for`"
    sections = set(re.findall(r"^## (Xknock\w+)$", runbook, re.MULTILINE))
    assert sections == {rule["alert"] for rule in rules}, "runbook sections without an alert, or alerts without one"


def test_the_alerts_cover_what_issue_19_asks_for():
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    for metric in ("xknock_events_lost_total", "xknock_ban_failures_total", 'mode="monitor"',
                   "process_start_time_seconds", 'result=~"bad_hmac|replayed"'):
        assert any(metric in expr for expr in expressions.values()), metric


def test_only_controller_down_names_the_job():
    named = [rule["alert"] for rule in alert_rules() if "job=" in rule["expr"]]
    assert named == ["XknockControllerDown"]


def test_alert_descriptions_fix_the_service_with_systemd():
    for rule in alert_rules():
        text = " ".join(rule["annotations"]["description"].split())
        assert "pgrep" not in text and "kill -HUP" not in text, rule["alert"]
        for attach in re.findall(r"`xknock attach[^`]*`", text):
            assert "--once" in attach, f"{rule['alert']}: {attach}: a second controller beside the unit's"
        if any(word in text for word in ("restart", "reload", "log")):
            assert "systemctl" in text or "journalctl" in text, rule["alert"]


def test_scripts_alerts_renders_another_job_and_runbook(tmp_path):
    out = tmp_path / "rules.yml"
    result = subprocess.run([os.path.join(REPO, "scripts", "alerts"), "--job", "xk-edge", "--runbook-url",
                             "https://git.example.org/xknock/docs/runbook.md", "-o", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = out.read_text()
    assert 'job="xknock"' not in rendered and 'up{job="xk-edge"} == 0' in rendered
    rules = alert_rules(rendered)
    assert [r["annotations"]["runbook_url"] for r in rules] == \
        [f"https://git.example.org/xknock/docs/runbook.md#{r['alert'].lower()}" for r in rules]
    assert [r["expr"].replace('"xk-edge"', '"xknock"') for r in rules] == [r["expr"] for r in alert_rules()]
    promtool = shutil.which("promtool")
    if promtool:
        check_result = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, text=True,
                                      timeout=60)
        assert check_result.returncode == 0, check_result.stdout + check_result.stderr
    refused = subprocess.run([os.path.join(REPO, "scripts", "alerts"), "--runbook-url", "https://x/y#z"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "#fragment" in refused.stderr
