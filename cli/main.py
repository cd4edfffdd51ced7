"""The `xknock` command group: one module per command (or group of commands)
in cli/, arguments in, one library call, a table or JSON out."""

import click

from xknock.cli.attach import attach
from xknock.cli.bans import ban, bans, unban
from xknock.cli.check import check
from xknock.cli.detach import detach
from xknock.cli.diff import diff
from xknock.cli.grants import grant, grants, revoke
from xknock.cli.importers import import_
from xknock.cli.knock import knock
from xknock.cli.reload import reload
from xknock.cli.spa import keygen, spa
from xknock.cli.ssh_proxy import ssh_proxy
from xknock.cli.status import status
from xknock.cli.top import top
from xknock.controller.daemon.events import FORMATS as LOG_FORMATS, setup_logging

# Commands import the controller modules only they use inside their function
# (the daemon, prometheus-client's metrics, status, grants, the knock client),
# so that the other commands, shell completion (which runs the program at every
# <Tab>) and --help do not load them. None of these imports hides a cycle:
# tests/unit/test_structure.py checks that.


def _print_version(ctx, param, value):
    """The version and the source revision this build was installed from."""
    if not value or ctx.resilient_parsing:
        return
    from xknock.controller.daemon import build

    click.echo(f"xknock, version {build.version()} (revision {build.revision()})")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              help="Log lines for people (text: level, message, key=value), or for tools: logfmt or JSON, "
                   "with a timestamp and an event name on every line.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(log_format, verbose):
    """Port knocking in XDP: guarded ports stay dark until a source knocks."""
    setup_logging(log_format=log_format, verbose=verbose)


for command in (attach, detach, status, reload, grant, revoke, grants, ban, unban, bans, knock, check, diff, top, spa,
                keygen, ssh_proxy):
    main.add_command(command)
main.add_command(import_, name="import")


if __name__ == "__main__":
    main()
