"""The public-key SPA client (docs/spa-pubkey-format.md): one XKSPA2 packet
to HOST's SPA port, then, unless told not to, a wait for the server's sealed
acknowledgement, sending a fresh packet (a resent one would be a replay) when
none comes in time.

The addresses in the message: those given (one per family), else the local
address of the route to each address HOST resolves to, in both families, so
that a knock over IPv6 also opens the IPv4 address this client would connect from.
"""

import dataclasses
import ipaddress
import select
import socket
import time

from ..errors import XknockError
from ..wire import spa_pubkey
from .knockclient import KnockError, resolve, with_port

DEFAULT_PORT = 62201
DEFAULT_TRIES = 3
DEFAULT_WAIT_S = 1.0


class PubkeyClientError(XknockError):
    """The packet cannot be built or sent."""


@dataclasses.dataclass(frozen=True)
class Knocked:
    server: str
    port: int
    ipv4: object
    ipv6: object
    tries: int                 # packets sent
    ack: object = None         # spa_pubkey.Ack, None if none was asked for or none came


def _route_source(family, address):
    """The local address the kernel would send from to address (connect() on UDP sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))
        except OSError:
            return None
        return ipaddress.ip_address(sock.getsockname()[0].split("%")[0])


def own_addresses(host, server_address):
    """{4: address, 6: address} this client would be seen from, by route, for
    every family HOST resolves in."""
    found = {}
    candidates = [server_address]
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)]
    except socket.gaierror:
        pass
    for address in candidates:
        parsed = ipaddress.ip_address(address.split("%")[0])
        if parsed.version not in found:
            source = _route_source(socket.AF_INET if parsed.version == 4 else socket.AF_INET6, address)
            if source is not None and (parsed.is_loopback or not source.is_loopback):
                found[parsed.version] = source
    return found


def choose_addresses(host, server_address, given):
    """(ipv4, ipv6) for the message: the given ones (at most one of each family), else by route."""
    chosen = {}
    for text in given:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise PubkeyClientError(f"-a {text}: not an IP address") from None
        if address.version in chosen:
            raise PubkeyClientError(f"-a {text}: one address per family (IPv4, IPv6)")
        chosen[address.version] = address
    if not chosen:
        chosen = own_addresses(host, server_address)
    return chosen.get(4), chosen.get(6)


def knock(host, ports, user_private, server_public, *, port=DEFAULT_PORT, addresses=(), open_for_s=0,
          acknowledge=True, tries=DEFAULT_TRIES, wait_s=DEFAULT_WAIT_S, family=None):
    """Send the packet (and retries) to host:port. Returns Knocked; with
    acknowledge, its ack is the server's answer, or None after `tries`
    packets went unanswered for wait_s each."""
    try:
        address = resolve(host, family)
    except KnockError as err:
        raise PubkeyClientError(str(err)) from None
    server_family, sockaddr = address
    ipv4, ipv6 = choose_addresses(host, sockaddr[0], addresses)
    with socket.socket(server_family, socket.SOCK_DGRAM) as sock:
        sock.bind(("::" if server_family == socket.AF_INET6 else "0.0.0.0", 0))
        ack_port = sock.getsockname()[1]
        exporters = []
        for attempt in range(1, (tries if acknowledge else 1) + 1):
            try:
                datagram, exporter = spa_pubkey.seal_packet(server_public, user_private, list(ports), ipv4=ipv4,
                                                            ipv6=ipv6, open_for_s=open_for_s,
                                                            acknowledge=acknowledge, ack_port=ack_port)
            except spa_pubkey.SpaPubkeyError as err:
                raise PubkeyClientError(str(err)) from None
            exporters.append(exporter)
            try:
                sock.sendto(datagram, with_port(address, port))
            except OSError as err:
                raise PubkeyClientError(f"sending to {sockaddr[0]} port {port} failed: {err.strerror}") from None
            if not acknowledge:
                break
            ack = _await_ack(sock, exporters, wait_s)
            if ack is not None:
                return Knocked(sockaddr[0], port, ipv4, ipv6, attempt, ack)
    return Knocked(sockaddr[0], port, ipv4, ipv6, len(exporters) or 1, None)


def _await_ack(sock, exporters, wait_s):
    """The first datagram that opens with one of our packets' secrets; others are ignored."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return None
        try:
            data = sock.recv(2048)
        except OSError:   # an ICMP error for an earlier send: keep waiting
            continue
        for exporter in exporters:
            try:
                return spa_pubkey.open_ack(exporter, data)
            except spa_pubkey.SpaPubkeyError:
                pass
    return None
