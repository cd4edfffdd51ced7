"""Hook commands: on_open, on_close (per sequence) and on_ban, like knockd's
start_command and stop_command.

A hook is an argv array, run without a shell, with a minimal environment that
carries what happened in XKNOCK_* variables: a source address or a sequence
name never becomes part of a command line. Hooks run asynchronously: the
controller starts one and goes on; a reaper thread collects its output, logs
how it ended and kills it (its whole process group) when it outlives the
timeout. At most max_running hooks run at once; one more is dropped with a
logged, counted reason, never queued.

HookDispatcher turns data-path events into hooks. It follows every grant a
sequence opened, as (source, sequence uid), from the `granted` event until no
entry of that grant is left in the grants map, whoever removed it: the data
path (a `grant_expired` event), the controller's expiry sweep, or
`xknock revoke` in another process (seen at the next sweep). on_close runs once
for each, when the last port of the grant is gone.
"""

import collections
import dataclasses
import logging
import os
import selectors
import signal
import subprocess
import threading
import time

from ..kernel import layout
from ..kernel.maps import from_addr, live_sequences, to_addr

log = logging.getLogger("xknock.hooks")

HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
KILL_GRACE_S = 1.0       # after SIGTERM, this long before SIGKILL
OUTPUT_LIMIT = 4096      # bytes kept of each of stdout and stderr; the rest is read and discarded
LOG_OUTPUT_CHARS = 512   # characters of each stream shown in the log line
TICK_S = 0.05            # the reaper's polling period while hooks run
DROP_LOG_EVERY_S = 1.0   # a flood of dropped hooks logs at most one line per second
MAX_ARRIVALS = 10_000    # grants of other nodes waiting for their on_open; more drop the oldest (max_running drops sooner)


def hook_env(event, source="", sequence="", ports=(), iface=""):
    """The whole environment of a hook: nothing inherited from the controller."""
    return {
        "PATH": HOOK_PATH,
        "XKNOCK_EVENT": event,
        "XKNOCK_SOURCE": str(source),
        "XKNOCK_SEQUENCE": sequence,
        "XKNOCK_PORTS": " ".join(ports),
        "XKNOCK_IFACE": iface,
    }


@dataclasses.dataclass
class HookResult:
    """How one hook ended (HookRunner.recent keeps the last few)."""

    hook: str                 # "on_open", "on_close", "on_ban"
    argv: tuple
    env: dict
    returncode: int | None    # None: it could not be started
    timed_out: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    error: str = ""           # why it could not be started


class _Running:
    def __init__(self, hook, argv, env, fields, proc, now, timeout_s):
        self.hook, self.argv, self.env, self.fields, self.proc = hook, argv, env, fields, proc
        self.started = now
        self.deadline = now + timeout_s
        self.killed_at = None        # when SIGTERM was sent (timed out)
        self.output = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        self.discarded = {fd: 0 for fd in self.output}
        self.open_fds = set(self.output)


class HookRunner:
    """Runs hook commands in the background, at most max_running at once.

    Counters (read them, never write): started, failed (could not start, or
    ended with a non-zero status or a signal of its own), timed_out (killed
    after timeout_s), dropped (max_running already running, or closed)."""

    def __init__(self, timeout_s=10.0, max_running=8, *, kill_grace_s=KILL_GRACE_S, output_limit=OUTPUT_LIMIT,
                 keep_results=32):
        self.timeout_s = timeout_s
        self.max_running = max_running
        self.kill_grace_s = kill_grace_s
        self.output_limit = output_limit
        self.started = 0
        self.failed = 0
        self.timed_out = 0
        self.dropped = 0
        self.recent = collections.deque(maxlen=keep_results)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = []
        self._closing = False
        self._drops_unlogged = 0
        self._last_drop_log = float("-inf")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._reap_loop, name="xknock-hooks", daemon=True)
        self._thread.start()

    @property
    def running(self):
        with self._lock:
            return len(self._running)

    def run(self, hook, argv, env, fields=None):
        """Start argv with exactly env. True if it started; never blocks on the hook."""
        fields = {"hook": hook, **(fields or {})}
        with self._lock:
            if self._closing or len(self._running) >= self.max_running:
                self._drop(fields)
                return False
            try:
                proc = subprocess.Popen(
                    list(argv), env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                )
            except (OSError, ValueError) as err:
                self.failed += 1
                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                self.recent.append(HookResult(hook, tuple(argv), dict(env), None, False, 0.0, b"", b"", reason))
                log.warning("hook could not start", extra={"fields": {**fields, "command": argv[0], "error": reason}})
                return False
            self.started += 1
            item = _Running(hook, tuple(argv), dict(env), fields, proc, time.monotonic(), self.timeout_s)
            for fd in item.open_fds:
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ, item)
            self._running.append(item)
        log.debug("hook started", extra={"fields": {**fields, "command": argv[0], "pid": proc.pid}})
        self._wake()
        return True

    def wait(self, timeout=None):
        """Until no hook runs (True), or timeout seconds (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)

    def close(self):
        """Start no more hooks and let the running ones end: each is killed at
        its own deadline at the latest, so this waits at most timeout_s plus
        the kill grace."""
        with self._lock:
            self._closing = True
            left = len(self._running)
        if left:
            log.info("waiting for hooks to end", extra={"fields": {"running": left}})
        self._wake()
        self._thread.join(self.timeout_s + self.kill_grace_s + 5)
        if not self._thread.is_alive():
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _drop(self, fields):
        """Under the lock."""
        self.dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY_S:
            reason = ("controller stopping" if self._closing
                      else f"{len(self._running)} hooks already running (max_running)")
            log.warning("hook dropped", extra={"fields": {**fields, "reason": reason, "dropped": self._drops_unlogged,
                                                          "dropped_total": self.dropped}})
            self._drops_unlogged = 0
            self._last_drop_log = now

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass   # already woken, or closed

    def _reap_loop(self):
        while True:
            with self._lock:
                if self._closing and not self._running:
                    return
                busy = bool(self._running)
            try:
                self._reap_once(TICK_S if busy else None)
            except Exception:   # never let the reaper die: hooks would never end, nor be counted
                log.exception("hook reaper error")
                time.sleep(TICK_S)

    def _reap_once(self, timeout):
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._read(key.data, key.fd)
        self._check_processes()

    def _read(self, item, fd):
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._forget_fd(item, fd)
                    return
                buffer = item.output[fd]
                room = self.output_limit - len(buffer)
                buffer += chunk[:max(room, 0)]
                item.discarded[fd] += max(len(chunk) - max(room, 0), 0)
        except BlockingIOError:
            return
        except OSError:
            self._forget_fd(item, fd)

    def _forget_fd(self, item, fd):
        with self._lock:   # run() registers from the controller's thread
            if fd in item.open_fds:
                item.open_fds.discard(fd)
                self._selector.unregister(fd)

    def _check_processes(self):
        now = time.monotonic()
        for item in list(self._running):
            status = item.proc.poll()
            if status is not None:
                self._finish(item, status, now)
            elif item.killed_at is None and now >= item.deadline:
                item.killed_at = now
                self._signal(item, signal.SIGTERM)
            elif item.killed_at is not None and now >= item.killed_at + self.kill_grace_s:
                self._signal(item, signal.SIGKILL)

    @staticmethod
    def _signal(item, signum):
        try:
            os.killpg(item.proc.pid, signum)   # its own session: the hook and whatever it started
        except (ProcessLookupError, PermissionError):
            pass

    def _finish(self, item, status, now):
        for fd in list(item.open_fds):
            self._read(item, fd)   # what is there now; a child left behind may keep the pipe open
            self._forget_fd(item, fd)
        item.proc.stdout.close()
        item.proc.stderr.close()
        if item.killed_at is not None:
            self._signal(item, signal.SIGKILL)   # anything of its group still there
        stdout, stderr = (bytes(buffer) for buffer in item.output.values())   # stdout's fd was added first
        result = HookResult(item.hook, item.argv, item.env, status, item.killed_at is not None,
                            round(now - item.started, 3), stdout, stderr)
        fields = {**item.fields, "command": item.argv[0], "took": f"{result.duration_s:.3f}s"}
        for name, (fd, data) in zip(("stdout", "stderr"), item.output.items()):
            if data:
                fields[name] = printable(bytes(data), item.discarded[fd])
        with self._idle:
            self._running.remove(item)
            self.recent.append(result)
            if result.timed_out:
                self.timed_out += 1
            elif status != 0:
                self.failed += 1
            self._idle.notify_all()
        if result.timed_out:
            log.warning("hook timed out: killed", extra={"fields": {**fields, "timeout": f"{self.timeout_s:g}s"}})
        elif status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = str(-status)
            log.warning("hook failed", extra={"fields": {**fields, "signal": name}})
        elif status:
            log.warning("hook failed", extra={"fields": {**fields, "status": status}})
        else:
            log.info("hook finished", extra={"fields": {**fields, "status": 0}})


def printable(data, discarded=0, limit=LOG_OUTPUT_CHARS):
    """Hook output for one log line: control characters escaped, cut to limit."""
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    cut = len(text) - limit
    text = text[:limit]
    text = "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)
    extra = max(cut, 0) + discarded
    return text + (f"...[{extra} more]" if extra > 0 else "")


@dataclasses.dataclass
class _OpenGrant:
    name: str       # the sequence's name
    ports: tuple    # ("tcp", 22), ...: the ports the grant opened
    on_close: tuple  # the sequence's on_close when it opened (used if it is gone from the config since)


class HookDispatcher:
    """Events and grant endings -> hooks. Used from the controller's thread."""

    def __init__(self, maps, config, ifnames=(), runner=None):
        self.maps = maps
        self.iface = ",".join(ifnames)
        self.runner = runner or HookRunner(config.hooks.timeout_ns / 1e9, config.hooks.max_running)
        self.open = {}   # (source text, sequence uid) -> _OpenGrant, grants followed until they close
        # (source text, sequence uid) of grants other nodes made, written here
        # by the cluster's thread (grant_arrived), run from the controller's.
        self.arrivals = collections.deque(maxlen=MAX_ARRIVALS)
        self.set_config(config)
        self.seed()

    def set_config(self, config):
        """The config just applied (start, reload)."""
        self.config = config
        self.every_node = config.cluster is not None and config.cluster.hooks == "every_node"
        self.sequences = {sequence.name: sequence for sequence in config.sequences}
        self.runner.timeout_s = config.hooks.timeout_ns / 1e9
        self.runner.max_running = config.hooks.max_running
        self.refresh()

    def refresh(self):
        """uid -> (name, ports) of the live policy's sequences."""
        self.live = {}
        for seq in live_sequences(self.maps).values():
            ports = tuple((layout.PROTO_NAMES[seq.open[i].proto], seq.open[i].port) for i in range(seq.nopen))
            self.live[seq.uid] = (seq.name.decode(errors="replace"), ports)

    def seed(self):
        """Follow the knock grants already in the map (a restarted controller),
        so that their on_close runs. No on_open: they opened before."""
        for key, value in self.maps.grants.items():
            if value.seq_uid in self.live:
                pair = (str(from_addr(key.src)), value.seq_uid)
                if pair not in self.open:
                    self.open[pair] = self._open_grant(value.seq_uid)
        if self.open:
            log.debug("following grants opened before the controller started", extra={"fields": {
                "grants": len(self.open)}})

    def on_event(self, fields, seq_uid):
        """One ring-buffer event (events.describe() fields and the record's uid)."""
        event = fields["event"]
        if event == "granted":
            self._opened(fields["source"], seq_uid)
        elif event == "grant_expired":
            pair = (fields["source"], seq_uid)
            if pair in self.open and not self._alive(pair):
                self._close(pair)
        elif event == "banned":
            if self.config.ban and self.config.ban.on_ban:
                self.runner.run("on_ban", self.config.ban.on_ban,
                                hook_env("ban", fields["source"], iface=self.iface),
                                {"source": fields["source"]})

    def grant_arrived(self, record):
        """ClusterNode.on_received, on the cluster's thread: a knock grant of
        another node was written into the maps. With [cluster] hooks =
        "every_node" its on_open runs here (run_arrivals), and it is followed
        to its on_close like a grant made here."""
        if self.every_node and record.seq_uid and not record.flags & layout.GRANT_SPA:
            self.arrivals.append((str(record.source), record.seq_uid))

    def run_arrivals(self):
        """The hooks of the grants that arrived since (the controller's loop)."""
        while self.arrivals:
            source, uid = self.arrivals.popleft()
            if self.every_node:   # a reload may have changed it since
                self._opened(source, uid)

    def _opened(self, source, uid):
        if uid not in self.live:
            self.refresh()   # a reload by another process
        if uid not in self.live:
            return
        grant = self.open[(source, uid)] = self._open_grant(uid)
        sequence = self.sequences.get(grant.name)
        if sequence and sequence.on_open:
            self._run("on_open", "open", sequence.on_open, source, grant)

    def sweep(self):
        """Run on_close for every grant followed whose entries are all gone:
        swept, expired in the data path with the event lost, or revoked by
        `xknock revoke` in another process. Returns how many closed."""
        closed = [pair for pair in self.open if not self._alive(pair)]
        for pair in closed:
            self._close(pair)
        return len(closed)

    def close(self):
        self.runner.close()

    def _open_grant(self, uid):
        name, ports = self.live[uid]
        sequence = self.sequences.get(name)
        return _OpenGrant(name, ports, sequence.on_close if sequence else ())

    def _alive(self, pair):
        """Whether the grants map still holds an entry of this grant."""
        source, uid = pair
        addr = to_addr(source)
        for proto, port in self.open[pair].ports:
            value = self.maps.grants.lookup(layout.GrantKey(src=addr, proto=layout.PROTO_NUMBERS[proto], port=port))
            if value is not None and value.seq_uid == uid:
                return True
        return False

    def _close(self, pair):
        grant = self.open.pop(pair)
        sequence = self.sequences.get(grant.name)
        on_close = sequence.on_close if sequence else grant.on_close
        if on_close:
            self._run("on_close", "close", on_close, pair[0], grant)

    def _run(self, hook, event, argv, source, grant):
        ports = [f"{proto}:{port}" for proto, port in grant.ports]
        self.runner.run(hook, argv, hook_env(event, source, grant.name, ports, self.iface),
                        {"sequence": grant.name, "source": source})
