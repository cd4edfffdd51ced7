"""xknock and knockd side by side in the namespace lab (`bench/run knockd`).

Both guard tcp:22 of the server (a TCP server listens there) behind the same
sequence, tcp:7000 udp:8000 tcp:9000, 5 s per step:

- xknock: a foreground `xknock attach` controller on the server's interface;
- knockd: Debian's knockd, a real server with a real config, sniffing the
  server's interface (pcap), whose command adds the source to an nftables set
  that an input-hook chain accepts tcp:22 from (everything else to tcp:22 is
  dropped). The flood generator's frames reach the server's interface as XDP
  frames (path "direct"), so an XDP_PASS program sits there for knockd.

Measured for each, one after the other in the same lab:
- the time from the last knock to a completed TCP handshake to tcp:22, over
  many tries, with the same plain-socket sender for both (bench.sidebyside),
  and with each one's real client (`xknock knock`, knockd's `knock`) timed from
  the command's return;
- under a flood at the generator's highest rate (random sources to random
  ports; random sources to the knock ports): the legitimate knock's success
  and time, the daemon's process CPU, the machine's busy and softirq CPU, the
  XDP program's run time (xknock), frames the server's full receive ring
  dropped, frames knockd's pcap socket dropped;
- the knock-port flood stepped up in rate until a legitimate knock fails.
"""

import contextlib
import os
import subprocess
import tempfile
import time

from xknock.controller.kernel import layout
from xknock.controller.kernel.maps import FilterMaps, live_sequences, to_addr
from xknock_dev.lab import lab, stop_process

from . import common, sidebyside as sb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from xknock_dev.e2e import XKNOCK, LineReader, TcpEchoServer, config_text, write_config, xknock

FLOODS = {
    "random ports": ["tcp:*", "udp:*"],
    "knock ports": list(sb.SEQUENCE),
}
STEP_FLOOD = "knock ports"
DELAY = 0.02           # seconds between knocks, both clients


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.tries = 3 if quick else 100
        self.real_tries = 1 if quick else 20
        self.flood_tries = 2 if quick else 20
        self.floods = ["knock ports"] if quick else list(FLOODS)
        self.step_rates = [20_000, None] if quick else [1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, None]
        self.step_tries = 1 if quick else 5
        self.warmup = 0.3 if quick else 1.5


# --- the daemons ------------------------------------------------------------------------

class Xknock:
    name = "xknock"

    def __init__(self, net, directory):
        self.net = net
        self.path = write_config(directory, "xknock.toml", config_text(knock=sb.SEQUENCE, step_timeout="5s"))

    def start(self):
        self.controller, self.prog_id, self.pid = sb.start_xknock(self.net, self.path)
        self.maps = FilterMaps.from_prog(self.prog_id)
        [seq] = live_sequences(self.maps).values()
        self.uid = seq.uid
        client = self.net.client.ipv4
        self.keys = (layout.GrantKey(src=to_addr(client), proto=layout.PROTO_TCP, port=sb.GUARDED),
                     layout.ProgressKey(src=to_addr(client), uid=seq.uid))
        return self

    def forget_client(self):
        self.maps.grants.delete(self.keys[0])
        self.maps.progress.delete(self.keys[1])
        with contextlib.suppress(AttributeError, ImportError):
            from xknock.controller.kernel import firsts

            self.maps.firsts
            firsts.forget(self.maps, self.net.client.ipv4, [self.uid])

    def reset(self):
        """No knock state from an earlier flood."""
        from .flood import FloodLab

        FloodLab.clear_progress(self)

    def judged(self):
        counters = self.maps.counters_by_reason()
        return sum(counters[r] for r in layout.Reason if r < layout.VERDICT_REASONS)

    def pcap_stats(self):
        return None

    def real_client(self, server):
        return [XKNOCK, "knock", server, *sb.SEQUENCE, "--delay", str(DELAY)]

    def stop(self):
        self.maps.close()
        self.controller.stop()
        xknock(self.net.server, "detach", self.net.server_iface)


NFT_RULES = """table inet xkbench {
    set allowed {
        type ipv4_addr
    }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport %(port)d ip saddr @allowed accept
        tcp dport %(port)d drop
    }
}
"""

KNOCKD_CONF = """[options]
    LogFile = %(log)s
    Interface = %(iface)s

[ssh]
    sequence = %(sequence)s
    seq_timeout = 5
    tcpflags = syn
    command = /usr/sbin/nft add element inet xkbench allowed { %%IP%% }
"""


class Knockd:
    name = "knockd"

    def __init__(self, net, directory):
        self.net = net
        self.directory = directory
        self.log = os.path.join(directory, "knockd.log")
        sequence = ",".join(f"{port}:{proto}" for proto, _, port in (s.partition(":") for s in sb.SEQUENCE))
        self.conf = write_config(directory, "knockd.conf", KNOCKD_CONF % {
            "log": self.log, "iface": net.server_iface, "sequence": sequence})
        self.process = None

    def start(self):
        server = self.net.server
        sb.run_in(server, ["nft", "-f", "-"], check=False)
        sb.run_in(server, ["nft", "delete", "table", "inet", "xkbench"], check=False)
        result = server.run(["nft", "-f", "/dev/stdin"], input=NFT_RULES % {"port": sb.GUARDED})
        if result.returncode != 0:
            raise RuntimeError(f"nft ruleset for knockd: {result.stderr.strip()}")
        sb.pass_xdp(self.net, server)
        self._launch()
        return self

    def _launch(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.log)
        self.process = self.net.server.popen(
            ["knockd", "-c", self.conf, "-i", self.net.server_iface, "-4", "-p", os.path.join(self.directory, "pid")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.process.pid

        def listening():
            with contextlib.suppress(FileNotFoundError), open(self.log) as f:
                return "listening on" in f.read()

        from xknock_dev.lab import wait_for

        if not wait_for(listening, 10):
            raise RuntimeError(f"knockd did not start: {LineReader(self.process.stderr).read_all(1)}")
        self.prog_id = None

    def forget_client(self):
        sb.run_in(self.net.server, ["nft", "flush", "set", "inet", "xkbench", "allowed"])

    def reset(self):
        """A fresh knockd: no attempts left from an earlier flood."""
        stop_process(self.process)
        self._launch()

    def judged(self):
        return None

    def pcap_stats(self):
        return sb.packet_socket_stats(self.net.server.name, self.pid)

    def real_client(self, server):
        return ["knock", "-d", str(int(DELAY * 1000)), server,
                *(f"{port}:{proto}" for proto, _, port in (s.partition(":") for s in sb.SEQUENCE))]

    def stop(self):
        if self.process:
            stop_process(self.process)
        sb.run_in(self.net.server, ["nft", "delete", "table", "inet", "xkbench"], check=False)
        sb.no_xdp(self.net.server)


DAEMONS = (Xknock, Knockd)


# --- measuring -------------------------------------------------------------------------------

def tries(client, daemon, count, command=None, stop_at_failure=False):
    results = []
    for _ in range(count):
        daemon.forget_client()
        results.append(client.try_once(sb.SEQUENCE, DELAY, command=command))
        if stop_at_failure and not results[-1]["ok"]:
            break
    daemon.forget_client()
    return results


def under_flood(net, client, daemon, ports, count, rate, warmup, stop_at_failure=False):
    """Tries of the legitimate knock while a flood runs; one row of measurements."""
    daemon.reset()
    with sb.flood(net, ports, rate=rate) as fl:
        time.sleep(warmup)
        daemon.pcap_stats()   # reads and resets its counters
        tx0, judged0 = sb.port_tx(net, net.server), daemon.judged()
        with sb.Meter(daemon.pid, daemon.prog_id) as meter:
            results = tries(client, daemon, count, stop_at_failure=stop_at_failure)
        tx1, pcap, judged1 = sb.port_tx(net, net.server), daemon.pcap_stats(), daemon.judged()
    cpu = meter.result()
    sent, ring = tx1[0] - tx0[0], tx1[1] - tx0[1]
    row = {**sb.summarize(results), **cpu, "flood_pps": fl.result()["pps"], "rate": rate,
           "delivered_pps": sent / cpu["wall_s"], "ring_drop_share": ring / (sent + ring) if sent + ring else 0.0,
           "pcap_packets": pcap and pcap[0], "pcap_drops": pcap and pcap[1],
           "judged": None if judged0 is None else judged1 - judged0}
    return row


def run(quick):
    settings = Settings(quick)
    data = {"settings": vars(settings), "daemons": {}}
    with lab("xkbp", ipv6=False) as net, tempfile.TemporaryDirectory(prefix="xkbp-") as directory:
        os.chmod(directory, 0o755)
        server = TcpEchoServer(net.server, sb.GUARDED)
        client = sb.Client(net)
        try:
            for make in DAEMONS:
                daemon = make(net, directory).start()
                try:
                    tries(client, daemon, 1)   # unmeasured: the daemon's first packet, page faults and all
                    out = data["daemons"][daemon.name] = {}
                    print(f"  {daemon.name}: latency", flush=True)
                    out["plain"] = sb.summarize(tries(client, daemon, settings.tries))
                    out["real"] = sb.summarize(tries(client, daemon, settings.real_tries,
                                                     command=daemon.real_client(net.server.ipv4)))
                    out["floods"] = {}
                    for name in settings.floods:
                        row = under_flood(net, client, daemon, FLOODS[name], settings.flood_tries, None,
                                          settings.warmup)
                        out["floods"][name] = row
                        print(f"  {daemon.name}: {name} flood {row['flood_pps']:,} pps: {row['ok']}/{row['tries']} ok",
                              flush=True)
                    out["steps"] = []
                    for rate in settings.step_rates:
                        row = under_flood(net, client, daemon, FLOODS[STEP_FLOOD], settings.step_tries, rate,
                                          settings.warmup, stop_at_failure=True)
                        out["steps"].append(row)
                        print(f"  {daemon.name}: step {rate or 'max'}: {row['flood_pps']:,} pps, "
                              f"{row['ok']}/{row['tries']} ok", flush=True)
                        if row["ok"] < row["tries"]:
                            break
                finally:
                    daemon.stop()
        finally:
            client.close()
            server.stop()
    return data


# --- the report -----------------------------------------------------------------------------

def ms(value):
    return "-" if value is None else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def rate_label(rate):
    return "max" if rate is None else f"{rate:,}"


def sustained(steps):
    """The highest flood rate (pps achieved) under which every try succeeded, and whether it was the maximum."""
    best = None
    for row in steps:
        if row["ok"] < row["tries"]:
            break
        best = row
    return best


def markdown(data):
    d = data["daemons"]
    x, k = d.get("xknock"), d.get("knockd")
    lines = ["## xknock and knockd side by side", "",
             f"The same sequence ({', '.join(sb.SEQUENCE)}, 5 s per step) guarding tcp:22 in the namespace lab; "
             "knockd sniffs the server's interface and adds the source to an nftables set an input chain "
             "accepts from. Latency: from the last knock to the first completed TCP handshake to tcp:22 "
             f"(a fresh SYN every 2 ms, deadline {sb.DEADLINE:g} s); knocks {DELAY * 1000:.0f} ms apart. The plain "
             "sender is the fair comparison: a real client's own waits after its last knock (`xknock knock` holds a "
             "TCP knock's socket 10 ms; `knock -d` sleeps its delay after every knock) pass before its clock starts.",
             ""]
    rows = []
    for label, key, how in (("plain sender", "plain", "the same plain-socket sender for both, timed from its last send"),
                            ("real client", "real", "`xknock knock` / knockd's `knock`, timed from the command's return")):
        xs, ks = x[key], k[key]
        rows.append([label, f"{xs['ok']}/{xs['tries']}", ms(xs["median_ms"]), ms(xs["p99_ms"]),
                     f"{ks['ok']}/{ks['tries']}", ms(ks["median_ms"]), ms(ks["p99_ms"]),
                     common.ratio(ks["median_ms"], xs["median_ms"]) if xs["median_ms"] and ks["median_ms"] else "-", how])
    lines.append(common.markdown_table(["client", "xknock ok", "xknock median ms", "xknock p99 ms", "knockd ok",
                                        "knockd median ms", "knockd p99 ms", "knockd / xknock (median)", "how"], rows))
    lines += ["", "### Under a flood at the generator's highest rate", "",
              "Random IPv4 sources (the lab's /24 excluded). 'delivered': frames the server's bridge port put into "
              "its receive ring per second; 'ring drops': frames dropped because that ring was full. Daemon CPU: "
              "utime+stime (+ waited children) of the daemon's process from /proc/PID/stat; machine busy/softirq: "
              "/proc/stat over all CPUs (tick-sampled; it includes the generator and the lab's bridge, the same "
              "for both); XDP: xknock's program run time from the kernel's bpf stats (knockd has no XDP filter, "
              "its packet work is in the softirq and its pcap socket). CPU in seconds per second of flood. Where "
              "'ring drops' is above zero, frames, the legitimate knocks among them, are lost before any filter "
              "sees them: the flood outruns the CPU that empties the server's receive ring.", ""]
    rows = []
    for name in data["settings"]["floods"]:
        for label, dd in (("xknock", x), ("knockd", k)):
            r = dd["floods"][name]
            wall = r["wall_s"]
            rows.append([name, label, f"{r['flood_pps']:,}", f"{r['delivered_pps']:,.0f}", f"{r['ring_drop_share']:.0%}",
                         f"{r['ok']}/{r['tries']}", ms(r["median_ms"]), ms(r["p99_ms"]),
                         f"{r.get('daemon_cpu_s', 0) / wall:.3f}",
                         f"{r['xdp_cpu_s'] / wall:.3f}" if "xdp_cpu_s" in r else "-",
                         f"{r['busy_cpu_s'] / wall:.2f}", f"{r['softirq_cpu_s'] / wall:.2f}",
                         "-" if r["pcap_drops"] is None else f"{r['pcap_drops']:,} of {r['pcap_packets']:,}"])
    lines.append(common.markdown_table(["flood", "daemon", "flood pps", "delivered pps", "ring drops", "success",
                                        "median ms", "p99 ms", "daemon CPU", "XDP CPU", "machine busy CPU",
                                        "softirq CPU", "pcap drops (of frames it captured)"], rows))
    lines += ["", f"### Highest junk rate sustained ({STEP_FLOOD} flood, stepped)", "",
              f"The flood is throttled to each rate in turn ({data['settings']['step_tries']} tries each, stopping at "
              "the first failure), then unthrottled ('max'); 'sustained' is the highest step at which every try "
              "succeeded.", ""]
    rows = []
    for label, dd in (("xknock", x), ("knockd", k)):
        best = sustained(dd["steps"])
        steps = ", ".join(f"{rate_label(r['rate'])}: {r['ok']}/{r['tries']}" for r in dd["steps"])
        rows.append([label, "-" if best is None else f"{best['flood_pps']:,} pps" + (" (max)" if best["rate"] is None else ""),
                     steps])
    lines.append(common.markdown_table(["daemon", "sustained", "steps (target pps: ok/tries)"], rows))
    return "\n".join(lines) + "\n"
