#!/usr/bin/env python3
"""xknock's public-key SPA client, standalone: one file, Python 3.9+ and the
`cryptography` package (pip install cryptography; Debian: python3-cryptography),
no xknock, no BCC, no root. docs/spa-pubkey-format.md is the wire format.

  xknock-spa-pubkey.py --keygen ~/.xknock/me.key       # your key pair; give me.key.pub to the server
  xknock-spa-pubkey.py HOST -A tcp/22 --identity ~/.xknock/me.key --server-key server.pub

It sends one packet asking HOST to open the ports for this machine's IPv4 and
IPv6 addresses (by route, or -a ADDRESS), waits for the server's sealed answer
and sends a fresh packet when none comes, --tries times. Exit status: 0
granted, 1 refused or an error, 2 no answer.

The packet code below the marker is an exact copy of xknock's
controller/wire/hpke.py and controller/wire/spa_pubkey.py (a test keeps it
so: `python -m xknock_dev.standalone` rewrites it).
"""

import argparse
import base64
import ipaddress
import os
import re
import select
import socket
import sys
import time
import types

USER_KEY, USER_PUBLIC, SERVER_PUBLIC = "XKNOCK_SPA_USER_KEY", "XKNOCK_SPA_USER_PUBLIC", "XKNOCK_SPA_SERVER_PUBLIC"


class Refusal(Exception):
    """A one-line error for the user."""


def load_wire():
    """The embedded modules, as the package _xknock_wire."""
    package = types.ModuleType("_xknock_wire")
    package.__path__ = []
    sys.modules[package.__name__] = package
    for name in ("hpke", "spa_pubkey"):
        module = types.ModuleType(f"_xknock_wire.{name}")
        module.__package__ = package.__name__
        sys.modules[module.__name__] = module
        exec(compile(SOURCES[name], f"<xknock {name}.py>", "exec"), module.__dict__)
        setattr(package, name, module)
    return package.spa_pubkey


def keygen(path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    for target in (path, path + ".pub"):
        if os.path.lexists(target):
            raise Refusal(f"{target}: exists; move it away first")
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"# xknock SPA user private key: keep it 0600\n{USER_KEY}: {base64.b64encode(raw).decode()}\n")
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    with open(path + ".pub", "w") as out:
        out.write(f"{USER_PUBLIC}: {public}\n")
    print(f"{USER_PUBLIC}: {public}")


def load_identity(path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_mode & 0o077:
                raise Refusal(f"{path}: readable by group or others: chmod 600 {path}")
            text = handle.read(4096).decode("ascii", "replace")
    except OSError as err:
        raise Refusal(f"{path}: cannot read: {err.strerror}") from None
    match = re.search(rf"^{USER_KEY}\s*:\s*([A-Za-z0-9+/=]+)\s*$", text, re.M)
    raw = base64.b64decode(match.group(1)) if match else b""
    if len(raw) != 32:
        raise Refusal(f"{path}: no {USER_KEY} line (make one with --keygen)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def read_server_key(text):
    if os.path.exists(text):
        with open(text) as handle:
            text = handle.read(4096)
    match = re.search(r"([A-Za-z0-9+/]{43}=)", text)
    if not match:
        raise Refusal("--server-key: not a public key (base64 of 32 bytes, the server's .pub file)")
    return base64.b64decode(match.group(1))


def parse_port(text):
    proto, sep, port = text.replace(":", "/", 1).partition("/")
    if proto.lower() not in ("tcp", "udp") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected tcp/PORT or udp/PORT")
    return proto.lower(), int(port)


def route_source(family, address):
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))   # UDP: sends nothing
        except OSError:
            return None
        return ipaddress.ip_address(sock.getsockname()[0].split("%")[0])


def addresses(host, given):
    chosen = {}
    for text in given:
        address = ipaddress.ip_address(text)
        if address.version in chosen:
            raise Refusal(f"-a {text}: one address per family")
        chosen[address.version] = address
    if not chosen:
        for info in socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_DGRAM):
            version = 4 if info[0] == socket.AF_INET else 6
            if version not in chosen:
                source = route_source(info[0], info[4][0])
                if source is not None:
                    chosen[version] = source
    return chosen.get(4), chosen.get(6)


def knock(wire, args):
    user, server_public = load_identity(args.identity), read_server_key(args.server_key)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(args.host, args.port, socket.AF_UNSPEC, socket.SOCK_DGRAM)[0]
    except socket.gaierror as err:
        raise Refusal(f"cannot resolve {args.host!r}: {err.strerror}") from None
    ipv4, ipv6 = addresses(args.host, args.allow_ip)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        exporters = []
        for _ in range(1 if args.no_wait else args.tries):
            packet, exporter = wire.seal_packet(server_public, user, args.access, ipv4=ipv4, ipv6=ipv6,
                                                open_for_s=args.open_for, acknowledge=not args.no_wait,
                                                ack_port=sock.getsockname()[1])
            exporters.append(exporter)
            sock.sendto(packet, sockaddr)
            if args.no_wait:
                print(f"sent to {sockaddr[0]} port {args.port}")
                return 0
            deadline = time.monotonic() + 1.0
            while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
                try:
                    data = sock.recv(2048)
                except OSError:
                    continue
                for secret in exporters:
                    try:
                        ack = wire.open_ack(secret, data)
                    except wire.SpaPubkeyError:
                        continue
                    if not ack.granted:
                        print(f"refused: {ack.detail}", file=sys.stderr)
                        return 1
                    whom = " and ".join(str(a) for a in (ack.ipv4, ack.ipv6) if a)
                    opened = " ".join(f"{proto}/{port}" for proto, port in ack.ports)
                    print(f"granted by {sockaddr[0]}: {opened} for {whom} until "
                          f"{time.strftime('%H:%M:%S', time.localtime(ack.until))}")
                    return 0
    print(f"no answer from {sockaddr[0]} port {args.port} after {args.tries} packets", file=sys.stderr)
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(description="Send one xknock public-key SPA packet.")
    parser.add_argument("host", nargs="?")
    parser.add_argument("-A", "--access", type=parse_port, action="append", default=[], help="tcp/22 (repeatable)")
    parser.add_argument("--identity", help="your private key file (--keygen makes it)")
    parser.add_argument("--server-key", help="the server's public key, base64 or its .pub file")
    parser.add_argument("-a", "--allow-ip", action="append", default=[], help="an address to grant (one per family)")
    parser.add_argument("--port", type=int, default=62201)
    parser.add_argument("--open-for", type=int, default=0, metavar="SECONDS")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--no-wait", action="store_true", help="ask for no answer")
    parser.add_argument("--keygen", metavar="FILE", help="write a key pair to FILE and FILE.pub, and exit")
    args = parser.parse_args(argv)
    try:
        if args.keygen:
            keygen(args.keygen)
            return 0
        if not (args.host and args.access and args.identity and args.server_key):
            parser.error("give HOST, -A PROTO/PORT, --identity and --server-key (or --keygen FILE)")
        return knock(load_wire(), args)
    except (Refusal, ValueError, OSError) as err:
        print(f"xknock-spa-pubkey: {err}", file=sys.stderr)
        return 1


# --- embedded: controller/wire/hpke.py and controller/wire/spa_pubkey.py ---
SOURCES = {}
SOURCES['hpke'] = r'''"""RFC 9180 HPKE, the one suite and mode xknock's public-key SPA uses:
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, base mode,
single-shot (one message per encapsulation) plus the secret exporter.

This is the RFC's composition (sections 4, 5.1, 5.2, 5.3, 7.1.3) over
`cryptography`'s X25519, HKDF and ChaCha20-Poly1305: no primitive is written
here. Why not a package: pyhpke needs cryptography >= 42 and Debian bookworm
ships 38 (the controller uses the distribution's, beside BCC), and the
standalone client must need nothing but `cryptography`. The RFC's test vector
A.2.1 checks it (tests/unit/test_hpke.py).

Imports only the standard library and `cryptography`, like everything the
standalone client needs.
"""

import functools
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0003
MODE_BASE = 0x00
N_ENC = 32          # the encapsulated key: an X25519 public key
N_SECRET = 32       # KEM shared secret, Nh of HKDF-SHA256
N_KEY, N_NONCE, N_TAG = 32, 12, 16
KEM_SUITE_ID = b"KEM" + KEM_ID.to_bytes(2, "big")
HPKE_SUITE_ID = b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")


class OpenError(Exception):
    """The ciphertext does not open with this key (tampered, or not ours)."""


def _extract(salt, ikm):
    # HKDF-Extract (RFC 5869 2.2) is HMAC-SHA256 keyed with the salt.
    return hmac.new(salt or b"\0" * 32, ikm, hashlib.sha256).digest()


def _expand(prk, info, length):
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def _labeled_extract(suite_id, salt, label, ikm):
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id, prk, label, info, length):
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info, length)


def public_bytes(public_key):
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def derive_key_pair(ikm):
    """RFC 9180 7.1.3 DeriveKeyPair for X25519: (private key, its public bytes)."""
    prk = _labeled_extract(KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    private = X25519PrivateKey.from_private_bytes(_labeled_expand(KEM_SUITE_ID, prk, b"sk", b"", 32))
    return private, public_bytes(private.public_key())


def _shared_secret(dh, enc, pk_r):
    eae_prk = _labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(KEM_SUITE_ID, eae_prk, b"shared_secret", enc + pk_r, N_SECRET)


def _exchange(private, public_raw):
    """X25519; a low-order public key (all-zero result) is refused, as RFC 9180 7.1.4 asks."""
    try:
        dh = private.exchange(X25519PublicKey.from_public_bytes(public_raw))
    except ValueError as err:
        raise OpenError("invalid X25519 public key") from err
    if dh == bytes(32):
        raise OpenError("low-order X25519 public key")
    return dh


@functools.lru_cache(maxsize=8)
def _context(info):
    """key_schedule_context of base mode: a constant per info (kept: two hashes fewer per packet)."""
    psk_id_hash = _labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info)
    return bytes([MODE_BASE]) + psk_id_hash + info_hash


def _key_schedule(shared_secret, info):
    """(key, base_nonce, exporter_secret) for base mode (RFC 9180 5.1)."""
    context = _context(bytes(info))
    secret = _labeled_extract(HPKE_SUITE_ID, shared_secret, b"secret", b"")
    key = _labeled_expand(HPKE_SUITE_ID, secret, b"key", context, N_KEY)
    base_nonce = _labeled_expand(HPKE_SUITE_ID, secret, b"base_nonce", context, N_NONCE)
    exporter = _labeled_expand(HPKE_SUITE_ID, secret, b"exp", context, N_SECRET)
    return key, base_nonce, exporter


def export(exporter_secret, exporter_context, length):
    """RFC 9180 5.3 Context.Export."""
    return _labeled_expand(HPKE_SUITE_ID, exporter_secret, b"sec", exporter_context, length)


def seal(pk_r, info, aad, plaintext, ikm_e=None):
    """Single-shot SealBase: (enc, ciphertext, exporter_secret). ikm_e fixes
    the ephemeral key, for known-answer tests only; otherwise it is fresh."""
    if ikm_e is None:
        private_e = X25519PrivateKey.generate()
        enc = public_bytes(private_e.public_key())
    else:
        private_e, enc = derive_key_pair(ikm_e)
    shared = _shared_secret(_exchange(private_e, pk_r), enc, pk_r)
    key, nonce, exporter = _key_schedule(shared, info)
    return enc, ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad), exporter


def open_(sk_r, enc, info, aad, ciphertext):
    """Single-shot OpenBase: (plaintext, exporter_secret); OpenError if it does not open."""
    pk_r = public_bytes(sk_r.public_key())
    shared = _shared_secret(_exchange(sk_r, enc), enc, pk_r)
    key, nonce, exporter = _key_schedule(shared, info)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad), exporter
    except InvalidTag:
        raise OpenError("the ciphertext does not open") from None
'''
SOURCES['spa_pubkey'] = r'''"""xknock's public-key SPA packet and its acknowledgement (docs/spa-pubkey-format.md).

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
'''

if __name__ == "__main__":
    sys.exit(main())
