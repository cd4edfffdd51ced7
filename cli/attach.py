"""`xknock attach`: load the filter, attach it and run the controller."""

import json
import logging
import os
import signal
import sys

import click

from xknock.cli import cluster as cluster_cli
from xknock.cli.common import EX_CONFIG, fail_cleanly, load_and_warn
from xknock.cli.params import CONFIG_FILE, IFACE
from xknock.controller.config import DEFAULT_PATH
from xknock.controller.daemon import lifecycle
from xknock.controller.errors import LoadError, XknockError

log = logging.getLogger("xknock")


@click.command(epilog="""\b
Examples:
  xknock attach eth0                       # /etc/xknock/xknock.toml, foreground controller
  xknock attach eth0 -c lab.toml --once    # attach, write the policy, exit
  xknock attach eth0 eth1                  # one set of maps: a knock on one opens both
  xknock attach eth0 --hook tc             # at TC ingress, where XDP cannot run
  xknock attach eth0 --metrics-addr 127.0.0.1:9798   # and Prometheus metrics at /metrics
  xknock attach eth0 --priority 10         # share eth0: a slot of libxdp's dispatcher, run first""")
@click.argument("ifaces", nargs=-1, required=True, type=IFACE)
@click.option("-c", "--config", "config_path", type=CONFIG_FILE, default=DEFAULT_PATH, show_default=True, help="The TOML config.")
@click.option("--xdp-mode", type=click.Choice(lifecycle.XDP_MODES), default="auto", show_default=True,
              help="native needs driver support; auto tries native, then generic.")
@click.option("--hook", type=click.Choice(lifecycle.HOOKS), default=None,
              help="Where the filter runs: xdp (the default), or tc (tcx, or clsact on older kernels) where XDP "
                   "is not available or not allowed; it costs more per packet (docs/operations.md). Attaching "
                   "again keeps the hook that runs.")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given; e.g. "
                   "127.0.0.1:9798, [::1]:9798, or :9798 for every IPv4 address: 9798 is the docs' choice, "
                   "not a registered port).")
@click.option("--metrics-public", is_flag=True,
              help="Allow --metrics-addr on an address that is not loopback (the counters tell a prober "
                   "whether each knock step was right: put a firewall in front).")
@click.option("--metrics-web-config", default=None, metavar="FILE",
              help="TLS and basic auth for --metrics-addr: a web config file in node_exporter's format "
                   "(tls_server_config, basic_auth_users; docs/metrics.md).")
@click.option("--once", is_flag=True, help="Attach and exit; the filter keeps enforcing.")
@click.option("--keep-sessions", is_flag=True,
              help="Grant established sessions to guarded ports (their traffic only, no new connections).")
@click.option("--replace", is_flag=True, help="Replace another XDP program on the interface.")
@click.option("--cut-sessions", is_flag=True,
              help="Cut established sessions to guarded ports (instead of refusing to attach).")
@click.option("--force", is_flag=True, help="Deprecated: --replace and --cut-sessions together.")
@click.option("--priority", type=click.IntRange(0, 1000), default=None, metavar="N",
              help="Share the interface with other libxdp programs (xdp-filter, xdp-loader): join libxdp's "
                   "dispatcher, which runs its programs by priority, lowest first; what one passes goes on to "
                   "the next (docs/operations.md).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON line on stdout per interface attached (the controller then runs on, logging to stderr).")
@fail_cleanly(config_status=EX_CONFIG)   # systemd does not restart a unit whose file is bad
def attach(ifaces, config_path, xdp_mode, hook, metrics_addr, metrics_public, metrics_web_config, once,
           keep_sessions, replace, cut_sessions, force, priority, as_json):
    """Load the filter, attach it to IFACES and run the controller."""
    replace, cut_sessions = _deprecated_force(force, replace, cut_sessions, keep_sessions)
    if replace and priority is not None:
        raise click.UsageError("--priority shares the interface, --replace takes it over: give one")
    from xknock.controller.daemon.daemon import Controller, Signals
    from xknock.controller.daemon.events import EventReader

    signals = Signals().install()   # before anything is attached: see Signals
    handed = _handed_over(signals)   # what the process that attached hands this one (see _hand_over)
    metrics_server = web_config = None
    if metrics_web_config and not metrics_addr:
        raise click.UsageError("--metrics-web-config secures the metrics endpoint: give --metrics-addr too")
    if metrics_addr:
        from xknock.controller.daemon.metrics import MetricsServer, parse_addr
        from xknock.controller.daemon.webconfig import load_web_config

        if metrics_web_config:
            web_config = load_web_config(metrics_web_config)   # a bad file fails before anything changes

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
        metrics_server = MetricsServer(host, port, web_config)   # binds now: a busy address fails before anything changes
    try:
        if handed:
            attached = lifecycle.adopt(list(ifaces), handed["prog_id"], handed["pin_dir"], handed["modes"])
        else:
            attached = lifecycle.attach(list(ifaces), config, xdp_mode=xdp_mode, force=replace, hook=hook,
                                        before_attach=_session_guard(config, keep_sessions, cut_sessions),
                                        priority=priority)
    except LoadError as err:
        if metrics_server:
            metrics_server.close()
        _fail_closed(list(ifaces), config, err)
        raise
    except BaseException:
        if metrics_server:
            metrics_server.close()
        raise
    if handed:
        _follow_config_changes(attached, config, handed)
    else:
        _remove_failsafe(list(ifaces))
        _say_attached(list(ifaces), config, attached, as_json)
    if once:
        attached.maps.close()
        return
    if not handed and _can_hand_over():
        _hand_over(attached, config, signals, closing=[metrics_server, spa_cache])   # does not return
    events = EventReader(attached.loaded, attached.maps)
    spa_receiver = None
    if spa_cache is not None:
        from xknock.controller.spa.spa import SpaReceiver

        spa_receiver = SpaReceiver(attached.loaded, attached.maps, config.spa, spa_cache)
    from xknock.controller.daemon.hooks import HookDispatcher

    hooks = HookDispatcher(attached.maps, config, list(ifaces))
    if metrics_server:
        metrics_server.start(attached.maps, list(ifaces), config, hooks=hooks.runner)
    from xknock.controller.daemon.links import LinkWatcher

    links = LinkWatcher(list(ifaces), attached.modes, attached.loaded.fd, attached.loaded.prog_id,
                        on_event=metrics_server.record_interface_event if metrics_server else None)
    node = cluster_cli.start_node(config, attached, events, spa_receiver, metrics_server, hooks)
    try:
        Controller(attached, list(ifaces), config_path, config, events, metrics=metrics_server, signals=signals,
                   spa=spa_receiver, links=links, hooks=hooks, cluster=node).run()
    finally:
        if node is not None:
            node.close()


def _say_attached(ifnames, config, attached, as_json=False):
    from xknock.controller.policy.answers import attach_warnings
    from xknock.controller.policy.ipsec import ipsec_warnings

    for warning in [*attach_warnings(config, attached.modes), *ipsec_warnings(config)]:
        log.warning(warning)
    for name in ifnames:
        if attached.replaced.get(name) == attached.loaded.prog_id:
            how = "kept program %d" % attached.loaded.prog_id   # the one kept by the last attach: nothing compiled
        elif name in attached.replaced:
            how = "replaced program %d" % attached.replaced[name]
        else:
            how = "attached"
        fields = {"iface": name, "xdp_mode": attached.modes[name], "prog_id": attached.loaded.prog_id,
                  "mode": config.mode, "sequences": len(config.sequences), "pins": attached.pin_dir}
        log.info(f"{how} on {name}", extra={"fields": fields})
        if as_json:   # a line each, flushed: a script reads them while the controller runs on
            click.echo(json.dumps({"attached": name, **fields, "replaced": attached.replaced.get(name)}))
            sys.stdout.flush()


# The controller leaves BCC behind: once the program is loaded and attached,
# the command goes on in a fresh process of itself (exec, same PID, so systemd
# and signals see one process), which opens the running filter by its id and
# never imports BCC and LLVM (some 130 MiB of a controller's 180).
HANDOVER_ENV = "XKNOCK_HANDOVER"
HANDOVER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def _can_hand_over():
    """Only the real command line can be run again (not a test's in-process call)."""
    script = sys.argv[0] if sys.argv else ""
    return "bcc" in sys.modules and os.path.basename(script) == "xknock" and os.path.isfile(script)


def _hand_over(attached, config, signals, closing):
    from xknock.controller.config import config_hash

    state = {"prog_id": attached.loaded.prog_id, "pin_dir": attached.pin_dir, "modes": attached.modes,
             "config_hash": config_hash(config), "stop": signals.stop, "reload": signals.reload}
    for held in closing:   # the metrics port and the replay cache's lock: the new process takes them again
        if held is not None:
            held.close()
    # A signal from now on waits, pending across exec, for the new process's handlers.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)
    log.debug("handing over to a controller without BCC", extra={"fields": {"event": "handover",
                                                                            "prog_id": state["prog_id"]}})
    # orig_argv: with the interpreter's own options (the Debian package's
    # `python3 -I`, which ignores PYTHONPATH and the working directory).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, **{HANDOVER_ENV: json.dumps(state)}))


def _handed_over(signals):
    """The state _hand_over passed, once (not to hooks and other children);
    a stop or reload asked of the process before it is asked of this one."""
    text = os.environ.pop(HANDOVER_ENV, None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)   # the handlers are installed: let them run
    if text is None:
        return None
    try:
        state = json.loads(text)
        handed = {"prog_id": int(state["prog_id"]), "pin_dir": str(state["pin_dir"]),
                  "modes": {str(k): str(v) for k, v in state["modes"].items()},
                  "config_hash": str(state["config_hash"])}
        signals.stop = signals.stop or bool(state["stop"])
        signals.reload = signals.reload or bool(state["reload"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise XknockError(f"{HANDOVER_ENV} is not what xknock attach hands over: unset it") from None
    return handed


def _follow_config_changes(attached, config, handed):
    """The file changed between the attach and the handover: apply it, as a reload would."""
    from xknock.controller.config import config_hash
    from xknock.controller.policy import policy

    if config_hash(config) != handed["config_hash"]:
        policy.apply_policy(attached.maps, config)
        log.warning("the config changed while attaching: the new one is applied",
                    extra={"fields": {"event": "config_changed_while_attaching"}})


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


def _deprecated_force(force, replace, cut_sessions, keep_sessions):
    """--force, as it was: --replace and --cut-sessions both, with a warning.
    (replace, cut_sessions)."""
    if keep_sessions and cut_sessions:
        raise click.UsageError("--keep-sessions grants established sessions, --cut-sessions cuts them: give one")
    if not force:
        return replace, cut_sessions
    log.warning("--force is deprecated: it means --replace (another XDP program) and --cut-sessions "
                "(established sessions to guarded ports); say which")
    return True, True


def _session_guard(config, keep_sessions, cut_sessions):
    """Refuse to cut established sessions to guarded ports (the operator's own
    SSH session first of all), or grant them with --keep-sessions."""
    from xknock.controller.kernel import clock
    from xknock.controller.state import grants, lockout

    at_risk = lockout.sessions_at_risk(config)

    def check(maps):
        now = clock.monotonic_ns()
        left = lockout.without_grants(maps, at_risk, now)
        if not left or cut_sessions:
            for session in left:
                log.warning(f"cutting established session {session} (--cut-sessions)")
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
            "(established traffic only), or --cut-sessions to cut them; nothing was attached")

    return check
