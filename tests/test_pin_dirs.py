"""The pin directories (issue 13.9): a local user who makes xknock/ or a
link in it first must not get root to adopt another interface's maps. Run
on a directory tree of the test's own, standing for /sys/fs/bpf."""

import os
import stat

import pytest

from xknock.controller.kernel import datapath
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
