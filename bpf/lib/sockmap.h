/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sl_sock_hash keys as seen from either end of a same-node TCP connection.
 * bpf_sock_ops and sk_msg_md give local_port in host order and remote_port as
 * the __be16 shifted into the upper half of the u32 (on little endian): both
 * are normalised to network order here. */
#pragma once

#include "common.h"
#include "maps.h"

static __always_inline __be16 sl_sock_local_port(__u32 local_port)
{
	return bpf_htons((__u16)local_port);
}

static __always_inline __be16 sl_sock_remote_port(__u32 remote_port)
{
	return (__be16)(remote_port >> 16);
}

/* Loopback and same-address 4-tuples repeat in every pod, so their keys carry
 * the namespace; a peer in another pod's namespace is keyed without one, so
 * both ends compute each other's key. */
static __always_inline __u64 sl_sock_key_netns(__u64 netns_cookie, __be32 local_ip, __be32 remote_ip)
{
	return remote_ip == local_ip || (bpf_ntohl(remote_ip) >> 24) == 127 ? netns_cookie : 0;
}

/* The key a socket is stored under: its own 4-tuple, local side first. */
static __always_inline void sl_sock_key_own(struct sl_sock_key *key, __u64 netns, __be32 local_ip,
					    __be32 remote_ip, __u32 local_port, __u32 remote_port)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->netns = sl_sock_key_netns(netns, local_ip, remote_ip);
	key->sip = local_ip;
	key->dip = remote_ip;
	key->sport = sl_sock_local_port(local_port);
	key->dport = sl_sock_remote_port(remote_port);
}

/* The key the other end of the connection is stored under. */
static __always_inline void sl_sock_key_peer(struct sl_sock_key *key, __u64 netns, __be32 local_ip,
					     __be32 remote_ip, __u32 local_port, __u32 remote_port)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->netns = sl_sock_key_netns(netns, local_ip, remote_ip);
	key->sip = remote_ip;
	key->dip = local_ip;
	key->sport = sl_sock_remote_port(remote_port);
	key->dport = sl_sock_local_port(local_port);
}

/* Only a peer on this node has a socket we can hand data to: a local pod, the
 * same address (two containers of one pod), or loopback. */
static __always_inline bool sl_sock_peer_is_local(__be32 local_ip, __be32 remote_ip)
{
	struct sl_endpoint_key ep = { .ip = remote_ip };

	if (remote_ip == local_ip || (bpf_ntohl(remote_ip) >> 24) == 127)
		return true;
	return bpf_map_lookup_elem(&sl_endpoints, &ep);
}
