// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tc ingress of the node's NIC and of the VXLAN device (after decapsulation):
 * traffic from other nodes and from outside.
 *
 * Verdicts (counted under SL_HOOK_TC_FROM_NIC):
 *   not IPv4 (ARP, IPv6, ...)          pass (SL_TC_PASS)            SL_OUT_PASS
 *   shorter than Ethernet, truncated
 *   or malformed IPv4 (ihl < 5, ...)   TC_ACT_SHOT                  SL_DROP_INVALID
 *   destination is a local pod         redirect_peer into it        SL_OUT_REDIRECT_PEER
 *   TTL would expire on forwarding     pass (stack sends ICMP)      SL_OUT_PASS
 *   anything else (node, VXLAN outer)  pass                         SL_OUT_PASS
 *   redirect_peer refusing             TC_ACT_SHOT                  SL_DROP_REDIRECT_FAILED
 */
#include "common.h"
#include "maps.h"
#include "l3.h"

SEC("tc")
int tc_from_nic(struct __sk_buff *skb)
{
	const enum sl_hook hook = SL_HOOK_TC_FROM_NIC;
	struct sl_endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *ip;
	int verdict;

	if (!sl_tc_parse_ipv4(skb, hook, &eth, &ip, &verdict))
		return verdict;

	ep = sl_lookup_endpoint(ip->daddr);
	if (ep)
		return sl_deliver_local(skb, eth, ip, ep, hook);

	return sl_tc_pass(skb, hook);
}

char _license[] SEC("license") = "GPL";
