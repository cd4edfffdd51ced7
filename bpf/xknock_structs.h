/* xknock_structs.h: map keys and values. Mirrored byte for byte by
 * controller/layout.py (ctypes); tests/test_layout.py compares both. */
#ifndef XKNOCK_STRUCTS_H
#define XKNOCK_STRUCTS_H

#include <uapi/linux/bpf.h>

#include "xknock_consts.h"

/* Every address is 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d). */
struct xk_addr {
	__u8 b[16];
};

/* A (protocol, port) pair as the maps spell it; port in host byte order. */
struct xk_l4port {
	__u8 proto;
	__u8 pad;
	__u16 port;
};

/* ports: the one lookup that classifies a destination. */
struct xk_port_key {
	__u8 bank;
	__u8 proto;
	__u16 port;
};

struct xk_port_seq {
	__u32 slot;        /* index into seqs */
	__u32 step_mask;   /* bit i set: this port is step i of the sequence */
};

struct xk_port_val {
	__u32 flags;       /* XK_PORT_* */
	__u32 nseqs;
	struct xk_port_seq seqs[XK_MAX_SEQS_PER_PORT];
};

/* seqs: sequence definitions, XK_MAX_SEQUENCES slots per bank. */
struct xk_seq {
	__u32 uid;         /* stable while the sequence is unchanged across reloads */
	__u32 nsteps;
	__u64 step_timeout_ns;
	__u64 open_for_ns;
	__u64 idle_timeout_ns;
	__u32 nopen;
	__u32 pad;
	struct xk_l4port open[XK_MAX_OPEN];
	char name[32];     /* for status and events; the data path never reads it */
};

/* progress: one packed word per (source, sequence), changed by compare-and-swap.
 * Bits 0-7: the next step expected; bits 8-63: time of the last accepted step, us. */
struct xk_progress_key {
	struct xk_addr src;
	__u32 uid;
};

/* grants: what a completed sequence (or `xknock grant`) opened for a source. */
struct xk_grant_key {
	struct xk_addr src;
	__u8 proto;
	__u8 pad;
	__u16 port;
};

struct xk_grant {
#ifndef XK_TEST_OTHER_LAYOUT
	__u64 window_end_ns;     /* new connections until then */
	__u64 idle_timeout_ns;   /* established traffic keeps it alive this long */
#else
	/* tests only: another version's grants, the same size with two fields
	 * swapped, which a size check cannot tell apart (tests/test_upgrade.py) */
	__u64 idle_timeout_ns;
	__u64 window_end_ns;
#endif
	__u64 last_seen_ns;      /* refreshed coarsely by passing traffic */
	__u32 seq_uid;           /* 0 for a grant written by the operator */
	__u32 flags;
};

/* grant_cache: a grant as a packet found it in `grants`, and the epochs it
 * was found under (xknock_hints.h). */
struct xk_grant_copy {
	struct xk_grant_key key;
	__u32 filled;            /* 0: an empty slot */
	__u64 epoch_controller;
	__u64 epoch_datapath;
	__u64 window_end_ns;
	__u64 idle_timeout_ns;
	__u64 last_seen_ns;      /* as written in `grants` when copied */
};

/* list_cache: a source found on a list of a bank (xknock_hints.h). */
struct xk_list_copy {
	struct xk_addr src;
	__u32 tag;               /* 0: an empty slot; else 1 + bank + 2 * list (XK_LIST_*) */
	__u32 pad;
	__u64 epoch;             /* epochs[XK_EPOCH_LISTS] before the trie was asked */
	__u64 found_ns;
};

/* allow and deny: LPM tries keyed by (bank, address). */
struct xk_lpm_key {
	__u32 prefixlen;         /* 8 bits of bank and family + the address prefix */
	__u8 bank;               /* the bank, | XK_LPM_IPV4 for IPv4 */
	/* An IPv4 address in the first 4 bytes: a lookup compares no more bits
	 * than its prefixlen, so IPv4 keys cost 40 bits, not 136. */
	__u8 prefix[16];
	__u8 pad[3];
};

/* control[0]: which bank is live. Flipping it switches the whole policy at once.
 * active_bank and layout stay the first 8 bytes in every version. */
struct xk_control {
	__u32 active_bank;
	__u32 layout;            /* the controller's stamp of these maps' layout; never read here */
	__u64 test_now_ns;       /* the clock, in builds with XK_TEST_CLOCK only */
};

/* settings[bank] */
struct xk_settings {
	__u32 mode;              /* XK_MODE_* */
	__u32 flags;             /* XK_SET_* */
	__u32 ban_after;         /* failed sequences (resets, time-outs) that ban a source ... */
	__u32 ban_scope;         /* XK_BAN_* */
	__u64 ban_within_ns;     /* ... within this long */
	__u64 ban_for_ns;        /* and for how long */
	/* SPA token buckets, kept in nanoseconds of credit: a candidate costs
	 * *_cost_ns, credit refills with time up to *_burst_ns (no division here) */
	__u64 spa_cost_ns;       /* per source: 1e9 / rate */
	__u64 spa_burst_ns;
	__u64 spa_cpu_cost_ns;   /* per CPU: 1e9 / (total rate / CPUs) */
	__u64 spa_cpu_burst_ns;
	/* strict mode: how long a knock keeps its source "knocking" (the
	 * longest step timeout), us */
	__u64 knock_window_us;
	/* answers: Linux's ICMP error rate limits read from the host, as token
	 * buckets in ns of credit: per destination (icmp_ratelimit, IPv6's
	 * scaled as for a /64 route; burst six of them, as inet_peer allows)
	 * and for the host (icmp_msgs_per_sec, icmp_msgs_burst) */
	__u64 icmp_peer_cost_ns;
	__u64 icmp_peer_burst_ns;
	__u64 icmp6_peer_cost_ns;
	__u64 icmp6_peer_burst_ns;
	__u64 icmp_host_cost_ns;
	__u64 icmp_host_burst_ns;
	__u32 hash_seed;         /* keys the IPv4 ID and IPv6 flow label of answers */
	__u8 ttl;                /* the host's net.ipv4.ip_default_ttl */
	__u8 hop_limit;          /* the interface's net.ipv6.conf.IFACE.hop_limit */
	__u8 flowlabels;         /* XK_FLOWLABEL_*: net.ipv6.auto_flowlabels, flowlabel_state_ranges */
	__u8 pad;
};

/* failures: recent failed sequences per source, the LRU may forget the quiet ones. */
struct xk_failures {
	__u64 window_start_ns;
	__u64 count;             /* 64 bits: BCC's LLVM fetch-adds 64-bit words only */
};

/* bans: banned sources (a plain hash: nothing evicts a ban). */
struct xk_ban {
	__u64 until_ns;
	__u64 since_ns;
};

/* seqstats: per-CPU knock outcomes per sequence uid; the controller creates
 * the entries when a sequence goes live and removes them when it is gone. */
struct xk_seq_stats {
	__u64 advanced;
	__u64 completed;
	__u64 reset;
	__u64 timed_out;
};

/* recent[hash(source)]: strict mode's memory of a knocking source. Each word
 * is (24-bit tag of the source << 40 | time in us, low 40 bits): the last
 * accepted knock, and the last new connection to any other port since. */
struct xk_recent {
	__u64 knock;
	__u64 touch;
};

/* icmp_host[0]: the host-wide ICMP error bucket, shared by all CPUs. */
struct xk_locked_bucket {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 last_ns;
	__u64 credit_ns;
};

/* spa_rate (per source) and spa_cpu_rate: a token bucket as credit in ns. */
struct xk_bucket {
	__u64 last_ns;
	__u64 credit_ns;
};

/* One record per SPA candidate on the spa_events ring buffer: the UDP payload
 * as it came, for the controller to verify. */
struct xk_spa_event {
	__u64 ts_ns;
	struct xk_addr src;
	__u16 port;              /* the UDP port it was sent to */
	__u16 len;               /* bytes of payload used */
	__u8 ipv4;
	__u8 pad;
	__u16 sport;             /* the UDP source port, host order: where an answer goes */
	__u8 payload[XK_SPA_MAX_PAYLOAD];
	__u8 pad2[4];
};

/* One ring buffer record per grant, completed or failed sequence. */
struct xk_event {
	__u64 ts_ns;
	struct xk_addr src;
	__u32 seq_uid;
	__u8 type;               /* XK_EV_* */
	__u8 step;               /* the step reached when it ended */
	__u8 proto;              /* the knock that ended it */
	__u8 pad;
	__u16 port;
	__u16 pad2;
	__u32 pad3;
};

#endif
