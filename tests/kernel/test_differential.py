"""Differential tests: the real XDP program against tests/helpers/model.py.

Hypothesis writes random programs (a few sources, IPv4 and IPv6, some on the
allow- or deny-list; knocks, packets to guarded and unguarded ports, time
steps) and every packet goes through both the kernel (BPF_PROG_TEST_RUN) and
the model. Verdicts must agree packet by packet; the grants and the progress
maps after every packet; the counters (global and per sequence) at the end.

Time. The harness builds the program with XK_TEST_CLOCK: "now" is read from
the control map instead of bpf_ktime_get_ns(), and the test sets it to the
model's clock, to the nanosecond, before every packet. So boundaries are hit
exactly (a step at step_timeout, step_timeout + 1 us, the last nanosecond of
a window, the instant a refresh becomes due), results do not depend on how
fast the machine is, and no test sleeps. Time steps are drawn from those
boundaries: fixed amounts (each timeout and window, +-1 us, +-1 ns, the 1 s
refresh) and jumps to the model's own next deadlines +-1 ns / +-1 us, plus
random amounts.

Half the programs run in strict mode (the default), half lenient
(strict = false); half answer refused packets (answer = "closed", the
default: XDP_TX with the RST or the ICMP port unreachable compared byte for
byte with the model's, the fields keyed by the program's random seed masked),
half drop them; half ban sources after two failed sequences, on every port or
on knock and guarded ports. Two of the strangers (COLLIDING) share a slot of
strict mode's `recent` array, whose words for the program's sources are
compared after every packet, with the bans.

Each example starts clean: knocks, grants, touches and counters cleared, the
clock reset, the policy applied. A failure prints the shrunk program (a plain dict:
check_program(harness, program) replays it) with the packet trace that led
to the difference, and a @reproduce_failure blob; runs are not derandomized,
so --hypothesis-seed=N reruns a whole run.
"""

import ctypes
import dataclasses
import functools

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import find as hypothesis_find
from hypothesis import strategies as st
from model import (TCP_ACK, TCP_SYN, XDP_DROP, XDP_PASS, XDP_TX, AnswerSettings, Model, Pkt, frame_of,
                   masked_answer, recent_place, source_key)

from xknock.controller.kernel import bpfsys, firsts
from xknock.controller.policy import policy
from xknock.controller.config import Ban, parse_config
from xknock.controller.kernel.layout import Reason, progress_state, progress_step
from xknock.controller.kernel.maps import from_addr

# Four sequences sharing ports: tcp:7000 is step 0 of ssh and steps 0 and 2 of
# aba (A B A C); udp:8000 is step 1 of ssh and step 0 of web; tcp:7001 ends
# both web and aba, which open tcp:443 both (one packet can complete two
# sequences that write the same grant). "one" is a single-step sequence.
CONFIG = """
[filter]
mode = "enforce"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:22"]
open_for = "30s"
idle_timeout = "2m"

[[sequence]]
name = "web"
knock = ["udp:8000", "icmp", "tcp:7001"]
step_timeout = "3s"
open = ["tcp:443", "udp:443"]
open_for = "10s"
idle_timeout = "1m"

[[sequence]]
name = "aba"
knock = ["tcp:7000", "udp:8001", "tcp:7000", "tcp:7001"]
step_timeout = "2s"
open = ["tcp:22", "tcp:443"]
open_for = "20s"
idle_timeout = "40s"

[[sequence]]
name = "one"
knock = ["udp:8002"]
step_timeout = "4s"
open = ["udp:443"]
open_for = "5s"
idle_timeout = "15s"

[allow]
sources = ["192.0.2.10", "2001:db8:a::/48"]

[deny]
sources = ["203.0.113.0/24", "2001:db8:bad::/48"]
"""

START_NS = 1_000_000_000_000
ENFORCE = parse_config(CONFIG, listening=set())
CONFIGS = {"enforce": ENFORCE, "monitor": dataclasses.replace(ENFORCE, mode="monitor")}
BAN_AFTER, BAN_WITHIN_NS, BAN_FOR_NS = 2, 10 * 1_000_000_000, 20 * 1_000_000_000


def program_config(program):
    """The Config of a program: its mode, strictness, answers and bans."""
    ban = program.get("ban")
    return dataclasses.replace(
        CONFIGS[program["mode"]], strict=program.get("strict", True), answer=program.get("answer", "closed"),
        ban=Ban(after=BAN_AFTER, within_ns=BAN_WITHIN_NS, for_ns=BAN_FOR_NS, scope=ban) if ban else None)


def uids_of(config):
    """sequence index -> uid, as the controller numbers them"""
    return [policy.compile_policy(config, 0).seqs[i].uid for i in range(len(config.sequences))]


UIDS = uids_of(ENFORCE)

STRANGERS = ["198.51.100.7", "2001:db8:77::7", "198.51.100.8", "2001:db8:77::8", "198.51.100.9", "2001:db8:77::9"]
LISTED = ["192.0.2.10", "2001:db8:a::99", "203.0.113.5", "2001:db8:bad::5"]
# Two sources at one slot of `recent` (4096 slots in the test build; tests/helpers/model.py
# recent_place mirrors the hash, and the test below checks that they collide).
COLLIDING = ["198.51.100.41", "198.51.100.72"]
ALL_SOURCES = STRANGERS + LISTED + COLLIDING
KNOCK_PORTS = sorted({(s.proto, s.port) for seq in ENFORCE.sequences for s in seq.knock})
GUARDED_PORTS = sorted({(s.proto, s.port) for seq in ENFORCE.sequences for s in seq.open})
UNGUARDED_PORTS = [("tcp", 80), ("udp", 53), ("tcp", 8000), ("udp", 22), ("udp", 7000)]

US = 1000
S = 1_000_000_000
MS = 1_000_000
_BASE_STEPS = sorted(
    {S, 1, MS, 250 * MS}   # 1 ms and 250 ms: the ICMP host and IPv6 peer costs of Linux's defaults
    | {seq.step_timeout_ns for seq in ENFORCE.sequences}
    | {seq.open_for_ns for seq in ENFORCE.sequences}
    | {seq.idle_timeout_ns for seq in ENFORCE.sequences}
)
TIME_STEPS = sorted({base + delta for base in _BASE_STEPS for delta in (-US, -1, 0, 1, US) if base + delta > 0})
DEADLINE_DELTAS = (-US, -1, 0, 1, US)

# -- programs -----------------------------------------------------------------

TCP_FLAGS = st.one_of(
    st.just(TCP_SYN),
    st.sampled_from([TCP_SYN | 0x40 | 0x80, TCP_SYN | TCP_ACK, TCP_ACK, 0x04, 0x01, 0x00, TCP_SYN | 0x01]),
    st.integers(0, 255),
)

# How a packet looks beyond its port and flags, for the answers: (seq, ack,
# payload length, TOS / traffic class, VLAN TCIs, damage: model.DAMAGES). Payload lengths around the
# ICMP quote limits (548 and 1232 bytes from the IP header) and the longest
# segment the program answers (2048 bytes of L4).
U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32 - 2]))
PAYLOAD_LENGTHS = st.one_of(st.integers(0, 40), st.sampled_from(
    [519, 520, 521, 1183, 1184, 1185, 1192, 1193, 2027, 2028, 2029, 2039, 2040, 2041]))
VLANS = st.sampled_from([(), (), (5,), (0xE005,), (0x3FFF,), (0x2003, 0xF00A)])
DAMAGE = st.sampled_from(["", "", "", "", "l4_checksum", "ip_checksum", "no_udp_checksum", "broadcast"])
SHAPE = st.one_of(st.none(), st.tuples(U32, U32, PAYLOAD_LENGTHS, st.integers(0, 255), VLANS, DAMAGE))

SEQ_INDEX = st.integers(0, len(ENFORCE.sequences) - 1)
SOURCE_INDEX = st.integers(0, 3)
NEXT = st.tuples(st.just("next"), SOURCE_INDEX, SEQ_INDEX)
COMPLETE = st.tuples(st.just("complete"), SOURCE_INDEX, SEQ_INDEX)
KNOCK = st.tuples(st.just("knock"), SOURCE_INDEX, st.sampled_from(KNOCK_PORTS), TCP_FLAGS, SHAPE)
GUARDED_FLAGS = st.sampled_from([TCP_SYN, TCP_ACK, TCP_ACK | 0x08, TCP_SYN | TCP_ACK, 0x04, 0x01, 0x00])
GUARDED = st.tuples(st.just("guarded"), SOURCE_INDEX, st.sampled_from(GUARDED_PORTS), GUARDED_FLAGS, SHAPE)
# a packet on one of the grants the model holds (its source, its port), if any
GRANTED = st.tuples(st.just("granted"), st.integers(0, 7), st.sampled_from([TCP_SYN, TCP_ACK, TCP_ACK | 0x08]),
                    SHAPE)
# new connections (SYN, a datagram) intervene in strict mode; the rest does not
UNGUARDED_FLAGS = st.sampled_from([TCP_SYN, TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, 0x04, TCP_ACK | 0x01])
UNGUARDED = st.tuples(st.just("unguarded"), SOURCE_INDEX, st.sampled_from(UNGUARDED_PORTS), UNGUARDED_FLAGS, SHAPE)
ADVANCE = st.tuples(st.just("advance"), st.one_of(st.sampled_from(TIME_STEPS), st.integers(1, 20 * S),
                                                  st.integers(1, 300 * S)))
# to the model's n-th next deadline (a timeout, a window's end...), +-1 ns or 1 us
DEADLINE = st.tuples(st.just("deadline"), st.integers(0, 7), st.sampled_from(DEADLINE_DELTAS))
# a step, a packet elsewhere, the next step: mostly new connections, mostly
# a microsecond or more apart (strict mode compares microseconds)
GAP = st.sampled_from([0, 1, US, US, MS])
BETWEEN_FLAGS = st.sampled_from([TCP_SYN, TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK])
BETWEEN = st.tuples(st.just("between"), SOURCE_INDEX, SEQ_INDEX, GAP,
                    st.tuples(st.sampled_from(UNGUARDED_PORTS + GUARDED_PORTS + KNOCK_PORTS), BETWEEN_FLAGS), GAP)
UDP_REFUSED = sorted(p for p in KNOCK_PORTS + GUARDED_PORTS if p[0] == "udp")
BURST = st.tuples(st.just("burst"), SOURCE_INDEX, st.sampled_from(UDP_REFUSED), st.integers(2, 9))
# repeated branches weigh more: one_of picks a branch uniformly
EVENTS = st.one_of(NEXT, NEXT, COMPLETE, KNOCK, KNOCK, GUARDED, GRANTED, GRANTED, UNGUARDED, BETWEEN, BETWEEN, BETWEEN,
                   BURST, ADVANCE, ADVANCE, DEADLINE, DEADLINE, DEADLINE)

SOURCE_LISTS = st.lists(
    st.one_of(st.sampled_from(STRANGERS), st.sampled_from(STRANGERS), st.sampled_from(LISTED)),
    min_size=1, max_size=4, unique=True,
)
PROGRAMS = st.fixed_dictionaries({
    "mode": st.sampled_from(["enforce"] * 4 + ["monitor"]),
    "strict": st.booleans(),
    "answer": st.sampled_from(["closed", "drop"]),
    "ban": st.sampled_from([None, None, "all", "knock"]),
    # a quarter of the programs lead with the two sources that share a slot of `recent`
    "sources": st.one_of(SOURCE_LISTS, SOURCE_LISTS, SOURCE_LISTS,
                         SOURCE_LISTS.map(lambda s: (COLLIDING + [x for x in s if x not in COLLIDING])[:4])),
    "events": st.lists(EVENTS, min_size=8, max_size=60),
})


# -- running one program through both sides -------------------------------------

frame = functools.lru_cache(maxsize=4096)(frame_of)


def kernel_grants(harness):
    return {
        (source_key(str(ip)), proto, port): (g.window_end_ns, g.idle_timeout_ns, g.last_seen_ns, g.seq_uid)
        for (ip, proto, port), g in harness.grants().items()
    }


def model_grants(model, uids=UIDS):
    return {key: (g.window_end_ns, g.idle_timeout_ns, g.last_seen_ns, uids[g.seq])
            for key, g in model.grants.items()}


# Where the kernel keeps a source's progress: a first step of a multi-step
# sequence in the `firsts` filter (its time's low 32 bits), everything further
# in `progress`; a word at step 0 means nothing in progress, like no word.
NSTEPS = {UIDS[i]: len(seq.knock) for i, seq in enumerate(ENFORCE.sequences)}


def kernel_progress(harness):
    state = {(source_key(str(from_addr(k.src))), k.uid): v.value for k, v in harness.maps.progress.items()
             if progress_step(v.value) > 0}
    for src in ALL_SOURCES:
        for uid in UIDS:
            first = firsts.held(harness.maps, src, uid)
            if first is not None:
                state[(source_key(src), uid)] = ("first", first)
    return state


def model_progress(model):
    state = {}
    for (src, index), (step, last_us) in model.progress.items():
        uid = UIDS[index]
        if step == 1 and NSTEPS[uid] > 1:
            state[(src, uid)] = ("first", last_us & 0xFFFFFFFF)
        elif step > 0:
            state[(src, uid)] = progress_state(step, last_us)
    return state


def kernel_recent(harness, sources):
    """{slot: (knock word, touch word)} of strict mode's slots of these sources."""
    found = {}
    for slot in sorted({recent_place(src, harness.maps.recent.max_entries)[0] for src in sources}):
        words = harness.maps.recent.lookup(ctypes.c_uint32(slot))
        found[slot] = (words.knock, words.touch)
    return found


def kernel_bans(harness):
    return {source_key(str(from_addr(k))): v.until_ns for k, v in harness.maps.bans.items()}


def live_answer_settings(harness):
    """The answer fields of the live bank (the host's TTL, hop limit, ICMP rate limits)."""
    bank = harness.maps.active_bank()
    return AnswerSettings.from_settings(harness.maps.settings.lookup(ctypes.c_uint32(bank)))


def l3_offset(pkt):
    return 14 + 4 * len(pkt.vlans)


def answer_difference(got, want, pkt):
    """None when the kernel's answer frame is the model's, but for the fields
    keyed by the program's seed; else what differs."""
    got_masked, problem = masked_answer(got, l3_offset(pkt))
    want_masked, _ = masked_answer(want, l3_offset(pkt))
    if problem:
        return f"answer to {pkt}: {problem}: {got.hex()}"
    if got_masked != want_masked:
        at = next((i for i, (a, b) in enumerate(zip(got_masked, want_masked)) if a != b),
                  min(len(got_masked), len(want_masked)))
        return (f"answer to {pkt}: kernel and model differ at byte {at} (lengths {len(got)}, {len(want)}):\n"
                f"  kernel {got_masked.hex()}\n  model  {want_masked.hex()}")
    return None


SEQ_STATS = ("advanced", "completed", "reset", "timed_out")


def kernel_seq_stats(harness):
    found = {}
    for uid in UIDS:
        total = harness.maps.sequence_stats(uid)
        counts = {field: getattr(total, field) for field in SEQ_STATS} if total is not None else None
        found[uid] = counts
    return found


def model_seq_stats(model):
    return {UIDS[index]: {field: model.seq_stats[index][field] for field in SEQ_STATS} for index in range(len(UIDS))}


def check_program(harness, program, mutations=(), seen=None):
    """Runs program through the kernel and the model. Returns None when they
    agree throughout, else what differed first with the trace that led there.
    seen, a set, collects the reasons the model counted (for coverage)."""
    config = program_config(program)
    harness.reset_state()
    harness.set_clock(START_NS)
    harness.apply(config)
    model = Model(config, START_NS, mutations=mutations, answers=live_answer_settings(harness),
                  recent_slots=harness.maps.recent.max_entries, ban_entries=harness.maps.bans.max_entries)
    watched = set(program["sources"])
    trace = []

    def send(pkt):
        """One packet through both; what differed, or None."""
        harness.set_clock(model.now_ns)
        data = frame(pkt)
        got, _, answer = bpfsys.test_run(harness.fd, data)
        want = model.run(pkt)
        trace.append(f"t={model.now_ns - START_NS}: {_brief(pkt)} -> kernel {_verdict(got)}, model {_verdict(want)}")
        if got != want:
            return f"verdict: kernel {_verdict(got)}, model {_verdict(want)} for {pkt}"
        if got == XDP_TX:
            difference = answer_difference(answer, model.answer, pkt)
            if difference:
                return difference
        if kernel_grants(harness) != model_grants(model):
            return f"grants after {pkt}:\n  kernel {kernel_grants(harness)}\n  model  {model_grants(model)}"
        if kernel_progress(harness) != model_progress(model):
            return f"progress after {pkt}:\n  kernel {kernel_progress(harness)}\n  model  {model_progress(model)}"
        if kernel_recent(harness, watched) != model.recent_words(watched):
            return (f"strict mode's slots after {pkt}:\n  kernel {kernel_recent(harness, watched)}\n"
                    f"  model  {model.recent_words(watched)}")
        if kernel_bans(harness) != model.bans:
            return f"bans after {pkt}:\n  kernel {kernel_bans(harness)}\n  model  {model.bans}"
        return None

    for event in program["events"]:
        kind = event[0]
        if kind == "advance":
            model.advance_to(model.now_ns + event[1])
            trace.append(f"t={model.now_ns - START_NS}: advance {event[1]}")
            continue
        if kind == "deadline":
            ahead = [t for t in model.deadlines() if t + event[2] > model.now_ns]
            if ahead:
                model.advance_to(ahead[event[1] % len(ahead)] + event[2])
                trace.append(f"t={model.now_ns - START_NS}: jump to a deadline {event[2]:+d}")
            continue
        if kind == "granted":
            if not model.grants:
                continue
            src, proto, port = sorted(model.grants, key=str)[event[1] % len(model.grants)]
            event = ("guarded", 0, (proto, port), *event[2:])
            sources = [str(src)]
        else:
            sources = program["sources"]
        for pkt in packets(model, sources[event[1] % len(sources)], event):
            if not isinstance(pkt, Pkt):   # ("advance", ns) within an event
                model.advance_to(model.now_ns + pkt[1])
                trace.append(f"t={model.now_ns - START_NS}: advance {pkt[1]}")
                continue
            difference = send(pkt)
            if difference:
                return f"{difference}\n  trace (t = ns since start):\n    " + "\n    ".join(trace)

    kernel_counts = {r: n for r, n in harness.counters().items() if n}
    model_counts = {Reason(r): n for r, n in model.counters.items() if n}
    if seen is not None:
        seen.update(model_counts)
    if kernel_counts != model_counts:
        return (f"counters:\n  kernel {kernel_counts}\n  model  {model_counts}\n  trace (t = ns since start):\n    "
                + "\n    ".join(trace))
    if kernel_seq_stats(harness) != model_seq_stats(model):
        return (f"per-sequence counters:\n  kernel {kernel_seq_stats(harness)}\n  model  {model_seq_stats(model)}"
                "\n  trace (t = ns since start):\n    " + "\n    ".join(trace))
    return None


def packets(model, src, event):
    """The packets of one event, made lazily: a knock that depends on the
    model's state is chosen after the packets before it have run."""
    kind = event[0]
    if kind == "next":
        yield _next_knock(model, src, event[2])
    elif kind == "complete":
        # the rest of one sequence, knock after knock at one instant
        steps = len(model.seqs[event[2]].steps)
        for _ in range(steps):
            yield _next_knock(model, src, event[2])
            if model.progress.get((source_key(src), event[2]), (0, 0))[0] == steps:
                return
    elif kind == "between":
        # a step of one sequence, something else, the step after it: what
        # strict mode judges (the gaps decide whether the touch is later)
        _, _, index, gap, (port, flags), gap2 = event
        yield _next_knock(model, src, index)
        yield ("advance", gap)
        yield shaped(Pkt(src, port[0], port[1], flags if port[0] == "tcp" else 0), None)
        yield ("advance", gap2)
        yield _next_knock(model, src, index)
    elif kind == "burst":
        # datagrams to one refused port at one instant: the ICMP rate limits
        for _ in range(event[3]):
            yield shaped(Pkt(src, *event[2]), None)
    else:   # knock, guarded, unguarded
        (proto, port) = event[2]
        flags = event[3] if len(event) > 3 else TCP_SYN
        yield shaped(Pkt(src, proto, port, flags if proto == "tcp" else 0), event[4] if len(event) > 4 else None)


def shaped(pkt, shape):
    if shape is None:
        return pkt._replace(payload=b"knock" if pkt.proto == "udp" else b"")
    seq, ack, length, tos, vlans, *damage = shape
    return pkt._replace(seq=seq, ack=ack, payload=bytes(i * 7 & 0xFF for i in range(length)), tos=tos,
                        vlans=vlans, damage=damage[0] if damage else "")


def _next_knock(model, src, index):
    proto, port = model.expected_step(src, index)
    return shaped(Pkt(src, proto, port, TCP_SYN if proto == "tcp" else 0), None)


def _brief(pkt):
    """A packet as a trace line shows it: its payload by length."""
    return repr(pkt._replace(payload=len(pkt.payload)))


def _verdict(code):
    return {XDP_PASS: "PASS", XDP_DROP: "DROP", XDP_TX: "TX"}.get(code, f"verdict {code}")


# -- the property -----------------------------------------------------------------

@settings(max_examples=200, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=PROGRAMS)
def test_kernel_agrees_with_model(harness, program):
    seen = set()
    difference = check_program(harness, program, seen=seen)
    for reason in seen:
        event(reason.name)   # --hypothesis-show-statistics shows how often each happened
    assert difference is None, difference


# -- the comparison can fail ---------------------------------------------------------

SSH_SRC = "198.51.100.7"


def _fixed(*events, sources=(SSH_SRC,), strict=False, answer="closed", ban=None):
    return {"mode": "enforce", "strict": strict, "answer": answer, "ban": ban, "sources": list(sources),
            "events": list(events)}


def _strike(*, flags=TCP_SYN):
    """ssh's first step, a new connection to tcp:80 a microsecond later, then
    udp:8000 (ssh's second step) a microsecond after that."""
    return (("next", 0, 0), ("advance", US), ("unguarded", 0, ("tcp", 80), flags, None), ("advance", US),
            ("knock", 0, ("udp", 8000), 0, None))


# One fixed program per mutation, each of which the correct model passes.
MUTANT_CASES = [
    ("repeat_is_wrong", _fixed(("knock", 0, ("tcp", 7000), TCP_SYN), ("knock", 0, ("udp", 8000), 0),
                               ("knock", 0, ("udp", 8000), 0), ("knock", 0, ("tcp", 9000), TCP_SYN),
                               ("guarded", 0, ("tcp", 22), TCP_SYN))),
    ("timeout_inclusive", _fixed(("next", 0, 0), ("advance", 5 * S), ("next", 0, 0))),
    ("timeout_ns", _fixed(("next", 0, 0), ("advance", 5 * S + 1), ("next", 0, 0))),
    ("refresh_every_packet", _fixed(("next", 0, 0), ("next", 0, 0), ("next", 0, 0), ("advance", S // 2),
                                    ("guarded", 0, ("tcp", 22), TCP_ACK))),
    ("syn_on_idle_clock", _fixed(("next", 0, 0), ("next", 0, 0), ("next", 0, 0), ("advance", 31 * S),
                                 ("guarded", 0, ("tcp", 22), TCP_SYN))),
    ("first_repeat_keeps_time", _fixed(("next", 0, 0), ("advance", 3 * S), ("knock", 0, ("tcp", 7000), TCP_SYN),
                                       ("advance", 3 * S), ("next", 0, 0))),
    ("strict_guarded_quiet", _fixed(("next", 0, 0), ("advance", US), ("guarded", 0, ("tcp", 22), TCP_SYN),
                                    ("advance", US), ("next", 0, 0), strict=True)),
    ("strict_inclusive", _fixed(("next", 0, 0), ("unguarded", 0, ("tcp", 80)), ("advance", S), ("next", 0, 0),
                                strict=True)),
    # a SYN+ACK elsewhere is no new connection: ssh's second step still advances
    ("strict_synack_opens", _fixed(*_strike(flags=TCP_SYN | TCP_ACK), strict=True)),
    # icmp is web's second step, which this source is not at: it intervenes in ssh
    ("strict_untaken_knock_quiet", _fixed(("next", 0, 0), ("advance", US), ("knock", 0, ("icmp", 0), 0, None),
                                          ("advance", US), ("next", 0, 0), strict=True)),
    # two strict resets, then a packet anywhere: a ban (after 2) would drop it
    ("strict_resets_ban", _fixed(*_strike(), ("advance", S), *_strike(), ("unguarded", 0, ("tcp", 80), TCP_SYN, None),
                                 strict=True, ban="all")),
    # a SYN with 3 bytes of data from seq 2**32 - 2: RST|ACK with ack 2 (wrapped)
    ("rst_ack_off_by_one", _fixed(("knock", 0, ("tcp", 22), TCP_SYN, (2**32 - 2, 0, 3, 0, ())))),
    # seven datagrams to a knock port at one instant: a new peer's bucket has
    # room for six port unreachables (its burst less the first)
    ("icmp_peer_starts_full", _fixed(*[("knock", 0, ("udp", 443), 0, None)] * 7)),
    # sixty sources, one datagram each at one instant: the host's bucket
    # (Linux's default: 50 errors of burst) runs dry first
    ("icmp_no_host_bucket", _fixed(*[("knock", i, ("udp", 443), 0, None) for i in range(60)],
                                   sources=[f"198.51.100.{100 + i}" for i in range(60)])),
]


@pytest.mark.parametrize("mutation,program", MUTANT_CASES, ids=[m for m, _ in MUTANT_CASES])
def test_comparison_catches_a_wrong_model(harness, mutation, program):
    if mutation in ("icmp_peer_starts_full", "icmp_no_host_bucket"):
        harness.apply(ENFORCE)
        limits = live_answer_settings(harness)
        if not limits.icmp_peer_cost_ns or limits.icmp_host_burst_ns // limits.icmp_host_cost_ns >= 60:
            pytest.skip("this host's ICMP rate limits (net.ipv4.icmp_ratelimit, icmp_msgs_burst) are not Linux's "
                        "defaults, which these programs are made for")
    assert check_program(harness, program) is None
    difference = check_program(harness, program, mutations={mutation})
    assert difference is not None, f"the kernel agreed with a model where {mutation}"
    print(f"{mutation}: {difference.splitlines()[0]}")


@pytest.mark.parametrize("mutation", ["timeout_inclusive", "timeout_ns", "repeat_is_wrong", "syn_on_idle_clock",
                                      "refresh_every_packet", "strict_guarded_quiet", "strict_inclusive",
                                      "first_repeat_keeps_time", "strict_synack_opens", "strict_untaken_knock_quiet",
                                      "strict_resets_ban", "rst_ack_off_by_one", "icmp_peer_starts_full"])
def test_generator_finds_a_wrong_model(harness, mutation):
    """The random programs themselves reach the rule: hypothesis finds a
    program on which the kernel and a mutated model disagree."""
    found = hypothesis_find(
        PROGRAMS,
        lambda program: check_program(harness, program, mutations={mutation}) is not None,
        settings=settings(max_examples=2000, deadline=None, phases=[Phase.generate], database=None,
                          suppress_health_check=list(HealthCheck)),
    )
    print(f"{mutation}: {len(found['events'])} events")


# -- a full bans map ------------------------------------------------------------------

SMALL_BANS = 2


@pytest.fixture(scope="module")
def small_bans():
    """The program with room for two bans: programs of three or four failing
    sources fill it."""
    from xknock_dev.testrun import Harness

    with Harness(cflags=[f"-DXK_BAN_ENTRIES={SMALL_BANS}"]) as h:
        assert h.maps.bans.max_entries == SMALL_BANS
        yield h


def _fail_twice(i):
    """Two failed ssh sequences from source i (a first step, then its last): one ban."""
    return [("next", i, 0), ("knock", i, ("tcp", 9000), TCP_SYN, None)] * BAN_AFTER


FILL_BANS = _fixed(*_fail_twice(0), *_fail_twice(1), *_fail_twice(2), ("advance", BAN_FOR_NS // 2),
                   *_fail_twice(2), ("guarded", 2, ("tcp", 22), TCP_SYN, None), ("advance", BAN_FOR_NS // 2),
                   *_fail_twice(2), ("unguarded", 0, ("tcp", 80), TCP_SYN, None), *_fail_twice(2),
                   sources=STRANGERS[:3], ban="all")


def test_a_full_bans_map_agrees_and_a_model_without_capacity_does_not(small_bans):
    seen = set()
    assert check_program(small_bans, FILL_BANS, seen=seen) is None
    assert Reason.BAN_FAILED in seen and Reason.BAN_EXPIRED in seen
    difference = check_program(small_bans, FILL_BANS, mutations={"bans_unbounded"})
    assert difference is not None, "the kernel agreed with a model whose bans map never fills"
    print(f"bans_unbounded: {difference.splitlines()[0]}")


# Programs that ban three or four strangers among their other events, so that
# the two-entry map fills, ends bans and refuses some.
BAN_HEAVY = st.fixed_dictionaries({
    "mode": st.sampled_from(["enforce"] * 4 + ["monitor"]),
    "strict": st.booleans(),
    "answer": st.sampled_from(["closed", "drop"]),
    "ban": st.sampled_from(["all", "knock"]),
    "sources": st.lists(st.sampled_from(STRANGERS), min_size=3, max_size=4, unique=True),
    # each item: an ordinary event, or (two times in three) two failures of source i
    "events": st.lists(st.tuples(EVENTS, st.integers(0, 3), st.integers(0, 2)), min_size=6, max_size=30).map(
        lambda items: [e for event, i, fail in items for e in (_fail_twice(i) if fail else [event])]),
})


@settings(max_examples=60, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=BAN_HEAVY)
def test_kernel_agrees_with_model_on_a_small_bans_map(small_bans, program):
    seen = set()
    difference = check_program(small_bans, program, seen=seen)
    for reason in seen:
        event(reason.name)
    assert difference is None, difference


def test_colliding_sources_share_a_slot_in_the_kernel(harness):
    """COLLIDING really share a slot of `recent` (the model's mirror of the
    hash agrees with the program's): each one's knock overwrites the
    other's, so the first source is no longer knocking and its touch is
    not remembered (a collision forgets, never invents)."""
    a, b = COLLIDING
    assert recent_place(a, harness.maps.recent.max_entries)[0] == recent_place(b, harness.maps.recent.max_entries)[0]
    program = _fixed(("next", 0, 0), ("next", 1, 0), ("unguarded", 0, ("tcp", 80), TCP_SYN, None), ("advance", US),
                     ("next", 0, 0), ("next", 0, 0), ("guarded", 0, ("tcp", 22), TCP_SYN, None),
                     sources=COLLIDING, strict=True)
    assert check_program(harness, program) is None
    # a knocked, b knocked (a's knock forgotten), a's SYN to tcp:80 was not
    # remembered, so a's knock went through
    assert Reason.KNOCK_STRICT_RESET not in harness.counters() or not harness.counters()[Reason.KNOCK_STRICT_RESET]
    assert any(str(ip) == a and port == 22 for ip, _, port in harness.grants())


# -- found while writing the model: where the kernel and the documentation part ------

def _one_sequence_config(extra=""):
    return parse_config(
        """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:22"]
""" + extra,
        listening=set(),
    )


@pytest.mark.parametrize(
    "lists,pkt",
    [
        # config.py warns '"::/0": every IPv6 source may reach every guarded port'
        ('[allow]\nsources = ["::/0"]', Pkt("198.51.100.7", "tcp", 22, TCP_SYN)),
        # nothing warns here, yet every IPv4 packet would be dropped
        ('[deny]\nsources = ["::/8"]', Pkt("198.51.100.7", "tcp", 80, TCP_SYN)),
    ],
    ids=["allow ::/0 lets IPv4 in", "deny ::/8 drops IPv4"],
)
def test_ipv6_list_entries_leave_ipv4_sources_alone(harness, lists, pkt):
    """An IPv6 network in [allow] or [deny] must not match IPv4 sources. The
    maps key IPv4 as ::ffff:a.b.c.d, so an IPv6 prefix that covers
    ::ffff:0:0/96 (::/0 ... ::/80) matches every IPv4 source as well."""
    config = _one_sequence_config(lists)
    harness.reset_state()
    harness.set_clock(START_NS)
    harness.apply(config)
    model = Model(config, START_NS)
    assert _verdict(harness.run(frame(pkt))) == _verdict(model.run(pkt))


def test_knocking_again_renews_the_grant_when_first_step_is_last(harness):
    """docs/configuration.md: "Knocking again while a grant is alive renews
    both clocks." Not for a sequence whose last step is also its first
    (A B A, allowed by the config): completed progress is kept for
    step_timeout so that a retransmitted last knock is a repeat, so within
    step_timeout of completing, the new attempt's first A is taken for that
    repeat, B is then a wrong knock, and the final A only starts over. The
    model follows the C here (the rule of tests/helpers/model.py); the docs do not."""
    config = parse_config(
        """
[[sequence]]
name = "aba"
knock = ["tcp:7000", "udp:8000", "tcp:7000"]
step_timeout = "5s"
open = ["tcp:22"]
open_for = "30s"
""",
        listening=set(),
    )
    harness.reset_state()
    harness.set_clock(START_NS)
    harness.apply(config)
    model = Model(config, START_NS)
    aba = [Pkt(SSH_SRC, "tcp", 7000, TCP_SYN), Pkt(SSH_SRC, "udp", 8000), Pkt(SSH_SRC, "tcp", 7000, TCP_SYN)]
    for pkt in aba:
        harness.run(frame(pkt))
        model.run(pkt)
    model.advance_to(START_NS + 2 * S)
    harness.set_clock(model.now_ns)
    for pkt in aba:
        harness.run(frame(pkt))
        model.run(pkt)
    assert kernel_grants(harness) == model_grants(model, uids_of(config))   # the model agrees with the kernel...
    [(window_end, _, _, _)] = kernel_grants(harness).values()
    assert window_end == model.now_ns + 30 * S              # ...the docs do not


# -- the answer comparison masks the seeded fields and nothing else ---------------------

def _answer_pair(harness, pkt, answer="closed"):
    """(kernel answer, model answer) for one packet of a fresh program."""
    config = program_config({"mode": "enforce", "strict": True, "answer": answer})
    harness.reset_state()
    harness.set_clock(START_NS)
    harness.apply(config)
    model = Model(config, START_NS, answers=live_answer_settings(harness))
    verdict, _, got = bpfsys.test_run(harness.fd, frame(pkt))
    assert verdict == model.run(pkt) == XDP_TX
    return got, model.answer


def _checksummed(data, l3):
    """data with its IPv4 header checksum made right again."""
    from model import _csum

    data = bytearray(data)
    data[l3 + 10:l3 + 12] = b"\0\0"
    data[l3 + 10:l3 + 12] = (0xFFFF ^ _csum(bytes(data[l3:l3 + 20]))).to_bytes(2, "big")
    return bytes(data)


def _flip(data, at, mask):
    data = bytearray(data)
    data[at] ^= mask
    return bytes(data)


def test_answer_comparison_masks_only_the_seeded_fields(harness):
    """The kernel's own answers pass; changed anywhere but in the IPv6 flow
    label and the IPv4 ID of an ICMP error (with its header checksum made
    right again), they fail; a wrong IPv4 header checksum fails on its own."""
    udp4 = Pkt(SSH_SRC, "udp", 443, payload=b"x" * 30, tos=0x2B, vlans=(0xE005,))
    got, want = _answer_pair(harness, udp4)
    l3 = l3_offset(udp4)
    assert answer_difference(got, want, udp4) is None
    assert answer_difference(_flip(got, l3 + 5, 0x5A), want, udp4) == (
        f"answer to {udp4}: wrong IPv4 header checksum: {_flip(got, l3 + 5, 0x5A).hex()}")
    assert answer_difference(_checksummed(_flip(got, l3 + 5, 0x5A), l3), want, udp4) is None   # another ID: masked
    # MACs, the tag, TOS, TTL, addresses (header checksum made right), ICMP type, checksum, the quote
    for at in (0, 6, 14, l3 + 1, l3 + 8, l3 + 12, l3 + 16, l3 + 20, l3 + 22, l3 + 28, len(got) - 1):
        changed = _flip(got, at, 0x01)
        if l3 <= at < l3 + 20:
            changed = _checksummed(changed, l3)
        assert answer_difference(changed, want, udp4) is not None, at
    assert answer_difference(got[:-1], want, udp4) is not None

    syn6 = Pkt("2001:db8:77::7", "tcp", 22, TCP_SYN, seq=5, payload=b"ab", tos=0xFF)
    got, want = _answer_pair(harness, syn6)
    assert answer_difference(got, want, syn6) is None
    assert answer_difference(_flip(got, 14 + 3, 0xFF), want, syn6) is None   # the flow label: masked
    for at in (14, 15, 14 + 7, 14 + 8, 14 + 40 + 4, 14 + 40 + 8, 14 + 40 + 13, 14 + 40 + 16):
        # version and traffic class, hop limit, source, seq, ack, flags, checksum
        assert answer_difference(_flip(got, at, 0x10), want, syn6) is not None, at
