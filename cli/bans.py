"""`xknock ban`, `xknock unban` and `xknock bans`: write, lift and list the
bans of a running filter by hand."""

import click

from xknock.cli import cluster as cluster_cli
from xknock.cli.common import echo_result, fail_cleanly, json_option
from xknock.cli.params import ADDRESS, DURATION, IFACE
from xknock.cli.status import render_ban
from xknock.controller.daemon import lifecycle
from xknock.controller.errors import XknockError


@click.command(epilog="""\b
Examples:
  xknock ban eth0 192.0.2.66 --for 1h
  xknock ban eth0 2001:db8::66 --for 1d --json""")
@click.argument("iface", type=IFACE)
@click.argument("addr", type=ADDRESS)
@click.option("--for", "for_ns", type=DURATION, default="10m", show_default=True, help="How long the ban lasts.")
@json_option
@fail_cleanly
def ban(iface, addr, for_ns, as_json):
    """Ban ADDR as too many failed knocks would: dropped on the ports of the live [ban] scope."""
    from xknock.controller.state.bans import ban as write_ban
    from xknock.controller.state.bans import ban_scope

    with lifecycle.open_filter(iface) as maps:
        already = write_ban(maps, addr, for_ns)
        scope = ban_scope(maps)
    where = "every port" if scope == "all" else "the knock and guarded ports"
    echo_result(as_json, {"banned": str(addr), "for_s": for_ns / 1e9, "scope": scope, "was_banned": already},
                f"banned {addr} for {for_ns / 1e9:g}s on {where}" + (" (it was banned: the ban now ends then)"
                                                                     if already else ""))


@click.command(epilog="Example:\n\n  xknock unban eth0 192.0.2.7")
@click.argument("iface", type=IFACE)
@click.argument("addr", type=ADDRESS)
@cluster_cli.config_option
@json_option
@fail_cleanly
def unban(iface, addr, config_path, as_json):
    """Lift the ban of ADDR and forget its failed knocks."""
    from xknock.controller.state.bans import unban as lift

    cluster = cluster_cli.cluster_of(config_path)
    with lifecycle.open_filter(iface) as maps:
        lifted = lift(maps, addr)
    if cluster is not None:
        from xknock.controller.cluster import node

        try:
            node.publish_unban(cluster, addr)
        except XknockError as err:
            raise XknockError(f"unbanned {addr} on this node only, not on the others: {err}") from None
    text = f"unbanned {addr}" if lifted else f"{addr} was not banned"
    echo_result(as_json, {"unbanned": str(addr), "was_banned": bool(lifted), **({"published": True} if cluster else {})},
                text + ("; the unban is published to the cluster" if cluster else ""))


@click.command(epilog="""\b
Examples:
  xknock bans eth0
  xknock bans eth0 --json""")
@click.argument("iface", type=IFACE)
@json_option
@fail_cleanly
def bans(iface, as_json):
    """The sources banned on IFACE now, with the time left."""
    from xknock.controller.state.status import live_bans

    lifecycle.require_root()
    with lifecycle.open_filter(iface) as maps:
        listed = live_bans(maps)
    echo_result(as_json, {"bans": listed}, "\n".join([f"bans: {len(listed)}"] + [render_ban(b) for b in listed]))
