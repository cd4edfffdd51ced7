"""Whole maps read in batches (kernel/batch.py chunks(), Map.items()): the
same entries as get_next_key and a lookup per entry, on the real program's
maps; an empty map; a map changing underneath; the fallback for a kernel
or map type without batch lookup; the lists built on them."""

import ctypes
import errno
import random

import pytest

from xknock.controller.kernel import batch, bpfsys, layout
from xknock.controller.kernel.maps import to_addr
from xknock.controller.state import bans, grants


def _old_walk(m):
    """{key bytes: value bytes} by get_next_key and a lookup per entry, as before batches."""
    found, key = {}, None
    while True:
        next_key = m.key_type()
        if not bpfsys.map_next_key(m.fd, key, next_key):
            return found
        value = (ctypes.c_uint8 * m.element_size())()
        if bpfsys.map_lookup(m.fd, next_key, value):
            found[bytes(next_key)] = bytes(value)
        key = next_key


def _as_bytes(value):
    return b"".join(bytes(v) for v in value) if isinstance(value, list) else bytes(value)


def _items(m):
    seen = [(bytes(k), _as_bytes(v)) for k, v in m.items()]
    assert len(seen) == len({k for k, _ in seen}), "a key twice"
    return dict(seen)


def _grant_key(i):
    return layout.GrantKey(src=to_addr(f"2001:db8::{i // 65536:x}:{i % 65536:x}"), proto=layout.PROTO_TCP, port=22)


def _fill_grants(xk, count, now):
    for i in range(count):
        xk.maps.grants.update(_grant_key(i), layout.Grant(window_end_ns=now + 10**9 * (i % 7), idle_timeout_ns=10**9,
                                                         last_seen_ns=now - 10**9 * (i % 3), seq_uid=i))


@pytest.fixture
def no_batch(monkeypatch):
    """A kernel without batch lookup: every call fails as such a kernel's does."""
    def without(code):
        def fn(*args):
            ctypes.set_errno(code)
            return -code
        monkeypatch.setattr(batch, "_lookup_batch", lambda: fn)
    return without


@pytest.mark.parametrize("count", [0, 1, 4095, 4096, 10_000])
def test_batches_read_the_entries_the_old_walk_reads(xk, count):
    _fill_grants(xk, count, xk.now_ns)
    assert _items(xk.maps.grants) == _old_walk(xk.maps.grants)
    assert len(_items(xk.maps.grants)) == count


def test_lru_and_per_cpu_maps_too(xk):
    for i in range(300):
        key = layout.ProgressKey(src=to_addr(f"10.1.{i // 256}.{i % 256}"), uid=7)
        xk.maps.progress.update(key, ctypes.c_uint64(i << 8 | 1))
    stats = xk.maps.seqstats
    for uid in (11, 12, 13):
        stats.update(ctypes.c_uint32(uid), [layout.SeqStats(advanced=uid * 10 + cpu) for cpu in range(stats.cpus)])
    assert _items(xk.maps.progress) == _old_walk(xk.maps.progress) and len(_items(xk.maps.progress)) == 300
    assert _items(stats) == _old_walk(stats)
    assert {k.value: [v.advanced for v in per_cpu] for k, per_cpu in stats.items()}[12] == \
        [120 + cpu for cpu in range(stats.cpus)]


@pytest.mark.parametrize("walked", [False, True])
def test_an_lpm_trie_too(xk, no_batch, walked):
    """The allow list (older kernels have no batch lookup on LPM tries: walked)."""
    before = _old_walk(xk.maps.allow)
    if walked:
        no_batch(errno.EINVAL)
    assert before and _items(xk.maps.allow) == before   # the example's allow list


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, 524])
def test_without_batch_lookup_the_same_entries_are_walked(xk, no_batch, code):
    _fill_grants(xk, 5000, xk.now_ns)
    before = _old_walk(xk.maps.grants)
    no_batch(code)
    assert _items(xk.maps.grants) == before


def test_another_error_is_not_taken_for_a_missing_batch_lookup(xk, no_batch):
    _fill_grants(xk, 10, xk.now_ns)
    no_batch(errno.EPERM)
    with pytest.raises(bpfsys.BpfError, match="map batch lookup"):
        list(xk.maps.grants.items())


def test_a_map_changing_underneath(xk):
    """Entries deleted and written between two batches: no error, no key twice,
    every entry there all along seen, none deleted before the read began."""
    _fill_grants(xk, 12_000, xk.now_ns)
    rng = random.Random(5)
    doomed = set(rng.sample(range(12_000), 4000))
    seen, changed = [], False
    for key, _ in xk.maps.grants.items():
        seen.append(bytes(key))
        if not changed:      # after the first batch: delete a third, write as many new ones
            for i in doomed:
                xk.maps.grants.delete(_grant_key(i))
            for i in range(20_000, 24_000):
                xk.maps.grants.update(_grant_key(i), layout.Grant())
            changed = True
    assert len(seen) == len(set(seen))
    kept = {bytes(_grant_key(i)) for i in range(12_000) if i not in doomed}
    assert kept <= set(seen)
    assert set(seen) <= kept | {bytes(_grant_key(i)) for i in doomed} | {bytes(_grant_key(i)) for i in range(20_000, 24_000)}


def _old_knocks(maps, now_us):
    """knocks_in_progress's count of the progress map, the old way."""
    seqs = {}
    for slot in range(2 * layout.MAX_SEQUENCES):
        seq = maps.seqs.lookup(ctypes.c_uint32(slot))
        if seq is not None and seq.nsteps and slot // layout.MAX_SEQUENCES == maps.active_bank():
            seqs[seq.uid] = seq
    count = 0
    for raw, value in _old_walk(maps.progress).items():
        key, state = layout.ProgressKey.from_buffer_copy(raw), int.from_bytes(value, "little")
        seq = seqs.get(key.uid)
        step, ts = layout.progress_step(state), layout.progress_ts_us(state)
        if seq is not None and 0 < step < seq.nsteps and now_us - ts <= seq.step_timeout_ns // 1000:
            count += 1
    return count


@pytest.mark.parametrize("walked", [False, True])
def test_lists_on_batches_and_walked_say_the_same(xk, no_batch, walked):
    from xknock.controller.kernel.maps import live_sequences

    now, now_us = xk.now_ns, xk.now_ns // 1000
    ssh = next(seq for seq in live_sequences(xk.maps).values() if seq.name == b"ssh")
    for i in range(3000):   # steps 0..3, some timed out, some of a sequence not live
        key = layout.ProgressKey(src=to_addr(f"10.2.{i // 256}.{i % 256}"), uid=ssh.uid if i % 5 else 12345)
        age_us = (i % 4) * ssh.step_timeout_ns // 1000 // 2
        xk.maps.progress.update(key, ctypes.c_uint64(((now_us - age_us) << 8) | (i % 4)))
    _fill_grants(xk, 500, now)
    xk.maps.bans.update(to_addr("192.0.2.1"), layout.Ban(until_ns=now + 10**9, since_ns=now))
    xk.maps.bans.update(to_addr("192.0.2.2"), layout.Ban(until_ns=now - 1, since_ns=now - 10**9))
    expected = _old_knocks(xk.maps, now_us)
    assert expected > 0
    if walked:
        no_batch(errno.EINVAL)
    total, shown = grants.knocks_in_progress(xk.maps, limit=10, now=now)
    assert total == expected and len(shown) == 10
    assert all(name == "ssh" and 0 < step < ssh.nsteps for _, name, step, _ in shown)
    assert len(grants.list_grants(xk.maps, now=now)) == 500
    assert [str(b.source) for b in bans.list_bans(xk.maps, now=now)] == ["192.0.2.1"]
    assert grants.expire_grants(xk.maps, now=now) == sum(1 for i in range(500) if i % 7 == 0 and i % 3)
    assert bans.expire_bans(xk.maps, now=now) == 1
    assert grants.revoke(xk.maps, "10.2.0.1") == 0 and grants.revoke(xk.maps, "2001:db8::0:1") == 1
    assert not any(bytes(k.src.b) == bytes(to_addr("10.2.0.1").b) for k in xk.maps.progress.keys())


def test_the_bulk_grant_lists_are_the_views_built_one_by_one(xk):
    # list_grants, first_live_grants (top) and live_grant_texts (status) decode
    # the batches' buffers in bulk: the same grants, in the same order, as a
    # view made from each entry's ctypes objects and sorted by its text.
    from xknock.controller.kernel.maps import from_addr

    now = xk.now_ns
    _fill_grants(xk, 500, now)
    for text in ("10.9.0.2", "10.9.0.10", "::1", "::", "::10.9.0.3", "2001:db8::5", "2001:0:0:1::1", "fe80::1:0:0:2"):
        xk.maps.grants.update(layout.GrantKey(src=to_addr(text), proto=layout.PROTO_UDP, port=53),
                              layout.Grant(window_end_ns=now + 10**9, idle_timeout_ns=10**9, last_seen_ns=now,
                                           flags=layout.GRANT_SPA))
    one_by_one = sorted(((str(from_addr(k.src)), layout.PROTO_NAMES[k.proto], k.port), k, v)
                        for k, v in ((k, v) for k, v in xk.maps.grants.items()))
    listed = grants.list_grants(xk.maps, now=now)
    assert [(str(g.source), g.proto, g.port) for g in listed] == [key for key, _, _ in one_by_one]
    assert [g.source for g in listed] == [from_addr(k.src) for _, k, _ in one_by_one]
    assert [g.sequence for g in listed] == ["spa" if v.flags else "operator" if v.seq_uid == 0 else f"uid {v.seq_uid:#x}"
                                            for _, _, v in one_by_one]
    alive = [g for g in listed if g.alive]
    assert 0 < len(alive) < len(listed)
    assert grants.first_live_grants(xk.maps, 20, now=now) == (len(alive), alive[:20])
    assert grants.live_grant_texts(xk.maps, now=now) == [
        (str(g.source), g.proto, g.port, g.window_left_s, g.idle_left_s, g.sequence) for g in alive]
