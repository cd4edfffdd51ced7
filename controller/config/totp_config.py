"""The keys of a time-based [[sequence]] (totp = true): protocols instead of
steps, a secret, a window length and the range the ports are drawn from.
Validated like the rest of the config, every mistake named by its place."""

import base64
import binascii
import os
import re

from ..kernel import layout, trust
from .fields import Report, parse_duration_key, type_name
from .model import DEFAULT_SPENT_FILE, NS_PER_UNIT, ConfigError, Sequence, Totp

TOTP_KEYS = ("totp", "secret", "secret_file", "window", "port_range", "spent_file")
DEFAULT_WINDOW_NS = 60 * NS_PER_UNIT["s"]
MIN_WINDOW_NS = 10 * NS_PER_UNIT["s"]
MAX_WINDOW_NS = 24 * NS_PER_UNIT["h"]
DEFAULT_PORT_RANGE = (10000, 29999)   # below Linux's ephemeral ports (32768-60999)
MIN_PORT_SPAN = 1000
MIN_SECRET_BYTES = 16
SECRET_HINT = "e.g. `head -c 20 /dev/urandom | base32`"
PROTOS = ("tcp", "udp")


def parse_totp(report, place, table, max_steps):
    """(Totp, None) or (None, None) when something is wrong (reported)."""
    errors_before = len(report.errors)
    protos = _parse_protos(report, place, table, max_steps)
    secret = _parse_secret(report, place, table)
    window_ns = parse_duration_key(report, place, table, "window", DEFAULT_WINDOW_NS)
    if not MIN_WINDOW_NS <= window_ns <= MAX_WINDOW_NS:
        report.error(place, "window must be from 10s to 24h (long enough to knock in, short enough to expire)")
    low, high = _parse_range(report, place, table)
    spent_file = table.get("spent_file", DEFAULT_SPENT_FILE)
    if not isinstance(spent_file, str) or not os.path.isabs(spent_file):
        report.error(place, f"spent_file {spent_file!r}: must be an absolute path")
    if len(report.errors) > errors_before:
        return None
    return Totp(secret=secret, window_ns=window_ns, port_low=low, port_high=high, protos=protos,
                spent_file=spent_file)


def _parse_protos(report, place, table, max_steps):
    items = table.get("knock")
    if not isinstance(items, list) or not items:
        report.error(place, 'with totp = true, knock lists the protocols of the knocks, e.g. ["tcp", "udp", "tcp"]')
        return ()
    if len(items) > max_steps:
        report.error(place, f"knock has {len(items)} steps; at most {max_steps}")
    protos = []
    for index, item in enumerate(items):
        if item not in PROTOS:
            report.error(place, f'knock[{index}] {item!r}: with totp = true, write just "tcp" or "udp" '
                                "(the ports change with time)")
            continue
        protos.append(item)
    return tuple(protos)


def _parse_secret(report, place, table):
    if ("secret" in table) == ("secret_file" in table):
        report.error(place, f"with totp = true, give secret (base32) or secret_file, one of them ({SECRET_HINT})")
        return b""
    if "secret_file" in table:
        path = table["secret_file"]
        if not isinstance(path, str) or not os.path.isabs(path):
            report.error(place, f"secret_file {path!r}: must be an absolute path")
            return b""
        untrusted = trust.problem(path, "secret_file", secret=True)   # before reading a byte of it
        if untrusted:
            report.error(place, untrusted)
            return b""
        try:
            with open(path) as secret_file:
                text = secret_file.read()
        except OSError as err:
            report.error(place, f"secret_file {path}: {err.strerror}")
            return b""
        return _decode(report, place, text, f"secret_file {path}")
    report.secrets_inline = True   # the config file must then be root's alone (load_config checks)
    value = table["secret"]
    if not isinstance(value, str):
        report.error(place, f"secret must be a base32 string, not {type_name(value)}")
        return b""
    return _decode(report, place, value, "secret")


def _decode(report, place, text, what):
    cleaned = re.sub(r"\s+", "", text).upper()
    try:
        secret = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError):
        report.error(place, f"{what} is not base32 ({SECRET_HINT})")
        return b""
    if len(secret) < MIN_SECRET_BYTES:
        report.error(place, f"{what} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} ({SECRET_HINT})")
    return secret


def _parse_range(report, place, table):
    value = table.get("port_range", f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}")
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", value) if isinstance(value, str) else None
    if not match:
        report.error(place, f'port_range {value!r}: write it "LOW-HIGH", e.g. "10000-29999"')
        return DEFAULT_PORT_RANGE
    low, high = int(match.group(1)), int(match.group(2))
    if not 1 <= low < high <= 65535:
        report.error(place, f'port_range "{value}": need 1 <= LOW < HIGH <= 65535')
        return DEFAULT_PORT_RANGE
    if high - low + 1 < MIN_PORT_SPAN:
        report.error(place, f'port_range "{value}": at least {MIN_PORT_SPAN} ports, or the knocks are easy to guess')
    return low, high


def ephemeral_ports(path="/proc/sys/net/ipv4/ip_local_port_range"):
    """(low, high) of the local ports outgoing connections use, or None."""
    try:
        with open(path) as ports:
            low, high = ports.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def client_sequence(name, secret_file, protos, window=None, port_range=None):
    """A time-based config.Sequence from a client's options (`xknock knock
    --sequence NAME --secret-file F --protos tcp,udp,tcp`), with no config
    file: only what the ports are computed from. ConfigError when wrong."""
    table = {"knock": [p.strip() for p in protos.split(",")], "secret_file": secret_file}
    if window is not None:
        table["window"] = window
    if port_range is not None:
        table["port_range"] = port_range
    report = Report()
    totp = parse_totp(report, f'sequence "{name}"', table, layout.MAX_STEPS)
    if report.errors:
        raise ConfigError(report.errors)
    return Sequence(name, (), 0, (), 0, 0, totp=totp)
