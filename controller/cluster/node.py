"""One node of an xknock cluster: a thread of its own that keeps this
filter's maps in step with etcd, and the calls the controller makes when a
grant is made here, an SPA digest is about to be accepted, or a source is
banned (docs/cluster.md).

The kernel never waits on it: grants made here are written to the maps first
and published after, from a queue, whatever waits there together in one etcd
transaction (bounded; docs/cluster.md, "Publishing"); what other nodes
publish is written into the maps by this thread through state/grants.py. When etcd is away the node
keeps deciding alone, counts the outage, keeps what it made meanwhile to
publish later, and on return resyncs the whole prefix, then watches from that
revision.
"""

import ipaddress
import json
import logging
import os
import queue
import threading
import time

from ..errors import XknockError
from ..kernel import layout
from ..kernel.lock import map_lock
from ..kernel.maps import from_addr, to_addr
from ..spa.spa import ReplayClaimLost
from ..spa.spa_replay import ReplayCacheError
from ..state import bans, grants, status as state_status
from . import records
from .etcd import MAX_TXN_OPS, ClusterUnavailable, Connection, ban_entry, describe, grant_entry

log = logging.getLogger("xknock.cluster")

HEALTH_EVERY_S = 1.0
RETRY_EVERY_S = 1.0
MAX_PENDING = 10_000
# Inbox items taken per turn of the thread: their publications go out
# together, in transactions of MAX_TXN_OPS puts.
DRAIN_MAX = 4 * MAX_TXN_OPS
FULL_LOG_EVERY_S = 60.0   # a full grants map logs one line, then at most one a minute
# Received grants written per map lock: a resync of 100,000 is 100 batches,
# and an `xknock grant` or a reload waits behind one batch at most (a few ms).
WRITE_BATCH = 1000


class ClusterNode:
    def __init__(self, cluster, maps, spa_max_age_ns=None):
        self.cluster = cluster
        self.maps = maps
        self.node = cluster.node
        self.prefix = cluster.prefix
        self.spa_max_age_ns = spa_max_age_ns
        self.inbox = queue.Queue()
        self.pending = []              # publications made while etcd was away: (kind, payload)
        self.pending_lock = threading.Lock()
        self.connection = None
        self.revision = 0              # the last etcd revision applied here
        self.stopping = threading.Event()
        self.thread = None
        self.watch_id = None
        self.generation = 0            # which watch a callback belongs to
        # What metrics and status read (docs/cluster.md, "Metrics").
        self.reachable = False
        self.endpoint = None
        self.last_error = None
        self.down_since = time.monotonic()
        self.counts = {"published": 0, "received": 0, "revokes_received": 0, "bans_received": 0,
                       "claims_won": 0, "claims_lost": 0, "claims_refused": 0, "claims_local": 0,
                       "resyncs": 0, "outages": 0, "bad_records": 0, "publish_failed": 0, "publish_txns": 0,
                       "grants_full": 0}
        self.last_lag_s = 0.0
        self.next_full_log = 0.0
        self.batch = {}                # received grants not yet written: bytes(key) -> (record, key, value, resync)
        # on_received(record): a grant of another node was just written into
        # the maps (daemon/hooks.py runs on_open for it). Called on this thread.
        self.on_received = None

    # --- the controller's calls ------------------------------------------

    def start(self):
        self.thread = threading.Thread(target=self._run, name="xknock-cluster", daemon=True)
        self.thread.start()
        return self

    def close(self):
        self.stopping.set()
        self.inbox.put(("stop", None))
        if self.thread:
            self.thread.join(10)
        self._drop_connection()
        try:
            os.unlink(state_status.cluster_status_path(self.maps))
        except OSError:
            pass

    def observe_event(self, record):
        """An events.EventReader observer: a completed knock, a ban."""
        try:
            if record.type == layout.Event.GRANTED:
                self.publish_local_grants(from_addr(record.src), record.seq_uid)
            elif record.type == layout.Event.BANNED and self.cluster.share_bans:
                ban = self.maps.bans.lookup(to_addr(from_addr(record.src)))
                if ban is not None:
                    self._queue("ban", (from_addr(record.src), ban.until_ns + records.clock_offset_ns()))
        except Exception:   # an observer must never stop the events
            log.exception("cluster: could not queue a grant for publishing")

    def publish_local_grants(self, source, seq_uid, flags=None):
        """Publish the grants of source the maps hold for seq_uid (a knock that
        completed, an accepted SPA packet), as they are now."""
        offset = records.clock_offset_ns()
        found = []
        for proto, port in grants.guarded_ports(self.maps):
            key = layout.GrantKey(src=to_addr(source), proto=layout.PROTO_NUMBERS[proto], port=port)
            value = self.maps.grants.lookup(key)
            if value is None or value.seq_uid != seq_uid or (flags is not None and value.flags != flags):
                continue
            found.append(records.GrantRecord(ipaddress.ip_address(source), proto, port, value.window_end_ns + offset,
                                             value.last_seen_ns + offset, value.idle_timeout_ns, value.seq_uid,
                                             value.flags, self.node))
        if found:
            self._queue("grants", found)

    def on_spa_grant(self, verdict, seq_uid):
        """SpaReceiver's observer: its grants are written; publish them."""
        self.publish_local_grants(verdict.address, seq_uid, flags=layout.GRANT_SPA)

    def claim(self, digest, message_timestamp):
        """SpaVerifier's claim: returns when this node may accept the packet;
        ReplayClaimLost when another node claimed the digest first;
        ReplayCacheError when etcd cannot be asked and spa_unreachable = "refuse"."""
        connection = self.connection
        if connection is not None and self.reachable:
            max_age_s = (self.spa_max_age_ns or 120_000_000_000) / 1e9
            try:
                won = connection.claim_digest(digest, 2 * max_age_s + 1, self.node)
            except Exception as err:   # noqa: BLE001 (etcd went away just now)
                self._lost(err)
            else:
                if won:
                    self.counts["claims_won"] += 1
                    return
                self.counts["claims_lost"] += 1
                raise ReplayClaimLost("digest claimed by another node of the cluster")
        if self.cluster.spa_unreachable == "local":
            self.counts["claims_local"] += 1
            return
        self.counts["claims_refused"] += 1
        raise ReplayCacheError("etcd unreachable: the digest cannot be claimed ([cluster] spa_unreachable = "
                               '"refuse")')

    def status(self):
        return {
            "node": self.node, "prefix": self.prefix, "reachable": self.reachable, "endpoint": self.endpoint,
            "revision": self.revision, "last_error": self.last_error,
            "down_for_s": None if self.reachable else round(time.monotonic() - self.down_since, 1),
            "pending": len(self.pending), "sync_lag_s": round(self.last_lag_s, 3), **self.counts,
        }

    # --- the thread --------------------------------------------------------

    def _queue(self, kind, payload):
        self.inbox.put(("publish", (kind, payload)))

    def write_status(self):
        """For `xknock status`, another process: state/status.py reads it."""
        path = state_status.cluster_status_path(self.maps)
        temporary = f"{path}.{threading.get_ident()}.tmp"   # the SPA thread may write it too
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**self.status(), "written_at": time.time()}, f)
            os.replace(temporary, path)
        except OSError as err:
            log.debug("cluster: status not written", extra={"fields": {"error": str(err)}})

    def _run(self):
        next_try = 0.0
        next_status = 0.0
        while not self.stopping.is_set():
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + HEALTH_EVERY_S
                self.write_status()
            if self.connection is None:
                if time.monotonic() < next_try:
                    self._drain(timeout=next_try - time.monotonic())
                    continue
                next_try = time.monotonic() + RETRY_EVERY_S
                try:
                    self._connect()
                except (ClusterUnavailable, XknockError) as err:
                    self._lost(err)
                    continue
                except Exception as err:   # noqa: BLE001 (anything from the client: one line)
                    self._lost(err)
                    continue
            self._drain(timeout=HEALTH_EVERY_S, healthy_check=True)

    def _drain(self, timeout, healthy_check=False):
        """One turn: the first inbox item (waited for), then what else is
        there (up to DRAIN_MAX); watch responses applied in order, the
        publications queued meanwhile sent together after them."""
        try:
            items = [self.inbox.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            if healthy_check and self.connection is not None:
                try:
                    self.connection.client.status()
                except Exception as err:   # noqa: BLE001
                    self._lost(err)
            return
        while len(items) < DRAIN_MAX:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        publications = []
        for kind, item in items:
            try:
                if kind == "publish":
                    publications.append(item)
                elif kind == "watch":
                    generation, response = item
                    if generation == self.generation:
                        self._on_watch(response)
            except Exception as err:   # noqa: BLE001 (etcd or a map: logged, the thread goes on)
                log.error("cluster: %s", describe(err), extra={"fields": {"error": describe(err)}})
        if publications:
            try:
                self._publish(publications)
            except Exception as err:   # noqa: BLE001
                log.error("cluster: %s", describe(err), extra={"fields": {"error": describe(err)}})

    def _connect(self):
        start_at = (self.connection.index + 1) if self.connection else 0
        connection = Connection(self.cluster, start_at)
        try:
            self._resync(connection)
        except BaseException:
            connection.close()
            raise
        self.connection = connection
        was_down = time.monotonic() - self.down_since
        self.reachable, self.endpoint, self.last_error = True, connection.endpoint, None
        self.write_status()
        log.info("cluster: etcd reachable", extra={"fields": {
            "endpoint": connection.endpoint, "revision": self.revision, "down_for": f"{was_down:.1f}s"}})
        with self.pending_lock:
            pending, self.pending = self.pending, []
        self._publish(pending)

    def serve_spa(self, receiver):
        """Hooks an SPA receiver (at attach, or one a reload that added [spa]
        made) to the replay claims and the publishing of its grants."""
        receiver.verifier.claim = self.claim
        receiver.on_grant = self.on_spa_grant

    def _resync(self, connection):
        """The whole prefix, then a watch from the revision read."""
        revision, kvs = connection.read_prefix(self.prefix)
        self.batch = {}   # what a resync or watch that failed left queued: this one reads it all again
        seen_before = self.revision
        revoked = set()   # sources revoked by this resync: their later grants of this node are written back
        for kv in sorted(kvs, key=lambda kv: kv.mod_revision):
            self._apply_put(kv.key.decode(errors="replace"), kv.value, kv.mod_revision,
                            resync=True, seen_before=seen_before, revoked=revoked)
        self._write_batch()
        self.revision = revision
        self.counts["resyncs"] += 1
        self.generation += 1
        generation = self.generation

        def callback(response):
            self.inbox.put(("watch", (generation, response)))

        self.watch_id = connection.client.add_watch_prefix_callback(self.prefix, callback,
                                                                     start_revision=revision + 1)

    def _on_watch(self, response):
        if isinstance(response, Exception):
            self._lost(response)
            return
        for event in response.events:
            key = event.key.decode(errors="replace")
            if type(event).__name__ == "PutEvent":
                self._apply_put(key, event.value, event.mod_revision)
            self.revision = max(self.revision, event.mod_revision)
        self._write_batch()

    def _lost(self, err):
        text = describe(err)
        if self.reachable or self.last_error is None:   # a new outage, or etcd away from the start
            self.counts["outages"] += 1
            self.down_since = time.monotonic()
            log.warning("cluster: etcd unreachable; this node decides alone until it returns",
                        extra={"fields": {"error": text}})
            self.reachable, self.last_error = False, text
            self.write_status()   # at once: status must not say reachable for another second
        self.reachable, self.last_error = False, text
        self._drop_connection()

    def _drop_connection(self):
        connection, self.connection = self.connection, None
        self.generation += 1
        if connection is not None:
            connection.close()

    def _publish(self, publications):
        """[(kind, payload)], in the order queued, in as few transactions as
        fit (MAX_TXN_OPS puts each). What is dead already is dropped; a key
        queued twice is published once, as queued last. When etcd fails, the
        publications not yet written are kept for its return."""
        if self.connection is None or not self.reachable:
            for kind, payload in publications:
                self._keep(kind, payload)
            return
        now_wall = time.time_ns()
        by_key = {}   # key -> (entry, the publication it came from, grants in it)
        for kind, payload in publications:
            if kind == "grants":
                for record in payload:
                    if record.end_wall_ns > now_wall:
                        entry = grant_entry(self.prefix, record)
                        by_key.pop(entry[0], None)   # re-queued: its place is the last one's
                        by_key[entry[0]] = (entry, ("grants", [record]), 1)
            elif kind == "ban":
                source, until_wall = payload
                if until_wall > now_wall:
                    entry = ban_entry(self.prefix, source, until_wall, self.node)
                    by_key.pop(entry[0], None)
                    by_key[entry[0]] = (entry, (kind, payload), 0)
        queued = list(by_key.values())
        for start in range(0, len(queued), MAX_TXN_OPS):
            chunk = queued[start:start + MAX_TXN_OPS]
            try:
                self.connection.put_all([entry for entry, _, _ in chunk])
            except Exception as err:   # noqa: BLE001
                self.counts["publish_failed"] += 1
                for _, publication, _ in queued[start:]:
                    self._keep(*publication)
                self._lost(err)
                return
            self.counts["published"] += sum(grant_count for _, _, grant_count in chunk)
            self.counts["publish_txns"] += 1

    def _keep(self, kind, payload):
        with self.pending_lock:
            if len(self.pending) < MAX_PENDING:
                self.pending.append((kind, payload))

    # --- applying what etcd holds -----------------------------------------

    def _apply_put(self, key, value, revision, resync=False, seen_before=0, revoked=None):
        try:
            kind, rest = records.kind_of(self.prefix, key)
            if kind == "grants":
                record = records.decode_grant(self.prefix, key, value)
                # Its own grants are in its maps already, unless a revoke this
                # resync applied came before them (they were made after it).
                if record.node != self.node or (revoked and record.source in revoked):
                    self._batch_grant(record, resync)
            elif kind in ("revoked", "unbanned", "bans"):
                self._write_batch()   # what came before a tombstone or ban is written before it
                fields = records.decode_event(key, value)
                source = records.source_of(rest)
                if fields["node"] == self.node:
                    return
                # A tombstone read at resync happened while this node was away
                # only if it is newer than what the node had seen. A node that
                # (re)starts has seen nothing: it applies the revokes (its maps
                # may hold a grant revoked while its controller was down: open
                # is the unsafe side) but lifts no ban it cannot date.
                if resync and kind != "bans" and (revision <= seen_before or (kind == "unbanned" and not seen_before)):
                    return
                if kind == "revoked":
                    removed = grants.revoke(self.maps, source)
                    if revoked is not None:
                        revoked.add(source)
                    self.counts["revokes_received"] += 1
                    log.info("cluster: revoked", extra={"fields": {"source": str(source), "by": fields["node"],
                                                                   "removed": removed}})
                elif kind == "unbanned":
                    bans.unban(self.maps, source)
                elif self.cluster.share_bans:
                    self._write_ban(source, fields)
        except records.BadRecord as err:
            self.counts["bad_records"] += 1
            if self.counts["bad_records"] <= 10:
                log.warning("cluster: ignored a key xknock did not write", extra={"fields": {"why": str(err)}})

    def _batch_grant(self, record, resync):
        """Queue a received grant for the next batch write; both clocks
        converted to this node's monotonic clock."""
        offset = records.clock_offset_ns()
        now = time.time_ns() - offset
        window_end, last_seen = records.to_local(record, offset)
        if window_end <= now and last_seen + record.idle_timeout_ns <= now:
            return   # dead already
        key = layout.GrantKey(src=to_addr(record.source), proto=layout.PROTO_NUMBERS[record.proto], port=record.port)
        value = layout.Grant(window_end_ns=window_end, idle_timeout_ns=record.idle_timeout_ns, last_seen_ns=last_seen,
                             seq_uid=record.seq_uid, flags=record.flags)
        if bytes(key) in self.batch:   # a key twice in a batch: the first is written (or kept) before the second
            self._write_batch()
        self.batch[bytes(key)] = (record, key, value, resync)
        if len(self.batch) >= WRITE_BATCH:
            self._write_batch()

    def _write_batch(self):
        """The queued grants into the maps, under one map lock; a grant this
        node holds as much of already is left as it is (grants.write_batch).
        A grant that does not fit the full map is skipped and counted; the
        others are written."""
        if not self.batch:
            return
        batch, self.batch = list(self.batch.values()), {}
        written, refused = grants.write_batch(self.maps, [(key, value) for _, key, value, _ in batch])
        for index in written:
            record, _, _, resync = batch[index]
            self.counts["received"] += 1
            if not resync:
                self.last_lag_s = max(0.0, (time.time_ns() - record.last_seen_wall_ns) / 1e9)
            if self.on_received is not None:
                try:
                    self.on_received(record)
                except Exception:   # noqa: BLE001 (hooks must never stop the sync)
                    log.exception("cluster: could not hand a received grant to the hooks")
        for index in refused:
            record = batch[index][0]
            self.counts["grants_full"] += 1
            if time.monotonic() >= self.next_full_log:
                self.next_full_log = time.monotonic() + FULL_LOG_EVERY_S
                log.warning("cluster: a grant of another node did not fit here", extra={"fields": {
                    "key": records.grant_key(self.prefix, record.source, record.proto, record.port),
                    "error": f"the grants map is full ({self.maps.grants.max_entries} entries)",
                    "refused_so_far": self.counts["grants_full"]}})

    def _write_ban(self, source, fields):
        until_wall = fields.get("until")
        if not isinstance(until_wall, int) or isinstance(until_wall, bool):
            raise records.BadRecord(f"ban of {source}: no end time")
        offset = records.clock_offset_ns()
        until = until_wall - offset
        now = time.time_ns() - offset
        if until <= now:
            return
        ban = layout.Ban(until_ns=until, since_ns=now)
        with map_lock(self.maps):
            self.maps.bans.update(to_addr(source), ban)
        self.counts["bans_received"] += 1
        log.info("cluster: banned", extra={"fields": {"source": str(source), "by": fields["node"],
                                                      "for": f"{(until - now) / 1e9:.0f}s"}})


def publish_operator_grant(cluster, source, ports, for_ns, idle_ns):
    """`xknock grant` on a cluster node: published first (with a lease), so
    that a refusal from etcd leaves nothing written anywhere."""
    now_wall = time.time_ns()
    found = [records.GrantRecord(ipaddress.ip_address(source), proto, port, now_wall + for_ns, now_wall, idle_ns, 0, 0,
                                 cluster.node) for proto, port in ports]
    with Connection(cluster) as connection:
        connection.put_grants(found)


def withdraw_operator_grant(cluster, source, ports):
    """Takes back what publish_operator_grant published (the local write failed)."""
    with Connection(cluster) as connection:
        for proto, port in ports:
            connection.client.delete(records.grant_key(cluster.prefix, source, proto, port))


def publish_revoke(cluster, source):
    with Connection(cluster) as connection:
        connection.revoke(source, cluster.node)


def publish_unban(cluster, source):
    with Connection(cluster) as connection:
        connection.unban(source, cluster.node)

