"""Every benchmark runs once at tiny sizes, so that none of them rots.
Timings are never asserted: speed is measured by bench/run, not by tests."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_benchmark_runs_quick(tmp_path):
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               XKNOCK_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "all", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unguarded pass" in result.stdout
    assert "attach" in result.stdout
    assert "Traceback" not in result.stderr
