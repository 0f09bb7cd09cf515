// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Same-node TCP acceleration: established sockets whose peer is on this node
 * go into sl_sock_hash, and sk_msg hands their data straight to the peer
 * socket's receive queue, skipping TCP/IP and the veths in between. */
#include "common.h"
#include "maps.h"
#include "sockmap.h"

SEC("sockops")
int sockops_tcp(struct bpf_sock_ops *skops)
{
	struct sl_sock_key key;
	__be32 local_ip, remote_ip;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET)
		return 1;
	/* Read each field once: clang would otherwise rematerialise the ctx
	 * access from a computed pointer, which the verifier rejects. */
	local_ip = skops->local_ip4;
	remote_ip = skops->remote_ip4;
	if (!sl_sock_peer_is_local(local_ip, remote_ip))
		return 1;

	sl_sock_key_own(&key, bpf_get_netns_cookie(skops), local_ip, remote_ip, skops->local_port,
			skops->remote_port);
	if (!bpf_sock_hash_update(skops, &sl_sock_hash, &key, BPF_NOEXIST))
		sl_count(SL_HOOK_SOCKOPS, SL_OUT_SOCKHASH_ADD, 0);
	return 1;
}

SEC("sk_msg")
int sk_msg_redir(struct sk_msg_md *msg)
{
	struct sl_sock_key peer;

	sl_sock_key_peer(&peer, bpf_get_netns_cookie(msg), msg->local_ip4, msg->remote_ip4, msg->local_port,
			 msg->remote_port);
	/* A peer missing from the map (closing, or added after this send) is not
	 * an error: the data takes the normal TCP path, never SK_DROP. */
	if (bpf_msg_redirect_hash(msg, &sl_sock_hash, &peer, BPF_F_INGRESS) == SK_PASS)
		sl_count(SL_HOOK_SK_MSG, SL_OUT_MSG_REDIRECT, msg->size);
	else
		sl_count(SL_HOOK_SK_MSG, SL_OUT_MSG_PASS, msg->size);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
