"""sockmap.o on the real kernel: sockops puts same-node TCP sockets into
sl_sock_hash and sk_msg hands their data straight to the peer socket.
Client and server run in test namespaces and in a test cgroup that carries the
sockops program; sk_msg is attached to the test's own sockhash."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import uuid

import pytest

from lib import netns
from lib.cgroup import cgroup
from lib.procs import Child, children
from sluice.bpf import libbpf
from sluice.bpf.btf import Btf
from sluice.maps import Endpoint, EndpointsMap, MetricsMap, SockHash

from conftest import bpf_object_path

pytestmark = pytest.mark.kernel

SIZE = 1 << 20

# Server: accept one connection, read SIZE bytes, then send SIZE bytes back.
# Client: connect, send SIZE bytes, then read SIZE bytes. Sequential halves, so
# neither side can block the other. Both report their 4-tuple and digests and
# keep the socket open until told to finish (stdin), so the test can look at
# the sockhash while the connection exists.
PEER = r"""
import hashlib, json, os, socket, sys
role, ip, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 16, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)

sent = os.urandom(size)
if role == "server":
    lsock = socket.socket()
    lsock.bind((ip, port))
    lsock.listen(1)
    print(json.dumps({"port": lsock.getsockname()[1]}), flush=True)
    s, _ = lsock.accept()
    got = recv_exact(s, size)
    s.sendall(sent)
else:
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(sent)
    got = recv_exact(s, size)
print(json.dumps({"local": s.getsockname(), "peer": s.getpeername(),
                  "sent": hashlib.sha256(sent).hexdigest(), "got": hashlib.sha256(got).hexdigest()}), flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def sk_msg_attached(prog_fd: int, map_fd: int):
    """sk_msg on the sockhash through a bpf_link (Linux >= 6.10), else the
    legacy attachment to the map."""
    try:
        link = libbpf.link_create(prog_fd, map_fd, libbpf.BPF_SK_MSG_VERDICT)
        detach = functools.partial(os.close, link)
    except libbpf.BpfError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        libbpf.check(libbpf.bpf_prog_attach(prog_fd, map_fd, libbpf.BPF_SK_MSG_VERDICT, 0), "attach sk_msg")
        detach = functools.partial(libbpf.bpf_prog_detach2, prog_fd, map_fd, libbpf.BPF_SK_MSG_VERDICT)
    try:
        yield
    finally:
        detach()


def veth_names() -> tuple[str, str]:
    """Unique on the host: veths are created in our namespace before moving."""
    tag = uuid.uuid4().hex[:6]
    return f"slsm{tag}a", f"slsm{tag}b"


@pytest.fixture
def sockmap(load_object):
    """(cgroup with sockops, sockhash, endpoints, metrics reader) with sk_msg attached."""
    obj = load_object("sockmap")
    with Btf(bpf_object_path("sockmap")) as btf:
        hooks, outcomes = btf.enum("sl_hook"), btf.enum("sl_outcome")
    metrics = MetricsMap(obj.map_fd("sl_metrics"))
    sockhash = SockHash(obj.map_fd("sl_sock_hash"))
    with cgroup() as cg, sk_msg_attached(obj.prog_fd("sk_msg_redir"), sockhash.fd):
        cg.attach(obj.prog_fd("sockops_tcp"), libbpf.BPF_CGROUP_SOCK_OPS)
        yield cg, sockhash, EndpointsMap(obj.map_fd("sl_endpoints")), lambda: metrics.read(hooks, outcomes)


def exchange(cg, server_ns: str, server_ip: str, client_ns: str, on_connected):
    """Run one client/server exchange of SIZE bytes each way; `on_connected`
    is called while both sockets are still open."""
    with children() as kids:
        server = Child(server_ns, PEER, "server", server_ip, 0, SIZE, cgroup=cg)
        kids.append(server)
        port = server.read()["port"]
        client = Child(client_ns, PEER, "client", server_ip, port, SIZE, cgroup=cg)
        kids.append(client)
        c, s = client.read(), server.read()
        on_connected()
        for kid in (client, server):
            kid.release()
            assert kid.stop(grace=5) == 0
    assert c["got"] == s["sent"] and s["got"] == c["sent"], "payload corrupted"
    assert tuple(c["peer"]) == tuple(s["local"]) and tuple(s["peer"]) == tuple(c["local"])
    return tuple(c["local"]), tuple(s["local"])


def tuples(client, server):
    """The two sockhash keys of one connection, as SockHash.sockets() lists them."""
    return {(*client, *server), (*server, *client)}


@pytest.mark.parametrize("addr", ["10.244.1.2", "127.0.0.1"], ids=["pod-address", "loopback"])
def test_same_pod_connection_is_redirected(sockmap, addr):
    cg, sockhash, _prog, counters = sockmap
    with netns.namespaces("pod", "host") as (pod, host):
        # The pod's eth0 (its peer lives in a namespace of our own), so the
        # connection goes to the pod's own address, not only to loopback.
        eth0, peer = veth_names()
        netns.veth(eth0, pod, peer, host)
        netns.ns_exec(pod, "ip", "addr", "add", "10.244.1.2/24", "dev", eth0)
        netns.ns_exec(pod, "ip", "link", "set", eth0, "up")
        seen = []
        client, server = exchange(cg, pod, addr, pod, lambda: seen.extend(sockhash.sockets()))

    # Both ends, keyed by their own 4-tuple in network order: this checks the
    # port byte order of bpf_sock_ops as well.
    assert set(seen) == tuples(client, server)
    got = counters()
    assert got[("SL_HOOK_SOCKOPS", "SL_OUT_SOCKHASH_ADD")][0] == 2
    redirected = got.get(("SL_HOOK_SK_MSG", "SL_OUT_MSG_REDIRECT"), (0, 0))
    assert redirected[0] > 0
    # Every byte of both directions went socket to socket.
    assert redirected[1] == 2 * SIZE
    assert ("SL_HOOK_SK_MSG", "SL_OUT_MSG_PASS") not in got
    assert len(sockhash) == 0, "closed sockets must leave the sockhash"


@pytest.mark.parametrize("registered", [True, False], ids=["local-endpoints", "remote-peer"])
def test_other_namespace_needs_a_local_endpoint(sockmap, registered):
    """Two pods of different namespaces: accelerated only when the peer is a
    local endpoint in sl_endpoints, otherwise plain TCP."""
    cg, sockhash, endpoints, counters = sockmap
    a_ip, b_ip = "10.244.2.2", "10.244.2.3"
    if registered:
        for ip in (a_ip, b_ip):
            endpoints.put(ip, Endpoint(1, "02:00:00:00:00:01", "02:00:00:00:00:02"))
    with netns.namespaces("a", "b") as (a, b):
        dev_a, dev_b = veth_names()
        netns.veth(dev_a, a, dev_b, b)
        for ns, dev, ip in ((a, dev_a, a_ip), (b, dev_b, b_ip)):
            netns.ns_exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            netns.ns_exec(ns, "ip", "link", "set", dev, "up")
        seen = []
        client, server = exchange(cg, b, b_ip, a, lambda: seen.extend(sockhash.sockets()))

    got = counters()
    if registered:
        assert set(seen) == tuples(client, server)
        assert got[("SL_HOOK_SK_MSG", "SL_OUT_MSG_REDIRECT")][1] == 2 * SIZE
    else:
        assert seen == []
        assert ("SL_HOOK_SOCKOPS", "SL_OUT_SOCKHASH_ADD") not in got
        assert ("SL_HOOK_SK_MSG", "SL_OUT_MSG_REDIRECT") not in got
