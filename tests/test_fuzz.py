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
verdict reason."""

import ipaddress
import os
import random
import struct
import time

from xknock_dev.packets import Ether

from xknock.controller.kernel.layout import VERDICT_REASONS, Reason
from xknock_dev.testrun import XDP_DROP, XDP_PASS

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

def build_frame(rng):
    """(frame, the target it is built for)."""
    proto, dport = rng.choice(sorted(GUARDED))
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
        header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), rng.getrandbits(16), frag, 64,
                             number, 0, SRC4, DST4) + options
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
        payload = chain + l4
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(payload), first, 64, SRC6, DST6) + payload

    eth = bytes.fromhex("020000000001020000000002")
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        eth += struct.pack("!HH", rng.choice([ETH_P_8021Q, ETH_P_8021AD]), rng.randrange(4096))
    frame = eth + struct.pack("!H", ethertype) + ip
    return frame, (None if later_fragment else (proto, dport))


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
