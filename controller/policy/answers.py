"""What this host's kernel answers for a port nobody listens on, read from its
sysctls, so that the data path's answers (answer = "closed",
bpf/xknock_answer.h) carry the same TTL and hop limit and keep to the same
ICMP rate limits as the kernel's own."""

import dataclasses
import os

from ..kernel import layout
from . import protocols

PROC_SYS = "/proc/sys"
# inet_peer_xrlim_allow lets a destination save up six intervals (XRLIM_BURST_FACTOR).
PEER_BURST_FACTOR = 6
# icmpv6_xrlim_allow divides the interval by 2 ** ((128 - prefix length) >> 5)
# of the route to the destination: an on-link /64 is the common case.
IPV6_ROUTE_PREFIX = 64
ICMP_DEST_UNREACH = 3      # bit of net.ipv4.icmp_ratemask
ICMPV6_DEST_UNREACH = 1    # type in net.ipv6.icmp.ratemask


@dataclasses.dataclass(frozen=True)
class HostAnswers:
    """Linux's defaults; read_host() reads the real values."""

    ttl: int = 64                     # net.ipv4.ip_default_ttl
    hop_limit: int = 64               # net.ipv6.conf.IFACE.hop_limit
    icmp_ratelimit_ms: int = 1000     # net.ipv4.icmp_ratelimit
    icmp_ratemask: int = 0x1818       # net.ipv4.icmp_ratemask
    icmp6_ratelimit_ms: int = 1000    # net.ipv6.icmp.ratelimit
    icmp6_unreach_limited: bool = True   # net.ipv6.icmp.ratemask holds type 1
    msgs_per_sec: int = 1000          # net.ipv4.icmp_msgs_per_sec (v4 and v6 share it)
    msgs_burst: int = 50              # net.ipv4.icmp_msgs_burst
    auto_flowlabels: int = 1          # net.ipv6.auto_flowlabels: 1 and 3 label the flows the host starts
    flowlabel_state_ranges: int = 0   # net.ipv6.flowlabel_state_ranges
    # the refused protocols the kernel would answer as unknown (asked of it:
    # protocols.probe); none by default, so they stay dropped silently
    unreachable: protocols.Unreachable = protocols.Unreachable()


def read_host(ifname=None, root=PROC_SYS):
    """This network namespace's values; a missing file keeps Linux's default
    (IPv6 disabled, an older kernel). The kernel of this namespace is asked
    which protocols it answers as unknown, unless root is another tree."""
    default = HostAnswers()

    def number(path, fallback):
        try:
            with open(os.path.join(root, path)) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return fallback

    conf = ifname if ifname and os.path.exists(os.path.join(root, "net/ipv6/conf", ifname)) else "default"
    try:
        with open(os.path.join(root, "net/ipv6/icmp/ratemask")) as f:
            icmp6_unreach_limited = ICMPV6_DEST_UNREACH in parse_type_list(f.read())
    except (OSError, ValueError):
        icmp6_unreach_limited = default.icmp6_unreach_limited
    return HostAnswers(
        ttl=number("net/ipv4/ip_default_ttl", default.ttl),
        hop_limit=number(f"net/ipv6/conf/{conf}/hop_limit", default.hop_limit),
        icmp_ratelimit_ms=number("net/ipv4/icmp_ratelimit", default.icmp_ratelimit_ms),
        icmp_ratemask=number("net/ipv4/icmp_ratemask", default.icmp_ratemask),
        icmp6_ratelimit_ms=number("net/ipv6/icmp/ratelimit", default.icmp6_ratelimit_ms),
        icmp6_unreach_limited=icmp6_unreach_limited,
        msgs_per_sec=number("net/ipv4/icmp_msgs_per_sec", default.msgs_per_sec),
        msgs_burst=number("net/ipv4/icmp_msgs_burst", default.msgs_burst),
        auto_flowlabels=number("net/ipv6/auto_flowlabels", default.auto_flowlabels),
        flowlabel_state_ranges=number("net/ipv6/flowlabel_state_ranges", default.flowlabel_state_ranges),
        unreachable=protocols.probe() if root == PROC_SYS else default.unreachable,
    )


def parse_type_list(text):
    """The kernel's list format of net.ipv6.icmp.ratemask: "0-1,3-127"."""
    types = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        types.update(range(int(low), int(high or low) + 1))
    return types


def fill_settings(settings, config, host):
    """The answer fields of a bank's layout.Settings."""
    if config.answer == "closed":
        settings.flags |= layout.SET_ANSWER
        settings.flags |= unreachable_flags(host.unreachable)
    settings.ttl = min(max(host.ttl, 1), 255)
    settings.hop_limit = min(max(host.hop_limit, 1), 255)
    settings.hash_seed = int.from_bytes(os.urandom(4), "little")
    # auto_flowlabels 1 (opt-out) and 3 (forced) label the kernel's own
    # replies; 0 and 2 (opt-in) leave them unlabelled
    if host.auto_flowlabels in (1, 3):
        settings.flowlabels |= layout.FLOWLABEL_AUTO
    if host.flowlabel_state_ranges:
        settings.flowlabels |= layout.FLOWLABEL_STATELESS
    if host.icmp_ratemask & (1 << ICMP_DEST_UNREACH) and host.icmp_ratelimit_ms > 0:
        settings.icmp_peer_cost_ns = host.icmp_ratelimit_ms * 1_000_000
        settings.icmp_peer_burst_ns = settings.icmp_peer_cost_ns * PEER_BURST_FACTOR
    if host.icmp6_unreach_limited and host.icmp6_ratelimit_ms > 0:
        settings.icmp6_peer_cost_ns = (host.icmp6_ratelimit_ms * 1_000_000) >> ((128 - IPV6_ROUTE_PREFIX) >> 5)
        settings.icmp6_peer_burst_ns = settings.icmp6_peer_cost_ns * PEER_BURST_FACTOR
    if host.msgs_per_sec > 0:
        settings.icmp_host_cost_ns = 1_000_000_000 // host.msgs_per_sec
        settings.icmp_host_burst_ns = settings.icmp_host_cost_ns * max(host.msgs_burst, 1)
    else:   # no host credit ever: Linux sends no ICMP errors then
        settings.icmp_host_cost_ns = 1 << 62
        settings.icmp_host_burst_ns = 0


def unreachable_flags(unreachable):
    """Settings flags for the refused protocols the data path answers as the
    kernel would (bpf/xknock_answer.h, answer_unknown)."""
    flags = 0
    for family, protos in ((layout.SET_UNREACH4, unreachable.ipv4), (layout.SET_UNREACH6, unreachable.ipv6)):
        for proto in protos:
            flags |= family.get(proto, 0)
    if unreachable.udplite_ipv4:
        flags |= layout.SET_UDPLITE_PORTS4
    if unreachable.udplite_ipv6:
        flags |= layout.SET_UDPLITE_PORTS6
    return flags


def host_drops_unused_ports():
    """Where this host's firewall drops what nothing accepts (an input chain
    with policy drop, in nftables or iptables), a description of it; else None."""
    import json
    import shutil
    import subprocess

    if shutil.which("nft"):
        try:
            result = subprocess.run(["nft", "-j", "list", "chains"], capture_output=True, text=True, timeout=10)
            for item in json.loads(result.stdout or "{}").get("nftables", []):
                chain = item.get("chain")
                if chain and chain.get("hook") == "input" and chain.get("policy") == "drop":
                    return f"nftables chain {chain.get('family')} {chain.get('table')} {chain.get('name')}: policy drop"
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        try:
            result = subprocess.run([tool, "-S", "INPUT"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and result.stdout.startswith("-P INPUT DROP"):
            return f"{tool} INPUT policy DROP"
    return None


def attach_warnings(config, modes, drops=None):
    """What an operator should hear about answers on this host: a choice of
    answer that makes the guarded ports stand out, or an interface where
    answers would be lost. modes: interface -> "native" | "generic"."""
    warnings = []
    drops = host_drops_unused_ports() if drops is None else drops
    if config.answer == "closed" and drops:
        warnings.append(f'this host drops packets to unused ports ({drops}) while [filter] answer = "closed" '
                        "answers refused ones like closed ports: a scan tells the guarded ports apart. "
                        'Set answer = "drop"')
    elif config.answer == "drop" and not drops and config.mode == "enforce":
        warnings.append('[filter] answer = "drop" on a host whose unused ports answer (no input policy drop '
                        'found): the guarded and knock ports are the only silent ones a scan sees. '
                        'Use answer = "closed" unless a firewall drops unused ports')
    if config.answer == "closed":
        for name, mode in sorted(modes.items()):
            if mode == "native" and is_veth(name):
                warnings.append(f"{name} is a veth in native mode: unless its peer runs an XDP program, answers "
                                "(XDP_TX) are lost there and refused ports look filtered; if it does not, attach "
                                "with --xdp-mode generic")
    return warnings


def is_veth(ifname):
    """Is ifname a veth (netlink's link kind)?"""
    from pyroute2.iproute.linux import IPRoute

    try:
        with IPRoute() as ipr:
            [link] = ipr.link("get", ifname=ifname)
    except Exception:   # pyroute2 raises NetlinkError and others: then we cannot tell
        return False
    info = link.get_attr("IFLA_LINKINFO")
    return bool(info) and info.get_attr("IFLA_INFO_KIND") == "veth"
