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


class Connection:
    """A client of one endpoint, found by trying each in turn."""

    def __init__(self, cluster, start_at=0):
        self.cluster = cluster
        self.client = None
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

    def put_grants(self, grant_records):
        """One transaction: each grant under one lease for its lifetime."""
        if not grant_records:
            return
        now_wall = time.time_ns()
        end = max(record.end_wall_ns for record in grant_records)
        ttl = max(2, math.ceil((end - now_wall) / 1e9) + 1)
        lease = self.client.lease(ttl)
        prefix = self.cluster.prefix
        puts = [self.client.transactions.put(records.grant_key(prefix, r.source, r.proto, r.port),
                                             records.encode_grant(r), lease=lease) for r in grant_records]
        self.client.transaction(compare=[], success=puts, failure=[])

    def revoke(self, source, node):
        """Deletes the source's grants and leaves a tombstone, in one transaction."""
        prefix = self.cluster.prefix
        lease = self.client.lease(records.TOMBSTONE_TTL_S)
        grants_prefix = records.source_grants_prefix(prefix, source)
        self.client.transaction(compare=[], success=[
            self.client.transactions.delete(grants_prefix, range_end=_prefix_end(grants_prefix)),
            self.client.transactions.put(records.revoked_key(prefix, source), records.encode_event(node),
                                         lease=lease),
        ], failure=[])

    def put_ban(self, source, until_wall_ns, node):
        prefix = self.cluster.prefix
        now_wall = time.time_ns()
        lease = self.client.lease(max(2, math.ceil((until_wall_ns - now_wall) / 1e9) + 1))
        self.client.put(records.ban_key(prefix, source), records.encode_event(node, until=until_wall_ns),
                        lease=lease)

    def unban(self, source, node):
        prefix = self.cluster.prefix
        lease = self.client.lease(records.TOMBSTONE_TTL_S)
        self.client.transaction(compare=[], success=[
            self.client.transactions.delete(records.ban_key(prefix, source)),
            self.client.transactions.put(records.unbanned_key(prefix, source), records.encode_event(node),
                                         lease=lease),
        ], failure=[])

    def claim_digest(self, digest, ttl_s, node):
        """True when this node created the digest's key (create-if-absent in
        one transaction), False when another node had: then the packet is a replay."""
        key = records.spa_key(self.cluster.prefix, digest)
        lease = self.client.lease(max(2, int(ttl_s)))
        created, _ = self.client.transaction(
            compare=[self.client.transactions.create(key) == 0],
            success=[self.client.transactions.put(key, records.encode_event(node), lease=lease)],
            failure=[])
        if not created:
            self.client.revoke_lease(lease.id)
        return created


def _prefix_end(prefix):
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw)


def _hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
