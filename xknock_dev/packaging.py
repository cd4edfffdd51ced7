"""The generated files packaging/ ships: a man page per command (click-man,
with each command's examples added) and the shell completion scripts (what
click prints for _XKNOCK_COMPLETE=SHELL_source). Generated from the code, so
they say what --help says; tests/unit/test_packaging.py checks they are current.

    python -m xknock_dev.packaging          # rewrite packaging/man and packaging/completion
    python -m xknock_dev.packaging deb [OUTDIR]   # build xknock_VERSION_all.deb (xknock_dev/debian.py)
"""

import importlib.metadata
import os
import subprocess
import sys

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN_DIR = os.path.join(REPO, "packaging", "man")
COMPLETION_DIR = os.path.join(REPO, "packaging", "completion")
# Where each shell looks for a completion file (the Debian paths), by file name.
COMPLETIONS = {"bash": "xknock", "zsh": "_xknock", "fish": "xknock.fish"}
# The date of a page is the day it was made: left out of the comparison.
DATE_LINE = ".TH "


def _roff(text):
    """Text for a no-fill block of a man page."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _commands(command, path=()):
    """(path, click command) for the group and every command under it."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(None)):
            yield from _commands(command.get_command(None, name), path + (name,))


def man_pages(target):
    """Write xknock.1 and xknock-COMMAND.1 into target; returns their names."""
    from click_man.core import write_man_pages

    from xknock.cli.main import main

    os.makedirs(target, exist_ok=True)
    write_man_pages("xknock", main.loaded(), version=importlib.metadata.version("xknock"), target_dir=target)
    names = []
    for path, command in _commands(main):
        name = "-".join(("xknock",) + path) + ".1"
        names.append(name)
        if not command.epilog:
            continue
        epilog = "\n".join(line for line in command.epilog.splitlines() if line.strip() != "\b").strip("\n")
        with open(os.path.join(target, name), "a") as page:
            page.write(f".SH EXAMPLES\n.nf\n{_roff(epilog)}\n.fi\n")
    return sorted(names)


def completion_scripts(target):
    """Write the bash, zsh and fish completion scripts into target; returns their names."""
    os.makedirs(target, exist_ok=True)
    xknock = os.path.join(os.path.dirname(sys.executable), "xknock")
    for shell, name in COMPLETIONS.items():
        env = dict(os.environ, _XKNOCK_COMPLETE=f"{shell}_source")
        script = subprocess.run([xknock], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        with open(os.path.join(target, name), "w") as out:
            out.write(script)
    return sorted(COMPLETIONS.values())


def comparable(path):
    """A generated file's lines, but for the date of a man page."""
    with open(path) as f:
        return [line for line in f.read().splitlines() if not line.startswith(DATE_LINE)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["deb"]:
        from xknock_dev import debian

        print(debian.build(sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, "build")))
        sys.exit(0)
    for stale in os.listdir(MAN_DIR) if os.path.isdir(MAN_DIR) else []:
        os.unlink(os.path.join(MAN_DIR, stale))
    print("\n".join(os.path.join("packaging/man", n) for n in man_pages(MAN_DIR)))
    print("\n".join(os.path.join("packaging/completion", n) for n in completion_scripts(COMPLETION_DIR)))
