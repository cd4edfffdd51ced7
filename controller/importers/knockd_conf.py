"""knockd.conf read the way knockd 0.8 reads it (src/knockd.c, parseconfig).

Pure: text in, its [options] settings, its doors and notes on the lines knockd
itself would refuse out; and the two values of a door knockd parses itself,
Sequence and TCPFlags. What the doors mean for xknock is knockd_import.py's.
"""

import dataclasses
import re

from ..config import Step
from .note import ImportNote


# Door keys, by knockd's canonical (upper-case) name; aliases fold into them.
DOOR_KEYS = {
    "SEQUENCE": "SEQUENCE",
    "ONE_TIME_SEQUENCES": "ONE_TIME_SEQUENCES",
    "SEQ_TIMEOUT": "SEQ_TIMEOUT",
    "TIMEOUT": "SEQ_TIMEOUT",
    "TCPFLAGS": "TCPFLAGS",
    "START_COMMAND": "START_COMMAND",
    "COMMAND": "START_COMMAND",
    "START_COMMAND_6": "START_COMMAND_6",
    "COMMAND_6": "START_COMMAND_6",
    "CMD_TIMEOUT": "CMD_TIMEOUT",
    "STOP_COMMAND": "STOP_COMMAND",
    "STOP_COMMAND_6": "STOP_COMMAND_6",
    "TARGET": "TARGET",
}
OPTION_KEYS = ("USESYSLOG", "LOGFILE", "PIDFILE", "INTERFACE")
TCP_FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG")


@dataclasses.dataclass(frozen=True)
class Note(ImportNote):
    """One thing not carried over, or carried over with another meaning.

    outcome: "dropped" (this setting is lost, the door is kept), "door
    dropped" (the whole door is not converted), "changed" (carried over with a
    different value or meaning), "ignored" (knockd itself would ignore or
    refuse it)."""

    line: int | None
    door: str | None  # None: the [options] section, or (outside=True) no section at all
    setting: str
    reason: str
    outcome: str
    outside: bool = False

    @property
    def where(self):
        return f"door {self.door}" if self.door is not None else "outside any section" if self.outside else "[options]"


@dataclasses.dataclass
class Setting:
    key: str  # as written ("seq_timeout", "Command", "UseSyslog")
    value: str | None  # None: written without "=" (UseSyslog)
    line: int

    def __str__(self):
        return self.key if self.value is None else f"{self.key}={self.value}"


@dataclasses.dataclass
class Door:
    name: str
    line: int
    settings: dict = dataclasses.field(default_factory=dict)  # canonical key -> Setting (the last one wins)


@dataclasses.dataclass
class KnockdFile:
    options: list  # of Setting
    doors: list  # of Door
    notes: list  # of Note: lines knockd itself would refuse




def read_knockd(text):
    """knockd.conf text -> KnockdFile, the way knockd's parseconfig() reads it.
    Lines knockd would refuse are skipped with a note instead of failing."""
    options, doors, notes = [], [], []
    section = None
    door = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            if not name:
                notes.append(Note(number, None, line, "a section needs a name (knockd refuses the file)", "ignored",
                                  outside=True))
                section, door = "", None
                continue
            section = name
            if name.lower() == "options":
                door = None
            else:
                door = Door(name, number)
                doors.append(door)
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        setting = Setting(key, value.strip() if equals else None, number)
        upper = key.upper()
        if section is None or section == "":
            notes.append(Note(number, None, str(setting), "knockd refuses a directive before any [section]",
                              "ignored", outside=True))
            continue
        if upper == "USESYSLOG" and not equals:
            options.append(setting)  # knockd takes it in any section
            continue
        if not equals:
            where = door.name if door else None
            notes.append(Note(number, where, str(setting), "not a key = value line (knockd refuses the file)",
                              "ignored"))
            continue
        if door is None:
            if upper in OPTION_KEYS:
                options.append(setting)
            else:
                notes.append(Note(number, None, str(setting),
                                  "unknown global directive (knockd refuses the file)", "ignored"))
            continue
        canonical = DOOR_KEYS.get(upper)
        if canonical is None:
            notes.append(Note(number, door.name, str(setting),
                              "unknown door directive (knockd refuses the file)", "ignored"))
            continue
        door.settings[canonical] = setting
    return KnockdFile(options, doors, notes)


def atoi(text):
    """C's atoi: leading blanks, an optional sign, digits; 0 when there are none."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def parse_sequence(text):
    """knockd's "7000,8000:udp,9000:tcp" -> [Step]; ValueError with a reason."""
    steps = []
    for index, item in enumerate(text.split(",")):
        port_text, colon, proto = item.partition(":")
        port_text = port_text.strip()
        if not re.fullmatch(r"\d{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f'item {index + 1} "{item.strip()}" is not a port 1-65535')
        proto = proto.strip().lower() if colon else "tcp"
        if proto not in ("tcp", "udp"):
            raise ValueError(f'item {index + 1} "{item.strip()}": unknown protocol (knockd takes tcp or udp)')
        steps.append(Step(proto, int(port_text)))
    return steps


def parse_tcpflags(text):
    """knockd's "syn,!ack" -> {"SYN": True, "ACK": False}; ValueError for an unknown flag."""
    flags = {}
    for flag in text.upper().split(","):
        negated = flag.startswith("!")
        name = flag[1:] if negated else flag
        if name not in TCP_FLAGS:
            raise ValueError(f'unknown flag "{flag}" (knockd refuses the file)')
        flags[name] = not negated
    return flags
