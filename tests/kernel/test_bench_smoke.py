"""Every benchmark runs once at tiny sizes, so that none of them rots: the
data path, the control plane, the side-by-side peers (knockd, fwknopd,
nftables ingress) and the answers (bench/answers.py), through `bench/run
report --quick`, which also draws the report's figures. Timings are never
asserted: speed is measured by bench/run, not by tests."""

import glob
import os
import subprocess
import sys
from repo_paths import REPO

ROOT = REPO


def test_every_benchmark_runs_quick(tmp_path):
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               XKNOCK_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "report", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    report = (tmp_path / "latest-report.md").read_text()
    for section in ("unguarded pass", "attach", "## xknock and knockd side by side",
                    "## xknock and nftables (netdev ingress)", "## SPA: fwknopd",
                    "## SPA: the controller's cost per candidate", "## Traffic generator",
                    "## Answers: xknock's XDP answers beside the kernel's own", "### The timing tell"):
        assert section in report, section
    # Each peer really ran: its rows carry numbers, not only headers.
    assert "| plain sender | 3/3 |" in report
    assert "| fwknopd | none | - |" in report
    assert "| SYN to a guarded port, IPv4 | " in report and "(TX, TCP RA)" in report
    assert "| bridge, unthrottled | kernel stack |" in report
    assert (tmp_path / "latest-answers.md").exists()
    figures = {os.path.basename(p) for p in glob.glob(str(tmp_path / "report-*" / "*.png"))}
    assert {"scaling-sources.png", "scaling-allow.png", "scaling-sequences.png", "knockd-latency.png",
            "knockd-steps.png", "nft-ingress.png", "spa-latency.png"} <= figures
    for name in figures:
        assert f"/{name})" in report


def test_the_spa_cost_benchmark_runs_quick():
    # In process, no lab: what config/spa_config.py's default total_rate is derived from.
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "spa-verify", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "| 16 | " in result.stdout and "µs per stanza" in result.stdout


def test_the_bpftool_harness_runs_quick(tmp_path):
    """bpftool prog run on the attached program beside the empty one: every
    common path has its row, with the verdict the policy gives it."""
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               XKNOCK_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "bpftool", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "latest-bpftool.md").read_text()
    for path, verdict in (("unguarded TCP pass", "PASS"), ("guarded drop", "DROP"), ("granted pass", "PASS"),
                          ("allow-list pass", "PASS"), ("deny-list drop", "DROP")):
        assert f"| {path} | " in text and text.split(f"| {path} | ")[1].split("\n")[0].endswith(f"| {verdict} |")


def test_the_cluster_benchmark_runs_quick(tmp_path):
    """Three nodes (the real program's maps, the product's ClusterNode, each
    a process) and a real three-member etcd: both variants measured, every
    grant arrived on both other nodes, the resync wrote every grant."""
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               XKNOCK_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "cluster", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    text = (tmp_path / "latest-cluster.md").read_text()
    for section in ("### Churn: 1000 grants a second made on node A", "### Flat out", "### SPA packets",
                    "### Resync"):
        assert section in text, section
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| batched |", "| one per txn"))]
    assert len(rows) == 6, text
    churn = [row for row in rows if len(row) == 11]
    assert [row[6] for row in churn] == ["0", "0"], text   # not arrived: none, in either variant
    for variant in ("in batches of 1,000", "one by one (before)"):   # resynced: every grant in the maps, both ways
        [row] = [line for line in text.splitlines() if line.startswith(f"| {variant} | 10,000 | ")]
        assert row.endswith("| 10,000 |"), text


def test_the_lists_benchmark_runs_quick_beside_a_revision(tmp_path):
    """bench/run lists --against=REV: both trees' rows, lists, memory, attach."""
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               XKNOCK_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "lists", "--quick", "--against=HEAD"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    text = (tmp_path / "latest-lists.md").read_text()
    assert "| what | this tree | HEAD | this / HEAD |" in text
    for row in ("`xknock top` lists", "`xknock status`", "foreground controller VmRSS", "import xknock.cli.main",
                "serving controller VmRSS: + an SPA packet accepted"):
        assert f"| {row}" in text, row
