"""Key files of the public-key SPA (controller/wire/spa_pubkey_keys.py)."""

import os
import stat

import pytest

from xknock.controller.wire import spa_pubkey_keys as keys
from xknock.controller.wire.spa_keys import SpaKeyError


@pytest.mark.parametrize("kind", [keys.USER, keys.SERVER])
def test_a_pair_round_trips_with_a_0600_private_file(tmp_path, kind):
    path = str(tmp_path / "k")
    private = keys.write_pair(path, kind)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys.raw_public(keys.load_private(path, kind)) == keys.raw_public(private)
    assert keys.read_public(path + ".pub") == keys.raw_public(private)
    with pytest.raises(SpaKeyError, match="exists"):
        keys.write_pair(path, kind)


def test_a_readable_private_key_or_the_wrong_kind_is_refused(tmp_path):
    path = str(tmp_path / "k")
    keys.write_pair(path, keys.USER)
    with pytest.raises(SpaKeyError, match="holds a user key"):
        keys.load_private(path, keys.SERVER)
    os.chmod(path, 0o644)
    with pytest.raises(SpaKeyError, match="chmod 600"):
        keys.load_private(path, keys.USER)
    with pytest.raises(SpaKeyError, match="no such key file"):
        keys.load_private(str(tmp_path / "missing"), keys.USER)


@pytest.mark.parametrize("text", ["", "abc", "A" * 43, "XKNOCK_SPA_USER_PUBLIC: !!", "A" * 100])
def test_bad_public_keys_say_what_a_key_is(text):
    with pytest.raises(SpaKeyError, match="not a public key"):
        keys.decode_public(text)


def test_keygen_public_writes_a_pair_and_prints_only_the_public_key(tmp_path):
    from click.testing import CliRunner

    from xknock.cli.main import main

    path = str(tmp_path / "alice.key")
    result = CliRunner().invoke(main, ["keygen", "--public", "--key-file", path])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("XKNOCK_SPA_USER_PUBLIC: ")
    assert keys.decode_public(result.stdout) == keys.raw_public(keys.load_private(path, keys.USER))
    server = CliRunner().invoke(main, ["keygen", "--public", "--server", "--key-file", str(tmp_path / "s.key")])
    assert server.exit_code == 0 and server.stdout.startswith("XKNOCK_SPA_SERVER_PUBLIC: ")
    again = CliRunner().invoke(main, ["keygen", "--public", "--key-file", path])
    assert again.exit_code != 0 and "exists" in again.output and "Traceback" not in again.output
    printed = CliRunner().invoke(main, ["keygen", "--public"])
    assert printed.exit_code != 0 and "needs --key-file" in printed.output


@pytest.mark.parametrize("args, message", [
    (["spa", "h", "-A", "tcp/22", "--identity", "{key}"], "needs --identity FILE and --server-key KEY"),
    (["spa", "h", "-A", "tcp/22", "--identity", "{key}", "--server-key", "{pub}", "--key-file", "k"],
     "leave out fwknop's"),
    (["spa", "127.0.0.1", "-A", "tcp/22", "--identity", "{key}", "--server-key", "{pub}", "-a", "192.0.2.1",
      "-a", "192.0.2.2"], "one address per family"),
    (["spa", "127.0.0.1", "-A", "tcp/22", "--identity", "{key}", "--server-key", "nonsense"], "not a public key"),
    (["spa", "127.0.0.1", "-A", "tcp/22", "--identity", "{key}", "--server-key", "{pub}", "-a", "nope"],
     "not an IP address"),
    (["spa", "127.0.0.1", "-A", "tcp/22", "--key-base64", "a", "--hmac-key-base64", "b", "-a", "192.0.2.1",
      "-a", "192.0.2.2"], "give -a once"),
    (["spa", "127.0.0.1", "-A", "tcp/22", "--identity", "{pub}", "--server-key", "{pub}"], "no XKNOCK_SPA_USER_KEY"),
    (["ssh-proxy", "127.0.0.1", "22", "--identity", "{missing}", "--server-key", "{pub}"], "no such key file"),
])
def test_client_refusals_are_one_line(tmp_path, args, message):
    from click.testing import CliRunner

    from xknock.cli.main import main

    path = str(tmp_path / "me.key")
    keys.write_pair(path, keys.USER)
    os.chmod(path + ".pub", 0o600)   # so that using it as --identity fails on its content, not its mode
    filled = [a.format(key=path, pub=path + ".pub", missing=str(tmp_path / "none")) for a in args]
    result = CliRunner().invoke(main, filled)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
