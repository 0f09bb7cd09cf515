"""A Kubernetes lab cluster (`lab.py up --kubernetes`: control plane, containerd and kubelet in every node, no
kube-proxy) whose only CNI is Sluice, installed by playbooks/site.yml like on any cluster.

Pods created through the API (kubelet -> containerd -> Sluice's CNI plugin) get an address in their node's pod
CIDR and reach a pod on another node through Sluice's path; Services created through the API are served by
Sluice (no kube-proxy) from pods, nodes and outside (the client's source kept under a Local traffic
policy, ClientIP affinity), follow their endpoints, refuse when they have none, lose no packet while both
agents are killed, and outlive an agent restarted while the API server is unreachable; routes to other nodes come from the
Node objects where the inventory lacks them; deleting a pod leaves no link, map entry, IPAM allocation or
pin; plan.yml refuses a node whose pod CIDR Kubernetes set differently; and the lab's own teardown
leaves no namespace, mount, cgroup, process or containerd state. The tests run in file order on one lab."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from sluice.k8s import services as ks
from sluice.k8s.client import ApiClient, ApiError, Kubeconfig
from sluice.k8s.reflector import Reflector
from sluice.state import DEFAULT_FAILSAFE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import images  # noqa: E402  pylint: disable=wrong-import-position
import kube  # noqa: E402  pylint: disable=wrong-import-position
import lab  # noqa: E402  pylint: disable=wrong-import-position
from k8s_cluster import VENV_BIN, converged_cluster, playbook  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.kernel
SUBNET = "192.168.94.0/24"
# What the agent watches: Services and their endpoints and Nodes, and for NetworkPolicy (on by default with a
# kubeconfig) Pods, Namespaces and NetworkPolicies.
WATCHES = {"services", "endpointslices", "nodes", "pods", "namespaces", "networkpolicies"}
SLUICE = "/opt/sluice/venv/bin/sluice"
NS = "sltest"


@pytest.fixture(scope="module")
def cluster():
    with converged_cluster("slk8s", SUBNET) as converged:
        yield converged


def node_json(the_lab: lab.Lab, i: int, *argv: str):
    return json.loads(the_lab.node_run(i, SLUICE, "--json", *argv).stdout)


def pod(name: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "echo", "image": images.AGNHOST, "imagePullPolicy": "Never",
                                     "args": ["netexec", "--http-port=8080"],
                                     "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                                        "periodSeconds": 1}}]}}


def running_pod(k8s: kube.Cluster, name: str) -> dict:
    k8s.kubectl("wait", "-n", NS, "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
    (found,) = k8s.pods(NS, f"app={name}")
    return found


def test_nodes_are_ready_with_the_pod_cidrs_sluice_routes(cluster):
    the_lab, k8s = cluster
    nodes = k8s.nodes()
    assert sorted(nodes) == ["node1", "node2"]
    for i in (1, 2):
        assert nodes[f"node{i}"]["spec"]["podCIDRs"] == [kube.node_pod_cidr(i)]
        # The other node's pod CIDR is routed through its underlay address (native routing).
        routes = node_json(the_lab, i, "routes")
        other = 3 - i
        assert routes[kube.node_pod_cidr(other)]["nexthop"] == the_lab.node_ip(other)
    # Sluice's conflist is the only one containerd's CRI loads.
    conflists = the_lab.node_run(1, "ls", "/etc/cni/net.d").stdout.split()
    (conflist,) = [c for c in conflists if c.endswith((".conflist", ".conf", ".json"))]
    assert "sluice" in conflist


def test_pods_from_the_api_get_node_addresses_and_reach_each_other_across_nodes(cluster):
    the_lab, k8s = cluster
    k8s.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}, pod("a", "node1"),
               pod("b", "node2")])
    a, b = running_pod(k8s, "a"), running_pod(k8s, "b")
    assert ipaddress.ip_address(a["ip"]) in ipaddress.ip_network(kube.node_pod_cidr(1))
    assert ipaddress.ip_address(b["ip"]) in ipaddress.ip_network(kube.node_pod_cidr(2))
    before = {i: node_json(the_lab, i, "metrics") for i in (1, 2)}
    answer = k8s.exec_in(NS, "a", "curl", "-s", "--max-time", "5", f"http://{b['ip']}:8080/hostname")
    assert answer.stdout.strip() == "b", answer.stderr
    after = {i: node_json(the_lab, i, "metrics") for i in (1, 2)}

    def moved(i: int, hook: str, outcome: str) -> int:
        count = {(m["hook"], m["outcome"]): m["packets"] for m in before[i]}
        return sum(m["packets"] for m in after[i] if (m["hook"], m["outcome"]) == (hook, outcome)) \
            - count.get((hook, outcome), 0)

    assert moved(1, "tc_from_pod", "redirect_neigh") > 0
    assert moved(2, "tc_from_nic", "redirect_peer") > 0


def test_host_port_reaches_the_pod_through_the_chained_portmap_plugin(cluster):
    the_lab, k8s = cluster
    manifest = pod("hp", "node1")
    manifest["spec"]["containers"][0]["ports"] = [{"containerPort": 8080, "hostPort": 30080}]
    k8s.apply(manifest)
    running_pod(k8s, "hp")
    answer = the_lab.node_run(2, "curl", "-s", "--max-time", "5", f"http://{the_lab.node_ip(1)}:30080/hostname",
                              check=False)
    assert answer.stdout.strip() == "hp", answer.stderr
    k8s.kubectl("delete", "pod", "-n", NS, "hp", "--wait=true", "--timeout=60s")


# ---- Services from the API: the agent replaces kube-proxy -------------------------------------------

WEB = ("web-1", "node1"), ("web-2", "node2"), ("web-3", "node2")
EXTERNAL_NET, EXTERNAL_IP, INGRESS_IP = "203.0.113.0/29", "203.0.113.1", "203.0.113.2"    # TEST-NET-3


def web_pod(name: str, node: str) -> dict:
    """A backend of Service `web`: HTTP on the named port `http`, UDP echo on 8081."""
    manifest = pod(name, node)
    manifest["metadata"]["labels"]["svc"] = "web"
    container = manifest["spec"]["containers"][0]
    container["args"] = ["netexec", "--http-port=8080", "--udp-port=8081"]
    container["ports"] = [{"name": "http", "containerPort": 8080}]
    return manifest


def web_service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
            "spec": {"type": "NodePort", "selector": {"svc": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                               {"name": "echo", "port": 53, "targetPort": 8081, "protocol": "UDP"}]}}


def served(the_lab: lab.Lab, i: int, frontend: str) -> list[str] | None:
    """The backends node i's datapath serves `frontend` (ip:port/proto) with, or None."""
    for entry in node_json(the_lab, i, "services"):
        if entry["frontend"] == frontend and entry["kind"] == "socket-lb":
            return sorted(entry["backends"])
    return None


def wait_served(the_lab: lab.Lab, frontend: str, count: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while any(len(served(the_lab, i, frontend) or ()) != count for i in (1, 2)):
        assert time.monotonic() < deadline, {i: served(the_lab, i, frontend) for i in (1, 2)}
        time.sleep(0.2)


def hostnames(run, url: str, tries: int = 40) -> set[str]:
    """The backends that answered `url` through `run` (a command runner), over up to `tries` requests,
    stopping once all of WEB answered."""
    seen = set()
    for _attempt in range(tries):
        result = run("curl", "-s", "--max-time", "3", url)
        assert result.returncode == 0, result.stderr
        seen.add(result.stdout.strip())
        if len(seen) == len(WEB):
            break
    return seen


def test_services_from_the_api_reach_every_backend_from_pods_nodes_and_outside(cluster):
    the_lab, k8s = cluster
    k8s.apply([*(web_pod(n, node) for n, node in WEB), web_service()])
    for name, _node in WEB:
        running_pod(k8s, name)
    svc = json.loads(k8s.kubectl("get", "service", "-n", NS, "web", "-o", "json").stdout)
    cluster_ip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    wait_served(the_lab, f"{cluster_ip}:80/tcp", len(WEB))
    names = {name for name, _node in WEB}

    def in_pod(*argv: str) -> subprocess.CompletedProcess:
        return k8s.exec_in(NS, "a", *argv)

    def on_node(*argv: str) -> subprocess.CompletedProcess:
        return the_lab.node_run(2, *argv, check=False)

    def outside(*argv: str) -> subprocess.CompletedProcess:
        return the_lab.ns_run(the_lab.ext_ns, *argv, check=False)

    # From a pod, by DNS name (CoreDNS through the kube-dns ClusterIP), TCP, on both nodes' NodePorts too.
    assert hostnames(in_pod, f"http://web.{NS}.svc.cluster.local/hostname") == names
    for i in (1, 2):
        assert hostnames(in_pod, f"http://{the_lab.node_ip(i)}:{node_port}/hostname") <= names
    # UDP: the reply comes from the ClusterIP (recvmsg shows the VIP), or nc would not take it.
    udp = k8s.exec_in(NS, "a", "sh", "-c", f"echo hostname | nc -u -w 2 {cluster_ip} 53")
    assert udp.stdout.strip() in names, udp
    # From a node itself, and from the external client through each node's NIC (XDP LB).
    assert hostnames(on_node, f"http://{cluster_ip}/hostname") == names
    for i in (1, 2):
        assert hostnames(outside, f"http://{the_lab.node_ip(i)}:{node_port}/hostname") == names
    # An external IP and a LoadBalancer ingress IP, which the external client's router sends to node1.
    lb = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-lb", "namespace": NS},
          "spec": {"type": "LoadBalancer", "selector": {"svc": "web"}, "externalIPs": [EXTERNAL_IP],
                   "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    k8s.apply(lb)
    k8s.kubectl("patch", "service", "-n", NS, "web-lb", "--subresource=status", "--type=merge", "-p",
                json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": INGRESS_IP}]}}}))
    the_lab.ns_run(the_lab.ext_ns, "ip", "route", "add", EXTERNAL_NET, "via", the_lab.node_ip(1))
    try:
        for ip in (EXTERNAL_IP, INGRESS_IP):
            wait_served(the_lab, f"{ip}:80/tcp", len(WEB))
            assert hostnames(outside, f"http://{ip}/hostname") == names
            assert hostnames(in_pod, f"http://{ip}/hostname") == names
    finally:
        the_lab.ns_run(the_lab.ext_ns, "ip", "route", "del", EXTERNAL_NET, check=False)
        k8s.kubectl("delete", "service", "-n", NS, "web-lb")


def test_outside_clients_keep_their_source_under_local_policy_keep_their_backend_and_are_refused_at_once(cluster):
    """From the external client through the nodes' NICs (XDP LB): externalTrafficPolicy Local leads to the
    node's own endpoints, which see the client's address; sessionAffinity ClientIP keeps the client on one of
    them; a NodePort Service without endpoints refuses the connection at once (ICMP port unreachable)."""
    the_lab, k8s = cluster
    local = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-local", "namespace": NS},
             "spec": {"type": "NodePort", "selector": {"svc": "web"}, "externalTrafficPolicy": "Local",
                      "sessionAffinity": "ClientIP",
                      "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    empty = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "empty", "namespace": NS},
             "spec": {"type": "NodePort", "selector": {"svc": "nothing"}, "ports": [{"port": 80}]}}
    k8s.apply([local, empty])

    def outside(*argv: str) -> subprocess.CompletedProcess:
        return the_lab.ns_run(the_lab.ext_ns, *argv, check=False)

    def node_port(name: str) -> int:
        return int(k8s.kubectl("get", "service", "-n", NS, name, "-o", "jsonpath={.spec.ports[0].nodePort}").stdout)

    try:
        port = node_port("web-local")
        wait_served(the_lab, f"{the_lab.node_ip(1)}:{port}/tcp", 1)
        for i, here in ((1, {"web-1"}), (2, {"web-2", "web-3"})):
            url = f"http://{the_lab.node_ip(i)}:{port}"
            answered = hostnames(outside, f"{url}/hostname", tries=20)
            assert len(answered) == 1 and answered <= here, answered    # this node's, and always the same
            seen = outside("curl", "-s", "--max-time", "3", f"{url}/clientip")
            assert seen.stdout.strip().rsplit(":", 1)[0] == the_lab.ext_ip, seen
        port = node_port("empty")
        before = node_json(the_lab, 1, "metrics")
        started = time.monotonic()
        refused = outside("curl", "-s", "--max-time", "5", f"http://{the_lab.node_ip(1)}:{port}/")
        assert refused.returncode == 7, refused      # curl: could not connect
        assert time.monotonic() - started < 3, "refused at once, not after a timeout"
        rejects = [sum(m["packets"] for m in metrics if (m["hook"], m["outcome"]) == ("xdp_nic", "lb_reject"))
                   for metrics in (before, node_json(the_lab, 1, "metrics"))]
        assert rejects[1] > rejects[0]
    finally:
        k8s.kubectl("delete", "service", "-n", NS, "web-local", "empty")


def test_endpoint_changes_reach_the_datapath_and_no_endpoint_refuses_at_once(cluster):
    the_lab, k8s = cluster
    cluster_ip = k8s.kubectl("get", "service", "-n", NS, "web", "-o", "jsonpath={.spec.clusterIP}").stdout
    frontend = f"{cluster_ip}:80/tcp"
    web_1 = k8s.pods(NS, "app=web-1")[0]["ip"]
    k8s.kubectl("delete", "pod", "-n", NS, "web-1", "--wait=false")
    wait_served(the_lab, frontend, len(WEB) - 1)
    assert all(not b.startswith(f"{web_1}:") for i in (1, 2) for b in served(the_lab, i, frontend))
    k8s.kubectl("delete", "pod", "-n", NS, "web-2", "web-3", "--wait=false")
    wait_served(the_lab, frontend, 0)
    started = time.monotonic()
    refused = k8s.exec_in(NS, "a", "/agnhost", "connect", "--timeout=5s", f"{cluster_ip}:80")
    assert "REFUSED" in refused.stdout + refused.stderr, refused
    assert time.monotonic() - started < 4, "refused at once, not after a timeout"


FLOW_SERVERS = {1: "slflow-srv1", 2: "slflow-srv2"}
FLOW_CLIENT = "slflow-cli"


def test_agents_killed_under_traffic_to_a_service_from_the_api_lose_nothing(cluster):
    """Sequence-numbered TCP streams and UDP flows (`sluice connectivity flow`) run to a Service from the
    API whose endpoints are flow servers on both nodes (an EndpointSlice of its own, as for backends outside
    the Service's selector): from a pod on node1 to its cluster IP (socket LB), from the external client to
    node1's NodePorts (XDP LB). Both agents are killed with SIGKILL meanwhile and restarted by their
    supervisor: no datagram lost, no stream reset, no error."""
    the_lab, k8s = cluster
    cnitool = os.path.join(ROOT, "build", "cnitool")
    servers = {i: str(ipaddress.ip_network(kube.node_pod_cidr(i))[250]) for i in FLOW_SERVERS}
    flows = None
    try:
        for i, name in FLOW_SERVERS.items():
            the_lab.node_run(i, SLUICE, "connectivity", "pod-add", name, "--ip", servers[i], "--server", "flow",
                             "--cnitool", cnitool)
        the_lab.node_run(1, SLUICE, "connectivity", "pod-add", FLOW_CLIENT,
                         "--ip", str(ipaddress.ip_network(kube.node_pod_cidr(1))[251]), "--cnitool", cnitool)
        svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "flows", "namespace": NS},
               "spec": {"type": "NodePort", "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"},
                                                      {"name": "udp", "port": 53, "protocol": "UDP"}]}}
        endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": "flows-1", "namespace": NS,
                                  "labels": {"kubernetes.io/service-name": "flows"}},
                     "addressType": "IPv4",
                     "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"},
                               {"name": "udp", "port": 5353, "protocol": "UDP"}],
                     "endpoints": [{"addresses": [ip], "nodeName": f"node{i}"} for i, ip in servers.items()]}
        k8s.apply([svc, endpoints])
        found = json.loads(k8s.kubectl("get", "service", "-n", NS, "flows", "-o", "json").stdout)
        cluster_ip = found["spec"]["clusterIP"]
        tcp_port, udp_port = (p["nodePort"] for p in found["spec"]["ports"])
        wait_served(the_lab, f"{cluster_ip}:80/tcp", 2)
        wait_served(the_lab, f"{the_lab.node_ip(1)}:{udp_port}/udp", 2)
        duration = 20
        flows = {
            "pod": subprocess.Popen([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", the_lab.name,
                                     "exec", "node1", "--", SLUICE, "connectivity", "flow",
                                     "--netns", f"/run/netns/{FLOW_CLIENT}", "--tcp", f"{cluster_ip}:80",
                                     "--udp", f"{cluster_ip}:53", "--duration", str(duration)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            "outside": subprocess.Popen([os.path.join(VENV_BIN, "sluice"), "connectivity", "flow",
                                         "--netns", f"/run/netns/{the_lab.ext_ns}",
                                         "--tcp", f"{the_lab.node_ip(1)}:{tcp_port}",
                                         "--udp", f"{the_lab.node_ip(1)}:{udp_port}", "--duration", str(duration)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
        time.sleep(3)
        agents = {i: node_json(the_lab, i, "status")["agent"]["pid"] for i in FLOW_SERVERS}
        for pid in agents.values():         # the lab shares this host's PIDs
            os.kill(pid, 9)
        deadline = time.monotonic() + 60
        for i, old in agents.items():
            while True:
                status = node_json(the_lab, i, "status") if the_lab.node_run(i, SLUICE, "status", check=False) \
                    .returncode == 0 else {}
                agent = status.get("agent") or {}
                if agent.get("pid") not in (None, old) and (agent.get("kubernetes") or {}).get("synced"):
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.5)
        for where, proc in flows.items():
            out, err = proc.communicate(timeout=duration + 60)
            assert proc.returncode == 0, (where, err)
            report = json.loads(out)
            for flow in report["flows"]:
                assert flow["sent"] > duration * 50 and flow["received"] == flow["sent"], (where, flow)
                assert flow["lost"] == 0 and flow["resets"] == 0 and not flow["errors"], (where, flow)
            assert report["ok"], (where, report)
    finally:
        for proc in (flows or {}).values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        k8s.kubectl("delete", "service", "-n", NS, "flows", "--ignore-not-found")
        k8s.kubectl("delete", "endpointslice", "-n", NS, "flows-1", "--ignore-not-found")
        for i, name in (*FLOW_SERVERS.items(), (1, FLOW_CLIENT)):
            the_lab.node_run(i, SLUICE, "connectivity", "pod-del", name, "--cnitool", cnitool, check=False)


def test_the_agent_serves_what_it_last_learnt_while_the_api_server_is_away_and_resyncs(cluster):
    """node1 loses the API server (a blackhole route to it) and its agent is killed: the restarted agent
    serves the Services it last learnt, its health says the API is unreachable, and once the route is back
    it catches up with a Service created meanwhile."""
    the_lab, k8s = cluster
    k8s.apply([web_pod("web-1", "node1"), web_service()])
    running_pod(k8s, "web-1")
    cluster_ip = k8s.kubectl("get", "service", "-n", NS, "web", "-o", "jsonpath={.spec.clusterIP}").stdout
    wait_served(the_lab, f"{cluster_ip}:80/tcp", 1)
    api = f"{the_lab.cp_ip}/32"
    the_lab.node_run(1, "ip", "route", "add", "blackhole", api)
    try:
        agent = node_json(the_lab, 1, "status")["agent"]["pid"]     # the lab shares this host's PIDs
        os.kill(agent, 9)
        late = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late", "namespace": NS},
                "spec": {"selector": {"svc": "web"}, "ports": [{"port": 81, "targetPort": 8080}]}}
        k8s.apply(late)
        late_ip = k8s.kubectl("get", "service", "-n", NS, "late", "-o", "jsonpath={.spec.clusterIP}").stdout
        deadline = time.monotonic() + 60
        while True:
            status = node_json(the_lab, 1, "status") if the_lab.node_run(1, SLUICE, "status", check=False) \
                .returncode == 0 else {}
            watches = ((status.get("agent") or {}).get("kubernetes") or {}).get("watches") or {}
            if status.get("agent", {}).get("pid") not in (None, agent) and \
                    all(w.get("error") for w in watches.values()) and set(watches) == WATCHES:
                break
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert not status["agent"]["kubernetes"]["synced"]
        assert served(the_lab, 1, f"{cluster_ip}:80/tcp") == [f"{k8s.pods(NS, 'app=web-1')[0]['ip']}:8080"]
        answer = the_lab.node_run(1, "curl", "-s", "--max-time", "3", f"http://{cluster_ip}/hostname", check=False)
        assert answer.stdout.strip() == "web-1", answer
        assert served(the_lab, 1, f"{late_ip}:81/tcp") is None
    finally:
        the_lab.node_run(1, "ip", "route", "del", "blackhole", api, check=False)
    deadline = time.monotonic() + 90
    while served(the_lab, 1, f"{late_ip}:81/tcp") is None:
        assert time.monotonic() < deadline, node_json(the_lab, 1, "status")["agent"]["kubernetes"]
        time.sleep(1)
    k8s.kubectl("delete", "service", "-n", NS, "web", "late")
    k8s.kubectl("delete", "pod", "-n", NS, "web-1", "--wait=true", "--timeout=60s")


def test_the_reflector_follows_the_api_server_and_a_relist_reports_what_it_missed(cluster):
    """sluice.k8s against the lab's API server, with the agent's own credentials: LIST, then WATCH from the
    list's resourceVersion (a Service created meanwhile arrives once), and a Service deleted while nothing
    watched is reported by the next LIST."""
    _the_lab, k8s = cluster
    client = ApiClient(Kubeconfig.load(os.path.join(k8s.dir, "sluice-agent.conf")))
    changes: list[set[str]] = []
    reflector = Reflector(client, "services", "/api/v1/services", ks.service_from_api,
                          lambda _name, keys: changes.append(keys), threading.Lock(), watch_timeout=3)
    reflector.relist()
    assert "default/kubernetes" in reflector.store and reflector.synced
    probe = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "probe", "namespace": NS},
             "spec": {"ports": [{"port": 80}]}}
    k8s.apply(probe)
    reflector.watch(threading.Event())            # returns when the server ends the 3 s watch
    assert [c for c in changes if f"{NS}/probe" in c] == [{f"{NS}/probe"}]
    assert reflector.store[f"{NS}/probe"].ports[0].port == 80
    k8s.kubectl("delete", "service", "-n", NS, "probe")
    changes.clear()
    reflector.relist()
    assert changes == [{f"{NS}/probe"}] and f"{NS}/probe" not in reflector.store
    with pytest.raises(ApiError) as denied:         # the RBAC grants reads of what the agent uses only
        client.list("/api/v1/secrets")
    assert denied.value.code == 403


def test_routes_to_other_nodes_come_from_their_node_objects_when_the_inventory_lacks_them(cluster):
    """node1's state file loses its routes (as if node2 had joined the cluster after the last playbook run):
    node1 keeps routing node2's pod CIDR, from node2's Node object, and its pods still reach node2's."""
    the_lab, k8s = cluster
    path = "/etc/sluice/state.json"
    state = json.loads(the_lab.node_run(1, "cat", path).stdout)
    assert state["routes"], state

    def write(doc: dict) -> None:
        the_lab.node_run(1, "python3", "-c", f"import json, os; json.dump({doc!r}, open('{path}.new', 'w')); "
                                             f"os.replace('{path}.new', '{path}')")

    before = node_json(the_lab, 1, "status")["agent"]["last_reconcile"]
    write({**state, "routes": []})
    try:
        deadline = time.monotonic() + 30
        while node_json(the_lab, 1, "status")["agent"]["last_reconcile"] == before:
            assert time.monotonic() < deadline, "the agent did not take the new state file"
            time.sleep(0.5)
        agent = node_json(the_lab, 1, "status")["agent"]
        assert agent["last_error"] is None and not agent["kubernetes"]["conflicts"], agent
        assert node_json(the_lab, 1, "routes")[kube.node_pod_cidr(2)]["nexthop"] == the_lab.node_ip(2)
        b = k8s.pods(NS, "app=b")[0]
        answer = k8s.exec_in(NS, "a", "curl", "-s", "--max-time", "5", f"http://{b['ip']}:8080/hostname")
        assert answer.stdout.strip() == "b", answer
    finally:
        write(state)


def node_view(the_lab: lab.Lab, i: int) -> dict:
    """What Sluice holds for pods on node i: endpoint map entries, IPAM allocations, host veths, the programs
    attached to them (a cls_bpf filter, or a pinned tcx link in tc mode tcx), link pins."""
    allocations = the_lab.node_run(i, "find", "/var/lib/sluice/ipam", "-type", "f").stdout.split()
    links = json.loads(the_lab.node_run(i, "ip", "-j", "link", "show").stdout)
    pins = the_lab.node_run(i, "find", "/sys/fs/bpf/sluice/links", "-mindepth", "1", "-maxdepth", "1").stdout.split()
    return {"endpoints": {ip: e["ifindex"] for ip, e in node_json(the_lab, i, "endpoints").items()},
            "allocations": {os.path.basename(p) for p in allocations},
            "links": {(link["ifindex"], link["ifname"]) for link in links},
            "hooks": {(h["target"], h["program"], h["kind"]) for h in node_json(the_lab, i, "status")["links"]},
            "pins": set(pins)}


def test_deleting_a_pod_leaves_no_link_hook_map_entry_allocation_or_pin(cluster):
    the_lab, k8s = cluster
    empty = node_view(the_lab, 1)
    k8s.apply(pod("gone", "node1"))
    gone = running_pod(k8s, "gone")
    with_pod = node_view(the_lab, 1)
    assert set(with_pod["endpoints"]) - set(empty["endpoints"]) == {gone["ip"]}
    assert any(gone["ip"] in a for a in with_pod["allocations"] - empty["allocations"]), with_pod["allocations"]
    (veth,) = [link for link in with_pod["links"] - empty["links"] if link[0] == with_pod["endpoints"][gone["ip"]]]
    assert {h[:2] for h in with_pod["hooks"] - empty["hooks"]} == {(veth[1], "tc_from_pod")}, with_pod["hooks"]

    k8s.kubectl("delete", "pod", "-n", NS, "gone", "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 30  # kubelet tears the sandbox down (CNI DEL) after the API object is gone
    while node_view(the_lab, 1) != empty and time.monotonic() < deadline:
        time.sleep(0.5)
    assert node_view(the_lab, 1) == empty


def test_site_restarts_an_agent_whose_code_was_replaced_under_it_and_only_that_one(cluster):
    """New code installed under a running agent (here: node1's package RECORD, which lists every file with
    its hash, changed) is what the agent runs after site.yml; node2's agent, on the code it started with,
    is left running."""
    the_lab, _k8s = cluster
    before = {i: node_json(the_lab, i, "status")["agent"]["pid"] for i in (1, 2)}
    the_lab.node_run(1, "sh", "-c", "for f in /opt/sluice/venv/lib/python3*/site-packages/sluice-*.dist-info/RECORD;"
                     " do echo 'sluice/replaced.py,,' >> $f; done")
    result = playbook(the_lab, "site.yml")
    assert result.returncode == 0, result.stdout[-3000:]
    task = result.stdout.split("TASK [sluice.network.agent : Find whether the agent runs the installed code]")[1]
    task = task.split("TASK [", 1)[0]
    assert "changed: [node1]" in task and "ok: [node2]" in task, task
    after = {i: node_json(the_lab, i, "status") for i in (1, 2)}
    assert after[1]["agent"]["pid"] != before[1] and after[2]["agent"]["pid"] == before[2]
    assert after[1]["agent"]["package"] == after[1]["package"] and after[1]["agent"]["ready"]


def ansible_ping(the_lab: lab.Lab, host: str) -> subprocess.CompletedProcess:
    """A new SSH connection to `host` (no shared master that an earlier connection left)."""
    return subprocess.run([os.path.join(VENV_BIN, "ansible"), "-i", the_lab.inventory, host, "-m",
                           "ansible.builtin.ping"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False, env=dict(os.environ, ANSIBLE_SSH_ARGS="-o ControlMaster=no"))


def test_site_refuses_lockout_inputs_against_running_nodes_and_touches_nothing(cluster):
    """An inventory that would lock the operators out (a prefilter over the nodes' network, an LB VIP on a
    node's SSH port, a failsafe without SSH, pod CIDRs routed over the nodes' network): site.yml ends with
    the reason before any node changes, and SSH still answers."""
    the_lab, _k8s = cluster
    ssh_vip = [{"name": "ssh", "vip": the_lab.node_ip(1), "port": 22, "protocol": "tcp",
                "backends": [{"ip": "10.244.2.10", "port": 22}]}]
    cases = [({"sluice_prefilter": [SUBNET]},
              f"node1: sluice_prefilter[0] {SUBNET} covers node1's address {the_lab.node_ip(1)}: node1 would drop "
              "its packets at the NIC"),
             ({"sluice_lb_vips": ssh_vip},
              f"node1: sluice_lb_vips[0] (ssh) {the_lab.node_ip(1)}:22/tcp is node1's address {the_lab.node_ip(1)}"),
             ({"sluice_failsafe": ["tcp:6443"]},
              "node1: sluice_failsafe lacks tcp:22, the port Ansible reaches node1 on"),
             # Pod CIDRs over the nodes' network (node2's 192.168.64.0/19): node1's route to it would take its
             # packets to the controller and node2. Without the API's pod CIDRs, which would differ first.
             ({"sluice_kubeconfig": "", "sluice_cluster_cidr": "192.168.0.0/17", "sluice_node_cidr_prefix": 19},
              f"node1: the route to node2's pod CIDR 192.168.64.0/19 (via {the_lab.node_ip(2)}) covers node1's "
              f"address {the_lab.node_ip(1)}: node1 would send its packets to it (its answers too) to node2 instead")]
    before = {i: (the_lab.node_run(i, "cat", "/etc/sluice/state.json").stdout, node_json(the_lab, i, "routes"),
                  node_json(the_lab, i, "services")) for i in (1, 2)}
    for extra, message in cases:
        result = playbook(the_lab, "site.yml", "-e", json.dumps(extra))
        assert result.returncode != 0 and message in " ".join(result.stdout.split()), result.stdout[-3000:]
        assert "TASK [sluice.network.node" not in result.stdout, "no node was touched"
    assert {i: (the_lab.node_run(i, "cat", "/etc/sluice/state.json").stdout, node_json(the_lab, i, "routes"),
                node_json(the_lab, i, "services")) for i in (1, 2)} == before
    assert ansible_ping(the_lab, "node1").returncode == 0


def test_a_state_file_prefiltering_the_controller_and_the_control_plane_cuts_neither(cluster):
    """Past every plan check (the state file written by hand), a prefilter of node1's whole underlay, where
    the controller, the API server and the other nodes are: the failsafe keeps SSH to node1, the API
    server's connections to node1's kubelet (kubectl exec) and node1's own to the API server working,
    while everything else from there is dropped."""
    the_lab, k8s = cluster
    path = os.path.join(the_lab.node_dir(1), "root", "etc", "sluice", "state.json")
    with open(path) as f:
        doc = json.load(f)
    before = {(m["hook"], m["outcome"]): m["packets"] for m in node_json(the_lab, 1, "metrics")}

    def write(state: dict) -> None:
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    def dropped() -> bool:
        """A connection from outside to a closed port of node1 times out (28), not refused at once (7)."""
        probe = the_lab.ns_run(the_lab.ext_ns, "curl", "-s", "--max-time", "2", f"http://{the_lab.node_ip(1)}:9/",
                               check=False)
        assert probe.returncode in (7, 28), probe
        return probe.returncode == 28

    assert not dropped()
    write(dict(doc, prefilter=[*doc.get("prefilter", []), SUBNET]))
    try:
        deadline = time.monotonic() + 30
        while not dropped():
            assert time.monotonic() < deadline, "the prefilter comes in force"
        assert ansible_ping(the_lab, "node1").returncode == 0
        exec_ = k8s.exec_in(NS, "a", "true")
        assert exec_.returncode == 0, exec_.stderr
        lease = k8s.kubectl("get", "lease", "-n", "kube-node-lease", "node1", "-o",
                            "jsonpath={.spec.renewTime}").stdout
        deadline = time.monotonic() + 30
        while k8s.kubectl("get", "lease", "-n", "kube-node-lease", "node1", "-o",
                          "jsonpath={.spec.renewTime}").stdout == lease:
            assert time.monotonic() < deadline, "node1's kubelet renews its lease through the API server"
            time.sleep(1)
        after = {(m["hook"], m["outcome"]): m["packets"] for m in node_json(the_lab, 1, "metrics")}
        moved = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
        assert moved.get(("xdp_nic", "failsafe")) and moved.get(("xdp_nic", "drop_prefilter")), sorted(moved.items())
    finally:
        write(doc)
    deadline = time.monotonic() + 30
    while dropped():
        assert time.monotonic() < deadline, "the prefilter is gone again"


def agent_play(the_lab: lab.Lab, tmp_path, name: str, routes: list, *args: str) -> subprocess.CompletedProcess:
    """The agent role alone on node1, past plan.yml, node1's plan as it is with `routes`."""
    doc = json.loads(the_lab.node_run(1, "cat", "/etc/sluice/state.json").stdout)
    plan = {"node1": {"ip": doc["node"]["ip"], "pod_cidr": doc["node"]["pod_cidr"], "routes": routes}}
    play = tmp_path / f"{name}.yml"
    play.write_text(json.dumps([{"name": name, "hosts": "node1", "vars": {"sluice_cluster": plan},
                                 "roles": ["sluice.network.agent"]}]))
    # No shared SSH master: one a cut stalled would hold the later tests' connections.
    return playbook(the_lab, str(play), *args, ANSIBLE_SSH_ARGS="-o ControlMaster=no")


def test_a_route_that_would_cut_the_controller_off_is_refused_by_the_node_before_anything_changes(cluster, tmp_path):
    """Past every plan check (the agent role alone, its plan written by hand), a route to the controller's address
    through an address nobody has: node1's answers to the controller would follow it. The state module refuses
    it at once, naming the route, the network and the NIC; state file, routes and commit-confirm as they were."""
    the_lab, _k8s = cluster
    doc = json.loads(the_lab.node_run(1, "cat", "/etc/sluice/state.json").stdout)
    routes = node_json(the_lab, 1, "routes")
    nowhere = str(ipaddress.ip_address(the_lab.host_ip) + 249)
    cut = {"cidr": f"{the_lab.host_ip}/32", "nexthop": nowhere, "node": "nowhere"}
    started = time.monotonic()
    result = agent_play(the_lab, tmp_path, "cut", doc["routes"] + [cut], "-e", "agent_confirm_timeout=20")
    assert result.returncode != 0, result.stdout[-3000:]
    assert f"invalid desired state: routes ({the_lab.host_ip}/32): overlaps {SUBNET}, a network directly connected " \
           f"to eth0" in " ".join(result.stdout.split()), result.stdout[-3000:]
    assert time.monotonic() - started < 120
    assert json.loads(the_lab.node_run(1, "cat", "/etc/sluice/state.json").stdout) == doc
    assert node_json(the_lab, 1, "routes") == routes
    assert node_json(the_lab, 1, "status")["agent"]["pending_confirm"] is None
    assert not the_lab.node_run(1, "ip", "route", "show", f"{the_lab.host_ip}/32").stdout.strip()
    assert ansible_ping(the_lab, "node1").returncode == 0


def ssh_answers(the_lab: lab.Lab, i: int) -> bool:
    """Whether node i's SSH port answers the controller (a prefilter drops the SYN: no answer)."""
    try:
        socket.create_connection((the_lab.node_ip(i), 22), timeout=3).close()
    except OSError:
        return False
    return True


def test_a_hand_edit_that_cuts_the_controller_off_is_reverted_by_the_agent(cluster, tmp_path):
    """What no plan or validation can foresee, written by hand past the state module (no commit-confirm armed):
    a state file whose failsafe leaves SSH out and whose prefilter holds the controller's address. node1's agent
    arms the change itself (agent_hand_edit_confirm_timeout, here 20 s) and applies it: SSH from the controller
    is dropped; unconfirmed, the agent restores and applies the state before it: SSH answers again, the state
    file and the prefilter as they were."""
    the_lab, _k8s = cluster
    doc = json.loads(the_lab.node_run(1, "cat", "/etc/sluice/state.json").stdout)
    setting = agent_play(the_lab, tmp_path, "hand-edit-timeout", doc["routes"], "-e",
                         "agent_hand_edit_confirm_timeout=20")
    assert setting.returncode == 0, setting.stdout[-3000:]
    assert json.loads(the_lab.node_run(1, "cat", "/etc/sluice/agent.json").stdout)["hand_edit_confirm_timeout"] == 20
    deadline = time.monotonic() + 10   # the role's confirmation reaches the agent's health at its next poll
    while (agent := node_json(the_lab, 1, "status")["agent"])["pending_confirm"] is not None:
        assert time.monotonic() < deadline, agent
        time.sleep(0.5)
    earlier_revert = agent.get("last_revert")
    filters = {m: node_json(the_lab, 1, "status")["maps"][m]["entries"] for m in ("sl_prefilter", "sl_failsafe_ports")}
    assert ssh_answers(the_lab, 1)

    cut = dict(doc, failsafe=[f for f in DEFAULT_FAILSAFE if f != "tcp:22"],
               prefilter=[*doc.get("prefilter", []), f"{the_lab.host_ip}/32"])
    the_lab.node_run(1, "python3", "-c", f"import json, os; json.dump({cut!r}, open('/etc/sluice/state.json.new', 'w'));"
                                         " os.replace('/etc/sluice/state.json.new', '/etc/sluice/state.json')")
    deadline = time.monotonic() + 15
    while not (node_json(the_lab, 1, "status")["agent"]["pending_confirm"] or {}).get("hand_edit"):
        assert time.monotonic() < deadline, node_json(the_lab, 1, "status")["agent"]
        time.sleep(0.5)
    assert not ssh_answers(the_lab, 1), "the hand edit cuts SSH from the controller off"
    deadline = time.monotonic() + 60
    while (revert := node_json(the_lab, 1, "status")["agent"].get("last_revert")) == earlier_revert:
        assert time.monotonic() < deadline, node_json(the_lab, 1, "status")["agent"]
        time.sleep(1)
    assert revert["hand_edit"] and revert["restored"], revert
    assert json.loads(the_lab.node_run(1, "cat", "/etc/sluice/state.json").stdout) == doc
    assert {m: node_json(the_lab, 1, "status")["maps"][m]["entries"] for m in filters} == filters
    assert ssh_answers(the_lab, 1)
    ping = ansible_ping(the_lab, "node1")
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_site_refuses_nodes_whose_kubernetes_pod_cidr_differs_and_touches_nothing(cluster):
    the_lab, _k8s = cluster
    before = {i: node_json(the_lab, i, "routes") for i in (1, 2)}
    # /25s: the inventory would plan node1 10.244.0.128/25, Kubernetes gave it 10.244.1.0/24.
    result = playbook(the_lab, "site.yml", "-e", "sluice_node_cidr_prefix=25")
    assert result.returncode != 0
    assert re.search(r"node1: Kubernetes gave Node 'node1' the pod CIDR 10\.244\.1\.0/24, the inventory plans "
                     r"10\.244\.0\.128/25: set sluice_pod_cidr: 10\.244\.1\.0/24 for node1", result.stdout), \
        result.stdout[-3000:]
    assert {i: node_json(the_lab, i, "routes") for i in (1, 2)} == before


def test_lab_teardown_leaves_nothing(cluster):
    the_lab, _k8s = cluster
    daemons = {key: (rec["pid"], rec["start"]) for key, rec in the_lab.state["daemons"].items()}
    assert {k.split("/")[1] for k in daemons} >= {"etcd", "kube-apiserver", "containerd", "kubelet"}
    shims = [pid for pid in lab.all_pids() if lab.comm(pid).startswith("containerd-shim")
             and lab.ns_inode(f"/proc/{pid}/ns/net") == lab.ns_inode(f"/run/netns/{the_lab.node_ns(1)}")]
    assert shims, "no containerd-shim runs in node1"
    cgroups = [the_lab.cgroup, *the_lab.state["cgroup_v1"]]
    assert all(os.path.isdir(c) for c in cgroups)
    down = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", the_lab.name, "down"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    for key, (pid, start) in daemons.items():
        assert lab.process_start_time(pid) != start, f"{key} still runs"
    assert not [pid for pid in shims if lab.process_start_time(pid) is not None]
    assert not [c for c in cgroups if os.path.exists(c)]
    netns = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert not re.search(rf"^{the_lab.name}-", netns, re.M), netns
    with open("/proc/self/mountinfo") as f:
        assert the_lab.name not in f.read()
    assert not os.path.exists(the_lab.state_dir)  # etcd's data, each node's containerd and kubelet state
