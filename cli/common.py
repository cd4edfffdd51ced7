"""What every command module of the CLI shares: fail_cleanly."""

import functools
import sys

import click
from pyroute2.netlink.exceptions import NetlinkError

from xknock.controller.config import ConfigError
from xknock.controller.errors import XknockError
from xknock.controller.kernel.bpfsys import BpfError


def fail_cleanly(fn):
    """Every expected failure is one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            for line in str(err).splitlines():
                click.echo(f"xknock: {line}", err=True)
            sys.exit(1)
        except (XknockError, BpfError, NetlinkError, OSError) as err:
            click.echo(f"xknock: {err}", err=True)
            sys.exit(1)

    return wrapper
