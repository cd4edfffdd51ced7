"""Which build runs (controller/daemon/build.py): `xknock --version` and
xknock_build_info name the version and the source revision."""

import json
import os
import subprocess
import sys

from xknock.controller.daemon import build
from repo_paths import REPO

XKNOCK = os.path.join(os.path.dirname(sys.executable), "xknock")


def test_version_names_the_revision_of_this_checkout():
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    out = subprocess.run([XKNOCK, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"xknock, version {build.version()} (revision {head}"), out


def test_a_revision_recorded_at_install_wins(tmp_path, monkeypatch):
    (tmp_path / build.BUILD_FILE).write_text(json.dumps({"revision": "0123456789ab"}))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    build.revision.cache_clear()
    try:
        assert build.revision() == "0123456789ab"
    finally:
        build.revision.cache_clear()


def test_outside_a_checkout_the_revision_is_unknown(tmp_path):
    assert build._checkout_revision(str(tmp_path)) == "unknown"
