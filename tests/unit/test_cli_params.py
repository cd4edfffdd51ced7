"""One syntax everywhere (issue 19 item 7): the CLI's shared parameter types
(cli/params.py), ports as tcp:22 and tcp/22, durations as the config writes
them, and the shell completion of interfaces, sequence names and files. No
root, no interface: the types alone, and the program run for completion."""

import json
import os
import subprocess

import click
import pytest
from xknock_dev.e2e import XKNOCK

from xknock.cli import params
from xknock.controller.config import parse_step


def convert(param_type, value):
    return param_type.convert(value, None, None)


@pytest.mark.parametrize("text, step", [
    ("tcp:22", "tcp:22"), ("tcp/22", "tcp:22"), ("udp/53", "udp:53"), ("UDP:53", "udp:53"), ("icmp", "icmp"),
])
def test_a_step_is_written_with_a_colon_or_a_slash(text, step):
    assert convert(params.STEP, text) == parse_step(step)


@pytest.mark.parametrize("text, reason", [
    ("tcp/70000", "port out of range"), ("tcp/", "not a number"), ("tcp/22/1", "not a step"),
    ("22/tcp", "write it tcp:22"), ("tcp:22/", "not a number"),
])
def test_a_bad_step_says_why(text, reason):
    with pytest.raises(click.BadParameter, match=reason):
        convert(params.STEP, text)


def test_a_port_is_not_icmp():
    assert convert(params.PORT, "tcp/22") == parse_step("tcp:22")
    with pytest.raises(click.BadParameter, match="icmp has no port"):
        convert(params.PORT, "icmp")


@pytest.mark.parametrize("text, ns", [("30s", 30_000_000_000), ("1m30s", 90_000_000_000), ("500ms", 500_000_000)])
def test_a_duration_is_the_configs(text, ns):
    assert convert(params.DURATION, text) == ns
    assert convert(params.SECONDS_OR_DURATION, text) == ns


def test_a_bare_number_is_seconds_only_where_seconds_were_taken():
    assert convert(params.SECONDS_OR_DURATION, "0.2") == 200_000_000
    with pytest.raises(click.BadParameter, match="no unit"):
        convert(params.DURATION, "5")
    with pytest.raises(click.BadParameter, match="between 0 and 365d"):
        convert(params.SECONDS_OR_DURATION, "-1")


def run(*args, env=None):
    return subprocess.run([XKNOCK, *args], capture_output=True, text=True, timeout=60, env=env)


def test_knock_takes_the_slash_and_a_duration_delay():
    result = run("knock", "127.0.0.1", "tcp/7000", "udp/8000", "--delay", "10ms")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "knocked 127.0.0.1: tcp:7000 udp:8000"


def test_knock_answers_in_json():
    result = run("knock", "127.0.0.1", "tcp:7000", "--delay", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"host": "127.0.0.1", "knocked": ["tcp:7000"]}


@pytest.mark.parametrize("option, value", [("--delay", "-1"), ("--delay", "1x"), ("--deadline", "soon")])
def test_knock_times_are_durations(option, value):
    result = run("knock", "127.0.0.1", "tcp:7000", "--until-open", "tcp:22", option, value)
    assert result.returncode == 2 and option in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def complete(words, shell="bash"):
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = dict(os.environ, COMP_WORDS=words, COMP_CWORD=str(cword), _XKNOCK_COMPLETE=f"{shell}_complete")
    return run(env=env).stdout.split()


@pytest.mark.parametrize("words", ["xknock detach ", "xknock attach ", "xknock status ", "xknock grant ",
                                   "xknock top ", "xknock diff "])
def test_interfaces_complete_from_sys_class_net(words):
    assert "plain,lo" in complete(words)


def test_interfaces_complete_from_the_prefix():
    names = sorted(os.listdir("/sys/class/net"))
    assert complete("xknock detach l") == [f"plain,{n}" for n in names if n.startswith("l")]


def test_sequence_names_complete_from_the_config(tmp_path):
    config = tmp_path / "x.toml"
    config.write_text('[[sequence]]\nname = "ssh"\nknock = ["tcp:7000"]\nopen = ["tcp:22"]\n\n'
                      '[[sequence]]\nname = "smtp"\nknock = ["tcp:7001"]\nopen = ["tcp:25"]\n')
    assert complete(f"xknock knock host -c {config} --sequence ") == ["plain,ssh", "plain,smtp"]
    assert complete(f"xknock knock host -c {config} --sequence ss") == ["plain,ssh"]
    assert complete(f"xknock knock host -c {tmp_path}/missing.toml --sequence ") == []


def test_config_files_complete_as_files():
    assert complete("xknock check -c ") == ["file,"]


def test_the_digest_option_has_one_name_everywhere():
    """`--hmac-digest` (and its short form `--digest`) on both `spa` and `keygen`."""
    import base64

    from click.testing import CliRunner

    from xknock.cli.main import main

    for flag in ("--hmac-digest", "--digest"):
        out = CliRunner().invoke(main, ["keygen", flag, "sha512"])
        assert out.exit_code == 0, out.output
        hmac_key = out.output.split("HMAC_KEY_BASE64:")[1].split()[0]
        assert len(base64.b64decode(hmac_key)) == 128   # sized for sha512, as fwknop does
    for command in ("spa", "keygen"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert "--hmac-digest" in text and "--digest" in text, text
