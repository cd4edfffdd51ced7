"""The `xknock` command group: one module per command (or group of commands)
in cli/, arguments in, one library call, a table or JSON out."""

import click

from xknock.cli.lazy_group import LazyGroup
from xknock.controller.daemon.events import FORMATS as LOG_FORMATS, setup_logging

# name: (module in cli/, the command's attribute, its short help). A command's
# module is imported only when that command runs (or its own arguments are
# completed), so that --help, completion of command names (the program runs at
# every <Tab>) and the long-running controller load no other command's imports.
# The short help is the command's own first sentence, copied here so listing
# needs no import; tests/unit/test_lazy_cli.py keeps the copy equal. Listed in
# --help by name; in this order in the man pages.
COMMANDS = {
    "attach": ("attach", "attach", "Load the filter, attach it to IFACES and run the controller."),
    "detach": ("detach", "detach", "Remove the filter from IFACES (and its pins when no interface uses them)."),
    "status": ("status", "status", "Attached interfaces, policy, counters, live grants, knocks in progress."),
    "reload": ("reload", "reload", "Validate CONFIG and make it the live policy; grants and knocks survive."),
    "grant": ("grants", "grant", "Open guarded ports to ADDR, as a completed knock would."),
    "revoke": ("grants", "revoke", "End every grant (both clocks) and knock in progress of ADDR."),
    "grants": ("grants", "grants", "The live grants of the filter on IFACE: source, port, origin, time left on both "
                                   "clocks."),
    "ban": ("bans", "ban", "Ban ADDR as too many failed knocks would: dropped on the ports of the live [ban] scope."),
    "unban": ("bans", "unban", "Lift the ban of ADDR and forget its failed knocks."),
    "bans": ("bans", "bans", "The sources banned on IFACE now, with the time left."),
    "knock": ("knock", "knock", "Send a knock sequence to HOST (the client; ICMP knocks use a raw socket as root, "
                                "else a ping socket)."),
    "check": ("check", "check", "Check CONFIG as attach and reload would: every error and warning, nothing applied."),
    "diff": ("diff", "diff", "What reloading CONFIG would change in the live policy on IFACE: + added, - removed, "
                             "~ changed."),
    "top": ("top", "top", "Live packet rates by reason, knocks per sequence, grants, knocks in progress."),
    "spa": ("spa", "spa", "Send one SPA packet asking HOST to open ports to this client."),
    "keygen": ("spa", "keygen", "Make a random encryption key and HMAC key in `fwknop --key-gen` format, or with "
                                "--public a key pair."),
    "ssh-proxy": ("ssh_proxy", "ssh_proxy", "Knock HOST for tcp/PORT, then connect and relay stdin/stdout (for "
                                            "ssh's ProxyCommand)."),
    "import": ("importers", "import_", "Convert another port knocker's configuration into an xknock config."),
}


def _print_version(ctx, param, value):
    """The version and the source revision this build was installed from."""
    if not value or ctx.resilient_parsing:
        return
    from xknock.controller.daemon import build

    click.echo(f"xknock, version {build.version()} (revision {build.revision()})")
    ctx.exit()


@click.group(cls=LazyGroup, commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              help="Log lines for people (text: level, message, key=value), or for tools: logfmt or JSON, "
                   "with a timestamp and an event name on every line.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(log_format, verbose):
    """Port knocking in XDP: guarded ports stay dark until a source knocks."""
    setup_logging(log_format=log_format, verbose=verbose)



if __name__ == "__main__":
    main()
