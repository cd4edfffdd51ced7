"""Ring buffer events from the data path, turned into log lines, and the
format of every log line of the controller.

One event per line, so that journald and log shippers read them whole: text
for people (`level msg key=value`), logfmt or JSON for tools. Every line has
an event name: a data-path event's own (`granted`), the one its caller gave
(`fields["event"]`), or one looked up from its message (MESSAGE_EVENTS). Under
systemd (JOURNAL_STREAM names stderr) records go to journald's socket with
their fields as journal fields (JournalHandler), or, without that socket, each
line starts with its syslog priority, `<6>`, as sd-daemon(3) describes, so
that `journalctl -p` filters.
Sources appear in logs, never in metric labels.
"""

import ctypes
import datetime
import json
import logging
import os
import re
import socket
import sys
import traceback

from ..kernel import layout
from ..kernel.maps import from_addr, live_sequences
from ..kernel.ring import Ring

log = logging.getLogger("xknock.events")

# Events handled per poll at most: then the controller's loop has its turn
# (watchdog, rotation, sweeps), however fast events arrive.
POLL_BUDGET = 512

EVENT_NAMES = {
    layout.Event.GRANTED: "granted",
    layout.Event.GRANT_FAILED: "grant_failed",
    layout.Event.RESET: "knock_reset",
    layout.Event.TIMED_OUT: "knock_timed_out",
    layout.Event.BANNED: "banned",
    layout.Event.EXPIRED: "grant_expired",
}


def describe(record, sequence_names):
    """A dict for one layout.EventRecord."""
    fields = {
        "event": EVENT_NAMES.get(record.type, f"type{record.type}"),
        "source": str(from_addr(record.src)),
        "sequence": sequence_names.get(record.seq_uid, f"{record.seq_uid:#x}"),
        "step": record.step,
    }
    if record.type == layout.Event.BANNED:
        del fields["sequence"], fields["step"]
    if record.type == layout.Event.EXPIRED:
        del fields["step"]
        proto = layout.PROTO_NAMES.get(record.proto, str(record.proto))
        fields["port"] = f"{proto}:{record.port}"
    if record.type in (layout.Event.RESET, layout.Event.TIMED_OUT, layout.Event.BANNED):
        proto = layout.PROTO_NAMES.get(record.proto, str(record.proto))
        fields["knock"] = proto if record.proto == layout.PROTO_ICMP else f"{proto}:{record.port}"
    return fields


class EventReader:
    """Polls the events ring buffer of a loaded program and logs each event."""

    def __init__(self, loaded, maps, on_event=None, hooks=None):
        self.maps = maps
        self.on_event = on_event
        self.hooks = hooks   # a hooks.HookDispatcher, or None
        self.observers = []  # callables given each layout.EventRecord (the daemon's time-based rotation)
        self.refresh_names()
        self._ring = Ring(loaded.map_fd("events"), self._on_record, POLL_BUDGET)

    def refresh_names(self):
        """Sequence names by uid, read back from the live policy (after a reload too)."""
        self.names = {seq.uid: seq.name.decode(errors="replace") for seq in live_sequences(self.maps).values()}

    def poll(self, timeout_ms):
        """Waits up to timeout_ms; handles at most POLL_BUDGET events."""
        return self._ring.poll(timeout_ms)

    def close(self):
        self._ring.close()

    def _on_record(self, data, size):
        record = ctypes.cast(data, ctypes.POINTER(layout.EventRecord)).contents
        if record.seq_uid not in self.names:
            self.refresh_names()   # a reload by another process (`xknock reload`)
        fields = describe(record, self.names)
        log.info(fields["event"], extra={"fields": fields})
        if self.on_event:
            self.on_event(fields)
        for observe in self.observers:
            observe(record)
        if self.hooks:
            try:
                self.hooks.on_event(fields, record.seq_uid)
            except Exception:   # a hook must never stop the events
                log.exception("hook dispatch failed", extra={"fields": {**fields, "event": "hook_dispatch_failed",
                                                                        "after": fields["event"]}})


FORMATS = ("text", "logfmt", "json")

# A stable event name for each log line that is not a data-path event and
# whose caller gives none, by a pattern its message starts with (re.match).
# Messages made of one identifier (`reloaded`, `spa_accepted`) are their own
# name. tests/unit/test_events_log.py fails on a log call of controller/ or cli/
# that none of these names: add a row here for a new message.
MESSAGE_EVENTS = tuple((re.compile(pattern), name) for pattern, name in (
    # cli/main.py: attach, its fail-safe, sessions, --once
    (r"(attached|replaced program \d+|kept program \d+) on ", "attached"),
    (r"\[spa\] with --once", "spa_once"),
    (r"--metrics-addr is ignored with --once", "metrics_once"),
    (r"--force is deprecated", "force_deprecated"),
    (r"no filter on .*, and closing the guarded ports with nftables failed", "fail_closed_failed"),
    (r"no filter on .*: the guarded ports .* are closed", "fail_closed"),
    (r"no filter on .*are OPEN", "fail_open"),
    (r"the filter runs: removed the failsafe chain", "failsafe_removed"),
    (r"the filter runs, but removing the failsafe chain", "failsafe_remove_failed"),
    (r"cutting established session", "session_cut"),
    (r"kept established session", "session_kept"),
    (r"time-based sequences: written for the current window only", "totp_current_window"),
    # daemon/lifecycle.py, daemon/daemon.py
    (r"could not restore .* after a failed attach", "restore_failed"),
    (r"after the upgrade's swap, carrying what the old program wrote meanwhile failed", "upgrade_carry_failed"),
    (r"carried the old filter's state into maps of the new layout", "upgrade_carried"),
    (r"removed the pins of .* by a network namespace that is gone", "stale_namespace_pins"),
    (r"the new maps stay pinned in ", "pin_move_failed"),
    (r"the bans map is full", "bans_full"),   # state/bans.py's FullBansWatch, logged by the loop
    (r"reload refused", "reload_refused"),
    (r"reload failed", "reload_failed"),
    (r"rotating time-based sequences failed", "rotation_failed"),
    (r"recording a spent time-based window failed", "spent_window_failed"),
    (r"handling a ring buffer record failed", "ring_record_failed"),   # kernel/ring.py
    (r"expired grants removed", "grants_swept"),
    (r"hook sweep failed", "hook_sweep_failed"),
    (r"controller stopped", "controller_stopped"),
    # daemon/links.py (its lines name their event themselves but this one)
    (r"link notifications were lost", "link_notifications_lost"),
    (r"\S+ is back, with the filter", "back"),
    (r"interface lookup failed", "interface_lookup_failed"),
    # daemon/hooks.py, and the dispatch here
    (r"hook could not start", "hook_not_started"),
    (r"hook started", "hook_started"),
    (r"waiting for hooks to end", "hooks_waiting"),
    (r"hook dropped", "hook_dropped"),
    (r"hook reaper error", "hook_reaper_error"),
    (r"hook timed out", "hook_timed_out"),
    (r"hook failed", "hook_failed"),
    (r"hook finished", "hook_finished"),
    (r"following grants opened before the controller started", "hooks_seeded"),
    (r"hook dispatch failed", "hook_dispatch_failed"),
    # daemon/metrics.py
    (r"serving metrics", "metrics_serving"),
    (r"metrics request failed", "metrics_request_failed"),
    (r"metrics: reading the filter's maps works again", "scrape_recovered"),
    (r"metrics: reading the filter's maps failed", "scrape_failed"),
    (r"counting map entries took too long", "map_count_slow"),
    (r"map sample failed", "map_sample_failed"),
    # cluster/node.py, cli/cluster.py
    (r"cluster: could not queue a grant", "cluster_queue_failed"),
    (r"cluster: status not written", "cluster_status_failed"),
    (r"cluster: etcd reachable", "cluster_etcd_reachable"),
    (r"cluster: etcd unreachable", "cluster_etcd_unreachable"),
    (r"cluster: revoked", "cluster_revoked"),
    (r"cluster: banned", "cluster_banned"),
    (r"cluster: ignored a key", "cluster_foreign_key"),
    (r"cluster: a grant of another node did not fit", "cluster_grants_full"),
    (r"cluster: could not hand a received grant", "cluster_hook_handoff_failed"),
    (r"cluster: ", "cluster_error"),
    (r"\[cluster\] with --once", "cluster_once"),
    # spa/spa.py
    (r"SPA grant observer failed", "spa_grant_observer_failed"),
    (r"SPA packet handling failed", "spa_failed"),
    (r"SPA receiver round failed", "spa_round_failed"),
    (r"could not remember a SPA source", "spa_remember_failed"),
    (r"could not send a SPA acknowledgement", "spa_ack_failed"),
))
_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]*")

# logging's levels as syslog priorities (sd-daemon(3): "<6>" before a line).
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def event_name(record):
    """The event of a log record: its fields' `event`, its message when that is
    one identifier, MESSAGE_EVENTS, else its level (`warning`: a config
    warning, whose text is the config's)."""
    given = getattr(record, "fields", {}).get("event")
    if given:
        return str(given)
    message = record.getMessage()
    if _IDENTIFIER.fullmatch(message):
        return message
    for pattern, name in MESSAGE_EVENTS:
        if pattern.match(message):
            return name
    return record.levelname.lower()


def priority(levelno):
    """The syslog priority of a logging level (a level between two takes the
    more severe one's)."""
    for level, prio in sorted(PRIORITIES.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def journal_stream(stream=None, environ=None):
    """Is stream (stderr) the journal? systemd sets JOURNAL_STREAM to
    "DEVICE:INODE" of the stream it connects to stderr (systemd.exec(5)); a
    stderr redirected elsewhere since has another inode."""
    stream = sys.stderr if stream is None else stream
    dev, _, ino = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def rfc3339(created):
    """A record's time as RFC 3339 in UTC, to the millisecond: 2026-11-24T23:59:37.412Z."""
    moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LineFormatter(logging.Formatter):
    """One line per record, in one of FORMATS:

    text    `level msg key=value ...`, for people (no timestamp: the journal
            and collectors add their own; the event name is the message or
            left out)
    logfmt  `ts=... level=info event=granted msg=granted key=value ...`
    json    {"ts": ..., "level": ..., "event": ..., "msg": ..., key: value}

    An exception logged with the record becomes an `exception` field (its type
    and message), so that a line stays one line. journal=True starts the line
    with its syslog priority (`<4>`)."""

    def __init__(self, json_lines=False, log_format=None, journal=False):
        super().__init__()
        self.log_format = log_format or ("json" if json_lines else "text")
        if self.log_format not in FORMATS:
            raise ValueError(f"log format {self.log_format!r}: one of {', '.join(FORMATS)}")
        self.json_lines = self.log_format == "json"
        self.journal = journal

    def format(self, record):
        fields = dict(getattr(record, "fields", {}))
        fields.pop("event", None)
        if record.exc_info and record.exc_info[0] is not None:
            fields["exception"] = "".join(traceback.format_exception_only(record.exc_info[1])).strip()
        level, msg = record.levelname.lower(), record.getMessage()
        if self.log_format == "json":
            line = json.dumps({"ts": rfc3339(record.created), "level": level, "event": event_name(record),
                               "msg": msg, **fields}, default=str)
        elif self.log_format == "logfmt":
            pairs = {"ts": rfc3339(record.created), "level": level, "event": event_name(record), "msg": msg,
                     **fields}
            line = " ".join(f"{_key(k)}={_quote(v)}" for k, v in pairs.items())
        else:
            extra = " ".join(f"{_key(k)}={_quote(v)}" for k, v in fields.items())
            line = f"{level} {msg} {extra}" if extra else f"{level} {msg}"
        if self.journal:
            line = f"<{priority(record.levelno)}>{line}"
        return line


def _key(key):
    """A logfmt key: anything but letters, digits and `_.-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(key)) or "_"


def _quote(value):
    """A logfmt value: bare unless it is empty or has a space, `=`, a quote, a
    backslash or a control character; then quoted with JSON's escapes, which
    keep it on one line."""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if not text or any(c in ' ="\\' or ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Journal fields of every entry, which a record's own fields never overwrite.
_JOURNAL_OWN = {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT", "LOGGER"}


def journal_entry(record, message):
    """One entry in journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL):
    MESSAGE (the formatted line), PRIORITY, SYSLOG_IDENTIFIER, EVENT, LOGGER,
    and each field of the record as an upper-case journal field (SOURCE=,
    SEQUENCE=, IFACE=...)."""
    fields = {"MESSAGE": message, "PRIORITY": priority(record.levelno), "SYSLOG_IDENTIFIER": "xknock",
              "EVENT": event_name(record), "LOGGER": record.name}
    for key, value in getattr(record, "fields", {}).items():
        name = re.sub(r"[^A-Z0-9_]", "_", str(key).upper()).lstrip("_")[:64]
        if name and name not in _JOURNAL_OWN and not name[0].isdigit():
            fields[name] = value
    out = bytearray()
    for name, value in fields.items():
        data = str(value).encode("utf-8", errors="replace")
        if b"\n" in data:   # binary-safe form: the name, a newline, the length as 64-bit little endian, the data
            out += name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Log records straight to journald, with their fields as journal fields,
    so that `journalctl -u xknock@eth0 EVENT=granted SOURCE=192.0.2.7` finds
    them. What cannot be sent (no journald, an entry too large) goes to the
    fallback handler instead (stderr, with its <N> priority)."""

    def __init__(self, formatter, fallback, path=JOURNAL_SOCKET):
        super().__init__()
        self.setFormatter(formatter)
        self.fallback = fallback
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record):
        try:
            self.socket.sendto(journal_entry(record, self.format(record)), self.path)
        except OSError:
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self):
        self.socket.close()
        super().close()


def setup_logging(json_lines=False, verbose=False, log_format=None, journal=None, journal_socket=JOURNAL_SOCKET):
    """The controller's logging. On stderr, one line per record (LineFormatter);
    when stderr is the journal (journal=None: find out from JOURNAL_STREAM)
    each line has its <N> priority, and when journald's socket is there the
    records go to it directly, with their fields (JournalHandler)."""
    journal = journal_stream() if journal is None else journal
    stderr = logging.StreamHandler()
    stderr.setFormatter(LineFormatter(json_lines, log_format, journal))
    handler = stderr
    if journal and journal_socket and os.path.exists(journal_socket):
        handler = JournalHandler(LineFormatter(json_lines, log_format), stderr, journal_socket)
    root = logging.getLogger("xknock")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    return handler
