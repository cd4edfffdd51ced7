"""From a validated config to the maps, without ever exposing half a policy.

compile_policy() is pure: it turns a Config into the desired contents of one
policy bank. apply_policy() writes them into the bank that is not live, flips
the one index that selects the live bank, then clears the old bank. A packet
sees either the old policy or the new one, never a mix; a failure before the
flip leaves the running policy untouched.
"""

import ctypes
import ipaddress
import os
import time
from dataclasses import dataclass, field

from ..config import BAN_SCOPES, spa_config
from ..errors import XknockError
from ..kernel import bpfsys, layout
from ..kernel.lock import map_lock
from . import answers, hints, totp
from .uid import sequence_uid

# After the flip, programs already running may still read the old bank. XDP
# runs to completion in softirq context within microseconds; this is ample.
FLIP_GRACE_S = 0.01


@dataclass
class Policy:
    """The desired contents of one bank."""

    bank: int
    settings: layout.Settings
    seqs: dict = field(default_factory=dict)    # slot -> layout.Seq
    ports: dict = field(default_factory=dict)   # (proto, port) -> layout.PortVal
    allow: list = field(default_factory=list)   # layout.LpmKey
    deny: list = field(default_factory=list)
    port_flags: list = field(default_factory=list)   # words of the bank's hint arrays (policy/hints.py)
    list_bits: list = field(default_factory=list)


def lpm_key(network, bank):
    """The trie key of network in bank: an IPv4 network's address in the
    first 4 bytes, so that its lookups compare 40 bits at most (bpf source_key)."""
    network = ipaddress.ip_network(network)
    key = layout.LpmKey()
    key.prefixlen = 8 + network.prefixlen
    key.bank = bank | (layout.LPM_IPV4 if network.version == 4 else 0)
    packed = network.network_address.packed
    ctypes.memmove(key.prefix, packed, len(packed))
    return key


def compile_policy(config, bank, cpus=None, host=None):
    """cpus: how many CPUs share the SPA total rate (default: those online);
    host: answers.HostAnswers (default: read from this host's sysctls).
    Time-based sequences become their live windows' sequences (policy/totp.py)."""
    if any(seq.totp is not None for seq in config.sequences):
        config = totp.Rotation(config).concrete()
    settings = layout.Settings()
    settings.mode = layout.MODES[config.mode]
    settings.flags = (layout.SET_HAS_ALLOW if config.allow else 0) | (layout.SET_HAS_DENY if config.deny else 0)
    if config.strict:
        settings.flags |= layout.SET_STRICT
    if config.guards_ports() and config.ipsec == "drop":
        settings.flags |= layout.SET_DROP_IPSEC
    if config.guards_ports() and config.other_transports == "drop":
        settings.flags |= layout.SET_DROP_TRANSPORTS
    answers.fill_settings(settings, config, host or answers.read_host())
    if config.ban:
        settings.flags |= layout.SET_BANS
        settings.ban_after = config.ban.after
        settings.ban_scope = BAN_SCOPES[config.ban.scope]
        settings.ban_within_ns = config.ban.within_ns
        settings.ban_for_ns = config.ban.for_ns
    policy = Policy(bank=bank, settings=settings)

    uids = set()
    for index, seq in enumerate(config.sequences):
        slot = bank * layout.MAX_SEQUENCES + index
        uid = sequence_uid(seq)
        while uid in uids:   # two sequences hashing alike: nudge, deterministically
            uid = (uid + 1) & 0xFFFFFFFF or 1
        uids.add(uid)
        entry = layout.Seq()
        entry.uid = uid
        entry.nsteps = len(seq.knock)
        entry.step_timeout_ns = seq.step_timeout_ns
        entry.open_for_ns = seq.open_for_ns
        entry.idle_timeout_ns = seq.idle_timeout_ns
        entry.nopen = len(seq.open)
        for i, step in enumerate(seq.open):
            entry.open[i].proto = layout.PROTO_NUMBERS[step.proto]
            entry.open[i].port = step.port
        entry.name = seq.name.encode()
        policy.seqs[slot] = entry

        for step_index, step in enumerate(seq.knock):
            val = _port(policy, step)
            val.flags |= layout.PORT_KNOCK
            for i in range(val.nseqs):
                if val.seqs[i].slot == slot:
                    val.seqs[i].step_mask |= 1 << step_index
                    break
            else:
                val.seqs[val.nseqs].slot = slot
                val.seqs[val.nseqs].step_mask = 1 << step_index
                val.nseqs += 1
        for step in seq.open:
            _port(policy, step).flags |= layout.PORT_GUARDED

    if config.spa is not None:
        spa_config.fill_settings(settings, config.spa, cpus or os.cpu_count() or 1)
        _port(policy, config.spa.port_step).flags |= layout.PORT_SPA
        for step in config.spa.guarded:
            _port(policy, step).flags |= layout.PORT_GUARDED

    # strict mode: a source stays "knocking" as long as any step may still follow
    settings.knock_window_us = max((seq.step_timeout_ns // 1000 for seq in config.sequences), default=0)
    policy.allow = [lpm_key(net, bank) for net in config.allow]
    policy.deny = [lpm_key(net, bank) for net in config.deny]
    policy.port_flags, policy.list_bits = hints.bank_words(policy.ports, config.allow, config.deny)
    return policy


def _port(policy, step):
    key = (layout.PROTO_NUMBERS[step.proto], step.port)
    if key not in policy.ports:
        policy.ports[key] = layout.PortVal()
    return policy.ports[key]


def apply_policy(maps, config, host=None):
    """Make config the live policy (host: as for compile_policy). Returns the
    bank now live."""
    with map_lock(maps):
        live = maps.active_bank()
        target = 1 - live
        policy = compile_policy(config, target, host=host)
        # Copies of list entries (bpf/xknock_hints.h, list_cache) were taken
        # under the word's old value: none of the target bank's old entries counts again.
        maps.advance_epoch(layout.EPOCH_LISTS)
        _clear_bank(maps, target)
        try:
            _write_bank(maps, policy)
        except bpfsys.MapFull as err:
            _clear_bank(maps, target)
            raise XknockError(
                f"the new policy does not fit the maps ({err}); nothing was changed. "
                "Shorten the lists, or rebuild with larger limits (see docs/configuration.md)"
            ) from err
        except Exception:
            _clear_bank(maps, target)
            raise
        control = maps.control.lookup(ctypes.c_uint32(0))
        control.active_bank = target
        maps.control.update(ctypes.c_uint32(0), control)
        time.sleep(FLIP_GRACE_S)
        _clear_bank(maps, live)
        _forget_stats_except(maps, {seq.uid for seq in policy.seqs.values()})
        return target


def _write_bank(maps, policy):
    for i in range(layout.MAX_SEQUENCES):
        slot = policy.bank * layout.MAX_SEQUENCES + i
        maps.seqs.update(ctypes.c_uint32(slot), policy.seqs.get(slot, layout.Seq()))
    for (proto, port), val in policy.ports.items():
        key = layout.PortKey(bank=policy.bank, proto=proto, port=port)
        maps.ports.update(key, val)
    one = ctypes.c_uint32(1)
    for key in policy.allow:
        maps.allow.update(key, one)
    for key in policy.deny:
        maps.deny.update(key, one)
    hints.write(maps.port_flags, policy.bank, policy.port_flags)
    hints.write(maps.list_bits, policy.bank, policy.list_bits)
    # Per-sequence counters: created before the sequence goes live; kept when
    # an unchanged sequence (same uid) survives the reload.
    for seq in policy.seqs.values():
        try:
            maps.seqstats.update(ctypes.c_uint32(seq.uid), [layout.SeqStats()] * maps.seqstats.cpus,
                                 bpfsys.BPF_NOEXIST)
        except bpfsys.KeyExists:
            pass
    maps.settings.update(ctypes.c_uint32(policy.bank), policy.settings)


def _clear_bank(maps, bank):
    for m in (maps.ports, maps.allow, maps.deny):
        m.delete_where(lambda key: key.bank & 1 == bank)
    hints.clear(maps, bank)
    for i in range(layout.MAX_SEQUENCES):
        maps.seqs.update(ctypes.c_uint32(bank * layout.MAX_SEQUENCES + i), layout.Seq())


def _forget_stats_except(maps, uids):
    maps.seqstats.delete_where(lambda key: key.value not in uids)
