"""The SPA client: one UDP datagram that fwknopd (and xknock) accept, as
`fwknop -A tcp/22 -a ADDRESS --use-hmac -D HOST` sends it. Nothing answers.

The access address in the message: the one given, else the local address of
the route to HOST (what the server sees unless NAT is in between), else
0.0.0.0, "grant the packet's source" (fwknop -s). fwknop's message holds an
IPv4 address only: to an IPv6 HOST the message always says 0.0.0.0 and the
server grants the IPv6 source of the packet.
"""

import dataclasses
import getpass
import ipaddress
import socket

from ..errors import XknockError
from ..wire import spa_message
from .knockclient import resolve, with_port

DEFAULT_PORT = 62201   # fwknop's
ANY_SOURCE = "0.0.0.0"


class SpaClientError(XknockError):
    """The packet cannot be built or sent."""


@dataclasses.dataclass(frozen=True)
class Sent:
    server: str           # the address it went to
    port: int
    access_address: str   # what the message asks to be granted
    size: int             # bytes of UDP payload


def parse_access(text):
    """fwknop's -A "tcp/22" (xknock's "tcp:22" too) -> ("tcp", 22)."""
    proto, sep, port = text.replace(":", "/", 1).partition("/")
    proto = proto.strip().lower()
    if not sep or proto not in ("tcp", "udp") or not port.strip().isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected tcp/PORT or udp/PORT (PORT 1-65535)")
    return proto, int(port)


def route_source(address):
    """The local address the kernel would send from to reach address (a UDP
    connect() sends nothing)."""
    family, sockaddr = address
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(with_port(address, DEFAULT_PORT))
        except OSError as err:
            raise SpaClientError(f"no route to {sockaddr[0]}: {err.strerror}") from None
        return sock.getsockname()[0]


def default_user():
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "xknock"


def send_spa(host, ports, keys, *, hmac_digest=spa_message.DEFAULT_DIGEST, user=None, access_address=None,
             source_from_packet=False, client_timeout=None, port=DEFAULT_PORT, family=None):
    """Build and send one SPA packet to host:port. ports: [(proto, port)];
    keys: spa_keys.Keys. Returns Sent."""
    address = resolve(host, family)
    server_family, sockaddr = address
    if source_from_packet or server_family == socket.AF_INET6:
        if access_address and not source_from_packet:
            raise SpaClientError("fwknop's message holds an IPv4 address: to an IPv6 server the packet's "
                                 "source is granted; leave out -a")
        access_address = ANY_SOURCE
    elif access_address is None:
        access_address = route_source(address)
    try:
        ipaddress.IPv4Address(access_address)
    except ValueError:
        raise SpaClientError(f"-a {access_address}: not an IPv4 address (fwknop's message holds IPv4 only)") \
            from None
    try:
        payload = spa_message.encode(key=keys.key, hmac_key=keys.hmac_key, access_address=access_address,
                                     ports=ports, username=user or default_user(), hmac_digest=hmac_digest,
                                     client_timeout=client_timeout)
    except ValueError as err:
        raise SpaClientError(str(err)) from None
    with socket.socket(server_family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(payload, with_port(address, port))
        except OSError as err:
            raise SpaClientError(f"sending to {sockaddr[0]} port {port} failed: {err.strerror}") from None
    return Sent(sockaddr[0], port, access_address, len(payload))
