/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking of pods' flows (sl_ct), for NetworkPolicy: a flow a
 * pod's policies allowed once passes both ways until its entry expires, its
 * replies included, whatever the policies say of the reverse direction. The
 * map is pinned and kept across agent restarts and datapath upgrades; the
 * agent removes expired entries, and under pressure the LRU evicts the least
 * recently used: a flow whose entry is gone is judged by policy again. */
#pragma once

#include "common.h"
#include "maps.h"
#include "parse.h"

#define SL_NSEC_PER_SEC 1000000000ULL

#define SL_TCP_FIN  0x01
#define SL_TCP_SYN  0x02
#define SL_TCP_RST  0x04
#define SL_TCP_ACK  0x10

#define SL_ICMP_ECHOREPLY     0
#define SL_ICMP_SOURCE_QUENCH 4
#define SL_ICMP_ECHO          8
#define SL_ICMP_TIME_EXCEEDED 11
#define SL_ICMP_PARAMETERPROB 12

/* A packet as tracking and policy see it. */
struct sl_ct_packet {
	struct sl_ct_key key;       /* the flow; for an ICMP error, the flow it reports on */
	__u8 tcp_flags;
	bool icmp_error;            /* key is the packet the error quotes, as that was sent */
};

static __always_inline __u8 sl_ct_other(__u8 direction)
{
	return direction == SL_POLICY_INGRESS ? SL_POLICY_EGRESS : SL_POLICY_INGRESS;
}

static __always_inline void sl_ct_reverse(const struct sl_ct_key *key, struct sl_ct_key *rev)
{
	rev->saddr = key->daddr;
	rev->daddr = key->saddr;
	rev->sport = key->dport;
	rev->dport = key->sport;
	rev->proto = key->proto;
	rev->direction = sl_ct_other(key->direction);
}

/* The ports of a TCP, UDP or SCTP header at `l4` (the ICMP echo identifier,
 * in both, for echoes); false when they are not within the packet. */
static __always_inline bool sl_ct_ports(void *l4, void *data_end, __u8 proto, struct sl_ct_key *key)
{
	struct sl_l4_ports *ports = l4;
	struct icmphdr *icmp = l4;

	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if ((void *)(ports + 1) > data_end)
			return false;
		key->sport = ports->sport;
		key->dport = ports->dport;
		return true;
	case IPPROTO_ICMP:
		if ((void *)(icmp + 1) > data_end)
			return false;
		if (icmp->type == SL_ICMP_ECHO || icmp->type == SL_ICMP_ECHOREPLY)
			key->sport = key->dport = icmp->un.echo.id;
		return true;
	}
	return true;
}

/* An ICMP error's quoted packet: its IPv4 header and the first bytes of its
 * L4 header, right after the ICMP header. */
static __always_inline bool sl_ct_quoted(struct icmphdr *icmp, void *data_end, struct sl_ct_key *key)
{
	struct iphdr *inner = (void *)(icmp + 1);
	void *l4;

	if ((void *)(inner + 1) > data_end || inner->ihl < 5)
		return false;
	key->saddr = inner->saddr;
	key->daddr = inner->daddr;
	key->proto = inner->protocol;
	l4 = (void *)inner + inner->ihl * 4;
	return sl_ct_ports(l4, data_end, key->proto, key);
}

/* `p` from the packet: ports only on a first (or only) fragment. */
static __always_inline void sl_ct_parse(struct __sk_buff *skb, struct iphdr *ip, struct sl_ct_packet *p)
{
	void *data_end = (void *)(long)skb->data_end;
	void *l4 = (void *)ip + ip->ihl * 4;
	struct icmphdr *icmp = l4;
	__u8 *tcp_flags = l4 + 13;

	p->key.saddr = ip->saddr;
	p->key.daddr = ip->daddr;
	p->key.proto = ip->protocol;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return;
	if (!sl_ct_ports(l4, data_end, ip->protocol, &p->key))
		return;
	if (ip->protocol == IPPROTO_TCP && (void *)(tcp_flags + 1) <= data_end)
		p->tcp_flags = *tcp_flags;
	if (ip->protocol != IPPROTO_ICMP || (void *)(icmp + 1) > data_end)
		return;
	switch (icmp->type) {
	case ICMP_DEST_UNREACH:
	case SL_ICMP_SOURCE_QUENCH:
	case SL_ICMP_TIME_EXCEEDED:
	case SL_ICMP_PARAMETERPROB: {
		struct sl_ct_key quoted = { .direction = p->key.direction };

		if (sl_ct_quoted(icmp, data_end, &quoted)) {
			p->key = quoted;
			p->icmp_error = true;
		}
	}
	}
}

static __always_inline __u64 sl_ct_lifetime_ns(__u8 proto, __u32 flags)
{
	__u64 seconds = SL_CT_LIFETIME_OTHER;

	if (proto == IPPROTO_TCP) {
		if (flags & SL_CT_CLOSING)
			seconds = SL_CT_LIFETIME_CLOSING;
		else if (flags & SL_CT_REPLIED)
			seconds = SL_CT_LIFETIME_TCP;
		else
			seconds = SL_CT_LIFETIME_TCP_SYN;
	}
	return seconds * SL_NSEC_PER_SEC;
}

static __always_inline __u32 sl_ct_flags_after(__u32 flags, const struct sl_ct_packet *p, bool reply)
{
	if (p->key.proto != IPPROTO_TCP)
		return flags | (reply ? SL_CT_REPLIED : 0);
	if ((p->tcp_flags & (SL_TCP_SYN | SL_TCP_ACK)) == SL_TCP_SYN)
		return 0;       /* a new connection on the tuple of one that closed */
	if (reply || (p->tcp_flags & SL_TCP_ACK))
		flags |= SL_CT_REPLIED;
	if (p->tcp_flags & (SL_TCP_FIN | SL_TCP_RST))
		flags |= SL_CT_CLOSING;
	return flags;
}

/* Moves an entry's expiry on; written at most once a second per flow, not on
 * every packet, unless its state changes. */
static __always_inline void sl_ct_refresh(struct sl_ct_entry *e, const struct sl_ct_packet *p, bool reply,
					  __u64 now)
{
	__u32 flags = sl_ct_flags_after(e->flags, p, reply);
	__u64 expires = now + sl_ct_lifetime_ns(p->key.proto, flags);

	if (flags != e->flags || expires > e->expires_ns + SL_NSEC_PER_SEC) {
		e->flags = flags;
		e->expires_ns = expires;
	}
}

static __always_inline struct sl_ct_entry *sl_ct_live(const struct sl_ct_key *key, __u64 now)
{
	struct sl_ct_entry *e = bpf_map_lookup_elem(&sl_ct, key);

	return e && e->expires_ns > now ? e : NULL;
}

/* True when the packet belongs to a tracked flow (either way), whose entry it
 * refreshes. An ICMP error belongs to the flow it quotes. */
static __always_inline bool sl_ct_tracked(const struct sl_ct_packet *p, __u64 now)
{
	struct sl_ct_key key = p->key, rev = {};
	struct sl_ct_entry *e;

	if (p->icmp_error)  /* the quoted packet went the other way */
		key.direction = sl_ct_other(key.direction);
	e = sl_ct_live(&key, now);
	if (e) {
		if (!p->icmp_error)
			sl_ct_refresh(e, p, false, now);
		return true;
	}
	sl_ct_reverse(&key, &rev);
	e = sl_ct_live(&rev, now);
	if (e) {
		if (!p->icmp_error)
			sl_ct_refresh(e, p, true, now);
		return true;
	}
	return false;
}

static __always_inline void sl_ct_create(const struct sl_ct_packet *p, __u64 now)
{
	struct sl_ct_entry e = { .flags = sl_ct_flags_after(0, p, false) };

	e.expires_ns = now + sl_ct_lifetime_ns(p->key.proto, e.flags);
	bpf_map_update_elem(&sl_ct, &p->key, &e, BPF_ANY);
}
