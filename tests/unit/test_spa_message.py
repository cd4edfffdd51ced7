"""fwknop's SPA format (controller/wire/spa_message.py) against the real thing:
known-answer vectors from the fwknop client (committed, and fresh ones when
/usr/bin/fwknop is installed), our packets judged by the real fwknopd, every
rejection, and fuzzing: only SpaFormatError or a valid result, whatever the
bytes."""

import base64
import hashlib
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwknop_helpers import (
    CASES, VECTORS, access_stanza, fresh_keys, fwknop_packet, fwknopd_verdicts, have_fwknop, have_fwknopd,
)
from xknock.controller.wire import spa_message as spa
from xknock.controller.wire.spa_message import SpaFormatError

with open(VECTORS) as f:
    COMMITTED = json.load(f)["vectors"]

needs_fwknop = pytest.mark.skipif(not have_fwknop(), reason="the fwknop client is not installed")
needs_fwknopd = pytest.mark.skipif(not have_fwknopd(), reason="fwknopd is not installed")

KEY = bytes(range(32))
HMAC_KEY = bytes(range(100, 164))


def _open(payload, key, hmac_key, hmac_digest="sha256"):
    """The whole pipeline of the checks on one payload."""
    assert spa.looks_like_spa(payload)
    assert not spa.prefix_tacked(payload)
    ciphertext = spa.verify_hmac(payload, hmac_key, hmac_digest)
    assert ciphertext is not None, "HMAC did not verify"
    return spa.parse(spa.decrypt(ciphertext, key))


def _check_against_fwknop(vector):
    """Our decoding of a fwknop packet agrees with what fwknop printed, and our
    encoder rebuilds the packet byte for byte from the same inputs."""
    key = base64.b64decode(vector["key_base64"])
    hmac_key = base64.b64decode(vector["hmac_key_base64"])
    args, fields = vector["args"], vector["fields"]
    payload = vector["packet"].encode()
    hmac_digest = args.get("hmac_digest", "sha256")
    message = _open(payload, key, hmac_key, hmac_digest)

    plaintext = spa.decrypt(spa.verify_hmac(payload, hmac_key, hmac_digest), key)
    assert plaintext == f"{fields['encoded']}:{fields['digest']}".encode()
    assert message.rand == fields["rand"]
    assert message.username == fields["username"]
    assert message.timestamp == int(fields["timestamp"])
    assert message.version == fields["version"] == spa.PROTOCOL_VERSION
    assert message.message_type == int(fields["message_type"].split()[0])
    address, *ports = fields["message"].split(",")
    assert message.access_address == address
    assert message.access_ports == tuple((p.split("/")[0], int(p.split("/")[1])) for p in ports)
    assert message.nat_access == (None if fields["nat_access"] == "<NULL>" else fields["nat_access"])
    assert message.server_auth is None
    assert message.client_timeout == (int(fields["client_timeout"]) or None)
    assert message.digest == args.get("digest", "sha256")

    # Byte for byte: the same random value, time, salt -> the same packet.
    raw = base64.b64decode(spa.RIJNDAEL_PREFIX + payload[:-spa.DIGESTS[hmac_digest][1]] + b"==")
    rebuilt = spa.encode(key=key, hmac_key=hmac_key, access_address=address, ports=message.access_ports,
                         username=message.username, timestamp=message.timestamp, digest=message.digest,
                         hmac_digest=hmac_digest, client_timeout=message.client_timeout,
                         nat_access=message.nat_access, rand=message.rand, salt=raw[8:16])
    assert rebuilt == payload


@pytest.mark.parametrize("vector", COMMITTED, ids=[v["name"] for v in COMMITTED])
def test_committed_fwknop_vectors(vector):
    _check_against_fwknop(vector)


def test_committed_vectors_cover_every_digest():
    assert {v["args"].get("digest", "sha256") for v in COMMITTED} == set(spa.DIGESTS)
    assert {v["args"].get("hmac_digest", "sha256") for v in COMMITTED} == set(spa.HMAC_DIGESTS)


@needs_fwknop
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fresh_fwknop_packets(case):
    case = dict(case)
    name = case.pop("name")
    key, hmac_key = fresh_keys(case.pop("hmac_bytes", 64))
    payload, fields = fwknop_packet(key, hmac_key, **case)
    _check_against_fwknop({"name": name, "key_base64": key, "hmac_key_base64": hmac_key, "args": case,
                           "packet": payload.decode(), "fields": fields})


# --- the real fwknopd judges our packets ------------------------------------------


@needs_fwknopd
def test_fwknopd_accepts_our_packets_and_refuses_broken_ones():
    """One fwknopd run over a pcap: every digest pair, several ports, a client
    timeout and 0.0.0.0 accepted; tampered, wrong keys, stale and
    prefix-tacked refused. Each packet has its own source address."""
    packets, expected = [], set()
    stanzas = [spa_keys_for(hmac_digest) for hmac_digest in spa.HMAC_DIGESTS]   # one stanza per HMAC type
    now = int(time.time())
    text = "".join(access_stanza(base64.b64encode(k).decode(), base64.b64encode(h).decode(), d) + "\n"
                   for k, h, d in stanzas)

    def add(src, payload, accept):
        packets.append((src, payload))
        if accept:
            expected.add(src)

    for i, (key, hmac_key, hmac_digest) in enumerate(stanzas):
        digest = spa.HMAC_DIGESTS[(i + 3) % len(spa.HMAC_DIGESTS)]
        src = f"10.1.{i}.1"
        add(src, spa.encode(key=key, hmac_key=hmac_key, access_address=src, ports=[("tcp", 22)],
                            username="alice", digest=digest, hmac_digest=hmac_digest), True)
    key, hmac_key, _ = stanzas[spa.HMAC_DIGESTS.index("sha256")]
    good = dict(key=key, hmac_key=hmac_key, ports=[("tcp", 22), ("udp", 53)], username="alice")
    add("10.2.0.1", spa.encode(access_address="10.2.0.1", client_timeout=120, **good), True)
    add("10.2.0.2", spa.encode(access_address="0.0.0.0", **good), True)
    tampered = bytearray(spa.encode(access_address="10.3.0.1", **good))
    tampered[40] = ord("A") if tampered[40] != ord("A") else ord("B")
    add("10.3.0.1", bytes(tampered), False)
    add("10.3.0.2", spa.encode(access_address="10.3.0.2", **dict(good, key=bytes(32))), False)
    add("10.3.0.3", spa.encode(access_address="10.3.0.3", **dict(good, hmac_key=bytes(64))), False)
    add("10.3.0.4", spa.encode(access_address="10.3.0.4", timestamp=now - 1000, **good), False)
    add("10.3.0.5", spa.RIJNDAEL_PREFIX + spa.encode(access_address="10.3.0.5", **good), False)
    add("10.3.0.6", spa.encode(access_address="10.3.0.6", **dict(good, ports=[("tcp", 23)])), False)

    accepted, log = fwknopd_verdicts(text, packets)
    assert accepted == expected, log


def spa_keys_for(hmac_digest):
    from xknock.controller.wire.spa_keys import generate

    keys = generate(hmac_digest)
    return keys.key, keys.hmac_key, hmac_digest


# --- every rejection --------------------------------------------------------------


def good_payload(**kw):
    args = dict(key=KEY, hmac_key=HMAC_KEY, access_address="198.51.100.7", ports=[("tcp", 22)],
                username="alice")
    args.update(kw)
    return spa.encode(**args)


def test_round_trip_with_every_option():
    payload = good_payload(ports=[("tcp", 22), ("udp", 53)], client_timeout=90, server_auth="pw",
                           digest="sha3_512", hmac_digest="sha384", timestamp=1_700_000_000)
    message = _open(payload, KEY, HMAC_KEY, "sha384")
    assert message.access_ports == (("tcp", 22), ("udp", 53))
    assert (message.client_timeout, message.server_auth, message.digest) == (90, "pw", "sha3_512")
    assert message.message_type == spa.CLIENT_TIMEOUT_ACCESS_MSG
    assert message.timestamp == 1_700_000_000
    assert len(message.rand) == 16 and message.rand.isdigit()


def test_replay_digest_is_sha256_of_the_payload():
    payload = good_payload()
    assert spa.replay_digest(payload) == hashlib.sha256(payload).digest()
    assert spa.replay_digest(payload) != spa.replay_digest(good_payload())  # fresh salt and random value


def test_tampered_ciphertext_fails_the_hmac():
    payload = bytearray(good_payload())
    for index in (0, 20, len(payload) - 44, len(payload) - 1):
        broken = bytearray(payload)
        broken[index] = ord("B") if broken[index] != ord("B") else ord("C")
        assert spa.verify_hmac(bytes(broken), HMAC_KEY) is None


def test_wrong_hmac_key_or_digest_type():
    payload = good_payload()
    assert spa.verify_hmac(payload, bytes(64)) is None
    assert spa.verify_hmac(payload, HMAC_KEY, "sha3_256") is None   # same length, other function
    assert spa.verify_hmac(payload, HMAC_KEY, "sha512") is None


def test_wrong_key_is_bad_decrypt():
    ciphertext = spa.verify_hmac(good_payload(), HMAC_KEY)
    for key in (bytes(32), KEY[:16], b"x"):
        with pytest.raises(SpaFormatError) as err:
            spa.decrypt(ciphertext, key)
        assert err.value.outcome == "bad_decrypt"


def test_truncated_and_padded():
    payload = good_payload()
    for cut in (payload[:-1], payload[:-10], payload[1:], payload[:60], payload + b"A"):
        assert spa.verify_hmac(cut, HMAC_KEY) is None


def test_random_bytes_and_garbage_base64():
    rnd = os.urandom(300)
    assert not spa.looks_like_spa(rnd) or spa.verify_hmac(rnd, HMAC_KEY) is None
    garbage = base64.b64encode(os.urandom(200)).rstrip(b"=")
    assert spa.looks_like_spa(garbage)
    assert spa.verify_hmac(garbage, HMAC_KEY) is None
    assert not spa.looks_like_spa(b"!" * 200)
    assert not spa.looks_like_spa(b"A" * 199 + b"\0")
    for bad in (b"!!!!" * 20, b"A", b"AAAAA", b"", b"A" * 33):
        with pytest.raises(SpaFormatError) as err:
            spa.decrypt(bad, KEY)
        assert err.value.outcome == "bad_decrypt"


def test_sizes():
    assert not spa.looks_like_spa(b"A" * (spa.MIN_PAYLOAD - 1))
    assert spa.looks_like_spa(b"A" * spa.MIN_PAYLOAD)
    assert spa.looks_like_spa(b"A" * spa.MAX_PAYLOAD)
    assert not spa.looks_like_spa(b"A" * (spa.MAX_PAYLOAD + 1))
    assert spa.verify_hmac(b"A" * 1500, HMAC_KEY) is None


def test_prefix_tacking():
    payload = good_payload()
    assert not spa.prefix_tacked(payload)
    assert spa.prefix_tacked(spa.RIJNDAEL_PREFIX + payload)
    assert spa.prefix_tacked(b"hQ" + b"A" * 500)
    assert not spa.prefix_tacked(b"hQ" + b"A" * 300)   # fwknopd checks GnuPG's only above 400 bytes


def _sealed_plain(plain):
    return spa.seal(plain, key=KEY, hmac_key=HMAC_KEY)


def _body(*fields):
    return ":".join(fields).encode()


def _with_digest(body, name="sha256"):
    return body + b":" + base64.b64encode(hashlib.new(name, body).digest()).rstrip(b"=")


B64 = lambda s: base64.b64encode(s.encode()).decode().rstrip("=")  # noqa: E731
GOOD_FIELDS = ["1234567890123456", B64("alice"), "1700000000", "3.0.0", "1", B64("198.51.100.7,tcp/22")]


def test_wrong_inner_digest():
    body = _body(*GOOD_FIELDS)
    plain = _with_digest(body)
    assert spa.parse(plain).username == "alice"
    broken = plain[:-1] + (b"A" if plain[-1:] != b"A" else b"B")
    ciphertext = spa.verify_hmac(_sealed_plain(broken), HMAC_KEY)
    with pytest.raises(SpaFormatError) as err:
        spa.parse(spa.decrypt(ciphertext, KEY))
    assert err.value.outcome == "bad_digest"
    with pytest.raises(SpaFormatError) as err:
        spa.parse(body + b":" + b"A" * 40)   # no digest has that length
    assert err.value.outcome == "malformed"


MALFORMED = {
    "rand not digits": ["123456789012345x"] + GOOD_FIELDS[1:],
    "rand short": ["123456789012345"] + GOOD_FIELDS[1:],
    "user forbidden char": [GOOD_FIELDS[0], B64("al:ce")] + GOOD_FIELDS[2:],
    "user not base64": [GOOD_FIELDS[0], "al!ce"] + GOOD_FIELDS[2:],
    "timestamp not a number": GOOD_FIELDS[:2] + ["12x"] + GOOD_FIELDS[3:],
    "timestamp too long": GOOD_FIELDS[:2] + ["1" * 13] + GOOD_FIELDS[3:],
    "version too long": GOOD_FIELDS[:3] + ["123456789"] + GOOD_FIELDS[4:],
    "type out of range": GOOD_FIELDS[:4] + ["7"] + GOOD_FIELDS[5:],
    "address not IPv4": GOOD_FIELDS[:5] + [B64("2001:db8::1,tcp/22")],
    "address octal": GOOD_FIELDS[:5] + [B64("010.1.1.1,tcp/22")],
    "no port": GOOD_FIELDS[:5] + [B64("198.51.100.7")],
    "icmp": GOOD_FIELDS[:5] + [B64("198.51.100.7,icmp/0")],
    "port 0": GOOD_FIELDS[:5] + [B64("198.51.100.7,tcp/0")],
    "port 65536": GOOD_FIELDS[:5] + [B64("198.51.100.7,tcp/65536")],
    "extra field": GOOD_FIELDS + [B64("x"), B64("y")],
    "timeout type without timeout": GOOD_FIELDS[:4] + ["3"] + GOOD_FIELDS[5:],
    "timeout not a number": GOOD_FIELDS[:4] + ["3"] + GOOD_FIELDS[5:] + ["12s"],
    "timeout too big": GOOD_FIELDS[:4] + ["3"] + GOOD_FIELDS[5:] + ["65537"],
    "nat type without nat": GOOD_FIELDS[:4] + ["2"] + GOOD_FIELDS[5:],
    "nat without port": GOOD_FIELDS[:4] + ["2"] + GOOD_FIELDS[5:] + [B64("192.168.1.2")],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_fields(fields):
    with pytest.raises(SpaFormatError) as err:
        spa.parse(_with_digest(_body(*fields)))
    assert err.value.outcome == "malformed"


def test_command_messages_are_unsupported():
    with pytest.raises(SpaFormatError) as err:
        spa.parse(_with_digest(_body(*GOOD_FIELDS[:4], "0", B64("198.51.100.7,touch /tmp/x"))))
    assert err.value.outcome == "unsupported"


def test_non_printable_and_lengths():
    for plain in (_with_digest(_body(*GOOD_FIELDS)).replace(b"3.0.0", b"3.0\x00"), b"1" * 35, b"1:" * 800):
        with pytest.raises(SpaFormatError):
            spa.parse(plain)


def test_nat_and_server_auth_fields():
    message = spa.parse(_with_digest(_body(*GOOD_FIELDS[:4], "4", GOOD_FIELDS[5], B64("192.168.1.2,22"),
                                           B64("secret"), "300")))
    assert (message.nat_access, message.server_auth, message.client_timeout) == ("192.168.1.2,22", "secret", 300)
    message = spa.parse(_with_digest(_body(*GOOD_FIELDS, B64("auth"))))
    assert message.server_auth == "auth" and message.client_timeout is None


def test_encode_refuses_what_fwknop_would_not_send():
    for bad in (dict(ports=[]), dict(username="a:b"), dict(access_address="2001:db8::1"),
                dict(hmac_key=KEY), dict(key=bytes(33)), dict(hmac_digest="sha999"),
                dict(ports=[("tcp", 0)])):
        with pytest.raises(ValueError):
            good_payload(**bad)


# --- fuzzing: SpaFormatError or a valid result, never anything else ------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=1600))
def test_fuzz_parse_bytes(data):
    try:
        assert isinstance(spa.parse(data), spa.SpaMessage)
    except SpaFormatError as err:
        assert err.outcome in spa.OUTCOMES


FIELD_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


@FUZZ
@given(st.lists(st.one_of(FIELD_TEXT, st.sampled_from(GOOD_FIELDS), st.builds(B64, FIELD_TEXT)),
                min_size=5, max_size=11),
       st.sampled_from(sorted(spa.DIGESTS)))
def test_fuzz_parse_with_valid_digest(fields, digest):
    """Past the digest check, into every field parser."""
    try:
        message = spa.parse(_with_digest(_body(*fields), digest))
    except SpaFormatError as err:
        assert err.outcome in spa.OUTCOMES
        return
    assert message.digest == digest or {message.digest, digest} <= {"sha256", "sha3_256", "sha512", "sha3_512"}


@FUZZ
@given(st.binary(max_size=1600), st.sampled_from(spa.HMAC_DIGESTS))
def test_fuzz_verify_and_decrypt(data, digest):
    assert spa.verify_hmac(data, HMAC_KEY, digest) is None
    try:
        spa.decrypt(data, KEY)
    except SpaFormatError as err:
        assert err.outcome == "bad_decrypt"


@FUZZ
@given(st.binary(min_size=1, max_size=64))
def test_fuzz_decrypt_of_authentic_garbage(plain):
    """A right HMAC over ciphertext of any plaintext: decrypt and parse still
    only raise SpaFormatError."""
    ciphertext = spa.verify_hmac(spa.seal(plain, key=KEY, hmac_key=HMAC_KEY) + b"", HMAC_KEY)
    if ciphertext is None:   # shorter than fwknop's minimum: refused before any MAC
        return
    try:
        spa.parse(spa.decrypt(ciphertext, KEY))
    except SpaFormatError as err:
        assert err.outcome in spa.OUTCOMES
