"""SPA keys (controller/wire/spa_keys.py) in `fwknop --key-gen` format, and the
real fwknop client using keys we generate."""

import base64
import os
import re

import pytest

from fwknop_helpers import fwknop_packet, have_fwknop
from xknock.controller.wire import spa_message as spa
from xknock.controller.wire.spa_keys import (
    HMAC_KEY_BYTES, Keys, SpaKeyError, decode_hmac_key, decode_key, format_keygen, generate, keys_from_base64,
    load_key_file, write_key_file,
)

KEYGEN_LINE = re.compile(r"KEY_BASE64: [A-Za-z0-9+/]+=*\nHMAC_KEY_BASE64: [A-Za-z0-9+/]+=*\n")


@pytest.mark.parametrize("digest", sorted(HMAC_KEY_BYTES))
def test_generate_sizes(digest):
    keys = generate(digest)
    assert len(keys.key) == 32 and len(keys.hmac_key) == HMAC_KEY_BYTES[digest]
    assert generate(digest) != keys


def test_format_matches_fwknop_key_gen():
    import subprocess

    text = format_keygen(generate())
    assert KEYGEN_LINE.fullmatch(text)
    if have_fwknop():
        theirs = subprocess.run(["fwknop", "--key-gen", "--no-rc-file"], capture_output=True, text=True,
                                check=True).stdout
        assert KEYGEN_LINE.fullmatch(theirs)
        assert [len(line) for line in theirs.splitlines()] == [len(line) for line in text.splitlines()]


def test_write_and_load(tmp_path):
    keys = generate()
    path = str(tmp_path / "alice.keys")
    write_key_file(path, keys)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_key_file(path) == keys
    with pytest.raises(SpaKeyError, match="exists"):
        write_key_file(path, keys)
    write_key_file(path, generate(), force=True)
    assert load_key_file(path) != keys
    assert "bytes>" in repr(keys) and base64.b64encode(keys.key).decode() not in repr(keys)


def test_load_fwknop_written_file_and_access_conf_style(tmp_path):
    path = tmp_path / "k"
    if have_fwknop():
        import subprocess

        subprocess.run(["fwknop", "--key-gen", "--no-rc-file", "-K", str(path)], capture_output=True, check=True)
        os.chmod(path, 0o600)
        keys = load_key_file(str(path))
        assert len(keys.key) == 32 and len(keys.hmac_key) == 64
    keys = generate()
    path.write_text(f"# comment\nKEY_BASE64      {base64.b64encode(keys.key).decode()}\n\n"
                    f"HMAC_KEY_BASE64 {base64.b64encode(keys.hmac_key).decode()}\n")
    os.chmod(path, 0o600)
    assert load_key_file(str(path)) == keys


def test_group_readable_file_refused(tmp_path):
    path = str(tmp_path / "k")
    write_key_file(path, generate())
    os.chmod(path, 0o640)
    with pytest.raises(SpaKeyError) as err:
        load_key_file(path)
    assert f"chmod 600 {path}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("KEY_BASE64: AAAA\n", "no HMAC_KEY_BASE64"),
    ("KEY_BASE64: !!!!\nHMAC_KEY_BASE64: AAAA\n", "not valid base64"),
    ("KEY_BASE64: __CHANGEME__\nHMAC_KEY_BASE64: AAAA\n", "xknock keygen"),
    (f"KEY_BASE64: {base64.b64encode(bytes(33)).decode()}\nHMAC_KEY_BASE64: AAAA\n", "33 bytes"),
    ("KEY_BASE64: AAAA\nHMAC_KEY_BASE64: AAAA\n", "are the same"),
    ("KEY_BASE64: AAAA\nGPG_DECRYPT_PW: x\n", "GPG_DECRYPT_PW"),
    ("\xff\n", "not ASCII"),
])
def test_bad_key_files(tmp_path, text, message):
    path = tmp_path / "k"
    path.write_bytes(text.encode("latin-1"))
    os.chmod(path, 0o600)
    with pytest.raises(SpaKeyError, match=message):
        load_key_file(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(SpaKeyError, match="xknock keygen --key-file"):
        load_key_file(str(tmp_path / "nope"))


def test_inline_keys():
    keys = generate()
    b64 = base64.b64encode
    assert keys_from_base64(b64(keys.key).decode(), b64(keys.hmac_key).decode()) == keys
    assert decode_key(" " + b64(keys.key).decode() + "\n") == keys.key
    for bad in ("", "A", "A===", "не base64"):
        with pytest.raises(SpaKeyError):
            decode_key(bad)
    with pytest.raises(SpaKeyError, match="1-136"):
        decode_hmac_key(b64(bytes(137)).decode())


@pytest.mark.skipif(not have_fwknop(), reason="the fwknop client is not installed")
def test_fwknop_client_uses_our_keys():
    keys = generate("sha512")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    payload, _ = fwknop_packet(b64(keys.key), b64(keys.hmac_key), hmac_digest="sha512")
    ciphertext = spa.verify_hmac(payload, keys.hmac_key, "sha512")
    assert spa.parse(spa.decrypt(ciphertext, keys.key)).username == "alice"
    assert isinstance(keys, Keys)
