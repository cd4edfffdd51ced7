"""The controller's log lines: text for people, logfmt and JSON for tools, an
event name on every line, and syslog priorities when stderr is the journal.

No BPF: LineFormatter on hand-made records, the source tree read with ast
for every log call, and a `python -c` child whose stderr is a pipe that
JOURNAL_STREAM does or does not name.
"""

import ast
import datetime
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from xknock.controller.daemon import events
from xknock.controller.daemon.events import LineFormatter, event_name
from repo_paths import REPO

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def record(msg, fields=None, level=logging.INFO, exc_info=None, created=1795996777.412):
    rec = logging.LogRecord("xknock.events", level, __file__, 1, msg, None, exc_info)
    rec.created = created
    if fields is not None:
        rec.fields = fields
    return rec


GRANTED = {"event": "granted", "source": "192.0.2.7", "sequence": "ssh", "step": 3}


def parse_logfmt(line):
    """A strict logfmt reader: key=bare or key="JSON-escaped", one space apart."""
    pairs, pos = {}, 0
    token = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)( |$)')
    while pos < len(line):
        match = token.match(line, pos)
        assert match, f"not logfmt at {line[pos:]!r} in {line!r}"
        key, value = match.group(1), match.group(2)
        pairs[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
    return pairs


# --- the formats -------------------------------------------------------------------

def test_text_stays_for_people():
    assert LineFormatter().format(record("granted", GRANTED)) == "info granted source=192.0.2.7 sequence=ssh step=3"
    assert LineFormatter(log_format="text").format(record("reloaded", {"config": "/etc/x k.toml"})) == \
        'info reloaded config="/etc/x k.toml"'


def test_logfmt_is_real_logfmt_with_time_level_event_and_message():
    line = LineFormatter(log_format="logfmt").format(record("granted", GRANTED))
    assert line.startswith("ts=2026-11-29T23:59:37.412Z level=info event=granted msg=granted source=192.0.2.7 ")
    assert parse_logfmt(line) == {"ts": "2026-11-29T23:59:37.412Z", "level": "info", "event": "granted",
                                  "msg": "granted", "source": "192.0.2.7", "sequence": "ssh", "step": "3"}


@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "two\nlines", "tab\there", "", "a=b", "ünïcode x"])
def test_logfmt_quotes_what_would_break_a_line_and_reads_back(value):
    line = LineFormatter(log_format="logfmt").format(
        record("reload refused: the running policy is unchanged", {"errors": value}, logging.ERROR))
    assert "\n" not in line
    parsed = parse_logfmt(line)
    assert parsed["errors"] == value and parsed["event"] == "reload_refused" and parsed["level"] == "error"
    assert parsed["msg"] == "reload refused: the running policy is unchanged"


def test_json_has_an_rfc3339_timestamp_and_the_event():
    line = json.loads(LineFormatter(json_lines=True).format(record("granted", GRANTED)))
    assert list(line)[:4] == ["ts", "level", "event", "msg"]
    assert RFC3339_MS.fullmatch(line["ts"]), line["ts"]
    assert datetime.datetime.fromisoformat(line["ts"]).timestamp() == pytest.approx(1795996777.412)
    assert line == {"ts": line["ts"], "level": "info", "event": "granted", "msg": "granted", "source": "192.0.2.7",
                    "sequence": "ssh", "step": 3}


def test_an_exception_is_a_field_and_the_line_stays_one_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        exc = sys.exc_info()
    for fmt in events.FORMATS:
        line = LineFormatter(log_format=fmt).format(record("SPA packet handling failed", level=logging.ERROR,
                                                           exc_info=exc))
        assert "\n" not in line and "ValueError: bad" in line, (fmt, line)
    assert json.loads(LineFormatter(log_format="json").format(
        record("hook reaper error", level=logging.ERROR, exc_info=exc)))["exception"] == "ValueError: bad\nthing"


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, logfmt, json"):
        LineFormatter(log_format="xml")


# --- an event on every line --------------------------------------------------------

@pytest.mark.parametrize("msg, fields, expected", [
    ("granted", GRANTED, "granted"),                                          # the data path's events
    ("spa_accepted", {"outcome": "accepted", "source": "192.0.2.7", "user": "alice"}, "spa_accepted"),
    ("spa_refused", {"outcome": "bad_hmac", "source": "192.0.2.7"}, "spa_refused"),
    ("eth0 was renamed to eth9: ...", {"event": "renamed"}, "renamed"),       # named by the caller
    ("reload refused: the running policy is unchanged", {}, "reload_refused"),
    ("replaced program 17 on eth0", {}, "attached"),
    ("kept program 17 on eth0", {}, "attached"),
    ("attached on eth0", {}, "attached"),
    ("eth0 is back, with the filter", {}, "back"),
    ("the bans map is full (4096 entries): 3 ban(s) could not be written", None, "bans_full"),
    ("sequence ssh: knock port tcp:7000 has a listening service", None, "warning"),   # a config warning
])
def test_every_line_has_an_event(msg, fields, expected):
    rec = record(msg, fields, logging.WARNING if expected in ("warning", "bans_full") else logging.INFO)
    assert event_name(rec) == expected
    assert json.loads(LineFormatter(log_format="json").format(rec))["event"] == expected
    assert parse_logfmt(LineFormatter(log_format="logfmt").format(rec))["event"] == expected


def test_the_documented_jq_filter_finds_spa_grants_too():
    """docs/operations.md: `select(.event == "granted" or .event == "spa_accepted")`."""
    with open(os.path.join(REPO, "docs", "operations.md")) as f:
        assert 'select(.event == "granted" or .event == "spa_accepted")' in f.read()
    lines = [json.loads(LineFormatter(log_format="json").format(record(m, f))) for m, f in (
        ("granted", GRANTED), ("spa_accepted", {"outcome": "accepted", "source": "192.0.2.8"}),
        ("reloaded", {"sequences": 1}))]
    assert [line["source"] for line in lines if line["event"] in ("granted", "spa_accepted")] == \
        ["192.0.2.7", "192.0.2.8"]


def test_a_failed_hook_dispatch_is_not_mistaken_for_its_event():
    class Failing:
        def on_event(self, fields, uid):
            raise RuntimeError("boom")

    reader = events.EventReader.__new__(events.EventReader)
    reader.names, reader.on_event, reader.observers, reader.hooks = {}, None, [], Failing()
    reader.refresh_names = lambda: None
    seen = []

    class Keep(logging.Handler):
        def emit(self, rec):
            seen.append(rec)

    handler, level = Keep(), events.log.level
    events.log.addHandler(handler)
    events.log.setLevel(logging.INFO)
    try:
        import ctypes

        from xknock.controller.kernel import layout

        rec = layout.EventRecord()
        rec.type = layout.Event.GRANTED
        reader._on_record(ctypes.addressof(rec), ctypes.sizeof(rec))
    finally:
        events.log.removeHandler(handler)
        events.log.setLevel(level)
    assert [event_name(r) for r in seen] == ["granted", "hook_dispatch_failed"]
    assert seen[1].fields["after"] == "granted"


def _log_calls():
    """(path, line, message) of every log call in controller/ and cli/ whose
    message is a literal or an f-string (its placeholders filled in)."""
    samples = {"how": "replaced program 7"}
    found = []
    for top in ("controller", "cli"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"):
                        continue
                    method = node.func.attr
                    args = node.args[1:] if method == "log" else node.args
                    if method not in LEVELS | {"exception", "log"} or not args:
                        continue
                    given = [kw for kw in node.keywords if kw.arg == "extra"]
                    if given and "'event'" in ast.unparse(given[0].value):
                        continue   # the caller names it
                    if isinstance(args[0], ast.Name):
                        continue   # a variable: config warnings, named by their level (or MESSAGE_EVENTS)
                    found.append((os.path.relpath(path, REPO), node.lineno, _sample(args[0], samples)))
    return found


def _sample(node, samples):
    """A message as the code could make it: literals kept, values filled in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else _sample(part.value, samples)
                       for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _sample(node.left, samples) + _sample(node.right, samples)
    return samples.get(ast.unparse(node), "eth0")


def test_every_log_call_of_the_controller_has_a_name_of_its_own():
    calls = _log_calls()
    assert len(calls) >= 40, calls
    unnamed = [f"{path}:{line}: {text!r}" for path, line, text in calls
               if event_name(record(text, {})) in LEVELS]
    assert not unnamed, "log lines without an event name: add them to events.MESSAGE_EVENTS:\n" + "\n".join(unnamed)


# --- the journal -------------------------------------------------------------------

CHILD = """
import logging
from xknock.controller.daemon.events import setup_logging
setup_logging(log_format={fmt!r}, verbose=True, journal_socket=None)   # not this machine's journald
log = logging.getLogger("xknock.test")
log.debug("hook started", extra={{"fields": {{"pid": 1}}}})
log.info("granted", extra={{"fields": {{"event": "granted", "source": "192.0.2.7"}}}})
log.warning("hook dropped")
log.error("reload refused: the running policy is unchanged")
try:
    raise OSError("gone")
except OSError:
    log.exception("SPA packet handling failed")
"""


def run_child(fmt, journal_stream):
    """The child's stderr lines; journal_stream(dev, ino) -> JOURNAL_STREAM or None."""
    read, write = os.pipe()
    st = os.fstat(write)
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    value = journal_stream(st.st_dev, st.st_ino)
    if value is not None:
        env["JOURNAL_STREAM"] = value
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(fmt=fmt)], stderr=write, env=env)
    finally:
        os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    assert child.wait(30) == 0, out
    return out.splitlines()


@pytest.mark.parametrize("fmt", events.FORMATS)
def test_under_systemd_every_line_starts_with_its_syslog_priority(fmt):
    lines = run_child(fmt, lambda dev, ino: f"{dev}:{ino}")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>"], lines
    if fmt == "json":
        assert [json.loads(line[3:])["event"] for line in lines] == \
            ["hook_started", "granted", "hook_dropped", "reload_refused", "spa_failed"]


@pytest.mark.parametrize("journal_stream", [
    lambda dev, ino: None,                      # not under systemd
    lambda dev, ino: f"{dev}:{ino + 1}",        # stderr redirected away from the journal
    lambda dev, ino: "garbage",
])
def test_without_the_journal_no_line_has_a_priority(journal_stream):
    lines = run_child("text", journal_stream)
    assert lines == ["debug hook started pid=1", "info granted source=192.0.2.7", "warning hook dropped",
                     "error reload refused: the running policy is unchanged",
                     "error SPA packet handling failed exception=\"OSError: gone\""]


# --- journald's native protocol ------------------------------------------------------

def parse_native(datagram):
    """{field: value} of one entry of journald's native protocol."""
    fields, pos = {}, 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:   # binary-safe: the name, a newline, a 64-bit little-endian length, the data, a newline
            name = line
            size = int.from_bytes(datagram[end + 1:end + 9], "little")
            value = datagram[end + 9:end + 9 + size]
            assert datagram[end + 9 + size:end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture(autouse=True)
def restore_logging():
    """setup_logging changes the "xknock" logger: put it back for the tests after these (caplog)."""
    root = logging.getLogger("xknock")
    saved = root.handlers[:], root.level, root.propagate
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level, root.propagate = saved


@pytest.fixture
def journald(tmp_path):
    """A stand-in for journald's socket: (path, receive())."""
    import socket

    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, lambda: parse_native(sock.recv(65536))
    sock.close()


def test_under_journald_records_go_to_its_socket_with_their_fields(journald):
    path, receive = journald
    handler = events.setup_logging(log_format="json", journal=True, journal_socket=path)
    assert isinstance(handler, events.JournalHandler)
    log = logging.getLogger("xknock.test")
    log.info("granted", extra={"fields": {"event": "granted", "source": "192.0.2.7", "sequence": "ssh", "step": 3}})
    entry = receive()
    assert json.loads(entry.pop("MESSAGE"))["event"] == "granted"
    assert entry == {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "xknock", "EVENT": "granted", "LOGGER": "xknock.test",
                     "SOURCE": "192.0.2.7", "SEQUENCE": "ssh", "STEP": "3"}
    log.error("reload refused: the running policy is unchanged",
              extra={"fields": {"errors": "line 1\nline 2", "message": "not the MESSAGE", "_pid": 1}})
    entry = receive()
    assert entry["PRIORITY"] == "3" and entry["EVENT"] == "reload_refused"
    assert entry["ERRORS"] == "line 1\nline 2"                       # the binary-safe form
    assert json.loads(entry["MESSAGE"])["msg"] == "reload refused: the running policy is unchanged"
    assert entry["PID"] == "1"                                       # never a trusted _FIELD


def test_when_journald_cannot_take_a_record_it_goes_to_stderr(tmp_path, capsys):
    import socket

    path = str(tmp_path / "gone.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)   # then closed: sending there is refused
    handler = events.setup_logging(journal=True, journal_socket=path)
    assert isinstance(handler, events.JournalHandler)
    logging.getLogger("xknock.test").warning("hook dropped")
    assert capsys.readouterr().err == "<4>warning hook dropped\n"


def test_journald_is_used_only_when_stderr_is_the_journal(journald):
    path, _ = journald
    assert not isinstance(events.setup_logging(journal=False, journal_socket=path), events.JournalHandler)
    assert not isinstance(events.setup_logging(journal=True, journal_socket=path + ".none"),
                          events.JournalHandler)
