"""The data path's half of SPA, through BPF_PROG_TEST_RUN: every packet to the
SPA port is dropped; plausible ones within both token buckets reach the
controller's ring buffer byte for byte; nothing else does."""

import base64
import ctypes
import os

import pytest
from xknock_dev.packets import IP, UDP, Raw, ether, raw, tcp, udp

from xknock.controller.kernel import layout
from xknock.controller.kernel.maps import from_addr
from xknock.controller.kernel.ring import Ring
from xknock.controller.config import parse_config
from xknock_dev.testrun import XDP_DROP, XDP_PASS
from monitor_mode import assert_monitor_passes_what_enforce_refuses

SPA_PORT = 62201
KEY = base64.b64encode(b"k" * 32).decode()
HMAC_KEY = base64.b64encode(b"h" * 64).decode()
R = layout.Reason


def spa_config(rate=10, total_rate=5000, mode="enforce", answer="drop"):
    """answer = "drop": these cases read the kernel's SPA verdicts; with the
    default "closed" the packets go on to the host (the last test here)."""
    return parse_config(f"""
[filter]
mode = "{mode}"
answer = "{answer}"

[spa]
port = {SPA_PORT}
rate = {rate}
total_rate = {total_rate}

[[spa.user]]
name = "alice"
key = "{KEY}"
hmac_key = "{HMAC_KEY}"
open = ["tcp:22"]
""", listening=set())


def candidate(size=200):
    """Base64 text of `size` bytes, as fwknop sends (no padding)."""
    text = base64.b64encode(os.urandom(size)).decode().rstrip("=")
    return text[:size].encode()


@pytest.fixture
def spa(harness):
    harness.reset_state()
    harness.set_clock(1_000_000_000_000)
    harness.apply(spa_config())
    return harness


def test_a_candidate_is_dropped_and_queued_byte_for_byte(spa):
    payload = candidate(300)
    assert spa.run(udp("198.51.100.7", SPA_PORT, payload=payload)) == XDP_DROP
    assert spa.run(udp("198.51.100.8", SPA_PORT, payload=payload)) == XDP_DROP
    found = spa.spa_candidates()
    assert [(str(src), port, data) for src, port, data in found] == [
        ("198.51.100.7", SPA_PORT, payload), ("198.51.100.8", SPA_PORT, payload)]
    counters = spa.counters()
    assert counters[R.SPA_QUEUED] == 2
    assert counters[R.DROP_SPA] == 2


def test_ipv6_candidates_are_queued_too(spa):
    payload = candidate(180)
    assert spa.run(udp("2001:db8::7", SPA_PORT, payload=payload)) == XDP_DROP
    assert [(str(src), data) for src, _, data in spa.spa_candidates()] == [("2001:db8::7", payload)]


@pytest.mark.parametrize("payload, why", [
    (b"A" * (layout.SPA_MIN_PAYLOAD - 1), "one byte too short"),
    (b"\x00\xff" * 100, "not base64"),
    (b"A" * 15 + b"!" + b"A" * 200, "a non-base64 byte within the checked start"),
    (b"", "empty"),
])
def test_what_cannot_be_spa_stays_in_the_kernel(spa, payload, why):
    assert spa.run(udp("198.51.100.7", SPA_PORT, payload=payload)) == XDP_DROP, why
    assert spa.spa_candidates() == [], why
    assert spa.counters()[R.SPA_NOT_CANDIDATE] == 1, why


def test_the_size_bounds_are_inclusive(spa):
    for size in (layout.SPA_MIN_PAYLOAD, layout.SPA_MAX_PAYLOAD):
        assert spa.run(udp("198.51.100.7", SPA_PORT, payload=b"Q" * size)) == XDP_DROP
    assert spa.run(udp("198.51.100.7", SPA_PORT, payload=b"Q" * (layout.SPA_MAX_PAYLOAD + 1))) == XDP_DROP
    assert [len(data) for _, _, data in spa.spa_candidates()] == [layout.SPA_MIN_PAYLOAD, layout.SPA_MAX_PAYLOAD]


def test_an_ip_length_beyond_the_frame_is_not_queued(spa):
    # The IP header claims 400 more bytes than the frame carries.
    frame = ether() / IP(src="198.51.100.7", dst="10.77.0.1", len=20 + 8 + 600) / UDP(sport=1, dport=SPA_PORT) / Raw(
        b"Q" * 200)
    packet = bytearray(raw(frame))
    packet[14 + 20 + 4:14 + 20 + 6] = (8 + 600).to_bytes(2, "big")   # the UDP length agrees with the IP header
    assert spa.run(bytes(packet)) == XDP_DROP
    assert spa.spa_candidates() == []


def test_the_ip_length_not_the_frame_decides_the_payload(spa):
    # Ethernet padding or trailing bytes after the IP datagram are not payload.
    payload = candidate(200)
    frame = raw(ether() / IP(src="198.51.100.7", dst="10.77.0.1") / UDP(sport=1, dport=SPA_PORT) / Raw(payload))
    assert spa.run(frame + b"\x00" * 30) == XDP_DROP
    assert [data for _, _, data in spa.spa_candidates()] == [payload]


def test_other_protocols_on_the_spa_port_number_are_not_spa(spa):
    assert spa.run(tcp("198.51.100.7", SPA_PORT)) == XDP_PASS
    assert spa.counters()[R.PASS_UNGUARDED] == 1


def test_each_source_has_its_own_token_bucket(harness):
    harness.reset_state()
    harness.set_clock(1_000_000_000_000)
    harness.apply(spa_config(rate=2))
    payload = candidate(200)
    for _ in range(5):
        harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    assert harness.run(udp("198.51.100.9", SPA_PORT, payload=payload)) == XDP_DROP
    assert [str(src) for src, _, _ in harness.spa_candidates()] == ["198.51.100.7"] * 2 + ["198.51.100.9"]
    assert harness.counters()[R.SPA_RATE_LIMITED] == 3
    harness.advance(0.5)   # one more token at 2 a second
    harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    assert len(harness.spa_candidates()) == 1
    assert harness.counters()[R.SPA_RATE_LIMITED] == 4


def test_a_lagging_clock_credits_a_bucket_nothing_twice(harness):
    """Another CPU's coarse clock may be a tick behind (bpf/xknock_clock.h):
    a bucket's last time only moves forward, or the time between the lagging
    reading and the next would be credited again."""
    harness.reset_state()
    start = 1_000_000_000_000
    harness.set_clock(start)
    harness.apply(spa_config(rate=2))
    payload = candidate(200)
    for _ in range(3):
        harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    assert len(harness.spa_candidates()) == 2   # the burst; the third is limited
    harness.set_clock(start + 500_000_000)      # one more token at 2 a second
    harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    harness.set_clock(start)                     # a reading from behind
    harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    harness.set_clock(start + 500_000_000)      # no time has passed since the token
    harness.run(udp("198.51.100.7", SPA_PORT, payload=payload))
    assert len(harness.spa_candidates()) == 1
    assert harness.counters()[R.SPA_RATE_LIMITED] == 3


def test_a_flood_from_many_sources_is_capped_by_the_total_rate(harness, one_cpu):
    harness.reset_state()
    harness.set_clock(1_000_000_000_000)
    harness.apply(spa_config(rate=10, total_rate=40))
    share = 40 // (os.cpu_count() or 1)   # the total rate is shared out per CPU: one CPU's share
    payload = candidate(200)
    # one_cpu: every run on that CPU (a busy machine moves the process)
    for i in range(share + 25):
        harness.run(udp(f"198.51.{100 + i // 250}.{i % 250 + 1}", SPA_PORT, payload=payload))
    assert len(harness.spa_candidates()) == share
    assert harness.counters()[R.SPA_OVERLOADED] == 25
    harness.advance(1)
    harness.run(udp("192.0.2.99", SPA_PORT, payload=payload))
    assert len(harness.spa_candidates()) == 1


def test_the_users_ports_are_guarded(spa):
    assert spa.run(tcp("198.51.100.7", 22)) == XDP_DROP
    assert spa.counters()[R.DROP_NO_GRANT] == 1


def test_monitor_mode_passes_spa_packets_but_still_queues_them(spa):
    assert_monitor_passes_what_enforce_refuses(spa, spa_config(), udp("198.51.100.7", SPA_PORT, payload=candidate(200)),
                                               R.SPA_QUEUED)
    assert len(spa.spa_candidates()) == 1   # the monitor run's: reset_state drained the enforce run's


def test_without_spa_the_port_is_just_a_port(xk):
    assert xk.run(udp("198.51.100.7", SPA_PORT, payload=candidate(200))) == XDP_PASS
    assert xk.spa_candidates() == []


def test_past_the_total_rate_sources_with_an_accepted_spa_still_get_through(harness):
    import ctypes

    from xknock.controller.kernel.maps import to_addr

    harness.reset_state()
    harness.set_clock(1_000_000_000_000)
    harness.apply(spa_config(rate=10, total_rate=20))
    harness.maps.spa_known.update(to_addr("192.0.2.50"), ctypes.c_uint64(1))   # as the controller does
    payload = candidate(200)
    for i in range(60):   # a flood from many sources uses up the total rate
        harness.run(udp(f"198.51.100.{i + 1}", SPA_PORT, payload=payload))
    assert harness.counters()[R.SPA_OVERLOADED] > 0
    harness.spa_candidates()
    assert harness.run(udp("192.0.2.51", SPA_PORT, payload=payload)) == XDP_DROP   # a stranger: overloaded
    assert harness.run(udp("192.0.2.50", SPA_PORT, payload=payload)) == XDP_DROP   # known: queued all the same
    assert [str(src) for src, _, _ in harness.spa_candidates()] == ["192.0.2.50"]
    assert harness.counters()[R.SPA_KNOWN_PASSED] == 1
    for _ in range(20):   # still within its own rate only
        harness.run(udp("192.0.2.50", SPA_PORT, payload=payload))
    assert len(harness.spa_candidates()) == 9


def test_with_answers_the_spa_port_is_answered_by_the_host(spa):
    """answer = "closed" (the default): after the kernel's SPA work the packet
    goes on to the host, whose stack answers it as any unused port (nothing
    listens on the SPA port); the candidate is queued all the same."""
    spa.apply(spa_config(answer="closed"))
    payload = candidate()
    assert spa.run(udp("198.51.100.7", SPA_PORT, payload=payload)) == XDP_PASS
    assert [p for _, _, p in spa.spa_candidates()] == [payload]
    counters = spa.counters()
    assert counters[R.DROP_SPA] == counters[R.ANSWER_BY_HOST] == counters[R.SPA_QUEUED] == 1


def test_a_ring_reader_hands_over_at_most_its_budget_per_poll(spa):
    # kernel/ring.py: one poll stops after `budget` records, the last of them
    # consumed, and the next poll goes on from there: nothing lost, nothing twice.
    spa.spa_candidates()   # whatever earlier cases left
    sources = [f"198.51.100.{n}" for n in range(1, 8)]
    for source in sources:
        assert spa.run(udp(source, SPA_PORT, payload=candidate())) == XDP_DROP
    seen = []
    ring = Ring(spa.loaded.bpf[b"spa_events"].map_fd,
                lambda data, size: seen.append(str(spa_source(data))), budget=3)
    try:
        assert [ring.poll(0), ring.poll(0), ring.poll(0), ring.poll(0)] == [3, 3, 1, 0]
    finally:
        ring.close()
    assert seen == sources


def spa_source(data):
    return from_addr(ctypes.cast(data, ctypes.POINTER(layout.SpaEvent)).contents.src)
