"""Loads and validates the TOML configuration. Pure: it reads the config file
(and /proc/net and the hook commands' files, for warnings) and touches nothing
else. Every mistake in a file is found in one pass and named by its place, so a
bad config is fixed in one edit, never in a loop of edit, reload, next error."""

import dataclasses
import difflib
import hashlib
import ipaddress
import json
import os
import re
import sys
import tomllib

from ..kernel import layout

DEFAULT_PATH = "/etc/xknock/xknock.toml"

NS_PER_UNIT = {
    "d": 86_400_000_000_000,
    "h": 3_600_000_000_000,
    "m": 60_000_000_000,
    "s": 1_000_000_000,
    "ms": 1_000_000,
}
# Far beyond any sensible timeout, and far below where the data path's u64
# nanosecond arithmetic (now + open_for) could wrap.
MAX_DURATION_NS = 365 * NS_PER_UNIT["d"]
MAX_STEP_TIMEOUT_NS = NS_PER_UNIT["h"]
DURATION_HINT = "use e.g. 500ms, 5s, 2m, 1h"

DEFAULT_STEP_TIMEOUT_NS = 5 * NS_PER_UNIT["s"]
DEFAULT_OPEN_FOR_NS = 30 * NS_PER_UNIT["s"]
DEFAULT_IDLE_TIMEOUT_NS = 15 * NS_PER_UNIT["m"]

NAME_MAX_BYTES = 31  # struct xk_seq.name is char[32], NUL included
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# The list maps hold both policy banks, so one config gets half of each.
MAX_LIST_SOURCES = layout.LIST_ENTRIES // 2
# Below this many steps a sequence is cheap to find by scanning.
SHORT_SEQUENCE_STEPS = 3

STEP_PROTOS = ("tcp", "udp", "icmp")
OPENABLE_PROTOS = ("tcp", "udp")

TOP_LEVEL_KEYS = ("filter", "sequence", "allow", "deny", "ban", "hooks", "spa")
RESERVED_TABLES = ("limits",)  # taken by features still to come
BAN_KEYS = ("after", "within", "for", "scope", "on_ban")
BAN_SCOPES = {"all": layout.BAN_EVERYWHERE, "knock": layout.BAN_KNOCK_PORTS}
DEFAULT_BAN_WITHIN_NS = 60 * NS_PER_UNIT["s"]
DEFAULT_BAN_FOR_NS = 10 * NS_PER_UNIT["m"]
MAX_BAN_AFTER = 1000
FILTER_KEYS = ("mode", "strict")
SEQUENCE_KEYS = ("name", "knock", "step_timeout", "open", "open_for", "idle_timeout", "on_open", "on_close",
                 "totp", "secret", "secret_file", "window", "port_range")
HOOKS_KEYS = ("timeout", "max_running")
DEFAULT_HOOK_TIMEOUT_NS = 10 * NS_PER_UNIT["s"]
MAX_HOOK_TIMEOUT_NS = NS_PER_UNIT["h"]
DEFAULT_HOOK_MAX_RUNNING = 8
MAX_HOOK_MAX_RUNNING = 256
HOOK_EXAMPLE = '["/usr/local/bin/notify", "opened"]'
LIST_KEYS = ("sources",)

# /proc/net socket states: TCP_LISTEN for tcp; an unconnected (bound, listening)
# UDP socket sits in TCP_CLOSE.
PROC_NET_LISTENING = (("tcp", "tcp", "0A"), ("tcp", "tcp6", "0A"), ("udp", "udp", "07"), ("udp", "udp6", "07"))


class ConfigError(Exception):
    """A config that cannot be used; .errors holds every problem found."""

    def __init__(self, errors, warnings=()):
        self.errors = list(errors)
        self.warnings = list(warnings)
        super().__init__("\n".join(self.errors))


@dataclasses.dataclass(frozen=True)
class Step:
    """One knock, or one port a sequence opens."""

    proto: str  # "tcp" | "udp" | "icmp"
    port: int  # 0 for icmp

    def __str__(self):
        return self.proto if self.proto == "icmp" else f"{self.proto}:{self.port}"

    @property
    def proto_number(self):
        return layout.PROTO_NUMBERS[self.proto]


@dataclasses.dataclass(frozen=True)
class Sequence:
    name: str
    knock: tuple[Step, ...]
    step_timeout_ns: int
    open: tuple[Step, ...]
    open_for_ns: int
    idle_timeout_ns: int
    # Commands (argv, never a shell string) run when a grant of this sequence
    # opens and when it has closed. Not part of the filter: configs that filter
    # alike compare equal whatever their hooks.
    on_open: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    on_close: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    # A time-based sequence (controller/totp.py): knock is empty, the ports
    # of each window come from totp; totp.variant() makes the concrete ones.
    totp: object = None


@dataclasses.dataclass(frozen=True)
class Hooks:
    """[hooks]: how hook commands run (controller/hooks.py)."""

    timeout_ns: int = DEFAULT_HOOK_TIMEOUT_NS   # a hook still running after this is killed
    max_running: int = DEFAULT_HOOK_MAX_RUNNING  # hooks started beyond this are dropped, not queued


@dataclasses.dataclass(frozen=True)
class Ban:
    """[ban]: `after` failed sequences (resets or time-outs) of one source
    `within` a period ban it `for` a while, on every port or only on knock and
    guarded ports (`scope`)."""

    after: int
    within_ns: int
    for_ns: int
    scope: str  # "all" | "knock"
    on_ban: tuple[str, ...] = dataclasses.field(default=(), compare=False)   # argv run when a source is banned


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str  # "enforce" | "monitor"
    sequences: tuple[Sequence, ...]
    strict: bool = False   # a packet to any other port resets the source's knock progress
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ban: Ban | None = None   # None: failed knocks ban nobody
    hooks: Hooks = dataclasses.field(default=Hooks(), compare=False)
    spa: object = None   # spa_config.Spa, or None: no SPA port
    # Where it came from and what was said about it: not part of the policy,
    # so two configs that filter alike compare equal.
    path: str | None = dataclasses.field(default=None, compare=False)
    warnings: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def openers(self):
        """(steps opened, idle timeout) of every sequence and SPA user."""
        yield from ((seq.open, seq.idle_timeout_ns) for seq in self.sequences)
        if self.spa is not None:
            yield from ((user.open, user.idle_timeout_ns) for user in self.spa.users)

    @property
    def guarded(self):
        """Every Step the policy guards: what sequences and SPA users open."""
        return tuple(dict.fromkeys(step for steps, _ in self.openers() for step in steps))


def parse_step(text):
    """"tcp:7000", "udp:8000" or "icmp" -> Step; ValueError with a short reason."""
    spec = text.strip().lower()
    if not spec:
        raise ValueError("empty: write tcp:PORT, udp:PORT or icmp")
    proto, colon, port = spec.partition(":")
    if not colon:
        if spec == "icmp":
            return Step("icmp", 0)
        if spec in OPENABLE_PROTOS:
            raise ValueError(f"{spec} needs a port: write {spec}:PORT")
        if spec.isascii() and spec.isdigit():
            raise ValueError(f"no protocol: say tcp:{spec} or udp:{spec}")
        raise ValueError("not a step: write tcp:PORT, udp:PORT or icmp")
    if port in STEP_PROTOS and proto.isascii() and proto.isdigit():
        # knockd's own order; ours puts the protocol first.
        raise ValueError(f"write it {port}:{proto}" if port != "icmp" else "write it icmp")
    if proto == "icmp":
        raise ValueError("icmp has no port: write just icmp (an echo request)")
    if proto not in OPENABLE_PROTOS:
        raise ValueError(f'unknown protocol "{proto}": use tcp, udp or icmp')
    if not re.fullmatch(r"[0-9]+", port):
        raise ValueError(f'port "{port}" is not a number')
    number = int(port) if len(port) <= 5 else 0
    if not 1 <= number <= 65535:
        raise ValueError("port out of range 1-65535")
    return Step(proto, number)


def parse_duration(text, *, allow_zero=False):
    """"500ms", "5s", "1m30s", "2h", "1d" -> nanoseconds; ValueError with a reason."""
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty ({DURATION_HINT})")
    if spec.startswith("-"):
        raise ValueError("cannot be negative")
    if spec.isascii() and spec.isdigit():
        raise ValueError(f"no unit: say {spec}s or {spec}ms ({DURATION_HINT})")
    parts = re.findall(r"([0-9]+)(ms|d|h|m|s)", spec)
    if not parts or "".join(number + unit for number, unit in parts) != spec:
        raise ValueError(f"not a duration ({DURATION_HINT})")
    units = [unit for _, unit in parts]
    order = list(NS_PER_UNIT)
    if units != sorted(set(units), key=order.index):
        raise ValueError("units out of order: largest first, each once, e.g. 1m30s")
    total = sum(int(number) * NS_PER_UNIT[unit] for number, unit in parts)
    if total == 0 and not allow_zero:
        raise ValueError("must be more than zero")
    if total > MAX_DURATION_NS:
        raise ValueError("too long: at most 365d")
    return total


def format_duration(ns):
    """Nanoseconds -> the shortest config spelling, e.g. 90 s -> "1m30s"."""
    if ns == 0:
        return "0s"
    parts = []
    for unit, size in NS_PER_UNIT.items():
        count, ns = divmod(ns, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) + (f"{ns}ns" if ns else "")


def listening_ports(proc_net="/proc/net"):
    """{("tcp", 22), ("udp", 53), ...}: ports a local socket listens on, other
    than on loopback alone (which XDP on a real interface never sees)."""
    found = set()
    for proto, filename, listening_state in PROC_NET_LISTENING:
        try:
            with open(f"{proc_net}/{filename}", encoding="ascii") as table:
                rows = table.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6, or no /proc: nothing to warn about
        for row in rows:
            fields = row.split()
            if len(fields) < 4 or fields[3] != listening_state:
                continue
            address_hex, _, port_hex = fields[1].partition(":")
            if _proc_address_is_loopback(address_hex):
                continue
            found.add((proto, int(port_hex, 16)))
    return found


def _proc_address_is_loopback(address_hex):
    # /proc prints each 32-bit word of the address as a native-endian integer.
    try:
        words = [int(address_hex[i : i + 8], 16) for i in range(0, len(address_hex), 8)]
        raw = b"".join(word.to_bytes(4, sys.byteorder) for word in words)
        address = ipaddress.ip_address(raw)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def load_config(path=DEFAULT_PATH, *, listening=None):
    """Reads and validates the file at path; ConfigError lists what is wrong."""
    try:
        with open(path, "rb") as config_file:
            raw = config_file.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file (create it, or pass -c PATH)"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied (run as root, or pass -c PATH)"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a config file"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text (byte {err.start})"]) from None
    return parse_config(text, path, listening=listening)


def parse_config(text, path=None, *, listening=None):
    """TOML text -> Config. listening: the set listening_ports() returns, or
    None to read it from /proc."""
    prefix = f"{path}: " if path else ""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([prefix + _toml_error_message(err, text)]) from None

    report = _Report(path)
    _check_keys(report, None, document, TOP_LEVEL_KEYS)

    mode, strict = _parse_filter(report, document.get("filter", {}))
    sequences = _parse_sequences(report, document.get("sequence", []))
    allow = _parse_sources(report, "allow", document.get("allow", {}))
    deny = _parse_sources(report, "deny", document.get("deny", {}))
    _check_allow_deny_overlap(report, allow, deny)
    ban = _parse_ban(report, document["ban"]) if "ban" in document else None
    hooks = _parse_hooks(report, document.get("hooks", {}))
    spa = None
    if "spa" in document:
        from . import spa_config

        spa = spa_config.parse_spa(report, document["spa"], path)
        if spa is not None:
            spa_config.check_spa_ports(report, spa, sequences)
    if any(sequence.totp for sequence in sequences):
        _check_totp_ranges(report, sequences, spa)

    if not report.errors:
        if not sequences and spa is None:
            report.warn(None, "no sequences: nothing is guarded")
        # /proc is read only when a knock port could collide with a listener.
        if any(step.proto != "icmp" for sequence in sequences for step in sequence.knock):
            if listening is None:
                listening = listening_ports()
            _warn_listening_knock_ports(report, sequences, listening)
        if any(sequence.totp for sequence in sequences):
            from .totp_config import ephemeral_ports

            if listening is None:   # this host's own sockets and ports, not a test's
                listening = listening_ports()
                _warn_totp_ranges(report, sequences, listening, ephemeral_ports())
            else:
                _warn_totp_ranges(report, sequences, listening, None)

    warnings = [prefix + warning for warning in report.warnings]
    if report.errors:
        raise ConfigError([prefix + error for error in report.errors], warnings)
    return Config(
        mode=mode,
        strict=strict,
        sequences=tuple(sequences),
        allow=tuple(network for network, _ in allow),
        deny=tuple(network for network, _ in deny),
        ban=ban,
        hooks=hooks,
        spa=spa,
        path=path,
        warnings=tuple(warnings),
    )


def config_hash(config):
    """A short digest of what the config filters, stable across key order,
    comments and list order, for status and metrics to tell configs apart."""
    normalized = {
        "mode": config.mode,
        "sequences": sorted(
            (
                {
                    "name": sequence.name,
                    "knock": [str(step) for step in sequence.knock],
                    "step_timeout_ns": sequence.step_timeout_ns,
                    "open": sorted(str(step) for step in sequence.open),
                    "open_for_ns": sequence.open_for_ns,
                    "idle_timeout_ns": sequence.idle_timeout_ns,
                } | ({"totp": [sequence.totp.window_ns, sequence.totp.port_low, sequence.totp.port_high,
                               list(sequence.totp.protos)]} if sequence.totp else {})
                for sequence in config.sequences
            ),
            key=lambda sequence: sequence["name"],
        ),
        "allow": sorted(str(network) for network in config.allow),
        "deny": sorted(str(network) for network in config.deny),
        "ban": {key: value for key, value in dataclasses.asdict(config.ban).items() if key != "on_ban"}
        if config.ban else None,
    }
    if config.strict:   # only when set, so that every config from before strict mode keeps its hash
        normalized["strict"] = True
    if config.spa is not None:   # keys never enter the hash, not even hashed: a weak key could be guessed
        spa = config.spa
        normalized["spa"] = {
            "port": spa.port, "max_age_ns": spa.max_age_ns, "rate": spa.rate, "total_rate": spa.total_rate,
            "users": sorted(
                ({"name": u.name, "digest": u.hmac_digest, "sources": sorted(map(str, u.sources)),
                  "open": sorted(map(str, u.open)), "open_for_ns": u.open_for_ns, "max_open_for_ns": u.max_open_for_ns,
                  "idle_timeout_ns": u.idle_timeout_ns, "username": u.username,
                  "require_source_address": u.require_source_address,
                  "grant_requested_address": u.grant_requested_address}
                 for u in spa.users), key=lambda u: u["name"]),
        }
    encoded = json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


class _Report:
    """Collects errors and warnings, each led by the place it concerns."""

    def __init__(self, path=None):
        self.path = path   # the config file, for checks of who may read the secrets in it
        self.errors = []
        self.warnings = []

    def error(self, place, message):
        self.errors.append(f"{place}: {message}" if place else message)

    def warn(self, place, message):
        self.warnings.append(f"{place}: {message}" if place else message)


def _toml_error_message(err, text):
    message = str(err)
    at_line = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if at_line:
        line, column = at_line.groups()
        return f"line {line}: {message[: at_line.start()]} (column {column})"
    if message.endswith(" (at end of document)"):
        last_line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return f"line {max(last_line, 1)}: {message[: -len(' (at end of document)')]} (at end of file)"
    return message


def _type_name(value):
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _check_keys(report, place, table, known):
    for key, value in table.items():
        if key in known:
            continue
        if place is None and key in RESERVED_TABLES:
            report.error(key, "not supported yet in this version")
            continue
        if place is None:
            kind = "table" if isinstance(value, dict) or _is_table_array(value) else "key"
            what = f'unknown {kind} "{key}"'
        else:
            what = f'unknown key "{key}"'
        guess = difflib.get_close_matches(key, known, n=1)
        hint = f' (did you mean "{guess[0]}"?)' if guess else ""
        report.error(place, f"{what}; known: {', '.join(known)}{hint}")


def _is_table_array(value):
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _parse_filter(report, table):
    """(mode, strict) of the [filter] table."""
    if not isinstance(table, dict):
        report.error("filter", f"must be a table ([filter]), not {_type_name(table)}")
        return "enforce", False
    _check_keys(report, "filter", table, FILTER_KEYS)
    strict = table.get("strict", False)
    if not isinstance(strict, bool):
        report.error("filter", f"strict must be true or false, not {_type_name(strict)}")
        strict = False
    mode = table.get("mode", "enforce")
    if not isinstance(mode, str):
        report.error("filter", f'mode must be a string ("enforce" or "monitor"), not {_type_name(mode)}')
        return "enforce", strict
    if mode not in layout.MODES:
        report.error("filter", f'mode "{mode}": must be "enforce" or "monitor"')
    return mode, strict


def _parse_ban(report, table):
    if not isinstance(table, dict):
        report.error("ban", f"must be a table ([ban]), not {_type_name(table)}")
        return None
    _check_keys(report, "ban", table, BAN_KEYS)
    after = table.get("after")
    if after is None:
        report.error("ban", 'missing key "after" (how many failed sequences ban a source, e.g. after = 5)')
        after = 1
    elif not isinstance(after, int) or isinstance(after, bool) or not 1 <= after <= MAX_BAN_AFTER:
        report.error("ban", f"after {after!r}: must be a whole number from 1 to {MAX_BAN_AFTER}")
        after = 1
    within = _parse_duration_key(report, "ban", table, "within", DEFAULT_BAN_WITHIN_NS)
    ban_for = _parse_duration_key(report, "ban", table, "for", DEFAULT_BAN_FOR_NS)
    scope = table.get("scope", "all")
    if scope not in BAN_SCOPES:
        report.error("ban", f'scope {scope!r}: must be "all" (every port) or "knock" (knock and guarded ports)')
        scope = "all"
    on_ban = _parse_hook(report, "ban", table, "on_ban")
    return Ban(after=after, within_ns=within, for_ns=ban_for, scope=scope, on_ban=on_ban)


def _parse_hooks(report, table):
    if not isinstance(table, dict):
        report.error("hooks", f"must be a table ([hooks]), not {_type_name(table)}")
        return Hooks()
    _check_keys(report, "hooks", table, HOOKS_KEYS)
    timeout_ns = _parse_duration_key(report, "hooks", table, "timeout", DEFAULT_HOOK_TIMEOUT_NS)
    if timeout_ns > MAX_HOOK_TIMEOUT_NS:
        report.error("hooks", f'timeout "{table["timeout"]}": too long: at most 1h')
        timeout_ns = DEFAULT_HOOK_TIMEOUT_NS
    max_running = table.get("max_running", DEFAULT_HOOK_MAX_RUNNING)
    if (not isinstance(max_running, int) or isinstance(max_running, bool)
            or not 1 <= max_running <= MAX_HOOK_MAX_RUNNING):
        report.error("hooks", f"max_running {max_running!r}: must be a whole number from 1 to {MAX_HOOK_MAX_RUNNING}")
        max_running = DEFAULT_HOOK_MAX_RUNNING
    return Hooks(timeout_ns=timeout_ns, max_running=max_running)


def _parse_hook(report, place, table, key):
    """A hook command: an argv array whose first element is an absolute path.
    () when absent or wrong (reported). A file that is missing or not executable
    only warns: it may be deployed after the config."""
    if key not in table:
        return ()
    argv = table[key]
    if isinstance(argv, str):
        report.error(place, f"{key} must be an array of strings (the command and its arguments, run without a "
                            f"shell), e.g. {HOOK_EXAMPLE}, not a string; for a shell write "
                            f'["/bin/sh", "-c", "..."]')
        return ()
    if not isinstance(argv, list):
        report.error(place, f"{key} must be an array of strings such as {HOOK_EXAMPLE}, not {_type_name(argv)}")
        return ()
    if not argv:
        report.error(place, f"{key} is empty; give the command to run, e.g. {HOOK_EXAMPLE}")
        return ()
    errors_before = len(report.errors)
    for index, item in enumerate(argv):
        if not isinstance(item, str):
            report.error(place, f"{key}[{index}] must be a string, not {_type_name(item)}")
        elif "\0" in item:
            report.error(place, f"{key}[{index}] contains a NUL character")
    if len(report.errors) > errors_before:
        return ()
    command = argv[0]
    if not os.path.isabs(command):
        report.error(place, f'{key}[0] "{command}": must be an absolute path (hooks run with a minimal PATH), '
                            f"e.g. /usr/local/bin/{os.path.basename(command) or 'notify'}")
        return ()
    if not os.path.exists(command):
        report.warn(place, f'{key}[0] "{command}": no such file (yet); the hook fails until it is there')
    elif not os.path.isfile(command):
        report.warn(place, f'{key}[0] "{command}": not a file; the hook fails')
    elif not os.access(command, os.X_OK):
        report.warn(place, f'{key}[0] "{command}": not executable; the hook fails until it is (chmod +x)')
    return tuple(argv)


def _parse_sequences(report, tables):
    if isinstance(tables, dict):
        report.error("sequence", "must be an array of tables: write [[sequence]], not [sequence]")
        return []
    if not isinstance(tables, list):
        report.error("sequence", f"must be an array of tables ([[sequence]]), not {_type_name(tables)}")
        return []
    if len(tables) > layout.MAX_SEQUENCES:
        report.error("sequence", f"{len(tables)} sequences; at most {layout.MAX_SEQUENCES}")

    sequences = []
    first_index_of_name = {}
    for index, table in enumerate(tables):
        place = f"sequence[{index}]"
        if not isinstance(table, dict):
            report.error(place, f"must be a table ([[sequence]]), not {_type_name(table)}")
            continue
        name = _parse_name(report, place, table)
        if name is not None and name in first_index_of_name:
            report.error(place, f'name "{name}" is already used by sequence[{first_index_of_name[name]}]')
            name = None
        if name is not None:
            first_index_of_name[name] = index
            place = f'sequence "{name}"'
        sequence = _parse_sequence(report, place, name, table)
        if sequence is not None:
            sequences.append(sequence)

    live = len(sequences) + sum(1 for sequence in sequences if sequence.totp)
    if len(tables) <= layout.MAX_SEQUENCES < live:
        report.error("sequence", f"{live} sequences live at once (a time-based one takes two: this window's and "
                                 f"its neighbour's); at most {layout.MAX_SEQUENCES}")
    _check_across_sequences(report, sequences)
    return sequences


def _parse_name(report, place, table):
    if "name" not in table:
        report.error(place, 'missing key "name"')
        return None
    name = table["name"]
    if not isinstance(name, str):
        report.error(place, f"name must be a string, not {_type_name(name)}")
        return None
    if not name:
        report.error(place, "name is empty")
        return None
    if not NAME_PATTERN.fullmatch(name):
        report.error(place, f'name "{name}": use only letters, digits, "_", "." and "-"')
        return None
    size = len(name.encode())
    if size > NAME_MAX_BYTES:
        report.error(place, f'name "{name}" is {size} bytes; at most {NAME_MAX_BYTES}')
        return None
    return name


def _parse_sequence(report, place, name, table):
    """The sequence, or None when anything in it is wrong (already reported)."""
    errors_before = len(report.errors)
    _check_keys(report, place, table, SEQUENCE_KEYS)
    totp = None
    if table.get("totp", False) is True:
        from . import totp_config

        knock = ()
        totp = totp_config.parse_totp(report, place, table, report.path, layout.MAX_STEPS)
    else:
        if "totp" in table and table["totp"] is not False:
            report.error(place, f"totp must be true or false, not {_type_name(table['totp'])}")
        for key in ("secret", "secret_file", "window", "port_range"):
            if key in table:
                report.error(place, f'{key} belongs to time-based sequences: add totp = true, or remove {key}')
        knock = _parse_knock(report, place, table)
    step_timeout_ns = _parse_duration_key(report, place, table, "step_timeout", DEFAULT_STEP_TIMEOUT_NS)
    if step_timeout_ns > MAX_STEP_TIMEOUT_NS:
        report.error(place, f"step_timeout {format_duration(step_timeout_ns)}: at most 1h "
                            "(the first-step filter keeps 32 bits of microseconds)")
    opened = _parse_open(report, place, table)
    open_for_ns = _parse_duration_key(report, place, table, "open_for", DEFAULT_OPEN_FOR_NS)
    idle_timeout_ns = _parse_duration_key(report, place, table, "idle_timeout", DEFAULT_IDLE_TIMEOUT_NS)
    on_open = _parse_hook(report, place, table, "on_open")
    on_close = _parse_hook(report, place, table, "on_close")
    if name is None or len(report.errors) > errors_before:
        return None
    return Sequence(name, knock, step_timeout_ns, opened, open_for_ns, idle_timeout_ns, on_open, on_close, totp)


def _step_list(report, place, table, key, example):
    """The raw list under key, checked to be a non-empty array; None if not."""
    if key not in table:
        report.error(place, f'missing key "{key}"')
        return None
    items = table[key]
    if not isinstance(items, list):
        report.error(place, f"{key} must be an array such as {example}, not {_type_name(items)}")
        return None
    if not items:
        report.error(place, f"{key} is empty; give at least one step such as {example}")
        return None
    return items


def _parse_steps(report, place, key, items):
    """(index, text, Step) for every entry that parses; the rest are reported."""
    parsed = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            report.error(place, f'{key}[{index}] must be a string such as "tcp:7000", not {_type_name(item)}')
            continue
        try:
            parsed.append((index, item, parse_step(item)))
        except ValueError as err:
            report.error(place, f'{key}[{index}] "{item}": {err}')
    return parsed


def _parse_knock(report, place, table):
    items = _step_list(report, place, table, "knock", '["tcp:7000", "udp:8000", "tcp:9000"]')
    if items is None:
        return ()
    if len(items) > layout.MAX_STEPS:
        report.error(place, f"knock has {len(items)} steps; at most {layout.MAX_STEPS}")
    parsed = _parse_steps(report, place, "knock", items)
    previous = None
    for index, text, step in parsed:
        if previous is not None and previous[0] == index - 1 and previous[1] == step:
            # The data path ignores a repeat of the step just accepted (a SYN
            # retransmitted, a doubled UDP packet), so this step could never advance.
            report.error(
                place,
                f'knock[{index}] "{text}": same as knock[{index - 1}]; a repeated knock '
                "is taken for a retransmission and ignored",
            )
        previous = (index, step)
    if len(items) < SHORT_SEQUENCE_STEPS:
        report.warn(place, f"only {len(items)} knock step(s); a short sequence is easy to guess")
    for index, text, step in parsed:
        if step.proto == "icmp":
            report.warn(
                place,
                f'knock[{index}] "{text}": every echo request is a knock and is dropped, '
                "so this host no longer answers ping",
            )
            break
    return tuple(step for _, _, step in parsed)


def _parse_open(report, place, table):
    items = _step_list(report, place, table, "open", '["tcp:22"]')
    if items is None:
        return ()
    opened = []
    first_index_of_step = {}
    for index, text, step in _parse_steps(report, place, "open", items):
        if step.proto not in OPENABLE_PROTOS:
            report.error(place, f'open[{index}] "{text}": {step.proto} cannot be opened; use tcp:PORT or udp:PORT')
            continue
        if step in first_index_of_step:
            report.warn(place, f'open[{index}] "{text}": same as open[{first_index_of_step[step]}]; ignored')
            continue
        first_index_of_step[step] = index
        opened.append(step)
    if len(opened) > layout.MAX_OPEN:
        report.error(place, f"open has {len(opened)} ports; at most {layout.MAX_OPEN}")
    return tuple(opened)


def _parse_duration_key(report, place, table, key, default_ns):
    if key not in table:
        return default_ns
    value = table[key]
    if not isinstance(value, str):
        report.error(place, f'{key} must be a string such as "{format_duration(default_ns)}", not {_type_name(value)}')
        return default_ns
    try:
        return parse_duration(value)
    except ValueError as err:
        report.error(place, f'{key} "{value}": {err}')
        return default_ns


def _check_across_sequences(report, sequences):
    knocked_by = {}  # Step -> names of the sequences it is a knock step of
    for sequence in sequences:
        for step in sequence.knock:
            names = knocked_by.setdefault(step, [])
            if sequence.name not in names:
                names.append(sequence.name)

    for sequence in sequences:
        for index, step in enumerate(sequence.open):
            names = knocked_by.get(step)
            if names:
                # A port is either guarded or a knock: the data path classifies it once.
                owners = ", ".join(f'"{name}"' for name in names)
                noun = "sequence" if len(names) == 1 else "sequences"
                report.error(
                    f'sequence "{sequence.name}"', f'open[{index}] "{step}" is also a knock step of {noun} {owners}'
                )

    for step, names in knocked_by.items():
        if len(names) > layout.MAX_SEQS_PER_PORT:
            owners = ", ".join(f'"{name}"' for name in names)
            report.error(
                None,
                f'knock step "{step}" is shared by {len(names)} sequences ({owners}); '
                f"at most {layout.MAX_SEQS_PER_PORT} may share one",
            )


def _check_totp_ranges(report, sequences, spa):
    """A time-based sequence's range may hold no port the policy uses otherwise
    (knock steps, opened ports, the SPA port), and no other one's range, for
    the same protocol: the data path classifies each port once."""
    taken = [(step, f'a knock step of sequence "{seq.name}"') for seq in sequences for step in seq.knock]
    taken += [(step, "a guarded port") for seq in sequences for step in seq.open]
    if spa is not None:
        taken += [(spa.port_step, "the SPA port")] + [(step, "a guarded port") for step in spa.guarded]
    timed = [seq for seq in sequences if seq.totp]
    for index, seq in enumerate(timed):
        low, high, protos = seq.totp.port_low, seq.totp.port_high, set(seq.totp.protos)
        for step, what in taken:
            if step.proto in protos and low <= step.port <= high:
                report.error(f'sequence "{seq.name}"', f"port_range {low}-{high} holds {step}, {what}")
        for other in timed[index + 1:]:
            if (protos & set(other.totp.protos) and low <= other.totp.port_high
                    and other.totp.port_low <= high):
                report.error(f'sequence "{seq.name}"', f'port_range {low}-{high} overlaps the range of sequence '
                                                      f'"{other.name}" for the same protocol')


def _warn_totp_ranges(report, sequences, listening, ephemeral):
    for seq in sequences:
        if not seq.totp:
            continue
        low, high = seq.totp.port_low, seq.totp.port_high
        inside = sorted(f"{proto}:{port}" for proto, port in listening
                        if proto in seq.totp.protos and low <= port <= high)
        if inside:
            report.warn(f'sequence "{seq.name}"', f"port_range {low}-{high} holds listening sockets "
                                                  f"({', '.join(inside)}): unreachable in windows that knock on them")
        if ephemeral and low <= ephemeral[1] and ephemeral[0] <= high:
            report.warn(f'sequence "{seq.name}"', f"port_range {low}-{high} overlaps the local ephemeral ports "
                                                  f"{ephemeral[0]}-{ephemeral[1]}: replies to outgoing connections "
                                                  "that land on a knock port are dropped")


def _warn_listening_knock_ports(report, sequences, listening):
    for sequence in sequences:
        for index, step in enumerate(sequence.knock):
            if (step.proto, step.port) in listening:
                report.warn(
                    f'sequence "{sequence.name}"',
                    f'knock[{index}] "{step}": a local socket listens on this port; '
                    "knock packets are always dropped, so it becomes unreachable",
                )


def _parse_sources(report, list_name, table):
    """[(network, index)] of one source list, duplicates dropped with a warning."""
    if not isinstance(table, dict):
        report.error(list_name, f'must be a table with a "sources" array ([{list_name}]), not {_type_name(table)}')
        return []
    _check_keys(report, list_name, table, LIST_KEYS)
    items = table.get("sources", [])
    if not isinstance(items, list):
        report.error(
            list_name,
            f'sources must be an array such as ["192.0.2.10", "2001:db8::/32"], not {_type_name(items)}',
        )
        return []
    networks = []
    first_index_of_network = {}
    for index, item in enumerate(items):
        if not isinstance(item, str):
            report.error(list_name, f"sources[{index}] must be a string, not {_type_name(item)}")
            continue
        try:
            network = _parse_network(item)
        except ValueError as err:
            report.error(list_name, f'sources[{index}] "{item}": {err}')
            continue
        if network in first_index_of_network:
            first = first_index_of_network[network]
            report.warn(list_name, f'sources[{index}] "{item}": same as sources[{first}]; ignored')
            continue
        first_index_of_network[network] = index
        networks.append((network, index))
        if network.prefixlen == 0:
            # Legal, and sometimes meant, but more often a lockout or an open door.
            family = f"IPv{network.version}"
            if list_name == "allow":
                report.warn(list_name, f'sources[{index}] "{item}": every {family} source may reach every guarded port')
            else:
                report.warn(list_name, f'sources[{index}] "{item}": every {family} packet is dropped, yours too')
    if len(networks) > MAX_LIST_SOURCES:
        report.error(list_name, f"{len(networks)} sources; at most {MAX_LIST_SOURCES}")
    return networks


def _parse_network(text):
    """"192.0.2.10", "2001:db8::/32" -> network; a bare address is a /32 or /128."""
    if "%" in text:
        raise ValueError("a zone index (%...) has no meaning in a source list")
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as err:
        if "has host bits set" not in str(err):
            raise ValueError("not an IP address or CIDR") from None
        loose = ipaddress.ip_network(text.strip(), strict=False)
        address = text.strip().partition("/")[0]
        raise ValueError(f"host bits set: write {loose} for the network, or {address} for one address") from None
    # The data path keeps IPv4 as IPv4-mapped IPv6; spelling those as IPv4
    # lets duplicates and allow/deny clashes be seen whichever way they are written.
    if network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped is not None:
        mapped = network.network_address.ipv4_mapped
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _check_allow_deny_overlap(report, allow, deny):
    allow_index = {network: index for network, index in allow}
    for network, index in deny:
        if network in allow_index:
            report.error(
                "deny",
                f'sources[{index}] "{network}" is also in allow (sources[{allow_index[network]}]); '
                "a source cannot be both",
            )
