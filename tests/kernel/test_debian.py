"""The Debian package (xknock_dev/debian.py, `python -m xknock_dev.packaging
deb`): what it holds, what it depends on, and that it works installed into a
bare Debian root (debootstrap, no venv, no pip, no checkout) with Debian's
own Python packages. Booting that root under systemd is scripts/prove-unit's
(docs/operations.md quotes its last result)."""

import os
import re
import shutil
import subprocess

import pytest
from xknock_dev import debian, debroot

REPO = debian.REPO
PRODUCT_TREES = ("controller", "cli", "bpf")


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    return debian.build(str(tmp_path_factory.mktemp("deb")))


def contents(deb):
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    return {line.split()[5].removeprefix("./").rstrip("/") for line in listing.splitlines()}


def field(deb, name):
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def test_the_package_holds_the_product_and_nothing_of_development(deb):
    files = contents(deb)
    site = debian.PYTHON_DIR
    for tree in PRODUCT_TREES:
        for dirpath, _, filenames in os.walk(os.path.join(REPO, tree)):
            if "__pycache__" in dirpath:
                continue
            for name in filenames:
                if name.endswith((".py", ".c", ".h")):
                    relative = os.path.relpath(os.path.join(dirpath, name), REPO)
                    installed = os.path.join(site, "xknock", relative)
                    assert installed in files, f"{relative} is not in the package (pyproject.toml's packages?)"
    assert not [f for f in files if re.search(r"xknock_dev|/tests?/|/bench/|conftest|__pycache__|\.pyc$", f)]
    assert f"{site}/xknock-0.1.0.dist-info/METADATA" in files
    assert {"usr/bin/xknock", "lib/systemd/system/xknock@.service", "usr/share/doc/xknock/operations.md",
            "usr/share/doc/xknock/copyright"} <= files
    assert {f"usr/share/man/man1/{name}.gz" for name in os.listdir(os.path.join(REPO, "packaging", "man"))} <= files
    assert set(debian.COMPLETION_PATHS.values()) <= files
    assert not [f for f in files if f.startswith(("opt", "etc", "usr/local"))], "a package owns no /opt, /etc, /usr/local"


def test_it_depends_on_debian_packages_that_exist_in_the_versions_needed(deb):
    depends = [item.strip() for item in field(deb, "Depends").split(",")]
    assert {"python3-bpfcc", "python3-click (>= 8.1)", "python3-cryptography (>= 38)", "libbpf1", "nftables"} \
        <= set(depends)
    # Every Python dependency of pyproject.toml comes from Debian: the package needs no pip.
    for requirement in debian.project()["project"]["dependencies"]:
        assert debian.DEBIAN_NAMES[debian._requirement_name(requirement)] in field(deb, "Depends")
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache: the names are not checked against the archive")
    for item in depends + [alt for rec in field(deb, "Recommends").split(",") for alt in rec.split("|")][:1]:
        name, _, floor = item.strip().partition(" (>= ")
        policy = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True, timeout=60).stdout
        candidate = re.search(r"Candidate: (\S+)", policy)
        assert candidate and candidate.group(1) != "(none)", f"{name}: no such package in this machine's archive"
        if floor:
            assert subprocess.run(["dpkg", "--compare-versions", candidate.group(1), "ge", floor.rstrip(")")]
                                  ).returncode == 0, f"{name}: the archive has {candidate.group(1)}, we need {floor}"


def test_the_packaged_unit_runs_the_packaged_command(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-x", deb, str(tmp_path)], check=True)
    unit = (tmp_path / "lib/systemd/system/xknock@.service").read_text()
    assert "/opt/" not in unit.replace("/opt/xknock/venv", "") and debian.VENV_XKNOCK not in unit
    assert "ExecStart=/usr/bin/xknock $XKNOCK_OPTS attach %i -c ${XKNOCK_CONFIG} $XKNOCK_ATTACH_OPTS" in unit
    assert "ExecReload=/usr/bin/xknock reload %i" in unit
    script = (tmp_path / "usr/bin/xknock").read_text()
    assert script.startswith("#!/usr/bin/python3 -I\n"), "Debian's python, ignoring PYTHONPATH and the working directory"
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}",
                                 str(tmp_path / "lib/systemd/system/xknock@.service")],
                                capture_output=True, text=True, timeout=60)
        complaints = [line for line in (result.stdout + result.stderr).splitlines() if "xknock" in line]
        assert result.returncode == 0 and not complaints, result.stdout + result.stderr


GOOD = """
[filter]
mode = "monitor"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:22"]
"""


@pytest.mark.slow
@pytest.mark.skipif(debroot.offline() is not None, reason=f"no bare Debian root: {debroot.offline()}")
def test_installed_in_a_bare_debian_root_it_runs_from_the_package(deb):
    """No venv, no pip, no checkout: Debian's python3 and the package alone."""
    with debroot.installed(deb) as root:
        def run(*argv, **kw):
            return debroot.chroot(root, *argv, check=False, capture_output=True, text=True, timeout=300, **kw)

        version = run("xknock", "--version")
        assert version.returncode == 0, version.stderr
        assert re.fullmatch(r"xknock, version 0\.1\.0 \(revision [0-9a-f]{12}(-dirty)?\)\n", version.stdout), \
            version.stdout
        where = run("python3", "-c", "import xknock.cli.main, xknock.controller.config as c, bcc, pyroute2; "
                    "print(xknock.cli.main.__file__, c.__file__, bcc.__file__, pyroute2.__file__)")
        assert where.returncode == 0, where.stderr
        assert all(path.startswith("/usr/lib/python3/dist-packages/") for path in where.stdout.split()), where.stdout
        assert not os.path.exists(os.path.join(root, "opt/xknock"))
        assert run("python3", "-c", "import pip").returncode != 0, "pip is not needed, so not installed"
        assert run("python3", "-c", "import xknock_dev").returncode != 0

        with open(os.path.join(root, "etc/xknock.toml"), "w") as f:
            f.write(GOOD)
        os.chmod(os.path.join(root, "etc/xknock.toml"), 0o600)
        good = run("xknock", "check", "-c", "/etc/xknock.toml")
        assert good.returncode == 0, good.stdout + good.stderr
        with open(os.path.join(root, "etc/xknock.toml"), "a") as f:
            f.write('step_timeout = "5x"\n')
        bad = run("xknock", "check", "-c", "/etc/xknock.toml")
        assert bad.returncode != 0 and "not a duration" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        assert os.path.exists(os.path.join(root, "usr/share/bash-completion/completions/xknock"))
        listed = run("dpkg", "-L", "xknock").stdout
        assert "/lib/systemd/system/xknock@.service" in listed
