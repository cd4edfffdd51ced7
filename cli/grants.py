"""`xknock grant` and `xknock revoke`: open and close guarded ports by hand."""

import click

from xknock.cli.common import fail_cleanly
from xknock.cli.params import ADDRESS, DURATION, IFACE, PORT
from xknock.controller.daemon import lifecycle


@click.command(epilog="""\b
Examples:
  xknock grant eth0 192.0.2.7                    # every guarded port, 30s
  xknock grant eth0 2001:db8::7 --port tcp:22 --for 10m""")
@click.argument("iface", type=IFACE)
@click.argument("addr", type=ADDRESS)
@click.option("--port", "ports", type=PORT, multiple=True,
              help="A guarded port, tcp:22 or tcp/22 (repeatable); default: all.")
@click.option("--for", "for_ns", type=DURATION, default="30s", show_default=True, help="Window for new connections.")
@click.option("--idle", "idle_ns", type=DURATION, default=None, help="Idle timeout (default: the --for value).")
@fail_cleanly
def grant(iface, addr, ports, for_ns, idle_ns):
    """Open guarded ports to ADDR, as a completed knock would."""
    from xknock.controller.state.grants import grant as write_grant

    with lifecycle.open_filter(iface) as maps:
        opened = write_grant(maps, addr, [(p.proto, p.port) for p in ports], for_ns, idle_ns)
    click.echo(f"granted {addr}: {' '.join(f'{p}:{n}' for p, n in opened)}")


@click.command(epilog="Example:\n\n  xknock revoke eth0 192.0.2.7")
@click.argument("iface", type=IFACE)
@click.argument("addr", type=ADDRESS)
@fail_cleanly
def revoke(iface, addr):
    """End every grant (both clocks) and knock in progress of ADDR."""
    from xknock.controller.state.grants import revoke as remove

    with lifecycle.open_filter(iface) as maps:
        removed = remove(maps, addr)
    click.echo(f"revoked {addr}: {removed} grant(s) removed")
