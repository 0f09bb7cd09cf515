"""tc_from_pod and tc_from_nic on real traffic between namespaces, attached
through tcx links: pods on one node, pods on two nodes over a shared underlay
with native routing and with VXLAN, and a pod as the backend of the XDP load
balancer (xdp_nic on the node's NIC).

Node namespaces keep IPv4 forwarding off, so pod traffic only gets through when
the programs redirect it; counters are checked to the packet where the traffic
is known exactly (three ICMP echoes each way)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from conftest import bpf_object_path
from lib import netns, packets
from lib.pods import add_pod
from sluice.bpf import libbpf as lb
from sluice.bpf.btf import Btf
from sluice.bpf.object import BpfObject
from sluice.maps import (Backend, BackendsMap, ConfigMap, EndpointsMap, LbOptions, LbVipsMap, MetricsMap, NatMap, Route,
                         RoutesMap)

pytestmark = pytest.mark.kernel

UNDERLAY = ("192.168.50.1", "192.168.50.2")
POD_CIDRS = ("10.1.1.0/24", "10.1.2.0/24")
POD1, POD2 = "10.1.1.11", "10.1.2.22"
VXLAN_MTU = 1450            # 1500 minus outer IPv4, UDP, VXLAN and Ethernet
VNI = 42
ECHOES = 3
TCP_BYTES = 4 << 20
MIN_TCP_PACKETS = TCP_BYTES // 65536    # GSO packets carry at most 64 KiB
ETH_P_ALL = 0x0003
POD_HOOK, NIC_HOOK, XDP_HOOK = "SL_HOOK_TC_FROM_POD", "SL_HOOK_TC_FROM_NIC", "SL_HOOK_XDP_NIC"


class Datapath:
    """One node: tc_pod and tc_nic sharing their maps in the node's own pin dir,
    attached with tcx links that are released on close."""

    def __init__(self, ns: str, pin_dir: str):
        self.ns = ns
        self.pin_dir = pin_dir
        self.links: list[int] = []
        os.mkdir(pin_dir)
        self.pod = BpfObject(bpf_object_path("tc_pod"), pin_dir)
        self.nic = BpfObject(bpf_object_path("tc_nic"), pin_dir)
        self.xdp: BpfObject | None = None
        self.endpoints = EndpointsMap(self.pod.map_fd("sl_endpoints"))
        self.routes = RoutesMap(self.pod.map_fd("sl_routes"))
        self.metrics = MetricsMap(self.pod.map_fd("sl_metrics"))
        with Btf(self.pod.path) as btf:
            self.hooks = btf.enum("sl_hook")
            self.outcomes = {k: v for k, v in btf.enum("sl_outcome").items()
                             if k != "SL_DROP_BASE" and not k.endswith("_MAX")}

    def attach(self, dev: str, obj: BpfObject, prog: str) -> None:
        index = netns.ifindex(self.ns, dev)
        with netns.entered(self.ns):  # the link resolves the ifindex in the caller's netns
            self.links.append(lb.link_create(obj.prog_fd(prog), index, lb.BPF_TCX_INGRESS))

    def attach_pod(self, dev: str) -> None:
        self.attach(dev, self.pod, "tc_from_pod")

    def attach_nic(self, dev: str) -> None:
        self.attach(dev, self.nic, "tc_from_nic")

    def attach_xdp(self, dev: str, flags: int) -> None:
        """xdp_nic on `dev` (loaded on first use, with the node's maps) in the
        mode `flags` names: lb.XDP_FLAGS_SKB_MODE or lb.XDP_FLAGS_DRV_MODE."""
        if self.xdp is None:
            self.xdp = BpfObject(bpf_object_path("xdp_nic"), self.pin_dir)
        index = netns.ifindex(self.ns, dev)
        with netns.entered(self.ns):
            self.links.append(lb.link_create(self.xdp.prog_fd("xdp_nic"), index, lb.BPF_XDP, flags))

    def packets(self) -> dict[tuple[str, str], int]:
        return {k: packets for k, (packets, _bytes) in self.metrics.read(self.hooks, self.outcomes).items()}

    def forwarded(self) -> dict[tuple[str, str], int]:
        """Counters other than SL_OUT_PASS, which also sees ARP and IPv6 housekeeping."""
        return {k: n for k, n in self.packets().items() if k[1] != "SL_OUT_PASS"}

    def close(self) -> None:
        for fd in self.links:
            os.close(fd)
        self.links.clear()
        if self.xdp is not None:
            self.xdp.close()
        self.nic.close()
        self.pod.close()


@contextlib.contextmanager
def datapath(ns: str, pin_root: str):
    dp = Datapath(ns, os.path.join(pin_root, ns))
    try:
        yield dp
    finally:
        dp.close()


def node_setup(ns: str) -> None:
    netns.ns_exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")


def tcp_transfer(server_ns: str, server_ip: str, client_ns: str, size: int = TCP_BYTES) -> None:
    """Send `size` random bytes over TCP from client_ns to server_ip and check
    they arrive intact."""
    payload = os.urandom(size)
    with netns.entered(server_ns):
        server = socket.create_server((server_ip, 0))
    got: dict = {}

    def receive():
        try:
            server.settimeout(5)
            conn, _peer = server.accept()
            with conn:
                conn.settimeout(5)
                digest, n = hashlib.sha256(), 0
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                    n += len(chunk)
            got.update(n=n, digest=digest.digest())
        except OSError as e:
            got["error"] = e

    receiver = threading.Thread(target=receive, daemon=True)
    with server:
        receiver.start()
        with netns.entered(client_ns):
            client = socket.socket()
        with client:
            client.settimeout(5)
            client.connect((server_ip, server.getsockname()[1]))
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
        receiver.join(10)
    assert "error" not in got, got.get("error")
    assert got.get("n") == size
    assert got["digest"] == hashlib.sha256(payload).digest()


def send_frame(ns: str, dev: str, frame: bytes) -> None:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind((dev, 0))
        sock.send(frame)


@contextlib.contextmanager
def capture(ns: str, dev: str):
    """Every frame crossing `dev` while the block runs (a packet socket sees
    ingress before tc does); yields the list, filled when the block ends."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    frames: list[Ether] = []
    with sock:
        sock.bind((dev, 0))
        yield frames
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(Ether(sock.recv(65536)))


def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def drops(dp: Datapath) -> dict:
    return {k: n for k, n in dp.packets().items() if k[1].startswith("SL_DROP_")}


# ---- (a) two pods on one node ---------------------------------------------------------


@pytest.fixture
def one_node(pin_root):
    # Nested, not one `with` of two items: pylint takes `node` bound by the first item as unbound in the second.
    with netns.namespaces("node", "pod1", "pod2") as (node, pod1, pod2):
        with datapath(node, pin_root) as dp:
            node_setup(node)
            for pod, host_dev, ip in ((pod1, "h1", POD1), (pod2, "h2", POD2)):
                dp.endpoints.put(ip, add_pod(node, pod, host_dev, ip))
                dp.attach_pod(host_dev)
            yield SimpleNamespace(dp=dp, node=node, pod1=pod1, pod2=pod2)


def test_same_node_pods_talk_through_redirect_peer(one_node):
    n = one_node
    with capture(n.pod2, "eth0") as frames:
        assert packets.echo(n.pod1, POD2, ECHOES) == [63] * ECHOES  # one hop: each direction decremented once
    # Delivered as if routed by the gateway: from the host veth's MAC to the pod's.
    requests = [f for f in frames if ICMP in f and f[ICMP].type == 8]
    assert [(f.src, f.dst) for f in requests] == [(netns.mac(n.node, "h2"), netns.mac(n.pod2, "eth0"))] * ECHOES
    assert n.dp.forwarded() == {(POD_HOOK, "SL_OUT_REDIRECT_PEER"): 2 * ECHOES}

    tcp_transfer(n.pod2, POD2, n.pod1)
    after = n.dp.forwarded()
    assert set(after) == {(POD_HOOK, "SL_OUT_REDIRECT_PEER")}
    assert after[(POD_HOOK, "SL_OUT_REDIRECT_PEER")] >= 2 * ECHOES + MIN_TCP_PACKETS


def test_same_node_pod_cannot_spoof_another_pod(one_node):
    n = one_node
    # pod1 claims pod2's address: its packets die on its own veth.
    netns.ns_exec(n.pod1, "ip", "addr", "add", f"{POD2}/32", "dev", "eth0")
    with netns.entered(n.pod1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((POD2, 0))
        for _attempt in range(3):
            sock.sendto(b"spoofed", ("10.1.1.99", 9))
    assert wait_for(lambda: n.dp.forwarded() == {(POD_HOOK, "SL_DROP_SPOOFED"): 3})


def test_same_node_truncated_ipv4_is_dropped(one_node):
    n = one_node
    # An IPv4 ethertype with 10 bytes of header: test_run refuses such frames,
    # a pod's AF_PACKET socket can still send them.
    frame = bytes(Ether(src=netns.mac(n.pod1, "eth0"), dst=netns.mac(n.node, "h1"), type=0x0800)) + \
        bytes(IP(src=POD1, dst=POD2))[:10]
    send_frame(n.pod1, "eth0", frame)
    assert wait_for(lambda: n.dp.forwarded() == {(POD_HOOK, "SL_DROP_INVALID"): 1})
    assert n.dp.metrics.read(n.dp.hooks, n.dp.outcomes)[(POD_HOOK, "SL_DROP_INVALID")] == (1, len(frame))


# ---- (b), (c) one pod on each of two nodes --------------------------------------------


@contextlib.contextmanager
def two_nodes(pin_root: str, tunnel: bool):
    """Two nodes on an underlay veth pair, one pod each; sl_routes sends each
    node's traffic for the other's pod CIDR natively via nic0 or over vx0."""
    with netns.namespaces("node1", "node2", "pod1", "pod2") as (node1, node2, pod1, pod2):
        with datapath(node1, pin_root) as dp1, datapath(node2, pin_root) as dp2:
            netns.ns_exec(node1, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic0", "netns", node2)
            mtu = VXLAN_MTU if tunnel else 1500
            for node, dp, addr, pod, ip in ((node1, dp1, UNDERLAY[0], pod1, POD1), (node2, dp2, UNDERLAY[1], pod2, POD2)):
                node_setup(node)
                netns.ns_exec(node, "ip", "addr", "add", f"{addr}/24", "dev", "nic0")
                netns.ns_exec(node, "ip", "link", "set", "nic0", "up")
                dp.attach_nic("nic0")
                if tunnel:
                    netns.ns_exec(node, "ip", "link", "add", "vx0", "type", "vxlan", "external", "dstport", "4789")
                    netns.ns_exec(node, "ip", "link", "set", "vx0", "up")
                    dp.attach_nic("vx0")
                dp.endpoints.put(ip, add_pod(node, pod, "h1", ip, mtu))
                dp.attach_pod("h1")
            for dp, node, cidr, nexthop in ((dp1, node1, POD_CIDRS[1], UNDERLAY[1]),
                                            (dp2, node2, POD_CIDRS[0], UNDERLAY[0])):
                dev = "vx0" if tunnel else "nic0"
                dp.routes.put(cidr, Route(nexthop, netns.ifindex(node, dev), tunnel=tunnel, vni=VNI))
            yield SimpleNamespace(dp1=dp1, dp2=dp2, node1=node1, node2=node2, pod1=pod1, pod2=pod2)


@pytest.mark.parametrize("tunnel, outcome", [(False, "SL_OUT_REDIRECT_NEIGH"), (True, "SL_OUT_REDIRECT_TUNNEL")],
                         ids=["native", "vxlan"])
def test_pods_on_two_nodes(pin_root, tunnel, outcome):
    with two_nodes(pin_root, tunnel) as c:
        with capture(c.node2, "nic0") as frames:
            assert packets.echo(c.pod1, POD2, ECHOES) == [62] * ECHOES  # decremented on each node
        # What node1 sent to node2: addressed by MAC on the underlay (redirect_neigh
        # resolved the next hop, or the VXLAN device routed the outer packet).
        macs = (netns.mac(c.node1, "nic0"), netns.mac(c.node2, "nic0"))
        requests = [f for f in frames if (f.src, f.dst) == macs and IP in f]
        assert len(requests) == ECHOES
        for f in requests:
            if tunnel:  # the tunnel key as tc_from_pod set it
                assert (f[IP].dst, f[IP].ttl, f[UDP].dport, f[UDP].chksum, f[VXLAN].vni) == \
                    (UNDERLAY[1], 64, 4789, 0, VNI)
                f = f[VXLAN].payload
            assert (f[IP].src, f[IP].dst, f[IP].ttl) == (POD1, POD2, 63)
        # Each node sends its pod's echoes out through a route and delivers the
        # other pod's into its pod: requests on node1 -> node2, replies back.
        expected = {(POD_HOOK, outcome): ECHOES, (NIC_HOOK, "SL_OUT_REDIRECT_PEER"): ECHOES}
        assert c.dp1.forwarded() == expected
        assert c.dp2.forwarded() == expected
        if tunnel:
            # The outer VXLAN packets cross nic0 and pass to the stack for decapsulation.
            assert c.dp2.packets()[(NIC_HOOK, "SL_OUT_PASS")] >= ECHOES

        tcp_transfer(c.pod2, POD2, c.pod1)
        sent1, sent2 = c.dp1.forwarded(), c.dp2.forwarded()
        assert set(sent1) == set(sent2) == set(expected), (drops(c.dp1), drops(c.dp2))
        # Whatever one node's tc_from_pod sent, the other's tc_from_nic delivered.
        assert sent1[(POD_HOOK, outcome)] == sent2[(NIC_HOOK, "SL_OUT_REDIRECT_PEER")] >= ECHOES + MIN_TCP_PACKETS
        assert sent2[(POD_HOOK, outcome)] == sent1[(NIC_HOOK, "SL_OUT_REDIRECT_PEER")] > ECHOES


# ---- (d) a pod as the backend of the XDP load balancer ----------------------------------

NIC_IP, CLIENT_IP = "192.168.60.1", "192.168.60.2"     # the node's NIC and an outside client on its link
VIP, TCP_VPORT, UDP_VPORT = "192.0.2.10", 80, 53
TCP_BPORT, UDP_BPORT = 8080, 5353
NAT_PORTS = range(61000, 65536)
LB_BYTES = 1 << 20


def lb_tcp_exchange(pod: str, client: str, size: int = LB_BYTES) -> tuple[tuple, tuple]:
    """The client connects to the VIP, sends `size` random bytes, the backend
    pod checks them and sends `size` others back; returns (the client's view of
    its peer, the backend's view of its peer)."""
    up, down = os.urandom(size), os.urandom(size)
    with netns.entered(pod):
        server = socket.create_server((POD1, TCP_BPORT))
    got: dict = {}

    def serve():
        try:
            server.settimeout(5)
            conn, got["peer"] = server.accept()
            with conn:
                conn.settimeout(5)
                data = bytearray()
                while chunk := conn.recv(1 << 16):
                    data += chunk
                got["up"] = hashlib.sha256(data).digest()
                conn.sendall(down)
        except OSError as e:
            got["error"] = e

    backend = threading.Thread(target=serve, daemon=True)
    with server:
        backend.start()
        with netns.entered(client):
            sock = socket.socket()
        with sock:
            sock.settimeout(5)
            sock.connect((VIP, TCP_VPORT))
            seen_by_client = sock.getpeername()
            sock.sendall(up)
            sock.shutdown(socket.SHUT_WR)
            data = bytearray()
            while chunk := sock.recv(1 << 16):
                data += chunk
        backend.join(10)
    assert "error" not in got, got.get("error")
    assert got["up"] == hashlib.sha256(up).digest()
    assert hashlib.sha256(data).digest() == hashlib.sha256(down).digest()
    return seen_by_client, got["peer"]


def lb_udp_exchange(pod: str, client: str) -> tuple[tuple, tuple]:
    """One datagram to the VIP and the backend's answer; returns (where the
    answer came from for the client, where the query came from for the backend)."""
    with netns.entered(pod):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, sock:
        server.bind((POD1, UDP_BPORT))
        server.settimeout(5)
        sock.settimeout(5)
        sock.sendto(b"query", (VIP, UDP_VPORT))
        query, peer = server.recvfrom(64)
        assert query == b"query"
        server.sendto(b"answer", peer)
        answer, source = sock.recvfrom(64)
        assert answer == b"answer"
    return source, peer


def received(frames: list[Ether], src: str, dst: str) -> list[Ether]:
    """The TCP/UDP frames from `src` to `dst` among `frames` that fit the
    link's MTU, each checked to carry valid checksums. Larger ones are GRO
    aggregates, whose TCP checksum is not meant to be recomputed."""
    checked = []
    for f in frames:
        if IP in f and (f[IP].src, f[IP].dst) == (src, dst) and f[IP].proto in (6, 17) and f[IP].len <= 1500:
            packets.assert_checksums_valid(bytes(f))
            checked.append(f)
    return checked


@pytest.mark.parametrize("keep_source", [False, True], ids=["snat", "keep-source"])
@pytest.mark.parametrize("xdp_mode", [lb.XDP_FLAGS_SKB_MODE, lb.XDP_FLAGS_DRV_MODE, None],
                         ids=["generic", "native", "no-xdp"])
def test_xdp_lb_to_local_pod(pin_root, xdp_mode, keep_source):
    """client -> VIP -> node NIC (xdp_nic, tc_from_nic) -> backend pod (its veth
    with tc_from_pod) and back. XDP rewrites client -> VIP into
    node:natport -> pod (client -> pod when the VIP keeps the client's source,
    externalTrafficPolicy Local) and passes it up, tc_from_nic delivers it with
    redirect_peer (without XDP on the NIC, tc_from_nic balances it itself);
    the pod's reply is translated back to VIP -> client by
    tc_from_pod and sent out of the NIC with redirect_neigh. Forwarding stays
    off on the node: nothing reaches the other side unless the programs carry
    it, and the node has no socket for the NAT port (its stack would reset the
    connection)."""
    with netns.namespaces("node", "cli", "pod1") as (node, cli, pod1):
        with datapath(node, pin_root) as dp:
            node_setup(node)
            netns.ns_exec(node, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "eth0", "netns", cli)
            netns.ns_exec(node, "ip", "addr", "add", f"{NIC_IP}/24", "dev", "nic0")
            netns.ns_exec(node, "ip", "link", "set", "nic0", "up")
            netns.ns_exec(cli, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
            netns.ns_exec(cli, "ip", "link", "set", "eth0", "up")
            netns.ns_exec(cli, "ip", "route", "add", f"{VIP}/32", "via", NIC_IP)
            # Checksums: tx off on both ends of the client's link, so that the receiving stacks
            # verify what the programs wrote. Without it traffic flows just the same, unchecked:
            # a veth hands on CHECKSUM_PARTIAL packets (the L4 field holds only the pseudo-header
            # sum) and the receiver trusts them; the captures below then fail.
            # - cli eth0: XDP has no skb to tell a partial checksum from a complete one, and its
            #   incremental update assumes the complete checksum every frame from a wire carries.
            #   With tx off the client's stack sends complete ones, as a real NIC delivers them.
            # - nic0: the backend pod keeps its offloads, its replies are CHECKSUM_PARTIAL: the
            #   case tc_from_pod's rewrite must get right. With tx off the kernel completes the
            #   checksum when nic0 transmits (what a real NIC does in hardware), so the client's
            #   stack checks it.
            netns.ns_exec(cli, "ethtool", "-K", "eth0", "tx", "off")
            netns.ns_exec(node, "ethtool", "-K", "nic0", "tx", "off")
            dp.endpoints.put(POD1, add_pod(node, pod1, "h1", POD1))
            dp.attach_pod("h1")
            dp.attach_nic("nic0")
            if xdp_mode is not None:
                dp.attach_xdp("nic0", xdp_mode)
            ConfigMap(dp.pod.map_fd("sl_config")).set(NIC_IP, netns.ifindex(node, "nic0"))
            backends = {1: Backend(POD1, TCP_BPORT), 2: Backend(POD1, UDP_BPORT, "udp")}
            BackendsMap(dp.pod.map_fd("sl_backends")).put_many(backends)
            vips = LbVipsMap(dp.pod.map_fd("sl_lb_vips"))
            options = LbOptions(keep_source=keep_source)
            vips.put(VIP, TCP_VPORT, "tcp", {1: backends[1]}, options)
            vips.put(VIP, UDP_VPORT, "udp", {2: backends[2]}, options)
            backend_sees = CLIENT_IP if keep_source else NIC_IP

            with capture(cli, "eth0") as to_client, capture(pod1, "eth0") as to_pod:
                for _attempt in range(2):
                    seen_by_client, seen_by_backend = lb_tcp_exchange(pod1, cli)
                    assert seen_by_client == (VIP, TCP_VPORT)
                    assert seen_by_backend[0] == backend_sees
                    assert (seen_by_backend[1] in NAT_PORTS) != keep_source
                source, peer = lb_udp_exchange(pod1, cli)
                assert source == (VIP, UDP_VPORT)
                assert peer[0] == backend_sees and (peer[1] in NAT_PORTS) != keep_source
            flows = NatMap(dp.pod.map_fd("sl_lb_nat")).flows()
            counters = dp.packets()

    assert len(flows) == 2 * 3      # two TCP connections and one UDP flow, each both ways
    assert not {k: n for k, n in counters.items() if k[1].startswith("SL_DROP_")}
    # Each direction carried by the programs: XDP handed the client's packets to
    # tc, which delivered them, and the pod's replies were translated.
    if xdp_mode is None:
        assert counters[(NIC_HOOK, "SL_OUT_REDIRECT_PEER")] >= 2 * LB_BYTES // 65536
        assert not {k: n for k, n in counters.items() if k[0] == XDP_HOOK}
    else:
        assert counters[(XDP_HOOK, "SL_OUT_LB_LOCAL")] >= 2 * LB_BYTES // 1500
        assert 0 < counters[(NIC_HOOK, "SL_OUT_REDIRECT_PEER")] <= counters[(XDP_HOOK, "SL_OUT_LB_LOCAL")]
    assert counters[(POD_HOOK, "SL_OUT_LB_REVNAT")] >= 2 * LB_BYTES // 65536
    # What each side received, as it reached it: checksums valid (the capture keeps only
    # the first frames of each link, its buffer is read at the end), and nothing on the
    # client's link but VIP <-> client (no reset from the node, no NAT port).
    assert len(received(to_client, VIP, CLIENT_IP)) >= 3
    assert len(received(to_pod, backend_sees, POD1)) >= 3
    assert {(f[IP].src, f[IP].dst) for f in to_client if IP in f} == {(VIP, CLIENT_IP), (CLIENT_IP, VIP)}


def test_lb_without_xdp_to_a_backend_outside_the_pod_network(pin_root):
    """A NIC without XDP: tc_from_nic balances client -> VIP itself, to a backend on the NIC's link that is
    no pod (a host-network endpoint, an inventory backend): node:natport -> backend out of the NIC with
    redirect_neigh, and the backend's reply, which comes back in through the NIC, VIP -> client the same
    way. Forwarding stays off on the node: only the programs carry it."""
    backend_ip = "192.168.60.3"
    with netns.namespaces("node", "cli") as (node, cli):
        with datapath(node, pin_root) as dp:
            node_setup(node)
            netns.ns_exec(node, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "eth0", "netns", cli)
            netns.ns_exec(node, "ip", "addr", "add", f"{NIC_IP}/24", "dev", "nic0")
            netns.ns_exec(node, "ip", "link", "set", "nic0", "up")
            for addr in (CLIENT_IP, backend_ip):
                netns.ns_exec(cli, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            netns.ns_exec(cli, "ip", "link", "set", "eth0", "up")
            netns.ns_exec(cli, "ip", "route", "add", f"{VIP}/32", "via", NIC_IP, "src", CLIENT_IP)
            dp.attach_nic("nic0")
            ConfigMap(dp.pod.map_fd("sl_config")).set(NIC_IP, netns.ifindex(node, "nic0"))
            BackendsMap(dp.pod.map_fd("sl_backends")).put_many({1: Backend(backend_ip, TCP_BPORT)})
            LbVipsMap(dp.pod.map_fd("sl_lb_vips")).put(VIP, TCP_VPORT, "tcp", {1: Backend(backend_ip, TCP_BPORT)})
            with netns.entered(cli):
                server = socket.create_server((backend_ip, TCP_BPORT))
                server.settimeout(5)
                with server, socket.create_connection((VIP, TCP_VPORT), timeout=5,
                                                      source_address=(CLIENT_IP, 0)) as client:
                    conn, peer = server.accept()
                    with conn:
                        client.sendall(b"ping")
                        assert conn.recv(16) == b"ping"
                        conn.sendall(b"pong")
                        assert client.recv(16) == b"pong"
                        assert client.getpeername() == (VIP, TCP_VPORT)
                # Without backends: a NodePort (the node's own address) is refused by the node's stack,
                # another VIP is dropped (and counted).
                vips = LbVipsMap(dp.pod.map_fd("sl_lb_vips"))
                vips.put(NIC_IP, 30080, "tcp", {})
                vips.put(VIP, TCP_VPORT, "tcp", {})
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((NIC_IP, 30080), timeout=5)
                with pytest.raises(TimeoutError):
                    socket.create_connection((VIP, TCP_VPORT), timeout=0.5, source_address=(CLIENT_IP, 0))
            counters = dp.packets()
    assert peer[0] == NIC_IP and peer[1] in NAT_PORTS
    assert counters[(NIC_HOOK, "SL_OUT_LB_NEIGH")] >= 6       # both directions of the handshake and the data
    assert {k: n for k, n in counters.items() if k[1].startswith("SL_DROP_")} == {(NIC_HOOK, "SL_DROP_NO_BACKEND"): 1}
