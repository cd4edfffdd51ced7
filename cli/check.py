"""`xknock check`: validate a config as attach would, changing nothing.

No root, no interface, no BCC: the same loader as attach and reload
(controller/config), then the warnings of attach that need no interface."""

import json
import os
import sys

import click

from xknock.cli.common import EX_CONFIG, fail_cleanly, json_option
from xknock.cli.params import CONFIG_FILE
from xknock.controller.config import DEFAULT_PATH, ConfigError, load_config


@click.command(epilog="""\b
Examples:
  xknock check                             # /etc/xknock/xknock.toml
  xknock check -c lab.toml && sudo systemctl reload xknock@eth0""")
@click.option("-c", "--config", "config_path", type=CONFIG_FILE, default=DEFAULT_PATH, show_default=True, help="The TOML config.")
@json_option
@fail_cleanly
def check(config_path, as_json):
    """Check CONFIG as attach and reload would: every error and warning, nothing applied.

    Exit status 0 when the file would load, 78 (EX_CONFIG) when it would not."""
    try:
        config = load_config(config_path)
    except ConfigError as err:
        if as_json:
            click.echo(json.dumps({"config": config_path, "ok": False, "errors": [str(e) for e in err.errors],
                                   "warnings": [str(w) for w in err.warnings]}, indent=2))
            sys.exit(EX_CONFIG)
        for warning in err.warnings:
            click.echo(f"xknock: warning: {warning}", err=True)
        for error in err.errors:
            click.echo(f"xknock: error: {error}", err=True)
        click.echo(f"xknock: {config_path}: {len(err.errors)} error(s); attach and reload would refuse it",
                   err=True)
        sys.exit(EX_CONFIG)
    if as_json:
        click.echo(json.dumps({"config": config_path, "ok": True, "errors": [],
                               "warnings": [str(w) for w in [*config.warnings, *_host_warnings(config)]],
                               "sequences": len(config.sequences), "mode": config.mode,
                               "spa": config.spa is not None}, indent=2))
        return
    for warning in config.warnings:
        click.echo(f"xknock: warning: {warning}", err=True)
    for warning in _host_warnings(config):
        click.echo(f"xknock: warning: {warning}", err=True)
    click.echo(f"{config_path}: ok: {len(config.sequences)} sequence(s), mode {config.mode}"
               + (", spa" if config.spa is not None else ""))


def _host_warnings(config):
    """Attach's warnings about this host's firewall (policy/answers.py), which
    only root can read; the interface's own (a veth in native mode) wait for attach."""
    if os.geteuid() != 0:
        click.echo("xknock: note: not root: whether this host's firewall drops unused ports, which decides "
                   "the right [filter] answer, is checked by attach", err=True)
        return []
    from xknock.controller.policy.answers import attach_warnings

    return attach_warnings(config, {})
