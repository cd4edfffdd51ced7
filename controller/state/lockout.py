"""Not locking the operator out: established sessions to ports about to be guarded.

Attaching a filter cuts every established connection to a guarded port whose
source has neither an allow-list entry nor a grant. That includes the SSH
session of the operator typing `xknock attach`. This module finds those
sessions (from /proc/net, in the current network namespace, plus
$SSH_CONNECTION) so that attach can refuse, or grant them first.
"""

import ipaddress
import os
from dataclasses import dataclass

from ..kernel import layout, procnet
from ..kernel.maps import to_addr
from .grants import grant_dead

TCP_ESTABLISHED = "01"


@dataclass(frozen=True)
class Session:
    source: object      # ipaddress address of the remote end
    port: int           # the local (guarded) TCP port
    yours: bool         # the session this command runs in ($SSH_CONNECTION)

    def __str__(self):
        who = " (your session)" if self.yours else ""
        return f"{self.source} -> tcp:{self.port}{who}"


def established_sessions(proc_net="/proc/net"):
    """[(remote ip, local port)] of established TCP connections, not loopback."""
    return {(remote, local_port)
            for name in ("tcp", "tcp6")
            for (_, local_port), (remote, _), state in procnet.sockets(proc_net, name)
            if state == TCP_ESTABLISHED and not remote.is_loopback}


def your_session(environ=os.environ):
    """(client ip, server port) of the SSH session this runs in, or None."""
    parts = environ.get("SSH_CONNECTION", "").split()
    if len(parts) != 4:
        return None
    try:
        ip = ipaddress.ip_address(parts[0])
        return (ip.ipv4_mapped or ip) if ip.version == 6 else ip, int(parts[3])
    except ValueError:
        return None


def sessions_at_risk(config, sessions=None, yours=None):
    """Established sessions to TCP ports the config guards, from sources not
    on its allow-list."""
    sessions = established_sessions() if sessions is None else sessions
    yours = your_session() if yours is None else yours
    guarded = {step.port for step in config.guarded if step.proto == "tcp"}
    if yours:
        sessions = set(sessions) | {yours}
    at_risk = []
    for source, port in sorted(sessions, key=lambda s: (str(s[0]), s[1])):
        if port not in guarded or any(source in net for net in config.allow if net.version == source.version):
            continue
        at_risk.append(Session(source, port, yours == (source, port)))
    return at_risk


def without_grants(maps, sessions, now):
    """The sessions whose source holds no live grant for the port."""
    left = []
    for session in sessions:
        key = layout.GrantKey(src=to_addr(session.source), proto=layout.PROTO_TCP, port=session.port)
        grant = maps.grants.lookup(key)
        if grant is None or grant_dead(grant, now):
            left.append(session)
    return left


def idle_timeout_for(config, port):
    """The idle timeout a kept session gets: the longest of the sequences (and SPA users) that open port."""
    return max(idle for steps, idle in config.openers() if any(s.port == port for s in steps))
