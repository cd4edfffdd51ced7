/* xknock_knock.h: the knock state machine. Progress per (source, sequence) is
 * one packed 64-bit word changed only by compare-and-swap, so packets of one
 * source on several CPUs can neither skip a step nor complete twice.
 *
 * A first step is the only one anybody can send without knowing the sequence,
 * so a flood of spoofed first knocks must neither evict a client's progress
 * nor cost much. First steps therefore live in `firsts`, a large array of
 * (tag, time) words at two slots hashed from (source, sequence): writing one
 * takes the older of the two slots, costs no allocation and evicts nobody who
 * got further. Only a right second step moves a source into the LRU `progress`
 * map, so that only sources that know two steps compete for it. */
#ifndef XKNOCK_KNOCK_H
#define XKNOCK_KNOCK_H

#include "xknock_consts.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"
#include "xknock_hash.h"
#include "xknock_stats.h"
#include "xknock_policy.h"
#include "xknock_strict.h"

/* The knock code's own scratch: per CPU, in map memory for the same reason
 * as struct xk_packet (the verifier does not track values there, so the loop
 * over a port's sequences and the compare-and-swap loop join into one state),
 * and apart from it so that packets that are no knock neither zero nor carry it. */
struct xk_knock_scratch {
	__u8 seq_idx;     /* which of the port's sequences is being knocked */
	__u8 took;        /* a knock some sequence took (advanced, completed or repeated) */
	__u16 pad;
	__u32 bank;       /* re-read through map memory on each pass of the sequence loop */
	__u32 knock;      /* what a knock did: enum xk_knock_outcome | XK_KNOCK_* bits */
	__u32 first;      /* enum xk_first_result */
	__u64 first_us;   /* when the first step held in `firsts` came */
	__u64 touched_us; /* strict mode: the source's last new connection elsewhere, us; 0: none */
};
BPF_PERCPU_ARRAY(knock_scratch, struct xk_knock_scratch, 1);

#define XK_STATE(step, ts_us) ((((__u64)(ts_us)) << 8) | ((__u64)(step) & 0xff))
#define XK_STATE_STEP(s) ((__u32)((s) & 0xff))
#define XK_STATE_TS_US(s) ((s) >> 8)

enum xk_knock_outcome {
	XK_OUT_NONE = 0,     /* no step taken */
	XK_OUT_ADVANCED,
	XK_OUT_COMPLETED,
	XK_OUT_REPEATED,     /* the step just accepted, again */
	XK_OUT_CONTENDED,    /* other CPUs won every compare-and-swap */
	XK_OUT_RACED,        /* a restart whose first step another CPU placed first */
};
#define XK_KNOCK_OUTCOME 0xff
#define XK_KNOCK_WAS_TIMED_OUT (1U << 8)
#define XK_KNOCK_WAS_RESET (1U << 9)
#define XK_KNOCK_REACHED_SHIFT 16
#define XK_KNOCK_TO_FIRSTS (1U << 10)   /* a restart: step 1 goes into `firsts` */
#define XK_KNOCK_WAS_STRICT (1U << 11)  /* strict mode: a packet to another port ended progress */

/* The hash of (source, sequence uid) that places a first step; mirrored by
 * controller/firsts.py. */
static __always_inline __u32 first_hash(struct xk_addr *src, __u32 uid)
{
	__u32 words[4];
	__builtin_memcpy(words, src->b, sizeof(words));
	__u32 h = uid * 0x9e3779b1;
	h = xk_mix32(h ^ words[0]);
	h = xk_mix32(h ^ words[1]);
	h = xk_mix32(h ^ words[2]);
	h = xk_mix32(h ^ words[3]);
	return h;
}

#define XK_FIRST_TAG(h) (xk_mix32((h) + 0x27d4eb2f) | 1)
#define XK_FIRST_SLOT1(h) ((h) & (XK_FIRST_SLOTS - 1))
#define XK_FIRST_SLOT2(h) (xk_mix32((h) ^ 0x5bd1e995) & (XK_FIRST_SLOTS - 1))
#define XK_FIRST_WORD(tag, us) ((((__u64)(tag)) << 32) | (__u32)(us))

/* How long ago a slot was written, in us (wrapping at 2^32 us); empty is oldest. */
static __always_inline __u32 first_age(__u64 word, __u64 now_us)
{
	return word ? (__u32)now_us - (__u32)word : 0xffffffff;
}

/* Puts the source's first step of a sequence into the older of its two slots,
 * deciding from one reading (w1, w2) of both: CPUs that read alike choose
 * alike, so only one compare-and-swap wins. Returns XK_OUT_ADVANCED,
 * XK_OUT_REPEATED when the step is already held and fresh, or
 * XK_OUT_CONTENDED when another CPU wrote the slot first. */
static __always_inline int place_first(u64 *slot1, u64 *slot2, u64 w1, u64 w2, __u32 tag, __u64 now_us,
				       __u64 timeout_us)
{
	if (((w1 >> 32) == tag && first_age(w1, now_us) <= timeout_us) ||
	    ((w2 >> 32) == tag && first_age(w2, now_us) <= timeout_us))
		return XK_OUT_REPEATED;
	int first_is_older = first_age(w1, now_us) >= first_age(w2, now_us);
	u64 *target = first_is_older ? slot1 : slot2;
	u64 seen = first_is_older ? w1 : w2;
	if (__sync_val_compare_and_swap(target, seen, XK_FIRST_WORD(tag, now_us)) != seen)
		return XK_OUT_CONTENDED;
	return XK_OUT_ADVANCED;
}

enum xk_first_result {
	XK_FIRST_DONE = 0,      /* the packet is fully handled and counted */
	XK_FIRST_STEP_TWO,      /* a right second step: move the source into `progress` */
};

/* Writes one grant entry per port the sequence opens. */
static __always_inline void write_grants(struct xk_seq *seq, struct xk_packet *pkt, __u64 now)
{
	struct xk_grant grant = {};
	grant.window_end_ns = now + seq->open_for_ns;
	grant.idle_timeout_ns = seq->idle_timeout_ns;
	grant.last_seen_ns = now;
	grant.seq_uid = seq->uid;
	__u32 failed = 0;

#pragma unroll
	for (int i = 0; i < XK_MAX_OPEN; i++) {
		if (i >= seq->nopen)
			break;
		struct xk_grant_key key = {};
		key.src = pkt->src;
		key.proto = seq->open[i].proto;
		key.port = seq->open[i].port;
		/* Counting inside the loop keeps the verifier's paths from multiplying. */
		int existed = grants.lookup(&key) != NULL;
		if (grants.update(&key, &grant) == 0) {
			count(XK_GRANT_ISSUED);
			if (!existed)
				count(XK_GRANT_CREATED);
		} else {
			count(XK_GRANT_FAILED);
			failed = 1;
		}
	}
	mark_granted(pkt);   /* after the writes: a byte set means its grant is there */
	datapath_wrote_grants();   /* a rewritten grant's copies no longer count */
	emit(failed ? XK_EV_GRANT_FAILED : XK_EV_GRANTED, now, pkt, seq->uid, seq->nsteps);
}

static __always_inline void count_seq(__u32 uid, int advanced, int reset, int timed_out)
{
	struct xk_seq_stats *stats = seqstats.lookup(&uid);
	if (stats) {
		stats->advanced += advanced;
		stats->reset += reset;
		stats->timed_out += timed_out;
	}
}

/* A knock for a sequence in which the source has nothing in `progress`: its
 * first step, if any, is in `firsts`. Counts exactly as the progress word
 * would: a first step advances, its repeat is ignored, a right second step is
 * handed back (*first_us: when the first came), anything else resets or times
 * out the first step. */
static __always_inline enum xk_first_result first_knock(struct xk_packet *pkt, struct xk_knock_scratch *ks,
							 struct xk_seq *seq, __u32 mask,
							 __u64 now_us, __u64 timeout_us, __u64 *first_us,
							 struct xk_settings *set, __u32 bank, __u64 now)
{
	__u32 h = first_hash(&pkt->src, seq->uid);
	__u32 tag = XK_FIRST_TAG(h);
	__u32 i1 = XK_FIRST_SLOT1(h), i2 = XK_FIRST_SLOT2(h);
	u64 *slot1 = firsts.lookup(&i1);
	u64 *slot2 = firsts.lookup(&i2);
	if (!slot1 || !slot2)
		return XK_FIRST_DONE;

	/* One reading of both slots decides everything below. */
	u64 w1 = *(volatile u64 *)slot1;
	u64 w2 = *(volatile u64 *)slot2;
	int in1 = (w1 >> 32) == tag, in2 = (w2 >> 32) == tag;
	u64 *mine = NULL;
	u64 old = 0;
	if (in1 && (!in2 || first_age(w1, now_us) <= first_age(w2, now_us))) {
		mine = slot1;
		old = w1;
	} else if (in2) {
		mine = slot2;
		old = w2;
	}
	int timed_out = 0, struck = 0;
	if (mine) {
		__u32 age = first_age(old, now_us);
		int fresh = age <= timeout_us;
		/* Strict mode: a packet to another port since the first step ended it. */
		struck = fresh && *(volatile __u64 *)&ks->touched_us > now_us - age;
		if (fresh && !struck && (mask & 1)) {
			/* The first step again: it starts the sequence anew, so it
			 * takes its own time. The slot stays young, and a repeated
			 * first step (knock --repeat) outlives a flood of first steps
			 * until the second comes. Lost to another CPU: held anyway. */
			__sync_val_compare_and_swap(mine, old, XK_FIRST_WORD(tag, now_us));
			count(XK_KNOCK_REPEATED);
			ks->took = 1;
			return XK_FIRST_DONE;
		}
		if (__sync_val_compare_and_swap(mine, old, 0) != old) {
			count(XK_KNOCK_CONTENDED);
			return XK_FIRST_DONE;
		}
		if (mine == slot1)
			w1 = 0;
		else
			w2 = 0;
		if (fresh && !struck) {
			if (mask & 2) {
				*first_us = now_us - age;
				return XK_FIRST_STEP_TWO;
			}
			count(XK_KNOCK_RESET);   /* a wrong second step */
			emit(XK_EV_RESET, now, pkt, seq->uid, 1);
			count_seq(seq->uid, 0, 1, 0);
			record_failure(pkt, set, bank, now);
			return XK_FIRST_DONE;
		}
		if (struck) {
			/* A reset like a wrong knock's, but never counted towards a
			 * ban: anyone can forge a SYN from a user's address. This
			 * knock is judged afresh below. */
			count(XK_KNOCK_RESET);
			count(XK_KNOCK_STRICT_RESET);
			emit(XK_EV_RESET, now, pkt, seq->uid, 1);
			count_seq(seq->uid, 0, 1, 0);
		} else {
			timed_out = 1;
			count(XK_KNOCK_TIMED_OUT);
			emit(XK_EV_TIMED_OUT, now, pkt, seq->uid, 1);
			count_seq(seq->uid, 0, 0, 1);
			record_failure(pkt, set, bank, now);
		}
	}
	if (!(mask & 1)) {
		if (!timed_out && !struck)
			count(XK_KNOCK_IGNORED);   /* nothing in progress, not a first step */
		return XK_FIRST_DONE;
	}
	int placed = place_first(slot1, slot2, w1, w2, tag, now_us, timeout_us);
	if (placed == XK_OUT_ADVANCED) {
		count(XK_KNOCK_ADVANCED);
		count_seq(seq->uid, 1, 0, 0);
		ks->took = 1;
	} else {
		ks->took = placed == XK_OUT_REPEATED;
		count(placed == XK_OUT_REPEATED ? XK_KNOCK_REPEATED : XK_KNOCK_CONTENDED);
	}
	return XK_FIRST_DONE;
}

/* One knock against one sequence this port belongs to. */
static __always_inline void knock_sequence(struct xk_packet *pkt, struct xk_knock_scratch *ks,
					   struct xk_port_seq *ps, __u64 now,
					   struct xk_settings *set, __u32 bank)
{
	__u32 slot = ps->slot;
	__u32 mask = ps->step_mask;
	struct xk_seq *seq = seqs.lookup(&slot);
	if (!seq || seq->nsteps == 0 || seq->nsteps > XK_MAX_STEPS)
		return;
	__u32 nsteps = seq->nsteps;
	__u64 now_us = now / 1000;
	__u64 timeout_us = seq->step_timeout_ns / 1000;

	struct xk_progress_key key = {};
	key.src = pkt->src;
	key.uid = seq->uid;

	u64 *state = progress.lookup(&key);
	if (nsteps > 1 && (!state || XK_STATE_STEP(*state) == 0)) {
		/* Nothing in progress here: the first step is in `firsts`. */
		__u64 first_us = 0;
		ks->first = first_knock(pkt, ks, seq, mask, now_us, timeout_us, &first_us, set, bank, now);
		ks->first_us = first_us;
		/* Through map memory, so that what follows is verified once. */
		if (*(volatile __u32 *)&ks->first != XK_FIRST_STEP_TWO)
			return;
		u64 one = XK_STATE(1, *(volatile __u64 *)&ks->first_us);
		if (!state) {
			progress.insert(&key, &one);   /* losing to another CPU is fine: it is there */
			state = progress.lookup(&key);
			if (!state)
				return;
		} else {
			/* Step 0 here may be rewritten by another CPU's restart
			 * meanwhile: try again, so the consumed first step is not lost. */
			u64 old = *(volatile u64 *)state;
			if (XK_STATE_STEP(old) == 0 && __sync_val_compare_and_swap(state, old, one) != old) {
				old = *(volatile u64 *)state;
				if (XK_STATE_STEP(old) == 0)
					__sync_val_compare_and_swap(state, old, one);
			}
		}
		/* on to the compare-and-swap below, which takes this second step */
	} else if (!state) {
		/* A one-step sequence: its state lives in `progress` from the start. */
		if (!(mask & 1)) {
			count(XK_KNOCK_IGNORED);
			return;
		}
		u64 zero = XK_STATE(0, now_us);
		progress.insert(&key, &zero);
		state = progress.lookup(&key);
		if (!state)
			return;
	}

	enum xk_knock_outcome outcome = XK_OUT_CONTENDED;
	int timed_out = 0, reset = 0, to_firsts = 0, struck = 0;
	__u64 touched_us = *(volatile __u64 *)&ks->touched_us;
	__u32 reached = 0;
#pragma clang loop unroll(disable)
	for (int attempt = 0; attempt < XK_CAS_ATTEMPTS; attempt++) {
		u64 old = *(volatile u64 *)state;
		__u32 next = XK_STATE_STEP(old);
		__u64 last_us = XK_STATE_TS_US(old);
		__u32 new_step;
		reached = next;
		timed_out = 0;
		reset = 0;
		to_firsts = 0;
		struck = 0;
		/* Completed progress is kept until it times out, so that a repeat of
		 * the final knock is recognised and ignored. */
		if (next > 0 && now_us > last_us && now_us - last_us > timeout_us) {
			timed_out = next < nsteps;
			next = 0;
		} else if (next > 0 && next < nsteps && touched_us > last_us) {
			/* Strict mode: a packet to another port since the last step
			 * ended progress; this knock is judged afresh. */
			struck = 1;
			next = 0;
		}
		if (next < nsteps && (mask & (1U << (next & 31)))) {
			new_step = next + 1;
		} else if (next == nsteps && (mask & 1)) {
			/* After completion a first step starts anew, even when it is
			 * also the last step: knocking again renews the grant, and a
			 * retransmitted last knock only starts progress. */
			new_step = 1;
		} else if (next > 0 && (mask & (1U << ((next - 1) & 31)))) {
			outcome = XK_OUT_REPEATED;
			break;
		} else {
			/* A wrong knock: progress is lost; a first step starts anew. */
			reset = next > 0 && next < nsteps;
			new_step = (mask & 1) ? 1 : 0;
			if (new_step == 0 && next == 0 && !timed_out && !struck) {
				outcome = XK_OUT_NONE;
				break;
			}
		}
		if (new_step == 0)
			outcome = XK_OUT_NONE;
		else
			outcome = new_step == nsteps ? XK_OUT_COMPLETED : XK_OUT_ADVANCED;
		/* A restart keeps its first step in `firsts`, like every first step. */
		to_firsts = new_step == 1 && nsteps > 1;
		u64 updated = XK_STATE(to_firsts ? 0 : new_step, now_us);
		if (__sync_val_compare_and_swap(state, old, updated) == old)
			break;
		outcome = XK_OUT_CONTENDED;
	}

	/* Through map memory, so that what follows is verified once, not once
	 * for every path through the loop above. */
	ks->knock = outcome | (timed_out ? XK_KNOCK_WAS_TIMED_OUT : 0) | (reset ? XK_KNOCK_WAS_RESET : 0) |
		     (to_firsts ? XK_KNOCK_TO_FIRSTS : 0) | (struck ? XK_KNOCK_WAS_STRICT : 0) |
		     (reached << XK_KNOCK_REACHED_SHIFT);
	__u32 knock = *(volatile __u32 *)&ks->knock;
	outcome = knock & XK_KNOCK_OUTCOME;
	timed_out = knock & XK_KNOCK_WAS_TIMED_OUT;
	struck = knock & XK_KNOCK_WAS_STRICT;
	reset = (knock & XK_KNOCK_WAS_RESET) || struck;
	to_firsts = knock & XK_KNOCK_TO_FIRSTS;
	if (to_firsts && outcome == XK_OUT_ADVANCED) {
		/* The restart's first step goes where every first step goes; if
		 * another CPU placed it meanwhile, this knock only repeats it. */
		__u32 h = first_hash(&pkt->src, seq->uid);
		__u32 i1 = XK_FIRST_SLOT1(h), i2 = XK_FIRST_SLOT2(h);
		u64 *slot1 = firsts.lookup(&i1);
		u64 *slot2 = firsts.lookup(&i2);
		if (slot1 && slot2) {
			int placed = place_first(slot1, slot2, *(volatile u64 *)slot1, *(volatile u64 *)slot2,
						 XK_FIRST_TAG(h), now_us, timeout_us);
			if (placed != XK_OUT_ADVANCED)
				outcome = placed == XK_OUT_REPEATED ? XK_OUT_REPEATED : XK_OUT_RACED;
		}
	}
	reached = (knock >> XK_KNOCK_REACHED_SHIFT) & 0xff;

	if (outcome == XK_OUT_CONTENDED) {
		count(XK_KNOCK_CONTENDED);
		return;
	}
	struct xk_seq_stats *stats = seqstats.lookup(&key.uid);
	if (stats) {
		stats->timed_out += timed_out ? 1 : 0;
		stats->reset += reset ? 1 : 0;
		stats->advanced += outcome == XK_OUT_ADVANCED ? 1 : 0;
		stats->completed += outcome == XK_OUT_COMPLETED ? 1 : 0;
	}
	if (timed_out) {
		count(XK_KNOCK_TIMED_OUT);
		emit(XK_EV_TIMED_OUT, now, pkt, seq->uid, reached);
	}
	if (reset) {
		count(XK_KNOCK_RESET);
		emit(XK_EV_RESET, now, pkt, seq->uid, reached);
	}
	if (struck)
		count(XK_KNOCK_STRICT_RESET);
	/* Strict resets never count towards a ban (see first_knock). */
	if (timed_out || (knock & XK_KNOCK_WAS_RESET))
		record_failure(pkt, set, bank, now);
	switch (outcome) {
	case XK_OUT_ADVANCED:
		count(XK_KNOCK_ADVANCED);
		ks->took = 1;
		break;
	case XK_OUT_COMPLETED:
		count(XK_KNOCK_COMPLETED);
		write_grants(seq, pkt, now);
		ks->took = 1;
		break;
	case XK_OUT_REPEATED:
		count(XK_KNOCK_REPEATED);
		ks->took = 1;
		break;
	case XK_OUT_RACED:
		count(XK_KNOCK_CONTENDED);
		break;
	default:
		if (!timed_out && !reset)
			count(XK_KNOCK_IGNORED);
		break;
	}
}

/* Every knock port packet is dropped (an ICMP echo passes: the host answers
 * the ping); this only records what it meant. */
static __always_inline void handle_knock(struct xk_packet *pkt, struct xk_port_val *port, __u64 now,
					 struct xk_settings *set, __u32 bank)
{
	if (pkt->proto == XK_PROTO_TCP &&
	    (!(pkt->tcp_flags & XK_TCP_SYN) || (pkt->tcp_flags & XK_TCP_ACK))) {
		count(XK_KNOCK_IGNORED);   /* TCP knocks are SYNs only */
		return;
	}
	__u32 zero = 0;
	struct xk_knock_scratch *ks = knock_scratch.lookup(&zero);
	if (!ks)
		return;
	/* The index, the clock and the bank go through map memory: what the body
	 * learnt about them (ranges from comparisons) would otherwise make every
	 * pass start in a state of its own, and the verifier's work multiply. */
	__builtin_memset(ks, 0, sizeof(*ks));
	pkt->now = now;
	ks->bank = bank;
	if (set->flags & XK_SET_STRICT)
		ks->touched_us = last_touch_us(pkt, now / 1000, set);
#pragma clang loop unroll(disable)
	for (int i = 0; i < XK_MAX_SEQS_PER_PORT; i++) {
		__u32 idx = *(volatile __u8 *)&ks->seq_idx;
		if (idx >= port->nseqs || idx >= XK_MAX_SEQS_PER_PORT)
			break;
		knock_sequence(pkt, ks, &port->seqs[idx], *(volatile __u64 *)&pkt->now, set,
			       *(volatile __u32 *)&ks->bank & 1);
		ks->seq_idx = idx + 1;
	}
	/* Read again, not kept in a register: a flag live across the loop
	 * would have the verifier walk the loop once for each of its values. */
	if (!(*(volatile __u32 *)&set->flags & XK_SET_STRICT))
		return;
	/* A knock some sequence here took keeps its source knocking; any other
	 * (the step of a sequence this source is not at) intervenes in the rest. */
	if (*(volatile __u8 *)&ks->took)
		mark_knocking(pkt, *(volatile __u64 *)&pkt->now);
	else
		touch_if_knocking(pkt, set);
}

#endif
