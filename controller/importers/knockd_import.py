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
"""

import dataclasses
import json
import re
import shlex

from ..kernel import layout
from ..config import (
    DEFAULT_IDLE_TIMEOUT_NS, DEFAULT_OPEN_FOR_NS, NAME_MAX_BYTES, NS_PER_UNIT, ConfigError, Step,
    format_duration, parse_config,
)

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


class KnockdImportError(Exception):
    """The file cannot be converted at all; .notes says what was found."""

    def __init__(self, message, notes=()):
        super().__init__(message)
        self.notes = list(notes)


@dataclasses.dataclass(frozen=True)
class Note:
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

    def __str__(self):
        where = f"door {self.door}" if self.door is not None else "outside any section" if self.outside else "[options]"
        return f"{where}: {self.setting}: {self.reason}: {self.outcome}"

    def located(self, path):
        """The note as `PATH:LINE: ...` (a compiler's diagnostic)."""
        place = f"{path}:{self.line}" if self.line else path
        return f"{place}: {self}"


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


# --- reading knockd.conf --------------------------------------------------------


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


def _atoi(text):
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


# --- what a start or stop command does ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """A firewall rule a command adds ("open") or removes ("close") for the
    knocker: ports is what it opens; timeout_s a lifetime the tool enforces."""

    action: str  # "open" | "close"
    ports: tuple[Step, ...]
    tool: str
    timeout_s: int | None = None


class NotUnderstood(ValueError):
    """A command, or part of one, that is not a firewall idiom xknock knows."""


SEPARATORS = (";", "&&")
IP_PLACEHOLDER = "%IP%"


def parse_command(text):
    """A knockd command -> [(part, Rule or NotUnderstood)], one entry per simple
    command (split at ; and &&); part is "WORDS: " for a compound command, else ""."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError as err:  # unbalanced quotes
        return [("", NotUnderstood(f"cannot be split into words: {err}"))]
    parts, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            if current:
                parts.append(current)
            current = []
        else:
            current.append(token)
    if current:
        parts.append(current)
    results = []
    for words in parts:
        # A note names the part of a compound command it is about; a command
        # of one part is named by the note already.
        shown = " ".join(words) + ": " if len(parts) > 1 else ""
        try:
            results.append((shown, _parse_simple_command(words)))
        except NotUnderstood as err:
            results.append((shown, err))
    return results


def _parse_simple_command(words):
    operators = [w for w in words if w and set(w) <= set("|&<>()")]
    if operators:
        raise NotUnderstood(f'uses the shell operator "{operators[0]}"')
    words = list(words)
    while words and words[0] in ("sudo", "/usr/bin/sudo", "env", "/usr/bin/env", "command", "exec"):
        words.pop(0)
        while words and words[0].startswith("-"):  # sudo -n, env -i
            words.pop(0)
    if not words:
        raise NotUnderstood("empty")
    if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        raise NotUnderstood("sets a shell variable")
    program = words[0].rsplit("/", 1)[-1]
    args = words[1:]
    if re.fullmatch(r"ip6?tables(-legacy|-nft)?", program):
        return _iptables(program, args)
    if program == "nft":
        return _nft(args)
    if program == "ufw":
        return _ufw(args)
    if program == "firewall-cmd":
        return _firewall_cmd(args)
    if program in ("knock_add", "knock_helper_ipt.sh"):
        return _knock_helper(program, args)
    raise NotUnderstood(f'"{program}" is not a firewall command xknock knows '
                        "(iptables, ip6tables, nft, ufw, firewall-cmd, knock_helper_ipt.sh)")


def _is_knocker(address):
    return address in (IP_PLACEHOLDER, f"{IP_PLACEHOLDER}/32", f"{IP_PLACEHOLDER}/128")


def _port_list(text, protos):
    """"22", "22,80", "6000:6003" (a range) -> [Step] for every proto."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        low, colon, high = item.partition(":" if ":" in item else "-")
        if not low.isdigit() or (colon and not high.isdigit()):
            raise NotUnderstood(f'port "{item}" is not a number or a range')
        first, last = int(low), int(high) if colon else int(low)
        if not 1 <= first <= last <= 65535:
            raise NotUnderstood(f'port "{item}" is out of range 1-65535')
        if last - first >= layout.MAX_OPEN:
            raise NotUnderstood(f'port range "{item}" is wider than the {layout.MAX_OPEN} ports a sequence can open')
        ports.extend(range(first, last + 1))
    return [Step(proto, port) for proto in protos for port in ports]


def _take(args, index, option):
    if index + 1 >= len(args):
        raise NotUnderstood(f"{option} without a value")
    return args[index + 1]


def _iptables(program, args):
    action = chain = source = proto = target = None
    table = "filter"
    ports = None
    i = 0
    while i < len(args):
        arg = args[i]
        option, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        value = inline or None

        def val():
            return value if value is not None else _take(args, i, option)

        step = 1 if value is not None else 2
        if option in ("-A", "--append", "-I", "--insert", "-D", "--delete"):
            action = "close" if option in ("-D", "--delete") else "open"
            chain = val()
            i += step
            if option in ("-I", "--insert") and i < len(args) and args[i].isdigit():
                i += 1  # -I INPUT 1: the rule's position
            elif option in ("-D", "--delete") and i < len(args) and args[i].isdigit():
                raise NotUnderstood("deletes a rule by its number")
            continue
        if option in ("-s", "--source", "--src"):
            source = val()
        elif option in ("-p", "--protocol"):
            proto = val().lower()
        elif option in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            ports = val()
        elif option in ("-m", "--match"):
            if val() not in ("tcp", "udp", "state", "conntrack", "multiport", "comment"):
                raise NotUnderstood(f'match "-m {val()}"')
        elif option in ("--state", "--ctstate", "--comment", "-i", "--in-interface"):
            val()
        elif option in ("-j", "--jump"):
            target = val()
        elif option in ("-t", "--table"):
            table = val()
        elif option in ("-w", "--wait"):
            step = 2 if value is None and i + 1 < len(args) and args[i + 1].isdigit() else 1
        elif option == "--syn":
            step = 1
        else:
            raise NotUnderstood(f'option "{arg}"')
        i += step
    if action is None:
        raise NotUnderstood("neither adds (-A, -I) nor deletes (-D) a rule")
    if table != "filter":
        raise NotUnderstood(f"works on table {table}, not filter")
    if chain != "INPUT":
        raise NotUnderstood(f"works on chain {chain}, not INPUT")
    if target != "ACCEPT":
        raise NotUnderstood(f"jumps to {target or 'nothing'}, not ACCEPT")
    if ports is not None and proto is None:
        raise NotUnderstood("--dport without -p tcp or -p udp (iptables refuses it too)")
    return _rule(program, action, source, proto, ports)


def _rule(tool, action, source, proto, ports, timeout_s=None, protos=None):
    if source is None:
        raise NotUnderstood("has no source address: it opens to everyone, not to the knocker")
    if not _is_knocker(source):
        raise NotUnderstood(f"its source is {source}, not the knocker (%IP%)")
    if protos is None:
        if proto not in ("tcp", "udp"):
            what = f"protocol {proto}" if proto else "no protocol"
            raise NotUnderstood(f"{what}: xknock opens tcp or udp ports")
        protos = (proto,)
    if ports is None:
        raise NotUnderstood(f"opens every {'/'.join(protos)} port to the knocker; xknock opens listed ports only")
    return Rule(action, tuple(_port_list(ports, protos)), tool, timeout_s)


NFT_FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")


def _nft(args):
    words = []
    for arg in args:  # `nft "add rule ..."` and `{22,80}` alike
        words.extend(w for w in re.split(r"\s+|([{},])", arg) if w)
    while words and words[0].startswith("-"):
        words.pop(0)
    if len(words) >= 2 and words[0] in ("add", "insert") and words[1] == "element":
        raise NotUnderstood("adds the knocker to an nftables set; which ports that set opens is in your "
                            "ruleset, not in the command")
    if len(words) < 2 or words[1] != "rule" or words[0] not in ("add", "insert", "delete"):
        raise NotUnderstood("not `nft add rule`, `nft insert rule` or `nft delete rule`")
    action = "close" if words[0] == "delete" else "open"
    rest = words[2:]
    if rest and rest[0] in NFT_FAMILIES:
        rest = rest[1:]
    if len(rest) < 2:
        raise NotUnderstood("no table and chain")
    rest = rest[2:]
    source = proto = ports = verdict = None
    protos = None
    i = 0

    def value_at(j):
        """The value (a word or a {set}) at j -> (text, next index)."""
        if j >= len(rest):
            raise NotUnderstood("a match without a value")
        if rest[j] != "{":
            return rest[j], j + 1
        end = rest.index("}", j) if "}" in rest[j:] else None
        if end is None:
            raise NotUnderstood("an unclosed {")
        return ",".join(w for w in rest[j + 1:end] if w != ","), end + 1

    while i < len(rest):
        word = rest[i]
        if word in ("ip", "ip6") and i + 1 < len(rest) and rest[i + 1] == "saddr":
            source, i = value_at(i + 2)
        elif word in ("tcp", "udp", "th") and i + 1 < len(rest) and rest[i + 1] == "dport":
            if word != "th":
                proto = word
            ports, i = value_at(i + 2)
        elif word == "meta" and i + 1 < len(rest) and rest[i + 1] == "l4proto":
            value, i = value_at(i + 2)
            protos = tuple(value.split(","))
        elif word == "ct" and i + 1 < len(rest) and rest[i + 1] == "state":
            _, i = value_at(i + 2)
        elif word in ("iifname", "iif"):
            _, i = value_at(i + 1)
        elif word == "comment":
            _, i = value_at(i + 1)
        elif word in ("counter", "log"):
            i += 1
        elif word in ("accept", "drop", "reject", "jump", "goto", "queue", "continue", "return"):
            verdict = word
            i += 1
            break
        elif word == "handle" and action == "close":
            raise NotUnderstood("deletes a rule by its handle")
        else:
            raise NotUnderstood(f'expression "{word}"')
    if verdict != "accept":
        raise NotUnderstood(f"its verdict is {verdict or 'missing'}, not accept")
    if protos is not None:
        if proto is not None:
            protos = (proto,)
        if not set(protos) <= {"tcp", "udp"}:
            raise NotUnderstood(f"meta l4proto {','.join(protos)}: xknock opens tcp or udp ports")
    return _rule("nft", action, source, proto, ports, protos=protos)


def _ufw(args):
    words = [w for w in args if w not in ("--dry-run", "--force")]
    action = None
    if words[:1] == ["delete"]:
        action, words = "close", words[1:]
    elif words[:1] == ["insert"] and len(words) > 1 and words[1].isdigit():
        words = words[2:]
    elif words[:1] == ["prepend"]:
        words = words[1:]
    if not words or words[0] != "allow":
        raise NotUnderstood(f"`ufw {' '.join(words[:1])}` does not allow: only `ufw allow` opens a port")
    action = action or "open"
    words = words[1:]
    source = ports = proto = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("in",):
            i += 1
            continue
        if word == "out":
            raise NotUnderstood("allows outgoing traffic")
        if word == "app":
            raise NotUnderstood("opens an application profile; its ports are in /etc/ufw/applications.d")
        if word not in ("from", "to", "port", "proto", "on", "comment"):
            if i == 0 and source is None:
                raise NotUnderstood(f'"ufw allow {word}" opens to everyone, not to the knocker')
            raise NotUnderstood(f'word "{word}"')
        value = _take(words, i, word)
        if word == "from":
            source = value
        elif word == "port":
            ports = value
        elif word == "proto":
            proto = value.lower()
        i += 2
    # Without proto, ufw opens the port for TCP and UDP alike.
    protos = None if proto is not None else ("tcp", "udp")
    return _rule("ufw", action, source, proto, ports, protos=protos)


def _firewall_cmd(args):
    action = rich = None
    timeout_s = None
    i = 0
    while i < len(args):
        option, equals, value = args[i].partition("=")
        if option in ("--add-rich-rule", "--remove-rich-rule"):
            action = "open" if option == "--add-rich-rule" else "close"
            if not equals:
                value = _take(args, i, option)
                i += 1
            rich = value
        elif option == "--timeout":
            if not equals:
                value = _take(args, i, option)
                i += 1
            match = re.fullmatch(r"(\d+)([smh]?)", value)
            if not match:
                raise NotUnderstood(f'--timeout "{value}"')
            timeout_s = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
        elif option in ("--zone", "--permanent", "-q", "--quiet"):
            if option == "--zone" and not equals:
                i += 1
        else:
            raise NotUnderstood(f'option "{args[i]}" (only rich rules are understood)')
        i += 1
    if rich is None:
        raise NotUnderstood("adds no rich rule")
    fields = dict(re.findall(r'(\w+(?: \w+)?)="([^"]*)"', rich))
    source = fields.get("source address")
    port = fields.get("port port")
    proto = fields.get("protocol")
    if not re.search(r"\baccept\b", rich):
        raise NotUnderstood("its rich rule does not accept")
    if port is None and "port port" not in rich:
        raise NotUnderstood("its rich rule names no port")
    return _rule("firewall-cmd", action, source, proto, port.replace("-", ":") if port else None, timeout_s)


def _knock_helper(program, args):
    action = source = port = None
    proto, chain = "tcp", "INPUT"
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-a", "--append", "-i", "--insert"):
            action = "open"
        elif arg in ("-x", "--delete"):
            action = "close"
        elif arg in ("-f", "--srcaddr", "-d", "--dstport", "-p", "--proto", "-c", "--chain"):
            value = _take(args, i, arg)
            i += 1
            if arg in ("-f", "--srcaddr"):
                source = value
            elif arg in ("-d", "--dstport"):
                port = value
            elif arg in ("-p", "--proto"):
                proto = value.lower()
            else:
                chain = value
        elif arg.startswith(("-m", "--comment")) or arg in ("-v", "--verbose"):
            pass
        elif arg in ("-t", "--test"):
            raise NotUnderstood("a test run (-t) changes nothing")
        else:
            raise NotUnderstood(f'option "{arg}"')
        i += 1
    if action is None:
        raise NotUnderstood("neither appends (-a), inserts (-i) nor deletes (-x)")
    if chain != "INPUT":
        raise NotUnderstood(f"works on chain {chain}, not INPUT")
    return _rule(program, action, source, proto, port)


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


def _convert_door(door, taken_names, opened_by=None):
    """Door -> (Converted or None, [Note])."""
    notes = []
    s = door.settings

    def note(setting, reason, outcome):
        notes.append(Note(setting.line, door.name, str(setting), reason, outcome))

    def unset(key):
        return Setting(key, None, door.line)  # a note about a key the door lacks

    def door_dropped(setting, reason):
        note(setting, reason, "door dropped")
        return None, notes

    # The knock.
    if "ONE_TIME_SEQUENCES" in s:
        return door_dropped(s["ONE_TIME_SEQUENCES"],
                            "xknock has no one-time sequences, and a fixed sequence in their place could be replayed")
    if "SEQUENCE" not in s:
        return door_dropped(unset("sequence"), "not set: the door has no knock")
    try:
        steps = parse_sequence(s["SEQUENCE"].value)
    except ValueError as err:
        return door_dropped(s["SEQUENCE"], str(err))
    if len(steps) > layout.MAX_STEPS:
        return door_dropped(s["SEQUENCE"], f"{len(steps)} knocks; xknock takes at most {layout.MAX_STEPS}")

    # What it opens: the firewall rules its start command(s) add.
    if "START_COMMAND" not in s and "START_COMMAND_6" not in s:
        return door_dropped(unset("command"), "not set: the door runs nothing, so it opens nothing")
    found = _start_rules(door)
    opens = [(setting, part, m) for setting, part, m in found if isinstance(m, Rule) and m.action == "open"]
    closes = [(setting, part, m) for setting, part, m in found if isinstance(m, Rule) and m.action == "close"]
    unknown = [(setting, part, m) for setting, part, m in found if isinstance(m, NotUnderstood)]
    if not opens:
        if closes and not unknown:
            setting, _, rule = closes[0]
            undone = [name for name, steps in (opened_by or {}).items() if set(rule.ports) <= steps]
            what = f"removes the rule door {undone[0]} adds" if undone else "removes a rule"
            return door_dropped(setting, f"{what}; xknock grants end by themselves (open_for, then idle_timeout) "
                                         "and `xknock revoke` ends one at once: there is no closing knock")
        if unknown:
            setting = unknown[0][0]
            reasons = "; ".join(f"{part}{m}" for _, part, m in unknown)
        else:
            setting = s.get("START_COMMAND") or s["START_COMMAND_6"]
            reasons = "it is empty"
        return door_dropped(setting, f"no port to open can be read from it: {reasons}; "
                                     "write this [[sequence]] by hand")
    for setting, part, m in unknown:
        note(setting, f"{part}{m}", "dropped")
    for setting, part, _ in closes:
        note(setting, f"{part}removes a rule; xknock has no closing side effect", "dropped")
    opened = []
    for _, _, rule in opens:
        opened.extend(step for step in rule.ports if step not in opened)
    if "START_COMMAND_6" in s:
        v6 = s["START_COMMAND_6"]
        if not v6.value:
            note(v6, "empty: knockd does nothing for IPv6 knockers; xknock grants them the same ports as IPv4 "
                     "knockers", "changed")
        elif "START_COMMAND" in s:
            ports = {setting.key: {step for st, _, rule in opens if st is setting for step in rule.ports}
                     for setting in (s["START_COMMAND"], v6)}
            if len({frozenset(p) for p in ports.values()}) > 1:
                note(v6, "opens other ports than the IPv4 command; xknock opens the same ports to IPv4 and IPv6 "
                         f"knockers: {' '.join(map(str, opened))}", "changed")

    # step_timeout from seq_timeout: the whole sequence -> each gap.
    comments = {}
    if "SEQ_TIMEOUT" in s:
        timeout = s["SEQ_TIMEOUT"]
        seq_timeout_s = _atoi(timeout.value)
        if not re.fullmatch(r"\d+", timeout.value):
            note(timeout, f"read as {seq_timeout_s} seconds, as knockd reads it", "changed")
        written = timeout
    else:
        seq_timeout_s = KNOCKD_SEQ_TIMEOUT_S
        written = unset("seq_timeout")
    gaps = len(steps) - 1
    knockd_said = (f"knockd allows {seq_timeout_s}s for the whole sequence" if "SEQ_TIMEOUT" in s else
                   f"not set: knockd allows {seq_timeout_s}s (its default) for the whole sequence")
    if gaps == 0:
        step_timeout_ns = max(seq_timeout_s * SECONDS, STEP_TIMEOUT_FLOOR_NS)
        comments["step_timeout"] = f"knockd seq_timeout {seq_timeout_s}s; one knock has no gap to time"
    else:
        per_gap = seq_timeout_s * SECONDS // gaps
        step_timeout_ns = per_gap - per_gap % STEP_TIMEOUT_GRANULARITY_NS
        comments["step_timeout"] = f"knockd seq_timeout {seq_timeout_s}s / {gaps} gaps, rounded down"
        if step_timeout_ns < STEP_TIMEOUT_FLOOR_NS:
            step_timeout_ns = STEP_TIMEOUT_FLOOR_NS
            note(written, f"{knockd_said}, xknock times each gap: {seq_timeout_s}s / {gaps} gaps is below "
                          f"xknock's floor, step_timeout = {format_duration(step_timeout_ns)}, looser than knockd",
                 "changed")
        else:
            note(written, f"{knockd_said}, xknock times each gap: step_timeout = {seq_timeout_s}s / {gaps} gaps "
                          f"= {format_duration(step_timeout_ns)}, rounded down (never looser than knockd)", "changed")

    # tcpflags: xknock counts a TCP knock only as a SYN without ACK.
    has_tcp = any(step.proto == "tcp" for step in steps)
    if "TCPFLAGS" in s:
        setting = s["TCPFLAGS"]
        try:
            flags = parse_tcpflags(setting.value)
        except ValueError as err:
            note(setting, str(err), "dropped")
            flags = None
        if flags is not None and has_tcp:
            required = {name for name, wanted in flags.items() if wanted}
            excluded = {name for name, wanted in flags.items() if not wanted}
            if required != {"SYN"}:
                note(setting, "xknock counts SYN only (a SYN without ACK, what `knock` sends); knock with plain "
                              "SYNs", "dropped")
            elif excluded - {"ACK"}:
                ignored = ",".join(f"!{name.lower()}" for name in TCP_FLAGS if name in excluded - {"ACK"})
                note(setting, f"xknock counts SYN only (without ACK) and does not look at {ignored}", "changed")
    elif has_tcp:
        note(unset("tcpflags"), "not set: knockd counts any TCP packet, xknock counts SYN only (a SYN without "
                                "ACK, what `knock` sends)", "changed")

    if "TARGET" in s:
        note(s["TARGET"], "xknock counts knocks to any address on the interface it is attached to", "dropped")

    # open_for: how long knockd kept the rule (cmd_timeout, when a stop command
    # removes it again).
    stops = [s[key] for key in ("STOP_COMMAND", "STOP_COMMAND_6") if key in s and s[key].value]
    firewall_timeouts = [rule.timeout_s for _, _, rule in opens if rule.timeout_s]
    if stops:
        for setting in stops:
            for part, m in parse_command(setting.value):
                if isinstance(m, NotUnderstood):
                    note(setting, f"{part}{m}; xknock ends the window after open_for by itself", "dropped")
                elif m.action != "close" or not set(m.ports) <= set(opened):
                    note(setting, f"{part}does more than remove what the start command added; xknock ends the "
                                  "window after open_for by itself", "dropped")
        if "CMD_TIMEOUT" in s:
            cmd_timeout_s = _atoi(s["CMD_TIMEOUT"].value)
            comments["open_for"] = f"knockd cmd_timeout {cmd_timeout_s}s"
        else:
            cmd_timeout_s = KNOCKD_CMD_TIMEOUT_S
            comments["open_for"] = f"knockd's default cmd_timeout, {KNOCKD_CMD_TIMEOUT_S}s"
        open_for_ns = cmd_timeout_s * SECONDS
        if open_for_ns < OPEN_FOR_FLOOR_NS:
            open_for_ns = OPEN_FOR_FLOOR_NS
            note(s["CMD_TIMEOUT"], f"xknock's open_for must be more than zero: {format_duration(open_for_ns)}", "changed")
    elif firewall_timeouts:
        open_for_ns = min(firewall_timeouts) * SECONDS
        comments["open_for"] = "the firewall rule's --timeout"
    else:
        open_for_ns = DEFAULT_OPEN_FOR_NS
        comments["open_for"] = "xknock's default: knockd had no stop_command"
        if "CMD_TIMEOUT" in s:
            note(s["CMD_TIMEOUT"], "knockd uses it only with a stop_command", "ignored")
        note(unset("stop_command"), "not set: knockd's rule stayed until something removed it; xknock accepts new "
                                    f"connections for open_for = {format_duration(open_for_ns)} (its default), established "
                                    "ones while they are active", "changed")

    name = _sanitize_name(door.name, taken_names)
    if name != door.name:
        note(unset("name"), f"xknock names are 1-{NAME_MAX_BYTES} of A-Z a-z 0-9 _ . -: renamed {name}", "changed")
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
    return converted, notes


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
