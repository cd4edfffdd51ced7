"""The public-key SPA's verifier and acknowledgements (docs/spa-pubkey-format.md).

PubkeyVerifier judges one XKSPA2 payload, cheapest check first (size and
base64, the server tag, the replay cache, then one X25519 to decrypt, a
look-up of the user's key, one Ed25519 verification), and says what to grant
in the same Verdict the fwknop verifier gives, so spa.SpaReceiver writes the
grants and counts the outcome the same way. The replay cache is the fwknop
packets' one. An authentic packet that asked for it carries an
acknowledgement in Verdict.reply; Acknowledger seals and sends it once the
grants are written. Nothing else is ever sent.
"""

import dataclasses
import ipaddress
import logging
import socket
import time

from ..kernel import layout
from ..wire import spa_message
from ..wire import spa_pubkey as wire
from .spa_replay import ReplayCacheError
from .verdict import Verdict

log = logging.getLogger("xknock.spa")
Reason = layout.Reason


@dataclasses.dataclass(frozen=True)
class Reply:
    """Where an acknowledgement goes and the secret it is sealed with."""
    exporter: bytes = dataclasses.field(repr=False)
    address: object
    port: int


class PubkeyVerifier:
    """Owns nothing but an index of the config's public keys (rebuilt when the config changes)."""

    def __init__(self):
        self._indexed = None
        self._owners = {}      # raw public key -> (SpaUser, PublicKey)

    def _owner(self, spa, raw):
        if self._indexed is not spa:
            self._owners = {key.raw: (user, key) for user in spa.users for key in user.public_keys}
            self._indexed = spa
        return self._owners.get(raw)

    def verify(self, spa, replay, payload, source, now):
        if spa.server_private is None:
            return Verdict(Reason.SPA_MALFORMED, "public-key SPA packet, but [spa] has no server_key")
        try:
            enc, tag, ciphertext = wire.split(payload)
        except wire.SpaPubkeyError as err:
            return Verdict(Reason.SPA_MALFORMED, str(err))
        if not wire.tag_matches(spa.server_public, enc, tag):
            return Verdict(Reason.SPA_BAD_HMAC, "tag: not for this server's key")
        digest = spa_message.replay_digest(payload)   # canonical encoding: one packet, one digest
        if replay.seen(digest):
            return Verdict(Reason.SPA_REPLAYED, "digest seen before")
        try:
            message, exporter = wire.open_packet(spa.server_private, enc, tag, ciphertext)
        except wire.NotAuthentic as err:
            return Verdict(Reason.SPA_BAD_HMAC, str(err))
        except wire.SpaPubkeyError as err:
            return Verdict(Reason.SPA_MALFORMED, str(err))
        owner = self._owner(spa, message.user_key)
        if owner is None:
            return Verdict(Reason.SPA_UNKNOWN_USER, "no user has this public key")
        user, key = owner
        if not wire.signature_valid(message, spa.server_public, enc, tag):
            return Verdict(Reason.SPA_BAD_HMAC, "bad signature")
        # Authentic from here on: remember it before anything can grant.
        try:
            replay.add(digest, message.timestamp)
        except ReplayCacheError as err:   # unrecorded means replayable: refuse
            return Verdict(Reason.SPA_GRANT_FAILED, str(err), user.name)
        reply = Reply(exporter, source, message.ack_port) if message.acknowledge and message.ack_port else None
        verdict = self._judge(spa, message, user, key, source, now)
        return dataclasses.replace(verdict, reply=reply)

    @staticmethod
    def _judge(spa, message, user, key, source, now):
        if key.expired(now):
            return Verdict(Reason.SPA_UNKNOWN_USER, "key expired", user.name)
        if not user.source_allowed(source):
            return Verdict(Reason.SPA_SOURCE_DENIED, "the user's sources do not admit this source", user.name)
        age_s = now - message.timestamp
        if abs(age_s) * 1e9 > spa.max_age_ns:
            return Verdict(Reason.SPA_STALE, f"timestamp {age_s:+.0f}s from now", user.name)
        same, other = (message.ipv4, message.ipv6) if source.version == 4 else (message.ipv6, message.ipv4)
        grantee = source
        if same is not None and same != source:
            # Sealed for another address: sniffed and resent from here, it must open nothing.
            if not user.grant_requested_address:
                return Verdict(Reason.SPA_SOURCE_DENIED, f"the message asks for {same}, the packet came from "
                                                         f"{source}", user.name)
            grantee = same
        allowed = {(step.proto, step.port) for step in user.open}
        denied = [f"{proto}:{port}" for proto, port in message.ports if (proto, port) not in allowed]
        if denied:
            return Verdict(Reason.SPA_PORT_DENIED, f"not allowed: {', '.join(denied)}", user.name)
        if other is not None and not user.source_allowed(other):
            other = None   # the other family's address only where the user's sources admit it (the ack says so)
        open_for_ns = user.open_for_ns
        if message.open_for_s:
            open_for_ns = min(message.open_for_s * 1_000_000_000, user.max_open_for_ns)
        return Verdict(Reason.SPA_ACCEPTED, "", user.name, grantee, tuple(dict.fromkeys(message.ports)),
                       open_for_ns, max(user.idle_timeout_ns, open_for_ns), also=(other,) if other else ())


def ack_for(verdict, now):
    """The Ack that tells the client its verdict."""
    if verdict.outcome != Reason.SPA_ACCEPTED:
        return wire.Ack(granted=False, reason=int(verdict.outcome), detail=verdict.detail or verdict.name)
    addresses = (verdict.address, *verdict.also)
    by_family = {address.version: address for address in map(ipaddress.ip_address, addresses)}
    return wire.Ack(granted=True, reason=int(verdict.outcome), until=int(now + verdict.open_for_ns / 1e9),
                    ports=verdict.ports, ipv4=by_family.get(4), ipv6=by_family.get(6), detail="granted")


class Acknowledger:
    """Sends acknowledgements from the SPA port (so a stateful firewall in
    front of the client lets them back in), one socket per family."""

    def __init__(self, wall_clock=time.time):
        self.wall_clock = wall_clock
        self._sockets = {}

    def _socket(self, family, port):
        sock = self._sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)   # the receiver must never wait on a send
            if family == socket.AF_INET6:   # beside the IPv4 socket on the same port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            except OSError:   # the port is taken: any port will do, the ack is authenticated
                pass
            self._sockets[family] = sock
        return sock

    def send(self, verdict, spa_port, source_port=0):
        """To the packet's source address and port (as the kernel saw them: past a
        NAT, the translated ones), or the message's ack port if the port is unknown."""
        reply = verdict.reply
        address = ipaddress.ip_address(reply.address)
        datagram = wire.seal_ack(reply.exporter, ack_for(verdict, self.wall_clock()))
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        try:
            self._socket(family, spa_port).sendto(datagram, (str(address), source_port or reply.port))
        except OSError as err:
            log.warning("could not send a SPA acknowledgement",
                        extra={"fields": {"to": str(address), "error": err.strerror or str(err)}})

    def close(self):
        for sock in self._sockets.values():
            sock.close()
        self._sockets = {}
