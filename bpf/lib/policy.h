/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* NetworkPolicy: checked on every packet a pod sends (tc_from_pod, egress)
 * and every packet delivered into a pod (sl_deliver_local, ingress), on the
 * addresses the packet carries there (after the socket LB chose a service's
 * backend; after the XDP LB's translation). A tracked flow passes; a new one
 * passes when the pod is not isolated in that direction, when the peer is
 * this node (the API's rule: a pod's node always reaches it), or when
 * sl_policy has an entry for the pod, the peer's identity (its pod or node
 * in sl_ipcache, its ipBlock prefix in sl_policy_cidrs, or any peer), the
 * direction, the protocol and the port; it is then tracked. */
#pragma once

#include "common.h"
#include "maps.h"
#include "conntrack.h"

static __always_inline bool sl_policy_entry(__be32 endpoint, __u32 identity, const struct sl_ct_packet *p)
{
	struct sl_policy_key key = {
		.prefixlen = SL_POLICY_PREFIX_FULL,
		.endpoint = endpoint,
		.identity = identity,
		.direction = p->key.direction,
		.proto = p->key.proto,
		.port = p->key.dport,
	};

	return bpf_map_lookup_elem(&sl_policy, &key) != NULL;
}

static __always_inline __u32 sl_prefix_identity(void *map, __be32 ip, __u32 otherwise)
{
	struct sl_ipv4_prefix_key key = { .prefixlen = 32, .ip = ip };
	__u32 *identity = bpf_map_lookup_elem(map, &key);

	return identity ? *identity : otherwise;
}

/* Whether an isolated `endpoint` allows the new flow `p` with `peer`. */
static __always_inline bool sl_policy_allows(__be32 endpoint, __be32 peer, __u32 identity,
					     const struct sl_ct_packet *p)
{
	__u32 block;

	if (sl_policy_entry(endpoint, identity, p) || sl_policy_entry(endpoint, SL_ID_ANY, p))
		return true;
	block = sl_prefix_identity(&sl_policy_cidrs, peer, SL_ID_ANY);
	return block != SL_ID_ANY && sl_policy_entry(endpoint, block, p);
}

static __always_inline void sl_policy_count_drop(struct __sk_buff *skb, __be32 endpoint, __u8 direction)
{
	struct sl_policy_drop_key key = { .endpoint = endpoint, .direction = direction };
	struct sl_metric zero = {}, *m;

	m = bpf_map_lookup_elem(&sl_policy_drops, &key);
	if (!m) {
		bpf_map_update_elem(&sl_policy_drops, &key, &zero, BPF_NOEXIST);
		m = bpf_map_lookup_elem(&sl_policy_drops, &key);
		if (!m)
			return;
	}
	m->packets++;
	m->bytes += skb->len;
}

/* 0 when the packet may go on, else the drop reason. `endpoint` is the local
 * pod, `peer` the other end, `direction` as the pod sees the packet. */
static __always_inline int sl_policy_check(struct __sk_buff *skb, struct iphdr *ip, __be32 endpoint, __be32 peer,
					   __u8 direction)
{
	struct sl_ct_packet p = { .key.direction = direction };
	struct sl_endpoint_key ep = { .ip = endpoint };
	struct sl_config *cfg;
	__u32 zero = 0, identity, *isolation;
	__u64 now;

	cfg = bpf_map_lookup_elem(&sl_config, &zero);
	if (!cfg || !(cfg->flags & SL_CFG_POLICY))
		return 0;
	sl_ct_parse(skb, ip, &p);
	now = bpf_ktime_get_ns();
	if (sl_ct_tracked(&p, now))
		return 0;
	if (peer == cfg->node_ip)
		return 0;       /* needs no tracking: its replies come from the node too */
	identity = sl_prefix_identity(&sl_ipcache, peer, SL_ID_WORLD);
	if (identity == SL_ID_HOST)
		return 0;
	isolation = bpf_map_lookup_elem(&sl_policy_isolation, &ep);
	if (p.icmp_error) {
		/* Quoting no tracked flow: judged as ICMP between the two ends. */
		p.key.proto = IPPROTO_ICMP;
		p.key.sport = p.key.dport = 0;
	}
	if (!isolation || !(*isolation & direction) || sl_policy_allows(endpoint, peer, identity, &p)) {
		if (!p.icmp_error)
			sl_ct_create(&p, now);
		return 0;
	}
	sl_policy_count_drop(skb, endpoint, direction);
	return direction == SL_POLICY_INGRESS ? SL_DROP_POLICY_INGRESS : SL_DROP_POLICY_EGRESS;
}
