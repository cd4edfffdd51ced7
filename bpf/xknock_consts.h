/* xknock_consts.h: limits, flags and the numbered reasons shared with the
 * controller. Mirrored by controller/layout.py; tests/test_layout.py checks
 * that both sides agree. Every limit can be overridden at build time. */
#ifndef XKNOCK_CONSTS_H
#define XKNOCK_CONSTS_H

#ifndef XK_MAX_SEQUENCES            /* sequence slots per policy bank */
#define XK_MAX_SEQUENCES 64
#endif
#ifndef XK_MAX_STEPS                /* knocks per sequence; a step mask is 32 bits */
#define XK_MAX_STEPS 16
#endif
#ifndef XK_MAX_OPEN                 /* ports one sequence opens */
#define XK_MAX_OPEN 8
#endif
#ifndef XK_MAX_SEQS_PER_PORT        /* sequences that may share one knock port */
#define XK_MAX_SEQS_PER_PORT 2
#endif
#ifndef XK_PORT_ENTRIES             /* classified ports, both banks together */
#define XK_PORT_ENTRIES 4096
#endif
#ifndef XK_PROGRESS_ENTRIES         /* (source, sequence) knocks in progress, LRU */
#define XK_PROGRESS_ENTRIES 262144
#endif
#ifndef XK_GRANT_ENTRIES            /* (source, port) grants; never evicted */
#define XK_GRANT_ENTRIES 65536
#endif
#ifndef XK_LIST_ENTRIES             /* allow- or deny-list CIDRs, both banks together */
#define XK_LIST_ENTRIES 262144
#endif
#ifndef XK_FIRST_SLOTS              /* first knocks held in the first-step filter; a power of two */
#define XK_FIRST_SLOTS (1 << 21)
#endif
#ifndef XK_FAILURE_ENTRIES          /* sources with recent failed knocks, LRU */
#define XK_FAILURE_ENTRIES 65536
#endif
#ifndef XK_BAN_ENTRIES              /* banned sources; never evicted */
#define XK_BAN_ENTRIES 65536
#endif
#ifndef XK_RECENT_SLOTS             /* strict mode: knocking sources' last knock and intervening packet; a power of two */
#define XK_RECENT_SLOTS (1 << 18)
#endif
/* strict mode: `knocking`, when a source hashed to each slot last knocked, in
 * front of `recent` (xknock_strict.h); then the word of the time it was begun */
#ifndef XK_KNOCKING_SLOTS
#define XK_KNOCKING_SLOTS 8192       /* a power of two, at most 65536; 8 bytes each */
#endif
#define XK_KNOCKING_SINCE XK_KNOCKING_SLOTS
#define XK_KNOCKING_SLACK_NS 10000000ULL   /* 10 ms: marks two CPUs write out of order */
#ifndef XK_ICMP_PEER_ENTRIES        /* sources with an ICMP error rate bucket (answers), LRU */
#define XK_ICMP_PEER_ENTRIES 65536
#endif
/* The longest L4 segment whose checksum the answer path verifies; a longer
 * one is dropped unanswered. A multiple of XK_CSUM_CHUNK. */
#define XK_ANSWER_MAX_L4 2048
#define XK_CSUM_CHUNK 512            /* bpf_csum_diff's largest input */
/* Linux quotes this much of the offending datagram in an ICMP error:
 * 576 - 20 - 8 (IPv4, icmp_send) and 1280 - 40 - 8 (IPv6, icmp6_send). */
#define XK_ICMP_QUOTE 548
#define XK_ICMP6_QUOTE 1232
#ifndef XK_MAX_EXT_HDRS             /* IPv6 extension headers walked before giving up */
#define XK_MAX_EXT_HDRS 8
#endif
#ifndef XK_MAX_VLAN                 /* stacked 802.1Q / 802.1ad tags */
#define XK_MAX_VLAN 2
#endif
#ifndef XK_GRANT_REFRESH_NS         /* how coarsely traffic refreshes a grant's idle clock */
#define XK_GRANT_REFRESH_NS 1000000000ULL
#endif
#ifndef XK_CAS_ATTEMPTS             /* compare-and-swap retries on a contended knock */
#define XK_CAS_ATTEMPTS 2
#endif
#ifndef XK_EVENT_PAGES              /* ring buffer size in pages (power of two) */
#define XK_EVENT_PAGES 64
#endif
#ifndef XK_SPA_EVENT_PAGES          /* SPA candidates' ring buffer, pages (power of two) */
#define XK_SPA_EVENT_PAGES 512
#endif
#ifndef XK_SPA_KNOWN_ENTRIES        /* sources with an accepted SPA packet, LRU */
#define XK_SPA_KNOWN_ENTRIES 16384
#endif
#ifndef XK_SPA_RATE_ENTRIES         /* sources with a SPA token bucket, LRU */
#define XK_SPA_RATE_ENTRIES 65536
#endif
/* UDP payload sizes a SPA packet can have (fwknop's MIN_SPA_DATA_SIZE and
 * MAX_SPA_PACKET_LEN); controller/spa_message.py holds the same bounds. */
#define XK_SPA_MIN_PAYLOAD 140
#define XK_SPA_MAX_PAYLOAD 1500
/* Leading payload bytes checked against the base64 alphabet in the kernel. */
#define XK_SPA_CHECK_BYTES 16
/* struct xk_spa_event up to its payload: a record is this + the payload */
#define XK_SPA_HEADER_BYTES 32

#if (XK_FIRST_SLOTS & (XK_FIRST_SLOTS - 1)) != 0
#error "XK_FIRST_SLOTS must be a power of two"
#endif
#if (XK_RECENT_SLOTS & (XK_RECENT_SLOTS - 1)) != 0
#error "XK_RECENT_SLOTS must be a power of two"
#endif
#if (XK_KNOCKING_SLOTS & (XK_KNOCKING_SLOTS - 1)) != 0 || XK_KNOCKING_SLOTS > 65536
#error "XK_KNOCKING_SLOTS must be a power of two, at most 65536"
#endif
#if XK_MAX_STEPS > 32
#error "XK_MAX_STEPS must fit the 32-bit step mask"
#endif

/* Protocols as the maps spell them: IP protocol numbers, ICMPv6 echo folded into ICMP. */
#define XK_PROTO_ICMP 1
#define XK_PROTO_TCP 6
#define XK_PROTO_UDP 17

/* xk_port_val.flags */
#define XK_PORT_GUARDED (1U << 0)   /* opened only by the allow-list or a grant */
#define XK_PORT_KNOCK   (1U << 1)   /* a step of one or more sequences */
#define XK_PORT_SPA     (1U << 2)   /* the SPA port: candidates go to the controller */

/* port_flags: the XK_PORT_* flags of every (bank, transport, port), a byte
 * each, eight to a word: XK_PORT_FLAG_WORDS words per bank and transport. */
#define XK_PORT_FLAG_WORDS 8192      /* 65536 ports / 8 */
/* list_bits: bitmaps of 65536 bits, XK_BITMAP_WORDS words each,
 * that say where a lookup could find something (xknock_hints.h). */
#define XK_BITMAP_WORDS 1024
#define XK_PORT_CLASSES 3            /* port_flags' tables per bank: tcp, udp, icmp */
#define XK_LIST_ALLOW 0              /* list_bits' bitmaps per bank: list * 3 + kind */
#define XK_LIST_DENY 1
#define XK_BITS_IPV4 0               /* kinds: an IPv4 /16 */
#define XK_BITS_IPV6_32 1            /* the hash of an IPv6 /32: entries shorter than /48 */
#define XK_BITS_IPV6_48 2            /* the hash of an IPv6 /48: entries of /48 and longer */
#define XK_LIST_BITMAPS 6
/* granted: a byte per slot hashed from a source, set when a grant for the
 * source is written, cleared only by the controller's rebuild
 * (xknock_hints.h). Two halves of XK_GRANTED_WORDS words, then the selector
 * word: 0 (not built: every packet looks `grants` up), or 1 + the live half. */
#define XK_GRANTED_SLOTS 65536       /* per half; a multiple of 8, a power of two */
#define XK_GRANTED_WORDS (XK_GRANTED_SLOTS / 8)
#define XK_GRANTED_SELECTOR (2 * XK_GRANTED_WORDS)
/* grant_cache: per CPU, copies of grants a packet passed on, at a slot hashed
 * from (source, protocol, port); epochs: what a copy must have been taken
 * under to count (xknock_hints.h). */
#ifndef XK_GRANT_CACHE_SLOTS
#define XK_GRANT_CACHE_SLOTS 4096    /* a power of two; 64 bytes each, per CPU */
#endif
#define XK_EPOCH_GRANTS_CONTROLLER 0 /* epochs: written by the controller after it changes `grants` */
#define XK_EPOCH_GRANTS_DATAPATH 1   /* incremented by the data path after it writes or removes a grant */
#define XK_EPOCH_LISTS 2             /* written by the controller before it writes a bank of the lists */
#define XK_EPOCH_WORDS 3
/* list_cache: per CPU, sources found on a list (xknock_hints.h) */
#ifndef XK_LIST_CACHE_SLOTS
#define XK_LIST_CACHE_SLOTS 4096     /* a power of two; 40 bytes each, per CPU */
#endif
#define XK_COPY_FOR_NS 1000000000ULL /* a list's copy counts this long; then the trie is asked again */

/* xk_settings.mode */
#define XK_MODE_ENFORCE 0
#define XK_MODE_MONITOR 1

/* In the first byte of an LPM key, with the bank in bit 0: IPv4 entries and
 * lookups are kept apart from IPv6 ones, so that no IPv6 prefix (::/0) ever
 * matches an IPv4 source through its mapped form. */
#define XK_LPM_IPV4 0x80

/* xk_settings.flags: lets the hot path skip empty lists */
#define XK_SET_HAS_ALLOW (1U << 0)
#define XK_SET_HAS_DENY  (1U << 1)
#define XK_SET_BANS      (1U << 2)   /* failed knocks lead to bans */
#define XK_SET_STRICT    (1U << 3)   /* a new connection to another port resets the source's knocks */
#define XK_SET_ANSWER    (1U << 4)   /* refused packets get the answer of an unused port */
#define XK_SET_DROP_IPSEC      (1U << 5)   /* [filter] ipsec = "drop": ESP, AH, NAT-T refused */
#define XK_SET_DROP_TRANSPORTS (1U << 6)   /* [filter] other_transports = "drop": SCTP, DCCP, UDP-Lite refused */
/* Refused, these protocols get the answer this host's kernel gives a protocol
 * it lacks (the controller asks the kernel: controller/policy/protocols.py). */
#define XK_SET_UNREACH_ESP4    (1U << 7)
#define XK_SET_UNREACH_AH4     (1U << 8)
#define XK_SET_UNREACH_DCCP4   (1U << 9)
#define XK_SET_UNREACH_SCTP4   (1U << 10)
#define XK_SET_UNREACH_ESP6    (1U << 11)
#define XK_SET_UNREACH_AH6     (1U << 12)
#define XK_SET_UNREACH_DCCP6   (1U << 13)
#define XK_SET_UNREACH_SCTP6   (1U << 14)
/* Refused UDP-Lite gets the port unreachable this host's kernel sends for
 * an unused UDP-Lite port (the controller asks it, as above). */
#define XK_SET_UDPLITE_PORTS4  (1U << 15)
#define XK_SET_UDPLITE_PORTS6  (1U << 16)

/* Transports whose ports the kernel delivers to sockets that xknock cannot
 * open (grants are TCP and UDP). */
#define XK_PROTO_DCCP 33
#define XK_PROTO_SCTP 132
#define XK_PROTO_UDPLITE 136
/* IPsec: what follows ESP is encrypted; NAT-T carries ESP in UDP to this port. */
#define XK_PROTO_ESP 50
#define XK_PROTO_AH 51
#define XK_NATT_PORT 4500

/* xk_packet.unseen bits: what hides a packet's real destination from XDP */
#define XK_UNSEEN_IPSEC 1            /* ESP, AH (IPv4 or an IPv6 extension header), NAT-T */
#define XK_UNSEEN_TRANSPORT 2        /* SCTP, DCCP, UDP-Lite */

/* xk_packet.answerable: how a refused packet is answered (answer = "closed") */
#define XK_ANSWERED_HERE 1           /* guarded ports (a service listens): the answer is made here */
#define XK_ANSWERED_BY_HOST 2        /* knock and SPA ports: the host's stack answers, if nobody listens */
#define XK_ANSWERED_AS_UNKNOWN 3     /* IPsec and other transports: as a protocol the kernel lacks, if it lacks it */

/* xk_settings.flowlabels: how this host labels the IPv6 flows it starts */
#define XK_FLOWLABEL_AUTO      (1U << 0)   /* a hash of the flow (auto_flowlabels) */
#define XK_FLOWLABEL_STATELESS (1U << 1)   /* with the top bit set (flowlabel_state_ranges) */

/* xk_settings.ban_scope */
#define XK_BAN_EVERYWHERE 0          /* a banned source is dropped on every port */
#define XK_BAN_KNOCK_PORTS 1         /* only on knock and guarded ports */

/* Event types on the ring buffer. */
#define XK_EV_GRANTED      1   /* a sequence completed and its grants were written */
#define XK_EV_GRANT_FAILED 2   /* a sequence completed but the grants map was full */
#define XK_EV_RESET        3   /* a wrong knock ended a sequence in progress */
#define XK_EV_TIMED_OUT    4   /* a knock came too late; progress was dropped */
#define XK_EV_BANNED       5   /* too many failed knocks: the source is banned */
#define XK_EV_EXPIRED      6   /* a grant dead on both clocks, removed by the data path */
#define XK_EV_SPA          7   /* a SPA candidate (on its own ring buffer, struct xk_spa_event) */

/* One counter per reason. The verdict reasons come first: every packet counts
 * exactly one of them. The knock and grant counters after them count events. */
enum xk_reason {
	XK_PASS_NOT_IP = 0,        /* ARP, LLDP and other non-IP frames */
	XK_PASS_UNGUARDED = 1,     /* IP to a port that is neither guarded nor a knock */
	XK_PASS_OTHER_L4 = 2,      /* IP protocols without ports for us (GRE, IP-in-IP...); ESP, SCTP... when passed */
	XK_PASS_FRAGMENT = 3,      /* later fragments: their first fragment was judged */
	XK_PASS_ALLOWLIST = 4,     /* guarded port, source on the allow-list */
	XK_PASS_GRANT = 5,         /* guarded port, live grant */
	XK_DROP_DENYLIST = 6,      /* source on the deny-list */
	XK_DROP_NO_GRANT = 7,      /* guarded port, no live grant */
	XK_DROP_KNOCK = 8,         /* every packet to a knock port */
	XK_DROP_MALFORMED = 9,     /* truncated or invalid headers */
	XK_DROP_FRAGMENT = 10,     /* tiny first or overlapping later fragments */
	XK_DROP_BANNED = 11,       /* source banned after too many failed knocks */
	XK_DROP_SPA = 12,          /* every packet to the SPA port (answered like an unused port) */
	XK_PASS_ECHO = 13,         /* an ICMP echo knock: recorded, then the host answers the ping */
	XK_DROP_IPSEC = 14,        /* ESP, AH, NAT-T (udp:4500) with ipsec = "drop", source not allow-listed */
	XK_DROP_TRANSPORT = 15,    /* SCTP, DCCP, UDP-Lite with other_transports = "drop", not allow-listed */
	XK_VERDICT_REASONS = 16,
	XK_KNOCK_ADVANCED = 16,    /* a right step, sequence not finished yet */
	XK_KNOCK_COMPLETED = 17,
	XK_KNOCK_RESET = 18,       /* a wrong step ended progress */
	XK_KNOCK_TIMED_OUT = 19,
	XK_KNOCK_REPEATED = 20,    /* the step just accepted, again: ignored */
	XK_KNOCK_IGNORED = 21,     /* no progress and not a first step, or TCP without SYN */
	XK_KNOCK_CONTENDED = 22,   /* lost every compare-and-swap to other CPUs */
	XK_GRANT_ISSUED = 23,      /* grant entries written */
	XK_GRANT_FAILED = 24,      /* grant entries refused: grants map full */
	XK_GRANT_EXPIRED = 25,     /* dead grants removed by the data path */
	XK_EVENT_LOST = 26,        /* ring buffer full */
	XK_MONITOR_PASSED = 27,    /* would have dropped, passed in monitor mode */
	XK_GRANT_CREATED = 28,     /* grant entries that were not in the map before */
	XK_GRANT_REMOVED = 29,     /* grants the controller removed (revoke, sweep); only it writes this */
	XK_GRANT_OPERATOR = 30,    /* grants the controller created (`xknock grant`); only it writes this */
	XK_BAN_ISSUED = 31,        /* sources banned */
	XK_BAN_EXPIRED = 32,       /* bans over, removed by the data path */
	XK_BAN_FAILED = 33,        /* bans refused: bans map full */
	XK_BAN_SPARED = 34,        /* allow-listed sources that reached the threshold: never banned */
	XK_BAN_REMOVED = 35,       /* bans the controller removed (unban, sweep); only it writes this */
	XK_KNOCK_STRICT_RESET = 36, /* of the resets: progress a new connection to another port ended (strict) */
	/* SPA in the kernel: */
	XK_SPA_QUEUED = 37,        /* candidates handed to the controller */
	XK_SPA_NOT_CANDIDATE = 38, /* wrong size or not base64: dropped in the kernel */
	XK_SPA_RATE_LIMITED = 39,  /* the source's token bucket was empty */
	XK_SPA_OVERLOADED = 40,    /* this CPU's share of the total rate was used up */
	XK_SPA_LOST = 41,          /* the SPA ring buffer was full */
	/* SPA verdicts of the controller; only it writes these: */
	XK_SPA_ACCEPTED = 42,      /* verified, grants written */
	XK_SPA_BAD_HMAC = 43,      /* no user's HMAC key matched (or no HMAC) */
	XK_SPA_REPLAYED = 44,      /* seen before (digest cache) */
	XK_SPA_STALE = 45,         /* timestamp further from now than max_age */
	XK_SPA_MALFORMED = 46,     /* prefix-tacked, undecryptable, bad inner digest or fields */
	XK_SPA_UNKNOWN_USER = 47,  /* HMAC matched but the message's user is not the stanza's */
	XK_SPA_PORT_DENIED = 48,   /* asked for a port the user may not open */
	XK_SPA_SOURCE_DENIED = 49, /* source outside every stanza's sources, or address rules */
	XK_SPA_GRANT_FAILED = 50,  /* verified, but the grants map was full */
	XK_SPA_GRANT_CREATED = 51, /* grant entries SPA added that were not in the map before */
	XK_SPA_KNOWN_PASSED = 52,  /* over the total rate, queued anyway: the source had an accepted SPA */
	/* Answers (answer = "closed"): of the dropped packets, those sent back as */
	XK_ANSWER_RST = 53,        /* a TCP reset */
	XK_ANSWER_UNREACH = 54,    /* an ICMP or ICMPv6 port unreachable */
	XK_ANSWER_RATE_LIMITED = 55, /* no ICMP error: over Linux's rate limits, as the kernel would be */
	XK_ANSWER_NONE = 56,       /* no answer, as Linux gives none: a RST, a bad checksum, not unicast... */
	XK_ANSWER_BY_HOST = 57,    /* knock and SPA ports nobody listens on: passed, the host answers itself */
	XK_BAN_OPERATOR = 58,      /* bans the controller created (`xknock ban`); only it writes this */
	XK_COUNTERS = 64,
};

#endif
