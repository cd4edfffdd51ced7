"""Ring buffer events from the data path, turned into log lines.

One event per line, key=value by default or JSON, so that journald and log
shippers read them whole. Sources appear in logs, never in metric labels.
"""

import ctypes
import json
import logging

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
        self._ring = Ring(loaded.bpf[b"events"].map_fd, self._on_record, POLL_BUDGET)

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
                log.exception("hook dispatch failed", extra={"fields": fields})


class LineFormatter(logging.Formatter):
    """`ts level msg key=value ...` or one JSON object per line."""

    def __init__(self, json_lines=False):
        super().__init__()
        self.json_lines = json_lines

    def format(self, record):
        fields = dict(getattr(record, "fields", {}))
        if self.json_lines:
            return json.dumps({"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
                               "msg": record.getMessage(), **fields})
        extra = " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if k != "event")
        line = f"{record.levelname.lower()} {record.getMessage()}"
        return f"{line} {extra}" if extra else line


def _quote(value):
    text = str(value)
    return json.dumps(text) if (" " in text or "=" in text or not text) else text


def setup_logging(json_lines=False, verbose=False):
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter(json_lines))
    root = logging.getLogger("xknock")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
