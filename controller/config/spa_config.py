"""The [spa] table and its [[spa.user]] stanzas (docs/spa.md), validated like
the rest of the config: every mistake found in one pass, named by its place.

A stanza is fwknop's access.conf stanza in TOML: who may send (sources), with
which keys, and what they may open. Keys live inline (base64) or in a key file
in `fwknop --key-gen` format; either way the file holding them must be readable
by root alone, or the config is refused.
"""

import dataclasses
import datetime
import ipaddress
import os

from ..wire import spa_keys, spa_message
from ..wire import spa_pubkey_keys as pubkey_keys
from .fields import check_keys, parse_duration_key, parse_network, parse_open, type_name
from .model import NAME_PATTERN, NS_PER_UNIT, Step, state_dir

SPA_KEYS = ("port", "max_age", "rate", "total_rate", "replay_cache", "server_key", "user")
USER_KEYS = ("name", "key", "hmac_key", "key_file", "hmac_digest", "public_keys", "sources", "open", "open_for",
             "max_open_for", "idle_timeout", "username", "require_source_address", "grant_requested_address")
MAX_PUBLIC_KEYS = 2                       # the key in use and the next one, for rotation

DEFAULT_PORT = 62201                      # fwknop's
DEFAULT_MAX_AGE_NS = 120 * NS_PER_UNIT["s"]   # fwknop's MAX_SPA_PACKET_AGE
DEFAULT_RATE = 10                         # candidates per second per source
MAX_RATE = 10_000
MAX_TOTAL_RATE = 1_000_000
# What one SPA candidate costs the controller: a base, and one HMAC for each
# stanza that admits its sender (`bench/run spa-verify` on this project's test
# machine: 17 µs with 1 stanza, 250 µs with 16, 760 µs with 64; the issue's
# 26 µs and 289 µs on a busier one: these are the higher). The default
# total_rate fills VERIFIER_SHARE of one core with candidates every stanza
# admits; the rest is margin for a slower or busier machine and for the
# authentic packets (decrypted, fsync'd).
CANDIDATE_BASE_NS = 8_000
CANDIDATE_HMAC_NS = 18_000
VERIFIER_SHARE = 0.5
DEFAULT_REPLAY_CACHE = "/var/lib/xknock/spa-replay"   # without XKNOCK_STATE_DIR
DEFAULT_OPEN_FOR_NS = 30 * NS_PER_UNIT["s"]   # fwknop's FW_ACCESS_TIMEOUT
DEFAULT_IDLE_TIMEOUT_NS = 15 * NS_PER_UNIT["m"]
MAX_USERS = 1024
HMAC_DIGESTS = spa_message.HMAC_DIGESTS
ANY_SOURCE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def default_replay_cache():
    """[spa] replay_cache's default: spa-replay in the filter's state directory
    (model.state_dir(): per instance under the systemd unit)."""
    return os.path.join(state_dir(), "spa-replay")


def default_total_rate(stanzas):
    """Candidates a second that keep the verifier at VERIFIER_SHARE of one
    core when `stanzas` stanzas admit every sender (the worst case)."""
    cost_ns = CANDIDATE_BASE_NS + CANDIDATE_HMAC_NS * max(1, stanzas)
    return int(VERIFIER_SHARE * 1e9 / cost_ns)


@dataclasses.dataclass(frozen=True)
class PublicKey:
    """A user's Ed25519 public key (raw) for the public-key SPA, valid until expires."""
    raw: bytes
    expires: float | None = None          # Unix seconds; None: never

    def expired(self, now):
        return self.expires is not None and now >= self.expires


@dataclasses.dataclass(frozen=True)
class SpaUser:
    name: str
    key: bytes = dataclasses.field(repr=False)        # fwknop's keys; b"" for a public-key-only user
    hmac_key: bytes = dataclasses.field(repr=False)
    hmac_digest: str = "sha256"
    sources: tuple = ANY_SOURCE
    open: tuple = ()                       # config.Step, each tcp or udp
    open_for_ns: int = DEFAULT_OPEN_FOR_NS
    max_open_for_ns: int = DEFAULT_OPEN_FOR_NS   # cap on a client timeout in the message
    idle_timeout_ns: int = DEFAULT_IDLE_TIMEOUT_NS
    username: str | None = None            # fwknop's REQUIRE_USERNAME
    require_source_address: bool = False   # fwknop's REQUIRE_SOURCE_ADDRESS
    grant_requested_address: bool = False  # NAT: grant the address in the message
    public_keys: tuple = ()                # PublicKey, at most two

    @property
    def speaks_fwknop(self):
        return bool(self.hmac_key)

    def source_allowed(self, address):
        address = ipaddress.ip_address(address)
        return any(address.version == net.version and address in net for net in self.sources)


@dataclasses.dataclass(frozen=True)
class Spa:
    port: int = DEFAULT_PORT
    max_age_ns: int = DEFAULT_MAX_AGE_NS
    rate: int = DEFAULT_RATE
    total_rate: int = default_total_rate(1)   # parse_spa derives it from the stanzas
    replay_cache: str = DEFAULT_REPLAY_CACHE
    users: tuple = ()
    server_key: str | None = None          # the public-key SPA's X25519 key file
    server_private: object = dataclasses.field(default=None, repr=False, compare=False)
    server_public: bytes = b""

    @property
    def port_step(self):
        return Step("udp", self.port)

    @property
    def guarded(self):
        """Every port some user may open: guarded, like a sequence's."""
        return tuple(dict.fromkeys(step for user in self.users for step in user.open))


def parse_spa(report, table):
    """Spa, or None when the table is wrong (reported)."""
    if not isinstance(table, dict):
        report.error("spa", f"must be a table ([spa]), not {type_name(table)}")
        return None
    errors_before = len(report.errors)
    check_keys(report, "spa", table, SPA_KEYS)
    port = _whole(report, "spa", table, "port", DEFAULT_PORT, 1, 65535)
    max_age_ns = parse_duration_key(report, "spa", table, "max_age", DEFAULT_MAX_AGE_NS)
    rate = _whole(report, "spa", table, "rate", DEFAULT_RATE, 1, MAX_RATE)
    replay_cache = table.get("replay_cache", default_replay_cache())
    if not isinstance(replay_cache, str) or not os.path.isabs(replay_cache):
        report.error("spa", f"replay_cache {replay_cache!r}: must be an absolute path")
    users = _parse_users(report, table.get("user"))
    server_key, server_private = _parse_server_key(report, table, users)
    default_total = max(rate, default_total_rate(len(users)))
    total_rate = _whole(report, "spa", table, "total_rate", default_total, 1, MAX_TOTAL_RATE)
    if total_rate < rate:
        report.error("spa", f"total_rate {total_rate} is below rate {rate} (the rate of a single source)")
    if len(report.errors) > errors_before:
        return None
    return Spa(port=port, max_age_ns=max_age_ns, rate=rate, total_rate=total_rate, replay_cache=replay_cache,
               users=tuple(users), server_key=server_key, server_private=server_private,
               server_public=pubkey_keys.raw_public(server_private) if server_private else b"")


def _parse_server_key(report, table, users):
    """(path, X25519 private key) of [spa] server_key, or (None, None)."""
    path = table.get("server_key")
    needed = [user.name for user in users if user.public_keys]
    if path is None:
        if needed:
            report.error("spa", f'public_keys given (user {", ".join(needed)}) but no server_key '
                                '(make one with `xknock keygen --public --server --key-file FILE`)')
        return None, None
    if not isinstance(path, str) or not os.path.isabs(path):
        report.error("spa", f"server_key {path!r}: must be an absolute path")
        return None, None
    try:
        return path, pubkey_keys.load_private(path, pubkey_keys.SERVER)
    except spa_keys.SpaKeyError as err:
        report.error("spa", f"server_key: {err}")
        return None, None


def check_spa_ports(report, spa, sequences):
    """The SPA port and the ports users open must not be knock steps: the data
    path classifies a port once."""
    knocks = {step: sequence.name for sequence in sequences for step in sequence.knock}
    owner = knocks.get(spa.port_step)
    if owner:
        report.error("spa", f'port {spa.port}: udp:{spa.port} is a knock step of sequence "{owner}"')
    for sequence in sequences:
        if spa.port_step in sequence.open:
            report.error("spa", f'port {spa.port}: udp:{spa.port} is opened by sequence "{sequence.name}"')
    for user in spa.users:
        for index, step in enumerate(user.open):
            if step in knocks:
                report.error(f'spa.user "{user.name}"',
                             f'open[{index}] "{step}" is a knock step of sequence "{knocks[step]}"')
            if step == spa.port_step:
                report.error(f'spa.user "{user.name}"', f'open[{index}] "{step}" is the SPA port itself')


def _whole(report, place, table, key, default, low, high):
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        report.error(place, f"{key} {value!r}: must be a whole number from {low} to {high}")
        return default
    return value


def _flag(report, place, table, key):
    value = table.get(key, False)
    if not isinstance(value, bool):
        report.error(place, f"{key} must be true or false, not {type_name(value)}")
        return False
    return value


def _parse_users(report, tables):
    if tables is None:
        report.error("spa", 'no [[spa.user]]: add one stanza per key pair (name, key_file or key + hmac_key, open)')
        return []
    if isinstance(tables, dict):
        report.error("spa", "user must be an array of tables: write [[spa.user]], not [spa.user]")
        return []
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        report.error("spa", "user must be an array of tables ([[spa.user]])")
        return []
    if len(tables) > MAX_USERS:
        report.error("spa", f"{len(tables)} users; at most {MAX_USERS}")
    users, first_index_of_name = [], {}
    owner_of_key = {}
    for index, table in enumerate(tables):
        place = f"spa.user[{index}]"
        name = table.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            report.error(place, 'missing or bad "name": use letters, digits, "_", "." and "-"')
            name = None
        elif name in first_index_of_name:
            report.error(place, f'name "{name}" is already used by spa.user[{first_index_of_name[name]}]')
            name = None
        else:
            first_index_of_name[name] = index
            place = f'spa.user "{name}"'
        user = _parse_user(report, place, name, table)
        if user is not None:
            for key in user.public_keys:
                if key.raw in owner_of_key:
                    report.error(place, f'a public key is also user "{owner_of_key[key.raw]}"\'s: one key, one user')
                owner_of_key.setdefault(key.raw, user.name)
            users.append(user)
    return users


def _parse_user(report, place, name, table):
    errors_before = len(report.errors)
    check_keys(report, place, table, USER_KEYS)
    public_keys = _parse_public_keys(report, place, table.get("public_keys"))
    fwknop_keys = any(name in table for name in ("key", "hmac_key", "key_file"))
    key, hmac_key = _parse_keys(report, place, table) if fwknop_keys or "public_keys" not in table else (b"", b"")
    digest = table.get("hmac_digest", "sha256")
    if digest not in HMAC_DIGESTS:
        report.error(place, f"hmac_digest {digest!r}: one of {', '.join(HMAC_DIGESTS)}")
    sources = _parse_user_sources(report, place, table)
    opened = parse_open(report, place, table) if "open" in table else ()
    if "open" not in table:
        report.error(place, 'missing key "open" (the ports this user may open, e.g. ["tcp:22"])')
    open_for_ns = parse_duration_key(report, place, table, "open_for", DEFAULT_OPEN_FOR_NS)
    max_open_for_ns = parse_duration_key(report, place, table, "max_open_for", open_for_ns)
    if max_open_for_ns < open_for_ns:
        report.error(place, "max_open_for is shorter than open_for")
    idle_timeout_ns = parse_duration_key(report, place, table, "idle_timeout", DEFAULT_IDLE_TIMEOUT_NS)
    username = table.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        report.error(place, "username must be a non-empty string (the user the fwknop client sends)")
    require_source = _flag(report, place, table, "require_source_address")
    grant_requested = _flag(report, place, table, "grant_requested_address")
    if name is None or len(report.errors) > errors_before:
        return None
    return SpaUser(name=name, key=key, hmac_key=hmac_key, hmac_digest=digest, sources=sources, open=opened,
                   open_for_ns=open_for_ns, max_open_for_ns=max_open_for_ns, idle_timeout_ns=idle_timeout_ns,
                   username=username, require_source_address=require_source,
                   grant_requested_address=grant_requested, public_keys=public_keys)


def _parse_public_keys(report, place, items):
    """public_keys = ["BASE64", { key = "BASE64", expires = 2027-01-01T00:00:00Z }]: at most two."""
    if items is None:
        return ()
    if not isinstance(items, list) or not items or len(items) > MAX_PUBLIC_KEYS:
        report.error(place, f"public_keys must be an array of 1 to {MAX_PUBLIC_KEYS} keys (the one in use and "
                            "the next): base64 strings or { key = ..., expires = ... }")
        return ()
    keys = []
    for index, item in enumerate(items):
        where = f"public_keys[{index}]"
        text, expires = item, None
        if isinstance(item, dict):
            unknown = set(item) - {"key", "expires"}
            if unknown or "key" not in item:
                report.error(place, f"{where}: a table has key and optionally expires, not {sorted(unknown)}")
                continue
            text, expires = item["key"], _expiry(report, place, where, item.get("expires"))
        if not isinstance(text, str):
            report.error(place, f"{where}: must be a base64 string, not {type_name(text)}")
            continue
        try:
            keys.append(PublicKey(pubkey_keys.decode_public(text, where), expires))
        except spa_keys.SpaKeyError as err:
            report.error(place, str(err))
    if len({key.raw for key in keys}) < len(keys):
        report.error(place, "public_keys lists one key twice")
    return tuple(keys)


def _expiry(report, place, where, value):
    """Unix seconds of a TOML date or date-time (UTC when it has no offset)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            value = None
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        value = datetime.datetime.combine(value, datetime.time())
    if not isinstance(value, datetime.datetime):
        report.error(place, f"{where}: expires must be a date or date-time such as 2027-01-01T00:00:00Z")
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


def _parse_keys(report, place, table):
    """(key, hmac_key) as bytes, from key_file or inline base64."""
    inline = "key" in table or "hmac_key" in table
    if "key_file" in table and inline:
        report.error(place, "give key_file or key + hmac_key, not both")
        return b"", b""
    try:
        if "key_file" in table:
            path = table["key_file"]
            if not isinstance(path, str) or not os.path.isabs(path):
                report.error(place, f"key_file {path!r}: must be an absolute path")
                return b"", b""
            keys = spa_keys.check_pair(spa_keys.load_key_file(path), path)
            return keys.key, keys.hmac_key
        if not inline:
            report.error(place, "no keys: give key_file (fwknop --key-gen format), key and hmac_key (base64), "
                                "or public_keys (xknock keygen --public)")
            return b"", b""
        if "hmac_key" not in table:
            report.error(place, "no hmac_key: HMAC is required (fwknop's legacy mode without HMAC is not supported)")
            return b"", b""
        if "key" not in table:
            report.error(place, "no key: give the Rijndael key (fwknop's KEY_BASE64) as key")
            return b"", b""
        for name in ("key", "hmac_key"):
            if not isinstance(table[name], str):
                report.error(place, f"{name} must be a base64 string, not {type_name(table[name])}")
                return b"", b""
        report.secrets_inline = True   # the config file must then be root's alone (load_config checks)
        keys = spa_keys.check_pair(spa_keys.Keys(spa_keys.decode_key(table["key"], "key"),
                                                 spa_keys.decode_hmac_key(table["hmac_key"], "hmac_key")))
        return keys.key, keys.hmac_key
    except spa_keys.SpaKeyError as err:
        report.error(place, str(err))
        return b"", b""


def _parse_user_sources(report, place, table):
    items = table.get("sources")
    if items is None:
        return ANY_SOURCE
    if not isinstance(items, list) or not items:
        report.error(place, 'sources must be a non-empty array such as ["192.0.2.0/24"]')
        return ANY_SOURCE
    networks = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            report.error(place, f"sources[{index}] must be a string, not {type_name(item)}")
            continue
        try:
            networks.append(parse_network(item))
        except ValueError as err:
            report.error(place, f'sources[{index}] "{item}": {err}')
    return tuple(networks)


def cost_ns(rate):
    """Nanoseconds of bucket credit one candidate costs at `rate` per second."""
    return 1_000_000_000 // rate


def fill_settings(settings, spa, cpus):
    """The kernel's token buckets from [spa]: per source a burst of `rate`,
    per CPU an even share of `total_rate` (at least one a second)."""
    settings.spa_cost_ns = cost_ns(spa.rate)
    settings.spa_burst_ns = settings.spa_cost_ns * spa.rate
    per_cpu = max(1, spa.total_rate // max(1, cpus))
    settings.spa_cpu_cost_ns = cost_ns(per_cpu)
    settings.spa_cpu_burst_ns = settings.spa_cpu_cost_ns * per_cpu
    return settings
