// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tc ingress of a pod's host-side veth: every packet a pod sends.
 *
 * Verdicts (counted under SL_HOOK_TC_FROM_POD):
 *   not IPv4 (ARP, IPv6, ...)          pass (SL_TC_PASS)            SL_OUT_PASS
 *   shorter than Ethernet, truncated
 *   or malformed IPv4 (ihl < 5, ...)   TC_ACT_SHOT                  SL_DROP_INVALID
 *   source not the endpoint of this
 *   veth                               TC_ACT_SHOT                  SL_DROP_SPOOFED
 *   a new flow the pod's NetworkPolicy
 *   does not allow out (policy.h)      TC_ACT_SHOT                  SL_DROP_POLICY_EGRESS
 *   TCP/UDP tuple in sl_lb_nat (a
 *   local backend's reply to an XDP
 *   LB flow)                           rewritten to VIP -> client,
 *                                      redirect_neigh out the NIC   SL_OUT_LB_REVNAT
 *     TTL would expire                 pass, rewritten (stack sends
 *                                      ICMP)                        SL_OUT_PASS
 *     a rewrite helper failing         TC_ACT_SHOT                  SL_DROP_REWRITE_FAILED
 *   destination is a local pod         redirect_peer into it        SL_OUT_REDIRECT_PEER
 *     a new flow its NetworkPolicy
 *     does not allow in                TC_ACT_SHOT                  SL_DROP_POLICY_INGRESS
 *   destination in sl_routes, tunnel   redirect to VXLAN device     SL_OUT_REDIRECT_TUNNEL
 *   destination in sl_routes, native   redirect_neigh out the NIC   SL_OUT_REDIRECT_NEIGH
 *   TTL would expire on forwarding     pass (stack sends ICMP)      SL_OUT_PASS
 *   anything else (node, outside)      pass                         SL_OUT_PASS
 *   a helper refusing its arguments    TC_ACT_SHOT                  SL_DROP_REDIRECT_FAILED
 */
#include "common.h"
#include "maps.h"
#include "l3.h"
#include "lb_tc.h"

/* The reply of a pod that is the backend of a flow xdp_nic (or tc_from_nic)
 * balanced to it: backend:bport -> node:natport (client:cport when the VIP keeps
 * the client's source), keyed in sl_lb_nat by the reverse entry the flow
 * created. That reply leaves the pod through this veth and never crosses the
 * NIC's XDP, and the node has no socket for the NAT port (its stack would
 * answer with a reset), so it is translated here to VIP:vport -> client:cport
 * and sent out of the NIC the flow came in through (sl_config.nic_ifindex).
 * True with *verdict final when the packet was such a reply. */
static __always_inline bool lb_reply(struct __sk_buff *skb, struct iphdr *ip, enum sl_hook hook, int *verdict)
{
	struct sl_flow_tuple t = {};
	struct sl_config *cfg;
	struct sl_nat *nat, to;
	__u32 zero = 0;

	if (!sl_tc_flow_tuple(skb, ip, &t))
		return false;
	nat = bpf_map_lookup_elem(&sl_lb_nat, &t);
	if (!nat)
		return false;
	cfg = bpf_map_lookup_elem(&sl_config, &zero);
	if (!cfg || !cfg->nic_ifindex)
		return false;   /* not configured: the stack decides */
	to = *nat;          /* a copy: the LRU entry may change under us */
	*verdict = sl_tc_lb_send(skb, ip, &t, &to, cfg->nic_ifindex, hook, SL_OUT_LB_REVNAT);
	return true;
}

SEC("tc")
int tc_from_pod(struct __sk_buff *skb)
{
	const enum sl_hook hook = SL_HOOK_TC_FROM_POD;
	struct sl_endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *ip;
	int verdict, refused;

	if (!sl_tc_parse_ipv4(skb, hook, &eth, &ip, &verdict))
		return verdict;

	/* A pod may only send from its own address, and only on its own veth:
	 * checked on the packet as the pod sent it, before any translation. */
	ep = sl_lookup_endpoint(ip->saddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return sl_tc_drop(skb, hook, SL_DROP_SPOOFED);

	refused = sl_policy_check(skb, ip, ip->saddr, ip->daddr, SL_POLICY_EGRESS);
	if (refused)
		return sl_tc_drop(skb, hook, refused);

	/* Before the destination lookups: a load-balanced reply is addressed
	 * to the node itself and would otherwise be passed to its stack. */
	if (lb_reply(skb, ip, hook, &verdict))
		return verdict;

	if (sl_forward_to_pods(skb, eth, ip, hook, &verdict))
		return verdict;

	return sl_tc_pass(skb, hook);
}

char _license[] SEC("license") = "GPL";
