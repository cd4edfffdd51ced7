"""Grants written, listed, revoked and expired by the controller.

The data path writes grants when a sequence completes and removes dead ones it
meets; the controller writes the operator's grants, revokes, and sweeps the
dead grants nobody touched again, so the map does not fill with them.
"""

import ctypes
import errno
import heapq
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

from ..errors import XknockError
from ..kernel import bpfsys, firsts, layout
from ..kernel.clock import monotonic_ns
from ..kernel.granted import GrantedView
from ..kernel.lock import map_lock
from ..kernel.maps import from_addr, live_sequences, to_addr


class GrantsFull(XknockError):
    """The grants map has no room: nothing was written."""


@dataclass
class GrantView:
    source: object
    proto: str
    port: int
    window_left_s: float     # new connections accepted this much longer (0: closed)
    idle_left_s: float       # alive this much longer without traffic
    sequence: str            # the sequence's name, or "operator"

    @property
    def alive(self):
        return self.window_left_s > 0 or self.idle_left_s > 0


def guarded_ports(maps):
    """[(proto name, port)] guarded by the live policy."""
    bank = maps.active_bank()
    return sorted(
        (layout.PROTO_NAMES[key.proto], key.port)
        for key, val in maps.ports.items()
        if key.bank == bank and val.flags & layout.PORT_GUARDED
    )


def grant(maps, source, ports, for_ns, idle_ns=None, now=None):
    """Open ports (default: every guarded port) to source. Returns the ports."""
    source = ipaddress.ip_address(source)
    guarded = guarded_ports(maps)
    if not ports:
        ports = guarded
        if not ports:
            raise XknockError("the live policy guards no port: there is nothing to grant")
    for proto, port in ports:
        if (proto, port) not in guarded:
            raise XknockError(f"{proto}:{port} is not guarded by the live policy: it is open to everyone already")
    write_grants(maps, source, ports, for_ns, idle_ns if idle_ns is not None else for_ns, now=now)
    return ports


def write_grants(maps, source, ports, for_ns, idle_ns, now=None, seq_uid=0, flags=0):
    """Open [(proto name, port)] to source: new connections for for_ns, and
    established traffic while it is never idle for idle_ns. All or nothing:
    on a full map no entry changes (the new ones are removed again, the
    rewritten ones get their old values back). Counted as the
    operator's, or as SPA's when flags say so."""
    now = monotonic_ns() if now is None else now
    value = layout.Grant()
    value.window_end_ns = now + for_ns
    value.idle_timeout_ns = idle_ns
    value.last_seen_ns = now
    value.seq_uid = seq_uid
    value.flags = flags
    keys = [layout.GrantKey(src=to_addr(ipaddress.ip_address(source)), proto=layout.PROTO_NUMBERS[proto], port=port)
            for proto, port in ports]
    with map_lock(maps):
        # The new keys first, then the ones that exist: a full map refuses a
        # new key only, so a refusal comes before any existing grant changed.
        # Should one change anyway (the data path freed a key in between),
        # the old values are written back: a refused write leaves every
        # entry as it was.
        old = {bytes(key): maps.grants.lookup(key) for key in keys}
        keys.sort(key=lambda key: old[bytes(key)] is not None)
        written = []
        for key in keys:
            try:
                maps.grants.update(key, value)
            except bpfsys.MapFull as err:
                _undo(maps, written, old)
                proto = layout.PROTO_NAMES[key.proto]
                raise GrantsFull(f"the grants map is full ({maps.grants.max_entries} entries): no grant written "
                                 f"for {proto}:{key.port}") from err
            written.append(key)
        mark_granted(maps, [bytes(key.src.b) for key in keys[:1]])
        created = sum(1 for key in keys if old[bytes(key)] is None)
        maps.count_by_controller(_reason(flags), created)


def holds_at_least(current, new):
    """Does the grant current keep its source open as long as new would, on
    both clocks (new connections, and idle traffic)?"""
    return current.window_end_ns >= new.window_end_ns and \
        current.last_seen_ns + current.idle_timeout_ns >= new.last_seen_ns + new.idle_timeout_ns


_NO_BATCH_ERRNOS = {errno.EINVAL, errno.EOPNOTSUPP, 524}   # 524: the kernel's ENOTSUPP


def write_batch(maps, entries):
    """[(GrantKey, Grant)] written under one map lock, with as few
    BPF_MAP_UPDATE_BATCH calls as the map allows (an update each where the
    kernel has no batch for it). Keys must be distinct. An entry whose key
    holds at least as much already (holds_at_least) is left as it is, never
    shortened; one the full map refuses (a new key) is skipped and the rest
    written. Counted as write_grants counts. Returns (indexes written,
    indexes refused by the full map)."""
    written, refused = [], []
    with map_lock(maps):
        todo = []
        created = {}   # controller reason -> new keys
        for index, (key, value) in enumerate(entries):
            current = maps.grants.lookup(key)
            if current is None or not holds_at_least(current, value):
                todo.append((index, current is None))
        if not todo:
            return written, refused
        keys = (layout.GrantKey * len(todo))(*(entries[i][0] for i, _ in todo))
        values = (layout.Grant * len(todo))(*(entries[i][1] for i, _ in todo))
        try:
            _write_todo(maps, todo, keys, values, written, refused, created)
        finally:   # also when a batch fails part way: an extra byte costs a lookup, a missing one a grant
            mark_granted(maps, {bytes(key.src.b) for key in keys})
            maps.grants.changed()   # the batches wrote through the fd: no CPU's old copy counts
        for reason, n in created.items():
            maps.count_by_controller(reason, n)
    return written, refused


def _write_todo(maps, todo, keys, values, written, refused, created):
    """The batches of write_batch: the indexes written and refused, new keys by reason, added as they go."""
    start = 0
    while start < len(todo):
        done, err = bpfsys.map_update_batch_from(maps.grants.fd, keys, values, start, len(todo) - start)
        if err in _NO_BATCH_ERRNOS and done == 0:
            done, err = _update_one(maps, keys[start], values[start])
        written += [todo[i][0] for i in range(start, start + done)]
        for i in range(start, start + done):
            if todo[i][1]:
                reason = _reason(values[i].flags)
                created[reason] = created.get(reason, 0) + 1
        start += done
        if err == errno.E2BIG:
            refused.append(todo[start][0])
            start += 1
        elif err:
            raise bpfsys.BpfError(err, f"map batch update: {os.strerror(err)}")


def _update_one(maps, key, value):
    """One entry through BPF_MAP_UPDATE_ELEM: (1, 0) or (0, its errno)."""
    try:
        maps.grants.update(key, value)
    except bpfsys.BpfError as err:
        return 0, err.errno
    return 1, 0


def _reason(flags):
    return layout.Reason.SPA_GRANT_CREATED if flags & layout.GRANT_SPA else layout.Reason.GRANT_OPERATOR


def _undo(maps, written, old):
    """Puts back what write_grants changed: deletes the keys it created and
    writes the old value of those it rewrote."""
    for key in written:
        before = old[bytes(key)]
        if before is None:
            maps.grants.delete(key)
        else:
            try:
                maps.grants.update(key, before)
            except bpfsys.MapFull:   # an existing key cannot need room; never seen
                maps.grants.delete(key)


def revoke(maps, source):
    """End every grant and knock in progress of source. Returns grants removed."""
    wanted = bytes(to_addr(ipaddress.ip_address(source)).b)
    with map_lock(maps):
        removed = maps.grants.delete_where(lambda key: bytes(key.src.b) == wanted)
        maps.progress.delete_where(lambda key: bytes(key.src.b) == wanted)
        firsts.forget(maps, source, [seq.uid for seq in live_sequences(maps).values()])
        maps.count_by_controller(layout.Reason.GRANT_REMOVED, removed)
    return removed


# The grants map's entries as the batches lay them out: decoded in bulk, not
# as two ctypes objects and an ipaddress object per entry (seconds at 64k).
_GRANT_KEY = struct.Struct("=16sBxH")      # layout.GrantKey: src, proto, pad, port
_GRANT = struct.Struct("=QQQII")           # layout.Grant: window_end, idle_timeout, last_seen, seq_uid, flags
assert _GRANT_KEY.size == ctypes.sizeof(layout.GrantKey) and _GRANT.size == ctypes.sizeof(layout.Grant)
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _address_text(raw):
    """str(from_addr(raw)) for 16 bytes of layout.Addr, through inet_ntop."""
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    if raw[:12] == bytes(12):   # ::/96: inet_ntop writes a dotted quad where ipaddress does not
        return str(ipaddress.IPv6Address(raw))
    return socket.inet_ntop(socket.AF_INET6, raw)


def _grant_rows(maps, now):
    """[(source text, proto name, port, window left s, idle left s, seq_uid, flags, raw source)]."""
    rows = []
    for n, keys, values in maps.grants.chunks():
        entries = zip(_GRANT_KEY.iter_unpack(memoryview(keys)[: n * _GRANT_KEY.size]),
                      _GRANT.iter_unpack(memoryview(values)[: n * _GRANT.size]))
        for (src, proto, port), (window_end, idle_timeout, last_seen, seq_uid, flags) in entries:
            rows.append((_address_text(src), layout.PROTO_NAMES.get(proto, str(proto)), port,
                         max(0, window_end - now) / 1e9, max(0, last_seen + idle_timeout - now) / 1e9,
                         seq_uid, flags, src))
    return rows


def _view(row, names):
    text, proto, port, window_left_s, idle_left_s, seq_uid, flags, src = row
    return GrantView(source=from_addr(layout.Addr.from_buffer_copy(src)), proto=proto, port=port,
                     window_left_s=window_left_s, idle_left_s=idle_left_s,
                     sequence=_origin(seq_uid, flags, names))


def _sequence_names(maps):
    return {seq.uid: seq.name.decode(errors="replace") for seq in live_sequences(maps).values()}


def list_grants(maps, now=None):
    """Every grant as a GrantView, by source (as text), protocol and port."""
    now = monotonic_ns() if now is None else now
    names = _sequence_names(maps)
    return [_view(row, names) for row in sorted(_grant_rows(maps, now), key=lambda r: r[:3])]


def live_grant_texts(maps, now=None):
    """The live grants in list_grants' order, their sources as text:
    [(source, proto, port, window left s, idle left s, origin)], no address objects (status, `xknock grants`)."""
    now = monotonic_ns() if now is None else now
    names = _sequence_names(maps)
    alive = sorted((row for row in _grant_rows(maps, now) if row[3] > 0 or row[4] > 0), key=lambda r: r[:3])
    return [(text, proto, port, window, idle, _origin(uid, flags, names))
            for text, proto, port, window, idle, uid, flags, _ in alive]


def first_live_grants(maps, limit, now=None):
    """(how many grants are alive, the first `limit` of them in list_grants' order):
    what `xknock top` shows, without a view of every grant."""
    now = monotonic_ns() if now is None else now
    alive = [row for row in _grant_rows(maps, now) if row[3] > 0 or row[4] > 0]
    names = _sequence_names(maps)
    return len(alive), [_view(row, names) for row in heapq.nsmallest(limit, alive, key=lambda r: r[:3])]


def _origin(seq_uid, flags, names):
    if flags & layout.GRANT_SPA:
        return "spa"
    if seq_uid == 0:
        return "operator"
    return names.get(seq_uid, f"uid {seq_uid:#x}")


def grant_dead(grant, now):
    """Dead on both clocks, as the data path judges a grant: past its window
    for new connections and idle for longer than its idle timeout."""
    return now >= grant.window_end_ns and now >= grant.last_seen_ns + grant.idle_timeout_ns


def expire_grants(maps, now=None):
    """Delete grants dead on both clocks, then rebuild `granted` if any were
    (or it was never built). Returns how many."""
    now = monotonic_ns() if now is None else now
    with map_lock(maps):
        removed = maps.grants.delete_where(lambda key: (grant := maps.grants.lookup(key)) is not None and grant_dead(grant, now))
        maps.count_by_controller(layout.Reason.GRANT_REMOVED, removed)
        with GrantedView(maps.granted) as view:
            if removed or view.live_half is None:
                _rebuild(maps, view)
    return removed


# `granted` (bpf/xknock_hints.h): a byte per source slot, set for every source
# that holds a grant, so that a guarded port's packet from any other source
# is dropped without a miss in the grants hash. Whoever writes a grant sets
# the byte afterwards, in both halves; only a rebuild clears, and only the
# idle half.

GRANTED_GRACE_S = 0.01   # after a flip, far above an XDP run that read the old selector


def mark_granted(maps, raw_sources):
    """Set the bytes of sources (16 bytes of layout.Addr each) whose grants were just written."""
    with GrantedView(maps.granted) as view:
        view.mark(raw_sources)


def rebuild_granted(maps):
    """Clear the idle half of `granted`, set the byte of every grant the map
    holds, make that half the live one. A grant the data path writes
    meanwhile sets its byte after its write: before the clear, and the scan
    finds the grant; after, and the byte stays."""
    with map_lock(maps), GrantedView(maps.granted) as view:
        _rebuild(maps, view)


def _rebuild(maps, view):
    live = view.live_half
    idle = 0 if live is None else 1 - live
    view.clear(idle)
    sources = set()
    for n, keys, _ in maps.grants.chunks():
        raw = memoryview(keys)[: n * _GRANT_KEY.size]
        sources.update(src for src, _, _ in _GRANT_KEY.iter_unpack(raw))
    view.mark(sources, halves=(idle,))
    view.set_live(idle)
    time.sleep(GRANTED_GRACE_S)   # the next rebuild clears what was live until now


# layout.ProgressKey in 32-bit words: src (4), uid
_PROGRESS_UID_WORD = layout.ProgressKey.uid.offset // 4
_PROGRESS_KEY_WORDS = ctypes.sizeof(layout.ProgressKey) // 4


def knocks_in_progress(maps, limit=50, now=None):
    """(total, [(source, sequence name, next step, seconds since last step)]) for
    progress not yet completed or timed out, at most `limit` listed. Sources
    at their first step are counted but not listed: the first-step filter
    keeps a hash of the source, not the source."""
    now_us = (monotonic_ns() if now is None else now) // 1000
    seqs = {seq.uid: seq for seq in live_sequences(maps).values()}
    longest_us = max((seq.step_timeout_ns // 1000 for seq in seqs.values() if seq.nsteps > 1), default=0)
    total, shown = firsts.fresh(maps, longest_us, now_us), []
    # Per sequence: its step count, and the lowest state (ts_us << 8 | step)
    # not timed out: a state below it stepped longer ago than the timeout.
    floors = {uid: (seq.nsteps, max(now_us - seq.step_timeout_ns // 1000, 0) << 8) for uid, seq in seqs.items()}
    floor_of = floors.get
    # Read from the batches' buffers as (uid, state) integers: a million
    # entries as ctypes objects (or a call per field) take seconds.
    for n, keys, values in maps.progress.chunks():
        uids = memoryview(keys).cast("B")[: n * 4 * _PROGRESS_KEY_WORDS].cast("I")[_PROGRESS_UID_WORD::_PROGRESS_KEY_WORDS]
        states = memoryview(values).cast("B")[: n * 8].cast("Q")
        # step = state & 0xff (layout.progress_step), its time state >> 8 (progress_ts_us)
        listed = [i for i, (uid, state) in enumerate(zip(uids, states))
                  if (floor := floor_of(uid)) and 0 < (state & 0xFF) < floor[0] and state >= floor[1]]
        total += len(listed)
        for i in listed[: max(limit - len(shown), 0)]:
            key = layout.ProgressKey.from_buffer_copy(keys, i * 4 * _PROGRESS_KEY_WORDS)
            state = states[i]
            shown.append((from_addr(key.src), seqs[key.uid].name.decode(errors="replace"), state & 0xFF,
                          (now_us - (state >> 8)) / 1e6))
    return total, shown
