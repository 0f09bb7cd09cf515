/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* xdp_nic: XDP on the node's NIC, before any skb exists.
 *
 * Verdicts, in the order they are decided (hook SL_HOOK_XDP_NIC):
 *   not IPv4 (ARP, IPv6, VLAN...)        XDP_PASS      SL_OUT_PASS
 *   truncated frame, bad IPv4 header,
 *   TCP/UDP header cut short             XDP_DROP      SL_DROP_INVALID
 *   a management flow of the node
 *   (failsafe.h)                         XDP_PASS      SL_OUT_FAILSAFE
 *   source in sl_prefilter               XDP_DROP      SL_DROP_PREFILTER
 *   TCP/UDP flow in sl_lb_nat (either
 *   direction), or new flow to a VIP     rewritten, then
 *     destination a local pod            XDP_PASS      SL_OUT_LB_LOCAL
 *       (tc_from_nic delivers it; the pod's reply is translated back by
 *       tc_from_pod, it never crosses this hook)
 *     FIB: out of the ingress NIC        XDP_TX        SL_OUT_XDP_TX
 *     FIB: out of another device         XDP_REDIRECT  SL_OUT_XDP_REDIRECT
 *     FIB incomplete (no neighbour...)   XDP_PASS      SL_OUT_LB_TO_STACK
 *   fragment of a flow to a VIP          XDP_DROP      SL_DROP_FRAGMENT
 *   VIP without backends: the frame
 *     becomes ICMP port unreachable      XDP_TX        SL_OUT_LB_REJECT
 *     (IPv4 options, or reshaping fails) XDP_DROP      SL_DROP_NO_BACKEND
 *   no free NAT port for a new flow      XDP_DROP      SL_DROP_NAT_EXHAUSTED
 *   cpumap spreading on                  XDP_REDIRECT  SL_OUT_XDP_CPUMAP
 *   anything else                        XDP_PASS      SL_OUT_PASS
 *
 * Only a first fragment carries ports, so only it can be matched to a VIP and
 * dropped; later fragments go to the stack, which cannot reassemble them
 * without the first and lets them expire. */
#include "common.h"
#include "maps.h"
#include "parse.h"
#include "lb.h"
#include "fib.h"
#include "reject.h"
#include "failsafe.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int verdict(struct xdp_md *ctx, int action, enum sl_outcome outcome)
{
	sl_count(SL_HOOK_XDP_NIC, outcome, ctx->data_end - ctx->data);
	return action;
}

/* A new flow to a VIP that has no backend is refused at once. */
static __always_inline int reject(struct xdp_md *ctx, enum sl_outcome *outcome)
{
	int action = sl_xdp_reject(ctx);

	*outcome = action == XDP_TX ? SL_OUT_LB_REJECT : SL_DROP_NO_BACKEND;
	return action;
}

/* Load balancing of a TCP/UDP packet whose 5-tuple is `t`: full NAT, or only
 * the destination where the VIP keeps the client's source (lb.h). Returns an
 * XDP action, or -1 when the packet is not load-balanced traffic. */
static __always_inline int lb_handle(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				     struct sl_l4_ports *l4, __sum16 *l4sum, const struct sl_flow_tuple *t,
				     __u32 hash, enum sl_outcome *outcome)
{
	struct sl_lb_vip_key vk = { .vip = t->daddr, .port = t->dport, .proto = t->proto };
	struct sl_endpoint_key ek = {};
	struct sl_lb_vip *vip;
	struct sl_config *cfg;
	struct sl_nat *nat, new;
	__u32 zero = 0;
	int refused;

	/* One lookup serves both directions: the forward entry of a known
	 * client flow and the reverse entry of a backend's reply are both
	 * keyed by the tuple the packet carries. */
	nat = bpf_map_lookup_elem(&sl_lb_nat, t);
	if (nat) {
		new = *nat;
	} else {
		vip = bpf_map_lookup_elem(&sl_lb_vips, &vk);
		if (!vip)
			return -1;
		if (!vip->backend_count)
			return reject(ctx, outcome);
		cfg = bpf_map_lookup_elem(&sl_config, &zero);
		if (!cfg || !cfg->node_ip)
			return -1;      /* not configured: the stack decides */
		refused = sl_lb_new_flow(vip, t, hash, cfg->node_ip, &new);
		if (refused == SL_DROP_NO_BACKEND)
			return reject(ctx, outcome);
		if (refused) {
			*outcome = refused;
			return XDP_DROP;
		}
	}
	sl_lb_rewrite(ip, l4, l4sum, t->proto, &new);

	/* A backend that is a pod of this node sits behind a veth, and
	 * XDP_REDIRECT into a veth only delivers when its peer (the pod's eth0)
	 * runs XDP itself, which a pod never does. Hand the rewritten packet to
	 * the stack instead: tc_from_nic on this NIC delivers it with
	 * bpf_redirect_peer like any packet for a local pod (TTL and MACs are
	 * done there). The backend's reply leaves through its veth, not this
	 * NIC, so tc_from_pod translates it back (sl_lb_nat's reverse entry). */
	ek.ip = new.daddr;
	if (bpf_map_lookup_elem(&sl_endpoints, &ek)) {
		*outcome = SL_OUT_LB_LOCAL;
		return XDP_PASS;
	}
	return sl_fib_xdp_send(ctx, eth, ip, outcome);
}

/* A first fragment towards a VIP: its followers could not be translated. */
static __always_inline bool fragment_to_vip(const struct sl_flow_tuple *t)
{
	struct sl_lb_vip_key vk = { .vip = t->daddr, .port = t->dport, .proto = t->proto };

	return bpf_map_lookup_elem(&sl_lb_vips, &vk) != NULL;
}

SEC("xdp")
int xdp_nic(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct sl_prefilter_key pk = { .prefixlen = 32 };
	struct sl_flow_tuple t = {};
	struct sl_l4_ports *l4 = NULL;
	__sum16 *l4sum = NULL;
	enum sl_outcome outcome;
	struct sl_config *cfg;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 zero = 0, hash;

	switch (sl_parse_ipv4(data, data_end, &eth, &ip)) {
	case SL_PARSE_IPV4:
		break;
	case SL_PARSE_NOT_IPV4:
		return verdict(ctx, XDP_PASS, SL_OUT_PASS);
	default:
		return verdict(ctx, XDP_DROP, SL_DROP_INVALID);
	}

	t.saddr = ip->saddr;
	t.daddr = ip->daddr;
	t.proto = ip->protocol;
	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
	    !(ip->frag_off & bpf_htons(IP_OFFSET))) {
		/* The checksum pointer is taken where each header's length is
		 * checked: the verifier cannot tie a later protocol test to it. */
		if (ip->protocol == IPPROTO_TCP) {
			struct tcphdr *th = sl_l4_header(ip, data_end, sizeof(*th));

			if (th) {
				l4 = (void *)th;
				l4sum = &th->check;
			}
		} else {
			struct udphdr *uh = sl_l4_header(ip, data_end, sizeof(*uh));

			if (uh) {
				l4 = (void *)uh;
				l4sum = &uh->check;
			}
		}
		if (!l4)
			return verdict(ctx, XDP_DROP, SL_DROP_INVALID);
		t.sport = l4->sport;
		t.dport = l4->dport;
		if (sl_failsafe_flow(ctx, &t, ctx->ingress_ifindex))
			return verdict(ctx, XDP_PASS, SL_OUT_FAILSAFE);
	}

	pk.ip = ip->saddr;
	if (bpf_map_lookup_elem(&sl_prefilter, &pk))
		return verdict(ctx, XDP_DROP, SL_DROP_PREFILTER);

	if (l4) {
		if (sl_ipv4_is_fragment(ip)) {
			if (fragment_to_vip(&t))
				return verdict(ctx, XDP_DROP, SL_DROP_FRAGMENT);
			/* Spread all fragments of a datagram alike: by addresses. */
			t.sport = t.dport = 0;
			l4 = NULL;
		}
	}
	hash = sl_flow_hash(&t);

	if (l4) {
		int action = lb_handle(ctx, eth, ip, l4, l4sum, &t, hash, &outcome);

		if (action >= 0)
			return verdict(ctx, action, outcome);
	}

	cfg = bpf_map_lookup_elem(&sl_config, &zero);
	if (cfg && (cfg->flags & SL_CFG_CPUMAP) && cfg->cpu_count) {
		__u32 idx = hash % cfg->cpu_count;
		__u32 *cpu = bpf_map_lookup_elem(&sl_cpus, &idx);

		/* XDP_PASS as the fallback: a CPU missing from the cpumap must
		 * not lose traffic. */
		if (cpu && bpf_redirect_map(&sl_cpu_map, *cpu, XDP_PASS) == XDP_REDIRECT)
			return verdict(ctx, XDP_REDIRECT, SL_OUT_XDP_CPUMAP);
	}
	return verdict(ctx, XDP_PASS, SL_OUT_PASS);
}
