"""Parsers of one config value each, shared by the config's parts (load.py,
spa_config.py, totp_config.py): every mistake goes to a Report, named by
its place, so one pass finds them all."""

import difflib
import ipaddress
import re

from ..kernel import layout
from .model import DURATION_HINT, MAX_DURATION_NS, NS_PER_UNIT, OPENABLE_PROTOS, RESERVED_TABLES, STEP_PROTOS, Step


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


class Report:
    """Collects errors and warnings, each led by the place it concerns."""

    def __init__(self):
        self.errors = []
        self.warnings = []
        self.secrets_inline = False   # keys or a secret in the file itself: then only root may read it

    def error(self, place, message):
        self.errors.append(f"{place}: {message}" if place else message)

    def warn(self, place, message):
        self.warnings.append(f"{place}: {message}" if place else message)


def type_name(value):
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


def check_keys(report, place, table, known):
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


def step_list(report, place, table, key, example):
    """The raw list under key, checked to be a non-empty array; None if not."""
    if key not in table:
        report.error(place, f'missing key "{key}"')
        return None
    items = table[key]
    if not isinstance(items, list):
        report.error(place, f"{key} must be an array such as {example}, not {type_name(items)}")
        return None
    if not items:
        report.error(place, f"{key} is empty; give at least one step such as {example}")
        return None
    return items


def parse_steps(report, place, key, items):
    """(index, text, Step) for every entry that parses; the rest are reported."""
    parsed = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            report.error(place, f'{key}[{index}] must be a string such as "tcp:7000", not {type_name(item)}')
            continue
        try:
            parsed.append((index, item, parse_step(item)))
        except ValueError as err:
            report.error(place, f'{key}[{index}] "{item}": {err}')
    return parsed


def parse_open(report, place, table):
    items = step_list(report, place, table, "open", '["tcp:22"]')
    if items is None:
        return ()
    opened = []
    first_index_of_step = {}
    for index, text, step in parse_steps(report, place, "open", items):
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


def parse_duration_key(report, place, table, key, default_ns):
    if key not in table:
        return default_ns
    value = table[key]
    if not isinstance(value, str):
        report.error(place, f'{key} must be a string such as "{format_duration(default_ns)}", not {type_name(value)}')
        return default_ns
    try:
        return parse_duration(value)
    except ValueError as err:
        report.error(place, f'{key} "{value}": {err}')
        return default_ns


def parse_network(text):
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
