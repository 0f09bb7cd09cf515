// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tc ingress of a pod's host-side veth: every packet a pod sends.
 *
 * Verdicts (counted under SL_HOOK_TC_FROM_POD):
 *   not IPv4 (ARP, IPv6, ...)          pass (SL_TC_PASS)            SL_OUT_PASS
 *   shorter than Ethernet, truncated
 *   or malformed IPv4 (ihl < 5, ...)   TC_ACT_SHOT                  SL_DROP_INVALID
 *   source not the endpoint of this
 *   veth                               TC_ACT_SHOT                  SL_DROP_SPOOFED
 *   destination is a local pod         redirect_peer into it        SL_OUT_REDIRECT_PEER
 *   destination in sl_routes, tunnel   redirect to VXLAN device     SL_OUT_REDIRECT_TUNNEL
 *   destination in sl_routes, native   redirect_neigh out the NIC   SL_OUT_REDIRECT_NEIGH
 *   TTL would expire on forwarding     pass (stack sends ICMP)      SL_OUT_PASS
 *   anything else (node, outside)      pass                         SL_OUT_PASS
 *   a helper refusing its arguments    TC_ACT_SHOT                  SL_DROP_REDIRECT_FAILED
 */
#include "common.h"
#include "maps.h"
#include "l3.h"

SEC("tc")
int tc_from_pod(struct __sk_buff *skb)
{
	const enum sl_hook hook = SL_HOOK_TC_FROM_POD;
	struct sl_endpoint *ep;
	struct sl_route *route;
	struct ethhdr *eth;
	struct iphdr *ip;
	int verdict;

	if (!sl_tc_parse_ipv4(skb, hook, &eth, &ip, &verdict))
		return verdict;

	/* A pod may only send from its own address, and only on its own veth. */
	ep = sl_lookup_endpoint(ip->saddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return sl_tc_drop(skb, hook, SL_DROP_SPOOFED);

	ep = sl_lookup_endpoint(ip->daddr);
	if (ep)
		return sl_deliver_local(skb, eth, ip, ep, hook);

	route = sl_lookup_route(ip->daddr);
	if (route)
		return sl_forward_route(skb, ip, route, hook);

	return sl_tc_pass(skb, hook);
}

char _license[] SEC("license") = "GPL";
