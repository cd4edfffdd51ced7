"""The controller's SPA verdicts, check by check, in fwknop's order, on real
packets (our encoder, checked against the fwknop client in test_spa_message)."""

import base64
import ipaddress

import pytest

from xknock.controller.kernel import layout
from xknock.controller.wire import spa_message
from xknock.controller.config import parse_config
from xknock.controller.spa.spa import SpaReceiver, SpaVerifier, spa_uid
from xknock.controller.spa.spa_replay import ReplayCache

R = layout.Reason
KEY, HMAC_KEY = b"k" * 32, b"h" * 64
OTHER_KEY, OTHER_HMAC = b"K" * 32, b"H" * 64
ALICE, BOB = "198.51.100.7", "203.0.113.9"
NOW = 1_800_000_000


def b64(raw):
    return base64.b64encode(raw).decode()


def spa(**user_keys):
    alice = {"name": '"alice"', "key": f'"{b64(KEY)}"', "hmac_key": f'"{b64(HMAC_KEY)}"',
             "open": '["tcp:22", "udp:53"]', "sources": '["198.51.100.0/24", "2001:db8::/32"]'} | user_keys
    other = {"name": '"ops"', "key": f'"{b64(OTHER_KEY)}"', "hmac_key": f'"{b64(OTHER_HMAC)}"',
             "hmac_digest": '"sha512"', "open": '["tcp:443"]', "sources": '["192.0.2.0/28"]'}
    text = "[spa]\n" + "".join("[[spa.user]]\n" + "".join(f"{k} = {v}\n" for k, v in u.items() if v is not None)
                               for u in (alice, other))
    return parse_config(text, listening=set()).spa


def packet(address=ALICE, ports=(("tcp", 22),), key=KEY, hmac_key=HMAC_KEY, hmac_digest="sha256",
           timestamp=NOW, username="alice", **kw):
    return spa_message.encode(key=key, hmac_key=hmac_key, hmac_digest=hmac_digest, access_address=address,
                              ports=list(ports), username=username, timestamp=timestamp, **kw)


@pytest.fixture
def verifier(tmp_path):
    cache = ReplayCache(str(tmp_path / "replay"))
    yield SpaVerifier(spa(), cache, wall_clock=lambda: NOW + 5)
    cache.close()


def test_a_good_packet_is_accepted_for_its_sender(verifier):
    verdict = verifier.verify(packet(), ALICE)
    assert verdict.outcome == R.SPA_ACCEPTED, verdict
    assert (verdict.user, str(verdict.address), verdict.ports) == ("alice", ALICE, (("tcp", 22),))
    assert verdict.open_for_ns == 30 * 10**9


def test_the_same_packet_again_is_a_replay(verifier):
    payload = packet()
    assert verifier.verify(payload, ALICE).outcome == R.SPA_ACCEPTED
    assert verifier.verify(payload, ALICE).outcome == R.SPA_REPLAYED
    assert verifier.verify(payload, "198.51.100.99").outcome == R.SPA_REPLAYED   # from elsewhere too


def test_the_replay_cache_survives_a_restart(tmp_path):
    payload = packet()
    with ReplayCache(str(tmp_path / "replay")) as cache:
        assert SpaVerifier(spa(), cache, wall_clock=lambda: NOW).verify(payload, ALICE).outcome == R.SPA_ACCEPTED
    with ReplayCache(str(tmp_path / "replay")) as cache:
        assert SpaVerifier(spa(), cache, wall_clock=lambda: NOW).verify(payload, ALICE).outcome == R.SPA_REPLAYED


def test_a_refused_packet_before_the_hmac_is_not_remembered(verifier):
    # Only authentic packets enter the cache: junk cannot fill it.
    verifier.verify(packet(hmac_key=b"x" * 64), ALICE)
    assert len(verifier.replay) == 0


@pytest.mark.parametrize("make, source, outcome", [
    (lambda: packet(hmac_key=b"x" * 64), ALICE, R.SPA_BAD_HMAC),
    (lambda: packet(key=b"x" * 32), ALICE, R.SPA_MALFORMED),                 # right HMAC, wrong key: no decrypt
    (lambda: packet(timestamp=NOW - 200), ALICE, R.SPA_STALE),
    (lambda: packet(timestamp=NOW + 200), ALICE, R.SPA_STALE),
    (lambda: packet(ports=(("tcp", 23),)), ALICE, R.SPA_PORT_DENIED),
    (lambda: packet(ports=(("tcp", 22), ("tcp", 443))), ALICE, R.SPA_PORT_DENIED),   # all or nothing
    (lambda: packet(address="192.0.2.1"), ALICE, R.SPA_SOURCE_DENIED),     # for someone else
    (lambda: packet(), "192.0.2.50", R.SPA_SOURCE_DENIED),                 # outside alice's sources
    (lambda: spa_message.RIJNDAEL_PREFIX + packet(), ALICE, R.SPA_MALFORMED),   # prefix tacking
    (lambda: packet()[:-5], ALICE, R.SPA_BAD_HMAC),                        # truncated
    (lambda: base64.b64encode(bytes(range(200))).rstrip(b"="), ALICE, R.SPA_BAD_HMAC),   # base64 junk
    (lambda: bytes(range(256)), ALICE, R.SPA_BAD_HMAC),                    # binary junk
    (lambda: packet(client_timeout=60, nat_access="10.0.0.5,22"), ALICE, R.SPA_MALFORMED),   # NAT: refused
])
def test_each_refusal(verifier, make, source, outcome):
    assert verifier.verify(make(), source).outcome == outcome


def test_a_tampered_byte_anywhere_fails_the_hmac(verifier):
    payload = bytearray(packet())
    for index in range(0, len(payload), 7):
        tampered = bytearray(payload)
        tampered[index] = ord("A") if tampered[index] != ord("A") else ord("B")
        assert verifier.verify(bytes(tampered), ALICE).outcome in (R.SPA_BAD_HMAC, R.SPA_MALFORMED), index
        assert verifier.verify(bytes(tampered), ALICE).outcome != R.SPA_ACCEPTED


def test_the_stanza_is_found_by_its_hmac_key(verifier):
    payload = packet(key=OTHER_KEY, hmac_key=OTHER_HMAC, hmac_digest="sha512", ports=(("tcp", 443),),
                     address="192.0.2.1")
    verdict = verifier.verify(payload, "192.0.2.1")
    assert (verdict.outcome, verdict.user) == (R.SPA_ACCEPTED, "ops")


def test_username_and_source_address_rules(tmp_path):
    with ReplayCache(str(tmp_path / "replay")) as cache:
        strict = SpaVerifier(spa(username='"alice"', require_source_address="true"), cache, wall_clock=lambda: NOW)
        assert strict.verify(packet(username="mallory"), ALICE).outcome == R.SPA_UNKNOWN_USER
        assert strict.verify(packet(address="0.0.0.0"), ALICE).outcome == R.SPA_SOURCE_DENIED
        assert strict.verify(packet(), ALICE).outcome == R.SPA_ACCEPTED
        loose = SpaVerifier(spa(grant_requested_address="true"), cache, wall_clock=lambda: NOW)
        verdict = loose.verify(packet(address="192.0.2.1"), ALICE)
        assert (verdict.outcome, str(verdict.address)) == (R.SPA_ACCEPTED, "192.0.2.1")
        verdict = loose.verify(packet(address="0.0.0.0"), ALICE)
        assert (verdict.outcome, str(verdict.address)) == (R.SPA_ACCEPTED, ALICE)


def test_ipv6_senders_get_their_own_address_by_asking_for_0_0_0_0(verifier):
    verdict = verifier.verify(packet(address="0.0.0.0"), "2001:db8::7")
    assert (verdict.outcome, verdict.address) == (R.SPA_ACCEPTED, ipaddress.ip_address("2001:db8::7"))


def test_a_packet_sealed_for_an_ipv4_address_opens_nothing_from_ipv6(verifier):
    """Issue 13.1: sniffed from 198.51.100.7 and resent from an IPv6 address,
    it was accepted and the grant went to the sender."""
    verdict = verifier.verify(packet(address="198.51.100.7"), "2001:db8:bad::66")
    assert verdict.outcome == R.SPA_SOURCE_DENIED and verdict.address is None


def test_a_client_timeout_is_capped(tmp_path):
    with ReplayCache(str(tmp_path / "replay")) as cache:
        capped = SpaVerifier(spa(open_for='"30s"', max_open_for='"2m"'), cache, wall_clock=lambda: NOW)
        assert capped.verify(packet(client_timeout=60), ALICE).open_for_ns == 60 * 10**9
        assert capped.verify(packet(client_timeout=3600), ALICE).open_for_ns == 120 * 10**9
        fixed = SpaVerifier(spa(), cache, wall_clock=lambda: NOW)
        assert fixed.verify(packet(client_timeout=3600), ALICE).open_for_ns == 30 * 10**9


def test_every_digest_type_fwknop_allows(tmp_path):
    with ReplayCache(str(tmp_path / "replay")) as cache:
        for digest in spa_message.HMAC_DIGESTS:
            verifier = SpaVerifier(spa(hmac_digest=f'"{digest}"'), cache, wall_clock=lambda: NOW)
            assert verifier.verify(packet(hmac_digest=digest), ALICE).outcome == R.SPA_ACCEPTED, digest


# --- the receiver on the real program's maps ----------------------------------------


def test_the_receiver_writes_grants_and_counts_outcomes(harness, tmp_path):
    config = parse_config("[spa]\n[[spa.user]]\n" + f'name = "alice"\nkey = "{b64(KEY)}"\n'
                          f'hmac_key = "{b64(HMAC_KEY)}"\nopen = ["tcp:22"]\n', listening=set())
    harness.reset_state()
    harness.apply(config)
    cache = ReplayCache(str(tmp_path / "replay"))
    receiver = SpaReceiver(harness.loaded, harness.maps, config.spa, cache)   # not started: the test feeds it
    receiver.verifier.wall_clock = lambda: NOW
    payload = packet()
    assert receiver.handle(payload, ipaddress.ip_address(ALICE)).outcome == R.SPA_ACCEPTED
    assert receiver.handle(payload, ipaddress.ip_address(ALICE)).outcome == R.SPA_REPLAYED
    receiver.flush()
    grants = harness.grants()
    (grant,) = [g for (src, proto, port), g in grants.items() if (str(src), proto, port) == (ALICE, "tcp", 22)]
    assert grant.flags == layout.GRANT_SPA and grant.seq_uid == spa_uid("alice")
    counters = harness.counters()
    assert counters[R.SPA_ACCEPTED] == 1 and counters[R.SPA_REPLAYED] == 1
    assert counters[R.SPA_GRANT_CREATED] == 1
    from xknock.controller.kernel.maps import to_addr

    assert harness.maps.spa_known.lookup(to_addr(ALICE)) is not None   # remembered: past floods, still heard
    receiver.stop()   # and its cache with it
