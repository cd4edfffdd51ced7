/* xknock_knock.h: the knock state machine. Progress per (source, sequence) is
 * one packed 64-bit word changed only by compare-and-swap, so packets of one
 * source on several CPUs can neither skip a step nor complete twice. */
#ifndef XKNOCK_KNOCK_H
#define XKNOCK_KNOCK_H

#define XK_STATE(step, ts_us) ((((__u64)(ts_us)) << 8) | ((__u64)(step) & 0xff))
#define XK_STATE_STEP(s) ((__u32)((s) & 0xff))
#define XK_STATE_TS_US(s) ((s) >> 8)

enum xk_knock_outcome {
	XK_OUT_NONE = 0,     /* no step taken */
	XK_OUT_ADVANCED,
	XK_OUT_COMPLETED,
	XK_OUT_REPEATED,     /* the step just accepted, again */
	XK_OUT_CONTENDED,    /* other CPUs won every compare-and-swap */
};
#define XK_KNOCK_OUTCOME 0xff
#define XK_KNOCK_WAS_TIMED_OUT (1U << 8)
#define XK_KNOCK_WAS_RESET (1U << 9)
#define XK_KNOCK_REACHED_SHIFT 16

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
	emit(failed ? XK_EV_GRANT_FAILED : XK_EV_GRANTED, now, pkt, seq->uid, seq->nsteps);
}

/* One knock against one sequence this port belongs to. */
static __always_inline void knock_sequence(struct xk_packet *pkt, struct xk_port_seq *ps, __u64 now,
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
	if (!state) {
		if (!(mask & 1)) {
			count(XK_KNOCK_IGNORED);   /* nothing in progress, not a first step */
			return;
		}
		if (nsteps > 1) {
			u64 fresh = XK_STATE(1, now_us);
			if (progress.insert(&key, &fresh) == 0) {
				count(XK_KNOCK_ADVANCED);
				struct xk_seq_stats *first = seqstats.lookup(&key.uid);
				if (first)
					first->advanced++;
				return;
			}
		}
		/* A one-step sequence, or another CPU inserted first: go through CAS. */
		if (nsteps == 1) {
			u64 zero = XK_STATE(0, now_us);
			progress.insert(&key, &zero);
		}
		state = progress.lookup(&key);
		if (!state)
			return;
	}

	enum xk_knock_outcome outcome = XK_OUT_CONTENDED;
	int timed_out = 0, reset = 0;
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
		/* Completed progress is kept until it times out, so that a repeat of
		 * the final knock is recognised and ignored. */
		if (next > 0 && now_us > last_us && now_us - last_us > timeout_us) {
			timed_out = next < nsteps;
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
			if (new_step == 0 && next == 0 && !timed_out) {
				outcome = XK_OUT_NONE;
				break;
			}
		}
		if (new_step == 0)
			outcome = XK_OUT_NONE;
		else
			outcome = new_step == nsteps ? XK_OUT_COMPLETED : XK_OUT_ADVANCED;
		u64 updated = XK_STATE(new_step, now_us);
		if (__sync_val_compare_and_swap(state, old, updated) == old)
			break;
		outcome = XK_OUT_CONTENDED;
	}

	/* Through map memory, so that what follows is verified once, not once
	 * for every path through the loop above. */
	pkt->knock = outcome | (timed_out ? XK_KNOCK_WAS_TIMED_OUT : 0) | (reset ? XK_KNOCK_WAS_RESET : 0) |
		     (reached << XK_KNOCK_REACHED_SHIFT);
	__u32 knock = *(volatile __u32 *)&pkt->knock;
	outcome = knock & XK_KNOCK_OUTCOME;
	timed_out = knock & XK_KNOCK_WAS_TIMED_OUT;
	reset = knock & XK_KNOCK_WAS_RESET;
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
	if (timed_out || reset)
		record_failure(pkt, set, bank, now);
	switch (outcome) {
	case XK_OUT_ADVANCED:
		count(XK_KNOCK_ADVANCED);
		break;
	case XK_OUT_COMPLETED:
		count(XK_KNOCK_COMPLETED);
		write_grants(seq, pkt, now);
		break;
	case XK_OUT_REPEATED:
		count(XK_KNOCK_REPEATED);
		break;
	default:
		if (!timed_out && !reset)
			count(XK_KNOCK_IGNORED);
		break;
	}
}

/* Every knock port packet is dropped; this only records what it meant. */
static __always_inline void handle_knock(struct xk_packet *pkt, struct xk_port_val *port, __u64 now,
					 struct xk_settings *set, __u32 bank)
{
	if (pkt->proto == XK_PROTO_TCP &&
	    (!(pkt->tcp_flags & XK_TCP_SYN) || (pkt->tcp_flags & XK_TCP_ACK))) {
		count(XK_KNOCK_IGNORED);   /* TCP knocks are SYNs only */
		return;
	}
	/* The index goes through map memory: every iteration then starts in the
	 * same verifier state and the body is verified once, not once per index. */
	pkt->seq_idx = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < XK_MAX_SEQS_PER_PORT; i++) {
		__u32 idx = *(volatile __u8 *)&pkt->seq_idx;
		if (idx >= port->nseqs || idx >= XK_MAX_SEQS_PER_PORT)
			break;
		knock_sequence(pkt, &port->seqs[idx], now, set, bank);
		pkt->seq_idx = idx + 1;
	}
}

#endif
