"""IPsec on the host: the attach warning for [filter] ipsec.

XDP runs before the kernel decrypts ESP (and ESP in UDP, NAT-T), so it never
sees the ports inside. With ipsec = "drop" (the default) a host that runs
IPsec loses its tunnels for every peer not on the allow-list; with "pass" the
decrypted traffic is not guarded by xknock at all. Either way the operator
should hear it (docs/datapath.md, "IPsec and other transports")."""

import shutil
import subprocess


def host_xfrm_states():
    """How many IPsec states (`ip xfrm state`) this network namespace holds;
    0 when there are none or `ip` cannot tell."""
    if not shutil.which("ip"):
        return 0
    try:
        result = subprocess.run(["ip", "-o", "xfrm", "state", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    if result.returncode != 0:
        return 0
    return sum(1 for line in result.stdout.splitlines() if line.startswith("src "))


def ipsec_warnings(config, states=None):
    """What an operator running IPsec on this host must know. states: the
    number of xfrm states (default: read from the host)."""
    states = host_xfrm_states() if states is None else states
    if not states or not config.guards_ports():
        return []
    if config.ipsec == "drop":
        return [f"this host has {states} IPsec state(s) (ip xfrm state) while [filter] ipsec = \"drop\": "
                "ESP, AH and udp:4500 from peers not on the allow-list are dropped. Put the peers on the "
                "allow-list, or set ipsec = \"pass\" and guard the decrypted traffic with nftables"]
    return [f"this host has {states} IPsec state(s) and [filter] ipsec = \"pass\": xknock cannot see inside "
            "ESP, so what the peers send through it is not guarded; guard it with nftables"]
