/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters: one slot per (hook, outcome). Outcomes below 128 are
 * verdicts, from 128 on they are drop reasons. Python reads both enums from the
 * object's BTF, so names are defined here and nowhere else.
 *
 * The numbers are ABI: they index sl_metrics, a pinned map that outlives a
 * program upgrade, and user space reads them. Every enumerator is numbered
 * explicitly; never renumber or reuse one, only append (and move _MAX). */
#pragma once

#include "common.h"

enum sl_hook {
	SL_HOOK_TC_FROM_POD       = 0,
	SL_HOOK_TC_FROM_NIC       = 1,
	SL_HOOK_XDP_NIC           = 2,
	SL_HOOK_SOCK_CONNECT4     = 3,
	SL_HOOK_SOCK_SENDMSG4     = 4,
	SL_HOOK_SOCK_RECVMSG4     = 5,
	SL_HOOK_SOCK_GETPEERNAME4 = 6,
	SL_HOOK_SOCKOPS           = 7,
	SL_HOOK_SK_MSG            = 8,
	SL_HOOK_MAX               = 9,  /* sizes sl_metrics */
};

enum sl_outcome {
	SL_OUT_PASS                = 1,     /* handed to the stack / next program */
	SL_OUT_REDIRECT_PEER       = 2,     /* tc: bpf_redirect_peer into a local pod */
	SL_OUT_REDIRECT_NEIGH      = 3,     /* tc: bpf_redirect_neigh out of the NIC (native routing) */
	SL_OUT_REDIRECT_TUNNEL     = 4,     /* tc: into the VXLAN device with a tunnel key */
	SL_OUT_XDP_TX              = 5,     /* xdp: LB hairpin out of the ingress NIC */
	SL_OUT_XDP_REDIRECT        = 6,     /* xdp: LB to another device */
	SL_OUT_XDP_CPUMAP          = 7,     /* xdp: spread to another CPU through the cpumap */
	SL_OUT_LB_TO_STACK         = 8,     /* xdp: LB rewrote the packet, the stack resolves L2 */
	SL_OUT_SOCK_XLATE          = 9,     /* sock: service VIP translated to a backend */
	SL_OUT_SOCK_REVNAT         = 10,    /* sock: backend address translated back to the VIP */
	SL_OUT_SOCKHASH_ADD        = 11,    /* sockops: socket added to the sockhash */
	SL_OUT_MSG_REDIRECT        = 12,    /* sk_msg: data redirected to the peer socket */
	SL_OUT_MSG_PASS            = 13,    /* sk_msg: no local peer, normal TCP path */
	SL_OUT_LB_LOCAL            = 14,    /* xdp: LB rewrote the packet for a local pod; tc delivers it */
	SL_OUT_LB_REVNAT           = 15,    /* tc: local backend's reply translated to VIP -> client, redirect_neigh */
	SL_OUT_LB_REJECT           = 16,    /* xdp: VIP without backends, answered with ICMP port unreachable */
	SL_OUT_LB_NEIGH            = 17,    /* tc: LB flow on a NIC without XDP rewritten, redirect_neigh */
	SL_OUT_FAILSAFE            = 18,    /* xdp, tc: a management flow of the node, passed before any filter */

	SL_DROP_BASE               = 128,
	SL_DROP_INVALID            = 128,   /* truncated or malformed packet */
	SL_DROP_PREFILTER          = 129,   /* source matched the XDP prefilter */
	SL_DROP_SPOOFED            = 130,   /* pod sent with a source address that is not its own */
	SL_DROP_NO_BACKEND         = 131,   /* service or LB VIP without a backend */
	SL_DROP_FRAGMENT           = 132,   /* IPv4 fragment towards a load-balanced VIP */
	SL_DROP_NAT_EXHAUSTED      = 133,   /* xdp LB: no free NAT port for a new flow */
	SL_DROP_REDIRECT_FAILED    = 134,   /* a redirect helper returned an error */
	SL_DROP_REWRITE_FAILED     = 135,   /* tc: a store or checksum helper refused a NAT rewrite */
	SL_DROP_POLICY_INGRESS     = 136,   /* tc: a new flow into a pod its NetworkPolicies do not allow */
	SL_DROP_POLICY_EGRESS      = 137,   /* tc: a new flow out of a pod its NetworkPolicies do not allow */
	SL_DROP_MAX                = 138,
};

/* Counter slot of (hook, outcome): hook * SL_METRICS_PER_HOOK + outcome. An
 * enum, not a #define, so that it is in the BTF. */
enum sl_metrics_layout {
	SL_METRICS_PER_HOOK = 256,
};
_Static_assert(SL_DROP_MAX <= SL_METRICS_PER_HOOK, "outcomes must fit in a hook's slots");

#define SL_METRICS_SLOTS    (SL_HOOK_MAX * SL_METRICS_PER_HOOK)

struct sl_metric {
	__u64 packets;
	__u64 bytes;
};
