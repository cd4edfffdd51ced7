"""What `xknock status` reports, gathered from the running filters' maps."""

import ctypes
import json
import os
import time

from ..kernel import layout
from ..kernel.lock import LOCK_DIR
from ..kernel.datapath import attached_filters
from ..kernel.maps import FilterMaps, live_sequences
from . import bans, controller_record, grants


def live_policy(maps):
    """The live bank as the operator wrote it: mode and sequences with steps."""
    bank = maps.active_bank()
    settings = maps.settings.lookup(ctypes.c_uint32(bank))
    seqs = live_sequences(maps)
    steps = {slot: {} for slot in seqs}
    for key, val in maps.ports.items():
        if key.bank != bank or not val.flags & layout.PORT_KNOCK:
            continue
        text = "icmp" if key.proto == layout.PROTO_ICMP else f"{layout.PROTO_NAMES[key.proto]}:{key.port}"
        for entry in val.seqs[: val.nseqs]:
            for index in range(layout.MAX_STEPS):
                if entry.step_mask & (1 << index) and entry.slot in steps:
                    steps[entry.slot][index] = text
    sequences = []
    for slot, seq in sorted(seqs.items()):
        sequences.append({
            "name": seq.name.decode(errors="replace"),
            "knock": [steps[slot].get(i, "?") for i in range(seq.nsteps)],
            "open": [f"{layout.PROTO_NAMES[o.proto]}:{o.port}" for o in seq.open[: seq.nopen]],
            "step_timeout_s": seq.step_timeout_ns / 1e9,
            "open_for_s": seq.open_for_ns / 1e9,
            "idle_timeout_s": seq.idle_timeout_ns / 1e9,
        })
    mode = "monitor" if settings is not None and settings.mode == layout.MODE_MONITOR else "enforce"
    return mode, sequences


def spa_ports(maps):
    """The SPA port of the live policy (a list: empty without [spa])."""
    bank = maps.active_bank()
    return sorted(f"udp:{key.port}" for key, val in maps.ports.items()
                  if key.bank == bank and val.flags & layout.PORT_SPA)


def strict_mode(maps):
    """Does the live bank reset knocks on new connections to other ports ([filter] strict)?"""
    settings = maps.settings.lookup(ctypes.c_uint32(maps.active_bank()))
    return bool(settings is not None and settings.flags & layout.SET_STRICT)


def answer_mode(maps):
    """"closed" or "drop": what the live bank sends back for refused packets ([filter] answer)."""
    settings = maps.settings.lookup(ctypes.c_uint32(maps.active_bank()))
    return "closed" if settings is not None and settings.flags & layout.SET_ANSWER else "drop"


# The running controller's cluster node writes its state here about once a
# second (cluster/node.py): `status` runs in another process.
CLUSTER_STALE_S = 10.0


def cluster_status_path(maps):
    return os.path.join(LOCK_DIR, f"cluster-{maps.control.id}.json")


def cluster_status(maps):
    """The cluster node's last report for this filter, or None without [cluster]."""
    try:
        with open(cluster_status_path(maps), encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict):
        return None
    age = time.time() - found.get("written_at", 0)
    found["age_s"] = round(age, 1)
    found["stale"] = age > CLUSTER_STALE_S   # the controller is gone, or stuck
    return found


def filter_status(maps, interfaces, now=None):
    mode, sequences = live_policy(maps)
    in_progress, knocks = grants.knocks_in_progress(maps, now=now)
    return {
        "interfaces": interfaces,
        "mode": mode,
        "strict": strict_mode(maps),
        "answer": answer_mode(maps),
        "sequences": sequences,
        "guarded": [f"{proto}:{port}" for proto, port in grants.guarded_ports(maps)],
        "spa_ports": spa_ports(maps),
        "counters": {reason.name.lower(): value for reason, value in maps.counters_by_reason().items()},
        "grants": live_grants(maps, now=now),
        "bans": live_bans(maps, now=now),
        "knocks_in_progress": in_progress,
        "knocks": [
            {"source": str(src), "sequence": name, "next_step": step, "since_s": round(age, 1)}
            for src, name, step, age in knocks
        ],
        "maps": {m.name: {"max_entries": m.max_entries} for m in maps},
        "cluster": cluster_status(maps),
        **controller_status(maps),
    }


def controller_status(maps):
    """{"controller": the live controller's record, or None}; with a record
    not trusted (stale, a recycled PID), "controller_record_ignored" says why."""
    found, distrust = controller_record.serving(maps.control.id)
    if found is None:
        return {"controller": None, **({"controller_record_ignored": distrust} if distrust else {})}
    keys = ("pid", "version", "interfaces", "config", "config_hash", "mode", "sequences", "started_at", "last_reload")
    return {"controller": {key: found.get(key) for key in keys}}


def live_grants(maps, now=None):
    """The live grants as status and `xknock grants` show them: [dict]."""
    return [
        {"source": source, "port": f"{proto}:{port}", "sequence": origin,
         "window_left_s": round(window_left_s, 1), "idle_left_s": round(idle_left_s, 1)}
        for source, proto, port, window_left_s, idle_left_s, origin in grants.live_grant_texts(maps, now=now)
    ]


def live_bans(maps, now=None):
    """The bans in force as status and `xknock bans` show them: [dict]."""
    return [
        {"source": str(b.source), "left_s": round(b.left_s, 1), "since_s": round(b.since_s, 1)}
        for b in bans.list_bans(maps, now=now)
    ]


def status(ifname=None):
    """[filter status dict] for every filter in this namespace, or the one on ifname."""
    result = []
    for _, atts in attached_filters():
        if ifname and ifname not in [a.ifname for a in atts]:
            continue
        with FilterMaps.from_prog(atts[0].prog_id) as maps:
            interfaces = [{"name": a.ifname, "xdp_mode": a.mode, "prog_id": a.prog_id} for a in atts]
            result.append(filter_status(maps, interfaces))
    return result
