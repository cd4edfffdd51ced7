"""Which build of xknock runs: its version and the source revision it was
made from, for `xknock --version` and the xknock_build_info metric.

A copy install (scripts/setup's runtime profile) records the revision at
install time in the venv (xknock-build.json), the Debian package in its
dist-info (xknock_dev/debian.py); an editable install reads it from its
checkout, as it is now (-dirty when files differ from the commit)."""

import functools
import importlib.metadata
import json
import os
import subprocess
import sys

BUILD_FILE = "xknock-build.json"


def version():
    try:
        return importlib.metadata.version("xknock")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def revision():
    recorded = os.path.join(sys.prefix, BUILD_FILE)
    try:
        with open(recorded) as f:
            return str(json.load(f)["revision"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return str(json.loads(importlib.metadata.distribution("xknock").read_text(BUILD_FILE))["revision"])
    except (importlib.metadata.PackageNotFoundError, TypeError, ValueError, KeyError):
        pass
    return _checkout_revision(os.path.dirname(os.path.abspath(__file__)))


def _checkout_revision(directory):
    def git(*args):
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")
