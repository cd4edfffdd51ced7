"""`xknock diff` (and `xknock reload --dry-run`): what a reload would change
in the live policy of a running filter, changing nothing."""

import click

import json

from xknock.cli.common import fail_cleanly, json_option, load_and_warn
from xknock.cli.params import CONFIG_FILE, IFACE
from xknock.controller.config import DEFAULT_PATH
from xknock.controller.daemon import lifecycle


@click.command(epilog="""\b
Examples:
  xknock diff eth0 -c /etc/xknock/xknock.toml
  xknock reload eth0 -c /etc/xknock/xknock.toml --dry-run   # the same""")
@click.argument("iface", type=IFACE)
@click.option("-c", "--config", "config_path", type=CONFIG_FILE, default=DEFAULT_PATH, show_default=True, help="The TOML config.")
@json_option
@fail_cleanly
def diff(iface, config_path, as_json):
    """What reloading CONFIG would change in the live policy on IFACE: + added, - removed, ~ changed."""
    lifecycle.require_root()
    show_diff(iface, config_path, load_and_warn(config_path), as_json=as_json)


def show_diff(iface, config_path, config, as_json=False):
    """Print what applying config to the filter on iface would change."""
    from xknock.controller.state.policy_diff import policy_changes

    with lifecycle.open_filter(iface) as maps:
        lines = policy_changes(maps, config)
    if as_json:
        click.echo(json.dumps({"iface": iface, "config": config_path, "changes": lines}, indent=2))
        return
    for line in lines:
        click.echo(line)
    if config.spa is not None:
        click.echo("xknock: note: SPA users and their keys live in the running controller, not in the maps: "
                   "not compared (SIGHUP, `systemctl reload`, makes the file's the running ones)", err=True)
    if lines:
        click.echo(f"{len(lines)} change(s) on {iface} from {config_path}; nothing was changed")
    else:
        click.echo(f"no change: the live policy on {iface} is already {config_path}'s")
