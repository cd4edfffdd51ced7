"""The controller's verdicts on public-key SPA packets (controller/spa/spa_pubkey.py,
through spa.SpaVerifier's dispatch): every refusal, acceptance for both address
families, the replay cache shared with fwknop packets and kept across a
restart, acknowledgements only to authentic senders, and the config."""

import base64
import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from xknock.controller.config import parse_config
from xknock.controller.config.model import ConfigError
from xknock.controller.kernel import layout
from xknock.controller.spa.spa import SpaVerifier
from xknock.controller.spa.spa_pubkey import ack_for
from xknock.controller.spa.spa_replay import ReplayCache
from xknock.controller.wire import spa_message
from xknock.controller.wire import spa_pubkey as wire
from xknock.controller.wire import spa_pubkey_keys as keys

R = layout.Reason
NOW = 1_800_000_000
ALICE4, ALICE6, ELSEWHERE = "198.51.100.7", "2001:db8::7", "198.51.100.99"
KEY, HMAC_KEY = b"k" * 32, b"h" * 64
ALICE_KEY, NEXT_KEY, BOB_KEY = (Ed25519PrivateKey.generate() for _ in range(3))


def b64(raw):
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def server_key(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys") / "server.key")
    return path, keys.write_pair(path, keys.SERVER)


def config(server_key, alice_keys=None, extra=""):
    path, _ = server_key
    alice_keys = alice_keys or f'["{b64(keys.raw_public(ALICE_KEY))}"]'
    text = f"""[spa]
server_key = "{path}"

[[spa.user]]
name = "alice"
public_keys = {alice_keys}
open = ["tcp:22", "udp:53"]
sources = ["198.51.100.0/24", "2001:db8::/32"]
open_for = "30s"
max_open_for = "2m"
{extra}
[[spa.user]]
name = "fw"
key = "{b64(KEY)}"
hmac_key = "{b64(HMAC_KEY)}"
open = ["tcp:22"]
"""
    return parse_config(text, listening=set()).spa


def packet(server_key, user=ALICE_KEY, ports=(("tcp", 22),), ipv4=ALICE4, ipv6=ALICE6, timestamp=NOW, **kw):
    server_public = keys.raw_public(server_key[1])
    return wire.seal_packet(server_public, user, list(ports), ipv4=ipv4 and ipaddress.ip_address(ipv4),
                            ipv6=ipv6 and ipaddress.ip_address(ipv6), timestamp=timestamp, **kw)


@pytest.fixture
def verifier(tmp_path, server_key):
    cache = ReplayCache(str(tmp_path / "replay"))
    yield SpaVerifier(config(server_key), cache, wall_clock=lambda: NOW + 5)
    cache.close()


def test_a_good_packet_opens_both_families(verifier, server_key):
    datagram, _ = packet(server_key, open_for_s=60)
    verdict = verifier.verify(datagram, ALICE4)
    assert verdict.outcome == R.SPA_ACCEPTED, verdict
    assert (verdict.user, str(verdict.address), [str(a) for a in verdict.also]) == ("alice", ALICE4, [ALICE6])
    assert verdict.ports == (("tcp", 22),) and verdict.open_for_ns == 60 * 10**9
    assert verdict.reply is None   # not asked for


def test_knocked_over_ipv6_the_ipv4_address_is_granted_too(verifier, server_key):
    verdict = verifier.verify(packet(server_key)[0], ALICE6)
    assert verdict.outcome == R.SPA_ACCEPTED
    assert (str(verdict.address), [str(a) for a in verdict.also]) == (ALICE6, [ALICE4])


def test_open_for_is_capped_by_max_open_for(verifier, server_key):
    assert verifier.verify(packet(server_key, open_for_s=3600)[0], ALICE4).open_for_ns == 120 * 10**9


def test_replayed_also_after_a_restart_and_in_the_cache_fwknop_packets_use(tmp_path, server_key):
    datagram, _ = packet(server_key)
    fwknop = spa_message.encode(key=KEY, hmac_key=HMAC_KEY, access_address=ALICE4, ports=[("tcp", 22)],
                                username="fw", timestamp=NOW)
    with ReplayCache(str(tmp_path / "replay")) as cache:
        verifier = SpaVerifier(config(server_key), cache, wall_clock=lambda: NOW)
        assert verifier.verify(datagram, ALICE4).outcome == R.SPA_ACCEPTED
        assert verifier.verify(fwknop, ALICE4).outcome == R.SPA_ACCEPTED   # the dispatch leaves fwknop's alone
        assert verifier.verify(datagram, ALICE4).outcome == R.SPA_REPLAYED
        assert len(cache) == 2
    with ReplayCache(str(tmp_path / "replay")) as cache:   # the controller restarted
        verifier = SpaVerifier(config(server_key), cache, wall_clock=lambda: NOW)
        replayed = verifier.verify(datagram, ALICE4)
        assert replayed.outcome == R.SPA_REPLAYED and replayed.reply is None


@pytest.mark.parametrize("case, outcome, detail", [
    ("unknown user key", R.SPA_UNKNOWN_USER, "no user has this public key"),
    ("stale", R.SPA_STALE, "from now"),
    ("future", R.SPA_STALE, "from now"),
    ("port not allowed", R.SPA_PORT_DENIED, "not allowed: tcp:23"),
    ("resent from elsewhere", R.SPA_SOURCE_DENIED, "the packet came from"),
    ("source outside sources", R.SPA_SOURCE_DENIED, "do not admit"),
    ("another server", R.SPA_BAD_HMAC, "not for this server"),
    ("truncated", R.SPA_MALFORMED, "bytes, a packet is"),
    ("oversized", R.SPA_MALFORMED, "bytes, a packet is"),
    ("tampered", R.SPA_BAD_HMAC, ""),
])
def test_refusals(verifier, server_key, case, outcome, detail):
    source = ALICE4
    if case == "unknown user key":
        datagram, _ = packet(server_key, user=BOB_KEY)
    elif case == "stale":
        datagram, _ = packet(server_key, timestamp=NOW - 200)
    elif case == "future":
        datagram, _ = packet(server_key, timestamp=NOW + 200)
    elif case == "port not allowed":
        datagram, _ = packet(server_key, ports=(("tcp", 22), ("tcp", 23)))
    elif case == "resent from elsewhere":
        datagram, source = packet(server_key)[0], ELSEWHERE
    elif case == "source outside sources":
        datagram, source = packet(server_key, ipv4=None)[0], "192.0.2.1"
    elif case == "another server":
        datagram, _ = wire.seal_packet(keys.raw_public(keys.generate(keys.SERVER)), ALICE_KEY, [("tcp", 22)])
    elif case == "truncated":
        datagram = packet(server_key)[0][:-4]
    elif case == "oversized":
        datagram = packet(server_key)[0] + b"AAAA"
    else:   # a byte of the ciphertext, far from the tag
        datagram = bytearray(packet(server_key)[0])
        datagram[200] = ord("A") if datagram[200] != ord("A") else ord("B")
        datagram = bytes(datagram)
    verdict = verifier.verify(datagram, source)
    assert verdict.outcome == outcome and detail in verdict.detail, verdict


def test_a_wrong_signature_is_not_authentic_and_gets_no_reply(verifier, server_key):
    """A packet made with the server's public key, claiming alice's key
    without her private key: it decrypts, the signature fails."""
    from xknock.controller.wire import hpke
    datagram, _ = packet(server_key, user=BOB_KEY, acknowledge=True, ack_port=4000)
    enc, tag, ciphertext = wire.split(datagram)
    plaintext, _ = hpke.open_(server_key[1], enc, wire.INFO, wire.MAGIC + tag, ciphertext)
    claimed = plaintext[:28] + keys.raw_public(ALICE_KEY) + plaintext[60:]
    ikm = b"\1" * 32
    _, enc = hpke.derive_key_pair(ikm)
    tag = wire.tag_for(keys.raw_public(server_key[1]), enc)
    enc, ciphertext, _ = hpke.seal(keys.raw_public(server_key[1]), wire.INFO, wire.MAGIC + tag, claimed, ikm_e=ikm)
    forged = wire.MAGIC + base64.b64encode(enc + tag + ciphertext).rstrip(b"=")
    verdict = verifier.verify(forged, ALICE4)
    assert (verdict.outcome, verdict.detail, verdict.reply) == (R.SPA_BAD_HMAC, "bad signature", None)


def test_an_expired_key_is_refused_and_the_next_key_works(tmp_path, server_key):
    alice = b64(keys.raw_public(ALICE_KEY))
    following = b64(keys.raw_public(NEXT_KEY))
    spa = config(server_key, f'[{{ key = "{alice}", expires = 2027-01-01T00:00:00Z }}, "{following}"]')
    with ReplayCache(str(tmp_path / "replay")) as cache:
        verifier = SpaVerifier(spa, cache, wall_clock=lambda: NOW)   # NOW is in 2027
        verdict = verifier.verify(packet(server_key, acknowledge=True, ack_port=4000)[0], ALICE4)
        assert (verdict.outcome, verdict.detail) == (R.SPA_UNKNOWN_USER, "key expired")
        assert verdict.reply is not None   # authentic: it may hear why
        assert verifier.verify(packet(server_key, user=NEXT_KEY)[0], ALICE4).outcome == R.SPA_ACCEPTED


def test_the_acknowledgement_says_the_verdict_to_the_sender_only(verifier, server_key):
    datagram, exporter = packet(server_key, acknowledge=True, ack_port=40000)
    verdict = verifier.verify(datagram, ALICE4)
    assert verdict.reply.port == 40000 and str(verdict.reply.address) == ALICE4
    ack = wire.open_ack(exporter, wire.seal_ack(verdict.reply.exporter, ack_for(verdict, NOW)))
    assert ack.granted and ack.until == NOW + 30 and ack.ports == (("tcp", 22),)
    assert (str(ack.ipv4), str(ack.ipv6)) == (ALICE4, ALICE6)
    refused = verifier.verify(packet(server_key, ports=(("tcp", 23),), acknowledge=True, ack_port=40000)[0], ALICE4)
    ack = wire.open_ack(refused.reply.exporter, wire.seal_ack(refused.reply.exporter, ack_for(refused, NOW)))
    assert not ack.granted and ack.reason == R.SPA_PORT_DENIED and "tcp:23" in ack.detail


def test_a_public_key_user_is_never_tried_with_fwknops_empty_keys(verifier):
    """A public-key-only user has no fwknop keys: a fwknop packet MACed with
    an empty key must not find it."""
    alice = [user for user in verifier.spa.users if user.name == "alice"][0]
    assert not alice.speaks_fwknop
    seal = spa_message.seal(b"x" * 40, key=b"k", hmac_key=b"")
    assert verifier.verify(seal, ALICE4).outcome == R.SPA_BAD_HMAC


@pytest.mark.parametrize("body, message", [
    ('public_keys = ["abc"]', "not a public key"),
    ('public_keys = []', "1 to 2 keys"),
    ('public_keys = ["{k}", "{k}"]', "one key twice"),
    ('public_keys = ["{k}", "{n}", "{b}"]', "1 to 2 keys"),
    ('public_keys = [{{ key = "{k}", expires = "soon" }}]', "expires must be a date"),
    ('public_keys = [{{ key = "{k}", when = 1 }}]', "a table has key"),
])
def test_config_errors_are_one_line_each(server_key, body, message):
    k, n, b = (b64(keys.raw_public(x)) for x in (ALICE_KEY, NEXT_KEY, BOB_KEY))
    text = (f'[spa]\nserver_key = "{server_key[0]}"\n[[spa.user]]\nname = "alice"\nopen = ["tcp:22"]\n'
            + body.format(k=k, n=n, b=b) + "\n")
    with pytest.raises(ConfigError, match=message):
        parse_config(text, listening=set())


def test_public_keys_need_a_server_key_and_one_key_is_one_user(server_key, tmp_path):
    k = b64(keys.raw_public(ALICE_KEY))
    with pytest.raises(ConfigError, match="no server_key"):
        parse_config(f'[spa]\n[[spa.user]]\nname = "a"\nopen = ["tcp:22"]\npublic_keys = ["{k}"]\n', listening=set())
    with pytest.raises(ConfigError, match="one key, one user"):
        parse_config(f'[spa]\nserver_key = "{server_key[0]}"\n'
                     f'[[spa.user]]\nname = "a"\nopen = ["tcp:22"]\npublic_keys = ["{k}"]\n'
                     f'[[spa.user]]\nname = "b"\nopen = ["tcp:22"]\npublic_keys = ["{k}"]\n', listening=set())
    user_file = str(tmp_path / "user.key")
    keys.write_pair(user_file, keys.USER)
    with pytest.raises(ConfigError, match="holds a user key"):
        parse_config(f'[spa]\nserver_key = "{user_file}"\n[[spa.user]]\nname = "a"\nopen = ["tcp:22"]\n'
                     f'public_keys = ["{k}"]\n', listening=set())


def test_the_verifier_benchmark_runs_both_protocols():
    """bench/spa_verify.py measures; here it only has to run every case (no timing asserted)."""
    from bench import spa_verify

    rates = spa_verify.verifications(seconds=0.05, authentic=3)
    assert set(rates) == {("fwknop", "junk"), ("fwknop", "authentic"), ("public-key", "junk"),
                          ("public-key", "forged tag"), ("public-key", "authentic")}
    assert all(rate > 0 for rate in rates.values())


def test_a_reload_that_removes_a_key_refuses_it_and_the_hash_tells_configs_apart(tmp_path, server_key):
    from xknock.controller.config.load import config_hash

    with ReplayCache(str(tmp_path / "replay")) as cache:
        verifier = SpaVerifier(config(server_key), cache, wall_clock=lambda: NOW)
        assert verifier.verify(packet(server_key)[0], ALICE4).outcome == R.SPA_ACCEPTED
        verifier.spa = config(server_key, f'["{b64(keys.raw_public(NEXT_KEY))}"]')   # what set_spa does
        assert verifier.verify(packet(server_key)[0], ALICE4).outcome == R.SPA_UNKNOWN_USER
        assert verifier.verify(packet(server_key, user=NEXT_KEY)[0], ALICE4).outcome == R.SPA_ACCEPTED

    def full(alice_keys=None):
        path, _ = server_key
        alice_keys = alice_keys or f'["{b64(keys.raw_public(ALICE_KEY))}"]'
        return parse_config(f'[spa]\nserver_key = "{path}"\n[[spa.user]]\nname = "alice"\nopen = ["tcp:22"]\n'
                            f'public_keys = {alice_keys}\n', listening=set())

    assert config_hash(full()) == config_hash(full())
    assert config_hash(full()) != config_hash(full(f'["{b64(keys.raw_public(NEXT_KEY))}"]'))


def test_the_client_sends_a_fresh_packet_when_no_answer_comes(server_key):
    """A server stand-in on loopback that lets the first packet go unanswered:
    the client's second packet is a new one (a resent one would be a replay)
    and its answer is read."""
    import socket
    import threading

    from xknock.controller.client.spa_pubkey_client import knock

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(30)
    seen = []

    def serve():
        for _ in range(2):
            datagram, (address, _) = server.recvfrom(2048)
            seen.append(datagram)
        enc, tag, ciphertext = wire.split(datagram)
        message, exporter = wire.open_packet(server_key[1], enc, tag, ciphertext)
        ack = wire.Ack(granted=True, until=NOW, ports=message.ports, ipv4=message.ipv4, detail="granted")
        server.sendto(wire.seal_ack(exporter, ack), (address, message.ack_port))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result = knock("127.0.0.1", [("tcp", 22)], ALICE_KEY, keys.raw_public(server_key[1]),
                       port=server.getsockname()[1], tries=10, wait_s=0.5)
    finally:
        thread.join(30)
        server.close()
    assert result.tries >= 2 and result.ack.granted   # more if the stand-in was slow to answer and result.ack.ports == (("tcp", 22),)
    assert len(seen) == 2 and seen[0] != seen[1] and seen[0][:6] == seen[1][:6] == wire.MAGIC
    assert str(result.ipv4) == "127.0.0.1"


def test_a_user_moving_from_a_shared_key_knocks_with_either_meanwhile(tmp_path, server_key):
    """docs/spa.md's migration: public_keys added to the fwknop stanza; both work until the keys go."""
    text = f"""[spa]
server_key = "{server_key[0]}"
[[spa.user]]
name = "alice"
key = "{b64(KEY)}"
hmac_key = "{b64(HMAC_KEY)}"
public_keys = ["{b64(keys.raw_public(ALICE_KEY))}"]
open = ["tcp:22"]
"""
    fwknop = spa_message.encode(key=KEY, hmac_key=HMAC_KEY, access_address=ALICE4, ports=[("tcp", 22)],
                                username="alice", timestamp=NOW)
    with ReplayCache(str(tmp_path / "replay")) as cache:
        verifier = SpaVerifier(parse_config(text, listening=set()).spa, cache, wall_clock=lambda: NOW)
        assert verifier.verify(fwknop, ALICE4).outcome == R.SPA_ACCEPTED
        assert verifier.verify(fwknop, ALICE4).outcome == R.SPA_REPLAYED
        accepted = verifier.verify(packet(server_key)[0], ALICE4)
        assert (accepted.outcome, accepted.user) == (R.SPA_ACCEPTED, "alice")


def test_the_other_familys_address_is_granted_only_inside_the_users_sources(verifier, server_key):
    verdict = verifier.verify(packet(server_key, ipv6="2001:dead::7")[0], ALICE4)   # sources: 2001:db8::/32
    assert verdict.outcome == R.SPA_ACCEPTED and verdict.also == ()
    assert ack_for(verdict, NOW).ipv6 is None


def test_fuzz_the_whole_verifier_gives_a_verdict_never_an_exception(tmp_path, server_key):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    good, _ = packet(server_key)
    with ReplayCache(str(tmp_path / "replay")) as cache:
        verifier = SpaVerifier(config(server_key), cache, wall_clock=lambda: NOW)

        @settings(max_examples=300, deadline=None)
        @given(st.one_of(st.binary(max_size=400).map(lambda b: wire.MAGIC + b),
                         st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255))
                         .map(lambda c: good[:c[0]] + bytes([c[1]]) + good[c[0] + 1:])))
        def check(payload):
            verdict = verifier.verify(payload, ALICE4)
            assert verdict.outcome in (R.SPA_MALFORMED, R.SPA_BAD_HMAC, R.SPA_ACCEPTED, R.SPA_REPLAYED)

        check()
