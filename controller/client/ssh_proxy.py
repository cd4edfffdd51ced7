"""`xknock ssh-proxy`'s work: knock with the public-key SPA, wait for the
grant, connect, and pipe stdin/stdout to the connection, as an SSH
ProxyCommand does (ssh -o ProxyCommand='xknock ssh-proxy %h %p ...').

stdout carries the SSH stream, so nothing else is ever written to it.
"""

import os
import select
import socket

from ..errors import XknockError
from .knockclient import KnockError, resolve, with_port
from .spa_pubkey_client import knock

CHUNK = 65536


class SshProxyError(XknockError):
    """The knock was refused or unanswered, or the connection failed."""


def knock_and_connect(host, port, user_private, server_public, *, spa_port, ports=None, tries=3,
                      connect_timeout=10.0, family=None):
    """The connected socket, once the server granted (ports default to tcp/port)."""
    asked = ports or [("tcp", port)]
    result = knock(host, asked, user_private, server_public, port=spa_port, tries=tries, family=family)
    if result.ack is None:
        raise SshProxyError(f"no answer from {result.server} port {spa_port} after {result.tries} packets")
    if not result.ack.granted:
        raise SshProxyError(f"{result.server} refused: {result.ack.detail}")
    try:
        address = resolve(host, family)
    except KnockError as err:
        raise SshProxyError(str(err)) from None
    sock = socket.socket(address[0], socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect(with_port(address, port))
    except OSError as err:
        sock.close()
        raise SshProxyError(f"granted, but connecting to {address[1][0]} port {port} failed: "
                            f"{err.strerror or err}") from None
    sock.settimeout(None)
    return sock


def pipe(sock, stdin_fd=0, stdout_fd=1):
    """Copies stdin to sock and sock to stdout until both directions end."""
    open_in, open_out = True, True
    while open_out:
        readable, _, _ = select.select([sock] + ([stdin_fd] if open_in else []), [], [])
        if stdin_fd in readable:
            data = os.read(stdin_fd, CHUNK)
            if data:
                sock.sendall(data)
            else:
                open_in = False
                sock.shutdown(socket.SHUT_WR)
        if sock in readable:
            data = sock.recv(CHUNK)
            if not data:
                open_out = False
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(stdout_fd, view):]
