"""list_cache (bpf/xknock_hints.h): each CPU keeps a copy of a source it
found on the deny-list, or on the allow-list at a guarded port, so that the
source's next packets skip the trie. A copy counts under the lists' epoch,
which the controller moves before it writes a bank (a reload), and for a
second; so a reload that drops an entry ends its copies at once, and an
entry removed behind xknock's back (bpftool) is missed for a second at most."""

import ipaddress

import pytest
from xknock_dev.packets import tcp

from xknock.controller.config import parse_config
from xknock.controller.kernel import bpfsys, layout
from xknock.controller.kernel.firsts import mix32
from xknock.controller.kernel.maps import to_addr
from xknock.controller.policy.policy import lpm_key
from xknock_dev.testrun import XDP_DROP, XDP_PASS

ALLOWED, ALLOWED6, DENIED = "192.0.2.10", "2001:db8:a::99", "203.0.113.5"

CONFIG = """
[filter]
answer = "drop"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000"]
open = ["tcp:22"]

[allow]
sources = [{allow}]

[deny]
sources = [{deny}]
"""


def config(allow=(f'"{ALLOWED}"', '"2001:db8:a::/48"'), deny=('"203.0.113.0/24"',)):
    return parse_config(CONFIG.format(allow=", ".join(allow), deny=", ".join(deny)), listening=set())


# Copies are per CPU: each test's runs on one.
pytestmark = pytest.mark.usefixtures("one_cpu")


@pytest.fixture
def lists(harness):
    harness.reset_state()
    harness.set_clock(harness.now_ns + 10**9)
    harness.apply(config())
    return harness


def copy_slot(source, bank, which):
    """list_copy_slot() of bpf/xknock_hints.h for the tag of (bank, list)."""
    raw = bytes(to_addr(ipaddress.ip_address(source)).b)
    w = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
    tag = 1 + bank + 2 * which
    return mix32(w[3] ^ mix32(w[0] ^ w[1] ^ w[2] ^ tag)) & (layout.LIST_CACHE_SLOTS - 1)


def delete_behind_xknock_s_back(harness, trie, network):
    assert bpfsys.map_delete(trie.fd, lpm_key(ipaddress.ip_network(network), harness.maps.active_bank()))


@pytest.mark.parametrize("source, entry", [(ALLOWED, ALLOWED), (ALLOWED6, "2001:db8:a::/48")])
def test_an_allowed_source_passes_on_its_copy_for_a_second_when_its_entry_goes_behind_xknock_s_back(lists, source,
                                                                                                     entry):
    assert lists.run(tcp(source, 22)) == XDP_PASS
    delete_behind_xknock_s_back(lists, lists.maps.allow, entry)
    lists.advance(0.5)
    assert lists.run(tcp(source, 22)) == XDP_PASS      # the copy: the trie has no entry
    lists.advance(0.51)
    assert lists.run(tcp(source, 22)) == XDP_DROP      # over a second: the trie again


def test_a_denied_source_is_dropped_on_its_copy_for_a_second_when_its_entry_goes_behind_xknock_s_back(lists):
    assert lists.run(tcp(DENIED, 80)) == XDP_DROP
    delete_behind_xknock_s_back(lists, lists.maps.deny, "203.0.113.0/24")
    lists.advance(0.5)
    assert lists.run(tcp(DENIED, 80)) == XDP_DROP
    lists.advance(0.51)
    assert lists.run(tcp(DENIED, 80)) == XDP_PASS


def test_a_reload_that_drops_an_entry_ends_its_copies_at_once(lists):
    """Copies remember their bank: the copy that could count again is one of
    the bank the reload rewrites, taken two reloads before."""
    assert lists.run(tcp(ALLOWED, 22)) == XDP_PASS     # a copy for this bank
    assert lists.run(tcp(DENIED, 80)) == XDP_DROP
    lists.apply(config())                               # the other bank, the same lists
    assert lists.run(tcp(ALLOWED, 22)) == XDP_PASS
    assert lists.run(tcp(DENIED, 80)) == XDP_DROP
    # the first bank again; entries in the same /16s keep the bitmaps' bits set
    lists.apply(config(allow=['"192.0.2.11"'], deny=['"203.0.113.128/25"']))
    assert lists.run(tcp(ALLOWED, 22)) == XDP_DROP
    assert lists.run(tcp(DENIED, 80)) == XDP_PASS


def test_a_copy_answers_for_its_own_source_only(lists):
    """Another source of the allow-list's /16 (its bit is set) hashed to the
    same slot finds the copy and asks the trie."""
    bank = lists.maps.active_bank()
    assert lists.run(tcp(ALLOWED, 22)) == XDP_PASS
    slot = copy_slot(ALLOWED, bank, layout.LIST_ALLOW)
    other = next(str(address) for address in ipaddress.ip_network("192.0.0.0/16")
                 if str(address) != ALLOWED and copy_slot(str(address), bank, layout.LIST_ALLOW) == slot)
    assert lists.run(tcp(other, 22)) == XDP_DROP
    assert lists.run(tcp(ALLOWED, 22)) == XDP_PASS


def test_an_allow_list_copy_is_not_a_deny_list_copy(lists):
    """The tag holds the list: one source on both lists keeps each answer apart."""
    lists.apply(config(allow=['"192.0.2.0/24"'], deny=['"192.0.2.10"']))
    assert lists.run(tcp(ALLOWED, 80)) == XDP_DROP     # denied first, whatever the allow-list says
    assert lists.run(tcp("192.0.2.11", 22)) == XDP_PASS
    assert lists.run(tcp("192.0.2.11", 80)) == XDP_PASS
    assert lists.run(tcp(ALLOWED, 22)) == XDP_DROP
