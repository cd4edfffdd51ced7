"""The public-key SPA packet (controller/wire/spa_pubkey.py): our known-answer
vector (tests/data/spa_pubkey/vectors.json, also in docs/spa-pubkey-format.md),
every way a packet can be wrong, the privacy of the sender, and a fuzz of the
parser that must only ever say SpaPubkeyError."""

import base64
import ipaddress
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from xknock.controller.wire import hpke, spa_message
from xknock.controller.wire import spa_pubkey as sp
from xknock.controller.wire import spa_pubkey_keys as keys
from repo_paths import DATA

VECTORS = json.load(open(os.path.join(DATA, "spa_pubkey", "vectors.json")))
H = bytes.fromhex


def vector_keys():
    inputs = VECTORS["inputs"]
    user = Ed25519PrivateKey.from_private_bytes(H(inputs["user_private"]))
    server_private, server_public = hpke.derive_key_pair(H(inputs["server_ikm"]))
    return user, server_private, server_public


def vector_packet():
    inputs = VECTORS["inputs"]
    user, _, server_public = vector_keys()
    return sp.seal_packet(server_public, user, [tuple(p) for p in inputs["ports"]],
                          ipv4=ipaddress.ip_address(inputs["ipv4"]), ipv6=ipaddress.ip_address(inputs["ipv6"]),
                          open_for_s=inputs["open_for_s"], acknowledge=inputs["acknowledge"],
                          ack_port=inputs["ack_port"], timestamp=inputs["timestamp"], nonce=H(inputs["nonce"]),
                          ikm_e=H(inputs["ikm_e"]))


def verify(packet, server_private, server_public):
    """The server's steps in order; the Message, or the SpaPubkeyError / 'bad signature'."""
    enc, tag, ciphertext = sp.split(packet)
    if not sp.tag_matches(server_public, enc, tag):
        raise sp.SpaPubkeyError("tag")
    message, exporter = sp.open_packet(server_private, enc, tag, ciphertext)
    if not sp.signature_valid(message, server_public, enc, tag):
        raise sp.SpaPubkeyError("bad signature")
    return message, exporter


def test_the_known_answer_vector():
    user, server_private, server_public = vector_keys()
    assert server_public.hex() == VECTORS["server_public"]
    assert keys.raw_public(user).hex() == VECTORS["user_public"]
    packet, exporter = vector_packet()
    assert packet.decode() == VECTORS["packet"]
    assert exporter.hex() == VECTORS["exporter_secret"]
    message, exporter = verify(packet, server_private, server_public)
    assert message.ports == (("tcp", 22), ("udp", 51820))
    assert (str(message.ipv4), str(message.ipv6)) == ("192.0.2.7", "2001:db8::7")
    assert (message.timestamp, message.open_for_s, message.acknowledge, message.ack_port) == (1767225600, 60, True,
                                                                                              40000)
    assert message.user_key.hex() == VECTORS["user_public"]
    ack = sp.seal_ack(exporter, sp.Ack(granted=True, until=VECTORS["ack_until"], ports=message.ports,
                                       ipv4=message.ipv4, ipv6=message.ipv6, detail=VECTORS["ack_detail"]),
                      nonce=H(VECTORS["ack_nonce"]))
    assert ack.hex() == VECTORS["ack"]
    opened = sp.open_ack(exporter, ack)
    assert opened.granted and opened.ports == message.ports and opened.detail == "granted"


def test_it_passes_the_data_paths_cheap_filter_and_fwknops_size_bounds():
    packet, _ = vector_packet()
    assert len(packet) == sp.PACKET_BYTES
    assert spa_message.looks_like_spa(packet)              # 140-1499 bytes of base64 characters
    assert not spa_message.prefix_tacked(packet)


def test_every_tampered_byte_is_refused():
    _, server_private, server_public = vector_keys()
    packet, _ = vector_packet()
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for index in range(len(packet)):
        changed = alphabet[(alphabet.index(packet[index]) + 1) % 64]
        with pytest.raises(sp.SpaPubkeyError):
            verify(packet[:index] + bytes([changed]) + packet[index + 1:], server_private, server_public)


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_truncated_and_oversized_are_refused(cut):
    _, server_private, server_public = vector_keys()
    packet, _ = vector_packet()
    for wrong in (packet[:-cut], packet + packet[-cut:]):
        with pytest.raises(sp.SpaPubkeyError, match="bytes, a packet is"):
            sp.split(wrong)


def test_a_packet_for_another_server_stops_at_the_tag():
    user, _, server_public = vector_keys()
    other_private, other_public = hpke.derive_key_pair(b"another server")
    packet, _ = sp.seal_packet(other_public, user, [("tcp", 22)])
    enc, tag, _ = sp.split(packet)
    assert not sp.tag_matches(server_public, enc, tag)
    assert verify(packet, other_private, other_public)[0].ports == (("tcp", 22),)


def test_a_forged_tag_still_does_not_open_with_the_wrong_server_key():
    user, server_private, server_public = vector_keys()
    _, other_public = hpke.derive_key_pair(b"another server")
    packet, _ = sp.seal_packet(other_public, user, [("tcp", 22)])
    enc, _, ciphertext = sp.split(packet)
    with pytest.raises(sp.SpaPubkeyError):
        sp.open_packet(server_private, enc, sp.tag_for(server_public, enc), ciphertext)


def test_a_signature_by_another_key_is_refused():
    """Someone who holds the server's private key (a stolen configuration)
    can read packets but cannot make one under a user's key: the signature
    covers enc, so it cannot even be moved into a packet of its own."""
    user, server_private, server_public = vector_keys()
    packet, _ = vector_packet()
    message, _ = verify(packet, server_private, server_public)
    thief = Ed25519PrivateKey.generate()
    forged, _ = sp.seal_packet(server_public, thief, [("tcp", 22)])
    enc, tag, ciphertext = sp.split(forged)
    plaintext, _ = hpke.open_(server_private, enc, sp.INFO, sp.MAGIC + tag, ciphertext)
    # The thief's message, but claiming the user's key: re-encrypt it.
    claimed = plaintext[:28] + message.user_key + plaintext[60:sp.MESSAGE.size] + message.signature
    ikm = os.urandom(32)
    _, enc2 = hpke.derive_key_pair(ikm)
    tag2 = sp.tag_for(server_public, enc2)
    enc2, ciphertext2, _ = hpke.seal(server_public, sp.INFO, sp.MAGIC + tag2, claimed, ikm_e=ikm)
    replanted = sp.MAGIC + base64.b64encode(enc2 + tag2 + ciphertext2).rstrip(b"=")
    with pytest.raises(sp.SpaPubkeyError, match="bad signature"):
        verify(replanted, server_private, server_public)


def test_two_packets_of_one_user_share_nothing_but_the_header():
    user, server_private, server_public = vector_keys()
    first, _ = sp.seal_packet(server_public, user, [("tcp", 22)], ipv4=ipaddress.ip_address("192.0.2.7"))
    second, _ = sp.seal_packet(server_public, user, [("tcp", 22)], ipv4=ipaddress.ip_address("192.0.2.7"))
    assert first[:6] == second[:6] == sp.MAGIC and len(first) == len(second)
    bodies = [base64.b64decode(p[6:] + b"==") for p in (first, second)]
    windows = {bodies[0][i:i + 4] for i in range(len(bodies[0]) - 3)}
    assert not any(bodies[1][i:i + 4] in windows for i in range(len(bodies[1]) - 3))   # no 4 bytes in common
    user_key = keys.raw_public(user)
    for packet, body in zip((first, second), bodies):
        assert user_key not in body and base64.b64encode(user_key)[:20] not in packet


def test_the_acknowledgement_opens_only_with_its_packets_secret():
    user, _, server_public = vector_keys()
    _, exporter = sp.seal_packet(server_public, user, [("tcp", 22)])
    _, other = sp.seal_packet(server_public, user, [("tcp", 22)])
    ack = sp.seal_ack(exporter, sp.Ack(granted=False, reason=48, detail="not allowed: tcp:23"))
    assert sp.open_ack(exporter, ack).detail == "not allowed: tcp:23"
    with pytest.raises(sp.SpaPubkeyError, match="does not decrypt"):
        sp.open_ack(other, ack)
    with pytest.raises(sp.SpaPubkeyError):
        sp.open_ack(exporter, ack[:-1])


def test_the_client_refuses_bad_port_counts():
    user, _, server_public = vector_keys()
    with pytest.raises(sp.SpaPubkeyError):
        sp.seal_packet(server_public, user, [])
    with pytest.raises(sp.SpaPubkeyError):
        sp.seal_packet(server_public, user, [("tcp", p) for p in range(1, 18)])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_fuzz_the_packet_parser_says_only_spa_pubkey_error(tail):
    _, server_private, server_public = vector_keys()
    for data in (sp.MAGIC + tail, sp.MAGIC + base64.b64encode(tail).rstrip(b"=")):
        try:
            verify(data, server_private, server_public)
        except sp.SpaPubkeyError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=sp.PLAINTEXT_BYTES, max_size=sp.PLAINTEXT_BYTES))
def test_fuzz_the_message_parser(plaintext):
    try:
        sp.parse(plaintext)
    except sp.SpaPubkeyError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_the_acknowledgement_parser(data):
    with pytest.raises(sp.SpaPubkeyError):
        sp.open_ack(b"\0" * 32, sp.ACK_MAGIC + data)
