"""The Debian package: xknock_VERSION_all.deb, made with dpkg-deb from the
repository, for Debian's own Python (python3-bpfcc, python3-click, ... from
the distribution; no venv, no pip, no checkout at run time).

    python -m xknock_dev.packaging deb [OUTDIR]     # OUTDIR defaults to build/

What goes in: the product's packages as pyproject.toml lists them (controller/,
cli/, bpf/ sources; never xknock_dev/, bench/ or tests/) under
/usr/lib/python3/dist-packages/xknock with a dist-info (its version and the
source revision, for `xknock --version`), /usr/bin/xknock, the systemd unit,
the man pages, bash, zsh and fish completion, and the docs.
tests/test_debian.py builds it, reads it back and installs it into a bare
Debian root.
"""

import gzip
import json
import os
import shutil
import subprocess
import tempfile
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIR = "usr/lib/python3/dist-packages"
UNIT_DIR = "lib/systemd/system"
# The checkout install's command (scripts/setup's venv), which the packaged
# unit runs from /usr/bin instead.
VENV_XKNOCK = "/opt/xknock/venv/bin/xknock"
XKNOCK = "/usr/bin/xknock"
# Where Debian's shells look, by file name in packaging/completion.
COMPLETION_PATHS = {
    "xknock": "usr/share/bash-completion/completions/xknock",
    "_xknock": "usr/share/zsh/vendor-completions/_xknock",
    "xknock.fish": "usr/share/fish/vendor_completions.d/xknock.fish",
}
# pyproject.toml's dependencies by their Debian package: every one must be
# here (tests/test_debian.py), so that the package needs no pip.
DEBIAN_NAMES = {
    "click": "python3-click",
    "pyroute2": "python3-pyroute2",
    "prometheus-client": "python3-prometheus-client",
    "cryptography": "python3-cryptography",
}
# What is not a Python distribution: BCC (compiles and loads the program),
# libbpf (the controller reads the ring buffers through it, with ctypes),
# iproute2, nftables (the failsafe chain; attach reads the input policy),
# procps (the unit's ExecReload=/bin/kill; a minimal Debian has none).
DEPENDS_MORE = ["python3 (>= 3.11)", "python3-bpfcc", "libbpf1", "iproute2", "nftables", "procps"]
# BCC compiles against the running kernel's headers (scripts/setup falls back
# to the distribution's); --metrics-web-config reads YAML and bcrypt hashes.
RECOMMENDS = ["linux-headers-amd64 | linux-headers-arm64 | linux-headers-generic",
              "python3-yaml", "python3-bcrypt"]
# [cluster]'s etcd client; imported only when [cluster] is set.
SUGGESTS = ["python3-etcd3"]
DOCS = ["README.md", "CHANGELOG.md"]

POSTINST = """#!/bin/sh
# Byte-compile the modules (the unit's /usr is read-only), and tell a running
# systemd about the unit. No instance is enabled: that is the operator's
# `systemctl enable --now xknock@IFACE` (/usr/share/doc/xknock/operations.md).
set -e
if [ "$1" = configure ]; then
    if command -v py3compile >/dev/null 2>&1; then py3compile -p xknock; fi
    if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
fi
exit 0
"""
PRERM = """#!/bin/sh
set -e
if command -v py3clean >/dev/null 2>&1; then py3clean -p xknock; fi
exit 0
"""
POSTRM = """#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
exit 0
"""


def project():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement_name(requirement):
    for i, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:i].strip()
    return requirement.strip()


def _requirement_floor(requirement):
    for clause in requirement[len(_requirement_name(requirement)):].split(","):
        clause = clause.strip()
        if clause.startswith(">="):
            return clause[2:].strip()
    return None


def depends():
    """The Depends: line's items, pyproject's dependencies first (with their floors)."""
    items = []
    for requirement in project()["project"]["dependencies"]:
        name = DEBIAN_NAMES[_requirement_name(requirement)]
        floor = _requirement_floor(requirement)
        items.append(f"{name} (>= {floor})" if floor else name)
    return items + DEPENDS_MORE


def revision():
    """The checkout's commit, -dirty when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)

    head = git("rev-parse", "--short=12", "HEAD")
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")


def _copy_packages(site, setuptools):
    """The product's packages, as pyproject.toml maps them, into site/xknock/..."""
    package_dir = setuptools["package-dir"]
    package_data = setuptools.get("package-data", {})
    for package in setuptools["packages"]:
        top = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        source = os.path.join(REPO, package_dir[top], *package[len(top):].split(".")[1:])
        target = os.path.join(site, *package.split("."))
        os.makedirs(target, exist_ok=True)
        patterns = package_data.get(package, [])
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if not os.path.isfile(path):
                continue
            if name.endswith(".py") or any(name.endswith(pattern.lstrip("*")) for pattern in patterns):
                shutil.copy2(path, os.path.join(target, name))


def _dist_info(site, meta):
    version = meta["version"]
    info = os.path.join(site, f"xknock-{version}.dist-info")
    os.makedirs(info)
    lines = ["Metadata-Version: 2.1", "Name: xknock", f"Version: {version}", f"Summary: {meta['description']}",
             f"Requires-Python: {meta['requires-python']}"]
    lines += [f"Requires-Dist: {requirement}" for requirement in meta["dependencies"]]
    files = {
        "METADATA": "\n".join(lines) + "\n",
        "INSTALLER": "dpkg\n",
        "top_level.txt": "xknock\n",
        "entry_points.txt": "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in meta["scripts"].items()),
        # Read by controller/daemon/build.py: `xknock --version`, xknock_build_info.
        "xknock-build.json": json.dumps({"revision": revision()}) + "\n",
    }
    for name, text in files.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)


def _write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _gzip(source, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(source, "rb") as f, open(target, "wb") as raw:
        # mtime 0: the same input makes the same bytes.
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as out:
            out.write(f.read())


def _control(meta, installed_kib):
    description = meta["description"]
    return "\n".join([
        "Package: xknock",
        f"Version: {meta['version']}",
        "Architecture: all",
        "Maintainer: xknock developers <xknock@localhost>",
        f"Installed-Size: {installed_kib}",
        f"Depends: {', '.join(depends())}",
        f"Recommends: {', '.join(RECOMMENDS)}",
        f"Suggests: {', '.join(SUGGESTS)}",
        "Section: net",
        "Priority: optional",
        f"Description: {description}",
        " xknock hides ports behind port knocking and single packet authorization",
        " (fwknop's and its own public-key format), decided per packet by an XDP",
        " program; a Python controller loads it with BCC, manages grants, bans and",
        " SPA, and exports Prometheus metrics. Run one instance per interface:",
        " systemctl enable --now xknock@eth0 (see /usr/share/doc/xknock).",
    ]) + "\n"


def build(out_dir):
    """Build xknock_VERSION_all.deb into out_dir; returns its path."""
    pyproject = project()
    meta = dict(pyproject["project"])
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xknock-deb-") as stage:
        root = os.path.join(stage, "root")
        site = os.path.join(root, PYTHON_DIR)
        _copy_packages(site, pyproject["tool"]["setuptools"])
        _dist_info(site, meta)
        # -I: the interpreter ignores PYTHONPATH and the working directory, so
        # no checkout lying about is imported in place of the package.
        _write(os.path.join(root, XKNOCK.lstrip("/")),
               "#!/usr/bin/python3 -I\nimport sys\n\nfrom xknock.cli.main import main\n\nsys.exit(main())\n", 0o755)
        units = os.path.join(REPO, "packaging", "systemd")
        for name in sorted(os.listdir(units)):
            with open(os.path.join(units, name)) as f:
                unit = f.read().replace(VENV_XKNOCK, XKNOCK)
            _write(os.path.join(root, UNIT_DIR, name), unit)
        man = os.path.join(REPO, "packaging", "man")
        for name in sorted(os.listdir(man)):
            _gzip(os.path.join(man, name), os.path.join(root, "usr/share/man/man1", name + ".gz"))
        for name, target in COMPLETION_PATHS.items():
            with open(os.path.join(REPO, "packaging", "completion", name)) as f:
                _write(os.path.join(root, target), f.read())
        doc = os.path.join(root, "usr/share/doc/xknock")
        for name in DOCS:
            with open(os.path.join(REPO, name)) as f:
                _write(os.path.join(doc, name), f.read())
        docs = os.path.join(REPO, "docs")
        for name in sorted(os.listdir(docs)):
            if name.endswith(".md"):
                with open(os.path.join(docs, name)) as f:
                    _write(os.path.join(doc, name), f.read())
        _write(os.path.join(doc, "copyright"),
               "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
               "Upstream-Name: xknock\n\nFiles: *\nLicense: GPL-2.0-only\n"
               " On Debian systems the full text is in /usr/share/common-licenses/GPL-2.\n")
        installed_kib = 0
        for dirpath, _, filenames in os.walk(root):
            installed_kib += sum((os.path.getsize(os.path.join(dirpath, n)) + 1023) // 1024 for n in filenames)
        control = os.path.join(root, "DEBIAN")
        _write(os.path.join(control, "control"), _control(meta, installed_kib))
        for name, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
            _write(os.path.join(control, name), text, 0o755)
        for dirpath, dirnames, _ in os.walk(root):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        deb = os.path.join(out_dir, f"xknock_{meta['version']}_all.deb")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, deb],
                       check=True, capture_output=True, text=True, timeout=300)
    return deb
