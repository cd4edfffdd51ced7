"""`xknock check`: a config checked as attach would load it, with no root, no
interface and no BCC; every error and warning, exit 0 or 78 (EX_CONFIG). And
attach itself exits 78 on a bad file, which the unit does not restart."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from xknock_dev.e2e import XKNOCK, config_text

EX_CONFIG = 78

# Two errors in two tables, and a warning: check must name all three.
TWO_ERRORS = config_text(knock=("tcp:7000", "udp:8000", "tcp:70000")).replace('mode = "enforce"', 'mode = "enforc"')
SHORT = config_text(knock=("tcp:7000", "udp:8000"))


@pytest.fixture
def public_dir():
    """A directory user nobody can read (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="xknock-check-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def write(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def as_nobody(*args, env=None):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", XKNOCK, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def assert_no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr


def test_a_good_config_passes_as_nobody(public_dir):
    result = as_nobody("check", "-c", write(public_dir, "good.toml", config_text()))
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "ok: 1 sequence(s), mode enforce" in result.stdout


def test_every_error_and_warning_is_printed(public_dir):
    path = write(public_dir, "bad.toml", TWO_ERRORS)
    result = as_nobody("check", "-c", path)
    assert_no_traceback(result)
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert f'xknock: error: {path}: filter: mode "enforc": must be "enforce" or "monitor"' in lines
    assert f'xknock: error: {path}: sequence "ssh": knock[2] "tcp:70000": port out of range 1-65535' in lines
    assert f"xknock: {path}: 2 error(s); attach and reload would refuse it" in lines
    assert result.stdout == ""


def test_json_says_the_same(public_dir):
    good = json.loads(as_nobody("check", "-c", write(public_dir, "good.toml", config_text()), "--json").stdout)
    assert (good["ok"], good["sequences"], good["mode"], good["errors"]) == (True, 1, "enforce", [])
    path = write(public_dir, "bad.toml", TWO_ERRORS)
    result = as_nobody("check", "-c", path, "--json")
    assert_no_traceback(result)
    assert result.returncode == EX_CONFIG
    bad = json.loads(result.stdout)
    assert bad["ok"] is False and len(bad["errors"]) == 2
    assert f'{path}: filter: mode "enforc": must be "enforce" or "monitor"' in bad["errors"]


def test_warnings_alone_pass(public_dir):
    path = write(public_dir, "short.toml", SHORT)
    result = as_nobody("check", "-c", path)
    assert result.returncode == 0, result.stderr
    assert f'xknock: warning: {path}: sequence "ssh": only 2 knock step(s); a short sequence is easy to guess' \
        in result.stderr.splitlines()


def test_a_two_step_one_protocol_sequence_is_warned_about_in_strict_mode(public_dir):
    path = write(public_dir, "two.toml", config_text(knock=("tcp:7000", "tcp:8000")))
    result = as_nobody("check", "-c", path)
    assert result.returncode == 0, result.stderr
    assert "strict = false" not in config_text(knock=("tcp:7000", "tcp:8000"))
    assert f'xknock: warning: {path}: sequence ssh: knock tcp:7000 tcp:8000: two steps of one protocol, which a ' \
        "random-order port scan of N ports sends back to back about once in N scans, with strict = true as well; " \
        "use three steps or more, mix protocols, or SPA" in result.stderr.splitlines()


@pytest.mark.parametrize("case", ["missing", "unreadable", "directory"])
def test_a_file_that_cannot_be_read_is_a_config_error(public_dir, case):
    path = os.path.join(public_dir, "x.toml")
    if case == "unreadable":
        write(public_dir, "x.toml", config_text())
        os.chmod(path, 0o600)
    elif case == "directory":
        os.mkdir(path)
    result = as_nobody("check", "-c", path)
    assert_no_traceback(result)
    assert result.returncode == EX_CONFIG
    assert result.stderr.startswith(f"xknock: error: {path}: ")


def test_check_needs_no_bcc(public_dir):
    """A bcc that cannot be imported: check never reaches for it."""
    fake = os.path.join(public_dir, "nobcc")
    os.mkdir(fake)
    write(fake, "bcc.py", "raise ImportError('no bcc here')\n")
    os.chmod(fake, 0o755)
    env = dict(os.environ, PYTHONPATH=fake)
    result = as_nobody("check", "-c", write(public_dir, "good.toml", config_text()), env=env)
    assert result.returncode == 0, result.stderr


def test_attach_exits_78_on_a_bad_config(public_dir):
    result = subprocess.run(["unshare", "--net", XKNOCK, "attach", "lo", "-c", write(public_dir, "bad.toml", TWO_ERRORS),
                             "--once"], capture_output=True, text=True, timeout=60)
    assert_no_traceback(result)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "port out of range" in result.stderr
