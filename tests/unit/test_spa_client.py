"""The SPA client (controller/client/spa_client.py, `xknock spa`, `xknock keygen`):
real UDP sockets on loopback receive the packet; our decoder and the real
fwknopd both accept it."""

import base64
import json
import os
import socket
import subprocess

import pytest

from xknock_dev.e2e import XKNOCK
from fwknop_helpers import access_stanza, fwknopd_verdicts, have_fwknopd
from xknock.controller.wire import spa_message as spa
from xknock.controller.client.spa_client import SpaClientError, parse_access, send_spa
from xknock.controller.wire.spa_keys import generate, keys_from_base64, load_key_file


def listener(family, address):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    sock.settimeout(5)
    return sock


def received(sock, keys, hmac_digest="sha256"):
    payload, source = sock.recvfrom(4096)
    ciphertext = spa.verify_hmac(payload, keys.hmac_key, hmac_digest)
    assert ciphertext is not None
    return payload, spa.parse(spa.decrypt(ciphertext, keys.key))


def test_ipv4_default_address_is_the_route_source():
    keys = generate()
    with listener(socket.AF_INET, "127.0.0.1") as sock:
        sent = send_spa("127.0.0.1", [("tcp", 22), ("udp", 53)], keys, user="alice", client_timeout=60,
                        port=sock.getsockname()[1])
        payload, message = received(sock, keys)
    assert sent.access_address == message.access_address == "127.0.0.1"
    assert message.access_ports == (("tcp", 22), ("udp", 53))
    assert (message.username, message.client_timeout) == ("alice", 60)
    assert sent.size == len(payload) and spa.looks_like_spa(payload)


def test_explicit_and_packet_source_addresses():
    keys = generate("sha512")
    with listener(socket.AF_INET, "127.0.0.1") as sock:
        port = sock.getsockname()[1]
        send_spa("127.0.0.1", [("tcp", 22)], keys, hmac_digest="sha512", access_address="198.51.100.7", port=port)
        assert received(sock, keys, "sha512")[1].access_address == "198.51.100.7"
        send_spa("127.0.0.1", [("tcp", 22)], keys, hmac_digest="sha512", source_from_packet=True, port=port)
        assert received(sock, keys, "sha512")[1].access_address == "0.0.0.0"


def test_ipv6_asks_for_the_packet_source():
    keys = generate()
    with listener(socket.AF_INET6, "::1") as sock:
        sent = send_spa("::1", [("tcp", 22)], keys, port=sock.getsockname()[1])
        assert received(sock, keys)[1].access_address == sent.access_address == "0.0.0.0"
    with pytest.raises(SpaClientError, match="IPv6"):
        send_spa("::1", [("tcp", 22)], keys, access_address="198.51.100.7", port=9)


def test_parse_access():
    assert parse_access("tcp/22") == ("tcp", 22) == parse_access("TCP:22")
    for bad in ("icmp/0", "tcp/0", "tcp/65536", "tcp", "22", "tcp/x"):
        with pytest.raises(ValueError):
            parse_access(bad)


@pytest.mark.skipif(not have_fwknopd(), reason="fwknopd is not installed")
def test_fwknopd_accepts_what_the_client_sends():
    keys = generate()
    with listener(socket.AF_INET, "127.0.0.1") as sock:
        send_spa("127.0.0.1", [("tcp", 22)], keys, access_address="10.7.0.1", port=sock.getsockname()[1])
        payload, _ = sock.recvfrom(4096)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    accepted, log = fwknopd_verdicts(access_stanza(b64(keys.key), b64(keys.hmac_key)), [("10.7.0.1", payload)])
    assert accepted == {"10.7.0.1"}, log


def run(*args):
    return subprocess.run([XKNOCK, *args], capture_output=True, text=True, timeout=60)


def test_cli_keygen_and_spa(tmp_path):
    printed = run("keygen")
    assert printed.returncode == 0 and printed.stdout.startswith("KEY_BASE64: ")
    path = str(tmp_path / "alice.keys")
    assert run("keygen", "--key-file", path).returncode == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    keys = load_key_file(path)
    assert run("keygen", "--key-file", path).returncode == 1   # exists
    with listener(socket.AF_INET, "127.0.0.1") as sock:
        result = run("spa", "127.0.0.1", "-A", "tcp/22", "-A", "udp/53", "--key-file", path, "--user", "bob",
                     "--port", str(sock.getsockname()[1]))
        assert result.returncode == 0, result.stderr
        assert "open tcp/22 udp/53 for 127.0.0.1" in result.stdout
        message = received(sock, keys)[1]
    assert message.username == "bob" and message.access_ports == (("tcp", 22), ("udp", 53))


def test_cli_keygen_and_spa_answer_in_json(tmp_path):
    printed = json.loads(run("keygen", "--json", "--hmac-digest", "sha512").stdout)
    keys = keys_from_base64(printed["key_base64"], printed["hmac_key_base64"], "printed")
    assert printed["hmac_digest"] == "sha512" and len(keys.hmac_key) == 128
    path = str(tmp_path / "bob.keys")
    assert json.loads(run("keygen", "--key-file", path, "--json").stdout) == {"hmac_digest": "sha256", "key_file": path}
    with listener(socket.AF_INET, "127.0.0.1") as sock:
        port = sock.getsockname()[1]
        result = run("spa", "127.0.0.1", "-A", "tcp/22", "--key-file", path, "--port", str(port), "--json")
        assert result.returncode == 0, result.stderr
        assert received(sock, load_key_file(path))[1].access_ports == (("tcp", 22),)
    sent = json.loads(result.stdout)
    assert sent["sent"] == "fwknop" and sent["server"] == "127.0.0.1" and sent["port"] == port
    assert sent["open"] == ["tcp/22"] and sent["for"] == "127.0.0.1" and sent["bytes"] > 0

    user, server = str(tmp_path / "me.key"), str(tmp_path / "srv.key")
    pair = json.loads(run("keygen", "--public", "--key-file", user, "--json").stdout)
    assert pair["private_key_file"] == user and pair["public_key_file"] == user + ".pub"
    assert pair["public_key"] in open(user + ".pub").read()
    assert run("keygen", "--public", "--server", "--key-file", server).returncode == 0
    with listener(socket.AF_INET, "127.0.0.1") as sock:   # nothing answers there
        unanswered = run("spa", "127.0.0.1", "-A", "tcp/22", "--identity", user, "--server-key", server + ".pub",
                         "--port", str(sock.getsockname()[1]), "--tries", "1", "--json")
    assert unanswered.returncode == 2, unanswered.stderr
    shown = json.loads(unanswered.stdout)
    assert shown["sent"] == "public-key" and shown["answer"] is None and shown["tries"] == 1 and shown["waited"]


@pytest.mark.parametrize("args, pattern", [
    (["--key-file", "/nonexistent/k"], "no such key file"),
    (["--key-base64", "AAAA", "--hmac-key-base64", "AAAA"], "are the same"),
    (["--key-base64", "!!", "--hmac-key-base64", "AAAA"], "not valid base64"),
    (["--key-base64", "AAAA", "--hmac-key-base64", "AAAB", "-a", "2001:db8::1"], "not an IPv4 address"),
])
def test_cli_errors_are_one_line(args, pattern):
    result = run("spa", "127.0.0.1", "-A", "tcp/22", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xknock: ") and __import__("re").search(pattern, lines[0])


def test_cli_group_readable_key_file(tmp_path):
    path = tmp_path / "k"
    path.write_text(f"KEY_BASE64: {base64.b64encode(bytes(32)).decode()}\n"
                    f"HMAC_KEY_BASE64: {base64.b64encode(bytes(range(64))).decode()}\n")
    os.chmod(path, 0o644)
    result = run("spa", "127.0.0.1", "-A", "tcp/22", "--key-file", str(path))
    assert result.returncode == 1 and f"chmod 600 {path}" in result.stderr
