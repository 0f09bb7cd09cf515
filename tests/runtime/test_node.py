"""One node end to end: the real sluice-agent in a node namespace, pods added by
executing the CNI plugin as a runtime does, services through the socket LB, and
traffic that must not lose a byte or a datagram while the agent is killed,
restarted, and the datapath is reloaded with new code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from conftest import BPF_BUILD, ROOT
from lib import netns
from lib.agent import AgentProcess
from lib.cgroup import cgroup
from lib.cni_exec import SLUICE_PLUGIN, exec_plugin
from lib.procs import Child, children
from sluice.datapath import Datapath

pytestmark = pytest.mark.kernel

PLUGIN = SLUICE_PLUGIN
POD_CIDR = "10.246.1.0/24"
TCP_VIP, UDP_VIP = "10.98.0.10", "10.98.0.53"

SERVER = r"""
import json, socket, sys, threading
name = sys.argv[1]
def tcp_identity():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(name.encode()); c.close()
def tcp_sink():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9000)); s.listen(4)
    c, _ = s.accept(); total = 0
    while (chunk := c.recv(65536)):
        total += len(chunk)
    print(json.dumps({"tcp_received": total}), flush=True)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353))
    while True:
        data, peer = s.recvfrom(2048); s.sendto(data, peer)
for f in (tcp_identity, tcp_sink, udp):
    threading.Thread(target=f, daemon=True).start()
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
"""

CLIENT = r"""
import json, socket, sys
vip_tcp, vip_udp = sys.argv[1], sys.argv[2]
c = socket.create_connection((vip_tcp, 80), timeout=5)
name = c.recv(64).decode(); peer = c.getpeername(); c.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"hello", (vip_udp, 53)); data, src = u.recvfrom(2048)
print(json.dumps({"tcp_backend": name, "tcp_peer": list(peer), "udp_reply": data.decode(), "udp_from": list(src)}),
      flush=True)
"""

# A TCP stream and a sequence-numbered UDP flow (every datagram echoed) until told to stop.
STREAMER = r"""
import json, socket, sys, threading, time
dst = sys.argv[1]
stop = threading.Event()
tcp = socket.create_connection((dst, 9000), timeout=5)
sent = 0
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.settimeout(0.5); udp.connect((dst, 5353))
echoed, udp_sent = set(), 0
def tcp_loop():
    global sent
    chunk = b"x" * 16384
    while not stop.is_set():
        tcp.sendall(chunk); sent += len(chunk); time.sleep(0.001)
def udp_rx():
    while not stop.is_set() or len(echoed) < udp_sent:
        try:
            echoed.add(int(udp.recv(64)))
        except socket.timeout:
            if stop.is_set():
                break
t1 = threading.Thread(target=tcp_loop); t2 = threading.Thread(target=udp_rx); t1.start(); t2.start()
print(json.dumps({"streaming": True}), flush=True)
def udp_tx():
    global udp_sent
    while not stop.is_set():
        udp.send(str(udp_sent).encode()); udp_sent += 1; time.sleep(0.002)
t3 = threading.Thread(target=udp_tx); t3.start()
sys.stdin.readline(); stop.set(); t1.join(); t3.join(); t2.join()
tcp.shutdown(socket.SHUT_WR); tcp.close()
print(json.dumps({"tcp_sent": sent, "udp_sent": udp_sent, "udp_lost": udp_sent - len(echoed)}), flush=True)
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node namespace with a NIC, a test cgroup, the agent, and two pods (a, b) added through CNI."""
    tmp = tmp_path_factory.mktemp("node")
    pin_root = f"/sys/fs/bpf/sluice-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(pin_root, mode=0o700)
    with netns.namespaces("node", "pa", "pb") as (node_ns, pa, pb), cgroup() as cg:
        netns.ns_exec(node_ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        netns.ns_exec(node_ns, "ip", "addr", "add", "192.168.92.11/24", "dev", "sleth0")
        for dev in ("sleth0", "sleth1"):
            netns.ns_exec(node_ns, "ip", "link", "set", dev, "up")
        state = {"node": {"name": "n1", "ip": "192.168.92.11", "nic": "sleth0", "pod_cidr": POD_CIDR}}
        state_file = str(tmp / "state.json")
        with open(state_file, "w") as f:
            json.dump(state, f)
        sock_dir = f"/tmp/slnode-{uuid.uuid4().hex[:6]}"
        agent = AgentProcess(node_ns, {"state_file": state_file, "pin_root": pin_root, "obj_dir": BPF_BUILD,
                                       "socket": f"{sock_dir}/agent.sock", "metrics_address": "",
                                       "ipam_dir": str(tmp / "ipam"), "cgroup": cg.path, "poll_interval": 0.2},
                             str(tmp))
        agent.start()
        conf = {"cniVersion": "1.1.0", "name": "sluice", "type": "sluice", "agentSocket": agent.config["socket"]}
        pods = {}
        try:
            for tag, ns in (("a", pa), ("b", pb)):
                cid = f"sltest-{tag}-{uuid.uuid4().hex[:8]}"
                code, result = exec_plugin_in(node_ns, "ADD", conf, cid, f"/run/netns/{ns}")
                assert code == 0, result
                pods[tag] = {"ns": ns, "cid": cid, "ip": result["ips"][0]["address"].split("/")[0]}
            state["services"] = [
                {"vip": TCP_VIP, "port": 80, "protocol": "tcp", "backends": [{"ip": pods["b"]["ip"], "port": 8080}]},
                {"vip": UDP_VIP, "port": 53, "protocol": "udp", "backends": [{"ip": pods["b"]["ip"], "port": 5353}]},
            ]
            with open(state_file + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(state_file + ".tmp", state_file)
            dp = Datapath(pin_root, BPF_BUILD)
            # two services of one backend each: two master entries and two slots
            agent.wait_for(lambda: dp.map_fill()["sl_services"]["entries"] == 4, what="services applied")
            yield {"agent": agent, "dp": dp, "cg": cg, "node_ns": node_ns, "pods": pods, "conf": conf}
            for pod in pods.values():
                assert exec_plugin_in(node_ns, "DEL", conf, pod["cid"], f"/run/netns/{pod['ns']}")[0] == 0
        finally:
            agent.stop()
            Datapath(pin_root, BPF_BUILD).remove()
            shutil.rmtree(sock_dir, ignore_errors=True)
            shutil.rmtree(pin_root, ignore_errors=True)


def exec_plugin_in(node_ns: str, command: str, conf: dict, cid: str, netns_path: str):
    """The runtime runs in the node's network namespace: so does the plugin it executes."""
    with netns.entered(node_ns):
        return exec_plugin(PLUGIN, command, conf, cid, netns_path)


def test_pods_talk_through_redirect_peer(node):
    a, b = node["pods"]["a"], node["pods"]["b"]
    before = node["dp"].metrics().get(("tc_from_pod", "redirect_peer"), (0, 0))[0]
    with children() as procs:
        server = Child(b["ns"], SERVER, "pod-b")
        procs.append(server)
        assert server.read()["ready"]
        client = f"import socket; print(socket.create_connection(('{b['ip']}', 8080), timeout=5).recv(64).decode())"
        out = netns.ns_exec(a["ns"], "python3", "-c", client).stdout
        assert out.strip() == "pod-b"
    after = node["dp"].metrics()[("tc_from_pod", "redirect_peer")][0]
    assert after - before >= 4  # SYN, ACK, data, FIN at least, each way through tc_from_pod


def test_service_vip_tcp_and_udp_through_socket_lb(node):
    a, b = node["pods"]["a"], node["pods"]["b"]
    metrics = node["dp"].metrics
    xlate_before = metrics().get(("sock_connect4", "sock_xlate"), (0, 0))[0]
    with children() as procs:
        server = Child(b["ns"], SERVER, "pod-b")
        procs.append(server)
        server.read()
        client = Child(a["ns"], CLIENT, TCP_VIP, UDP_VIP, cgroup=node["cg"])
        procs.append(client)
        seen = client.read(10)
    assert seen["tcp_backend"] == "pod-b"
    assert seen["tcp_peer"] == [TCP_VIP, 80]            # getpeername shows the VIP, not the backend
    assert seen["udp_reply"] == "hello"
    assert seen["udp_from"] == [UDP_VIP, 53]            # the reply comes from the VIP
    assert metrics()[("sock_connect4", "sock_xlate")][0] == xlate_before + 1
    assert metrics()[("sock_recvmsg4", "sock_revnat")][0] >= 1


def build_variant(obj_dir: str) -> None:
    """The same sources at -O1: new program tags, same names and maps."""
    for name in ("tc_pod", "tc_nic", "xdp_nic", "sock_lb", "sockmap"):
        subprocess.run(["clang", "-O1", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I", f"{ROOT}/build",
                        "-I", f"{ROOT}/bpf", "-I", f"{ROOT}/bpf/lib", "-c", f"{ROOT}/bpf/{name}.c",
                        "-o", f"{obj_dir}/{name}.o"], check=True, capture_output=True)


def test_traffic_survives_agent_kill_restart_and_datapath_reload(node, tmp_path):
    a, b = node["pods"]["a"], node["pods"]["b"]
    agent, dp = node["agent"], node["dp"]
    build_variant(str(tmp_path))
    with children() as procs:
        server = Child(b["ns"], SERVER, "pod-b")
        procs.append(server)
        server.read()
        streamer = Child(a["ns"], STREAMER, b["ip"], cgroup=node["cg"])
        procs.append(streamer)
        assert streamer.read()["streaming"]
        time.sleep(0.5)
        agent.stop(signal.SIGKILL)                      # 1. kill -9
        time.sleep(0.5)
        agent.start()
        time.sleep(0.5)
        agent.stop(signal.SIGTERM)                      # 2. clean restart
        agent.start()
        time.sleep(0.5)
        tags = dp.pinned_tags()
        report = Datapath(dp.root, str(tmp_path)).load()  # 3. new code, swapped under traffic
        assert report.changed and "tc_from_pod" in report.replaced
        assert dp.pinned_tags() != tags
        time.sleep(0.5)
        streamer.release()
        totals = streamer.read(15)
        received = server.read(15)
    assert totals["tcp_sent"] > 1_000_000
    assert received["tcp_received"] == totals["tcp_sent"]
    assert totals["udp_sent"] > 500 and totals["udp_lost"] == 0
    Datapath(dp.root, BPF_BUILD).load()  # back to the objects the other tests expect


def test_check_and_del_through_the_agent(node):
    conf = dict(node["conf"])
    a = node["pods"]["a"]
    with netns.entered(node["node_ns"]):
        code, result = exec_plugin(PLUGIN, "ADD", conf, a["cid"], f"/run/netns/{a['ns']}")
    assert code == 0 and result["ips"][0]["address"] == f"{a['ip']}/32"  # a repeated ADD returns the same
    conf["prevResult"] = result
    code, out = exec_plugin_in(node["node_ns"], "CHECK", conf, a["cid"], f"/run/netns/{a['ns']}")
    assert (code, out) == (0, None)
