"""`xknock unban`: lift a ban."""

import click

from xknock.cli.common import fail_cleanly
from xknock.cli.params import ADDRESS, IFACE
from xknock.controller.daemon import lifecycle


@click.command(epilog="Example:\n\n  xknock unban eth0 192.0.2.7")
@click.argument("iface", type=IFACE)
@click.argument("addr", type=ADDRESS)
@fail_cleanly
def unban(iface, addr):
    """Lift the ban of ADDR and forget its failed knocks."""
    from xknock.controller.state.bans import unban as lift

    with lifecycle.open_filter(iface) as maps:
        lifted = lift(maps, addr)
    click.echo(f"unbanned {addr}" if lifted else f"{addr} was not banned")
