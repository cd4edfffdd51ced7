"""The config's model: its limits, defaults and key names, and the frozen
dataclasses a parsed config is made of. Imports nothing of the config's own."""

import dataclasses
import ipaddress
import os
import re

from ..kernel import layout

DEFAULT_PATH = "/etc/xknock/xknock.toml"
DEFAULT_SPENT_FILE = "/var/lib/xknock/totp-spent"   # time-based sequences' used windows
# The directory of one filter's own files (the SPA replay cache's default):
# the unit xknock@IFACE sets XKNOCK_STATE_DIR=/var/lib/xknock/IFACE, so that
# two instances' defaults do not collide (docs/operations.md).
STATE_DIR_ENV = "XKNOCK_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/xknock"


def state_dir():
    """The filter's state directory: $XKNOCK_STATE_DIR, else /var/lib/xknock."""
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR

NS_PER_UNIT = {
    "d": 86_400_000_000_000,
    "h": 3_600_000_000_000,
    "m": 60_000_000_000,
    "s": 1_000_000_000,
    "ms": 1_000_000,
}
# Far beyond any sensible timeout, and far below where the data path's u64
# nanosecond arithmetic (now + open_for) could wrap.
MAX_DURATION_NS = 365 * NS_PER_UNIT["d"]
MAX_STEP_TIMEOUT_NS = NS_PER_UNIT["h"]
DURATION_HINT = "use e.g. 500ms, 5s, 2m, 1h"

DEFAULT_STEP_TIMEOUT_NS = 5 * NS_PER_UNIT["s"]
DEFAULT_OPEN_FOR_NS = 30 * NS_PER_UNIT["s"]
DEFAULT_IDLE_TIMEOUT_NS = 15 * NS_PER_UNIT["m"]

NAME_MAX_BYTES = 31  # struct xk_seq.name is char[32], NUL included
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# The list maps hold both policy banks, so one config gets half of each.
MAX_LIST_SOURCES = layout.LIST_ENTRIES // 2
# Below this many steps a sequence is cheap to find by scanning.
SHORT_SEQUENCE_STEPS = 3

STEP_PROTOS = ("tcp", "udp", "icmp")
OPENABLE_PROTOS = ("tcp", "udp")

TOP_LEVEL_KEYS = ("filter", "sequence", "allow", "deny", "ban", "hooks", "spa", "cluster")
RESERVED_TABLES = ("limits",)  # taken by features still to come
BAN_KEYS = ("after", "within", "for", "scope", "on_ban")
BAN_SCOPES = {"all": layout.BAN_EVERYWHERE, "knock": layout.BAN_KNOCK_PORTS}
DEFAULT_BAN_WITHIN_NS = 60 * NS_PER_UNIT["s"]
DEFAULT_BAN_FOR_NS = 10 * NS_PER_UNIT["m"]
MAX_BAN_AFTER = 1000
FILTER_KEYS = ("mode", "strict", "answer", "fail_closed", "ipsec", "other_transports")
ANSWERS = ("closed", "drop")
# What becomes of packets XDP cannot judge (docs/datapath.md, "IPsec and other
# transports"): "drop" (refused unless allow-listed) or "pass".
PASS_OR_DROP = ("drop", "pass")
SEQUENCE_KEYS = ("name", "knock", "step_timeout", "open", "open_for", "idle_timeout", "on_open", "on_close",
                 "totp", "secret", "secret_file", "window", "port_range", "spent_file")
HOOKS_KEYS = ("timeout", "max_running")
DEFAULT_HOOK_TIMEOUT_NS = 10 * NS_PER_UNIT["s"]
MAX_HOOK_TIMEOUT_NS = NS_PER_UNIT["h"]
DEFAULT_HOOK_MAX_RUNNING = 8
MAX_HOOK_MAX_RUNNING = 256
HOOK_EXAMPLE = '["/usr/local/bin/notify", "opened"]'
LIST_KEYS = ("sources",)

# /proc/net socket states: TCP_LISTEN for tcp; an unconnected (bound, listening)
# UDP socket sits in TCP_CLOSE.
PROC_NET_LISTENING = (("tcp", "tcp", "0A"), ("tcp", "tcp6", "0A"), ("udp", "udp", "07"), ("udp", "udp6", "07"))


class ConfigError(Exception):
    """A config that cannot be used; .errors holds every problem found."""

    def __init__(self, errors, warnings=()):
        self.errors = list(errors)
        self.warnings = list(warnings)
        super().__init__("\n".join(self.errors))


@dataclasses.dataclass(frozen=True)
class Step:
    """One knock, or one port a sequence opens."""

    proto: str  # "tcp" | "udp" | "icmp"
    port: int  # 0 for icmp

    def __str__(self):
        return self.proto if self.proto == "icmp" else f"{self.proto}:{self.port}"

    @property
    def proto_number(self):
        return layout.PROTO_NUMBERS[self.proto]


@dataclasses.dataclass(frozen=True)
class Sequence:
    name: str
    knock: tuple[Step, ...]
    step_timeout_ns: int
    open: tuple[Step, ...]
    open_for_ns: int
    idle_timeout_ns: int
    # Commands (argv, never a shell string) run when a grant of this sequence
    # opens and when it has closed. Not part of the filter: configs that filter
    # alike compare equal whatever their hooks.
    on_open: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    on_close: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    # A time-based sequence (policy/totp.py): knock is empty, the ports
    # of each window come from totp; totp.variant() makes the concrete ones.
    totp: object = None


@dataclasses.dataclass(frozen=True)
class Hooks:
    """[hooks]: how hook commands run (daemon/hooks.py)."""

    timeout_ns: int = DEFAULT_HOOK_TIMEOUT_NS   # a hook still running after this is killed
    max_running: int = DEFAULT_HOOK_MAX_RUNNING  # hooks started beyond this are dropped, not queued


@dataclasses.dataclass(frozen=True)
class Ban:
    """[ban]: `after` failed sequences (resets or time-outs) of one source
    `within` a period ban it `for` a while, on every port or only on knock and
    guarded ports (`scope`)."""

    after: int
    within_ns: int
    for_ns: int
    scope: str  # "all" | "knock"
    on_ban: tuple[str, ...] = dataclasses.field(default=(), compare=False)   # argv run when a source is banned


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str  # "enforce" | "monitor"
    sequences: tuple[Sequence, ...]
    # a new connection to any other port resets the source's knock progress
    # (the seed's "no intervening packets"); False: only wrong knocks do
    strict: bool = True
    # "closed": refused packets get the answer of an unused port (a RST, an
    # ICMP port unreachable); "drop": nothing, for hosts whose firewall drops
    answer: str = "closed"
    # when the filter cannot be loaded or attached, close the guarded ports
    # with an nftables chain until it can (policy/failsafe.py)
    fail_closed: bool = True
    # ESP, AH and NAT-T (udp:4500): the kernel decrypts them after XDP, so
    # "drop" refuses them unless the source is allow-listed; "pass" lets ESP
    # and NAT-T through and judges what AH carries
    ipsec: str = "drop"
    # SCTP, DCCP, UDP-Lite: ports no grant opens; "drop" refuses them unless
    # the source is allow-listed
    other_transports: str = "drop"
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ban: Ban | None = None   # None: failed knocks ban nobody
    hooks: Hooks = dataclasses.field(default=Hooks(), compare=False)
    spa: object = None   # spa_config.Spa, or None: no SPA port
    # cluster_config.Cluster, or None: this node is alone. Not the filter's
    # policy: nodes of one cluster filter alike.
    cluster: object = dataclasses.field(default=None, compare=False)
    # Where it came from and what was said about it: not part of the policy,
    # so two configs that filter alike compare equal.
    path: str | None = dataclasses.field(default=None, compare=False)
    warnings: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def guards_ports(self):
        """Does this policy guard anything (a sequence or SPA)? Only then are
        the packets XDP cannot judge refused ([filter] ipsec, other_transports)."""
        return bool(self.sequences) or self.spa is not None

    def openers(self):
        """(steps opened, idle timeout) of every sequence and SPA user."""
        yield from ((seq.open, seq.idle_timeout_ns) for seq in self.sequences)
        if self.spa is not None:
            yield from ((user.open, user.idle_timeout_ns) for user in self.spa.users)

    @property
    def guarded(self):
        """Every Step the policy guards: what sequences and SPA users open."""
        return tuple(dict.fromkeys(step for steps, _ in self.openers() for step in steps))


@dataclasses.dataclass(frozen=True)
class Totp:
    """A time-based sequence's keys (config/totp_config.py; ports per window: policy/totp.py)."""

    secret: bytes = dataclasses.field(repr=False)
    window_ns: int
    port_low: int
    port_high: int
    protos: tuple[str, ...]   # "tcp" | "udp", one per knock
    # Where used windows are kept (policy/totp_spent.py): not part of the filter.
    spent_file: str = dataclasses.field(default=DEFAULT_SPENT_FILE, compare=False)
