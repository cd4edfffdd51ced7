"""Who may change a file xknock trusts: the config, key files, secret files and
hook programs (run as root). One check and one message for all of them, in
the spirit of sshd's StrictModes: the file and every folder above it (of the
path as given, of each link on the way and of the file they lead to) must be
owned by root or by the user running xknock and not writable by group or
others, or someone else could change, or replace, what xknock reads or runs.
A sticky world-writable folder such as /tmp is fine when its entry on the
path is owned by root (or by the user running xknock): others cannot rename
or remove that entry."""

import os
import pwd
import stat


def problem(path, what, *, secret=False):
    """None when only a trusted owner can change path; otherwise one line,
    "{what} {path}: {what is wrong}: {why it matters} ({the fix})". secret:
    the file holds secrets, so group and others must not read it either. A
    missing file is no problem here (its folders still are): the caller
    says whether it must exist."""
    if "\0" in path:
        return f"{what} {path!r}: contains a NUL character"   # no file has such a name; os.stat would raise
    given = os.path.abspath(path)
    real = os.path.realpath(given)
    shown = path if real == given else f"{path} (a link to {real})"
    try:
        info = os.stat(real)
    except FileNotFoundError:
        info = None
    except OSError as err:
        return f"{what} {shown}: cannot check who may change it: {err.strerror}"
    if info is not None:
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in _trusted_owners():
            return f"{what} {shown}: owned by {_owner(info.st_uid)}, not by {_trusted()}: they could change it " \
                   f"(chown root {real})"
        if mode & 0o022:
            return f"{what} {shown}: writable by group or others (mode {mode:04o}): they could change it " \
                   f"(chmod go-w {real})"
        if secret and mode & 0o044:
            return f"{what} {shown}: readable by group or others (mode {mode:04o}) but it holds secrets " \
                   f"(chmod 600 {real})"
    folders = dict.fromkeys(pair for hop in _hops(given) + [real] for pair in _folders(hop))
    for folder, entry in folders:
        wrong = _folder_problem(folder, entry)
        if wrong:
            return f"{what} {shown}: folder {folder} is {wrong}: they could replace the file"
    return None


def _hops(path):
    """path and each link on the way from it to its file: whoever may replace
    any of them may change what path names."""
    hops = [path]
    while os.path.islink(hops[-1]) and len(hops) < 40:   # 40: the kernel's own limit on links followed
        try:
            target = os.readlink(hops[-1])
        except OSError:
            break    # gone since: the final file is checked anyway
        hops.append(os.path.abspath(os.path.join(os.path.dirname(hops[-1]), target)))
    return hops


def _folders(path):
    """[(folder, the entry of the path in it)] from / down to path's own folder."""
    parts = [part for part in path.split("/") if part]
    return [("/" + "/".join(parts[:i]), "/" + "/".join(parts[: i + 1])) for i in range(len(parts))]


def _folder_problem(folder, entry):
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return None   # created later only by whoever may write the folder above, checked too
    except OSError as err:
        return f"not checkable ({err.strerror})"
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in _trusted_owners():
        return f"owned by {_owner(info.st_uid)}, not by {_trusted()} (chown root {folder})"
    if not mode & 0o022:
        return None
    if not mode & stat.S_ISVTX:
        return f"writable by group or others (mode {mode:04o}) (chmod go-w {folder})"
    owner = _entry_owner(entry)
    if owner is None:
        return f"writable by group or others (mode {mode:04o}) and has no {entry} (anyone may create it)"
    if owner not in _trusted_owners():
        return f"writable by group or others (mode {mode:04o}) and its {entry} is owned by {_owner(owner)} " \
               f"(chown root {entry})"
    return None   # sticky: only the entry's owner (or root) may rename or remove it


def _entry_owner(entry):
    try:
        return os.lstat(entry).st_uid   # the entry itself, a link included: that is what could be renamed
    except OSError:
        return None   # not there: anyone may create it in a world-writable folder


def _trusted_owners():
    return {0, os.geteuid()}


def _trusted():
    return "root" if os.geteuid() == 0 else f"root or {_owner(os.geteuid())} (you)"


def _owner(uid):
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
