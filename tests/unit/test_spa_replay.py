"""The SPA replay cache (controller/spa/spa_replay.py): durable, survives a
reopen (a controller restart), pruned by message age, and refuses to run on a
file it cannot trust."""

import hashlib
import os
import stat
import subprocess
import sys
import tracemalloc

import pytest

from xknock.controller.spa.spa_replay import HEADER, ReplayCache, ReplayCacheError, ReplayCacheFull


def digest(n):
    return hashlib.sha256(str(n).encode()).digest()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state" / "spa-replay")


def test_created_private_and_survives_reopen(path):
    with ReplayCache(path) as cache:
        assert not cache.seen(digest(1))
        cache.add(digest(1), 1000)
        cache.add(digest(2), 1001)
        cache.add(digest(1), 1000)   # twice: one entry
        assert cache.seen(digest(1)) and len(cache) == 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    with ReplayCache(path) as cache:
        assert cache.seen(digest(1)) and cache.seen(digest(2)) and not cache.seen(digest(3))
        assert len(cache) == 2


def test_add_is_on_disk_before_it_returns(path):
    """A process killed right after add() returns has the digest on disk."""
    code = ("import sys, os; from xknock.controller.spa.spa_replay import ReplayCache; "
            f"c = ReplayCache({path!r}); c.add(bytes(range(32)), 5); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    with ReplayCache(path) as cache:
        assert cache.seen(bytes(range(32)))


def test_prune_drops_stale_entries_and_compacts(path):
    with ReplayCache(path) as cache:
        for n, ts in enumerate((100, 1000, 1100, 1300, 2000)):
            cache.add(digest(n), ts)
        assert cache.prune(now=1200, max_age=120) == 3   # 100, 1000 and 2000 are stale either way
        assert [cache.seen(digest(n)) for n in range(5)] == [False, False, True, True, False]
        assert cache.prune(now=1200, max_age=120) == 0
        cache.add(digest(9), 1200)   # appends still work after the rename
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[0] + b"\n" == HEADER and len(lines) == 5   # header, 3 entries, ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path + ".tmp")
    with ReplayCache(path) as cache:
        assert len(cache) == 3 and cache.seen(digest(9))


def test_corrupt_file_is_an_error(path):
    ReplayCache(path).close()
    with open(path, "ab") as f:
        f.write(b"not a digest line\n")
    with pytest.raises(ReplayCacheError, match="line 2 is corrupt"):
        ReplayCache(path)
    with open(path, "wb") as f:
        f.write(b"something else entirely\n")
    with pytest.raises(ReplayCacheError, match="bad header"):
        ReplayCache(path)


def test_torn_last_line_is_cut_off(path):
    with ReplayCache(path) as cache:
        cache.add(digest(1), 10)
    with open(path, "ab") as f:
        f.write(digest(2).hex().encode()[:20])   # a crash in the middle of an add()
    with ReplayCache(path) as cache:
        assert cache.seen(digest(1)) and not cache.seen(digest(2))
        cache.add(digest(3), 11)
    with ReplayCache(path) as cache:
        assert cache.seen(digest(3)) and len(cache) == 2


def test_unreadable_or_loose_file_is_an_error(path, tmp_path):
    ReplayCache(path).close()
    os.chmod(path, 0o666)
    with pytest.raises(ReplayCacheError, match="chmod 600"):
        ReplayCache(path)
    os.chmod(path, 0o600)
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(ReplayCacheError, match="cannot open"):
        ReplayCache(str(directory))


def test_full_cache_fails_closed(path):
    with ReplayCache(path, max_entries=2) as cache:
        cache.add(digest(1), 1)
        cache.add(digest(2), 1)
        with pytest.raises(ReplayCacheFull):
            cache.add(digest(3), 1)
        assert not cache.seen(digest(3))


def test_memory_per_entry(path):
    """About 145 bytes an entry: 1M entries, about 145 MB (the docstring's figure)."""
    n = 20_000
    with ReplayCache(path) as cache:
        digests = [digest(i) for i in range(n)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i, d in enumerate(digests):
            cache._entries[d] = 1_700_000_000 + i   # memory only: the disk path is measured elsewhere
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
        tracemalloc.stop()
    assert per_entry < 200, per_entry


def test_one_controller_per_cache_file(tmp_path):
    path = str(tmp_path / "replay")
    first = ReplayCache(path)
    try:
        with pytest.raises(ReplayCacheError, match="in use by another xknock controller"):
            ReplayCache(path)
    finally:
        first.close()
    ReplayCache(path).close()   # free again once the first is closed
