"""Sharing an interface through libxdp's dispatcher: `xknock attach --priority N`.

The lab's server runs xdp-filter (Debian's xdp-tools, libxdp's own
programs) beside xknock. Commands that must leave libxdp's pins behind run
through `nsenter --net` (the host's bpffs), not `ip netns exec` (a bpffs of
the process's own, gone with it; xdp-filter refuses to run there at all).

Whether libxdp can make a dispatcher at all is asked of libxdp itself:
xdp-filter loaded on a spare veth, `xdp-loader status` read. Where it
cannot (the kernel refuses extension programs), the tests that need one are
skipped and the refusal is tested instead.
"""

import contextlib
import os
import shutil
import subprocess
import uuid

import pytest

from xknock_dev.e2e import (DROPPED, SEQUENCE, attach_foreign_xdp, check, config_text, served_lab,
                            write_config, xdp_prog_id, xknock, XKNOCK)
from xknock_dev.lab import can_connect

pytestmark = pytest.mark.skipif(shutil.which("xdp-filter") is None or shutil.which("xdp-loader") is None,
                                reason="xdp-tools (xdp-filter, xdp-loader) not installed")

GUARDED = 22       # xknock's guarded port (config_text's default)
FILTERED = 8080    # the port xdp-filter drops


def shared(host, *argv, timeout=60):
    """argv in host's network namespace, in this mount namespace (its bpffs)."""
    return subprocess.run(["nsenter", f"--net=/var/run/netns/{host.name}", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


def dispatcher_possible():
    """Can libxdp make a dispatcher here? Load xdp-filter on a veth of a
    namespace of our own and see what `xdp-loader status` lists."""
    ns = f"xkdisp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "pa", "up"], check=True)
        run = ["nsenter", f"--net=/var/run/netns/{ns}"]   # xdp-filter needs the host's bpffs
        try:
            subprocess.run([*run, "xdp-filter", "load", "pa", "--mode", "skb"], capture_output=True, check=True)
            status = subprocess.run([*run, "xdp-loader", "status", "pa"], capture_output=True, text=True).stdout
        finally:
            subprocess.run([*run, "xdp-filter", "unload", "pa"], capture_output=True)
        return "xdp_dispatcher" in status
    finally:
        subprocess.run(["ip", "netns", "del", ns])


DISPATCHER = dispatcher_possible()
needs_dispatcher = pytest.mark.skipif(not DISPATCHER, reason="libxdp makes no dispatcher on this kernel: it "
                                      "refuses extension (freplace) programs")


@pytest.fixture(scope="module")
def net():
    with served_lab("xkdsp", GUARDED, FILTERED) as built:
        yield built


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, "xknock.toml", config_text())


@contextlib.contextmanager
def clean(net):
    """Leave the server's interface bare (and libxdp's and xknock's pins gone) after a test."""
    iface = net.server_iface
    try:
        yield iface
    finally:
        shared(net.server, XKNOCK, "detach", iface)
        shared(net.server, "xdp-filter", "unload", iface)
        shared(net.server, "xdp-loader", "unload", iface, "--all")
        net.server.run(["ip", "link", "set", "dev", iface, "xdpgeneric", "off"])


def one_line_error(result):
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_priority_and_replace_are_one_or_the_other(net, config):
    result = shared(net.server, XKNOCK, "attach", net.server_iface, "-c", config, "--once", "--priority", "10",
                    "--replace")
    assert result.returncode == 2 and "give one" in result.stderr


def test_priority_outside_libxdps_range_is_refused(net, config):
    result = shared(net.server, XKNOCK, "attach", net.server_iface, "-c", config, "--once", "--priority", "1001")
    assert result.returncode == 2 and "--priority" in result.stderr


def test_a_program_libxdp_does_not_manage_is_refused_and_kept(net, config):
    with clean(net) as iface:
        attach_foreign_xdp(net.server, iface)
        before = xdp_prog_id(net.server, iface)
        line = one_line_error(shared(net.server, XKNOCK, "attach", iface, "-c", config, "--once", "--priority", "10"))
        assert f"program {before} 'other_prog' on its own, not in libxdp's dispatcher" in line
        assert "xdp-loader" in line and "--replace" in line
        assert xdp_prog_id(net.server, iface) == before


def test_ip_netns_exec_is_refused_its_bpffs_goes_with_it(net, config):
    with clean(net) as iface:
        line = one_line_error(xknock(net.server, "attach", iface, "-c", config, "--once", "--priority", "10"))
        assert "bpffs of this process's own" in line and "nsenter --net=" in line
        assert xdp_prog_id(net.server, iface) == 0


@pytest.mark.skipif(DISPATCHER, reason="libxdp makes dispatchers here: the joining tests run instead")
def test_where_the_kernel_refuses_extensions_nothing_is_attached_and_no_pin_left(net, config):
    with clean(net) as iface:
        line = one_line_error(shared(net.server, XKNOCK, "attach", iface, "-c", config, "--once", "--priority", "10"))
        assert "refuses extension (freplace) programs" in line and "without --priority" in line
        assert xdp_prog_id(net.server, iface) == 0
        detach = shared(net.server, XKNOCK, "detach", iface)
        assert "nothing to detach" in detach.stderr, detach


@pytest.mark.skipif(DISPATCHER, reason="libxdp makes dispatchers here: the joining tests run instead")
def test_where_libxdp_fell_back_to_one_program_xknock_is_refused_and_xdp_filter_kept(net, config):
    """libxdp's fallback attaches xdp-filter directly: nothing to join."""
    with clean(net) as iface:
        check(shared(net.server, "xdp-filter", "load", iface, "--mode", "skb"))
        before = xdp_prog_id(net.server, iface)
        line = one_line_error(shared(net.server, XKNOCK, "attach", iface, "-c", config, "--once", "--priority", "10"))
        assert "on its own, not in libxdp's dispatcher" in line
        assert xdp_prog_id(net.server, iface) == before


# --- joining: where libxdp makes dispatchers -----------------------------------------------------

def knock_and_connect(net):
    from xknock_dev.e2e import knock

    knock(net.client, net.server.ipv4, *SEQUENCE)
    return can_connect(net.client, net.server.ipv4, GUARDED)


def both_effective(net):
    """xdp-filter drops FILTERED; xknock guards GUARDED until a knock opens it."""
    assert not can_connect(net.client, net.server.ipv4, FILTERED, timeout=DROPPED)
    assert not can_connect(net.client, net.server.ipv4, GUARDED, timeout=DROPPED)
    assert knock_and_connect(net)


@needs_dispatcher
@pytest.mark.parametrize("xknock_first", [True, False], ids=["xknock-first", "xdp-filter-first"])
def test_xknock_and_xdp_filter_share_one_interface(net, config, xknock_first):
    with clean(net) as iface:
        # xdp-filter's priority is 50 (libxdp's default): 10 runs before it, 90 after.
        priority = "10" if xknock_first else "90"
        check(shared(net.server, "xdp-filter", "load", iface, "--mode", "skb"))
        check(shared(net.server, "xdp-filter", "port", str(FILTERED)))
        check(shared(net.server, XKNOCK, "attach", iface, "-c", config, "--once", "--priority", priority))
        status = check(shared(net.server, "xdp-loader", "status", iface)).stdout
        assert "xdp_knock" in status and "xdpfilt" in status
        both_effective(net)

        # Attaching again keeps the grant and the slot: still one xknock, still effective.
        check(shared(net.server, XKNOCK, "attach", iface, "-c", config, "--once"))
        assert check(shared(net.server, "xdp-loader", "status", iface)).stdout.count("xdp_knock") == 1
        assert can_connect(net.client, net.server.ipv4, GUARDED)

        # Detaching xknock leaves xdp-filter dropping; GUARDED is no longer guarded.
        check(shared(net.server, XKNOCK, "detach", iface))
        assert not can_connect(net.client, net.server.ipv4, FILTERED, timeout=DROPPED)
        assert can_connect(net.client, net.server.ipv4, GUARDED)


@needs_dispatcher
def test_unloading_xdp_filter_leaves_xknock_guarding(net, config):
    with clean(net) as iface:
        check(shared(net.server, "xdp-filter", "load", iface, "--mode", "skb"))
        check(shared(net.server, XKNOCK, "attach", iface, "-c", config, "--once", "--priority", "10"))
        check(shared(net.server, "xdp-filter", "unload", iface))
        assert can_connect(net.client, net.server.ipv4, FILTERED)
        assert not can_connect(net.client, net.server.ipv4, GUARDED, timeout=DROPPED)
        assert knock_and_connect(net)
