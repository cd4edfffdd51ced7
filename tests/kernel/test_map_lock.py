"""The writers' lock (issue 13.8): a local user must not be able to take it
and freeze every map writer. Run on a directory of the test's own."""

import fcntl
import os
import stat
import types

import pytest

from xknock.controller.kernel import lock as policy
from xknock.controller.errors import XknockError

NOBODY = 65534


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    path = tmp_path / "run-xknock"
    monkeypatch.setattr(policy, "LOCK_DIR", str(path))
    return path


MAPS = types.SimpleNamespace(control=types.SimpleNamespace(id=4242))


def test_the_lock_is_root_s_alone(lock_dir):
    with policy.map_lock(MAPS):
        pass
    assert stat.S_IMODE(os.stat(lock_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(lock_dir / "filter-4242.lock").st_mode) == 0o600


def test_a_world_readable_directory_and_a_stranger_s_lock_file_are_taken_back(lock_dir):
    """As left by an older xknock under umask 022: nobody opened the file
    read-only and held flock on it."""
    lock_dir.mkdir(mode=0o755)
    os.chmod(lock_dir, 0o755)
    planted = lock_dir / "filter-4242.lock"
    planted.write_text("")
    os.chown(planted, NOBODY, NOBODY)
    os.chmod(planted, 0o644)
    with open(planted) as held:   # the stranger's descriptor, holding the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with policy.map_lock(MAPS, timeout=1.0):
            assert os.stat(planted).st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(lock_dir).st_mode) == 0o700


def test_a_planted_symlink_is_not_followed(lock_dir, tmp_path):
    lock_dir.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (lock_dir / "filter-4242.lock").symlink_to(target)
    with policy.map_lock(MAPS):
        pass
    assert target.read_text() == "keep" and not (lock_dir / "filter-4242.lock").is_symlink()


def test_a_directory_of_someone_else_is_refused(lock_dir):
    lock_dir.mkdir(mode=0o700)
    os.chown(lock_dir, NOBODY, NOBODY)
    with pytest.raises(XknockError, match="belongs to uid 65534"):
        with policy.map_lock(MAPS):
            pass


def test_waiting_is_bounded(lock_dir):
    with policy.map_lock(MAPS):   # held here: a second writer gives up in time
        with pytest.raises(XknockError, match="for over 0.2s"):
            with policy.map_lock(MAPS, timeout=0.2):
                pass
