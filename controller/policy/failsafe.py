"""Fail closed: when the filter cannot be loaded or attached (no kernel
headers after a kernel upgrade, a verifier that refuses the program, a
driver that refuses XDP), the guarded ports must not stand open.

The failsafe is an nftables chain on the input hook, in a table of its own
(inet xknock_failsafe), one chain per group of interfaces: new connections to
the config's guarded ports are refused as the filter would refuse them
(a RST or an ICMP port unreachable with answer = "closed", nothing with
"drop"), except from the allow-list; established sessions go on (nobody is
cut off by a failed upgrade). Knock and SPA ports need nothing: with no
filter, nothing listens there. `xknock attach` removes the chain once the
filter runs, and `xknock detach` when the operator wants the ports open.
"""

import re
import shutil
import subprocess

from ..errors import XknockError

TABLE = "xknock_failsafe"
# After conntrack (-200), so that established sessions are known as such.
PRIORITY = -150


def chain_name(ifnames):
    """An nft identifier for this group of interfaces."""
    return "input_" + "_".join(re.sub(r"[^A-Za-z0-9]", "_", name) for name in sorted(ifnames))


def _set(items):
    return "{ " + ", ".join(items) + " }"


def ruleset(ifnames, config):
    """The nft script that installs (or refreshes) the chain for ifnames."""
    chain = chain_name(ifnames)
    where = f"iifname {_set(_quoted(ifnames))}"
    lines = [
        f"add table inet {TABLE}",
        f"add chain inet {TABLE} {chain} {{ type filter hook input priority {PRIORITY}; policy accept; }}",
        f"flush chain inet {TABLE} {chain}",
        f"add rule inet {TABLE} {chain} {where} ct state established,related accept",
    ]
    v4 = [str(net) for net in config.allow if net.version == 4]
    v6 = [str(net) for net in config.allow if net.version == 6]
    if v4:
        lines.append(f"add rule inet {TABLE} {chain} {where} ip saddr {_set(v4)} accept")
    if v6:
        lines.append(f"add rule inet {TABLE} {chain} {where} ip6 saddr {_set(v6)} accept")
    for proto in ("tcp", "udp"):
        ports = sorted({step.port for step in config.guarded if step.proto == proto})
        if not ports:
            continue
        if config.answer == "drop":
            verdict = "drop"
        elif proto == "tcp":
            verdict = "reject with tcp reset"
        else:
            verdict = "reject with icmpx type port-unreachable"
        lines.append(f"add rule inet {TABLE} {chain} {where} {proto} dport {_set(map(str, ports))} {verdict}")
    return "\n".join(lines) + "\n"


def _quoted(names):
    return [f'"{name}"' for name in names]


def _nft(script=None, *args):
    nft = shutil.which("nft")
    if nft is None:
        raise XknockError("nft is not installed (Debian: nftables)")
    argv = [nft, *args] if script is None else [nft, *args, "-f", "-"]
    result = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise XknockError(f"nft: {result.stderr.strip() or 'failed'}")
    return result.stdout


def install(ifnames, config):
    """Close the guarded ports of ifnames with the failsafe chain. Raises
    XknockError when nft is missing or refuses."""
    _nft(ruleset(ifnames, config))


def installed(ifnames):
    """Does the failsafe chain of ifnames exist? (False on a host without nft.)"""
    try:
        _nft(None, "list", "chain", "inet", TABLE, chain_name(ifnames))
    except XknockError:
        return False
    return True


def remove(ifnames):
    """Remove the failsafe chain of ifnames, and the table once empty; True if
    there was one. Raises XknockError when nft refuses."""
    if not installed(ifnames):
        return False
    _nft(f"delete chain inet {TABLE} {chain_name(ifnames)}\n")
    if "chain " not in _nft(None, "list", "table", "inet", TABLE):
        _nft(f"delete table inet {TABLE}\n")
    return True
