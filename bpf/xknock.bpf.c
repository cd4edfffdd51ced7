/* xknock.bpf.c: the entry (XDP; TC with -DXK_TC, see xknock_hook.h). Parse,
 * check the deny-list, classify the destination with one lookup, then judge
 * guarded and knock ports. One exit, where the verdict is counted, monitor
 * mode applied and a refused packet answered as an unused port would be
 * (answer = "closed"). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#include "xknock_consts.h"
#include "xknock_hook.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"
#include "xknock_hash.h"
#include "xknock_clock.h"
#include "xknock_hints.h"
#include "xknock_stats.h"
#include "xknock_policy.h"
#include "xknock_strict.h"
#include "xknock_knock.h"
#include "xknock_spa.h"
#include "xknock_answer.h"

static __always_inline int source_invalid6(struct xk_addr *src)
{
	__u32 w[3];
	__builtin_memcpy(w, src->b, sizeof(w));
	return src->b[0] == 0xff || (w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff));
}

static __always_inline int is_drop(__u32 reason)
{
	return (reason >= XK_DROP_DENYLIST && reason <= XK_DROP_SPA) || reason == XK_DROP_IPSEC ||
	       reason == XK_DROP_TRANSPORT;
}

static __always_inline __u32 decide(struct xk_ctx *ctx, struct xk_settings **set_out)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct xk_packet *pkt = scratch.lookup(&zero);
	if (!pkt)
		return XK_DROP_MALFORMED;
	struct xk_control *ctl = control.lookup(&zero);
	if (!ctl)
		return XK_DROP_MALFORMED;   /* cannot happen: arrays always have index 0 */
	__u32 bank = ctl->active_bank & 1;
	struct xk_settings *set = settings.lookup(&bank);
	if (!set)
		return XK_DROP_MALFORMED;
	*set_out = set;

	/* pkt->now stays 0 until a path asks for the time (xknock_clock.h) */
	__builtin_memset(pkt, 0, sizeof(*pkt));
	pkt->parsed = parse_packet(data, data_end, pkt);
	/* Read back from map memory: every parse path joins into one state here. */
	__u8 parsed = *(volatile __u8 *)&pkt->parsed;
	switch (parsed) {
	case XK_PARSED_NOT_IP:
		return XK_PASS_NOT_IP;
	case XK_PARSED_MALFORMED:
		return XK_DROP_MALFORMED;
	case XK_PARSED_BAD_FRAGMENT:
		return XK_DROP_FRAGMENT;
	default:
		break;
	}
	/* The source is known from here on, for every parse result left. An
	 * IPv6 source no stack accepts (IPv4-mapped, which would alias the IPv4
	 * source's state, list entries and bans; or multicast) touches nothing. */
	if (!pkt->ipv4 && source_invalid6(&pkt->src))
		return XK_DROP_MALFORMED;
	if (source_denied(set, bank, pkt))
		return XK_DROP_DENYLIST;
	int banned = (set->flags & XK_SET_BANS) && source_banned(pkt);
	if (banned && set->ban_scope == XK_BAN_EVERYWHERE)
		return XK_DROP_BANNED;
	if (parsed == XK_PARSED_FRAGMENT)
		return XK_PASS_FRAGMENT;
	/* ESP, AH and SCTP, DCCP, UDP-Lite: what the kernel decrypts or delivers
	 * there is out of XDP's sight or out of any grant's reach. Refused on
	 * every port; answered only where the kernel lacks the protocol, as it
	 * would answer (answer_unknown). */
	__u32 unseen = unseen_verdict(pkt, set, bank);
	if (unseen)
		return unseen;
	if (parsed == XK_PARSED_OTHER_L4)
		return XK_PASS_OTHER_L4;

	__u32 flags = port_flags_of(bank, pkt);
	/* Strict mode: a new connection anywhere but a knock port intervenes
	 * (knock ports judge their own packets, in handle_knock). */
	if ((set->flags & XK_SET_STRICT) && opens_connection(pkt) &&
	    (flags & (XK_PORT_GUARDED | XK_PORT_KNOCK)) != XK_PORT_KNOCK)
		touch_if_knocking(pkt, set);
	if (!flags) {
		/* NAT-T: ESP in UDP, decrypted after XDP. Refused as an unused
		 * port would be: the host answers it when nothing listens. */
		if (pkt->proto == XK_PROTO_UDP && pkt->dport == XK_NATT_PORT) {
			pkt->unseen |= XK_UNSEEN_IPSEC;
			__u32 natt = unseen_verdict(pkt, set, bank);
			if (natt == XK_DROP_IPSEC)
				pkt->answerable = XK_ANSWERED_BY_HOST;
			if (natt)
				return natt;
		}
		return XK_PASS_UNGUARDED;
	}
	/* From here on a refusal is answered as an unused port would be. */
	pkt->answerable = (flags & XK_PORT_GUARDED) ? XK_ANSWERED_HERE : XK_ANSWERED_BY_HOST;
	if (banned)
		return XK_DROP_BANNED;   /* banned on knock and guarded ports only */
	if (flags & XK_PORT_SPA)
		return handle_spa(ctx, pkt, set, packet_now(pkt));
	if (flags & XK_PORT_GUARDED)
		return guarded_verdict(pkt, set, bank);
	if (flags & XK_PORT_KNOCK) {
		struct xk_port_key pkey = {};
		pkey.bank = bank;
		pkey.proto = pkt->proto;
		pkey.port = pkt->dport;
		/* written before port_flags with the bank: missing only if the two disagree */
		struct xk_port_val *port = ports.lookup(&pkey);
		if (port)
			handle_knock(pkt, port, knock_now(pkt, set), set, bank);
		/* The host answers an echo knock's ping, as it always did. */
		return pkt->proto == XK_PROTO_ICMP ? XK_PASS_ECHO : XK_DROP_KNOCK;
	}
	return XK_PASS_UNGUARDED;
}

static __always_inline int knock(struct xk_ctx *ctx)
{
	refresh_coarse_clock();
	struct xk_settings *set = NULL;
	__u32 reason = decide(ctx, &set);
	count(reason);
	if (!is_drop(reason))
		return XK_VERDICT_PASS;
	if (!set)
		return XK_VERDICT_DROP;
	if (set->mode == XK_MODE_MONITOR) {
		count(XK_MONITOR_PASSED);
		return XK_VERDICT_PASS;
	}
	if (set->flags & XK_SET_ANSWER)
		return answer(ctx, set);
	return XK_VERDICT_DROP;
}

#ifdef XK_TC
int tc_knock(struct __sk_buff *ctx)
{
	xk_pull_headers(ctx);
	return knock(ctx);
}
#else
int xdp_knock(struct xdp_md *ctx)
{
	return knock(ctx);
}
#endif
