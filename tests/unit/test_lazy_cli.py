"""The lazy command group (cli/lazy_group.py): every command is listed with its
own short help without being imported, each one imports when it runs, and
neither --help nor the controller's imports load what they do not use."""

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from xknock.cli import main as cli_main
from xknock.cli.lazy_group import LazyGroup
from xknock_dev.e2e import XKNOCK


def real_commands():
    """{name: the command object}, every module imported."""
    return {name: cli_main.main.get_command(None, name) for name in cli_main.COMMANDS}


def modules_after(code):
    """sys.modules' names after running code in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_every_command_module_imports_and_is_the_command_named():
    for name, command in real_commands().items():
        assert isinstance(command, click.Command), name
        assert command.name == name, f"{name}: the table names {cli_main.COMMANDS[name][:2]}, whose command is {command.name}"


def test_the_listed_short_help_is_the_commands_own():
    for name, command in real_commands().items():
        assert cli_main.COMMANDS[name][2] == command.get_short_help_str(limit=10**6), \
            f"{name}: cli/main.py's COMMANDS has another short help than the command's first sentence"


def test_help_lists_what_a_plain_group_of_the_real_commands_lists():
    group = cli_main.main
    shape = {"name": "xknock", "params": group.params, "help": group.help, "context_settings": group.context_settings}
    lazy = LazyGroup(commands=cli_main.COMMANDS, **shape)   # a fresh one: nothing imported through it yet
    plain = click.Group(commands=real_commands(), **shape)
    listed, expected = (CliRunner().invoke(g, ["--help"], prog_name="xknock").output for g in (lazy, plain))
    assert listed == expected
    assert not lazy.commands
    done = subprocess.run([XKNOCK, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(f"  {name} " in done.stdout for name in cli_main.COMMANDS)


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"]])
def test_help_imports_no_other_command(argv):
    loaded = modules_after("from xknock.cli.main import main\n"
                           f"main({argv!r}, prog_name='xknock', standalone_mode=False)")
    wanted = {f"xknock.cli.{cli_main.COMMANDS[argv[0]][0]}"} if argv[0] in cli_main.COMMANDS else set()
    commands = {f"xknock.cli.{module}" for module, _, _ in cli_main.COMMANDS.values()}
    assert loaded & commands == wanted


def test_completing_a_command_name_imports_no_command():
    loaded = modules_after("import os\nos.environ.update(COMP_WORDS='xknock st', COMP_CWORD='1', "
                           "_XKNOCK_COMPLETE='zsh_complete')\nfrom xknock.cli.main import main\n"
                           "try:\n    main(prog_name='xknock')\nexcept SystemExit:\n    pass")
    assert not loaded & {f"xknock.cli.{module}" for module, _, _ in cli_main.COMMANDS.values()}


def test_the_controller_imports_neither_bcc_nor_all_of_pyroute2():
    # What the foreground controller imports once attach has handed over:
    # its loop, events, metrics, hooks, the SPA receiver, the link watcher.
    loaded = modules_after(
        "from xknock.cli.main import main\nmain.get_command(None, 'attach')\n"
        "from xknock.controller.daemon import daemon, events, hooks, links, metrics, webconfig\n"
        "from xknock.controller.spa import spa\nfrom xknock.cli import cluster")
    assert "bcc" not in loaded
    assert "pyroute2.iproute.linux" in loaded and "pyroute2.netlink.rtnl.marshal" in loaded
    whole = {"pyroute2.ndb.main", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.netlink.nl80211", "pyroute2.iwutil"}
    assert not loaded & whole, "pyroute2's __init__ ran: kernel/pyroute2_parts.py was bypassed"
    others = {f"xknock.cli.{module}" for module, _, _ in cli_main.COMMANDS.values()} - {"xknock.cli.attach"}
    assert not loaded & others


def test_the_whole_pyroute2_is_there_for_who_asks():
    loaded = modules_after("import xknock.controller.kernel\nfrom pyroute2 import NetNS, IPRoute\n"
                           "import pyroute2\nassert pyroute2.__version__ and NetNS and IPRoute")
    assert "pyroute2.ndb.main" in loaded
