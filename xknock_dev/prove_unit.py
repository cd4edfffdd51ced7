"""The systemd unit under a real systemd (scripts/prove-unit): the Debian
package installed into a bare Debian root (xknock_dev/debroot.py), booted
with systemd-nspawn in a network namespace of its own, and the unit driven as
an operator would, with the unit as shipped (WatchdogSec=30s and all):

  start        xknock@v0 and xknock@v1 on two veths, each its own filter, its
               own SPA replay cache and metrics port
  reload       a good file switches the policy; a bad one fails the reload
               and the running policy is kept
  grants       a grant survives `systemctl restart`
  watchdog     a controller stopped with SIGSTOP is killed by the watchdog
               and restarted; the filter enforces meanwhile, the grant stays

Prints one line per check and a summary; exits 1 when a check failed.
docs/operations.md quotes its last result.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from xknock_dev import debian, debroot

IFACES = ("v0", "v1")
METRICS = {"v0": "127.0.0.1:9798", "v1": "127.0.0.1:9799"}
GRANTED = "192.0.2.7"
CONFIG = """
[filter]
mode = "enforce"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:22"]

[spa]
port = 62201

[[spa.user]]
name = "alice"
key_file = "/etc/xknock/alice.keys"
open = ["tcp:22"]
"""
MORE = """
[[sequence]]
name = "web"
knock = ["udp:8001", "tcp:7001"]
open = ["tcp:443"]
"""
BAD = 'step_timeout = "5x"\n'
# The interfaces, made at boot before the instances may start.
LINKS_UNIT = """[Unit]
Description=veth pairs for xknock@v0 and xknock@v1
DefaultDependencies=no
Before=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -ec 'for i in v0 v1; do ip link add $i type veth peer name $i-peer; ip link set $i up; ip link set $i-peer up; done'

[Install]
WantedBy=sysinit.target
"""

results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print(f"prove-unit: {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def _write(root, path, text, mode=0o644):
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
        f.write(text)
    os.chmod(full, mode)


def prepare(root):
    """Configs, keys and the links unit, written into the root before it boots."""
    os.makedirs(os.path.join(root, "etc/xknock"), mode=0o755, exist_ok=True)
    debroot.chroot(root, "xknock", "keygen", "--key-file", "/etc/xknock/alice.keys", stdout=subprocess.DEVNULL)
    _write(root, "/etc/xknock/xknock.toml", CONFIG, 0o600)
    _write(root, "/etc/xknock/v1.toml", CONFIG, 0o600)
    _write(root, "/etc/xknock/v0.env", f'XKNOCK_ATTACH_OPTS="--metrics-addr {METRICS["v0"]}"\n')
    _write(root, "/etc/xknock/v1.env",
           f'XKNOCK_CONFIG=/etc/xknock/v1.toml\nXKNOCK_ATTACH_OPTS="--metrics-addr {METRICS["v1"]}"\n')
    _write(root, "/etc/systemd/system/xknock-links.service", LINKS_UNIT)
    wants = os.path.join(root, "etc/systemd/system/sysinit.target.wants")
    os.makedirs(wants, exist_ok=True)
    os.symlink("/etc/systemd/system/xknock-links.service", os.path.join(wants, "xknock-links.service"))
    # LimitMEMLOCK=infinity needs CAP_SYS_RESOURCE above the hard limit; a
    # sandbox that withholds it from us withholds it from the container's
    # systemd too, which would then refuse to start the unit. On kernels from
    # 5.11 on BPF memory is not charged to RLIMIT_MEMLOCK, so the limit we can
    # set changes nothing xknock does.
    if not _has_capability(CAP_SYS_RESOURCE):
        import resource

        hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
        if hard != resource.RLIM_INFINITY:
            print(f"prove-unit: note: no CAP_SYS_RESOURCE here, so the unit gets LimitMEMLOCK={hard} "
                  "(this machine's hard limit) instead of infinity: a drop-in", flush=True)
            _write(root, "/etc/systemd/system/xknock@.service.d/memlock.conf", f"[Service]\nLimitMEMLOCK={hard}\n")
    # Nothing to log in on, no network to wait for.
    for unit in ("console-getty.service", "getty.target", "systemd-networkd-wait-online.service"):
        os.symlink("/dev/null", os.path.join(root, "etc/systemd/system", unit))


CAP_SYS_RESOURCE = 24


def _has_capability(number):
    with open("/proc/self/status") as f:
        bounding = next(line for line in f if line.startswith("CapBnd:")).split()[1]
    return bool(int(bounding, 16) >> number & 1)


def _leader(nspawn_pid, timeout=60):
    """The container's PID 1 (systemd), by its host PID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
            except OSError:
                continue
            if status.get("NSpid", "").split()[-1:] == ["1"] and status.get("Name") == "systemd" and \
                    _descends(int(pid), nspawn_pid):
                return int(pid)
        time.sleep(0.2)
    raise RuntimeError("the container's systemd did not start")


def _descends(pid, ancestor):
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


class Container:
    def __init__(self, leader):
        self.leader = leader

    def run(self, *argv, timeout=120):
        command = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-r", "-w", "--",
                   "/usr/bin/env", "-i", f"PATH={debroot.PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def out(self, *argv):
        return self.run(*argv).stdout.strip()

    def main_pid(self, unit):
        return int(self.out("systemctl", "show", "-P", "MainPID", unit) or 0)

    def xdp_on(self, iface):
        return "xdp" in self.out("ip", "link", "show", iface)

    def grants(self, iface):
        listing = self.run("xknock", "grants", iface, "--json")
        return listing.stdout if listing.returncode == 0 else ""

    def sequences(self, iface):
        status = self.run("xknock", "status", iface, "--json")
        try:
            return json.loads(status.stdout)
        except ValueError:
            return None

    def journal(self, unit):
        return self.out("journalctl", "-u", unit, "-o", "cat", "--no-pager")


@contextlib.contextmanager
def booted(root):
    """root booted with systemd-nspawn: its own network namespace, its own
    bpffs, this kernel's headers (read-only), BPF allowed."""
    release = os.uname().release
    bpffs = tempfile.mkdtemp(prefix="xknock-nspawn-bpf-")
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", bpffs], check=True)
    binds = [f"--bind={bpffs}:/sys/fs/bpf"]
    modules = f"/lib/modules/{release}"
    if os.path.isdir(modules):
        binds.append(f"--bind-ro={os.path.realpath(modules)}:{modules}")
        for link in ("build", "source"):
            target = os.path.realpath(os.path.join(modules, link))
            if os.path.isdir(target):
                binds.append(f"--bind-ro={target}")
    command = ["systemd-nspawn", "--quiet", "--boot", "--directory", root, "--machine", "xknock-prove",
               # --register=no --keep-unit: no systemd on the host needed (no
               # machined, no scope); the container is this process's child.
               "--private-network", "--register=no", "--keep-unit", "--capability=all",
               "--system-call-filter=bpf perf_event_open", "--console=read-only", *binds]
    log = open(os.path.join(debroot.CACHE, "prove-unit-nspawn.log"), "w")
    nspawn = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Container(_leader(nspawn.pid)), log.name
    finally:
        nspawn.send_signal(signal.SIGTERM)   # nspawn asks the container's systemd to power off
        try:
            nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()
        log.close()
        subprocess.run(["umount", bpffs], check=False)
        os.rmdir(bpffs)


def wait(predicate, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def prove(c, root):
    # systemctl needs PID 1's socket, which comes a moment after PID 1.
    wait(lambda: c.run("test", "-S", "/run/systemd/private").returncode == 0, 60, 0.2)
    state = c.run("systemctl", "is-system-running", "--wait", timeout=180).stdout.strip()
    if not check("the container booted", state in ("running", "degraded"), f"systemd says {state}"):
        return
    if state == "degraded":
        print(c.out("systemctl", "--failed", "--no-legend"), flush=True)

    # --- start: two instances, nothing shared that must not be --------------------
    for iface in IFACES:
        started = c.run("systemctl", "start", f"xknock@{iface}", timeout=300)
        check(f"systemctl start xknock@{iface}", started.returncode == 0,
              started.stderr.strip() or "active, READY=1 sent once the filter was attached")
        if started.returncode != 0:
            print(c.journal(f"xknock@{iface}")[-3000:], flush=True)
            return
    for iface in IFACES:
        check(f"the filter is attached to {iface}", c.xdp_on(iface))
    pid = c.main_pid("xknock@v0")
    cmdline = c.out("cat", f"/proc/{pid}/cmdline").replace("\0", " ").strip()
    check("the controller is Debian's python3 running /usr/bin/xknock", cmdline.startswith("/usr/bin/python3 -I /usr/bin/xknock"),
          cmdline)
    caches = [f"/var/lib/xknock/{iface}/spa-replay" for iface in IFACES]
    check("each instance has its own SPA replay cache", all(os.path.exists(os.path.join(root, p.lstrip("/")))
                                                             for p in caches), ", ".join(caches))
    for iface, addr in METRICS.items():
        scrape = c.run("python3", "-c", f"import urllib.request; print(urllib.request.urlopen('http://{addr}/metrics',"
                       " timeout=5).read().decode())")
        check(f"xknock@{iface} serves its metrics on {addr}", "xknock_build_info" in scrape.stdout,
              scrape.stderr.strip()[-200:])

    # --- reload: a good file, then a bad one ---------------------------------------
    path = os.path.join(root, "etc/xknock/xknock.toml")
    with open(path, "a") as f:
        f.write(MORE)
    reloaded = c.run("systemctl", "reload", "xknock@v0")
    good = wait(lambda: "web" in json.dumps(c.sequences("v0")), 10)
    check("systemctl reload with a good file switches the policy", reloaded.returncode == 0 and good,
          "the new sequence \"web\" is live" if good else reloaded.stderr.strip())
    with open(path, "a") as f:
        f.write(BAD)
    before = c.main_pid("xknock@v0")
    refused = c.run("systemctl", "reload", "xknock@v0")
    kept = "web" in json.dumps(c.sequences("v0")) and c.main_pid("xknock@v0") == before
    check("systemctl reload with a bad file fails, the running policy is kept",
          refused.returncode != 0 and kept and c.out("systemctl", "is-active", "xknock@v0") == "active",
          f"systemctl exits {refused.returncode}; the journal has: "
          + next((line for line in c.journal("xknock@v0").splitlines() if "not a duration" in line), "?"))
    with open(path, "w") as f:
        f.write(CONFIG + MORE)

    # --- restart keeps grants ------------------------------------------------------
    granted = c.run("xknock", "grant", "v0", GRANTED, "--for", "30m")   # outlives the restarts below
    check(f"xknock grant v0 {GRANTED} --for 30m", granted.returncode == 0 and GRANTED in c.grants("v0"), granted.stderr.strip())
    before = c.main_pid("xknock@v0")
    restarted = c.run("systemctl", "restart", "xknock@v0", timeout=300)
    after = c.main_pid("xknock@v0")
    kept = GRANTED in c.grants("v0")
    check("systemctl restart keeps the grant", restarted.returncode == 0 and after not in (0, before) and kept,
          f"controller {before} -> {after}, {GRANTED} {'still' if kept else 'NOT'} granted "
          + restarted.stderr.strip())

    # --- the watchdog --------------------------------------------------------------
    stuck = c.main_pid("xknock@v0")
    c.run("kill", "-STOP", str(stuck))
    stopped = time.monotonic()
    replaced = wait(lambda: c.main_pid("xknock@v0") not in (0, stuck)
                    and c.out("systemctl", "is-active", "xknock@v0") == "active", 90)
    took = time.monotonic() - stopped
    journal = c.journal("xknock@v0")
    timeout_line = next((line for line in journal.splitlines() if "Watchdog timeout" in line), "")
    check("the watchdog kills a stuck controller and systemd starts another", replaced and timeout_line,
          f"{timeout_line.strip()}; a new controller {took:.0f} s after SIGSTOP")
    check("... the filter stayed attached and the grant kept", c.xdp_on("v0") and GRANTED in c.grants("v0"))
    check("xknock@v1 ran on untouched", c.out("systemctl", "is-active", "xknock@v1") == "active" and c.xdp_on("v1"))


def main():
    reason = debroot.offline()
    if reason is None and shutil.which("systemd-nspawn") is None:
        reason = "systemd-nspawn is not installed (apt-get install systemd-container; scripts/setup test does)"
    if reason:
        print(f"prove-unit: cannot run: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xknock-prove-") as out:
        deb = debian.build(out)
        with debroot.installed(deb) as root:
            prepare(root)
            with booted(root) as (container, log):
                try:
                    prove(container, root)
                except Exception as err:   # a check that could not run is a failure, said so
                    check("the proof ran to its end", False, f"{type(err).__name__}: {err}")
                if not all(ok for _, ok in results):
                    print("prove-unit: the journal of xknock@v0:\n" + container.out(
                        "journalctl", "-u", "xknock@v0", "--no-pager", "-o", "short-monotonic")[-6000:], flush=True)
    failed = [name for name, ok in results if not ok]
    kernel = os.uname().release
    systemd = subprocess.run(["systemd-nspawn", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"prove-unit: {len(results) - len(failed)}/{len(results)} checks passed in {time.monotonic() - started:.0f} s"
          f" ({os.path.basename(deb)}, Debian {debroot.SUITE}, {systemd}, kernel {kernel})", flush=True)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
