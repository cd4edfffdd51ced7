"""`xknock detach`: remove the filter from interfaces."""

import click

from xknock.cli.common import echo_result, fail_cleanly, json_option
from xknock.cli.params import IFACE
from xknock.controller.daemon import lifecycle


@click.command(epilog="Example:\n\n  xknock detach eth0")
@click.argument("ifaces", nargs=-1, required=True, type=IFACE)
@json_option
@fail_cleanly
def detach(ifaces, as_json):
    """Remove the filter from IFACES (and its pins when no interface uses them)."""
    from xknock.controller.policy import failsafe

    done = []
    for name in ifaces:
        entry = {"iface": name, "failsafe_removed": False, "prog_id": None, "xdp_mode": None}
        done.append(entry)
        if failsafe.remove([name]):
            entry["failsafe_removed"] = True
            if not as_json:
                click.echo(f"removed the failsafe chain of {name}: its guarded ports are open")
            if not _runs_xknock(name):
                continue
        att = lifecycle.detach(name)
        entry.update(prog_id=att.prog_id, xdp_mode=att.mode)
        if not as_json:
            click.echo(f"detached program {att.prog_id} ({att.mode}) from {name}; traffic is no longer filtered")
    if as_json:
        echo_result(True, {"detached": done}, "")


def _runs_xknock(name):
    from xknock.controller.kernel import datapath

    return datapath.is_xknock(datapath.attachment(name))
