"""One writer at a time per filter: the daemon, `xknock reload`, `grant`,
`revoke`, `unban` and the SPA receiver take this lock around their map writes."""

import contextlib
import fcntl
import os

LOCK_DIR = "/run/xknock"


@contextlib.contextmanager
def map_lock(maps):
    """One writer at a time per filter (the daemon, `xknock reload`, `grant`),
    keyed by the control map's id so it holds across mount namespaces."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = os.path.join(LOCK_DIR, f"filter-{maps.control.id}.lock")
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
