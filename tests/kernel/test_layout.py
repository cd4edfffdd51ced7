"""The C structs and numbers and their Python mirrors agree.

Sizes and offsets come from BCC, which builds ctypes types for every map
from the compiled C declarations; the enum and #defines are read from the
headers themselves."""

import ctypes
import enum
import os
import re
import uuid
from importlib import resources
from unittest import mock

import pytest
from bcc import BPF

from xknock.controller.errors import XknockError
from xknock.controller.kernel import btf, datapath, layout, stamp
from xknock.controller.kernel.maps import FilterMaps
from xknock_dev.testrun import OTHER_LAYOUT, Harness


@pytest.mark.parametrize("map_name", sorted(layout.MAPS))
def test_map_types_match_the_compiled_c(harness, map_name):
    # Names too: a same-size reorder of two fields must not pass.
    table = harness.loaded.bpf[map_name.encode()]
    key_type, value_type = layout.MAPS[map_name]
    leaf = getattr(table, "sLeaf", table.Leaf)   # per-CPU tables: one CPU's value
    for ours, theirs in ((key_type, table.Key), (value_type, leaf)):
        assert ctypes.sizeof(ours) == ctypes.sizeof(theirs), map_name
        assert layout.shape(ours) == layout.shape(theirs), map_name


@pytest.mark.parametrize("map_name", sorted(layout.MAPS))
def test_map_types_match_the_kernel_s_btf_of_the_map(harness, map_name):
    fd = getattr(harness.maps, map_name).fd
    key_type, value_type = layout.MAPS[map_name]
    assert btf.map_layout(fd) == (layout.shape(key_type), layout.shape(value_type))


def test_the_loaded_program_is_stamped_with_this_version_s_fingerprint(harness):
    assert harness.maps.control.lookup(ctypes.c_uint32(0)).layout == layout.fingerprint()
    assert stamp.of_maps({m.name: m.fd for m in harness.maps}) == layout.fingerprint()


def test_maps_of_a_version_before_stamps_are_known_by_their_btf(harness):
    control = harness.maps.control
    value = control.lookup(ctypes.c_uint32(0))
    value.layout = 0                      # as a version before stamps left it
    control.update(ctypes.c_uint32(0), value)
    try:
        assert stamp.read(control.fd) == 0
        assert datapath.running_layout(harness.loaded.prog_id) == layout.fingerprint()
    finally:
        value.layout = layout.fingerprint()
        control.update(ctypes.c_uint32(0), value)


def test_the_fingerprint_tells_a_reorder_a_rename_a_missing_map_and_a_renumbered_reason():
    shapes, ours = layout.map_shapes(), layout.fingerprint()
    key, value = shapes["grants"]
    (first, a, size), (second, b, _) = value[:2]
    reordered = ((second, a, size), (first, b, size), *value[2:])   # same size, same offsets
    renamed = (("window_ends_ns", a, size), *value[1:])
    for changed in (reordered, renamed):
        assert layout.fingerprint({**shapes, "grants": (key, changed)}) != ours
    assert layout.fingerprint({**shapes, "bans": None}) != ours
    numbers = {r.name: r.value for r in layout.Reason}
    numbers["DROP_BANNED"], numbers["DROP_SPA"] = numbers["DROP_SPA"], numbers["DROP_BANNED"]
    with mock.patch.object(layout, "Reason", enum.IntEnum("Reason", numbers)):
        assert layout.fingerprint() != ours


def test_event_record_matches_the_c_struct(harness):
    # The ring buffer has no typed Leaf: compare against the C text's field list.
    source = (resources.files("xknock.bpf") / "xknock_structs.h").read_text()
    body = re.search(r"struct xk_event \{(.*?)\};", source, re.S).group(1)
    c_fields = re.findall(r"^\s*(?:struct \w+|__u\d+)\s+(\w+)", body, re.M)
    assert c_fields == [f[0] for f in layout.EventRecord._fields_]
    assert ctypes.sizeof(layout.EventRecord) == 40


def _c_enum(name):
    source = (resources.files("xknock.bpf") / "xknock_consts.h").read_text()
    body = re.search(r"enum " + name + r" \{(.*?)\};", source, re.S).group(1)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"XK_(\w+)\s*=\s*(\d+)", body)}


def _c_defines():
    source = (resources.files("xknock.bpf") / "xknock_consts.h").read_text()
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(r"#define XK_(\w+)\s+(0x[0-9a-fA-F]+|\d+)", source)} | {
        m.group(1): 1 << int(m.group(2)) for m in re.finditer(r"#define XK_(\w+)\s+\(1U << (\d+)\)", source)}


def test_reason_enum_mirrors_the_c_enum():
    c_enum = _c_enum("xk_reason")
    c_reasons = {k: v for k, v in c_enum.items() if k not in ("VERDICT_REASONS", "COUNTERS")}
    assert c_reasons == {r.name: r.value for r in layout.Reason}
    assert c_enum["VERDICT_REASONS"] == layout.VERDICT_REASONS
    assert c_enum["COUNTERS"] == layout.COUNTERS


def test_limits_and_flags_mirror_the_c_defines():
    defines = _c_defines()
    for name in ("MAX_SEQUENCES", "MAX_STEPS", "MAX_OPEN", "MAX_SEQS_PER_PORT", "PORT_ENTRIES",
                 "PROGRESS_ENTRIES", "GRANT_ENTRIES", "LIST_ENTRIES", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP",
                 "PORT_GUARDED", "PORT_KNOCK", "PORT_SPA", "PORT_FLAG_WORDS", "PORT_CLASSES", "BITMAP_WORDS", "LPM_IPV4", "FAILURE_ENTRIES", "BAN_ENTRIES", "SET_BANS",
                 "SET_STRICT", "SET_ANSWER", "SET_DROP_IPSEC", "SET_DROP_TRANSPORTS", "ICMP_PEER_ENTRIES", "BAN_EVERYWHERE", "BAN_KNOCK_PORTS", "MODE_ENFORCE", "MODE_MONITOR", "SET_HAS_ALLOW", "SET_HAS_DENY", "SET_UNREACH_ESP4", "SET_UNREACH_AH4",
                 "SET_UNREACH_DCCP4", "SET_UNREACH_SCTP4", "SET_UNREACH_ESP6", "SET_UNREACH_AH6", "SET_UNREACH_DCCP6",
                 "SET_UNREACH_SCTP6", "SET_UDPLITE_PORTS4", "SET_UDPLITE_PORTS6", "GRANTED_SLOTS",
                 "GRANT_CACHE_SLOTS", "EPOCH_WORDS", "EPOCH_GRANTS_CONTROLLER", "EPOCH_GRANTS_DATAPATH", "EPOCH_LISTS",
                 "LIST_CACHE_SLOTS", "KNOCKING_SLOTS"):
        assert defines[name] == getattr(layout, name), name
    for event in layout.Event:
        assert defines["EV_" + event.name] == event.value


def test_map_capacities_match_the_loaded_program(harness):
    assert harness.maps.progress.max_entries == layout.PROGRESS_ENTRIES
    assert harness.maps.grants.max_entries == layout.GRANT_ENTRIES
    assert harness.maps.allow.max_entries == layout.LIST_ENTRIES
    assert harness.maps.seqs.max_entries == 2 * layout.MAX_SEQUENCES


def test_pinned_maps_of_another_size_are_refused_not_misread():
    directory = f"{datapath.PIN_ROOT}/test-layout-{uuid.uuid4().hex[:8]}"
    os.makedirs(directory)
    try:
        # an older `settings`: 8-byte values where this version needs more
        old = BPF(text=f'BPF_TABLE_PINNED("array", u32, u64, settings, 2, "{directory}/settings");'
                       "int f(void *c) {{ return 0; }}".encode())
        with pytest.raises(XknockError, match=r"maps pinned in .* have another layout .* another version made them"):
            datapath.compile_and_load(directory)
        old.cleanup()
    finally:
        datapath.remove_pins(directory)


def test_pinned_maps_of_the_same_sizes_in_another_order_are_refused_not_misread():
    # The other layout's grants swap two fields of the same size: every map
    # has this version's sizes, and only the names tell them apart.
    with Harness(cflags=[OTHER_LAYOUT]) as other:
        assert other.maps.grants.value_type is layout.Grant   # sizes agree: Map accepted it
        assert stamp.read(other.maps.control.fd) != layout.fingerprint()
        with pytest.raises(XknockError, match="another layout"):
            datapath.compile_and_load(other.pin_dir)
        assert "control" in os.listdir(other.pin_dir)   # refused before touching anything
        with pytest.raises(XknockError, match="is another version of xknock: its maps have another layout"):
            FilterMaps.from_prog(other.loaded.prog_id)   # what status, grant, revoke... open


def test_spa_records_match_the_c_structs(harness):
    table = harness.loaded.bpf[b"spa_rate"]
    assert layout.shape(layout.Bucket) == layout.shape(table.Leaf)
    source = (resources.files("xknock.bpf") / "xknock_structs.h").read_text()
    body = re.search(r"struct xk_spa_event \{(.*?)\};", source, re.S).group(1)
    c_fields = re.findall(r"^\s*(?:struct \w+|__u\d+)\s+(\w+)", body, re.M)
    assert c_fields == [f[0] for f in layout.SpaEvent._fields_]
    assert ctypes.sizeof(layout.SpaEvent) == 32 + layout.SPA_MAX_PAYLOAD + 4


def test_spa_limits_mirror_the_c_defines():
    defines = _c_defines()
    for name in ("SPA_MIN_PAYLOAD", "SPA_MAX_PAYLOAD", "SPA_RATE_ENTRIES", "PORT_SPA"):
        assert defines[name] == getattr(layout, name), name


def test_a_spa_record_header_is_what_the_c_says():
    assert _c_defines()["SPA_HEADER_BYTES"] == layout.SpaEvent.payload.offset
