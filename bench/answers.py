"""What answering refused packets costs and how it looks from outside
(`bench/run answers [--quick]`; also part of `bench/run report`).

With answer = "closed" (the default) a refused SYN to a guarded port gets a
RST and a refused UDP datagram an ICMP port unreachable, forged in XDP
(XDP_TX, bpf/xknock_answer.h); knock ports nobody listens on are passed to
the host after the knock is recorded, so that the host's stack answers them.
Three measurements, each side by side in one run:

1. Per packet, BPF_PROG_TEST_RUN on the real program: the same frames through
   two builds of it, one with answer = "closed" and one with answer = "drop",
   and through an empty XDP_DROP program (the floor). An answer rewrites the
   frame in place and BPF_PROG_TEST_RUN's repeat runs the program again on
   its own output, so every measurement is one run on a fresh copy of the
   frame (repeat=1): its duration includes the fixed cost of one test run,
   which the floor, timed the same way, shows. The three programs take turns
   run by run (A B C A B C ...); the table gives the median of the medians of
   `rounds` rounds. No frame is sent anywhere: XDP_TX is only the verdict.
2. In the lab (controller/lab.py), a SYN flood from random sources to the
   server's tcp:22 with the live-frames generator (controller/traffic.py),
   while the server's interface switches between xknock (answer = "closed"),
   xknock (answer = "drop"), the kernel stack (port 22 is then an unused
   port: the kernel's own RST path) and an XDP_DROP program (the floor), in
   turn under one running flood; unthrottled and at a fixed rate. Two ways
   in: path "bridge" (the frames cross the switch's bridge as packets; the
   kernel variant has nothing attached) and path "direct" (the switch hands
   them to the server's veth as XDP frames, as a NIC would; the kernel
   variant is an XDP_PASS program, the kernel then builds the packet).
   Answers are counted at the attacker by a packet socket whose classic BPF
   filter takes only RSTs from the server (its kernel counts them,
   PACKET_STATISTICS; nothing is read in user space). The
   server's namespace routes the flood's sources back to the attacker, so
   that the kernel's RSTs reach it as xknock's do.
3. The timing tell: the attacker sends single SYNs (and UDP datagrams) from a
   packet socket to an unused port, a guarded port and a knock port of the
   server with xknock attached, in random order, one at a time, a fixed pause
   before each; a second packet socket timestamps the outgoing probe and the
   answer in the kernel (SO_TIMESTAMPNS, both at the attacker's interface).
"""

import contextlib
import ctypes
import ipaddress
import math
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

from xknock.controller.config import parse_config
from xknock.controller.kernel import bpfsys, datapath
from xknock.controller.kernel.maps import FilterMaps
from xknock.controller.policy import policy
from xknock_dev import traffic
from xknock_dev.e2e import fresh_attach, status_json, write_config, xknock
from xknock_dev.lab import lab
from xknock_dev.packets import tcp, udp
from xknock_dev.testrun import VERDICT_NAMES, XDP_DROP, XDP_PASS, XDP_TX, Harness

from . import common, sidebyside as sb
from .datapath import load_floor
from .nftingress import in_netns

GUARDED_TCP, GUARDED_UDP = 22, 5000
KNOCK_TCP, KNOCK_UDP = 7000, 8000
UNUSED_TCP, UNUSED_UDP = 80, 4999
CONFIG = """
[filter]
mode = "enforce"
answer = "{answer}"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:22", "udp:5000"]
open_for = "30s"
idle_timeout = "1m"
"""
STRANGER4, STRANGER6 = "198.51.100.7", "2001:db8:77::7"
FLOOD_SOURCES = "10.200.0.0/16"


class Settings:
    def __init__(self, quick):
        self.quick = quick
        # 1. BPF_PROG_TEST_RUN
        self.rounds = 3 if quick else 7
        self.runs = 50 if quick else 1500       # single runs per program per round
        # 2. the flood
        self.flood_rounds = 1 if quick else 3
        self.flood_seconds = 0.5 if quick else 1.5
        self.settle = 0.2 if quick else 0.3
        self.fixed_rate = 20_000 if quick else 50_000
        self.flood_paths = ["bridge"] if quick else ["bridge", "direct"]
        # 3. the timing tell
        self.samples = 20 if quick else 400      # per target
        self.warmup = 3 if quick else 10         # rounds not counted
        self.gap = 0.002                         # pause before every probe
        self.families = ["ipv4"] if quick else ["ipv4", "ipv6"]


def config(answer):
    return parse_config(CONFIG.format(answer=answer), listening=set())


def pct(values, p):
    """The p-th percentile (0-100) by linear interpolation."""
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (k - low)


# --- 1. per packet, BPF_PROG_TEST_RUN --------------------------------------------------

def open_icmp_budget(h):
    """Credit without end in both ICMP buckets of the live bank (the test
    clock stands still, so nothing refills): every run takes the answered
    path, the host's and the peer's buckets checked and spent as always."""
    key = ctypes.c_uint32(h.maps.active_bank())
    s = h.maps.settings.lookup(key)
    saved = type(s).from_buffer_copy(s)
    for name in ("icmp_peer", "icmp6_peer", "icmp_host"):
        setattr(s, f"{name}_cost_ns", 1)
        setattr(s, f"{name}_burst_ns", 10**15)
    h.maps.settings.update(key, s)
    return saved


def restore_settings(h, saved):
    h.maps.settings.update(ctypes.c_uint32(h.maps.active_bank()), saved)


def describe(frame):
    """What an answer frame is, checked by parsing it."""
    from scapy.layers.inet import ICMP, TCP
    from scapy.layers.inet6 import ICMPv6DestUnreach
    from scapy.layers.l2 import Ether

    p = Ether(frame)
    if TCP in p:
        return f"TCP {p[TCP].flags}"
    if ICMP in p:
        return f"ICMP {p[ICMP].type}/{p[ICMP].code}"
    if ICMPv6DestUnreach in p:
        return f"ICMPv6 {p[ICMPv6DestUnreach].type}/{p[ICMPv6DestUnreach].code}"
    return p.summary()


TESTRUN_ROWS = [
    # (row, frame, verdict closed, answer closed, verdict drop, budget, what)
    ("SYN to a guarded port, IPv4", lambda: tcp(STRANGER4, GUARDED_TCP), XDP_TX, "TCP RA", XDP_DROP, "open",
     "no grant: answer = closed forges RST|ACK (seq 0, ack = seq + 1)"),
    ("SYN to a guarded port, IPv6", lambda: tcp(STRANGER6, GUARDED_TCP), XDP_TX, "TCP RA", XDP_DROP, "open",
     "the same over IPv6"),
    ("UDP to a guarded port, IPv4", lambda: udp(STRANGER4, GUARDED_UDP), XDP_TX, "ICMP 3/3", XDP_DROP, "open",
     "answer = closed: ICMP port unreachable quoting the datagram; the host and peer ICMP buckets are checked "
     "and spent (given credit without end here)"),
    ("UDP to a guarded port, IPv6", lambda: udp(STRANGER6, GUARDED_UDP), XDP_TX, "ICMPv6 1/4", XDP_DROP, "open",
     "ICMPv6 port unreachable, same buckets"),
    ("UDP to a guarded port over the ICMP budget, IPv4", lambda: udp(STRANGER4, GUARDED_UDP), XDP_DROP, None,
     XDP_DROP, "spent", "this host's limits (icmp_ratelimit 1 s per peer), the source's bucket empty: "
     "no answer, as Linux would send none"),
    ("SYN to an unused port, IPv4", lambda: tcp(STRANGER4, UNUSED_TCP), XDP_PASS, None, XDP_PASS, "open",
     "no rule: passed, the host's stack answers (its cost is not in this number)"),
    ("SYN to a knock port nobody listens on, IPv4", lambda: tcp(STRANGER4, KNOCK_TCP), XDP_PASS, None, XDP_DROP,
     "open", "first step recorded; closed: passed so that the host answers; drop: dropped"),
]


def single_runs(programs, frame, settings):
    """{name: median ns of round medians, [round medians]}: one run per
    program in turn, each on a fresh copy of the frame."""
    per_round = {name: [] for name in programs}
    verdicts = {}
    for _ in range(settings.rounds):
        runs = {name: [] for name in programs}
        for _ in range(settings.runs):
            for name, fd in programs.items():
                verdict, ns, _ = bpfsys.test_run(fd, frame, repeat=1)
                verdicts[name] = verdict
                runs[name].append(ns)
        for name, values in runs.items():
            per_round[name].append(common.median(values))
    return {name: (verdicts[name], common.median(values), values) for name, values in per_round.items()}


def bench_testrun(settings):
    floor_bpf, floor_fd = load_floor()
    rows = []
    try:
        with Harness() as closed, Harness() as drop:
            for h, answer in ((closed, "closed"), (drop, "drop")):
                h.apply(config(answer))
                h.set_clock(h.now_ns)    # far from zero: the ICMP buckets start full
            saved = {h: open_icmp_budget(h) for h in (closed, drop)}
            for row, build, v_closed, answer, v_drop, budget, what in TESTRUN_ROWS:
                frame = build()
                if budget == "spent":
                    for h in (closed, drop):
                        restore_settings(h, saved[h])
                        for _ in range(8):     # the source's burst of six, and more
                            h.run(udp(STRANGER4, GUARDED_UDP))
                verdict, _, out = bpfsys.test_run(closed.fd, frame, repeat=1, data_out_size=4096)
                got = describe(out) if verdict == XDP_TX else None
                if verdict != v_closed or (answer and got != answer):
                    raise SystemExit(f"bench answers: {row}: answer = closed gave {VERDICT_NAMES.get(verdict)} "
                                     f"{got or ''}, expected {VERDICT_NAMES[v_closed]} {answer or ''}")
                cells = single_runs({"closed": closed.fd, "drop": drop.fd, "floor": floor_fd}, frame, settings)
                for name, expected in (("closed", v_closed), ("drop", v_drop), ("floor", XDP_DROP)):
                    if cells[name][0] != expected:
                        raise SystemExit(f"bench answers: {row}: {name} returned {VERDICT_NAMES.get(cells[name][0])}, "
                                         f"expected {VERDICT_NAMES[expected]}")
                rows.append({"row": row, "what": what, "answer": got,
                             **{name: {"verdict": VERDICT_NAMES[v], "ns": ns, "rounds": values}
                                for name, (v, ns, values) in cells.items()}})
    finally:
        floor_bpf.cleanup()
    return rows


# --- packet sockets at the attacker -----------------------------------------------------

SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35          # SO_TIMESTAMPNS_OLD: a struct timespec of two longs
SOL_PACKET, PACKET_STATISTICS = 263, 6
ETH_P_ALL = 0x0003


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def rst_filter(server_ipv4):
    """Classic BPF: IPv4, TCP, from server_ipv4, RST set; accept 64 bytes, else 0."""
    src = int(ipaddress.IPv4Address(server_ipv4))
    return [
        (0x28, 0, 0, 12),          # ldh [12]           ethertype
        (0x15, 0, 7, 0x0800),      # jeq IPv4 else drop
        (0x30, 0, 0, 23),          # ldb [23]           protocol
        (0x15, 0, 5, 6),           # jeq TCP else drop
        (0x20, 0, 0, 26),          # ld [26]            source address
        (0x15, 0, 3, src),         # jeq server else drop
        (0xB1, 0, 0, 14),          # ldxb 4*([14]&0xf)  IP header length
        (0x50, 0, 0, 14 + 13),     # ldb [x+27]         TCP flags
        (0x45, 1, 0, 0x04),        # jset RST -> accept
        (0x06, 0, 0, 0),           # drop: ret 0
        (0x06, 0, 0, 64),          # accept: ret 64
    ]


def attach_filter(sock, program):
    array = (SockFilter * len(program))(*(SockFilter(*insn) for insn in program))
    fprog = SockFprog(len(program), ctypes.cast(array, ctypes.POINTER(SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def packet_socket(netns, iface, rcvbuf=None):
    with in_netns(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((iface, 0))
    return sock


class AnswerCounter:
    """A packet socket at the attacker that counts the server's RSTs in the
    kernel: PACKET_STATISTICS (frames that passed the filter, queued or
    dropped for a full buffer); reading resets it."""

    def __init__(self, net):
        self.sock = packet_socket(net.attacker.name, net.attacker.iface, rcvbuf=4096)
        attach_filter(self.sock, rst_filter(net.server.ipv4))
        self.read()

    def read(self):
        packets, _drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return packets

    def close(self):
        self.sock.close()


# --- 2. the flood --------------------------------------------------------------------------

class FloodServer:
    """The server's interface, switched between the variants under one flood."""

    VARIANTS = ("xknock, answer = closed", "xknock, answer = drop", "kernel stack", "floor: XDP_DROP")

    def __init__(self, net, prog_id):
        from bcc import BPF

        self.net = net
        self.prog_id = prog_id
        self.xknock_fd = bpfsys.prog_fd_by_id(prog_id)
        self.maps = FilterMaps.from_prog(prog_id)
        self.bpf = BPF(text=b"int xka_drop(struct xdp_md *c) { return XDP_DROP; }\n"
                            b"int xka_pass(struct xdp_md *c) { return XDP_PASS; }")
        self.drop_fd = self.bpf.load_func(b"xka_drop", BPF.XDP).fd
        self.pass_fd = self.bpf.load_func(b"xka_pass", BPF.XDP).fd
        with in_netns(net.server.name):
            self.ifindex = socket.if_nametoindex(net.server_iface)
        self.answer = "closed"

    def _xdp(self, fd):
        with in_netns(self.net.server.name):
            datapath.xdp_detach(self.ifindex, "native")
            if fd is not None:
                datapath.xdp_attach(self.ifindex, fd, "native")

    def set_answer(self, answer):
        """The xknock policy with this answer, this host's settings read in
        the server's namespace (as `xknock reload` there would)."""
        if answer != self.answer:
            with in_netns(self.net.server.name):
                policy.apply_policy(self.maps, config(answer))
            self.answer = answer

    def switch(self, name, path):
        if name.startswith("xknock"):
            self.set_answer("closed" if "closed" in name else "drop")
            self._xdp(self.xknock_fd)
        elif name.startswith("kernel"):
            # Path "bridge": nothing attached, the frames arrive as packets.
            # Path "direct": they arrive as XDP frames, which a veth takes
            # only with a program attached: XDP_PASS, and the kernel builds
            # the packet, as a NIC's driver does.
            self._xdp(None if path == "bridge" else self.pass_fd)
        else:
            self._xdp(self.drop_fd)

    def restore(self):
        """xknock with answer = closed back on the interface."""
        self.set_answer("closed")
        self._xdp(self.xknock_fd)

    def close(self):
        self.maps.close()
        os.close(self.xknock_fd)
        self.bpf.cleanup()


class BpfStats:
    """Kernel BPF run-time statistics, on while open."""

    def __init__(self):
        fn = bpfsys.lib().bpf_enable_stats
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        fd = fn(0)   # BPF_STATS_RUN_TIME
        self.fd = fd if fd >= 0 else None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def port_rx(net, host):
    """Frames host sent into its bridge port (the switch side received them)."""
    out = subprocess.run(["ip", "-n", net.switch, "-s", "-j", "link", "show", "dev", traffic.lab_peer(net, host)[1]],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    import json

    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def flood_window(net, counter, server, name, seconds):
    counter.read()
    tx0, rx0, s0 = sb.port_tx(net, net.server), port_rx(net, net.server), sb.proc_stat()
    p0 = common.prog_run_time(server.prog_id) if name.startswith("xknock") else None
    started = time.monotonic()
    time.sleep(seconds)
    answers = counter.read()
    wall = time.monotonic() - started
    tx1, rx1, s1 = sb.port_tx(net, net.server), port_rx(net, net.server), sb.proc_stat()
    p1 = common.prog_run_time(server.prog_id) if p0 else None
    delivered, ring_drops = tx1[0] - tx0[0], tx1[1] - tx0[1]
    hz = os.sysconf("SC_CLK_TCK")
    softirq_s = (s1[2] - s0[2]) / hz
    busy_s = ((s1[0] - s0[0]) - (s1[1] - s0[1])) / hz
    out = {"syn_pps": delivered / wall, "answers_pps": answers / wall,
           "chain_ns": 1e9 * wall / delivered if delivered else None,
           "server_sent_pps": (rx1 - rx0) / wall,
           "answered": answers / delivered if delivered else None,
           "ring_drops": ring_drops / (delivered + ring_drops) if delivered + ring_drops else 0.0,
           "softirq_ns": softirq_s * 1e9 / delivered if delivered else None,
           "busy_ns": busy_s * 1e9 / delivered if delivered else None,
           "xdp_ns": None}
    if p0 and p1 and p1[1] > p0[1]:
        out["xdp_ns"] = (p1[0] - p0[0]) / (p1[1] - p0[1])
    return out


def bench_flood(net, server, settings):
    counter = AnswerCounter(net)
    stats = BpfStats()
    data = {"rows": {}, "generator": {}}
    try:
        for path in settings.flood_paths:
            for mode, rate in (("max", None), ("fixed", settings.fixed_rate)):
                results = {name: [] for name in server.VARIANTS}
                # Switched while no frame is on its way: native XDP on a veth
                # takes XDP frames only with a program attached.
                server.restore()
                with sb.flood(net, [f"tcp:{GUARDED_TCP}"], rate=rate, path=path, src_prefix=FLOOD_SOURCES) as fl:
                    for _ in range(settings.flood_rounds):
                        for name in server.VARIANTS:
                            server.switch(name, path)
                            time.sleep(settings.settle)
                            results[name].append(flood_window(net, counter, server, name, settings.flood_seconds))
                key = f"{path}/{mode}"
                data["generator"][key] = fl.result()["pps"]
                data["rows"][key] = results
                print(f"  answers: flood {key}: generator {fl.result()['pps']:,} pps", flush=True)
    finally:
        stats.close()
        counter.close()
        server.restore()
        # The attacker's bridge port passes frames on again (the probes below cross the bridge).
        traffic.attach_peer(*traffic.lab_peer(net, net.attacker), "bridge")
    return data


# --- 3. the timing tell --------------------------------------------------------------------

def probe_frame(family, proto, dport, sport, src_mac, dst_mac, net):
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw, raw

    if family == "ipv4":
        l3 = IP(src=net.attacker.ipv4, dst=net.server.ipv4)
    else:
        l3 = IPv6(src=net.attacker.ipv6, dst=net.server.ipv6)
    if proto == "tcp":
        l4 = TCP(sport=sport, dport=dport, flags="S", seq=random.getrandbits(32))
    else:
        l4 = UDP(sport=sport, dport=dport) / Raw(b"xknock-probe")
    return raw(Ether(src=src_mac, dst=dst_mac) / l3 / l4)


def answer_port(data, server):
    """The probe's source port an answer from server (packed address) is for, or None."""
    eth = struct.unpack("!H", data[12:14])[0]
    if eth == 0x0800:
        ihl = (data[14] & 0x0F) * 4
        if data[26:30] != server:
            return None
        l4 = data[14 + ihl:]
        if data[23] == 6 and len(l4) >= 14 and l4[13] & 0x04:
            return struct.unpack("!H", l4[2:4])[0]
        if data[23] == 1 and len(l4) >= 8 and l4[0] == 3 and l4[1] == 3:
            quoted = l4[8:]
            qihl = (quoted[0] & 0x0F) * 4
            return struct.unpack("!H", quoted[qihl:qihl + 2])[0]
    elif eth == 0x86DD:
        if data[22:38] != server:
            return None
        l4 = data[54:]
        if data[20] == 6 and len(l4) >= 14 and l4[13] & 0x04:
            return struct.unpack("!H", l4[2:4])[0]
        if data[20] == 58 and len(l4) >= 50 and l4[0] == 1 and l4[1] == 4:
            return struct.unpack("!H", l4[48:50])[0]
    return None


class Prober:
    """Sends one frame from the attacker and returns the kernel-timestamped
    time from the frame leaving the attacker's interface to the answer's
    arrival there."""

    def __init__(self, net):
        self.net = net
        self.tx = packet_socket(net.attacker.name, net.attacker.iface)
        self.rx = packet_socket(net.attacker.name, net.attacker.iface, rcvbuf=1 << 20)
        self.rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.rx.setblocking(False)
        self.servers = {socket.inet_pton(socket.AF_INET, net.server.ipv4)}
        if net.server.ipv6:
            self.servers.add(socket.inet_pton(socket.AF_INET6, net.server.ipv6))

    def drain(self):
        while True:
            try:
                self.rx.recv(4096)
            except BlockingIOError:
                return

    def rtt_us(self, frame, sport, server, timeout=0.3):
        self.drain()
        self.tx.send(frame)
        t_out = t_in = None
        deadline = time.monotonic() + timeout
        while t_in is None or t_out is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rx], [], [], left)[0]:
                return None
            while True:
                try:
                    data, ancillary, _, addr = self.rx.recvmsg(4096, 64)
                except BlockingIOError:
                    break
                stamp = next((struct.unpack("qq", cdata[:16]) for level, kind, cdata in ancillary
                              if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
                if stamp is None:
                    continue
                ns = stamp[0] * 10**9 + stamp[1]
                if addr[2] == socket.PACKET_OUTGOING:
                    if data == frame:
                        t_out = ns
                elif answer_port(data, server) == sport:
                    t_in = ns
        return (t_in - t_out) / 1000

    def close(self):
        self.tx.close()
        self.rx.close()


TIMING_TARGETS = {
    "tcp": (("unused port (kernel)", UNUSED_TCP), ("guarded port (XDP answer)", GUARDED_TCP),
            ("knock port (passed to the kernel)", KNOCK_TCP)),
    "udp": (("unused port (kernel)", UNUSED_UDP), ("guarded port (XDP answer)", GUARDED_UDP),
            ("knock port (passed to the kernel)", KNOCK_UDP)),
}


def bench_timing(net, settings, prog_id):
    """{(family, proto): {"samples": {target: [µs]}, "lost": {target: n},
    "xdp_ns": {target: xknock's mean run time on those probes}}}."""
    src_mac = traffic.netns_mac(net.attacker.name, net.attacker.iface)
    dst_mac = traffic.netns_mac(net.server.name, net.server.iface)
    prober = Prober(net)
    stats = BpfStats()
    prog_fd = bpfsys.prog_fd_by_id(prog_id)
    rng = random.Random(12)
    sport = iter(rng.sample(range(20000, 60000), 40000))
    results = {}
    try:
        for family in settings.families:
            server = socket.inet_pton(socket.AF_INET if family == "ipv4" else socket.AF_INET6,
                                      net.server.ipv4 if family == "ipv4" else net.server.ipv6)
            for proto in ("tcp", "udp"):
                targets = TIMING_TARGETS[proto]
                samples = {name: [] for name, _ in targets}
                lost = {name: 0 for name, _ in targets}
                run = {name: [0, 0] for name, _ in targets}    # xknock's run ns, runs
                for index in range(settings.warmup + settings.samples):
                    order = list(targets)
                    rng.shuffle(order)
                    for name, port in order:
                        source_port = next(sport)
                        frame = probe_frame(family, proto, port, source_port, src_mac, dst_mac, net)
                        time.sleep(settings.gap)
                        before = bpfsys.prog_info(prog_fd)
                        before = (before.run_time_ns, before.run_cnt)
                        rtt = prober.rtt_us(frame, source_port, server)
                        after = bpfsys.prog_info(prog_fd)
                        if index < settings.warmup:
                            continue
                        run[name][0] += after.run_time_ns - before[0]
                        run[name][1] += after.run_cnt - before[1]
                        if rtt is None:
                            lost[name] += 1
                        else:
                            samples[name].append(rtt)
                results[(family, proto)] = {"samples": samples, "lost": lost,
                                            "xdp_ns": {name: ns / n if stats.fd is not None and n else None
                                                       for name, (ns, n) in run.items()}}
    finally:
        os.close(prog_fd)
        stats.close()
        prober.close()
    return results


def timing_summary(results):
    out = {}
    for key, res in results.items():
        cells = {}
        for name, values in res["samples"].items():
            cells[name] = {"n": len(values), "lost": res["lost"][name], "xdp_ns": res["xdp_ns"][name],
                           "median": common.median(values) if values else None,
                           "p10": pct(values, 10) if values else None, "p90": pct(values, 90) if values else None}
        unused, guarded = res["samples"]["unused port (kernel)"], res["samples"]["guarded port (XDP answer)"]
        knock = res["samples"]["knock port (passed to the kernel)"]
        if unused and guarded:
            mu, mg = common.median(unused), common.median(guarded)
            threshold = (mu + mg) / 2
            # One probe, told apart by a threshold halfway between the medians.
            accuracy = (sum(v < threshold for v in guarded) / len(guarded) + sum(v >= threshold for v in unused)
                        / len(unused)) / 2
            cells["tell"] = {"sooner_us": mu - mg, "ratio": mu / mg if mg else None, "accuracy": accuracy,
                             "guarded_below_unused_p10": sum(v < pct(unused, 10) for v in guarded) / len(guarded),
                             "knock_vs_unused_us": common.median(knock) - mu if knock else None}
        out[key] = cells
    return out


# --- the lab ---------------------------------------------------------------------------------

@contextlib.contextmanager
def answers_lab(settings):
    """A lab with xknock (answer = closed) on the server, ICMP per-destination
    rate limits off in the server's namespace, the flood's sources routed back
    to the attacker; yields (net, prog_id); detaches and removes the pins."""
    with lab("xkans", ipv6="ipv6" in settings.families) as net, \
            tempfile.TemporaryDirectory(prefix="xkans-") as directory:
        net.server.run(["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"], check=True)
        net.server.run(["ip", "route", "add", FLOOD_SOURCES, "via", net.attacker.ipv4], check=True)
        path = write_config(directory, "xknock.toml", CONFIG.format(answer="closed"))
        with in_netns(net.server.name):
            pins = datapath.pin_dir([net.server_iface])
        try:
            fresh_attach(net, path)
            prog_id = status_json(net.server)[0]["interfaces"][0]["prog_id"]
            prog_fd = bpfsys.prog_fd_by_id(prog_id)
            try:
                common.wait_out_knocking_words(prog_fd, 5)   # CONFIG's step timeout
            finally:
                os.close(prog_fd)
            yield net, prog_id
        finally:
            xknock(net.server, "detach", net.server_iface)
            datapath.remove_pins(pins)


def bench_lab(settings):
    with answers_lab(settings) as (net, prog_id):
        server = FloodServer(net, prog_id)
        try:
            flood = bench_flood(net, server, settings)
        finally:
            server.close()
        timing = bench_timing(net, settings, prog_id)
    return flood, timing


# --- the report ------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return common.median(values) if values else None


def over(rows, floor, key):
    return med([a[key] - b[key] for a, b in zip(rows, floor) if a[key] is not None and b[key] is not None])


def flood_summary(flood):
    out = {}
    for mode, results in flood["rows"].items():
        floor = results["floor: XDP_DROP"]
        for name, rows in results.items():
            out[(mode, name)] = {
                "syn_pps": med([r["syn_pps"] for r in rows]),
                "answers_pps": med([r["answers_pps"] for r in rows]),
                "answered": med([r["answered"] for r in rows]),
                "ring_drops": med([r["ring_drops"] for r in rows]),
                "softirq_ns": med([r["softirq_ns"] for r in rows]),
                "softirq_over_floor": over(rows, floor, "softirq_ns"),
                "chain_over_floor": over(rows, floor, "chain_ns"),
                "busy_over_floor": over(rows, floor, "busy_ns"),
                "xdp_ns": med([r["xdp_ns"] for r in rows]),
            }
    return out


def versus(cell, kernel, key):
    return common.ratio(cell[key], kernel[key]) if cell[key] and kernel[key] and cell[key] > 0 else "-"


def fmt(value, spec=".0f"):
    return "-" if value is None else format(value, spec)


def s_rate(flood_cells, path):
    """The fixed rate, as delivered to the kernel variant."""
    cell = flood_cells.get((f"{path}/fixed", FloodServer.VARIANTS[2]))
    return f"a fixed ~{cell['syn_pps']:,.0f} SYNs/s" if cell and cell["syn_pps"] else "a fixed rate"


def probes_to_tell(a, b):
    """Probes per port after which the medians of two ports stand two
    standard errors apart (normal approximation, spread from p10-p90)."""
    sigma = ((a["p90"] - a["p10"]) + (b["p90"] - b["p10"])) / 2 / 2.563
    delta = abs(a["median"] - b["median"])
    return max(1, math.ceil(2 * (2 * sigma / delta) ** 2)) if delta else None


def what_it_means(testrun, flood_cells, timing_cells):
    lines = []
    rows = {r["row"]: r for r in testrun}
    syn, icmp = rows["SYN to a guarded port, IPv4"], rows["UDP to a guarded port, IPv4"]
    lines.append(f"Per packet, forging the RST costs {syn['closed']['ns'] - syn['drop']['ns']:.0f} ns over dropping "
                 f"the same SYN and the ICMP error {icmp['closed']['ns'] - icmp['drop']['ns']:.0f} ns over dropping "
                 "the datagram (IPv4; single test runs whose fixed cost, the floor, is about "
                 f"{syn['floor']['ns']:.0f} ns).")
    answering, kernel = FloodServer.VARIANTS[0], FloodServer.VARIANTS[2]
    for path in ("bridge", "direct"):
        xk, kern = flood_cells.get((f"{path}/fixed", answering)), flood_cells.get((f"{path}/fixed", kernel))
        xm, km = flood_cells.get((f"{path}/max", answering)), flood_cells.get((f"{path}/max", kernel))
        if not (xk and kern and xm and km):
            continue
        sentence = (f"SYN flood, path {path}, unthrottled: the attacker got {fmt(xm['answers_pps'], ',.0f')} "
                    f"answers a second from xknock and {fmt(km['answers_pps'], ',.0f')} from the kernel's own RST "
                    "path")
        if km["answers_pps"]:
            sentence += f" ({xm['answers_pps'] / km['answers_pps']:.2f}x)"
        sentence += (f"; the chain's CPU per SYN over the floor: {fmt(xm['chain_over_floor'])} ns against "
                     f"{fmt(km['chain_over_floor'])} ns")
        if xm["chain_over_floor"] and km["chain_over_floor"]:
            sentence += f" ({xm['chain_over_floor'] / km['chain_over_floor']:.2f}x)"
        dropping = flood_cells[(f"{path}/max", FloodServer.VARIANTS[1])]["xdp_ns"]
        sentence += (f", of which xknock's program itself ran {fmt(xm['xdp_ns'])} ns (BPF stats; {fmt(dropping)} ns "
                     f"when it drops); at {s_rate(flood_cells, path)} the softirq time per SYN over the floor read "
                     f"{fmt(xk['softirq_over_floor'])} ns against {fmt(kern['softirq_over_floor'])} ns")
        lines.append(sentence + ".")
    lines.append("The answers' way back through the lab's bridge to the attacker is in both answering variants' "
                 "CPU and is no work of the server's, so the server's own difference is larger than the chain's "
                 "ratio says; the softirq numbers are tick-sampled on a shared machine and swing from run to run.")
    lines.append("Either way one SYN draws one RST of the same size: an XDP answer is no stronger a reflector than "
                 "the kernel.")
    for (family, proto), cells in timing_cells.items():
        tell = cells.get("tell")
        if not tell:
            continue
        u, g = cells["unused port (kernel)"], cells["guarded port (XDP answer)"]
        k = cells["knock port (passed to the kernel)"]
        visible = ("clear of the jitter" if g["p90"] < u["p10"] else
                   "visible above the jitter of single probes" if g["median"] < u["p10"]
                   else "inside the jitter of single probes, visible in a few")
        n_guarded, n_knock = probes_to_tell(g, u), probes_to_tell(k, u)
        lines.append(f"Timing, {family} {'SYN' if proto == 'tcp' else 'UDP'}: the XDP answer comes "
                     f"{tell['sooner_us']:.1f} µs sooner than the kernel's for an unused port (median "
                     f"{g['median']:.1f} against {u['median']:.1f} µs, {tell['ratio']:.2f}x), {visible} "
                     f"(p10-p90: guarded {g['p10']:.1f}-{g['p90']:.1f}, unused {u['p10']:.1f}-{u['p90']:.1f} µs); "
                     f"one probe per port tells them apart {tell['accuracy']:.0%} of the time with a threshold "
                     "between the medians (50% is chance; a scanner learns the unused median from the many unused "
                     "ports), "
                     f"about {n_guarded or '-'} probes per port separate the medians. Knock ports answer "
                     f"{k['median'] - u['median']:+.1f} µs from unused ports (xknock's knock path runs before the "
                     f"kernel answers: {fmt(k['xdp_ns'])} ns against {fmt(u['xdp_ns'])} ns on an unused port), "
                     f"about {n_knock or '-'} probes per port.")
    return lines


def markdown(data, title=True):
    s = data["settings"]
    testrun, flood, timing = data["testrun"], data["flood"], data["timing"]
    cells = flood_summary(flood)
    tcells = timing_summary(timing)
    out = []
    if title:
        out += [f"# xknock answers benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "", *common.machine(),
                "- machine shared with other work (2 CPUs on this host): compare ratios, not absolute numbers",
                f"- run: `bench/run answers{' --quick' if s['quick'] else ''}`"
                + (" — QUICK run, numbers are not meaningful" if s["quick"] else ""), ""]
    out += ["## Answers: xknock's XDP answers beside the kernel's own", "",
            "### Per packet (BPF_PROG_TEST_RUN)", "",
            "One program built with answer = \"closed\", one with answer = \"drop\" (the same policy otherwise: "
            "ssh = tcp:7000 udp:8000 tcp:9000 opens tcp:22 and udp:5000, strict by default), and an XDP_DROP "
            f"program (floor), in turn run by run on the same frame. Every number is one run (repeat=1: an answer "
            f"rewrites its frame, a repeated run would judge its own answer), median of {s['runs']:,} runs per "
            f"round, median of {s['rounds']} rounds; the fixed cost of a test run is in all three (the floor shows "
            "it). Built with XK_TEST_CLOCK. XDP_TX here is a verdict only: the cost of transmitting is in the "
            "flood below.", ""]
    header = ["path", "closed ns (verdict)", "drop ns (verdict)", "floor ns", "closed - drop", "closed over floor",
              "drop over floor", "closed / drop", "what runs"]
    rows = []
    for r in testrun:
        c, d, f = r["closed"], r["drop"], r["floor"]
        rows.append([r["row"], f"{c['ns']:.0f} ({c['verdict']}{', ' + r['answer'] if r['answer'] else ''})",
                     f"{d['ns']:.0f} ({d['verdict']})", f"{f['ns']:.0f}", f"{c['ns'] - d['ns']:+.0f}",
                     f"{c['ns'] - f['ns']:+.0f}", f"{d['ns'] - f['ns']:+.0f}", common.ratio(c["ns"], d["ns"]),
                     r["what"]])
    out += [common.markdown_table(header, rows), ""]

    out += ["### SYN flood to a guarded port, live (lab)", "",
            f"SYNs from random sources in {FLOOD_SOURCES} to the server's tcp:22 (the live-frames generator), while "
            "the server's interface switches in turn between the variants under one running flood, "
            f"{s['flood_rounds']} rounds of {s['flood_seconds']:g} s per variant, medians. Two ways in: path "
            "\"bridge\": the frames cross the switch's bridge as packets, and 'kernel stack' has nothing attached "
            "(port 22 is then an unused port: the kernel's own RST path); path \"direct\": the switch hands the "
            "frames to the server's veth as XDP frames, as a NIC hands frames to XDP before any packet exists, "
            "and 'kernel stack' is an XDP_PASS program (the kernel builds the packet, as a driver does). Answers "
            "are counted at the attacker (packet socket, RSTs from the server, counted in the kernel). CPU, two ways: "
            "'chain ns/SYN' (unthrottled only): the generator, the switch, the server and the answers' way back "
            "run as one chain on the generator's CPU (frames are handed on inside its BPF_PROG_TEST_RUN call), so "
            "1e9 / SYNs delivered a second is that chain's CPU time per SYN, minus the XDP_DROP floor's in the same "
            "round; 'softirq ns/SYN': the machine's softirq time (/proc/stat, all CPUs, tick-sampled, other users' "
            "included) per SYN delivered, minus the floor's in the same round: the only CPU number at the fixed "
            "rate, and a noisy one. Both include the answers' way back to the attacker, which is no work of the "
            "server's. 'xdp ns': xknock's own run time per packet (kernel BPF stats).", ""]
    header = ["flood", "variant", "SYNs delivered /s", "answers received /s", "answered", "vs kernel",
              "ring drops", "chain ns/SYN over floor", "vs kernel", "softirq ns/SYN over floor", "vs kernel",
              "xdp ns"]
    rows = []
    for mode in flood["rows"]:
        kern = cells[(mode, FloodServer.VARIANTS[2])]
        path, rate = mode.split("/")
        label = f"{path}, " + ("unthrottled" if rate == "max" else f"fixed {s['fixed_rate']:,} pps")
        for name in FloodServer.VARIANTS:
            c = cells[(mode, name)]
            rows.append([label, name, fmt(c["syn_pps"], ",.0f"), fmt(c["answers_pps"], ",.0f"),
                         fmt(c["answered"], ".0%"),
                         common.ratio(c["answers_pps"], kern["answers_pps"]) if c["answers_pps"] else "-",
                         fmt(c["ring_drops"], ".0%"),
                         fmt(c["chain_over_floor"]) if rate == "max" else "-",
                         versus(c, kern, "chain_over_floor") if rate == "max" else "-",
                         fmt(c["softirq_over_floor"]), versus(c, kern, "softirq_over_floor"), fmt(c["xdp_ns"])])
    out += [common.markdown_table(header, rows), "",
            "Generator rates (frames sent per second over the whole flood): "
            + ", ".join(f"{k}: {v:,}" for k, v in flood["generator"].items()), ""]

    out += ["### The timing tell: time to the answer, seen from the attacker", "",
            "From the attacker's packet socket, one probe at a time in random order among the targets, "
            f"{s['gap'] * 1000:g} ms pause before each, {s['samples']} counted per target after {s['warmup']} "
            "rounds of warm-up; the time from the probe leaving the attacker's interface to the answer arriving "
            "there, both timestamped by the attacker's kernel (SO_TIMESTAMPNS). xknock attached (answer = "
            f"\"closed\") throughout: unused tcp:{UNUSED_TCP} / udp:{UNUSED_UDP}, guarded tcp:{GUARDED_TCP} / "
            f"udp:{GUARDED_UDP}, knock tcp:{KNOCK_TCP} / udp:{KNOCK_UDP}. For this measurement (and the whole "
            "lab) net.ipv4.icmp_ratelimit=0 and net.ipv6.icmp.ratelimit=0 in the server's namespace, so that "
            "per-destination ICMP limits never hold an answer back; the host-wide icmp_msgs_per_sec (1000/s) "
            "stays, and the probes stay under it. 'xknock run ns': the program's mean run time on those probes "
            "(BPF stats, on for this measurement; every probe crosses xknock, whatever its port).", ""]
    header = ["family", "probe", "target", "median µs", "p10 µs", "p90 µs", "vs unused (median)", "n", "lost",
              "xknock run ns"]
    rows = []
    for (family, proto), tc in tcells.items():
        unused = tc["unused port (kernel)"]["median"]
        for name, _ in TIMING_TARGETS[proto]:
            c = tc[name]
            rows.append([family, "SYN -> RST" if proto == "tcp" else "UDP -> ICMP unreachable", name,
                         fmt(c["median"], ".1f"), fmt(c["p10"], ".1f"), fmt(c["p90"], ".1f"),
                         common.ratio(c["median"], unused) if c["median"] and unused else "-", c["n"], c["lost"],
                         fmt(c["xdp_ns"])])
    out += [common.markdown_table(header, rows), ""]
    out += ["### What it means", "", " ".join(what_it_means(testrun, cells, tcells)), ""]
    return "\n".join(out) + "\n"


def run(quick):
    settings = Settings(quick)
    print("answers: per packet (BPF_PROG_TEST_RUN)", flush=True)
    testrun = bench_testrun(settings)
    print("answers: lab (flood, timing)", flush=True)
    flood, timing = bench_lab(settings)
    return {"settings": vars(settings), "testrun": testrun, "flood": flood, "timing": timing}


def run_answers(quick):
    data = run(quick)
    text = markdown(data)
    print(text)
    print(f"written to {common.write_results('answers', text)}")
    data["text"] = text
    return data


def headline(data):
    """The report's headline line for the answers."""
    cells = timing_summary(data["timing"]).get(("ipv4", "tcp"), {})
    tell = cells.get("tell")
    syn = next(r for r in data["testrun"] if r["row"] == "SYN to a guarded port, IPv4")
    if not tell:
        return []
    guarded, unused = cells["guarded port (XDP answer)"]["median"], cells["unused port (kernel)"]["median"]
    return [f"- Answers (answer = \"closed\"): a RST forged in XDP costs "
            f"{syn['closed']['ns'] - syn['drop']['ns']:.0f} ns per packet over dropping the SYN; from the attacker "
            f"it returns {tell['sooner_us']:.1f} µs sooner than the kernel's for an unused port (median "
            f"{guarded:.1f} against {unused:.1f} µs): a timing tell (docs/threat-model.md)."]


def json_data(data):
    """data with keys JSON can hold."""
    return {**{k: v for k, v in data.items() if k not in ("timing", "text")},
            "timing": {"/".join(key): value for key, value in data["timing"].items()}}
