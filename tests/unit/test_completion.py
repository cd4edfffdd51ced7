"""Shell completion for bash and zsh, as click generates it."""

import os
import subprocess

from xknock_dev.e2e import XKNOCK


def complete(words, cword, shell="bash"):
    env = dict(os.environ, COMP_WORDS=words, COMP_CWORD=str(cword), _XKNOCK_COMPLETE=f"{shell}_complete")
    return subprocess.run([XKNOCK], env=env, capture_output=True, text=True, timeout=30).stdout


def test_bash_and_zsh_scripts_are_generated():
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef xknock")):
        env = dict(os.environ, _XKNOCK_COMPLETE=f"{shell}_source")
        script = subprocess.run([XKNOCK], env=env, capture_output=True, text=True, timeout=30).stdout
        assert marker in script, script[:200]


def test_commands_and_options_complete():
    assert complete("xknock st", 1).split() == ["plain,status"]
    assert "plain,--keep-sessions" in complete("xknock attach eth0 --ke", 3).split()
    assert "plain,generic" in complete("xknock attach eth0 --xdp-mode g", 4).split()
