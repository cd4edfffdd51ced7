"""The standalone public-key SPA client (client/xknock-spa-pubkey.py): its
embedded wire modules are exact copies of controller/wire's, it runs on the
system Python with nothing but `cryptography`, and its keys are xknock's.
(It knocks a real server in tests/e2e/test_spa_pubkey_e2e.py.)"""

import os
import subprocess

from xknock_dev import standalone
from xknock_dev.lab import HELPER_PYTHON

from xknock.controller.wire import spa_pubkey_keys as keys


def run(*args):
    return subprocess.run([HELPER_PYTHON, "-I", standalone.CLIENT, *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_the_embedded_modules_are_the_repositorys():
    with open(standalone.CLIENT) as f:
        text = f.read()
    assert standalone.rendered(text) == text, "run `python -m xknock_dev.standalone`"


def test_its_keygen_makes_keys_xknock_reads(tmp_path):
    path = str(tmp_path / "me.key")
    result = run("--keygen", path)
    assert result.returncode == 0, result.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert keys.decode_public(result.stdout) == keys.raw_public(keys.load_private(path, keys.USER))
    assert keys.read_public(path + ".pub") == keys.decode_public(result.stdout)
    again = run("--keygen", path)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_bad_input_is_one_line(tmp_path):
    path = str(tmp_path / "me.key")
    run("--keygen", path)
    for args, message in ((["h", "-A", "tcp/22", "--identity", path, "--server-key", "nope"], "not a public key"),
                          (["h", "-A", "tcp/22", "--identity", str(tmp_path / "none"), "--server-key", "x"],
                           "cannot read"),
                          (["127.0.0.1", "-A", "tcp/22", "--identity", path, "--server-key", "A" * 43 + "=",
                            "-a", "300.1.1.1"], "does not appear to be an IPv4 or IPv6 address")):
        result = run(*args)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result
