"""The `xknock` command: arguments in, one library call, a table or JSON out."""

import ipaddress
import json
import logging
import os
import time

import click

from xknock.cli import cluster as cluster_cli
from xknock.cli.check import check
from xknock.cli.common import EX_CONFIG, fail_cleanly, load_and_warn
from xknock.cli.diff import diff, show_diff
from xknock.cli.importers import import_
from xknock.cli.spa import keygen, spa
from xknock.cli.top import top
from xknock.controller.config import DEFAULT_PATH, load_config, parse_duration, parse_step
from xknock.controller.daemon import lifecycle
from xknock.controller.daemon.events import setup_logging
from xknock.controller.errors import LoadError, XknockError

log = logging.getLogger("xknock")

# Commands import the controller modules only they use inside their function
# (the daemon, prometheus-client's metrics, status, grants, the knock client),
# so that the other commands, shell completion (which runs the program at every
# <Tab>) and --help do not load them. None of these imports hides a cycle:
# tests/test_structure.py checks that.


class StepType(click.ParamType):
    """A knock or port step: tcp:7000, udp:8000, icmp."""

    name = "STEP"

    def convert(self, value, param, ctx):
        try:
            return parse_step(value)
        except ValueError as err:
            self.fail(f"{value!r}: {err}", param, ctx)


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        try:
            return parse_duration(value)
        except ValueError as err:
            self.fail(f"{value!r}: {err}", param, ctx)


class AddressType(click.ParamType):
    name = "ADDR"

    def convert(self, value, param, ctx):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


STEP, DURATION, ADDRESS = StepType(), DurationType(), AddressType()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xknock", prog_name="xknock")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", help="Log lines as key=value or JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(log_format, verbose):
    """Port knocking in XDP: guarded ports stay dark until a source knocks."""
    setup_logging(json_lines=log_format == "json", verbose=verbose)


@main.command(epilog="""\b
Examples:
  xknock attach eth0                       # /etc/xknock/xknock.toml, foreground controller
  xknock attach eth0 -c lab.toml --once    # attach, write the policy, exit
  xknock attach eth0 eth1                  # one set of maps: a knock on one opens both
  xknock attach eth0 --metrics-addr 127.0.0.1:9798   # and Prometheus metrics at /metrics""")
@click.argument("ifaces", nargs=-1, required=True)
@click.option("-c", "--config", "config_path", default=DEFAULT_PATH, show_default=True, help="The TOML config.")
@click.option("--xdp-mode", type=click.Choice(lifecycle.XDP_MODES), default="auto", show_default=True,
              help="native needs driver support; auto tries native, then generic.")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given; e.g. "
                   "127.0.0.1:9798, [::1]:9798, or :9798 for every IPv4 address: 9798 is the docs' choice, "
                   "not a registered port).")
@click.option("--metrics-public", is_flag=True,
              help="Allow --metrics-addr on an address that is not loopback (the counters tell a prober "
                   "whether each knock step was right: put a firewall in front).")
@click.option("--once", is_flag=True, help="Attach and exit; the filter keeps enforcing.")
@click.option("--keep-sessions", is_flag=True,
              help="Grant established sessions to guarded ports (their traffic only, no new connections).")
@click.option("--force", is_flag=True,
              help="Replace another XDP program on the interface, and cut established sessions to guarded ports.")
@fail_cleanly(config_status=EX_CONFIG)   # systemd does not restart a unit whose file is bad
def attach(ifaces, config_path, xdp_mode, metrics_addr, metrics_public, once, keep_sessions, force):
    """Load the filter, attach it to IFACES and run the controller."""
    from xknock.controller.daemon.daemon import Controller, Signals
    from xknock.controller.daemon.events import EventReader

    signals = Signals().install()   # before anything is attached: see Signals
    metrics_server = None
    if metrics_addr:
        from xknock.controller.daemon.metrics import MetricsServer, parse_addr

        host, port = parse_addr(metrics_addr)
        if not metrics_public and not _loopback(host):
            raise click.UsageError(
                f"--metrics-addr {metrics_addr}: {host} is not a loopback address, and the metrics tell whoever "
                "reads them whether each knock step was right (docs/metrics.md). Serve them on 127.0.0.1 or "
                "[::1] and scrape through a tunnel or proxy, or add --metrics-public behind a firewall")
    lifecycle.require_root()
    config = load_and_warn(config_path)
    cluster_cli.check_before_attach(config, once)
    spa_cache = None
    if config.spa is not None and once:
        log.warning("[spa] with --once: SPA packets are verified by the running controller; until one runs "
                    "they are dropped and open nothing")
    elif config.spa is not None:
        from xknock.controller.spa.spa import open_replay_cache

        spa_cache = open_replay_cache(config.spa)   # a cache we cannot trust fails before anything changes
    if metrics_addr and once:
        log.warning("--metrics-addr is ignored with --once: metrics are served by the running controller")
    elif metrics_addr:
        metrics_server = MetricsServer(host, port)   # binds now: a busy address fails before anything changes
    try:
        attached = lifecycle.attach(list(ifaces), config, xdp_mode=xdp_mode, force=force,
                                    before_attach=_session_guard(config, keep_sessions, force))
    except LoadError as err:
        if metrics_server:
            metrics_server.close()
        _fail_closed(list(ifaces), config, err)
        raise
    except BaseException:
        if metrics_server:
            metrics_server.close()
        raise
    _remove_failsafe(list(ifaces))
    from xknock.controller.policy.answers import attach_warnings

    for warning in attach_warnings(config, attached.modes):
        log.warning(warning)
    for name in ifaces:
        how = "replaced program %d" % attached.replaced[name] if name in attached.replaced else "attached"
        log.info(f"{how} on {name}", extra={"fields": {
            "iface": name, "xdp_mode": attached.modes[name], "prog_id": attached.loaded.prog_id,
            "mode": config.mode, "sequences": len(config.sequences), "pins": attached.pin_dir}})
    if once:
        attached.maps.close()
        return
    events = EventReader(attached.loaded, attached.maps)
    spa_receiver = None
    if spa_cache is not None:
        from xknock.controller.spa.spa import SpaReceiver

        spa_receiver = SpaReceiver(attached.loaded, attached.maps, config.spa, spa_cache)
    if metrics_server:
        metrics_server.start(attached.maps, list(ifaces), config)
    from xknock.controller.daemon.links import LinkWatcher

    links = LinkWatcher(list(ifaces), attached.modes, attached.loaded.fd, attached.loaded.prog_id,
                        on_event=metrics_server.record_interface_event if metrics_server else None)
    node = cluster_cli.start_node(config, attached, events, spa_receiver, metrics_server)
    try:
        Controller(attached, list(ifaces), config_path, config, events, metrics=metrics_server, signals=signals,
                   spa=spa_receiver, links=links).run()
    finally:
        if node is not None:
            node.close()


def _fail_closed(ifnames, config, err):
    """The filter could not be loaded or attached: close the guarded ports of
    the interfaces left without one (policy/failsafe.py), and say so."""
    from xknock.controller.kernel import datapath
    from xknock.controller.policy import failsafe

    def unfiltered(name):
        try:
            return not datapath.is_xknock(datapath.attachment(name))
        except XknockError:   # the interface is gone: nothing to guard
            return False

    bare = [name for name in ifnames if unfiltered(name)]
    guarded = ", ".join(str(step) for step in config.guarded if step.proto != "icmp")
    if not bare or not guarded:
        return
    where = ", ".join(bare)
    if config.mode == "monitor" or not config.fail_closed:
        reason = "monitor mode" if config.mode == "monitor" else "fail_closed = false"
        log.error(f"no filter on {where} ({err}); {reason}: the guarded ports {guarded} are OPEN")
        return
    try:
        failsafe.install(bare, config)
    except XknockError as nft_err:
        log.error(f"no filter on {where}, and closing the guarded ports with nftables failed too ({nft_err}): "
                  f"{guarded} are OPEN")
        return
    log.error(f"no filter on {where}: the guarded ports {guarded} are closed to new connections (but from the "
              f"allow-list) by the nftables chain inet {failsafe.TABLE} {failsafe.chain_name(bare)} until a "
              "filter attaches; knocks open nothing meanwhile")


def _remove_failsafe(ifnames):
    from xknock.controller.policy import failsafe

    try:
        if failsafe.remove(ifnames):
            log.info(f"the filter runs: removed the failsafe chain inet {failsafe.TABLE} "
                     f"{failsafe.chain_name(ifnames)}")
    except XknockError as err:
        log.error(f"the filter runs, but removing the failsafe chain inet {failsafe.TABLE} "
                  f"{failsafe.chain_name(ifnames)} failed ({err}): it still refuses the guarded ports to everyone; "
                  f"remove it with `nft delete chain inet {failsafe.TABLE} {failsafe.chain_name(ifnames)}`")


def _loopback(host):
    """Is host a loopback address, or a name that resolves to loopback only?
    A name that does not resolve is left to bind(), which says so."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return True
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _session_guard(config, keep_sessions, force):
    """Refuse to cut established sessions to guarded ports (the operator's own
    SSH session first of all), or grant them with --keep-sessions."""
    from xknock.controller.kernel import clock
    from xknock.controller.state import grants, lockout

    at_risk = lockout.sessions_at_risk(config)

    def check(maps):
        now = clock.monotonic_ns()
        left = lockout.without_grants(maps, at_risk, now)
        if not left or force:
            for session in left:
                log.warning(f"cutting established session {session} (--force)")
            return
        if keep_sessions:
            for session in left:
                grants.grant(maps, session.source, [("tcp", session.port)], for_ns=0,
                             idle_ns=lockout.idle_timeout_for(config, session.port), now=now)
                log.info(f"kept established session {session}: granted its traffic, no new connections")
            return
        listed = ", ".join(str(s) for s in left)
        raise XknockError(
            f"attaching would cut {len(left)} established session(s) to guarded ports: {listed}. "
            "Put the source on the [allow] list, or pass --keep-sessions to grant these sessions "
            "(established traffic only), or --force to cut them; nothing was attached")

    return check


@main.command(epilog="Example:\n\n  xknock detach eth0")
@click.argument("ifaces", nargs=-1, required=True)
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


@main.command(epilog="""\b
Examples:
  xknock status
  xknock status eth0 --json""")
@click.argument("iface", required=False)
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
    lines.append(f"guarded: {' '.join(f['guarded']) or 'nothing'}")
    if f.get("spa_ports"):
        lines.append(f"spa: {' '.join(f['spa_ports'])} (verified by the running controller)")
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
    for g in f["grants"]:
        lines.append(f"  {g['source']:<40} {g['port']:<10} {g['sequence']:<12} "
                     f"window {g['window_left_s']:g}s idle {g['idle_left_s']:g}s")
    lines.append(f"bans: {len(f['bans'])}")
    for b in f["bans"]:
        lines.append(f"  {b['source']:<40} {b['left_s']:g}s left")
    lines.append(f"knocks in progress: {f['knocks_in_progress']} (sources at their first step are counted, not listed)")
    for k in f["knocks"]:
        lines.append(f"  {k['source']:<40} {k['sequence']:<12} next step {k['next_step']} ({k['since_s']:g}s ago)")
    if f.get("cluster"):
        lines += cluster_cli.render_status(f["cluster"])
    return "\n".join(lines)


@main.command(epilog="""\b
Examples:
  xknock reload eth0 -c /etc/xknock/xknock.toml
  xknock reload eth0 -c /etc/xknock/xknock.toml --dry-run   # what would change (xknock diff)""")
@click.argument("iface")
@click.option("-c", "--config", "config_path", default=DEFAULT_PATH, show_default=True)
@click.option("--dry-run", is_flag=True, help="Show what would change, as `xknock diff`, and change nothing.")
@fail_cleanly
def reload(iface, config_path, dry_run):
    """Validate CONFIG and make it the live policy; grants and knocks survive."""
    from xknock.controller.policy.policy import apply_policy

    lifecycle.require_root()
    config = load_and_warn(config_path)
    if dry_run:
        show_diff(iface, config_path, config)
        return
    if any(seq.totp for seq in config.sequences):
        log.warning("time-based sequences: written for the current window only; the running controller "
                    "rotates them from the file it loaded, so reload it instead (SIGHUP, or "
                    "`systemctl reload xknock@IFACE`) to make this file the one it rotates")
    with lifecycle.open_filter(iface) as maps:
        apply_policy(maps, config)
    click.echo(f"reloaded {iface}: {len(config.sequences)} sequences, mode {config.mode}")


@main.command(epilog="""\b
Examples:
  xknock grant eth0 192.0.2.7                    # every guarded port, 30s
  xknock grant eth0 2001:db8::7 --port tcp:22 --for 10m""")
@click.argument("iface")
@click.argument("addr", type=ADDRESS)
@click.option("--port", "ports", type=STEP, multiple=True, help="A guarded port (repeatable); default: all.")
@click.option("--for", "for_ns", type=DURATION, default="30s", show_default=True, help="Window for new connections.")
@click.option("--idle", "idle_ns", type=DURATION, default=None, help="Idle timeout (default: the --for value).")
@cluster_cli.config_option
@fail_cleanly
def grant(iface, addr, ports, for_ns, idle_ns, config_path):
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
    click.echo(f"granted {addr}: {' '.join(f'{p}:{n}' for p, n in opened)}" +
               (" (published to the cluster)" if cluster else ""))


@main.command(epilog="Example:\n\n  xknock revoke eth0 192.0.2.7")
@click.argument("iface")
@click.argument("addr", type=ADDRESS)
@cluster_cli.config_option
@fail_cleanly
def revoke(iface, addr, config_path):
    """End every grant (both clocks) and knock in progress of ADDR."""
    from xknock.controller.state.grants import revoke as remove

    cluster = cluster_cli.cluster_of(config_path)
    with lifecycle.open_filter(iface) as maps:
        removed = remove(maps, addr)   # here first, whatever etcd does: closing must not wait
    click.echo(f"revoked {addr}: {removed} grant(s) removed")
    if cluster is not None:
        from xknock.controller.cluster import node

        try:
            node.publish_revoke(cluster, addr)
        except XknockError as err:
            raise XknockError(f"revoked on this node only, not on the others: {err}; run it again when etcd "
                              "answers") from None
        click.echo(f"revoke of {addr} published to the cluster")


@main.command(epilog="Example:\n\n  xknock unban eth0 192.0.2.7")
@click.argument("iface")
@click.argument("addr", type=ADDRESS)
@cluster_cli.config_option
@fail_cleanly
def unban(iface, addr, config_path):
    """Lift the ban of ADDR and forget its failed knocks."""
    from xknock.controller.state.bans import unban as lift

    cluster = cluster_cli.cluster_of(config_path)
    with lifecycle.open_filter(iface) as maps:
        lifted = lift(maps, addr)
    click.echo(f"unbanned {addr}" if lifted else f"{addr} was not banned")
    if cluster is not None:
        from xknock.controller.cluster import node

        try:
            node.publish_unban(cluster, addr)
        except XknockError as err:
            raise XknockError(f"unbanned on this node only, not on the others: {err}") from None
        click.echo(f"unban of {addr} published to the cluster")


@main.command(epilog="""\b
Examples:
  xknock knock 10.0.0.1 tcp:7000 udp:8000 tcp:9000
  xknock knock server.example --sequence ssh -c /etc/xknock/xknock.toml --delay 0.2
  xknock knock 10.0.0.1 tcp:7000 udp:8000 tcp:9000 --repeat 3   # under a flood
  xknock knock 10.0.0.1 --sequence ssh --secret-file ~/.xknock/ssh.totp --protos tcp,udp,tcp   # time-based""")
@click.argument("host")
@click.argument("steps", nargs=-1, type=STEP)
@click.option("--sequence", "sequence_name", help="Knock this sequence of the config instead of STEPS.")
@click.option("-c", "--config", "config_path", default=DEFAULT_PATH, show_default=True)
@click.option("--secret-file", default=None, metavar="FILE",
              help="A time-based sequence without a config: its secret (base32, chmod 600); with --protos, "
                   "and --window and --port-range if the server's differ from the defaults.")
@click.option("--protos", default=None, metavar="P,P,...", help="With --secret-file: the knocks' protocols.")
@click.option("--window", default=None, metavar="DURATION", help="With --secret-file (default 60s).")
@click.option("--port-range", default=None, metavar="LOW-HIGH", help="With --secret-file (default 10000-29999).")
@click.option("--delay", type=float, default=0.1, show_default=True, help="Seconds between knocks.")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Send every knock this many times (xknock ignores the copies); 3 where packets get lost, "
                   "e.g. under a flood.")
@click.option("--until-open", "until_open", type=STEP, default=None, metavar="tcp:PORT",
              help="Knock again until this guarded port accepts a connection (lossy networks).")
@click.option("--deadline", type=float, default=30.0, show_default=True,
              help="With --until-open: give up after this many seconds.")
@click.option("-4", "ipv4", is_flag=True, help="IPv4 only.")
@click.option("-6", "ipv6", is_flag=True, help="IPv6 only.")
@fail_cleanly
def knock(host, steps, sequence_name, config_path, secret_file, protos, window, port_range, delay, repeat,
          until_open, deadline, ipv4, ipv6):
    """Send a knock sequence to HOST (the client; ICMP knocks use a raw socket as root, else a ping socket)."""
    import socket

    from xknock.controller.client.knockclient import knock_until_open, send_knocks

    steps_now = None   # a time-based sequence: its knocks change with the window
    if sequence_name:
        if steps:
            raise click.UsageError("give STEPS or --sequence, not both")
        if secret_file:
            from xknock.controller.config.totp_config import client_sequence

            if not protos:
                raise click.UsageError("--secret-file needs --protos (e.g. tcp,udp,tcp: as the server's knock)")
            found = [client_sequence(sequence_name, os.path.abspath(os.path.expanduser(secret_file)), protos,
                                     window, port_range)]
        else:
            if protos or window or port_range:
                raise click.UsageError("--protos, --window and --port-range go with --secret-file; with -c the "
                                       "config's sequence says them")
            config = load_config(config_path)
            found = [s for s in config.sequences if s.name == sequence_name]
            if not found:
                raise XknockError(f"{config_path}: no sequence named {sequence_name!r}")
        steps = found[0].knock
        if found[0].totp is not None:   # this window's ports, from the shared secret and the clock
            from xknock.controller.policy import totp

            def steps_now(sequence=found[0]):   # noqa: F811 (the time-based case of steps_now)
                return totp.variant(sequence, totp.window_of(time.time_ns(), sequence.totp.window_ns)).knock

            steps = steps_now()
    elif secret_file or protos or window or port_range:
        raise click.UsageError("--secret-file, --protos, --window and --port-range go with --sequence NAME")
    if not steps:
        raise click.UsageError("give the knock STEPS (e.g. tcp:7000 udp:8000) or --sequence NAME")
    if delay < 0:
        raise click.BadParameter("must be >= 0", param_hint="--delay")
    if repeat < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeat")
    family = socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else None
    if until_open is None:
        send_knocks(host, list(steps), delay=delay, family=family, repeat=repeat)
        click.echo(f"knocked {host}: {' '.join(str(s) for s in steps)}")
        return
    if deadline <= 0:
        raise click.BadParameter("must be > 0", param_hint="--deadline")
    if until_open.proto != "tcp":
        raise click.BadParameter(f"{until_open}: only a tcp port can be seen to open", param_hint="--until-open")
    fixed = list(steps)
    rounds = knock_until_open(
        host, steps_now or (lambda: fixed), until_open, deadline, delay=delay, family=family,
        repeat=repeat,
        on_attempt=lambda n, knocked, outcome: outcome != "open" and click.echo(
            f"round {n}: {' '.join(map(str, knocked))}; {until_open} {outcome}, knocking again", err=True))
    click.echo(f"knocked {host}: {until_open} open after {rounds} round{'s' if rounds > 1 else ''}")


main.add_command(check)
main.add_command(diff)
main.add_command(top)
main.add_command(import_, name="import")
main.add_command(spa)
main.add_command(keygen)


if __name__ == "__main__":
    main()
