/* xknock_stats.h: counting reasons and emitting events. */
#ifndef XKNOCK_STATS_H
#define XKNOCK_STATS_H

#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"

static __always_inline void count(__u32 reason)
{
	u64 *value = counters.lookup(&reason);
	if (value)
		*value += 1;   /* per-CPU: no atomics needed */
}

static __always_inline void emit(__u8 type, __u64 now, struct xk_packet *pkt, __u32 seq_uid, __u8 step)
{
	struct xk_event ev = {};
	ev.ts_ns = now;
	ev.src = pkt->src;
	ev.seq_uid = seq_uid;
	ev.type = type;
	ev.step = step;
	ev.proto = pkt->proto;
	ev.port = pkt->dport;
	if (events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
		count(XK_EVENT_LOST);
}

#endif
