"""What every command module of the CLI shares: fail_cleanly, load_and_warn,
the --json option and its output."""

import functools
import json
import sys

import click

from xknock.controller.config import ConfigError, load_config
from xknock.controller.errors import XknockError
from xknock.controller.kernel.bpfsys import BpfError

# sysexits.h: the unit's RestartPreventExitStatus= stops restarting on it, since
# a bad file stays bad until someone edits it.
EX_CONFIG = 78


def fail_cleanly(fn=None, *, config_status=1):
    """Every expected failure is one line on stderr (one per config error) and
    exit status 1, or config_status for a config that does not load."""
    if fn is None:
        return functools.partial(fail_cleanly, config_status=config_status)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            for line in str(err).splitlines():
                click.echo(f"xknock: {line}", err=True)
            sys.exit(config_status)
        except (XknockError, BpfError, OSError, *_netlink_errors()) as err:
            click.echo(f"xknock: {err}", err=True)
            sys.exit(1)

    return wrapper


def _netlink_errors():
    """pyroute2's NetlinkError, if pyroute2 was imported: if it was not, nothing
    raised it, and importing it only to catch it costs every command ~20 MiB."""
    exceptions = sys.modules.get("pyroute2.netlink.exceptions")
    return (exceptions.NetlinkError,) if exceptions else ()


def json_option(fn):
    """--json: the command's result as one JSON document on stdout instead of text."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON).")(fn)


def echo_result(as_json, result, text):
    """result (a dict) as JSON with --json, else text (a line or lines)."""
    click.echo(json.dumps(result, indent=2) if as_json else text)


def load_and_warn(config_path):
    """load_config, with each of its warnings on stderr."""
    config = load_config(config_path)
    for warning in config.warnings:
        click.echo(f"xknock: warning: {warning}", err=True)
    return config
