"""A traffic generator for floods in the namespace lab: BPF_PROG_TEST_RUN in
live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES).

A small XDP program (compiled once by BCC) is run by the kernel `repeat` times
on one template frame, in batches of 64; it returns XDP_TX, so every run puts
one frame on the wire of the interface named in the context (ingress_ifindex):
out of a veth into its peer. Before it goes out, each frame is rewritten:

- the IPv4 source is random (bpf_get_prandom_u32) within `src_prefix`, never
  inside `exclude` (the lab's own addresses): a source that falls there has
  one bit flipped, the lowest bit of the excluded network;
- the TCP/UDP source port is random (1024-65535);
- protocol and destination port come from a table of 64 slots filled from
  `ports` and `weights` (a step such as "tcp:7000" or "udp:8000", a bare port
  number in the protocol `proto`, "icmp" for an echo request, or "tcp:*" /
  "udp:*" for a random destination port 1-65535);
- destination MAC and IPv4 address are fixed (the server's).

Checksums: the IPv4 header checksum and the TCP/UDP checksum (with its
pseudo-header) are correct on every frame, updated incrementally from sums
precomputed here. XDP programs (xknock) do not check them, but the kernel stack
behind XDP does: frames that pass (unguarded ports) are then handled like real
traffic (a TCP SYN to a closed port makes the stack try a RST) instead of being
dropped early as corrupt, which would make the flood look cheaper than it is.

Frames are 54 bytes: Ethernet, IPv4 and TCP without options, or UDP and ICMP
with 12 bytes of payload to the same length (a veth does not pad frames to
Ethernet's 60-byte minimum).

The peer of the sending veth must accept XDP frames: a veth's ndo_xdp_xmit
drops everything unless the peer has NAPI enabled, that is an XDP program
attached (or GRO on). In the lab the sending veth is the attacker's and its
peer the bridge port in the switch namespace: `attach_peer()` puts a program
there: XDP_PASS (path "bridge": frames cross the bridge as ordinary packets),
a redirect to the server's bridge port (path "direct": frames reach the server
as XDP frames, the fastest way; its xknock must be attached natively), or
XDP_DROP (path "drop": the generator's own rate, nothing reaches the server).

Rates on this machine (2 vCPUs, idle): 15 Mpps into a dropping peer; into
xknock (path "direct") 5.3 Mpps to a knock port that is not a first step,
2.2 Mpps to random ports (they pass to the kernel stack), 1.5 Mpps to a first
step (each one an LRU insert). Past what the server side handles, frames are
dropped at the server's receive ring: a second generator doubles the frames
sent but not the frames judged (first step: 10 Mpps sent, 1.2 Mpps judged).

The generator runs in the namespace of the sending interface (ifindex is
per namespace): from elsewhere run it as a child process, `FloodProcess`, i.e.
`ip netns exec NS python -m xknock_dev.traffic --iface ...`, which
prints one JSON line "ready" after compiling and one with the result at the end.
"""

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from xknock.controller.kernel import bpfsys

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BATCH_SIZE = 64            # frames per batch inside one test run (TEST_XDP_MAX_BATCH is 256)
TABLE_SLOTS = 64           # protocol/port table; a power of two, chosen by random & (SLOTS - 1)
FRAME_LEN = 54
# Every live-frames test run costs about 25 ms of set-up and tear-down (its page
# pool) on this machine, during which nothing is sent: an unthrottled flood is
# split in test runs of about CHUNK_SECONDS (5% lost to the gaps), a throttled
# one sends rate * PERIOD frames at full speed every PERIOD seconds.
CHUNK_SECONDS = 0.5
PERIOD = 0.05
MAX_CHUNK = 1 << 24

ETH_P_IP = 0x0800
PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP}
KIND_FIXED, KIND_RANDOM_PORT, KIND_ICMP = 0, 1, 2

BPF_TEXT = r"""
#include <uapi/linux/bpf.h>

#define SLOTS %(slots)d
#define FRAME_LEN %(frame_len)d

struct xf_slot {
	__u8 frame[56];       /* the template: Ethernet, IPv4, L4 (54 bytes used) */
	__u32 ip_sum;         /* ones' complement sum of the IPv4 header, source and checksum zero */
	__u32 l4_sum;         /* of the pseudo-header and L4 header, source address and ports zero */
	__u16 l4_csum_off;    /* offset of the L4 checksum in the frame */
	__u8 kind;            /* 0 fixed port, 1 random destination port, 2 ICMP */
	__u8 udp;
	__u16 dport;          /* the fixed destination port (host order) */
	__u16 pad;
};

struct xf_config {
	__u32 net;            /* host order */
	__u32 host_mask;
	__u32 ex_net;
	__u32 ex_mask;
	__u32 ex_flip;
	__u32 pad;
};

BPF_ARRAY(slots, struct xf_slot, SLOTS);
BPF_ARRAY(config, struct xf_config, 1);

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

int xf_flood(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + FRAME_LEN > data_end)
		return XDP_ABORTED;

	__u32 r1 = bpf_get_prandom_u32();
	__u32 r2 = bpf_get_prandom_u32();
	__u32 zero = 0;
	__u32 idx = r1 & (SLOTS - 1);
	struct xf_slot *slot = slots.lookup(&idx);
	struct xf_config *cfg = config.lookup(&zero);
	if (!slot || !cfg)
		return XDP_ABORTED;

	__builtin_memcpy(data, slot->frame, FRAME_LEN);

	__u32 src = cfg->net | (r2 & cfg->host_mask);
	if ((src & cfg->ex_mask) == cfg->ex_net)
		src ^= cfg->ex_flip;
	__u8 *ip = data + 14;
	*(__u32 *)(ip + 12) = bpf_htonl(src);
	__u16 ip_csum = ~fold(slot->ip_sum + (src >> 16) + (src & 0xffff));
	*(__u16 *)(ip + 10) = bpf_htons(ip_csum);

	if (slot->kind == 2)
		return XDP_TX;
	__u8 *l4 = data + 34;
	__u16 sport = 1024 + ((r1 >> 8) %% 64512);
	__u16 dport = slot->dport;
	if (slot->kind == 1)
		dport = 1 + (bpf_get_prandom_u32() %% 65535);
	*(__u16 *)(l4 + 0) = bpf_htons(sport);
	*(__u16 *)(l4 + 2) = bpf_htons(dport);
	__u16 l4_csum = ~fold(slot->l4_sum + (src >> 16) + (src & 0xffff) + sport + dport);
	if (slot->udp && l4_csum == 0)
		l4_csum = 0xffff;
	if (slot->l4_csum_off == 50)
		*(__u16 *)(data + 50) = bpf_htons(l4_csum);
	else
		*(__u16 *)(data + 40) = bpf_htons(l4_csum);
	return XDP_TX;
}
"""


class XdpMd(ctypes.Structure):
    """struct xdp_md, the context of an XDP test run."""

    _fields_ = [(name, ctypes.c_uint32) for name in
                ("data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]


class Slot(ctypes.Structure):
    _fields_ = [
        ("frame", ctypes.c_uint8 * 56),
        ("ip_sum", ctypes.c_uint32),
        ("l4_sum", ctypes.c_uint32),
        ("l4_csum_off", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("udp", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class Config(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("net", "host_mask", "ex_net", "ex_mask", "ex_flip", "pad")]


# --- frames -------------------------------------------------------------------

def ones_sum(data):
    """The ones' complement sum of data as big-endian 16-bit words, unfolded."""
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def fold(total):
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data):
    return ~fold(ones_sum(data)) & 0xFFFF


def parse_step(item, proto="tcp"):
    """(proto, port) of one `ports` item: 7000, "7000", "tcp:7000", "udp:*",
    "icmp"; port None for a random port, 0 for ICMP."""
    text = str(item).strip().lower()
    if text == "icmp":
        return "icmp", 0
    if ":" in text:
        proto, _, text = text.partition(":")
    if proto not in ("tcp", "udp"):
        raise ValueError(f"flood port {item!r}: protocol must be tcp, udp or icmp")
    if text in ("*", "any"):
        return proto, None
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"flood port {item!r}: out of range")
    return proto, port


def build_slot(src_mac, dst_mac, dst_ip, proto, port):
    """A table slot: the template frame (source address and ports zero) and
    the sums its checksums are completed from."""
    eth = dst_mac + src_mac + struct.pack("!H", ETH_P_IP)
    dst = ipaddress.IPv4Address(dst_ip).packed
    number = PROTO_NUMBERS[proto]
    if proto == "tcp":
        # SYN, window 64240, data offset 5.
        l4 = struct.pack("!HHIIBBHHH", 0, port or 0, 0x5EED0001, 0, 5 << 4, 0x02, 64240, 0, 0)
        csum_off = 14 + 20 + 16
    elif proto == "udp":
        payload = b"xknock-flood"
        l4 = struct.pack("!HHHH", 0, port or 0, 8 + len(payload), 0) + payload
        csum_off = 14 + 20 + 6
    else:
        payload = b"xknock-flood"
        echo = struct.pack("!BBHHH", 8, 0, 0, 0x5EED, 1) + payload
        l4 = echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:]
        csum_off = 0
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, number, 0, b"\0" * 4, dst)
    frame = eth + ip + l4
    assert len(frame) == FRAME_LEN, len(frame)
    slot = Slot()
    ctypes.memmove(slot.frame, frame, len(frame))
    slot.ip_sum = ones_sum(ip)
    if proto == "icmp":
        slot.kind = KIND_ICMP
    else:
        pseudo = b"\0" * 4 + dst + struct.pack("!BBH", 0, number, len(l4))
        # The destination port is added by the program, with the source's.
        slot.l4_sum = ones_sum(pseudo + l4[:2] + b"\0\0" + l4[4:])
        slot.l4_csum_off = csum_off
        slot.kind = KIND_RANDOM_PORT if port is None else KIND_FIXED
        slot.udp = proto == "udp"
        slot.dport = port or 0
    return slot


def spread(weights, slots=TABLE_SLOTS):
    """How many of the slots each weight gets (largest remainder, at least one each)."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError("flood weights must be positive")
    if len(weights) > slots:
        raise ValueError(f"at most {slots} flood ports")
    total = sum(weights)
    exact = [w * slots / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) > slots:
        i = max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - exact[i])
        counts[i] -= 1
    while sum(counts) < slots:
        i = max(range(len(counts)), key=lambda i: exact[i] - counts[i])
        counts[i] += 1
    return counts


def source_config(src_prefix, exclude):
    """The program's config: the source network and the excluded one."""
    net = ipaddress.IPv4Network(src_prefix, strict=False)
    cfg = Config(net=int(net.network_address), host_mask=int(net.hostmask))
    if exclude:
        ex = ipaddress.IPv4Network(exclude, strict=False)
        if ex.overlaps(net):
            if ex.prefixlen <= net.prefixlen:
                raise ValueError(f"flood sources {net} lie inside the excluded {ex}")
            cfg.ex_net = int(ex.network_address)
            cfg.ex_mask = int(ex.netmask)
            cfg.ex_flip = 1 << (32 - ex.prefixlen)   # the lowest network bit: a host bit of net
    return cfg


def _mac(text):
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"MAC address {text!r}")
    return raw


def _iface_mac(ifname):
    with open(f"/sys/class/net/{ifname}/address") as f:
        return _mac(f.read().strip())


# --- the generator --------------------------------------------------------------

class Flood:
    """Random-source frames out of `iface` (in this process's namespace).

    Flood(iface, dst_mac, dst_ip, src_prefix, ports, proto="tcp", weights=None,
          exclude=None)
    run(packets) sends that many as fast as the kernel can and returns the pps;
    start(seconds=None, rate=None) does the same on a thread until stop() or
    seconds pass, throttled to `rate` packets per second if given.
    """

    def __init__(self, iface, dst_mac, dst_ip, src_prefix="10.200.0.0/16", ports=(7000,), proto="tcp",
                 weights=None, exclude=None):
        from bcc import BPF

        self.iface = iface
        self.ifindex = socket.if_nametoindex(iface)
        self.src_mac = _iface_mac(iface)
        self.dst_mac = _mac(dst_mac) if isinstance(dst_mac, str) else bytes(dst_mac)
        self.dst_ip = str(dst_ip)
        self.steps = [parse_step(p, proto) for p in ports]
        self.weights = list(weights) if weights else [1] * len(self.steps)
        if len(self.weights) != len(self.steps):
            raise ValueError("flood: one weight per port")
        self.src_prefix = str(src_prefix)
        self.exclude = exclude
        config = source_config(src_prefix, exclude)   # validates before compiling
        self.bpf = BPF(text=(BPF_TEXT % {"slots": TABLE_SLOTS, "frame_len": FRAME_LEN}).encode())
        self.fd = self.bpf.load_func(b"xf_flood", BPF.XDP).fd
        self.bpf[b"config"][ctypes.c_int(0)] = config
        table = self.bpf[b"slots"]
        index = 0
        for (proto_name, port), count in zip(self.steps, spread(self.weights)):
            slot = build_slot(self.src_mac, self.dst_mac, self.dst_ip, proto_name, port)
            for _ in range(count):
                table[ctypes.c_int(index)] = slot
                index += 1
        self.frame = bytes(FRAME_LEN)       # rewritten whole by the program
        self.sent = 0
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._thread = None
        self.error = None

    def close(self):
        self.stop()
        self.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, packets):
        ctx = XdpMd(data=0, data_end=len(self.frame), ingress_ifindex=self.ifindex)
        retval, _, _ = bpfsys.test_run(self.fd, self.frame, repeat=packets, flags=BPF_F_TEST_XDP_LIVE_FRAMES,
                                       batch_size=BATCH_SIZE, ctx=ctx, data_out_size=0)
        return retval

    def run(self, packets):
        """Send packets frames now; the achieved packets per second."""
        started = time.monotonic()
        self._send(int(packets))
        took = time.monotonic() - started
        self.sent += int(packets)
        self.elapsed += took
        return packets / took if took > 0 else 0.0

    def start(self, seconds=None, rate=None):
        """Flood on a thread for seconds (or until stop()); at most rate pps if given."""
        if self._thread and self._thread.is_alive():
            raise RuntimeError("flood already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(seconds, rate), daemon=True, name="flood")
        self._thread.start()

    def _loop(self, seconds, rate):
        try:
            self.loop(seconds, rate, self._stop)
        except Exception as e:   # reported by stop()
            self.error = e

    def loop(self, seconds=None, rate=None, stop=None):
        """Flood in this thread until seconds pass or stop (an Event) is set;
        returns (packets sent, seconds). Unthrottled, one test run lasts about
        CHUNK_SECONDS (stop() waits for the current one); with a rate, a burst
        of rate * PERIOD frames goes out every PERIOD seconds."""
        stop = stop or threading.Event()
        started = time.monotonic()
        deadline = started + seconds if seconds is not None else None
        chunk = 65536 if rate is None else max(BATCH_SIZE, int(rate * PERIOD))
        per_second = None   # measured unthrottled speed, for the last chunk before the deadline
        sent = 0
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if rate is not None:
                due = started + sent / rate
                if due > now:
                    wait = due - now if deadline is None else min(due - now, deadline - now)
                    if stop.wait(wait):
                        break
                    continue
            n = chunk
            if rate is None and deadline is not None and per_second:
                n = int(min(n, max(BATCH_SIZE, (deadline - now) * per_second)))
            t0 = time.monotonic()
            self._send(n)
            took = time.monotonic() - t0
            sent += n
            if rate is None and took > 0:   # aim each unthrottled test run at CHUNK_SECONDS
                per_second = n / took
                chunk = int(min(MAX_CHUNK, max(BATCH_SIZE, per_second * CHUNK_SECONDS)))
        elapsed = time.monotonic() - started
        self.sent += sent
        self.elapsed += elapsed
        return sent, elapsed

    def stop(self):
        """Stop a background flood; returns {"packets", "seconds", "pps"}."""
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        if self.error:
            error, self.error = self.error, None
            raise error
        return self.result()

    def result(self):
        return {"packets": self.sent, "seconds": round(self.elapsed, 4),
                "pps": round(self.sent / self.elapsed) if self.elapsed else 0}


# --- the lab side: the peer, and the generator as a child process -----------------

PASS_PROGRAM = r"""
import sys
from bcc import BPF
b = BPF(text=b"int xf_peer_pass(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func(b"xf_peer_pass", BPF.XDP)
BPF.attach_xdp(sys.argv[1], fn, 0)
print("attached", flush=True)
"""


# Frames arriving on the peer are sent on to another interface of its namespace
# as XDP frames: no skb, no bridge. Everything else passes as usual.
REDIRECT_PROGRAM = r"""
import sys
from bcc import BPF
text = b"int xf_peer_redirect(struct xdp_md *ctx) { return bpf_redirect(%d, 0); }" % int(sys.argv[2])
b = BPF(text=text)
fn = b.load_func(b"xf_peer_redirect", BPF.XDP)
BPF.attach_xdp(sys.argv[1], fn, 0)
print("attached", flush=True)
"""

PEER_PATHS = ("bridge", "direct", "drop")


def attach_peer(netns, iface, path="bridge", to_iface=None, python=sys.executable):
    """Make iface (in netns) the receiving end of a flood: attach an XDP
    program in native mode, so that the veth sending into it accepts XDP
    frames. path "bridge": XDP_PASS, frames go on as packets through the
    namespace's bridge. path "direct": the frames are redirected as XDP frames
    straight out of to_iface (in the lab: the server's bridge port), the
    fastest way to the server. The program stays attached after this returns
    (until the interface or its namespace goes)."""
    if path in ("bridge", "drop"):
        argv = [python, "-c", PASS_PROGRAM.replace("XDP_PASS", "XDP_PASS" if path == "bridge" else "XDP_DROP"), iface]
    elif path == "direct":
        link = subprocess.run(["ip", "-n", netns, "-j", "link", "show", "dev", to_iface],
                              capture_output=True, text=True, check=True, timeout=30).stdout
        ifindex = json.loads(link)[0]["ifindex"]
        argv = [python, "-c", REDIRECT_PROGRAM, iface, str(ifindex)]
    else:
        raise ValueError(f"flood path {path!r}: one of {', '.join(PEER_PATHS)}")
    result = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or "attached" not in result.stdout:
        raise RuntimeError(f"attaching the flood's peer program to {iface} in {netns}: {result.stderr.strip()}")


def lab_peer(lab, host):
    """(switch namespace, bridge port) that host's interface sends into."""
    return lab.switch, f"{host.iface[:3]}1-{lab.token}"


def netns_mac(netns, iface):
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show", "dev", iface],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)[0]["address"]


def _ethtool_stats(netns, iface):
    out = subprocess.run(["ip", "netns", "exec", netns, "ethtool", "-S", iface],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    stats = {}
    for line in out.splitlines()[1:]:
        name, _, value = line.strip().partition(":")
        if value.strip().isdigit():
            stats[name] = int(value)
    return stats


def _link_dropped(netns, iface):
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", "dev", iface],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["dropped"] + stats["tx"]["dropped"]


def _queue_sum(stats, suffix):
    return sum(v for k, v in stats.items() if k.endswith(suffix))


def path_counters(lab, attacker=None, target=None):
    """Where a flood's frames are on the way to the target's XDP program, as
    counters that only grow: refused by the attacker's peer (its ring full),
    dropped on either bridge port (a full ring or backlog), and arrived (seen
    by the target's XDP program). Subtract two of these to account for every
    frame of a flood."""
    attacker, target = attacker or lab.attacker, target or lab.server
    switch, attacker_port = lab_peer(lab, attacker)
    target_port = lab_peer(lab, target)[1]
    sender = _ethtool_stats(attacker.name, attacker.iface)
    forwarder = _ethtool_stats(switch, attacker_port)
    return {
        "refused by the switch": _queue_sum(sender, "_xdp_xmit_err"),
        "dropped by the switch": (_link_dropped(switch, attacker_port) + _link_dropped(switch, target_port)
                                  + _queue_sum(forwarder, "_xdp_tx_errors")
                                  + _queue_sum(_ethtool_stats(switch, target_port), "_xdp_xmit_err")),
        "arrived": _queue_sum(_ethtool_stats(target.name, target.iface), "_xdp_packets"),
    }


def counters_delta(before, after):
    return {name: after[name] - before[name] for name in after}


def settled_path_counters(lab, attacker=None, target=None, timeout=5.0):
    """path_counters() once the frames still in rings have reached the target
    (two reads 0.1 s apart agree), so a reading right after a flood counts them."""
    last = path_counters(lab, attacker, target)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = path_counters(lab, attacker, target)
        if now == last:
            break
        last = now
    return last


class FloodProcess:
    """The generator in a child process inside netns (`ip netns exec`).

    start() returns once the program is compiled and flooding; stop() (SIGINT)
    or the end of `seconds` ends it; result() is its JSON: packets, seconds, pps."""

    def __init__(self, netns, iface, dst_mac, dst_ip, src_prefix="10.200.0.0/16", ports=(7000,), proto="tcp",
                 weights=None, exclude=None, seconds=None, rate=None, python=sys.executable):
        argv = [python, "-m", "xknock_dev.traffic", "--stop-on-eof", "--iface", iface, "--dst-mac", dst_mac,
                "--dst-ip", dst_ip, "--src-prefix", src_prefix, "--proto", proto,
                "--ports", ",".join(str(p) for p in ports)]
        if weights:
            argv += ["--weights", ",".join(str(w) for w in weights)]
        if exclude:
            argv += ["--exclude", exclude]
        if seconds is not None:
            argv += ["--seconds", str(seconds)]
        if rate is not None:
            argv += ["--rate", str(rate)]
        self.argv = ["ip", "netns", "exec", netns, *argv]
        self.process = None
        self._result = None

    def start(self, timeout=60.0):
        # stdin stays open: the child stops when it closes, that is when this process goes.
        # `-m xknock_dev.traffic`: xknock_dev is not installed, the child finds it beside this file.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
        line = _readline(self.process.stdout, timeout)
        if not line or json.loads(line).get("state") != "ready":
            self.kill()
            raise RuntimeError(f"flood generator did not start: {line!r} {self.process.stderr.read().strip()}")
        return self

    def wait(self, timeout=None):
        """The result once the generator ends by itself (--seconds)."""
        line = _readline(self.process.stdout, timeout)
        self.process.wait(timeout)
        return self._parse(line)

    def stop(self, timeout=30.0):
        if self.process is None:
            return self._result
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        line = _readline(self.process.stdout, timeout)
        return self._parse(line)

    def _parse(self, line):
        try:
            self._result = json.loads(line)
        except (TypeError, ValueError):
            err = self.process.stderr.read() if self.process.poll() is not None else ""
            self.kill()
            raise RuntimeError(f"flood generator gave no result: {line!r} {err.strip()}") from None
        self.kill()
        return self._result

    def kill(self):
        if self.process is not None:
            with contextlib.suppress(Exception):
                if self.process.poll() is None:
                    self.process.kill()
                self.process.wait(5)
            for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
                if pipe:
                    pipe.close()

    def result(self):
        return self._result

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self._result is None:
            with contextlib.suppress(Exception):
                self.stop()
        self.kill()


def _readline(stream, timeout):
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return stream.readline()


def lab_flood(lab, ports, src_prefix="0.0.0.0/0", seconds=None, rate=None, weights=None, proto="tcp",
              path="bridge", attacker=None, target=None):
    """A FloodProcess (not started) from the lab's attacker at the server's
    IPv4 address, the lab's own /24 excluded from the sources. Attaches the
    peer program of `path` (see attach_peer) to the attacker's bridge port
    first; doing that again replaces it."""
    attacker = attacker or lab.attacker
    target = target or lab.server
    switch, peer = lab_peer(lab, attacker)
    attach_peer(switch, peer, path, to_iface=lab_peer(lab, target)[1])
    dst_mac = netns_mac(target.name, target.iface)
    exclude = str(ipaddress.IPv4Network(f"{target.ipv4}/24", strict=False))
    return FloodProcess(attacker.name, attacker.iface, dst_mac, target.ipv4, src_prefix=src_prefix, ports=ports,
                        proto=proto, weights=weights, exclude=exclude, seconds=seconds, rate=rate)


# --- the child process ---------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m xknock_dev.traffic",
                                     description="Flood random-source frames out of a veth (XDP live frames).")
    parser.add_argument("--iface", required=True, help="the sending interface, in this namespace")
    parser.add_argument("--dst-mac", required=True)
    parser.add_argument("--dst-ip", required=True)
    parser.add_argument("--src-prefix", default="10.200.0.0/16")
    parser.add_argument("--exclude", default=None, help="a prefix no source may fall in")
    parser.add_argument("--ports", default="7000", help="comma separated: 7000, tcp:7000, udp:8000, icmp, tcp:*")
    parser.add_argument("--weights", default=None, help="comma separated, one per port")
    parser.add_argument("--proto", default="tcp", help="protocol of bare port numbers")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: on SIGINT)")
    parser.add_argument("--packets", type=int, default=None, help="send exactly this many, at full speed")
    parser.add_argument("--rate", type=float, default=None, help="packets per second (default: as fast as possible)")
    parser.add_argument("--stop-on-eof", action="store_true",
                        help="stop when stdin closes (the parent died): a flood never outlives its caller")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.stop_on_eof:
        def watch_stdin():
            while os.read(0, 4096):
                pass
            stop.set()
        threading.Thread(target=watch_stdin, daemon=True).start()
    ports = [p for p in args.ports.split(",") if p]
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    flood = Flood(args.iface, args.dst_mac, args.dst_ip, args.src_prefix, ports, proto=args.proto,
                  weights=weights, exclude=args.exclude)
    try:
        print(json.dumps({"state": "ready"}), flush=True)
        if args.packets is not None:
            flood.run(args.packets)
        else:
            # The loop runs on a thread so that signals reach the main thread at once.
            flood.start(args.seconds, args.rate)
            while flood._thread.is_alive() and not stop.wait(0.05):
                pass
            flood.stop()
        print(json.dumps({"state": "done", **flood.result()}), flush=True)
    finally:
        flood.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
