/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* L3 forwarding for the tc programs: parse verdicts, delivery into a local pod
 * and forwarding towards another node's pods. Every verdict is counted here,
 * so a program's metrics always add up to the packets it saw. */
#pragma once

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "policy.h"

/* To the stack (or the next program), counted as `outcome`. */
static __always_inline int sl_tc_count_pass(struct __sk_buff *skb, enum sl_hook hook, enum sl_outcome outcome)
{
	sl_count(hook, outcome, skb->len);
	return SL_TC_PASS;
}

static __always_inline int sl_tc_pass(struct __sk_buff *skb, enum sl_hook hook)
{
	return sl_tc_count_pass(skb, hook, SL_OUT_PASS);
}

static __always_inline int sl_tc_drop(struct __sk_buff *skb, enum sl_hook hook, enum sl_outcome reason)
{
	sl_count(hook, reason, skb->len);
	return TC_ACT_SHOT;
}

/* The redirect helpers answer TC_ACT_REDIRECT, or TC_ACT_SHOT for arguments
 * they refuse: count which one it was. */
static __always_inline int sl_tc_redirected(struct __sk_buff *skb, enum sl_hook hook, long ret,
					    enum sl_outcome outcome)
{
	if (ret != TC_ACT_REDIRECT)
		return sl_tc_drop(skb, hook, SL_DROP_REDIRECT_FAILED);
	sl_count(hook, outcome, skb->len);
	return TC_ACT_REDIRECT;
}

/* True with eth/ip set for an IPv4 packet. Otherwise *verdict is final: other
 * ethertypes (ARP, IPv6, ...) are not ours and pass; a frame too short for
 * Ethernet, or IPv4 that is truncated or malformed, is dropped (the stack
 * would drop it too, after spending more time on it). */
static __always_inline bool sl_tc_parse_ipv4(struct __sk_buff *skb, enum sl_hook hook, struct ethhdr **eth,
					     struct iphdr **ip, int *verdict)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	switch (sl_parse_ipv4(data, data_end, eth, ip)) {
	case SL_PARSE_IPV4:
		return true;
	case SL_PARSE_NOT_IPV4:
		*verdict = sl_tc_pass(skb, hook);
		return false;
	default:
		*verdict = sl_tc_drop(skb, hook, SL_DROP_INVALID);
		return false;
	}
}

static __always_inline struct sl_endpoint *sl_lookup_endpoint(__be32 ip)
{
	struct sl_endpoint_key key = { .ip = ip };

	return bpf_map_lookup_elem(&sl_endpoints, &key);
}

static __always_inline struct sl_route *sl_lookup_route(__be32 ip)
{
	struct sl_route_key key = { .prefixlen = 32, .ip = ip };

	return bpf_map_lookup_elem(&sl_routes, &key);
}

/* Into a pod of this node, if its NetworkPolicies let the packet in.
 * bpf_redirect_peer switches straight to the pod's eth0 (no second trip
 * through the host veth's backlog); the MACs are the ones the pod sees on its
 * gateway. An expiring TTL goes to the stack, which answers with ICMP time
 * exceeded. */
static __always_inline int sl_deliver_local(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip,
					    const struct sl_endpoint *ep, enum sl_hook hook)
{
	int refused = sl_policy_check(skb, ip, ip->daddr, ip->saddr, SL_POLICY_INGRESS);

	if (refused)
		return sl_tc_drop(skb, hook, refused);
	if (!sl_ipv4_dec_ttl(ip))
		return sl_tc_pass(skb, hook);
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	return sl_tc_redirected(skb, hook, bpf_redirect_peer(ep->ifindex, 0), SL_OUT_REDIRECT_PEER);
}

/* Tunnel: the VXLAN device (external mode) encapsulates to the key's remote;
 * the outer UDP checksum stays zero, as VXLAN over IPv4 allows. */
static __always_inline int sl_forward_tunnel(struct __sk_buff *skb, const struct sl_route *route,
					     enum sl_hook hook)
{
	struct bpf_tunnel_key key = {
		.tunnel_id = route->vni,
		.remote_ipv4 = bpf_ntohl(route->nexthop),
		.tunnel_ttl = SL_DEFAULT_TTL,
	};

	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return sl_tc_drop(skb, hook, SL_DROP_REDIRECT_FAILED);
	return sl_tc_redirected(skb, hook, bpf_redirect(route->ifindex, 0), SL_OUT_REDIRECT_TUNNEL);
}

/* Native routing: the kernel resolves the next hop's MAC on the NIC and fills
 * in the Ethernet header, without a pass through the node's stack. */
static __always_inline int sl_forward_native(struct __sk_buff *skb, const struct sl_route *route,
					     enum sl_hook hook)
{
	struct bpf_redir_neigh nh = {
		.nh_family = AF_INET,
		.ipv4_nh = route->nexthop,
	};

	return sl_tc_redirected(skb, hook, bpf_redirect_neigh(route->ifindex, &nh, sizeof(nh), 0),
				SL_OUT_REDIRECT_NEIGH);
}

/* Towards another node's pod CIDR; an expiring TTL goes to the stack as above. */
static __always_inline int sl_forward_route(struct __sk_buff *skb, struct iphdr *ip,
					    const struct sl_route *route, enum sl_hook hook)
{
	if (!sl_ipv4_dec_ttl(ip))
		return sl_tc_pass(skb, hook);
	if (route->flags & SL_ROUTE_TUNNEL)
		return sl_forward_tunnel(skb, route, hook);
	return sl_forward_native(skb, route, hook);
}

/* Into a pod of this node, or towards another node's pod CIDR: true with
 * *verdict final; false for any other destination, left to the caller. */
static __always_inline bool sl_forward_to_pods(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip,
					       enum sl_hook hook, int *verdict)
{
	struct sl_endpoint *ep = sl_lookup_endpoint(ip->daddr);
	struct sl_route *route;

	if (ep) {
		*verdict = sl_deliver_local(skb, eth, ip, ep, hook);
		return true;
	}
	route = sl_lookup_route(ip->daddr);
	if (route) {
		*verdict = sl_forward_route(skb, ip, route, hook);
		return true;
	}
	return false;
}
