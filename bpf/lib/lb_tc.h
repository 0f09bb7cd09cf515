/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The load balancer's flows in tc: a local pod's reply to a flow xdp_nic
 * balanced to it (tc_from_pod), and every packet of a flow on a NIC where no
 * XDP program runs (tc_from_nic). The maps and the NAT are xdp_nic's (lb.h). */
#pragma once

#include "l3.h"
#include "lb.h"

/* The 5-tuple of a TCP/UDP packet with its whole L4 header in reach (the
 * rewrite writes its checksum); false for other protocols, fragments (only a
 * first one carries ports) and short packets. */
static __always_inline bool sl_tc_flow_tuple(struct __sk_buff *skb, struct iphdr *ip, struct sl_flow_tuple *t)
{
	void *data_end = (void *)(long)skb->data_end;
	struct sl_l4_ports *l4;

	if (sl_ipv4_is_fragment(ip))
		return false;
	if (ip->protocol == IPPROTO_TCP)
		l4 = sl_l4_header(ip, data_end, sizeof(struct tcphdr));
	else if (ip->protocol == IPPROTO_UDP)
		l4 = sl_l4_header(ip, data_end, sizeof(struct udphdr));
	else
		return false;
	if (!l4)
		return false;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->sport = l4->sport;
	t->dport = l4->dport;
	t->proto = ip->protocol;
	return true;
}

/* Rewrite the packet of flow `t` to `to` and send it on as any packet to its
 * new destination: into a pod of this node, towards another node's pod CIDR
 * (sl_routes), or else out of the NIC `nic`, where redirect_neigh looks up the
 * route and resolves the next hop's MAC (counted as `outcome`). An expiring
 * TTL goes to the stack, rewritten, which answers with ICMP time exceeded. */
static __always_inline int sl_tc_lb_send(struct __sk_buff *skb, struct iphdr *ip, const struct sl_flow_tuple *t,
					 const struct sl_nat *to, __u32 nic, enum sl_hook hook,
					 enum sl_outcome outcome)
{
	struct ethhdr *eth;
	int verdict;

	if (sl_lb_rewrite_skb(skb, ETH_HLEN + ip->ihl * 4, t->proto, t, to))
		return sl_tc_drop(skb, hook, SL_DROP_REWRITE_FAILED);
	/* The helpers invalidated every packet pointer. */
	if (!sl_tc_parse_ipv4(skb, hook, &eth, &ip, &verdict))
		return verdict;
	if (sl_forward_to_pods(skb, eth, ip, hook, &verdict))
		return verdict;
	if (!sl_ipv4_dec_ttl(ip))
		return sl_tc_pass(skb, hook);
	return sl_tc_redirected(skb, hook, bpf_redirect_neigh(nic, NULL, 0, 0), outcome);
}
