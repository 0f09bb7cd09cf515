/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Refusing a flow at once in XDP: the frame becomes an ICMP port unreachable
 * to its sender, as the stack answers a UDP datagram to a closed port. A TCP
 * client takes it for a refused connection too (Linux fails the connect with
 * ECONNREFUSED), so one answer serves both protocols. */
#pragma once

#include "common.h"
#include "csum.h"

#define SL_ICMP_QUOTE    (sizeof(struct iphdr) + 8)     /* RFC 792: the header and 64 bits of data */
#define SL_ICMP_REPLY    (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct icmphdr) + SL_ICMP_QUOTE)
#define SL_ICMP_GROW     (sizeof(struct iphdr) + sizeof(struct icmphdr))

/* The one's-complement sum of `words` 16-bit words at `p` (bounds checked by the caller). */
static __always_inline __u16 sl_csum_words(const __u16 *p, const int words)
{
	__u32 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < words; i++)
		sum += p[i];
	return ~sl_csum_fold(sum);
}

/* Turn the frame, an IPv4 packet without options carrying at least 8 bytes of
 * TCP or UDP, into an ICMP port unreachable from its destination to its
 * source, back to the MAC it came from. XDP_TX on success; XDP_DROP when the
 * frame cannot be reshaped (the caller counts it). */
static __always_inline int sl_xdp_reject(struct xdp_md *ctx)
{
	void *data, *data_end;
	struct ethhdr *eth, *old_eth;
	struct iphdr *ip, *quoted;
	struct icmphdr *icmp;

	if (bpf_xdp_adjust_head(ctx, -(int)SL_ICMP_GROW))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	/* The old frame now starts SL_ICMP_GROW bytes in: its IPv4 header is
	 * already where the quote goes, right after the new ICMP header. */
	if (data + SL_ICMP_REPLY > data_end)
		return XDP_DROP;
	eth = data;
	ip = data + sizeof(*eth);
	icmp = (void *)(ip + 1);
	quoted = (void *)(icmp + 1);
	old_eth = data + SL_ICMP_GROW;
	if (quoted->ihl != 5)
		return XDP_DROP;

	__builtin_memcpy(eth->h_dest, old_eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, old_eth->h_dest, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0xc0;             /* internetwork control, as the stack sends ICMP errors */
	ip->tot_len = bpf_htons(SL_ICMP_REPLY - sizeof(*eth));
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = SL_DEFAULT_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->saddr = quoted->daddr;
	ip->daddr = quoted->saddr;
	ip->check = 0;
	ip->check = sl_csum_words((__u16 *)ip, sizeof(*ip) / 2);

	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_PORT_UNREACH;
	icmp->un.gateway = 0;
	icmp->checksum = 0;
	icmp->checksum = sl_csum_words((__u16 *)icmp, (sizeof(*icmp) + SL_ICMP_QUOTE) / 2);

	if (bpf_xdp_adjust_tail(ctx, (int)SL_ICMP_REPLY - (int)(data_end - data)))
		return XDP_DROP;
	return XDP_TX;
}
