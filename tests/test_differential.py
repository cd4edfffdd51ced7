"""Differential tests: the real XDP program against tests/model.py.

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

Half the programs run in strict mode ([filter] strict = true): their
packets to guarded and unguarded ports reset the sources' knocks in progress.

Each example starts clean: knocks, grants, touches and counters cleared, the
clock reset, the policy applied. A failure prints the shrunk program (a plain dict:
check_program(harness, program) replays it) with the packet trace that led
to the difference, and a @reproduce_failure blob; runs are not derandomized,
so --hypothesis-seed=N reruns a whole run.
"""

import dataclasses
import functools

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import find as hypothesis_find
from hypothesis import strategies as st
from model import TCP_ACK, TCP_SYN, XDP_DROP, XDP_PASS, Model, Pkt, source_key
from xknock_dev.packets import icmp_echo, tcp, udp

from xknock.controller.kernel import firsts
from xknock.controller.policy import policy
from xknock.controller.config import parse_config
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


def uids_of(config):
    """sequence index -> uid, as the controller numbers them"""
    return [policy.compile_policy(config, 0).seqs[i].uid for i in range(len(config.sequences))]


UIDS = uids_of(ENFORCE)

STRANGERS = ["198.51.100.7", "2001:db8:77::7", "198.51.100.8", "2001:db8:77::8", "198.51.100.9", "2001:db8:77::9"]
LISTED = ["192.0.2.10", "2001:db8:a::99", "203.0.113.5", "2001:db8:bad::5"]
KNOCK_PORTS = sorted({(s.proto, s.port) for seq in ENFORCE.sequences for s in seq.knock})
GUARDED_PORTS = sorted({(s.proto, s.port) for seq in ENFORCE.sequences for s in seq.open})
UNGUARDED_PORTS = [("tcp", 80), ("udp", 53), ("tcp", 8000), ("udp", 22), ("udp", 7000)]

US = 1000
S = 1_000_000_000
_BASE_STEPS = sorted(
    {S, 1}
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

SEQ_INDEX = st.integers(0, len(ENFORCE.sequences) - 1)
SOURCE_INDEX = st.integers(0, 3)
NEXT = st.tuples(st.just("next"), SOURCE_INDEX, SEQ_INDEX)
COMPLETE = st.tuples(st.just("complete"), SOURCE_INDEX, SEQ_INDEX)
KNOCK = st.tuples(st.just("knock"), SOURCE_INDEX, st.sampled_from(KNOCK_PORTS), TCP_FLAGS)
GUARDED = st.tuples(st.just("guarded"), SOURCE_INDEX, st.sampled_from(GUARDED_PORTS),
                    st.sampled_from([TCP_SYN, TCP_ACK, TCP_ACK | 0x08, TCP_SYN | TCP_ACK]))
# a packet on one of the grants the model holds (its source, its port), if any
GRANTED = st.tuples(st.just("granted"), st.integers(0, 7), st.sampled_from([TCP_SYN, TCP_ACK, TCP_ACK | 0x08]))
UNGUARDED = st.tuples(st.just("unguarded"), SOURCE_INDEX, st.sampled_from(UNGUARDED_PORTS))
ADVANCE = st.tuples(st.just("advance"), st.one_of(st.sampled_from(TIME_STEPS), st.integers(1, 20 * S),
                                                  st.integers(1, 300 * S)))
# to the model's n-th next deadline (a timeout, a window's end...), +-1 ns or 1 us
DEADLINE = st.tuples(st.just("deadline"), st.integers(0, 7), st.sampled_from(DEADLINE_DELTAS))
# repeated branches weigh more: one_of picks a branch uniformly
EVENTS = st.one_of(NEXT, NEXT, COMPLETE, KNOCK, KNOCK, GUARDED, GRANTED, GRANTED, UNGUARDED,
                   ADVANCE, ADVANCE, DEADLINE, DEADLINE)

PROGRAMS = st.fixed_dictionaries({
    "mode": st.sampled_from(["enforce"] * 4 + ["monitor"]),
    "strict": st.booleans(),
    "sources": st.lists(
        st.one_of(st.sampled_from(STRANGERS), st.sampled_from(STRANGERS), st.sampled_from(LISTED)),
        min_size=1, max_size=4, unique=True,
    ),
    "events": st.lists(EVENTS, min_size=8, max_size=60),
})


# -- running one program through both sides -------------------------------------

@functools.lru_cache(maxsize=4096)
def frame(pkt):
    if pkt.proto == "icmp":
        return icmp_echo(pkt.src)
    if pkt.proto == "tcp":
        return tcp(pkt.src, pkt.port, flags=pkt.tcp_flags)
    return udp(pkt.src, pkt.port)


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
    for src in STRANGERS + LISTED:
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
    config = dataclasses.replace(CONFIGS[program["mode"]], strict=program.get("strict", False))
    harness.reset_state()
    harness.set_clock(START_NS)
    harness.apply(config)
    model = Model(config, START_NS, mutations=mutations)
    trace = []

    def send(pkt):
        """One packet through both; what differed, or None."""
        harness.set_clock(model.now_ns)
        got = harness.run(frame(pkt))
        want = model.run(pkt)
        trace.append(f"t={model.now_ns - START_NS}: {pkt} -> kernel {_verdict(got)}, model {_verdict(want)}")
        if got != want:
            return f"verdict: kernel {_verdict(got)}, model {_verdict(want)} for {pkt}"
        if kernel_grants(harness) != model_grants(model):
            return f"grants after {pkt}:\n  kernel {kernel_grants(harness)}\n  model  {model_grants(model)}"
        if kernel_progress(harness) != model_progress(model):
            return f"progress after {pkt}:\n  kernel {kernel_progress(harness)}\n  model  {model_progress(model)}"
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
            event = ("guarded", 0, (proto, port), event[2])
            sources = [str(src)]
        else:
            sources = program["sources"]
        for pkt in packets(model, sources[event[1] % len(sources)], event):
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
    elif kind in ("knock", "guarded"):
        (proto, port), flags = event[2], event[3]
        yield Pkt(src, proto, port, flags if proto == "tcp" else 0)
    else:
        proto, port = event[2]
        yield Pkt(src, proto, port, TCP_SYN if proto == "tcp" else 0)


def _next_knock(model, src, index):
    proto, port = model.expected_step(src, index)
    return Pkt(src, proto, port, TCP_SYN if proto == "tcp" else 0)


def _verdict(code):
    return {XDP_PASS: "PASS", XDP_DROP: "DROP"}.get(code, f"verdict {code}")


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


def _fixed(*events, sources=(SSH_SRC,), strict=False):
    return {"mode": "enforce", "strict": strict, "sources": list(sources), "events": list(events)}


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
]


@pytest.mark.parametrize("mutation,program", MUTANT_CASES, ids=[m for m, _ in MUTANT_CASES])
def test_comparison_catches_a_wrong_model(harness, mutation, program):
    assert check_program(harness, program) is None
    difference = check_program(harness, program, mutations={mutation})
    assert difference is not None, f"the kernel agreed with a model where {mutation}"
    print(f"{mutation}: {difference.splitlines()[0]}")


@pytest.mark.parametrize("mutation", ["timeout_inclusive", "timeout_ns", "repeat_is_wrong", "syn_on_idle_clock",
                                      "refresh_every_packet", "strict_guarded_quiet", "strict_inclusive",
                                      "first_repeat_keeps_time"])
def test_generator_finds_a_wrong_model(harness, mutation):
    """The random programs themselves reach the rule: hypothesis finds a
    program on which the kernel and a mutated model disagree."""
    found = hypothesis_find(
        PROGRAMS,
        lambda program: check_program(harness, program, mutations={mutation}) is not None,
        settings=settings(max_examples=600, deadline=None, phases=[Phase.generate], database=None,
                          suppress_health_check=list(HealthCheck)),
    )
    print(f"{mutation}: {len(found['events'])} events")


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
    model follows the C here (the rule of tests/model.py); the docs do not."""
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
