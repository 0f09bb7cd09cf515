// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Host-reachable services: socket-level load balancing on cgroup hooks. */
#include "common.h"
#include "maps.h"
#include "sock.h"

/* TCP (and connected UDP): one random backend per connection. */
SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sl_sock_xlate(ctx, SL_HOOK_SOCK_CONNECT4, false);
}

/* Unconnected UDP: every datagram of a socket goes to the same backend, so a
 * request/response exchange over one socket stays with one server. */
SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sl_sock_xlate(ctx, SL_HOOK_SOCK_SENDMSG4, true);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sl_sock_revxlate(ctx, SL_HOOK_SOCK_RECVMSG4);
}

SEC("cgroup/getpeername4")
int sock_getpeer4(struct bpf_sock_addr *ctx)
{
	return sl_sock_revxlate(ctx, SL_HOOK_SOCK_GETPEERNAME4);
}

char _license[] SEC("license") = "Dual BSD/GPL";
