/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
 * Plain arithmetic on the packet, so it works the same in XDP and tc. Words
 * are taken as they lie in memory, which one's-complement sums allow. */
#pragma once

#include "common.h"

static __always_inline __u16 sl_csum_fold(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)c;
}

static __always_inline void sl_csum_replace2(__sum16 *sum, __u16 from, __u16 to)
{
	__u32 c = (__u16)~*sum;

	c += (__u16)~from;
	c += to;
	*sum = ~sl_csum_fold(c);
}

static __always_inline void sl_csum_replace4(__sum16 *sum, __be32 from, __be32 to)
{
	__u32 c = (__u16)~*sum;

	c += (__u16)~(from & 0xffff);
	c += (__u16)~(from >> 16);
	c += to & 0xffff;
	c += to >> 16;
	*sum = ~sl_csum_fold(c);
}

/* UDP: a zero checksum means "none" and must stay zero; a computed zero is
 * sent as 0xffff. */
static __always_inline void sl_udp_csum_replace4(__sum16 *sum, __be32 from, __be32 to)
{
	if (!*sum)
		return;
	sl_csum_replace4(sum, from, to);
	if (!*sum)
		*sum = 0xffff;
}

static __always_inline void sl_udp_csum_replace2(__sum16 *sum, __u16 from, __u16 to)
{
	if (!*sum)
		return;
	sl_csum_replace2(sum, from, to);
	if (!*sum)
		*sum = 0xffff;
}

/* Decrement the TTL of a forwarded packet; false when it must not be forwarded. */
static __always_inline bool sl_ipv4_dec_ttl(struct iphdr *ip)
{
	__u16 old, new;

	if (ip->ttl <= 1)
		return false;
	old = *(__u16 *)&ip->ttl;
	ip->ttl--;
	new = *(__u16 *)&ip->ttl;
	sl_csum_replace2(&ip->check, old, new);
	return true;
}
