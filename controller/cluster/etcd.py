"""The etcd client: python3-etcd3 (0.12, gRPC; docs/cluster.md says why),
one endpoint at a time with failover across the configured ones, TLS and
user/password from [cluster]. Every failure becomes one ClusterUnavailable
with one line that says what to check: never a gRPC traceback.
"""

import math
import os
import threading
import time

from ..errors import XknockError
from . import records

_previous_excepthook = threading.excepthook


def _quiet_watch_threads(args):
    """etcd3's watch thread dies with "Cannot invoke RPC on closed channel"
    when xknock closes a connection whose etcd went away: that is the close,
    not a fault, and must not print a traceback in the controller's log."""
    if args.thread is not None and args.thread.name.startswith("etcd3_watch_") and \
            isinstance(args.exc_value, ValueError):
        return
    _previous_excepthook(args)


threading.excepthook = _quiet_watch_threads


# Keys per range read of a resync: well under gRPC's 4 MB message limit
# (a grant's key and value are some 200 bytes).
RANGE_PAGE = 2000
# Puts per transaction: etcd's default --max-txn-ops (a bigger one is refused whole).
MAX_TXN_OPS = 128
SECOND_NS = 1_000_000_000
# A shared lease is handed out only while it outlives the transaction using
# it by this much: a lease that expired on the way would fail the whole txn.
LEASE_MARGIN_NS = 2 * SECOND_NS


class ClusterUnavailable(XknockError):
    """No configured etcd endpoint answered (or refused us): nothing was written there."""


def _etcd3():
    # gRPC's fork support makes every fork() of this process (hook commands,
    # tools) wait until gRPC's threads are idle, and a watch never is: the
    # fork hung (seen in the tests). Our children exec at once and never use
    # gRPC, so they need no fork support. Read when gRPC starts: set first.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    # gRPC's own log lines (TLS failures, several per attempt, on stderr):
    # the one line xknock logs carries gRPC's reason already.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        import etcd3
    except ImportError:
        raise ClusterUnavailable("[cluster] needs the etcd3 Python client: apt-get install python3-etcd3 "
                                 "(scripts/setup installs it)") from None
    return etcd3


def check_files(cluster):
    """The client installed, the TLS files and password file readable and in
    the right format, or one ClusterUnavailable line: found before anything is
    attached."""
    _etcd3()
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(cluster, name)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                head = f.read(65536)
        except OSError as err:
            raise ClusterUnavailable(f"[cluster] {name} {path}: cannot read: {err.strerror}") from None
        if b"-----BEGIN " not in head:
            raise ClusterUnavailable(f"[cluster] {name} {path}: not a PEM file (expected -----BEGIN ...)")
    if cluster.password_file:
        try:
            with open(cluster.password_file, encoding="utf-8") as f:
                if not f.read().strip():
                    raise ClusterUnavailable(f"[cluster] password_file {cluster.password_file}: empty")
        except (OSError, UnicodeDecodeError) as err:
            raise ClusterUnavailable(f"[cluster] password_file {cluster.password_file}: cannot read: {err}") from None


def _password(cluster):
    if not cluster.password_file:
        return None
    with open(cluster.password_file, encoding="utf-8") as f:
        return f.read().strip()


def describe(err):
    """One line for any client error. etcd3 turns gRPC's errors into its own
    ("etcd connection failed") and keeps gRPC's, with the reason, as the context."""
    for candidate in (err, err.__cause__, err.__context__):
        details = getattr(candidate, "details", None)
        if callable(details):
            try:
                text = details()
            except Exception:   # noqa: BLE001 (a gRPC error without details)
                text = None
            if text:
                return text.strip().splitlines()[0][:300]
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


class SharedLeases:
    """One lease per wall-clock second of deadline, shared by every key whose
    deadline falls in that second (docs/cluster.md, "Publishing"): a lease
    grant is a raft commit of its own, so a lease per key would double the
    writes. The lease is granted to end at or after the second's end, so a
    key lives past its own deadline by under two seconds (the second it is
    rounded up to, and the TTL's rounding), longer only when etcd's leader
    changes (etcd then renews every lease). The nodes enforce the wall-clock
    deadline themselves; the lease only clears etcd. Safe across threads (the
    cluster thread publishes, the SPA thread claims)."""

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        # deadline's second (wall clock, rounded up) -> (lease id, when it
        # ends at the earliest, on this host's monotonic clock: a step of the
        # wall clock must not hand out a lease about to end)
        self.by_second = {}

    def until(self, deadline_wall_ns, now_wall_ns=None):
        """The id of a lease that lives at least until deadline_wall_ns."""
        now = time.time_ns() if now_wall_ns is None else now_wall_ns
        second = -(-max(deadline_wall_ns, now + LEASE_MARGIN_NS) // SECOND_NS)
        with self.lock:   # held over the grant: one lease per second, never two
            lease_id, ends = self.by_second.get(second, (None, 0))
            asked = time.monotonic_ns()
            if lease_id is None or ends - asked < LEASE_MARGIN_NS:
                ttl = max(2, math.ceil((second * SECOND_NS - now) / SECOND_NS))
                lease_id = self.client.lease(ttl).id
                # Leases too close to their end to hand out again: forgotten.
                self.by_second = {s: (i, e) for s, (i, e) in self.by_second.items() if e - asked >= LEASE_MARGIN_NS}
                self.by_second[second] = (lease_id, asked + ttl * SECOND_NS)
            return lease_id


class Connection:
    """A client of one endpoint, found by trying each in turn."""

    def __init__(self, cluster, start_at=0):
        self.cluster = cluster
        self.client = None
        self.leases = None
        self.endpoint = None
        self.index = start_at
        etcd3 = _etcd3()
        timeout = max(1, math.ceil(cluster.timeout_ns / 1e9))
        errors = []
        count = len(cluster.endpoints)
        for attempt in range(count):
            index = (start_at + attempt) % count
            scheme, host, port = cluster.endpoints[index]
            try:
                client = etcd3.client(host=host, port=port, timeout=timeout, ca_cert=cluster.ca_file,
                                      cert_key=cluster.key_file, cert_cert=cluster.cert_file,
                                      user=cluster.user, password=_password(cluster))
                client.status()   # the first call: connects, TLS, and auth happened above
            except Exception as err:   # noqa: BLE001 (gRPC, TLS, auth: all become one line)
                errors.append(f"{scheme}://{_hostport(host, port)}: {describe(err)}")
                continue
            self.client, self.endpoint, self.index = client, f"{scheme}://{_hostport(host, port)}", index
            self.leases = SharedLeases(client)   # per connection: a new etcd may not know the old ones
            return
        raise ClusterUnavailable("etcd unreachable: " + "; ".join(errors))

    def close(self):
        if self.client is not None:
            try:
                self.client.close()
            except Exception:   # noqa: BLE001 (closing a dead channel)
                pass
            self.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the operations xknock does -------------------------------------

    def read_prefix(self, prefix, page=RANGE_PAGE):
        """(revision, every key-value under prefix at that one revision), read
        in pages of `page` keys: one range read of a big prefix (100,000 grants
        are some 20 MB) would pass gRPC's 4 MB limit on a message received."""
        client = self.client
        start, end = prefix.encode(), _prefix_end(prefix)
        revision, kvs = None, []
        while True:
            # python-etcd3 0.12 takes limit= and revision= but never sets them
            # in the request: set here, on the request it builds.
            request = client._build_get_range_request(key=start, range_end=end)
            request.limit = page
            if revision is not None:
                request.revision = revision
            response = client.kvstub.Range(request, client.timeout, credentials=client.call_credentials,
                                           metadata=client.metadata)
            if revision is None:
                revision = response.header.revision   # the later pages: read at the first one's revision
            kvs.extend(response.kvs)
            if not response.more or not response.kvs:
                return revision, kvs
            start = response.kvs[-1].key + b"\0"

    def put_all(self, entries):
        """One transaction of at most MAX_TXN_OPS puts: every (key, value,
        until_wall_ns) under the shared lease of its deadline's second. All
        or nothing. etcd refuses a key twice in one transaction: the caller
        gives each key once."""
        if len(entries) > MAX_TXN_OPS:
            raise ValueError(f"{len(entries)} puts in one transaction: etcd takes {MAX_TXN_OPS}")
        if not entries:
            return
        now = time.time_ns()
        puts = [self.client.transactions.put(key, value, lease=self.leases.until(until, now))
                for key, value, until in entries]
        self.client.transaction(compare=[], success=puts, failure=[])

    def put_grants(self, grant_records):
        """Each grant under a lease for its lifetime, in transactions of at
        most MAX_TXN_OPS (the last record of a key wins)."""
        by_key = {}
        for record in grant_records:
            entry = grant_entry(self.cluster.prefix, record)
            by_key[entry[0]] = entry
        entries = list(by_key.values())
        for start in range(0, len(entries), MAX_TXN_OPS):
            self.put_all(entries[start:start + MAX_TXN_OPS])

    def revoke(self, source, node):
        """Deletes the source's grants and leaves a tombstone, in one transaction."""
        prefix = self.cluster.prefix
        lease = self._tombstone_lease()
        grants_prefix = records.source_grants_prefix(prefix, source)
        self.client.transaction(compare=[], success=[
            self.client.transactions.delete(grants_prefix, range_end=_prefix_end(grants_prefix)),
            self.client.transactions.put(records.revoked_key(prefix, source), records.encode_event(node),
                                         lease=lease),
        ], failure=[])

    def put_ban(self, source, until_wall_ns, node):
        self.put_all([ban_entry(self.cluster.prefix, source, until_wall_ns, node)])

    def unban(self, source, node):
        prefix = self.cluster.prefix
        lease = self._tombstone_lease()
        self.client.transaction(compare=[], success=[
            self.client.transactions.delete(records.ban_key(prefix, source)),
            self.client.transactions.put(records.unbanned_key(prefix, source), records.encode_event(node),
                                         lease=lease),
        ], failure=[])

    def _tombstone_lease(self):
        return self.leases.until(time.time_ns() + records.TOMBSTONE_TTL_S * SECOND_NS)

    def claim_digest(self, digest, ttl_s, node):
        """True when this node created the digest's key (create-if-absent in
        one transaction), False when another node had: then the packet is a replay."""
        key = records.spa_key(self.cluster.prefix, digest)
        # Its own transaction, never batched with another packet's: a
        # transaction's compares are all or nothing, so one lost claim would
        # fail the others. The lease is shared, so a lost claim leaves it be.
        lease_id = self.leases.until(time.time_ns() + int(ttl_s * SECOND_NS))
        created, _ = self.client.transaction(
            compare=[self.client.transactions.create(key) == 0],
            success=[self.client.transactions.put(key, records.encode_event(node), lease=lease_id)],
            failure=[])
        return created


def grant_entry(prefix, record):
    """(key, value, until_wall_ns) of a grant, for Connection.put_all."""
    return (records.grant_key(prefix, record.source, record.proto, record.port), records.encode_grant(record),
            record.end_wall_ns)


def ban_entry(prefix, source, until_wall_ns, node):
    return records.ban_key(prefix, source), records.encode_event(node, until=until_wall_ns), until_wall_ns


def _prefix_end(prefix):
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


def _hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
