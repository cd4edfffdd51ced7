"""The controller speaks systemd's notify protocol: READY=1 once attached,
WATCHDOG=1 from its loop, STOPPING=1 on the way out. A real datagram socket
stands in for systemd; the real foreground controller runs in a lab."""

import os
import signal
import socket

import pytest
from xknock_dev.e2e import XKNOCK, config_text, write_config

from xknock_dev.lab import lab
from xknock.controller.daemon.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    yield path, sock
    sock.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier(environ={})
    assert not notifier.ready() and not notifier.watchdog()


def test_watchdog_pings_at_half_the_interval(notify_socket):
    path, sock = notify_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog()
    assert not notifier.watchdog()   # within a second: no second ping
    assert sock.recv(64) == b"WATCHDOG=1"


def test_a_watchdog_meant_for_another_pid_is_ignored(notify_socket):
    path, _ = notify_socket
    other = str(os.getpid() + 1)   # not ours (PID 1 would be ours where the suite runs as a namespace's init)
    notifier = Notifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other})
    assert notifier.watchdog_interval_s is None


def test_the_controller_notifies_ready_watchdog_and_stopping(notify_socket, tmp_path):
    path, sock = notify_socket
    config = write_config(tmp_path, "notify.toml", config_text())
    with lab("xknotify") as net:
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        controller = net.server.popen([XKNOCK, "attach", net.server_iface, "-c", config], env=env,
                                      stderr=open(os.devnull, "w"))
        try:
            received = [sock.recv(256).decode()]
            assert received[0].startswith("READY=1")
            assert sock.recv(64) == b"WATCHDOG=1"
            controller.send_signal(signal.SIGTERM)
            while not received[-1].startswith("STOPPING=1"):
                received.append(sock.recv(64).decode())
            assert controller.wait(timeout=20) == 0
        finally:
            if controller.poll() is None:
                controller.kill()
                controller.wait()
