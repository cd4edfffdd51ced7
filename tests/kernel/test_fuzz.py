"""Malformed-frame fuzzing of the parser and the guarded-port verdict.

A hundred thousand frames (about 3 s) aimed at the guarded ports (tcp:22, tcp:443, udp:443)
from a source with no grant go through the real program (BPF_PROG_TEST_RUN):
valid frames first (Ethernet with 0-2 VLAN tags; IPv4 with options and
fragment fields; IPv6 with extension-header chains of random kinds and length
0-10, fragment headers among them; TCP with random flags, UDP), then the same
mutated: bits flipped, bytes and 16-bit fields set to telling values, bytes
inserted and deleted, frames cut short or extended. The generator is a
seeded random.Random; the seed is printed, and XK_FUZZ_SEED=<seed> replays a
run (XK_FUZZ_FRAMES=<n> changes its length).

The oracle. A fuzzed frame that the program drops is never wrong here (this
test is about what gets through, not about dropping too much). A frame that
passes is wrong when the Linux stack could hand it, or a frame xknock cannot
tell from it, to a socket on a guarded port. `stack_target()` decides that
with its own parser, written from the kernel's receive path rather than from
bpf/xknock_parsing.h:

  * Ethernet, any number of 802.1Q/802.1ad tags (a host may have VLAN
    devices), then IPv4 or IPv6. Other EtherTypes reach no TCP/UDP socket
    (tunnels, MPLS and PPPoE are outside this oracle; see docs/datapath.md).
  * IPv4: version 4, ihl >= 5, total length >= ihl * 4; the stack trims the
    frame to the total length. IPv6: version 6; payload length bounds the
    packet; extension headers (hop-by-hop, routing, destination options, AH,
    fragment) are walked however many there are.
  * A later fragment (offset > 0) reaches no port by itself: its datagram is
    delivered only with its first fragment, which is judged on its own.
  * Headers must fit the IP length, or the stack drops the packet; the whole
    TCP (20 bytes) or UDP (8 bytes) header too. In a first fragment what
    overruns it comes in the next fragment instead.

  It ignores what the program never reads: checksums, addresses other than
  the source, IPv4 option contents, TCP data offset, UDP length, routing
  header segments-left. For those, an attacker picks the values the stack
  accepts, and the program's verdict on that twin frame is the same as on
  this one; treating them as valid makes the oracle flag exactly the frames
  whose twins are real bypasses. (It also walks a hop-by-hop header wherever
  it sits, as the program does, where Linux wants it first.)

  A frame cut shorter than its IP length is dropped by the stack, but its
  twin with the missing bytes is not, and the program cannot have read them:
  so bytes past the frame's end count as unknown, not absent (likewise bytes
  past a first fragment's IP length).

  The answer is ("tcp"|"udp", port), None (no socket port: not IP, another
  protocol, a later fragment, headers the stack rejects), or ANY when a byte
  that decides the port is unknown: such a frame could reach any port, so
  passing it is failing open.

Property: no PASS verdict for a frame whose target is a guarded port or ANY
(unless its source is allow-listed, which a mutation could make it).
Besides: every verdict is PASS or DROP, and every frame counts exactly one
verdict reason.

With answer = "closed" (the second half of this file), at least a hundred
thousand mutated frames aimed at guarded and knock ports, with right
checksums, some from a source holding grants and some from or to addresses
that must never be answered: no frame draws an answer it should not (see
answer_problems), and the answers go back where the frame came from."""

import ipaddress
import os

import pytest
import random
import struct
import time

from xknock_dev.packets import Ether

from xknock.controller.kernel.layout import VERDICT_REASONS, Reason
from xknock_dev.testrun import XDP_DROP, XDP_PASS, XDP_TX

FRAMES = int(os.environ.get("XK_FUZZ_FRAMES", "100000"))
VALID_SHARE = 0.3

GUARDED = {("tcp", 22), ("tcp", 443), ("udp", 443)}   # xknock_dev/example.py EXAMPLE_CONFIG
ALLOWED = [ipaddress.ip_network("192.0.2.10/32"), ipaddress.ip_network("2001:db8:a::/48")]
SRC4 = ipaddress.ip_address("198.51.100.7").packed
SRC6 = ipaddress.ip_address("2001:db8:77::7").packed
DST4 = ipaddress.ip_address("10.77.0.1").packed
DST6 = ipaddress.ip_address("fd00:77::1").packed

ANY = "ANY"
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
EXT_HEADERS = (HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS)


# -- the oracle -----------------------------------------------------------------

def stack_target(frame):
    """(source address or None, target) of what the Linux stack would
    deliver this frame to; see the module docstring."""
    ethertype = _u16(frame, 12)
    off = 14
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        if len(frame) < off + 4:
            return None, ANY
        ethertype = _u16(frame, off + 2)
        off += 4
    if ethertype == ETH_P_IP:
        return _ipv4(frame, off)
    if ethertype == ETH_P_IPV6:
        return _ipv6(frame, off)
    return None, None


class _Bounds:
    """Where the packet ends: by the IP length (the stack drops a packet whose
    headers overrun it; in a first fragment, what is past it comes in later
    fragments and could be anything), and by the frame (bytes past its end
    are missing from this copy only: a twin frame has them, with any value)."""

    def __init__(self, frame, declared_end):
        self.frame_end = len(frame)
        self.declared_end = declared_end
        self.first_fragment = False

    def lacks(self, at, size):
        """False when bytes [at, at + size) are there, else the target to give."""
        if at + size > self.declared_end:
            return ANY if self.first_fragment else None
        if at + size > self.frame_end:
            return ANY
        return False


def _ipv4(frame, off):
    if len(frame) < off + 20:
        return None, ANY
    version, ihl = frame[off] >> 4, frame[off] & 0xF
    total = _u16(frame, off + 2)
    if version != 4 or ihl < 5 or total < ihl * 4:
        return None, None
    src = ipaddress.IPv4Address(frame[off + 12 : off + 16])
    frag = _u16(frame, off + 6)
    if frag & 0x1FFF:
        return src, None   # a later fragment
    bounds = _Bounds(frame, off + total)
    bounds.first_fragment = bool(frag & 0x2000)
    return src, _l4(frame, bounds, frame[off + 9], off + ihl * 4)


def _ipv6(frame, off):
    if len(frame) < off + 40:
        return None, ANY
    if frame[off] >> 4 != 6:
        return None, None
    src = ipaddress.IPv6Address(frame[off + 8 : off + 24])
    bounds = _Bounds(frame, off + 40 + _u16(frame, off + 4))
    nexthdr, pos = frame[off + 6], off + 40
    while nexthdr in EXT_HEADERS:
        if nexthdr == FRAGMENT:
            lacking = bounds.lacks(pos, 8)
            if lacking is not False:
                return src, lacking
            offset_and_more = _u16(frame, pos + 2)
            if offset_and_more >> 3:
                return src, None   # a later fragment
            bounds.first_fragment |= bool(offset_and_more & 1)
            nexthdr, pos = frame[pos], pos + 8
            continue
        lacking = bounds.lacks(pos, 2)
        if lacking is not False:
            return src, lacking
        size = (frame[pos + 1] + 2) * 4 if nexthdr == AH else (frame[pos + 1] + 1) * 8
        if pos + size > bounds.declared_end and not bounds.first_fragment:
            return src, None
        nexthdr, pos = frame[pos], pos + size
    return src, _l4(frame, bounds, nexthdr, pos)


def _l4(frame, bounds, proto, start):
    if proto not in (6, 17):
        return None
    name, size = ("tcp", 20) if proto == 6 else ("udp", 8)
    if start + size > bounds.declared_end and not bounds.first_fragment:
        return None   # the stack wants the whole header
    lacking = bounds.lacks(start, 4)
    if lacking is not False:
        return lacking
    return name, _u16(frame, start + 2)


def _u16(frame, at):
    return (frame[at] << 8) | frame[at + 1]


# -- valid frames ----------------------------------------------------------------

def build_frame(rng, targets=GUARDED, addresses=None, checksums=False):
    """(frame, the target it is built for). addresses: (src4, dst4, src6, dst6,
    eth) packed, instead of SRC4, DST4, SRC6, DST6 and the usual Ethernet
    addresses; checksums: right IPv4 header and TCP / UDP checksums (else 0)."""
    src4, dst4, src6, dst6, eth_addresses = addresses or (SRC4, DST4, SRC6, DST6, ETH_ADDRESSES)
    proto, dport = rng.choice(sorted(targets))
    if proto == "tcp":
        flags = rng.choice([0x02, 0x02, 0x12, 0x10, 0x18, 0x04, 0x01, 0xC2, rng.randrange(256)])
        doff = rng.choice([5, 5, 5, rng.randrange(5, 16)])
        l4 = struct.pack("!HHIIBBHHH", rng.randrange(1024, 65536), dport, rng.getrandbits(32), 0,
                         doff << 4, flags, 65535, 0, 0)
        l4 += bytes(rng.getrandbits(8) for _ in range(max(0, doff * 4 - 20)))
    else:
        payload_len = rng.randrange(0, 32)
        l4 = struct.pack("!HHHH", rng.randrange(1024, 65536), dport, 8 + payload_len, 0)
        l4 += bytes(rng.getrandbits(8) for _ in range(payload_len))
    l4 += bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 0, rng.randrange(64)])))
    number = 6 if proto == "tcp" else 17

    later_fragment = False
    if rng.random() < 0.5:
        ethertype = ETH_P_IP
        ihl = rng.choice([5, 5, 5, rng.randrange(5, 16)])
        options = bytes([1] * (ihl * 4 - 20)) if rng.random() < 0.5 else bytes(
            rng.getrandbits(8) for _ in range(ihl * 4 - 20))
        frag = 0
        if rng.random() < 0.3:
            offset = rng.choice([0, 0, 1, 2, 3, rng.randrange(8192)])
            frag = offset | (0x2000 if rng.random() < 0.5 else 0) | (0x4000 if rng.random() < 0.2 else 0)
            later_fragment = offset > 0
        if checksums:
            l4 = _with_l4_checksum(l4, number, src4 + dst4 + struct.pack("!BBH", 0, number, len(l4)))
        header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), rng.getrandbits(16), frag, 64,
                             number, 0, src4, dst4) + options
        if checksums:
            header = header[:10] + struct.pack("!H", 0xFFFF ^ _csum(header)) + header[12:]
        ip = header + l4
    else:
        ethertype = ETH_P_IPV6
        kinds = [rng.choice(EXT_HEADERS) for _ in range(rng.choice([0, 0, 1, 2, 3, rng.randrange(11)]))]
        chain = b""
        for i, kind in enumerate(kinds):
            nexthdr = kinds[i + 1] if i + 1 < len(kinds) else number
            if kind == FRAGMENT:
                offset = rng.choice([0, 0, 1, 2, 3, rng.randrange(8192)])
                later_fragment |= offset > 0   # the walk stops at the first such header
                chain += struct.pack("!BBHI", nexthdr, 0, (offset << 3) | rng.randrange(2), rng.getrandbits(32))
            elif kind == AH:
                hdrlen = rng.randrange(1, 6)
                chain += bytes([nexthdr, hdrlen]) + bytes(rng.getrandbits(8) for _ in range((hdrlen + 2) * 4 - 2))
            else:
                hdrlen = rng.choice([0, 0, rng.randrange(4)])
                chain += bytes([nexthdr, hdrlen]) + bytes([1] * ((hdrlen + 1) * 8 - 2))
        first = kinds[0] if kinds else number
        if checksums:
            l4 = _with_l4_checksum(l4, number, src6 + dst6 + struct.pack("!I3xB", len(l4), number))
        payload = chain + l4
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(payload), first, 64, src6, dst6) + payload

    eth = eth_addresses
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        eth += struct.pack("!HH", rng.choice([ETH_P_8021Q, ETH_P_8021AD]), rng.randrange(4096))
    frame = eth + struct.pack("!H", ethertype) + ip
    return frame, (None if later_fragment else (proto, dport))


ETH_ADDRESSES = bytes.fromhex("020000000001020000000002")


def _csum(data):
    """The one's-complement sum of data (16-bit words, zero padded)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _with_l4_checksum(l4, number, pseudo):
    """The segment with its checksum filled in: TCP over all of it, UDP over
    its UDP length (Linux trims the rest)."""
    at, covered = (16, len(l4)) if number == 6 else (6, min(_u16(l4, 4), len(l4)))
    if len(pseudo) == 12:
        pseudo = pseudo[:10] + struct.pack("!H", covered)
    else:
        pseudo = pseudo[:32] + struct.pack("!I3xB", covered, number)
    check = 0xFFFF ^ _csum(pseudo + l4[:covered])
    if number == 17 and check == 0:
        check = 0xFFFF
    return l4[:at] + struct.pack("!H", check) + l4[at + 2:]


# -- mutations ---------------------------------------------------------------------

TELLING_BYTES = [0x00, 0xFF, 0x01, 0x06, 0x11, 0x3A, 0x2B, 0x2C, 0x33, 0x3B, 0x3C, 0x45, 0x4F, 0x60, 0x81, 0x88,
                 0xA8, 0x86, 0xDD, 0x08, 0x16, 0x20, 0x02, 0x12]
TELLING_WORDS = [0, 1, 8, 20, 22, 40, 443, 0x0800, 0x86DD, 0x8100, 0x88A8, 0x2000, 0x1FFF, 0xFFFF]


def mutate(rng, frame):
    frame = bytearray(frame)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
        # most parsing happens in the first hundred-odd bytes: aim there
        at = min(len(frame) - 1, int(rng.triangular(0, len(frame), 20)))
        op = rng.random()
        if op < 0.3:
            frame[at] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            frame[at] = rng.choice(TELLING_BYTES)
        elif op < 0.6 and at + 1 < len(frame):
            frame[at : at + 2] = struct.pack("!H", rng.choice(TELLING_WORDS))
        elif op < 0.72:
            frame = frame[: max(14, at)]
        elif op < 0.8:
            frame += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        elif op < 0.9 and at >= 12:
            frame[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 4, 8, rng.randrange(1, 40)])))
        elif at >= 14:
            del frame[at : at + rng.choice([1, 2, 4, 8, rng.randrange(1, 40)])]
    if len(frame) < 14:   # BPF_PROG_TEST_RUN refuses frames shorter than Ethernet
        frame += bytes(14 - len(frame))
    return bytes(frame)


# -- the tests -------------------------------------------------------------------------

def test_oracle_reads_scapy_frames():
    """The oracle against frames built by scapy, not by this file."""
    from xknock_dev.packets import IP, TCP, UDP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, Raw, ether, raw, tcp, udp

    src = "198.51.100.7"
    assert stack_target(tcp(src, 22))[1] == ("tcp", 22)
    assert stack_target(tcp("2001:db8:77::7", 22, vlans=(5, 6)))[1] == ("tcp", 22)
    assert stack_target(udp(src, 443, vlans=(1, 2, 3)))[1] == ("udp", 443)   # more tags than xknock walks
    assert stack_target(tcp(src, 22)[:14 + 20 + 4])[1] == ("tcp", 22)   # a twin has the rest
    assert stack_target(tcp(src, 22)[:14 + 20 + 3])[1] == ANY
    assert stack_target(raw(ether() / IP(src=src, dst="10.77.0.1", frag=5) / Raw(b"x" * 32)))[1] is None
    assert stack_target(raw(ether() / IP(src=src, dst="10.77.0.1", ihl=4) / TCP(dport=22)))[1] is None
    assert stack_target(raw(ether() / IP(src=src, dst="10.77.0.1", len=30) / TCP(dport=22)))[1] is None
    first = ether() / IP(src=src, dst="10.77.0.1", flags="MF", proto=6)
    assert stack_target(raw(first / Raw(bytes(TCP(dport=22))[:8])))[1] == ("tcp", 22)
    assert stack_target(raw(first / Raw(bytes(TCP(dport=22))[:2])))[1] == ANY
    v6 = ether() / IPv6(src="2001:db8:77::7", dst="fd00:77::1")
    assert stack_target(raw(v6 / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(m=1) / TCP(dport=443)))[1] == ("tcp", 443)
    assert stack_target(raw(v6 / IPv6ExtHdrFragment(offset=9, nh=17) / Raw(b"x" * 16)))[1] is None
    assert stack_target(raw(v6 / IPv6ExtHdrDestOpt() / UDP(dport=443)))[1] == ("udp", 443)
    assert stack_target(raw(Ether(type=0x0806) / Raw(b"x" * 28)))[1] is None


def fuzz(xk, seed, frames):
    """Runs frames fuzzed frames; (violations, verdict counts, target counts)."""
    rng = random.Random(seed)
    violations, verdicts, targets = [], {}, {}
    for i in range(frames):
        frame, built_for = build_frame(rng)
        valid = rng.random() < VALID_SHARE
        if valid:
            assert stack_target(frame)[1] == built_for, f"oracle and generator disagree on {frame.hex()}"
        else:
            frame = mutate(rng, frame)
        src, target = stack_target(frame)
        verdict = xk.run(frame)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        key = "guarded" if target in GUARDED else "none" if target is None else "ANY" if target == ANY else "other"
        targets[key] = targets.get(key, 0) + 1
        allowed = src is not None and any(src in net for net in ALLOWED)
        if verdict == XDP_PASS and (target in GUARDED or target == ANY) and not allowed:
            violations.append((i, frame, target))
    return violations, verdicts, targets


def test_no_malformed_frame_reaches_a_guarded_port(xk):
    seed = int(os.environ.get("XK_FUZZ_SEED", random.randrange(2**32)))
    print(f"fuzz seed {seed} ({FRAMES} frames): rerun with XK_FUZZ_SEED={seed}")
    started = time.monotonic()
    violations, verdicts, targets = fuzz(xk, seed, FRAMES)
    counters = xk.counters()
    print(f"{time.monotonic() - started:.1f} s; verdicts {verdicts}; targets {targets}; reasons "
          f"{ {r.name: n for r, n in counters.items() if n and r < VERDICT_REASONS} }")
    assert not violations, f"seed {seed}: {len(violations)} frames passed to a guarded port:\n" + "\n".join(
        _explain(xk, i, frame, target) for i, frame, target in violations[:10])
    assert set(verdicts) <= {XDP_PASS, XDP_DROP}, verdicts
    assert sum(n for r, n in counters.items() if r < VERDICT_REASONS) == FRAMES
    assert counters[Reason.GRANT_ISSUED] == 0   # else a PASS could be a grant's doing
    # not vacuous: frames aimed at guarded ports, and frames that pass
    assert targets.get("guarded", 0) > FRAMES // 5
    assert verdicts.get(XDP_PASS, 0) > FRAMES // 50


def _explain(xk, index, frame, target):
    before = xk.counters()
    xk.run(frame)
    after = xk.counters()
    reasons = [r.name for r in Reason if r < VERDICT_REASONS and after[r] > before[r]]
    return f"  #{index} target {target}, counted {reasons}: {Ether(frame).summary()}\n    {frame.hex()}"


def test_fuzzing_catches_a_filter_that_fails_open(xk, example_config):
    """The same run against the policy in monitor mode, which passes
    everything: the property must fail, or it checks nothing."""
    import dataclasses

    xk.apply(dataclasses.replace(example_config, mode="monitor"))
    violations, _, targets = fuzz(xk, seed=1, frames=2000)
    assert len(violations) == targets["guarded"] + targets["ANY"]


# -- the fixed-offset parse (bpf/xknock_parsing.h parse_common) ---------------------------

PARSE_FRAMES = int(os.environ.get("XK_FUZZ_FRAMES", "20000"))


@pytest.fixture(scope="module")
def walk_only():
    """The program built without parse_common: every frame takes the walk."""
    from xknock_dev.testrun import Harness

    with Harness(cflags=["-DXK_NO_FAST_PARSE"]) as h:
        yield h


def common_shape(frame):
    """Is the frame one parse_common takes (untagged; IPv4 ihl 5 unfragmented, or
    IPv6 with TCP or UDP next; the whole header there)?"""
    if len(frame) < 14:
        return False
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == ETH_P_IP and len(frame) >= 34:
        proto, l4 = frame[23], 34
        if frame[14] != 0x45 or _u16(frame, 20) & 0x3FFF or _u16(frame, 16) < 20:
            return False
        room = _u16(frame, 16) - 20
    elif ethertype == ETH_P_IPV6 and len(frame) >= 54 and frame[14] >> 4 == 6:
        proto, l4, room = frame[20], 54, _u16(frame, 18)
    else:
        return False
    size = {6: 20, 17: 8}.get(proto)
    return size is not None and len(frame) >= l4 + size and room >= size


def test_the_fixed_offset_parse_fills_the_packet_as_the_walk_does(xk, walk_only, example_config):
    """Fuzzed frames, valid and mutated, through the production parse and a
    build with the header walk alone, in step (same policy, same clock, same
    order): the parsed packet each leaves in its scratch map, byte for byte,
    and the verdicts are the same."""
    walk_only.reset_state()
    walk_only.set_clock(xk.now_ns)
    walk_only.apply(example_config)
    seed = int(os.environ.get("XK_FUZZ_SEED", random.randrange(2**32)))
    print(f"fuzz seed {seed} ({PARSE_FRAMES} frames): rerun with XK_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    os.sched_setaffinity(0, {cpu})   # both runs leave their packet in this CPU's slot
    shapes = 0
    try:
        for i in range(PARSE_FRAMES):
            frame, _ = build_frame(rng, targets=GUARDED | {("tcp", 80), ("udp", 53), ("tcp", 7000)})
            if rng.random() > VALID_SHARE:
                frame = mutate(rng, frame)
            shapes += common_shape(frame)
            verdicts = xk.run(frame), walk_only.run(frame)
            fast, walk = (bytes(h.loaded.bpf[b"scratch"][0][cpu]) for h in (xk, walk_only))
            assert fast == walk and verdicts[0] == verdicts[1], (
                f"seed {seed} frame #{i} {frame.hex()}:\n fast {fast.hex()}\n walk {walk.hex()}\n verdicts {verdicts}")
    finally:
        os.sched_setaffinity(0, cpus)
    assert xk.counters() == walk_only.counters()
    assert shapes > PARSE_FRAMES // 10   # not vacuous: the fast path ran on many of them


# -- answers (answer = "closed") ---------------------------------------------------------
#
# The same generator, aimed at the knock ports too and with right checksums
# (Linux answers nothing with a bad one, so neither may the program), from
# sources with and without a live grant and from addresses that must never
# be answered. Property: XDP_TX only for a frame the oracle sees aimed at a
# guarded or knock port, whose Ethernet source and destination are unicast,
# whose IP source is not zero, loopback, multicast, class E / broadcast or
# IPv4-mapped and whose destination is not multicast or broadcast; never for
# a granted source's packet to its port, a TCP RST or a fragment; and the
# answer goes back to the frame's source MAC and IP, as a RST for TCP and a
# port unreachable for UDP, with a right IPv4 header checksum.

KNOCKS = {("tcp", 7000), ("udp", 8000), ("tcp", 9000), ("tcp", 7001)}   # tests/conftest.py EXAMPLE_CONFIG
ANSWERED = GUARDED | KNOCKS
GRANTED4, GRANTED6 = "198.51.100.99", "2001:db8:77::99"
GRANTED_SOURCES = {ipaddress.ip_address(GRANTED4), ipaddress.ip_address(GRANTED6)}
BAD_SOURCES4 = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.1", "239.1.2.3", "240.0.0.1", "255.255.255.255"]
BAD_DESTS4 = ["224.0.0.1", "239.255.255.250", "255.255.255.255"]
BAD_SOURCES6 = ["::", "::1", "ff02::1", "::ffff:198.51.100.7"]
BAD_DESTS6 = ["ff02::1", "ff05::1:3"]
BAD_ETH = [bytes.fromhex("01005e000001020000000002"), bytes.fromhex("ffffffffffff020000000002"),
           bytes.fromhex("020000000001030000000002"), bytes.fromhex("333300000001020000000002")]
ANSWER_FRAMES = int(os.environ.get("XK_FUZZ_FRAMES", "100000"))   # mutated frames, at least
TCP_RST = 0x04
S = 1_000_000_000


def _packed(text):
    return ipaddress.ip_address(text).packed


def answer_addresses(rng):
    """Addresses for one frame: mostly a source without a grant or with one;
    a quarter of the time one address that must never draw an answer."""
    src4, src6 = rng.choice([(SRC4, SRC6), (SRC4, SRC6), (_packed(GRANTED4), _packed(GRANTED6))])
    dst4, dst6, eth = DST4, DST6, ETH_ADDRESSES
    if rng.random() < 0.25:
        which = rng.randrange(4)
        if which == 0:
            src4, src6 = _packed(rng.choice(BAD_SOURCES4)), _packed(rng.choice(BAD_SOURCES6))
        elif which == 1:
            dst4, dst6 = _packed(rng.choice(BAD_DESTS4)), _packed(rng.choice(BAD_DESTS6))
        else:
            eth = rng.choice(BAD_ETH)
    return src4, dst4, src6, dst6, eth


def ip_view(frame):
    """(l3, src, dst, fragment, l4, proto) of an IP frame as far as it goes
    (any number of VLAN tags, IPv6 extension headers walked), or None."""
    ethertype, l3 = _u16(frame, 12), 14
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        if len(frame) < l3 + 4:
            return None
        ethertype, l3 = _u16(frame, l3 + 2), l3 + 4
    if ethertype == ETH_P_IP and len(frame) >= l3 + 20:
        frag = _u16(frame, l3 + 6)
        return (l3, ipaddress.IPv4Address(frame[l3 + 12:l3 + 16]), ipaddress.IPv4Address(frame[l3 + 16:l3 + 20]),
                bool(frag & 0x3FFF & ~0x4000), l3 + (frame[l3] & 0xF) * 4, frame[l3 + 9])
    if ethertype == ETH_P_IPV6 and len(frame) >= l3 + 40:
        fragment, nexthdr, pos = False, frame[l3 + 6], l3 + 40
        while nexthdr in EXT_HEADERS and len(frame) >= pos + 8:
            if nexthdr == FRAGMENT:
                fragment |= bool(_u16(frame, pos + 2) & 0xFFF9)   # an offset, or more to come
                size = 8
            else:
                size = (frame[pos + 1] + 2) * 4 if nexthdr == AH else (frame[pos + 1] + 1) * 8
            nexthdr, pos = frame[pos], pos + size
        return (l3, ipaddress.IPv6Address(frame[l3 + 8:l3 + 24]), ipaddress.IPv6Address(frame[l3 + 24:l3 + 40]),
                fragment, pos, nexthdr)
    return None


def first_fragment_header_undone(frame):
    """An IPv6 fragment header that says "first fragment, more to come"
    followed by one that says "offset 0, no more": the program forgets the
    first (bpf/xknock_parsing.h sets first_frag at every fragment header) and
    answers a fragment. A kernel-program bug, reported, not fixed here:
    test_a_second_fragment_header_hides_a_first_fragment reproduces it."""
    ethertype, l3 = _u16(frame, 12), 14
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD) and len(frame) >= l3 + 4:
        ethertype, l3 = _u16(frame, l3 + 2), l3 + 4
    if ethertype != ETH_P_IPV6 or len(frame) < l3 + 40:
        return False
    first, nexthdr, pos = False, frame[l3 + 6], l3 + 40
    while nexthdr in EXT_HEADERS and len(frame) >= pos + 8:
        if nexthdr == FRAGMENT:
            off = _u16(frame, pos + 2)
            if off >> 3:
                return False
            if first and not off & 1:
                return True
            first |= bool(off & 1)
            size = 8
        else:
            size = (frame[pos + 1] + 2) * 4 if nexthdr == AH else (frame[pos + 1] + 1) * 8
        nexthdr, pos = frame[pos], pos + size
    return False


def never_answered_source(ip):
    if ip.version == 4:
        return ip.packed[0] in (0, 127) or ip.packed[0] >= 224   # zero, loopback, multicast, class E, broadcast
    return ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.ipv4_mapped is not None


def never_answered_destination(ip):
    if ip.version == 4:
        return ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255")
    return ip.is_multicast


UNKNOWN_PROTOCOLS = {50, 51, 33, 132}   # what this kernel lacks (policy/protocols.py asks it)
UDPLITE = 136                            # refused on every port, answered as an unused UDP-Lite port


def answer_problems(frame, verdict, out, granted):
    """What is wrong with this verdict on this frame (answer = "closed"): a
    list of (kind, text), empty when nothing is. granted: the sources the
    property takes to hold a live grant for every guarded port."""
    src, target = stack_target(frame)
    problems = []
    if verdict == XDP_PASS and (target in GUARDED or target == ANY) and src not in granted and not (
            src is not None and any(src in net for net in ALLOWED)):
        problems.append(("passed", f"passed to {target}"))
    if verdict not in (XDP_PASS, XDP_DROP, XDP_TX):
        problems.append(("verdict", f"verdict {verdict}"))
    if verdict != XDP_TX:
        return problems
    view = ip_view(frame)
    # ESP, AH, DCCP, SCTP named by the IP header: this kernel lacks them, so
    # a refusal is answered as a protocol it lacks, whatever they carry
    named = frame[view[0] + (9 if view[1].version == 4 else 6)] if view is not None else None
    as_unknown = named in UNKNOWN_PROTOCOLS
    # UDP-Lite, which this kernel has: refused on every port, answered as an unused port
    as_udplite = named == UDPLITE
    if target not in ANSWERED and not as_unknown and not as_udplite:
        problems.append(("target", f"answered a frame aimed at {target}"))
    if frame[0] & 1 or frame[6] & 1:
        problems.append(("mac", "answered a frame from or to a MAC address that is not unicast"))
    if view is None:
        problems.append(("not ip", "answered a frame that is not IP"))
        return problems
    l3, s, d, fragment, l4, proto = view
    if never_answered_source(s):
        problems.append(("source", f"answered a frame from {s}"))
    if never_answered_destination(d):
        problems.append(("destination", f"answered a frame to {d}"))
    if s in granted and target in GUARDED and not as_unknown and not as_udplite:   # IPsec is refused to grants too ([filter] ipsec)
        problems.append(("granted", f"answered {s}, which holds a live grant for {target}"))
    # IPv6 whose fixed header names a protocol this kernel lacks: the kernel
    # answers before it would read a fragment header behind it (IPv4's
    # fragments are reassembled first, so they still count)
    if fragment and not (as_unknown and s.version == 6):   # UDP-Lite: reassembled first, as UDP
        if first_fragment_header_undone(frame):
            problems.append(("fragment", "answered a first fragment whose later fragment header says "
                             "offset 0, no more"))
        else:
            problems.append(("fragment", "answered a fragment"))
    if proto == 6 and len(frame) > l4 + 13 and frame[l4 + 13] & TCP_RST and not as_unknown:
        problems.append(("rst", "answered a TCP RST"))
    back = ip_view(out)
    if out[0:6] != frame[6:12] or out[6:12] != frame[0:6]:
        problems.append(("returned", "the answer does not go back to the frame's source MAC"))
    elif back is None or back[1] != d or back[2] != s:
        problems.append(("returned", "the answer does not go back to the frame's source address"))
    else:
        out_proto, at = back[5], back[4]
        if as_unknown:
            if (out_proto, out[at:at + 2]) not in ((1, b"\x03\x02"), (58, b"\x04\x01")):
                problems.append(("kind", "a protocol this kernel lacks answered with something other than "
                                         "a protocol unreachable"))
        elif as_udplite:
            if (out_proto, out[at:at + 2]) not in ((1, b"\x03\x03"), (58, b"\x01\x04")):
                problems.append(("kind", "UDP-Lite answered with something other than a port unreachable"))
        elif target in ANSWERED and target[0] == "tcp":
            if out_proto != 6 or not out[at + 13] & TCP_RST:
                problems.append(("kind", "a TCP segment answered with something other than a RST"))
        elif (out_proto, out[at:at + 2]) not in ((1, b"\x03\x03"), (58, b"\x01\x04")):
            problems.append(("kind", "a datagram answered with something other than a port unreachable"))
        if back[1].version == 4 and _csum(out[back[0]:at]) != 0xFFFF:
            problems.append(("checksum", "the answer's IPv4 header checksum is wrong"))
    return problems


def fuzz_answers(run, seed, mutated_frames, granted=GRANTED_SOURCES, tick=None):
    """Frames until mutated_frames of them were mutated, each through
    run(frame) -> (verdict, frame out); tick() before each (the clock).
    Returns (problems [(kind, index, frame, text)], verdict counts, frames)."""
    rng = random.Random(seed)
    problems, verdicts, mutated, i = [], {}, 0, 0
    while mutated < mutated_frames:
        frame, built_for = build_frame(rng, ANSWERED, answer_addresses(rng), checksums=True)
        if rng.random() < VALID_SHARE:
            assert stack_target(frame)[1] == built_for, f"oracle and generator disagree on {frame.hex()}"
        else:
            frame = mutate(rng, frame)
            mutated += 1
        if tick:
            tick()
        verdict, out = run(frame)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        for kind, text in answer_problems(frame, verdict, out, granted):
            problems.append((kind, i, frame, text))
        i += 1
    return problems, verdicts, i


def _closed(xk, example_config):
    """The example policy answering (answer = "closed"), every guarded port
    granted to GRANTED4 and GRANTED6 for longer than any run."""
    import dataclasses

    from xknock.controller.state import grants

    xk.apply(dataclasses.replace(example_config, answer="closed"))
    for source in (GRANTED4, GRANTED6):
        grants.grant(xk.maps, source, None, for_ns=10**16, now=xk.now_ns)


def _kernel(xk):
    from xknock.controller.kernel import bpfsys

    def run(frame):
        verdict, _, out = bpfsys.test_run(xk.fd, frame)
        return verdict, out
    return run


def _tick(xk, config):
    """The clock moves past the longest step timeout between frames: no
    knock of the fuzzed frames follows another in time, so no sequence
    completes and the only grants are GRANTED4's and GRANTED6's; and every
    source's ICMP error bucket (one a second) has refilled."""
    step = max(seq.step_timeout_ns for seq in config.sequences) + S
    return lambda: xk.set_clock(xk.now_ns + step)


def test_no_frame_draws_an_answer_it_should_not(xk, example_config):
    seed = int(os.environ.get("XK_FUZZ_SEED", random.randrange(2**32)))
    print(f"answer fuzz seed {seed} ({ANSWER_FRAMES} mutated frames): rerun with XK_FUZZ_SEED={seed}")
    _closed(xk, example_config)
    started = time.monotonic()
    problems, verdicts, frames = fuzz_answers(_kernel(xk), seed, ANSWER_FRAMES, tick=_tick(xk, example_config))
    counters = xk.counters()
    answers = {r.name: counters[r] for r in (Reason.ANSWER_RST, Reason.ANSWER_UNREACH, Reason.ANSWER_RATE_LIMITED,
                                             Reason.ANSWER_NONE)}
    print(f"{time.monotonic() - started:.1f} s, {frames} frames; verdicts {verdicts}; {answers}")
    assert not problems, f"seed {seed}: {len(problems)} wrong verdicts:\n" + "\n".join(
        f"  #{i} {text}: {Ether(frame).summary()}\n    {frame.hex()}" for _, i, frame, text in problems[:10])
    assert sum(n for r, n in counters.items() if r < VERDICT_REASONS) == frames
    # not vacuous: both kinds of answer, refusals answered and not, grants used
    assert counters[Reason.ANSWER_RST] > frames // 50 and counters[Reason.ANSWER_UNREACH] > frames // 100
    assert counters[Reason.ANSWER_NONE] > frames // 50
    assert counters[Reason.PASS_GRANT] > frames // 100


def test_answer_property_catches_wrong_answers(xk, example_config):
    """The property can fail, each of its checks: a filter that answers every
    frame by swapping its MAC addresses breaks all of them; the real program
    breaks the grant check when the property believes in grants the maps do
    not hold."""
    def reflector(frame):
        return XDP_TX, frame[6:12] + frame[0:6] + frame[12:]

    problems, _, _ = fuzz_answers(reflector, seed=1, mutated_frames=3000)
    kinds = {kind for kind, *_ in problems}
    assert kinds >= {"target", "mac", "source", "destination", "granted", "fragment", "rst", "returned"}, kinds

    def wrong_kind(frame):   # an ICMP error for TCP, a RST for UDP: right addresses, wrong answer
        verdict, out = _kernel(xk)(frame)
        if verdict == XDP_TX:
            view = ip_view(out)
            out = bytearray(out)
            out[view[4] + 13 if view[5] == 6 else view[4]] ^= 0x04 if view[5] == 6 else 0x01
            if view[1].version == 4:
                out[view[0] + 10] ^= 0x01   # and a wrong IPv4 header checksum
        return verdict, bytes(out)

    _closed(xk, example_config)
    problems, _, _ = fuzz_answers(wrong_kind, seed=2, mutated_frames=3000, tick=_tick(xk, example_config))
    assert {"kind", "checksum"} <= {kind for kind, *_ in problems}

    xk.reset_state()
    xk.apply(dataclasses_replace_answer(example_config))   # answers, but no grants
    problems, _, _ = fuzz_answers(_kernel(xk), seed=3, mutated_frames=3000, tick=_tick(xk, example_config))
    assert {kind for kind, *_ in problems} == {"granted"}


def _fragment_frame(*fragment_headers):
    """A SYN to tcp:22 behind these IPv6 fragment headers ((offset, M), ...),
    with 4 bytes of data so that the fragmentable part is a multiple of 8
    bytes with one or two headers (Linux then queues a first fragment
    silently, where it answers a ragged one with a parameter problem)."""
    from xknock_dev.packets import IPv6, IPv6ExtHdrFragment, Raw, TCP, ether, raw

    frame = ether() / IPv6(src=str(ipaddress.ip_address(SRC6)), dst=str(ipaddress.ip_address(DST6)))
    for i, (offset, more) in enumerate(fragment_headers):
        frame = frame / IPv6ExtHdrFragment(offset=offset, m=more, id=7,
                                           nh=44 if i + 1 < len(fragment_headers) else 6)
    return raw(frame / TCP(sport=40000, dport=22, flags="S") / Raw(b"abcd"))


def test_a_first_fragment_is_not_answered(xk, example_config):
    """The check the next test fails: a first fragment (more to come) of a
    SYN to a guarded port is dropped unanswered; Linux waits for the rest."""
    _closed(xk, example_config)
    frame = _fragment_frame((0, 1))
    assert xk.run(frame) == XDP_DROP
    assert answer_problems(frame, *_kernel(xk)(frame), GRANTED_SOURCES) == []


def test_a_second_fragment_header_hides_a_first_fragment(xk, example_config):
    """Found by test_no_frame_draws_an_answer_it_should_not. IPv6, fragment
    header (offset 0, M=1), fragment header (offset 0, M=0), TCP SYN to
    tcp:22 with 4 bytes of data and a right checksum: Linux queues it for
    reassembly on the first fragment header and sends nothing (seen with
    tests/helpers/kernel_replies.py on this kernel); the program sends a RST."""
    _closed(xk, example_config)
    frame = _fragment_frame((0, 1), (0, 0))
    verdict, out = _kernel(xk)(frame)
    assert verdict == XDP_DROP, f"{len(out)}-byte answer: {Ether(out).summary()}"


def dataclasses_replace_answer(config):
    import dataclasses

    return dataclasses.replace(config, answer="closed")
