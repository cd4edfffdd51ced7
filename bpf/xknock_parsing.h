/* xknock_parsing.h: bounds-checked header parsing. A cursor walks the frame;
 * each parser returns the next protocol or -1. No policy lives here. */
#ifndef XKNOCK_PARSING_H
#define XKNOCK_PARSING_H

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
#include "xknock_structs.h"

/* What the policy needs to know about a packet. It lives in the per-CPU
 * scratch map, not on the stack: the verifier does not track values in map
 * memory, so the many paths through the headers join into one state at each
 * header and after parsing, instead of each being verified to the end. */
struct xk_packet {
	struct xk_addr src;
	__u16 dport;      /* host byte order; 0 for ICMP echo */
	__u8 proto;       /* XK_PROTO_*, or the raw IP protocol for others */
	__u8 tcp_flags;   /* byte 13 of the TCP header */
	__u16 off;        /* the cursor: offset of the next header in the frame */
	__u16 frag;       /* fragment offset in 8-byte units */
	__u32 l4_room;    /* bytes after the IP headers, as the IP header says */
	__u8 first_frag;  /* a first fragment with more to come */
	__u8 parsed;      /* enum xk_parse */
	__u8 answerable;  /* refused on a guarded, knock or SPA port: answer = "closed" applies */
	__u8 ipv4;        /* the source is IPv4 (stored mapped in src) */
	__u64 now;        /* the packet's time, 0 until a path reads it (xknock_clock.h) */
	__u16 l3_off;     /* where the IP header starts (after Ethernet and VLAN tags) */
	__u16 l4_off;     /* where the TCP, UDP or ICMP header starts */
	__u8 unseen;      /* XK_UNSEEN_*: IPsec or a transport whose destination xknock cannot open */
	__u8 pad[3];
};

/* How far parsing got. */
enum xk_parse {
	XK_PARSED_L4 = 0,       /* TCP, UDP or ICMP echo request: proto and dport are set */
	XK_PARSED_NOT_IP,
	XK_PARSED_OTHER_L4,     /* IP with a protocol that has no ports for us (pkt->unseen says if it hides one) */
	XK_PARSED_FRAGMENT,     /* a later fragment: no L4 header */
	XK_PARSED_BAD_FRAGMENT, /* tiny first fragment, or a later one overlapping the L4 header */
	XK_PARSED_MALFORMED,
};

struct xk_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

struct xk_ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct xk_ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

#define XK_TCP_FIN 0x01
#define XK_TCP_SYN 0x02
#define XK_TCP_RST 0x04
#define XK_TCP_ACK 0x10
#define XK_IP_MF 0x2000
#define XK_IP_OFFSET 0x1fff
/* Headers that start further in than this are not parsed (malformed). */
#define XK_MAX_HDR_OFFSET 1023
/* Later fragments this close to the start could overwrite the TCP header of
 * the first one (RFC 1858); no real stack sends them. In 8-byte units. */
#define XK_MIN_LATER_FRAG_OFFSET 3

/* The cursor: a pointer to `size` bytes at pkt->off, or NULL when they are not
 * all in the frame. The offset is read back from map memory and masked, so the
 * verifier sees one bounded unknown however we got here. */
static __always_inline void *cursor(void *data, void *data_end, struct xk_packet *pkt, __u32 size)
{
	__u32 off = *(volatile __u16 *)&pkt->off;
	if (off > XK_MAX_HDR_OFFSET)
		return NULL;
	void *pos = data + (off & XK_MAX_HDR_OFFSET);
	if (pos + size > data_end)
		return NULL;
	return pos;
}

static __always_inline void advance(struct xk_packet *pkt, __u32 size)
{
	pkt->off += size;
}

/* Returns the EtherType after up to XK_MAX_VLAN tags, or -1. */
static __always_inline int parse_ethhdr(void *data, void *data_end, struct xk_packet *pkt)
{
	struct ethhdr *eth = cursor(data, data_end, pkt, sizeof(*eth));
	if (!eth)
		return -1;
	advance(pkt, sizeof(*eth));
	__be16 proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < XK_MAX_VLAN; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct xk_vlan_hdr *vlan = cursor(data, data_end, pkt, sizeof(*vlan));
		if (!vlan)
			return -1;
		advance(pkt, sizeof(*vlan));
		proto = vlan->encap_proto;
	}
	/* A tag deeper than we walk could hide anything. */
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return -1;
	return bpf_ntohs(proto);
}

/* Returns the IP protocol, or -1. */
static __always_inline int parse_iphdr(void *data, void *data_end, struct xk_packet *pkt)
{
	struct iphdr *iph = cursor(data, data_end, pkt, sizeof(*iph));
	if (!iph)
		return -1;
	pkt->l3_off = pkt->off;
	if (iph->version != 4)
		return -1;
	__u32 hdrsize = iph->ihl * 4;
	if (hdrsize < sizeof(*iph))
		return -1;
	__u32 tot_len = bpf_ntohs(iph->tot_len);
	if (tot_len < hdrsize)
		return -1;
	if (!cursor(data, data_end, pkt, hdrsize))
		return -1;   /* options cut short */
	pkt->ipv4 = 1;
	__builtin_memset(&pkt->src, 0, 10);
	pkt->src.b[10] = 0xff;
	pkt->src.b[11] = 0xff;
	__builtin_memcpy(&pkt->src.b[12], &iph->saddr, 4);

	__u16 frag = bpf_ntohs(iph->frag_off);
	pkt->frag = frag & XK_IP_OFFSET;
	pkt->first_frag = (frag & XK_IP_MF) && !(frag & XK_IP_OFFSET);
	pkt->l4_room = tot_len - hdrsize;
	int protocol = iph->protocol;
	advance(pkt, hdrsize);
	return protocol;
}

/* IPv4's AH (RFC 4302): walked like IPv6's, so that both families judge what
 * it carries alike. Returns the protocol after it, or -1. */
static __always_inline int parse_ipv4_ah(void *data, void *data_end, struct xk_packet *pkt)
{
	pkt->unseen |= XK_UNSEEN_IPSEC;
	struct xk_ipv6_opt_hdr *ah = cursor(data, data_end, pkt, sizeof(*ah));
	/* The packet (not only the frame) ends inside AH: what it carries is
	 * unseen, the policy judges AH. */
	if (!ah)
		return pkt->l4_room < sizeof(*ah) && data + (pkt->off & XK_MAX_HDR_OFFSET) + pkt->l4_room <= data_end
		       ? IPPROTO_AH : -1;
	__u32 size = (ah->hdrlen + 2) * 4;
	if (size > pkt->l4_room)
		return IPPROTO_AH;
	pkt->l4_room -= size;
	int protocol = ah->nexthdr;
	advance(pkt, size);
	return protocol == IPPROTO_AH ? -1 : protocol;   /* AH in AH: no stack sends it */
}

static __always_inline int ipv6_is_ext_hdr(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT ||
	       nexthdr == IPPROTO_AH;
}

/* Returns the protocol after at most XK_MAX_EXT_HDRS extension headers, or -1
 * (a longer chain, or a header cut short). */
static __always_inline int parse_ipv6hdr(void *data, void *data_end, struct xk_packet *pkt)
{
	struct ipv6hdr *ip6h = cursor(data, data_end, pkt, sizeof(*ip6h));
	if (!ip6h)
		return -1;
	pkt->l3_off = pkt->off;
	if (ip6h->version != 6)
		return -1;
	__builtin_memcpy(&pkt->src, &ip6h->saddr, sizeof(pkt->src));
	pkt->l4_room = bpf_ntohs(ip6h->payload_len);
	__u8 nexthdr = ip6h->nexthdr;
	advance(pkt, sizeof(*ip6h));

#pragma unroll
	for (int i = 0; i < XK_MAX_EXT_HDRS; i++) {
		if (!ipv6_is_ext_hdr(nexthdr))
			break;
		struct xk_ipv6_opt_hdr *oh = cursor(data, data_end, pkt, sizeof(struct xk_ipv6_frag_hdr));
		if (!oh && nexthdr == IPPROTO_AH && pkt->l4_room < sizeof(struct xk_ipv6_frag_hdr) &&
		    data + (pkt->off & XK_MAX_HDR_OFFSET) + pkt->l4_room <= data_end) {
			/* the packet (not the frame) ends inside AH: judged as AH,
			 * what it carries unseen (as IPv4's) */
			pkt->unseen |= XK_UNSEEN_IPSEC;
			return IPPROTO_AH;
		}
		if (!oh)
			return -1;
		__u32 size;
		if (nexthdr == IPPROTO_FRAGMENT) {
			struct xk_ipv6_frag_hdr *fh = (void *)oh;
			__u16 off = bpf_ntohs(fh->frag_off);
			pkt->frag = off >> 3;
			/* Once a first fragment, always: a second fragment header
			 * (offset 0, no more) must not hide that the datagram is
			 * cut, or the answer path would answer a fragment. */
			if ((off & 1) && !(off >> 3))
				pkt->first_frag = 1;
			size = sizeof(*fh);
		} else if (nexthdr == IPPROTO_AH) {
			size = (oh->hdrlen + 2) * 4;
			pkt->unseen |= XK_UNSEEN_IPSEC;
		} else {
			size = (oh->hdrlen + 1) * 8;
		}
		if (size > pkt->l4_room)
			return (pkt->unseen & XK_UNSEEN_IPSEC) && nexthdr == IPPROTO_AH ? IPPROTO_AH : -1;
		nexthdr = oh->nexthdr;
		pkt->l4_room -= size;
		advance(pkt, size);
		if (pkt->frag)
			return nexthdr;   /* a later fragment: what follows is not a header */
	}
	if (ipv6_is_ext_hdr(nexthdr))
		return -1;
	return nexthdr;
}

/* Reads the destination port (or ICMP echo) into pkt. Returns 0, -1 when the
 * L4 header is not all there, or 1 for ICMP that is not an echo request. */
static __always_inline int parse_l4(void *data, void *data_end, int proto, struct xk_packet *pkt)
{
	pkt->l4_off = pkt->off;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = cursor(data, data_end, pkt, sizeof(*th));
		if (!th || pkt->l4_room < sizeof(*th))
			return -1;
		pkt->proto = XK_PROTO_TCP;
		pkt->dport = bpf_ntohs(th->dest);
		pkt->tcp_flags = ((__u8 *)th)[13];
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh = cursor(data, data_end, pkt, sizeof(*uh));
		if (!uh || pkt->l4_room < sizeof(*uh))
			return -1;
		pkt->proto = XK_PROTO_UDP;
		pkt->dport = bpf_ntohs(uh->dest);
		return 0;
	}
	/* ICMP and ICMPv6 share the type/code layout; echo requests are knocks. */
	struct icmphdr *ich = cursor(data, data_end, pkt, sizeof(*ich));
	if (!ich || pkt->l4_room < sizeof(*ich))
		return -1;
	pkt->proto = XK_PROTO_ICMP;
	pkt->dport = 0;
	if ((proto == IPPROTO_ICMP && ich->type == ICMP_ECHO) ||
	    (proto == IPPROTO_ICMPV6 && ich->type == ICMPV6_ECHO_REQUEST))
		return 0;
	return 1;
}

/* The common frame at fixed offsets: untagged Ethernet, then IPv4 without
 * options or IPv6 without extension headers, unfragmented, then a whole TCP
 * or UDP header. Fills pkt exactly as the walk below would (a test compares
 * the two on fuzzed frames), without the walk's cursor, whose every step is
 * a store and a load of pkt->off in map memory: that chain was most of a
 * common packet's parsing time. Returns 0, having written nothing, for
 * every other frame, which then takes the walk. */
static __always_inline int parse_common(void *data, void *data_end, struct xk_packet *pkt)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return 0;
	__u32 l4_room;
	__u8 l4_proto;
	void *l4;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end)
			return 0;
		/* version 4, ihl 5; neither a fragment nor a first one */
		if (*(__u8 *)iph != 0x45 || (iph->frag_off & bpf_htons(XK_IP_MF | XK_IP_OFFSET)))
			return 0;
		__u32 tot_len = bpf_ntohs(iph->tot_len);
		if (tot_len < sizeof(*iph))
			return 0;
		l4_room = tot_len - sizeof(*iph);
		l4_proto = iph->protocol;
		l4 = iph + 1;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		if ((void *)(ip6h + 1) > data_end || ip6h->version != 6)
			return 0;
		l4_room = bpf_ntohs(ip6h->payload_len);
		l4_proto = ip6h->nexthdr;
		l4 = ip6h + 1;
	} else {
		return 0;
	}
	if (l4_proto == IPPROTO_TCP) {
		if (l4 + sizeof(struct tcphdr) > data_end || l4_room < sizeof(struct tcphdr))
			return 0;
	} else if (l4_proto == IPPROTO_UDP) {
		if (l4 + sizeof(struct udphdr) > data_end || l4_room < sizeof(struct udphdr))
			return 0;
	} else {
		return 0;
	}

	__u16 l4_off = l4 - data;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);
		pkt->ipv4 = 1;
		pkt->src.b[10] = 0xff;
		pkt->src.b[11] = 0xff;
		__builtin_memcpy(&pkt->src.b[12], &iph->saddr, 4);
	} else {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		__builtin_memcpy(&pkt->src, &ip6h->saddr, sizeof(pkt->src));
	}
	pkt->l3_off = sizeof(*eth);
	pkt->l4_off = l4_off;
	pkt->off = l4_off;
	pkt->l4_room = l4_room;
	/* the ports are at the same place in both headers */
	pkt->dport = bpf_ntohs(((struct udphdr *)l4)->dest);
	if (l4_proto == IPPROTO_TCP) {
		pkt->proto = XK_PROTO_TCP;
		pkt->tcp_flags = ((__u8 *)l4)[13];
	} else {
		pkt->proto = XK_PROTO_UDP;
	}
	return 1;
}

/* Fills pkt from the frame and says how far parsing got. */
static __always_inline enum xk_parse parse_packet(void *data, void *data_end, struct xk_packet *pkt)
{
#ifndef XK_NO_FAST_PARSE   /* tests build the walk alone to compare the two */
	if (parse_common(data, data_end, pkt))
		return XK_PARSED_L4;
#endif
	int proto;
	int eth_type = parse_ethhdr(data, data_end, pkt);
	if (eth_type < 0)
		return XK_PARSED_MALFORMED;
	if (eth_type == ETH_P_IP) {
		proto = parse_iphdr(data, data_end, pkt);
		if (proto == IPPROTO_AH && !pkt->frag)
			proto = parse_ipv4_ah(data, data_end, pkt);
	} else if (eth_type == ETH_P_IPV6) {
		proto = parse_ipv6hdr(data, data_end, pkt);
		if (proto == IPPROTO_ICMP)
			proto = -1;   /* ICMPv4 inside IPv6 is no message anyone sends */
	} else {
		return XK_PARSED_NOT_IP;
	}
	if (proto < 0)
		return XK_PARSED_MALFORMED;

	int has_ports = proto == IPPROTO_TCP || proto == IPPROTO_UDP ||
			proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
	if (pkt->frag) {
		if (has_ports && pkt->frag < XK_MIN_LATER_FRAG_OFFSET)
			return XK_PARSED_BAD_FRAGMENT;
		return XK_PARSED_FRAGMENT;
	}
	if (!has_ports) {
		/* What the kernel decrypts (ESP) or delivers to sockets xknock
		 * cannot open (SCTP, DCCP, UDP-Lite): the policy decides. */
		if (proto == IPPROTO_ESP)
			pkt->unseen |= XK_UNSEEN_IPSEC;
		else if (proto == XK_PROTO_SCTP || proto == XK_PROTO_DCCP || proto == XK_PROTO_UDPLITE)
			pkt->unseen |= XK_UNSEEN_TRANSPORT;
		return XK_PARSED_OTHER_L4;
	}

	int l4 = parse_l4(data, data_end, proto, pkt);
	if (l4 < 0)
		return pkt->first_frag ? XK_PARSED_BAD_FRAGMENT : XK_PARSED_MALFORMED;
	if (l4 > 0)
		return XK_PARSED_OTHER_L4;
	return XK_PARSED_L4;
}

#endif
