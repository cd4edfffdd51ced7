"""RFC 9180 HPKE, the one suite and mode xknock's public-key SPA uses:
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
