"""The data path's map layout, mirrored from bpf/xknock_consts.h and
bpf/xknock_structs.h. tests/kernel/test_layout.py checks every name, size, offset
and number against what BCC compiles from the C headers, and fingerprint()
sums them up: a running filter stamped with another one has other maps."""

import ctypes
import enum
import hashlib

# Limits: the C defaults (each overridable at build time with -DNAME=VALUE).
MAX_SEQUENCES = 64
MAX_STEPS = 16
MAX_OPEN = 8
MAX_SEQS_PER_PORT = 2
PORT_ENTRIES = 4096
PROGRESS_ENTRIES = 262144
GRANT_ENTRIES = 65536
LIST_ENTRIES = 262144
FIRST_SLOTS = 1 << 21
FAILURE_ENTRIES = 65536
BAN_ENTRIES = 65536
RECENT_SLOTS = 1 << 18
ICMP_PEER_ENTRIES = 65536
COUNTERS = 64
SPA_RATE_ENTRIES = 65536
SPA_KNOWN_ENTRIES = 16384
SPA_MIN_PAYLOAD = 140
SPA_MAX_PAYLOAD = 1500

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp"}
PROTO_NUMBERS = {name: number for number, name in PROTO_NAMES.items()}

# port_flags (bpf/xknock_hints.h): a byte of PORT_* flags per port, eight to a word
PORT_FLAG_WORDS = 8192
PORT_CLASSES = 3          # port_flags' tables per bank: tcp, udp, icmp
# list_bits (bpf/xknock_hints.h): bitmaps of 65536 bits each
BITMAP_WORDS = 1024
LIST_ALLOW = 0            # list_bits' bitmaps per bank: list * 3 + kind
LIST_DENY = 1
BITS_IPV4 = 0             # kinds: an IPv4 /16, the hash of an IPv6 /32 (entries shorter than /48), of a /48
BITS_IPV6_32 = 1
BITS_IPV6_48 = 2
LIST_BITMAPS = 6
# granted (bpf/xknock_hints.h): a byte per source slot, two halves, then the selector word
GRANTED_SLOTS = 65536
GRANTED_WORDS = GRANTED_SLOTS // 8
GRANTED_SELECTOR = 2 * GRANTED_WORDS
# epochs (bpf/xknock_hints.h): the words the copies of grants and of list entries are taken under
EPOCH_WORDS = 3
EPOCH_GRANTS_CONTROLLER = 0
EPOCH_GRANTS_DATAPATH = 1
EPOCH_LISTS = 2
GRANT_CACHE_SLOTS = 4096   # per CPU (XK_GRANT_CACHE_SLOTS)
LIST_CACHE_SLOTS = 4096    # per CPU (XK_LIST_CACHE_SLOTS)
# knocking (bpf/xknock_strict.h): a word per hash of a source, then the word of when it was begun
KNOCKING_SLOTS = 8192
KNOCKING_SINCE = KNOCKING_SLOTS

PORT_GUARDED = 1 << 0
PORT_KNOCK = 1 << 1
PORT_SPA = 1 << 2

GRANT_SPA = 1 << 0   # Grant.flags: written by the SPA receiver (the data path never reads flags)

MODE_ENFORCE = 0
MODE_MONITOR = 1
MODES = {"enforce": MODE_ENFORCE, "monitor": MODE_MONITOR}

LPM_IPV4 = 0x80   # in LpmKey.bank: IPv4 entries, kept apart from IPv6 ones

SET_BANS = 1 << 2
SET_STRICT = 1 << 3
SET_ANSWER = 1 << 4
SET_DROP_IPSEC = 1 << 5        # [filter] ipsec = "drop"
SET_DROP_TRANSPORTS = 1 << 6   # [filter] other_transports = "drop"
# refused, these protocols are answered as unknown, as the kernel answers them
SET_UNREACH_ESP4, SET_UNREACH_AH4, SET_UNREACH_DCCP4, SET_UNREACH_SCTP4 = (1 << 7, 1 << 8, 1 << 9, 1 << 10)
SET_UNREACH_ESP6, SET_UNREACH_AH6, SET_UNREACH_DCCP6, SET_UNREACH_SCTP6 = (1 << 11, 1 << 12, 1 << 13, 1 << 14)
SET_UNREACH4 = {50: SET_UNREACH_ESP4, 51: SET_UNREACH_AH4, 33: SET_UNREACH_DCCP4, 132: SET_UNREACH_SCTP4}
SET_UNREACH6 = {50: SET_UNREACH_ESP6, 51: SET_UNREACH_AH6, 33: SET_UNREACH_DCCP6, 132: SET_UNREACH_SCTP6}
# refused UDP-Lite is answered with the port unreachable the kernel sends for an unused port
SET_UDPLITE_PORTS4, SET_UDPLITE_PORTS6 = 1 << 15, 1 << 16
FLOWLABEL_AUTO = 1 << 0
FLOWLABEL_STATELESS = 1 << 1
BAN_EVERYWHERE = 0
BAN_KNOCK_PORTS = 1

SET_HAS_ALLOW = 1 << 0
SET_HAS_DENY = 1 << 1


class Event(enum.IntEnum):
    GRANTED = 1
    GRANT_FAILED = 2
    RESET = 3
    TIMED_OUT = 4
    BANNED = 5
    EXPIRED = 6
    SPA = 7


class Reason(enum.IntEnum):
    """enum xk_reason: one per-CPU counter each."""

    PASS_NOT_IP = 0
    PASS_UNGUARDED = 1
    PASS_OTHER_L4 = 2
    PASS_FRAGMENT = 3
    PASS_ALLOWLIST = 4
    PASS_GRANT = 5
    DROP_DENYLIST = 6
    DROP_NO_GRANT = 7
    DROP_KNOCK = 8
    DROP_MALFORMED = 9
    DROP_FRAGMENT = 10
    DROP_BANNED = 11
    DROP_SPA = 12
    PASS_ECHO = 13   # an ICMP echo knock, recorded; the host answers the ping
    DROP_IPSEC = 14       # ESP, AH, NAT-T with [filter] ipsec = "drop", not allow-listed
    DROP_TRANSPORT = 15   # SCTP, DCCP, UDP-Lite with [filter] other_transports = "drop", not allow-listed
    KNOCK_ADVANCED = 16
    KNOCK_COMPLETED = 17
    KNOCK_RESET = 18
    KNOCK_TIMED_OUT = 19
    KNOCK_REPEATED = 20
    KNOCK_IGNORED = 21
    KNOCK_CONTENDED = 22
    GRANT_ISSUED = 23
    GRANT_FAILED = 24
    GRANT_EXPIRED = 25
    EVENT_LOST = 26
    MONITOR_PASSED = 27
    GRANT_CREATED = 28
    GRANT_REMOVED = 29    # written by the controller only
    GRANT_OPERATOR = 30   # written by the controller only
    BAN_ISSUED = 31
    BAN_EXPIRED = 32
    BAN_FAILED = 33
    BAN_SPARED = 34
    BAN_REMOVED = 35      # written by the controller only
    KNOCK_STRICT_RESET = 36   # of the resets: progress a new connection to another port ended (strict mode)
    SPA_QUEUED = 37
    SPA_NOT_CANDIDATE = 38
    SPA_RATE_LIMITED = 39
    SPA_OVERLOADED = 40
    SPA_LOST = 41
    SPA_ACCEPTED = 42       # SPA_* from here on: written by the controller only
    SPA_BAD_HMAC = 43
    SPA_REPLAYED = 44
    SPA_STALE = 45
    SPA_MALFORMED = 46
    SPA_UNKNOWN_USER = 47
    SPA_PORT_DENIED = 48
    SPA_SOURCE_DENIED = 49
    SPA_GRANT_FAILED = 50
    SPA_GRANT_CREATED = 51
    SPA_KNOWN_PASSED = 52   # the data path's, like SPA_QUEUED
    ANSWER_RST = 53          # answer = "closed": refused packets answered with a TCP reset
    ANSWER_UNREACH = 54      # ... with an ICMP / ICMPv6 port unreachable
    ANSWER_RATE_LIMITED = 55  # ... not: over the host's ICMP rate limits
    ANSWER_NONE = 56         # ... not: Linux would send nothing (RST, bad checksum, not unicast)
    ANSWER_BY_HOST = 57      # knock and SPA ports nobody listens on: passed, the host's stack answers
    BAN_OPERATOR = 58        # bans the controller created (`xknock ban`): written by the controller only


# Counters only the controller writes: the data path never touches them.
CONTROLLER_REASONS = frozenset({Reason.GRANT_REMOVED, Reason.GRANT_OPERATOR, Reason.BAN_REMOVED, Reason.BAN_OPERATOR} |
                               {r for r in Reason if Reason.SPA_ACCEPTED <= r <= Reason.SPA_GRANT_CREATED})

VERDICT_REASONS = 16  # reasons below this are verdicts: one per packet


def is_verdict(reason):
    return reason < VERDICT_REASONS


def is_drop(reason):
    return Reason.DROP_DENYLIST <= reason <= Reason.DROP_SPA or reason in (Reason.DROP_IPSEC, Reason.DROP_TRANSPORT)


class Addr(ctypes.Structure):
    _fields_ = [("b", ctypes.c_uint8 * 16)]


class L4Port(ctypes.Structure):
    _fields_ = [("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("port", ctypes.c_uint16)]


class PortKey(ctypes.Structure):
    _fields_ = [("bank", ctypes.c_uint8), ("proto", ctypes.c_uint8), ("port", ctypes.c_uint16)]


class PortSeq(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("step_mask", ctypes.c_uint32)]


class PortVal(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("nseqs", ctypes.c_uint32),
        ("seqs", PortSeq * MAX_SEQS_PER_PORT),
    ]


class Seq(ctypes.Structure):
    _fields_ = [
        ("uid", ctypes.c_uint32),
        ("nsteps", ctypes.c_uint32),
        ("step_timeout_ns", ctypes.c_uint64),
        ("open_for_ns", ctypes.c_uint64),
        ("idle_timeout_ns", ctypes.c_uint64),
        ("nopen", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("open", L4Port * MAX_OPEN),
        ("name", ctypes.c_char * 32),
    ]


class ProgressKey(ctypes.Structure):
    _fields_ = [("src", Addr), ("uid", ctypes.c_uint32)]


class GrantKey(ctypes.Structure):
    _fields_ = [
        ("src", Addr),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
    ]


class Grant(ctypes.Structure):
    _fields_ = [
        ("window_end_ns", ctypes.c_uint64),
        ("idle_timeout_ns", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("seq_uid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class LpmKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("bank", ctypes.c_uint8),
        ("prefix", ctypes.c_uint8 * 16),   # an IPv4 address in the first 4 bytes
        ("pad", ctypes.c_uint8 * 3),
    ]


class Control(ctypes.Structure):
    # active_bank and layout stay the first 8 bytes in every version: the
    # stamp must be readable in a filter of any layout.
    _fields_ = [
        ("active_bank", ctypes.c_uint32),
        ("layout", ctypes.c_uint32),      # the fingerprint() of the program's maps, stamped at load
        ("test_now_ns", ctypes.c_uint64),
    ]


class Settings(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ban_after", ctypes.c_uint32),
        ("ban_scope", ctypes.c_uint32),
        ("ban_within_ns", ctypes.c_uint64),
        ("ban_for_ns", ctypes.c_uint64),
        ("spa_cost_ns", ctypes.c_uint64),
        ("spa_burst_ns", ctypes.c_uint64),
        ("spa_cpu_cost_ns", ctypes.c_uint64),
        ("spa_cpu_burst_ns", ctypes.c_uint64),
        ("knock_window_us", ctypes.c_uint64),
        ("icmp_peer_cost_ns", ctypes.c_uint64),
        ("icmp_peer_burst_ns", ctypes.c_uint64),
        ("icmp6_peer_cost_ns", ctypes.c_uint64),
        ("icmp6_peer_burst_ns", ctypes.c_uint64),
        ("icmp_host_cost_ns", ctypes.c_uint64),
        ("icmp_host_burst_ns", ctypes.c_uint64),
        ("hash_seed", ctypes.c_uint32),
        ("ttl", ctypes.c_uint8),
        ("hop_limit", ctypes.c_uint8),
        ("flowlabels", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Recent(ctypes.Structure):
    """strict mode's slot per source hash: (24-bit tag << 40 | us) of the last
    knock, and of the last new connection elsewhere since."""

    _fields_ = [("knock", ctypes.c_uint64), ("touch", ctypes.c_uint64)]


class Failures(ctypes.Structure):
    _fields_ = [("window_start_ns", ctypes.c_uint64), ("count", ctypes.c_uint64)]


class Ban(ctypes.Structure):
    _fields_ = [("until_ns", ctypes.c_uint64), ("since_ns", ctypes.c_uint64)]


class SeqStats(ctypes.Structure):
    _fields_ = [
        ("advanced", ctypes.c_uint64),
        ("completed", ctypes.c_uint64),
        ("reset", ctypes.c_uint64),
        ("timed_out", ctypes.c_uint64),
    ]


class EventRecord(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("src", Addr),
        ("seq_uid", ctypes.c_uint32),
        ("type", ctypes.c_uint8),
        ("step", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
        ("pad3", ctypes.c_uint32),
    ]


class Bucket(ctypes.Structure):
    _fields_ = [("last_ns", ctypes.c_uint64), ("credit_ns", ctypes.c_uint64)]


class SpaEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("src", Addr),
        ("port", ctypes.c_uint16),
        ("len", ctypes.c_uint16),
        ("ipv4", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("sport", ctypes.c_uint16),   # the UDP source port: where a public-key SPA answer goes
        ("payload", ctypes.c_uint8 * SPA_MAX_PAYLOAD),
        ("pad2", ctypes.c_uint8 * 4),
    ]


# Progress state word: bits 0-7 the next step, bits 8-63 the last step's time in us.
def progress_state(step, ts_us):
    return (ts_us << 8) | (step & 0xFF)


def progress_step(state):
    return state & 0xFF


def progress_ts_us(state):
    return state >> 8


# name in the C source -> (ctypes key type, ctypes value type); the maps every
# tool opens by name from the running program.
MAPS = {
    "control": (ctypes.c_uint32, Control),
    "settings": (ctypes.c_uint32, Settings),
    "ports": (PortKey, PortVal),
    "seqs": (ctypes.c_uint32, Seq),
    "progress": (ProgressKey, ctypes.c_uint64),
    "grants": (GrantKey, Grant),
    "allow": (LpmKey, ctypes.c_uint32),
    "deny": (LpmKey, ctypes.c_uint32),
    "counters": (ctypes.c_uint32, ctypes.c_uint64),
    "seqstats": (ctypes.c_uint32, SeqStats),   # per CPU
    "firsts": (ctypes.c_uint32, ctypes.c_uint64),
    "failures": (Addr, Failures),
    "bans": (Addr, Ban),
    "spa_known": (Addr, ctypes.c_uint64),
    "recent": (ctypes.c_uint32, Recent),
    "port_flags": (ctypes.c_uint32, ctypes.c_uint64),
    "list_bits": (ctypes.c_uint32, ctypes.c_uint64),
    "granted": (ctypes.c_uint32, ctypes.c_uint64),
    "epochs": (ctypes.c_uint32, ctypes.c_uint64),
}


def shape(ctype, prefix="", base=0):
    """A type's layout as leaves (dotted name, offset, size): structs opened,
    arrays of structs index by index ("seqs[1].slot"), scalars and arrays of
    scalars whole. kernel/btf.py reads the same shape from a map's BTF."""
    if hasattr(ctype, "_fields_"):
        return tuple(leaf for name, ftype, *_ in ctype._fields_
                     for leaf in shape(ftype, f"{prefix}{name}.", base + getattr(ctype, name).offset))
    if issubclass(ctype, ctypes.Array) and hasattr(ctype._type_, "_fields_"):
        step = ctypes.sizeof(ctype._type_)
        return tuple(leaf for i in range(ctype._length_)
                     for leaf in shape(ctype._type_, f"{prefix[:-1]}[{i}].", base + i * step))
    return ((prefix[:-1], base, ctypes.sizeof(ctype)),)


def map_shapes():
    """name -> (key shape, value shape) of every map of this version."""
    return {name: (shape(key), shape(value)) for name, (key, value) in MAPS.items()}


def fingerprint(shapes=None):
    """32 bits (never 0) of a hash of every map's field names, offsets and
    sizes and of the reason numbering: this version's when shapes is None,
    else that of shapes (name -> (key, value) or None for a missing map)."""
    shapes = map_shapes() if shapes is None else shapes
    text = repr((sorted(shapes.items()), sorted((r.name, r.value) for r in Reason)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") or 1
