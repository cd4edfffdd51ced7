"""datapath.netns_id(): which network namespace names the pins' directory.
The initial one pins at xknock/<iface>, every other under netns-<inode>/,
so that two containers on the host's bpffs never share maps."""

import os
import types

import pytest

from xknock.controller.kernel import datapath

INIT_PID, INIT_NET = datapath.PROC_PID_INIT_INO, datapath.PROC_NET_INIT_INO
CONTAINER_NET, OTHER_NET, CONTAINER_PID = 0xF0000100, 0xF0000200, 0xF0000300   # dynamic inodes


def fake_stat(monkeypatch, inodes):
    """os.stat of the /proc/.../ns links from inodes (path -> inode, or an OSError to raise)."""
    real = os.stat

    def stat(path, *args, **kwargs):
        if path in inodes:
            found = inodes[path]
            if isinstance(found, Exception):
                raise found
            return types.SimpleNamespace(st_ino=found)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datapath.os, "stat", stat)


@pytest.mark.parametrize("pid_ns", [INIT_PID, CONTAINER_PID])
def test_the_initial_network_namespace_is_known_by_its_fixed_inode(monkeypatch, pid_ns):
    fake_stat(monkeypatch, {"/proc/self/ns/net": INIT_NET, "/proc/self/ns/pid": pid_ns,
                            "/proc/1/ns/net": PermissionError(13, "denied")})
    assert datapath.netns_id() is None


def test_on_a_kernel_without_it_the_host_s_init_tells(monkeypatch):
    fake_stat(monkeypatch, {"/proc/self/ns/net": OTHER_NET, "/proc/self/ns/pid": INIT_PID, "/proc/1/ns/net": OTHER_NET})
    assert datapath.netns_id() is None
    fake_stat(monkeypatch, {"/proc/self/ns/net": CONTAINER_NET, "/proc/self/ns/pid": INIT_PID,
                            "/proc/1/ns/net": OTHER_NET})
    assert datapath.netns_id() == CONTAINER_NET


def test_a_container_s_init_never_passes_for_the_host_s(monkeypatch):
    """xknock as a container's entrypoint (PID 1 of its PID namespace) or under
    one: /proc/1 shares the container's network namespace."""
    fake_stat(monkeypatch, {"/proc/self/ns/net": CONTAINER_NET, "/proc/self/ns/pid": CONTAINER_PID,
                            "/proc/1/ns/net": CONTAINER_NET})
    assert datapath.netns_id() == CONTAINER_NET
    assert datapath.pin_dir(["eth0"]) == f"{datapath.PIN_ROOT}/netns-{CONTAINER_NET}/eth0"


def test_where_init_cannot_be_read_the_namespace_is_not_taken_for_the_initial_one(monkeypatch):
    fake_stat(monkeypatch, {"/proc/self/ns/net": OTHER_NET, "/proc/self/ns/pid": INIT_PID,
                            "/proc/1/ns/net": PermissionError(13, "denied")})
    assert datapath.netns_id() == OTHER_NET
