"""`xknock status`: what runs, as a table or JSON."""

import json
import time

import click

from xknock.cli.common import fail_cleanly
from xknock.cli.params import IFACE
from xknock.controller.daemon import lifecycle


@click.command(epilog="""\b
Examples:
  xknock status
  xknock status eth0 --json""")
@click.argument("iface", required=False, type=IFACE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@fail_cleanly
def status(iface, as_json):
    """Attached interfaces, policy, counters, live grants, knocks in progress."""
    from xknock.controller.state.status import status as gather

    lifecycle.require_root()
    if iface:
        lifecycle.open_filter(iface).close()   # a clear error when nothing runs there
    filters = gather(iface)
    if as_json:
        click.echo(json.dumps({"filters": filters}, indent=2))
        return
    if not filters:
        click.echo("no xknock filter is attached in this network namespace")
        return
    for f in filters:
        click.echo(_render(f))


def _render(f):
    lines = []
    ifaces = ", ".join(f"{i['name']} ({i['xdp_mode']}, prog {i['prog_id']})" for i in f["interfaces"])
    lines.append(f"filter on {ifaces}: {f['mode']}" + (", strict" if f.get("strict") else ", lenient")
                 + f", answer {f.get('answer', 'drop')}")
    lines.append(render_controller(f))
    lines.append(f"guarded: {' '.join(f['guarded']) or 'nothing'}")
    if f.get("spa_ports"):
        verified = "verified by the controller" if f.get("controller") else "NOT verified: no controller"
        lines.append(f"spa: {' '.join(f['spa_ports'])} ({verified})")
    for s in f["sequences"]:
        lines.append(f"  sequence {s['name']}: {' '.join(s['knock'])} -> {' '.join(s['open'])} "
                     f"(step {s['step_timeout_s']:g}s, open {s['open_for_s']:g}s, idle {s['idle_timeout_s']:g}s)")
    c = f["counters"]
    passed = sum(v for k, v in c.items() if k.startswith("pass_"))
    dropped = sum(v for k, v in c.items() if k.startswith("drop_"))
    lines.append(f"packets: {passed} passed, {dropped} dropped")
    for k, v in c.items():
        if v:
            lines.append(f"  {k:<18} {v}")
    lines.append(f"grants: {len(f['grants'])}")
    lines += [render_grant(g) for g in f["grants"]]
    lines.append(f"bans: {len(f['bans'])}")
    lines += [render_ban(b) for b in f["bans"]]
    lines.append(f"knocks in progress: {f['knocks_in_progress']} (sources at their first step are counted, not listed)")
    for k in f["knocks"]:
        lines.append(f"  {k['source']:<40} {k['sequence']:<12} next step {k['next_step']} ({k['since_s']:g}s ago)")
    if f.get("cluster"):
        from xknock.cli import cluster as cluster_cli

        lines += cluster_cli.render_status(f["cluster"])
    return "\n".join(lines)


def render_controller(f):
    """The controller line: who serves the filter, or plainly that nobody does."""
    from xknock.controller.state.controller_record import NO_CONTROLLER

    c = f.get("controller")
    if not c:
        ignored = f" ({f['controller_record_ignored']}, not trusted)" if f.get("controller_record_ignored") else ""
        return NO_CONTROLLER + ignored
    line = (f"controller: PID {c['pid']}, xknock {c['version']}, since {_clock(c['started_at'])}, "
            f"config {c['config']} (hash {c['config_hash']})")
    last = c.get("last_reload")
    if last:
        line += (f", last reload ok at {_clock(last['at'])}" if last.get("ok")
                 else f", last reload REFUSED at {_clock(last['at'])} (the running policy is unchanged)")
    return line


def _clock(wall):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) if isinstance(wall, (int, float)) else "?"


def render_grant(g):
    """One grant of live_grants() as a line of status and `xknock grants`."""
    return (f"  {g['source']:<40} {g['port']:<10} {g['sequence']:<12} "
            f"window {g['window_left_s']:g}s idle {g['idle_left_s']:g}s")


def render_ban(b):
    """One ban of live_bans() as a line of status and `xknock bans`."""
    return f"  {b['source']:<40} {b['left_s']:g}s left"
