/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* L4 load balancer: flow hash, Maglev backend selection (or the client's
 * backend under ClientIP affinity), full NAT (SNAT to the node so replies come
 * back through it; only DNAT towards a local pod where the VIP keeps the
 * client's source) and the packet rewrite, in XDP and in tc (lb_tc.h).
 * A flow is described by a struct sl_flow_tuple, exactly as its packets carry it. */
#pragma once

#include "maps.h"
#include "csum.h"

#define SL_NAT_PORT_MIN   61000
#define SL_NAT_PORT_MAX   65535
#define SL_NAT_PORT_RANGE (SL_NAT_PORT_MAX - SL_NAT_PORT_MIN + 1)
#define SL_NAT_PROBES     8         /* bounded: a new flow tries this many NAT ports */

#define SL_JHASH_INITVAL  0xdeadbeef

static __always_inline __u32 sl_rol32(__u32 w, __u32 s)
{
	return (w << s) | (w >> (32 - s));
}

/* jhash_3words() of the kernel (lookup3 final mix): cheap, well spread, and
 * easy to mirror in Python, where tests predict the Maglev slot of a flow. */
static __always_inline __u32 sl_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += SL_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= sl_rol32(b, 14);
	a ^= c; a -= sl_rol32(c, 11);
	b ^= a; b -= sl_rol32(a, 25);
	c ^= b; c -= sl_rol32(b, 16);
	a ^= c; a -= sl_rol32(c, 4);
	b ^= a; b -= sl_rol32(a, 14);
	c ^= b; c -= sl_rol32(b, 24);
	return c;
}

/* Per-flow hash over the 5-tuple as it lies in the packet (network byte order
 * words, as loaded by this little-endian host). Ports are 0 for protocols
 * without them, which makes it an address-pair hash. */
static __always_inline __u32 sl_flow_hash(const struct sl_flow_tuple *t)
{
	return sl_jhash_3words(t->saddr, t->daddr, ((__u32)t->sport << 16) | t->dport, t->proto);
}

/* Maglev: the flow's slot in the VIP's lookup table names the backend. */
static __always_inline const struct sl_backend *
sl_lb_maglev_backend(const struct sl_lb_vip *vip, __u32 hash, __u32 *backend_id)
{
	__u32 slot = hash % SL_MAGLEV_SIZE;

	/* The verifier does not learn bounds from a modulo: state it again. */
	asm volatile("" : "+r"(slot));
	if (slot >= SL_MAGLEV_SIZE)
		return NULL;
	*backend_id = vip->table[slot];
	return bpf_map_lookup_elem(&sl_backends, backend_id);
}

/* The backend of a new flow: with ClientIP affinity, the one the client used
 * last unless its timeout ran out; otherwise, and for a new client, Maglev's,
 * which the client then keeps. */
static __always_inline const struct sl_backend *
sl_lb_select_backend(const struct sl_lb_vip *vip, const struct sl_flow_tuple *t, __u32 hash)
{
	struct sl_lb_affinity_key ak = { .vip = t->daddr, .port = t->dport, .proto = t->proto, .client = t->saddr };
	struct sl_lb_affinity fresh = {};
	const struct sl_backend *be;
	struct sl_lb_affinity *aff;
	__u64 now, timeout;

	if (!(vip->flags & SL_LB_AFFINITY))
		return sl_lb_maglev_backend(vip, hash, &fresh.backend_id);
	now = bpf_ktime_get_ns();
	timeout = (__u64)(vip->flags >> SL_LB_FLAGS_BITS) * 1000000000ULL;
	aff = bpf_map_lookup_elem(&sl_lb_affinity, &ak);
	if (aff && now - aff->last_used_ns < timeout) {
		be = bpf_map_lookup_elem(&sl_backends, &aff->backend_id);
		if (be) {
			aff->last_used_ns = now;
			return be;
		}
	}
	be = sl_lb_maglev_backend(vip, hash, &fresh.backend_id);
	if (be) {
		fresh.last_used_ns = now;
		bpf_map_update_elem(&sl_lb_affinity, &ak, &fresh, BPF_ANY);
	}
	return be;
}

/* Insert the two entries of flow `fwd`: itself, rewritten to `out`, and its
 * reply `rev`, rewritten back to VIP -> client. The reply's entry goes first,
 * with BPF_NOEXIST: it claims `rev` atomically against other CPUs. */
static __always_inline int sl_lb_nat_insert(const struct sl_flow_tuple *fwd, const struct sl_flow_tuple *rev,
					    const struct sl_nat *out)
{
	struct sl_nat back = {
		.saddr = fwd->daddr,
		.daddr = fwd->saddr,
		.sport = fwd->dport,
		.dport = fwd->sport,
	};

	if (bpf_map_update_elem(&sl_lb_nat, rev, &back, BPF_NOEXIST))
		return -1;
	if (bpf_map_update_elem(&sl_lb_nat, fwd, out, BPF_ANY)) {
		bpf_map_delete_elem(&sl_lb_nat, rev);
		return -1;
	}
	return 0;
}

/* Both NAT entries of a new flow `fwd` (client -> VIP) towards `be`, keeping
 * the client's address (SL_LB_KEEP_SOURCE, for a backend that is a local pod,
 * whose replies tc_from_pod sees):
 *   forward: client:cport -> VIP:vport     becomes client:cport -> backend:bport
 *   reverse: backend:bport -> client:cport becomes VIP:vport -> client:cport
 * Should another flow of the client's address and port hold the reverse entry
 * (through another VIP), the caller falls back to sl_lb_nat_create. */
static __always_inline int sl_lb_dnat_create(const struct sl_flow_tuple *fwd, const struct sl_backend *be,
					     struct sl_nat *out)
{
	struct sl_flow_tuple rev = {
		.saddr = be->ip,
		.daddr = fwd->saddr,
		.sport = be->port,
		.dport = fwd->sport,
		.proto = fwd->proto,
	};

	out->saddr = fwd->saddr;
	out->daddr = be->ip;
	out->sport = fwd->sport;
	out->dport = be->port;
	return sl_lb_nat_insert(fwd, &rev, out);
}

/* Create both NAT entries of a new flow `fwd` (client -> VIP) towards `be`:
 *   forward: client:cport -> VIP:vport   becomes node:natport -> backend:bport
 *   reverse: backend:bport -> node:natport becomes VIP:vport -> client:cport
 * The NAT port comes from the flow hash; the first of SL_NAT_PROBES candidates
 * whose reverse entry is free is the flow's. */
static __always_inline int sl_lb_nat_create(const struct sl_flow_tuple *fwd, const struct sl_backend *be,
					    __be32 node_ip, __u32 hash, struct sl_nat *out)
{
	struct sl_flow_tuple rev = {
		.saddr = be->ip,
		.daddr = node_ip,
		.sport = be->port,
		.proto = fwd->proto,
	};
	__u32 i;

	out->saddr = node_ip;
	out->daddr = be->ip;
	out->dport = be->port;
	for (i = 0; i < SL_NAT_PROBES; i++) {
		rev.dport = bpf_htons(SL_NAT_PORT_MIN + (hash + i) % SL_NAT_PORT_RANGE);
		out->sport = rev.dport;
		if (!sl_lb_nat_insert(fwd, &rev, out))
			return 0;
	}
	return -1;
}

/* A new flow `t` to `vip`: its backend and both NAT entries, `out` the
 * rewrite of its packets. The client's address is kept only towards a pod of
 * this node (where the VIP asks for it): only there does tc_from_pod see the
 * reply to translate back. 0, or the reason it cannot be balanced:
 * SL_DROP_NO_BACKEND or SL_DROP_NAT_EXHAUSTED. */
static __always_inline int sl_lb_new_flow(const struct sl_lb_vip *vip, const struct sl_flow_tuple *t, __u32 hash,
					  __be32 node_ip, struct sl_nat *out)
{
	struct sl_endpoint_key ek = {};
	const struct sl_backend *be;
	bool keep_source;

	be = vip->backend_count ? sl_lb_select_backend(vip, t, hash) : NULL;
	if (!be)
		return SL_DROP_NO_BACKEND;
	ek.ip = be->ip;
	keep_source = (vip->flags & SL_LB_KEEP_SOURCE) && bpf_map_lookup_elem(&sl_endpoints, &ek);
	if ((!keep_source || sl_lb_dnat_create(t, be, out)) && sl_lb_nat_create(t, be, node_ip, hash, out))
		return SL_DROP_NAT_EXHAUSTED;
	return 0;
}

/* Rewrite addresses and ports of a TCP/UDP packet to `to`, updating the IPv4
 * checksum and (through the pseudo header) the L4 checksum `l4sum`
 * incrementally; UDP keeps the "no checksum" zero. For XDP: a frame from a
 * wire carries complete checksums, which is what this arithmetic assumes. */
static __always_inline void sl_lb_rewrite(struct iphdr *ip, struct sl_l4_ports *l4, __sum16 *l4sum,
					  __u8 proto, const struct sl_nat *to)
{
	sl_csum_replace4(&ip->check, ip->saddr, to->saddr);
	sl_csum_replace4(&ip->check, ip->daddr, to->daddr);
	if (proto == IPPROTO_UDP) {
		sl_udp_csum_replace4(l4sum, ip->saddr, to->saddr);
		sl_udp_csum_replace4(l4sum, ip->daddr, to->daddr);
		sl_udp_csum_replace2(l4sum, l4->sport, to->sport);
		sl_udp_csum_replace2(l4sum, l4->dport, to->dport);
	} else {
		sl_csum_replace4(l4sum, ip->saddr, to->saddr);
		sl_csum_replace4(l4sum, ip->daddr, to->daddr);
		sl_csum_replace2(l4sum, l4->sport, to->sport);
		sl_csum_replace2(l4sum, l4->dport, to->dport);
	}
	ip->saddr = to->saddr;
	ip->daddr = to->daddr;
	l4->sport = to->sport;
	l4->dport = to->dport;
}

/* The same rewrite on an skb in tc (`from` is the tuple the packet carries,
 * its L4 header at `l4_off`). Packets a pod sends through its veth are
 * usually CHECKSUM_PARTIAL: the L4 checksum field holds only the pseudo-header
 * sum, and the NIC or the kernel completes it on transmit. sl_lb_rewrite's
 * arithmetic, right for a complete checksum, would corrupt such a sum. The
 * kernel's helpers know the skb's checksum state: with BPF_F_PSEUDO_HDR an
 * address change is folded into a partial sum as into a complete one (and
 * into skb->csum under CHECKSUM_COMPLETE), while a port change, outside the
 * pseudo header, leaves a partial sum alone since the completion covers the
 * new port. BPF_F_MARK_MANGLED_0 keeps UDP's "no checksum" zero and sends a
 * computed zero as 0xffff. The IPv4 header checksum is always complete.
 * Returns 0 or a helper's negative error; every packet pointer the caller
 * held is invalid afterwards. */
static __always_inline long sl_lb_rewrite_skb(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
					      const struct sl_flow_tuple *from, const struct sl_nat *to)
{
	const __u32 ip_check = ETH_HLEN + __builtin_offsetof(struct iphdr, check);
	const __u32 ip_addrs = ETH_HLEN + __builtin_offsetof(struct iphdr, saddr);
	__u32 l4_check;
	__u64 l4_flags;
	long err;

	if (proto == IPPROTO_TCP) {
		l4_check = l4_off + __builtin_offsetof(struct tcphdr, check);
		l4_flags = 0;
	} else {
		l4_check = l4_off + __builtin_offsetof(struct udphdr, check);
		l4_flags = BPF_F_MARK_MANGLED_0;
	}

	err = bpf_l3_csum_replace(skb, ip_check, from->saddr, to->saddr, sizeof(__be32));
	if (!err)
		err = bpf_l3_csum_replace(skb, ip_check, from->daddr, to->daddr, sizeof(__be32));
	if (!err)
		err = bpf_l4_csum_replace(skb, l4_check, from->saddr, to->saddr,
					  l4_flags | BPF_F_PSEUDO_HDR | sizeof(__be32));
	if (!err)
		err = bpf_l4_csum_replace(skb, l4_check, from->daddr, to->daddr,
					  l4_flags | BPF_F_PSEUDO_HDR | sizeof(__be32));
	if (!err)
		err = bpf_l4_csum_replace(skb, l4_check, from->sport, to->sport, l4_flags | sizeof(__be16));
	if (!err)
		err = bpf_l4_csum_replace(skb, l4_check, from->dport, to->dport, l4_flags | sizeof(__be16));
	/* saddr and daddr are adjacent in struct sl_nat as in the IPv4 header,
	 * sport and dport as in the TCP and UDP headers: two stores. */
	if (!err)
		err = bpf_skb_store_bytes(skb, ip_addrs, &to->saddr, 2 * sizeof(__be32), 0);
	if (!err)
		err = bpf_skb_store_bytes(skb, l4_off, &to->sport, 2 * sizeof(__be16), 0);
	return err;
}
