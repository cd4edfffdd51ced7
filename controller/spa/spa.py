"""Single packet authorization: the controller's half (docs/spa.md).

The data path drops every packet to the SPA port and hands the plausible ones
to us on their own ring buffer. SpaVerifier judges one payload in fwknop's
order, each check before any work the next one needs: prefix-tacking, replay,
the sender's stanzas, HMAC (constant time, before any decryption), decryption
and the inner digest, age, user, the address rule, the ports. SpaReceiver feeds
it from the ring buffer, writes the grants of the accepted and counts every
outcome in the filter's counters, so status, metrics and top see them.

Nothing is ever sent back, and no log line carries a key or a payload.
"""

import ctypes
import dataclasses
import hashlib
import ipaddress
import logging
import time

from ..errors import XknockError
from ..kernel import clock, layout
from ..kernel.lock import map_lock
from ..kernel.maps import from_addr, to_addr
from ..state import grants
from ..wire import spa_message
from . import spa_replay
from .spa_replay import ReplayCacheError

log = logging.getLogger("xknock.spa")

Reason = layout.Reason
# The reasons an SPA payload is judged with, and their names in logs.
OUTCOMES = {
    Reason.SPA_ACCEPTED: "accepted",
    Reason.SPA_BAD_HMAC: "bad_hmac",
    Reason.SPA_REPLAYED: "replayed",
    Reason.SPA_STALE: "stale",
    Reason.SPA_MALFORMED: "malformed",
    Reason.SPA_UNKNOWN_USER: "unknown_user",
    Reason.SPA_PORT_DENIED: "port_denied",
    Reason.SPA_SOURCE_DENIED: "source_denied",
    Reason.SPA_GRANT_FAILED: "grant_failed",
}
# fwknop message types we act on; command and NAT messages are refused.
ACCESS_MSG = 1
CLIENT_TIMEOUT_ACCESS_MSG = 3
ANY_ADDRESS = ipaddress.IPv4Address("0.0.0.0")
FLUSH_EVERY_S = 1.0
PAYLOAD_OFFSET = layout.SpaEvent.payload.offset


@dataclasses.dataclass
class Verdict:
    outcome: Reason
    detail: str = ""               # why, for the log; never a secret
    user: str | None = None        # the stanza whose HMAC key matched
    address: object = None         # whom to grant (accepted only)
    ports: tuple = ()              # (proto name, port)
    open_for_ns: int = 0
    idle_timeout_ns: int = 0

    @property
    def name(self):
        return OUTCOMES[self.outcome]


class ReplayClaimLost(XknockError):
    """Another node of the cluster claimed this digest first: a replay."""


def spa_uid(user_name):
    """A grant's seq_uid for a SPA user: stable, apart from sequences' (flags say SPA)."""
    uid = int.from_bytes(hashlib.blake2b(b"spa\0" + user_name.encode(), digest_size=4).digest(), "little")
    return uid or 1


class SpaVerifier:
    """Judges payloads against one [spa] config; owns no map."""

    def __init__(self, spa, replay_cache, wall_clock=time.time):
        self.spa = spa
        self.replay = replay_cache
        self.wall_clock = wall_clock
        # claim(digest, message timestamp): the cluster's replay check across
        # nodes (cluster/node.py), called before the digest is recorded here;
        # raises ReplayClaimLost (a replay) or ReplayCacheError (refuse).
        self.claim = None

    def verify(self, payload, source):
        source = ipaddress.ip_address(source)
        if spa_message.prefix_tacked(payload):
            return Verdict(Reason.SPA_MALFORMED, "prefix-tacked")
        digest = spa_message.replay_digest(payload)
        if self.replay.seen(digest):
            return Verdict(Reason.SPA_REPLAYED, "digest seen before")
        stanzas = [user for user in self.spa.users if user.source_allowed(source)]
        if not stanzas:
            return Verdict(Reason.SPA_SOURCE_DENIED, "no stanza admits this source")
        for user in stanzas:
            ciphertext = spa_message.verify_hmac(payload, user.hmac_key, user.hmac_digest)
            if ciphertext is not None:
                break
        else:
            return Verdict(Reason.SPA_BAD_HMAC, "no stanza's HMAC key matches")
        try:
            message = spa_message.parse(spa_message.decrypt(ciphertext, user.key))
        except spa_message.SpaFormatError as err:
            return Verdict(Reason.SPA_MALFORMED, err.outcome, user.name)
        # Authentic from here on: remember it before anything can grant.
        try:
            if self.claim is not None:
                self.claim(digest, message.timestamp)
            self.replay.add(digest, message.timestamp)
        except ReplayClaimLost as err:
            return Verdict(Reason.SPA_REPLAYED, str(err), user.name)
        except ReplayCacheError as err:   # unrecorded means replayable: refuse
            return Verdict(Reason.SPA_GRANT_FAILED, str(err), user.name)
        return self._judge(message, user, source)

    def _judge(self, message, user, source):
        age_s = self.wall_clock() - message.timestamp
        if abs(age_s) * 1e9 > self.spa.max_age_ns:
            return Verdict(Reason.SPA_STALE, f"timestamp {age_s:+.0f}s from now", user.name)
        if user.username is not None and message.username != user.username:
            return Verdict(Reason.SPA_UNKNOWN_USER, "user does not match the stanza's username", user.name)
        if message.message_type not in (ACCESS_MSG, CLIENT_TIMEOUT_ACCESS_MSG):
            return Verdict(Reason.SPA_MALFORMED, f"message type {message.message_type} not supported "
                                                 "(command and NAT messages are refused)", user.name)
        address, refusal = self._grantee(message, user, source)
        if refusal:
            return Verdict(Reason.SPA_SOURCE_DENIED, refusal, user.name)
        allowed = {(step.proto, step.port) for step in user.open}
        asked = tuple(dict.fromkeys(message.access_ports))
        denied = [f"{proto}:{port}" for proto, port in asked if (proto, port) not in allowed]
        if not asked or denied:
            return Verdict(Reason.SPA_PORT_DENIED, f"not allowed: {', '.join(denied) or 'no port asked'}", user.name)
        open_for_ns = user.open_for_ns
        if message.client_timeout:
            open_for_ns = min(message.client_timeout * 1_000_000_000, user.max_open_for_ns)
        return Verdict(Reason.SPA_ACCEPTED, "", user.name, address, asked, open_for_ns,
                       max(user.idle_timeout_ns, open_for_ns))

    @staticmethod
    def _grantee(message, user, source):
        """(address to grant, None) or (None, why not)."""
        try:
            asked = ipaddress.ip_address(message.access_address)
        except ValueError:
            return None, "the message's address is not an IP address"
        if asked == ANY_ADDRESS:
            if user.require_source_address:
                return None, "0.0.0.0 in the message, and the stanza requires the address"
            return source, None
        if source.version == 6:
            # fwknop's message carries IPv4 only: an IPv6 sender can ask for
            # its own address only as 0.0.0.0 (what `xknock spa` sends). A
            # message sealed for some IPv4 address was meant for that
            # address: sniffed and resent from IPv6, it must open nothing.
            if user.grant_requested_address:
                return asked, None
            return None, f"the message asks for {asked}, the packet came from {source} (IPv6 senders ask for 0.0.0.0)"
        if asked == source:
            return source, None
        if user.grant_requested_address:
            return asked, None
        return None, f"the message asks for {asked}, the packet came from {source}"


def open_replay_cache(spa):
    """The digest cache of [spa], loaded and pruned; XknockError when it cannot
    be trusted (then no SPA packet is accepted: better shut than replayable)."""
    try:
        cache = spa_replay.ReplayCache(spa.replay_cache)
        cache.prune(time.time(), spa.max_age_ns / 1e9)
    except (spa_replay.ReplayCacheError, OSError) as err:
        raise XknockError(f"SPA replay cache {spa.replay_cache}: {err}; nothing was attached "
                          "(move the file away to start with an empty cache)") from err
    return cache


class SpaReceiver:
    """Reads candidates from the data path's spa_events ring buffer."""

    def __init__(self, loaded, maps, spa, replay_cache=None):
        self.maps = maps
        cache = replay_cache if replay_cache is not None else open_replay_cache(spa)   # an empty cache is falsy
        self.verifier = SpaVerifier(spa, cache)
        self.on_grant = None       # on_grant(verdict, seq_uid) once its grants are written (cluster/node.py)
        self.pending = {}          # Reason -> count not yet in the counters map
        self.next_flush = time.monotonic() + FLUSH_EVERY_S
        loaded.bpf["spa_events"].open_ring_buffer(self._callback)

    def set_spa(self, spa):
        """A reload: new stanzas and limits (a new cache file if it moved), or
        None when [spa] is gone."""
        if spa is not None and (self.verifier.spa is None or spa.replay_cache != self.verifier.spa.replay_cache):
            self.verifier.replay = open_replay_cache(spa)
        self.verifier.spa = spa

    def sweep(self):
        """Forgets digests too old to be replayed, and flushes the counts."""
        if self.verifier.spa is not None:
            self.verifier.replay.prune(time.time(), self.verifier.spa.max_age_ns / 1e9)
        self.flush()

    def flush_due(self):
        if self.pending and time.monotonic() >= self.next_flush:
            self.flush()

    def _callback(self, ctx, data, size):
        event = ctypes.cast(data, ctypes.POINTER(layout.SpaEvent)).contents
        try:
            # string_at, not a slice: slicing a ctypes array makes a list of ints (10x slower).
            length = min(event.len, layout.SPA_MAX_PAYLOAD, size - PAYLOAD_OFFSET)   # records are cut to size
            payload = ctypes.string_at(data + PAYLOAD_OFFSET, length)
            self.handle(payload, from_addr(event.src), arrived_ns=event.ts_ns)
        except Exception:   # one bad packet must never stop the receiver
            log.exception("SPA packet handling failed")
        return 0

    def remember(self, source):
        """A source whose SPA was accepted: past the total rate, the kernel
        still queues its packets (xknock_spa.h)."""
        try:
            self.maps.spa_known.update(to_addr(source), ctypes.c_uint64(clock.monotonic_ns()))
        except OSError as err:   # an LRU never fills; anything else must not stop the receiver
            log.warning("could not remember a SPA source", extra={"fields": {"error": str(err)}})

    def handle(self, payload, source, arrived_ns=None):
        """arrived_ns: when the data path saw the packet (CLOCK_MONOTONIC), for
        the log's latency_ms: arrival to grants written."""
        if self.verifier.spa is None:
            return None   # a candidate queued just before a reload removed [spa]
        verdict = self.verifier.verify(payload, source)
        if verdict.outcome == Reason.SPA_ACCEPTED:
            verdict = self._grant(verdict)
            self.remember(source)
        self.pending[verdict.outcome] = self.pending.get(verdict.outcome, 0) + 1
        if time.monotonic() >= self.next_flush:
            self.flush()
        if verdict.user is None and not log.isEnabledFor(logging.DEBUG):
            return verdict   # junk, the bulk of any flood: counted, not logged
        fields = {"outcome": verdict.name, "source": str(source)}
        if verdict.user:
            fields["user"] = verdict.user
        if verdict.outcome == Reason.SPA_ACCEPTED:
            fields["granted"] = str(verdict.address)
            fields["ports"] = ",".join(f"{proto}:{port}" for proto, port in verdict.ports)
            fields["open_for"] = f"{verdict.open_for_ns // 1_000_000_000}s"
            if arrived_ns:
                fields["latency_ms"] = f"{(clock.monotonic_ns() - arrived_ns) / 1e6:.2f}"
            log.info("spa_accepted", extra={"fields": fields})
        else:
            fields["why"] = verdict.detail
            # Refusals are what floods are made of: debug, and counted.
            log.log(logging.INFO if verdict.user else logging.DEBUG, "spa_refused", extra={"fields": fields})
        return verdict

    def _grant(self, verdict):
        try:
            grants.write_grants(self.maps, verdict.address, verdict.ports, verdict.open_for_ns,
                                verdict.idle_timeout_ns, seq_uid=spa_uid(verdict.user), flags=layout.GRANT_SPA)
        except grants.GrantsFull as err:
            return dataclasses.replace(verdict, outcome=Reason.SPA_GRANT_FAILED, detail=str(err))
        if self.on_grant is not None:
            try:
                self.on_grant(verdict, spa_uid(verdict.user))
            except Exception:   # an observer must never stop the receiver
                log.exception("SPA grant observer failed")
        return verdict

    def flush(self):
        """Adds the outcomes counted since the last flush to the counters map."""
        self.next_flush = time.monotonic() + FLUSH_EVERY_S
        pending, self.pending = self.pending, {}
        if pending:
            with map_lock(self.maps):
                for reason, n in pending.items():
                    self.maps.count_by_controller(reason, n)
