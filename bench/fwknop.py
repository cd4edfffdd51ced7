"""Single packet authorization side by side: fwknopd (Debian's fwknop-server)
and, once it exists, xknock's own SPA (`bench/run fwknop`).

fwknopd runs in the lab's server namespace, sniffing the server's interface
(pcap, udp port 62201) with Rijndael + HMAC-SHA256 keys in its access.conf;
its firewall is Debian's default, iptables (here iptables-nft): it puts its
FWKNOP_INPUT chain first in INPUT, in front of a rule dropping tcp:22. The
client is the real `fwknop -A tcp/22 -a <client ip> --use-hmac
--key-base64-rijndael ... --key-base64-hmac ...`, timed from its return to
the first completed handshake to tcp:22 (bench.sidebyside). Then the same
under floods of garbage UDP datagrams to the SPA port from random sources.

xknock's column: the same client and keys against xknock's [spa] (XknockSpa);
xknock also logs, per accepted packet, the time from its arrival in XDP to its
grants being in the map, reported as "arrival to grant".
"""

import base64
import os
import subprocess
import tempfile
import time

from xknock_dev.lab import lab, stop_process, wait_for

from . import common, sidebyside as sb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from xknock_dev.e2e import XKNOCK, LineReader, TcpEchoServer, xknock

SPA_PORT = 62201


class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.tries = 3 if quick else 50
        self.flood_tries = 2 if quick else 10
        # Stepped up, stopping after the first rate at which a try failed; the
        # unthrottled flood is always measured.
        self.flood_rates = [None] if quick else [1_000, 3_000, 10_000, 30_000, 100_000, None]
        self.warmup = 0.3 if quick else 1.0


def new_keys():
    """(Rijndael key, HMAC key), base64, as `fwknop --key-gen` makes them."""
    return base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode()


FWKNOPD_CONF = """PCAP_INTF                   %(iface)s;
PCAP_FILTER                 udp port %(port)d;
ENABLE_IPT_FORWARDING       N;
FLUSH_IPT_AT_INIT           Y;
FLUSH_IPT_AT_EXIT           Y;
ENABLE_DIGEST_PERSISTENCE   N;
"""

ACCESS_CONF = """SOURCE              ANY
OPEN_PORTS          tcp/%(guarded)d
KEY_BASE64          %(key)s
HMAC_KEY_BASE64     %(hmac)s
FW_ACCESS_TIMEOUT   30
"""


class Fwknopd:
    name = "fwknopd"

    def __init__(self, net, directory, keys):
        self.net, self.directory, self.keys = net, directory, keys
        self.conf = os.path.join(directory, "fwknopd.conf")
        self.access = os.path.join(directory, "access.conf")
        with open(self.conf, "w") as f:
            f.write(FWKNOPD_CONF % {"iface": net.server_iface, "port": SPA_PORT})
        with open(self.access, "w") as f:
            f.write(ACCESS_CONF % {"guarded": sb.GUARDED, "key": keys[0], "hmac": keys[1]})
        os.chmod(self.access, 0o600)
        self.home = os.path.join(directory, "home")
        os.makedirs(self.home, exist_ok=True)
        self.process = None
        self.prog_id = None

    def start(self):
        server = self.net.server
        sb.run_in(server, ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(sb.GUARDED), "-j", "DROP"])
        sb.pass_xdp(self.net, server)
        self._launch()
        return self

    def _launch(self):
        run_dir = os.path.join(self.directory, "run")
        os.makedirs(run_dir, exist_ok=True)
        self.process = self.net.server.popen(
            ["fwknopd", "-f", "-c", self.conf, "-a", self.access, "-i", self.net.server_iface,
             "-d", os.path.join(self.directory, "digest.cache"), "-p", os.path.join(run_dir, "fwknopd.pid"),
             "-r", run_dir], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.log = LineReader(self.process.stdout)
        # Ready once its chain is in INPUT and its pcap socket is open.
        if not wait_for(lambda: self._chain_ready() and sb.packet_socket_stats(self.net.server.name, self.pid), 15):
            raise RuntimeError(f"fwknopd did not start: {self.log.read_all(1)}")

    def _chain_ready(self):
        result = self.net.server.run(["iptables", "-S", "INPUT"])
        return "FWKNOP_INPUT" in result.stdout

    def forget_client(self):
        sb.run_in(self.net.server, ["iptables", "-F", "FWKNOP_INPUT"])

    def reset(self):
        pass

    def pcap_stats(self):
        return sb.packet_socket_stats(self.net.server.name, self.pid)

    def judged(self):
        return None

    def client_command(self, server, client):
        return ["fwknop", "-A", f"tcp/{sb.GUARDED}", "-a", client, "-D", server, "--use-hmac",
                "--key-base64-rijndael", self.keys[0], "--key-base64-hmac", self.keys[1], "--no-save-args",
                "--no-rc-file"]

    def client_env(self):
        return {"HOME": self.home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def stop(self):
        if self.process:
            stop_process(self.process)
        sb.run_in(self.net.server, ["iptables", "-F", "INPUT"], check=False)
        sb.no_xdp(self.net.server)


class Unavailable(Exception):
    pass


class XknockSpa:
    """xknock's SPA with the same real fwknop client and keys: a foreground
    controller with an [spa] stanza; its log says, per accepted packet, the
    time from the packet's arrival in XDP to its grants being in the map."""

    name = "xknock"

    def __init__(self, net, directory, keys):
        result = subprocess.run([XKNOCK, "spa", "--help"], capture_output=True, text=True)
        if result.returncode != 0:
            raise Unavailable("not available: this xknock has no `spa` command")
        self.net, self.keys = net, keys
        self.path = os.path.join(directory, "xknock-spa.toml")
        with open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(XKNOCK_SPA_CONF % {"port": SPA_PORT, "cache": os.path.join(directory, "xknock-replay"),
                                       "key": keys[0], "hmac": keys[1], "guarded": sb.GUARDED})
        self.home = os.path.join(directory, "home")
        os.makedirs(self.home, exist_ok=True)
        self.latencies_ms = []

    def start(self):
        self.controller, self.prog_id, self.pid = sb.start_xknock(self.net, self.path)
        return self

    def forget_client(self):
        xknock(self.net.server, "revoke", self.net.server_iface, self.net.client.ipv4)
        self.collect()

    def collect(self):
        """Arrival-to-grant latencies the controller logged since the last call."""
        for line in self.controller.log.read_all(0.05).splitlines():
            if "spa_accepted" in line and "latency_ms=" in line:
                self.latencies_ms.append(float(line.split("latency_ms=")[1].split()[0]))

    def take_latencies(self):
        self.collect()
        taken, self.latencies_ms = self.latencies_ms, []
        return taken

    def reset(self):
        pass

    def pcap_stats(self):
        return None

    def judged(self):
        return None

    def client_command(self, server, client):
        return Fwknopd.client_command(self, server, client)

    def client_env(self):
        return {"HOME": self.home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def stop(self):
        self.controller.stop()
        xknock(self.net.server, "detach", self.net.server_iface)


XKNOCK_SPA_CONF = """[spa]
port = %(port)d
replay_cache = "%(cache)s"

[[spa.user]]
name = "bench"
key = "%(key)s"
hmac_key = "%(hmac)s"
open = ["tcp:%(guarded)d"]
open_for = "30s"
"""


def xknock_spa(net, directory, keys):
    """An XknockSpa, or the reason there is none."""
    try:
        return XknockSpa(net, directory, keys), None
    except Unavailable as err:
        return None, str(err)


# --- measuring ---------------------------------------------------------------------------

def tries(client, daemon, net, count, stop_at_failure=False):
    command = daemon.client_command(net.server.ipv4, net.client.ipv4)
    results = []
    for _ in range(count):
        daemon.forget_client()
        results.append(client.try_once(command=command, env=daemon.client_env()))
        if stop_at_failure and not results[-1]["ok"]:
            break
    daemon.forget_client()
    return results


def under_flood(net, client, daemon, count, rate, warmup, stop_at_failure=False):
    daemon.reset()
    with sb.flood(net, [f"udp:{SPA_PORT}"], rate=rate) as fl:
        time.sleep(warmup)
        daemon.pcap_stats()   # reads and resets
        tx0 = sb.port_tx(net, net.server)
        with sb.Meter(daemon.pid, daemon.prog_id) as meter:
            results = tries(client, daemon, net, count, stop_at_failure)
        tx1, pcap = sb.port_tx(net, net.server), daemon.pcap_stats()
    cpu = meter.result()
    sent, ring = tx1[0] - tx0[0], tx1[1] - tx0[1]
    return {**sb.summarize(results), **cpu, "rate": rate, "flood_pps": fl.result()["pps"],
            "delivered_pps": sent / cpu["wall_s"], "ring_drop_share": ring / (sent + ring) if sent + ring else 0.0,
            "pcap_packets": pcap and pcap[0], "pcap_drops": pcap and pcap[1]}


def run(quick):
    settings = Settings(quick)
    data = {"settings": vars(settings), "daemons": {}, "unavailable": {}}
    data["verifications_per_s"] = verifications(0.5 if quick else 3.0)
    data["candidate_costs"] = candidate_costs(0.5 if quick else 3.0)
    keys = new_keys()
    with lab("xkspa", ipv6=False) as net, tempfile.TemporaryDirectory(prefix="xkspa-") as directory:
        os.chmod(directory, 0o755)
        server = TcpEchoServer(net.server, sb.GUARDED)
        client = sb.Client(net)
        try:
            xk, reason = xknock_spa(net, directory, keys)
            if reason:
                data["unavailable"]["xknock"] = reason
            for daemon in [d for d in (xk, Fwknopd(net, directory, keys)) if d is not None]:
                daemon.start()
                try:
                    tries(client, daemon, net, 1)   # unmeasured: the daemon's first packet
                    out = data["daemons"][daemon.name] = {}
                    _grant_latency(daemon, None)   # drop the unmeasured try's
                    out["quiet"] = sb.summarize(tries(client, daemon, net, settings.tries))
                    _grant_latency(daemon, out["quiet"])
                    out["floods"] = []
                    failed = False
                    for rate in settings.flood_rates:
                        if failed and rate is not None:
                            continue
                        row = under_flood(net, client, daemon, settings.flood_tries, rate, settings.warmup,
                                          stop_at_failure=rate is not None)
                        _grant_latency(daemon, row)
                        out["floods"].append(row)
                        failed = failed or row["ok"] < row["tries"]
                        print(f"  {daemon.name}: garbage at {rate or 'max'}: {row['flood_pps']:,} pps, "
                              f"{row['ok']}/{row['tries']} ok", flush=True)
                finally:
                    daemon.stop()
        finally:
            client.close()
            server.stop()
    return data


def _grant_latency(daemon, row):
    """Adds xknock's arrival-to-grant latencies (ms) of the tries just made to row."""
    if not hasattr(daemon, "take_latencies"):
        return
    taken = sorted(daemon.take_latencies())
    if row is not None:
        row["grant_median_ms"], row["grant_p99_ms"] = sb.percentile(taken, 50), sb.percentile(taken, 99)


def verifications(seconds):
    """The controller's SPA verifier alone, in this process: verdicts a second
    for junk (refused at the HMAC) and for authentic packets (decrypted,
    recorded in the replay cache with an fsync, judged; no map write)."""
    import ipaddress

    from xknock.controller.spa.spa import SpaVerifier
    from xknock.controller.spa.spa_replay import ReplayCache
    from xknock.controller.wire import spa_message

    key, hmac_key = os.urandom(32), os.urandom(64)
    spa = _spa_with_users(1, key, hmac_key)
    source = ipaddress.ip_address("10.77.0.2")
    out = {}
    with tempfile.TemporaryDirectory(prefix="xkspa-verify-") as directory:
        with ReplayCache(os.path.join(directory, "replay")) as cache:
            verifier = SpaVerifier(spa, cache)
            junk = _junk()
            good = [spa_message.encode(key=key, hmac_key=hmac_key, access_address=str(source),
                                       ports=[("tcp", sb.GUARDED)], username="bench") for _ in range(2000)]
            for name, payloads in (("junk", junk), ("authentic", good)):
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds and (name == "junk" or count < len(payloads)):
                    verifier.verify(payloads[count % len(payloads)], source)
                    count += 1
                out[name] = count / (time.perf_counter() - started)
    return out


STANZA_COUNTS = (1, 4, 16, 64)


def candidate_costs(seconds):
    """{stanzas: microseconds} the verifier spends on one SPA-shaped junk
    candidate when that many stanzas admit its sender (one HMAC each), and the
    line through them: (base µs, µs per stanza). What
    config/spa_config.py's default total_rate is derived from."""
    import ipaddress

    from xknock.controller.spa.spa import SpaVerifier
    from xknock.controller.spa.spa_replay import ReplayCache

    source = ipaddress.ip_address("10.77.0.2")
    costs = {}
    with tempfile.TemporaryDirectory(prefix="xkspa-cost-") as directory:
        with ReplayCache(os.path.join(directory, "replay")) as cache:
            junk = _junk()
            for stanzas in STANZA_COUNTS:
                verifier = SpaVerifier(_spa_with_users(stanzas, os.urandom(32), os.urandom(64)), cache)
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    verifier.verify(junk[count % len(junk)], source)
                    count += 1
                costs[stanzas] = (time.perf_counter() - started) / count * 1e6
    few, many = STANZA_COUNTS[0], STANZA_COUNTS[-1]
    per_stanza = (costs[many] - costs[few]) / (many - few)
    return {"us_by_stanzas": costs, "base_us": costs[few] - few * per_stanza, "per_stanza_us": per_stanza}


def _junk():
    """SPA-shaped junk: base64 of fwknop's size, past the kernel's test."""
    return [base64.b64encode(os.urandom(180)).rstrip(b"=") for _ in range(1000)]


def _spa_with_users(count, key, hmac_key):
    from xknock.controller.config import parse_config

    text = XKNOCK_SPA_CONF % {"port": SPA_PORT, "cache": "/unused", "key": base64.b64encode(key).decode(),
                              "hmac": base64.b64encode(hmac_key).decode(), "guarded": sb.GUARDED}
    for n in range(1, count):   # more stanzas admitting every source, with keys of their own
        text += (f'\n[[spa.user]]\nname = "other{n}"\nkey = "{base64.b64encode(os.urandom(32)).decode()}"\n'
                 f'hmac_key = "{base64.b64encode(os.urandom(64)).decode()}"\nopen = ["tcp:{sb.GUARDED}"]\n')
    return parse_config(text, listening=set()).spa


def cost_markdown(costs):
    from xknock.controller.config import spa_config

    rows = [[str(n), f"{us:.1f}", f"{1e6 / us:,.0f}", f"{spa_config.default_total_rate(n):,}"]
            for n, us in costs["us_by_stanzas"].items()]
    return "\n".join([
        "## SPA: the controller's cost per candidate", "",
        "SPA-shaped junk judged by the verifier in process, one core: each stanza that admits the sender costs "
        "one HMAC.", "",
        common.markdown_table(["stanzas admitting the sender", "µs per candidate", "candidates/s",
                               "default total_rate"], rows), "",
        f"Fit: {costs['base_us']:.1f} µs + {costs['per_stanza_us']:.1f} µs per stanza (config/spa_config.py: "
        f"{spa_config.CANDIDATE_BASE_NS / 1000:g} µs + {spa_config.CANDIDATE_HMAC_NS / 1000:g} µs, "
        f"the default total_rate keeps the verifier to {spa_config.VERIFIER_SHARE:.0%} of a core).", ""])


# --- the report ------------------------------------------------------------------------------

def grant(row):
    if row.get("grant_median_ms") is None:
        return "-"
    return f"{ms(row['grant_median_ms'])} / {ms(row['grant_p99_ms'])}"


def ms(value):
    return "-" if value is None else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def markdown(data):
    lines = ["## SPA: fwknopd and xknock side by side", "",
             "The real `fwknop` client (Rijndael + HMAC-SHA256, `-A tcp/22 -a <client>`), timed from its return to "
             f"the first completed handshake to tcp:22 (a fresh SYN every 2 ms, deadline {sb.DEADLINE:g} s). "
             "fwknopd sniffs the server's interface and opens with iptables (iptables-nft). Floods: garbage UDP "
             f"datagrams (12 bytes) to udp:{SPA_PORT} from random sources, stepped up in rate (a rate's tries stop at "
             "the first failure, and no higher rate is tried after it), then unthrottled; 'pcap drops': frames "
             "fwknopd's capture socket dropped (PACKET_STATISTICS), of those it was offered. CPU in seconds per "
             "second.", ""]
    for name, reason in data["unavailable"].items():
        lines += [f"- {name}: {reason}", ""]
    header = ["daemon", "flood", "flood pps", "success", "median ms", "p99 ms", "arrival to grant ms (median/p99)",
              "daemon CPU", "machine busy CPU", "ring drops", "pcap drops"]
    rows = []
    for name, d in data["daemons"].items():
        q = d["quiet"]
        rows.append([name, "none", "-", f"{q['ok']}/{q['tries']}", ms(q["median_ms"]), ms(q["p99_ms"]), grant(q),
                     "-", "-", "-", "-"])
        for r in d["floods"]:
            wall = r["wall_s"]
            rows.append([name, "garbage UDP " + ("max" if r["rate"] is None else f"at {r['rate']:,}"),
                         f"{r['flood_pps']:,}", f"{r['ok']}/{r['tries']}", ms(r["median_ms"]), ms(r["p99_ms"]),
                         grant(r), f"{r.get('daemon_cpu_s', 0) / wall:.3f}", f"{r['busy_cpu_s'] / wall:.2f}",
                         f"{r['ring_drop_share']:.0%}",
                         "-" if r["pcap_drops"] is None else f"{r['pcap_drops']:,} of {r['pcap_packets']:,}"])
    for name in data["unavailable"]:
        rows.append([name, "-", "-", "not available", "-", "-", "-", "-", "-", "-", "-"])
    lines.append(common.markdown_table(header, rows))
    v = data.get("verifications_per_s")
    if v:
        lines += ["", f"xknock's verifier alone (one core, in process): {v['junk']:,.0f} junk packets a second refused "
                      f"at the HMAC, {v['authentic']:,.0f} authentic packets a second accepted (each digest fsync'd to "
                      "the replay cache). 'Arrival to grant' is what xknock's controller logs per accepted packet: "
                      "from the packet's arrival in XDP to its grants being in the map. fwknopd logs nothing "
                      "comparable; its packet-to-connection time includes its iptables command."]
    if data.get("candidate_costs"):
        lines += ["", cost_markdown(data["candidate_costs"])]
    return "\n".join(lines) + "\n"
