"""Two CLI refusals of issue 13: --metrics-addr on an address that is not
loopback needs --metrics-public (the counters tell a prober each knock
step), and knock --sequence with -c refuses the --secret-file options."""

import subprocess

import pytest
from xknock_dev.e2e import XKNOCK


@pytest.mark.parametrize("addr", [":9798", "0.0.0.0:9798", "[::]:9798", "192.0.2.1:9798"])
def test_a_metrics_address_that_is_not_loopback_is_refused_without_the_flag(tmp_path, addr):
    config = tmp_path / "x.toml"
    config.write_text("")
    result = subprocess.run(["unshare", "--net", XKNOCK, "attach", "lo", "-c", str(config), "--metrics-addr", addr],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "is not a loopback address" in result.stderr and "--metrics-public" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_loopback_check():
    from xknock.cli.attach import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("192.0.2.1")


@pytest.mark.parametrize("extra", [["--protos", "tcp,tcp"], ["--window", "30s"], ["--port-range", "1000-2000"]])
def test_knock_with_a_config_refuses_the_secret_file_options(tmp_path, extra):
    """Issue 13.17: they were silently ignored."""
    config = tmp_path / "x.toml"
    config.write_text('[[sequence]]\nname = "ssh"\nknock = ["tcp:7000"]\nopen = ["tcp:22"]\n')
    result = subprocess.run([XKNOCK, "knock", "192.0.2.1", "--sequence", "ssh", "-c", str(config), *extra],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "go with --secret-file" in result.stderr, result.stderr
