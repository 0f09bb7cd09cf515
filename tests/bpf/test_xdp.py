"""xdp_nic: prefilter, L4 load balancer with full NAT, cpumap spreading.

Most tests run the program with BPF_PROG_TEST_RUN from inside a test namespace
("node") and pass that namespace's NIC as ingress_ifindex: the kernel resolves
the ifindex, and so bpf_fib_lookup, in the netns of the calling thread. The
node holds permanent neighbour entries, so the FIB answers with MACs without
any traffic. test_run does not act on XDP_TX/XDP_REDIRECT, it reports them;
the last tests attach the program to veths and send real packets."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import os
import socket
from ctypes import c_uint32
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.l2 import Ether

from lib import netns, packets
from sluice.bpf import libbpf as lb
from sluice.bpf.btf import Btf
from sluice.maps import (MAGLEV_SIZE, Backend, BackendsMap, ConfigMap, CpuListMap, CpuMap, Endpoint, EndpointsMap,
                         FailsafeMap, LbAffinityMap, LbOptions, LbVipsMap, MetricsMap, NatMap, PrefilterMap, be16, be32, ip_str,
                         sl_flow_tuple, sl_lb_affinity, sl_nat)

pytestmark = pytest.mark.kernel

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
HOOK = "SL_HOOK_XDP_NIC"

NODE_IP = "10.0.0.1"
NODE_NET1_IP = "10.1.0.1"
GATEWAY, GATEWAY_MAC = "10.0.0.254", "02:00:00:00:00:fe"
VIP, VPORT = "192.0.2.10", 80
CLIENT, CPORT = "198.51.100.7", 40000
BACKENDS = {i: Backend(f"10.0.0.{10 + i}", 8080 + i) for i in range(1, 5)}
BACKEND_MAC = {f"10.0.0.{10 + i}": f"02:00:00:00:be:{i:02x}" for i in range(1, 5)}
FAR_BACKEND, FAR_BACKEND_MAC = "10.1.0.10", "02:00:00:00:be:10"   # behind nic1: redirect
UNRESOLVED_BACKEND = "10.0.0.99"                                      # no neighbour entry
LOCAL_POD = "10.244.1.5"                                              # a pod of the node: in sl_endpoints
NAT_PORT_MIN, NAT_PORT_RANGE, NAT_PROBES = 61000, 65535 - 61000 + 1, 8


def ETH(**kw) -> Ether:  # noqa: N802
    """Ethernet with explicit MACs: scapy would otherwise ARP for a destination."""
    return Ether(src=packets.MAC_A, dst=packets.MAC_B, **kw)


# ---- a Python mirror of bpf/lib/lb.h's flow hash, to predict Maglev slots ----

M32 = 0xFFFFFFFF


def _rol32(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & M32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    initval = (initval + 0xDEADBEEF + (3 << 2)) & M32
    a, b, c = (a + initval) & M32, (b + initval) & M32, (c + initval) & M32
    c ^= b
    c = (c - _rol32(b, 14)) & M32
    a ^= c
    a = (a - _rol32(c, 11)) & M32
    b ^= a
    b = (b - _rol32(a, 25)) & M32
    c ^= b
    c = (c - _rol32(b, 16)) & M32
    a ^= c
    a = (a - _rol32(c, 4)) & M32
    b ^= a
    b = (b - _rol32(a, 14)) & M32
    c ^= b
    c = (c - _rol32(b, 24)) & M32
    return c


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, proto: int) -> int:
    return jhash_3words(be32(saddr), be32(daddr), (be16(sport) << 16) | be16(dport), proto)


def nat_port(h: int, probe: int = 0) -> int:
    return NAT_PORT_MIN + (h + probe) % NAT_PORT_RANGE


# ---- fixtures ----------------------------------------------------------------------


@dataclass
class Xdp:
    obj: object
    prog: int
    ns: str | None = None
    nic0: int = 0
    nic0_mac: str = ""

    def map(self, cls):
        return cls(self.obj.map_fd(cls.name))

    def run(self, frame: bytes, ifindex: int | None = None) -> tuple[int, bytes]:
        """One test run, as if `frame` arrived on the node's nic0."""
        ifindex = self.nic0 if ifindex is None else ifindex
        if self.ns is None:
            ret, out, _duration = lb.test_run(self.prog, frame)
            return ret, out
        with netns.entered(self.ns):
            ret, out, _duration = lb.test_run(self.prog, frame, ctx=packets.xdp_ctx_for(frame, ifindex))
        return ret, out

    def counters(self) -> dict[str, int]:
        """{outcome: packets} of the XDP hook."""
        with Btf(self.obj.path) as btf:
            hooks = btf.enum("sl_hook")
            outcomes = {k: v for k, v in btf.enum("sl_outcome").items()
                        if k != "SL_DROP_BASE" and not k.endswith("_MAX")}
        return {o: n for (h, o), (n, _bytes) in self.map(MetricsMap).read(hooks, outcomes).items() if h == HOOK}


@pytest.fixture
def xdp(load_object):
    obj = load_object("xdp_nic")
    return Xdp(obj, obj.prog_fd("xdp_nic"))


def _setup_node(ns: str) -> None:
    """nic0 (10.0.0.1/24, default route via the gateway) and nic1 (10.1.0.1/24),
    each a veth whose peer stays in the namespace, forwarding on (the FIB
    lookup of bpf_fib_lookup requires it), permanent neighbours."""
    sh = functools.partial(netns.ns_exec, ns)
    for nic, peer, addr in (("nic0", "wire0", f"{NODE_IP}/24"), ("nic1", "wire1", f"{NODE_NET1_IP}/24")):
        sh("ip", "link", "add", nic, "type", "veth", "peer", "name", peer)
        sh("ip", "addr", "add", addr, "dev", nic)
        sh("ip", "link", "set", nic, "up")
        sh("ip", "link", "set", peer, "up")
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "route", "add", "default", "via", GATEWAY, "dev", "nic0")
    neighbours = [(GATEWAY, GATEWAY_MAC, "nic0"), (FAR_BACKEND, FAR_BACKEND_MAC, "nic1")]
    neighbours += [(ip, m, "nic0") for ip, m in BACKEND_MAC.items()]
    for ip, m, dev in neighbours:
        sh("ip", "neigh", "add", ip, "lladdr", m, "nud", "permanent", "dev", dev)


@pytest.fixture
def node(xdp):
    """xdp_nic run from inside a node namespace, with a configured LB VIP."""
    with netns.namespaces("node") as (ns,):
        _setup_node(ns)
        xdp.ns = ns
        xdp.nic0 = netns.ifindex(ns, "nic0")
        xdp.nic0_mac = netns.mac(ns, "nic0")
        xdp.map(ConfigMap).set(NODE_IP, xdp.nic0)
        yield xdp


def install_vip(xdp: Xdp, backends: dict[int, Backend], vip: str = VIP, port: int = VPORT,
                proto: str = "tcp") -> list[int]:
    xdp.map(BackendsMap).put_many(backends)
    return xdp.map(LbVipsMap).put(vip, port, proto, backends)


def expected_backend(table: list[int], backends: dict[int, Backend], *five_tuple) -> Backend:
    return backends[table[flow_hash(*five_tuple) % MAGLEV_SIZE]]


# ---- parsing and prefilter ------------------------------------------------------------


def test_arp_passes(xdp):
    frame = packets.arp("10.0.0.2", "10.0.0.1")
    assert xdp.run(frame)[0] == XDP_PASS
    assert xdp.counters() == {"SL_OUT_PASS": 1}


@pytest.mark.parametrize("frame", [
    pytest.param(bytes(ETH(type=0x0800)), id="ethernet-only"),
    pytest.param(packets.tcp(CLIENT, VIP)[:14 + 12], id="ipv4-header-cut"),
    pytest.param(bytes(ETH() / IP(src=CLIENT, dst=VIP, ihl=15, proto=6)), id="ihl-beyond-end"),
    pytest.param(bytes(ETH() / IP(src=CLIENT, dst=VIP, version=6)), id="version-not-4"),
    pytest.param(packets.tcp(CLIENT, VIP)[:14 + 20 + 10], id="tcp-header-cut"),
    pytest.param(packets.udp(CLIENT, VIP)[:14 + 20 + 4], id="udp-header-cut"),
])
def test_malformed_dropped(xdp, frame):
    assert xdp.run(frame)[0] == XDP_DROP
    assert xdp.counters() == {"SL_DROP_INVALID": 1}


def test_frame_shorter_than_ethernet(xdp):
    """A 10-byte frame cannot even be test-run: the kernel refuses XDP test data
    shorter than ETH_HLEN, so the program's own length check is the guard for
    real drivers only."""
    with pytest.raises(lb.BpfError) as exc:
        xdp.run(b"\x00" * 10)
    assert exc.value.errno == errno.EINVAL
    assert xdp.counters() == {}


def test_prefilter(xdp):
    xdp.map(PrefilterMap).put("198.51.100.0/24", 7)
    xdp.map(PrefilterMap).put("203.0.113.5/32", 8)
    for src in ("198.51.100.7", "198.51.100.200", "203.0.113.5"):
        assert xdp.run(packets.udp(src, "10.0.0.1"))[0] == XDP_DROP, src
    for src in ("198.51.101.7", "203.0.113.4", "10.0.0.2"):
        assert xdp.run(packets.udp(src, "10.0.0.1"))[0] == XDP_PASS, src
    # the destination is not what the prefilter looks at
    assert xdp.run(packets.udp("10.0.0.2", "198.51.100.7"))[0] == XDP_PASS
    assert xdp.counters() == {"SL_DROP_PREFILTER": 3, "SL_OUT_PASS": 4}


# ---- load balancer ------------------------------------------------------------------


def check_forward(node: Xdp, out: bytes, backend: Backend, h: int, ttl: int = 63, probes: int = 1) -> int:
    """The client's packet became node:natport -> backend, the NAT port one of
    the flow's first `probes` candidates; returns the NAT port."""
    pkt = packets.parse(out)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    assert (pkt[IP].src, pkt[IP].dst, l4.dport) == (NODE_IP, backend.ip, backend.port)
    assert l4.sport in {nat_port(h, i) for i in range(probes)}
    assert (pkt.src, pkt.dst) == (node.nic0_mac, BACKEND_MAC.get(backend.ip, FAR_BACKEND_MAC))
    assert pkt[IP].ttl == ttl
    packets.assert_checksums_valid(out)
    return l4.sport


def test_lb_new_flow_xdp_tx_and_nat_entries(node):
    table = install_vip(node, BACKENDS)
    frame = packets.tcp(CLIENT, VIP, CPORT, VPORT, payload=b"hello")
    ret, out = node.run(frame)
    assert ret == XDP_TX
    h = flow_hash(CLIENT, VIP, CPORT, VPORT, 6)
    backend = expected_backend(table, BACKENDS, CLIENT, VIP, CPORT, VPORT, 6)
    port = check_forward(node, out, backend, h)
    assert bytes(packets.parse(out)[TCP].payload) == b"hello"
    assert sorted(node.map(NatMap).flows()) == sorted([
        ((CLIENT, CPORT, VIP, VPORT, 6), (NODE_IP, port, backend.ip, backend.port)),
        ((backend.ip, backend.port, NODE_IP, port, 6), (VIP, VPORT, CLIENT, CPORT)),
    ])
    assert node.counters() == {"SL_OUT_XDP_TX": 1}


def test_lb_same_flow_same_backend(node):
    install_vip(node, BACKENDS)
    frame = packets.tcp(CLIENT, VIP, CPORT, VPORT, flags="A")
    first = node.run(frame)
    for _attempt in range(50):
        assert node.run(frame) == first
    assert len(node.map(NatMap)) == 2
    # a new Maglev table does not move an established flow: its NAT entry wins
    other = {9: Backend("10.0.0.14", 9000)}
    install_vip(node, other)
    assert node.run(frame) == first
    assert node.counters() == {"SL_OUT_XDP_TX": 52}


def test_lb_flows_spread_over_backends(node):
    table = install_vip(node, BACKENDS)
    seen = {}
    for sport in range(20000, 20200):
        ret, out = node.run(packets.tcp(CLIENT, VIP, sport, VPORT))
        assert ret == XDP_TX
        backend = expected_backend(table, BACKENDS, CLIENT, VIP, sport, VPORT, 6)
        # two flows to one backend may want the same NAT port: the later probes on
        check_forward(node, out, backend, flow_hash(CLIENT, VIP, sport, VPORT, 6), probes=NAT_PROBES)
        seen[backend] = seen.get(backend, 0) + 1
    assert set(seen) == set(BACKENDS.values())
    assert min(seen.values()) >= 20, seen        # 200 flows over 4 backends: about 50 each
    assert len(node.map(NatMap)) == 400


def test_lb_reply_reverse_translated(node):
    install_vip(node, BACKENDS)
    ret, out = node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT))
    fwd = packets.parse(out)
    backend_ip, backend_port, port = fwd[IP].dst, fwd[TCP].dport, fwd[TCP].sport
    reply = packets.tcp(backend_ip, NODE_IP, backend_port, port, flags="SA", payload=b"world",
                        smac=BACKEND_MAC[backend_ip], dmac=node.nic0_mac)
    ret, out = node.run(reply)
    assert ret == XDP_TX
    pkt = packets.parse(out)
    assert (pkt[IP].src, pkt[TCP].sport, pkt[IP].dst, pkt[TCP].dport) == (VIP, VPORT, CLIENT, CPORT)
    assert (pkt.src, pkt.dst) == (node.nic0_mac, GATEWAY_MAC)   # the client is behind the gateway
    assert pkt[IP].ttl == 63 and bytes(pkt[TCP].payload) == b"world"
    packets.assert_checksums_valid(out)
    assert node.counters() == {"SL_OUT_XDP_TX": 2}


@pytest.mark.parametrize("chksum", [None, 0], ids=["udp-checksum", "udp-no-checksum"])
def test_lb_udp(node, chksum):
    backends = {i: Backend(b.ip, 5300 + i, "udp") for i, b in BACKENDS.items()}
    table = install_vip(node, backends, port=53, proto="udp")
    frame = packets.udp(CLIENT, VIP, CPORT, 53, chksum=chksum, payload=b"query")
    ret, out = node.run(frame)
    assert ret == XDP_TX
    backend = expected_backend(table, backends, CLIENT, VIP, CPORT, 53, 17)
    port = check_forward(node, out, backend, flow_hash(CLIENT, VIP, CPORT, 53, 17))
    assert (packets.parse(out)[UDP].chksum == 0) == (chksum == 0)
    reply = packets.udp(backend.ip, NODE_IP, backend.port, port, chksum=chksum, payload=b"answer")
    ret, out = node.run(reply)
    pkt = packets.parse(out)
    assert ret == XDP_TX
    assert (pkt[IP].src, pkt[UDP].sport, pkt[IP].dst, pkt[UDP].dport) == (VIP, 53, CLIENT, CPORT)
    assert (pkt[UDP].chksum == 0) == (chksum == 0)
    packets.assert_checksums_valid(out)
    # a TCP packet to the UDP VIP's port is not load-balanced
    assert node.run(packets.tcp(CLIENT, VIP, CPORT, 53))[0] == XDP_PASS


def test_lb_redirect_to_other_device(node):
    backends = {1: Backend(FAR_BACKEND, 8080)}
    install_vip(node, backends)
    ret, out = node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT))
    assert ret == XDP_REDIRECT
    pkt = packets.parse(out)
    assert (pkt[IP].dst, pkt.dst, pkt.src) == (FAR_BACKEND, FAR_BACKEND_MAC, netns.mac(node.ns, "nic1"))
    packets.assert_checksums_valid(out)
    assert node.counters() == {"SL_OUT_XDP_REDIRECT": 1}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_lb_local_pod_backend_passes_to_tc(node, proto):
    """A backend that is a pod of this node sits behind a veth, where an
    XDP_REDIRECT is lost unless the pod runs XDP: the packet goes to the stack
    already rewritten, and tc_from_nic delivers it (TTL and MACs are its job,
    so XDP leaves them; no FIB lookup either, the pod has no neighbour entry)."""
    node.map(EndpointsMap).put(LOCAL_POD, Endpoint(netns.ifindex(node.ns, "nic1"), "02:00:00:01:05:01",
                                                   "02:00:00:01:05:02"))
    backends = {1: Backend(LOCAL_POD, 8080, proto)}
    install_vip(node, backends, proto=proto)
    make = packets.tcp if proto == "tcp" else packets.udp
    number = socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP
    frame = make(CLIENT, VIP, CPORT, VPORT, dmac=node.nic0_mac, payload=b"hello")
    ret, out = node.run(frame)
    assert ret == XDP_PASS
    pkt = packets.parse(out)
    l4 = pkt[TCP] if proto == "tcp" else pkt[UDP]
    port = nat_port(flow_hash(CLIENT, VIP, CPORT, VPORT, number))
    assert (pkt[IP].src, l4.sport, pkt[IP].dst, l4.dport) == (NODE_IP, port, LOCAL_POD, 8080)
    assert (pkt.src, pkt.dst, pkt[IP].ttl) == (packets.MAC_A, node.nic0_mac, 64)
    assert bytes(l4.payload) == b"hello"
    packets.assert_checksums_valid(out)
    assert sorted(node.map(NatMap).flows()) == sorted([
        ((CLIENT, CPORT, VIP, VPORT, number), (NODE_IP, port, LOCAL_POD, 8080)),
        ((LOCAL_POD, 8080, NODE_IP, port, number), (VIP, VPORT, CLIENT, CPORT)),
    ])
    # the next packet of the flow takes its NAT entry, to the same place
    assert node.run(frame) == (ret, out)
    assert node.counters() == {"SL_OUT_LB_LOCAL": 2}


def test_lb_unresolved_neighbour_goes_to_stack(node):
    install_vip(node, {1: Backend(UNRESOLVED_BACKEND, 8080)})
    frame = packets.tcp(CLIENT, VIP, CPORT, VPORT)
    ret, out = node.run(frame)
    assert ret == XDP_PASS
    pkt = packets.parse(out)
    # rewritten, but L2 and TTL are left to the stack that forwards it
    assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].dport) == (NODE_IP, UNRESOLVED_BACKEND, 8080)
    assert (pkt.dst, pkt[IP].ttl) == (packets.MAC_B, 64)
    packets.assert_checksums_valid(out)
    assert node.counters() == {"SL_OUT_LB_TO_STACK": 1}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_lb_vip_without_backends_rejected(node, proto):
    """The frame goes back to where it came from as an ICMP port unreachable from the VIP, quoting the
    client's IP header and the first 8 bytes of its TCP/UDP header, as a host with no such port answers."""
    install_vip(node, {}, proto=proto)
    make = packets.tcp if proto == "tcp" else packets.udp
    frame = make(CLIENT, VIP, CPORT, VPORT, payload=b"x" * 100)
    ret, out = node.run(frame)
    assert ret == XDP_TX
    pkt = packets.parse(out)
    assert (pkt.src, pkt.dst) == (packets.MAC_B, packets.MAC_A)
    assert (pkt[IP].src, pkt[IP].dst, pkt[IP].proto, pkt[IP].ttl) == (VIP, CLIENT, 1, 64)
    assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 3)
    assert bytes(pkt[ICMP].payload) == frame[14:14 + 20 + 8]
    assert len(out) == 14 + 20 + 8 + 28 == pkt[IP].len + 14
    packets.assert_checksums_valid(out)
    assert len(node.map(NatMap)) == 0
    assert node.counters() == {"SL_OUT_LB_REJECT": 1}


def test_lb_vip_without_backends_ip_options_dropped(node):
    """A header with options would not be quoted whole: dropped and counted instead."""
    install_vip(node, {})
    frame = bytes(ETH() / IP(src=CLIENT, dst=VIP, options=[IPOption_RR()]) / TCP(sport=CPORT, dport=VPORT))
    assert node.run(frame)[0] == XDP_DROP
    assert node.counters() == {"SL_DROP_NO_BACKEND": 1}


def _local_pod(node: Xdp, ip: str = LOCAL_POD) -> None:
    node.map(EndpointsMap).put(ip, Endpoint(netns.ifindex(node.ns, "nic1"), "02:00:00:01:05:01", "02:00:00:01:05:02"))


def test_lb_keep_source_to_local_pod(node):
    """externalTrafficPolicy Local: a pod of this node sees the client's own address and port (DNAT only);
    its reply (which tc_from_pod translates) is keyed backend -> client."""
    _local_pod(node)
    node.map(BackendsMap).put_many({1: Backend(LOCAL_POD, 8080)})
    node.map(LbVipsMap).put(VIP, VPORT, "tcp", {1: Backend(LOCAL_POD, 8080)}, LbOptions(keep_source=True))
    ret, out = node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT, dmac=node.nic0_mac))
    assert ret == XDP_PASS
    pkt = packets.parse(out)
    assert (pkt[IP].src, pkt[TCP].sport, pkt[IP].dst, pkt[TCP].dport) == (CLIENT, CPORT, LOCAL_POD, 8080)
    packets.assert_checksums_valid(out)
    assert sorted(node.map(NatMap).flows()) == sorted([
        ((CLIENT, CPORT, VIP, VPORT, 6), (CLIENT, CPORT, LOCAL_POD, 8080)),
        ((LOCAL_POD, 8080, CLIENT, CPORT, 6), (VIP, VPORT, CLIENT, CPORT)),
    ])
    # the reverse entry of that client port is taken (by a flow through another VIP): full NAT instead
    ret, out = node.run(packets.tcp(CLIENT, "192.0.2.11", CPORT, VPORT, dmac=node.nic0_mac))
    assert ret == XDP_PASS      # no VIP there: not ours
    node.map(LbVipsMap).put("192.0.2.11", VPORT, "tcp", {1: Backend(LOCAL_POD, 8080)}, LbOptions(keep_source=True))
    ret, out = node.run(packets.tcp(CLIENT, "192.0.2.11", CPORT, VPORT, dmac=node.nic0_mac))
    pkt = packets.parse(out)
    assert ret == XDP_PASS and (pkt[IP].src, pkt[IP].dst) == (NODE_IP, LOCAL_POD)
    assert node.counters() == {"SL_OUT_LB_LOCAL": 2, "SL_OUT_PASS": 1}


def test_lb_keep_source_only_for_local_pods(node):
    """A backend elsewhere would answer the client directly, past the translation back: SNAT as always."""
    backends = {1: BACKENDS[1]}
    node.map(BackendsMap).put_many(backends)
    node.map(LbVipsMap).put(VIP, VPORT, "tcp", backends, LbOptions(keep_source=True))
    ret, out = node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT))
    assert ret == XDP_TX
    check_forward(node, out, BACKENDS[1], flow_hash(CLIENT, VIP, CPORT, VPORT, 6))


def test_lb_client_ip_affinity(node):
    """sessionAffinity ClientIP: every flow of a client goes where its first went, until the entry is older
    than the timeout; another client is balanced on its own. A backend the VIP loses is forgotten."""
    backends = {i: Backend(f"10.0.0.{10 + i}", 8080) for i in range(1, 5)}
    node.map(BackendsMap).put_many(backends)
    table = node.map(LbVipsMap).put(VIP, VPORT, "tcp", backends, LbOptions(affinity_timeout=30))
    first = expected_backend(table, backends, CLIENT, VIP, CPORT, VPORT, 6)

    def backend_of(client: str, sport: int) -> str:
        ret, out = node.run(packets.tcp(client, VIP, sport, VPORT))
        assert ret == XDP_TX
        return packets.parse(out)[IP].dst

    assert {backend_of(CLIENT, sport) for sport in range(CPORT, CPORT + 40)} == {first.ip}
    affinity = node.map(LbAffinityMap)
    ids = {b: i for i, b in backends.items()}
    assert affinity.clients() == {((VIP, VPORT, "tcp"), CLIENT): ids[first]}
    others = {f"198.51.100.{n}": backend_of(f"198.51.100.{n}", CPORT) for n in range(8, 40)}
    assert len(set(others.values())) > 1
    # the timeout ran out: balanced by Maglev again, per flow, and the client sticks to the new choice
    key = next(k for k, _v in affinity.raw_items() if ip_str(k.client) == CLIENT)
    affinity.update(key, sl_lb_affinity(ids[first], 0, 1))
    sport = next(p for p in range(30000, 31000)
                 if expected_backend(table, backends, CLIENT, VIP, p, VPORT, 6) != first)
    new = backend_of(CLIENT, sport)
    assert new != first.ip and backend_of(CLIENT, sport + 1) == new
    # user space forgets the clients of a backend the VIP no longer has
    keep = {ids[b] for b in backends.values() if b.ip != new}
    assert affinity.forget({(VIP, VPORT, "tcp"): keep}) == 1 + sum(ip == new for ip in others.values())
    assert {c: backends[i].ip for (_fe, c), i in affinity.clients().items()} == \
        {c: ip for c, ip in others.items() if ip != new}
    assert affinity.forget({(VIP, VPORT, "tcp"): None}) > 0 and not affinity.clients()


def test_lb_fragment_to_vip_dropped(node):
    install_vip(node, BACKENDS)
    first = bytes(ETH() / IP(src=CLIENT, dst=VIP, flags="MF", frag=0) / TCP(sport=CPORT, dport=VPORT)
                  / (b"x" * 64))
    assert node.run(first)[0] == XDP_DROP
    # a later fragment has no ports to match a VIP with: the stack gets it
    later = bytes(ETH() / IP(src=CLIENT, dst=VIP, proto=6, frag=10) / (b"x" * 64))
    assert node.run(later)[0] == XDP_PASS
    # the same first fragment to a port that is no VIP is not ours either
    other = bytes(ETH() / IP(src=CLIENT, dst=VIP, flags="MF") / TCP(sport=CPORT, dport=443) / (b"x" * 64))
    assert node.run(other)[0] == XDP_PASS
    assert len(node.map(NatMap)) == 0
    assert node.counters() == {"SL_DROP_FRAGMENT": 1, "SL_OUT_PASS": 2}


def test_lb_nat_ports_exhausted(node):
    table = install_vip(node, BACKENDS)
    h = flow_hash(CLIENT, VIP, CPORT, VPORT, 6)
    backend = expected_backend(table, BACKENDS, CLIENT, VIP, CPORT, VPORT, 6)
    nat = node.map(NatMap)
    # every port the flow may probe is taken by another flow's reverse entry
    for probe in range(NAT_PROBES):
        key = sl_flow_tuple(be32(backend.ip), be32(NODE_IP), be16(backend.port), be16(nat_port(h, probe)), 6)
        nat.update(key, sl_nat(be32(VIP), be32("198.51.100.99"), be16(VPORT), be16(1000 + probe)))
    assert node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT))[0] == XDP_DROP
    assert len(nat) == NAT_PROBES
    assert node.counters() == {"SL_DROP_NAT_EXHAUSTED": 1}
    # one port free again: the flow gets exactly that one
    nat.remove(sl_flow_tuple(be32(backend.ip), be32(NODE_IP), be16(backend.port), be16(nat_port(h, 5)), 6))
    ret, out = node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT))
    assert ret == XDP_TX and packets.parse(out)[TCP].sport == nat_port(h, 5)


def test_prefilter_before_lb(node):
    install_vip(node, BACKENDS)
    node.map(PrefilterMap).put("198.51.100.0/24")
    assert node.run(packets.tcp(CLIENT, VIP, CPORT, VPORT))[0] == XDP_DROP
    assert len(node.map(NatMap)) == 0
    assert node.counters() == {"SL_DROP_PREFILTER": 1}


def test_failsafe_passes_the_nodes_management_flows_before_prefilter_and_lb(node):
    """A listed port to the node (SSH), or from a listed port to the node (the answer to the node's own DNS
    query), passes though the source is prefiltered and an LB VIP claims the node's SSH port; the same ports
    to an address the node forwards to, and other ports of the node, do not."""
    node.map(FailsafeMap).put("tcp", 22)
    node.map(FailsafeMap).put("udp", 53)
    node.map(PrefilterMap).put("198.51.100.0/24")
    install_vip(node, BACKENDS, vip=NODE_IP, port=22)
    assert node.run(packets.tcp(CLIENT, NODE_IP, CPORT, 22))[0] == XDP_PASS
    assert node.run(packets.udp(CLIENT, NODE_IP, 53, CPORT))[0] == XDP_PASS
    assert node.run(packets.tcp(CLIENT, NODE_IP, CPORT, 80))[0] == XDP_DROP
    assert node.run(packets.tcp(CLIENT, "10.0.0.77", CPORT, 22))[0] == XDP_DROP     # forwarded, not the node's
    assert node.run(packets.udp(CLIENT, NODE_NET1_IP, 53, CPORT))[0] == XDP_PASS    # another address of the node
    assert len(node.map(NatMap)) == 0
    assert node.counters() == {"SL_OUT_FAILSAFE": 3, "SL_DROP_PREFILTER": 2}


# ---- cpumap spreading ------------------------------------------------------------------


def test_cpumap_spreading(xdp):
    frame = packets.udp("10.0.0.2", "10.0.0.1")
    assert xdp.run(frame)[0] == XDP_PASS
    xdp.map(CpuMap).set_cpus(xdp.map(CpuListMap), xdp.map(ConfigMap), [0, 1])
    for f in (frame, packets.tcp("10.0.0.2", "10.0.0.1"), packets.icmp("10.0.0.2", "10.0.0.1")):
        assert xdp.run(f)[0] == XDP_REDIRECT
    assert xdp.run(packets.arp("10.0.0.2", "10.0.0.1"))[0] == XDP_PASS   # not IPv4: not spread
    assert xdp.counters() == {"SL_OUT_PASS": 2, "SL_OUT_XDP_CPUMAP": 3}


def test_cpumap_missing_cpu_falls_back_to_pass(xdp):
    """sl_cpus naming a CPU without a cpumap entry must not lose traffic."""
    cpus = xdp.map(CpuListMap)
    xdp.map(CpuMap).set_cpus(cpus, xdp.map(ConfigMap), [0])
    cpus.update(c_uint32(0), c_uint32(63))
    assert xdp.run(packets.udp("10.0.0.2", "10.0.0.1"))[0] == XDP_PASS
    assert xdp.counters() == {"SL_OUT_PASS": 1}


# ---- real packets ------------------------------------------------------------------


def _in_ns(ns: str, fn, *args):
    """Run fn in a thread that has entered `ns` (sockets it opens live there)."""
    def call():
        with netns.entered(ns):
            return fn(*args)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def _connects(src: str, dst: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0)):
            return True
    except OSError:
        return False


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    """A veth pair created inside a_ns, its peer moved to b_ns: the node's own
    namespace never holds either end (nor clashes with its eth0)."""
    netns.ns_exec(a_ns, "ip", "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns)


def _node_and_peer(node_ns: str, peer_ns: str, *peer_addrs: str) -> None:
    """The node's nic0 (10.0.0.1/24) wired to the peer's eth0 (`peer_addrs`, /24 each)."""
    _veth(node_ns, "nic0", peer_ns, "eth0")
    netns.ns_exec(node_ns, "ip", "addr", "add", "10.0.0.1/24", "dev", "nic0")
    netns.ns_exec(node_ns, "ip", "link", "set", "nic0", "up")
    for addr in peer_addrs:
        netns.ns_exec(peer_ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
    netns.ns_exec(peer_ns, "ip", "link", "set", "eth0", "up")


@contextlib.contextmanager
def _xdp_link(prog: int, ns: str, dev: str, flags: int):
    ifindex = netns.ifindex(ns, dev)
    link = _in_ns(ns, lb.link_create, prog, ifindex, lb.BPF_XDP, flags)
    try:
        yield
    finally:
        os.close(link)


def test_real_prefilter_on_veth(xdp):
    """Native XDP on the node's veth drops a listed peer address; another
    address of the same peer still reaches a listening socket on the node."""
    xdp.map(PrefilterMap).put("10.0.0.2/32")
    with netns.namespaces("node", "peer") as (node_ns, peer_ns):
        _node_and_peer(node_ns, peer_ns, "10.0.0.2", "10.0.0.3")
        listener = _in_ns(node_ns, socket.create_server, ("10.0.0.1", 7777))
        try:
            with _xdp_link(xdp.prog, node_ns, "nic0", lb.XDP_FLAGS_DRV_MODE):
                assert _in_ns(peer_ns, _connects, "10.0.0.3", "10.0.0.1", 7777)
                assert not _in_ns(peer_ns, _connects, "10.0.0.2", "10.0.0.1", 7777)
                counters = xdp.counters()
            # detached with the link: the listed address gets through again
            assert _in_ns(peer_ns, _connects, "10.0.0.2", "10.0.0.1", 7777)
        finally:
            listener.close()
    assert counters.get("SL_DROP_PREFILTER", 0) >= 1      # the SYN and its retransmissions
    assert counters.get("SL_OUT_PASS", 0) >= 3            # ARP and the accepted connection


def test_real_failsafe_port_reaches_the_node_from_a_prefiltered_source(xdp):
    """Native XDP on the node's veth, the peer's whole network prefiltered: a connection to the node's
    failsafe port gets through (and its replies back), another port of the node does not."""
    xdp.map(PrefilterMap).put("10.0.0.0/24")
    xdp.map(FailsafeMap).put("tcp", 7022)
    with netns.namespaces("node", "peer") as (node_ns, peer_ns):
        _node_and_peer(node_ns, peer_ns, "10.0.0.2")
        xdp.map(ConfigMap).set("10.0.0.1", netns.ifindex(node_ns, "nic0"))
        listeners = [_in_ns(node_ns, socket.create_server, ("10.0.0.1", port)) for port in (7022, 7777)]
        try:
            with _xdp_link(xdp.prog, node_ns, "nic0", lb.XDP_FLAGS_DRV_MODE):
                assert _in_ns(peer_ns, _connects, "10.0.0.2", "10.0.0.1", 7022)
                assert not _in_ns(peer_ns, _connects, "10.0.0.2", "10.0.0.1", 7777)
                counters = xdp.counters()
        finally:
            for listener in listeners:
                listener.close()
    assert counters.get("SL_OUT_FAILSAFE", 0) >= 2          # SYN, ACK
    assert counters.get("SL_DROP_PREFILTER", 0) >= 1


def test_real_lb_traffic(xdp):
    """client ns -> VIP -> node (xdp_nic, generic mode on both NICs) -> backend ns
    and back. The first SYN finds no neighbour for the backend and is forwarded
    by the node's stack (accept_local: its source is now the node's own
    address); everything after is redirected by XDP. Client and backend send
    full checksums (tx offload off), so their stacks verify the rewrites."""
    backend = Backend("10.1.0.2", 8080)
    with netns.namespaces("node", "cli", "be") as (node_ns, cli_ns, be_ns):
        _veth(node_ns, "nic0", cli_ns, "eth0")
        _veth(node_ns, "nic1", be_ns, "eth0")
        node_sh = functools.partial(netns.ns_exec, node_ns)
        node_sh("ip", "addr", "add", "10.0.0.1/24", "dev", "nic0")
        node_sh("ip", "addr", "add", "10.1.0.1/24", "dev", "nic1")
        for dev in ("nic0", "nic1"):
            node_sh("ip", "link", "set", dev, "up")
        node_sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.accept_local=1",
                "net.ipv4.conf.nic0.accept_local=1")
        for ns, addr, gw in ((cli_ns, "10.0.0.2/24", "10.0.0.1"), (be_ns, "10.1.0.2/24", "10.1.0.1")):
            netns.ns_exec(ns, "ip", "addr", "add", addr, "dev", "eth0")
            netns.ns_exec(ns, "ip", "link", "set", "eth0", "up")
            netns.ns_exec(ns, "ip", "route", "add", "default", "via", gw)
            netns.ns_exec(ns, "ethtool", "-K", "eth0", "tx", "off")
        xdp.map(ConfigMap).set("10.1.0.1", netns.ifindex(node_ns, "nic0"))
        install_vip(xdp, {1: backend})
        server = _in_ns(be_ns, socket.create_server, ("10.1.0.2", 8080))
        server.settimeout(5)

        def exchange():
            with socket.create_connection((VIP, VPORT), timeout=5) as c:
                conn, peer = server.accept()
                with conn:
                    c.sendall(b"ping")
                    assert conn.recv(16) == b"ping"
                    conn.sendall(b"pong")
                    assert c.recv(16) == b"pong"
                    return c.getsockname(), c.getpeername(), peer

        try:
            with _xdp_link(xdp.prog, node_ns, "nic0", lb.XDP_FLAGS_SKB_MODE), \
                    _xdp_link(xdp.prog, node_ns, "nic1", lb.XDP_FLAGS_SKB_MODE):
                for _attempt in range(3):
                    local, remote, seen_by_backend = _in_ns(cli_ns, exchange)
                    assert remote == (VIP, VPORT)
                    assert seen_by_backend[0] == "10.1.0.1"
                    assert NAT_PORT_MIN <= seen_by_backend[1] <= 65535
                    assert ((local[0], local[1], VIP, VPORT, 6),
                            ("10.1.0.1", seen_by_backend[1], "10.1.0.2", 8080)) in xdp.map(NatMap).flows()
                counters = xdp.counters()
        finally:
            server.close()
    assert counters.get("SL_OUT_LB_TO_STACK", 0) >= 1
    assert counters.get("SL_OUT_XDP_REDIRECT", 0) >= 3 * 6


def test_real_vip_without_backends_refuses_at_once(xdp):
    """A client of a VIP that has no backend learns it at once: its TCP connect and its next UDP receive
    fail with ECONNREFUSED (the ICMP port unreachable XDP sends back), no timeout."""
    with netns.namespaces("node", "cli") as (node_ns, cli_ns):
        _node_and_peer(node_ns, cli_ns, "10.0.0.2")
        netns.ns_exec(cli_ns, "ip", "route", "add", "default", "via", "10.0.0.1")
        xdp.map(ConfigMap).set("10.0.0.1", netns.ifindex(node_ns, "nic0"))
        install_vip(xdp, {})
        install_vip(xdp, {}, port=53, proto="udp")

        def tcp_connect():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((VIP, VPORT), timeout=5)

        def udp_exchange():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.connect((VIP, 53))
                s.send(b"query")
                with pytest.raises(ConnectionRefusedError):
                    s.recv(64)

        with _xdp_link(xdp.prog, node_ns, "nic0", lb.XDP_FLAGS_SKB_MODE):
            _in_ns(cli_ns, tcp_connect)
            _in_ns(cli_ns, udp_exchange)
            counters = xdp.counters()
    assert counters["SL_OUT_LB_REJECT"] == 2
    assert "SL_DROP_NO_BACKEND" not in counters
