/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters: one slot per (hook, outcome). Outcomes below 128 are
 * verdicts, from 128 on they are drop reasons. Python reads both enums from the
 * object's BTF, so names are defined here and nowhere else. */
#pragma once

#include "common.h"

enum sl_hook {
	SL_HOOK_TC_FROM_POD = 0,
	SL_HOOK_TC_FROM_NIC,
	SL_HOOK_XDP_NIC,
	SL_HOOK_SOCK_CONNECT4,
	SL_HOOK_SOCK_SENDMSG4,
	SL_HOOK_SOCK_RECVMSG4,
	SL_HOOK_SOCK_GETPEERNAME4,
	SL_HOOK_SOCKOPS,
	SL_HOOK_SK_MSG,
	SL_HOOK_MAX,
};

enum sl_outcome {
	SL_OUT_PASS = 1,            /* handed to the stack / next program */
	SL_OUT_REDIRECT_PEER,       /* tc: bpf_redirect_peer into a local pod */
	SL_OUT_REDIRECT_NEIGH,      /* tc: bpf_redirect_neigh out of the NIC (native routing) */
	SL_OUT_REDIRECT_TUNNEL,     /* tc: into the VXLAN device with a tunnel key */
	SL_OUT_XDP_TX,              /* xdp: LB hairpin out of the ingress NIC */
	SL_OUT_XDP_REDIRECT,        /* xdp: LB to another device */
	SL_OUT_XDP_CPUMAP,          /* xdp: spread to another CPU through the cpumap */
	SL_OUT_LB_TO_STACK,         /* xdp: LB rewrote the packet, the stack resolves L2 */
	SL_OUT_SOCK_XLATE,          /* sock: service VIP translated to a backend */
	SL_OUT_SOCK_REVNAT,         /* sock: backend address translated back to the VIP */
	SL_OUT_SOCKHASH_ADD,        /* sockops: socket added to the sockhash */
	SL_OUT_MSG_REDIRECT,        /* sk_msg: data redirected to the peer socket */
	SL_OUT_MSG_PASS,            /* sk_msg: no local peer, normal TCP path */
	/* Appended, never inserted: counters live in a pinned map that survives
	 * an upgrade, so an outcome's number must not change. */
	SL_OUT_LB_LOCAL,            /* xdp: LB rewrote the packet for a local pod; tc delivers it */
	SL_OUT_LB_REVNAT,           /* tc: local backend's reply translated to VIP -> client, redirect_neigh */

	SL_DROP_BASE = 128,
	SL_DROP_INVALID = SL_DROP_BASE, /* truncated or malformed packet */
	SL_DROP_PREFILTER,          /* source matched the XDP prefilter */
	SL_DROP_SPOOFED,            /* pod sent with a source address that is not its own */
	SL_DROP_NO_BACKEND,         /* service or LB VIP without a backend */
	SL_DROP_FRAGMENT,           /* IPv4 fragment towards a load-balanced VIP */
	SL_DROP_NAT_EXHAUSTED,      /* xdp LB: no free NAT port for a new flow */
	SL_DROP_REDIRECT_FAILED,    /* a redirect helper returned an error */
	SL_DROP_REWRITE_FAILED,     /* tc: a store or checksum helper refused a NAT rewrite */
	SL_DROP_MAX,
};

#define SL_METRICS_PER_HOOK 256
#define SL_METRICS_SLOTS    (SL_HOOK_MAX * SL_METRICS_PER_HOOK)

struct sl_metric {
	__u64 packets;
	__u64 bytes;
};

/* Never read by a program: it puts both enums into the object's BTF, where the
 * Python runtime reads the hook and outcome names. libbpf skips the section. */
struct sl_metric_names {
	enum sl_hook hook;
	enum sl_outcome outcome;
};
const struct sl_metric_names sl_metric_names SEC(".sl_names");
