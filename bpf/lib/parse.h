/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing shared by tc and XDP programs (direct packet access). */
#pragma once

#include "common.h"

enum sl_parse_result {
	SL_PARSE_IPV4 = 0,          /* eth + a complete IPv4 header (options included) */
	SL_PARSE_NOT_IPV4,          /* another ethertype (ARP, IPv6, VLAN...): not ours */
	SL_PARSE_INVALID,           /* truncated frame or malformed IPv4 header */
};

struct sl_l4_ports {
	__be16 sport;
	__be16 dport;
};

static __always_inline enum sl_parse_result
sl_parse_ipv4(void *data, void *data_end, struct ethhdr **eth, struct iphdr **ip)
{
	struct ethhdr *e = data;
	struct iphdr *iph;

	if ((void *)(e + 1) > data_end)
		return SL_PARSE_INVALID;
	if (e->h_proto != bpf_htons(ETH_P_IP))
		return SL_PARSE_NOT_IPV4;
	iph = (void *)(e + 1);
	if ((void *)(iph + 1) > data_end)
		return SL_PARSE_INVALID;
	if (iph->version != 4 || iph->ihl < 5)
		return SL_PARSE_INVALID;
	if ((void *)iph + iph->ihl * 4 > data_end)
		return SL_PARSE_INVALID;
	*eth = e;
	*ip = iph;
	return SL_PARSE_IPV4;
}

static __always_inline bool sl_ipv4_is_fragment(const struct iphdr *ip)
{
	return ip->frag_off & bpf_htons(IP_MF | IP_OFFSET);
}

/* The L4 header right after the IPv4 header, for TCP and UDP; NULL when the
 * packet is too short to hold one. */
static __always_inline void *sl_l4_header(struct iphdr *ip, void *data_end, __u32 min_len)
{
	void *l4 = (void *)ip + ip->ihl * 4;

	if (l4 + min_len > data_end)
		return NULL;
	return l4;
}
