"""xknock against nftables on the netdev ingress hook, doing the same static
job: drop everything to the guarded tcp:22, pass the rest; and the same with
an allow-list of prefixes in front (`bench/run nft`).

BPF_PROG_TEST_RUN cannot run nftables, so both are measured live: the
generator of xknock_dev.traffic pushes frames from the lab's attacker
through the bridge port's redirect (path "direct") into the server's veth,
whose receive side (its NAPI poll, in softirq) runs one of:

- floor: an XDP program returning XDP_DROP, nothing else;
- xknock: xknock's XDP program (attached by `xknock attach --once`);
- nft ingress: an XDP_PASS program (a veth accepts XDP frames only with one
  attached), the skb built from the frame, then an nftables chain on the
  netdev ingress hook of that interface with the same rules;
- no filter: XDP_PASS and no chain: the kernel stack handles every packet
  (a SYN to a closed port is answered with a RST).

One flood runs while the server's interface switches between them in turn
(A B C D A B C D ...), so every variant sees the same generator. Measured per
variant and round: frames per second delivered into the server's receive
ring and the share dropped there for a full ring (unthrottled flood), and at
a fixed rate every variant sustains, the machine's CPU time per delivered
frame (/proc/stat, busy and softirq, all CPUs), from which the floor's (same
round) is subtracted: the filter's own ns per packet, with the skb that nft
needs counted against nft.
"""

import ipaddress
import os
import socket
import tempfile
import time

from xknock.controller.config import parse_config
from xknock.controller.kernel import bpfsys, datapath
from xknock.controller.kernel.maps import FilterMaps
from xknock.controller.policy import policy
from xknock_dev.lab import in_netns, lab

from . import common, sidebyside as sb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from xknock_dev.e2e import config_text, fresh_attach, status_json, write_config

FLOODS = {
    "guarded port": ["tcp:22"],             # every frame dropped by the filter
    "unguarded ports": ["tcp:*", "udp:*"],  # every frame passed on to the stack
}
ALLOW_BASE = ipaddress.IPv4Network("10.128.0.0/9")
STEP_TIMEOUT_S = 2   # config_text's


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.rounds = 1 if quick else 4
        self.seconds = 0.5 if quick else 1.5
        self.settle = 0.2 if quick else 0.3
        self.fixed_rate = 100_000 if quick else 300_000
        self.allow_entries = 10 if quick else 10_000
        self.floods = ["guarded port"] if quick else list(FLOODS)


def allow_prefixes(count):
    """count distinct /24s inside ALLOW_BASE (none of the flood's sources can
    match them all; the flood draws from everywhere)."""
    subnets = ALLOW_BASE.subnets(new_prefix=24)
    return [str(next(subnets)) for _ in range(count)]


def xknock_config(allow=()):
    # answer = "drop": the same static job as the nftables rules (drop), not answers
    text = config_text(knock=sb.SEQUENCE, allow=allow).replace('mode = "enforce"', 'mode = "enforce"\nanswer = "drop"', 1)
    return parse_config(text, listening=set())


def nft_ruleset(iface, allow=()):
    lines = ["table netdev xkbench {"]
    if allow:
        lines += ["    set allow {", "        type ipv4_addr", "        flags interval",
                  "        elements = { " + ", ".join(allow) + " }", "    }"]
    lines += ["    chain ingress {",
              f'        type filter hook ingress device "{iface}" priority 0; policy accept;']
    if allow:
        lines.append("        ip saddr @allow accept")
    lines += [f"        tcp dport {sb.GUARDED} drop", "    }", "}", ""]
    return "\n".join(lines)


class Server:
    """The server's interface, switched between the variants."""

    def __init__(self, net, directory, allow):
        from bcc import BPF

        self.net = net
        self.allow = allow
        path = write_config(directory, "xknock.toml", config_text(knock=sb.SEQUENCE))
        fresh_attach(net, path)
        self.prog_id = status_json(net.server)[0]["interfaces"][0]["prog_id"]
        self.xknock_fd = bpfsys.prog_fd_by_id(self.prog_id)
        self.maps = FilterMaps.from_prog(self.prog_id)
        common.wait_out_knocking_words(self.xknock_fd, STEP_TIMEOUT_S)
        self.bpf = BPF(text=b"int xkb_pass(struct xdp_md *c) { return XDP_PASS; }\n"
                            b"int xkb_drop(struct xdp_md *c) { return XDP_DROP; }")
        self.pass_fd = self.bpf.load_func(b"xkb_pass", BPF.XDP).fd
        self.drop_fd = self.bpf.load_func(b"xkb_drop", BPF.XDP).fd
        with in_netns(net.server.name):
            self.ifindex = socket.if_nametoindex(net.server_iface)
        self.variants = {
            "floor (XDP_DROP)": lambda: self._xdp(self.drop_fd),
            "xknock": lambda: (self._policy(()), self._xdp(self.xknock_fd)),
            "nft ingress": lambda: (self._xdp(self.pass_fd), self._nft(())),
            "no filter (stack)": lambda: self._xdp(self.pass_fd),
            f"xknock, allow-list of {len(allow):,}": lambda: (self._policy(allow), self._xdp(self.xknock_fd)),
            f"nft ingress, allow set of {len(allow):,}": lambda: (self._xdp(self.pass_fd), self._nft(allow)),
        }
        self.current_policy = None

    def _xdp(self, fd):
        self._no_nft()
        with in_netns(self.net.server.name):
            datapath.xdp_detach(self.ifindex, "native")
            datapath.xdp_attach(self.ifindex, fd, "native")

    def _policy(self, allow):
        if self.current_policy != tuple(allow):
            policy.apply_policy(self.maps, xknock_config(allow))
            self.current_policy = tuple(allow)

    def _nft(self, allow):
        result = self.net.server.run(["nft", "-f", "/dev/stdin"], input=nft_ruleset(self.net.server_iface, allow))
        if result.returncode != 0:
            raise RuntimeError(f"nft ingress ruleset: {result.stderr.strip()}")

    def _no_nft(self):
        self.net.server.run(["nft", "delete", "table", "netdev", "xkbench"])

    def switch(self, name):
        self.variants[name]()

    def close(self):
        self._no_nft()
        self.maps.close()
        os.close(self.xknock_fd)
        self.bpf.cleanup()


def measure(net, seconds):
    t0, s0 = sb.port_tx(net, net.server), sb.proc_stat()
    started = time.monotonic()
    time.sleep(seconds)
    t1, s1 = sb.port_tx(net, net.server), sb.proc_stat()
    wall = time.monotonic() - started
    sent, dropped = t1[0] - t0[0], t1[1] - t0[1]
    softirq = (s1[2] - s0[2]) / os.sysconf("SC_CLK_TCK")
    return {"delivered_pps": sent / wall, "ring_drop_share": dropped / (sent + dropped) if sent + dropped else 0.0,
            "chain_ns": 1e9 / (sent / wall) if sent else None,
            "softirq_ns": softirq * 1e9 / sent if sent else None}


def run(quick):
    settings = Settings(quick)
    data = {"settings": vars(settings), "rows": {}, "generator": {}}
    allow = allow_prefixes(settings.allow_entries)
    with lab("xknft", ipv6=False) as net, tempfile.TemporaryDirectory(prefix="xknft-") as directory:
        server = Server(net, directory, allow)
        try:
            for flood_name in settings.floods:
                for mode, rate in (("max", None), ("fixed", settings.fixed_rate)):
                    results = {name: [] for name in server.variants}
                    with sb.flood(net, FLOODS[flood_name], rate=rate) as fl:
                        for _ in range(settings.rounds):
                            for name in server.variants:
                                server.switch(name)
                                time.sleep(settings.settle)
                                results[name].append(measure(net, settings.seconds))
                    data["generator"][f"{flood_name}, {mode}"] = fl.result()["pps"]
                    data["rows"][(flood_name, mode)] = results
                    print(f"  nft: {flood_name} {mode}: generator {fl.result()['pps']:,} pps", flush=True)
        finally:
            server.close()
    return data


# --- the report -------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return common.median(values) if values else None


def summary(data):
    """{(flood, variant): {...}}: medians over rounds; differences to the
    floor taken round by round, then their median."""
    out = {}
    for flood_name in data["settings"]["floods"]:
        top = data["rows"][(flood_name, "max")]
        fixed = data["rows"][(flood_name, "fixed")]
        floors = {"max": top["floor (XDP_DROP)"], "fixed": fixed["floor (XDP_DROP)"]}
        for name in top:
            out[(flood_name, name)] = {
                "max_pps": med([r["delivered_pps"] for r in top[name]]),
                "ring_drops": med([r["ring_drop_share"] for r in top[name]]),
                "chain_ns": med([r["chain_ns"] for r in top[name]]),
                "chain_ns_over_floor": over(top[name], floors["max"], "chain_ns"),
                "softirq_ns": med([r["softirq_ns"] for r in fixed[name]]),
                "softirq_ns_over_floor": over(fixed[name], floors["fixed"], "softirq_ns"),
                "fixed_pps": med([r["delivered_pps"] for r in fixed[name]])}
    return out


def over(rows, floor, key):
    return med([a[key] - b[key] for a, b in zip(rows, floor) if a[key] is not None and b[key] is not None])


def markdown(data):
    s = data["settings"]
    cells = summary(data)
    lines = ["## xknock and nftables (netdev ingress) on the same static job", "",
             f"Drop every frame to tcp:{sb.GUARDED}, pass the rest; then the same with an allow-list of "
             f"{s['allow_entries']:,} /24 prefixes checked first (xknock: its [allow] LPM trie; nft: an interval set, "
             "`ip saddr @allow accept`). Flood: random IPv4 sources, XDP live frames redirected into the server's "
             f"veth. Variants switched in turn under one running flood, {s['rounds']} rounds of {s['seconds']:g} s; "
             "medians.", "",
             "- 'max delivered pps': frames per second put into the server's receive ring under the unthrottled "
             "flood. The generator, the redirect and the server's NAPI run in one chain on the generator's CPU "
             "(frames are handed on inside its BPF_PROG_TEST_RUN call), so the chain is CPU-bound and 1e9 / pps is "
             "the chain's CPU ns per frame; 'filter ns' is that minus the XDP_DROP floor's, round by round.",
             f"- 'softirq ns over floor': the machine's softirq CPU (/proc/stat, tick-sampled, all CPUs) per frame "
             f"at a fixed {s['fixed_rate']:,} pps that every variant sustains, minus the floor's in the same round: "
             "an independent, noisier estimate of the same cost.",
             "- Comparable: both numbers, side by side in one run; for nft they include the skb the kernel builds "
             "before the ingress hook runs (an XDP filter never needs one) — the real price of filtering there. "
             "Not comparable: BPF_PROG_TEST_RUN ns of the data-path tables (nft cannot run there); absolute numbers "
             "(a shared 2-CPU machine). With the unguarded flood every variant but the floor hands every frame to "
             "the stack, so the stack's cost is in all of them.", ""]
    header = ["flood", "variant", "max delivered pps", "vs xknock", "ring drops at max", "chain ns/frame",
              "filter ns (over floor)", "softirq ns over floor"]
    rows = []
    for flood_name in s["floods"]:
        xk = cells[(flood_name, "xknock")]
        for name in data["rows"][(flood_name, "max")]:
            c = cells[(flood_name, name)]
            rows.append([flood_name, name, f"{c['max_pps']:,.0f}", common.ratio(c["max_pps"], xk["max_pps"]),
                         f"{c['ring_drops']:.0%}", fmt(c["chain_ns"]), fmt(c["chain_ns_over_floor"]),
                         fmt(c["softirq_ns_over_floor"])])
    lines.append(common.markdown_table(header, rows))
    lines += ["", "Generator rates (frames sent per second, averaged over the whole flood): " +
              ", ".join(f"{k}: {v:,}" for k, v in data["generator"].items())]
    return "\n".join(lines) + "\n"


def fmt(value):
    return "-" if value is None else f"{value:.0f}"
