/* xknock_maps.h: every map of the filter. Pinned under XK_PIN_DIR (set by the
 * controller per interface group) so that a new program re-adopts them. */
#ifndef XKNOCK_MAPS_H
#define XKNOCK_MAPS_H

#include "xknock_consts.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"

#ifndef XK_PIN_DIR
#error "XK_PIN_DIR must name the bpffs directory for the maps"
#endif

/* which policy bank is live, and the test clock */
BPF_TABLE_PINNED("array", u32, struct xk_control, control, 1, XK_PIN_DIR "/control");
/* per bank: enforce or monitor, and which lists are non-empty */
BPF_TABLE_PINNED("array", u32, struct xk_settings, settings, 2, XK_PIN_DIR "/settings");
/* (bank, protocol, port) -> guarded, or which steps of which sequences;
 * looked up for knock steps only: port_flags classifies every packet */
BPF_TABLE_PINNED("hash", struct xk_port_key, struct xk_port_val, ports, XK_PORT_ENTRIES,
		 XK_PIN_DIR "/ports");
/* per bank and transport (tcp, udp, icmp), the XK_PORT_* flags of every port,
 * a byte each (0: no entry in `ports`): one array load classifies a packet
 * (xknock_hints.h) */
BPF_TABLE_PINNED("array", u32, u64, port_flags, 2 * XK_PORT_CLASSES * XK_PORT_FLAG_WORDS,
		 XK_PIN_DIR "/port_flags");
/* sequence definitions: slot = bank * XK_MAX_SEQUENCES + index */
BPF_TABLE_PINNED("array", u32, struct xk_seq, seqs, 2 * XK_MAX_SEQUENCES, XK_PIN_DIR "/seqs");
/* knock progress per (source, sequence uid); the least recently used goes first */
BPF_TABLE_PINNED("lru_hash", struct xk_progress_key, u64, progress, XK_PROGRESS_ENTRIES,
		 XK_PIN_DIR "/progress");
/* first knocks: (tag << 32 | time in us, low 32 bits) at two slots hashed from
 * (source, sequence uid); the cheap, large front of `progress` (xknock_knock.h) */
BPF_TABLE_PINNED("array", u32, u64, firsts, XK_FIRST_SLOTS, XK_PIN_DIR "/firsts");
/* live grants per (source, protocol, port); a plain hash, so nothing evicts them */
BPF_TABLE_PINNED("hash", struct xk_grant_key, struct xk_grant, grants, XK_GRANT_ENTRIES,
		 XK_PIN_DIR "/grants");
/* allow- and deny-lists, both banks in one trie each */
BPF_TABLE_PINNED7("lpm_trie", struct xk_lpm_key, u32, allow, XK_LIST_ENTRIES, XK_PIN_DIR "/allow",
		  BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("lpm_trie", struct xk_lpm_key, u32, deny, XK_LIST_ENTRIES, XK_PIN_DIR "/deny",
		  BPF_F_NO_PREALLOC);
/* per bank, list and family, a bit for every IPv4 /16 (or hash of an IPv6
 * /32) that an entry of `allow` or `deny` covers: a clear bit spares the trie */
BPF_TABLE_PINNED("array", u32, u64, list_bits, 2 * XK_LIST_BITMAPS * XK_BITMAP_WORDS, XK_PIN_DIR "/list_bits");
/* a byte per source slot: may the source hold a grant? (xknock_hints.h);
 * mmapable, so that the controller sets a slot with a byte store, never
 * rewriting a word a CPU is setting another byte of */
BPF_TABLE_PINNED7("array", u32, u64, granted, XK_GRANTED_SELECTOR + 1, XK_PIN_DIR "/granted",
		  BPF_F_MMAPABLE);
/* the epochs copies are taken under (XK_EPOCH_*, xknock_hints.h); mmapable,
 * so that the controller writes its words with one 8-byte store each */
BPF_TABLE_PINNED7("array", u32, u64, epochs, XK_EPOCH_WORDS, XK_PIN_DIR "/epochs", BPF_F_MMAPABLE);
/* per CPU, copies of the grants packets passed on: a granted packet is
 * judged without the hash (xknock_hints.h); not pinned: a new program starts
 * with none */
BPF_PERCPU_ARRAY(grant_cache, struct xk_grant_copy, XK_GRANT_CACHE_SLOTS);
/* per CPU, sources found on the allow- or deny-list: their next packets are
 * judged without the trie (xknock_hints.h); not pinned */
BPF_PERCPU_ARRAY(list_cache, struct xk_list_copy, XK_LIST_CACHE_SLOTS);
/* failed sequences per source, for bans */
BPF_TABLE_PINNED("lru_hash", struct xk_addr, struct xk_failures, failures, XK_FAILURE_ENTRIES,
		 XK_PIN_DIR "/failures");
/* strict mode: a knocking source's last knock and last new connection to
 * another port, at a slot hashed from the source (xknock_strict.h); an array,
 * so a source that is not knocking costs a read, never an insert */
BPF_TABLE_PINNED("array", u32, struct xk_recent, recent, XK_RECENT_SLOTS, XK_PIN_DIR "/recent");
/* strict mode: when a source of each slot last knocked, so that a new
 * connection from a source that is not knocking reads a word of 64 KB, not a
 * slot of `recent`'s 4 MB (xknock_strict.h); not pinned: a new program trusts
 * it only once a step timeout has passed since its first packet */
BPF_ARRAY(knocking, u64, XK_KNOCKING_SLOTS + 1);
/* banned sources and until when */
BPF_TABLE_PINNED("hash", struct xk_addr, struct xk_ban, bans, XK_BAN_ENTRIES, XK_PIN_DIR "/bans");
/* per-CPU counters indexed by enum xk_reason; the controller sums them */
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, XK_COUNTERS, XK_PIN_DIR "/counters");
/* knock outcomes per sequence uid, for metrics by sequence */
BPF_TABLE_PINNED("percpu_hash", u32, struct xk_seq_stats, seqstats, 2 * XK_MAX_SEQUENCES,
		 XK_PIN_DIR "/seqstats");
/* the parsed packet: kept in map memory, which the verifier does not track,
 * so that every parse path joins into one state before the policy runs */
BPF_PERCPU_ARRAY(scratch, struct xk_packet, 1);
/* grants and ended sequences, for the controller's log and hooks */
BPF_RINGBUF_OUTPUT(events, XK_EVENT_PAGES);
/* sources that sent an accepted SPA packet (the controller writes them, with
 * the time): past the total rate, their candidates still reach the controller */
BPF_TABLE_PINNED("lru_hash", struct xk_addr, u64, spa_known, XK_SPA_KNOWN_ENTRIES, XK_PIN_DIR "/spa_known");
/* SPA candidates for the controller: a ring of their own, so a flood of them
 * never crowds out the events above */
BPF_RINGBUF_OUTPUT(spa_events, XK_SPA_EVENT_PAGES);
/* SPA token buckets: per source (the LRU may forget a quiet one: it starts
 * full again) and per CPU (the total rate, so no flood starves the controller) */
BPF_TABLE("lru_hash", struct xk_addr, struct xk_bucket, spa_rate, XK_SPA_RATE_ENTRIES);
BPF_PERCPU_ARRAY(spa_cpu_rate, struct xk_bucket, 1);
/* where a candidate's record is built before it goes out at its own size */
BPF_PERCPU_ARRAY(spa_scratch, struct xk_spa_event, 1);

/* Answers (xknock_answer.h): ICMP error buckets per destination (the LRU may
 * forget a quiet one: it starts full again, as Linux's inet_peer does) and
 * for the host; the frame scratch where checksums are summed */
BPF_TABLE("lru_hash", struct xk_addr, struct xk_bucket, icmp_peers, XK_ICMP_PEER_ENTRIES);
BPF_ARRAY(icmp_host, struct xk_locked_bucket, 1);
struct xk_answer_scratch {
	__u8 buf[XK_ANSWER_MAX_L4 + 4];
	__u32 ip_ids;   /* ICMP errors sent by this CPU: IPv4 IDs move per error, as Linux's do */
};
BPF_PERCPU_ARRAY(answer_scratch, struct xk_answer_scratch, 1);

#endif
