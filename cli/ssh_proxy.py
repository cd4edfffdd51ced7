"""`xknock ssh-proxy HOST PORT`: an SSH ProxyCommand that knocks first (public-key SPA)."""

import click

from xknock.cli.common import fail_cleanly
from xknock.controller.wire import spa_pubkey_keys as pubkey_keys


@click.command("ssh-proxy", epilog="""\b
Examples (~/.ssh/config):
  Host gw.example
      ProxyCommand xknock ssh-proxy %h %p --identity ~/.xknock/me.key --server-key ~/.xknock/gw.pub

\b
It sends a public-key SPA packet asking HOST to open tcp/PORT, waits for the
server's sealed answer (sending a fresh packet when none comes), connects, and
pipes stdin and stdout to the connection. Errors go to stderr, one line.""")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--identity", type=click.Path(dir_okay=False), required=True,
              help="Your private key (xknock keygen --public), mode 0600.")
@click.option("--server-key", required=True, metavar="KEY|FILE.pub", help="The server's public key.")
@click.option("--spa-port", type=click.IntRange(1, 65535), default=62201, show_default=True,
              help="The server's SPA port.")
@click.option("--tries", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Packets to send, one a second, until the server answers.")
@fail_cleanly
def ssh_proxy(host, port, identity, server_key, spa_port, tries):
    """Knock HOST for tcp/PORT, then connect and relay stdin/stdout (for ssh's ProxyCommand)."""
    from xknock.controller.client import ssh_proxy as proxy

    sock = proxy.knock_and_connect(host, port, pubkey_keys.load_private(identity, pubkey_keys.USER),
                                   pubkey_keys.read_public(server_key, "--server-key"), spa_port=spa_port,
                                   tries=tries)
    with sock:
        proxy.pipe(sock)


__all__ = ["ssh_proxy"]
