"""`xknock top`: rates computed from two reads of the counters, and the real
command in a namespace lab while an attacker hammers a guarded port."""

import json
import re
import signal
import subprocess

import pytest

from xknock_dev.e2e import (
    XKNOCK, LineReader, TcpEchoServer, check, config_text, knock, plain_knock, write_config, xknock,
)
from xknock.cli import top
from xknock.controller.kernel import layout
from xknock_dev.lab import HELPER_PYTHON, lab, stop_process

GUARDED = 22

# SYNs to a guarded port, one non-blocking connect every 20 ms, until killed.
SYN_LOOP = r"""
import socket, sys, time
print("started", flush=True)
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((sys.argv[1], int(sys.argv[2])))
    time.sleep(0.02)
    s.close()
"""


# --- rates, without a kernel ------------------------------------------------------

class _Att:
    def __init__(self, ifname):
        self.ifname, self.mode, self.prog_id = ifname, "generic", 7


def _reading(at, no_grant, advanced, removed=0):
    counters = dict.fromkeys(layout.Reason, 0)
    counters[layout.Reason.DROP_NO_GRANT] = no_grant
    counters[layout.Reason.GRANT_CREATED] = 3
    counters[layout.Reason.GRANT_REMOVED] = removed
    return top.Reading(at, counters, {0xabc: ("ssh", layout.SeqStats(advanced=advanced))}, "enforce")


def test_rates_are_deltas_over_the_time_between_reads():
    view = top.FilterView([_Att("eth0")], maps=None)
    view.previous = _reading(100.0, no_grant=100, advanced=4)
    view.current = _reading(102.0, no_grant=130, advanced=10, removed=1)
    view.lists = top.Lists(102.0, 0.001, [], 0, 0, [])
    frame = "\n".join(view.render(interval=2.0))
    assert re.search(r"^\s+drop_no_grant\s+15\.0\s+130$", frame, re.MULTILINE), frame
    assert re.search(r"^\s+ssh\s+3\.0\s+0\.0\s+0\.0\s+0\.0$", frame, re.MULTILINE), frame
    assert "over 2.00 s" in frame and "grants live: 2 " in frame


def test_a_first_read_or_a_counter_that_went_back_has_no_rate():
    view = top.FilterView([_Att("eth0")], maps=None)
    view.current = _reading(100.0, no_grant=100, advanced=4)
    view.lists = top.Lists(100.0, 0.001, [], 0, 0, [])
    assert re.search(r"^\s+drop_no_grant\s+-\s+100$", "\n".join(view.render(1.0)), re.MULTILINE)
    view.previous, view.current = view.current, _reading(101.0, no_grant=5, advanced=0)
    frame = "\n".join(view.render(1.0))
    assert re.search(r"^\s+drop_no_grant\s+-\s+5$", frame, re.MULTILINE), frame
    assert re.search(r"^\s+ssh\s+-", frame, re.MULTILINE), frame


# --- the real command -------------------------------------------------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("top"), "top.toml", config_text(step_timeout="60s"))
    with lab("xktop") as built:
        server = TcpEchoServer(built.server, GUARDED)
        try:
            check(xknock(built.server, "attach", built.server_iface, "-c", config, "--once"))
            yield built
        finally:
            server.stop()
            xknock(built.server, "detach", built.server_iface)


@pytest.fixture
def syn_flood(net):
    """The attacker sending SYNs to the guarded port while the test runs."""
    process = net.attacker.popen([HELPER_PYTHON, "-c", SYN_LOOP, net.server.ipv4, str(GUARDED)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert LineReader(process.stdout).wait_for(lambda l: l == "started", 10.0)
    yield process
    stop_process(process)


@pytest.mark.netns
def test_one_frame_shows_drop_rates_the_sequence_grants_and_knocks(net, syn_flood):
    knock(net.client, net.server.ipv4, "tcp:7000", "udp:8000", "tcp:9000")     # a grant for the client
    plain_knock(net.attacker, net.server.ipv4, "tcp:7000")                       # the attacker part way
    result = check(xknock(net.server, "top", net.server_iface, "--once", "--interval", "1"))
    frame = result.stdout
    assert "\x1b[" not in frame, "--once must print plain text"
    match = re.search(r"^\s+drop_no_grant\s+([\d.]+)\s+(\d+)$", frame, re.MULTILINE)
    assert match and float(match.group(1)) > 0, frame
    assert re.search(r"^\s+ssh\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", frame, re.MULTILINE), frame
    assert f"filter on {net.server_iface} " in frame
    assert "grants live: 1 " in frame and re.search(rf"^\s+{re.escape(net.client.ipv4)}\s+tcp:22\s+ssh", frame,
                                                     re.MULTILINE), frame
    assert "knocks in progress: 1" in frame
    # a first step is counted, not listed: the first-step filter keeps no source
    assert "sources at their first step are counted, not listed" in frame


@pytest.mark.netns
def test_ctrl_c_ends_the_live_view_cleanly(net):
    process = net.server.popen([XKNOCK, "top", net.server_iface, "--interval", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = LineReader(process.stdout)
        assert out.wait_for(lambda l: l.startswith("xknock top"), 20.0), out.read_all(0.5)
        assert out.wait_for(lambda l: l.startswith("xknock top"), 5.0), "no second frame"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        stderr = process.stderr.read().decode()
        assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    finally:
        stop_process(process)


@pytest.mark.netns
@pytest.mark.parametrize("iface, pattern", [("nosuchif", "no such interface: nosuchif"), ("lo", "no XDP program on lo")])
def test_an_interface_without_the_filter_is_one_line(net, iface, pattern):
    result = xknock(net.server, "top", iface, "--once")
    assert result.returncode == 1 and result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xknock: ") and pattern in lines[0], result.stderr
