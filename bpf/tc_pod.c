// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tc ingress of a pod's host-side veth: every packet a pod sends.
 *
 * Verdicts (counted under SL_HOOK_TC_FROM_POD):
 *   not IPv4 (ARP, IPv6, ...)          pass (SL_TC_PASS)            SL_OUT_PASS
 *   shorter than Ethernet, truncated
 *   or malformed IPv4 (ihl < 5, ...)   TC_ACT_SHOT                  SL_DROP_INVALID
 *   source not the endpoint of this
 *   veth                               TC_ACT_SHOT                  SL_DROP_SPOOFED
 *   TCP/UDP tuple in sl_lb_nat (a
 *   local backend's reply to an XDP
 *   LB flow)                           rewritten to VIP -> client,
 *                                      redirect_neigh out the NIC   SL_OUT_LB_REVNAT
 *     TTL would expire                 pass, rewritten (stack sends
 *                                      ICMP)                        SL_OUT_PASS
 *     a rewrite helper failing         TC_ACT_SHOT                  SL_DROP_REWRITE_FAILED
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
#include "lb.h"

/* The reply of a pod that is the backend of a flow xdp_nic balanced to it:
 * backend:bport -> node:natport, keyed in sl_lb_nat by the reverse entry
 * xdp_nic created with the flow. That reply leaves the pod through this veth
 * and never crosses the NIC's XDP, and the node has no socket for the NAT
 * port (its stack would answer with a reset), so it is translated here to
 * VIP:vport -> client:cport and sent out of the NIC the flow came in through
 * (sl_config.nic_ifindex); bpf_redirect_neigh looks up the route to the
 * client on that NIC and resolves the next hop's MAC.
 * Fragments are left alone, as xdp_nic does: only a first one has ports.
 * True with *verdict final when the packet was such a reply. */
static __always_inline bool lb_reply(struct __sk_buff *skb, struct iphdr *ip, enum sl_hook hook, int *verdict)
{
	void *data_end = (void *)(long)skb->data_end;
	struct sl_flow_tuple t = {};
	struct sl_l4_ports *l4;
	struct sl_config *cfg;
	struct sl_nat *nat, to;
	__u32 zero = 0, nic;
	bool expiring;

	if (sl_ipv4_is_fragment(ip))
		return false;
	/* The whole L4 header, not just the ports: the helpers write its checksum. */
	if (ip->protocol == IPPROTO_TCP)
		l4 = sl_l4_header(ip, data_end, sizeof(struct tcphdr));
	else if (ip->protocol == IPPROTO_UDP)
		l4 = sl_l4_header(ip, data_end, sizeof(struct udphdr));
	else
		return false;
	if (!l4)
		return false;

	t.saddr = ip->saddr;
	t.daddr = ip->daddr;
	t.sport = l4->sport;
	t.dport = l4->dport;
	t.proto = ip->protocol;
	nat = bpf_map_lookup_elem(&sl_lb_nat, &t);
	if (!nat)
		return false;
	cfg = bpf_map_lookup_elem(&sl_config, &zero);
	if (!cfg || !cfg->nic_ifindex)
		return false;   /* not configured: the stack decides */
	nic = cfg->nic_ifindex;
	to = *nat;          /* a copy: the LRU entry may change under us */

	/* The TTL first, by direct access: the helpers below invalidate the
	 * packet pointers. */
	expiring = !sl_ipv4_dec_ttl(ip);
	if (sl_lb_rewrite_skb(skb, ETH_HLEN + ip->ihl * 4, t.proto, &t, &to)) {
		*verdict = sl_tc_drop(skb, hook, SL_DROP_REWRITE_FAILED);
		return true;
	}
	if (expiring)
		*verdict = sl_tc_pass(skb, hook);
	else
		*verdict = sl_tc_redirected(skb, hook, bpf_redirect_neigh(nic, NULL, 0, 0), SL_OUT_LB_REVNAT);
	return true;
}

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

	/* A pod may only send from its own address, and only on its own veth:
	 * checked on the packet as the pod sent it, before any translation. */
	ep = sl_lookup_endpoint(ip->saddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return sl_tc_drop(skb, hook, SL_DROP_SPOOFED);

	/* Before the destination lookups: a load-balanced reply is addressed
	 * to the node itself and would otherwise be passed to its stack. */
	if (lb_reply(skb, ip, hook, &verdict))
		return verdict;

	ep = sl_lookup_endpoint(ip->daddr);
	if (ep)
		return sl_deliver_local(skb, eth, ip, ep, hook);

	route = sl_lookup_route(ip->daddr);
	if (route)
		return sl_forward_route(skb, ip, route, hook);

	return sl_tc_pass(skb, hook);
}

char _license[] SEC("license") = "GPL";
