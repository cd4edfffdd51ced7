/* xknock_strict.h: strict mode, the seed's "no intervening packets". A new
 * connection (TCP SYN, UDP datagram, ICMP echo) from a knocking source to a
 * port that is not its next step ends its knock progress; its established
 * traffic (TCP without SYN) does not.
 *
 * `recent` holds one slot per hash of the source: when it last knocked, and
 * when it last opened a connection elsewhere since. A source that is not
 * knocking costs one read of its slot, never a write or an insert: a flood of
 * new sources cannot fill anything. Two sources sharing a slot overwrite each
 * other's words, which makes strictness forget a touch (the tags tell them
 * apart): never a reset of anyone's knock.
 *
 * `knocking` sits in front of `recent`: a word per hash of the source, the
 * last time a source of that hash knocked. A new connection from a source
 * whose word is older than the longest step timeout reads nothing else: a
 * flood of SYNs from random sources reads words of a 64 KB array, not slots
 * of a 4 MB one that miss the cache (measured: 70 ns a frame live). A word only
 * ever says "look": a slot of `recent` it hides is too old to count. */
#ifndef XKNOCK_STRICT_H
#define XKNOCK_STRICT_H

#include "xknock_consts.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"
#include "xknock_hash.h"
#include "xknock_clock.h"

#define XK_RECENT_TIME_BITS 40
#define XK_RECENT_TIME_MASK ((1ULL << XK_RECENT_TIME_BITS) - 1)
#define XK_RECENT_WORD(tag, us) ((((__u64)(tag)) << XK_RECENT_TIME_BITS) | ((us) & XK_RECENT_TIME_MASK))
#define XK_RECENT_TAG(word) ((__u32)((word) >> XK_RECENT_TIME_BITS))

static __always_inline __u32 recent_hash(struct xk_addr *src)
{
	__u32 words[4];
	__builtin_memcpy(words, src->b, sizeof(words));
	return xk_mix32((words[0] ^ words[1] ^ words[2]) * 0x9e3779b1 ^ words[3]);
}

/* The source's slot and its 24-bit tag (never 0: an empty word matches nobody). */
static __always_inline struct xk_recent *recent_slot(struct xk_packet *pkt, __u32 *tag)
{
	__u32 h = recent_hash(&pkt->src);
	__u32 idx = h & (XK_RECENT_SLOTS - 1);
	*tag = (xk_mix32(h + 0x27d4eb2f) >> 8) | 1;
	return recent.lookup(&idx);
}

/* How long ago a word of this source was written, us; or ~0 when it is not
 * this source's or older than any step timeout. */
static __always_inline __u64 recent_age(__u64 word, __u32 tag, __u64 now_us, __u64 window_us)
{
	if (XK_RECENT_TAG(word) != tag)
		return ~0ULL;
	__u64 age = (now_us - word) & XK_RECENT_TIME_MASK;
	return age <= window_us ? age : ~0ULL;
}

static __always_inline u64 *knocking_word(struct xk_addr *src)
{
	__u32 idx = (recent_hash(src) >> 16) & (XK_KNOCKING_SLOTS - 1);
	return knocking.lookup(&idx);
}

/* May the source be knocking: has a source of its word knocked within the
 * longest step timeout (and the microsecond recent_age rounds to)? A map that
 * has not yet seen a step timeout pass since its first packet answers yes: a
 * new program's map is empty, while `recent` kept the old program's knocks. */
static __always_inline int may_be_knocking(struct xk_packet *pkt, struct xk_settings *set)
{
	__u32 idx = XK_KNOCKING_SINCE;
	u64 *since = knocking.lookup(&idx);
	u64 *word = knocking_word(&pkt->src);
	if (!since || !word)
		return 1;
	__u64 now = peek_now(pkt);   /* coarse: never ahead of the precise time a step wrote */
	__u64 window_ns = (set->knock_window_us + 1) * 1000 + XK_KNOCKING_SLACK_NS;
	__u64 begun = *(volatile u64 *)since;
	if (!begun) {
		__sync_val_compare_and_swap(since, 0, now | 1);
		return 1;
	}
	if (now < begun || now - begun <= window_ns)
		return 1;
	return (__s64)(now - *(volatile u64 *)word) <= (__s64)window_ns;
}

/* A knock was taken: the source is knocking for the next step timeout.
 * now: the knock's time, ns (precise in strict mode). */
static __always_inline void mark_knocking(struct xk_packet *pkt, __u64 now)
{
	u64 *word = knocking_word(&pkt->src);
	if (word && *(volatile u64 *)word < now)
		*word = now;   /* before the slot: a reader that sees the slot's knock sees this */
	__u32 tag;
	struct xk_recent *slot = recent_slot(pkt, &tag);
	if (slot)
		slot->knock = XK_RECENT_WORD(tag, now / 1000);
}

/* A new connection to a port that is not a step: remembered only if the
 * source is knocking. A slot that is not the source's needs no clock. */
static __always_inline void touch_if_knocking(struct xk_packet *pkt, struct xk_settings *set)
{
	if (!may_be_knocking(pkt, set))
		return;
	__u32 tag;
	struct xk_recent *slot = recent_slot(pkt, &tag);
	if (!slot || XK_RECENT_TAG(slot->knock) != tag)
		return;
	__u64 now_us = precise_now(pkt) / 1000;   /* ordered against the steps' times: precise */
	if (recent_age(slot->knock, tag, now_us, set->knock_window_us) == ~0ULL)
		return;
	slot->touch = XK_RECENT_WORD(tag, now_us);
}

/* When the source last opened a connection elsewhere while knocking, us; 0: never. */
static __always_inline __u64 last_touch_us(struct xk_packet *pkt, __u64 now_us, struct xk_settings *set)
{
	__u32 tag;
	struct xk_recent *slot = recent_slot(pkt, &tag);
	if (!slot)
		return 0;
	__u64 age = recent_age(slot->touch, tag, now_us, set->knock_window_us);
	if (age == ~0ULL || age >= now_us)
		return 0;
	return now_us - age;
}

/* What starts a connection: the packets that count as intervening. */
static __always_inline int opens_connection(struct xk_packet *pkt)
{
	if (pkt->proto == XK_PROTO_TCP)
		return (pkt->tcp_flags & (XK_TCP_SYN | XK_TCP_ACK)) == XK_TCP_SYN;
	return 1;   /* UDP, ICMP echo: parsing let nothing else through */
}

#endif
