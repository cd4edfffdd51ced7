"""Files xknock trusts (the config, key files, secret files, hook programs)
must be changeable by root alone, and the folders above them too
(controller/kernel/trust.py): a case table through the real loaders, then
`xknock attach` refusing a config anyone may write, in a namespace lab.

The tests run as root; files are handed to `nobody` with os.chown."""

import base64
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from xknock_dev.e2e import XKNOCK, config_text, status_json, write_config, xknock
from xknock_dev.lab import lab

from xknock.controller.config import ConfigError, load_config
from xknock.controller.kernel import trust
from xknock.controller.wire.spa_keys import SpaKeyError, format_keygen, generate, load_key_file

NOBODY = 65534
SECRET = base64.b32encode(b"s" * 20).decode()
HOOKED = config_text().replace('name = "ssh"\n', 'name = "ssh"\non_open = ["{hook}"]\n')


def hooked(hook):
    return HOOKED.replace("{hook}", str(hook))


def program(path, mode=0o755):
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def key_file(path):
    path.write_text(format_keygen(generate()))
    path.chmod(0o600)
    return path


def spa_config(keys):
    return (f'[spa]\n[[spa.user]]\nname = "alice"\nkey_file = "{keys}"\nopen = ["tcp:22"]\n')


def totp_config(secret_file):
    return (f'[[sequence]]\nname = "a"\ntotp = true\nsecret_file = "{secret_file}"\nknock = ["tcp", "udp"]\n'
            'open = ["tcp:22"]\n')


def to_nobody(path):
    os.chown(path, NOBODY, NOBODY)
    return path


def folder(tmp_path, name, mode=0o755):
    path = tmp_path / name
    path.mkdir()
    path.chmod(mode)
    return path


INLINE_KEYS = ('[spa]\n[[spa.user]]\nname = "alice"\nopen = ["tcp:22"]\n'
               f'key = "{base64.b64encode(b"k" * 32).decode()}"\nhmac_key = "{base64.b64encode(b"h" * 64).decode()}"\n')


def chmodded(path, mode):
    path.chmod(mode)
    return path


def secret(path):
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def link(path, target):
    path.symlink_to(target)
    return path


def the_issue(tmp_path):
    """Issue 13 item 10: a 0622 config of nobody's with an on_open hook."""
    config = tmp_path / "x.toml"
    config.write_text(hooked(program(tmp_path / "hook")))
    config.chmod(0o622)
    return to_nobody(config)


def symlinked_hook(tmp_path, target_folder_mode, target_mode):
    """A root-owned link in a good folder to a hook program elsewhere."""
    elsewhere = folder(tmp_path, "elsewhere", target_folder_mode)
    return link(tmp_path / "hook", program(elsewhere / "real", target_mode))


# (description, setup(tmp_path), expected message): setup makes the files a
# config names and returns (config text, its mode[, its folder]), or (None,
# the config file it wrote itself). {t} in the message is tmp_path.
REFUSED = [
    ("config of nobody's, 0622, with a hook", lambda t: (None, the_issue(t)),
     "owned by uid 65534 (nobody), not by root: they could change it (chown root "),
    ("config writable by others", lambda t: (config_text(), 0o646), "writable by group or others (mode 0646)"),
    ("config writable by its group", lambda t: (config_text(), 0o660), "writable by group or others (mode 0660)"),
    ("config with keys inline readable by others", lambda t: (INLINE_KEYS, 0o644),
     "readable by group or others (mode 0644) but it holds secrets (chmod 600 "),
    ("config with a secret inline readable by its group",
     lambda t: (totp_config("x").replace('secret_file = "x"', f'secret = "{SECRET}"'), 0o640),
     "readable by group or others (mode 0640) but it holds secrets"),
    ("hook program of nobody's", lambda t: (hooked(to_nobody(program(t / "hook"))), 0o600),
     "on_open[0]: hook program {t}/hook: owned by uid 65534 (nobody)"),
    ("hook program writable by others", lambda t: (hooked(program(t / "hook", 0o757)), 0o600),
     "hook program {t}/hook: writable by group or others (mode 0757)"),
    ("hook program in a folder anyone may write", lambda t: (hooked(program(folder(t, "bin", 0o777) / "hook")), 0o600),
     "folder {t}/bin is writable by group or others (mode 0777) (chmod go-w {t}/bin): they could replace the file"),
    ("hook program in a folder of nobody's", lambda t: (hooked(program(to_nobody(folder(t, "bin")) / "hook")), 0o600),
     "folder {t}/bin is owned by uid 65534 (nobody), not by root (chown root {t}/bin)"),
    ("hook program, missing, in a sticky folder anyone may write",
     lambda t: (hooked(folder(t, "tmp", 0o1777) / "hook"), 0o600),
     "folder {t}/tmp is writable by group or others (mode 1777) and has no {t}/tmp/hook (anyone may create it)"),
    ("hook program of nobody's in a sticky folder",
     lambda t: (hooked(to_nobody(program(folder(t, "tmp", 0o1777) / "hook"))), 0o600),
     "hook program {t}/tmp/hook: owned by uid 65534 (nobody)"),
    ("hook program: a link to a file anyone may write", lambda t: (hooked(symlinked_hook(t, 0o755, 0o777)), 0o600),
     "hook program {t}/hook (a link to {t}/elsewhere/real): writable by group or others (mode 0777)"),
    ("hook program: a link into a folder anyone may write", lambda t: (hooked(symlinked_hook(t, 0o777, 0o755)), 0o600),
     "hook program {t}/hook (a link to {t}/elsewhere/real): folder {t}/elsewhere is writable by group or others"),
    ("hook program: a link to a link in a folder anyone may write",
     lambda t: (hooked(link(t / "hook", link(folder(t, "pub", 0o777) / "hop", program(t / "real")))), 0o600),
     "hook program {t}/hook (a link to {t}/real): folder {t}/pub is writable by group or others (mode 0777)"),
    ("key file named with a NUL", lambda t: (spa_config("/etc/\\u0000x"), 0o600),
     "key file '/etc/\\x00x': contains a NUL character"),
    ("secret file named with a NUL", lambda t: (totp_config("/etc/\\u0000x"), 0o600),
     "secret_file '/etc/\\x00x': contains a NUL character"),
    ("key file of nobody's", lambda t: (spa_config(to_nobody(key_file(t / "alice.keys"))), 0o600),
     "key file {t}/alice.keys: owned by uid 65534 (nobody)"),
    ("key file readable by its group", lambda t: (spa_config(chmodded(key_file(t / "alice.keys"), 0o640)), 0o600),
     "key file {t}/alice.keys: readable by group or others (mode 0640) but it holds secrets"),
    ("key file in a folder anyone may write",
     lambda t: (spa_config(key_file(folder(t, "keys", 0o777) / "a.keys")), 0o600),
     "key file {t}/keys/a.keys: folder {t}/keys is writable by group or others (mode 0777)"),
    ("secret file of nobody's", lambda t: (totp_config(to_nobody(secret(t / "ssh.secret"))), 0o600),
     "secret_file {t}/ssh.secret: owned by uid 65534 (nobody)"),
    ("secret file writable by others", lambda t: (totp_config(chmodded(secret(t / "ssh.secret"), 0o602)), 0o600),
     "secret_file {t}/ssh.secret: writable by group or others (mode 0602)"),
    ("config in a folder of nobody's", lambda t: (config_text(), 0o600, to_nobody(folder(t, "etc"))),
     "config {t}/etc/x.toml: folder {t}/etc is owned by uid 65534 (nobody)"),
    ("config in a sticky folder anyone may write, in an entry of nobody's",
     lambda t: (config_text(), 0o600, to_nobody(folder(folder(t, "tmp", 0o1777), "nobodys", 0o755))),
     "folder {t}/tmp is writable by group or others (mode 1777) and its {t}/tmp/nobodys is owned by uid 65534"),
]


def write_case(tmp_path, setup):
    """The config file a case describes: (text, mode[, folder]) or (None, path)."""
    made = setup(tmp_path)
    if made[0] is None:
        return made[1]
    text, mode, where = (*made, tmp_path)[:3]
    path = where / "x.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("description,setup,expected", REFUSED, ids=[case[0] for case in REFUSED])
def test_what_others_could_change_is_refused_in_one_line(tmp_path, description, setup, expected):
    path = write_case(tmp_path, setup)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), listening=set())
    errors = caught.value.errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert expected.replace("{t}", str(tmp_path)) in errors[0], errors


ACCEPTED = [
    ("config 0644, hook 0755, both root's", lambda t: (hooked(program(t / "hook")), 0o644)),
    ("keys inline in a config 0600", lambda t: (INLINE_KEYS, 0o600)),
    ("hook program: a link to /bin/true", lambda t: (hooked(link(t / "hook", "/bin/true")), 0o644)),
    ("hook program of root's in a sticky folder anyone may write",
     lambda t: (hooked(program(folder(t, "tmp", 0o1777) / "hook")), 0o644)),
    ("hook program missing, in root's folder (only a warning)", lambda t: (hooked(t / "later"), 0o644)),
    ("key file and secret file 0600",
     lambda t: (spa_config(key_file(t / "a.keys")) + totp_config(secret(t / "s")).replace('"tcp:22"', '"tcp:23"'),
                0o600)),
    ("config in root's entry of a sticky folder anyone may write",
     lambda t: (config_text(), 0o600, folder(folder(t, "tmp", 0o1777), "roots", 0o755))),
]


@pytest.mark.parametrize("description,setup", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_what_only_root_may_change_is_accepted(tmp_path, description, setup):
    assert load_config(str(write_case(tmp_path, setup)), listening=set())


def test_a_key_file_of_nobodys_is_refused_to_the_client_too(tmp_path):
    path = to_nobody(key_file(tmp_path / "alice.keys"))
    with pytest.raises(SpaKeyError, match="owned by uid 65534"):
        load_key_file(str(path))
    result = subprocess.run([XKNOCK, "spa", "192.0.2.1", "--key-file", str(path), "--access", "tcp/22"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "owned by uid 65534 (nobody)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_user_running_xknock_may_own_its_files():
    """A folder of nobody's in /tmp (its entry is nobody's too): refused for
    root, fine for nobody running xknock."""
    where = f"/tmp/xknock-trust-{uuid.uuid4().hex[:8]}"
    os.mkdir(where, 0o755)
    try:
        keys = os.path.join(where, "nobody.keys")
        with open(keys, "w") as f:
            f.write(format_keygen(generate()))
        os.chmod(keys, 0o600)
        os.chown(keys, NOBODY, NOBODY)
        os.chown(where, NOBODY, NOBODY)
        assert "owned by uid 65534 (nobody)" in trust.problem(keys, "key file", secret=True)
        as_nobody = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
             "import sys; from xknock.controller.kernel import trust; "
             "print(trust.problem(sys.argv[1], 'key file', secret=True))", keys],
            capture_output=True, text=True, timeout=60)
        assert as_nobody.stdout.strip() == "None", as_nobody.stderr
    finally:
        shutil.rmtree(where)


@pytest.mark.netns
def test_attach_and_reload_refuse_a_config_anyone_may_write(tmp_path):
    with lab("xktrust", ipv6=False) as net:
        result = xknock(net.server, "attach", net.server_iface, "-c", str(the_issue(tmp_path)), "--once")
        assert result.returncode != 0
        assert "owned by uid 65534 (nobody), not by root" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert status_json(net.server) == []     # nothing attached, no port touched
        try:
            good = write_config(tmp_path, "good.toml", config_text(name="ssh"))
            assert xknock(net.server, "attach", net.server_iface, "-c", good, "--once").returncode == 0
            writable = write_config(tmp_path, "writable.toml", config_text(name="web"))
            os.chmod(writable, 0o666)
            result = xknock(net.server, "reload", net.server_iface, "-c", writable)
            assert result.returncode != 0 and "writable by group or others (mode 0666)" in result.stderr
            assert "Traceback" not in result.stderr, result.stderr
            assert [s["name"] for s in status_json(net.server)[0]["sequences"]] == ["ssh"]   # still the old policy
        finally:
            xknock(net.server, "detach", net.server_iface)
