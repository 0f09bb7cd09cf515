"""sock_lb.o on the real kernel: host-reachable services translated at the
socket layer. A client namespace (whose process sits in a test cgroup carrying
the four sock_addr programs) reaches backends in a server namespace over a
veth; the service VIP is an address nobody owns and has no route."""

from __future__ import annotations

import collections
import uuid

import pytest

from lib import netns
from lib.cgroup import cgroup
from lib.procs import Child, children
from sluice.bpf import libbpf
from sluice.bpf.btf import Btf
from sluice.maps import Backend, BackendsMap, MetricsMap, Service, ServicesMap

from conftest import bpf_object_path

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"
BACKENDS = {"b1": "10.200.0.2", "b2": "10.200.0.3"}
BACKEND_PORT = 8080

# A backend: on TCP it sends its name and closes, on UDP it answers every
# datagram with its name.
SERVER = r"""
import json, selectors, socket, sys
ip, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((ip, port))
tcp.listen(128)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((ip, port))
sel = selectors.DefaultSelector()
sel.register(tcp, selectors.EVENT_READ)
sel.register(udp, selectors.EVENT_READ)
print(json.dumps("ready"), flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is tcp:
            conn, _ = tcp.accept()
            conn.sendall(name)
            conn.close()
        else:
            _, addr = udp.recvfrom(64)
            udp.sendto(name, addr)
"""

# The client: `tcp IP PORT N` makes N connections, `udp IP PORT SOCKETS N`
# sends N datagrams on each of SOCKETS sockets (`udp-connect` connect()s each
# socket first and then uses send/recv). It reports, per exchange, the
# backend's name and the peer address the application sees, or the errno.
CLIENT = r"""
import errno, json, socket, sys
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = []
if mode == "tcp":
    for _ in range(int(sys.argv[4])):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((ip, port))
            peer = s.getpeername()
            out.append({"name": s.recv(64).decode(), "peer": peer})
        except OSError as e:
            out.append({"errno": errno.errorcode.get(e.errno, str(e))})
        s.close()
else:
    for sock_no in range(int(sys.argv[4])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            if mode == "udp-connect":
                s.connect((ip, port))
            for _ in range(int(sys.argv[5])):
                if mode == "udp-connect":
                    s.send(b"?")
                    data, peer = s.recv(64), s.getpeername()
                else:
                    s.sendto(b"?", (ip, port))
                    data, peer = s.recvfrom(64)
                out.append({"socket": sock_no, "name": data.decode(), "peer": peer})
        except OSError as e:
            out.append({"socket": sock_no, "errno": errno.errorcode.get(e.errno, str(e))})
        s.close()
print(json.dumps(out), flush=True)
"""


class Lab:
    def __init__(self, cg, client_ns, services, counters):
        self.cg, self.client_ns, self.services, self.counters = cg, client_ns, services, counters

    def client(self, *args):
        kid = Child(self.client_ns, CLIENT, *args, cgroup=self.cg)
        try:
            results = kid.read(timeout=15)
        finally:
            code = kid.stop(grace=5)
        assert code == 0
        return [{**r, "peer": tuple(r["peer"])} if "peer" in r else r for r in results]


@pytest.fixture
def lab(load_object):
    obj = load_object("sock_lb")
    with Btf(bpf_object_path("sock_lb")) as btf:
        hooks, outcomes = btf.enum("sl_hook"), btf.enum("sl_outcome")
    metrics = MetricsMap(obj.map_fd("sl_metrics"))
    services = ServicesMap(obj.map_fd("sl_services"))
    backends = BackendsMap(obj.map_fd("sl_backends"))
    for i, ip in enumerate(BACKENDS.values(), start=1):
        backends.put(i, Backend(ip, BACKEND_PORT, "tcp"))
        backends.put(10 + i, Backend(ip, BACKEND_PORT, "udp"))
    services.put(VIP, 80, "tcp", Service(1, (1, 2)))
    services.put(VIP, 53, "udp", Service(2, (11, 12)))

    tag = uuid.uuid4().hex[:6]
    cli_dev, srv_dev = f"slsl{tag}c", f"slsl{tag}s"
    with netns.namespaces("cli", "srv") as (cli, srv), cgroup() as cg, children() as kids:
        netns.veth(cli_dev, cli, srv_dev, srv)
        netns.ns_exec(cli, "ip", "addr", "add", "10.200.0.1/24", "dev", cli_dev)
        for ip in BACKENDS.values():
            netns.ns_exec(srv, "ip", "addr", "add", f"{ip}/24", "dev", srv_dev)
        for ns, dev in ((cli, cli_dev), (srv, srv_dev)):
            netns.ns_exec(ns, "ip", "link", "set", dev, "up")
        for name, ip in BACKENDS.items():
            kids.append(Child(srv, SERVER, ip, BACKEND_PORT, name))
        for kid in kids:
            assert kid.read() == "ready"
        for prog, attach_type in (("sock_connect4", libbpf.BPF_CGROUP_INET4_CONNECT),
                                  ("sock_sendmsg4", libbpf.BPF_CGROUP_UDP4_SENDMSG),
                                  ("sock_recvmsg4", libbpf.BPF_CGROUP_UDP4_RECVMSG),
                                  ("sock_getpeer4", libbpf.BPF_CGROUP_INET4_GETPEERNAME)):
            cg.attach(obj.prog_fd(prog), attach_type)
        yield Lab(cg, cli, services, lambda: metrics.read(hooks, outcomes))


def test_tcp_connect_to_vip_reaches_every_backend(lab):
    results = lab.client("tcp", VIP, 80, 40)

    assert all("errno" not in r for r in results), results
    names = collections.Counter(r["name"] for r in results)
    assert set(names) == set(BACKENDS), names
    # The application never sees the backend's address.
    assert {r["peer"] for r in results} == {(VIP, 80)}
    got = lab.counters()
    assert got[("SL_HOOK_SOCK_CONNECT4", "SL_OUT_SOCK_XLATE")] == (40, 0)
    assert got[("SL_HOOK_SOCK_GETPEERNAME4", "SL_OUT_SOCK_REVNAT")][0] == 40


def test_udp_to_vip_is_answered_from_vip(lab):
    results = lab.client("udp", VIP, 53, 16, 3)

    # Replies come from the backend, recvfrom() shows the VIP.
    assert {r["peer"] for r in results} == {(VIP, 53)}
    per_socket = collections.defaultdict(set)
    for r in results:
        per_socket[r["socket"]].add(r["name"])
    assert all(len(names) == 1 for names in per_socket.values()), "a socket's datagrams changed backend"
    assert set().union(*per_socket.values()) == set(BACKENDS)
    got = lab.counters()
    assert got[("SL_HOOK_SOCK_SENDMSG4", "SL_OUT_SOCK_XLATE")][0] == 48
    assert got[("SL_HOOK_SOCK_RECVMSG4", "SL_OUT_SOCK_REVNAT")][0] == 48


def test_port_that_is_not_a_service_is_untouched(lab):
    # Port 81 of the VIP is no service: the connect goes out as asked and the
    # client namespace has no route to the VIP.
    assert lab.client("tcp", VIP, 81, 1) == [{"errno": "ENETUNREACH"}]
    # A backend addressed directly is not translated either.
    assert lab.client("tcp", BACKENDS["b1"], BACKEND_PORT, 1) == [
        {"name": "b1", "peer": (BACKENDS["b1"], BACKEND_PORT)}]
    got = lab.counters()
    assert not any(outcome == "SL_OUT_SOCK_XLATE" for _hook, outcome in got), got


def test_service_without_backends_refuses_connect(lab):
    lab.services.put(VIP, 80, "tcp", Service(1, ()))

    # connect() fails at once with ECONNREFUSED, as Kubernetes expects of a
    # service without endpoints, instead of timing out against an address
    # nobody owns.
    assert lab.client("tcp", VIP, 80, 3) == [{"errno": "ECONNREFUSED"}] * 3
    got = lab.counters()
    assert got[("SL_HOOK_SOCK_CONNECT4", "SL_DROP_NO_BACKEND")][0] == 3
    assert ("SL_HOOK_SOCK_CONNECT4", "SL_OUT_SOCK_XLATE") not in got


def test_service_without_backends_refuses_udp(lab):
    lab.services.put(VIP, 53, "udp", Service(2, ()))

    # sendto() on an unconnected socket goes through sendmsg4, connect() of a
    # UDP socket through connect4: both fail at once with ECONNREFUSED.
    assert lab.client("udp", VIP, 53, 2, 1) == [
        {"socket": 0, "errno": "ECONNREFUSED"}, {"socket": 1, "errno": "ECONNREFUSED"}]
    assert lab.client("udp-connect", VIP, 53, 2, 1) == [
        {"socket": 0, "errno": "ECONNREFUSED"}, {"socket": 1, "errno": "ECONNREFUSED"}]
    got = lab.counters()
    assert got[("SL_HOOK_SOCK_SENDMSG4", "SL_DROP_NO_BACKEND")][0] == 2
    assert got[("SL_HOOK_SOCK_CONNECT4", "SL_DROP_NO_BACKEND")][0] == 2
    assert not any(outcome == "SL_OUT_SOCK_XLATE" for _hook, outcome in got), got


def test_connected_udp_to_vip_reaches_a_backend(lab):
    # connect4 translates a UDP socket's connect(); getpeername4 shows the VIP.
    results = lab.client("udp-connect", VIP, 53, 8, 2)

    assert all("errno" not in r for r in results), results
    assert {r["peer"] for r in results} == {(VIP, 53)}
    got = lab.counters()
    assert got[("SL_HOOK_SOCK_CONNECT4", "SL_OUT_SOCK_XLATE")][0] == 8
