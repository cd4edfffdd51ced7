"""Time-based knock sequences (docs/configuration.md, "Time-based sequences").

A sequence with `totp = true` names only the protocols of its knocks; the ports
come from HMAC-SHA256(secret, name, window number), so a knock sniffed in one
window is worthless once that window has passed. The controller keeps two
windows live at a time, the current one and the nearer neighbour (the previous
in a window's first half, the next in its second), which absorbs clock skew of
up to half a window, and rotates them into the maps as time goes on. A window
whose sequence completed is spent: it leaves the maps at once, so a sequence
sniffed while it was used opens nothing, even in the same window; and it is
written down (policy/totp_spent.py), so that no restart, reload or attach
brings it back.

The kernel knows nothing of this: it sees ordinary sequences that come and go.
"""

import dataclasses
import hashlib
import hmac
import time

from ..config.model import Step
from .totp_spent import SpentFile, fingerprint
from .uid import sequence_uid

NS_PER_S = 1_000_000_000


def window_of(unix_ns, window_ns):
    return unix_ns // window_ns


def derive_ports(name, totp, window):
    """The knock ports of `name` in window number `window`. Never the same port
    twice in a row with the same protocol: the data path would take the second
    for a retransmission of the first."""
    span = totp.port_high - totp.port_low + 1
    message = name.encode() + b"\0" + window.to_bytes(8, "big")
    ports, counter, stream = [], 0, b""
    for proto in totp.protos:
        while True:
            if len(stream) < 4:
                stream += hmac.new(totp.secret, message + counter.to_bytes(4, "big"), hashlib.sha256).digest()
                counter += 1
            value, stream = int.from_bytes(stream[:4], "big"), stream[4:]
            port = totp.port_low + value % span
            if not ports or (proto, port) != (totp.protos[len(ports) - 1], ports[-1]):
                break
        ports.append(port)
    return ports


def variant(sequence, window):
    """The concrete config.Sequence of a time-based sequence in one window."""
    ports = derive_ports(sequence.name, sequence.totp, window)
    knock = tuple(Step(proto, port) for proto, port in zip(sequence.totp.protos, ports))
    return dataclasses.replace(sequence, knock=knock, totp=None)


def live_windows(unix_ns, window_ns):
    """The two windows accepted at unix_ns: this one and the nearer neighbour."""
    window = window_of(unix_ns, window_ns)
    into = unix_ns - window * window_ns
    return (window - 1, window) if into < window_ns // 2 else (window, window + 1)


def next_change_ns(unix_ns, window_ns):
    """When live_windows() next changes: the next half-window boundary."""
    half = window_ns // 2
    return (unix_ns // half + 1) * half


class Rotation:
    """Turns a config with time-based sequences into the concrete config to
    write now, and remembers which (sequence, window) have been spent: in
    memory, and in each sequence's spent_file."""

    def __init__(self, config, wall_clock_ns=time.time_ns):
        self.config = config
        self.wall_clock_ns = wall_clock_ns
        self.spent = set()    # (name, window)
        self.uids = {}        # uid of a live variant -> (name, window)

    @property
    def active(self):
        return any(seq.totp is not None for seq in self.config.sequences)

    def concrete(self):
        """The config with each time-based sequence replaced by its live, unspent windows."""
        now = self.wall_clock_ns()
        on_disk = self._spent_on_disk()
        sequences, self.uids = [], {}
        for seq in self.config.sequences:
            if seq.totp is None:
                sequences.append(seq)
                continue
            for window in live_windows(now, seq.totp.window_ns):
                if (seq.name, window) in self.spent or fingerprint(seq, window) in on_disk:
                    continue
                concrete = variant(seq, window)
                sequences.append(concrete)
                self.uids[sequence_uid(concrete)] = (seq.name, window)
        oldest = {seq.name: min(live_windows(now, seq.totp.window_ns)) for seq in self.config.sequences if seq.totp}
        self.spent = {(name, w) for name, w in self.spent if name in oldest and w >= oldest[name]}
        return dataclasses.replace(self.config, sequences=tuple(sequences))

    def _window_of_uid(self, uid):
        """(name, window) of a variant live now or just before, for a policy
        written without this object (attach compiles its own)."""
        now = self.wall_clock_ns()
        for seq in self.config.sequences:
            if seq.totp is None:
                continue
            latest = max(live_windows(now, seq.totp.window_ns))
            for window in range(latest - 2, latest + 1):
                if sequence_uid(variant(seq, window)) == uid:
                    return seq.name, window
        return None

    def next_change_ns(self):
        now = self.wall_clock_ns()
        return min(next_change_ns(now, seq.totp.window_ns) for seq in self.config.sequences if seq.totp)

    def _spent_on_disk(self):
        """Fingerprints of the windows spent by anyone (XknockError: a file not to be trusted)."""
        paths = {seq.totp.spent_file for seq in self.config.sequences if seq.totp is not None}
        return {name for path in sorted(paths) for name in SpentFile(path).read()}

    def spend(self, uid):
        """A variant completed: True when that makes the concrete config change.
        Spent in memory at once; XknockError when the file cannot be written
        (then a restart would forget it)."""
        window = self.uids.get(uid) or self._window_of_uid(uid)
        if window is None:
            return False
        self.spent.add(window)
        name, number = window
        seq = next(s for s in self.config.sequences if s.name == name and s.totp is not None)
        live_until_s = -(-(number + 2) * seq.totp.window_ns // NS_PER_S)   # past its neighbour's half too
        SpentFile(seq.totp.spent_file).add(fingerprint(seq, number), live_until_s, self.wall_clock_ns() // NS_PER_S)
        return True
