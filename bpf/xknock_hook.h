/* xknock_hook.h: the one place that knows which hook the program is built
 * for. The default build is XDP (xdp_knock); -DXK_TC builds the same code for
 * a TC classifier (tc_knock, SCHED_CLS, attached by controller/kernel/tc.py).
 * The shared code names the context, the verdicts and the few helpers that
 * differ through these, and nothing else:
 *   struct xk_ctx       struct xdp_md / struct __sk_buff
 *   XK_VERDICT_PASS     XDP_PASS / TC_ACT_UNSPEC (the next classifier, then the stack)
 *   XK_VERDICT_DROP     XDP_DROP / TC_ACT_SHOT
 *   xk_transmit(ctx)    send the rewritten frame back out of the interface it
 *                       came in on: XDP_TX / bpf_redirect to its own ifindex
 *   xk_load_bytes, xk_adjust_tail(ctx, delta), xk_grow_head(ctx, room)
 *   xk_make_linear(ctx) the whole frame in directly readable memory (an
 *                       skb's data may be in pages; an XDP frame's is not) */
#ifndef XKNOCK_HOOK_H
#define XKNOCK_HOOK_H

#ifdef XK_TC
#include <uapi/linux/pkt_cls.h>

#define xk_ctx __sk_buff
#define XK_VERDICT_PASS TC_ACT_UNSPEC
#define XK_VERDICT_DROP TC_ACT_SHOT
/* bpf_csum_level's BPF_CSUM_LEVEL_RESET (older uapi headers lack the name) */
#define XK_CSUM_LEVEL_RESET 3

/* a macro, so that the length's bounds reach the helper's register unchanged */
#define xk_load_bytes(ctx, off, to, len) bpf_skb_load_bytes(ctx, off, to, len)

static __always_inline int xk_adjust_tail(struct __sk_buff *ctx, int delta)
{
	return bpf_skb_change_tail(ctx, ctx->len + delta, 0);
}

static __always_inline int xk_grow_head(struct __sk_buff *ctx, __u32 room)
{
	return bpf_skb_change_head(ctx, room, 0);
}

static __always_inline int xk_make_linear(struct __sk_buff *ctx)
{
	if ((__u32)(ctx->data_end - ctx->data) >= ctx->len)
		return 0;
	return bpf_skb_pull_data(ctx, 0);
}

static __always_inline int xk_transmit(struct __sk_buff *ctx)
{
	/* The stack's checksum verdict on the asked packet is not the answer's. */
	bpf_csum_level(ctx, XK_CSUM_LEVEL_RESET);
	return bpf_redirect(ctx->ifindex, 0);
}

/* The headers the parser reads must be in the skb's linear part (drivers put
 * them there as a rule; pulled here when they did not): as far as the parser
 * goes (XK_MAX_HDR_OFFSET, 1023) and a transport header after it. */
#define XK_TC_PULL 1088

static __always_inline void xk_pull_headers(struct __sk_buff *ctx)
{
	__u32 linear = ctx->data_end - ctx->data;
	__u32 want = XK_TC_PULL;
	if (linear < want && ctx->len > linear)
		bpf_skb_pull_data(ctx, ctx->len < want ? ctx->len : want);
}
#else
#define xk_ctx xdp_md
#define XK_VERDICT_PASS XDP_PASS
#define XK_VERDICT_DROP XDP_DROP

#define xk_load_bytes(ctx, off, to, len) bpf_xdp_load_bytes(ctx, off, to, len)

static __always_inline int xk_adjust_tail(struct xdp_md *ctx, int delta)
{
	return bpf_xdp_adjust_tail(ctx, delta);
}

static __always_inline int xk_grow_head(struct xdp_md *ctx, __u32 room)
{
	return bpf_xdp_adjust_head(ctx, -(int)room);
}

static __always_inline int xk_make_linear(struct xdp_md *ctx)
{
	return 0;
}

static __always_inline int xk_transmit(struct xdp_md *ctx)
{
	return XDP_TX;
}
#endif

#endif
