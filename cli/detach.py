"""`xknock detach`: remove the filter from interfaces."""

import click

from xknock.cli.common import echo_result, fail_cleanly, json_option
from xknock.cli.params import IFACE
from xknock.controller.daemon import lifecycle


@click.command(epilog="Example:\n\n  xknock detach eth0")
@click.argument("ifaces", nargs=-1, required=True, type=IFACE)
@json_option
@fail_cleanly
def detach(ifaces, as_json):
    """Remove the filter from IFACES (and its pins when no interface uses them).

    On an interface with no program, remove the pins a filter of it left
    behind, and the failsafe chain a failed attach left (its guarded ports open)."""
    from xknock.controller.policy import failsafe

    done = []
    for name in ifaces:
        entry = {"iface": name, "failsafe_removed": False, "prog_id": None, "xdp_mode": None, "leftover_pins": {}}
        done.append(entry)
        if failsafe.remove([name]):
            entry["failsafe_removed"] = True
            if not as_json:
                click.echo(f"removed the failsafe chain of {name}: its guarded ports are open")
            if not _runs_xknock(name) and not _has_leftover_pins(name):
                continue
        result = lifecycle.detach(name)
        if result.attachment:
            att = result.attachment
            entry.update(prog_id=att.prog_id, xdp_mode=att.mode)
            if not as_json:
                click.echo(f"detached program {att.prog_id} ({att.mode}) from {name}; traffic is no longer filtered")
        for directory, names in result.leftover_pins.items():
            entry["leftover_pins"][directory] = list(names)
            if not as_json:
                click.echo(f"no program on {name}: removed the {len(names)} pins it left in {directory} "
                           f"({', '.join(names)})")
    if as_json:
        echo_result(True, {"detached": done}, "")


def _runs_xknock(name):
    from xknock.controller.kernel import datapath

    return datapath.is_xknock(datapath.attachment(name))


def _has_leftover_pins(name):
    from xknock.controller.kernel import datapath

    return bool(datapath.pin_dirs_of_interface(name))
