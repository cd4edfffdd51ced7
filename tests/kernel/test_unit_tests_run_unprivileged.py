"""tests/unit needs no root: run it as user nobody (this test itself needs
root to switch users) and check that it passes and runs tests at all."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

from repo_paths import REPO, TESTS


def test_unit_tests_pass_as_nobody():
    home = tempfile.mkdtemp(prefix="xknock-nobody-")   # not under pytest's root-only basetemp
    try:
        shutil.chown(home, "nobody", "nogroup")
        env = dict(os.environ, HOME=home, PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
             sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", os.path.join(home, "tmp"),
             os.path.join(TESTS, "unit")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, f"tests/unit as nobody: {summary}\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    assert "failed" not in summary and "error" not in summary, summary
