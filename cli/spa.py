"""`xknock spa` (send one SPA packet: fwknop's format, or with --identity
the public-key one) and `xknock keygen`."""

import base64
import time

import click

from xknock.cli.common import echo_result, fail_cleanly, json_option
from xknock.cli.params import ParsedType
from xknock.controller.client.spa_client import DEFAULT_PORT, parse_access, send_spa
from xknock.controller.wire import spa_message
from xknock.controller.wire import spa_pubkey_keys as pubkey_keys
from xknock.controller.wire.spa_keys import (
    HMAC_KEY_BYTES, format_keygen, generate, keys_from_base64, load_key_file, write_key_file,
)


class AccessType(ParsedType):
    name = "PROTO/PORT"

    def parse(self, value):
        return parse_access(value)


@click.command(epilog="""\b
Examples:
  xknock spa server.example -A tcp/22 --key-file ~/.xknock/alice.keys
  xknock spa 192.0.2.1 -A tcp/22 -A udp/53 --key-file k --user alice -a 198.51.100.7
  xknock spa gw.example -A tcp/22 --key-file k --source-from-packet   # behind NAT
  xknock spa 2001:db8::1 -A tcp/22 --key-file k                       # IPv6: the source is granted
  xknock spa gw.example -A tcp/22 --identity ~/.xknock/alice.key --server-key gw.pub   # public-key SPA

\b
With --key-file or --key-base64 the packet is what `fwknop -A tcp/22 -a ADDR
--use-hmac -D HOST` sends: fwknopd accepts it as well as xknock. Nothing
answers; try the port. With --identity it is xknock's public-key packet
(docs/spa.md): it opens both address families, and the server's sealed
answer says whether it was granted (exit status 0) or refused and why (1);
no answer after --tries packets: exit status 2.""")
@click.argument("host")
@click.option("-A", "--access", "ports", type=AccessType(), multiple=True, required=True,
              help="A port to open, tcp/22 or udp/53 (repeatable).")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="Keys in `fwknop --key-gen` format (KEY_BASE64: / HMAC_KEY_BASE64:), mode 0600.")
@click.option("--key-base64", default=None, help="The encryption key inline (visible in ps: tests only).")
@click.option("--hmac-key-base64", default=None, help="The HMAC key inline (with --key-base64).")
@click.option("--hmac-digest", "--digest", "hmac_digest", type=click.Choice(spa_message.HMAC_DIGESTS), default="sha256",
              show_default=True, help="The HMAC digest (the server's HMAC_DIGEST_TYPE / hmac_digest).")
@click.option("--user", default=None, help="The user name in the message (default: your login name).")
@click.option("-a", "--allow-ip", "access_addresses", multiple=True, metavar="ADDRESS",
              help="The address to grant (default: the local address of the route to HOST). fwknop's "
                   "message holds one IPv4 address; the public-key one an IPv4 and an IPv6 (repeat -a).")
@click.option("--source-from-packet", is_flag=True,
              help="Ask for the packet's source address to be granted (message address 0.0.0.0, fwknop -s): "
                   "for clients behind NAT, and always used to an IPv6 HOST. A server with "
                   "require_source_address refuses it.")
@click.option("--client-timeout", type=click.IntRange(1, spa_message.MAX_CLIENT_TIMEOUT), default=None,
              metavar="SECONDS", help="Ask for this long an opening (the server caps it at its max_open_for).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="The server's SPA port.")
@click.option("--identity", type=click.Path(dir_okay=False), default=None,
              help="Public-key SPA: your private key (xknock keygen --public), mode 0600.")
@click.option("--server-key", default=None, metavar="KEY|FILE.pub",
              help="Public-key SPA: the server's public key, base64 or its .pub file.")
@click.option("--no-wait", is_flag=True, help="Public-key SPA: ask for no answer, send one packet and exit.")
@click.option("--tries", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Public-key SPA: packets to send, one a second, until the server answers.")
@json_option
@fail_cleanly
def spa(host, ports, key_file, key_base64, hmac_key_base64, hmac_digest, user, access_addresses,
        source_from_packet, client_timeout, port, identity, server_key, no_wait, tries, as_json):
    """Send one SPA packet asking HOST to open ports to this client."""
    if identity or server_key:
        return _spa_pubkey(host, ports, identity, server_key, access_addresses, client_timeout, port, no_wait,
                           tries, fwknop_options=key_file or key_base64 or hmac_key_base64 or source_from_packet
                           or user, as_json=as_json)
    if len(access_addresses) > 1:
        raise click.UsageError("fwknop's message holds one address: give -a once")
    access_address = access_addresses[0] if access_addresses else None
    if access_address and source_from_packet:
        raise click.UsageError("give -a IPV4 or --source-from-packet, not both")
    inline = key_base64 is not None or hmac_key_base64 is not None
    if bool(key_file) == inline:
        raise click.UsageError("give --key-file FILE, or --key-base64 and --hmac-key-base64")
    if inline:
        if key_base64 is None or hmac_key_base64 is None:
            raise click.UsageError("--key-base64 and --hmac-key-base64 go together")
        keys = keys_from_base64(key_base64, hmac_key_base64, "the keys given")
    else:
        keys = load_key_file(key_file)
    sent = send_spa(host, list(ports), keys, hmac_digest=hmac_digest, user=user, access_address=access_address,
                    source_from_packet=source_from_packet, client_timeout=client_timeout, port=port)
    opened = " ".join(f"{proto}/{number}" for proto, number in ports)
    whom = "the packet's source" if sent.access_address == "0.0.0.0" else sent.access_address
    echo_result(as_json, {"sent": "fwknop", "server": sent.server, "port": sent.port, "bytes": sent.size,
                          "open": [f"{proto}/{number}" for proto, number in ports],
                          "for": None if sent.access_address == "0.0.0.0" else sent.access_address},
                f"sent SPA to {sent.server} port {sent.port} ({sent.size} bytes): open {opened} for {whom}")


def _spa_pubkey(host, ports, identity, server_key, addresses, client_timeout, port, no_wait, tries,
                fwknop_options, as_json=False):
    from xknock.controller.client import spa_pubkey_client

    if not identity or not server_key:
        raise click.UsageError("the public-key SPA needs --identity FILE and --server-key KEY")
    if fwknop_options:
        raise click.UsageError("--identity is the public-key SPA: leave out fwknop's --key-file, --key-base64, "
                               "--hmac-key-base64, --user and --source-from-packet")
    result = spa_pubkey_client.knock(host, list(ports), pubkey_keys.load_private(identity, pubkey_keys.USER),
                                     pubkey_keys.read_public(server_key, "--server-key"), port=port,
                                     addresses=addresses, open_for_s=client_timeout or 0, acknowledge=not no_wait,
                                     tries=tries)
    opened = " ".join(f"{proto}/{number}" for proto, number in ports)
    whom = " and ".join(str(a) for a in (result.ipv4, result.ipv6) if a) or "the packet's source"
    ack = result.ack
    if as_json:   # the outcome as JSON, with the exit status of the text's
        answer = None if ack is None else {
            "granted": bool(ack.granted), "detail": ack.detail if not ack.granted else None,
            "ports": [f"{proto}/{number}" for proto, number in ack.ports] if ack.granted else [],
            "for": [str(a) for a in (ack.ipv4, ack.ipv6) if a] if ack.granted else [],
            "until": ack.until if ack.granted else None}
        echo_result(True, {"sent": "public-key", "server": str(result.server), "port": result.port,
                           "open": [f"{proto}/{number}" for proto, number in ports],
                           "for": [str(a) for a in (result.ipv4, result.ipv6) if a], "tries": result.tries,
                           "waited": not no_wait, "answer": answer}, "")
        if not no_wait and ack is None:
            raise SystemExit(2)
        if ack is not None and not ack.granted:
            raise SystemExit(1)
        return
    if no_wait:
        click.echo(f"sent public-key SPA to {result.server} port {result.port}: open {opened} for {whom}")
        return
    if ack is None:
        click.echo(f"xknock: no answer from {result.server} port {result.port} after {result.tries} packets "
                   "(wrong --server-key, a firewall on the way, or the server is down)", err=True)
        raise SystemExit(2)
    if not ack.granted:
        click.echo(f"xknock: {result.server} refused: {ack.detail}", err=True)
        raise SystemExit(1)
    granted = " and ".join(str(a) for a in (ack.ipv4, ack.ipv6) if a)
    ports_text = " ".join(f"{proto}/{number}" for proto, number in ack.ports)
    click.echo(f"granted by {result.server}: {ports_text} for {granted} until "
               f"{time.strftime('%H:%M:%S', time.localtime(ack.until))}")


@click.command(epilog="""\b
Examples:
  xknock keygen                                  # print, as `fwknop --key-gen` does
  xknock keygen --key-file /etc/xknock/alice.keys
  xknock keygen --hmac-digest sha512 --key-file alice.keys
  xknock keygen --public --key-file ~/.xknock/alice.key          # a user's key pair (+ .pub)
  xknock keygen --public --server --key-file /etc/xknock/spa-server.key

\b
--public makes a key pair of the public-key SPA (docs/spa.md): the private
key stays where it was made (mode 0600); give FILE.pub's key to the server
([[spa.user]] public_keys), or, for --server, to the users. Without --public:
give the same keys to the client (fwknop's ~/.fwknoprc: KEY_BASE64 and
HMAC_KEY_BASE64 with USE_HMAC Y, or xknock spa --key-file) and the server
([[spa.user]] key_file).""")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="Write the keys here, mode 0600, instead of printing them.")
@click.option("--hmac-digest", "--digest", "hmac_digest", type=click.Choice(sorted(HMAC_KEY_BYTES)), default="sha256",
              show_default=True,
              help="Size the HMAC key for this digest, as fwknop does.")
@click.option("--public", is_flag=True,
              help="Make a key pair of the public-key SPA instead: KEY_FILE (private, 0600) and KEY_FILE.pub.")
@click.option("--server", is_flag=True, help="With --public: the server's key pair (X25519), not a user's.")
@click.option("--force", is_flag=True, help="Overwrite KEY_FILE if it exists.")
@json_option
@fail_cleanly
def keygen(key_file, hmac_digest, public, server, force, as_json):
    """Make a random encryption key and HMAC key in `fwknop --key-gen` format,
    or with --public a key pair."""
    if server and not public:
        raise click.UsageError("--server goes with --public")
    if public:
        if key_file is None:
            raise click.UsageError("--public needs --key-file FILE (a private key is never printed)")
        kind = pubkey_keys.SERVER if server else pubkey_keys.USER
        private = pubkey_keys.write_pair(key_file, kind, force=force)
        click.echo(f"wrote the {kind} private key to {key_file} (mode 0600) and its public key to {key_file}.pub:",
                   err=True)
        public_line = pubkey_keys.format_public(kind, private)
        echo_result(as_json, {"kind": kind, "private_key_file": key_file, "public_key_file": f"{key_file}.pub",
                              "public_key": public_line.split(":", 1)[1].strip()}, public_line.rstrip("\n"))
        return
    keys = generate(hmac_digest)
    if key_file is None:   # printed, as fwknop --key-gen does: the keys are the output
        echo_result(as_json, {"hmac_digest": hmac_digest, "key_base64": base64.b64encode(keys.key).decode(),
                              "hmac_key_base64": base64.b64encode(keys.hmac_key).decode()},
                    format_keygen(keys).rstrip("\n"))
        return
    write_key_file(key_file, keys, force=force)
    click.echo(f"wrote keys to {key_file} (mode 0600)", err=True)
    if as_json:
        echo_result(True, {"hmac_digest": hmac_digest, "key_file": key_file}, "")


__all__ = ["spa", "keygen"]
