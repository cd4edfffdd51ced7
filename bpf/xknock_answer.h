/* xknock_answer.h: answer = "closed". A packet refused on a guarded, knock or
 * SPA port is turned, in place, into what this host's kernel sends for a port
 * nobody listens on, and sent back (xk_transmit: XDP_TX, or a TC redirect):
 *   TCP  a reset as tcp_v4_send_reset / tcp_v6_send_reset build it: to a
 *        segment with ACK, RST with seq = its ack; to one without, RST|ACK
 *        with seq 0 and ack = seq + SYN + FIN + payload; to a RST, nothing.
 *        No options, window 0; IPv4 with DF and ID 0.
 *   UDP  an ICMP / ICMPv6 port unreachable quoting the datagram as icmp_send
 *        and icmp6_send do, within Linux's rate limits (per destination and
 *        for the host, read from its sysctls).
 *   UDP-Lite (refused on every port) as UDP, where the kernel has UDP-Lite.
 *   ESP, AH, DCCP, SCTP (refused on every port) where this host's kernel
 *        lacks the protocol: an ICMP protocol unreachable / ICMPv6 parameter
 *        problem (unrecognized next header), quoting the packet, as
 *        ip_local_deliver and ip6_protocol_deliver_rcu send; where the
 *        kernel has it, nothing (it would answer from a socket, or not).
 * and nothing wherever Linux sends nothing: a bad checksum, a short or
 * inconsistent header, a fragment, a source or destination that is not
 * unicast. Knock and SPA ports, where nobody listens as a rule, are passed to
 * the host instead, whose stack answers them as it answers every unused port:
 * same timing, same ICMP budget. docs/datapath.md gives every field. */
#ifndef XKNOCK_ANSWER_H
#define XKNOCK_ANSWER_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#include "xknock_consts.h"
#include "xknock_structs.h"
#include "xknock_parsing.h"
#include "xknock_maps.h"
#include "xknock_stats.h"
#include "xknock_clock.h"

#define XK_ETH_ALEN 6
#define XK_IP_DF 0x4000
#define XK_IPTOS_TOS_MASK 0x1e
#define XK_IPTOS_PREC_INTERNETCONTROL 0xc0
#define XK_ICMP_DEST_UNREACH 3
#define XK_ICMP_PORT_UNREACH 3
#define XK_ICMP_PROT_UNREACH 2
#define XK_ICMPV6_DEST_UNREACH 1
#define XK_ICMPV6_PORT_UNREACH 4
#define XK_ICMPV6_PARAMPROB 4
#define XK_ICMPV6_UNK_NEXTHDR 1
#define XK_IPV6_NEXTHDR_OFFSET 6     /* the pointer to the fixed header's next header field */
#define XK_FLOWLABEL_TOP_BIT 0x80000
#define XK_FLOWLABEL_MASK 0xfffff

struct xk_pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

struct xk_pseudo6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__u8 zero[3];
	__u8 nexthdr;
};

/* What answer() learns of the packet before it rewrites the frame. */
struct xk_asked {
	__u8 saddr[16];      /* the IP header's, 4 or 16 bytes used */
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__be32 ack_seq;
	__u32 payload;       /* TCP: segment length less the header */
	__u32 quote;         /* UDP: bytes of the datagram the ICMP error quotes */
	__u8 flags;          /* TCP flags */
	__u8 tos;            /* IPv4 TOS or IPv6 traffic class */
	__u8 ipv4;
	__u8 unknown;        /* answered as a protocol the kernel lacks (read_unknown) */
};

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u64 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s & 0xffff;
}

/* The one's-complement sum of buf[0, n) on top of seed; n <= XK_ANSWER_MAX_L4.
 * Negative on a helper error. */
static __always_inline __s64 csum_scratch(struct xk_answer_scratch *s, __u32 n, __u32 seed)
{
	if (n > XK_ANSWER_MAX_L4)
		return -1;
	/* zero to the next 4-byte boundary: bpf_csum_diff sums 32-bit words */
	s->buf[n] = 0;
	s->buf[n + 1] = 0;
	s->buf[n + 2] = 0;
	__u32 n4 = (n + 3) & ~3U;
	__s64 sum = seed;
#pragma unroll
	for (int i = 0; i < XK_ANSWER_MAX_L4 / XK_CSUM_CHUNK; i++) {
		__u32 off = i * XK_CSUM_CHUNK;
		if (off >= n4)
			break;
		__u64 len = n4 - off;
		if (len > XK_CSUM_CHUNK)
			len = XK_CSUM_CHUNK;
		/* a bound the verifier sees on the register itself */
		asm volatile("" : "+r"(len));
		if (len > XK_CSUM_CHUNK)
			return -1;
		sum = bpf_csum_diff(NULL, 0, (void *)&s->buf[off], len, (__u32)sum);
		if (sum < 0)
			return -1;
	}
	return sum;
}

/* Copies n bytes of the frame at off into the scratch (1 <= n <= XK_ANSWER_MAX_L4). */
static __always_inline int load_scratch(struct xk_ctx *ctx, struct xk_answer_scratch *s, __u32 off, __u32 n)
{
	__u64 len = n;   /* 64 bits: the verifier checks the whole register */
	asm volatile("" : "+r"(len));
	if (len > XK_ANSWER_MAX_L4)
		return -1;
	asm volatile("" : "+r"(len));
	if (len < 1)
		return -1;
	return xk_load_bytes(ctx, off, s->buf, len);
}

static __always_inline int mac_unicast(__u8 *mac)
{
	return !(mac[0] & 1);
}

/* Linux answers no datagram from or to a non-unicast address, nor from an
 * address no stack accepts as a source. */
static __always_inline int ipv4_answerable(__be32 saddr, __be32 daddr)
{
	__u8 s0 = ((__u8 *)&saddr)[0], d0 = ((__u8 *)&daddr)[0];
	if (s0 == 0 || s0 == 127 || s0 >= 224)   /* this network, loopback, multicast and class E */
		return 0;
	if (d0 == 0 || d0 == 127 || d0 >= 224)
		return 0;
	return 1;
}

/* Unspecified, loopback, IPv4-compatible and IPv4-mapped: ip6_rcv_core drops
 * a packet with one of these at either end. */
static __always_inline int ipv6_embeds_ipv4(__u8 *addr)
{
	__u32 w[3];
	__builtin_memcpy(w, addr, sizeof(w));
	return w[0] == 0 && w[1] == 0 && (w[2] == 0 || w[2] == bpf_htonl(0xffff));
}

static __always_inline int ipv6_answerable(__u8 *saddr, __u8 *daddr)
{
	if (saddr[0] == 0xff || daddr[0] == 0xff)   /* multicast */
		return 0;
	return !ipv6_embeds_ipv4(saddr) && !ipv6_embeds_ipv4(daddr);
}

/* Keyed by the controller's random seed: an observer cannot predict it, as
 * they cannot predict the kernel's own (its IP IDs and flow labels are keyed too). */
static __always_inline __u32 flow_hash(struct xk_settings *set, __u8 *saddr, __u8 *daddr, __u32 ports, __u32 len)
{
	__u32 h = set->hash_seed ^ ports;
	__u32 w;
#pragma unroll
	for (int i = 0; i < 16; i += 4) {
		if (i >= len)
			break;
		__builtin_memcpy(&w, saddr + i, 4);
		h = xk_mix32(h ^ w);
		__builtin_memcpy(&w, daddr + i, 4);
		h = xk_mix32(h ^ w);
	}
	return h;
}

/* The flow label this host would give a flow it starts: a keyed hash of the
 * flow (net.ipv6.auto_flowlabels), its top bit set under
 * net.ipv6.flowlabel_state_ranges; or none. */
static __always_inline __u32 flow_label(struct xk_settings *set, struct xk_asked *q, __u32 ports)
{
	if (!(set->flowlabels & XK_FLOWLABEL_AUTO))
		return 0;
	__u32 label = flow_hash(set, q->daddr, q->saddr, ports, 16) & XK_FLOWLABEL_MASK;
	if (set->flowlabels & XK_FLOWLABEL_STATELESS)
		label |= XK_FLOWLABEL_TOP_BIT;
	return label;
}

/* Ethernet answered: addresses swapped; VLAN tags keep their ids and lose
 * their priority bits, as a VLAN device sends by default. */
static __always_inline int turn_ethernet(void *data, void *data_end, __u32 l3)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	__u8 mac[XK_ETH_ALEN];
	__builtin_memcpy(mac, eth->h_dest, XK_ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, XK_ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, XK_ETH_ALEN);
#pragma unroll
	for (int i = 0; i < XK_MAX_VLAN; i++) {
		__u32 tci_off = sizeof(*eth) + i * sizeof(struct xk_vlan_hdr);
		if (tci_off >= l3)
			break;
		__be16 *tci = data + tci_off;
		if ((void *)(tci + 1) > data_end)
			return -1;
		*tci &= bpf_htons(0x0fff);
	}
	return 0;
}

/* The host's ICMP error budget: Linux checks the host's credit, then takes
 * the destination's token, and only then spends the host's. */
static __always_inline int icmp_allowed(struct xk_packet *pkt, struct xk_settings *set, __u64 now)
{
	__u32 zero = 0;
	struct xk_locked_bucket *host = icmp_host.lookup(&zero);
	if (!host)
		return 0;
	__u64 cost = set->icmp_host_cost_ns, burst = set->icmp_host_burst_ns;
	bpf_spin_lock(&host->lock);
	__u64 credit = host->credit_ns;
	/* Only forward: another CPU's clock may be a tick behind this one's
	 * (xknock_clock.h), and moving last back would credit that tick twice. */
	if (now > host->last_ns) {
		credit += now - host->last_ns;
		host->last_ns = now;
	}
	if (credit > burst)
		credit = burst;
	host->credit_ns = credit;
	bpf_spin_unlock(&host->lock);
	if (credit < cost)
		return 0;

	__u64 peer_cost = pkt->ipv4 ? set->icmp_peer_cost_ns : set->icmp6_peer_cost_ns;
	__u64 peer_burst = pkt->ipv4 ? set->icmp_peer_burst_ns : set->icmp6_peer_burst_ns;
	if (peer_cost) {
		struct xk_bucket *peer = icmp_peers.lookup(&pkt->src);
		if (!peer) {
			/* A new destination starts full, as a new inet_peer does. */
			struct xk_bucket fresh = {.last_ns = now, .credit_ns = peer_burst - peer_cost};
			if (peer_burst < peer_cost)
				return 0;
			icmp_peers.update(&pkt->src, &fresh);
		} else if (!bucket_take(peer, now, peer_cost, peer_burst)) {
			return 0;
		}
	}

	bpf_spin_lock(&host->lock);
	int spent = host->credit_ns >= cost;
	if (spent)
		host->credit_ns -= cost;
	bpf_spin_unlock(&host->lock);
	return spent;
}

/* The frame's length must match the IP header's claim (Linux trims padding
 * and drops frames shorter than it). Returns the L4 length, or -1. */
static __always_inline int l4_length(void *data, void *data_end, struct xk_packet *pkt)
{
	__u32 l4 = pkt->l4_off & XK_MAX_HDR_OFFSET;
	__u32 room = pkt->l4_room;
	if (data + l4 > data_end || room > (__u32)(data_end - (data + l4)) || room > XK_ANSWER_MAX_L4)
		return -1;
	return room;
}

/* Is the IPv4 header checksum right (Linux drops the datagram if not)? */
static __always_inline int ipv4_header_ok(struct xk_ctx *ctx, struct xk_answer_scratch *s, __u32 l3, __u32 ihl)
{
	if (load_scratch(ctx, s, l3, ihl) < 0)
		return 0;
	return csum_fold(csum_scratch(s, ihl, 0)) == 0;
}

/* Is the L4 checksum right, over the first `covered` of n bytes at l4 with
 * the pseudo-header (of length n)? covered < n only for UDP-Lite. */
static __always_inline int l4_checksum_ok(struct xk_ctx *ctx, struct xk_answer_scratch *s, struct xk_packet *pkt,
					  __u8 *saddr, __u8 *daddr, __u32 l4, __u32 n, __u32 covered, __u8 proto)
{
	__s64 seed;
	if (pkt->ipv4) {
		struct xk_pseudo4 ph = {};
		__builtin_memcpy(&ph.saddr, saddr, 4);
		__builtin_memcpy(&ph.daddr, daddr, 4);
		ph.proto = proto;
		ph.len = bpf_htons(n);
		seed = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), 0);
	} else {
		struct xk_pseudo6 ph = {};
		__builtin_memcpy(ph.saddr, saddr, 16);
		__builtin_memcpy(ph.daddr, daddr, 16);
		ph.len = bpf_htonl(n);
		ph.nexthdr = proto;
		seed = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), 0);
	}
	if (seed < 0 || load_scratch(ctx, s, l4, covered) < 0)
		return 0;
	return csum_fold(csum_scratch(s, covered, (__u32)seed)) == 0;
}

/* What every answer checks first: unicast MACs, not a first fragment (Linux
 * answers the reassembled packet, which we never see), addresses Linux
 * answers; the addresses and TOS read into q. Returns 1 if they allow one. */
static __always_inline int read_ends(void *data, void *data_end, struct xk_packet *pkt, struct xk_asked *q)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || !mac_unicast(eth->h_dest) || !mac_unicast(eth->h_source))
		return 0;
	if (pkt->first_frag)
		return 0;
	__u32 l3 = pkt->l3_off & 31;
	q->ipv4 = pkt->ipv4;
	if (pkt->ipv4) {
		struct iphdr *iph = data + l3;
		if ((void *)(iph + 1) > data_end)
			return 0;
		__builtin_memcpy(q->saddr, &iph->saddr, 4);
		__builtin_memcpy(q->daddr, &iph->daddr, 4);
		q->tos = iph->tos;
		return ipv4_answerable(iph->saddr, iph->daddr);
	}
	struct ipv6hdr *ip6h = data + l3;
	if ((void *)(ip6h + 1) > data_end)
		return 0;
	__builtin_memcpy(q->saddr, &ip6h->saddr, 16);
	__builtin_memcpy(q->daddr, &ip6h->daddr, 16);
	q->tos = (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4);
	return ipv6_answerable(q->saddr, q->daddr);
}

/* Reads the addresses and checks everything Linux checks before it answers.
 * Returns 1 if an answer is due, 0 if none is. */
static __always_inline int read_asked(struct xk_ctx *ctx, struct xk_packet *pkt, struct xk_asked *q)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct xk_answer_scratch *s = answer_scratch.lookup(&zero);
	if (!s || !read_ends(data, data_end, pkt, q))
		return 0;
	__u32 l3 = pkt->l3_off & 31;
	__u32 l4 = pkt->l4_off & XK_MAX_HDR_OFFSET;
	int n = l4_length(data, data_end, pkt);
	if (n < 0)
		return 0;
	if (pkt->ipv4 && !ipv4_header_ok(ctx, s, l3, l4 - l3))
		return 0;

	if (pkt->proto == XK_PROTO_TCP) {
		struct tcphdr *th = data + l4;
		if ((void *)(th + 1) > data_end)
			return 0;
		__u32 doff = th->doff * 4;
		q->flags = ((__u8 *)th)[13];
		if ((q->flags & XK_TCP_RST) || doff < sizeof(*th) || doff > (__u32)n)
			return 0;
		q->sport = th->source;
		q->dport = th->dest;
		q->seq = th->seq;
		q->ack_seq = th->ack_seq;
		q->payload = n - doff;
		return l4_checksum_ok(ctx, s, pkt, q->saddr, q->daddr, l4, n, n, IPPROTO_TCP);
	}
	if (pkt->proto == XK_PROTO_UDP) {
		struct udphdr *uh = data + l4;
		if ((void *)(uh + 1) > data_end)
			return 0;
		q->sport = uh->source;
		q->dport = uh->dest;
		__u32 ulen = bpf_ntohs(uh->len);
		if (ulen < sizeof(*uh) || ulen > (__u32)n)
			return 0;   /* Linux: a short or cut datagram */
		if (uh->check == 0) {
			if (!pkt->ipv4)
				return 0;   /* IPv6 UDP needs a checksum: Linux drops it */
		} else if (!l4_checksum_ok(ctx, s, pkt, q->saddr, q->daddr, l4, ulen, ulen, IPPROTO_UDP)) {
			return 0;
		}
		/* Linux trims the datagram to the UDP length, then quotes from the IP header. */
		__u32 quote = l4 - l3 + ulen;
		__u32 most = pkt->ipv4 ? XK_ICMP_QUOTE : XK_ICMP6_QUOTE;
		q->quote = quote < most ? quote : most;
		return 1;
	}
	return 0;   /* a guarded ICMP echo: Linux would answer it, we may not */
}

/* A refused UDP-Lite datagram: is it one Linux answers (__udp4_lib_rcv,
 * udplite_checksum_init)? The length field is the checksum's coverage, 0 for
 * all of it; a zero checksum, a coverage under the header or past the end,
 * or a wrong sum over the covered bytes (the pseudo-header's length is the
 * datagram's) gets nothing. */
static __always_inline int udplite_answerable(struct xk_ctx *ctx, struct xk_answer_scratch *s,
					      struct xk_packet *pkt, struct xk_asked *q)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	pkt->l4_off = pkt->off;   /* parsing stops at the IP headers for a protocol without ports for us */
	__u32 l4 = pkt->l4_off & XK_MAX_HDR_OFFSET;
	int n = l4_length(data, data_end, pkt);
	struct udphdr *uh = data + l4;
	if (n < (int)sizeof(*uh) || (void *)(uh + 1) > data_end || uh->check == 0)
		return 0;
	q->sport = uh->source;
	q->dport = uh->dest;
	__u64 covered = bpf_ntohs(uh->len);
	if (covered == 0)
		covered = n;
	if (covered < sizeof(*uh) || covered > (__u32)n)
		return 0;
	/* a bound the verifier sees on the register itself (n's does not carry over) */
	asm volatile("" : "+r"(covered));
	if (covered > XK_ANSWER_MAX_L4)
		return 0;
	asm volatile("" : "+r"(covered));
	return l4_checksum_ok(ctx, s, pkt, q->saddr, q->daddr, l4, n, covered, XK_PROTO_UDPLITE);
}

/* The settings flag that says the kernel lacks protocol proto (IPv4 or IPv6). */
static __always_inline __u32 unreach_flag(__u8 proto, int ipv4)
{
	switch (proto) {
	case XK_PROTO_ESP:
		return ipv4 ? XK_SET_UNREACH_ESP4 : XK_SET_UNREACH_ESP6;
	case XK_PROTO_AH:
		return ipv4 ? XK_SET_UNREACH_AH4 : XK_SET_UNREACH_AH6;
	case XK_PROTO_DCCP:
		return ipv4 ? XK_SET_UNREACH_DCCP4 : XK_SET_UNREACH_DCCP6;
	case XK_PROTO_SCTP:
		return ipv4 ? XK_SET_UNREACH_SCTP4 : XK_SET_UNREACH_SCTP6;
	}
	return 0;
}

/* A refused ESP, AH, DCCP or SCTP packet: an answer is due (1) where the
 * kernel lacks the protocol the IP header names, and Linux would answer it;
 * refused UDP-Lite, where the kernel has it: the port unreachable of an
 * unused port (q->unknown cleared), if Linux would send it.
 * IPv6 is answered only when the fixed header names the protocol: behind
 * extension headers the kernel's pointer would lie deeper, and we drop. */
static __always_inline int read_unknown(struct xk_ctx *ctx, struct xk_packet *pkt, struct xk_settings *set,
					struct xk_asked *q)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct xk_answer_scratch *s = answer_scratch.lookup(&zero);
	if (!s || !read_ends(data, data_end, pkt, q))
		return 0;
	__u32 l3 = pkt->l3_off & 31;
	__u32 total, proto;
	q->unknown = 1;
	if (pkt->ipv4) {
		struct iphdr *iph = data + l3;
		if ((void *)(iph + 1) > data_end)
			return 0;
		__u32 ihl = iph->ihl * 4;
		total = bpf_ntohs(iph->tot_len);
		if (ihl < sizeof(*iph) || total < ihl || !ipv4_header_ok(ctx, s, l3, ihl))
			return 0;
		proto = iph->protocol;
	} else {
		struct ipv6hdr *ip6h = data + l3;
		if ((void *)(ip6h + 1) > data_end)
			return 0;
		total = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
		proto = ip6h->nexthdr;   /* behind extension headers: not answered */
	}
	if (total > (__u32)(data_end - (data + l3)))
		return 0;   /* cut short: Linux drops it */
	__u32 flag = unreach_flag(proto, pkt->ipv4);
	if (proto == XK_PROTO_UDPLITE &&
	    (set->flags & (pkt->ipv4 ? XK_SET_UDPLITE_PORTS4 : XK_SET_UDPLITE_PORTS6))) {
		/* the kernel has UDP-Lite: a port unreachable, as for an unused UDP port */
		q->unknown = 0;
		if (!udplite_answerable(ctx, s, pkt, q))
			return 0;
	} else if (!flag || !(set->flags & flag)) {
		return 0;
	}
	__u32 most = pkt->ipv4 ? XK_ICMP_QUOTE : XK_ICMP6_QUOTE;
	q->quote = total < most ? total : most;
	return 1;
}

/* Would a socket take this packet? (The listener of a guarded port, or
 * something an operator started on a knock port.) */
static __always_inline int someone_listens(struct xk_ctx *ctx, struct xk_packet *pkt, struct xk_asked *q)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int tcp = pkt->proto == XK_PROTO_TCP;
	if (q->ipv4) {
		__builtin_memcpy(&tuple.ipv4.saddr, q->saddr, 4);
		__builtin_memcpy(&tuple.ipv4.daddr, q->daddr, 4);
		tuple.ipv4.sport = q->sport;
		tuple.ipv4.dport = q->dport;
		if (tcp)
			sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		else
			sk = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, q->saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, q->daddr, 16);
		tuple.ipv6.sport = q->sport;
		tuple.ipv6.dport = q->dport;
		if (tcp)
			sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
		else
			sk = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Shrinks or grows the frame's tail to len bytes. */
static __always_inline int set_length(struct xk_ctx *ctx, __u32 len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int delta = (int)len - (int)(data_end - data);
	if (delta == 0)
		return 0;
	return xk_adjust_tail(ctx, delta);
}

/* The reset, written over the frame from the IP header on. */
static __always_inline int answer_tcp(struct xk_ctx *ctx, struct xk_packet *pkt, struct xk_settings *set,
				      struct xk_asked *q)
{
	__u32 l3 = pkt->l3_off & 31;
	__u32 iplen = q->ipv4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	if (set_length(ctx, l3 + iplen + sizeof(struct tcphdr)) < 0)
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (turn_ethernet(data, data_end, l3) < 0)
		return -1;
	void *ip = data + l3;
	if (ip + sizeof(struct ipv6hdr) + sizeof(struct tcphdr) > data_end && !q->ipv4)
		return -1;
	if (ip + sizeof(struct iphdr) + sizeof(struct tcphdr) > data_end)
		return -1;

	struct tcphdr th = {};
	th.source = q->dport;
	th.dest = q->sport;
	th.doff = 5;
	if (q->flags & XK_TCP_ACK) {
		th.seq = q->ack_seq;
		th.rst = 1;
	} else {
		__u32 len = q->payload + !!(q->flags & XK_TCP_SYN) + !!(q->flags & XK_TCP_FIN);
		th.ack_seq = bpf_htonl(bpf_ntohl(q->seq) + len);
		th.rst = 1;
		th.ack = 1;
	}
	__s64 sum;
	if (q->ipv4) {
		struct iphdr *iph = ip;
		struct tcphdr *out = ip + sizeof(*iph);
		iph->version = 4;
		iph->ihl = 5;
		iph->tos = q->tos & ~3;   /* ECN bits cleared */
		iph->tot_len = bpf_htons(sizeof(*iph) + sizeof(th));
		iph->id = 0;
		iph->frag_off = bpf_htons(XK_IP_DF);
		iph->ttl = set->ttl;
		iph->protocol = IPPROTO_TCP;
		iph->check = 0;
		__builtin_memcpy(&iph->saddr, q->daddr, 4);
		__builtin_memcpy(&iph->daddr, q->saddr, 4);
		iph->check = csum_fold(bpf_csum_diff(NULL, 0, (void *)iph, sizeof(*iph), 0));
		struct xk_pseudo4 ph = {};
		__builtin_memcpy(&ph.saddr, q->daddr, 4);
		__builtin_memcpy(&ph.daddr, q->saddr, 4);
		ph.proto = IPPROTO_TCP;
		ph.len = bpf_htons(sizeof(th));
		sum = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), 0);
		sum = bpf_csum_diff(NULL, 0, (void *)&th, sizeof(th), (__u32)sum);
		th.check = csum_fold(sum);
		__builtin_memcpy(out, &th, sizeof(th));
	} else {
		struct ipv6hdr *ip6h = ip;
		struct tcphdr *out = ip + sizeof(*ip6h);
		if ((void *)(out + 1) > data_end)
			return -1;
		__u32 label = flow_label(set, q, ((__u32)q->dport << 16) | q->sport);
		__u8 tclass = q->tos & ~3;
		__be32 first = bpf_htonl((6U << 28) | ((__u32)tclass << 20) | label);
		__builtin_memcpy(ip6h, &first, 4);
		ip6h->payload_len = bpf_htons(sizeof(th));
		ip6h->nexthdr = IPPROTO_TCP;
		ip6h->hop_limit = set->hop_limit;
		__builtin_memcpy(&ip6h->saddr, q->daddr, 16);
		__builtin_memcpy(&ip6h->daddr, q->saddr, 16);
		struct xk_pseudo6 ph = {};
		__builtin_memcpy(ph.saddr, q->daddr, 16);
		__builtin_memcpy(ph.daddr, q->saddr, 16);
		ph.len = bpf_htonl(sizeof(th));
		ph.nexthdr = IPPROTO_TCP;
		sum = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), 0);
		sum = bpf_csum_diff(NULL, 0, (void *)&th, sizeof(th), (__u32)sum);
		th.check = csum_fold(sum);
		__builtin_memcpy(out, &th, sizeof(th));
	}
	return 0;
}

/* The port unreachable (or, for a protocol the kernel lacks, the protocol
 * unreachable): room made in front of the datagram for a new IP and ICMP
 * header, the Ethernet header moved to the front, the quote cut to size. */
static __always_inline int answer_icmp(struct xk_ctx *ctx, struct xk_packet *pkt, struct xk_settings *set,
				      struct xk_asked *q, __u64 now)
{
	__u32 zero = 0;
	struct xk_answer_scratch *s = answer_scratch.lookup(&zero);
	if (!s)
		return -1;
	__u32 l3 = pkt->l3_off & 31;
	__u32 room = q->ipv4 ? sizeof(struct iphdr) + sizeof(struct icmphdr)
			     : sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr);
	__u32 quote = q->quote;
	if (quote > XK_ICMP6_QUOTE || quote < sizeof(struct iphdr))
		return -1;
	/* The quote, summed before the frame moves (it does not change). */
	if (load_scratch(ctx, s, l3, quote) < 0)
		return -1;
	__s64 quote_sum = csum_scratch(s, quote, 0);
	if (quote_sum < 0)
		return -1;

	if (xk_grow_head(ctx, room) < 0)
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* Ethernet and tags (at most 22 bytes) to the front; the bytes copied
	 * past them are overwritten by the new IP header below. */
	if (data + room + 22 > data_end)
		return -1;
	__builtin_memcpy(data, data + room, 22);
	if (set_length(ctx, l3 + room + quote) < 0)
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (turn_ethernet(data, data_end, l3) < 0)
		return -1;
	void *ip = data + l3;
	__be32 unused = 0;
	if (q->ipv4) {
		struct iphdr *iph = ip;
		struct icmphdr *ich = ip + sizeof(*iph);
		if ((void *)(ich + 1) > data_end)
			return -1;
		iph->version = 4;
		iph->ihl = 5;
		iph->tos = (q->tos & XK_IPTOS_TOS_MASK) | XK_IPTOS_PREC_INTERNETCONTROL;
		iph->tot_len = bpf_htons(room + quote);
		/* Not DF, so Linux takes the ID from a counter per hash of the
		 * addresses: ours starts at a keyed hash and moves per error too. */
		s->ip_ids += 1;
		iph->id = (__u16)(flow_hash(set, q->daddr, q->saddr, IPPROTO_ICMP, 4) + s->ip_ids);
		iph->frag_off = 0;
		iph->ttl = set->ttl;
		iph->protocol = IPPROTO_ICMP;
		iph->check = 0;
		__builtin_memcpy(&iph->saddr, q->daddr, 4);
		__builtin_memcpy(&iph->daddr, q->saddr, 4);
		iph->check = csum_fold(bpf_csum_diff(NULL, 0, (void *)iph, sizeof(*iph), 0));
		ich->type = XK_ICMP_DEST_UNREACH;
		ich->code = q->unknown ? XK_ICMP_PROT_UNREACH : XK_ICMP_PORT_UNREACH;
		ich->checksum = 0;
		__builtin_memcpy(&ich->un, &unused, 4);
		__s64 sum = bpf_csum_diff(NULL, 0, (void *)ich, sizeof(*ich), (__u32)quote_sum);
		ich->checksum = csum_fold(sum);
	} else {
		struct ipv6hdr *ip6h = ip;
		struct icmp6hdr *ich = ip + sizeof(*ip6h);
		if ((void *)(ich + 1) > data_end)
			return -1;
		__u32 label = flow_label(set, q, IPPROTO_ICMPV6);
		__be32 first = bpf_htonl((6U << 28) | label);
		__builtin_memcpy(ip6h, &first, 4);
		ip6h->payload_len = bpf_htons(sizeof(*ich) + quote);
		ip6h->nexthdr = IPPROTO_ICMPV6;
		ip6h->hop_limit = set->hop_limit;
		__builtin_memcpy(&ip6h->saddr, q->daddr, 16);
		__builtin_memcpy(&ip6h->daddr, q->saddr, 16);
		ich->icmp6_type = q->unknown ? XK_ICMPV6_PARAMPROB : XK_ICMPV6_DEST_UNREACH;
		ich->icmp6_code = q->unknown ? XK_ICMPV6_UNK_NEXTHDR : XK_ICMPV6_PORT_UNREACH;
		ich->icmp6_cksum = 0;
		__be32 info = q->unknown ? bpf_htonl(XK_IPV6_NEXTHDR_OFFSET) : unused;
		__builtin_memcpy(&ich->icmp6_dataun, &info, 4);
		struct xk_pseudo6 ph = {};
		__builtin_memcpy(ph.saddr, q->daddr, 16);
		__builtin_memcpy(ph.daddr, q->saddr, 16);
		ph.len = bpf_htonl(sizeof(*ich) + quote);
		ph.nexthdr = IPPROTO_ICMPV6;
		__s64 sum = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), (__u32)quote_sum);
		sum = bpf_csum_diff(NULL, 0, (void *)ich, sizeof(*ich), (__u32)sum);
		ich->icmp6_cksum = csum_fold(sum);
	}
	return 0;
}

/* The action for a packet the filter refused (answer = "closed"): the frame
 * rewritten and sent back, or dropped where Linux sends nothing. */
static __always_inline int answer(struct xk_ctx *ctx, struct xk_settings *set)
{
	__u32 zero = 0;
	struct xk_packet *pkt = scratch.lookup(&zero);
	if (!pkt || !*(volatile __u8 *)&pkt->answerable)
		return XK_VERDICT_DROP;   /* deny-listed, banned everywhere, malformed: dropped */
	__u64 now = packet_now(pkt);
	__u8 how = *(volatile __u8 *)&pkt->answerable;
	struct xk_asked q = {};
	int due = xk_make_linear(ctx) == 0 &&
		  (how == XK_ANSWERED_AS_UNKNOWN ? read_unknown(ctx, pkt, set, &q) : read_asked(ctx, pkt, &q));
	if (!due) {
		count(XK_ANSWER_NONE);
		return XK_VERDICT_DROP;
	}
	if (how == XK_ANSWERED_BY_HOST && !someone_listens(ctx, pkt, &q)) {
		count(XK_ANSWER_BY_HOST);
		return XK_VERDICT_PASS;
	}
	if (!q.unknown && pkt->proto == XK_PROTO_TCP) {
		if (answer_tcp(ctx, pkt, set, &q) < 0) {
			count(XK_ANSWER_NONE);
			return XK_VERDICT_DROP;
		}
		count(XK_ANSWER_RST);
		return xk_transmit(ctx);
	}
	if (!icmp_allowed(pkt, set, now)) {
		count(XK_ANSWER_RATE_LIMITED);
		return XK_VERDICT_DROP;
	}
	if (answer_icmp(ctx, pkt, set, &q, now) < 0) {
		count(XK_ANSWER_NONE);
		return XK_VERDICT_DROP;
	}
	count(XK_ANSWER_UNREACH);
	return xk_transmit(ctx);
}

#endif
