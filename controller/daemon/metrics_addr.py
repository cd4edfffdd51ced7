"""--metrics-addr: where the metrics endpoint listens, parsed."""

import ipaddress

from ..errors import XknockError

DEFAULT_PORT = 9798          # the docs' example port (not registered); metrics are off unless --metrics-addr is given


def parse_addr(text):
    """"HOST:PORT", "[V6]:PORT" or ":PORT" (all IPv4 addresses) -> (host, port);
    XknockError with a one-line reason."""
    hint = f"expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}, [::1]:{DEFAULT_PORT} or :{DEFAULT_PORT}"
    spec = (text or "").strip()
    if spec.startswith("["):
        host, bracket, port = spec[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise XknockError(f"--metrics-addr {text!r}: {hint}")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise XknockError(f"--metrics-addr {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port = spec.rpartition(":")
        if not colon:
            raise XknockError(f"--metrics-addr {text!r}: {hint}")
        if ":" in host:
            raise XknockError(f"--metrics-addr {text!r}: write an IPv6 address in brackets, e.g. [::1]:{DEFAULT_PORT}")
        host = host or "0.0.0.0"
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise XknockError(f"--metrics-addr {text!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)
