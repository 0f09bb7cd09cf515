/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Sending a packet the XDP program rewrote, without the stack: the kernel FIB
 * gives the egress device and the next hop's MAC. */
#pragma once

#include "common.h"
#include "metrics.h"
#include "csum.h"

/* Forward `ip` (already rewritten) out of the device the FIB picks: XDP_TX when
 * that is the ingress device, a redirect otherwise. Not for a local pod's veth
 * (the caller passes those to tc): a frame redirected into a veth is dropped
 * unless the veth's peer runs XDP. Whenever the FIB cannot
 * give a complete answer (no neighbour entry yet, no route, forwarding off,
 * MTU, TTL expiring), the packet goes to the stack with XDP_PASS: it forwards
 * the rewritten packet itself, resolving L2 and sending any ICMP error. A
 * client packet then carries the node's own address as source, which the
 * stack drops as martian unless the NIC has net.ipv4.conf.<nic>.accept_local=1.
 * The FIB lookup itself needs forwarding enabled on the NIC. */
static __always_inline int sl_fib_xdp_send(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
					   enum sl_outcome *outcome)
{
	struct bpf_fib_lookup fib;
	long rc;

	/* memset, not a designated initializer: clang zero-fills the struct's
	 * anonymous unions through CO-RE relocations that libbpf 1.1 resolves to
	 * offset 0, overwriting .family. */
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ifindex = ctx->ingress_ifindex;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;

	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || !sl_ipv4_dec_ttl(ip)) {
		*outcome = SL_OUT_LB_TO_STACK;
		return XDP_PASS;
	}
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex) {
		*outcome = SL_OUT_XDP_TX;
		return XDP_TX;
	}
	*outcome = SL_OUT_XDP_REDIRECT;
	return bpf_redirect(fib.ifindex, 0);
}
