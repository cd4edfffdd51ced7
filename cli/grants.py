"""`xknock grant`, `xknock revoke` and `xknock grants`: open, close and list
the grants of guarded ports by hand."""

import click

from xknock.cli import cluster as cluster_cli
from xknock.cli.common import echo_result, fail_cleanly, json_option
from xknock.cli.params import ADDRESS, DURATION, IFACE, PORT
from xknock.cli.status import render_grant
from xknock.controller.daemon import lifecycle
from xknock.controller.errors import XknockError


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
@cluster_cli.config_option
@json_option
@fail_cleanly
def grant(iface, addr, ports, for_ns, idle_ns, config_path, as_json):
    """Open guarded ports to ADDR, as a completed knock would."""
    from xknock.controller.state.grants import grant as write_grant, guarded_ports

    cluster = cluster_cli.cluster_of(config_path)
    with lifecycle.open_filter(iface) as maps:
        if cluster is None:
            opened = write_grant(maps, addr, [(p.proto, p.port) for p in ports], for_ns, idle_ns)
        else:   # etcd first: refused there, nothing is written anywhere
            from xknock.controller.cluster import node

            wanted = [(p.proto, p.port) for p in ports] or guarded_ports(maps)
            node.publish_operator_grant(cluster, addr, wanted, for_ns, idle_ns if idle_ns is not None else for_ns)
            try:
                opened = write_grant(maps, addr, wanted, for_ns, idle_ns)
            except BaseException:
                node.withdraw_operator_grant(cluster, addr, wanted)
                raise
    names = [f"{p}:{n}" for p, n in opened]
    answer = {"granted": str(addr), "ports": names, "for_s": for_ns / 1e9,
              "idle_s": (idle_ns if idle_ns is not None else for_ns) / 1e9}
    if cluster is not None:
        answer["published"] = True
    echo_result(as_json, answer,
                f"granted {addr}: {' '.join(names)}" + (" (published to the cluster)" if cluster else ""))


@click.command(epilog="Example:\n\n  xknock revoke eth0 192.0.2.7")
@click.argument("iface", type=IFACE)
@click.argument("addr", type=ADDRESS)
@cluster_cli.config_option
@json_option
@fail_cleanly
def revoke(iface, addr, config_path, as_json):
    """End every grant (both clocks) and knock in progress of ADDR."""
    from xknock.controller.state.grants import revoke as remove

    cluster = cluster_cli.cluster_of(config_path)
    with lifecycle.open_filter(iface) as maps:
        removed = remove(maps, addr)   # here first, whatever etcd does: closing must not wait
    if cluster is not None:
        from xknock.controller.cluster import node

        try:
            node.publish_revoke(cluster, addr)
        except XknockError as err:
            raise XknockError(f"revoked {addr} on this node only ({removed} grant(s) removed), not on the others: "
                              f"{err}; run it again when etcd answers") from None
    echo_result(as_json, {"revoked": str(addr), "grants_removed": removed, **({"published": True} if cluster else {})},
                f"revoked {addr}: {removed} grant(s) removed" + ("; published to the cluster" if cluster else ""))


@click.command(epilog="""\b
Examples:
  xknock grants eth0
  xknock grants eth0 --json | jq -r '.grants[].source'""")
@click.argument("iface", type=IFACE)
@json_option
@fail_cleanly
def grants(iface, as_json):
    """The live grants of the filter on IFACE: source, port, origin, time left on both clocks."""
    from xknock.controller.state.status import live_grants

    lifecycle.require_root()
    with lifecycle.open_filter(iface) as maps:
        listed = live_grants(maps)
    echo_result(as_json, {"grants": listed},
                "\n".join([f"grants: {len(listed)}"] + [render_grant(g) for g in listed]))
