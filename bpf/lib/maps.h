/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the Sluice datapath, and the layout of its keys and values.
 * This is the only definition: the Python runtime checks its ctypes mirrors
 * against these structs in the object's BTF. All maps are pinned by name
 * (LIBBPF_PIN_BY_NAME) so every program object shares one instance per node.
 * Addresses and ports are in network byte order unless a field says otherwise.
 * The enums' numbers are ABI, as the counters' are (metrics.h): flags sit in
 * pinned maps that outlive a program upgrade, and user space writes them.
 * Never renumber, only append. */
#pragma once

#include "common.h"
#include "metrics.h"

#define SL_MAX_ENDPOINTS   65536
#define SL_MAX_ROUTES      16384
#define SL_MAX_SERVICES    262144   /* slots: one master + one per backend */
#define SL_MAX_BACKENDS    262144
#define SL_MAX_PREFILTER   65536
#define SL_MAX_LB_VIPS     1024
#define SL_MAX_LB_AFFINITY 65536
#define SL_MAX_NAT         262144
#define SL_MAX_SOCK_REVNAT 262144
#define SL_MAX_SOCK_AFFINITY 65536
#define SL_MAX_SOCKS       65536
#define SL_MAX_CPUS        64
#define SL_MAX_FAILSAFE    64
#define SL_MAX_IPCACHE     262144
#define SL_MAX_POLICY_CIDRS 16384
#define SL_MAX_POLICY      262144
#define SL_MAX_CT          262144
#define SL_MAGLEV_SIZE     1021     /* prime: Maglev lookup table size per LB VIP */

/* ---- node configuration (single slot array, written by the agent) ---- */
enum sl_config_flags {
	SL_CFG_CPUMAP = 1 << 0,     /* XDP spreads non-LB traffic over sl_cpu_map */
	SL_CFG_POLICY = 1 << 1,     /* tc tracks pods' flows and enforces NetworkPolicy (lib/policy.h) */
};

struct sl_config {
	__be32 node_ip;             /* source address for XDP LB NAT */
	__u32 nic_ifindex;
	__u32 flags;                /* enum sl_config_flags */
	__u32 cpu_count;            /* valid entries in sl_cpus */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sl_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_config SEC(".maps");

/* ---- local pods: destination lookup for redirect_peer ---- */
struct sl_endpoint_key {
	__be32 ip;
};

struct sl_endpoint {
	__u32 ifindex;              /* host-side veth, as seen from the node's netns */
	__u8 pod_mac[ETH_ALEN];     /* MAC of the pod's eth0 */
	__u8 host_mac[ETH_ALEN];    /* MAC of the host-side veth */
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SL_MAX_ENDPOINTS);
	__type(key, struct sl_endpoint_key);
	__type(value, struct sl_endpoint);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_endpoints SEC(".maps");

/* ---- other nodes' pod CIDRs ---- */
struct sl_route_key {
	__u32 prefixlen;
	__be32 ip;
};

enum sl_route_flags {
	SL_ROUTE_TUNNEL = 1 << 0,   /* VXLAN: set tunnel key, redirect to the vxlan device */
};

struct sl_route {
	__be32 nexthop;             /* the remote node's underlay address */
	__u32 ifindex;              /* NIC (native) or VXLAN device (tunnel) */
	__u32 flags;                /* enum sl_route_flags */
	__u32 vni;                  /* tunnel id, host byte order */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SL_MAX_ROUTES);
	__type(key, struct sl_route_key);
	__type(value, struct sl_route);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_routes SEC(".maps");

/* ---- services (socket LB): slot 0 is the master entry, slots 1..count point
 * at backends. The same backends map serves the XDP LB. ---- */
struct sl_service_key {
	__be32 vip;
	__be16 port;
	__u8 proto;                 /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad;
	__u16 slot;                 /* host byte order; 0 = master */
	__u16 pad2;
};

enum sl_service_flags {
	SL_SVC_AFFINITY = 1 << 0,   /* master: ClientIP session affinity (sl_sock_affinity) */
};

/* The master has no backend: its first word carries the affinity timeout, so
 * the value keeps its size and pinned maps stay compatible. */
struct sl_service {
	union {
		__u32 backend_id;       /* slot > 0 */
		__u32 affinity_timeout; /* master: seconds, with SL_SVC_AFFINITY */
	};
	__u32 svc_id;               /* master: stable id of the service */
	__u16 count;                /* master: number of backend slots */
	__u16 flags;                /* master: enum sl_service_flags */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SL_MAX_SERVICES);
	__type(key, struct sl_service_key);
	__type(value, struct sl_service);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_services SEC(".maps");

struct sl_backend {
	__be32 ip;
	__be16 port;
	__u8 proto;
	__u8 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SL_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct sl_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_backends SEC(".maps");

/* Socket LB reverse translation: what a socket was connected/sent to, so
 * recvmsg4 and getpeername4 can show the VIP instead of the backend. */
struct sl_sock_revnat_key {
	__u64 cookie;               /* bpf_get_socket_cookie() */
	__be32 ip;                  /* backend address */
	__be16 port;                /* backend port */
	__u16 pad;
};

struct sl_sock_revnat {
	__be32 vip;
	__be16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SL_MAX_SOCK_REVNAT);
	__type(key, struct sl_sock_revnat_key);
	__type(value, struct sl_sock_revnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_sock_revnat SEC(".maps");

/* Session affinity (Kubernetes sessionAffinity: ClientIP) of the socket LB:
 * the backend a client last used per service. The client is its network
 * namespace (a pod, or the host), which a socket hook knows without packets. */
struct sl_sock_affinity_key {
	__u32 svc_id;
	__u32 pad;
	__u64 netns_cookie;         /* bpf_get_netns_cookie() */
};

struct sl_sock_affinity {
	__u32 backend_id;
	__u16 slot;                 /* the service slot that held backend_id */
	__u16 pad;
	__u64 last_used_ns;         /* bpf_ktime_get_ns() */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SL_MAX_SOCK_AFFINITY);
	__type(key, struct sl_sock_affinity_key);
	__type(value, struct sl_sock_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_sock_affinity SEC(".maps");

/* ---- failsafe: the node's management flows (lib/failsafe.h) ---- */
struct sl_failsafe_key {
	__be16 port;
	__u8 proto;                 /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SL_MAX_FAILSAFE);
	__type(key, struct sl_failsafe_key);
	__type(value, __u32);       /* 1 */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_failsafe_ports SEC(".maps");

/* ---- XDP: prefilter (source CIDRs dropped at the NIC) ---- */
struct sl_prefilter_key {
	__u32 prefixlen;
	__be32 ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SL_MAX_PREFILTER);
	__type(key, struct sl_prefilter_key);
	__type(value, __u32);       /* rule id, for reporting */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_prefilter SEC(".maps");

/* ---- XDP: L4 load balancer for external VIPs ---- */
struct sl_lb_vip_key {
	__be32 vip;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

enum sl_lb_vip_flags {
	SL_LB_KEEP_SOURCE     = 1 << 0, /* a local pod backend sees the client's address (DNAT only) */
	SL_LB_AFFINITY        = 1 << 1, /* ClientIP session affinity (sl_lb_affinity) */
	SL_LB_FLAGS_BITS      = 8,      /* flags: the low bits; the affinity timeout (s) above them */
};

/* `flags` carries the affinity timeout in its upper 24 bits (up to 194 days;
 * Kubernetes allows one day): the value keeps its size, so pinned maps stay
 * compatible with programs that knew no flags. */
struct sl_lb_vip {
	__u32 backend_count;
	__u32 flags;                    /* enum sl_lb_vip_flags | timeout << SL_LB_FLAGS_BITS */
	__u32 table[SL_MAGLEV_SIZE];    /* Maglev lookup table of backend ids */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SL_MAX_LB_VIPS);
	__type(key, struct sl_lb_vip_key);
	__type(value, struct sl_lb_vip);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_lb_vips SEC(".maps");

/* Session affinity of the XDP LB: the backend a client address last used per
 * VIP. User space removes the entries of backends a VIP loses. */
struct sl_lb_affinity_key {
	__be32 vip;                 /* the VIP's sl_lb_vip_key ... */
	__be16 port;
	__u8 proto;
	__u8 pad;
	__be32 client;              /* ... and the client's address */
};

struct sl_lb_affinity {
	__u32 backend_id;
	__u32 pad;
	__u64 last_used_ns;         /* bpf_ktime_get_ns() */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SL_MAX_LB_AFFINITY);
	__type(key, struct sl_lb_affinity_key);
	__type(value, struct sl_lb_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_lb_affinity SEC(".maps");

/* A flow's 5-tuple as its packets carry it: the LB NAT key and what the flow
 * hash is computed over. */
struct sl_flow_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* LB NAT: a flow and the 4-tuple to rewrite it to. A new flow adds two
 * entries: client->VIP becomes node->backend, and backend->node becomes
 * VIP->client; with SL_LB_KEEP_SOURCE, client->VIP becomes client->backend
 * and backend->client becomes VIP->client. */
struct sl_nat {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SL_MAX_NAT);
	__type(key, struct sl_flow_tuple);
	__type(value, struct sl_nat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_lb_nat SEC(".maps");

/* ---- NetworkPolicy (lib/policy.h, lib/conntrack.h) ---- */
struct sl_ipv4_prefix_key {
	__u32 prefixlen;
	__be32 ip;
};

/* Identities: pods sharing a namespace and labels share one (Cilium's model),
 * so a new pod changes the ipcache, not the policies. */
enum sl_identity_reserved {
	SL_ID_ANY          = 0,         /* sl_policy: any peer; never an address's identity */
	SL_ID_HOST         = 1,         /* this node's own addresses: always allowed */
	SL_ID_WORLD        = 2,         /* an address sl_ipcache does not know */
	SL_ID_REMOTE_NODE  = 3,         /* another node's address */
	SL_ID_FIRST_POD    = 256,       /* pod identities (namespace, labels) from here */
	SL_ID_FIRST_CIDR   = 1 << 24,   /* ipBlock prefixes' identities (sl_policy_cidrs) from here */
};

/* Every pod of the cluster (/32) and every node address -> its identity. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SL_MAX_IPCACHE);
	__type(key, struct sl_ipv4_prefix_key);
	__type(value, __u32);       /* identity */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_ipcache SEC(".maps");

/* Every prefix an ipBlock (cidr or except) of a local pod's policy names ->
 * its identity: an address is in an ipBlock exactly when its longest match
 * here lies inside the cidr and inside none of the excepts. Looked up apart
 * from sl_ipcache, so that an ipBlock also matches pods' addresses. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SL_MAX_POLICY_CIDRS);
	__type(key, struct sl_ipv4_prefix_key);
	__type(value, __u32);       /* identity */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_policy_cidrs SEC(".maps");

/* Both a direction (sl_policy_key) and a bit of a pod's isolation. */
enum sl_policy_direction {
	SL_POLICY_INGRESS = 1 << 0,
	SL_POLICY_EGRESS  = 1 << 1,
};

/* Local pods isolated by a NetworkPolicy in a direction: endpoint address ->
 * enum sl_policy_direction bits. A pod without an entry allows everything. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SL_MAX_ENDPOINTS);
	__type(key, struct sl_endpoint_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_policy_isolation SEC(".maps");

/* What an isolated pod allows: (endpoint, peer identity, direction, protocol,
 * port). An entry matches the leading `prefixlen` bits: every protocol and
 * port (SL_POLICY_PREFIX_PEER), every port of a protocol
 * (SL_POLICY_PREFIX_PROTO), or a block of ports (more bits, up to
 * SL_POLICY_PREFIX_FULL): how a range (endPort) is written. */
struct sl_policy_key {
	__u32 prefixlen;
	__be32 endpoint;            /* the local pod */
	__u32 identity;             /* the peer's; SL_ID_ANY: every peer */
	__u8 direction;             /* enum sl_policy_direction */
	__u8 proto;
	__be16 port;                /* the pod's port (ingress), the peer's (egress) */
};

enum sl_policy_prefix {
	SL_POLICY_PREFIX_PEER  = 72,
	SL_POLICY_PREFIX_PROTO = 80,
	SL_POLICY_PREFIX_FULL  = 96,
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SL_MAX_POLICY);
	__type(key, struct sl_policy_key);
	__type(value, __u32);       /* 1 */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_policy SEC(".maps");

/* Policy drops per pod and direction. */
struct sl_policy_drop_key {
	__be32 endpoint;
	__u32 direction;            /* enum sl_policy_direction */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, SL_MAX_ENDPOINTS);
	__type(key, struct sl_policy_drop_key);
	__type(value, struct sl_metric);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_policy_drops SEC(".maps");

/* Connection tracking of pods' flows, one entry per flow and direction in
 * which a local pod saw it first: (flow, SL_POLICY_EGRESS) when the pod sent
 * it, (flow, SL_POLICY_INGRESS) when the pod received it. A packet belongs to
 * a tracked flow when (its tuple, its direction) or (its reversed tuple, the
 * other direction) is there and not expired. */
struct sl_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;               /* ICMP echo: the identifier, in both ports */
	__be16 dport;
	__u8 proto;
	__u8 direction;             /* enum sl_policy_direction */
	__u16 pad;
};

enum sl_ct_flags {
	SL_CT_REPLIED = 1 << 0,     /* a packet came back */
	SL_CT_CLOSING = 1 << 1,     /* TCP: FIN or RST seen */
};

/* Seconds an entry lives after its flow's last packet (Cilium's figures). */
enum sl_ct_lifetime {
	SL_CT_LIFETIME_TCP     = 21600,
	SL_CT_LIFETIME_TCP_SYN = 60,
	SL_CT_LIFETIME_CLOSING = 10,
	SL_CT_LIFETIME_OTHER   = 60,
};

struct sl_ct_entry {
	__u64 expires_ns;           /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 flags;                /* enum sl_ct_flags */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SL_MAX_CT);
	__type(key, struct sl_ct_key);
	__type(value, struct sl_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_ct SEC(".maps");

/* ---- XDP: spreading over CPUs ---- */
struct {
	__uint(type, BPF_MAP_TYPE_CPUMAP);
	__uint(max_entries, SL_MAX_CPUS);
	__type(key, __u32);
	__type(value, struct bpf_cpumap_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_cpu_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SL_MAX_CPUS);
	__type(key, __u32);         /* 0 .. sl_config.cpu_count - 1 */
	__type(value, __u32);       /* CPU number, a key of sl_cpu_map */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_cpus SEC(".maps");

/* ---- same-node TCP acceleration ---- */
struct sl_sock_key {
	__u64 netns;                /* netns cookie when the peer shares the namespace, else 0 */
	__be32 sip;
	__be32 dip;
	__be16 sport;
	__be16 dport;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SL_MAX_SOCKS);
	__type(key, struct sl_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_sock_hash SEC(".maps");

/* ---- counters ---- */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SL_METRICS_SLOTS);
	__type(key, __u32);
	__type(value, struct sl_metric);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_metrics SEC(".maps");

/* ---- for user space only ----
 * Never read by a program: this puts every enum that user space reads, or that
 * tests compare with Python's constants, into each object's BTF (clang emits
 * only the types something uses). libbpf skips the section. */
struct sl_btf_enums {
	enum sl_hook hook;
	enum sl_outcome outcome;
	enum sl_metrics_layout metrics_layout;
	enum sl_config_flags config_flags;
	enum sl_route_flags route_flags;
	enum sl_service_flags service_flags;
	enum sl_lb_vip_flags lb_vip_flags;
	enum sl_identity_reserved identity_reserved;
	enum sl_policy_direction policy_direction;
	enum sl_policy_prefix policy_prefix;
	enum sl_ct_flags ct_flags;
	enum sl_ct_lifetime ct_lifetime;
};
const struct sl_btf_enums sl_btf_enums SEC(".sl_btf");

static __always_inline void sl_count(enum sl_hook hook, enum sl_outcome outcome, __u64 bytes)
{
	__u32 slot = hook * SL_METRICS_PER_HOOK + outcome;
	struct sl_metric *m;

	SL_DATAPATH_STAMP();
	m = bpf_map_lookup_elem(&sl_metrics, &slot);

	if (m) {
		m->packets++;
		m->bytes += bytes;
	}
}
