"""grant_cache (bpf/xknock_hints.h): each CPU keeps a copy of the grants its
packets passed, so that a flow's next packets pass without the grants hash.
A copy must never pass what the hash would refuse: every change to `grants`
(the controller's, through kernel/maps.py GrantsMap; the data path's knocks
and removals) ends the copies taken before it, and a copy is taken again
from the hash once a second, which keeps the grant's idle clock going and
bounds what a change made behind xknock's back (bpftool) can miss."""

import ctypes
import ipaddress
import os
import random

import pytest
from xknock_dev.packets import step, tcp, udp
from xknock_dev.testrun import XDP_DROP, XDP_PASS

from xknock.controller.config import parse_config
from xknock.controller.kernel import bpfsys, layout
from xknock.controller.kernel.firsts import mix32
from xknock.controller.kernel.maps import to_addr
from xknock.controller.state import grants

SOURCE, SOURCE6 = "198.51.100.71", "2001:db8:77::71"
HOUR = 3600 * 10**9

CONFIG = """
[filter]
answer = "drop"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000"]
open = ["tcp:22"]
open_for = "{open_for}"
idle_timeout = "15m"
"""


# Copies are per CPU: each test's runs on one, so that a run finds the last one's copy.
pytestmark = pytest.mark.usefixtures("one_cpu")


def ack(source, port=22):
    return tcp(source, port, flags="A")


def key_of(source, proto, port):
    return layout.GrantKey(src=to_addr(ipaddress.ip_address(source)), proto=proto, port=port)


def copy_slot(key):
    """grant_copy_slot() of bpf/xknock_hints.h."""
    w = [int.from_bytes(bytes(key)[i:i + 4], "little") for i in range(0, 20, 4)]
    return mix32(w[3] ^ mix32(w[0] ^ w[1] ^ w[2] ^ w[4])) & (layout.GRANT_CACHE_SLOTS - 1)


def delete_behind_xknock_s_back(xk, key):
    """As `bpftool map delete` would: through the fd, no new epoch."""
    assert bpfsys.map_delete(xk.maps.grants.fd, key)


@pytest.mark.parametrize("source", [SOURCE, SOURCE6])
def test_a_copy_passes_the_flow_until_the_grant_changes_behind_xknock_s_back_then_a_second_at_most(xk, source):
    """The copy is what passes here: the hash no longer holds the grant."""
    grants.grant(xk.maps, source, [("tcp", 22)], HOUR, now=xk.now_ns)
    assert xk.run(tcp(source, 22)) == XDP_PASS            # from the hash; the copy is taken
    delete_behind_xknock_s_back(xk, key_of(source, layout.PROTO_TCP, 22))
    xk.advance(0.5)
    assert xk.run(ack(source)) == XDP_PASS                # the copy, half a second old
    xk.advance(0.51)
    assert xk.run(ack(source)) == XDP_DROP                # over a second: the hash again, and it has none


@pytest.mark.parametrize("source", [SOURCE, SOURCE6])
def test_a_revoke_ends_the_copies_at_once(xk, source):
    grants.grant(xk.maps, source, [("tcp", 22)], HOUR, now=xk.now_ns)
    assert xk.run(tcp(source, 22)) == XDP_PASS
    assert xk.run(ack(source)) == XDP_PASS
    assert grants.revoke(xk.maps, source) == 1
    assert xk.run(ack(source)) == XDP_DROP
    assert xk.run(tcp(source, 22)) == XDP_DROP


def test_an_operator_grant_that_shortens_a_grant_ends_its_copies(xk):
    grants.grant(xk.maps, SOURCE, [("tcp", 22)], HOUR, now=xk.now_ns)
    assert xk.run(tcp(SOURCE, 22)) == XDP_PASS
    grants.write_grants(xk.maps, SOURCE, [("tcp", 22)], 10**8, 10**8, now=xk.now_ns)   # 100 ms on both clocks
    xk.advance(0.2)
    assert xk.run(tcp(SOURCE, 22)) == XDP_DROP
    assert xk.run(ack(SOURCE)) == XDP_DROP


def test_the_sweep_ends_the_copies_of_what_it_removes(xk):
    grants.write_grants(xk.maps, SOURCE, [("tcp", 22)], 10**8, 10**8, now=xk.now_ns)
    grants.grant(xk.maps, SOURCE, [("udp", 443)], HOUR, now=xk.now_ns)   # keeps the source's granted byte set
    assert xk.run(tcp(SOURCE, 22)) == XDP_PASS
    # what the copy holds is dead after 100 ms anyway: rewrite the grant long,
    # behind xknock's back, take a copy of that, then let the sweep remove it
    delete_behind_xknock_s_back(xk, key_of(SOURCE, layout.PROTO_TCP, 22))
    long = layout.Grant(window_end_ns=xk.now_ns + HOUR, idle_timeout_ns=HOUR, last_seen_ns=xk.now_ns)
    bpfsys.map_update(xk.maps.grants.fd, key_of(SOURCE, layout.PROTO_TCP, 22), long)
    xk.advance(1.01)
    assert xk.run(ack(SOURCE)) == XDP_PASS             # the hash's long grant, copied
    dead = layout.Grant(window_end_ns=xk.now_ns - 1, idle_timeout_ns=1, last_seen_ns=xk.now_ns - 2)
    bpfsys.map_update(xk.maps.grants.fd, key_of(SOURCE, layout.PROTO_TCP, 22), dead)
    assert grants.expire_grants(xk.maps, now=xk.now_ns) == 1
    assert xk.run(ack(SOURCE)) == XDP_DROP
    assert xk.run(udp(SOURCE, 443)) == XDP_PASS


def test_a_knock_that_rewrites_a_grant_shorter_ends_its_copies(harness):
    """The data path's word: a reload shortened open_for, and the source knocks again."""
    harness.reset_state()
    harness.apply(parse_config(CONFIG.format(open_for="30s"), listening=set()))
    for knock in ("tcp:7000", "udp:8000"):
        harness.run(step(SOURCE, knock))
    assert harness.run(tcp(SOURCE, 22)) == XDP_PASS
    harness.apply(parse_config(CONFIG.format(open_for="100ms"), listening=set()))
    assert harness.run(tcp(SOURCE, 22)) == XDP_PASS     # a copy of the 30 s grant, taken after the reload
    for knock in ("tcp:7000", "udp:8000"):
        harness.run(step(SOURCE, knock))
    harness.advance(0.2)
    assert harness.run(tcp(SOURCE, 22)) == XDP_DROP     # the new grant's window is over
    assert harness.run(ack(SOURCE)) == XDP_PASS         # its idle clock is not


def test_a_dead_grant_the_data_path_removes_passes_nothing_on_any_copy(xk):
    grants.write_grants(xk.maps, SOURCE, [("tcp", 22)], 10**9, 10**9, now=xk.now_ns)
    assert xk.run(tcp(SOURCE, 22)) == XDP_PASS
    xk.advance(2.5)
    assert xk.run(ack(SOURCE)) == XDP_DROP              # dead on both clocks: removed on the way
    assert xk.maps.grants.lookup(key_of(SOURCE, layout.PROTO_TCP, 22)) is None
    assert xk.counters()[layout.Reason.GRANT_EXPIRED] == 1


def test_traffic_passed_on_copies_keeps_its_grant_alive(xk):
    """Copies are taken again once a second: the hash's idle clock moves with the
    flow, so neither the program nor the sweep ends a grant in use."""
    grants.write_grants(xk.maps, SOURCE, [("tcp", 22)], 10**9, 3 * 10**9, now=xk.now_ns)   # open 1 s, idle 3 s
    assert xk.run(tcp(SOURCE, 22)) == XDP_PASS
    for _ in range(40):   # 20 s of a packet every half second
        xk.advance(0.5)
        assert xk.run(ack(SOURCE)) == XDP_PASS
        assert grants.expire_grants(xk.maps, now=xk.now_ns) == 0
    assert xk.run(tcp(SOURCE, 22)) == XDP_DROP          # a new connection needs the window, long over
    xk.advance(3.1)
    assert xk.run(ack(SOURCE)) == XDP_DROP              # idle too long


def test_a_copy_answers_for_its_own_key_only(xk):
    """Another source (or port) hashed to the same slot finds the copy and
    looks the hash up: it passes only on a grant of its own."""
    slot = copy_slot(key_of(SOURCE, layout.PROTO_TCP, 22))
    rng = random.Random(5)
    while True:
        other = str(ipaddress.IPv4Address(rng.getrandbits(32) & 0x00FFFFFF | 0x0A000000))   # 10.0.0.0/8
        if copy_slot(key_of(other, layout.PROTO_TCP, 22)) == slot:
            break
    grants.grant(xk.maps, other, [("udp", 443)], HOUR, now=xk.now_ns)   # its granted byte is set: it reaches the copy
    grants.grant(xk.maps, SOURCE, [("tcp", 22)], HOUR, now=xk.now_ns)
    assert xk.run(tcp(SOURCE, 22)) == XDP_PASS           # SOURCE's copy, under the last epoch
    assert xk.run(tcp(other, 22)) == XDP_DROP
    assert xk.run(udp(other, 443)) == XDP_PASS
    assert xk.run(ack(SOURCE)) == XDP_PASS


def test_every_cpu_s_copies_end_with_a_revoke(xk, one_cpu):
    cpus = one_cpu[:2]   # the CPUs this test may run on
    if len(cpus) < 2:
        pytest.skip("one CPU: a copy per CPU needs two")
    grants.grant(xk.maps, SOURCE, [("tcp", 22)], HOUR, now=xk.now_ns)
    for cpu in cpus:
        os.sched_setaffinity(0, {cpu})
        assert xk.run(tcp(SOURCE, 22)) == XDP_PASS
    delete_behind_xknock_s_back(xk, key_of(SOURCE, layout.PROTO_TCP, 22))
    for cpu in cpus:   # each CPU passes on its own copy
        os.sched_setaffinity(0, {cpu})
        assert xk.run(ack(SOURCE)) == XDP_PASS, cpu
    grants.grant(xk.maps, SOURCE, [("tcp", 22)], HOUR, now=xk.now_ns)
    assert grants.revoke(xk.maps, SOURCE) == 1
    for cpu in cpus:
        os.sched_setaffinity(0, {cpu})
        assert xk.run(ack(SOURCE)) == XDP_DROP, cpu


def test_the_controller_s_epoch_only_moves_on(xk):
    from xknock.controller.kernel.epochs import Epochs

    def word():
        return xk.maps.epochs.lookup(ctypes.c_uint32(layout.EPOCH_GRANTS_CONTROLLER)).value

    epochs = Epochs(xk.maps.epochs)
    try:
        seen = [word()]
        for _ in range(5):
            epochs.advance(layout.EPOCH_GRANTS_CONTROLLER)
            seen.append(word())
        assert seen == sorted(set(seen))
    finally:
        epochs.close()
