"""The cluster's metrics (docs/metrics.md, "Cluster"), read from the node at
scrape time: a custom collector registered next to the controller's."""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

COUNTERS = (
    ("published", "xknock_cluster_grants_published", "Grants made on this node and published to etcd."),
    ("received", "xknock_cluster_grants_received", "Grants published by other nodes and written into this node's maps."),
    ("revokes_received", "xknock_cluster_revokes_received", "Revokes made on other nodes and applied here."),
    ("bans_received", "xknock_cluster_bans_received", "Bans made on other nodes and written here (share_bans)."),
    ("claims_won", "xknock_cluster_replay_claims_won", "SPA replay digests this node claimed first in etcd."),
    ("claims_lost", "xknock_cluster_replay_claims_lost",
     "SPA packets refused as replays because another node had claimed their digest."),
    ("claims_refused", "xknock_cluster_replay_claims_unreachable_refused",
     "SPA packets refused because etcd could not be asked (spa_unreachable = refuse)."),
    ("claims_local", "xknock_cluster_replay_claims_unreachable_local",
     "SPA packets judged by this node's replay cache alone while etcd was away (spa_unreachable = local)."),
    ("resyncs", "xknock_cluster_resyncs", "Whole-prefix resyncs (at start and after every outage)."),
    ("outages", "xknock_cluster_outages", "Times etcd became unreachable from this node."),
    ("bad_records", "xknock_cluster_bad_records", "Keys under the prefix that xknock did not write, ignored."),
    ("publish_failed", "xknock_cluster_publish_failed", "Publications that failed and were kept to retry."),
    ("publish_txns", "xknock_cluster_publish_transactions",
     "Transactions in etcd that this node's publications went out in (several grants each under load)."),
    ("grants_full", "xknock_cluster_grants_refused_full",
     "Grants of other nodes not written here because this node's grants map was full."),
)


class ClusterCollector:
    def __init__(self, node):
        self.node = node

    def collect(self):
        status = self.node.status()
        labels = ["node"]
        up = GaugeMetricFamily("xknock_cluster_etcd_reachable", "Whether this node's controller reaches etcd: 1 if it does, 0 while it decides alone.",
                               labels=labels)
        up.add_metric([status["node"]], 1.0 if status["reachable"] else 0.0)
        yield up
        lag = GaugeMetricFamily("xknock_cluster_sync_lag_seconds",
                                "Last grant received: from its making on another node to written here.",
                                labels=labels)
        lag.add_metric([status["node"]], status["sync_lag_s"])
        yield lag
        pending = GaugeMetricFamily("xknock_cluster_pending_publications",
                                    "Publications made while etcd was away, waiting for it.", labels=labels)
        pending.add_metric([status["node"]], status["pending"])
        yield pending
        for key, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([status["node"]], status[key])
            yield family
