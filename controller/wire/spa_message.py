"""fwknop's single packet authorization (SPA) wire format, Rijndael mode.

Pure functions, bytes in and out; no sockets, no keys on disk, no policy.
The steps are separate so the daemon can run them in fwknopd's order and
count each outcome: looks_like_spa -> prefix_tacked -> replay_digest (the
replay cache) -> verify_hmac -> decrypt -> parse. encode() builds what the
fwknop client sends. docs/spa-format.md describes the format and every check,
with the fwknop source file each one follows.

Supported: what fwknop 2.6.x clients send with --use-hmac (the default digest
and HMAC types and every other one fwknop has): AES-256-CBC in OpenSSL's salted
format with the key and IV from EVP_BytesToKey (MD5, one round) of the key as
given (ENCRYPTION_MODE CBC, fwknop's default). Not supported, refused with an
error: GPG, the legacy-IV mode (ENCRYPTION_MODE legacy, fwknop < 2.5), other
cipher modes, packets without an HMAC, command messages (fwknop -C).
"""

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import re
import secrets
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# fwknopd's bounds on a UDP payload (server/fwknopd_common.h MIN_SPA_DATA_SIZE,
# MAX_SPA_PACKET_LEN = 1500); libfko then refuses an encoded message of 1500
# characters or more (common/fko_util.c is_valid_encoded_msg_len), so 1499 is
# the longest payload fwknopd can accept.
MIN_PAYLOAD = 140
MAX_PAYLOAD = 1499

# lib/fko_limits.h
MIN_ENCODED = 36            # MIN_SPA_ENCODED_MSG_SIZE: also the shortest plaintext
MAX_ENCODED = 1500          # MAX_SPA_ENCODED_MSG_SIZE: lengths must stay below it
MAX_USERNAME_B64 = 64       # MAX_SPA_USERNAME_SIZE
MAX_MESSAGE_B64 = 256       # MAX_SPA_MESSAGE_SIZE (also nat access, server auth)
MAX_TIMESTAMP = 12          # MAX_SPA_TIMESTAMP_SIZE
MAX_VERSION = 8             # MAX_SPA_VERSION_SIZE
MAX_MESSAGE_TYPE = 2        # MAX_SPA_MESSAGE_TYPE_SIZE
RAND_DIGITS = 16            # FKO_RAND_VAL_SIZE
MAX_CLIENT_TIMEOUT = 2 << 15  # lib/fko_decode.c parse_client_timeout
MAX_KEY = 32                # RIJNDAEL_MAX_KEYSIZE
MAX_HMAC_KEY = 136          # lib/hmac.h MAX_DIGEST_BLOCK_LEN (SHA3-256's block)

PROTOCOL_VERSION = "3.0.0"  # lib/fko.h FKO_PROTOCOL_VERSION

# lib/fko.h: the fixed base64 of "Salted__", which the client strips, and the
# start of a base64 GnuPG message.
RIJNDAEL_PREFIX = b"U2FsdGVkX1"
GPG_PREFIX = b"hQ"
MIN_GNUPG_PAYLOAD = 400     # lib/fko_limits.h MIN_GNUPG_MSG_SIZE
SALTED = b"Salted__"

# Message types (lib/fko.h fko_message_type_t).
COMMAND_MSG = 0
ACCESS_MSG = 1
NAT_ACCESS_MSG = 2
CLIENT_TIMEOUT_ACCESS_MSG = 3
CLIENT_TIMEOUT_NAT_ACCESS_MSG = 4
LOCAL_NAT_ACCESS_MSG = 5
CLIENT_TIMEOUT_LOCAL_NAT_ACCESS_MSG = 6
NAT_TYPES = {NAT_ACCESS_MSG, CLIENT_TIMEOUT_NAT_ACCESS_MSG, LOCAL_NAT_ACCESS_MSG,
             CLIENT_TIMEOUT_LOCAL_NAT_ACCESS_MSG}
TIMEOUT_TYPES = {CLIENT_TIMEOUT_ACCESS_MSG, CLIENT_TIMEOUT_NAT_ACCESS_MSG, CLIENT_TIMEOUT_LOCAL_NAT_ACCESS_MSG}

# Digest name -> (hash, length of its unpadded base64). The HMAC may be any of
# them (HMAC_DIGEST_TYPE, sha256 by default); the inner digest likewise (the
# client's -m, sha256 by default), recognised by its length.
DIGESTS = {
    "md5": (hashes.MD5, 22),
    "sha1": (hashes.SHA1, 27),
    "sha256": (hashes.SHA256, 43),
    "sha384": (hashes.SHA384, 64),
    "sha512": (hashes.SHA512, 86),
    "sha3_256": (hashes.SHA3_256, 43),
    "sha3_512": (hashes.SHA3_512, 86),
}
HMAC_DIGESTS = tuple(DIGESTS)
DEFAULT_DIGEST = "sha256"
# Inner digest by base64 length; sha256 and sha512 share theirs with SHA3,
# tried second as lib/fko_decode.c verify_digest does.
DIGESTS_BY_LENGTH = {22: ("md5",), 27: ("sha1",), 43: ("sha256", "sha3_256"), 64: ("sha384",),
                     86: ("sha512", "sha3_512")}

B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
# lib/fko_user.c validate_username: printable ASCII except these.
USERNAME_FORBIDDEN = frozenset('"/\\[]:;|=,+*?<>')
MAX_HOSTNAME = 70           # common/fko_util.h MAX_HOSTNAME_LEN

# Outcomes SpaFormatError carries.
OUTCOMES = ("bad_decrypt", "malformed", "bad_digest", "unsupported")


class SpaFormatError(Exception):
    """A packet or plaintext that is not an acceptable SPA message.

    outcome: one of OUTCOMES, for counting; str(): a short reason without
    secrets, for the log."""

    def __init__(self, outcome, reason):
        super().__init__(reason)
        self.outcome = outcome


@dataclasses.dataclass(frozen=True)
class SpaMessage:
    rand: str                    # 16 decimal digits
    username: str
    timestamp: int               # the client's clock, seconds since the epoch
    version: str                 # the client's protocol version, "3.0.0"
    message_type: int            # ACCESS_MSG, CLIENT_TIMEOUT_ACCESS_MSG, a NAT type
    access_address: str          # dotted IPv4; "0.0.0.0" = the packet's source
    access_ports: tuple          # ((proto, port), ...), proto "tcp" or "udp"
    nat_access: str | None       # "host,port" of a NAT request, else None
    server_auth: str | None
    client_timeout: int | None   # seconds the client asks for; None when absent or 0
    digest: str                  # the inner digest's type: "sha256", ...


# --- cheap checks on the raw payload ---------------------------------------------


def looks_like_spa(payload):
    """The length fwknopd takes and nothing but base64 characters
    (server/process_packet.c, server/incoming_spa.c preprocess_spa_data)."""
    return MIN_PAYLOAD <= len(payload) <= MAX_PAYLOAD and B64_ALPHABET.issuperset(payload)


def prefix_tacked(payload):
    """fwknopd refuses data that starts with the Rijndael or GnuPG prefix: an
    attacker could put one in front of a seen packet to slip past the replay
    cache, and libfko never sends one (server/incoming_spa.c)."""
    head = bytes(payload[:len(RIJNDAEL_PREFIX)])
    return head.startswith(RIJNDAEL_PREFIX) or (len(payload) > MIN_GNUPG_PAYLOAD and head.startswith(GPG_PREFIX))


def replay_digest(payload):
    """SHA-256 of the payload as received: the replay cache's key
    (server/incoming_spa.c get_raw_digest)."""
    return hashlib.sha256(payload).digest()


# --- HMAC, decryption -------------------------------------------------------------


def _b64(data):
    """Base64 with the '=' padding stripped, as libfko writes every field."""
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text):
    """libfko's fields: base64 with or without '=' padding -> bytes;
    SpaFormatError for anything else."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise SpaFormatError("malformed", "not base64") from None
    stripped = text.rstrip(b"=")
    if len(stripped) % 4 == 1 or len(text) - len(stripped) > 2:
        raise SpaFormatError("malformed", "not base64 (bad length)")
    try:
        return base64.b64decode(stripped + b"=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SpaFormatError("malformed", "not base64") from None


def _mac(key, data, digest_name):
    mac = crypto_hmac.HMAC(key, DIGESTS[digest_name][0]())
    mac.update(data)
    return _b64(mac.finalize())


def _check_digest_name(digest_name):
    if digest_name not in DIGESTS:
        raise ValueError(f"unknown HMAC digest {digest_name!r}: one of {', '.join(DIGESTS)}")


def verify_hmac(payload, hmac_key, digest_name=DEFAULT_DIGEST):
    """The HMAC at the end of the payload, checked in constant time before
    anything is decrypted (lib/fko_hmac.c fko_verify_hmac). Returns the
    ciphertext part (the payload without its HMAC; still without the stripped
    "U2FsdGVkX1") when it matches, None when it does not or the payload is too
    short to hold one. ValueError for an unknown digest name or bad key length
    (a configuration error, not a packet's)."""
    _check_digest_name(digest_name)
    if not 1 <= len(hmac_key) <= MAX_HMAC_KEY:
        raise ValueError(f"HMAC key must be 1-{MAX_HMAC_KEY} bytes")
    tag_len = DIGESTS[digest_name][1]
    if not MIN_ENCODED <= len(payload) < MAX_ENCODED or len(payload) - tag_len < MIN_ENCODED:
        return None
    ciphertext, tag = bytes(payload[:-tag_len]), bytes(payload[-tag_len:])
    # The MAC covers the base64 ciphertext with its prefix put back.
    expected = _mac(hmac_key, RIJNDAEL_PREFIX + ciphertext, digest_name)
    return ciphertext if hmac.compare_digest(expected, tag) else None


def _key_iv(key, salt):
    """OpenSSL's EVP_BytesToKey with MD5 and one round: 32 bytes of key and 16
    of IV from MD5 chained over key || salt (lib/cipher_funcs.c rij_salt_and_iv,
    CBC mode: the key is used as given, no padding)."""
    material, block = b"", b""
    while len(material) < 48:
        block = hashlib.md5(block + key + salt).digest()
        material += block
    return material[:32], material[32:48]


def _check_key(key):
    if not 1 <= len(key) <= MAX_KEY:
        raise ValueError(f"encryption key must be 1-{MAX_KEY} bytes")


def decrypt(ciphertext_part, key):
    """The ciphertext part (from verify_hmac) -> the plaintext message, as
    lib/fko_encryption.c _rijndael_decrypt and lib/cipher_funcs.c rij_decrypt:
    base64 with the prefix put back, "Salted__" + salt + AES-256-CBC, padding
    removed when it is well-formed, and a good decryption recognised by 16
    digits and a colon. SpaFormatError("bad_decrypt") otherwise."""
    _check_key(key)
    try:
        raw = _b64decode(RIJNDAEL_PREFIX + bytes(ciphertext_part))
    except SpaFormatError:
        raise SpaFormatError("bad_decrypt", "ciphertext is not base64") from None
    if len(raw) < 32 or len(raw) % 16:
        raise SpaFormatError("bad_decrypt", "ciphertext is not whole AES blocks")
    aes_key, iv = _key_iv(key, raw[8:16])
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(raw[16:]) + decryptor.finalize()
    # fwknop strips PKCS#7 padding only when it is well-formed and keeps the
    # bytes otherwise; a wrong key then fails the check below.
    pad = plain[-1]
    if pad <= 16 and plain[len(plain) - pad:] == bytes([pad]) * pad:
        plain = plain[:len(plain) - pad]
    if not MIN_ENCODED <= len(plain) < MAX_ENCODED:
        raise SpaFormatError("bad_decrypt", "decrypted length out of range")
    if not (plain[:RAND_DIGITS].isdigit() and len(plain) > RAND_DIGITS and plain[RAND_DIGITS:RAND_DIGITS + 1] == b":"):
        raise SpaFormatError("bad_decrypt", "decryption failed (wrong key?)")
    return plain


# --- the plaintext message --------------------------------------------------------


def _digest_b64(name, data):
    h = hashlib.new(name, data)
    return _b64(h.digest())


def _field_b64(text, limit, what):
    if not 1 <= len(text) <= limit:
        raise SpaFormatError("malformed", f"{what}: length out of range")
    decoded = _b64decode(text)
    try:
        value = decoded.decode("ascii")
    except UnicodeDecodeError:
        raise SpaFormatError("malformed", f"{what}: not ASCII") from None
    if not value or not value.isprintable():
        raise SpaFormatError("malformed", f"{what}: empty or not printable")
    return value


def _username(text):
    name = _field_b64(text, MAX_USERNAME_B64, "username")
    if any(c in USERNAME_FORBIDDEN for c in name):
        raise SpaFormatError("malformed", "username: forbidden character")
    return name


def _ipv4(text):
    if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", text):
        raise SpaFormatError("malformed", "access address is not IPv4")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise SpaFormatError("malformed", "access address is not IPv4") from None


def _port(text):
    if not re.fullmatch(r"\d{1,5}", text) or not 1 <= int(text) <= 65535:
        raise SpaFormatError("malformed", "port out of range 1-65535")
    return int(text)


def _access(message):
    """"IP,proto/port[,proto/port...]" (lib/fko_message.c validate_access_msg;
    its checks leave only tcp and udp)."""
    if len(message) >= MAX_MESSAGE_B64:
        raise SpaFormatError("malformed", "access request too long")
    address, *specs = message.split(",")
    address = _ipv4(address)
    if not specs:
        raise SpaFormatError("malformed", "access request names no port")
    ports = []
    for spec in specs:
        proto, slash, port = spec.partition("/")
        if proto not in ("tcp", "udp") or not slash:
            raise SpaFormatError("malformed", "access request: proto/port expected (tcp or udp)")
        ports.append((proto, _port(port)))
    return address, tuple(ports)


def _nat(message):
    """"host,port" (lib/fko_message.c validate_nat_access_msg)."""
    host, comma, port = message.partition(",")
    if (not comma or not host or len(host) > MAX_HOSTNAME or "," in port
            or any(c in host for c in ' /?"\'\\')):
        raise SpaFormatError("malformed", "nat access: host,port expected")
    _port(port)
    return message


def _unsigned(text, limit, what, width):
    if not 1 <= len(text) <= width or not text.isdigit() or not text.isascii() or int(text) > limit:
        raise SpaFormatError("malformed", f"{what}: not a number in range")
    return int(text)


def parse(plaintext):
    """A decrypted message -> SpaMessage, with its inner digest verified
    (lib/fko_decode.c fko_decode_spa_data). Raises SpaFormatError and nothing
    else, whatever the bytes: "bad_digest" when the digest does not match,
    "unsupported" for command messages, "malformed" for the rest.

    Where fwknop's C parsing is lenient (strtol on numbers, inet_aton on the
    address, a base64 decoder that skips a dangling character), this is strict;
    the fwknop client never sends such fields."""
    try:
        return _parse(bytes(plaintext))
    except SpaFormatError:
        raise
    except Exception as err:  # a bug here must not become a crash on a packet
        raise SpaFormatError("malformed", f"unparseable ({type(err).__name__})") from None


def _parse(data):
    if not MIN_ENCODED <= len(data) < MAX_ENCODED:
        raise SpaFormatError("malformed", "message length out of range")
    if not all(0x20 <= b <= 0x7e for b in data):
        raise SpaFormatError("malformed", "message holds non-printable bytes")
    text = data.decode("ascii")
    body, _, digest = text.rpartition(":")
    if text.count(":") < 6:
        raise SpaFormatError("malformed", "too few fields")
    candidates = DIGESTS_BY_LENGTH.get(len(digest))
    if candidates is None:
        raise SpaFormatError("malformed", "digest has no known length")
    digest_type = None
    for name in candidates:
        if hmac.compare_digest(_digest_b64(name, body.encode("ascii")), digest.encode("ascii")):
            digest_type = name
            break
    if digest_type is None:
        raise SpaFormatError("bad_digest", "inner digest does not match")

    fields = body.split(":")
    rand, user, stamp, version, kind, *rest = fields
    if len(rand) != RAND_DIGITS or not rand.isdigit() or not rand.isascii():
        raise SpaFormatError("malformed", "random value is not 16 digits")
    username = _username(user)
    timestamp = _unsigned(stamp, 2**32 - 1, "timestamp", MAX_TIMESTAMP)
    if not 1 <= len(version) <= MAX_VERSION:
        raise SpaFormatError("malformed", "version: length out of range")
    message_type = _unsigned(kind, CLIENT_TIMEOUT_LOCAL_NAT_ACCESS_MSG, "message type", MAX_MESSAGE_TYPE)
    if message_type == COMMAND_MSG:
        raise SpaFormatError("unsupported", "command messages (fwknop -C) are not supported")
    # rest: message, [nat access], [server auth], [client timeout]
    has_nat, has_timeout = message_type in NAT_TYPES, message_type in TIMEOUT_TYPES
    required = 1 + has_nat + has_timeout
    if not required <= len(rest) <= required + 1:
        raise SpaFormatError("malformed", "wrong number of fields for the message type")
    message = _field_b64(rest.pop(0), MAX_MESSAGE_B64, "access request")
    access_address, access_ports = _access(message)
    nat_access = _nat(_field_b64(rest.pop(0), MAX_MESSAGE_B64, "nat access")) if has_nat else None
    client_timeout = None
    if has_timeout:
        client_timeout = _unsigned(rest.pop(), MAX_CLIENT_TIMEOUT, "client timeout", 5) or None
    server_auth = _field_b64(rest.pop(0), MAX_MESSAGE_B64, "server auth") if rest else None
    return SpaMessage(rand, username, timestamp, version, message_type, access_address, access_ports,
                      nat_access, server_auth, client_timeout, digest_type)


# --- building a packet, as the fwknop client does -------------------------------


def random_digits():
    """16 decimal digits, not starting with 0 (fwknop prints rand() values)."""
    return str(secrets.randbelow(9 * 10**15) + 10**15)


def encode(*, key, hmac_key, access_address, ports, username, timestamp=None, digest=DEFAULT_DIGEST,
           hmac_digest=DEFAULT_DIGEST, client_timeout=None, nat_access=None, server_auth=None, rand=None,
           salt=None, version=PROTOCOL_VERSION):
    """A UDP payload as `fwknop -A ... -a ADDRESS --use-hmac` builds it
    (lib/fko_encode.c, lib/fko_encryption.c, lib/fko_funcs.c
    fko_spa_data_final). ports: [(proto, port)]; access_address: dotted IPv4,
    "0.0.0.0" asks for the packet's source. ValueError for anything fwknop
    would refuse to send."""
    _check_key(key)
    _check_digest_name(digest)
    _check_digest_name(hmac_digest)
    if not 1 <= len(hmac_key) <= MAX_HMAC_KEY:
        raise ValueError(f"HMAC key must be 1-{MAX_HMAC_KEY} bytes")
    if hmac.compare_digest(bytes(key), bytes(hmac_key)):
        raise ValueError("the encryption key and the HMAC key must differ (fwknopd refuses equal keys)")
    rand = random_digits() if rand is None else rand
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    if not ports:
        raise ValueError("at least one proto/port is needed")
    if not username or any(c in USERNAME_FORBIDDEN or not (c.isascii() and c.isprintable()) for c in username):
        raise ValueError(f"username {username!r}: printable ASCII without {''.join(sorted(USERNAME_FORBIDDEN))}")
    message = ",".join([str(ipaddress.IPv4Address(access_address))] + [f"{p}/{n}" for p, n in ports])
    if client_timeout:
        message_type = CLIENT_TIMEOUT_NAT_ACCESS_MSG if nat_access else CLIENT_TIMEOUT_ACCESS_MSG
    else:
        message_type = NAT_ACCESS_MSG if nat_access else ACCESS_MSG
    parts = [rand, _b64(username.encode()).decode(), str(timestamp), version, str(message_type),
             _b64(message.encode()).decode()]
    if nat_access:
        parts.append(_b64(nat_access.encode()).decode())
    if server_auth:
        parts.append(_b64(server_auth.encode()).decode())
    if client_timeout:
        parts.append(str(int(client_timeout)))
    body = ":".join(parts).encode("ascii")
    plain = body + b":" + _digest_b64(digest, body)
    if not MIN_ENCODED <= len(plain) < MAX_ENCODED:
        raise ValueError("message too long")
    try:
        parse(plain)  # never send what a server would refuse
    except SpaFormatError as err:
        raise ValueError(f"fwknopd would refuse this message: {err}") from None
    payload = seal(plain, key=key, hmac_key=hmac_key, hmac_digest=hmac_digest, salt=salt)
    if not MIN_PAYLOAD <= len(payload) <= MAX_PAYLOAD:
        raise ValueError(f"packet of {len(payload)} bytes is outside fwknopd's {MIN_PAYLOAD}-{MAX_PAYLOAD}")
    return payload


def seal(plaintext, *, key, hmac_key, hmac_digest=DEFAULT_DIGEST, salt=None):
    """A plaintext message -> the UDP payload: encrypted (OpenSSL's salted
    AES-256-CBC), base64 without '=' and without the "U2FsdGVkX1" prefix, its
    HMAC appended (lib/fko_encryption.c _rijndael_encrypt, lib/fko_funcs.c).
    encode() is this after building the message; tests seal broken ones."""
    _check_key(key)
    _check_digest_name(hmac_digest)
    salt = secrets.token_bytes(8) if salt is None else bytes(salt)
    if len(salt) != 8:
        raise ValueError("the salt is 8 bytes")
    aes_key, iv = _key_iv(key, salt)
    pad = 16 - len(plaintext) % 16
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    raw = SALTED + salt + encryptor.update(bytes(plaintext) + bytes([pad]) * pad) + encryptor.finalize()
    encoded = _b64(raw)
    return encoded[len(RIJNDAEL_PREFIX):] + _mac(hmac_key, encoded, hmac_digest)
