/* xknock_hash.h: the 32-bit mixer every hashed array of the filter uses
 * (murmur3's finaliser); mirrored by controller/firsts.py. */
#ifndef XKNOCK_HASH_H
#define XKNOCK_HASH_H

static __always_inline __u32 xk_mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

#endif
