"""`xknock import knockd`: knockd.conf files in, xknock TOML and a precise list
of what was not carried over out; then the knock of knockd's own client
opening the converted config's port in a namespace lab.

tests/data/knockd/debian-knockd.conf is the example /etc/knockd.conf shipped by
Debian's knockd package (knockd 0.8-2; Copyright 2004-2021 Judd Vinet, GPL-2
or later, as xknock's GPL-2.0), copied unchanged. The other files are written
in the style of real ones.
"""

import json
import os
import shutil
import stat
import subprocess

import pytest

from xknock_dev.e2e import ACCEPTED, DROPPED, XKNOCK, TcpEchoServer, check, fresh_attach, write_config, xknock
from xknock.controller.config import NS_PER_UNIT, parse_config, parse_duration
from xknock.controller.importers.firewall_commands import NotUnderstood, Rule, parse_command
from xknock.controller.importers.knockd_import import STEP_TIMEOUT_FLOOR_NS, KnockdImportError, convert
from xknock_dev.lab import can_connect, lab
from repo_paths import DATA as TEST_DATA

DATA = os.path.join(TEST_DATA, "knockd")


def data(name):
    return os.path.join(DATA, name)


def read(name):
    with open(data(name)) as conf:
        return conf.read()


# Reasons that recur, spelled once.
NO_STOP = ("stop_command: not set: knockd's rule stayed until something removed it; xknock accepts new "
           "connections for open_for = 30s (its default), established ones while they are active: changed")
ANY_TCP = ("tcpflags: not set: knockd counts any TCP packet, xknock counts SYN only (a SYN without ACK, what "
           "`knock` sends): changed")
LOGS = ("xknock logs one line per event to stderr (the journal under systemd; --log-format json for JSON): "
        "dropped")
RENAMED = "name: xknock names are 1-31 of A-Z a-z 0-9 _ . -: renamed"


def per_gap(seconds, gaps, step, default=""):
    whole = (f"knockd allows {seconds}s for the whole sequence" if not default else
             f"not set: knockd allows {seconds}s (its default) for the whole sequence")
    return (f"{whole}, xknock times each gap: step_timeout = {seconds}s / {gaps} gaps = {step}, rounded down "
            "(never looser than knockd): changed")


# file -> (interface, [(name, knock, step_timeout, open, open_for)], [(line, note)])
CASES = {
    "debian-knockd.conf": ("eth0", [
        ("openSSH", ["tcp:7000", "tcp:8000", "tcp:9000"], "2s500ms", ["tcp:22"], "30s"),
        ("openHTTPS", ["tcp:12345", "tcp:54321", "tcp:24680", "tcp:13579"], "1s600ms", ["tcp:443"], "30s"),
    ], [
        (2, f"[options]: UseSyslog: {LOGS}"),
        (4, f"door openSSH: {NO_STOP}"),
        (6, f"door openSSH: seq_timeout=5: {per_gap(5, 2, '2s500ms')}"),
        (13, "door closeSSH: command=/sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT: removes the rule "
             "door openSSH adds; xknock grants end by themselves (open_for, then idle_timeout) and `xknock revoke` "
             "ends one at once: there is no closing knock: door dropped"),
        (16, f"door openHTTPS: {NO_STOP}"),
        (18, f"door openHTTPS: seq_timeout=5: {per_gap(5, 3, '1s600ms')}"),
    ]),
    "timed-ssh.conf": ("ens3", [
        ("SSH", ["tcp:7000", "udp:8000", "tcp:9000"], "5s", ["tcp:22"], "15s"),
        ("WireGuard", ["udp:2222", "udp:3333", "udp:4444", "udp:5555"], "2s", ["udp:51820"], "1m"),
    ], [
        (4, f"[options]: LogFile=/var/log/knockd.log: {LOGS}"),
        (5, "[options]: Interface=ens3: xknock takes the interface on its command line: "
            "xknock attach ens3 -c THIS-FILE: dropped"),
        (9, f"door SSH: seq_timeout=10: {per_gap(10, 2, '5s')}"),
        (19, f"door WireGuard: seq_timeout=6: {per_gap(6, 3, '2s')}"),
        (22, "door WireGuard: stop_command=/usr/sbin/nft delete rule inet filter input handle $(nft -a list chain "
             "inet filter input | awk '/%IP%/ {print $NF}'): uses the shell operator \"(\"; xknock ends the window "
             "after open_for by itself: dropped"),
    ]),
    "firewalls.conf": ("eth0", [
        ("ufw-ssh", ["tcp:1111", "tcp:2222", "tcp:3333"], "2s", ["tcp:22"], "20s"),
        ("web", ["tcp:4001", "udp:4002", "tcp:4003"], "4s500ms", ["tcp:80", "tcp:443"], "30s"),
        ("firewalld", ["tcp:5001", "tcp:5002", "tcp:5003"], "12s500ms", ["tcp:8443"], "45s"),
        ("helper", ["udp:6001", "udp:6002", "udp:6003"], "1s500ms", ["udp:1194"], "30s"),
        ("many", [f"tcp:{port}" for port in range(101, 113)], "100ms", ["tcp:2322", "tcp:2323"], "30s"),
    ], [
        (3, f"[options]: UseSyslog: {LOGS}"),
        (4, "[options]: PidFile=/run/knockd.pid: xknock runs in the foreground (under systemd) and writes no pid "
            "file: dropped"),
        (6, f"door ufw ssh: {RENAMED} ufw-ssh: changed"),
        (8, f"door ufw ssh: seq_timeout=4: {per_gap(4, 2, '2s')}"),
        (14, f"door web: {NO_STOP}"),
        (16, f"door web: seq_timeout=9: {per_gap(9, 2, '4s500ms')}"),
        (17, "door web: tcpflags=syn,ack: xknock counts SYN only (a SYN without ACK, what `knock` sends); knock "
             "with plain SYNs: dropped"),
        (18, 'door web: start_command=/sbin/iptables -A INPUT -s %IP% -p tcp -m multiport --dports 80,443 -j ACCEPT '
             '&& logger -t knockd "web opened for %IP%": logger -t knockd web opened for %IP%: "logger" is not a '
             "firewall command xknock knows (iptables, ip6tables, nft, ufw, firewall-cmd, knock_helper_ipt.sh): "
             "dropped"),
        (20, f"door firewalld: seq_timeout: {per_gap(25, 2, '12s500ms', default=True)}"),
        (20, f"door firewalld: {ANY_TCP}"),
        (23, "door firewalld: target=192.0.2.1: xknock counts knocks to any address on the interface it is "
             "attached to: dropped"),
        (25, f"door helper: {NO_STOP}"),
        (27, f"door helper: seq_timeout=3: {per_gap(3, 2, '1s500ms')}"),
        (30, f"door many: {ANY_TCP}"),
        (30, f"door many: {NO_STOP}"),
        (32, "door many: seq_timeout=1: knockd allows 1s for the whole sequence, xknock times each gap: 1s / 11 gaps "
             "is below xknock's floor, step_timeout = 100ms, looser than knockd: changed"),
        (36, "door smtp: one_time_sequences=/etc/knockd/smtp_sequences: xknock has no one-time sequences, and a "
             "fixed sequence in their place could be replayed: door dropped"),
        (43, "door set: command=nft add element inet filter knocked { %IP% timeout 30s }: no port to open can be "
             "read from it: adds the knocker to an nftables set; which ports that set opens is in your ruleset, not "
             "in the command; write this [[sequence]] by hand: door dropped"),
        (47, 'door script: command=/usr/local/bin/open-door %IP%: no port to open can be read from it: "open-door" '
             "is not a firewall command xknock knows (iptables, ip6tables, nft, ufw, firewall-cmd, "
             "knock_helper_ipt.sh); write this [[sequence]] by hand: door dropped"),
        (50, 'door clash: sequence=443,7301,7302: xknock refuses it: sequence "web": open[1] "tcp:443" is also a '
             'knock step of sequence "clash": door dropped'),
    ]),
    "sloppy.conf": ("eth1", [
        ("open-ssh-laptop", ["tcp:7000", "udp:8000", "tcp:9000"], "4s", ["tcp:22"], "30s"),
        ("open-ssh-laptop-2", ["tcp:7100", "tcp:7200", "tcp:7300"], "1s", ["tcp:22"], "1s"),
    ], [
        (2, "outside any section: Interface=eth0: knockd refuses a directive before any [section]: ignored"),
        (5, "[options]: Interface=eth1: xknock takes the interface on its command line: "
            "xknock attach eth1 -c THIS-FILE: dropped"),
        (6, "[options]: Verbose=yes: unknown global directive (knockd refuses the file): ignored"),
        (8, f"door open ssh (laptop): {NO_STOP}"),
        (8, f"door open ssh (laptop): {RENAMED} open-ssh-laptop: changed"),
        (10, "door open ssh (laptop): Seq_Timeout=8s: read as 8 seconds, as knockd reads it: changed"),
        (10, f"door open ssh (laptop): Seq_Timeout=8s: {per_gap(8, 2, '4s')}"),
        (13, "door open ssh (laptop): Start_Command_6=: empty: knockd does nothing for IPv6 knockers; xknock grants "
             "them the same ports as IPv4 knockers: changed"),
        (14, "door open ssh (laptop): Cmd_Timeout=30: knockd uses it only with a stop_command: ignored"),
        (15, "door open ssh (laptop): Color=blue: unknown door directive (knockd refuses the file): ignored"),
        (17, f"door open ssh (laptop) : {ANY_TCP}"),
        (17, f"door open ssh (laptop) : {RENAMED} open-ssh-laptop-2: changed"),
        (19, f"door open ssh (laptop) : timeout=2: {per_gap(2, 2, '1s')}"),
        (21, "door open ssh (laptop) : cmd_timeout=0: xknock's open_for must be more than zero: 1s: changed"),
        (25, 'door repeat: sequence=7000,7000,8000: xknock refuses it: knock[1] "tcp:7000": same as knock[0]; a '
             "repeated knock is taken for a retransmission and ignored: door dropped"),
        (29, 'door bad port: sequence=7000,70000: item 2 "70000" is not a port 1-65535: door dropped'),
        (33, "door too long: sequence=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17: 17 knocks; xknock takes at most "
             "16: door dropped"),
        (36, "door no sequence: sequence: not set: the door has no knock: door dropped"),
    ]),
}


@pytest.mark.parametrize("name", CASES)
def test_conversion(name):
    interface, sequences, notes = CASES[name]
    result = convert(read(name), source=name)
    assert result.interface == interface
    got = [(s.name, list(s.knock), s.step_timeout, list(s.open), s.open_for) for s in result.sequences]
    assert got == sequences
    assert [(note.line, str(note)) for note in result.notes] == notes
    # The TOML says the same, and is a valid config: what `xknock attach` reads.
    config = parse_config(result.toml, listening=set())
    assert config == result.config
    assert [(s.name, [str(k) for k in s.knock], s.step_timeout_ns, [str(o) for o in s.open], s.open_for_ns)
            for s in config.sequences] == [
        (n, k, parse_duration(st), o, parse_duration(of)) for n, k, st, o, of in sequences]
    assert all(s.idle_timeout_ns == 15 * NS_PER_UNIT["m"] for s in config.sequences)
    assert config.mode == "enforce"
    for line, note in notes:
        assert f"#   line {line}: {note}" in result.toml


def test_nothing_convertible_says_why_for_every_door():
    with pytest.raises(KnockdImportError) as raised:
        convert(read("manpage-examples.conf"), source="manpage-examples.conf")
    assert str(raised.value) == "manpage-examples.conf: none of the 3 knockd door(s) could be converted"
    assert [str(note) for note in raised.value.notes] == [
        f"[options]: logfile=/var/log/knockd.log: {LOGS}",
        "door openSSH: command=/sbin/iptables -A INPUT -s %IP% --dport 22 -j ACCEPT: no port to open can be read "
        "from it: --dport without -p tcp or -p udp (iptables refuses it too); write this [[sequence]] by hand: "
        "door dropped",
        "door closeSSH: command=/sbin/iptables -D INPUT -s %IP% --dport 22 -j ACCEPT: no port to open can be read "
        "from it: --dport without -p tcp or -p udp (iptables refuses it too); write this [[sequence]] by hand: "
        "door dropped",
        "door opencloseSSH: start_command=/usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn -j ACCEPT: no port to "
        "open can be read from it: opens every tcp port to the knocker; xknock opens listed ports only; write this "
        "[[sequence]] by hand: door dropped",
    ]


def test_a_file_without_doors_is_refused():
    with pytest.raises(KnockdImportError, match="no knockd door"):
        convert("[options]\n\tUseSyslog\n", source="x.conf")


def test_monitor_mode():
    result = convert(read("debian-knockd.conf"), mode="monitor")
    assert result.config.mode == "monitor"


@pytest.mark.parametrize("steps", range(1, 17))
def test_step_timeout_is_never_looser_than_seq_timeout_but_for_the_floor(steps):
    sequence = ",".join(str(1000 + i) for i in range(steps))
    for seq_timeout in range(0, 40):
        conf = (f"[door]\nsequence = {sequence}\nseq_timeout = {seq_timeout}\n"
                "command = iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n")
        [sequence_out] = convert(conf).config.sequences
        step_ns = sequence_out.step_timeout_ns
        if steps > 1:
            assert step_ns * (steps - 1) <= seq_timeout * NS_PER_UNIT["s"] or step_ns == STEP_TIMEOUT_FLOOR_NS
            assert step_ns % STEP_TIMEOUT_FLOOR_NS == 0


IDIOMS = {
    "/sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT": [("open", ["tcp:22"])],
    "/usr/sbin/iptables -I INPUT 1 -s %IP% -p udp -m udp --dport 53 -j ACCEPT": [("open", ["udp:53"])],
    "iptables -w -A INPUT -s %IP%/32 -p tcp -m state --state NEW -m tcp --dport 22 -j ACCEPT":
        [("open", ["tcp:22"])],
    "ip6tables -I INPUT -s %IP% -p tcp -m multiport --dports 80,443 -j ACCEPT": [("open", ["tcp:80", "tcp:443"])],
    "iptables -A INPUT -s %IP% -p tcp --dport 6000:6002 -j ACCEPT": [("open", ["tcp:6000", "tcp:6001", "tcp:6002"])],
    "/sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT": [("close", ["tcp:22"])],
    "iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT; ip6tables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT":
        [("open", ["tcp:22"]), ("open", ["tcp:22"])],
    "ufw allow from %IP% to any port 22 proto tcp": [("open", ["tcp:22"])],
    "ufw allow from %IP% to any port 60000": [("open", ["tcp:60000", "udp:60000"])],
    "/usr/sbin/ufw insert 1 allow from %IP% to any port 22 proto tcp": [("open", ["tcp:22"])],
    "ufw delete allow from %IP% to any port 22 proto tcp": [("close", ["tcp:22"])],
    "nft add rule inet filter input ip saddr %IP% tcp dport 22 accept": [("open", ["tcp:22"])],
    "nft insert rule inet filter input ip6 saddr %IP% tcp dport { 22, 443 } ct state new counter accept":
        [("open", ["tcp:22", "tcp:443"])],
    "nft add rule ip filter INPUT ip saddr %IP% meta l4proto udp th dport 51820 accept": [("open", ["udp:51820"])],
    "firewall-cmd --add-rich-rule='rule family=\"ipv4\" source address=\"%IP%\" port port=\"22\" protocol=\"tcp\" "
    "accept' --timeout=2m": [("open", ["tcp:22"])],
    "/usr/sbin/knock_helper_ipt.sh -a -f %IP% -d 22": [("open", ["tcp:22"])],
    "/usr/local/sbin/knock_add -x -c INPUT -p udp -d 1194 -f %IP%": [("close", ["udp:1194"])],
}


@pytest.mark.parametrize("command", IDIOMS)
def test_firewall_idioms(command):
    meanings = [meaning for _, meaning in parse_command(command)]
    assert all(isinstance(meaning, Rule) for meaning in meanings), meanings
    assert [(rule.action, [str(step) for step in rule.ports]) for rule in meanings] == IDIOMS[command]


NOT_IDIOMS = {
    "iptables -A INPUT -p tcp --dport 22 -j ACCEPT": "has no source address: it opens to everyone, not to the knocker",
    "iptables -A INPUT -s 10.0.0.1 -p tcp --dport 22 -j ACCEPT": "its source is 10.0.0.1, not the knocker (%IP%)",
    "iptables -A FORWARD -s %IP% -p tcp --dport 22 -j ACCEPT": "works on chain FORWARD, not INPUT",
    "iptables -t nat -A PREROUTING -s %IP% -p tcp --dport 22 -j DNAT --to-destination 10.0.0.2":
        'option "--to-destination"',
    "iptables -A INPUT -s %IP% -p tcp --dport 22 -j LOG": "jumps to LOG, not ACCEPT",
    "iptables -A INPUT -s %IP% -p tcp --dport 1000:1100 -j ACCEPT":
        'port range "1000:1100" is wider than the 8 ports a sequence can open',
    "ufw allow 22/tcp": '"ufw allow 22/tcp" opens to everyone, not to the knocker',
    "ufw allow from %IP% to any app OpenSSH": "opens an application profile; its ports are in /etc/ufw/applications.d",
    "nft add rule inet filter input ip saddr %IP% tcp dport 22 drop": "its verdict is drop, not accept",
    "/usr/local/bin/door.sh %IP% > /dev/null": 'uses the shell operator ">"',
    "echo 'knocked": "cannot be split into words: No closing quotation",
}


@pytest.mark.parametrize("command", NOT_IDIOMS)
def test_commands_that_are_not_idioms_say_why(command):
    [(_, meaning)] = parse_command(command)
    assert isinstance(meaning, NotUnderstood)
    assert str(meaning) == NOT_IDIOMS[command]


# --- the command line ------------------------------------------------------------


def run_import(*args, stdin=None):
    return subprocess.run([XKNOCK, "import", "knockd", *args], capture_output=True, text=True, input=stdin,
                          timeout=60)


def test_cli_prints_toml_and_lists_notes_on_stderr():
    result = run_import(data("debian-knockd.conf"))
    assert result.returncode == 0, result.stderr
    expected = convert(read("debian-knockd.conf"), source=data("debian-knockd.conf"))
    assert result.stdout == expected.toml
    lines = result.stderr.splitlines()
    assert lines[:len(expected.notes)] == [note.located(data("debian-knockd.conf")) for note in expected.notes]
    assert f"{data('debian-knockd.conf')}:13: door closeSSH: " in result.stderr
    assert lines[-1].startswith("xknock: converted 2 of 3 knockd door(s) (openSSH, openHTTPS) to stdout")


def test_cli_answers_in_json(tmp_path):
    result = run_import(data("debian-knockd.conf"), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    expected = convert(read("debian-knockd.conf"), source=data("debian-knockd.conf"))
    assert shown["converted"] == ["openSSH", "openHTTPS"] and shown["of"] == 3 and shown["output"] is None
    assert shown["toml"] == expected.toml and shown["interface"] == expected.interface
    assert shown["notes"] == [note.located(data("debian-knockd.conf")) for note in expected.notes]
    out = tmp_path / "xknock.toml"
    written = json.loads(run_import(data("debian-knockd.conf"), "-o", str(out), "--json").stdout)
    assert written["output"] == str(out) and written["toml"] is None and out.read_text() == expected.toml


def test_cli_writes_output_file_private_and_never_overwrites_silently(tmp_path):
    out = tmp_path / "xknock.toml"
    result = run_import(data("timed-ssh.conf"), "-o", str(out), "--mode", "monitor")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    config = parse_config(out.read_text(), listening=set())
    assert config.mode == "monitor" and [s.name for s in config.sequences] == ["SSH", "WireGuard"]
    assert "attach with: xknock attach ens3 -c " + str(out) in result.stderr

    again = run_import(data("debian-knockd.conf"), "-o", str(out))
    assert again.returncode == 1
    assert again.stderr.splitlines()[-1] == f"xknock: {out}: exists; pass --force to overwrite it"
    assert [s.name for s in parse_config(out.read_text(), listening=set()).sequences] == ["SSH", "WireGuard"]
    forced = run_import(data("debian-knockd.conf"), "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert [s.name for s in parse_config(out.read_text(), listening=set()).sequences] == ["openSSH", "openHTTPS"]


def test_cli_says_converted_only_once_the_file_is_written(tmp_path):
    out = tmp_path / "missing-dir" / "xknock.toml"
    result = run_import(data("timed-ssh.conf"), "-o", str(out))
    assert result.returncode == 1 and not out.exists()
    assert "xknock: converted" not in result.stderr and "attach with" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"xknock: {out}: cannot write in ")


def test_cli_reads_stdin():
    result = run_import("-", stdin=read("debian-knockd.conf"))
    assert result.returncode == 0, result.stderr
    assert "stdin:13: door closeSSH: " in result.stderr


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/knockd.conf"], "xknock: /nonexistent/knockd.conf: no such file"),
    ([DATA], f"xknock: {DATA}: is a directory, not a knockd.conf"),
    ([data("manpage-examples.conf")], f"xknock: {data('manpage-examples.conf')}: none of the 3 knockd door(s) "
                                      "could be converted"),
])
def test_cli_fails_with_one_clear_line(args, message):
    result = run_import(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == message
    assert "Traceback" not in result.stderr


# --- end to end: knockd's own client against the converted config --------------

KNOCK = shutil.which("knock")


@pytest.mark.netns
@pytest.mark.skipif(KNOCK is None, reason="LOUD SKIP: knockd's client `knock` is not installed (Debian package "
                                          "knockd, which scripts/setup installs): the knock of knockd's own client "
                                          "is untested")
def test_knockd_client_opens_the_converted_config(tmp_path):
    def knock(host, *args):
        result = host.run([KNOCK, "-v", *args], timeout=30)
        assert result.returncode == 0, result.stderr

    def connects(host, addr, port):
        return can_connect(host, addr, port, timeout=ACCEPTED)

    def blocked(host, addr, port):
        return not can_connect(host, addr, port, timeout=DROPPED)

    debian = write_config(tmp_path, "debian.toml", convert(read("debian-knockd.conf")).toml)
    timed = write_config(tmp_path, "timed.toml", convert(read("timed-ssh.conf")).toml)
    with lab("xkknd") as net:
        server = TcpEchoServer(net.server, 22, 443)
        try:
            fresh_attach(net, debian)
            srv, client, attacker = net.server.ipv4, net.client, net.attacker
            assert blocked(client, srv, 22) and blocked(attacker, srv, 22)

            # Debian's example, knocked as its users do: knock HOST 7000 8000 9000.
            knock(client, srv, "7000", "8000", "9000")
            assert connects(client, srv, 22), "knockd's knock did not open port 22"
            assert blocked(attacker, srv, 22), "the knock opened port 22 to another source"
            assert blocked(client, srv, 443), "openSSH's knock opened openHTTPS's port"
            knock(client, srv, "12345", "54321", "24680", "13579")
            assert connects(client, srv, 443)

            # TCP and UDP steps (7000:tcp 8000:udp 9000:tcp), over IPv6 (a source
            # of its own, so nothing is open to it yet), after a reload.
            check(xknock(net.server, "reload", net.server_iface, "-c", timed))
            assert blocked(client, net.server.ipv6, 22)
            knock(client, "-6", net.server.ipv6, "7000:tcp", "8000:udp", "9000:tcp")
            assert connects(client, net.server.ipv6, 22), "knockd's tcp/udp knock over IPv6 did not open port 22"
            assert blocked(attacker, net.server.ipv6, 22)
        finally:
            server.stop()
            xknock(net.server, "detach", net.server_iface)
