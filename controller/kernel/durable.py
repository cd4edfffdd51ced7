"""Files that must survive a crash: written whole or not at all, on disk
before the caller goes on (the SPA replay cache, spent time-based windows)."""

import os


def fsync_dir(directory):
    """Makes a rename or a new file in directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path, data):
    """path holds data, mode 0600, or (on OSError) is as it was: a temporary
    file beside it, fsync'ed, renamed over it, the directory fsync'ed."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    fsync_dir(os.path.dirname(path))
