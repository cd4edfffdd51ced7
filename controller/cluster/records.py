"""What xknock keeps in etcd, under the cluster's prefix P (pure; docs/cluster.md):

    P grants/<source>/<proto>:<port>   a grant, JSON, under a lease for its lifetime
    P revoked/<source>                 a revoke: every node ends the source's grants
    P spa/<sha256 hex>                 an SPA replay digest, claimed by one node
    P bans/<source>                    a ban (share_bans = true), under a lease until it ends
    P unbanned/<source>                an unban

Times in values are wall-clock nanoseconds (CLOCK_REALTIME): each node's
monotonic clock starts elsewhere, so a deadline crosses the wire as a wall
time and each node converts it to its own CLOCK_MONOTONIC on arrival.
A value that does not parse (a prefix shared with something else) is
refused with a reason, never applied in part.
"""

import dataclasses
import ipaddress
import json
import time

from ..kernel.clock import monotonic_ns

PROTOS = ("tcp", "udp")
VERSION = 1
# Tombstones (revoked/, unbanned/) live this long: enough for every node to
# see them by watch or by resync after a short outage.
TOMBSTONE_TTL_S = 600


class BadRecord(ValueError):
    """A key or value under the prefix that xknock did not write."""


@dataclasses.dataclass(frozen=True)
class GrantRecord:
    source: object            # ipaddress address
    proto: str
    port: int
    window_end_wall_ns: int   # new connections accepted until then
    last_seen_wall_ns: int    # the idle clock's start
    idle_timeout_ns: int
    seq_uid: int
    flags: int
    node: str                 # who made it

    @property
    def end_wall_ns(self):
        """When the grant is dead on both clocks, unless traffic kept it alive."""
        return max(self.window_end_wall_ns, self.last_seen_wall_ns + self.idle_timeout_ns)


def clock_offset_ns():
    """wall - monotonic, now: what converts between the two clocks."""
    return time.time_ns() - monotonic_ns()


def grant_key(prefix, source, proto, port):
    return f"{prefix}grants/{ipaddress.ip_address(source)}/{proto}:{port}"


def source_grants_prefix(prefix, source):
    return f"{prefix}grants/{ipaddress.ip_address(source)}/"


def revoked_key(prefix, source):
    return f"{prefix}revoked/{ipaddress.ip_address(source)}"


def spa_key(prefix, digest):
    return f"{prefix}spa/{bytes(digest).hex()}"


def ban_key(prefix, source):
    return f"{prefix}bans/{ipaddress.ip_address(source)}"


def unbanned_key(prefix, source):
    return f"{prefix}unbanned/{ipaddress.ip_address(source)}"


def encode_grant(record):
    return json.dumps({
        "v": VERSION, "node": record.node, "window_end": record.window_end_wall_ns,
        "last_seen": record.last_seen_wall_ns, "idle": record.idle_timeout_ns, "seq_uid": record.seq_uid,
        "flags": record.flags,
    }, separators=(",", ":"))


def encode_event(node, **fields):
    """A tombstone's or a ban's value: who and when, plus fields."""
    return json.dumps({"v": VERSION, "node": node, "at": time.time_ns(), **fields}, separators=(",", ":"))


def kind_of(prefix, key):
    """("grants"|"revoked"|"spa"|"bans"|"unbanned", rest of the key); BadRecord otherwise."""
    if not key.startswith(prefix):
        raise BadRecord(f"{key}: outside the prefix")
    kind, slash, rest = key[len(prefix):].partition("/")
    if not slash or kind not in ("grants", "revoked", "spa", "bans", "unbanned") or not rest:
        raise BadRecord(f"{key}: not a key xknock writes")
    return kind, rest


def decode_grant(prefix, key, value):
    kind, rest = kind_of(prefix, key)
    if kind != "grants":
        raise BadRecord(f"{key}: not a grant")
    source_text, slash, port_text = rest.partition("/")
    proto, colon, port = port_text.partition(":")
    try:
        source = ipaddress.ip_address(source_text)
        port = int(port)
    except ValueError:
        raise BadRecord(f"{key}: not <source>/<proto>:<port>") from None
    if not slash or not colon or proto not in PROTOS or not 1 <= port <= 65535:
        raise BadRecord(f"{key}: not <source>/<proto>:<port>")
    fields = _json(key, value)
    try:
        record = GrantRecord(source, proto, port, _int(fields, "window_end"), _int(fields, "last_seen"),
                             _int(fields, "idle"), _int(fields, "seq_uid", 1 << 32), _int(fields, "flags", 1 << 32),
                             _node(fields))
    except (KeyError, TypeError):
        raise BadRecord(f"{key}: value lacks a field xknock writes") from None
    return record


def decode_event(key, value):
    """The fields of a tombstone or ban value (node, at, ...)."""
    fields = _json(key, value)
    try:
        _node(fields)
        _int(fields, "at")
    except (KeyError, TypeError):
        raise BadRecord(f"{key}: value lacks a field xknock writes") from None
    return fields


def source_of(key_rest):
    try:
        return ipaddress.ip_address(key_rest)
    except ValueError:
        raise BadRecord(f"{key_rest}: not an address") from None


def _json(key, value):
    try:
        fields = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise BadRecord(f"{key}: value is not xknock's JSON") from None
    if not isinstance(fields, dict) or fields.get("v") != VERSION:
        raise BadRecord(f"{key}: value is not xknock's (version {VERSION})")
    return fields


def _int(fields, name, below=1 << 63):
    value = fields[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < below:
        raise TypeError(name)
    return value


def _node(fields):
    node = fields["node"]
    if not isinstance(node, str) or not node:
        raise TypeError("node")
    return node


def to_local(record, offset_ns):
    """(window_end_ns, last_seen_ns) on this node's monotonic clock, given
    offset_ns = wall - monotonic here. A deadline already passed stays passed."""
    return max(0, record.window_end_wall_ns - offset_ns), max(0, record.last_seen_wall_ns - offset_ns)
