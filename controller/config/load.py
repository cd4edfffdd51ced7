"""Loads and validates the TOML configuration. Pure: it reads the config file
(and /proc/net and the hook commands' files, for warnings; and who may change
the files it trusts, kernel/trust.py) and touches nothing else. Every mistake
in a file is found in one pass and named by its place, so a bad config is
fixed in one edit, never in a loop of edit, reload, next error."""

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import tomllib

from ..kernel import layout, procnet, trust
from . import cluster_config, spa_config, totp_config
from .fields import (
    Report, check_keys, format_duration, parse_duration_key, parse_network, parse_open, parse_steps, step_list,
    type_name,
)
from .model import (
    BAN_KEYS, BAN_SCOPES, DEFAULT_BAN_FOR_NS, DEFAULT_BAN_WITHIN_NS, DEFAULT_HOOK_MAX_RUNNING, DEFAULT_HOOK_TIMEOUT_NS,
    DEFAULT_IDLE_TIMEOUT_NS, DEFAULT_OPEN_FOR_NS, DEFAULT_PATH, DEFAULT_STEP_TIMEOUT_NS, FILTER_KEYS, HOOK_EXAMPLE,
    HOOKS_KEYS, LIST_KEYS, MAX_BAN_AFTER, MAX_HOOK_MAX_RUNNING, MAX_HOOK_TIMEOUT_NS, MAX_LIST_SOURCES,
    MAX_STEP_TIMEOUT_NS, NAME_MAX_BYTES, NAME_PATTERN, PROC_NET_LISTENING, SEQUENCE_KEYS, SHORT_SEQUENCE_STEPS,
    TOP_LEVEL_KEYS, ANSWERS, PASS_OR_DROP, Ban, Config, ConfigError, Hooks, Sequence,
)


def listening_ports(proc_net="/proc/net"):
    """{("tcp", 22), ("udp", 53), ...}: ports a local socket listens on, other
    than on loopback alone (which XDP on a real interface never sees)."""
    return {(proto, port)
            for proto, filename, listening_state in PROC_NET_LISTENING
            for (address, port), _, state in procnet.sockets(proc_net, filename)
            if state == listening_state and not address.is_loopback}


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
    return parse_config(text, path, listening=listening, from_file=True)


def parse_config(text, path=None, *, listening=None, from_file=False):
    """TOML text -> Config. listening: the set listening_ports() returns, or
    None to read it from /proc. from_file: text is the file at path, which
    then must be root's (kernel/trust.py; root's alone when it holds secrets)."""
    prefix = f"{path}: " if path else ""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        untrusted = trust.problem(path, "config") if from_file else None
        raise ConfigError(([untrusted] if untrusted else []) + [prefix + _toml_error_message(err, text)]) from None

    report = Report()
    check_keys(report, None, document, TOP_LEVEL_KEYS)

    settings = _parse_filter(report, document.get("filter", {}))
    sequences = _parse_sequences(report, document.get("sequence", []))
    allow = _parse_sources(report, "allow", document.get("allow", {}))
    deny = _parse_sources(report, "deny", document.get("deny", {}))
    _check_allow_deny_overlap(report, allow, deny)
    ban = _parse_ban(report, document["ban"]) if "ban" in document else None
    hooks = _parse_hooks(report, document.get("hooks", {}))
    spa = None
    if "spa" in document:
        spa = spa_config.parse_spa(report, document["spa"])
        if spa is not None:
            spa_config.check_spa_ports(report, spa, sequences)
    if any(sequence.totp for sequence in sequences):
        _check_totp_ranges(report, sequences, spa)
    untrusted = trust.problem(path, "config", secret=report.secrets_inline) if from_file else None
    cluster = cluster_config.parse_cluster(report, document["cluster"], ban is not None) if "cluster" in document else None

    if not report.errors:
        if not sequences and spa is None:
            report.warn(None, "no sequences: nothing is guarded")
        _warn_scannable_sequences(report, sequences, settings["strict"])
        # /proc is read only when a knock port could collide with a listener.
        if any(step.proto != "icmp" for sequence in sequences for step in sequence.knock):
            if listening is None:
                listening = listening_ports()
            _warn_listening_knock_ports(report, sequences, listening)
        if any(sequence.totp for sequence in sequences):
            if listening is None:   # this host's own sockets and ports, not a test's
                listening = listening_ports()
                _warn_totp_ranges(report, sequences, listening, totp_config.ephemeral_ports())
            else:
                _warn_totp_ranges(report, sequences, listening, None)

    warnings = [prefix + warning for warning in report.warnings]
    # Who may change the file first: it is about the whole file (and names it).
    errors = ([untrusted] if untrusted else []) + [prefix + error for error in report.errors]
    if errors:
        raise ConfigError(errors, warnings)
    return Config(
        **settings,
        sequences=tuple(sequences),
        allow=tuple(network for network, _ in allow),
        deny=tuple(network for network, _ in deny),
        ban=ban,
        hooks=hooks,
        spa=spa,
        cluster=cluster,
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
    # Only when not the default, so that configs which say nothing of them
    # keep one hash across versions.
    if not config.strict:
        normalized["strict"] = False
    if config.answer != "closed":
        normalized["answer"] = config.answer
    if config.ipsec != "drop":
        normalized["ipsec"] = config.ipsec
    if config.other_transports != "drop":
        normalized["other_transports"] = config.other_transports
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
                 # Public keys are no secret, and who may knock is what they decide.
                 | ({"public_keys": sorted([k.raw.hex(), k.expires] for k in u.public_keys)} if u.public_keys else {})
                 for u in spa.users), key=lambda u: u["name"]),
        }
        if spa.server_public:
            normalized["spa"]["server_public"] = spa.server_public.hex()
    encoded = json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


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


def _parse_filter(report, table):
    """The [filter] table: Config's mode, strict, answer, fail_closed, ipsec
    and other_transports (defaults after an error)."""
    settings = {"mode": "enforce", "strict": True, "answer": "closed", "fail_closed": True,
                "ipsec": "drop", "other_transports": "drop"}
    if not isinstance(table, dict):
        report.error("filter", f"must be a table ([filter]), not {type_name(table)}")
        return settings
    check_keys(report, "filter", table, FILTER_KEYS)
    settings["strict"] = _boolean(report, table, "strict")
    settings["fail_closed"] = _boolean(report, table, "fail_closed")
    settings["answer"] = _choice(report, table, "answer", ANSWERS, "closed",
                                 '"closed" (answer like an unused port) or "drop"')
    settings["ipsec"] = _choice(report, table, "ipsec", PASS_OR_DROP, "drop",
                                '"drop" (ESP, AH, udp:4500 refused unless allow-listed) or "pass"')
    settings["other_transports"] = _choice(report, table, "other_transports", PASS_OR_DROP, "drop",
                                           '"drop" (SCTP, DCCP, UDP-Lite refused unless allow-listed) or "pass"')
    mode = table.get("mode", "enforce")
    if not isinstance(mode, str):
        report.error("filter", f'mode must be a string ("enforce" or "monitor"), not {type_name(mode)}')
    elif mode not in layout.MODES:
        report.error("filter", f'mode "{mode}": must be "enforce" or "monitor"')
    else:
        settings["mode"] = mode
    return settings


def _boolean(report, table, key, default=True):
    value = table.get(key, default)
    if not isinstance(value, bool):
        report.error("filter", f"{key} must be true or false, not {type_name(value)}")
        return default
    return value


def _choice(report, table, key, choices, default, expected):
    """One string of a fixed set from [filter]; the default after an error."""
    value = table.get(key, default)
    if not isinstance(value, str) or value not in choices:
        shown = f'"{value}"' if isinstance(value, str) else type_name(value)
        report.error("filter", f"{key} {shown}: must be {expected}")
        return default
    return value


def _warn_scannable_sequences(report, sequences, strict):
    """Sequences a port scan could complete. Strict mode resets a knock on any
    other new connection, so a scan opens a sequence only by sending exactly
    its knocks one after another: ascending neighbours of one protocol (a
    sequential scan sends them in that order), or two steps of one protocol,
    which a random-order scan of N ports sends back to back about once in N
    scans, strict mode or not. Without strict mode, every sequence whose steps
    ascend in one protocol is completed by a sequential scan as well."""
    for sequence in sequences:
        if sequence.totp is not None:
            continue
        steps = sequence.knock
        protos = {step.proto for step in steps}
        if len(protos) != 1 or "icmp" in protos:
            continue
        ports = [step.port for step in steps]
        ascending = all(a < b for a, b in zip(ports, ports[1:]))
        adjacent = all(b == a + 1 for a, b in zip(ports, ports[1:]))
        knock = " ".join(map(str, steps))
        if len(steps) == 1:
            report.warn(f"sequence {sequence.name}", "a single knock: any scan of its port opens it")
        elif adjacent:
            report.warn(f"sequence {sequence.name}",
                        f"knock {knock}: neighbouring ports in ascending order, which a "
                        "sequential port scan sends exactly so: it would open this sequence")
        elif not strict and ascending:
            report.warn(f"sequence {sequence.name}",
                        f"knock {knock}: with strict = false, a sequential port scan can complete it; "
                        "keep strict = true, mix protocols or reorder the ports")
        elif len(steps) == 2:
            report.warn(f"sequence {sequence.name}",
                        f"knock {knock}: two steps of one protocol, which a random-order port scan of N ports "
                        "sends back to back about once in N scans, with strict = true as well; "
                        "use three steps or more, mix protocols, or SPA")


def _parse_ban(report, table):
    if not isinstance(table, dict):
        report.error("ban", f"must be a table ([ban]), not {type_name(table)}")
        return None
    check_keys(report, "ban", table, BAN_KEYS)
    after = table.get("after")
    if after is None:
        report.error("ban", 'missing key "after" (how many failed sequences ban a source, e.g. after = 5)')
        after = 1
    elif not isinstance(after, int) or isinstance(after, bool) or not 1 <= after <= MAX_BAN_AFTER:
        report.error("ban", f"after {after!r}: must be a whole number from 1 to {MAX_BAN_AFTER}")
        after = 1
    within = parse_duration_key(report, "ban", table, "within", DEFAULT_BAN_WITHIN_NS)
    ban_for = parse_duration_key(report, "ban", table, "for", DEFAULT_BAN_FOR_NS)
    scope = table.get("scope", "all")
    if scope not in BAN_SCOPES:
        report.error("ban", f'scope {scope!r}: must be "all" (every port) or "knock" (knock and guarded ports)')
        scope = "all"
    on_ban = _parse_hook(report, "ban", table, "on_ban")
    return Ban(after=after, within_ns=within, for_ns=ban_for, scope=scope, on_ban=on_ban)


def _parse_hooks(report, table):
    if not isinstance(table, dict):
        report.error("hooks", f"must be a table ([hooks]), not {type_name(table)}")
        return Hooks()
    check_keys(report, "hooks", table, HOOKS_KEYS)
    timeout_ns = parse_duration_key(report, "hooks", table, "timeout", DEFAULT_HOOK_TIMEOUT_NS)
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
        report.error(place, f"{key} must be an array of strings such as {HOOK_EXAMPLE}, not {type_name(argv)}")
        return ()
    if not argv:
        report.error(place, f"{key} is empty; give the command to run, e.g. {HOOK_EXAMPLE}")
        return ()
    errors_before = len(report.errors)
    for index, item in enumerate(argv):
        if not isinstance(item, str):
            report.error(place, f"{key}[{index}] must be a string, not {type_name(item)}")
        elif "\0" in item:
            report.error(place, f"{key}[{index}] contains a NUL character")
    if len(report.errors) > errors_before:
        return ()
    command = argv[0]
    if not os.path.isabs(command):
        report.error(place, f'{key}[0] "{command}": must be an absolute path (hooks run with a minimal PATH), '
                            f"e.g. /usr/local/bin/{os.path.basename(command) or 'notify'}")
        return ()
    untrusted = trust.problem(command, "hook program")   # it runs as root
    if untrusted:
        report.error(place, f"{key}[0]: {untrusted}")
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
        report.error("sequence", f"must be an array of tables ([[sequence]]), not {type_name(tables)}")
        return []
    if len(tables) > layout.MAX_SEQUENCES:
        report.error("sequence", f"{len(tables)} sequences; at most {layout.MAX_SEQUENCES}")

    sequences = []
    first_index_of_name = {}
    for index, table in enumerate(tables):
        place = f"sequence[{index}]"
        if not isinstance(table, dict):
            report.error(place, f"must be a table ([[sequence]]), not {type_name(table)}")
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
        report.error(place, f"name must be a string, not {type_name(name)}")
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
    check_keys(report, place, table, SEQUENCE_KEYS)
    totp = None
    if table.get("totp", False) is True:
        knock = ()
        totp = totp_config.parse_totp(report, place, table, layout.MAX_STEPS)
    else:
        if "totp" in table and table["totp"] is not False:
            report.error(place, f"totp must be true or false, not {type_name(table['totp'])}")
        for key in totp_config.TOTP_KEYS[1:]:
            if key in table:
                report.error(place, f'{key} belongs to time-based sequences: add totp = true, or remove {key}')
        knock = _parse_knock(report, place, table)
    step_timeout_ns = parse_duration_key(report, place, table, "step_timeout", DEFAULT_STEP_TIMEOUT_NS)
    if step_timeout_ns > MAX_STEP_TIMEOUT_NS:
        report.error(place, f"step_timeout {format_duration(step_timeout_ns)}: at most 1h "
                            "(the first-step filter keeps 32 bits of microseconds)")
    opened = parse_open(report, place, table)
    open_for_ns = parse_duration_key(report, place, table, "open_for", DEFAULT_OPEN_FOR_NS)
    idle_timeout_ns = parse_duration_key(report, place, table, "idle_timeout", DEFAULT_IDLE_TIMEOUT_NS)
    on_open = _parse_hook(report, place, table, "on_open")
    on_close = _parse_hook(report, place, table, "on_close")
    if name is None or len(report.errors) > errors_before:
        return None
    return Sequence(name, knock, step_timeout_ns, opened, open_for_ns, idle_timeout_ns, on_open, on_close, totp)


def _parse_knock(report, place, table):
    items = step_list(report, place, table, "knock", '["tcp:7000", "udp:8000", "tcp:9000"]')
    if items is None:
        return ()
    if len(items) > layout.MAX_STEPS:
        report.error(place, f"knock has {len(items)} steps; at most {layout.MAX_STEPS}")
    parsed = parse_steps(report, place, "knock", items)
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
                f'knock[{index}] "{text}": every echo request to this host is this knock (the host still '
                "answers it); a ping from the client between two of its other knocks is taken for a wrong one",
            )
            break
    return tuple(step for _, _, step in parsed)


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
        report.error(list_name, f'must be a table with a "sources" array ([{list_name}]), not {type_name(table)}')
        return []
    check_keys(report, list_name, table, LIST_KEYS)
    items = table.get("sources", [])
    if not isinstance(items, list):
        report.error(
            list_name,
            f'sources must be an array such as ["192.0.2.10", "2001:db8::/32"], not {type_name(items)}',
        )
        return []
    networks = []
    first_index_of_network = {}
    for index, item in enumerate(items):
        if not isinstance(item, str):
            report.error(list_name, f"sources[{index}] must be a string, not {type_name(item)}")
            continue
        try:
            network = parse_network(item)
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


def _check_allow_deny_overlap(report, allow, deny):
    allow_index = {network: index for network, index in allow}
    for network, index in deny:
        if network in allow_index:
            report.error(
                "deny",
                f'sources[{index}] "{network}" is also in allow (sources[{allow_index[network]}]); '
                "a source cannot be both",
            )
