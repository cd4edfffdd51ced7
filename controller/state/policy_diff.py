"""What a reload would change: the live bank of a running filter against the
bank a config compiles to (`xknock diff`, `xknock reload --dry-run`).

Both sides are read into one PolicyView from the same kind of contents (the
maps' live bank; compile_policy()'s Policy), so the comparison is of what the
data path would enforce, not of two texts. Reading changes nothing."""

import ctypes
import dataclasses
import ipaddress

from ..config import BAN_SCOPES, format_duration
from ..kernel import layout
from ..kernel.lock import map_lock
from ..kernel.maps import live_sequences
from ..policy.policy import compile_policy

BAN_SCOPE_NAMES = {number: name for name, number in BAN_SCOPES.items()}


@dataclasses.dataclass(frozen=True)
class PolicyView:
    """One bank as the operator wrote it."""

    settings: dict    # "mode", "strict", "answer", "ban", "spa rates" -> shown value
    sequences: dict   # name -> (uid, shown definition)
    guarded: frozenset
    spa_ports: frozenset
    allow: frozenset
    deny: frozenset


def live_view(maps, time_based=frozenset()):
    """The view of the live bank (under the map lock: no reload flips it mid-read).
    time_based: names whose knocks the running controller rotates (see bank_view)."""
    with map_lock(maps):
        bank = maps.active_bank()
        seqs = live_sequences(maps)
        ports = {(key.proto, key.port): val for key, val in maps.ports.items() if key.bank == bank}
        allow = [key for key in maps.allow.keys() if key.bank & 1 == bank]
        deny = [key for key in maps.deny.keys() if key.bank & 1 == bank]
        settings = maps.settings.lookup(ctypes.c_uint32(bank)) or layout.Settings()
    return bank_view(seqs, ports, allow, deny, settings, time_based)


def config_view(config, bank):
    """The view of the bank config compiles to."""
    policy = compile_policy(config, bank)
    seqs = {slot: seq for slot, seq in policy.seqs.items() if seq.nsteps}
    return bank_view(seqs, policy.ports, policy.allow, policy.deny, policy.settings, time_based_names(config))


def time_based_names(config):
    return frozenset(seq.name for seq in config.sequences if seq.totp is not None)


def bank_view(seqs, ports, allow, deny, settings, time_based=frozenset()):
    """seqs: slot -> layout.Seq; ports: (proto, port) -> layout.PortVal;
    allow, deny: layout.LpmKey lists; settings: layout.Settings. A time-based
    sequence is in the bank once per live window, under one name, with ports
    that change with the clock: its knock is shown as "time-based", not
    compared port by port."""
    steps = {slot: {} for slot in seqs}
    for (proto, port), val in ports.items():
        if not val.flags & layout.PORT_KNOCK:
            continue
        for entry in val.seqs[: val.nseqs]:
            for index in range(layout.MAX_STEPS):
                if entry.step_mask & (1 << index) and entry.slot in steps:
                    steps[entry.slot][index] = step_text(proto, port)
    sequences = {}
    for slot, seq in seqs.items():
        name = seq.name.decode(errors="replace")
        knock = " ".join(steps[slot].get(i, "?") for i in range(seq.nsteps))
        uid = seq.uid
        if name in time_based:
            knock, uid = f"time-based, {seq.nsteps} steps", None
        opened = " ".join(step_text(o.proto, o.port) for o in seq.open[: seq.nopen])
        shown = (f"{knock} -> {opened} (step {format_duration(seq.step_timeout_ns)}, "
                 f"open {format_duration(seq.open_for_ns)}, idle {format_duration(seq.idle_timeout_ns)})")
        sequences[name] = (uid, shown)
    return PolicyView(
        settings=settings_shown(settings),
        sequences=sequences,
        guarded=frozenset(step_text(*key) for key, val in ports.items() if val.flags & layout.PORT_GUARDED),
        spa_ports=frozenset(step_text(*key) for key, val in ports.items() if val.flags & layout.PORT_SPA),
        allow=frozenset(network_of(key) for key in allow),
        deny=frozenset(network_of(key) for key in deny),
    )


def settings_shown(settings):
    """The settings an operator writes, as the config says them. The host's
    answer values (TTL, ICMP limits) and the hash seed are left out: they come
    from the host, not from the file."""
    shown = {
        "mode": "monitor" if settings.mode == layout.MODE_MONITOR else "enforce",
        "strict": "true" if settings.flags & layout.SET_STRICT else "false",
        "answer": "closed" if settings.flags & layout.SET_ANSWER else "drop",
        "ban": "none",
        "spa rates": "none",
    }
    if settings.flags & layout.SET_BANS:
        shown["ban"] = (f"after {settings.ban_after} within {format_duration(settings.ban_within_ns)} "
                        f"for {format_duration(settings.ban_for_ns)}, scope "
                        f"{BAN_SCOPE_NAMES.get(settings.ban_scope, settings.ban_scope)}")
    if settings.spa_cost_ns:
        shown["spa rates"] = (f"{settings.spa_burst_ns // settings.spa_cost_ns}/s per source, "
                              f"{settings.spa_cpu_burst_ns // max(settings.spa_cpu_cost_ns, 1)}/s per CPU")
    return shown


def step_text(proto, port):
    return "icmp" if proto == layout.PROTO_ICMP else f"{layout.PROTO_NAMES[proto]}:{port}"


def network_of(key):
    """The network an LPM key of the allow or deny trie holds."""
    prefix = key.prefixlen - 8
    if key.bank & layout.LPM_IPV4:
        return str(ipaddress.ip_network(f"{ipaddress.IPv4Address(bytes(key.prefix[:4]))}/{prefix}"))
    return str(ipaddress.ip_network(f"{ipaddress.IPv6Address(bytes(key.prefix))}/{prefix}"))


def changes(live, wanted):
    """Lines saying what going from live to wanted adds (+), removes (-) and
    changes (~); [] when they enforce the same."""
    lines = []
    for name in live.settings:
        if live.settings[name] != wanted.settings[name]:
            lines.append(f"~ {name}: {live.settings[name]} -> {wanted.settings[name]}")
    for name in sorted(live.sequences.keys() - wanted.sequences.keys()):
        lines.append(f"- sequence {name}: {live.sequences[name][1]}")
    for name in sorted(wanted.sequences.keys() - live.sequences.keys()):
        lines.append(f"+ sequence {name}: {wanted.sequences[name][1]}")
    for name in sorted(live.sequences.keys() & wanted.sequences.keys()):
        (old_uid, old), (new_uid, new) = live.sequences[name], wanted.sequences[name]
        if old != new:
            # The uid hashes name and knock: a new uid starts everyone's progress afresh.
            afresh = "; knocks in progress start afresh" if old_uid != new_uid else ""
            lines.append(f"~ sequence {name}: {old} => {new}{afresh}")
    for what, old, new in (("guarded", live.guarded, wanted.guarded), ("spa port", live.spa_ports, wanted.spa_ports),
                           ("allow", live.allow, wanted.allow), ("deny", live.deny, wanted.deny)):
        lines += [f"- {what} {item}" for item in sorted(old - new)]
        lines += [f"+ {what} {item}" for item in sorted(new - old)]
    return lines


def policy_changes(maps, config):
    """What applying config to the filter behind maps would change (see changes())."""
    live = live_view(maps, time_based_names(config))
    return changes(live, config_view(config, maps.active_bank()))
