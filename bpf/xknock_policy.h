/* xknock_policy.h: the verdict for a guarded port (allow-list, grants) and the
 * source lists. Knock handling lives in xknock_knock.h. */
#ifndef XKNOCK_POLICY_H
#define XKNOCK_POLICY_H

#include <uapi/asm-generic/errno-base.h>

#include "xknock_consts.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"
#include "xknock_stats.h"
#include "xknock_hints.h"
#include "xknock_clock.h"

/* The trie's key for the packet's source, as long as it can be. */
static __always_inline void source_key(struct xk_lpm_key *key, __u32 bank, struct xk_packet *pkt)
{
	/* Without a branch: one verifier state for both families. An IPv4
	 * address (bytes 12-15 of src) goes to the first word; the bytes past
	 * prefixlen are never compared. */
	__u32 words[4];
	__builtin_memcpy(words, pkt->src.b, sizeof(words));
	__u32 ipv4 = pkt->ipv4 & 1;
	__u32 take_v4 = 0 - ipv4;   /* all ones for IPv4 */
	words[0] ^= (words[0] ^ words[3]) & take_v4;
	key->prefixlen = 8 + 128 - 96 * ipv4;
	key->bank = bank | (ipv4 << 7);   /* XK_LPM_IPV4 */
	__builtin_memcpy(key->prefix, words, sizeof(words));
}

/* Is the source on the bank's list (XK_LIST_ALLOW, XK_LIST_DENY)? The flag
 * and the bitmap answer most packets, this CPU's copy most of the rest
 * (list_cache), before the trie is walked. */
static __always_inline int source_listed(struct xk_settings *set, __u32 bank, __u32 list, struct xk_packet *pkt)
{
	__u32 has = list == XK_LIST_ALLOW ? XK_SET_HAS_ALLOW : XK_SET_HAS_DENY;
	if (!(set->flags & has) || !source_may_be_listed(bank, list, pkt))
		return 0;
	__u64 epoch = lists_epoch();   /* before the trie (xknock_hints.h, list_cache) */
	__u32 tag = 1 + bank + 2 * list;
	struct xk_list_copy *copy = list_copy_slot(&pkt->src, tag);
	if (list_copy_of(copy, &pkt->src, tag, epoch) && packet_now(pkt) <= copy->found_ns + XK_COPY_FOR_NS)
		return 1;
	struct xk_lpm_key key = {};
	source_key(&key, bank, pkt);
	int found = (list == XK_LIST_ALLOW ? allow.lookup(&key) : deny.lookup(&key)) != NULL;
	if (found)
		keep_list_copy(copy, &pkt->src, tag, epoch, packet_now(pkt));
	return found;
}

/* The allow-list without copies: for bans and IPsec refusals, rare paths
 * where copies cost the verifier a third more states (docs/architecture.md). */
static __always_inline int source_allowed(struct xk_settings *set, __u32 bank, struct xk_packet *pkt)
{
	if (!(set->flags & XK_SET_HAS_ALLOW) || !source_may_be_listed(bank, XK_LIST_ALLOW, pkt))
		return 0;
	struct xk_lpm_key key = {};
	source_key(&key, bank, pkt);
	return allow.lookup(&key) != NULL;
}

static __always_inline int source_denied(struct xk_settings *set, __u32 bank, struct xk_packet *pkt)
{
	return source_listed(set, bank, XK_LIST_DENY, pkt);
}

/* Is the source banned now? A ban found over is removed on the way. */
static __always_inline int source_banned(struct xk_packet *pkt)
{
	struct xk_ban *ban = bans.lookup(&pkt->src);
	if (!ban)
		return 0;
	if (packet_now(pkt) < ban->until_ns)
		return 1;
	if (bans.delete(&pkt->src) == 0)
		count(XK_BAN_EXPIRED);
	return 0;
}

/* One more failed sequence (a reset or a time-out) for the packet's source;
 * at the configured count within the window, the source is banned. Counting
 * races between CPUs can lose a failure, never invent one. */
static __always_inline void record_failure(struct xk_packet *pkt, struct xk_settings *set, __u32 bank, __u64 now)
{
	if (!(set->flags & XK_SET_BANS) || set->ban_after == 0)
		return;
	__u64 failed = 1;
	struct xk_failures *seen = failures.lookup(&pkt->src);
	if (!seen) {
		struct xk_failures fresh = {};
		fresh.window_start_ns = now;
		fresh.count = 1;
		failures.update(&pkt->src, &fresh);
	} else if (now > seen->window_start_ns && now - seen->window_start_ns > set->ban_within_ns) {
		seen->window_start_ns = now;
		seen->count = 1;
	} else {
		failed = __sync_fetch_and_add(&seen->count, 1) + 1;
	}
	if (failed < set->ban_after)
		return;
	if (source_allowed(set, bank, pkt)) {
		count(XK_BAN_SPARED);   /* the allow-list is never banned */
		return;
	}
	struct xk_ban ban = {};
	ban.until_ns = now + set->ban_for_ns;
	ban.since_ns = now;
	int err = bans.insert(&pkt->src, &ban);
	if (err == 0) {
		count(XK_BAN_ISSUED);
		emit(XK_EV_BANNED, now, pkt, 0, 0);
		failures.delete(&pkt->src);   /* after the ban, counting starts afresh */
	} else if (err != -EEXIST) {
		count(XK_BAN_FAILED);
	}
}

/* IPsec and the transports xknock cannot open, when the live settings refuse
 * them: refused unless the source is on the allow-list. Returns the verdict,
 * or 0 to judge the packet as usual. */
static __always_inline __u32 unseen_verdict(struct xk_packet *pkt, struct xk_settings *set, __u32 bank)
{
	__u8 unseen = pkt->unseen;
	__u32 reason = 0;
	if ((unseen & XK_UNSEEN_IPSEC) && (set->flags & XK_SET_DROP_IPSEC))
		reason = XK_DROP_IPSEC;
	else if ((unseen & XK_UNSEEN_TRANSPORT) && (set->flags & XK_SET_DROP_TRANSPORTS))
		reason = XK_DROP_TRANSPORT;
	if (!reason)
		return 0;
	if (source_allowed(set, bank, pkt))
		return XK_PASS_ALLOWLIST;
	pkt->answerable = XK_ANSWERED_AS_UNKNOWN;
	return reason;
}

/* A TCP SYN opens a connection and needs the grant's window; everything else
 * (established TCP, UDP) is kept alive by the idle clock too. */
static __always_inline __u32 guarded_verdict(struct xk_packet *pkt, struct xk_settings *set, __u32 bank)
{
	if (source_listed(set, bank, XK_LIST_ALLOW, pkt))
		return XK_PASS_ALLOWLIST;

	if (!source_may_hold_grant(pkt))
		return XK_DROP_NO_GRANT;   /* spares the hash's miss, most of a guarded drop */
	struct xk_grant_key key = {};
	key.src = pkt->src;
	key.proto = pkt->proto;
	key.port = pkt->dport;
	struct xk_grant_epochs seen;
	read_grant_epochs(&seen);   /* before the hash (xknock_hints.h, grant_cache) */
	int opens = pkt->proto == XK_PROTO_TCP && (pkt->tcp_flags & XK_TCP_SYN) &&
		    !(pkt->tcp_flags & XK_TCP_ACK);
	struct xk_grant_copy *copy = grant_copy(&key, &seen);
	if (copy) {
		__u64 now = packet_now(pkt);   /* only a grant's clocks need the time */
		if (now <= copy->last_seen_ns + XK_GRANT_REFRESH_NS &&
		    (now < copy->window_end_ns || (!opens && now < copy->last_seen_ns + copy->idle_timeout_ns)))
			return XK_PASS_GRANT;
	}

	struct xk_grant *grant = grants.lookup(&key);
	if (!grant)
		return XK_DROP_NO_GRANT;
	__u64 now = packet_now(pkt);
	__u64 last_seen = grant->last_seen_ns;
	int in_window = now < grant->window_end_ns;
	int idle_alive = now < last_seen + grant->idle_timeout_ns;
	if (in_window || (!opens && idle_alive)) {
		/* Coarse refresh: one store a second at most, not one per packet. */
		if (now > last_seen + XK_GRANT_REFRESH_NS)
			grant->last_seen_ns = now;
		keep_grant_copy(&key, grant, &seen);
		return XK_PASS_GRANT;
	}
	if (!idle_alive) {
		/* Dead on both clocks: remove it so the map does not fill with corpses. */
		__u32 seq_uid = grant->seq_uid;
		if (grants.delete(&key) == 0) {   /* another CPU or the sweep may have won */
			datapath_wrote_grants();   /* its copies are dead too; this says so on any clock */
			count(XK_GRANT_EXPIRED);
			emit(XK_EV_EXPIRED, now, pkt, seq_uid, 0);
		}
	}
	return XK_DROP_NO_GRANT;
}

#endif
