"""xknock's public-key SPA packet and its acknowledgement (docs/spa-pubkey-format.md).

Pure functions, bytes in and out; no sockets, no files, no policy. The
server's checks are separate steps, cheapest first, so the verifier can count
each outcome and spend a public-key operation only on what passed the cheap
ones: is_candidate -> split (size, strict base64) -> tag_matches (one
SHA-256) -> open_packet (one X25519, HPKE) -> parse -> signature_valid
(one Ed25519 verification, after the user's key was found).

The datagram is MAGIC and then the unpadded base64 of enc || tag || HPKE
ciphertext, so it passes the data path's cheap filter unchanged (it starts
with base64 characters and is 140-1500 bytes) and the kernel stays as it is.
Everything after MAGIC is fresh randomness or ciphertext: two packets share
no byte but MAGIC, and the user's key travels encrypted.

The sender is authenticated by an Ed25519 signature inside the ciphertext,
over the server's key, enc, the tag and the message: not by HPKE's auth mode,
whose DH authentication anyone holding the server's private key can forge for
every user (RFC 9180 9.1.1, key-compromise impersonation), and which needs the
sender's key before decryption (so either names the user in clear, or costs
one DH per user).

Standard library and `cryptography` only (the standalone client needs nothing else).
"""

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import os
import struct
import time

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import hpke

MAGIC = b"XKSPA2"                 # the version header, itself base64 characters
ACK_MAGIC = b"XKACK2"
VERSION = 1
INFO = b"xknock spa2 packet"
TAG_LABEL = b"xknock spa2 tag"
SIGNATURE_LABEL = b"xknock spa2 signature"
ACK_LABEL = b"xknock spa2 ack"
TAG_BYTES = 8
NONCE_BYTES = 16
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_PORTS = 16
FLAG_ACK = 0x01
PROTOS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {number: name for name, number in PROTOS.items()}

# The message, fixed size whatever it asks (its length tells nothing):
# version, flags, ack port, timestamp, nonce, user key, open_for, IPv4, IPv6,
# port count, 16 (proto, port) slots; then the signature.
MESSAGE = struct.Struct("!BBHQ16s32sI4s16sB48s")
PLAINTEXT_BYTES = MESSAGE.size + SIGNATURE_BYTES
BODY_BYTES = hpke.N_ENC + TAG_BYTES + PLAINTEXT_BYTES + hpke.N_TAG
PACKET_BYTES = len(MAGIC) + (BODY_BYTES * 4 + 2) // 3   # unpadded base64
NO_IPV4 = ipaddress.IPv4Address(0)
NO_IPV6 = ipaddress.IPv6Address(0)

# The acknowledgement: status, reason code, until (unix seconds), port count,
# 16 port slots, granted IPv4 and IPv6, a short reason text.
ACK_MESSAGE = struct.Struct("!BBQB48s4s16s64s")
ACK_NONCE_BYTES = 12
ACK_BYTES = len(ACK_MAGIC) + ACK_NONCE_BYTES + ACK_MESSAGE.size + hpke.N_TAG
ACK_GRANTED, ACK_REFUSED = 0, 1


class SpaPubkeyError(Exception):
    """A packet or acknowledgement that is not well formed; str() says why, in one line."""


class NotAuthentic(SpaPubkeyError):
    """It does not decrypt with the server's key: forged, tampered, or for another key."""


@dataclasses.dataclass(frozen=True)
class Message:
    timestamp: int
    nonce: bytes
    user_key: bytes                   # the sender's Ed25519 public key, raw
    ports: tuple                      # (proto name, port)
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    open_for_s: int = 0               # 0: the server's default
    acknowledge: bool = False
    ack_port: int = 0
    signature: bytes = b""
    signed: bytes = b""               # the message bytes the signature covers


@dataclasses.dataclass(frozen=True)
class Ack:
    granted: bool
    reason: int = 0                   # a layout.Reason number when refused
    until: int = 0                    # unix seconds the grant lasts to
    ports: tuple = ()
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
    detail: str = ""


# --- the server's cheap checks --------------------------------------------------


def is_candidate(payload):
    return bytes(payload[:len(MAGIC)]) == MAGIC


def split(payload):
    """(enc, tag, ciphertext) of a datagram; SpaPubkeyError if its size or
    base64 is not exactly what seal_packet makes (canonical, unpadded: one
    packet has one encoding, so its digest identifies it for the replay cache)."""
    payload = bytes(payload)
    if not is_candidate(payload):
        raise SpaPubkeyError("no XKSPA2 header")
    if len(payload) != PACKET_BYTES:
        raise SpaPubkeyError(f"{len(payload)} bytes, a packet is {PACKET_BYTES}")
    text = payload[len(MAGIC):]
    try:
        body = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SpaPubkeyError("not base64") from None
    if base64.b64encode(body).rstrip(b"=") != text:
        raise SpaPubkeyError("not canonical base64")
    enc, rest = body[:hpke.N_ENC], body[hpke.N_ENC:]
    return enc, rest[:TAG_BYTES], rest[TAG_BYTES:]


def tag_for(server_public, enc):
    """Ties a packet to one server at the cost of a hash: junk, and packets
    for another server, stop here, before any public-key operation."""
    return hashlib.sha256(TAG_LABEL + server_public + enc).digest()[:TAG_BYTES]


def tag_matches(server_public, enc, tag):
    return tag_for(server_public, enc) == tag   # public values: no need for constant time


def open_packet(server_private, enc, tag, ciphertext):
    """(Message, exporter secret); SpaPubkeyError if it does not decrypt or parse."""
    try:
        plaintext, exporter = hpke.open_(server_private, enc, INFO, MAGIC + tag, ciphertext)
    except hpke.OpenError as err:
        raise NotAuthentic(str(err)) from None
    return parse(plaintext), exporter


def parse(plaintext):
    if len(plaintext) != PLAINTEXT_BYTES:
        raise SpaPubkeyError(f"message of {len(plaintext)} bytes, not {PLAINTEXT_BYTES}")
    signed, signature = plaintext[:MESSAGE.size], plaintext[MESSAGE.size:]
    (version, flags, ack_port, timestamp, nonce, user_key, open_for_s, ipv4, ipv6, count,
     slots) = MESSAGE.unpack(signed)
    if version != VERSION:
        raise SpaPubkeyError(f"message version {version}, this server reads {VERSION}")
    if flags & ~FLAG_ACK:
        raise SpaPubkeyError(f"unknown flags {flags:#04x}")
    if not 1 <= count <= MAX_PORTS:
        raise SpaPubkeyError(f"{count} ports asked, 1 to {MAX_PORTS} allowed")
    ports = []
    for index in range(MAX_PORTS):
        proto, port = struct.unpack_from("!BH", slots, 3 * index)
        if index >= count:
            if proto or port:
                raise SpaPubkeyError("bytes after the last port slot")
            continue
        if proto not in PROTO_NAMES or not 1 <= port <= 65535:
            raise SpaPubkeyError(f"port slot {index}: protocol {proto} port {port}")
        ports.append((PROTO_NAMES[proto], port))
    return Message(timestamp=timestamp, nonce=nonce, user_key=user_key, ports=tuple(ports),
                   ipv4=_address(ipaddress.IPv4Address(ipv4), NO_IPV4),
                   ipv6=_address(ipaddress.IPv6Address(ipv6), NO_IPV6),
                   open_for_s=open_for_s, acknowledge=bool(flags & FLAG_ACK), ack_port=ack_port,
                   signature=signature, signed=signed)


def _address(address, none):
    return None if address == none else address


def _signed_context(server_public, enc, tag, signed):
    return SIGNATURE_LABEL + server_public + enc + tag + signed


def signature_valid(message, server_public, enc, tag):
    """The Ed25519 signature by message.user_key: call after the key is
    known to belong to a user (an unknown key costs no verification)."""
    try:
        Ed25519PublicKey.from_public_bytes(message.user_key).verify(
            message.signature, _signed_context(server_public, enc, tag, message.signed))
    except (InvalidSignature, ValueError):
        return False
    return True


# --- the client's side -----------------------------------------------------------


def seal_packet(server_public, user_private, ports, *, ipv4=None, ipv6=None, open_for_s=0, acknowledge=False,
                ack_port=0, timestamp=None, nonce=None, ikm_e=None):
    """(datagram, exporter secret). user_private is an Ed25519PrivateKey;
    ikm_e and nonce fix the randomness, for known-answer vectors only."""
    if not 1 <= len(ports) <= MAX_PORTS:
        raise SpaPubkeyError(f"{len(ports)} ports: ask for 1 to {MAX_PORTS}")
    slots = b"".join(struct.pack("!BH", PROTOS[proto], port) for proto, port in ports)
    user_key = user_private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signed = MESSAGE.pack(VERSION, FLAG_ACK if acknowledge else 0, ack_port,
                          int(time.time()) if timestamp is None else timestamp,
                          os.urandom(NONCE_BYTES) if nonce is None else nonce, user_key, open_for_s,
                          (ipv4 or NO_IPV4).packed, (ipv6 or NO_IPV6).packed, len(ports),
                          slots.ljust(3 * MAX_PORTS, b"\0"))
    # The signature needs enc and the tag, which need the ephemeral key:
    # draw it first (hpke.seal derives it again from the same ikm).
    ikm_e = os.urandom(32) if ikm_e is None else ikm_e
    _, enc = hpke.derive_key_pair(ikm_e)
    tag = tag_for(server_public, enc)
    signature = user_private.sign(_signed_context(server_public, enc, tag, signed))
    sealed_enc, ciphertext, exporter = hpke.seal(server_public, INFO, MAGIC + tag, signed + signature, ikm_e=ikm_e)
    assert sealed_enc == enc
    return MAGIC + base64.b64encode(enc + tag + ciphertext).rstrip(b"="), exporter


# --- the acknowledgement ----------------------------------------------------------


def _ack_key(exporter):
    """Only the packet's sender (who drew its ephemeral key) and the server know it."""
    return hpke.export(exporter, ACK_LABEL, 32)


def seal_ack(exporter, ack, nonce=None):
    slots = b"".join(struct.pack("!BH", PROTOS[proto], port) for proto, port in ack.ports[:MAX_PORTS])
    detail = ack.detail.encode("utf-8", "replace")[:64]
    plaintext = ACK_MESSAGE.pack(ACK_GRANTED if ack.granted else ACK_REFUSED, ack.reason, ack.until,
                                 len(ack.ports[:MAX_PORTS]), slots.ljust(3 * MAX_PORTS, b"\0"),
                                 (ack.ipv4 or NO_IPV4).packed, (ack.ipv6 or NO_IPV6).packed, detail)
    nonce = os.urandom(ACK_NONCE_BYTES) if nonce is None else nonce
    return ACK_MAGIC + nonce + ChaCha20Poly1305(_ack_key(exporter)).encrypt(nonce, plaintext, ACK_MAGIC)


def open_ack(exporter, datagram):
    """Ack; SpaPubkeyError for anything that is not our packet's acknowledgement."""
    datagram = bytes(datagram)
    if len(datagram) != ACK_BYTES or not datagram.startswith(ACK_MAGIC):
        raise SpaPubkeyError("not an xknock acknowledgement")
    nonce = datagram[len(ACK_MAGIC):len(ACK_MAGIC) + ACK_NONCE_BYTES]
    try:
        plaintext = ChaCha20Poly1305(_ack_key(exporter)).decrypt(
            nonce, datagram[len(ACK_MAGIC) + ACK_NONCE_BYTES:], ACK_MAGIC)
    except InvalidTag:
        raise SpaPubkeyError("acknowledgement does not decrypt (not for this packet)") from None
    status, reason, until, count, slots, ipv4, ipv6, detail = ACK_MESSAGE.unpack(plaintext)
    if status not in (ACK_GRANTED, ACK_REFUSED) or count > MAX_PORTS:
        raise SpaPubkeyError("acknowledgement malformed")
    ports = []
    for index in range(count):
        proto, port = struct.unpack_from("!BH", slots, 3 * index)
        ports.append((PROTO_NAMES.get(proto, str(proto)), port))
    return Ack(granted=status == ACK_GRANTED, reason=reason, until=until, ports=tuple(ports),
               ipv4=_address(ipaddress.IPv4Address(ipv4), NO_IPV4),
               ipv6=_address(ipaddress.IPv6Address(ipv6), NO_IPV6),
               detail=detail.rstrip(b"\0").decode("utf-8", "replace"))
