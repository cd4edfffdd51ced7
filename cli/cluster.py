"""[cluster] in the commands: the node thread `attach` runs next to the
controller, and what `grant`, `revoke` and `unban` publish (docs/cluster.md)."""

import logging
import os

import click

from xknock.controller.config import DEFAULT_PATH, load_config

log = logging.getLogger("xknock")

CONFIG_HELP = ("The TOML config: with [cluster], the change is published to every node "
               f"(default: {DEFAULT_PATH} when it exists).")


def config_option(fn):
    return click.option("-c", "--config", "config_path", default=None, help=CONFIG_HELP)(fn)


def cluster_of(config_path):
    """The [cluster] of config_path (default: the default file when it exists), or None."""
    if config_path is None:
        if not os.path.exists(DEFAULT_PATH):
            return None
        config_path = DEFAULT_PATH
    return load_config(config_path).cluster


def check_before_attach(config, once=False):
    """Bad TLS or password files refuse the attach before anything changes.
    An unreachable etcd does not: the node attaches and decides alone."""
    if config.cluster is None:
        return
    from xknock.controller.cluster.etcd import check_files

    check_files(config.cluster)
    if once:
        log.warning("[cluster] with --once: grants are shared by the running controller; until one runs this "
                    "node neither publishes nor receives any")


def start_node(config, attached, events, spa_receiver, metrics_server, hooks):
    """The cluster's thread, hooked to the events (knock grants, bans), the
    SPA receiver (replay claims, SPA grants) and the hooks (grants of other
    nodes); None without [cluster]."""
    if config.cluster is None:
        return None
    from xknock.controller.cluster.node import ClusterNode

    node = ClusterNode(config.cluster, attached.maps,
                       spa_max_age_ns=config.spa.max_age_ns if config.spa is not None else None)
    events.observers.append(node.observe_event)
    node.on_received = hooks.grant_arrived
    if spa_receiver is not None:
        node.serve_spa(spa_receiver)
    if metrics_server is not None:
        from xknock.controller.cluster.metrics import ClusterCollector

        metrics_server.registry.register(ClusterCollector(node))
    return node.start()


def render_status(c):
    """`xknock status` lines for the cluster node's report."""
    if c.get("stale"):
        head = f"cluster: node {c['node']}: no report for {c['age_s']:g}s (is the controller running?)"
    elif c.get("reachable"):
        head = f"cluster: node {c['node']}, etcd reachable at {c['endpoint']}, revision {c['revision']}"
    else:
        head = (f"cluster: node {c['node']}, etcd UNREACHABLE for {c.get('down_for_s') or 0:g}s, deciding alone "
                f"({c.get('last_error')})")
    return [head,
            f"  grants published {c['published']}, received {c['received']}, refused (map full) "
            f"{c.get('grants_full', 0)}, pending {c['pending']}; "
            f"revokes received {c['revokes_received']}, bans received {c['bans_received']}",
            f"  replay claims won {c['claims_won']}, lost {c['claims_lost']}, refused while unreachable "
            f"{c['claims_refused']}, local while unreachable {c['claims_local']}",
            f"  resyncs {c['resyncs']}, outages {c['outages']}, sync lag {c['sync_lag_s']:g}s, "
            f"ignored keys {c['bad_records']}"]
