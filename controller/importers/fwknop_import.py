"""Converts fwknopd's access.conf into xknock's [spa] config.

Pure but for the key files: text in, TOML text, notes and (with keys_dir) the
key files to write out. Everything that cannot be carried over, or is carried
over with another meaning, becomes a Note, printed by `xknock import fwknop`
on stderr and written as comments at the top of the TOML: nothing is dropped
silently.

access.conf, as fwknopd 2.6 reads it (server/access.c parse_access_file): a
line whose first character is # ; or a line end is skipped; otherwise
"VAR value" (sscanf "%s %[^;\\n\\r]": the value runs to a ';' or the line end,
trailing blanks cut), a ':' at the end of VAR dropped, names case-sensitive.
SOURCE opens a stanza; lines before the first SOURCE are ignored.

The mapping, one stanza -> one [[spa.user]]: SOURCE -> sources, OPEN_PORTS ->
open, KEY_BASE64/KEY and HMAC_KEY_BASE64/HMAC_KEY -> the keys (inline, or a
key file under keys_dir), HMAC_DIGEST_TYPE -> hmac_digest, FW_ACCESS_TIMEOUT ->
open_for, MAX_FW_TIMEOUT -> max_open_for, REQUIRE_USERNAME -> username,
REQUIRE_SOURCE_ADDRESS -> require_source_address. ENCRYPTION_MODE must be CBC
(fwknop's default).
"""

import base64
import dataclasses
import ipaddress
import json
import os
import re

from ..wire import spa_keys
from ..wire.spa_message import HMAC_DIGESTS, MAX_HMAC_KEY, MAX_KEY
from .note import ImportFailed, ImportNote

DEFAULT_PATH = "/etc/fwknop/access.conf"
DEFAULT_FWKNOPD_CONF = "/etc/fwknop/fwknopd.conf"

# server/fwknopd_common.h
DEF_FW_ACCESS_TIMEOUT = 30
DEF_MAX_FW_TIMEOUT = 300
RCHK_MAX_FW_TIMEOUT = 2 << 22
SPA_PORT = 62201
MAX_SPA_PACKET_AGE = 120

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")

# Settings xknock has no counterpart for: the reason each is not carried over.
DROPPED = {
    "DESTINATION": "xknock grants on the interfaces it is attached to, whatever the destination address",
    "RESTRICT_PORTS": "xknock grants only the ports in open, so a deny list is not needed",
    "ACCESS_EXPIRE": "xknock users do not expire: remove this user from the config at that date",
    "ACCESS_EXPIRE_EPOCH": "xknock users do not expire: remove this user from the config at that time",
    "FORCE_NAT": "xknock does no NAT: it grants ports on this host only",
    "FORCE_SNAT": "xknock does no NAT: it grants ports on this host only",
    "FORCE_MASQUERADE": "xknock does no NAT: it grants ports on this host only",
    "DISABLE_DNAT": "xknock does no NAT: it grants ports on this host only",
    "FORWARD_ALL": "xknock does no NAT or forwarding: it grants ports on this host only",
    "ENABLE_CMD_EXEC": "xknock never runs commands sent in a packet",
    "ENABLE_CMD_SUDO_EXEC": "xknock never runs commands sent in a packet",
    "CMD_EXEC_USER": "xknock never runs commands sent in a packet",
    "CMD_EXEC_GROUP": "xknock never runs commands sent in a packet",
    "CMD_SUDO_EXEC_USER": "xknock never runs commands sent in a packet",
    "CMD_SUDO_EXEC_GROUP": "xknock never runs commands sent in a packet",
    "CMD_CYCLE_OPEN": "xknock writes its grant in XDP, no firewall command; its on_open/on_close hooks are "
                      "configured globally, not per user",
    "CMD_CYCLE_CLOSE": "xknock writes its grant in XDP, no firewall command; its on_open/on_close hooks are "
                       "configured globally, not per user",
    "CMD_CYCLE_TIMER": "xknock's grant lasts open_for; there is no command cycle",
}
GPG = ("GPG_HOME_DIR", "GPG_EXE", "GPG_DECRYPT_ID", "GPG_DECRYPT_PW", "GPG_ALLOW_NO_PW", "GPG_REQUIRE_SIG",
       "GPG_DISABLE_SIG", "GPG_IGNORE_SIG_VERIFY_ERROR", "GPG_REMOTE_ID", "GPG_FINGERPRINT_ID")
CONVERTED = ("SOURCE", "OPEN_PORTS", "KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64", "HMAC_DIGEST_TYPE",
             "FW_ACCESS_TIMEOUT", "MAX_FW_TIMEOUT", "REQUIRE_USERNAME", "REQUIRE_SOURCE_ADDRESS", "REQUIRE_SOURCE",
             "ENCRYPTION_MODE")
KNOWN = set(DROPPED) | set(GPG) | set(CONVERTED)


class FwknopImportError(ImportFailed):
    """Nothing can be converted; .notes says what was found."""


@dataclasses.dataclass(frozen=True)
class Note(ImportNote):
    """outcome: "dropped" (this setting is lost, the stanza kept), "stanza
    dropped" (not converted at all), "changed" (carried over with another
    meaning), "ignored" (fwknopd itself ignores or refuses it)."""

    line: int | None
    stanza: str | None   # "#2 (SOURCE 10.0.0.0/8)"; None outside any stanza
    setting: str
    reason: str
    outcome: str

    server: bool = False   # a note about fwknopd.conf, not access.conf

    @property
    def where(self):
        return "server setting" if self.server else f"stanza {self.stanza}" if self.stanza else "outside any stanza"


@dataclasses.dataclass
class Stanza:
    number: int
    line: int
    settings: dict = dataclasses.field(default_factory=dict)   # VAR -> (line, value); the last one wins
    repeated: list = dataclasses.field(default_factory=list)

    @property
    def label(self):
        source = self.settings["SOURCE"][1]
        return f"#{self.number} (SOURCE {source})"


@dataclasses.dataclass(frozen=True)
class User:
    stanza: str
    line: int
    name: str
    sources: tuple
    open: tuple
    hmac_digest: str
    open_for: int
    max_open_for: int
    username: str | None
    require_source_address: bool
    keys: spa_keys.Keys
    key_file: str | None      # where the keys go when keys_dir is given


@dataclasses.dataclass(frozen=True)
class ImportResult:
    toml: str
    users: tuple
    notes: tuple
    stanzas: int
    key_files: tuple          # ((path, Keys), ...) to write, mode 0600
    inline_keys: bool         # the TOML itself holds secrets
    server_notes: tuple = ()  # Notes about fwknopd.conf (their lines are that file's)
    interface: str | None = None   # fwknopd.conf's PCAP_INTF, for the attach hint


@dataclasses.dataclass(frozen=True)
class Server:
    """What xknock takes from fwknopd.conf: its [spa] port and max_age."""

    port: int = SPA_PORT
    port_from: str = "fwknop's default"
    max_age: int = MAX_SPA_PACKET_AGE
    max_age_from: str = "fwknopd.conf MAX_SPA_PACKET_AGE (its default)"
    interface: str | None = None


def read_fwknopd_conf(text):
    """fwknopd.conf text -> (Server, [Note]): the port fwknopd listens on
    (PCAP_FILTER "udp port N", or UDPSERV_PORT with ENABLE_UDP_SERVER),
    MAX_SPA_PACKET_AGE and PCAP_INTF; what xknock does otherwise is a Note.
    The rest of fwknopd.conf (firewall, logging, paths) has no counterpart."""
    settings = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw or raw[0] in "#;\r\n":
            continue
        match = re.match(r"\s*(\S+)\s+([^;\n\r]+)", raw)
        if match:
            settings[match.group(1).rstrip(":")] = (number, match.group(2).strip().strip('"').strip())
    server, notes = Server(), []

    def note(var, reason, outcome):
        line, value = settings[var]
        notes.append(Note(line, None, f"{var} {value}", reason, outcome, server=True))

    if settings.get("ENABLE_UDP_SERVER", (0, "N"))[1].upper() == "Y" and "UDPSERV_PORT" in settings:
        value = settings["UDPSERV_PORT"][1]
        if value.isdigit() and 1 <= int(value) <= 65535:
            server = dataclasses.replace(server, port=int(value), port_from="fwknopd.conf UDPSERV_PORT")
        else:
            note("UDPSERV_PORT", "not a port 1-65535: [spa] port left at 62201", "dropped")
    elif "PCAP_FILTER" in settings:
        match = re.fullmatch(r"(?:udp\s+)?(?:dst\s+)?port\s+(\d{1,5})", settings["PCAP_FILTER"][1].lower())
        if match and 1 <= int(match.group(1)) <= 65535:
            server = dataclasses.replace(server, port=int(match.group(1)), port_from="fwknopd.conf PCAP_FILTER")
        else:
            note("PCAP_FILTER", "xknock listens on one UDP port, and this filter is not \"udp port N\": "
                 "[spa] port left at 62201; set it by hand", "dropped")
    if "MAX_SPA_PACKET_AGE" in settings:
        value = settings["MAX_SPA_PACKET_AGE"][1]
        if value.isdigit() and 1 <= int(value) <= 86400:
            server = dataclasses.replace(server, max_age=int(value), max_age_from="fwknopd.conf MAX_SPA_PACKET_AGE")
        else:
            note("MAX_SPA_PACKET_AGE", "not a number of seconds 1-86400: max_age left at 120s", "dropped")
    if settings.get("ENABLE_SPA_PACKET_AGING", (0, "Y"))[1].upper() == "N":
        note("ENABLE_SPA_PACKET_AGING", "xknock always refuses packets older than max_age", "changed")
    if settings.get("ENABLE_DIGEST_PERSISTENCE", (0, "Y"))[1].upper() == "N":
        note("ENABLE_DIGEST_PERSISTENCE", "xknock always keeps its replay cache on disk ([spa] replay_cache)",
             "changed")
    if "PCAP_INTF" in settings:
        server = dataclasses.replace(server, interface=settings["PCAP_INTF"][1])
    return server, notes


def read_access(text):
    """access.conf text -> ([Stanza], [Note]) as fwknopd reads it."""
    stanzas, notes = [], []
    current = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw or raw[0] in "#;\r\n":
            continue
        match = re.match(r"\s*(\S+)\s+([^;\n\r]+)", raw)
        if not match:
            if raw.strip():
                notes.append(Note(number, current.label if current else None, raw.strip()[:60],
                                  "not a VAR value line (fwknopd refuses the file)", "ignored"))
            continue
        var, value = match.group(1), match.group(2).rstrip()
        if var.endswith(":"):
            var = var[:-1]
        if var in ("%include", "%include_folder"):
            notes.append(Note(number, None, f"{var} {value}",
                              "not followed: convert that file on its own (xknock import fwknop FILE) and merge "
                              "its users", "dropped"))
            continue
        if var == "SOURCE":
            current = Stanza(len(stanzas) + 1, number)
            current.settings["SOURCE"] = (number, value)
            stanzas.append(current)
            continue
        if current is None:
            notes.append(Note(number, None, f"{var} {_shown(var, value)}",
                              "before any SOURCE line (fwknopd ignores it)", "ignored"))
            continue
        if var == "%include_keys":
            notes.append(Note(number, current.label, f"{var} {value}",
                              "not followed: put that file's KEY_BASE64 and HMAC_KEY_BASE64 into this stanza "
                              "(or use key_file) and convert again", "dropped"))
            continue
        if var in current.settings:
            current.repeated.append((number, var))
        current.settings[var] = (number, value)
    return stanzas, notes


SECRET = ("KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64", "GPG_DECRYPT_PW")


def _shown(var, value):
    return "(secret)" if var in SECRET else value


def _sources(value):
    """SOURCE "ANY" or "10.0.0.0/8, 192.168.1.1, 172.16.0.0/255.240.0.0" ->
    CIDR strings; ValueError with the entry that is not an address."""
    if value.strip().upper() == "ANY":
        return ("0.0.0.0/0", "::/0")
    out = []
    for item in value.split(","):
        item = item.strip()
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f'"{item}" is not an address or network') from None
        out.append(str(network) if network.num_addresses > 1 else str(network.network_address))
    return tuple(out)


def _open_ports(value):
    """OPEN_PORTS "tcp/22, udp/53" -> ("tcp:22", "udp:53")."""
    out = []
    for item in value.split(","):
        proto, slash, port = item.strip().partition("/")
        proto = proto.lower()
        if proto not in ("tcp", "udp") or not slash or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f'"{item.strip()}" is not tcp/PORT or udp/PORT')
        if f"{proto}:{int(port)}" not in out:
            out.append(f"{proto}:{int(port)}")
    return tuple(out)


def _seconds(value):
    """fwknopd's strtol_wrapper(val, 0, RCHK_MAX_FW_TIMEOUT): a whole number."""
    if not re.fullmatch(r"\s*\d+\s*", value) or int(value) > RCHK_MAX_FW_TIMEOUT:
        raise ValueError(f'"{value}" is not a number of seconds 0-{RCHK_MAX_FW_TIMEOUT} (fwknopd refuses it)')
    return int(value)


def _key(stanza, b64_var, plain_var, limit, note):
    """The key from VAR_BASE64 or the passphrase VAR -> bytes or None."""
    s = stanza.settings
    if b64_var in s:
        line, value = s[b64_var]
        if plain_var in s:
            note(s[plain_var][0], plain_var, f"{b64_var} is set too and is used", "ignored")
        return spa_keys._decode(value, f"{b64_var} (line {line})", limit)
    if plain_var in s:
        line, value = s[plain_var]
        raw = value.encode()
        if value == spa_keys.PLACEHOLDER or not 1 <= len(raw) <= limit:
            raise spa_keys.SpaKeyError(f"{plain_var} (line {line}) must be 1-{limit} bytes")
        note(line, plain_var, "a passphrase: carried over as its bytes in base64 (the same key to fwknop); "
                              "random keys from `xknock keygen` are stronger", "changed")
        return raw
    return None


def _convert(stanza, taken, keys_dir):
    """Stanza -> (User or None, [Note])."""
    notes = []
    s = stanza.settings

    def note(line, setting, reason, outcome):
        notes.append(Note(line, stanza.label, setting, reason, outcome))

    def drop(line, setting, reason):
        notes.clear()   # only why it was dropped: what would have changed in it no longer matters
        note(line, setting, reason, "stanza dropped")
        return None, notes

    for line, var in stanza.repeated:
        note(line, var, "set twice in the stanza; the last value is used, as fwknopd does", "changed")
    for var, (line, value) in s.items():
        if var not in KNOWN:
            note(line, f"{var} {_shown(var, value)}", "not an access.conf setting fwknopd knows", "ignored")
        elif var in DROPPED:
            note(line, f"{var} {value}", DROPPED[var], "dropped")

    mode = s.get("ENCRYPTION_MODE", (None, "CBC"))[1].strip().upper()
    if mode in ("ASYMMETRIC", "GPG") or (any(g in s for g in ("GPG_DECRYPT_ID", "GPG_DECRYPT_PW", "GPG_ALLOW_NO_PW"))
                                         and "KEY" not in s and "KEY_BASE64" not in s):
        line = s["ENCRYPTION_MODE"][0] if "ENCRYPTION_MODE" in s else stanza.line
        return drop(line, "GPG", "GnuPG encryption is not supported by xknock (Rijndael + HMAC only): make keys "
                                 "with `xknock keygen` and use them on the client with --use-hmac")
    if mode != "CBC":
        what = "the legacy IV mode of fwknop < 2.5" if mode == "LEGACY" else f"the {mode} cipher mode"
        return drop(s["ENCRYPTION_MODE"][0], f"ENCRYPTION_MODE {mode}",
                    f"xknock takes AES-CBC (fwknop's default) only, not {what}")
    for var in GPG:
        if var in s:
            note(s[var][0], f"{var} {_shown(var, s[var][1])}", "GnuPG is not supported; this stanza is carried "
                                                               "over for its Rijndael key only", "dropped")

    try:
        sources = _sources(s["SOURCE"][1])
    except ValueError as err:
        return drop(s["SOURCE"][0], f"SOURCE {s['SOURCE'][1]}", str(err))
    if sources == ("0.0.0.0/0", "::/0"):
        note(s["SOURCE"][0], "SOURCE ANY", "fwknopd took SPA over IPv4 only; xknock's any source includes IPv6",
             "changed")

    if "OPEN_PORTS" not in s:
        return drop(stanza.line, "OPEN_PORTS", "not set: fwknopd opens whatever port the client asks for; "
                                               "xknock needs the list (open = [...]): add OPEN_PORTS and convert "
                                               "again")
    try:
        opened = _open_ports(s["OPEN_PORTS"][1])
    except ValueError as err:
        return drop(s["OPEN_PORTS"][0], f"OPEN_PORTS {s['OPEN_PORTS'][1]}", f"{err}; xknock opens tcp and udp "
                                                                             "ports only")
    try:
        key = _key(stanza, "KEY_BASE64", "KEY", MAX_KEY, note)
        hmac_key = _key(stanza, "HMAC_KEY_BASE64", "HMAC_KEY", MAX_HMAC_KEY, note)
    except spa_keys.SpaKeyError as err:
        return drop(stanza.line, "keys", str(err))
    if key is None:
        return drop(stanza.line, "KEY_BASE64", "no Rijndael key in the stanza")
    if hmac_key is None:
        return drop(stanza.line, "HMAC_KEY_BASE64",
                    "not set: a legacy stanza without HMAC, which xknock does not accept (packets must be "
                    "authenticated before anything is decrypted): add an HMAC key (`xknock keygen`) here and on "
                    "the client (--use-hmac)")
    keys = spa_keys.Keys(key, hmac_key)
    try:
        spa_keys.check_pair(keys, "this stanza")
    except spa_keys.SpaKeyError as err:
        return drop(stanza.line, "keys", f"{err} (fwknopd refuses it too)")

    digest = s.get("HMAC_DIGEST_TYPE", (None, "sha256"))[1].strip().lower()
    if digest not in HMAC_DIGESTS:
        return drop(s["HMAC_DIGEST_TYPE"][0], f"HMAC_DIGEST_TYPE {digest}",
                    f"one of {', '.join(HMAC_DIGESTS)} (fwknopd refuses it too)")

    try:
        open_for = _seconds(s["FW_ACCESS_TIMEOUT"][1]) if "FW_ACCESS_TIMEOUT" in s else 0
        max_open_for = _seconds(s["MAX_FW_TIMEOUT"][1]) if "MAX_FW_TIMEOUT" in s else 0
    except ValueError as err:
        return drop(stanza.line, "timeout", str(err))
    open_for = open_for or DEF_FW_ACCESS_TIMEOUT
    max_open_for = max_open_for or DEF_MAX_FW_TIMEOUT
    if max_open_for < open_for:
        note(s["MAX_FW_TIMEOUT"][0], f"MAX_FW_TIMEOUT {max_open_for}",
             f"below FW_ACCESS_TIMEOUT: xknock's max_open_for cannot be; set to open_for = {open_for}s",
             "changed")
        max_open_for = open_for

    username = s["REQUIRE_USERNAME"][1].strip() if "REQUIRE_USERNAME" in s else None
    require = s.get("REQUIRE_SOURCE_ADDRESS") or s.get("REQUIRE_SOURCE")
    require_source_address = bool(require and require[1].strip()[:1].upper() == "Y")

    name = _name(username, stanza.number, taken)
    key_file = os.path.join(os.path.abspath(keys_dir), f"{name}.keys") if keys_dir else None
    return User(stanza.label, stanza.line, name, sources, opened, digest, open_for, max_open_for, username,
                require_source_address, keys, key_file), notes


def _name(username, number, taken):
    base = username if username and NAME_RE.fullmatch(username) else f"stanza{number}"
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}-{counter}", counter + 1
    return name


def _q(text):
    return json.dumps(text, ensure_ascii=False)


def _render(users, notes, *, source, stanzas, mode="enforce", server=Server()):
    inline = any(u.key_file is None for u in users)
    lines = [
        f"# xknock configuration converted from fwknopd's {source} by `xknock import fwknop`.",
        f"# {len(users)} of {stanzas} access stanza(s) converted.",
        "#",
        "# Clients keep working unchanged: fwknop -A tcp/22 --use-hmac ... sends what xknock checks.",
        "# Stop fwknopd before attaching xknock (both would answer the same packets).",
    ]
    if inline:
        lines += ["#", "# THIS FILE HOLDS SECRET KEYS: keep it mode 0600, owned by root."]
    if notes:
        lines += ["#", "# Not carried over, or carried over with another meaning:"]
        lines += [f"#   {'fwknopd.conf ' if n.server else ''}{'line %d: ' % n.line if n.line else ''}{n}".replace("\n", " ")
                  for n in notes]
    lines += [
        "", "[filter]", f"mode = {_q(mode)}",
        "", "[spa]",
        f"port = {server.port}                  # {server.port_from}"
        + ("; use the port in fwknopd.conf's PCAP_FILTER if it differs (or convert with --fwknopd-conf)"
           if server.port_from == "fwknop's default" else ""),
        f'max_age = "{server.max_age}s"              # {server.max_age_from}',
    ]
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    for u in users:
        lines += ["", f"# access.conf stanza {u.stanza}, line {u.line}".replace("\n", " "), "[[spa.user]]",
                  f"name = {_q(u.name)}"]
        if u.key_file:
            lines.append(f"key_file = {_q(u.key_file)}")
        else:
            lines += [f"key = {_q(b64(u.keys.key))}", f"hmac_key = {_q(b64(u.keys.hmac_key))}"]
        lines += [
            f"hmac_digest = {_q(u.hmac_digest)}",
            "sources = [" + ", ".join(_q(x) for x in u.sources) + "]",
            "open = [" + ", ".join(_q(x) for x in u.open) + "]",
            f'open_for = "{u.open_for}s"' + ("" if u.open_for != DEF_FW_ACCESS_TIMEOUT else
                                              "   # fwknopd's default FW_ACCESS_TIMEOUT"),
            f'max_open_for = "{u.max_open_for}s"' + ("" if u.max_open_for != DEF_MAX_FW_TIMEOUT else
                                                      "   # fwknopd's default MAX_FW_TIMEOUT"),
        ]
        if u.username is not None:
            lines.append(f"username = {_q(u.username)}")
        lines.append(f"require_source_address = {'true' if u.require_source_address else 'false'}")
    return "\n".join(lines) + "\n"


def convert(text, *, source="access.conf", keys_dir=None, mode="enforce", fwknopd_conf=None):
    """access.conf text -> ImportResult, with [filter] mode and, given
    fwknopd_conf (fwknopd.conf's text), its port and max_age. FwknopImportError
    when no stanza can be converted. Writes nothing: the caller writes
    result.key_files."""
    server, server_notes = read_fwknopd_conf(fwknopd_conf) if fwknopd_conf is not None else (Server(), [])
    stanzas, notes = read_access(text)
    users, taken = [], set()
    for stanza in stanzas:
        user, stanza_notes = _convert(stanza, taken, keys_dir)
        notes.extend(stanza_notes)
        if user is not None:
            users.append(user)
            taken.add(user.name)
    notes.sort(key=lambda n: n.line or 0)
    if not users:
        what = (f"none of the {len(stanzas)} access stanza(s) could be converted" if stanzas
                else "no access stanza (a SOURCE line) found")
        raise FwknopImportError(f"{source}: {what}", notes)
    toml = _render(users, notes + server_notes, source=source, stanzas=len(stanzas), mode=mode, server=server)
    key_files = tuple((u.key_file, u.keys) for u in users if u.key_file)
    return ImportResult(toml, tuple(users), tuple(notes), len(stanzas), key_files,
                        any(u.key_file is None for u in users), tuple(server_notes), server.interface)
