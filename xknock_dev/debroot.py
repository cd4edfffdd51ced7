"""Bare Debian roots to install the Debian package into (tests/test_debian.py,
scripts/prove-unit): nothing of this machine inside, no venv, no checkout.

Three layers, as scripts/fresh-suite makes its root, cached under
/var/cache/xknock-test (XKNOCK_TEST_CACHE) so that only the first run pays:

  base-SUITE/    debootstrap --variant=minbase, with systemd (to boot it
                 with systemd-nspawn); made once
  deps-HASH/     what apt installs for the package's Depends: line, kept as
                 an overlay's upper layer (HASH: of that line); made once per
                 Depends: line
  a run's root   an overlay on both, thrown away after the run; the package
                 is installed there with dpkg -i

Needs root, debootstrap, and the Debian mirror of /etc/apt (offline(): why not).
"""

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile

CACHE = os.environ.get("XKNOCK_TEST_CACHE", "/var/cache/xknock-test")
SUITE = os.environ.get("XKNOCK_FRESH_SUITE", "bookworm")
MIRROR = os.environ.get("XKNOCK_FRESH_MIRROR", "http://deb.debian.org/debian")
# systemd and dbus: scripts/prove-unit boots the root.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def offline():
    """Why no root can be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, mounts, chroot)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (scripts/setup test installs it)"
    if shutil.which("dpkg-deb") is None:
        return "dpkg-deb is not installed"
    if os.path.exists(os.path.join(CACHE, f"base-{SUITE}", ".complete")):
        return None
    probe = subprocess.run(["apt-get", "download", "--print-uris", "base-files"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        return f"apt cannot reach the Debian mirror: {probe.stderr.strip()[-200:]}"
    return None


def _say(message):
    print(f"debroot: {message}", flush=True)


def _network_files(root):
    """This machine's resolver, CA certificates and apt sources (not history:
    its network), as scripts/fresh-suite copies them."""
    shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
    local_ca = "/usr/local/share/ca-certificates"
    if os.path.isdir(local_ca):
        shutil.copytree(local_ca, os.path.join(root, local_ca.lstrip("/")), dirs_exist_ok=True)
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
        os.makedirs(os.path.join(root, "etc/ssl/certs"), exist_ok=True)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", os.path.join(root, "etc/ssl/certs/ca-certificates.crt"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, "etc/apt/sources.list"))
    if os.path.exists("/etc/apt/sources.list"):
        shutil.copy("/etc/apt/sources.list", os.path.join(root, "etc/apt/sources.list"))
    if os.path.isdir("/etc/apt/sources.list.d"):
        shutil.copytree("/etc/apt/sources.list.d", os.path.join(root, "etc/apt/sources.list.d"), dirs_exist_ok=True)


def base():
    """The debootstrap'd root (made once)."""
    path = os.path.join(CACHE, f"base-{SUITE}")
    if not os.path.exists(os.path.join(path, ".complete")):
        _say(f"debootstrap {SUITE} into {path} (once; a few minutes)")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), SUITE, path,
                        MIRROR], check=True, stdout=subprocess.DEVNULL, timeout=1800)
        _network_files(path)
        open(os.path.join(path, ".complete"), "w").close()
    return path


def chroot(root, *argv, check=True, timeout=600, **kw):
    """argv in root, with its own /proc, /sys, /dev and /tmp, an empty
    environment but for PATH and the proxy settings, in a mount namespace of
    its own (nothing is left mounted)."""
    keep = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    env = ["HOME=/root", "LANG=C.UTF-8", f"PATH={PATH}", "DEBIAN_FRONTEND=noninteractive"]
    env += [f"{k}={v}" for k, v in keep.items()]
    script = ('set -e; r="$1"; shift; mount -t proc proc "$r/proc"; mount -t sysfs sysfs "$r/sys"; '
              'mount --rbind /dev "$r/dev"; mount -t tmpfs tmpfs "$r/tmp"; '
              'exec chroot "$r" /usr/bin/env -i "$@"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "chroot", root,
                           *env, *argv], check=check, timeout=timeout, **kw)


@contextlib.contextmanager
def overlay(*lowers):
    """A writable root over lowers (top first); yields (root, upper)."""
    work = tempfile.mkdtemp(prefix="xknock-root-", dir=CACHE)
    root, upper, scratch = (os.path.join(work, name) for name in ("root", "upper", "work"))
    for path in (root, upper, scratch):
        os.makedirs(path)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={scratch}", root], check=True)
    try:
        yield root, upper
    finally:
        subprocess.run(["umount", "-R", root], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def _depends_line(deb):
    return subprocess.run(["dpkg-deb", "-f", deb, "Depends"], capture_output=True, text=True, check=True).stdout.strip()


def deps(deb):
    """base() with what apt installs for deb's Depends: (made once per Depends: line)."""
    lower = base()
    line = _depends_line(deb)
    path = os.path.join(CACHE, "deps-" + hashlib.sha256(f"{SUITE} {line}".encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(path, ".complete")):
        return path
    _say(f"installing Depends: {line} (once per Depends: line)")
    with overlay(lower) as (root, upper):
        shutil.copy(deb, os.path.join(root, "xknock.deb"))
        chroot(root, "apt-get", "update", "-qq", stdout=subprocess.DEVNULL)
        chroot(root, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "/xknock.deb",
               stdout=subprocess.DEVNULL, timeout=1800)
        chroot(root, "dpkg", "--purge", "xknock", stdout=subprocess.DEVNULL)
        chroot(root, "apt-get", "clean")
        os.unlink(os.path.join(root, "xknock.deb"))
        subprocess.run(["umount", "-R", root], check=True)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(upper, path)   # whiteouts and opaque directories as overlayfs made them
        open(os.path.join(path, ".complete"), "w").close()
    return path


@contextlib.contextmanager
def installed(deb):
    """A throw-away root with deb installed (dpkg -i); yields its path."""
    with overlay(deps(deb), base()) as (root, _):
        shutil.copy(deb, os.path.join(root, "xknock.deb"))
        chroot(root, "dpkg", "-i", "/xknock.deb", stdout=subprocess.DEVNULL)
        os.unlink(os.path.join(root, "xknock.deb"))
        yield root
