"""The kernel's socket tables in /proc/net (tcp, tcp6, udp, udp6): their rows,
and the one decoder of their addresses, shared by the listening-port warnings
of config and the established sessions of state/lockout.py."""

import ipaddress
import os
import sys


def decode_address(text):
    """'0100007F:0016' (or a 32-hex-digit IPv6 address) -> (ip, port). An IPv4
    address mapped into IPv6 comes back as the IPv4 address it maps."""
    address_hex, _, port_hex = text.partition(":")
    # The kernel prints each 32-bit word of the address as a native-endian
    # integer: little-endian on x86, the other way round on s390x or ppc64.
    words = [int(address_hex[i : i + 8], 16) for i in range(0, len(address_hex), 8)]
    ip = ipaddress.ip_address(b"".join(word.to_bytes(4, sys.byteorder) for word in words))
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, int(port_hex, 16)


def sockets(proc_net, name):
    """[(local (ip, port), remote (ip, port), state)] of /proc/net/<name>, the
    state as the kernel prints it ("0A" is TCP_LISTEN); [] without the file
    (no IPv6, or no /proc). A row that does not decode is skipped."""
    try:
        with open(os.path.join(proc_net, name), encoding="ascii") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return []
    found = []
    for row in rows:
        fields = row.split()
        if len(fields) < 4:
            continue
        try:
            found.append((decode_address(fields[1]), decode_address(fields[2]), fields[3]))
        except ValueError:
            continue
    return found
