"""A pure-Python reference model of the data path's knock state machine and
verdicts, for differential tests against the real program.

It works on packets as plain tuples, never bytes: Pkt(src, proto, port,
tcp_flags), proto one of "tcp", "udp", "icmp" (an echo request, port 0). It
takes a controller Config (xknock_dev/example.py shows one) and keeps what the
maps keep: progress per (source, sequence) and grants per (source, proto,
port). Written from the rules, not translated line by line from the C:

Knocks. Progress per (source, sequence) is (next_step, last_step_time). A
packet to a knock port is dropped; for each sequence that has the port as one
or more of its steps, in the order the sequences are configured:
  * progress with next_step > 0 has timed out when now - last > step_timeout,
    strictly. The C keeps last in microseconds (the packed progress word), so
    the comparison is now_us - last_us > timeout_us, each value divided by 1000
    with truncation; modelled exactly, which makes the boundary differ from a
    nanosecond one by up to 1 us;
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
  packet is a knock only when it is a SYN without ACK. Outcomes are counted
  globally (KNOCK_*) and per sequence (advanced, completed, reset, timed_out);
  a knock that ends nothing and starts nothing counts KNOCK_IGNORED, including
  a wrong knock that erases a completed sequence's progress.

Strict mode (config.strict). Every packet that is judged as guarded or
unguarded (not a knock, not deny-listed) touches its source: the source's
touch time (us, truncated) is remembered. Progress with 0 < next_step <
nsteps that has not timed out is reset when the source was touched strictly
after the last step (touch_us > last_us): a reset (KNOCK_RESET, per-sequence
reset) also counted KNOCK_STRICT_RESET, after which the knock is judged with
nothing in progress (a first step restarts at 1; anything else changes
nothing more). Completed progress is left alone.

Guarded ports. A source on the allow-list passes. Otherwise the grant decides:
a SYN without ACK needs now < window_end; anything else passes while
now < window_end or now < last_seen + idle_timeout. Passing refreshes last_seen
when now > last_seen + 1 s. A grant dead on both clocks is deleted when a
packet finds it.

Order. The deny-list first (whatever the port), then the port: unguarded
passes, guarded as above, knock ports drop. In monitor mode the state changes
alike, but nothing is dropped.

IPv4 sources are keyed as IPv4 addresses (the maps store them IPv4-mapped);
an allow- or deny-list network matches sources of its own address family.
"""

import collections
import dataclasses
import ipaddress
from typing import NamedTuple

from xknock.controller.kernel.layout import Reason

XDP_DROP = 1
XDP_PASS = 2

TCP_SYN = 0x02
TCP_ACK = 0x10
GRANT_REFRESH_NS = 1_000_000_000

# Deliberately wrong rules, to show that a differential test notices them.
MUTATIONS = {
    "repeat_is_wrong": "a repeat of the step just taken counts as a wrong knock",
    "timeout_inclusive": "progress times out at now - last >= step_timeout",
    "timeout_ns": "the step timeout is compared in nanoseconds, not truncated microseconds",
    "refresh_every_packet": "every passing packet refreshes last_seen",
    "syn_on_idle_clock": "a SYN may open a connection on the idle clock too",
    "first_repeat_keeps_time": "a repeated first step keeps the time of the first copy",
    "strict_guarded_quiet": "in strict mode, packets to guarded ports do not count as intervening",
    "strict_inclusive": "in strict mode, a touch in the same microsecond as the last step resets too",
}


class Pkt(NamedTuple):
    src: str
    proto: str          # "tcp" | "udp" | "icmp"
    port: int           # 0 for icmp
    tcp_flags: int = 0


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


class Model:
    def __init__(self, config, now_ns, mutations=()):
        unknown = set(mutations) - set(MUTATIONS)
        if unknown:
            raise ValueError(f"unknown mutations {sorted(unknown)}; known: {sorted(MUTATIONS)}")
        self.mutations = frozenset(mutations)
        self.now_ns = now_ns
        self.monitor = config.mode == "monitor"
        self.strict = config.strict
        self.touched = {}    # source key -> time of its last packet that was no knock, us (strict mode)
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
        self.counters = collections.Counter()
        # sequence index -> Counter of "advanced", "completed", "reset", "timed_out"
        self.seq_stats = collections.defaultdict(collections.Counter)

    # -- time ---------------------------------------------------------------

    def advance_to(self, now_ns):
        if now_ns < self.now_ns:
            raise ValueError("the model's clock only moves forward")
        self.now_ns = now_ns

    def deadlines(self):
        """Instants where some rule changes its answer: step timeouts, grant
        windows, idle ends and refresh points, sorted."""
        found = set()
        for (_, index), (next_step, last_us) in self.progress.items():
            if next_step > 0:
                found.add(last_us * 1000 + self.seqs[index].step_timeout_ns)
        for grant in self.grants.values():
            found.add(grant.window_end_ns)
            found.add(grant.last_seen_ns + grant.idle_timeout_ns)
            found.add(grant.last_seen_ns + GRANT_REFRESH_NS)
        return sorted(found)

    # -- packets ------------------------------------------------------------

    def run(self, pkt):
        """The XDP verdict for one packet, updating state and counters."""
        reason = self._decide(pkt)
        self.counters[reason] += 1
        if Reason.DROP_DENYLIST <= reason <= Reason.DROP_FRAGMENT:
            if self.monitor:
                self.counters[Reason.MONITOR_PASSED] += 1
                return XDP_PASS
            return XDP_DROP
        return XDP_PASS

    def _decide(self, pkt):
        src = source_key(pkt.src)
        if _listed(self.deny, src):
            return Reason.DROP_DENYLIST
        port = (pkt.proto, pkt.port)
        if self.strict and (port not in self.knock_ports or port in self.guarded):
            if port not in self.guarded or "strict_guarded_quiet" not in self.mutations:
                self.touched[src] = self.now_ns // 1000
        if port in self.guarded:
            return self._guarded(src, pkt)
        if port in self.knock_ports:
            if pkt.proto == "tcp" and (not pkt.tcp_flags & TCP_SYN or pkt.tcp_flags & TCP_ACK):
                self.counters[Reason.KNOCK_IGNORED] += 1   # TCP knocks are SYNs only
            else:
                for index, mask in self.knock_ports[port]:
                    self._knock(src, index, mask)
            return Reason.DROP_KNOCK
        return Reason.PASS_UNGUARDED

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

    def _timed_out(self, key, last_us):
        seq = self.seqs[key[1]]
        if "timeout_ns" in self.mutations:
            return self.now_ns - self._last_ns[key] > seq.step_timeout_ns
        elapsed_us = self.now_ns // 1000 - last_us
        timeout_us = seq.step_timeout_ns // 1000
        if "timeout_inclusive" in self.mutations:
            return elapsed_us >= timeout_us
        return elapsed_us > timeout_us

    def _knock(self, src, index, mask):
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
        elif 0 < next_step < nsteps and self._touched_since(src, last_us):
            struck = True                    # strict mode: another port since the last step
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
            return
        else:
            reset = 0 < next_step < nsteps
            new_step = 1 if mask & 1 else 0
            if new_step == 0 and next_step == 0 and not timed_out and not struck:
                count[Reason.KNOCK_IGNORED] += 1   # nothing in progress, not a first step
                return

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
        if new_step == nsteps:
            count[Reason.KNOCK_COMPLETED] += 1
            stats["completed"] += 1
            self._write_grants(src, index)
        elif new_step > 0:
            count[Reason.KNOCK_ADVANCED] += 1
            stats["advanced"] += 1
        elif not timed_out and not reset and not struck:
            count[Reason.KNOCK_IGNORED] += 1   # a wrong knock after completion: nothing to end

    def _touched_since(self, src, last_us):
        touched_us = self.touched.get(src)
        if touched_us is None:
            return False
        if "strict_inclusive" in self.mutations:
            return touched_us >= last_us
        return touched_us > last_us

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

    # -- conveniences for tests ---------------------------------------------

    def expected_step(self, src, index):
        """The knock that moves (src, sequence) on: the next step of progress
        still alive, else the first step."""
        seq = self.seqs[index]
        key = (source_key(src), index)
        state = self.progress.get(key)
        if state is not None:
            next_step, last_us = state
            if (0 < next_step < len(seq.steps) and not self._timed_out(key, last_us)
                    and not self._touched_since(key[0], last_us)):
                return seq.steps[next_step]
        return seq.steps[0]


def _listed(networks, src):
    return any(src.version == net.version and src in net for net in networks)
