"""Key files of the public-key SPA (docs/spa-pubkey-format.md, "Keys").

A user holds an Ed25519 key pair (it signs its packets), the server an X25519
key pair (packets are encrypted to it). Each private key lives in a text file
of mode 0600, one line "XKNOCK_SPA_USER_KEY: <base64 of 32 bytes>" or
"XKNOCK_SPA_SERVER_KEY: ..."; its public half in FILE.pub, one line
"XKNOCK_SPA_USER_PUBLIC: <base64>" or "XKNOCK_SPA_SERVER_PUBLIC: ...". Where a
public key is written inline (the config, the command line) the base64 alone
is enough. Standard library and `cryptography` only.
"""

import base64
import binascii
import os
import re

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .spa_keys import SpaKeyError, read_key_file, write_private

USER, SERVER = "user", "server"
PRIVATE_NAMES = {USER: "XKNOCK_SPA_USER_KEY", SERVER: "XKNOCK_SPA_SERVER_KEY"}
PUBLIC_NAMES = {USER: "XKNOCK_SPA_USER_PUBLIC", SERVER: "XKNOCK_SPA_SERVER_PUBLIC"}
KINDS = {USER: Ed25519PrivateKey, SERVER: X25519PrivateKey}
KEY_BYTES = 32


def generate(kind):
    return KINDS[kind].generate()


def raw_public(private_key):
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(private_key):
    return private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _b64(raw):
    return base64.b64encode(raw).decode("ascii")


def format_private(kind, private_key):
    return (f"# xknock SPA {kind} private key: keep it 0600, never copy it to another host\n"
            f"{PRIVATE_NAMES[kind]}: {_b64(_raw_private(private_key))}\n")


def format_public(kind, private_key):
    return f"{PUBLIC_NAMES[kind]}: {_b64(raw_public(private_key))}\n"


def write_pair(path, kind, private_key=None, force=False):
    """Writes path (0600) and path.pub; returns the private key."""
    private_key = private_key or generate(kind)
    if os.path.lexists(path + ".pub") and not force:
        raise SpaKeyError(f"{path}.pub: exists; pass --force to overwrite it")
    write_private(path, format_private(kind, private_key), force)
    try:
        with open(path + ".pub", "w", encoding="ascii") as out:
            out.write(format_public(kind, private_key))
    except OSError as err:
        raise SpaKeyError(f"{path}.pub: cannot write: {err.strerror}") from None
    return private_key


def decode_public(text, what="public key"):
    """32 raw bytes from base64 (optionally after "NAME: "); SpaKeyError otherwise."""
    text = text.strip()
    match = re.fullmatch(r"(?:XKNOCK_SPA_(?:USER|SERVER)_PUBLIC\s*:\s*)?([A-Za-z0-9+/=]+)", text)
    try:
        raw = base64.b64decode(match.group(1), validate=True) if match else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise SpaKeyError(f"{what}: not a public key (base64 of {KEY_BYTES} bytes, as `xknock keygen --public` "
                          "writes to FILE.pub)")
    return raw


def read_public(text_or_path, what="public key"):
    """A public key given inline (base64) or as the path of a .pub file."""
    if os.path.sep in text_or_path or text_or_path.endswith(".pub"):
        try:
            with open(text_or_path, encoding="ascii") as handle:
                text = handle.read(4096)
        except (OSError, UnicodeDecodeError) as err:
            raise SpaKeyError(f"{text_or_path}: cannot read: {getattr(err, 'strerror', None) or err}") from None
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return decode_public(lines[0] if lines else "", text_or_path)
    return decode_public(text_or_path, what)


def load_private(path, kind):
    """The private key in path; SpaKeyError otherwise, and when others could
    read or change the file (kernel/trust.py)."""
    data = read_key_file(path, 4096, f"xknock keygen --public{' --server' if kind == SERVER else ''} --key-file {path}")
    name = PRIVATE_NAMES[kind]
    match = re.search(rb"^" + name.encode() + rb"\s*:\s*([A-Za-z0-9+/=]+)\s*$", data, re.M)
    if not match:
        other = PRIVATE_NAMES[SERVER if kind == USER else USER]
        hint = f" (it holds a {SERVER if kind == USER else USER} key)" if other.encode() in data else ""
        raise SpaKeyError(f"{path}: no {name} line{hint}")
    try:
        raw = base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise SpaKeyError(f"{path}: {name} is not base64 of {KEY_BYTES} bytes")
    return KINDS[kind].from_private_bytes(raw)
