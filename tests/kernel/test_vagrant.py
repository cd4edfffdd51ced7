"""The files operators run outside Python: the Vagrant lab (vagrant/) passes
`vagrant validate` and says what its README says; the systemd unit
(packaging/systemd/) passes `systemd-analyze verify`.

`vagrant validate` runs with its home and state in a temporary directory and
without a network (a network namespace of its own): it can neither download a
box nor leave a .vagrant/ directory in the repository. The machines are never
booted here.
"""

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from xknock.controller.config import parse_config
from repo_paths import REPO

ROOT = REPO
VAGRANT_DIR = os.path.join(ROOT, "vagrant")
UNIT = os.path.join(ROOT, "packaging", "systemd", "xknock@.service")
LAB_NETWORK = ipaddress.ip_network("192.168.56.0/24")
MACHINES = ("server", "client", "attacker")

VAGRANT = shutil.which("vagrant")
needs_vagrant = pytest.mark.skipif(
    VAGRANT is None,
    reason="LOUD SKIP: `vagrant` is not installed (Debian package vagrant, which scripts/setup installs): "
           "vagrant/Vagrantfile is NOT validated")


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def vagrant_validate(directory, tmp_path):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
        "VAGRANT_NO_PLUGINS": "1",
    }
    # --ignore-provider: no provider (VirtualBox, libvirt) is installed here,
    # and validate refuses to run without one otherwise.
    return subprocess.run(["unshare", "--net", VAGRANT, "validate", "--ignore-provider", "--no-color"],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@needs_vagrant
def test_vagrantfile_validates(tmp_path):
    result = vagrant_validate(VAGRANT_DIR, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully." in result.stdout
    for name in MACHINES:
        assert f"==> {name}:" in result.stdout
    assert not os.path.exists(os.path.join(VAGRANT_DIR, ".vagrant")), "validate left state in the repository"


@needs_vagrant
def test_validate_catches_a_broken_vagrantfile(tmp_path):
    """The control: the same file with one mistake fails, so the test above means something."""
    copy = tmp_path / "repo" / "vagrant"
    copy.mkdir(parents=True)
    shutil.copy(os.path.join(VAGRANT_DIR, "provision.sh"), copy)
    broken = read("vagrant", "Vagrantfile").replace("node.vm.hostname =", "node.vm.hostnme =")
    (copy / "Vagrantfile").write_text(broken)
    result = vagrant_validate(copy, tmp_path)
    assert result.returncode != 0
    assert "hostnme" in result.stdout + result.stderr


def test_lab_machines_addresses_and_provisioning():
    vagrantfile = read("vagrant", "Vagrantfile")
    assert 'ENV.fetch("XKNOCK_BOX", "debian/bookworm64")' in vagrantfile
    assert 'config.vm.synced_folder "..", "/xknock", type: "rsync"' in vagrantfile
    machines = dict(re.findall(r'"(\w+)"\s*=>\s*\{\s*ip:\s*"#\{NETWORK\}\.(\d+)"', vagrantfile))
    assert tuple(machines) == MACHINES
    network = re.search(r'NETWORK = "([\d.]+)"', vagrantfile).group(1)
    addresses = {name: ipaddress.ip_address(f"{network}.{host}") for name, host in machines.items()}
    assert all(address in LAB_NETWORK for address in addresses.values())
    assert len(set(addresses.values())) == len(MACHINES)

    provision = os.path.join(VAGRANT_DIR, "provision.sh")
    assert os.access(provision, os.X_OK)
    subprocess.run(["bash", "-n", provision], check=True)
    assert '"${REPO}/scripts/setup"' in read("vagrant", "provision.sh")

    # The README's machines and addresses are the Vagrantfile's.
    readme = read("vagrant", "README.md")
    for name, address in addresses.items():
        assert re.search(rf"\| `{name}`\s*\| {re.escape(str(address))}\s*\|", readme), name
    assert parse_config(read("vagrant", "xknock.toml"), listening=set()).sequences[0].open[0].port == 22


def test_readme_uses_only_real_commands():
    from xknock.cli.main import main

    readme = read("vagrant", "README.md")
    code = re.findall(r"```.*?```", readme, re.DOTALL) + re.findall(r"`[^`\n]+`", readme)
    used = {command for snippet in code for command in re.findall(r"\bxknock ([a-z]+)", snippet)}
    assert {"attach", "knock", "status", "detach"} <= used
    real = set(main.list_commands(None))   # the lazy group's table: .commands holds only those imported so far
    assert used <= real, used - real


# --- the systemd unit -------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_unit_runs_the_documented_command():
    unit = read("packaging", "systemd", "xknock@.service")
    settings = [line for line in unit.splitlines() if line and not line.startswith("#")]
    assert ("ExecStart=/opt/xknock/venv/bin/xknock $XKNOCK_OPTS attach %i -c ${XKNOCK_CONFIG} "
            "$XKNOCK_ATTACH_OPTS") in settings
    # Per instance: the config (default the shared one), the options, the SPA replay cache's directory.
    assert "Environment=XKNOCK_CONFIG=/etc/xknock/xknock.toml XKNOCK_STATE_DIR=/var/lib/xknock/%i" in settings
    assert [line for line in settings if line.startswith("EnvironmentFile=")] == [
        "EnvironmentFile=-/etc/xknock/xknock.env", "EnvironmentFile=-/etc/xknock/%i.env"]
    assert "StateDirectory=xknock xknock/%i" in settings
    assert any(line.startswith("Documentation=man:xknock-attach(1)") for line in settings)
    # systemctl reload is `xknock reload`: through this controller, failing when it refuses the file.
    reloads = [line for line in settings if line.startswith("ExecReload=")]
    assert reloads == ["ExecReload=/opt/xknock/venv/bin/xknock reload %i"]
    assert "RestartPreventExitStatus=78" in settings
    assert "Restart=on-failure" in settings
    [bounding] = [line for line in settings if line.startswith("CapabilityBoundingSet=")]
    assert set(bounding.split("=", 1)[1].split()) == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    # The controller speaks sd_notify (tests/e2e/test_sdnotify.py): ready, then watchdog pings.
    assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=30s"} <= set(settings)
    assert "WantedBy=multi-user.target" in settings


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed: the unit is not verified")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    shutil.copy(UNIT, tmp_path)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / "xknock@.service")],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, saying so on stderr.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "xknock" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
