/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The failsafe: the node's own management flows (SSH, the Kubernetes API,
 * etcd, kubelet, DNS, DHCP by default; sl_failsafe_ports holds the node's list) pass
 * before the prefilter, the load balancer or any later filter sees them, so no
 * other setting can cut the operators off a node. A flow is one of them when
 * its packet goes to the node itself and its destination port (a connection
 * to the node) or its source port (the reply to the node's own connection, a
 * DHCP offer) is listed. */
#pragma once

#include "common.h"
#include "maps.h"

static __always_inline bool sl_failsafe_port(__u8 proto, __be16 port)
{
	struct sl_failsafe_key key = { .port = port, .proto = proto };

	return bpf_map_lookup_elem(&sl_failsafe_ports, &key) != NULL;
}

/* `ctx` is the program's context (xdp_md or __sk_buff), `ifindex` the device
 * the packet came in on. Only a listed port costs the FIB lookup that tells
 * the node's own addresses (and broadcasts) from addresses it forwards to;
 * where forwarding is off that lookup cannot answer, and the node's address
 * in sl_config does. */
static __always_inline bool sl_failsafe_flow(void *ctx, const struct sl_flow_tuple *t, __u32 ifindex)
{
	struct bpf_fib_lookup fib;
	struct sl_config *cfg;
	__u32 zero = 0;

	if (!sl_failsafe_port(t->proto, t->dport) && !sl_failsafe_port(t->proto, t->sport))
		return false;
	cfg = bpf_map_lookup_elem(&sl_config, &zero);
	if (cfg && cfg->node_ip == t->daddr)
		return true;
	__builtin_memset(&fib, 0, sizeof(fib));     /* not an initializer: see fib.h */
	fib.family = AF_INET;
	fib.l4_protocol = t->proto;
	fib.ifindex = ifindex;
	fib.ipv4_src = t->saddr;
	fib.ipv4_dst = t->daddr;
	return bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}
