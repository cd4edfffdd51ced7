/* xknock_clock.h: the packet's "now", read when a path first needs it and
 * kept in the scratch packet for the rest. Reading the clock was the largest
 * single cost of a packet (about 40 ns of an unguarded pass's 140 under
 * bpftool prog run), and most packets (unguarded, deny- and allow-listed,
 * guarded without a grant) never look at the time. 0 means "not read yet".
 *
 * It is the coarse clock (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the
 * last tick), read once a tick per CPU (refresh_coarse_clock), two 1/HZ behind at
 * most: about 20 ns cheaper than the precise one under bpftool prog run, and
 * 20 more than a cached reading. Every time the data path keeps is compared with
 * its own later readings (non-decreasing on every CPU) or is a deadline the
 * controller wrote on CLOCK_MONOTONIC, which a lagging reading can pass two ticks
 * late, never early.
 *
 * In strict mode, knocks and touches read precise_now() instead: strict mode
 * orders a source's packets by their times (a connection elsewhere after the
 * last step ends the knock), which one tick cannot do, so that a scan's
 * packets right after a step would not count. Without strict mode a knock's
 * time only meets step timeouts of seconds: the coarse one (knock_now). A
 * strict knock's grant, ban and failures then hold precise times, which the coarse readings of later
 * packets compare the safe way (a deadline passed up to two ticks late; a rate's
 * credit added as late). So does the SPA event's arrival time, where the
 * controller's latency_ms starts. */
#ifndef XKNOCK_CLOCK_H
#define XKNOCK_CLOCK_H

#include "xknock_parsing.h"
#include "xknock_maps.h"

/* The coarse clock as of this CPU's first reading in the current jiffy.
 * A helper call costs about 20 ns where returns are mitigated (AMD's SRSO
 * "Safe RET"), the same again as the clock itself; bpf_jiffies64() and this
 * per-CPU array's lookup are inlined by the verifier, so the helper runs once
 * a tick per CPU. jiffies and the coarse clock both move at the tick, but not
 * at one instant: a reading cached between the two lags one more tick, so
 * the clock here is two ticks behind at most, and never ahead. */
struct xk_coarse_cache {
	__u64 jiffies;
	__u64 ns;
};
BPF_PERCPU_ARRAY(coarse_cache, struct xk_coarse_cache, 1);

/* Called first for every packet: one place where the helper may be called,
 * before anything is live but the context, so that the two ways join at once
 * for the verifier. packet_now() then only reads the cache. */
static __always_inline void refresh_coarse_clock(void)
{
#ifndef XK_TEST_CLOCK
	__u64 jiffies = bpf_jiffies64();
	__u32 zero = 0;
	struct xk_coarse_cache *cache = coarse_cache.lookup(&zero);
	if (cache && cache->jiffies != jiffies) {   /* 0 at first: jiffies never are */
		cache->ns = bpf_ktime_get_coarse_ns();   /* before its jiffy: a torn pair is only older */
		cache->jiffies = jiffies;
	}
#endif
}

static __always_inline __u64 coarse_now(void)
{
	__u32 zero = 0;
	struct xk_coarse_cache *cache = coarse_cache.lookup(&zero);
	return cache ? cache->ns : bpf_ktime_get_coarse_ns();
}

/* The clock packet_now() keeps: the test's or the coarse one. */
static __always_inline __u64 clock_reading(void)
{
#ifdef XK_TEST_CLOCK
	/* tests set the time in control[0]; 0 there is read again, and is 0 again */
	__u32 zero = 0;
	struct xk_control *ctl = control.lookup(&zero);
	return ctl ? ctl->test_now_ns : 0;
#else
	return coarse_now();
#endif
}

static __always_inline __u64 packet_now(struct xk_packet *pkt)
{
	__u64 now = *(volatile __u64 *)&pkt->now;
	if (now)
		return now;
	now = clock_reading();
	pkt->now = now;
	return now;
}

/* The packet's time without keeping it: for a hint's age, where the packet's
 * own judgement does not look at the time. */
static __always_inline __u64 peek_now(struct xk_packet *pkt)
{
	__u64 now = *(volatile __u64 *)&pkt->now;
	return now ? now : clock_reading();
}

/* The precise clock: strict mode's knocks and touches, the SPA event's
 * arrival. Not kept: each path that needs it reads it once. */
static __always_inline __u64 precise_now(struct xk_packet *pkt)
{
#ifdef XK_TEST_CLOCK
	return packet_now(pkt);
#else
	return bpf_ktime_get_ns();
#endif
}

/* A knock's time: precise where strict mode orders it against connections
 * elsewhere (xknock_strict.h); else the packet's coarse time, a call less
 * (about 45 ns here): a step's timeout is seconds, the coarse clock two
 * ticks behind at most, and the order of steps is the order packets come in. */
static __always_inline __u64 knock_now(struct xk_packet *pkt, struct xk_settings *set)
{
	return (set->flags & XK_SET_STRICT) ? precise_now(pkt) : packet_now(pkt);
}

#endif
