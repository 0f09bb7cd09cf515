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
from sluice.maps import Endpoint, EndpointsMap, MetricsMap, Route, RoutesMap

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
