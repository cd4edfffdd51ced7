"""Spent windows of time-based sequences, kept on disk, so that a window
whose knock was used stays spent across a restart of the controller, an
`xknock reload` and `xknock attach` (policy/totp.py spends them).

The file (`spent_file`, default /var/lib/xknock/totp-spent, mode 0600 in a
0700 directory) is text: a header line, then "FINGERPRINT EXPIRES\\n" per
spent window, EXPIRES in Unix seconds, once the window can no longer be
live. The fingerprint is HMAC-SHA256(secret, name, window): it names the
window and tells nothing of the secret, so one file serves every sequence
and every filter of the host; a window spent on one filter is spent on all
that share its secret (the same knock would open them). Every change is
written whole under a lock (a temporary file, fsync, rename): readers never
lock, and no writer loses another's entry.
"""

import fcntl
import hashlib
import hmac
import os

from ..errors import XknockError
from ..kernel.durable import replace_file

HEADER = b"xknock-totp-spent 1\n"
FINGERPRINT_HEX = 32


def fingerprint(sequence, window):
    """The name of one window of a time-based config.Sequence in the file."""
    message = b"xknock-spent\0" + sequence.name.encode() + b"\0" + window.to_bytes(8, "big", signed=True)
    return hmac.new(sequence.totp.secret, message, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]


class SpentFile:
    """read() -> {fingerprint: expires}; add(fingerprint, expires, now) keeps it on disk."""

    def __init__(self, path):
        self.path = path

    def read(self):
        """The spent windows; {} when there is no file yet. XknockError when it
        cannot be trusted (then no time-based policy is written: better shut
        than open to a used knock)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise self._error(f"cannot open: {err.strerror}") from None
        with os.fdopen(fd, "rb") as source:
            self._check_private(source.fileno())
            data = source.read()
        if not data.startswith(HEADER):
            raise self._error("not an xknock spent-windows file (bad header)")
        entries = {}
        for number, line in enumerate(data[len(HEADER):].splitlines(), start=2):
            name, _, expires = line.partition(b" ")
            if len(name) != FINGERPRINT_HEX or not expires.isdigit():
                raise self._error(f"line {number} is corrupt")
            entries[name.decode()] = int(expires)
        return entries

    def add(self, fingerprint_hex, expires, now):
        """Records one spent window, and forgets those expired by now."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise self._error(f"cannot write: {err.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)   # held for one read and one rename: never long
            entries = {f: e for f, e in self.read().items() if e > now}
            entries[fingerprint_hex] = int(expires)
            lines = b"".join(b"%s %d\n" % (f.encode(), e) for f, e in sorted(entries.items()))
            replace_file(self.path, HEADER + lines)
        except OSError as err:
            raise self._error(f"cannot write: {err.strerror}") from None
        finally:
            os.close(lock_fd)

    def _check_private(self, fd):
        info = os.fstat(fd)
        if info.st_mode & 0o022:
            raise self._error(f"writable by group or others (who could revive a used knock); chmod 600 {self.path}")
        if info.st_uid != os.geteuid():
            raise self._error(f"owned by uid {info.st_uid}, not by this user")

    def _error(self, what):
        return XknockError(f"spent time-based windows {self.path}: {what}; move the file away to start afresh, "
                           "knowing that knocks used in the last two windows would open again")
