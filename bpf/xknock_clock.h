/* xknock_clock.h: the packet's "now", read when a path first needs it and
 * kept in the scratch packet for the rest. Reading the clock was the largest
 * single cost of a packet (about 40 ns of an unguarded pass's 140 under
 * bpftool prog run), and most packets (unguarded, deny- and allow-listed,
 * guarded without a grant) never look at the time. 0 means "not read yet".
 *
 * It is the coarse clock (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the
 * last tick, one 1/HZ behind at most), about 20 ns cheaper than the precise
 * one under bpftool prog run. Every time the data path keeps is compared with
 * its own later readings (non-decreasing on every CPU) or is a deadline the
 * controller wrote on CLOCK_MONOTONIC, which a lagging reading can pass a tick
 * late, never early.
 *
 * Knocks and strict mode's touches read precise_now() instead: strict mode
 * orders a source's packets by their times (a connection elsewhere after the
 * last step ends the knock), which one tick cannot do, so that a scan's
 * packets right after a step would not count. A knock's grant, ban and
 * failures then hold precise times, which the coarse readings of later
 * packets compare the safe way (a deadline passed a tick late; a rate's
 * credit added a tick late). So does the SPA event's arrival time, where the
 * controller's latency_ms starts. */
#ifndef XKNOCK_CLOCK_H
#define XKNOCK_CLOCK_H

#include "xknock_parsing.h"
#include "xknock_maps.h"

static __always_inline __u64 packet_now(struct xk_packet *pkt)
{
	__u64 now = *(volatile __u64 *)&pkt->now;
	if (now)
		return now;
#ifdef XK_TEST_CLOCK
	/* tests set the time in control[0]; 0 there is read again, and is 0 again */
	__u32 zero = 0;
	struct xk_control *ctl = control.lookup(&zero);
	now = ctl ? ctl->test_now_ns : 0;
#else
	now = bpf_ktime_get_coarse_ns();
#endif
	pkt->now = now;
	return now;
}

/* The precise clock: knocks, strict mode's touches, the SPA event's arrival.
 * Not kept: each path that needs it reads it once. */
static __always_inline __u64 precise_now(struct xk_packet *pkt)
{
#ifdef XK_TEST_CLOCK
	return packet_now(pkt);
#else
	return bpf_ktime_get_ns();
#endif
}

#endif
