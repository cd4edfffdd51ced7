"""controller/config/: every rule of the config file, as a table of cases,
plus the step and duration parsers it is built from."""

import ipaddress
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xknock.controller import config
from xknock.controller.config import load
from xknock.controller.kernel import layout
from xknock.controller.config import ConfigError, Step

EXAMPLE = """
[filter]
mode = "enforce"            # or "monitor"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:22"]
open_for = "30s"            # new connections accepted this long after the knock
idle_timeout = "15m"        # established traffic keeps the grant alive

[allow]
sources = ["192.0.2.10", "2001:db8::/32"]

[deny]
sources = ["203.0.113.0/24"]
"""


def sequence(name="ssh", knock=("tcp:7000", "udp:8000", "tcp:9000"), opened=("tcp:22",), extra=""):
    """One [[sequence]] table; knock/opened are written as TOML arrays of strings."""
    knock_list = ", ".join(f'"{step}"' for step in knock)
    open_list = ", ".join(f'"{step}"' for step in opened)
    return f'[[sequence]]\nname = "{name}"\nknock = [{knock_list}]\nopen = [{open_list}]\n{extra}\n'


def many_sequences(count, shared_step=None):
    """count sequences on distinct ports, each also knocking shared_step if given."""
    tables = []
    for index in range(count):
        knock = [f"tcp:{10000 + 3 * index}", f"udp:{10001 + 3 * index}", f"tcp:{10002 + 3 * index}"]
        if shared_step:
            knock[1] = shared_step
        tables.append(sequence(f"s{index}", knock, ("tcp:22",)))
    return "".join(tables)


SSH = sequence()

# (description, TOML text, a fragment the errors must contain; None: it loads)
CASES = [
    ("the example from the design loads", EXAMPLE, None),
    ("an empty file loads", "", None),
    ("monitor mode", '[filter]\nmode = "monitor"\n' + SSH, None),
    ("strict mode", '[filter]\nstrict = true\n' + SSH, None),
    ("no [filter] means enforce", SSH, None),
    ("durations may be omitted", SSH, None),
    ("a step may come back when not consecutive", sequence(knock=("tcp:7000", "udp:8000", "tcp:7000")), None),
    ("a name of 31 bytes", sequence(name="a" * 31), None),
    ("a name with dots, dashes and underscores", sequence(name="ssh-v2.admin_1"), None),
    ("16 knock steps", sequence(knock=[f"udp:{7000 + i}" for i in range(16)]), None),
    ("8 open ports", sequence(opened=[f"tcp:{22 + i}" for i in range(8)]), None),
    ("2 sequences share one knock port", many_sequences(2, shared_step="udp:5000"), None),
    ("64 sequences", many_sequences(64), None),
    ("two sequences open the same port", SSH + sequence("ssh2", ("udp:1", "udp:2", "udp:3")), None),
    ("icmp knock", sequence(knock=("icmp", "tcp:7000", "udp:8000")), None),
    ("[allow] without sources", SSH + "[allow]\n", None),
    ("an overlapping but different network in allow and deny", SSH + '[allow]\nsources = ["10.0.0.1"]\n[deny]\nsources = ["10.0.0.0/24"]\n', None),
    # TOML itself
    ("TOML syntax error names the line", '[filter]\nmode = enforce\n', "line 2: Invalid value (column 8)"),
    ("TOML error at the end of the file", "[filter]\nmode = ", "line 2: Invalid value (at end of file)"),
    ("a key given twice", '[filter]\nmode = "enforce"\nmode = "monitor"\n', "line 3: Cannot overwrite a value"),
    # top level
    ("an unknown table", '[foo]\nx = 1\n', 'unknown table "foo"; known: filter, sequence, allow, deny'),
    ("an unknown top-level key", 'mode = "monitor"\n', 'unknown key "mode"; known: filter, sequence, allow, deny'),
    ("a misspelt table gets a suggestion", '[filtre]\nmode = "monitor"\n', 'unknown table "filtre"; known: filter, sequence, allow, deny, ban, hooks, spa, cluster (did you mean "filter"?)'),
    ("[spa] needs users", "[spa]\n", "spa: no [[spa.user]]"),
    ("[limits] is reserved", "[limits]\n", "limits: not supported yet in this version"),
    ("[ban] needs after", "[ban]\nwithin = \"1m\"\n", 'ban: missing key "after"'),
    ("[ban] after must be a count", "[ban]\nafter = 0\n", "ban: after 0: must be a whole number from 1 to 1000"),
    ("[ban] scope is all or knock", "[ban]\nafter = 3\nscope = \"some\"\n", "ban: scope 'some': must be"),
    ("[ban] durations", "[ban]\nafter = 3\nfor = \"10x\"\n", 'ban: for "10x": not a duration'),
    ("[ban] unknown key", "[ban]\nafter = 3\nforever = true\n", 'ban: unknown key "forever"'),
    ("[limits] is reserved", "[limits]\n", "limits: not supported yet in this version"),
    # hooks: on_open, on_close ([[sequence]]), on_ban ([ban]), [hooks]
    ("hooks as argv arrays", sequence(extra='on_open = ["/bin/true", "opened"]\non_close = ["/bin/true"]')
     + '[ban]\nafter = 3\non_ban = ["/bin/true", "banned"]\n', None),
    ("a hook given as a shell string", sequence(extra='on_open = "/usr/local/bin/notify $XKNOCK_SOURCE"'),
     'sequence "ssh": on_open must be an array of strings (the command and its arguments, run without a shell), '
     'e.g. ["/usr/local/bin/notify", "opened"], not a string; for a shell write ["/bin/sh", "-c", "..."]'),
    ("an on_ban given as a string", '[ban]\nafter = 3\non_ban = "/bin/true"\n', "ban: on_ban must be an array of strings"),
    ("an empty hook", sequence(extra="on_close = []"), 'sequence "ssh": on_close is empty; give the command to run'),
    ("a hook that is a table", sequence(extra="on_close = {cmd = 1}"), 'sequence "ssh": on_close must be an array of strings such as ["/usr/local/bin/notify", "opened"], not a table'),
    ("a hook argument that is a number", sequence(extra='on_open = ["/bin/true", 22]'), 'sequence "ssh": on_open[1] must be a string, not an integer'),
    ("a hook argument with a NUL", sequence(extra='on_open = ["/bin/true", "a\\u0000b"]'), 'sequence "ssh": on_open[1] contains a NUL character'),
    ("a hook command that is not an absolute path", sequence(extra='on_open = ["notify", "opened"]'), 'sequence "ssh": on_open[0] "notify": must be an absolute path (hooks run with a minimal PATH), e.g. /usr/local/bin/notify'),
    ("a relative hook command with a directory", '[ban]\nafter = 3\non_ban = ["bin/notify"]\n', 'ban: on_ban[0] "bin/notify": must be an absolute path'),
    ("a bad hook makes its sequence an error", sequence(extra='on_open = ["x"]') + "[hooks]\n", 'sequence "ssh": on_open[0] "x"'),
    ("[hooks] loads", '[hooks]\ntimeout = "30s"\nmax_running = 2\n', None),
    ("[hooks] empty loads", "[hooks]\n", None),
    ("[hooks] unknown key", '[hooks]\ntimeuot = "5s"\n', 'hooks: unknown key "timeuot"; known: timeout, max_running (did you mean "timeout"?)'),
    ("[hooks] timeout is a duration", '[hooks]\ntimeout = 10\n', 'hooks: timeout must be a string such as "10s", not an integer'),
    ("[hooks] timeout of zero", '[hooks]\ntimeout = "0s"\n', 'hooks: timeout "0s": must be more than zero'),
    ("[hooks] timeout over an hour", '[hooks]\ntimeout = "2h"\n', 'hooks: timeout "2h": too long: at most 1h'),
    ("[hooks] max_running of zero", "[hooks]\nmax_running = 0\n", "hooks: max_running 0: must be a whole number from 1 to 256"),
    ("[hooks] max_running as a string", '[hooks]\nmax_running = "8"\n', "hooks: max_running '8': must be a whole number from 1 to 256"),
    ("hooks is not a table", 'hooks = ["/bin/true"]\n', "hooks: must be a table ([hooks]), not an array"),
    # [filter]
    ("an unknown key in [filter]", '[filter]\nmod = "monitor"\n', 'filter: unknown key "mod"; known: mode, strict, answer, fail_closed, ipsec, other_transports (did you mean "mode"?)'),
    ("strict is not a boolean", '[filter]\nstrict = "yes"\n', "filter: strict must be true or false, not a string"),
    ("an unknown ipsec choice", '[filter]\nipsec = "allow"\n',
     'filter: ipsec "allow": must be "drop" (ESP, AH, udp:4500 refused unless allow-listed) or "pass"'),
    ("other_transports is not a string", "[filter]\nother_transports = false\n",
     'filter: other_transports a boolean: must be "drop" (SCTP, DCCP, UDP-Lite refused unless allow-listed) or "pass"'),
    ("ipsec and other_transports pass", '[filter]\nipsec = "pass"\nother_transports = "pass"\n', None),
    ("an unknown mode", '[filter]\nmode = "block"\n', 'filter: mode "block": must be "enforce" or "monitor"'),
    ("mode is not a string", "[filter]\nmode = 1\n", 'filter: mode must be a string ("enforce" or "monitor"), not an integer'),
    ("filter is not a table", 'filter = "enforce"\n', "filter: must be a table ([filter]), not a string"),
    # [[sequence]]: shape and names
    ("[sequence] instead of [[sequence]]", '[sequence]\nname = "ssh"\n', "sequence: must be an array of tables: write [[sequence]], not [sequence]"),
    ("sequence is an array of strings", 'sequence = ["ssh"]\n', "sequence[0]: must be a table ([[sequence]]), not a string"),
    ("a sequence without a name", SSH + '[[sequence]]\nknock = ["udp:1", "udp:2", "udp:3"]\nopen = ["tcp:80"]\n', 'sequence[1]: missing key "name"'),
    ("a name that is not a string", SSH.replace('name = "ssh"', "name = 7"), "sequence[0]: name must be a string, not an integer"),
    ("an empty name", sequence(name=""), "sequence[0]: name is empty"),
    ("a name with a space", sequence(name="my ssh"), 'sequence[0]: name "my ssh": use only letters, digits, "_", "." and "-"'),
    ("a name with non-ASCII letters", sequence(name="sésame"), 'sequence[0]: name "sésame": use only letters, digits'),
    ("a name of 32 bytes", sequence(name="a" * 32), f'sequence[0]: name "{"a" * 32}" is 32 bytes; at most 31'),
    ("a name used twice", SSH + sequence(knock=("udp:1", "udp:2", "udp:3")), 'sequence[1]: name "ssh" is already used by sequence[0]'),
    ("an unknown key in a sequence", sequence(extra='opne = ["tcp:80"]'), 'sequence "ssh": unknown key "opne"; known: name, knock, step_timeout, open, open_for, idle_timeout, on_open, on_close, totp, secret, secret_file, window, port_range, spent_file (did you mean "open"?)'),
    # knock
    ("no knock", '[[sequence]]\nname = "ssh"\nopen = ["tcp:22"]\n', 'sequence "ssh": missing key "knock"'),
    ("knock is a string", sequence(knock=()).replace("knock = []", 'knock = "tcp:7000"'), 'sequence "ssh": knock must be an array such as ["tcp:7000", "udp:8000", "tcp:9000"], not a string'),
    ("knock is empty", sequence(knock=()), 'sequence "ssh": knock is empty; give at least one step'),
    ("17 knock steps", sequence(knock=[f"udp:{7000 + i}" for i in range(17)]), 'sequence "ssh": knock has 17 steps; at most 16'),
    ("a knock step that is a number", sequence(knock=()).replace("knock = []", 'knock = ["tcp:7000", 8000]'), 'sequence "ssh": knock[1] must be a string such as "tcp:7000", not an integer'),
    ("a port out of range", sequence(knock=("tcp:7000", "udp:8000", "tcp:70000")), 'sequence "ssh": knock[2] "tcp:70000": port out of range 1-65535'),
    ("port 0", sequence(knock=("tcp:0", "udp:8000", "tcp:9000")), 'sequence "ssh": knock[0] "tcp:0": port out of range 1-65535'),
    ("knockd's order", sequence(knock=("7000:tcp", "udp:8000", "tcp:9000")), 'sequence "ssh": knock[0] "7000:tcp": write it tcp:7000'),
    ("a bare port", sequence(knock=("7000", "udp:8000", "tcp:9000")), 'sequence "ssh": knock[0] "7000": no protocol: say tcp:7000 or udp:7000'),
    ("an unknown protocol", sequence(knock=("sctp:7000", "udp:8000", "tcp:9000")), 'sequence "ssh": knock[0] "sctp:7000": unknown protocol "sctp": use tcp, udp or icmp'),
    ("the same step twice in a row", sequence(knock=("tcp:7000", "tcp:7000", "tcp:9000")), 'sequence "ssh": knock[1] "tcp:7000": same as knock[0]; a repeated knock is taken for a retransmission and ignored'),
    ("icmp twice in a row", sequence(knock=("udp:1", "icmp", "icmp")), 'sequence "ssh": knock[2] "icmp": same as knock[1]'),
    # durations
    ("a step_timeout that is not a duration", sequence(extra='step_timeout = "5x"'), 'sequence "ssh": step_timeout "5x": not a duration (use e.g. 500ms, 5s, 2m, 1h)'),
    ("a step_timeout given as a number", sequence(extra="step_timeout = 5"), 'sequence "ssh": step_timeout must be a string such as "5s", not an integer'),
    ("an open_for of zero", sequence(extra='open_for = "0s"'), 'sequence "ssh": open_for "0s": must be more than zero'),
    ("a negative idle_timeout", sequence(extra='idle_timeout = "-1m"'), 'sequence "ssh": idle_timeout "-1m": cannot be negative'),
    ("an idle_timeout without a unit", sequence(extra='idle_timeout = "900"'), 'sequence "ssh": idle_timeout "900": no unit: say 900s or 900ms'),
    ("an open_for given as a float", sequence(extra="open_for = 1.5"), 'sequence "ssh": open_for must be a string such as "30s", not a float'),
    ("an idle_timeout over a year", sequence(extra='idle_timeout = "366d"'), 'sequence "ssh": idle_timeout "366d": too long: at most 365d'),
    # open
    ("no open", '[[sequence]]\nname = "ssh"\nknock = ["udp:1", "udp:2", "udp:3"]\n', 'sequence "ssh": missing key "open"'),
    ("open is empty", sequence(opened=()), 'sequence "ssh": open is empty; give at least one step such as ["tcp:22"]'),
    ("open is a string", sequence(opened=()).replace("open = []", 'open = "tcp:22"'), 'sequence "ssh": open must be an array such as ["tcp:22"], not a string'),
    ("icmp cannot be opened", sequence(opened=("icmp",)), 'sequence "ssh": open[0] "icmp": icmp cannot be opened; use tcp:PORT or udp:PORT'),
    ("an open port out of range", sequence(opened=("tcp:65536",)), 'sequence "ssh": open[0] "tcp:65536": port out of range 1-65535'),
    ("9 open ports", sequence(opened=[f"tcp:{22 + i}" for i in range(9)]), 'sequence "ssh": open has 9 ports; at most 8'),
    # across sequences
    ("an opened port that is another sequence's knock", SSH + sequence("web", ("udp:1", "udp:2", "udp:3"), ("tcp:80",)).replace("tcp:80", "tcp:7000"), 'sequence "web": open[0] "tcp:7000" is also a knock step of sequence "ssh"'),
    ("the example message: web opens ssh's knock port", sequence(knock=("tcp:80", "udp:8000", "tcp:9000")) + sequence("web", ("udp:1", "udp:2", "udp:3"), ("tcp:80",)), 'sequence "web": open[0] "tcp:80" is also a knock step of sequence "ssh"'),
    ("a sequence opens its own knock port", sequence(opened=("udp:8000",)), 'sequence "ssh": open[0] "udp:8000" is also a knock step of sequence "ssh"'),
    ("a step timeout over an hour", 'sequence = [{name = "a", knock = ["tcp:1", "tcp:2"], open = ["tcp:22"], step_timeout = "2h"}]',
     "step_timeout 2h: at most 1h"),
    ("3 sequences share one knock port", many_sequences(3, shared_step="udp:5000"), 'knock step "udp:5000" is shared by 3 sequences ("s0", "s1", "s2"); at most 2 may share one'),
    ("65 sequences", many_sequences(65), "sequence: 65 sequences; at most 64"),
    # [allow] and [deny]
    ("an unknown key in [allow]", '[allow]\nsource = ["10.0.0.1"]\n', 'allow: unknown key "source"; known: sources (did you mean "sources"?)'),
    ("allow is not a table", 'allow = ["10.0.0.1"]\n', 'allow: must be a table with a "sources" array ([allow]), not an array'),
    ("sources is a string", '[deny]\nsources = "10.0.0.1"\n', 'deny: sources must be an array such as ["192.0.2.10", "2001:db8::/32"], not a string'),
    ("a source that is a number", "[allow]\nsources = [167772161]\n", "allow: sources[0] must be a string, not an integer"),
    ("not an address", '[allow]\nsources = ["10.0.0.300"]\n', 'allow: sources[0] "10.0.0.300": not an IP address or CIDR'),
    ("a prefix too long", '[allow]\nsources = ["10.0.0.0/33"]\n', 'allow: sources[0] "10.0.0.0/33": not an IP address or CIDR'),
    ("host bits set, IPv4", '[deny]\nsources = ["10.0.0.1/24"]\n', 'deny: sources[0] "10.0.0.1/24": host bits set: write 10.0.0.0/24 for the network, or 10.0.0.1 for one address'),
    ("host bits set, IPv6", '[deny]\nsources = ["2001:db8::1/32"]\n', 'deny: sources[0] "2001:db8::1/32": host bits set: write 2001:db8::/32 for the network, or 2001:db8::1 for one address'),
    ("a zone index", '[allow]\nsources = ["fe80::1%eth0"]\n', 'allow: sources[0] "fe80::1%eth0": a zone index (%...) has no meaning in a source list'),
    ("the same network allowed and denied", '[allow]\nsources = ["192.0.2.1", "203.0.113.0/24"]\n[deny]\nsources = ["203.0.113.0/24"]\n', 'deny: sources[0] "203.0.113.0/24" is also in allow (sources[1]); a source cannot be both'),
    ("an address allowed and denied in two spellings", '[allow]\nsources = ["10.0.0.1"]\n[deny]\nsources = ["10.0.0.1/32"]\n', 'deny: sources[0] "10.0.0.1/32" is also in allow (sources[0])'),
    ("IPv4-mapped IPv6 is the same IPv4 source", '[allow]\nsources = ["10.0.0.0/24"]\n[deny]\nsources = ["::ffff:10.0.0.0/120"]\n', 'deny: sources[0] "10.0.0.0/24" is also in allow (sources[0])'),
]


@pytest.mark.parametrize("description, text, expected", CASES, ids=[case[0] for case in CASES])
def test_config_case(description, text, expected):
    if expected is None:
        assert isinstance(config.parse_config(text, listening=set()), config.Config)
        return
    with pytest.raises(ConfigError) as caught:
        config.parse_config(text, listening=set())
    assert any(expected in error for error in caught.value.errors), caught.value.errors


def test_example_parses_to_the_expected_config():
    loaded = config.parse_config(EXAMPLE, listening=set())
    assert loaded.mode == "enforce"
    assert loaded.sequences == (
        config.Sequence(
            name="ssh",
            knock=(Step("tcp", 7000), Step("udp", 8000), Step("tcp", 9000)),
            step_timeout_ns=5_000_000_000,
            open=(Step("tcp", 22),),
            open_for_ns=30_000_000_000,
            idle_timeout_ns=900_000_000_000,
        ),
    )
    assert loaded.allow == (ipaddress.ip_network("192.0.2.10/32"), ipaddress.ip_network("2001:db8::/32"))
    assert loaded.deny == (ipaddress.ip_network("203.0.113.0/24"),)
    assert loaded.path is None
    assert loaded.warnings == ()


def test_strict_is_on_unless_turned_off():
    assert config.parse_config(SSH, listening=set()).strict is True
    assert config.parse_config("[filter]\nstrict = false\n" + SSH, listening=set()).strict is False


def test_defaults_when_durations_are_omitted():
    (ssh,) = config.parse_config(SSH, listening=set()).sequences
    assert ssh.step_timeout_ns == 5 * 10**9
    assert ssh.open_for_ns == 30 * 10**9
    assert ssh.idle_timeout_ns == 15 * 60 * 10**9
    assert config.parse_config("", listening=set()).mode == "enforce"


def test_ipv4_mapped_sources_are_kept_as_ipv4():
    loaded = config.parse_config('[allow]\nsources = ["::ffff:192.0.2.0/120", "::ffff:192.0.2.9"]\n', listening=set())
    assert loaded.allow == (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("192.0.2.9/32"))


def test_every_error_of_a_file_is_reported_at_once():
    text = '[filter]\nmod = "x"\n' + sequence(knock=("tcp:7000", "udp:8000", "tcp:70000"), extra='step_timeout = "5x"')
    text += '[allow]\nsources = ["10.0.0.300"]\n'
    with pytest.raises(ConfigError) as caught:
        config.parse_config(text, "/etc/xknock/xknock.toml", listening=set())
    assert caught.value.errors == [
        '/etc/xknock/xknock.toml: filter: unknown key "mod"; known: mode, strict, answer, fail_closed, ipsec, other_transports (did you mean "mode"?)',
        '/etc/xknock/xknock.toml: sequence "ssh": knock[2] "tcp:70000": port out of range 1-65535',
        '/etc/xknock/xknock.toml: sequence "ssh": step_timeout "5x": not a duration (use e.g. 500ms, 5s, 2m, 1h)',
        '/etc/xknock/xknock.toml: allow: sources[0] "10.0.0.300": not an IP address or CIDR',
    ]
    assert str(caught.value) == "\n".join(caught.value.errors)


def test_toml_syntax_error_is_prefixed_with_the_path():
    with pytest.raises(ConfigError) as caught:
        config.parse_config("[filter\n", "/tmp/x.toml", listening=set())
    assert len(caught.value.errors) == 1
    assert caught.value.errors[0].startswith("/tmp/x.toml: line 1: ")


# --- warnings ---------------------------------------------------------------


def warnings_of(text, listening=frozenset(), path=None):
    return list(config.parse_config(text, path, listening=set(listening)).warnings)


def test_no_sequences_warns_that_nothing_is_guarded():
    assert warnings_of("") == ["no sequences: nothing is guarded"]
    assert warnings_of(EXAMPLE) == []


def test_a_knock_port_with_a_listening_socket_warns():
    assert warnings_of(SSH, listening={("tcp", 7000), ("tcp", 22)}, path="/etc/xknock/xknock.toml") == [
        '/etc/xknock/xknock.toml: sequence "ssh": knock[0] "tcp:7000": a local socket listens on this port; '
        "knock packets are always dropped, so it becomes unreachable"
    ]


def test_a_listener_on_the_other_protocol_does_not_warn():
    assert warnings_of(SSH, listening={("udp", 7000), ("tcp", 8000)}) == []


def test_listening_is_read_from_proc_when_not_given(monkeypatch):
    monkeypatch.setattr(load, "listening_ports", lambda: {("udp", 8000)})
    warnings = config.parse_config(SSH).warnings
    assert warnings == ('sequence "ssh": knock[1] "udp:8000": a local socket listens on this port; '
                        "knock packets are always dropped, so it becomes unreachable",)


def test_a_short_sequence_warns():
    assert warnings_of(sequence(knock=("tcp:7000", "udp:8000"))) == [
        'sequence "ssh": only 2 knock step(s); a short sequence is easy to guess'
    ]


def test_an_icmp_knock_warns_that_ping_stops():
    assert warnings_of(sequence(knock=("udp:1", "icmp", "udp:2"))) == [
        'sequence "ssh": knock[1] "icmp": every echo request to this host is this knock (the host still answers it); a ping from the client between two of its other knocks is taken for a wrong one'
    ]


def test_a_duplicate_source_warns_and_is_dropped():
    text = SSH + '[allow]\nsources = ["192.0.2.10", "2001:db8::/32", "192.0.2.10/32"]\n'
    loaded = config.parse_config(text, listening=set())
    assert loaded.warnings == ('allow: sources[2] "192.0.2.10/32": same as sources[0]; ignored',)
    assert loaded.allow == (ipaddress.ip_network("192.0.2.10/32"), ipaddress.ip_network("2001:db8::/32"))


def test_a_duplicate_open_port_warns_and_is_dropped():
    loaded = config.parse_config(sequence(opened=("tcp:22", "udp:53", "tcp:22")), listening=set())
    assert loaded.warnings == ('sequence "ssh": open[2] "tcp:22": same as open[0]; ignored',)
    assert loaded.sequences[0].open == (Step("tcp", 22), Step("udp", 53))


def test_sources_matching_everyone_warn():
    text = SSH + '[allow]\nsources = ["0.0.0.0/0"]\n[deny]\nsources = ["::/0"]\n'
    assert warnings_of(text) == [
        'allow: sources[0] "0.0.0.0/0": every IPv4 source may reach every guarded port',
        'deny: sources[0] "::/0": every IPv6 packet is dropped, yours too',
    ]


def test_hooks_are_parsed_into_the_config():
    text = sequence(extra='on_open = ["/bin/true", "opened", "$XKNOCK_SOURCE"]\non_close = ["/bin/true"]')
    text += '[ban]\nafter = 3\non_ban = ["/bin/sh", "-c", "logger banned $XKNOCK_SOURCE"]\n'
    text += '[hooks]\ntimeout = "1m30s"\nmax_running = 3\n'
    loaded = config.parse_config(text, listening=set())
    (ssh,) = loaded.sequences
    assert ssh.on_open == ("/bin/true", "opened", "$XKNOCK_SOURCE")   # kept as written: never expanded here
    assert ssh.on_close == ("/bin/true",)
    assert loaded.ban.on_ban == ("/bin/sh", "-c", "logger banned $XKNOCK_SOURCE")
    assert loaded.hooks == config.Hooks(timeout_ns=90 * 10**9, max_running=3)
    assert loaded.warnings == ()


def test_hooks_default_to_none_and_ten_seconds():
    loaded = config.parse_config(SSH + "[ban]\nafter = 3\n", listening=set())
    assert loaded.sequences[0].on_open == loaded.sequences[0].on_close == ()
    assert loaded.ban.on_ban == ()
    assert loaded.hooks == config.Hooks(timeout_ns=10 * 10**9, max_running=8)


def test_hooks_do_not_change_what_the_filter_is():
    plain = config.parse_config(SSH + "[ban]\nafter = 3\n", listening=set())
    hooked = config.parse_config(
        sequence(extra='on_open = ["/bin/true"]') + '[ban]\nafter = 3\non_ban = ["/bin/true"]\n'
        + "[hooks]\nmax_running = 1\n", listening=set())
    assert hooked == plain
    assert config.config_hash(hooked) == config.config_hash(plain)


def test_a_hook_command_not_there_yet_only_warns(tmp_path):
    script = tmp_path / "notify"
    script.write_text("#!/bin/sh\n")
    missing = tmp_path / "absent"
    text = sequence(extra=f'on_open = ["{script}"]\non_close = ["{missing}", "closed"]')
    text += f'[ban]\nafter = 3\non_ban = ["{tmp_path}"]\n'
    loaded = config.parse_config(text, listening=set())
    assert loaded.sequences[0].on_close == (str(missing), "closed")   # kept: it may be deployed later
    assert list(loaded.warnings) == [
        f'sequence "ssh": on_open[0] "{script}": not executable; the hook fails until it is (chmod +x)',
        f'sequence "ssh": on_close[0] "{missing}": no such file (yet); the hook fails until it is there',
        f'ban: on_ban[0] "{tmp_path}": not a file; the hook fails',
    ]
    script.chmod(0o755)
    assert len(config.parse_config(text, listening=set()).warnings) == 2


def test_warnings_travel_with_the_errors():
    text = sequence(knock=("tcp:7000", "udp:8000")) + "[spa]\n"
    with pytest.raises(ConfigError) as caught:
        config.parse_config(text, listening=set())
    assert caught.value.warnings == ['sequence "ssh": only 2 knock step(s); a short sequence is easy to guess']


# --- load_config --------------------------------------------------------------


def test_load_config_reads_the_file(tmp_path):
    path = tmp_path / "xknock.toml"
    path.write_text(EXAMPLE)
    loaded = config.load_config(str(path), listening=set())
    assert loaded.path == str(path)
    assert loaded.sequences[0].name == "ssh"


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        config.load_config(str(path))
    assert caught.value.errors == [f"{path}: no such file (create it, or pass -c PATH)"]


def test_load_config_directory(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config.load_config(str(tmp_path))
    assert caught.value.errors == [f"{tmp_path}: is a directory, not a config file"]


def test_load_config_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[sequence]]\nname = "s\xe9same"\n')
    with pytest.raises(ConfigError) as caught:
        config.load_config(str(path))
    assert caught.value.errors == [f"{path}: not UTF-8 text (byte 22)"]


def test_load_config_errors_carry_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[filter]\nmode = "block"\n')
    with pytest.raises(ConfigError) as caught:
        config.load_config(str(path), listening=set())
    assert caught.value.errors == [f'{path}: filter: mode "block": must be "enforce" or "monitor"']


# --- parse_step -------------------------------------------------------------

STEPS = [
    ("tcp:7000", Step("tcp", 7000)),
    ("udp:8000", Step("udp", 8000)),
    ("icmp", Step("icmp", 0)),
    ("tcp:1", Step("tcp", 1)),
    ("udp:65535", Step("udp", 65535)),
    ("TCP:22", Step("tcp", 22)),
    (" tcp:22 ", Step("tcp", 22)),
    ("tcp:0022", Step("tcp", 22)),
]

BAD_STEPS = [
    ("", "empty: write tcp:PORT, udp:PORT or icmp"),
    ("7000:tcp", "write it tcp:7000"),
    ("8000:udp", "write it udp:8000"),
    ("7000", "no protocol: say tcp:7000 or udp:7000"),
    ("tcp", "tcp needs a port: write tcp:PORT"),
    ("udp:", 'port "" is not a number'),
    ("tcp:ssh", 'port "ssh" is not a number'),
    ("tcp:+22", 'port "+22" is not a number'),
    ("tcp:7_000", 'port "7_000" is not a number'),
    ("tcp:²", 'port "²" is not a number'),
    ("tcp:0", "port out of range 1-65535"),
    ("tcp:65536", "port out of range 1-65535"),
    ("tcp:" + "9" * 5000, "port out of range 1-65535"),
    ("icmp:8", "icmp has no port: write just icmp (an echo request)"),
    ("sctp:9", 'unknown protocol "sctp": use tcp, udp or icmp'),
    ("knock", "not a step: write tcp:PORT, udp:PORT or icmp"),
]


@pytest.mark.parametrize("text, step", STEPS)
def test_parse_step(text, step):
    assert config.parse_step(text) == step


@pytest.mark.parametrize("text, reason", BAD_STEPS)
def test_parse_step_rejects(text, reason):
    with pytest.raises(ValueError) as caught:
        config.parse_step(text)
    assert str(caught.value) == reason


def test_step_str():
    assert str(Step("tcp", 7000)) == "tcp:7000"
    assert str(Step("udp", 8000)) == "udp:8000"
    assert str(Step("icmp", 0)) == "icmp"
    assert Step("udp", 1).proto_number == layout.PROTO_UDP


@given(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535))
def test_step_round_trips(proto, port):
    step = Step(proto, port)
    assert config.parse_step(str(step)) == step


# --- parse_duration -----------------------------------------------------------

DURATIONS = [
    ("500ms", 500 * 10**6),
    ("5s", 5 * 10**9),
    ("2m", 120 * 10**9),
    ("1h", 3600 * 10**9),
    ("1d", 86400 * 10**9),
    ("1m30s", 90 * 10**9),
    ("1h2m3s4ms", (3723 * 1000 + 4) * 10**6),
    ("90s", 90 * 10**9),
    ("365d", 365 * 86400 * 10**9),
]

BAD_DURATIONS = [
    ("5", "no unit: say 5s or 5ms (use e.g. 500ms, 5s, 2m, 1h)"),
    ("", "empty (use e.g. 500ms, 5s, 2m, 1h)"),
    ("5x", "not a duration (use e.g. 500ms, 5s, 2m, 1h)"),
    ("1.5s", "not a duration (use e.g. 500ms, 5s, 2m, 1h)"),
    ("5 s", "not a duration (use e.g. 500ms, 5s, 2m, 1h)"),
    ("s", "not a duration (use e.g. 500ms, 5s, 2m, 1h)"),
    ("5us", "not a duration (use e.g. 500ms, 5s, 2m, 1h)"),
    ("30s1m", "units out of order: largest first, each once, e.g. 1m30s"),
    ("5s5s", "units out of order: largest first, each once, e.g. 1m30s"),
    ("0s", "must be more than zero"),
    ("0m0s", "must be more than zero"),
    ("-5s", "cannot be negative"),
    ("366d", "too long: at most 365d"),
]


@pytest.mark.parametrize("text, ns", DURATIONS)
def test_parse_duration(text, ns):
    assert config.parse_duration(text) == ns


@pytest.mark.parametrize("text, reason", BAD_DURATIONS)
def test_parse_duration_rejects(text, reason):
    with pytest.raises(ValueError) as caught:
        config.parse_duration(text)
    assert str(caught.value) == reason


def test_parse_duration_zero_where_allowed():
    assert config.parse_duration("0s", allow_zero=True) == 0


@given(st.integers(1, 365 * 86400 * 1000))
def test_duration_round_trips(ms):
    ns = ms * 10**6
    assert config.parse_duration(config.format_duration(ns)) == ns


# --- listening_ports --------------------------------------------------------

PROC_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def proc_row(local, remote, state):
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 1 1\n"


def test_listening_ports_reads_proc_net(tmp_path):
    (tmp_path / "tcp").write_text(
        PROC_HEADER
        + proc_row("00000000:0016", "00000000:0000", "0A")  # 0.0.0.0:22 listening
        + proc_row("0100007F:0277", "00000000:0000", "0A")  # 127.0.0.1:631, loopback only
        + proc_row("0F02000A:0016", "0A000001:D431", "01")  # an established connection
    )
    (tmp_path / "tcp6").write_text(
        PROC_HEADER
        + proc_row("00000000000000000000000000000000:1F90", "00000000000000000000000000000000:0000", "0A")
        + proc_row("00000000000000000000000001000000:1F91", "00000000000000000000000000000000:0000", "0A")  # ::1
    )
    (tmp_path / "udp").write_text(
        PROC_HEADER
        + proc_row("00000000:0035", "00000000:0000", "07")  # bound DNS server
        + proc_row("0F02000A:A1B2", "08080808:0035", "01")  # a connected client socket
    )
    # no udp6 file: a kernel without IPv6
    assert config.listening_ports(str(tmp_path)) == {("tcp", 22), ("tcp", 8080), ("udp", 53)}


def test_listening_ports_on_a_big_endian_host(tmp_path, monkeypatch):
    (tmp_path / "tcp").write_text(
        PROC_HEADER
        + proc_row("7F000001:0277", "00000000:0000", "0A")  # 127.0.0.1:631 as a big-endian host prints it
        + proc_row("0A4D0001:0016", "00000000:0000", "0A")  # 10.77.0.1:22
    )
    monkeypatch.setattr(sys, "byteorder", "big")
    assert config.listening_ports(str(tmp_path)) == {("tcp", 22)}


def test_listening_ports_without_proc(tmp_path):
    assert config.listening_ports(str(tmp_path / "nothing")) == set()


# --- config_hash and equality -------------------------------------------------


def test_config_hash_ignores_order_comments_and_path():
    reordered = """
[deny]
sources = ["203.0.113.0/24"]
[allow]
sources = ["2001:db8::/32", "192.0.2.10/32"]  # same two, other order
[[sequence]]
idle_timeout = "900s"
name = "ssh"
open = ["tcp:22"]
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
"""
    first = config.parse_config(EXAMPLE, "/a.toml", listening=set())
    second = config.parse_config(reordered, "/b.toml", listening=set())
    assert config.config_hash(first) == config.config_hash(second)
    assert len(config.config_hash(first)) == 16
    assert int(config.config_hash(first), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        ('mode = "enforce"', 'mode = "monitor"'),
        ('mode = "enforce"', 'mode = "enforce"\nstrict = false'),
        ('mode = "enforce"', 'mode = "enforce"\nanswer = "drop"'),
        ('"tcp:9000"]', '"tcp:9001"]'),
        ('"udp:8000", "tcp:9000"', '"tcp:9000", "udp:8000"'),  # knock order matters
        ('open_for = "30s"', 'open_for = "31s"'),
        ('step_timeout = "5s"', 'step_timeout = "4s"'),
        ('idle_timeout = "15m"', 'idle_timeout = "16m"'),
        ('open = ["tcp:22"]', 'open = ["tcp:2222"]'),
        ('name = "ssh"', 'name = "sshd"'),
        ('"192.0.2.10"', '"192.0.2.11"'),
        ('"203.0.113.0/24"', '"203.0.113.0/25"'),
    ],
)
def test_config_hash_changes_with_the_policy(change):
    before, after = change
    assert before in EXAMPLE
    original = config.parse_config(EXAMPLE, listening=set())
    changed = config.parse_config(EXAMPLE.replace(before, after), listening=set())
    assert config.config_hash(original) != config.config_hash(changed)
    assert original != changed


def test_configs_compare_by_policy_not_by_path():
    assert config.parse_config(EXAMPLE, "/a.toml", listening=set()) == config.parse_config(EXAMPLE, "/b.toml", listening=set())


def test_a_broken_step_between_two_equal_ones_is_the_only_error():
    with pytest.raises(ConfigError) as caught:
        config.parse_config(sequence(knock=("tcp:7000", "tcp:99999", "tcp:7000")), listening=set())
    assert caught.value.errors == ['sequence "ssh": knock[1] "tcp:99999": port out of range 1-65535']
