"""A pure-Python reference model of the data path's knock state machine,
verdicts and answers, for differential tests against the real program.

It works on packets as plain tuples: Pkt(src, proto, port, tcp_flags, ...),
proto one of "tcp", "udp", "icmp" (an echo request, port 0); frame_of(pkt)
makes the frame (scapy) that both the kernel and the model's answers start
from. It takes a controller Config (xknock_dev/example.py shows one) and keeps
what the maps keep: progress per (source, sequence), grants per (source,
proto, port), strict mode's slots, failures and bans, the ICMP error buckets.
Written from the rules, not translated line by line from the C:

Knocks. Progress per (source, sequence) is (next_step, last_step_time). A
packet to a knock port is dropped (an ICMP echo passes: the host answers the
ping); for each sequence that has the port as one or more of its steps, in
the order the sequences are configured:
  * progress with next_step > 0 has timed out when now - last > step_timeout,
    strictly. The C keeps last in microseconds (the packed progress word), so
    the comparison is now_us - last_us > timeout_us, each value divided by 1000
    with truncation; modelled exactly, which makes the boundary differ from a
    nanosecond one by up to 1 us;
  * strict mode: progress not timed out with 0 < next_step < nsteps is struck
    when the source's touch time (read before this packet) is > last_us;
    a reset (KNOCK_RESET, KNOCK_STRICT_RESET, per-sequence reset) that never
    counts towards a ban; the knock is then judged with nothing in progress;
  * the port is step next_step: advance (time refreshed);
  * else it is step next_step - 1: a repeat (a retransmitted SYN), ignored,
    time not refreshed; except the first step of a multi-step sequence
    (next_step == 1), whose repeat starts it anew: its time is refreshed
    (still counted as a repeat);
  * else a wrong knock: progress is lost, and if the port is step 0 the
    sequence restarts at 1.
  Completion (next_step reaches the number of steps) writes one grant for every
  port the sequence opens, replacing any grant there (GRANT_ISSUED for each,
  GRANT_CREATED for those that were not there); completed progress stays
  until it times out, so that a repeat of the last knock is ignored. A TCP
  packet is a knock only when it is a SYN without ACK (others count
  KNOCK_IGNORED and touch nothing). Outcomes are counted globally (KNOCK_*)
  and per sequence (advanced, completed, reset, timed_out); a knock that ends
  nothing and starts nothing counts KNOCK_IGNORED, including a wrong knock
  that erases a completed sequence's progress. A knock is "taken" when some
  sequence advanced, completed or repeated it.

Strict mode (config.strict, the default). A new connection is a TCP SYN
without ACK, any UDP datagram, an ICMP echo request. A source is knocking
while its last taken knock is at most knock_window_us old (the longest step
timeout, us). A new connection from a knocking source to a port that is not a
knock port (unguarded or guarded) records a touch at now_us. A knock-port
packet is judged against the touch read before it; afterwards, if some
sequence took it, the knock time becomes now_us, else, if the source is
knocking, the touch does. Both times live in `recent`, one slot per hash of
the source (recent_hash below, as bpf/xknock_strict.h computes it), each word
tag << 40 | us: two sources sharing a slot overwrite each other's words, so
collisions are modelled exactly. Lenient mode writes nothing there.

Bans ([ban]). A wrong knock (a reset) or a time-out is one failure of the
source: counted in a window of `within` from the first; at `after` failures
the source is banned for `for` (BAN_ISSUED, failures forgotten), unless it is
allow-listed (BAN_SPARED). A banned source is dropped (DROP_BANNED) on every
port (scope "all", checked right after the deny-list) or on knock and guarded
ports only (scope "knock", after strict mode's touch); a ban found over is
removed (BAN_EXPIRED). The bans map holds ban_entries sources (ended bans
too, until their source comes back or a sweep); nothing evicts one: a ban that
finds it full is refused (BAN_FAILED) and the failures are kept, so the
source's next failure within the window tries again.

Guarded ports. A source on the allow-list passes. Otherwise the grant decides:
a SYN without ACK needs now < window_end; anything else passes while
now < window_end or now < last_seen + idle_timeout. Passing refreshes last_seen
when now > last_seen + 1 s. A grant dead on both clocks is deleted when a
packet finds it.

Order. The deny-list first (whatever the port), then bans, then the port:
unguarded passes, guarded as above, knock ports drop. In monitor mode the
state changes alike, but nothing is dropped or answered.

Answers (answer = "closed", the default). A packet refused on a knock port
(DROP_KNOCK, or DROP_BANNED of scope "knock" there) that Linux would answer
is passed for the host's stack to answer (ANSWER_BY_HOST: nothing listens on
a knock port in these tests). One refused on a guarded port (DROP_NO_GRANT,
DROP_BANNED of scope "knock") gets XDP_TX with the frame an unused port would draw (expected_answer below:
Linux's tcp_v4_send_reset / icmp_send rules), or is dropped where Linux sends
nothing (ANSWER_NONE); port unreachables within the ICMP token buckets (the
host's checked, then the peer's taken, then the host's spent; a new peer starts
full less one), else ANSWER_RATE_LIMITED. Deny-listed and banned-everywhere
packets drop silently.

IPv4 sources are keyed as IPv4 addresses (the maps store them IPv4-mapped);
an allow- or deny-list network matches sources of its own address family.
"""

import collections
import dataclasses
import ipaddress
import struct
from typing import NamedTuple

from xknock.controller.kernel.layout import Reason

XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10
GRANT_REFRESH_NS = 1_000_000_000

SERVER4 = "10.77.0.1"          # tests/packets.py
SERVER6 = "fd00:77::1"
SERVER_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:02"

MASK32 = 0xFFFFFFFF
RECENT_TIME_MASK = (1 << 40) - 1
ICMP_QUOTE, ICMP6_QUOTE = 548, 1232
ANSWER_MAX_L4 = 2048

# Deliberately wrong rules, to show that a differential test notices them.
MUTATIONS = {
    "repeat_is_wrong": "a repeat of the step just taken counts as a wrong knock",
    "timeout_inclusive": "progress times out at now - last >= step_timeout",
    "timeout_ns": "the step timeout is compared in nanoseconds, not truncated microseconds",
    "refresh_every_packet": "every passing packet refreshes last_seen",
    "syn_on_idle_clock": "a SYN may open a connection on the idle clock too",
    "first_repeat_keeps_time": "a repeated first step keeps the time of the first copy",
    "strict_guarded_quiet": "in strict mode, new connections to guarded ports do not count as intervening",
    "strict_inclusive": "in strict mode, a touch in the same microsecond as the last step resets too",
    "strict_synack_opens": "in strict mode, a SYN+ACK counts as a new connection",
    "strict_untaken_knock_quiet": "in strict mode, a knock no sequence takes does not intervene",
    "strict_resets_ban": "strict resets count towards bans",
    "bans_unbounded": "the bans map never fills: no ban is refused",
    "rst_ack_off_by_one": "the RST|ACK answer acknowledges one byte too many",
    "icmp_peer_starts_full": "a new ICMP peer bucket starts full, not full less this error",
    "icmp_no_host_bucket": "ICMP errors are limited per destination only, not for the host",
}


class Pkt(NamedTuple):
    src: str
    proto: str          # "tcp" | "udp" | "icmp"
    port: int           # 0 for icmp
    tcp_flags: int = 0
    seq: int = 0        # TCP sequence and acknowledgment numbers
    ack: int = 0
    payload: bytes = b""
    tos: int = 0        # IPv4 TOS or IPv6 traffic class
    vlans: tuple = ()   # 802.1Q TCIs (priority, DEI, id), outer first; the outer of two is 802.1ad
    sport: int = 40000
    damage: str = ""    # "" or one of DAMAGES: what frame_of spoils in the frame


# Ways a frame can be spoilt that change nothing but the answer (Linux
# answers none of them; the program judges knocks and grants alike).
DAMAGES = {
    "l4_checksum": "the TCP / UDP / ICMP checksum off by one",
    "ip_checksum": "the IPv4 header checksum off by one (IPv6 has none: no change)",
    "no_udp_checksum": "the UDP (or TCP) checksum 0: no checksum for IPv4 UDP, wrong otherwise",
    "broadcast": "sent to the Ethernet broadcast address",
}


def frame_of(pkt):
    """The frame of a packet, built with scapy: from CLIENT_MAC to SERVER_MAC,
    to SERVER4 or SERVER6."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw, raw

    frame = Ether(src=CLIENT_MAC, dst=SERVER_MAC)
    for i, tci in enumerate(pkt.vlans):
        tag = Dot1AD if i == 0 and len(pkt.vlans) > 1 else Dot1Q
        frame = frame / tag(prio=tci >> 13, id=(tci >> 12) & 1, vlan=tci & 0xFFF)
    v6 = ":" in pkt.src
    frame = frame / (IPv6(src=pkt.src, dst=SERVER6, tc=pkt.tos) if v6 else IP(src=pkt.src, dst=SERVER4, tos=pkt.tos))
    if pkt.proto == "icmp":
        frame = frame / (ICMPv6EchoRequest() if v6 else ICMP(type=8))
    elif pkt.proto == "tcp":
        frame = frame / TCP(sport=pkt.sport, dport=pkt.port, flags=pkt.tcp_flags, seq=pkt.seq, ack=pkt.ack)
    else:
        frame = frame / UDP(sport=pkt.sport, dport=pkt.port)
    if pkt.payload and pkt.proto != "icmp":
        frame = frame / Raw(pkt.payload)
    return _damaged(bytearray(raw(frame)), pkt)


def _damaged(data, pkt):
    l3 = 14 + 4 * len(pkt.vlans)
    l4 = l3 + (40 if ":" in pkt.src else 20)
    check = l4 + {"tcp": 16, "udp": 6, "icmp": 2}[pkt.proto]
    if pkt.damage == "l4_checksum":
        data[check + 1] ^= 1
    elif pkt.damage == "ip_checksum":
        if ":" not in pkt.src:
            data[l3 + 11] ^= 1
    elif pkt.damage == "no_udp_checksum":
        data[check:check + 2] = b"\0\0"
    elif pkt.damage == "broadcast":
        data[0:6] = b"\xff" * 6
    elif pkt.damage:
        raise ValueError(f"unknown damage {pkt.damage!r}")
    return bytes(data)


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    """What the answers take from the bank's settings (layout.Settings):
    the host's TTL, hop limit and ICMP rate limits."""

    ttl: int = 64
    hop_limit: int = 64
    icmp_peer_cost_ns: int = 1_000_000_000
    icmp_peer_burst_ns: int = 6_000_000_000
    icmp6_peer_cost_ns: int = 250_000_000
    icmp6_peer_burst_ns: int = 1_500_000_000
    icmp_host_cost_ns: int = 1_000_000
    icmp_host_burst_ns: int = 50_000_000

    @classmethod
    def from_settings(cls, s):
        return cls(**{field.name: getattr(s, field.name) for field in dataclasses.fields(cls)})


@dataclasses.dataclass
class Grant:
    window_end_ns: int
    idle_timeout_ns: int
    last_seen_ns: int
    seq: int            # index of the sequence that wrote it


@dataclasses.dataclass(frozen=True)
class _Seq:
    steps: tuple        # ((proto, port), ...)
    step_timeout_ns: int
    opens: tuple        # ((proto, port), ...)
    open_for_ns: int
    idle_timeout_ns: int


def source_key(src):
    """The address a source is known by: IPv4-mapped IPv6 folds into IPv4."""
    ip = ipaddress.ip_address(src)
    return getattr(ip, "ipv4_mapped", None) or ip


def addr16(src):
    """The 16 bytes the maps key a source by (IPv4 mapped)."""
    ip = source_key(src)
    return b"\0" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed


def _mix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    h ^= h >> 16
    return h


def recent_hash(src):
    """bpf/xknock_strict.h recent_hash: the address as four native (little
    endian) 32-bit words."""
    w = struct.unpack("<4I", addr16(src))
    return _mix32((((w[0] ^ w[1] ^ w[2]) * 0x9E3779B1) & MASK32) ^ w[3])


def recent_place(src, slots):
    """(slot, tag) of a source in `recent`."""
    h = recent_hash(src)
    return h & (slots - 1), (_mix32((h + 0x27D4EB2F) & MASK32) >> 8) | 1


class Model:
    def __init__(self, config, now_ns, mutations=(), answers=None, recent_slots=1 << 12, ban_entries=None):
        unknown = set(mutations) - set(MUTATIONS)
        if unknown:
            raise ValueError(f"unknown mutations {sorted(unknown)}; known: {sorted(MUTATIONS)}")
        self.mutations = frozenset(mutations)
        self.now_ns = now_ns
        self.monitor = config.mode == "monitor"
        self.strict = config.strict
        self.answer_closed = config.answer == "closed"
        self.answers = answers or AnswerSettings()
        self.ban = config.ban
        self.recent_slots = recent_slots
        self.knock_window_us = max((seq.step_timeout_ns // 1000 for seq in config.sequences), default=0)
        self.recent = {}     # slot -> [knock word, touch word] (strict mode)
        self.allow = tuple(config.allow)
        self.deny = tuple(config.deny)
        self.seqs = [
            _Seq(
                steps=tuple((s.proto, s.port) for s in seq.knock),
                step_timeout_ns=seq.step_timeout_ns,
                opens=tuple((s.proto, s.port) for s in seq.open),
                open_for_ns=seq.open_for_ns,
                idle_timeout_ns=seq.idle_timeout_ns,
            )
            for seq in config.sequences
        ]
        self.guarded = {port for seq in self.seqs for port in seq.opens}
        # (proto, port) -> [(sequence index, step mask)], sequences in config order
        self.knock_ports = collections.defaultdict(list)
        for index, seq in enumerate(self.seqs):
            for port in dict.fromkeys(seq.steps):
                mask = sum(1 << i for i, step in enumerate(seq.steps) if step == port)
                self.knock_ports[port].append((index, mask))
        self.progress = {}   # (source key, sequence index) -> (next_step, last_us)
        self._last_ns = {}   # the same, unrounded
        self.grants = {}     # (source key, proto, port) -> Grant
        self.failures = {}   # source key -> [window_start_ns, count]
        self.bans = {}       # source key -> until_ns
        self.ban_entries = ban_entries   # the bans map's capacity; None: unbounded
        self.icmp_host = [0, 0]   # [last_ns, credit_ns]: the array starts zeroed
        self.icmp_peers = {}      # source key -> [last_ns, credit_ns]
        self.counters = collections.Counter()
        # sequence index -> Counter of "advanced", "completed", "reset", "timed_out"
        self.seq_stats = collections.defaultdict(collections.Counter)
        self.answer = None   # the frame of the last XDP_TX

    # -- time ---------------------------------------------------------------

    def advance_to(self, now_ns):
        if now_ns < self.now_ns:
            raise ValueError("the model's clock only moves forward")
        self.now_ns = now_ns

    def deadlines(self):
        """Instants where some rule changes its answer: step timeouts, grant
        windows, idle ends and refresh points, the knocking window, ban ends,
        ICMP buckets' refills, sorted."""
        found = set()
        for (_, index), (next_step, last_us) in self.progress.items():
            if next_step > 0:
                found.add(last_us * 1000 + self.seqs[index].step_timeout_ns)
        for grant in self.grants.values():
            found.add(grant.window_end_ns)
            found.add(grant.last_seen_ns + grant.idle_timeout_ns)
            found.add(grant.last_seen_ns + GRANT_REFRESH_NS)
        for words in self.recent.values():
            for word in words:
                if word:
                    found.add((word & RECENT_TIME_MASK) * 1000 + self.knock_window_us * 1000)
        for until in self.bans.values():
            found.add(until)
        if self.ban:
            for start, _ in self.failures.values():
                found.add(start + self.ban.within_ns)
        for src, (last, credit) in self.icmp_peers.items():
            cost = self.answers.icmp_peer_cost_ns if src.version == 4 else self.answers.icmp6_peer_cost_ns
            if credit < cost:
                found.add(last + cost - credit)
        return sorted(found)

    # -- packets ------------------------------------------------------------

    def run(self, pkt):
        """The XDP verdict for one packet, updating state and counters; after
        XDP_TX, self.answer holds the frame sent back."""
        self.answer = None
        self._answerable = False
        reason = self._decide(pkt)
        self.counters[reason] += 1
        if not Reason.DROP_DENYLIST <= reason <= Reason.DROP_SPA:
            return XDP_PASS
        if self.monitor:
            self.counters[Reason.MONITOR_PASSED] += 1
            return XDP_PASS
        if self.answer_closed and self._answerable:
            return self._answer(pkt)
        return XDP_DROP

    def _decide(self, pkt):
        src = source_key(pkt.src)
        if _listed(self.deny, src):
            return Reason.DROP_DENYLIST
        banned = self.ban is not None and self._banned(src)
        if banned and self.ban.scope == "all":
            return Reason.DROP_BANNED
        port = (pkt.proto, pkt.port)
        guarded, knock = port in self.guarded, port in self.knock_ports
        if self.strict and self._opens_connection(pkt) and not (knock and not guarded):
            if not (guarded and "strict_guarded_quiet" in self.mutations):
                self._touch_if_knocking(src)
        if not guarded and not knock:
            return Reason.PASS_UNGUARDED
        # guarded ports are answered here; knock ports (nobody listens there
        # in the tests) by the host's own stack
        self._answerable = "here" if guarded else "host"
        if banned:
            return Reason.DROP_BANNED
        if guarded:
            return self._guarded(src, pkt)
        if pkt.proto == "tcp" and (not pkt.tcp_flags & TCP_SYN or pkt.tcp_flags & TCP_ACK):
            self.counters[Reason.KNOCK_IGNORED] += 1   # TCP knocks are SYNs only; they touch nothing
            return Reason.DROP_KNOCK
        touched_us = self._last_touch_us(src) if self.strict else 0
        took = False
        for index, mask in self.knock_ports[port]:
            took |= self._knock(src, index, mask, touched_us)
        if self.strict:
            if took:
                self._mark_knocking(src)
            elif "strict_untaken_knock_quiet" not in self.mutations:
                self._touch_if_knocking(src)
        return Reason.PASS_ECHO if pkt.proto == "icmp" else Reason.DROP_KNOCK

    def _opens_connection(self, pkt):
        if pkt.proto == "tcp":
            if "strict_synack_opens" in self.mutations:
                return bool(pkt.tcp_flags & TCP_SYN)
            return pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        return True

    # -- strict mode's slots ----------------------------------------------------

    def _slot(self, src):
        slot, tag = recent_place(src, self.recent_slots)
        return self.recent.setdefault(slot, [0, 0]), tag

    def _age(self, word, tag):
        """How long ago this source's word was written, us, or None (another
        source's, or older than the knocking window)."""
        if word >> 40 != tag:
            return None
        age = (self.now_ns // 1000 - word) & RECENT_TIME_MASK
        return age if age <= self.knock_window_us else None

    def _word(self, tag):
        return (tag << 40) | ((self.now_ns // 1000) & RECENT_TIME_MASK)

    def _touch_if_knocking(self, src):
        words, tag = self._slot(src)
        if self._age(words[0], tag) is not None:
            words[1] = self._word(tag)

    def _mark_knocking(self, src):
        words, tag = self._slot(src)
        words[0] = self._word(tag)

    def _last_touch_us(self, src):
        words, tag = self._slot(src)
        age = self._age(words[1], tag)
        now_us = self.now_ns // 1000
        return 0 if age is None or age >= now_us else now_us - age

    # -- bans ---------------------------------------------------------------------

    def _banned(self, src):
        until = self.bans.get(src)
        if until is None:
            return False
        if self.now_ns < until:
            return True
        del self.bans[src]
        self.counters[Reason.BAN_EXPIRED] += 1
        return False

    def _record_failure(self, src):
        ban = self.ban
        if ban is None or ban.after == 0:
            return
        seen = self.failures.get(src)
        if seen is None or self.now_ns - seen[0] > ban.within_ns:
            self.failures[src] = seen = [self.now_ns, 1]
        else:
            seen[1] += 1
        if seen[1] < ban.after:
            return
        if _listed(self.allow, src):
            self.counters[Reason.BAN_SPARED] += 1
            return
        if src in self.bans:
            return
        if (self.ban_entries is not None and len(self.bans) >= self.ban_entries
                and "bans_unbounded" not in self.mutations):
            self.counters[Reason.BAN_FAILED] += 1   # full: nobody is evicted, the failures stay
            return
        self.bans[src] = self.now_ns + ban.for_ns
        self.counters[Reason.BAN_ISSUED] += 1
        del self.failures[src]

    # -- guarded ports ------------------------------------------------------------

    def _guarded(self, src, pkt):
        if _listed(self.allow, src):
            return Reason.PASS_ALLOWLIST
        key = (src, pkt.proto, pkt.port)
        grant = self.grants.get(key)
        if grant is None:
            return Reason.DROP_NO_GRANT
        now = self.now_ns
        opens = pkt.proto == "tcp" and pkt.tcp_flags & TCP_SYN and not pkt.tcp_flags & TCP_ACK
        in_window = now < grant.window_end_ns
        idle_alive = now < grant.last_seen_ns + grant.idle_timeout_ns
        if "syn_on_idle_clock" in self.mutations:
            opens = False
        if in_window or (not opens and idle_alive):
            if now > grant.last_seen_ns + GRANT_REFRESH_NS or "refresh_every_packet" in self.mutations:
                grant.last_seen_ns = now
            return Reason.PASS_GRANT
        if not in_window and not idle_alive:
            del self.grants[key]
            self.counters[Reason.GRANT_EXPIRED] += 1
        return Reason.DROP_NO_GRANT

    # -- knocks -------------------------------------------------------------------

    def _timed_out(self, key, last_us):
        seq = self.seqs[key[1]]
        if "timeout_ns" in self.mutations:
            return self.now_ns - self._last_ns[key] > seq.step_timeout_ns
        elapsed_us = self.now_ns // 1000 - last_us
        timeout_us = seq.step_timeout_ns // 1000
        if "timeout_inclusive" in self.mutations:
            return elapsed_us >= timeout_us
        return elapsed_us > timeout_us

    def _struck(self, touched_us, last_us):
        if not touched_us:
            return False
        if "strict_inclusive" in self.mutations:
            return touched_us >= last_us
        return touched_us > last_us

    def _knock(self, src, index, mask, touched_us):
        """One knock against one sequence; whether the sequence took it."""
        seq = self.seqs[index]
        nsteps = len(seq.steps)
        key = (src, index)
        count = self.counters
        state = self.progress.get(key)
        next_step, last_us = state if state is not None else (0, 0)

        timed_out = struck = False
        if next_step > 0 and self._timed_out(key, last_us):
            timed_out = next_step < nsteps   # a completed sequence just ends quietly
            next_step = 0
        elif 0 < next_step < nsteps and self._struck(touched_us, last_us):
            struck = True                    # strict mode: a new connection elsewhere since the last step
            next_step = 0

        reset = False
        if next_step < nsteps and mask & (1 << next_step):
            new_step = next_step + 1
        elif next_step == nsteps and mask & 1:
            new_step = 1   # after completion a first step starts anew (renewal)
        elif next_step > 0 and mask & (1 << (next_step - 1)) and "repeat_is_wrong" not in self.mutations:
            count[Reason.KNOCK_REPEATED] += 1
            if next_step == 1 and nsteps > 1 and "first_repeat_keeps_time" not in self.mutations:
                self._set_progress(key, 1)   # a first step again takes its own time
            return True
        else:
            reset = 0 < next_step < nsteps
            new_step = 1 if mask & 1 else 0
            if new_step == 0 and next_step == 0 and not timed_out and not struck:
                count[Reason.KNOCK_IGNORED] += 1   # nothing in progress, not a first step
                return False

        self._set_progress(key, new_step)
        stats = self.seq_stats[index]
        if timed_out:
            count[Reason.KNOCK_TIMED_OUT] += 1
            stats["timed_out"] += 1
        if reset or struck:
            count[Reason.KNOCK_RESET] += 1
            stats["reset"] += 1
        if struck:
            count[Reason.KNOCK_STRICT_RESET] += 1
        if timed_out or reset or (struck and "strict_resets_ban" in self.mutations):
            self._record_failure(src)
        if new_step == nsteps:
            count[Reason.KNOCK_COMPLETED] += 1
            stats["completed"] += 1
            self._write_grants(src, index)
        elif new_step > 0:
            count[Reason.KNOCK_ADVANCED] += 1
            stats["advanced"] += 1
        elif not timed_out and not reset and not struck:
            count[Reason.KNOCK_IGNORED] += 1   # a wrong knock after completion: nothing to end
        return new_step > 0

    def _set_progress(self, key, step):
        self.progress[key] = (step, self.now_ns // 1000)
        self._last_ns[key] = self.now_ns   # for the timeout_ns mutation only

    def _write_grants(self, src, index):
        seq = self.seqs[index]
        for proto, port in seq.opens:
            if (src, proto, port) not in self.grants:
                self.counters[Reason.GRANT_CREATED] += 1
            self.grants[(src, proto, port)] = Grant(
                window_end_ns=self.now_ns + seq.open_for_ns,
                idle_timeout_ns=seq.idle_timeout_ns,
                last_seen_ns=self.now_ns,
                seq=index,
            )
            self.counters[Reason.GRANT_ISSUED] += 1

    # -- answers ------------------------------------------------------------------

    def _answer(self, pkt):
        frame = frame_of(pkt)
        asked = read_asked(frame)
        if asked is None:
            self.counters[Reason.ANSWER_NONE] += 1
            return XDP_DROP
        if self._answerable == "host":
            self.counters[Reason.ANSWER_BY_HOST] += 1
            return XDP_PASS
        if asked.proto == "tcp":
            self.answer = tcp_reset(frame, asked, self.answers, "rst_ack_off_by_one" in self.mutations)
            self.counters[Reason.ANSWER_RST] += 1
            return XDP_TX
        if not self._icmp_allowed(source_key(pkt.src), asked.ipv4):
            self.counters[Reason.ANSWER_RATE_LIMITED] += 1
            return XDP_DROP
        self.answer = port_unreachable(frame, asked, self.answers)
        self.counters[Reason.ANSWER_UNREACH] += 1
        return XDP_TX

    def _icmp_allowed(self, src, ipv4):
        """Linux's order: the host's credit checked, the peer's token taken,
        then the host's spent."""
        a, now, host = self.answers, self.now_ns, self.icmp_host
        if "icmp_no_host_bucket" in self.mutations:
            host = [now, 1 << 62]
        credit = min(host[1] + max(now - host[0], 0), a.icmp_host_burst_ns)
        host[0], host[1] = now, credit
        if credit < a.icmp_host_cost_ns:
            return False
        cost, burst = ((a.icmp_peer_cost_ns, a.icmp_peer_burst_ns) if ipv4
                       else (a.icmp6_peer_cost_ns, a.icmp6_peer_burst_ns))
        if cost:
            peer = self.icmp_peers.get(src)
            if peer is None:
                if burst < cost:
                    return False
                start = burst if "icmp_peer_starts_full" in self.mutations else burst - cost
                self.icmp_peers[src] = [now, start]
            else:
                credit = min(peer[1] + max(now - peer[0], 0), burst)
                peer[0] = now
                if credit < cost:
                    peer[1] = credit
                    return False
                peer[1] = credit - cost
        if host[1] < a.icmp_host_cost_ns:
            return False
        host[1] -= a.icmp_host_cost_ns
        return True

    # -- conveniences for tests ---------------------------------------------

    def expected_step(self, src, index):
        """The knock that moves (src, sequence) on: the next step of progress
        still alive, else the first step."""
        seq = self.seqs[index]
        key = (source_key(src), index)
        state = self.progress.get(key)
        if state is not None:
            next_step, last_us = state
            touched_us = self._last_touch_us(key[0]) if self.strict else 0
            if (0 < next_step < len(seq.steps) and not self._timed_out(key, last_us)
                    and not self._struck(touched_us, last_us)):
                return seq.steps[next_step]
        return seq.steps[0]

    def recent_words(self, sources):
        """{slot: (knock, touch)} of the slots of these sources, as the map holds them."""
        slots = {recent_place(src, self.recent_slots)[0] for src in sources}
        return {slot: tuple(self.recent.get(slot, (0, 0))) for slot in sorted(slots)}


def _listed(networks, src):
    return any(src.version == net.version and src in net for net in networks)


# -- answers: what an unused port of this host sends ------------------------------

@dataclasses.dataclass
class Asked:
    """What an answer is made from: the frame's layout and the fields used."""

    l3: int             # where the IP header starts
    l4: int             # where the TCP or UDP header starts
    ipv4: bool
    proto: str          # "tcp" | "udp"
    src: bytes          # the IP header's addresses
    dst: bytes
    tos: int            # IPv4 TOS or IPv6 traffic class
    sport: int
    dport: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    payload: int = 0    # TCP: the segment less its header
    quote: int = 0      # UDP: bytes from the IP header on that the ICMP error quotes


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_header_ok(header):
    return _csum(header) == 0xFFFF


def _pseudo(asked, length, proto):
    if asked.ipv4:
        return asked.src + asked.dst + struct.pack("!BBH", 0, proto, length)
    return asked.src + asked.dst + struct.pack("!I3xB", length, proto)


def read_asked(frame):
    """The packet seen as Linux sees it before it answers for an unused
    port, or None where it sends nothing: a source or destination that is not
    unicast, a fragment, a bad checksum, a short or inconsistent header, a
    RST, anything but TCP and UDP. For frames of the shape frame_of() makes
    (Ethernet, up to two tags, IPv4 without options or IPv6 without
    extension headers)."""
    if frame[0] & 1 or frame[6] & 1:
        return None                               # not unicast
    l3, ethertype = 14, struct.unpack_from("!H", frame, 12)[0]
    while ethertype in (0x8100, 0x88A8):
        ethertype = struct.unpack_from("!H", frame, l3 + 2)[0]
        l3 += 4
    if ethertype == 0x0800:
        ihl = (frame[l3] & 0xF) * 4
        total, frag = struct.unpack_from("!H2xH", frame, l3 + 2)
        src, dst = frame[l3 + 12:l3 + 16], frame[l3 + 16:l3 + 20]
        if frag & 0x3FFF & ~0x4000:
            return None                           # a fragment (more to come, or not the first)
        if any(a[0] in (0, 127) or a[0] >= 224 for a in (src, dst)):
            return None                           # this network, loopback, multicast, class E
        if not ipv4_header_ok(frame[l3:l3 + ihl]):
            return None
        proto, l4, room, tos = frame[l3 + 9], l3 + ihl, total - ihl, frame[l3 + 1]
    elif ethertype == 0x86DD:
        first, room, proto = struct.unpack_from("!IHB", frame, l3)
        src, dst = frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]
        if src[0] == 0xFF or dst[0] == 0xFF:
            return None                           # multicast
        if src[:8] == bytes(8) and src[8:12] in (bytes(4), b"\0\0\xff\xff"):
            return None                           # unspecified, loopback, IPv4-compatible and -mapped
        l4, tos = l3 + 40, (first >> 20) & 0xFF
    else:
        return None
    if room > len(frame) - l4 or room > ANSWER_MAX_L4:
        return None
    segment = frame[l4:l4 + room]
    asked = Asked(l3=l3, l4=l4, ipv4=ethertype == 0x0800, proto="", src=src, dst=dst, tos=tos,
                  sport=0, dport=0)
    if proto == 6:
        asked.proto = "tcp"
        asked.sport, asked.dport, asked.seq, asked.ack, doff, asked.flags = struct.unpack_from("!HHIIBB", segment)
        doff = (doff >> 4) * 4
        if asked.flags & TCP_RST or doff < 20 or doff > room:
            return None
        asked.payload = room - doff
        if _csum(_pseudo(asked, room, 6) + segment) != 0xFFFF:
            return None
        return asked
    if proto == 17:
        asked.proto = "udp"
        asked.sport, asked.dport, ulen, check = struct.unpack_from("!HHHH", segment)
        if ulen < 8 or ulen > room:
            return None
        if check == 0:
            if not asked.ipv4:
                return None                       # IPv6 UDP needs a checksum
        elif _csum(_pseudo(asked, ulen, 17) + segment[:ulen]) != 0xFFFF:
            return None
        asked.quote = min(l4 - l3 + ulen, ICMP_QUOTE if asked.ipv4 else ICMP6_QUOTE)
        return asked
    return None


def _turned_ethernet(frame, asked):
    """Addresses swapped; VLAN tags keep their ids and lose priority and DEI."""
    head = bytearray(frame[6:12] + frame[0:6] + frame[12:asked.l3])
    for tci in range(14, asked.l3, 4):
        head[tci] &= 0x0F
    return bytes(head)


def _address(raw, ipv4):
    return str(ipaddress.IPv4Address(raw) if ipv4 else ipaddress.IPv6Address(raw))


def tcp_reset(frame, asked, answers, off_by_one=False):
    """tcp_v4_send_reset / tcp_v6_send_reset: RST with seq = the ack of a
    segment with ACK; RST|ACK with seq 0 and ack = seq + SYN + FIN + payload
    to one without. No options, window 0; IPv4 TTL as the host's, ID 0, DF;
    the TOS or traffic class with its ECN bits cleared. The IPv6 flow label
    is left 0 (the program keys it: compare it masked)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import raw

    if asked.flags & TCP_ACK:
        tcp = TCP(sport=asked.dport, dport=asked.sport, seq=asked.ack, ack=0, flags="R", window=0, dataofs=5)
    else:
        length = asked.payload + bool(asked.flags & TCP_SYN) + bool(asked.flags & TCP_FIN) + off_by_one
        tcp = TCP(sport=asked.dport, dport=asked.sport, seq=0, ack=(asked.seq + length) & MASK32, flags="RA",
                  window=0, dataofs=5)
    src, dst = _address(asked.dst, asked.ipv4), _address(asked.src, asked.ipv4)
    if asked.ipv4:
        ip = IP(src=src, dst=dst, tos=asked.tos & 0xFC, id=0, flags="DF", ttl=answers.ttl)
    else:
        ip = IPv6(src=src, dst=dst, tc=asked.tos & 0xFC, fl=0, hlim=answers.hop_limit)
    return _turned_ethernet(frame, asked) + raw(ip / tcp)


def port_unreachable(frame, asked, answers):
    """icmp_send / icmp6_send: port unreachable quoting the datagram from its
    IP header on, at most 548 (IPv4) or 1232 (IPv6) bytes; IPv4 with TOS
    (tos & 0x1e) | 0xc0, not DF, the host's TTL; IPv6 with traffic class 0 and
    the host's hop limit. The IPv4 ID and the IPv6 flow label are left 0
    (the program keys them: compare them masked, with the IPv4 header
    checksum)."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import IPv6, ICMPv6DestUnreach
    from scapy.packet import Raw, raw

    quote = Raw(frame[asked.l3:asked.l3 + asked.quote])
    src, dst = _address(asked.dst, asked.ipv4), _address(asked.src, asked.ipv4)
    if asked.ipv4:
        packet = IP(src=src, dst=dst, tos=(asked.tos & 0x1E) | 0xC0, id=0, flags=0, ttl=answers.ttl) / ICMP(
            type=3, code=3) / quote
    else:
        packet = IPv6(src=src, dst=dst, tc=0, fl=0, hlim=answers.hop_limit) / ICMPv6DestUnreach(code=4) / quote
    return _turned_ethernet(frame, asked) + raw(packet)


def masked_answer(frame, l3):
    """An answer frame with the fields keyed by the program's random seed
    zeroed: the IPv6 flow label; the IPv4 ID of ICMP errors and so their
    header checksum. Returns (masked frame, problem or None): the problem
    names an IPv4 header checksum that is wrong."""
    frame = bytearray(frame)
    version = frame[l3] >> 4
    if version == 6:
        frame[l3 + 1] &= 0xF0
        frame[l3 + 2] = frame[l3 + 3] = 0
        return bytes(frame), None
    ihl = (frame[l3] & 0xF) * 4
    problem = None if ipv4_header_ok(bytes(frame[l3:l3 + ihl])) else "wrong IPv4 header checksum"
    if frame[l3 + 9] == 1:   # ICMP error: keyed ID
        frame[l3 + 4:l3 + 6] = b"\0\0"
        frame[l3 + 10:l3 + 12] = b"\0\0"
    return bytes(frame), problem
