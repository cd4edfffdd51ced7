"""What a knockd start or stop command does to the firewall, read from its words.

Pure: a command's text in, the rules it adds or removes for the knocker out
(Rule), or why it is not understood (NotUnderstood). Known idioms:
iptables/ip6tables, nft, ufw, firewall-cmd rich rules and knockd's own
knock_helper_ipt.sh; %IP% stands for the knocker's address. Nothing is run.
"""

import dataclasses
import re
import shlex

from ..config import Step
from ..kernel import layout
@dataclasses.dataclass(frozen=True)
class Rule:
    """A firewall rule a command adds ("open") or removes ("close") for the
    knocker: ports is what it opens; timeout_s a lifetime the tool enforces."""

    action: str  # "open" | "close"
    ports: tuple[Step, ...]
    tool: str
    timeout_s: int | None = None


class NotUnderstood(ValueError):
    """A command, or part of one, that is not a firewall idiom xknock knows."""


SEPARATORS = (";", "&&")
IP_PLACEHOLDER = "%IP%"


def parse_command(text):
    """A knockd command -> [(part, Rule or NotUnderstood)], one entry per simple
    command (split at ; and &&); part is "WORDS: " for a compound command, else ""."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError as err:  # unbalanced quotes
        return [("", NotUnderstood(f"cannot be split into words: {err}"))]
    parts, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            if current:
                parts.append(current)
            current = []
        else:
            current.append(token)
    if current:
        parts.append(current)
    results = []
    for words in parts:
        # A note names the part of a compound command it is about; a command
        # of one part is named by the note already.
        shown = " ".join(words) + ": " if len(parts) > 1 else ""
        try:
            results.append((shown, _parse_simple_command(words)))
        except NotUnderstood as err:
            results.append((shown, err))
    return results


def _parse_simple_command(words):
    operators = [w for w in words if w and set(w) <= set("|&<>()")]
    if operators:
        raise NotUnderstood(f'uses the shell operator "{operators[0]}"')
    words = list(words)
    while words and words[0] in ("sudo", "/usr/bin/sudo", "env", "/usr/bin/env", "command", "exec"):
        words.pop(0)
        while words and words[0].startswith("-"):  # sudo -n, env -i
            words.pop(0)
    if not words:
        raise NotUnderstood("empty")
    if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        raise NotUnderstood("sets a shell variable")
    program = words[0].rsplit("/", 1)[-1]
    args = words[1:]
    if re.fullmatch(r"ip6?tables(-legacy|-nft)?", program):
        return _iptables(program, args)
    if program == "nft":
        return _nft(args)
    if program == "ufw":
        return _ufw(args)
    if program == "firewall-cmd":
        return _firewall_cmd(args)
    if program in ("knock_add", "knock_helper_ipt.sh"):
        return _knock_helper(program, args)
    raise NotUnderstood(f'"{program}" is not a firewall command xknock knows '
                        "(iptables, ip6tables, nft, ufw, firewall-cmd, knock_helper_ipt.sh)")


def _is_knocker(address):
    return address in (IP_PLACEHOLDER, f"{IP_PLACEHOLDER}/32", f"{IP_PLACEHOLDER}/128")


def _port_list(text, protos):
    """"22", "22,80", "6000:6003" (a range) -> [Step] for every proto."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        low, colon, high = item.partition(":" if ":" in item else "-")
        if not low.isdigit() or (colon and not high.isdigit()):
            raise NotUnderstood(f'port "{item}" is not a number or a range')
        first, last = int(low), int(high) if colon else int(low)
        if not 1 <= first <= last <= 65535:
            raise NotUnderstood(f'port "{item}" is out of range 1-65535')
        if last - first >= layout.MAX_OPEN:
            raise NotUnderstood(f'port range "{item}" is wider than the {layout.MAX_OPEN} ports a sequence can open')
        ports.extend(range(first, last + 1))
    return [Step(proto, port) for proto in protos for port in ports]


def _take(args, index, option):
    if index + 1 >= len(args):
        raise NotUnderstood(f"{option} without a value")
    return args[index + 1]


def _iptables(program, args):
    action = chain = source = proto = target = None
    table = "filter"
    ports = None
    i = 0
    while i < len(args):
        arg = args[i]
        option, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        value = inline or None

        def val():
            return value if value is not None else _take(args, i, option)

        step = 1 if value is not None else 2
        if option in ("-A", "--append", "-I", "--insert", "-D", "--delete"):
            action = "close" if option in ("-D", "--delete") else "open"
            chain = val()
            i += step
            if option in ("-I", "--insert") and i < len(args) and args[i].isdigit():
                i += 1  # -I INPUT 1: the rule's position
            elif option in ("-D", "--delete") and i < len(args) and args[i].isdigit():
                raise NotUnderstood("deletes a rule by its number")
            continue
        if option in ("-s", "--source", "--src"):
            source = val()
        elif option in ("-p", "--protocol"):
            proto = val().lower()
        elif option in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            ports = val()
        elif option in ("-m", "--match"):
            if val() not in ("tcp", "udp", "state", "conntrack", "multiport", "comment"):
                raise NotUnderstood(f'match "-m {val()}"')
        elif option in ("--state", "--ctstate", "--comment", "-i", "--in-interface"):
            val()
        elif option in ("-j", "--jump"):
            target = val()
        elif option in ("-t", "--table"):
            table = val()
        elif option in ("-w", "--wait"):
            step = 2 if value is None and i + 1 < len(args) and args[i + 1].isdigit() else 1
        elif option == "--syn":
            step = 1
        else:
            raise NotUnderstood(f'option "{arg}"')
        i += step
    if action is None:
        raise NotUnderstood("neither adds (-A, -I) nor deletes (-D) a rule")
    if table != "filter":
        raise NotUnderstood(f"works on table {table}, not filter")
    if chain != "INPUT":
        raise NotUnderstood(f"works on chain {chain}, not INPUT")
    if target != "ACCEPT":
        raise NotUnderstood(f"jumps to {target or 'nothing'}, not ACCEPT")
    if ports is not None and proto is None:
        raise NotUnderstood("--dport without -p tcp or -p udp (iptables refuses it too)")
    return _rule(program, action, source, proto, ports)


def _rule(tool, action, source, proto, ports, timeout_s=None, protos=None):
    if source is None:
        raise NotUnderstood("has no source address: it opens to everyone, not to the knocker")
    if not _is_knocker(source):
        raise NotUnderstood(f"its source is {source}, not the knocker (%IP%)")
    if protos is None:
        if proto not in ("tcp", "udp"):
            what = f"protocol {proto}" if proto else "no protocol"
            raise NotUnderstood(f"{what}: xknock opens tcp or udp ports")
        protos = (proto,)
    if ports is None:
        raise NotUnderstood(f"opens every {'/'.join(protos)} port to the knocker; xknock opens listed ports only")
    return Rule(action, tuple(_port_list(ports, protos)), tool, timeout_s)


NFT_FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")


def _nft(args):
    words = []
    for arg in args:  # `nft "add rule ..."` and `{22,80}` alike
        words.extend(w for w in re.split(r"\s+|([{},])", arg) if w)
    while words and words[0].startswith("-"):
        words.pop(0)
    if len(words) >= 2 and words[0] in ("add", "insert") and words[1] == "element":
        raise NotUnderstood("adds the knocker to an nftables set; which ports that set opens is in your "
                            "ruleset, not in the command")
    if len(words) < 2 or words[1] != "rule" or words[0] not in ("add", "insert", "delete"):
        raise NotUnderstood("not `nft add rule`, `nft insert rule` or `nft delete rule`")
    action = "close" if words[0] == "delete" else "open"
    rest = words[2:]
    if rest and rest[0] in NFT_FAMILIES:
        rest = rest[1:]
    if len(rest) < 2:
        raise NotUnderstood("no table and chain")
    rest = rest[2:]
    source = proto = ports = verdict = None
    protos = None
    i = 0

    def value_at(j):
        """The value (a word or a {set}) at j -> (text, next index)."""
        if j >= len(rest):
            raise NotUnderstood("a match without a value")
        if rest[j] != "{":
            return rest[j], j + 1
        end = rest.index("}", j) if "}" in rest[j:] else None
        if end is None:
            raise NotUnderstood("an unclosed {")
        return ",".join(w for w in rest[j + 1:end] if w != ","), end + 1

    while i < len(rest):
        word = rest[i]
        if word in ("ip", "ip6") and i + 1 < len(rest) and rest[i + 1] == "saddr":
            source, i = value_at(i + 2)
        elif word in ("tcp", "udp", "th") and i + 1 < len(rest) and rest[i + 1] == "dport":
            if word != "th":
                proto = word
            ports, i = value_at(i + 2)
        elif word == "meta" and i + 1 < len(rest) and rest[i + 1] == "l4proto":
            value, i = value_at(i + 2)
            protos = tuple(value.split(","))
        elif word == "ct" and i + 1 < len(rest) and rest[i + 1] == "state":
            _, i = value_at(i + 2)
        elif word in ("iifname", "iif"):
            _, i = value_at(i + 1)
        elif word == "comment":
            _, i = value_at(i + 1)
        elif word in ("counter", "log"):
            i += 1
        elif word in ("accept", "drop", "reject", "jump", "goto", "queue", "continue", "return"):
            verdict = word
            i += 1
            break
        elif word == "handle" and action == "close":
            raise NotUnderstood("deletes a rule by its handle")
        else:
            raise NotUnderstood(f'expression "{word}"')
    if verdict != "accept":
        raise NotUnderstood(f"its verdict is {verdict or 'missing'}, not accept")
    if protos is not None:
        if proto is not None:
            protos = (proto,)
        if not set(protos) <= {"tcp", "udp"}:
            raise NotUnderstood(f"meta l4proto {','.join(protos)}: xknock opens tcp or udp ports")
    return _rule("nft", action, source, proto, ports, protos=protos)


def _ufw(args):
    words = [w for w in args if w not in ("--dry-run", "--force")]
    action = None
    if words[:1] == ["delete"]:
        action, words = "close", words[1:]
    elif words[:1] == ["insert"] and len(words) > 1 and words[1].isdigit():
        words = words[2:]
    elif words[:1] == ["prepend"]:
        words = words[1:]
    if not words or words[0] != "allow":
        raise NotUnderstood(f"`ufw {' '.join(words[:1])}` does not allow: only `ufw allow` opens a port")
    action = action or "open"
    words = words[1:]
    source = ports = proto = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("in",):
            i += 1
            continue
        if word == "out":
            raise NotUnderstood("allows outgoing traffic")
        if word == "app":
            raise NotUnderstood("opens an application profile; its ports are in /etc/ufw/applications.d")
        if word not in ("from", "to", "port", "proto", "on", "comment"):
            if i == 0 and source is None:
                raise NotUnderstood(f'"ufw allow {word}" opens to everyone, not to the knocker')
            raise NotUnderstood(f'word "{word}"')
        value = _take(words, i, word)
        if word == "from":
            source = value
        elif word == "port":
            ports = value
        elif word == "proto":
            proto = value.lower()
        i += 2
    # Without proto, ufw opens the port for TCP and UDP alike.
    protos = None if proto is not None else ("tcp", "udp")
    return _rule("ufw", action, source, proto, ports, protos=protos)


def _firewall_cmd(args):
    action = rich = None
    timeout_s = None
    i = 0
    while i < len(args):
        option, equals, value = args[i].partition("=")
        if option in ("--add-rich-rule", "--remove-rich-rule"):
            action = "open" if option == "--add-rich-rule" else "close"
            if not equals:
                value = _take(args, i, option)
                i += 1
            rich = value
        elif option == "--timeout":
            if not equals:
                value = _take(args, i, option)
                i += 1
            match = re.fullmatch(r"(\d+)([smh]?)", value)
            if not match:
                raise NotUnderstood(f'--timeout "{value}"')
            timeout_s = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
        elif option in ("--zone", "--permanent", "-q", "--quiet"):
            if option == "--zone" and not equals:
                i += 1
        else:
            raise NotUnderstood(f'option "{args[i]}" (only rich rules are understood)')
        i += 1
    if rich is None:
        raise NotUnderstood("adds no rich rule")
    fields = dict(re.findall(r'(\w+(?: \w+)?)="([^"]*)"', rich))
    source = fields.get("source address")
    port = fields.get("port port")
    proto = fields.get("protocol")
    if not re.search(r"\baccept\b", rich):
        raise NotUnderstood("its rich rule does not accept")
    if port is None and "port port" not in rich:
        raise NotUnderstood("its rich rule names no port")
    return _rule("firewall-cmd", action, source, proto, port.replace("-", ":") if port else None, timeout_s)


def _knock_helper(program, args):
    action = source = port = None
    proto, chain = "tcp", "INPUT"
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-a", "--append", "-i", "--insert"):
            action = "open"
        elif arg in ("-x", "--delete"):
            action = "close"
        elif arg in ("-f", "--srcaddr", "-d", "--dstport", "-p", "--proto", "-c", "--chain"):
            value = _take(args, i, arg)
            i += 1
            if arg in ("-f", "--srcaddr"):
                source = value
            elif arg in ("-d", "--dstport"):
                port = value
            elif arg in ("-p", "--proto"):
                proto = value.lower()
            else:
                chain = value
        elif arg.startswith(("-m", "--comment")) or arg in ("-v", "--verbose"):
            pass
        elif arg in ("-t", "--test"):
            raise NotUnderstood("a test run (-t) changes nothing")
        else:
            raise NotUnderstood(f'option "{arg}"')
        i += 1
    if action is None:
        raise NotUnderstood("neither appends (-a), inserts (-i) nor deletes (-x)")
    if chain != "INPUT":
        raise NotUnderstood(f"works on chain {chain}, not INPUT")
    return _rule(program, action, source, proto, port)
