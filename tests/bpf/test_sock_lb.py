"""sock_lb.o on the real kernel: host-reachable services translated at the
socket layer. A client namespace (whose process sits in a test cgroup carrying
the four sock_addr programs) reaches backends in a server namespace over a
veth; the service VIP is an address nobody owns and has no route."""

from __future__ import annotations

import collections
import time
import uuid

import pytest

from lib import netns
from lib.cgroup import cgroup
from lib.procs import Child, children
from sluice.bpf import libbpf
from sluice.bpf.btf import Btf
from sluice.maps import Backend, BackendsMap, MetricsMap, Service, ServicesMap, SockAffinityMap

from conftest import bpf_object_path

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"
BACKENDS = {"b1": "10.200.0.2", "b2": "10.200.0.3"}
B3 = "10.200.0.4"               # a third backend, only in the affinity tests' services
BACKEND_PORT = 8080
AFFINE_PORT = 90                # the affinity tests' service: backends 1..3 (b1, b2, b3)

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

# The client: `tcp IP PORT N [PAUSE]` makes N connections (PAUSE seconds apart), `udp IP PORT SOCKETS N`
# sends N datagrams on each of SOCKETS sockets (`udp-connect` connect()s each
# socket first and then uses send/recv). It reports, per exchange, the
# backend's name and the peer address the application sees, or the errno.
CLIENT = r"""
import errno, json, socket, sys, time
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = []
if mode == "tcp":
    for i in range(int(sys.argv[4])):
        if i and len(sys.argv) > 5:
            time.sleep(float(sys.argv[5]))
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
    def __init__(self, cg, client_ns, other_ns, services, affinity, counters):
        self.cg, self.client_ns, self.other_ns = cg, client_ns, other_ns
        self.services, self.affinity, self.counters = services, affinity, counters

    def client(self, *args, ns=None):
        """The client's results, run in the client namespace (or `ns`)."""
        kid = Child(ns or self.client_ns, CLIENT, *args, cgroup=self.cg)
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
    for i, ip in enumerate((*BACKENDS.values(), B3), start=1):
        backends.put(i, Backend(ip, BACKEND_PORT, "tcp"))
        backends.put(10 + i, Backend(ip, BACKEND_PORT, "udp"))
    services.put(VIP, 80, "tcp", Service(1, (1, 2)))
    services.put(VIP, 53, "udp", Service(2, (11, 12)))

    tag = uuid.uuid4().hex[:6]
    cli_dev, srv_dev, cli2_dev, srv2_dev = f"slsl{tag}c", f"slsl{tag}s", f"slsl{tag}d", f"slsl{tag}t"
    # cli2: a second client namespace, routed to the backends over its own veth
    with netns.namespaces("cli", "cli2", "srv") as (cli, cli2, srv), cgroup() as cg, children() as kids:
        netns.veth(cli_dev, cli, srv_dev, srv)
        netns.veth(cli2_dev, cli2, srv2_dev, srv)
        netns.ns_exec(cli, "ip", "addr", "add", "10.200.0.1/24", "dev", cli_dev)
        netns.ns_exec(cli2, "ip", "addr", "add", "10.201.0.1/24", "dev", cli2_dev)
        netns.ns_exec(srv, "ip", "addr", "add", "10.201.0.254/24", "dev", srv2_dev)
        for ip in (*BACKENDS.values(), B3):
            netns.ns_exec(srv, "ip", "addr", "add", f"{ip}/24", "dev", srv_dev)
        for ns, dev in ((cli, cli_dev), (srv, srv_dev), (cli2, cli2_dev), (srv, srv2_dev)):
            netns.ns_exec(ns, "ip", "link", "set", dev, "up")
        netns.ns_exec(cli2, "ip", "route", "add", "10.200.0.0/24", "via", "10.201.0.254")
        for name, ip in (*BACKENDS.items(), ("b3", B3)):
            kids.append(Child(srv, SERVER, ip, BACKEND_PORT, name))
        for kid in kids:
            assert kid.read() == "ready"
        for prog, attach_type in (("sock_connect4", libbpf.BPF_CGROUP_INET4_CONNECT),
                                  ("sock_sendmsg4", libbpf.BPF_CGROUP_UDP4_SENDMSG),
                                  ("sock_recvmsg4", libbpf.BPF_CGROUP_UDP4_RECVMSG),
                                  ("sock_getpeer4", libbpf.BPF_CGROUP_INET4_GETPEERNAME)):
            cg.attach(obj.prog_fd(prog), attach_type)
        yield Lab(cg, cli, cli2, services, SockAffinityMap(obj.map_fd("sl_sock_affinity")),
                  lambda: metrics.read(hooks, outcomes))


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


# ---- session affinity (sessionAffinity: ClientIP) ----

def _names(results) -> list[str]:
    assert all("errno" not in r for r in results), results
    return [r["name"] for r in results]


def test_without_affinity_connections_spread_over_the_backends(lab):
    lab.services.put(VIP, AFFINE_PORT, "tcp", Service(3, (1, 2, 3)))

    assert set(_names(lab.client("tcp", VIP, AFFINE_PORT, 30))) == {"b1", "b2", "b3"}


def test_affinity_keeps_each_client_namespace_on_one_backend(lab):
    lab.services.put(VIP, AFFINE_PORT, "tcp", Service(3, (1, 2, 3), affinity_timeout=60))

    first = _names(lab.client("tcp", VIP, AFFINE_PORT, 20))
    assert len(set(first)) == 1, first
    other = _names(lab.client("tcp", VIP, AFFINE_PORT, 20, ns=lab.other_ns))
    assert len(set(other)) == 1, other
    # each namespace keeps its own choice (a new process, the same namespace)
    assert set(_names(lab.client("tcp", VIP, AFFINE_PORT, 10))) == set(first)
    assert set(_names(lab.client("tcp", VIP, AFFINE_PORT, 10, ns=lab.other_ns))) == set(other)
    # one entry per (service, client namespace), naming the backend each one reached
    entries = {k.netns_cookie: (k.svc_id, v.backend_id, v.slot) for k, v in lab.affinity.raw_items()}
    ids = {"b1": 1, "b2": 2, "b3": 3}
    assert sorted(entries.values()) == sorted((3, ids[n], ids[n]) for n in (first[0], other[0]))
    assert lab.counters()[("SL_HOOK_SOCK_CONNECT4", "SL_OUT_SOCK_XLATE")] == (60, 0)


def test_affinity_holds_for_unconnected_udp(lab):
    lab.services.put(VIP, 53, "udp", Service(2, (11, 12, 13), affinity_timeout=60))

    # without affinity each socket picks its own backend (test_udp_to_vip_is_answered_from_vip)
    results = lab.client("udp", VIP, 53, 12, 2)
    assert len(set(_names(results))) == 1, results
    assert {r["peer"] for r in results} == {(VIP, 53)}


def test_affinity_is_refreshed_by_use_and_expires_after_the_timeout(lab):
    lab.services.put(VIP, AFFINE_PORT, "tcp", Service(3, (1, 2, 3), affinity_timeout=1))

    # used every 0.5 s, longer than the timeout in all: never expires
    names = _names(lab.client("tcp", VIP, AFFINE_PORT, 5, 0.5))
    assert len(set(names)) == 1, names
    # unused for longer than the timeout: the next connection chooses afresh (1 in 3 the same backend again)
    seen = set(names)
    for _attempt in range(20):
        time.sleep(1.2)
        seen.update(_names(lab.client("tcp", VIP, AFFINE_PORT, 1)))
        if len(seen) > 1:
            break
    assert len(seen) > 1, "the client kept its backend past the timeout"


def test_affine_backend_removed_from_the_service_moves_the_client_at_once(lab):
    lab.services.put(VIP, AFFINE_PORT, "tcp", Service(3, (1, 2, 3), affinity_timeout=60))
    (chosen,) = set(_names(lab.client("tcp", VIP, AFFINE_PORT, 5)))

    ids = {"b1": 1, "b2": 2, "b3": 3}
    lab.services.put(VIP, AFFINE_PORT, "tcp",
                     Service(3, tuple(i for n, i in ids.items() if n != chosen), affinity_timeout=60))
    names = _names(lab.client("tcp", VIP, AFFINE_PORT, 10))
    assert len(set(names)) == 1 and chosen not in names, (chosen, names)
