"""`xknock detach`: remove the filter from interfaces."""

import click

from xknock.cli.common import fail_cleanly
from xknock.cli.params import IFACE
from xknock.controller.daemon import lifecycle


@click.command(epilog="Example:\n\n  xknock detach eth0")
@click.argument("ifaces", nargs=-1, required=True, type=IFACE)
@fail_cleanly
def detach(ifaces):
    """Remove the filter from IFACES (and its pins when no interface uses them)."""
    from xknock.controller.policy import failsafe

    for name in ifaces:
        if failsafe.remove([name]):
            click.echo(f"removed the failsafe chain of {name}: its guarded ports are open")
            if not _runs_xknock(name):
                continue
        att = lifecycle.detach(name)
        click.echo(f"detached program {att.prog_id} ({att.mode}) from {name}; traffic is no longer filtered")


def _runs_xknock(name):
    from xknock.controller.kernel import datapath

    return datapath.is_xknock(datapath.attachment(name))
