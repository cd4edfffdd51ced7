/* xknock_hints.h: arrays that spare the common packet its lookups.
 * port_flags: the flags of the port's entry in `ports` (0: none), so that
 * only knock steps look `ports` up. A clear bit in
 * list_bits: no entry of the list covers the source's IPv4 /16 (or the hash
 * of its IPv6 /32 or /48). A set bit only says "look": the lookup decides, so the
 * verdicts are those of the lookups alone. controller/policy/hints.py
 * mirrors the indexing and writes the bitmaps with the bank they describe.
 * granted: a clear byte of the live half: the source holds no grant. Whoever
 * writes a grant sets its source's byte in both halves after the write (the
 * data path with an atomic OR, the controller with a byte store through
 * mmap); only the controller's rebuild clears, the idle half alone, before
 * it scans `grants` and sets the byte of every grant it finds, then makes it
 * the live one (controller/state/grants.py rebuild_granted). A byte cleared
 * there belongs to a grant written before the clear, which the scan finds.
 * grant_cache: per CPU, a copy of a grant a packet passed on, so that the
 * flow's next packets pass without the grants hash (a call, about 40 ns of a
 * granted packet). A copy counts only while the two grants words of `epochs` are
 * those it was taken under, and for XK_GRANT_REFRESH_NS after it was taken;
 * then the hash is looked up again and the grant's idle clock refreshed, as
 * every packet did before. The controller writes a new value (never one seen
 * before) to its word after each change it makes to `grants` (revoke, the
 * sweep, an operator's grant, SPA, the cluster); the data path increments its
 * word after it writes a grant (a knock completed) or removes a dead one. The epochs are read before
 * the hash, so a copy taken under a value written after a change was looked
 * up after that change. A copy passes nothing the hash would refuse: its
 * window is the grant's, its last_seen no later than the grant's, and a grant
 * the data path removes is dead on both clocks, its copies with it.
 * list_cache: per CPU, a source found on the allow- or deny-list of a bank,
 * so that its next packets are judged without the trie (a call). A copy
 * counts under the lists' epoch it was taken under, and for XK_COPY_FOR_NS.
 * The controller writes a new value to that word before it writes a bank
 * (controller/policy/policy.py apply_policy): a copy of the bank's old
 * entries was taken while that bank was live, under an older value, and none
 * is taken of a bank that is not live (a packet reads the live bank first,
 * and a bank is rewritten a grace period after it stopped being live). */
#ifndef XKNOCK_HINTS_H
#define XKNOCK_HINTS_H

#include "xknock_consts.h"
#include "xknock_hash.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"

static __always_inline int bit_set(u64 *word, __u32 bit)
{
	return word && ((*word >> (bit & 63)) & 1);
}

/* The XK_PORT_* flags of (bank, protocol, port): 0 when it has no entry in `ports`. */
static __always_inline __u32 port_flags_of(__u32 bank, struct xk_packet *pkt)
{
	__u32 class = pkt->proto == XK_PROTO_TCP ? 0 : (pkt->proto == XK_PROTO_UDP ? 1 : 2);
	__u32 port = pkt->dport;
	__u32 idx = (bank * XK_PORT_CLASSES + class) * XK_PORT_FLAG_WORDS + (port >> 3);
	u64 *word = port_flags.lookup(&idx);
	return word ? (*word >> ((port & 7) * 8)) & 0xff : 0;
}

/* The source's slot in each half of `granted`: mirrored by controller/kernel/granted.py. */
static __always_inline __u32 granted_slot(struct xk_addr *src)
{
	__u32 w[4];
	__builtin_memcpy(w, src->b, sizeof(w));
	return xk_mix32(w[3] ^ xk_mix32(w[0] ^ w[1] ^ w[2])) & (XK_GRANTED_SLOTS - 1);
}

/* May the source hold a grant? 0 only when the live half's byte is clear. */
static __always_inline int source_may_hold_grant(struct xk_packet *pkt)
{
	__u32 idx = XK_GRANTED_SELECTOR;
	u64 *selector = granted.lookup(&idx);
	if (!selector)
		return 1;
	__u64 live = *selector;
	if (live != 1 && live != 2)
		return 1;   /* not built (yet): the lookup decides */
	__u32 slot = granted_slot(&pkt->src);
	idx = (live - 1) * XK_GRANTED_WORDS + slot / 8;
	u64 *word = granted.lookup(&idx);
	return !word || ((*word >> ((slot & 7) * 8)) & 0xff);
}

/* After a grant for the source is written: its byte in both halves. */
static __always_inline void mark_granted(struct xk_packet *pkt)
{
	__u32 slot = granted_slot(&pkt->src);
	__u64 byte = 1ULL << ((slot & 7) * 8);
	__u32 idx = slot / 8;
	u64 *word = granted.lookup(&idx);
	if (word)
		__sync_fetch_and_or(word, byte);
	idx += XK_GRANTED_WORDS;
	word = granted.lookup(&idx);
	if (word)
		__sync_fetch_and_or(word, byte);
}

struct xk_grant_epochs {
	__u64 controller;
	__u64 datapath;
};

static __always_inline void read_grant_epochs(struct xk_grant_epochs *seen)
{
	__u32 idx = XK_EPOCH_GRANTS_CONTROLLER;
	u64 *word = epochs.lookup(&idx);
	seen->controller = word ? *(volatile u64 *)word : 0;
	idx = XK_EPOCH_GRANTS_DATAPATH;
	word = epochs.lookup(&idx);
	seen->datapath = word ? *(volatile u64 *)word : 0;
}

/* After the data path wrote or removed a grant: every CPU's copies are taken again. */
static __always_inline void datapath_wrote_grants(void)
{
	__u32 idx = XK_EPOCH_GRANTS_DATAPATH;
	u64 *word = epochs.lookup(&idx);
	if (word)
		__sync_fetch_and_add(word, 1);
}

static __always_inline struct xk_grant_copy *grant_copy_slot(struct xk_grant_key *key)
{
	__u32 w[5];
	__builtin_memcpy(w, key, sizeof(w));
	__u32 slot = xk_mix32(w[3] ^ xk_mix32(w[0] ^ w[1] ^ w[2] ^ w[4])) & (XK_GRANT_CACHE_SLOTS - 1);
	return grant_cache.lookup(&slot);
}

/* This CPU's copy of key's grant, taken under the epochs seen (see
 * grant_cache above); NULL: the hash decides. Its age is the caller's to
 * judge: the time is read only for a copy or a grant. */
static __always_inline struct xk_grant_copy *grant_copy(struct xk_grant_key *key, struct xk_grant_epochs *seen)
{
	struct xk_grant_copy *copy = grant_copy_slot(key);
	if (!copy || !copy->filled || copy->epoch_controller != seen->controller ||
	    copy->epoch_datapath != seen->datapath)
		return NULL;
	__u32 want[5], have[5];
	__builtin_memcpy(want, key, sizeof(want));
	__builtin_memcpy(have, &copy->key, sizeof(have));
	if ((want[0] ^ have[0]) | (want[1] ^ have[1]) | (want[2] ^ have[2]) | (want[3] ^ have[3]) | (want[4] ^ have[4]))
		return NULL;
	return copy;
}

/* After grant passed a packet: this CPU's copy of it, under the epochs read before the hash. */
static __always_inline void keep_grant_copy(struct xk_grant_key *key, struct xk_grant *grant, struct xk_grant_epochs *seen)
{
	struct xk_grant_copy *copy = grant_copy_slot(key);
	if (!copy)
		return;
	copy->key = *key;
	copy->filled = 1;
	copy->epoch_controller = seen->controller;
	copy->epoch_datapath = seen->datapath;
	copy->window_end_ns = grant->window_end_ns;
	copy->idle_timeout_ns = grant->idle_timeout_ns;
	copy->last_seen_ns = grant->last_seen_ns;
}

static __always_inline struct xk_list_copy *list_copy_slot(struct xk_addr *src, __u32 tag)
{
	__u32 w[4];
	__builtin_memcpy(w, src->b, sizeof(w));
	__u32 slot = xk_mix32(w[3] ^ xk_mix32(w[0] ^ w[1] ^ w[2] ^ tag)) & (XK_LIST_CACHE_SLOTS - 1);
	return list_cache.lookup(&slot);
}

static __always_inline __u64 lists_epoch(void)
{
	__u32 idx = XK_EPOCH_LISTS;
	u64 *word = epochs.lookup(&idx);
	return word ? *(volatile u64 *)word : 0;
}

/* Is this CPU's copy one of src on the list of tag, under epoch (see
 * list_cache above)? Its age is the caller's to judge. */
static __always_inline int list_copy_of(struct xk_list_copy *copy, struct xk_addr *src, __u32 tag, __u64 epoch)
{
	if (!copy || copy->tag != tag || copy->epoch != epoch)
		return 0;
	__u32 want[4], have[4];
	__builtin_memcpy(want, src->b, sizeof(want));
	__builtin_memcpy(have, copy->src.b, sizeof(have));
	return !((want[0] ^ have[0]) | (want[1] ^ have[1]) | (want[2] ^ have[2]) | (want[3] ^ have[3]));
}

static __always_inline void keep_list_copy(struct xk_list_copy *copy, struct xk_addr *src, __u32 tag,
					   __u64 epoch, __u64 now)
{
	if (!copy)
		return;
	copy->src = *src;
	copy->tag = tag;
	copy->epoch = epoch;
	copy->found_ns = now;
}

static __always_inline int list_bit(__u32 bank, __u32 list, __u32 kind, __u32 bit)
{
	__u32 idx = (bank * XK_LIST_BITMAPS + list * 3 + kind) * XK_BITMAP_WORDS + (bit >> 6);
	return bit_set(list_bits.lookup(&idx), bit);
}

/* May an entry of the list (XK_LIST_ALLOW, XK_LIST_DENY) cover the source?
 * IPv4: the bit of the address's /16. IPv6: the bit of the hash of its /32
 * (entries shorter than /48) or of its /48 (the others): a site's /48 then
 * says nothing of its neighbours in the provider's /32. */
static __always_inline int source_may_be_listed(__u32 bank, __u32 list, struct xk_packet *pkt)
{
	if (pkt->ipv4)
		return list_bit(bank, list, XK_BITS_IPV4, ((__u32)pkt->src.b[12] << 8) | pkt->src.b[13]);
	__u32 w[2];
	__builtin_memcpy(w, pkt->src.b, sizeof(w));
	__u32 h32 = xk_mix32(w[0]);
	__u32 h48 = xk_mix32(h32 ^ (w[1] & 0xffff));   /* bytes 4 and 5 of the address */
	return list_bit(bank, list, XK_BITS_IPV6_32, h32 >> 16) || list_bit(bank, list, XK_BITS_IPV6_48, h48 >> 16);
}

#endif
