"""bench/run cluster: three xknock nodes sharing grants through a real
three-member etcd on loopback (xknock_dev/etcd.py).

Each node is a process of its own, as each controller is: the real program
loaded (the BPF harness, real maps; no interface, so no packet), the
product's ClusterNode over its maps. Node A makes grants as the kernel and
the controller's event observer do (the grant written into A's maps, then
ClusterNode.publish_local_grants); B and C stamp the wall clock when the
grant is in their maps (ClusterNode.on_received, called right after the
write). Measured, each variant in the same run, rounds interleaved:

- grant-to-every-node latency (published on A until in both B's and C's
  maps) under a churn of 1,000 grants a second;
- the SPA path: replay claims (the packet waits for them) and their grants;
- how fast A's grants reach every node when A makes them as fast as it can;
- etcd writes per grant and per SPA packet, from etcd's own counters
  (raft proposals committed, puts, lease grants);
- the resync of 100,000 grants by a node that starts.

The variants: "batched" is the product; "one per txn" is how a node
published before (one lease and one transaction per grant, one lease per
claim), kept here as a subclass so both run side by side.

gRPC must not run in a process that forks afterwards: the nodes are forked
first, and only they talk to etcd (the parent reads etcd's /metrics over HTTP).
"""

import ipaddress
import multiprocessing
import os
import tempfile
import time
import urllib.request

from xknock_dev.etcd import EtcdCluster

from . import common

PREFIX = "/xknock/bench/"
RATE = 1000                  # grants a second, made on node A
GUARDED = ("tcp", 22)
SEQ_UID = 7
# Long enough that no key's lease ends during the run: an expiry is a raft
# write too, and would land in another variant's count.
OPEN_FOR_NS = 600 * 1_000_000_000
GRANT_ENTRIES = 131072       # the resync's 100,000 grants fit (the default map holds 65,536)
CONFIG = """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:22"]
"""
# (etcd_debugging_mvcc_txn_total is not here: it counts transactions of
# more than one operation only. A transaction is one raft write; the client
# side counts them, ClusterNode's publish_txns.)
ETCD_COUNTERS = {
    "raft writes": "etcd_server_proposals_committed_total",
    "puts": "etcd_mvcc_put_total",
    "lease grants": "etcd_debugging_lease_granted_total",
}


# --- in each node's process ------------------------------------------------

def _unbatched_node_class():
    """ClusterNode as it published before batching: every publication in
    a transaction of its own, every transaction and claim with a lease of its
    own (the "one per txn" variant). Defined in the node's process: it
    imports the product."""
    from xknock.controller.cluster.node import ClusterNode

    class LeasePerWrite:
        def __init__(self, client):
            self.client = client

        def until(self, deadline_wall_ns, now_wall_ns=None):
            now = time.time_ns() if now_wall_ns is None else now_wall_ns
            return self.client.lease(max(2, -(-(deadline_wall_ns - now) // 1_000_000_000) + 1)).id

    class OnePerTxn(ClusterNode):
        def _resync(self, connection):
            connection.leases = LeasePerWrite(connection.client)
            super()._resync(connection)

        def _publish(self, publications):
            for publication in publications:
                super()._publish([publication])

    return OnePerTxn


def _one_by_one_node_class():
    """ClusterNode as it wrote received grants before batching: each one on
    its own (a lookup, then write_grants: a map lock, a lookup and an update),
    the "one by one" variant of the resync."""
    from xknock.controller.cluster import records
    from xknock.controller.cluster.node import ClusterNode
    from xknock.controller.kernel import layout
    from xknock.controller.kernel.maps import to_addr
    from xknock.controller.state import grants

    class OneByOne(ClusterNode):
        def _batch_grant(self, record, resync):
            offset = records.clock_offset_ns()
            now = time.time_ns() - offset
            window_end, last_seen = records.to_local(record, offset)
            if window_end <= now and last_seen + record.idle_timeout_ns <= now:
                return
            key = layout.GrantKey(src=to_addr(record.source), proto=layout.PROTO_NUMBERS[record.proto],
                                  port=record.port)
            current = self.maps.grants.lookup(key)
            if current is not None and current.window_end_ns >= window_end and \
                    current.last_seen_ns + current.idle_timeout_ns >= last_seen + record.idle_timeout_ns:
                return
            grants.write_grants(self.maps, record.source, [(record.proto, record.port)], window_end - last_seen,
                                record.idle_timeout_ns, now=last_seen, seq_uid=record.seq_uid, flags=record.flags)
            self.counts["received"] += 1
            if self.on_received is not None:
                self.on_received(record)

    return OneByOne


def _cluster(endpoints, node):
    from xknock.controller.config.cluster_config import Cluster

    return Cluster(endpoints=tuple(endpoints), node=node, prefix=PREFIX, timeout_ns=5_000_000_000)


def _source(index):
    return ipaddress.ip_address(0x0A000000 + index)


class NodeProcess:
    """The parent's handle on one node's process: call(command, ...) -> its answer."""

    def __init__(self, name, endpoints):
        self.name = name
        context = multiprocessing.get_context("fork")
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, name, endpoints), daemon=True,
                                       name=f"xkbench-node-{name}")
        self.process.start()

    def call(self, *command, timeout=600):
        self.pipe.send(command)
        if not self.pipe.poll(timeout):
            raise SystemExit(f"bench: node {self.name} did not answer {command[0]} within {timeout}s")
        kind, answer = self.pipe.recv()
        if kind == "error":
            raise SystemExit(f"bench: node {self.name}, {command[0]}: {answer}")
        return answer

    def close(self):
        try:
            if self.process.is_alive():
                self.pipe.send(("quit",))
                self.process.join(30)
        finally:
            if self.process.is_alive():   # it did not quit: its pins stay; say so
                self.process.terminate()
                print(f"bench: node {self.name} killed; its pins under /sys/fs/bpf/xknock/test-* may remain")


def _serve(pipe, name, endpoints):
    import traceback

    from xknock_dev.testrun import Harness

    from xknock.controller.config import parse_config

    try:
        harness = Harness(test_clock=False, cflags=[f"-DXK_GRANT_ENTRIES={GRANT_ENTRIES}"])
    except Exception:   # noqa: BLE001
        pipe.send(("error", traceback.format_exc()))
        return
    with harness:
        harness.apply(parse_config(CONFIG))
        server = NodeServer(name, endpoints, harness.maps)
        try:
            pipe.send(("ok", "ready"))
            while True:
                command = pipe.recv()
                if command[0] == "quit":
                    break
                try:
                    pipe.send(("ok", getattr(server, command[0])(*command[1:])))
                except Exception:   # noqa: BLE001 (back to the parent, which stops the run)
                    pipe.send(("error", traceback.format_exc()))
        finally:
            server.stop()


class NodeServer:
    def __init__(self, name, endpoints, maps):
        self.name, self.endpoints, self.maps = name, endpoints, maps
        self.node = None
        self.received = {}   # source (int) -> wall ns it was written into the maps

    def start(self, variant="batched"):
        from xknock.controller.cluster.node import ClusterNode

        kind = {"batched": ClusterNode, "unbatched": _unbatched_node_class,
                "one by one": _one_by_one_node_class}[variant]
        kind = kind if variant == "batched" else kind()
        self.stop()
        started = time.monotonic()
        self.node = kind(_cluster(self.endpoints, self.name), self.maps)
        self.node.on_received = self._on_received
        self.node.start()
        while not (self.node.reachable and self.node.counts["resyncs"]):
            if time.monotonic() - started > 600:
                raise RuntimeError(f"no resync: {self.node.status()}")
            time.sleep(0.005)
        return time.monotonic() - started

    def stop(self):
        if self.node is not None:
            self.node.close()
            self.node = None

    def _on_received(self, record):
        self.received[int(record.source)] = time.time_ns()

    def clear(self):
        """No grant in the maps, none received."""
        self.maps.grants.delete_where(lambda key: True)
        self.received = {}

    def churn(self, first, count, rate, flags=0):
        """count grants at rate a second (None: as fast as this loop goes),
        as completed knocks: each written into the maps, then handed to the
        node. Returns ({source: wall ns}, grants made a second)."""
        from xknock.controller.state import grants

        published = {}
        started = time.monotonic()
        for i in range(count):
            delay = started + i / rate - time.monotonic() if rate else 0
            if delay > 0:
                time.sleep(delay)
            source = _source(first + i)
            grants.write_grants(self.maps, source, [GUARDED], OPEN_FOR_NS, OPEN_FOR_NS, seq_uid=SEQ_UID, flags=flags)
            published[int(source)] = time.time_ns()
            self.node.publish_local_grants(source, SEQ_UID, flags=flags or None)
        return published, count / (time.monotonic() - started)

    def spa(self, first, count):
        """count SPA packets one after another, as the receiver's thread
        takes them: the replay claim (waited for), the grant written, then
        published. Returns ({source: wall ns}, [claim seconds])."""
        from xknock.controller.kernel import layout
        from xknock.controller.state import grants

        published, claims = {}, []
        for i in range(count):
            started = time.perf_counter()
            self.node.claim(os.urandom(32), 0)
            claims.append(time.perf_counter() - started)
            source = _source(first + i)
            grants.write_grants(self.maps, source, [GUARDED], OPEN_FOR_NS, OPEN_FOR_NS, seq_uid=SEQ_UID,
                                flags=layout.GRANT_SPA)
            published[int(source)] = time.time_ns()
            self.node.publish_local_grants(source, SEQ_UID, flags=layout.GRANT_SPA)
        return published, claims

    def wait_received(self, count, timeout):
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return dict(self.received)

    def counts(self):
        return dict(self.node.counts)

    def load(self, first, count):
        """count grants of another node straight into etcd, the way a node
        publishes them (transactions of etcd's 128 puts). Returns seconds."""
        from xknock.controller.cluster import records
        from xknock.controller.cluster.etcd import Connection

        now = time.time_ns()
        made = [records.GrantRecord(_source(first + i), *GUARDED, now + OPEN_FOR_NS, now, OPEN_FOR_NS, SEQ_UID, 0,
                                    "loader") for i in range(count)]
        with Connection(_cluster(self.endpoints, "loader")) as connection:
            started = time.monotonic()
            connection.put_grants(made)
            return time.monotonic() - started

    def read_prefix(self):
        """(seconds, keys) of the resync's read alone."""
        from xknock.controller.cluster.etcd import Connection

        with Connection(_cluster(self.endpoints, self.name)) as connection:
            started = time.monotonic()
            _, kvs = connection.read_prefix(PREFIX)
            return time.monotonic() - started, len(kvs)

    def grants_in_maps(self):
        return sum(1 for _ in self.maps.grants.keys())


# --- in the parent ---------------------------------------------------------

def etcd_counters(etcd):
    """{name: value} of ETCD_COUNTERS, from the first member's /metrics
    (every member applies every write: one member's count is the cluster's)."""
    url = f"http://127.0.0.1:{etcd.members[0].client_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for label, metric in ETCD_COUNTERS.items():
            if name == metric:
                values[label] = float(value)
    missing = set(ETCD_COUNTERS) - set(values)
    if missing:
        raise SystemExit(f"bench: etcd's /metrics lacks {', '.join(sorted(missing))}")
    return values


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


class Run:
    def __init__(self, etcd, nodes, quick):
        self.etcd, self.nodes, self.quick = etcd, nodes, quick
        self.next_source = 0

    def sources(self, count):
        first, self.next_source = self.next_source, self.next_source + count
        return first

    def round(self, variant, what, count):
        """One variant's round of `what` ("churn" or "spa") on A: latencies to
        B and C, etcd's counters before and after."""
        a, b, c = self.nodes
        for node in self.nodes:
            node.call("clear")
        a.call("start", variant)
        before = etcd_counters(self.etcd)
        first = self.sources(count)
        started = time.monotonic()
        if what in ("churn", "flat out"):
            published, rate = a.call("churn", first, count, RATE if what == "churn" else None)
            claims = []
        else:
            published, claims = a.call("spa", first, count)
            rate = count / (time.monotonic() - started)
        timeout = 30 if self.quick else 180
        arrived = [node.call("wait_received", count, timeout) for node in (b, c)]
        after = etcd_counters(self.etcd)
        counts = a.call("counts")
        a.call("stop")
        latencies, missing = [], 0
        for source, at in published.items():
            seen = [got[source] for got in arrived if source in got]
            if len(seen) < 2:
                missing += 1
            else:
                latencies.append((max(seen) - at) / 1e9)
        last = max((at for got in arrived for at in got.values()), default=0)
        spread = (last - min(published.values())) / 1e9
        return {"everywhere_rate": count / spread if spread > 0 and not missing else float("nan"),"count": count, "rate": rate, "latencies": latencies, "missing": missing, "claims": claims,
                "writes": {k: after[k] - before[k] for k in ETCD_COUNTERS}, "txns": counts["publish_txns"],
                "published": counts["published"]}

    def resync(self, count, rounds):
        """count grants in etcd; node C restarted with empty maps reads and
        writes them all, its received grants written in batches and one by
        one (before), rounds of each, interleaved."""
        a, _, c = self.nodes
        for _ in range(5):   # etcd under a loaded machine's churn may time a request out: try again
            check = self.etcd.ctl("del", "--prefix", PREFIX, timeout=60)
            if check.returncode == 0:
                break
            time.sleep(2)
        else:
            raise SystemExit(f"bench: etcdctl del failed: {check.stderr.strip()}")
        load_s = a.call("load", self.sources(count), count)
        c.call("stop")
        results = {}
        for _ in range(rounds):
            for name, variant in RESYNC_VARIANTS:
                c.call("clear")
                read_s, keys = c.call("read_prefix")
                total_s = c.call("start", variant)
                written = c.call("grants_in_maps")
                c.call("stop")
                results.setdefault(name, []).append({"read_s": read_s, "keys": keys, "total_s": total_s,
                                                     "written": written})
        return {"count": count, "load_s": load_s, "variants": results}


VARIANTS = (("batched", "batched"), ("one per txn (before)", "unbatched"))
RESYNC_VARIANTS = (("in batches of 1,000", "batched"), ("one by one (before)", "one by one"))


def pooled(rounds):
    total = {"count": 0, "latencies": [], "missing": 0, "claims": [], "writes": dict.fromkeys(ETCD_COUNTERS, 0.0),
             "txns": 0, "published": 0, "rates": [], "everywhere_rates": []}
    for r in rounds:
        total["count"] += r["count"]
        total["latencies"] += r["latencies"]
        total["missing"] += r["missing"]
        total["claims"] += r["claims"]
        total["txns"] += r["txns"]
        total["published"] += r["published"]
        total["rates"].append(r["rate"])
        total["everywhere_rates"].append(r["everywhere_rate"])
        for k in ETCD_COUNTERS:
            total["writes"][k] += r["writes"][k]
    return total


def _ms(seconds):
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.0995 else f"{seconds * 1000:.1f} ms"


def markdown(churn, flat_out, spa, resync, settings):
    lines = ["## Cluster: grants shared through etcd (three nodes, three etcd members on loopback)", "",
             *settings, ""]
    if churn is not None:
        lines += _sharing_markdown(churn, flat_out, spa)
    return "\n".join(lines + _resync_markdown(resync))


def _sharing_markdown(churn, flat_out, spa):
    lines = []
    header = ["variant", "grants", "made at", "p50 to every node", "p99", "max", "not arrived",
              "grants per txn", "raft writes per grant", "puts", "lease grants"]
    rows = []
    for name, t in churn.items():
        n = t["count"]
        w = t["writes"]
        rows.append([name, n, f"{common.median(t['rates']):.0f}/s", _ms(percentile(t["latencies"], 0.5)),
                     _ms(percentile(t["latencies"], 0.99)), _ms(max(t["latencies"], default=float("nan"))),
                     t["missing"], f"{t['published'] / max(1, t['txns']):.1f}", f"{w['raft writes'] / n:.2f}",
                     f"{w['puts'] / n:.2f}", f"{w['lease grants'] / n:.2f}"])
    lines += [f"### Churn: {RATE} grants a second made on node A", "",
              "Latency: from the grant handed to A's cluster node (in A's maps) until it is in both B's and C's "
              "maps. Writes: etcd's counters over the round, per grant made.", "",
              common.markdown_table(header, rows), ""]
    header = ["variant", "grants", "made at", "in every node's maps at", "p50 to every node", "p99",
              "grants per txn"]
    rows = [[name, t["count"], f"{common.median(t['rates']):.0f}/s", f"{common.median(t['everywhere_rates']):.0f}/s",
             _ms(percentile(t["latencies"], 0.5)), _ms(percentile(t["latencies"], 0.99)),
             f"{t['published'] / max(1, t['txns']):.1f}"] for name, t in flat_out.items()]
    lines += ["### Flat out: A makes grants as fast as it can", "",
              "The rate at which they are in B's and C's maps: grants over the time from the first made to the "
              "last arrived.", "", common.markdown_table(header, rows), ""]
    header = ["variant", "packets", "claim p50", "claim p99", "p50 to every node", "p99",
              "raft writes per packet", "puts", "lease grants"]
    rows = []
    for name, t in spa.items():
        n = t["count"]
        w = t["writes"]
        rows.append([name, n, _ms(percentile(t["claims"], 0.5)), _ms(percentile(t["claims"], 0.99)),
                     _ms(percentile(t["latencies"], 0.5)), _ms(percentile(t["latencies"], 0.99)),
                     f"{w['raft writes'] / n:.2f}", f"{w['puts'] / n:.2f}", f"{w['lease grants'] / n:.2f}"])
    lines += ["### SPA packets on node A, one after another", "",
              "Each: the replay claim (its own create-if-absent transaction; the packet waits for it), the "
              "grant written into A's maps, then published.", "",
              common.markdown_table(header, rows), ""]
    return lines


def _resync_markdown(resync):
    rows = [[name, f"{resync['count']:,}", f"{resync['load_s']:.2f} s",
             " / ".join(f"{r['read_s']:.2f}" for r in results) + " s",
             " / ".join(f"{r['total_s']:.2f}" for r in results) + " s",
             f"{common.median([r['total_s'] for r in results]):.2f} s",
             " / ".join(f"{r['written']:,}" for r in results)] for name, results in resync["variants"].items()]
    lines = ["### Resync: a node that starts with empty maps", "",
              "Received grants written into the maps in batches (one map lock and one BPF_MAP_UPDATE_BATCH per "
              "1,000) and one by one (before: a map lock, two lookups and an update each); rounds interleaved.", "",
              common.markdown_table(["writes", "grants in etcd", "loaded (batched, 128 a txn)",
                                     "read alone (pages of 2,000), each round",
                                     "node start to resynced (read + written), each round", "median",
                                     "grants in its maps"], rows), ""]
    return lines


def run_cluster(quick, resync_only=False):
    """Every table; with resync_only (`bench/run cluster-resync`), the resync's alone."""
    churn_s = 2 if quick else 10
    rounds = 1 if quick else 3
    flat_count = 1000 if quick else 10_000
    spa_packets = 50 if quick else 300
    resync_count = 10_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="xkbench-etcd-") as tmp:
        with EtcdCluster.loopback(tmp) as etcd:
            endpoints = [("http", "127.0.0.1", m.client_port) for m in etcd.members]
            nodes = []
            try:
                for name in "abc":
                    nodes.append(NodeProcess(name, endpoints))
                for node in nodes:   # each compiles the program: in parallel
                    if not node.pipe.poll(300):
                        raise SystemExit(f"bench: node {node.name} did not start")
                    kind, answer = node.pipe.recv()
                    if kind != "ok":
                        raise SystemExit(f"bench: node {node.name}: {answer}")
                for node in nodes[1:]:
                    node.call("start")
                run = Run(etcd, nodes, quick)
                variants = [(name, variant) for name, variant in VARIANTS]
                churn = flat_out = spa = None
                if not resync_only:
                    churn, flat_out, spa = _sharing(run, variants, churn_s, rounds, flat_count, spa_packets)
                resync = run.resync(resync_count, rounds)
            finally:
                for node in nodes:
                    node.close()
    settings = ["- nodes: three processes, each the real program's maps (BCC, no interface) and the product's "
                "ClusterNode; etcd: Debian's, three members on loopback (heartbeat 100 ms)",
                *([] if resync_only else [
                    f"- churn: {RATE} grants a second for {churn_s} s, {rounds} round(s) per variant, interleaved; "
                    f"flat out: {flat_count} grants; {spa_packets} SPA packets per variant"]),
                f"- resync: {rounds} round(s) per variant, interleaved; grants map of {GRANT_ENTRIES:,} entries",
                *common.machine()]
    text = markdown(churn, flat_out, spa, resync, settings)
    print(text)
    print(f"written to {common.write_results('cluster-resync' if resync_only else 'cluster', text)}")
    return text


def _sharing(run, variants, churn_s, rounds, flat_count, spa_packets):
    """The churn, flat-out and SPA rounds, both ways of publishing interleaved."""
    churn = {name: pooled(results) for name, results in common.interleaved(
        variants, rounds, lambda v: run.round(v, "churn", RATE * churn_s)).items()}
    flat_out = {name: pooled(results) for name, results in common.interleaved(
        variants, 1, lambda v: run.round(v, "flat out", flat_count)).items()}
    spa = {name: pooled(results) for name, results in common.interleaved(
        variants, 1, lambda v: run.round(v, "spa", spa_packets)).items()}
    return churn, flat_out, spa
