"""`xknock import fwknop` (controller/importers/fwknop_import.py): a realistic
access.conf with convertible and unconvertible stanzas; every setting that is
not carried over is reported, and the keys still verify real fwknop packets."""

import base64
import json
import os
import subprocess
import tomllib

import pytest

from xknock_dev.e2e import XKNOCK
from fwknop_helpers import fwknop_packet, have_fwknop
from xknock.controller.wire import spa_message as spa
from xknock.controller.importers.fwknop_import import FwknopImportError, convert
from xknock.controller.wire.spa_keys import generate, load_key_file

b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
ALICE, BOB, CAROL, DAVE = generate(), generate("sha512"), generate(), generate()

ACCESS_CONF = f"""\
# fwknopd access.conf
KEY_BASE64  before-any-source
%include /etc/fwknop/more-access.conf

SOURCE              ANY
REQUIRE_USERNAME    alice
REQUIRE_SOURCE_ADDRESS Y
OPEN_PORTS          tcp/22, udp/53
KEY_BASE64          {b64(ALICE.key)}
HMAC_KEY_BASE64     {b64(ALICE.hmac_key)}
FW_ACCESS_TIMEOUT   60
MAX_FW_TIMEOUT      600
ENABLE_CMD_EXEC     Y
CMD_CYCLE_OPEN      iptables -A INPUT -s $SRC -j ACCEPT
ACCESS_EXPIRE       12/31/2030

SOURCE: 10.0.0.0/8, 192.168.1.7, 172.16.0.0/255.240.0.0;
OPEN_PORTS: tcp/443
KEY_BASE64: {b64(BOB.key)}
HMAC_KEY_BASE64: {b64(BOB.hmac_key)}
HMAC_DIGEST_TYPE: SHA512
FORCE_NAT 192.168.10.2 22
GPG_REMOTE_ID 1234ABCD
SOMETHING_NEW yes

SOURCE ANY
OPEN_PORTS tcp/22
KEY_BASE64 {b64(CAROL.key)}

SOURCE ANY
OPEN_PORTS tcp/22
GPG_DECRYPT_ID ABCD1234
GPG_DECRYPT_PW secretpw

SOURCE ANY
OPEN_PORTS tcp/22
KEY_BASE64 {b64(DAVE.key)}
HMAC_KEY_BASE64 {b64(DAVE.hmac_key)}
ENCRYPTION_MODE legacy

SOURCE ANY
KEY_BASE64 {b64(DAVE.key)}
HMAC_KEY_BASE64 {b64(DAVE.hmac_key)}

SOURCE 192.0.2.0/24
OPEN_PORTS tcp/2222
KEY passphrase-one
HMAC_KEY passphrase-two
REQUIRE_USERNAME alice
%include_keys /etc/fwknop/keys.conf
"""


def notes_for(result_or_error, outcome):
    return [str(n) for n in result_or_error.notes if n.outcome == outcome]


def test_realistic_access_conf():
    result = convert(ACCESS_CONF, source="access.conf")
    assert result.stanzas == 7
    assert [u.name for u in result.users] == ["alice", "stanza2", "alice-2"]
    config = tomllib.loads(result.toml)
    assert config["spa"]["port"] == 62201 and config["spa"]["max_age"] == "120s"
    alice, bob, third = config["spa"]["user"]
    assert alice == {"name": "alice", "key": b64(ALICE.key), "hmac_key": b64(ALICE.hmac_key),
                     "hmac_digest": "sha256", "sources": ["0.0.0.0/0", "::/0"], "open": ["tcp:22", "udp:53"],
                     "open_for": "60s", "max_open_for": "600s", "username": "alice",
                     "require_source_address": True}
    assert bob["sources"] == ["10.0.0.0/8", "192.168.1.7", "172.16.0.0/12"]
    assert (bob["hmac_digest"], bob["open"], bob["open_for"], bob["max_open_for"]) == \
        ("sha512", ["tcp:443"], "30s", "300s")
    assert "username" not in bob and bob["require_source_address"] is False
    assert base64.b64decode(third["key"]) == b"passphrase-one"
    assert base64.b64decode(third["hmac_key"]) == b"passphrase-two"

    dropped_stanzas = " | ".join(notes_for(result, "stanza dropped"))
    assert "#3 (SOURCE ANY): HMAC_KEY_BASE64: not set: a legacy stanza without HMAC" in dropped_stanzas
    assert "#4 (SOURCE ANY): GPG: GnuPG encryption is not supported" in dropped_stanzas
    assert "#5 (SOURCE ANY): ENCRYPTION_MODE LEGACY" in dropped_stanzas
    assert "#6 (SOURCE ANY): OPEN_PORTS: not set" in dropped_stanzas
    dropped = " | ".join(notes_for(result, "dropped"))
    for setting in ("%include /etc/fwknop/more-access.conf", "ENABLE_CMD_EXEC Y", "CMD_CYCLE_OPEN",
                    "ACCESS_EXPIRE 12/31/2030", "FORCE_NAT", "GPG_REMOTE_ID", "%include_keys /etc/fwknop/keys.conf"):
        assert setting in dropped, setting
    ignored = " | ".join(notes_for(result, "ignored"))
    assert "KEY_BASE64 (secret): before any SOURCE line" in ignored and "SOMETHING_NEW" in ignored
    changed = " | ".join(notes_for(result, "changed"))
    assert "SOURCE ANY: fwknopd took SPA over IPv4 only" in changed and "KEY: a passphrase" in changed
    # Every note is in the TOML's header too, and no secret is in any note.
    for note in result.notes:
        assert str(note) in result.toml
        for keys in (ALICE, BOB, CAROL, DAVE):
            assert b64(keys.key) not in str(note) and b64(keys.hmac_key) not in str(note)
    assert "secretpw" not in result.toml and "passphrase-one" not in " ".join(map(str, result.notes))
    assert result.inline_keys and "THIS FILE HOLDS SECRET KEYS" in result.toml


def test_keys_dir(tmp_path):
    result = convert(ACCESS_CONF, keys_dir=str(tmp_path / "keys"))
    assert not result.inline_keys and "hmac_key =" not in result.toml
    config = tomllib.loads(result.toml)
    assert [u["key_file"] for u in config["spa"]["user"]] == [str(tmp_path / "keys" / f"{n}.keys")
                                                               for n in ("alice", "stanza2", "alice-2")]
    assert [path for path, _ in result.key_files] == [u["key_file"] for u in config["spa"]["user"]]


def test_nothing_convertible():
    with pytest.raises(FwknopImportError) as err:
        convert("SOURCE ANY\nOPEN_PORTS tcp/22\nKEY_BASE64 __CHANGEME__\nHMAC_KEY_BASE64 __CHANGEME__\n")
    assert "none of the 1" in str(err.value) and "xknock keygen" in str(err.value.notes[0])
    with pytest.raises(FwknopImportError, match="no access stanza"):
        convert("# empty\n")


@pytest.mark.skipif(not have_fwknop(), reason="the fwknop client is not installed")
def test_converted_keys_verify_fwknop_packets():
    config = tomllib.loads(convert(ACCESS_CONF).toml)
    for user, digest in zip(config["spa"]["user"][:2], ("sha256", "sha512")):
        payload, _ = fwknop_packet(user["key"], user["hmac_key"], hmac_digest=digest)
        key, hmac_key = base64.b64decode(user["key"]), base64.b64decode(user["hmac_key"])
        assert spa.parse(spa.decrypt(spa.verify_hmac(payload, hmac_key, digest), key)).username == "alice"


def test_cli(tmp_path):
    conf = tmp_path / "access.conf"
    conf.write_text(ACCESS_CONF)
    out, keys_dir = tmp_path / "xknock.toml", tmp_path / "keys"
    result = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "--keys-dir", str(keys_dir), "-o", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "converted 3 of 7 access stanza(s) (alice, stanza2, alice-2)" in result.stderr
    assert f"{conf}:" in result.stderr and "stanza dropped" in result.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600 and os.stat(keys_dir).st_mode & 0o777 == 0o700
    assert load_key_file(str(keys_dir / "alice.keys")) == ALICE
    assert load_key_file(str(keys_dir / "stanza2.keys")) == BOB
    again = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "--keys-dir", str(keys_dir)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    inline = subprocess.run([XKNOCK, "import", "fwknop", str(conf)], capture_output=True, text=True, timeout=60)
    assert inline.returncode == 0 and "holds secret keys inline" in inline.stderr
    assert tomllib.loads(inline.stdout)["spa"]["user"][0]["key"] == b64(ALICE.key)
    missing = subprocess.run([XKNOCK, "import", "fwknop", str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.strip().endswith("no such file")


def test_cli_answers_in_json(tmp_path):
    conf = tmp_path / "access.conf"
    conf.write_text(ACCESS_CONF)
    keys_dir = tmp_path / "keys"
    result = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "--keys-dir", str(keys_dir), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["converted"] == ["alice", "stanza2", "alice-2"] and shown["of"] == 7 and shown["output"] is None
    assert tomllib.loads(shown["toml"])["spa"]["user"][0]["name"] == "alice" and not shown["inline_keys"]
    assert sorted(shown["key_files"]) == sorted(str(p) for p in keys_dir.iterdir())
    assert any("stanza dropped" in note for note in shown["notes"]), shown["notes"]


FWKNOPD_CONF = """\
# fwknopd.conf
PCAP_INTF                   eth1;
PCAP_FILTER                 udp port 40001;
MAX_SPA_PACKET_AGE          60;
ENABLE_DIGEST_PERSISTENCE   N;
"""


def test_fwknopd_conf_gives_the_port_max_age_and_interface(tmp_path):
    from xknock.controller.config import parse_config

    result = convert(ACCESS_CONF, fwknopd_conf=FWKNOPD_CONF, mode="monitor")
    config = parse_config(result.toml, listening=set())
    assert (config.mode, config.spa.port, config.spa.max_age_ns) == ("monitor", 40001, 60 * 10**9)
    assert result.interface == "eth1"
    [persistence] = result.server_notes
    assert (persistence.line, persistence.outcome) == (5, "changed")
    assert "#   fwknopd.conf line 5: server setting: ENABLE_DIGEST_PERSISTENCE N" in result.toml


@pytest.mark.parametrize("conf, port, noted", [
    ("ENABLE_UDP_SERVER Y\nUDPSERV_PORT 40002\nPCAP_FILTER udp port 40001\n", 40002, False),   # the UDP server's
    ("PCAP_FILTER udp port 40001 or udp port 40002\n", 62201, True),                          # not one port
    ("", 62201, False),
])
def test_the_spa_port_from_fwknopd_conf(conf, port, noted):
    result = convert(ACCESS_CONF, fwknopd_conf=conf)
    assert tomllib.loads(result.toml)["spa"]["port"] == port
    assert bool(result.server_notes) == noted


def test_cli_mode_and_fwknopd_conf_and_success_said_after_writing(tmp_path):
    conf, server = tmp_path / "access.conf", tmp_path / "fwknopd.conf"
    conf.write_text(ACCESS_CONF)
    server.write_text(FWKNOPD_CONF)
    out = tmp_path / "xknock.toml"
    result = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "--fwknopd-conf", str(server), "--mode",
                             "monitor", "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{server}:5: server setting: ENABLE_DIGEST_PERSISTENCE N" in result.stderr
    assert f"attach with: xknock attach eth1 -c {out}" in result.stderr
    assert tomllib.loads(out.read_text())["filter"]["mode"] == "monitor"

    nowhere = tmp_path / "missing-dir" / "xknock.toml"
    failed = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "-o", str(nowhere)], capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and "xknock: converted" not in failed.stderr, failed.stderr
    missing = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "--fwknopd-conf", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.strip().endswith("no such file") and missing.stdout == ""


def test_an_existing_output_is_refused_before_any_key_file_is_written(tmp_path):
    conf, out, keys_dir = tmp_path / "access.conf", tmp_path / "xknock.toml", tmp_path / "keys"
    conf.write_text(ACCESS_CONF)
    out.write_text("# mine\n")
    result = subprocess.run([XKNOCK, "import", "fwknop", str(conf), "--keys-dir", str(keys_dir), "-o", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "exists; pass --force" in result.stderr
    assert not keys_dir.exists() and out.read_text() == "# mine\n"


def test_the_converted_config_loads_as_xknock_config(tmp_path):
    from xknock.controller.config import load_config

    inline = tmp_path / "inline.toml"
    inline.write_text(convert(ACCESS_CONF).toml)
    inline.chmod(0o600)
    spa = load_config(str(inline), listening=set()).spa
    assert [u.name for u in spa.users] == ["alice", "stanza2", "alice-2"]
    alice = spa.users[0]
    assert (alice.key, alice.hmac_key, alice.username, alice.require_source_address) == \
        (ALICE.key, ALICE.hmac_key, "alice", True)
    assert alice.open_for_ns == 60 * 10**9 and alice.max_open_for_ns == 600 * 10**9

    result = convert(ACCESS_CONF, keys_dir=str(tmp_path / "keys"))
    from xknock.controller.wire import spa_keys

    for path, keys in result.key_files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        spa_keys.write_key_file(path, keys)
    with_files = tmp_path / "files.toml"
    with_files.write_text(result.toml)
    assert load_config(str(with_files), listening=set()).spa.users[0].hmac_key == ALICE.hmac_key
