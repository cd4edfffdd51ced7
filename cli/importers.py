"""`xknock import ...`: other tools' configurations turned into an xknock config."""

import contextlib
import os
import sys
import tempfile

import click

from xknock.cli.common import json_option
from xknock.controller.config import ConfigError
from xknock.controller.importers.fwknop_import import DEFAULT_FWKNOPD_CONF
from xknock.controller.importers.fwknop_import import DEFAULT_PATH as FWKNOP_DEFAULT_PATH
from xknock.controller.importers.knockd_import import DEFAULT_PATH, KnockdImportError, convert


@click.group(name="import", epilog="Example:\n\n  xknock import knockd /etc/knockd.conf -o /etc/xknock/xknock.toml")
def import_():
    """Convert another port knocker's configuration into an xknock config."""


@import_.command(epilog="""\b
Examples:
  xknock import knockd                                   # /etc/knockd.conf, TOML on stdout
  xknock import knockd /etc/knockd.conf -o /etc/xknock/xknock.toml
  xknock import knockd old-knockd.conf --mode monitor -o xknock.toml
  ssh gw cat /etc/knockd.conf | xknock import knockd -

\b
What cannot be carried over (one-time sequences, tcpflags other than syn,
targets, commands that are not a known firewall idiom, ...) is listed on
stderr, one line each, and as comments at the top of the TOML.""")
@click.argument("path", default=DEFAULT_PATH, required=False, type=click.Path(allow_dash=True, readable=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the TOML here (mode 0600: knock sequences are secrets) instead of stdout.")
@click.option("--mode", type=click.Choice(["enforce", "monitor"]), default="enforce", show_default=True,
              help="The [filter] mode of the new config; monitor for a dry run first.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option
def knockd(path, output, mode, force, as_json):
    """Convert knockd's PATH (default /etc/knockd.conf; - for stdin) into an xknock config."""
    text = _read(path)
    source = "stdin" if path == "-" else path
    try:
        result = convert(text, source=source, mode=mode, listening=None)
    except KnockdImportError as err:
        for note in err.notes:
            click.echo(note.located(source), err=True)
        _fail(str(err))
    except ConfigError as err:  # a bug: every door was checked on its own
        _fail(f"the converted config does not validate: {err}")
    for note in result.notes:
        click.echo(note.located(source), err=True)
    for warning in result.config.warnings:
        click.echo(f"xknock: warning: {warning}", err=True)
    if output is not None:
        _write(output, result.toml, force)
    if as_json:
        _echo_json(result.toml, output, [seq.name for seq in result.sequences], result.doors, result.interface,
                   [note.located(source) for note in result.notes], result.config.warnings)
    elif output is None:
        click.echo(result.toml, nl=False)
    names = ", ".join(seq.name for seq in result.sequences)   # said once the TOML is out, not before
    where = output or "stdout"
    click.echo(f"xknock: converted {len(result.sequences)} of {result.doors} knockd door(s) ({names}) to {where}; "
               f"{len(result.notes)} note(s) above; attach with: xknock attach {result.interface} -c "
               f"{output or 'FILE'}", err=True)


def _echo_json(toml, output, converted, of, interface, notes, warnings=(), **more):
    """--json: what was converted, from how many, the notes; the TOML itself without -o."""
    import json

    click.echo(json.dumps({"converted": converted, "of": of, "output": output, "interface": interface,
                           "notes": list(notes), "warnings": list(warnings), **more,
                           "toml": toml if output is None else None}, indent=2))


def _fail(message):
    click.echo(f"xknock: {message}", err=True)
    sys.exit(1)


def _read(path, what="knockd.conf"):
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as conf:
            return conf.read().decode("utf-8")
    except FileNotFoundError:
        _fail(f"{path}: no such file")
    except PermissionError:
        _fail(f"{path}: permission denied ({what} is often root's only: run as root)")
    except IsADirectoryError:
        _fail(f"{path}: is a directory, not a {what}")
    except UnicodeDecodeError as err:
        _fail(f"{path}: not UTF-8 text (byte {err.start})")
    except OSError as err:
        _fail(f"{path}: cannot read: {err.strerror}")


def _write(output, text, force):
    """Atomically, mode 0600; an existing file only with --force."""
    if os.path.exists(output) and not force:
        _fail(f"{output}: exists; pass --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(output))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".xknock-import-", suffix=".toml", dir=directory)
    except OSError as err:
        _fail(f"{output}: cannot write in {directory}: {err.strerror}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, output)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        _fail(f"{output}: cannot write: {err.strerror}")


@import_.command(epilog="""\b
Examples:
  xknock import fwknop                                   # /etc/fwknop/access.conf, TOML on stdout
  xknock import fwknop /etc/fwknop/access.conf --keys-dir /etc/xknock/keys -o /etc/xknock/xknock.toml
  xknock import fwknop access.conf -o xknock.toml        # keys inline: keep the file 0600
  xknock import fwknop --fwknopd-conf /etc/fwknop/fwknopd.conf --mode monitor -o xknock.toml

\b
What cannot be carried over (GnuPG, command execution, NAT, ACCESS_EXPIRE,
stanzas without an HMAC key, %include, ...) is listed on stderr, one line
each, and as comments at the top of the TOML.""")
@click.argument("path", default=FWKNOP_DEFAULT_PATH, required=False, type=click.Path(allow_dash=True, readable=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the TOML here (mode 0600) instead of stdout.")
@click.option("--mode", type=click.Choice(["enforce", "monitor"]), default="enforce", show_default=True,
              help="The [filter] mode of the new config; monitor for a dry run first.")
@click.option("--fwknopd-conf", type=click.Path(readable=False), default=None,
              help=f"Take the [spa] port (PCAP_FILTER, UDPSERV_PORT) and max_age (MAX_SPA_PACKET_AGE) from "
                   f"fwknopd's config, e.g. {DEFAULT_FWKNOPD_CONF}; without it, fwknop's defaults.")
@click.option("--keys-dir", type=click.Path(file_okay=False), default=None,
              help="Write each user's keys to DIR/NAME.keys (mode 0600, `fwknop --key-gen` format) and refer to "
                   "them with key_file, instead of putting the keys in the TOML.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT and key files that exist.")
@json_option
def fwknop(path, output, keys_dir, mode, fwknopd_conf, force, as_json):
    """Convert fwknopd's access.conf PATH (default /etc/fwknop/access.conf; - for stdin) into [spa] users."""
    from xknock.controller.importers.fwknop_import import FwknopImportError
    from xknock.controller.importers.fwknop_import import convert as convert_fwknop
    from xknock.controller.wire.spa_keys import SpaKeyError, write_key_file

    text = _read(path, "access.conf")
    server_text = _read(fwknopd_conf, "fwknopd.conf") if fwknopd_conf is not None else None
    source = "stdin" if path == "-" else path
    try:
        result = convert_fwknop(text, source=source, keys_dir=keys_dir, mode=mode, fwknopd_conf=server_text)
    except FwknopImportError as err:
        for note in err.notes:
            click.echo(note.located(source), err=True)
        _fail(str(err))
    for note in result.notes:
        click.echo(note.located(source), err=True)
    for note in result.server_notes:
        click.echo(note.located(fwknopd_conf), err=True)
    if output is not None and os.path.exists(output) and not force:
        _fail(f"{output}: exists; pass --force to overwrite it")   # before any key file is written
    try:
        if result.key_files:
            os.makedirs(keys_dir, mode=0o700, exist_ok=True)
        for key_path, keys in result.key_files:
            write_key_file(key_path, keys, force=force)
    except (SpaKeyError, OSError) as err:
        _fail(str(err))
    if output is not None:
        _write(output, result.toml, force)
    if as_json:
        _echo_json(result.toml, output, [user.name for user in result.users], result.stanzas, result.interface,
                   [note.located(source) for note in result.notes]
                   + [note.located(fwknopd_conf) for note in result.server_notes],
                   key_files=[key_path for key_path, _ in result.key_files], inline_keys=bool(result.inline_keys))
    elif output is None:
        click.echo(result.toml, nl=False)
    names = ", ".join(user.name for user in result.users)   # said once everything is written, not before
    where = output or "stdout"
    notes = len(result.notes) + len(result.server_notes)
    attach = f"; attach with: xknock attach {result.interface} -c {output or 'FILE'}" if result.interface else ""
    click.echo(f"xknock: converted {len(result.users)} of {result.stanzas} access stanza(s) ({names}) to {where}; "
               f"{notes} note(s) above{attach}", err=True)
    if result.key_files:
        click.echo(f"xknock: wrote {len(result.key_files)} key file(s) under {keys_dir} (mode 0600)", err=True)
    if result.inline_keys:
        click.echo("xknock: warning: the TOML holds secret keys inline: keep it mode 0600, root's only "
                   "(or convert again with --keys-dir)", err=True)
