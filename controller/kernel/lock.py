"""One writer at a time per filter: the daemon, `xknock reload`, `grant`,
`revoke`, `unban` and the SPA receiver take this lock around their map writes.
The directory is root's alone (0700) and the files 0600, opened without
following links: no other user can take the lock and freeze the writers."""

import contextlib
import errno
import fcntl
import os
import stat
import time

from ..errors import XknockError

LOCK_DIR = "/run/xknock"
# How long a writer waits for another to finish before it gives up: far above
# any reload (a 10k-entry list takes half a second), so only a stuck writer hits it.
LOCK_TIMEOUT = 30.0


@contextlib.contextmanager
def map_lock(maps, timeout=LOCK_TIMEOUT):
    """One writer at a time per filter (the daemon, `xknock reload`, `grant`),
    keyed by the control map's id so it holds across mount namespaces. The
    directory is root's alone (0700) and the file 0600, opened without
    following links: no other user can take the lock and freeze the writers.
    Waits at most timeout seconds (XknockError then)."""
    with control_lock(maps.control.id, timeout):
        yield


@contextlib.contextmanager
def control_lock(control_map_id, timeout=LOCK_TIMEOUT):
    """map_lock() for a filter known by its control map's id alone."""
    private_dir(LOCK_DIR)
    path = os.path.join(LOCK_DIR, f"filter-{control_map_id}.lock")
    fd = _private_file(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise XknockError(f"another xknock has held {path} for over {timeout:g}s (a reload or grant "
                                      "stuck?); nothing was changed. Try again, or find it with fuser") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def private_dir(path):
    """path as a directory of our own, mode 0700 (made, or fixed if we own it)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise XknockError(f"{path} is not a directory (a link?): remove it; xknock makes it")
    if info.st_uid != os.geteuid():
        raise XknockError(f"{path} belongs to uid {info.st_uid}, not to this user: remove it; xknock makes it")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def _private_file(path):
    """An fd of path, ours and 0600; a file of someone else's there is replaced."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        os.unlink(path)   # a symbolic link planted there (before the directory was private)
        fd = os.open(path, flags | os.O_EXCL, 0o600)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        os.unlink(path)
        fd = os.open(path, flags | os.O_EXCL, 0o600)
    elif info.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd
