"""The parameter types every command shares: knock steps, durations, addresses."""

import ipaddress

import click

from xknock.controller.config import parse_duration, parse_step


class StepType(click.ParamType):
    """A knock or port step: tcp:7000, udp:8000, icmp."""

    name = "STEP"

    def convert(self, value, param, ctx):
        try:
            return parse_step(value)
        except ValueError as err:
            self.fail(f"{value!r}: {err}", param, ctx)


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        try:
            return parse_duration(value)
        except ValueError as err:
            self.fail(f"{value!r}: {err}", param, ctx)


class AddressType(click.ParamType):
    name = "ADDR"

    def convert(self, value, param, ctx):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


STEP, DURATION, ADDRESS = StepType(), DurationType(), AddressType()
