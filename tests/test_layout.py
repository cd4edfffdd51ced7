"""The C structs and numbers and their Python mirrors agree.

Sizes and offsets come from BCC, which builds ctypes types for every map
from the compiled C declarations; the enum and #defines are read from the
headers themselves."""

import ctypes
import re
from importlib import resources

import pytest

from xknock.controller.kernel import layout


def _fields(ctype, prefix=""):
    """[(dotted name, offset, size)] of every leaf field, recursively."""
    out = []
    if not hasattr(ctype, "_fields_"):
        return [(prefix or "value", 0, ctypes.sizeof(ctype))]
    for field in ctype._fields_:
        name, ftype = field[0], field[1]
        offset = getattr(ctype, name).offset
        if hasattr(ftype, "_fields_"):
            out += [(f"{prefix}{name}.{n}", offset + o, s) for n, o, s in _fields(ftype)]
        else:
            out.append((f"{prefix}{name}", offset, ctypes.sizeof(ftype)))
    return out


@pytest.mark.parametrize("map_name", sorted(layout.MAPS))
def test_map_types_match_the_compiled_c(harness, map_name):
    table = harness.loaded.bpf[map_name.encode()]
    key_type, value_type = layout.MAPS[map_name]
    leaf = getattr(table, "sLeaf", table.Leaf)   # per-CPU tables: one CPU's value
    for ours, theirs in ((key_type, table.Key), (value_type, leaf)):
        assert ctypes.sizeof(ours) == ctypes.sizeof(theirs), map_name
        assert [(o, s) for _, o, s in _fields(ours)] == [(o, s) for _, o, s in _fields(theirs)], map_name


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
                 "PORT_GUARDED", "PORT_KNOCK", "LPM_IPV4", "FAILURE_ENTRIES", "BAN_ENTRIES", "SET_BANS",
                 "SET_STRICT", "SET_ANSWER", "SET_DROP_IPSEC", "SET_DROP_TRANSPORTS", "ICMP_PEER_ENTRIES", "BAN_EVERYWHERE", "BAN_KNOCK_PORTS", "MODE_ENFORCE", "MODE_MONITOR", "SET_HAS_ALLOW", "SET_HAS_DENY"):
        assert defines[name] == getattr(layout, name), name
    for event in layout.Event:
        assert defines["EV_" + event.name] == event.value


def test_map_capacities_match_the_loaded_program(harness):
    assert harness.maps.progress.max_entries == layout.PROGRESS_ENTRIES
    assert harness.maps.grants.max_entries == layout.GRANT_ENTRIES
    assert harness.maps.allow.max_entries == layout.LIST_ENTRIES
    assert harness.maps.seqs.max_entries == 2 * layout.MAX_SEQUENCES


def test_pinned_maps_of_another_layout_are_refused_not_misread():
    import os
    import uuid

    from bcc import BPF

    from xknock.controller.kernel import datapath
    from xknock.controller.errors import XknockError

    directory = f"{datapath.PIN_ROOT}/test-layout-{uuid.uuid4().hex[:8]}"
    os.makedirs(directory)
    try:
        # an older `settings`: 8-byte values where this version needs more
        old = BPF(text=f'BPF_TABLE_PINNED("array", u32, u64, settings, 2, "{directory}/settings");'
                       "int f(void *c) {{ return 0; }}".encode())
        with pytest.raises(XknockError, match=r"map settings .* has keys/values of 4/8 bytes.*Detach it first"):
            datapath.compile_and_load(directory)
        old.cleanup()
    finally:
        datapath.remove_pins(directory)


def test_spa_records_match_the_c_structs(harness):
    table = harness.loaded.bpf[b"spa_rate"]
    assert ctypes.sizeof(layout.Bucket) == ctypes.sizeof(table.Leaf)
    assert [(o, s) for _, o, s in _fields(layout.Bucket)] == [(o, s) for _, o, s in _fields(table.Leaf)]
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
