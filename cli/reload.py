"""`xknock reload`: make a config the live policy of a running filter.

Through the controller that serves the interface when one runs (SIGHUP, then
the result it records: state/controller_record.py), so that SPA users, hooks
and time-based rotation follow the file; by writing the maps itself only when
none runs, and saying so."""

import logging
import os

import click

from xknock.cli.common import echo_result, fail_cleanly, json_option, load_and_warn
from xknock.cli.diff import show_diff
from xknock.cli.params import CONFIG_FILE, IFACE
from xknock.controller.config import DEFAULT_PATH
from xknock.controller.daemon import lifecycle
from xknock.controller.errors import XknockError
from xknock.controller.state import controller_record

log = logging.getLogger("xknock")


@click.command(epilog="""\b
Examples:
  xknock reload eth0                                  # the file the controller serving eth0 runs
  xknock reload eth0 -c /etc/xknock/xknock.toml
  xknock reload eth0 -c /etc/xknock/xknock.toml --dry-run   # what would change (xknock diff)

\b
When a controller serves IFACE (`xknock attach`, the xknock@IFACE unit), it
reloads its own config file and this command waits for its result (exit 1
when it refuses). When none runs, this command writes the maps itself and
says so: SPA users, hooks and time-based rotation need a controller.""")
@click.argument("iface", type=IFACE)
@click.option("-c", "--config", "config_path", type=CONFIG_FILE, default=DEFAULT_PATH, show_default=True,
              help="The TOML config. With a controller running: its own file (the default then), no other.")
@click.option("--dry-run", is_flag=True, help="Show what would change, as `xknock diff`, and change nothing.")
@json_option
@click.pass_context
@fail_cleanly
def reload(ctx, iface, config_path, dry_run, as_json):
    """Validate CONFIG and make it the live policy; grants and knocks survive."""
    lifecycle.require_root()
    if dry_run:
        show_diff(iface, config_path, load_and_warn(config_path), as_json=as_json)
        return
    with lifecycle.open_filter(iface) as maps:
        control_id = maps.control.id
    found, distrust = controller_record.serving(control_id)
    given = ctx.get_parameter_source("config_path") is not click.core.ParameterSource.DEFAULT
    if found:
        _through_controller(iface, control_id, found, config_path if given else None, as_json)
    else:
        _writing_the_maps(iface, config_path, distrust, as_json)


def _through_controller(iface, control_id, found, config_path, as_json):
    pid, runs = found["pid"], found.get("config")
    if config_path and runs and os.path.realpath(config_path) != os.path.realpath(runs):
        raise XknockError(f"the controller serving {iface} (PID {pid}) reloads {runs}, not {config_path}: edit "
                          f"that file, or attach again with -c {config_path}; nothing was reloaded")
    sent_ns = controller_record.signal_reload(found)
    now, result = controller_record.wait_for_reload(control_id, found, sent_ns)
    for warning in result.get("warnings") or ():
        click.echo(f"xknock: warning: {warning}", err=True)
    if not result.get("ok"):
        for line in str(result.get("message") or "").splitlines():
            click.echo(f"xknock: {line}", err=True)
        raise XknockError(f"the controller serving {iface} (PID {pid}) refused the reload of {runs}: "
                          "the running policy is unchanged")
    echo_result(as_json, {"reloaded": iface, "config": now.get("config"), "sequences": now.get("sequences"),
                          "mode": now.get("mode"), "controller": {"pid": pid, "config_hash": now.get("config_hash")}},
                f"reloaded {iface} through its controller (PID {pid}): {now.get('sequences')} sequences, "
                f"mode {now.get('mode')}")


def _writing_the_maps(iface, config_path, distrust, as_json):
    from xknock.controller.policy.policy import apply_policy

    config = load_and_warn(config_path)
    with lifecycle.open_filter(iface) as maps:
        apply_policy(maps, config)
    ignored = f" ({distrust}, not trusted)" if distrust else ""
    echo_result(as_json, {"reloaded": iface, "config": config_path, "sequences": len(config.sequences),
                          "mode": config.mode, "controller": None, "note": controller_record.NO_CONTROLLER + ignored},
                f"reloaded {iface} by writing its maps: {len(config.sequences)} sequences, mode {config.mode}; "
                f"{controller_record.NO_CONTROLLER}{ignored}")
