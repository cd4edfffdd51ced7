"""The pin directories (issue 13.9): a local user who makes xknock/ or a
link in it first must not get root to adopt another interface's maps. Run
on a directory tree of the test's own, standing for /sys/fs/bpf."""

import os
import stat
import time

import pytest

from xknock.controller.kernel import bpfsys, datapath
from xknock.controller.errors import XknockError

NOBODY = 65534


@pytest.fixture
def root(tmp_path):
    bpffs = tmp_path / "bpf"
    bpffs.mkdir()
    os.chmod(bpffs, 0o1777)   # bpffs mounted without mode=
    return bpffs / "xknock"


def test_made_private(root):
    datapath.make_private_dirs(str(root / "netns-1" / "eth0"), root=str(root))
    for path in (root, root / "netns-1", root / "netns-1" / "eth0"):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


def test_a_link_planted_for_an_interface_is_refused(root):
    root.mkdir(mode=0o700)
    (root / "eth1").mkdir()
    (root / "eth0").symlink_to(root / "eth1")
    with pytest.raises(XknockError, match="is not a directory"):
        datapath.make_private_dirs(str(root / "eth0"), root=str(root))


def test_a_stranger_s_directory_is_refused(root):
    root.mkdir()
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(XknockError, match="belongs to uid 65534"):
        datapath.make_private_dirs(str(root / "eth0"), root=str(root))


def test_an_open_directory_of_ours_is_closed(root):
    root.mkdir()
    os.chmod(root, 0o777)
    datapath.make_private_dirs(str(root / "eth0"), root=str(root))
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700


# --- pins a filter leaves behind (issue 13.13), in a lab namespace entered by
# this process, so that the pins are made in this mount namespace's bpffs and
# outlive each step (under `ip netns exec` each command has a bpffs of its own).

@pytest.fixture(scope="module")
def net():
    from xknock_dev.lab import lab

    with lab("xkpins") as built:
        yield built


@pytest.fixture
def server_ns(net):
    """This process in the server's namespace, with no filter and no pins
    there before and after."""
    from xknock_dev.e2e import remove_xdp
    from xknock_dev.lab import in_netns

    with in_netns(net.server.name):
        try:
            yield net
        finally:
            remove_xdp(net.server, net.server_iface)
            for directory in datapath.pin_dirs_of_interface(net.server_iface):
                datapath.remove_pins(directory)


def _config():
    from xknock.controller.config import parse_config
    from xknock_dev.e2e import config_text

    return parse_config(config_text(), listening=set())


def test_an_attach_refused_for_a_session_it_would_cut_leaves_no_pins(server_ns):
    from xknock.cli.attach import _session_guard   # the CLI's own lockout check
    from xknock_dev.e2e import HeldConnection, TcpEchoServer
    from xknock.controller.daemon import lifecycle

    net = server_ns
    server = TcpEchoServer(net.server, 22)
    held = HeldConnection(net.client, net.server.ipv4, 22)
    try:
        config = _config()
        with pytest.raises(XknockError, match="would cut 1 established session"):
            lifecycle.attach([net.server_iface], config, before_attach=_session_guard(config, False, False))
        assert datapath.attachment(net.server_iface).prog_id == 0
        assert not os.path.exists(datapath.pin_dir([net.server_iface])), \
            f"left behind: {sorted(os.listdir(datapath.pin_dir([net.server_iface])))}"
    finally:
        held.close()
        server.stop()


def test_an_attach_whose_policy_write_fails_leaves_no_pins(server_ns):
    from xknock.controller.daemon import lifecycle

    def full_map(maps):
        raise XknockError("the grants map is full")   # as apply_policy or a grant raises on a full map

    net = server_ns
    with pytest.raises(XknockError, match="full"):
        lifecycle.attach([net.server_iface], _config(), before_attach=full_map)
    assert not os.path.exists(datapath.pin_dir([net.server_iface]))


def test_detach_removes_the_pins_of_an_interface_with_no_program(server_ns):
    from click.testing import CliRunner

    from xknock.cli.main import main
    from xknock_dev.e2e import remove_xdp
    from xknock.controller.daemon import lifecycle

    net = server_ns
    lifecycle.attach([net.server_iface], _config()).maps.close()
    remove_xdp(net.server, net.server_iface)          # the program goes, its pins stay
    directory = datapath.pin_dir([net.server_iface])
    assert "firsts" in os.listdir(directory)
    pinned_maps = [name for name in os.listdir(directory) if not name.startswith("program-")]
    os.mkdir(os.path.join(directory, datapath.STAGING))   # and what an upgrade killed before its swap left
    fd = bpfsys.obj_get(os.path.join(directory, "grants"))
    try:
        bpfsys.obj_pin(fd, os.path.join(directory, datapath.STAGING, "grants"))
    finally:
        os.close(fd)
    result = CliRunner().invoke(main, ["detach", net.server_iface])
    assert result.exit_code == 0, result.output
    # the pinned maps, the program kept for the next attach (kernel/progcache.py) and the staging pin
    pins = len(pinned_maps) + 2
    assert f"no program on {net.server_iface}: removed the {pins} pins" in result.output and directory in result.output
    assert "program-" in result.output
    assert "upgrade/grants" in result.output
    assert not os.path.exists(directory)
    again = CliRunner().invoke(main, ["detach", net.server_iface])
    assert again.exit_code == 1 and "nothing to detach" in again.output


def test_detach_leaves_the_pins_of_a_filter_still_attached_elsewhere(server_ns):
    from xknock_dev.e2e import remove_xdp
    from xknock.controller.daemon import lifecycle

    net = server_ns
    lifecycle.attach([net.server_iface, "lo"], _config(), xdp_mode="generic").maps.close()
    try:
        remove_xdp(net.server, net.server_iface)      # lo still runs the filter of both
        directory = datapath.pin_dir(sorted([net.server_iface, "lo"]))
        with pytest.raises(XknockError, match="nothing to detach"):
            lifecycle.detach(net.server_iface)
        assert "control" in os.listdir(directory)
    finally:
        remove_xdp(net.server, "lo")
        datapath.remove_pins(datapath.pin_dir(sorted([net.server_iface, "lo"])))


def test_attaching_again_re_uses_the_kept_program_and_detach_removes_it(server_ns):
    from xknock.controller.daemon import lifecycle
    from xknock.controller.kernel import progcache

    net = server_ns
    first = lifecycle.attach([net.server_iface], _config())
    first.maps.close()
    directory = datapath.pin_dir([net.server_iface])
    assert first.loaded.bpf is not None and len(progcache.cached(directory)) == 1
    again = lifecycle.attach([net.server_iface], _config())
    again.maps.close()
    assert again.loaded.bpf is None, "compiled again"
    assert again.loaded.prog_id == first.loaded.prog_id == datapath.attachment(net.server_iface).prog_id
    assert again.replaced == {net.server_iface: first.loaded.prog_id}
    first.loaded.bpf.cleanup()
    os.close(again.loaded.fd)
    lifecycle.detach(net.server_iface)
    assert not os.path.exists(directory)
    deadline = time.monotonic() + 5     # nothing holds the program any more: the kernel frees it (after RCU)
    while time.monotonic() < deadline:
        try:
            os.close(bpfsys.prog_fd_by_id(first.loaded.prog_id))
        except bpfsys.BpfError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"program {first.loaded.prog_id} outlived its detach")


# --- pins left by a namespace that is gone: its inode number is given to the
# next namespace, which must not adopt them (a grant there would open a port
# to a source this namespace never let in).

def _attach_with_a_grant(net):
    from xknock.controller.daemon import lifecycle
    from xknock.controller.state import grants

    attached = lifecycle.attach([net.server_iface], _config())
    try:
        grants.grant(attached.maps, "198.51.100.9", None, 30 * 60 * 10**9)
    finally:
        attached.maps.close()
    from xknock_dev.e2e import remove_xdp
    remove_xdp(net.server, net.server_iface)   # the program goes (as when its interface is deleted), the pins stay


def _grants_after_attaching_again(net):
    from xknock.controller.daemon import lifecycle
    from xknock.controller.state import grants

    attached = lifecycle.attach([net.server_iface], _config())
    try:
        return sorted({str(view.source) for view in grants.list_grants(attached.maps)})
    finally:
        attached.maps.close()


def _marker(net):
    parent = os.path.dirname(datapath.pin_dir([net.server_iface]))
    [marker] = [e for e in os.listdir(parent) if e.startswith(datapath.NAMESPACE_MARK)]
    return parent, marker


def test_this_namespace_s_pins_are_adopted_again(server_ns):
    net = server_ns
    _attach_with_a_grant(net)
    parent, marker = _marker(net)
    assert marker == f"{datapath.NAMESPACE_MARK}{datapath.netns_cookie()}"
    assert _grants_after_attaching_again(net) == ["198.51.100.9"]


def test_pins_of_a_namespace_that_is_gone_are_removed_not_adopted(server_ns, caplog):
    net = server_ns
    _attach_with_a_grant(net)
    parent, marker = _marker(net)
    # as a namespace deleted with its filter attached leaves them for the next one given its number
    os.rename(os.path.join(parent, marker), os.path.join(parent, f"{datapath.NAMESPACE_MARK}1"))
    with caplog.at_level("WARNING", logger="xknock"):
        assert _grants_after_attaching_again(net) == []
    assert f"removed the pins of {net.server_iface} left in {parent} by a network namespace that is gone" in caplog.text
    assert _marker(net) == (parent, marker)


def test_detach_removes_the_marker_with_the_last_pins(server_ns):
    from xknock.controller.daemon import lifecycle

    net = server_ns
    lifecycle.attach([net.server_iface], _config()).maps.close()
    parent, _ = _marker(net)
    lifecycle.detach(net.server_iface)
    assert not os.path.exists(parent)
