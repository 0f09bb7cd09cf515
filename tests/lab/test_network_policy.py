"""NetworkPolicy on a Kubernetes lab cluster (two nodes, Sluice installed by playbooks/site.yml): policies created
with kubectl allow and deny as the API defines them, same node and across nodes (native, then VXLAN), to a pod
directly and through a Service's ClusterIP (after the socket LB chose the backend), from outside through a
NodePort (ipBlock), and from pods to the outside (another node's kubelet; a pod's own node is always
reachable); `sluice policy POD` shows what the agent resolved and the drops it counted, and the Prometheus
endpoint exports them; an established connection keeps flowing across an agent kill -9 (the restart rewrites
nothing) and a datapath upgrade. The tests run in file order on one lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from k8s_cluster import ROOT, converged_cluster, playbook  # noqa: E402  pylint: disable=wrong-import-position
import images  # noqa: E402  pylint: disable=wrong-import-position
import kube  # noqa: E402  pylint: disable=wrong-import-position
import lab  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.kernel
SUBNET = "192.168.93.0/24"
SLUICE = "/opt/sluice/venv/bin/sluice"
SERVER_NS, CLIENT_NS = "slnp-server", "slnp-client"
# (namespace, name, node, labels)
PODS = [(SERVER_NS, "server", "node1", {"app": "server"}),
        (SERVER_NS, "near", "node1", {"app": "near", "role": "client"}),      # same node, same namespace
        (SERVER_NS, "far", "node2", {"app": "far"}),                           # other node, same namespace
        (CLIENT_NS, "client", "node2", {"app": "client", "role": "client"})]   # other node, other namespace


@pytest.fixture(scope="module")
def cluster():
    with converged_cluster("slnp", SUBNET) as (the_lab, k8s):
        k8s.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SERVER_NS, "labels": {"team": "s"}}},
                   {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CLIENT_NS, "labels": {"team": "c"}}},
                   *(pod(*p) for p in PODS), server_service()])
        for ns, pod_name, _node, _labels in PODS:
            k8s.kubectl("wait", "-n", ns, "--for=condition=Ready", f"pod/{pod_name}", "--timeout=180s")
        yield the_lab, k8s


def pod(ns: str, name: str, node: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": images.AGNHOST, "imagePullPolicy": "Never",
                                     "args": ["netexec", "--http-port=8080", "--udp-port=8081"],
                                     "ports": [{"name": "http", "containerPort": 8080},
                                               {"name": "dns-ish", "containerPort": 8081, "protocol": "UDP"}]}]}}


def server_service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": SERVER_NS},
            "spec": {"type": "NodePort", "selector": {"app": "server"}, "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def ip_of(k8s: kube.Cluster, ns: str, name: str) -> str:
    return k8s.kubectl("get", "pod", "-n", ns, name, "-o", "jsonpath={.status.podIP}").stdout


def reaches(k8s: kube.Cluster, ns: str, name: str, target: str, proto: str = "tcp") -> bool:
    """Whether pod ns/name connects to target (host:port), agnhost's own client, 2 s at most."""
    got = k8s.exec_in(ns, name, "/agnhost", "connect", "--timeout=2s", f"--protocol={proto}", target)
    if proto == "udp":      # agnhost's UDP connect only sends; ask the server instead
        got = k8s.exec_in(ns, name, "sh", "-c", f"echo hostname | nc -u -w 2 {target.replace(':', ' ')}")
        return bool(got.stdout.strip())
    return got.returncode == 0


def wait_for(predicate, timeout: float = 15.0) -> bool:
    """NetworkPolicy is applied asynchronously, as with every implementation: poll until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def policy(name: str, spec: dict, ns: str = SERVER_NS) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def explain(the_lab: lab.Lab, node: int, pod_key: str) -> dict:
    return json.loads(the_lab.node_run(node, SLUICE, "--json", "policy", pod_key).stdout)


def test_without_policy_every_path_is_open(cluster):
    _the_lab, k8s = cluster
    server = ip_of(k8s, SERVER_NS, "server")
    for ns, name in ((SERVER_NS, "near"), (SERVER_NS, "far"), (CLIENT_NS, "client")):
        assert reaches(k8s, ns, name, f"{server}:8080"), name


def test_default_deny_refuses_every_pod_same_node_and_across_and_is_counted(cluster):
    the_lab, k8s = cluster
    server = ip_of(k8s, SERVER_NS, "server")
    k8s.apply(policy("deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    assert wait_for(lambda: not reaches(k8s, SERVER_NS, "near", f"{server}:8080"))
    assert not reaches(k8s, CLIENT_NS, "client", f"{server}:8080")
    shown = explain(the_lab, 1, f"{SERVER_NS}/server")
    assert "ingress" in json.dumps(shown["isolated"]).lower(), shown
    assert shown["drops"]["ingress"] >= 2, shown
    metrics = the_lab.node_run(1, "curl", "-s", "http://127.0.0.1:9962/metrics").stdout
    assert f'sluice_policy_drops_total{{pod="{SERVER_NS}/server",direction="ingress"}}' in metrics


def test_an_allow_by_namespace_and_pod_labels_on_a_named_port_opens_only_that(cluster):
    the_lab, k8s = cluster
    server = ip_of(k8s, SERVER_NS, "server")
    k8s.apply(policy("allow-clients", {
        "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "c"}},
                               "podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": "http"}]}]}))
    assert wait_for(lambda: reaches(k8s, CLIENT_NS, "client", f"{server}:8080"))     # across nodes
    assert not reaches(k8s, SERVER_NS, "near", f"{server}:8080")    # role=client, but not in a team=c namespace
    assert not reaches(k8s, SERVER_NS, "far", f"{server}:8080")
    assert not reaches(k8s, CLIENT_NS, "client", f"{server}:8081", "udp")   # the named port is TCP 8080 only
    shown = json.dumps(explain(the_lab, 1, f"{SERVER_NS}/server"))
    assert "allow-clients" in shown and f"{CLIENT_NS}/client" in shown, shown


def test_a_service_cluster_ip_is_judged_on_the_backend_the_socket_lb_chose(cluster):
    _the_lab, k8s = cluster
    cluster_ip = k8s.kubectl("get", "service", "-n", SERVER_NS, "server", "-o", "jsonpath={.spec.clusterIP}").stdout
    assert wait_for(lambda: reaches(k8s, CLIENT_NS, "client", f"{cluster_ip}:80"))
    assert not reaches(k8s, SERVER_NS, "far", f"{cluster_ip}:80")


def test_an_ip_block_admits_outside_clients_through_a_node_port(cluster):
    the_lab, k8s = cluster
    port = k8s.kubectl("get", "service", "-n", SERVER_NS, "server", "-o", "jsonpath={.spec.ports[0].nodePort}").stdout
    url = f"http://{the_lab.node_ip(1)}:{port}/hostname"

    def outside() -> bool:
        return the_lab.ns_run(the_lab.ext_ns, "curl", "-s", "--max-time", "2", url, check=False).stdout == "server"

    assert not outside()       # deny-all; externalTrafficPolicy Local keeps the client's address
    k8s.apply(policy("allow-outside", {
        "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": SUBNET, "except": [f"{the_lab.node_ip(2)}/32"]}}]}]}))
    assert wait_for(outside)


def test_egress_isolation_keeps_a_pod_to_what_its_policy_allows(cluster):
    the_lab, k8s = cluster
    server, far = ip_of(k8s, SERVER_NS, "server"), ip_of(k8s, SERVER_NS, "far")
    kubelet = f"{the_lab.node_ip(1)}:10250"        # outside the pod network: another node's kubelet
    assert reaches(k8s, CLIENT_NS, "client", kubelet)
    k8s.apply(policy("client-egress", {
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "s"}},
                            "podSelector": {"matchLabels": {"app": "server"}}}]}]}, ns=CLIENT_NS))
    assert wait_for(lambda: not reaches(k8s, CLIENT_NS, "client", f"{far}:8080"))
    assert reaches(k8s, CLIENT_NS, "client", f"{server}:8080")
    assert not reaches(k8s, CLIENT_NS, "client", kubelet)
    assert reaches(k8s, CLIENT_NS, "client", f"{the_lab.node_ip(2)}:10250")     # its own node, always


def kept_alive_flow(k8s: kube.Cluster, requests: int, rate: str) -> subprocess.Popen:
    """One kept-alive TCP connection (curl reuses it) from the client to the server carrying `requests`
    requests at `rate`, across isolated ends (the client's egress, the server's ingress)."""
    url = f"http://{ip_of(k8s, SERVER_NS, 'server')}:8080/hostname"
    return subprocess.Popen([f"{k8s.bin}/kubectl", f"--kubeconfig={k8s.admin_conf}", "exec", "-n", CLIENT_NS,
                             "client", "--", "curl", "-s", "--rate", rate, "-w", "%{http_code} %{num_connects}\\n",
                             *["-o", "/dev/null", url] * requests],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_connection_answered_throughout(flow: subprocess.Popen, requests: int) -> None:
    out, err = flow.communicate(timeout=300)
    assert flow.returncode == 0, (out, err)
    answers = [line.split() for line in out.splitlines()]
    assert [code for code, _connects in answers] == ["200"] * requests, out
    assert sum(int(connects) for _code, connects in answers) == 1, "one connection throughout"


def test_an_established_connection_survives_an_agent_kill_and_the_restart_rewrites_nothing(cluster):
    the_lab, k8s = cluster
    # The server node's agent is killed after 3 s and restarted by its supervisor.
    flow = kept_alive_flow(k8s, 12, "1/s")
    before = explain(the_lab, 1, f"{SERVER_NS}/server")
    time.sleep(3)
    agent = json.loads(the_lab.node_run(1, SLUICE, "--json", "status").stdout)["agent"]["pid"]
    os.kill(agent, 9)       # the lab shares this host's PIDs
    assert_one_connection_answered_throughout(flow, 12)
    deadline = time.monotonic() + 60
    while True:
        status = json.loads(the_lab.node_run(1, SLUICE, "--json", "status").stdout)["agent"]
        policy_health = (status.get("kubernetes") or {}).get("network_policy") or {}
        if status.get("pid") not in (None, agent) and policy_health.get("synced"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    after = explain(the_lab, 1, f"{SERVER_NS}/server")
    assert (after["identity"], after["ingress"]) == (before["identity"], before["ingress"])


def test_an_established_connection_survives_a_datapath_upgrade(cluster, tmp_path):
    the_lab, _k8s = cluster
    k8s = cluster[1]
    objects = str(tmp_path / "v2")
    built = subprocess.run(["make", "-s", "--no-print-directory", "-C", ROOT, "bpf", f"BPF_OUT={objects}",
                            "SL_DATAPATH_VERSION=2"], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    flow = kept_alive_flow(k8s, 400, "2/s")
    upgrade = playbook(the_lab, "upgrade.yml", "-e", f"datapath_objects_src={objects}")
    assert upgrade.returncode == 0, upgrade.stdout[-4000:]
    assert flow.poll() is None, "the flow must outlast the upgrade to show anything"
    assert_one_connection_answered_throughout(flow, 400)
    shown = explain(the_lab, 1, f"{SERVER_NS}/server")
    assert shown["isolated"], shown


def test_over_vxlan_the_same_policies_hold_across_nodes(cluster):
    """The remote pod's identity comes from the receiving node's ipcache, whatever carries the packet."""
    the_lab, k8s = cluster
    vxlan = playbook(the_lab, "site.yml", "-e", "sluice_routing_mode=vxlan")
    assert vxlan.returncode == 0, vxlan.stdout[-4000:]
    server = ip_of(k8s, SERVER_NS, "server")
    before = json.loads(the_lab.node_run(1, SLUICE, "--json", "metrics").stdout)
    assert wait_for(lambda: reaches(k8s, CLIENT_NS, "client", f"{server}:8080"))     # allow-clients
    assert not reaches(k8s, SERVER_NS, "far", f"{server}:8080")                       # deny-all
    after = json.loads(the_lab.node_run(1, SLUICE, "--json", "metrics").stdout)

    def counted(metrics: list, outcome: str) -> int:
        return sum(m["packets"] for m in metrics if (m["hook"], m["outcome"]) == ("tc_from_nic", outcome))

    assert counted(after, "redirect_peer") > counted(before, "redirect_peer")     # decapsulated, delivered
    assert counted(after, "drop_policy_ingress") > counted(before, "drop_policy_ingress")
