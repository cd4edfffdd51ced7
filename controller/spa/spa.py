"""Single packet authorization: the controller's half (docs/spa.md).

The data path drops every packet to the SPA port and hands the plausible ones
to us on their own ring buffer. SpaVerifier judges one payload in fwknop's
order, each check before any work the next one needs: prefix-tacking, replay,
the sender's stanzas, HMAC (constant time, before any decryption), decryption
and the inner digest, age, user, the address rule, the ports. SpaReceiver feeds
it from the ring buffer on a thread of its own, writes the grants of the
accepted and counts every outcome in the filter's counters, so status, metrics
and top see them.

Nothing is ever sent back, and no log line carries a key or a payload.
"""

import ctypes
import dataclasses
import hashlib
import ipaddress
import logging
import os
import sys
import threading
import time

from ..errors import XknockError
from ..kernel import clock, layout
from ..kernel.lock import map_lock
from ..kernel.maps import from_addr, to_addr
from ..kernel.ring import Ring
from ..state import grants
from ..wire import spa_message, spa_pubkey
from . import spa_replay
from .spa_pubkey import Acknowledger, PubkeyVerifier
from .spa_replay import ReplayCacheError
from .verdict import OUTCOMES, Verdict  # noqa: F401 (OUTCOMES: the names other modules read here)

log = logging.getLogger("xknock.spa")

Reason = layout.Reason
# fwknop message types we act on; command and NAT messages are refused.
ACCESS_MSG = 1
CLIENT_TIMEOUT_ACCESS_MSG = 3
ANY_ADDRESS = ipaddress.IPv4Address("0.0.0.0")
FLUSH_EVERY_S = 1.0
SWEEP_EVERY_S = 10.0   # replay cache pruning
POLL_MS = 100          # the receiver's thread looks up at least this often (its stop, flush, sweep)
RING_BUDGET = 256      # candidates judged per poll, then the same
# The verifier holds the interpreter's lock through whole HMACs, and the main
# loop's thread waits up to one switch interval for it after every system
# call (a policy rewrite makes hundreds): 0.5 ms instead of Python's 5 keeps a
# rotation or a reload under a flood to a fraction of a second.
SWITCH_INTERVAL_S = 0.0005
PAYLOAD_OFFSET = layout.SpaEvent.payload.offset


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
        self.pubkey = PubkeyVerifier()
        # claim(digest, message timestamp): the cluster's replay check across
        # nodes (cluster/node.py), called before the digest is recorded here;
        # raises ReplayClaimLost (a replay) or ReplayCacheError (refuse).
        self.claim = None

    def verify(self, payload, source):
        source = ipaddress.ip_address(source)
        if spa_pubkey.is_candidate(payload):   # the public-key protocol's header (docs/spa-pubkey-format.md)
            return self.pubkey.verify(self.spa, self.replay, payload, source, self.wall_clock())
        if spa_message.prefix_tacked(payload):
            return Verdict(Reason.SPA_MALFORMED, "prefix-tacked")
        digest = spa_message.replay_digest(payload)
        if self.replay.seen(digest):
            return Verdict(Reason.SPA_REPLAYED, "digest seen before")
        stanzas = [user for user in self.spa.users if user.speaks_fwknop and user.source_allowed(source)]
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


def open_replay_cache(spa, consequence="nothing was attached"):
    """The digest cache of [spa], loaded and pruned; XknockError when it cannot
    be trusted (then no SPA packet is accepted: better shut than replayable),
    saying `consequence`."""
    try:
        cache = spa_replay.ReplayCache(spa.replay_cache)
        cache.prune(time.time(), spa.max_age_ns / 1e9)
    except (spa_replay.ReplayCacheError, OSError) as err:
        raise XknockError(f"SPA replay cache {spa.replay_cache}: {err}; {consequence} "
                          "(move the file away to start with an empty cache)") from err
    return cache


class SpaReceiver:
    """Reads candidates from the data path's spa_events ring buffer and judges
    them on a thread of its own (start()), so that no flood of candidates can
    hold up the controller's loop: that loop keeps the watchdog, the rotation
    and the sweeps, and only hands this receiver a new [spa] on a reload.
    The kernel's ring (2 MiB) is the bounded queue between the two: what does
    not fit is dropped and counted there (`lost`), and the data path never
    waits."""

    def __init__(self, loaded, maps, spa, replay_cache=None):
        """spa None: a receiver that judges nothing until a reload brings [spa]."""
        self.maps = maps
        if spa is not None and replay_cache is None:   # (an empty cache is falsy: compare with None)
            replay_cache = open_replay_cache(spa)
        self.verifier = SpaVerifier(spa, replay_cache)
        self.acknowledger = Acknowledger()
        self.on_grant = None       # on_grant(verdict, seq_uid) once its grants are written (cluster/node.py)
        self.pending = {}          # Reason -> count not yet in the counters map
        self.next_flush = time.monotonic() + FLUSH_EVERY_S
        self._lock = threading.Lock()   # the verifier's [spa] and cache: judged here, switched by reloads
        self._stop = threading.Event()
        self._thread = None
        self._ring = Ring(loaded.map_fd("spa_events"), self._on_record, RING_BUDGET)

    def start(self):
        if self._thread is None:
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
            self._thread = threading.Thread(target=self._serve, name="xknock-spa", daemon=True)
            self._thread.start()
        return self

    def _serve(self):
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while not self._stop.is_set():
            try:
                self._ring.poll(POLL_MS)
                self.flush_due()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_EVERY_S
                    self.sweep()
            except Exception:   # the receiver must outlive any one failure (a cache that cannot compact...)
                log.exception("SPA receiver round failed")
                self._stop.wait(POLL_MS / 1000)

    def stop(self):
        """Ends the thread, counts what it judged, and lets go of the cache."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        self._ring.close()
        if self.verifier.replay is not None:
            self.verifier.replay.close()

    def prepare(self, spa):
        """The replay cache a reload to `spa` needs: the running one when the
        path stays, a new one opened now when it moves (XknockError when it
        cannot be trusted), None without [spa]. Nothing is switched yet: give it
        to switch() once the policy is live, or to abandon() if it is not."""
        if spa is None:
            return None
        current = self.verifier.replay
        if current is not None and current.path == os.path.abspath(spa.replay_cache):
            return current
        return open_replay_cache(spa, consequence="the reload changed nothing")

    def abandon(self, replay_cache):
        """A prepared cache whose reload failed."""
        if replay_cache is not None and replay_cache is not self.verifier.replay:
            replay_cache.close()

    def switch(self, spa, replay_cache):
        """A reload that went through: new stanzas and limits, the cache from
        prepare(); None, None when [spa] is gone (its cache is let go, so that
        it can be opened again, by this controller or another)."""
        with self._lock:
            old = self.verifier.replay
            self.verifier.spa, self.verifier.replay = spa, replay_cache
        if old is not None and old is not replay_cache:
            old.close()

    def sweep(self):
        """Forgets digests too old to be replayed, and flushes the counts."""
        with self._lock:
            if self.verifier.spa is not None:
                self.verifier.replay.prune(time.time(), self.verifier.spa.max_age_ns / 1e9)
        self.flush()

    def flush_due(self):
        if self.pending and time.monotonic() >= self.next_flush:
            self.flush()

    def _on_record(self, data, size):
        event = ctypes.cast(data, ctypes.POINTER(layout.SpaEvent)).contents
        try:
            # string_at, not a slice: slicing a ctypes array makes a list of ints (10x slower).
            length = min(event.len, layout.SPA_MAX_PAYLOAD, size - PAYLOAD_OFFSET)   # records are cut to size
            payload = ctypes.string_at(data + PAYLOAD_OFFSET, length)
            self.handle(payload, from_addr(event.src), arrived_ns=event.ts_ns, source_port=event.sport)
        except Exception:   # one bad packet must never stop the receiver
            log.exception("SPA packet handling failed")

    def remember(self, source):
        """A source whose SPA was accepted: past the total rate, the kernel
        still queues its packets (xknock_spa.h)."""
        try:
            self.maps.spa_known.update(to_addr(source), ctypes.c_uint64(clock.monotonic_ns()))
        except OSError as err:   # an LRU never fills; anything else must not stop the receiver
            log.warning("could not remember a SPA source", extra={"fields": {"error": str(err)}})

    def handle(self, payload, source, arrived_ns=None, source_port=0):
        """arrived_ns: when the data path saw the packet (CLOCK_MONOTONIC), for
        the log's latency_ms: arrival to grants written."""
        with self._lock:
            if self.verifier.spa is None:
                return None   # a candidate queued just before a reload removed [spa]
            verdict = self.verifier.verify(payload, source)
        if verdict.outcome == Reason.SPA_ACCEPTED:
            verdict = self._grant(verdict)
            self.remember(source)
        if verdict.reply is not None:
            self.acknowledger.send(verdict, self.verifier.spa.port, source_port)
        self.pending[verdict.outcome] = self.pending.get(verdict.outcome, 0) + 1
        if time.monotonic() >= self.next_flush:
            self.flush()
        if verdict.user is None and not log.isEnabledFor(logging.DEBUG):
            return verdict   # junk, the bulk of any flood: counted, not logged
        fields = {"outcome": verdict.name, "source": str(source)}
        if verdict.user:
            fields["user"] = verdict.user
        if verdict.outcome == Reason.SPA_ACCEPTED:
            fields["granted"] = ",".join(str(address) for address in (verdict.address, *verdict.also))
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
            for address in (verdict.address, *verdict.also):
                grants.write_grants(self.maps, address, verdict.ports, verdict.open_for_ns,
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
