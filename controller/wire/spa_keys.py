"""SPA keys: generated, written and read in the format of `fwknop --key-gen`.

    KEY_BASE64: <32 random bytes, base64>
    HMAC_KEY_BASE64: <random bytes, base64; 64 for HMAC-SHA256>

Sizes as fwknop's lib/fko_funcs.c fko_key_gen: a 32-byte Rijndael key; an HMAC
key of the digest's block length (sha256 64, sha384 and sha512 128) or of its
output length (md5 16, sha1 20). fwknop cannot generate keys for sha3_256 and
sha3_512 (its --key-gen fails); xknock gives them 64 bytes, at least their
output length as RFC 2104 asks.
"""

import base64
import binascii
import contextlib
import dataclasses
import os
import re
import secrets
import tempfile

from ..errors import XknockError
from ..kernel import trust
from .spa_message import DEFAULT_DIGEST, HMAC_DIGESTS, MAX_HMAC_KEY, MAX_KEY

KEY_BYTES = 32
HMAC_KEY_BYTES = {"md5": 16, "sha1": 20, "sha256": 64, "sha384": 128, "sha512": 128, "sha3_256": 64,
                  "sha3_512": 64}
PLACEHOLDER = "__CHANGEME__"  # what fwknop's packaged access.conf holds


class SpaKeyError(XknockError):
    """A key, key file or key text that cannot be used; says what to do."""


@dataclasses.dataclass(frozen=True)
class Keys:
    key: bytes        # the Rijndael key (KEY_BASE64)
    hmac_key: bytes   # HMAC_KEY_BASE64

    def __repr__(self):  # never in a log or traceback
        return f"Keys(key=<{len(self.key)} bytes>, hmac_key=<{len(self.hmac_key)} bytes>)"


def generate(hmac_digest=DEFAULT_DIGEST):
    """Fresh random keys, sized as `fwknop --key-gen --hmac-digest-type D`."""
    if hmac_digest not in HMAC_KEY_BYTES:
        raise SpaKeyError(f"unknown HMAC digest {hmac_digest!r}: one of {', '.join(HMAC_DIGESTS)}")
    return Keys(secrets.token_bytes(KEY_BYTES), secrets.token_bytes(HMAC_KEY_BYTES[hmac_digest]))


def format_keygen(keys):
    """The text `fwknop --key-gen` prints (and -K writes)."""
    return (f"KEY_BASE64: {base64.b64encode(keys.key).decode()}\n"
            f"HMAC_KEY_BASE64: {base64.b64encode(keys.hmac_key).decode()}\n")


def decode_key(text, what="KEY_BASE64"):
    """A base64 encryption key -> bytes (1-32 of them, as fwknop takes)."""
    return _decode(text, what, MAX_KEY)


def decode_hmac_key(text, what="HMAC_KEY_BASE64"):
    """A base64 HMAC key -> bytes (1-136 of them, as fwknop takes)."""
    return _decode(text, what, MAX_HMAC_KEY)


def _decode(text, what, limit):
    text = (text or "").strip()
    if not text:
        raise SpaKeyError(f"{what} is empty")
    if text == PLACEHOLDER:
        raise SpaKeyError(f"{what} is still {PLACEHOLDER}: make keys with `xknock keygen`")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SpaKeyError(f"{what} is not valid base64 (A-Z a-z 0-9 + / and = padding)") from None
    if not 1 <= len(raw) <= limit:
        raise SpaKeyError(f"{what} decodes to {len(raw)} bytes; fwknop takes 1-{limit}")
    return raw


def check_pair(keys, where="keys"):
    """fwknopd refuses a stanza whose two keys are equal (server/access.c)."""
    if secrets.compare_digest(keys.key, keys.hmac_key):
        raise SpaKeyError(f"{where}: the encryption key and the HMAC key are the same; make new keys with "
                          "`xknock keygen`")
    return keys


def keys_from_base64(key_b64, hmac_key_b64, where="keys"):
    return check_pair(Keys(decode_key(key_b64), decode_hmac_key(hmac_key_b64)), where)


def read_key_file(path, limit, make_one):
    """The bytes of a key file (at most limit), once kernel/trust.py found that
    only a trusted owner can read or change it; SpaKeyError otherwise.
    make_one: the command that makes one, for a missing file."""
    untrusted = trust.problem(path, "key file", secret=True)   # before reading a byte of it
    if untrusted:
        raise SpaKeyError(untrusted)
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except FileNotFoundError:
        raise SpaKeyError(f"{path}: no such key file (make one with `{make_one}`)") from None
    except OSError as err:
        raise SpaKeyError(f"{path}: cannot read: {err.strerror}") from None


def load_key_file(path):
    """A file in `fwknop --key-gen` format -> Keys. "NAME: value" and
    access.conf's "NAME value" are both read; blank lines and # comments are
    skipped. SpaKeyError for anything else, a missing key, or a file that
    others could read or change (kernel/trust.py)."""
    data = read_key_file(path, 64 * 1024, f"xknock keygen --key-file {path}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SpaKeyError(f"{path}: not a key file (not ASCII text)") from None
    values = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)\s*(?::\s*|\s+)(\S+)", line)
        if not match or match.group(1) not in ("KEY_BASE64", "HMAC_KEY_BASE64"):
            name = match.group(1) if match else line.split()[0][:40]
            raise SpaKeyError(f"{path}:{number}: expected KEY_BASE64: ... or HMAC_KEY_BASE64: ..., "
                              f"not {name!r}")
        values[match.group(1)] = (number, match.group(2))
    for name in ("KEY_BASE64", "HMAC_KEY_BASE64"):
        if name not in values:
            raise SpaKeyError(f"{path}: no {name} line (the format is `fwknop --key-gen`'s)")
    key = decode_key(values["KEY_BASE64"][1], f"{path}:{values['KEY_BASE64'][0]}: KEY_BASE64")
    hmac_key = decode_hmac_key(values["HMAC_KEY_BASE64"][1],
                               f"{path}:{values['HMAC_KEY_BASE64'][0]}: HMAC_KEY_BASE64")
    return check_pair(Keys(key, hmac_key), path)


def write_private(path, text, force=False):
    """Write text to path atomically with mode 0600; an existing file only
    with force. SpaKeyError on failure."""
    if os.path.lexists(path) and not force:
        raise SpaKeyError(f"{path}: exists; pass --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".xknock-", dir=directory)
    except OSError as err:
        raise SpaKeyError(f"{path}: cannot write in {directory}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise SpaKeyError(f"{path}: cannot write: {err.strerror}") from None


def write_key_file(path, keys, force=False):
    write_private(path, format_keygen(keys), force)
