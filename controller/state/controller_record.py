"""Which controller serves a filter: the record it keeps for the CLI.

A running controller (daemon/daemon.py) writes
/run/xknock/controller-<control map id>.json when it starts and after every
reload: its PID and start time, version, config path and hash, mode, and the
last reload's result. `xknock reload` signals the process it names and waits
for the result it records; `xknock status` shows it.

The directory is root's alone (kernel/lock.py), so no other user can plant a
record, and a record is trusted only when its process is alive, started when
the record says (a recycled PID has another start time) and holds this
filter's control map open: a controller killed by SIGKILL leaves a record
nothing trusts."""

import contextlib
import json
import os
import signal
import stat
import time

from ..errors import XknockError
from ..kernel import durable
from ..kernel.lock import LOCK_DIR, private_dir

# The controller reloads from its loop (every 200 ms) and may wait up to the
# map lock's 30 s for another writer: past this, `xknock reload` stops waiting.
RELOAD_WAIT_S = 45.0
# Said when no controller serves a filter: what only a controller does.
NO_CONTROLLER = ("no controller: SPA packets are not verified, hooks do not run, "
                 "time-based sequences do not rotate")


def record_path(control_id):
    return os.path.join(LOCK_DIR, f"controller-{int(control_id)}.json")


def start_ticks(pid):
    """The process's start time in clock ticks since boot (/proc/PID/stat's
    22nd field), or None when no such process runs."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the name in parentheses may hold spaces
    return int(fields[19])


def holds_map(pid, map_id):
    """Does process pid hold an fd of the BPF map map_id?"""
    wanted = f"map_id:\t{int(map_id)}\n"
    directory = f"/proc/{int(pid)}/fdinfo"
    try:
        fds = os.listdir(directory)
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            with open(os.path.join(directory, fd)) as f:
                if wanted in f.read():
                    return True
    return False


class Record:
    """The controller's own record, written whole each time (durable.replace_file)."""

    def __init__(self, control_id, ifnames, config_path, version):
        self.path = record_path(control_id)
        self.pid = os.getpid()
        self.fields = {"pid": self.pid, "start_ticks": start_ticks(self.pid), "version": version,
                       "interfaces": list(ifnames), "config": os.path.abspath(config_path) if config_path else None,
                       "started_at": time.time(), "last_reload": None}

    def publish(self, config, config_hash, last_reload=None):
        """Write the record for the live config; last_reload: reload_result()'s dict."""
        self.fields.update({"config_hash": config_hash, "mode": config.mode, "sequences": len(config.sequences)})
        if last_reload is not None:
            self.fields["last_reload"] = last_reload
        private_dir(LOCK_DIR)
        durable.replace_file(self.path, json.dumps(self.fields).encode())

    def remove(self):
        """Remove the record, unless another controller of this filter wrote it since."""
        found = _read(self.path)
        if found is not None and found.get("pid") == self.pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def reload_result(ok, started_ns, message="", warnings=()):
    """What a controller records of one reload. started_ns: CLOCK_MONOTONIC
    when it began, which `xknock reload` compares with when it signalled."""
    return {"ok": bool(ok), "at": time.time(), "started_ns": started_ns, "message": message,
            "warnings": list(warnings)}


def _read(path):
    """The record at path as a dict, or None: missing, unreadable, or not
    root's alone (a file anyone else could have written is never read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return None
        try:
            found = json.loads(f.read(65536))
        except ValueError:
            return None
    return found if isinstance(found, dict) else None


def serving(control_id):
    """(record, None) for the live controller of the filter whose control map
    is control_id, or (None, why) where why is "" (no record) or says why a
    record is not trusted."""
    found = _read(record_path(control_id))
    if found is None:
        return None, ""
    pid = found.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None, "a controller record that names no process"
    ticks = start_ticks(pid)
    if ticks is None:
        return None, f"a stale controller record: PID {pid} is not running"
    if ticks != found.get("start_ticks") or not holds_map(pid, control_id):
        return None, f"a stale controller record: PID {pid} is another process now"
    return found, None


def signal_reload(found):
    """SIGHUP to the controller of record found; monotonic ns just before.
    Through a pidfd checked again after it is opened: the signal goes to that
    very process, or nowhere if its PID was recycled meanwhile."""
    pid = found["pid"]
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise XknockError(f"the controller (PID {pid}) stopped: nothing was reloaded") from None
    try:
        if start_ticks(pid) != found["start_ticks"]:
            raise XknockError(f"the controller (PID {pid}) stopped: nothing was reloaded")
        sent_ns = time.monotonic_ns()
        signal.pidfd_send_signal(pidfd, signal.SIGHUP)
        return sent_ns
    finally:
        os.close(pidfd)


def wait_for_reload(control_id, found, sent_ns, timeout=RELOAD_WAIT_S):
    """The result the controller of record found recorded for a reload begun
    after sent_ns (reload_result()'s dict), once it has."""
    pid = found["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now, _ = serving(control_id)
        if now is None or now.get("pid") != pid:
            raise XknockError(f"the controller (PID {pid}) stopped before it reported the reload: see its log")
        last = now.get("last_reload")
        if isinstance(last, dict) and isinstance(last.get("started_ns"), int) and last["started_ns"] >= sent_ns:
            return now, last
        time.sleep(0.05)
    raise XknockError(f"the controller (PID {pid}) has not reported the reload after {timeout:g}s (stuck on a map "
                      "lock?): see its log; it may apply the file yet")
