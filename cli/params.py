"""The parameter types every command shares, so that one thing is written one
way everywhere: knock steps and ports (tcp:22, and fwknop's tcp/22),
durations (500ms, 30s, 1m30s: the config's syntax), addresses, interfaces and
sequence names (the last two completed in the shell)."""

import ipaddress
import os
import tomllib

import click
from click.shell_completion import CompletionItem

from xknock.controller.config import DEFAULT_PATH, parse_duration, parse_step

SYS_CLASS_NET = "/sys/class/net"


class ParsedType(click.ParamType):
    """A value read by one parser: parse() returns it or raises ValueError,
    which becomes click's usage error (exit 2) of one line, "'VALUE': why".
    A value that is not a string is a default, already parsed."""

    def parse(self, value):
        raise NotImplementedError

    def failure(self, value, err):
        return f"{value!r}: {err}"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as err:
            self.fail(self.failure(value, err), param, ctx)


class StepType(ParsedType):
    """A knock or port step: tcp:7000, udp:8000, icmp; tcp/7000 as fwknop writes it.
    ports_only refuses icmp (a port to open, not a knock)."""

    name = "STEP"

    def __init__(self, ports_only=False):
        self.ports_only = ports_only
        if ports_only:
            self.name = "PORT"

    def parse(self, value):
        spec = value.replace("/", ":", 1) if value.count("/") == 1 and ":" not in value else value
        step = parse_step(spec)
        if self.ports_only and step.proto == "icmp":
            raise ValueError("icmp has no port: write tcp:PORT or udp:PORT")
        return step


class DurationType(ParsedType):
    """A duration as the config writes it (500ms, 30s, 1m30s, 2h) -> nanoseconds.
    seconds_ok also takes a bare number of seconds (0.2), for the options that
    took seconds before they took durations."""

    name = "DURATION"

    def __init__(self, seconds_ok=False):
        self.seconds_ok = seconds_ok

    def parse(self, value):
        if self.seconds_ok:
            try:
                seconds = float(value)
            except ValueError:
                pass
            else:
                if not 0 <= seconds <= 365 * 86400:
                    raise ValueError("must be between 0 and 365d")
                return round(seconds * 1e9)
        return parse_duration(value)


class AddressType(ParsedType):
    name = "ADDR"

    def parse(self, value):
        return ipaddress.ip_address(value)

    def failure(self, value, err):
        return f"{value!r} is not an IPv4 or IPv6 address"


class InterfaceType(click.ParamType):
    """A network interface's name, completed from /sys/class/net; whether it
    exists is the library's to say (it names the interface)."""

    name = "IFACE"

    def shell_complete(self, ctx, param, incomplete):
        try:
            names = sorted(os.listdir(SYS_CLASS_NET))
        except OSError:
            return []
        return [CompletionItem(name) for name in names if name.startswith(incomplete)]


class SequenceNameType(click.ParamType):
    """A sequence of the config, completed from the file of -c (or the
    default): its [[sequence]] names, read as plain TOML, nothing validated."""

    name = "NAME"

    def shell_complete(self, ctx, param, incomplete):
        path = ctx.params.get("config_path") or DEFAULT_PATH
        try:
            with open(path, "rb") as f:
                sequences = tomllib.load(f).get("sequence", [])
        except (OSError, tomllib.TOMLDecodeError):
            return []
        names = [s.get("name") for s in sequences if isinstance(s, dict)] if isinstance(sequences, list) else []
        return [CompletionItem(n) for n in names if isinstance(n, str) and n.startswith(incomplete)]


STEP, PORT, ADDRESS, IFACE, SEQUENCE = StepType(), StepType(ports_only=True), AddressType(), InterfaceType(), \
    SequenceNameType()
DURATION, SECONDS_OR_DURATION = DurationType(), DurationType(seconds_ok=True)
CONFIG_FILE = click.Path(readable=False)   # completes file names; the loader says what is wrong with one
