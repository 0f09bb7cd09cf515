"""tc_from_pod and tc_from_nic under BPF_PROG_TEST_RUN: verdict, bytes out and
counters for one packet at a time. test_run does not act on a redirect, it only
returns TC_ACT_REDIRECT; test_tc_traffic.py checks where packets really go."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether

from lib import netns, packets
from sluice.bpf import libbpf as lb
from sluice.bpf.btf import Btf
from sluice.maps import (ConfigMap, Endpoint, EndpointsMap, MetricsMap, NatMap, Route, RoutesMap, be16, be32,
                         sl_flow_tuple, sl_nat)

pytestmark = pytest.mark.kernel

TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
TC_PASS = 0xFFFFFFFF  # SL_TC_PASS (-1) as test_run's u32 retval

POD_A, POD_B = "10.0.1.11", "10.0.1.12"
MAC_POD_A, MAC_HOST_A = "02:00:00:01:0a:01", "02:00:00:01:0a:02"
MAC_POD_B, MAC_HOST_B = "02:00:00:01:0b:01", "02:00:00:01:0b:02"
REMOTE_NODE = "192.168.50.2"
NATIVE_CIDR, TUNNEL_CIDR = "10.0.0.0/16", "10.0.3.0/24"  # the /24 is more specific
VNI = 42
# An XDP-balanced flow CLIENT:CPORT -> VIP:VPORT whose backend is POD_A:BPORT, NATed by the node to NODE_IP:NAT_PORT
NODE_IP, VIP, VPORT, CLIENT, CPORT, BPORT, NAT_PORT = "192.168.50.1", "192.0.2.10", 80, "198.51.100.7", 40000, 8080, 61234

PROGRAMS = {
    "tc_pod": ("tc_from_pod", "SL_HOOK_TC_FROM_POD"),
    "tc_nic": ("tc_from_nic", "SL_HOOK_TC_FROM_NIC"),
}


@dataclass
class Node:
    ns: str
    ifindex: dict[str, int]
    obj: object
    prog: int
    hook: str

    def run(self, frame: bytes, dev: str | None = "ha") -> tuple[int, bytes]:
        """Run the program on `frame` as if it arrived on `dev` (None: loopback)."""
        ctx = packets.skb_ctx(ifindex=self.ifindex[dev]) if dev else None
        with netns.entered(self.ns):  # test_run resolves ctx ifindex in the caller's netns
            ret, out, _duration = lb.test_run(self.prog, frame, ctx=ctx)
        return ret, out

    def counters(self) -> dict[tuple[str, str], tuple[int, int]]:
        with Btf(self.obj.path) as btf:
            hooks = btf.enum("sl_hook")
            outcomes = {k: v for k, v in btf.enum("sl_outcome").items()
                        if k != "SL_DROP_BASE" and not k.endswith("_MAX")}
        return MetricsMap(self.obj.map_fd("sl_metrics")).read(hooks, outcomes)

    def expect_counted(self, outcome: str, frame: bytes) -> None:
        assert self.counters() == {(self.hook, outcome): (1, len(frame))}


@pytest.fixture(scope="module")
def node_ns():
    """A node namespace with two pod veths and an underlay veth, for real ifindexes."""
    with netns.namespaces("tc") as (ns,):
        for host, peer in (("ha", "pa"), ("hb", "pb"), ("nic0", "nic1")):
            netns.ns_exec(ns, "ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        yield ns, {dev: netns.ifindex(ns, dev) for dev in ("ha", "hb", "nic0")}


def load_node(name: str, node_ns, load_object) -> Node:
    """`name`'s object with two local pods and the two routes installed."""
    ns, ifindex = node_ns
    prog_name, hook = PROGRAMS[name]
    obj = load_object(name)
    eps = EndpointsMap(obj.map_fd("sl_endpoints"))
    eps.put(POD_A, Endpoint(ifindex["ha"], MAC_POD_A, MAC_HOST_A))
    eps.put(POD_B, Endpoint(ifindex["hb"], MAC_POD_B, MAC_HOST_B))
    routes = RoutesMap(obj.map_fd("sl_routes"))
    routes.put(NATIVE_CIDR, Route(REMOTE_NODE, ifindex["nic0"]))
    routes.put(TUNNEL_CIDR, Route(REMOTE_NODE, ifindex["nic0"], tunnel=True, vni=VNI))
    return Node(ns, ifindex, obj, obj.prog_fd(prog_name), hook)


@pytest.fixture(params=sorted(PROGRAMS))
def node(request, node_ns, load_object):
    return load_node(request.param, node_ns, load_object)


@pytest.fixture
def pod_node(node_ns, load_object):
    return load_node("tc_pod", node_ns, load_object)


@pytest.fixture
def nic_node(node_ns, load_object):
    return load_node("tc_nic", node_ns, load_object)


def forwarded(frame: bytes, dmac: str | None = None, smac: str | None = None) -> bytes:
    """`frame` as it should leave: TTL - 1, IPv4 checksum redone, MACs if given."""
    pkt = Ether(frame)
    if dmac:
        pkt.dst, pkt.src = dmac, smac
    pkt[IP].ttl -= 1
    del pkt[IP].chksum
    return bytes(pkt)


def ipv4_header(**fields) -> bytes:
    return bytes(Ether(src=MAC_POD_A, dst=MAC_HOST_A) / IP(src=POD_A, dst=POD_B, **fields))


# ---- both programs ---------------------------------------------------------------


@pytest.mark.parametrize("make", [packets.tcp, packets.udp, packets.icmp])
def test_local_pod_gets_redirect_peer_with_gateway_macs_and_ttl_minus_one(node, make):
    frame = make(POD_A, POD_B, smac=MAC_POD_A, dmac=MAC_HOST_A)
    ret, out = node.run(frame)
    assert ret == TC_ACT_REDIRECT
    assert out == forwarded(frame, MAC_POD_B, MAC_HOST_B)
    assert Ether(out)[IP].ttl == 63
    packets.assert_checksums_valid(out)
    node.expect_counted("SL_OUT_REDIRECT_PEER", frame)


@pytest.mark.parametrize("ttl", [1, 0])
def test_expiring_ttl_to_local_pod_goes_to_the_stack_untouched(node, ttl):
    frame = packets.tcp(POD_A, POD_B, ttl=ttl)
    assert node.run(frame) == (TC_PASS, frame)
    node.expect_counted("SL_OUT_PASS", frame)


def test_unknown_destination_passes_untouched(node):
    frame = packets.tcp(POD_A, "198.51.100.7")
    assert node.run(frame) == (TC_PASS, frame)
    node.expect_counted("SL_OUT_PASS", frame)


@pytest.mark.parametrize("frame", [
    packets.arp(POD_A, "169.254.1.1"),
    bytes(Ether(src=MAC_POD_A, dst=MAC_HOST_A) / IPv6(src="fd00::a", dst="fd00::b") / ICMPv6EchoRequest()),
], ids=["arp", "ipv6"])
def test_not_ipv4_passes_untouched(node, frame):
    assert node.run(frame) == (TC_PASS, frame)
    node.expect_counted("SL_OUT_PASS", frame)


# test_run refuses an IPv4 frame shorter than 14 + 20 bytes (EINVAL), so frames
# cut inside the fixed header are sent for real in test_tc_traffic.py.
@pytest.mark.parametrize("frame", [
    ipv4_header(ihl=4),                     # header length below the minimum
    ipv4_header(ihl=6),                     # claims options the frame does not hold
    ipv4_header(version=6),                 # not version 4 behind an IPv4 ethertype
], ids=["ihl-4", "options-beyond-end", "version-6"])
def test_truncated_or_malformed_ipv4_is_dropped(node, frame):
    assert node.run(frame) == (TC_ACT_SHOT, frame)
    node.expect_counted("SL_DROP_INVALID", frame)


def test_ip_options_are_kept_and_checksum_stays_valid(node):
    frame = bytes(Ether(src=MAC_POD_A, dst=MAC_HOST_A) / IP(src=POD_A, dst=POD_B, options=b"\x01" * 4) /
                  TCP(dport=80))
    ret, out = node.run(frame)
    assert ret == TC_ACT_REDIRECT
    assert out == forwarded(frame, MAC_POD_B, MAC_HOST_B)
    packets.assert_checksums_valid(out)


# ---- tc_from_pod -------------------------------------------------------------------


@pytest.mark.parametrize("dst, outcome", [
    ("10.0.2.5", "SL_OUT_REDIRECT_NEIGH"),    # 10.0.0.0/16, native
    ("10.0.3.5", "SL_OUT_REDIRECT_TUNNEL"),   # 10.0.3.0/24 wins over the /16
])
def test_route_to_other_node_redirects_with_ttl_minus_one(pod_node, dst, outcome):
    frame = packets.udp(POD_A, dst, smac=MAC_POD_A, dmac=MAC_HOST_A)
    ret, out = pod_node.run(frame)
    assert ret == TC_ACT_REDIRECT
    # L2 is left to redirect_neigh (native) or is the inner header (tunnel).
    assert out == forwarded(frame)
    packets.assert_checksums_valid(out)
    pod_node.expect_counted(outcome, frame)


def test_route_with_expiring_ttl_goes_to_the_stack(pod_node):
    frame = packets.tcp(POD_A, "10.0.3.5", ttl=1)
    assert pod_node.run(frame) == (TC_PASS, frame)
    pod_node.expect_counted("SL_OUT_PASS", frame)


@pytest.mark.parametrize("src, dev", [
    ("10.0.1.99", "ha"),   # not an endpoint at all
    (POD_B, "ha"),         # another pod's address
    (POD_A, "hb"),         # its own address, on another pod's veth
    (POD_A, None),         # its own address, not on a pod veth (loopback)
], ids=["unknown", "other-pod", "wrong-veth", "loopback"])
def test_spoofed_source_is_dropped(pod_node, src, dev):
    frame = packets.tcp(src, "10.0.3.5")
    assert pod_node.run(frame, dev) == (TC_ACT_SHOT, frame)
    pod_node.expect_counted("SL_DROP_SPOOFED", frame)


# ---- tc_from_nic -------------------------------------------------------------------


def test_nic_delivers_whatever_the_source(nic_node):
    frame = packets.tcp("203.0.113.9", POD_B)
    ret, out = nic_node.run(frame, "nic0")
    assert ret == TC_ACT_REDIRECT
    assert out == forwarded(frame, MAC_POD_B, MAC_HOST_B)
    nic_node.expect_counted("SL_OUT_REDIRECT_PEER", frame)


def test_nic_does_not_route_towards_other_nodes(nic_node):
    frame = packets.tcp("203.0.113.9", "10.0.3.5")
    assert nic_node.run(frame, "nic0") == (TC_PASS, frame)
    nic_node.expect_counted("SL_OUT_PASS", frame)


# ---- tc_from_pod: replies of a local backend of the XDP load balancer ----------------------


@pytest.fixture
def lb_node(pod_node):
    """pod_node with the node's address and NIC configured and the two NAT
    entries xdp_nic creates for a TCP and a UDP flow balanced to POD_A."""
    ConfigMap(pod_node.obj.map_fd("sl_config")).set(NODE_IP, pod_node.ifindex["nic0"])
    nat = NatMap(pod_node.obj.map_fd("sl_lb_nat"))
    for proto in (6, 17):
        nat.update(sl_flow_tuple(be32(CLIENT), be32(VIP), be16(CPORT), be16(VPORT), proto),
                   sl_nat(be32(NODE_IP), be32(POD_A), be16(NAT_PORT), be16(BPORT)))
        nat.update(sl_flow_tuple(be32(POD_A), be32(NODE_IP), be16(BPORT), be16(NAT_PORT), proto),
                   sl_nat(be32(VIP), be32(CLIENT), be16(VPORT), be16(CPORT)))
    return pod_node


def reply(proto: str, src: str = POD_A, dst: str = NODE_IP, sport: int = BPORT, dport: int = NAT_PORT,
          ttl: int = 64, chksum: int | None = None) -> bytes:
    """A frame as the pod sends it towards its gateway (or, translated, as it should leave)."""
    if proto == "tcp":
        return packets.tcp(src, dst, sport, dport, smac=MAC_POD_A, dmac=MAC_HOST_A, ttl=ttl, flags="SA",
                           payload=b"world")
    return packets.udp(src, dst, sport, dport, smac=MAC_POD_A, dmac=MAC_HOST_A, ttl=ttl, chksum=chksum,
                       payload=b"answer")


@pytest.mark.parametrize("proto, chksum", [("tcp", None), ("udp", None), ("udp", 0)],
                         ids=["tcp", "udp", "udp-no-checksum"])
def test_lb_reply_translated_to_vip_and_sent_to_client(lb_node, proto, chksum):
    """backend -> node:natport becomes VIP -> client, TTL - 1, both checksums
    updated (UDP's "no checksum" zero kept), and goes to redirect_neigh,
    which fills in the MACs when it sends."""
    frame = reply(proto, chksum=chksum)
    ret, out = lb_node.run(frame)
    assert ret == TC_ACT_REDIRECT
    assert out == reply(proto, VIP, CLIENT, VPORT, CPORT, ttl=63, chksum=chksum)
    packets.assert_checksums_valid(out)
    lb_node.expect_counted("SL_OUT_LB_REVNAT", frame)


def test_lb_reply_with_expiring_ttl_goes_to_the_stack_translated(lb_node):
    """The stack then answers with ICMP time exceeded, as for any forwarded
    packet; untranslated, it would take the reply for its own and reset it."""
    frame = reply("tcp", ttl=1)
    assert lb_node.run(frame) == (TC_PASS, reply("tcp", VIP, CLIENT, VPORT, CPORT, ttl=1))
    lb_node.expect_counted("SL_OUT_PASS", frame)


@pytest.mark.parametrize("frame", [
    reply("tcp", sport=BPORT + 1),                        # another source port
    reply("tcp", dport=NAT_PORT + 1),                     # another NAT port
    reply("tcp", dst="192.168.50.9"),                     # another destination
    packets.icmp(POD_A, NODE_IP, smac=MAC_POD_A, dmac=MAC_HOST_A),
    bytes(Ether(src=MAC_POD_A, dst=MAC_HOST_A) / IP(src=POD_A, dst=NODE_IP, flags="MF") /
          TCP(sport=BPORT, dport=NAT_PORT) / (b"x" * 64)),  # a first fragment: xdp_nic leaves them alone too
    bytes(Ether(src=MAC_POD_A, dst=MAC_HOST_A) / IP(src=POD_A, dst=NODE_IP, proto=6) /
          TCP(sport=BPORT, dport=NAT_PORT))[:14 + 20 + 12],  # TCP header cut short: not rewritable
], ids=["sport", "natport", "daddr", "icmp", "fragment", "tcp-header-cut"])
def test_not_a_lb_reply_passes_untouched(lb_node, frame):
    assert lb_node.run(frame) == (TC_PASS, frame)
    lb_node.expect_counted("SL_OUT_PASS", frame)


def test_lb_reply_from_another_veth_is_spoofed(lb_node):
    """Anti-spoofing looks at the packet as the pod sent it, before translation."""
    frame = reply("tcp")
    assert lb_node.run(frame, "hb") == (TC_ACT_SHOT, frame)
    lb_node.expect_counted("SL_DROP_SPOOFED", frame)


def test_lb_reply_without_node_config_passes(pod_node):
    """No NIC configured: nowhere to send it, the stack decides."""
    NatMap(pod_node.obj.map_fd("sl_lb_nat")).update(
        sl_flow_tuple(be32(POD_A), be32(NODE_IP), be16(BPORT), be16(NAT_PORT), 6),
        sl_nat(be32(VIP), be32(CLIENT), be16(VPORT), be16(CPORT)))
    frame = reply("tcp")
    assert pod_node.run(frame) == (TC_PASS, frame)
    pod_node.expect_counted("SL_OUT_PASS", frame)
