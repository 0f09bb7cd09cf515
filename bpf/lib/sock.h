/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Socket load balancing (host-reachable services). The cgroup sock_addr hooks
 * replace a service VIP with a backend before the socket emits any packet, so
 * no per-packet NAT is needed; the reverse hooks show the VIP again wherever
 * the application can observe the peer (recvfrom, getpeername). */
#pragma once

#include "common.h"
#include "maps.h"

/* Socket cookies are sequential: multiplicative hashing spreads them over the
 * backend slots. */
static __always_inline __u32 sl_sock_cookie_hash(__u64 cookie)
{
	return (__u32)((cookie * 0x9E3779B97F4A7C15ULL) >> 32);
}

/* vmlinux.h carries no errno macros (asm-generic/errno.h). */
#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

#define SL_NSEC_PER_SEC 1000000000ULL

/* connect4/sendmsg4: VIP:port -> backend. A service without a usable backend
 * fails the syscall at once with ECONNREFUSED, as kube-proxy's REJECT does,
 * rather than let it go to an address nobody owns. per_socket picks the same
 * backend for every call on one socket (unconnected UDP), otherwise each call
 * picks at random. A service with session affinity gives a client (its network
 * namespace) the backend it used last, while it reuses it within the timeout. */
static __always_inline int sl_sock_xlate(struct bpf_sock_addr *ctx, enum sl_hook hook, bool per_socket)
{
	struct sl_service_key key = {
		.vip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = ctx->protocol,
	};
	const struct sl_service *master, *slot = NULL;
	const struct sl_sock_affinity *aff;
	struct sl_sock_affinity_key akey = {};
	struct sl_sock_affinity aval;
	const struct sl_backend *backend;
	struct sl_sock_revnat_key rkey;
	struct sl_sock_revnat rval;
	__u64 cookie, now = 0;
	bool affine;
	__u32 hash;

	master = bpf_map_lookup_elem(&sl_services, &key);
	if (!master)
		return 1;
	if (!master->count)
		goto no_backend;

	cookie = bpf_get_socket_cookie(ctx);
	affine = master->flags & SL_SVC_AFFINITY;
	if (affine) {
		akey.svc_id = master->svc_id;
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		now = bpf_ktime_get_ns();
		aff = bpf_map_lookup_elem(&sl_sock_affinity, &akey);
		/* The slot check catches a backend the agent removed or moved
		 * since: the client then moves at once. */
		if (aff && now - aff->last_used_ns <= (__u64)master->affinity_timeout * SL_NSEC_PER_SEC &&
		    aff->slot >= 1 && aff->slot <= master->count) {
			key.slot = aff->slot;
			slot = bpf_map_lookup_elem(&sl_services, &key);
			if (slot && slot->backend_id != aff->backend_id)
				slot = NULL;
		}
	}
	if (!slot) {
		hash = per_socket ? sl_sock_cookie_hash(cookie) : bpf_get_prandom_u32();
		key.slot = hash % master->count + 1;
		/* The agent writes slots before the master, but a slot or backend
		 * can still vanish under us during an update. */
		slot = bpf_map_lookup_elem(&sl_services, &key);
		if (!slot)
			goto no_backend;
	}
	backend = bpf_map_lookup_elem(&sl_backends, &slot->backend_id);
	if (!backend)
		goto no_backend;

	if (affine) {
		/* New choice or reuse alike: this refreshes last_used_ns. */
		aval = (struct sl_sock_affinity){ .backend_id = slot->backend_id, .slot = key.slot, .last_used_ns = now };
		bpf_map_update_elem(&sl_sock_affinity, &akey, &aval, BPF_ANY);
	}

	rkey = (struct sl_sock_revnat_key){ .cookie = cookie, .ip = backend->ip, .port = backend->port };
	rval = (struct sl_sock_revnat){ .vip = key.vip, .port = key.port };
	/* LRU maps: an update evicts old entries instead of failing. */
	bpf_map_update_elem(&sl_sock_revnat, &rkey, &rval, BPF_ANY);

	ctx->user_ip4 = backend->ip;
	ctx->user_port = backend->port;
	sl_count(hook, SL_OUT_SOCK_XLATE, 0);
	return 1;

no_backend:
	sl_count(hook, SL_DROP_NO_BACKEND, 0);
	/* Returning 0 alone gives EPERM; the retval set here replaces it. */
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* recvmsg4/getpeername4: backend -> VIP:port, for sockets translated above.
 * These hooks may only return 1. */
static __always_inline int sl_sock_revxlate(struct bpf_sock_addr *ctx, enum sl_hook hook)
{
	struct sl_sock_revnat_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	const struct sl_sock_revnat *orig;

	orig = bpf_map_lookup_elem(&sl_sock_revnat, &key);
	if (orig) {
		ctx->user_ip4 = orig->vip;
		ctx->user_port = orig->port;
		sl_count(hook, SL_OUT_SOCK_REVNAT, 0);
	}
	return 1;
}
