// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tc ingress of the node's NIC and of the VXLAN device (after decapsulation):
 * traffic from other nodes and from outside.
 *
 * Verdicts (counted under SL_HOOK_TC_FROM_NIC):
 *   not IPv4 (ARP, IPv6, ...)          pass (SL_TC_PASS)            SL_OUT_PASS
 *   shorter than Ethernet, truncated
 *   or malformed IPv4 (ihl < 5, ...)   TC_ACT_SHOT                  SL_DROP_INVALID
 *   destination is a local pod         redirect_peer into it        SL_OUT_REDIRECT_PEER
 *     a new flow its NetworkPolicy
 *     does not allow in (policy.h)     TC_ACT_SHOT                  SL_DROP_POLICY_INGRESS
 *   a management flow of the node
 *   (failsafe.h)                       pass                         SL_OUT_FAILSAFE
 *   TCP/UDP flow in sl_lb_nat (either
 *   direction), or new flow to an LB
 *   VIP with backends: the load
 *   balancer where xdp_nic does not
 *   run (a packet it translated does
 *   not match any more)                rewritten, then
 *     to a local pod                   redirect_peer into it        SL_OUT_REDIRECT_PEER
 *     to another node's pod CIDR       as tc_from_pod forwards      SL_OUT_REDIRECT_NEIGH/_TUNNEL
 *     elsewhere                        redirect_neigh out the NIC   SL_OUT_LB_NEIGH
 *     a rewrite helper failing         TC_ACT_SHOT                  SL_DROP_REWRITE_FAILED
 *   no free NAT port for a new flow    TC_ACT_SHOT                  SL_DROP_NAT_EXHAUSTED
 *   LB VIP without backends: the
 *     node's own address (a NodePort)  pass (the stack refuses it)  SL_OUT_PASS
 *     another address                  TC_ACT_SHOT                  SL_DROP_NO_BACKEND
 *   TTL would expire on forwarding     pass (stack sends ICMP)      SL_OUT_PASS
 *   anything else (node, VXLAN outer)  pass                         SL_OUT_PASS
 *   redirect_peer refusing             TC_ACT_SHOT                  SL_DROP_REDIRECT_FAILED
 */
#include "common.h"
#include "maps.h"
#include "l3.h"
#include "lb_tc.h"
#include "failsafe.h"

/* The load balancer for a packet that is not for a local pod, as xdp_nic
 * balances (lb.h): what a NIC without XDP still gets (traffic to the node
 * itself pays two lookups; pods' traffic is delivered before). True with
 * *verdict final when the packet was load-balanced traffic. */
static __always_inline bool lb_from_nic(struct __sk_buff *skb, struct iphdr *ip, enum sl_hook hook, int *verdict)
{
	struct sl_flow_tuple t = {};
	struct sl_lb_vip_key vk = {};
	struct sl_lb_vip *vip;
	struct sl_config *cfg;
	struct sl_nat *nat, to;
	__u32 zero = 0;
	int refused;

	if (!sl_tc_flow_tuple(skb, ip, &t))
		return false;
	if (sl_failsafe_flow(skb, &t, skb->ingress_ifindex)) {
		*verdict = sl_tc_count_pass(skb, hook, SL_OUT_FAILSAFE);
		return true;
	}
	cfg = bpf_map_lookup_elem(&sl_config, &zero);
	if (!cfg || !cfg->node_ip || !cfg->nic_ifindex)
		return false;   /* not configured: the stack decides */
	nat = bpf_map_lookup_elem(&sl_lb_nat, &t);
	if (nat) {
		to = *nat;      /* a copy: the LRU entry may change under us */
	} else {
		vk.vip = t.daddr;
		vk.port = t.dport;
		vk.proto = t.proto;
		vip = bpf_map_lookup_elem(&sl_lb_vips, &vk);
		if (!vip)
			return false;
		refused = sl_lb_new_flow(vip, &t, sl_flow_hash(&t), cfg->node_ip, &to);
		/* The stack refuses a port of its own (reset, port unreachable). */
		if (refused == SL_DROP_NO_BACKEND && t.daddr == cfg->node_ip)
			return false;
		if (refused) {
			*verdict = sl_tc_drop(skb, hook, refused);
			return true;
		}
	}
	*verdict = sl_tc_lb_send(skb, ip, &t, &to, cfg->nic_ifindex, hook, SL_OUT_LB_NEIGH);
	return true;
}

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

	if (lb_from_nic(skb, ip, hook, &verdict))
		return verdict;

	return sl_tc_pass(skb, hook);
}

char _license[] SEC("license") = "GPL";
