/* xknock_spa.h: SPA candidates. Every packet to the SPA port is dropped; the
 * ones that could be SPA (size, base64 alphabet) and fit both token buckets
 * are copied to the controller, which verifies them (controller/spa.py). The
 * kernel holds no keys and decides nothing about access. */
#ifndef XKNOCK_SPA_H
#define XKNOCK_SPA_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/udp.h>

#include "xknock_consts.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"
#include "xknock_stats.h"

/* A token bucket kept as credit in ns: takes one candidate if credit allows. */
static __always_inline int bucket_take(struct xk_bucket *b, __u64 now, __u64 cost, __u64 burst)
{
	__u64 credit = b->credit_ns;
	/* Only forward: readings of other CPUs may lag a tick (xknock_clock.h),
	 * and moving last back would credit that tick twice. */
	if (now > b->last_ns) {
		credit += now - b->last_ns;
		b->last_ns = now;
	}
	if (credit > burst)
		credit = burst;
	if (credit < cost) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - cost;
	return 1;
}

static __always_inline int is_base64(__u8 c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/';
}

/* The cheap test: fwknop's size bounds and a base64 start. Random junk fails
 * it (a byte is base64 with odds 1/4), so floods of it never leave the kernel. */
static __always_inline int spa_shaped(void *data, void *data_end, struct xk_packet *pkt, __u32 len)
{
	if (len < XK_SPA_MIN_PAYLOAD || len > XK_SPA_MAX_PAYLOAD)
		return 0;
	__u8 *p = cursor(data, data_end, pkt, sizeof(struct udphdr) + XK_SPA_CHECK_BYTES);
	if (!p)
		return 0;
	p += sizeof(struct udphdr);
#pragma unroll
	for (int i = 0; i < XK_SPA_CHECK_BYTES; i++)
		if (!is_base64(p[i]))
			return 0;
	return 1;
}

static __always_inline int spa_admit(struct xk_packet *pkt, struct xk_settings *set, __u64 now)
{
	__u32 zero = 0;
	struct xk_bucket *cpu = spa_cpu_rate.lookup(&zero);
	if (!cpu)
		return XK_SPA_OVERLOADED;
	struct xk_bucket *src = spa_rate.lookup(&pkt->src);
	if (!src) {
		/* A new source starts with a full bucket less this candidate. */
		struct xk_bucket fresh = {.last_ns = now, .credit_ns = set->spa_burst_ns - set->spa_cost_ns};
		if (set->spa_burst_ns < set->spa_cost_ns)
			return XK_SPA_RATE_LIMITED;
		spa_rate.update(&pkt->src, &fresh);
	} else if (!bucket_take(src, now, set->spa_cost_ns, set->spa_burst_ns)) {
		return XK_SPA_RATE_LIMITED;
	}
	/* The per-source bucket first: one loud source spends its own credit,
	 * not the CPU's that every other source shares. */
	if (bucket_take(cpu, now, set->spa_cpu_cost_ns, set->spa_cpu_burst_ns))
		return XK_SPA_QUEUED;
	/* A flood has used up the total rate. Sources that authenticated before
	 * still get through (within their own rate): a spoofed flood would have
	 * to guess them to compete. */
	if (spa_known.lookup(&pkt->src)) {
		count(XK_SPA_KNOWN_PASSED);
		return XK_SPA_QUEUED;
	}
	return XK_SPA_OVERLOADED;
}

static __always_inline __u32 handle_spa(struct xk_ctx *ctx, struct xk_packet *pkt, struct xk_settings *set, __u64 now)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (pkt->proto != XK_PROTO_UDP)
		return XK_DROP_SPA;
	__u32 len = pkt->l4_room - sizeof(struct udphdr);   /* parse_l4 checked l4_room >= 8 */
	if (!spa_shaped(data, data_end, pkt, len)) {
		count(XK_SPA_NOT_CANDIDATE);
		return XK_DROP_SPA;
	}
	__u32 admitted = spa_admit(pkt, set, now);
	if (admitted != XK_SPA_QUEUED) {
		count(admitted);
		return XK_DROP_SPA;
	}
	/* Built in per-CPU map memory, then output at its real size: a 200-byte
	 * packet takes 240 bytes of the ring, not a whole 1536-byte record. */
	__u32 zero = 0;
	struct xk_spa_event *ev = spa_scratch.lookup(&zero);
	if (!ev)
		return XK_DROP_SPA;
	__u32 off = *(volatile __u16 *)&pkt->off;
	off = (off & XK_MAX_HDR_OFFSET) + sizeof(struct udphdr);
	/* Bounds the verifier can see on the length (spa_shaped checked them, but
	 * clang drops or fuses repeated tests): each behind its own barrier. */
	__u64 n = len;   /* 64 bits: the verifier checks the whole register */
	asm volatile("" : "+r"(n));
	if (n > XK_SPA_MAX_PAYLOAD)
		n = 0;
	asm volatile("" : "+r"(n));
	if (n < XK_SPA_MIN_PAYLOAD || xk_load_bytes(ctx, off, ev->payload, n) < 0) {
		/* The IP header claimed more than the frame holds. */
		count(XK_SPA_NOT_CANDIDATE);
		return XK_DROP_SPA;
	}
	/* The source port, for the public-key SPA's answer (past NAT, the one
	 * the client's packet really came from). parse_l4 saw the UDP header. */
	__u16 sport = 0;
	xk_load_bytes(ctx, off - sizeof(struct udphdr), &sport, sizeof(sport));
	ev->sport = bpf_ntohs(sport);
	ev->ts_ns = precise_now(pkt);   /* the controller's latency_ms starts here */
	ev->src = pkt->src;
	ev->port = pkt->dport;
	ev->len = n;
	ev->ipv4 = pkt->ipv4;
	if (spa_events.ringbuf_output(ev, XK_SPA_HEADER_BYTES + n, 0) < 0) {
		count(XK_SPA_LOST);
		return XK_DROP_SPA;
	}
	count(XK_SPA_QUEUED);
	return XK_DROP_SPA;
}

#endif
