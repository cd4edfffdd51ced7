"""`xknock reload`: make a config the live policy of a running filter."""

import logging

import click

from xknock.cli.common import echo_result, fail_cleanly, json_option, load_and_warn
from xknock.cli.diff import show_diff
from xknock.cli.params import CONFIG_FILE, IFACE
from xknock.controller.config import DEFAULT_PATH
from xknock.controller.daemon import lifecycle

log = logging.getLogger("xknock")


@click.command(epilog="""\b
Examples:
  xknock reload eth0 -c /etc/xknock/xknock.toml
  xknock reload eth0 -c /etc/xknock/xknock.toml --dry-run   # what would change (xknock diff)""")
@click.argument("iface", type=IFACE)
@click.option("-c", "--config", "config_path", type=CONFIG_FILE, default=DEFAULT_PATH, show_default=True)
@click.option("--dry-run", is_flag=True, help="Show what would change, as `xknock diff`, and change nothing.")
@json_option
@fail_cleanly
def reload(iface, config_path, dry_run, as_json):
    """Validate CONFIG and make it the live policy; grants and knocks survive."""
    from xknock.controller.policy.policy import apply_policy

    lifecycle.require_root()
    config = load_and_warn(config_path)
    if dry_run:
        show_diff(iface, config_path, config, as_json=as_json)
        return
    if any(seq.totp for seq in config.sequences):
        log.warning("time-based sequences: written for the current window only; the running controller "
                    "rotates them from the file it loaded, so reload it instead (SIGHUP, or "
                    "`systemctl reload xknock@IFACE`) to make this file the one it rotates")
    with lifecycle.open_filter(iface) as maps:
        apply_policy(maps, config)
    echo_result(as_json, {"reloaded": iface, "config": config_path, "sequences": len(config.sequences),
                          "mode": config.mode},
                f"reloaded {iface}: {len(config.sequences)} sequences, mode {config.mode}")
