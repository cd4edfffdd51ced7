"""Converts a knockd configuration (knockd.conf) into an xknock config.

Pure: text in, TOML text and a list of notes out. Everything that cannot be
carried over, or is carried over with another meaning, becomes a Note, printed
by `xknock import knockd` on stderr and written as comments at the top of the
TOML, so nothing is lost silently.

knockd.conf, as knockd 0.8 reads it (src/knockd.c, parseconfig): lines are
trimmed; empty lines and lines starting with "#" are skipped; "[name]" opens a
section, "[options]" the global one, any other a door; "key = value" splits at
the first "=", keys are case-insensitive. Global: UseSyslog (no value),
LogFile, PidFile, Interface. Door: Sequence ("7000,8000:udp,9000", TCP by
default), One_Time_Sequences, Seq_Timeout (alias Timeout; seconds for the whole
sequence, default 25), TCPFlags, Start_Command (alias Command),
Start_Command_6 (alias Command_6), Cmd_Timeout (default 10), Stop_Command,
Stop_Command_6, Target. %IP% in a command is the knocker's address.

The mapping: one door -> one [[sequence]]; its steps from Sequence; step_timeout
from Seq_Timeout, converted from knockd's whole-sequence limit to xknock's
per-gap limit without ever being looser; open from the firewall rule the
start command adds (iptables/ip6tables, nft, ufw, firewall-cmd and knockd's own
knock_helper_ipt.sh idioms); open_for from Cmd_Timeout when a stop command
closes the rule again.

knockd_conf.py reads the file, firewall_commands.py reads the commands; this
module decides what they mean for xknock and writes the TOML.
"""

import dataclasses
import json
import re

from ..kernel import layout
from ..config import (
    DEFAULT_IDLE_TIMEOUT_NS, DEFAULT_OPEN_FOR_NS, NAME_MAX_BYTES, NS_PER_UNIT, ConfigError, format_duration,
    parse_config,
)
from .firewall_commands import NotUnderstood, Rule, parse_command
from .knockd_conf import TCP_FLAGS, Note, Setting, atoi, parse_sequence, parse_tcpflags, read_knockd
from .note import ImportFailed

DEFAULT_PATH = "/etc/knockd.conf"

# knockd's own defaults (src/knockd.c).
KNOCKD_SEQ_TIMEOUT_S = 25
KNOCKD_CMD_TIMEOUT_S = 10
KNOCKD_INTERFACE = "eth0"

# knockd's Seq_Timeout bounds the whole sequence, xknock's step_timeout each gap
# between two knocks: n steps have n-1 gaps, so a gap of at most
# seq_timeout/(n-1) keeps the whole knock within seq_timeout. Rounded down to
# this granularity, and never below the floor (knockd cannot time a knock
# that finely anyway: it counts whole seconds).
STEP_TIMEOUT_GRANULARITY_NS = 100 * NS_PER_UNIT["ms"]
STEP_TIMEOUT_FLOOR_NS = STEP_TIMEOUT_GRANULARITY_NS
# open_for must be more than zero.
OPEN_FOR_FLOOR_NS = NS_PER_UNIT["s"]

SECONDS = NS_PER_UNIT["s"]


class KnockdImportError(ImportFailed):
    """The file cannot be converted at all; .notes says what was found."""


@dataclasses.dataclass(frozen=True)
class Converted:
    """One door as an xknock sequence (the TOML fields, as config spellings)."""

    door: str
    line: int
    name: str
    knock: tuple[str, ...]
    step_timeout: str
    open: tuple[str, ...]
    open_for: str
    idle_timeout: str
    comments: dict  # field -> a short end-of-line comment saying where the value came from


@dataclasses.dataclass(frozen=True)
class ImportResult:
    toml: str
    config: object  # the xknock Config the TOML parses to
    sequences: tuple[Converted, ...]
    notes: tuple[Note, ...]
    doors: int  # doors found in the file
    interface: str  # the interface knockd listened on


# --- one door -> one sequence ----------------------------------------------------


def _sanitize_name(name, taken):
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "door"
    clean = clean.encode()[:NAME_MAX_BYTES].decode(errors="ignore")
    candidate, counter = clean, 2
    while candidate in taken:
        suffix = f"-{counter}"
        candidate = clean.encode()[: NAME_MAX_BYTES - len(suffix)].decode(errors="ignore") + suffix
        counter += 1
    return candidate


def _start_rules(door):
    """[(setting, part, Rule or NotUnderstood)] of a door's start commands."""
    found = []
    for key in ("START_COMMAND", "START_COMMAND_6"):
        setting = door.settings.get(key)
        if setting is not None and setting.value:
            found.extend((setting, part, meaning) for part, meaning in parse_command(setting.value))
    return found


def _opened_by_doors(doors):
    """{door name: set of Steps its start commands open}, for naming the door a
    closing door undoes."""
    opened = {}
    for door in doors:
        steps = {step for _, _, rule in _start_rules(door)
                 if isinstance(rule, Rule) and rule.action == "open" for step in rule.ports}
        if steps:
            opened[door.name] = steps
    return opened


class _DoorDropped(Exception):
    """The door cannot be converted: the setting to blame and why."""

    def __init__(self, setting, reason):
        super().__init__(reason)
        self.setting, self.reason = setting, reason


class _DoorNotes:
    """The notes of one door, in the order its settings are looked at."""

    def __init__(self, door):
        self.door = door
        self.found = []

    def add(self, setting, reason, outcome):
        self.found.append(Note(setting.line, self.door.name, str(setting), reason, outcome))

    def unset(self, key):
        """A setting for a note about a key the door lacks (on the door's line)."""
        return Setting(key, None, self.door.line)


def _knock_steps(door, notes):
    """The door's Sequence as [Step]; _DoorDropped when xknock cannot knock it."""
    s = door.settings
    if "ONE_TIME_SEQUENCES" in s:
        raise _DoorDropped(s["ONE_TIME_SEQUENCES"],
                           "xknock has no one-time sequences, and a fixed sequence in their place could be replayed")
    if "SEQUENCE" not in s:
        raise _DoorDropped(notes.unset("sequence"), "not set: the door has no knock")
    try:
        steps = parse_sequence(s["SEQUENCE"].value)
    except ValueError as err:
        raise _DoorDropped(s["SEQUENCE"], str(err)) from None
    if len(steps) > layout.MAX_STEPS:
        raise _DoorDropped(s["SEQUENCE"], f"{len(steps)} knocks; xknock takes at most {layout.MAX_STEPS}")
    return steps


def _opening_rules(door, notes, opened_by):
    """[(setting, part, Rule)] of the rules the start command(s) add; notes on
    the parts that do something else; _DoorDropped when nothing opens a port."""
    s = door.settings
    if "START_COMMAND" not in s and "START_COMMAND_6" not in s:
        raise _DoorDropped(notes.unset("command"), "not set: the door runs nothing, so it opens nothing")
    found = _start_rules(door)
    opens = [(setting, part, m) for setting, part, m in found if isinstance(m, Rule) and m.action == "open"]
    closes = [(setting, part, m) for setting, part, m in found if isinstance(m, Rule) and m.action == "close"]
    unknown = [(setting, part, m) for setting, part, m in found if isinstance(m, NotUnderstood)]
    if not opens:
        if closes and not unknown:
            setting, _, rule = closes[0]
            undone = [name for name, steps in (opened_by or {}).items() if set(rule.ports) <= steps]
            what = f"removes the rule door {undone[0]} adds" if undone else "removes a rule"
            raise _DoorDropped(setting, f"{what}; xknock grants end by themselves (open_for, then idle_timeout) "
                                        "and `xknock revoke` ends one at once: there is no closing knock")
        if unknown:
            setting = unknown[0][0]
            reasons = "; ".join(f"{part}{m}" for _, part, m in unknown)
        else:
            setting = s.get("START_COMMAND") or s["START_COMMAND_6"]
            reasons = "it is empty"
        raise _DoorDropped(setting, f"no port to open can be read from it: {reasons}; "
                                    "write this [[sequence]] by hand")
    for setting, part, m in unknown:
        notes.add(setting, f"{part}{m}", "dropped")
    for setting, part, _ in closes:
        notes.add(setting, f"{part}removes a rule; xknock has no closing side effect", "dropped")
    return opens


def _opened_ports(door, opens, notes):
    """[Step] the door opens, once each in the order the rules name them; a
    note where the IPv6 command differs from the IPv4 one (xknock opens the
    same ports to both)."""
    s = door.settings
    opened = []
    for _, _, rule in opens:
        opened.extend(step for step in rule.ports if step not in opened)
    if "START_COMMAND_6" in s:
        v6 = s["START_COMMAND_6"]
        if not v6.value:
            notes.add(v6, "empty: knockd does nothing for IPv6 knockers; xknock grants them the same ports as IPv4 "
                          "knockers", "changed")
        elif "START_COMMAND" in s:
            ports = {setting.key: {step for st, _, rule in opens if st is setting for step in rule.ports}
                     for setting in (s["START_COMMAND"], v6)}
            if len({frozenset(p) for p in ports.values()}) > 1:
                notes.add(v6, "opens other ports than the IPv4 command; xknock opens the same ports to IPv4 and "
                              f"IPv6 knockers: {' '.join(map(str, opened))}", "changed")
    return opened


def _step_timeout(door, steps, notes, comments):
    """step_timeout in ns from Seq_Timeout: knockd's whole sequence -> each gap."""
    s = door.settings
    if "SEQ_TIMEOUT" in s:
        timeout = s["SEQ_TIMEOUT"]
        seq_timeout_s = atoi(timeout.value)
        if not re.fullmatch(r"\d+", timeout.value):
            notes.add(timeout, f"read as {seq_timeout_s} seconds, as knockd reads it", "changed")
        written = timeout
    else:
        seq_timeout_s = KNOCKD_SEQ_TIMEOUT_S
        written = notes.unset("seq_timeout")
    gaps = len(steps) - 1
    knockd_said = (f"knockd allows {seq_timeout_s}s for the whole sequence" if "SEQ_TIMEOUT" in s else
                   f"not set: knockd allows {seq_timeout_s}s (its default) for the whole sequence")
    if gaps == 0:
        comments["step_timeout"] = f"knockd seq_timeout {seq_timeout_s}s; one knock has no gap to time"
        return max(seq_timeout_s * SECONDS, STEP_TIMEOUT_FLOOR_NS)
    per_gap = seq_timeout_s * SECONDS // gaps
    step_timeout_ns = per_gap - per_gap % STEP_TIMEOUT_GRANULARITY_NS
    comments["step_timeout"] = f"knockd seq_timeout {seq_timeout_s}s / {gaps} gaps, rounded down"
    if step_timeout_ns < STEP_TIMEOUT_FLOOR_NS:
        step_timeout_ns = STEP_TIMEOUT_FLOOR_NS
        notes.add(written, f"{knockd_said}, xknock times each gap: {seq_timeout_s}s / {gaps} gaps is below "
                           f"xknock's floor, step_timeout = {format_duration(step_timeout_ns)}, looser than knockd",
                  "changed")
    else:
        notes.add(written, f"{knockd_said}, xknock times each gap: step_timeout = {seq_timeout_s}s / {gaps} gaps "
                           f"= {format_duration(step_timeout_ns)}, rounded down (never looser than knockd)", "changed")
    return step_timeout_ns


def _tcpflags_notes(door, steps, notes):
    """TCPFlags: xknock counts a TCP knock only as a SYN without ACK."""
    s = door.settings
    has_tcp = any(step.proto == "tcp" for step in steps)
    if "TCPFLAGS" in s:
        setting = s["TCPFLAGS"]
        try:
            flags = parse_tcpflags(setting.value)
        except ValueError as err:
            notes.add(setting, str(err), "dropped")
            flags = None
        if flags is not None and has_tcp:
            required = {name for name, wanted in flags.items() if wanted}
            excluded = {name for name, wanted in flags.items() if not wanted}
            if required != {"SYN"}:
                notes.add(setting, "xknock counts SYN only (a SYN without ACK, what `knock` sends); knock with plain "
                                   "SYNs", "dropped")
            elif excluded - {"ACK"}:
                ignored = ",".join(f"!{name.lower()}" for name in TCP_FLAGS if name in excluded - {"ACK"})
                notes.add(setting, f"xknock counts SYN only (without ACK) and does not look at {ignored}", "changed")
    elif has_tcp:
        notes.add(notes.unset("tcpflags"), "not set: knockd counts any TCP packet, xknock counts SYN only (a SYN "
                                           "without ACK, what `knock` sends)", "changed")


def _open_for(door, opens, opened, notes, comments):
    """open_for in ns: how long knockd kept the rule (cmd_timeout, when a stop
    command removes it again), else the firewall's own --timeout, else xknock's default."""
    s = door.settings
    stops = [s[key] for key in ("STOP_COMMAND", "STOP_COMMAND_6") if key in s and s[key].value]
    firewall_timeouts = [rule.timeout_s for _, _, rule in opens if rule.timeout_s]
    if stops:
        for setting in stops:
            for part, m in parse_command(setting.value):
                if isinstance(m, NotUnderstood):
                    notes.add(setting, f"{part}{m}; xknock ends the window after open_for by itself", "dropped")
                elif m.action != "close" or not set(m.ports) <= set(opened):
                    notes.add(setting, f"{part}does more than remove what the start command added; xknock ends the "
                                       "window after open_for by itself", "dropped")
        if "CMD_TIMEOUT" in s:
            cmd_timeout_s = atoi(s["CMD_TIMEOUT"].value)
            comments["open_for"] = f"knockd cmd_timeout {cmd_timeout_s}s"
        else:
            cmd_timeout_s = KNOCKD_CMD_TIMEOUT_S
            comments["open_for"] = f"knockd's default cmd_timeout, {KNOCKD_CMD_TIMEOUT_S}s"
        open_for_ns = cmd_timeout_s * SECONDS
        if open_for_ns < OPEN_FOR_FLOOR_NS:
            open_for_ns = OPEN_FOR_FLOOR_NS
            notes.add(s["CMD_TIMEOUT"], f"xknock's open_for must be more than zero: {format_duration(open_for_ns)}",
                      "changed")
        return open_for_ns
    if firewall_timeouts:
        comments["open_for"] = "the firewall rule's --timeout"
        return min(firewall_timeouts) * SECONDS
    open_for_ns = DEFAULT_OPEN_FOR_NS
    comments["open_for"] = "xknock's default: knockd had no stop_command"
    if "CMD_TIMEOUT" in s:
        notes.add(s["CMD_TIMEOUT"], "knockd uses it only with a stop_command", "ignored")
    notes.add(notes.unset("stop_command"), "not set: knockd's rule stayed until something removed it; xknock accepts "
                                           f"new connections for open_for = {format_duration(open_for_ns)} (its "
                                           "default), established ones while they are active", "changed")
    return open_for_ns


def _convert_door(door, taken_names, opened_by=None):
    """Door -> (Converted or None, [Note]): the knock, what it opens, then
    each timing, each step noting what it could not carry over."""
    notes = _DoorNotes(door)
    try:
        steps = _knock_steps(door, notes)
        opens = _opening_rules(door, notes, opened_by)
    except _DoorDropped as dropped:
        notes.add(dropped.setting, dropped.reason, "door dropped")
        return None, notes.found
    opened = _opened_ports(door, opens, notes)
    comments = {}   # field -> where its value came from
    step_timeout_ns = _step_timeout(door, steps, notes, comments)
    _tcpflags_notes(door, steps, notes)
    if "TARGET" in door.settings:
        notes.add(door.settings["TARGET"], "xknock counts knocks to any address on the interface it is attached to",
                  "dropped")
    open_for_ns = _open_for(door, opens, opened, notes, comments)

    name = _sanitize_name(door.name, taken_names)
    if name != door.name:
        notes.add(notes.unset("name"), f"xknock names are 1-{NAME_MAX_BYTES} of A-Z a-z 0-9 _ . -: renamed {name}",
                  "changed")
    converted = Converted(
        door=door.name,
        line=door.line,
        name=name,
        knock=tuple(str(step) for step in steps),
        step_timeout=format_duration(step_timeout_ns),
        open=tuple(str(step) for step in opened),
        open_for=format_duration(open_for_ns),
        idle_timeout=format_duration(DEFAULT_IDLE_TIMEOUT_NS),
        comments=comments,
    )
    return converted, notes.found


# --- the whole file ---------------------------------------------------------------


def _options_notes(options):
    notes = []
    interface = KNOCKD_INTERFACE
    for setting in options:
        key = setting.key.upper()
        if key == "INTERFACE":
            interface = setting.value
            notes.append(Note(setting.line, None, str(setting),
                              f"xknock takes the interface on its command line: xknock attach {setting.value} "
                              "-c THIS-FILE", "dropped"))
        elif key in ("USESYSLOG", "LOGFILE"):
            notes.append(Note(setting.line, None, str(setting),
                              "xknock logs one line per event to stderr (the journal under systemd; "
                              "--log-format json for JSON)", "dropped"))
        elif key == "PIDFILE":
            notes.append(Note(setting.line, None, str(setting),
                              "xknock runs in the foreground (under systemd) and writes no pid file", "dropped"))
    return notes, interface


def _toml_string(text):
    return json.dumps(text, ensure_ascii=False)


def _toml_list(items):
    return "[" + ", ".join(_toml_string(item) for item in items) + "]"


def _render(sequences, notes, *, source, mode, interface, doors):
    lines = [
        f"# xknock configuration converted from knockd's {source} by `xknock import knockd`.",
        f"# {len(sequences)} of {doors} knockd door(s) converted.",
        "#",
        f"# knockd listened on {interface}; attach xknock there:",
        f"#   xknock attach {interface} -c /etc/xknock/xknock.toml",
        "# Knock as before (`knock HOST 7000 8000:udp 9000`) or with `xknock knock`.",
        "# xknock hides the ports below in XDP, before the firewall: once it runs, let",
        "# your firewall accept them (knockd's setup dropped them until a knock), or it",
        "# drops the knockers xknock lets in. Then stop knockd.",
        "# A knockd stop_command removed the ACCEPT rule after cmd_timeout; here that is",
        "# open_for, the window for new connections. Established connections then live",
        "# on while they carry traffic (idle_timeout; under knockd that was up to your",
        "# firewall's ESTABLISHED rule).",
    ]
    if mode == "enforce":
        lines.append('# For a dry run first, set mode = "monitor" (counts, drops nothing).')
    if notes:
        lines += ["#", "# Not carried over, or carried over with another meaning:"]
        for note in notes:
            where = f"line {note.line}: " if note.line else ""
            lines.append(f"#   {where}{note}".replace("\n", " "))
    lines += ["", "[filter]", f'mode = "{mode}"']
    for seq in sequences:
        lines += [
            "",
            f"# knockd door [{seq.door}], line {seq.line}".replace("\n", " "),
            "[[sequence]]",
            f"name = {_toml_string(seq.name)}",
            f"knock = {_toml_list(seq.knock)}",
            f"step_timeout = {_toml_string(seq.step_timeout)}" + _comment(seq, "step_timeout"),
            f"open = {_toml_list(seq.open)}",
            f"open_for = {_toml_string(seq.open_for)}" + _comment(seq, "open_for"),
            f"idle_timeout = {_toml_string(seq.idle_timeout)}   # xknock's default",
        ]
    return "\n".join(lines) + "\n"


def _comment(seq, field):
    text = seq.comments.get(field)
    return f"   # {text}" if text else ""


def convert(text, *, source="knockd.conf", mode="enforce", listening=frozenset()):
    """knockd.conf text -> ImportResult. listening: as for config.parse_config
    (None reads /proc, for the warning about services on knock ports).
    KnockdImportError when no door can be converted."""
    if mode not in layout.MODES:
        raise ValueError(f"mode must be one of {', '.join(layout.MODES)}")
    parsed = read_knockd(text)
    notes = list(parsed.notes)
    option_notes, interface = _options_notes(parsed.options)
    notes[:0] = option_notes
    sequences = []
    taken = set()
    opened_by = _opened_by_doors(parsed.doors)
    for door in parsed.doors:
        converted, door_notes = _convert_door(door, taken, opened_by)
        if converted is None:
            notes.extend(door_notes)
            continue
        # Checked together with the doors before it: knock ports shared with an
        # opened port, too many sequences on one port, ... drop this door only.
        trial = _render([*sequences, converted], [], source=source, mode=mode, interface=interface, doors=0)
        try:
            parse_config(trial, listening=frozenset())
        except ConfigError as err:
            # Only why it was dropped: what would have changed in it no longer matters.
            reasons = "; ".join(_strip_place(error, converted.name) for error in err.errors)
            written = door.settings["SEQUENCE"]
            notes.append(Note(written.line, door.name, str(written), f"xknock refuses it: {reasons}",
                              "door dropped"))
            continue
        notes.extend(door_notes)
        sequences.append(converted)
        taken.add(converted.name)
    notes.sort(key=lambda n: (n.line or 0))
    if not sequences:
        if not parsed.doors:
            raise KnockdImportError(f"{source}: no knockd door (a [section] other than [options]) found", notes)
        raise KnockdImportError(f"{source}: none of the {len(parsed.doors)} knockd door(s) could be converted",
                                notes)
    toml = _render(sequences, notes, source=source, mode=mode, interface=interface, doors=len(parsed.doors))
    config = parse_config(toml, listening=None if listening is None else set(listening))
    return ImportResult(toml, config, tuple(sequences), tuple(notes), len(parsed.doors), interface)


def _strip_place(error, name):
    prefix = f'sequence "{name}": '
    return error[len(prefix):] if error.startswith(prefix) else error
