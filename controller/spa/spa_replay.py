"""The SPA replay cache: digests of packets already accepted, kept on disk so
that a restart of the controller opens no replay window.

fwknopd keeps the SHA-256 of every packet that passed its HMAC in a digest
cache file (server/replay_cache.c); this is the same idea. The file is text,
one entry a line, "HEX-SHA256 MESSAGE-TIMESTAMP\\n", after a header line. An
add() is appended, flushed and fsync'ed before it returns; prune() drops the
entries whose message is stale anyway (further than max_age from now, so a
replay of it would be refused by its timestamp) and rewrites the file
atomically (a temporary file, fsync, rename, fsync of the directory).

Memory: one dict entry per digest, about 145 bytes (the digest, its time,
the dict slot; tests/unit/test_spa_replay.py checks the bound): 1M entries take
about 145 MB. Only packets with a
valid HMAC are added and prune() keeps only those of the last 2 x max_age, so
1M entries means thousands of authenticated packets a second. At max_entries
add() raises ReplayCacheFull instead of forgetting anything: the caller must
refuse the packet (a full cache fails closed, never open).
"""

import fcntl
import os
import threading

from ..errors import XknockError
from ..kernel.durable import fsync_dir, replace_file

HEADER = b"xknock-spa-replay 1\n"
DEFAULT_MAX_ENTRIES = 1_000_000
DIGEST_BYTES = 32


class ReplayCacheError(XknockError):
    """The cache cannot be read or written: SPA must not run without it."""


class ReplayCacheFull(ReplayCacheError):
    """max_entries digests are held: the packet must be refused."""


class ReplayCache:
    """seen(digest), add(digest, message_timestamp), prune(now, max_age).

    Opening loads the file (creating it, and its directory 0700, when
    missing). ReplayCacheError when it is corrupt, unreadable, or writable by
    others (who could delete entries and replay them)."""

    def __init__(self, path, max_entries=DEFAULT_MAX_ENTRIES):
        self.path = os.path.abspath(path)
        self.max_entries = max_entries
        self._entries = {}
        self._lock = threading.Lock()
        self._file = None
        directory = os.path.dirname(self.path)
        self._lock_file = None
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            self._hold_lock()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as err:
            self.close()
            raise ReplayCacheError(f"replay cache {self.path}: cannot open: {err.strerror}") from None
        self._file = os.fdopen(fd, "a+b", buffering=0)
        try:
            self._check_owner(fd)
            self._load()
        except BaseException:
            self.close()
            raise

    def _hold_lock(self):
        """One controller per cache file: a second one would not see the
        first's digests, and its compaction would drop them. The lock lives
        in a file of its own, since compaction replaces the cache file."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock_file = os.fdopen(fd, "rb", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ReplayCacheError(f"replay cache {self.path}: in use by another xknock controller; give each "
                                   "filter a replay_cache of its own") from None

    def _check_owner(self, fd):
        st = os.fstat(fd)
        if st.st_mode & 0o022:
            raise ReplayCacheError(f"replay cache {self.path}: writable by group or others; "
                                   f"chmod 600 {self.path}")
        if st.st_uid != os.geteuid():
            raise ReplayCacheError(f"replay cache {self.path}: owned by uid {st.st_uid}, not by this user")

    def _load(self):
        self._file.seek(0)
        try:
            data = self._file.read()
        except OSError as err:
            raise ReplayCacheError(f"replay cache {self.path}: cannot read: {err.strerror}") from None
        if not data:
            self._write_durably(HEADER)
            fsync_dir(os.path.dirname(self.path))
            return
        if not data.startswith(HEADER):
            raise ReplayCacheError(f"replay cache {self.path}: not an xknock replay cache (bad header); "
                                   "move it away if it is not needed")
        body = data[len(HEADER):]
        complete, _, torn = body.rpartition(b"\n")
        if torn:
            # An add() cut short by a crash: it never returned, so its packet
            # was never granted. Cut it off so that appends stay line-aligned.
            os.truncate(self._file.fileno(), len(data) - len(torn))
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=2):
            digest, timestamp = _parse_line(line)
            if digest is None:
                raise ReplayCacheError(f"replay cache {self.path}: line {number} is corrupt; "
                                       "SPA refuses to run without a trustworthy cache (move the file away to "
                                       "start afresh, accepting that recent packets could be replayed)")
            self._entries[digest] = timestamp

    def __len__(self):
        return len(self._entries)

    def seen(self, digest):
        return bytes(digest) in self._entries

    def add(self, digest, message_timestamp):
        """Remember digest; on disk before this returns. ReplayCacheFull at
        max_entries, ReplayCacheError when the write fails (the caller must
        then refuse the packet)."""
        digest = bytes(digest)
        if len(digest) != DIGEST_BYTES:
            raise ValueError("a replay digest is 32 bytes (SHA-256)")
        with self._lock:
            if digest in self._entries:
                return
            if len(self._entries) >= self.max_entries:
                raise ReplayCacheFull(f"replay cache {self.path}: full ({self.max_entries} entries)")
            self._write_durably(b"%s %d\n" % (digest.hex().encode(), int(message_timestamp)))
            self._entries[digest] = int(message_timestamp)

    def _write_durably(self, data):
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            raise ReplayCacheError(f"replay cache {self.path}: cannot write: {err.strerror}") from None

    def prune(self, now, max_age):
        """Drop entries with |now - message_timestamp| > max_age (seconds) and
        compact the file atomically. Returns how many were dropped."""
        with self._lock:
            keep = {d: ts for d, ts in self._entries.items() if abs(now - ts) <= max_age}
            dropped = len(self._entries) - len(keep)
            if not dropped:
                return 0
            lines = b"".join(b"%s %d\n" % (d.hex().encode(), ts) for d, ts in keep.items())
            try:
                replace_file(self.path, HEADER + lines)
                replacement = open(self.path, "a+b", buffering=0)
            except OSError as err:
                raise ReplayCacheError(f"replay cache {self.path}: cannot compact: {err.strerror}") from None
            self._file.close()
            self._file = replacement
            self._entries = keep
            return dropped

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_file is not None:
            self._lock_file.close()   # releases the lock
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _parse_line(line):
    digest_hex, space, timestamp = line.partition(b" ")
    if not space or len(digest_hex) != 2 * DIGEST_BYTES or not timestamp.isdigit() or len(timestamp) > 20:
        return None, None
    try:
        return bytes.fromhex(digest_hex.decode("ascii")), int(timestamp)
    except ValueError:
        return None, None

