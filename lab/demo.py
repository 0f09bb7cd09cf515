"""`make demo`: the whole Sluice story on the local lab, with the real playbooks.

1. bring up the lab: a Kubernetes cluster of three nodes (kubelet and containerd in each node's own namespaces,
   reached over SSH, no kube-proxy), its control plane, and an external client
2. converge it with playbooks/site.yml, then again: the second run must change nothing; Sluice becomes the
   cluster's CNI and every node turns Ready
3. run the connectivity suite (playbooks/verify.yml): pods made through the CNI plugin,
   every datapath feature checked by outcome and by the eBPF counters it moved
4. switch the inventory to VXLAN routing, re-converge, check pods across nodes, switch back
5. remove a service from (a copy of) the inventory, re-converge, check its VIP no longer
   answers, and converge the real inventory again
6. Kubernetes: a Deployment spread over three nodes, pods reaching each other across nodes through Sluice's
   path (counters), pods deleted and recreated with new addresses still talking, and their NodePort Service
   served by Sluice from the API (no kube-proxy): by DNS name from a pod, its ClusterIP from a node, its
   NodePort from the external client
7. NetworkPolicy by kubectl: the echo pods isolated (default deny) but for clients labelled role=client; a
   labelled and an unlabelled pod try every echo pod, the refusals counted per pod by the datapath; the
   policies are deleted again and everything answers
8. print a table of every check with the datapath path it took

Logs of every step are in build/demo/. The lab stays up for inspection.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "lab"))

import images  # noqa: E402  pylint: disable=wrong-import-position
import kube  # noqa: E402  pylint: disable=wrong-import-position
import lab  # noqa: E402  pylint: disable=wrong-import-position

OUT = os.path.join(REPO, "build", "demo")
VENV_BIN = os.path.join(REPO, ".venv", "bin")
LAB_INVENTORY = os.path.join(REPO, "inventory", "lab")
NODES = os.environ.get("LAB_NODES", "3")
REMOVED_SERVICE = "legacy"
SLUICE = "/opt/sluice/venv/bin/sluice"
DEMO_NS = "sluice-demo"
API_STATE = "(what the API shows)"
ECHO = "demo-echo"


class DemoFailed(Exception):
    pass


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_logged(name: str, argv: list[str]) -> tuple[str, float]:
    """Run a command with its output in build/demo/<name>.log; (output, seconds)."""
    log = os.path.join(OUT, f"{name}.log")
    started = time.monotonic()
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", ANSIBLE_FORCE_COLOR="0")
    with open(log, "w") as f:
        result = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    with open(log) as f:
        output = f.read()
    if result.returncode != 0:
        raise DemoFailed(f"{' '.join(argv[:2])} failed ({result.returncode}); see {os.path.relpath(log, REPO)}:\n"
                         + "\n".join(output.splitlines()[-25:]))
    return output, seconds


def playbook(name: str, playbook_file: str, *args: str) -> tuple[dict, float]:
    """Run a playbook; ({host: changed count}, seconds)."""
    output, seconds = run_logged(name, [os.path.join(VENV_BIN, "ansible-playbook"),
                                        os.path.join("playbooks", playbook_file), *args])
    changed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.M)}
    return changed, seconds


def converge(name: str, *args: str) -> None:
    changed, seconds = playbook(name, "site.yml", *args)
    print(f"   site.yml: {seconds:.0f} s, changed: "
          + ", ".join(f"{h}={c}" for h, c in sorted(changed.items()) if h != "localhost"), flush=True)
    return changed


def verify(name: str, *args: str) -> list[dict]:
    report = os.path.join(OUT, f"{name}.json")
    _changed, seconds = playbook(name, "verify.yml", "-e", f"sluice_verify_report={report}", *args)
    with open(report) as f:
        checks = json.load(f)["checks"]
    print(f"   verify.yml: {seconds:.0f} s, {sum(c['passed'] for c in checks)}/{len(checks)} checks passed",
          flush=True)
    return checks


def inventory_without_service(service: str) -> tuple[str, dict]:
    """A copy of the lab inventory without `service`; (its hosts.yml, the removed service)."""
    copy = os.path.join(OUT, "inventory-service-removed")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(LAB_INVENTORY, copy, symlinks=True)
    group_vars = os.path.join(copy, "group_vars", "sluice_nodes.yml")
    with open(group_vars) as f:
        data = yaml.safe_load(f)
    removed = [s for s in data["sluice_services"] if s["name"] == service]
    if not removed:
        raise DemoFailed(f"the lab inventory has no service named {service!r} to remove")
    data["sluice_services"] = [s for s in data["sluice_services"] if s["name"] != service]
    with open(group_vars, "w") as f:
        f.write("---\n# The lab inventory with the service '" + service + "' removed (lab/demo.py).\n")
        yaml.safe_dump(data, f, sort_keys=False)
    return os.path.join(copy, "hosts.yml"), removed[0]


# --- Kubernetes -------------------------------------------------------------------------------

def echo_manifests(replicas: int) -> list[dict]:
    """agnhost netexec pods, one per node (kubelet creates them through containerd and Sluice's plugin), and a
    NodePort Service in front of them."""
    labels = {"app": ECHO}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NS}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": ECHO, "namespace": DEMO_NS},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                     "whenUnsatisfiable": "DoNotSchedule",
                                                     "labelSelector": {"matchLabels": labels}}],
                      "terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "echo", "image": images.AGNHOST, "imagePullPolicy": "Never",
                                      "args": ["netexec", "--http-port=8080"],
                                      "ports": [{"containerPort": 8080}],
                                      "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                                         "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": ECHO, "namespace": DEMO_NS},
         "spec": {"type": "NodePort", "selector": labels,
                  "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
    ]


def node_metrics(the_lab: lab.Lab, node: str) -> dict:
    out = the_lab.node_run(int(node.removeprefix("node")), SLUICE, "--json", "metrics").stdout
    return {(m["hook"], m["outcome"]): m["packets"] for m in json.loads(out)}


def cross_node_checks(cluster: kube.Cluster, the_lab: lab.Lab, phase: str) -> list[dict]:
    """Every echo pod asks every echo pod on another node for its name, over Sluice's native path: the
    sender's tc_from_pod redirects out of the NIC, the receiver's tc_from_nic into the pod."""
    pods = cluster.pods(DEMO_NS, f"app={ECHO}")
    nodes = sorted({p["node"] for p in pods})
    checks = []
    for a in pods:
        for b in pods:
            if a["node"] == b["node"]:
                continue
            before = {n: node_metrics(the_lab, n) for n in (a["node"], b["node"])}
            answer = cluster.exec_in(DEMO_NS, a["name"], "curl", "-s", "--max-time", "5",
                                     f"http://{b['ip']}:8080/hostname")
            after = {n: node_metrics(the_lab, n) for n in (a["node"], b["node"])}
            path = [{"node": a["node"], "hook": "tc_from_pod", "outcomes": ["redirect_neigh"]},
                    {"node": b["node"], "hook": "tc_from_nic", "outcomes": ["redirect_peer"]}]
            for p in path:
                key = (p["hook"], p["outcomes"][0])
                moved = after[p["node"]].get(key, 0) - before[p["node"]].get(key, 0)
                p["by_outcome"] = {p["outcomes"][0]: moved} if moved else {}
            reasons = []
            if answer.stdout.strip() != b["name"]:
                reasons.append(f"{b['ip']}:8080 answered {answer.stdout.strip() or answer.stderr.strip()!r}, "
                               f"not {b['name']!r}")
            reasons += [f"{p['node']} {p['hook']}/{p['outcomes'][0]} counted nothing" for p in path
                        if not p["by_outcome"]]
            checks.append({"name": f"{phase}: {a['name']} ({a['node']}) -> {b['ip']} ({b['node']})",
                           "passed": not reasons, "reasons": reasons, "path": path})
    if len(nodes) < 3:
        checks.append({"name": f"{phase}: pods on three nodes", "passed": False, "path": [], "path_text": API_STATE,
                       "reasons": [f"the Deployment's pods run on {nodes}"]})
    return checks


def pod_cidr_checks(cluster: kube.Cluster) -> list[dict]:
    """Each pod's address is inside the pod CIDR Kubernetes gave its node (which plan.yml checked is Sluice's)."""
    cidr = {name: n["spec"]["podCIDR"] for name, n in cluster.nodes().items()}
    checks = []
    for p in cluster.pods(DEMO_NS, f"app={ECHO}"):
        inside = ipaddress.ip_address(p["ip"]) in ipaddress.ip_network(cidr[p["node"]])
        checks.append({"name": f"pod-address-in-node-cidr: {p['name']} {p['ip']} in {p['node']}'s {cidr[p['node']]}",
                       "passed": inside, "path": [], "path_text": API_STATE,
                       "reasons": [] if inside else ["outside its node's pod CIDR"]})
    return checks


def kubernetes_demo(the_lab: lab.Lab) -> list[dict]:
    cluster = kube.Cluster(the_lab)
    cluster.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=180s")
    nodes = cluster.kubectl("get", "nodes", "-o", "wide").stdout
    print("   every node Ready (Sluice is the CNI; no kube-proxy):\n" + "\n".join("     " + l for l in nodes.splitlines()))
    cluster.apply(echo_manifests(replicas=3))
    cluster.kubectl("rollout", "status", "-n", DEMO_NS, f"deployment/{ECHO}", "--timeout=180s")
    old = cluster.pods(DEMO_NS, f"app={ECHO}")
    print("   Deployment demo-echo: " + ", ".join(f"{p['name']} {p['ip']} on {p['node']}" for p in old))
    checks = pod_cidr_checks(cluster) + cross_node_checks(cluster, the_lab, "pods")

    cluster.kubectl("delete", "pods", "-n", DEMO_NS, "-l", f"app={ECHO}", "--wait=true")
    cluster.kubectl("rollout", "status", "-n", DEMO_NS, f"deployment/{ECHO}", "--timeout=180s")
    new = cluster.pods(DEMO_NS, f"app={ECHO}")
    print("   recreated:              " + ", ".join(f"{p['name']} {p['ip']} on {p['node']}" for p in new))
    reused = {p["ip"] for p in old} & {p["ip"] for p in new}
    checks.append({"name": "recreated pods have new addresses", "passed": not reused, "path": [], "path_text": API_STATE,
                   "reasons": [f"addresses reused: {sorted(reused)}"] if reused else []})
    checks += cross_node_checks(cluster, the_lab, "recreated pods")

    service = json.loads(cluster.kubectl("get", "service", "-n", DEMO_NS, ECHO, "-o", "json").stdout)
    slices = json.loads(cluster.kubectl("get", "endpointslices", "-n", DEMO_NS, "-l",
                                        f"kubernetes.io/service-name={ECHO}", "-o", "json").stdout)["items"]
    endpoints = sorted(a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"])
    listed = endpoints == sorted(p["ip"] for p in new)
    checks.append({"name": "service-endpointslice-lists-the-pods", "passed": listed, "path": [], "path_text": API_STATE,
                   "reasons": [] if listed else [f"EndpointSlice lists {endpoints}"]})
    vip, node_port = service["spec"]["clusterIP"], service["spec"]["ports"][0]["nodePort"]
    print(f"   Service {ECHO}: ClusterIP {vip}:80, NodePort {node_port}, EndpointSlice {', '.join(endpoints)}")
    pods = {p["name"] for p in new}
    client = new[0]["name"]
    probes = [(f"service-by-dns-from-pod {client}: {ECHO}.{DEMO_NS}.svc -> every pod",
               lambda *argv: cluster.exec_in(DEMO_NS, client, *argv), f"http://{ECHO}.{DEMO_NS}.svc.cluster.local/hostname",
               "socket LB (connect4) in the client pod's node: CoreDNS via the kube-dns ClusterIP, then the ClusterIP"),
              (f"service-clusterip-from-node1: {vip}:80 -> every pod",
               lambda *argv: the_lab.node_run(1, *argv, check=False), f"http://{vip}/hostname",
               "socket LB (connect4) on node1")]
    probes += [(f"service-nodeport-from-outside: {the_lab.node_ip(i)}:{node_port} -> every pod",
                lambda *argv: the_lab.ns_run(the_lab.ext_ns, *argv, check=False),
                f"http://{the_lab.node_ip(i)}:{node_port}/hostname", f"XDP LB on node{i}'s NIC")
               for i in range(1, int(NODES) + 1)]
    for name, run, url, path in probes:
        seen = set()
        for _attempt in range(40):
            answer = run("curl", "-s", "--max-time", "3", url)
            seen.add(answer.stdout.strip() if answer.returncode == 0 else f"(curl exit {answer.returncode})")
            if seen >= pods:
                break
        passed = seen == pods
        checks.append({"name": name, "passed": passed, "path": [], "path_text": path,
                       "reasons": [] if passed else [f"answered by {sorted(seen)}"]})
    print("   Services come from the API (no kube-proxy): ClusterIP by DNS name from a pod, from a node, and the\n"
          "   NodePort on every node from the external client each reached every pod.")
    return checks


def policy_demo(the_lab: lab.Lab) -> list[dict]:
    cluster = kube.Cluster(the_lab)
    echo = cluster.pods(DEMO_NS, f"app={ECHO}")
    clients = {"demo-client": {"app": "demo-client", "role": "client"}, "demo-stranger": {"app": "demo-stranger"}}
    cluster.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": DEMO_NS, "labels": labels},
                    "spec": {"nodeName": echo[0]["node"], "terminationGracePeriodSeconds": 1,
                             "containers": [{"name": "c", "image": images.AGNHOST, "imagePullPolicy": "Never",
                                             "args": ["pause"]}]}} for name, labels in clients.items()])
    for name in clients:
        cluster.kubectl("wait", "-n", DEMO_NS, "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
    policies = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "echo-default-deny", "namespace": DEMO_NS},
                 "spec": {"podSelector": {"matchLabels": {"app": ECHO}}, "policyTypes": ["Ingress"]}},
                {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "echo-from-clients", "namespace": DEMO_NS},
                 "spec": {"podSelector": {"matchLabels": {"app": ECHO}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                       "ports": [{"port": 8080}]}]}}]
    cluster.apply(policies)
    print("   NetworkPolicies echo-default-deny and echo-from-clients (TCP 8080 from role=client) applied")
    checks = []

    def probe(client: str, target: dict) -> bool:
        got = cluster.exec_in(DEMO_NS, client, "/agnhost", "connect", "--timeout=2s", f"{target['ip']}:8080")
        return got.returncode == 0

    def converged(client: str, target: dict, want: bool) -> bool:
        for _attempt in range(10):     # policies reach the datapath asynchronously, as with every implementation
            if probe(client, target) == want:
                return True
            time.sleep(0.5)
        return False

    for client, want in (("demo-client", True), ("demo-stranger", False)):
        for target in echo:
            ok = converged(client, target, want)
            where = "same node" if target["node"] == echo[0]["node"] else "across nodes"
            checks.append({"name": f"policy: {client} -> {target['name']} ({where}) "
                                   f"{'allowed' if want else 'refused'}", "passed": ok, "path": [],
                           "path_text": "tc_from_pod egress / sl_deliver_local ingress: sl_ct, sl_policy",
                           "reasons": [] if ok else [f"{'refused' if want else 'answered'}, not as the policies say"]})
    node = int(echo[1]["node"].removeprefix("node"))
    shown = json.loads(the_lab.node_run(node, SLUICE, "--json", "policy", f"{DEMO_NS}/{echo[1]['name']}").stdout)
    print(f"   sluice policy {DEMO_NS}/{echo[1]['name']} on {echo[1]['node']}: identity {shown.get('identity')}, isolated "
          f"{shown.get('isolated')}, ingress drops {shown.get('drops', {}).get('ingress')}")
    counted = shown.get("drops", {}).get("ingress", 0) > 0
    checks.append({"name": f"policy: drops counted for {echo[1]['name']} (sluice policy)", "passed": counted,
                   "path": [], "path_text": "sl_policy_drops", "reasons": [] if counted else [json.dumps(shown)]})
    cluster.kubectl("delete", "networkpolicy", "-n", DEMO_NS, "echo-default-deny", "echo-from-clients")
    ok = all(converged("demo-stranger", target, True) for target in echo)
    checks.append({"name": "policy: deleted, demo-stranger reaches every echo pod again", "passed": ok, "path": [],
                   "path_text": "sl_policy_isolation emptied", "reasons": [] if ok else ["still refused"]})
    cluster.kubectl("delete", "pod", "-n", DEMO_NS, *clients, "--wait=false")
    return checks


def path_taken(check: dict) -> str:
    steps = [f"{s['node']} {s['hook']}/" + ", ".join(f"{o} +{n}" for o, n in s["by_outcome"].items())
             if s["by_outcome"] else f"{s['node']} {s['hook']}/{'|'.join(s['outcomes'])} +0" for s in check["path"]]
    return "; ".join(steps) or check.get("path_text", "(nothing may answer)")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths)), *(line.format(*r) for r in rows)])


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    results: list[tuple[str, dict]] = []
    try:
        step(f"1. Lab: a Kubernetes cluster of {NODES} nodes (each its own network/mount namespace with sshd, "
             "containerd and kubelet; no kube-proxy), its control plane, and an external client")
        run_logged("lab-up", [os.path.join(VENV_BIN, "python"), "lab/lab.py", "up", "--kubernetes", "--nodes", NODES])
        the_lab = lab.Lab(lab.DEFAULT_NAME)
        print(f"   lab is up (inventory/lab/hosts.yml; kubectl --kubeconfig {kube.Cluster(the_lab).admin_conf})")

        step("2. Converge with playbooks/site.yml, then again (must change nothing): Sluice becomes the cluster's CNI")
        converge("site-1")
        second = converge("site-2")
        if any(second.values()):
            raise DemoFailed(f"the second site.yml run changed something: {second}; see build/demo/site-2.log")
        print("   idempotent: changed=0 everywhere")

        step("3. Connectivity suite (native routing)")
        results += [("native", c) for c in verify("verify-native")]

        step("4. VXLAN routing: re-converge with sluice_routing_mode=vxlan, check pods across nodes, switch back")
        converge("site-vxlan", "-e", "sluice_routing_mode=vxlan")
        results += [("vxlan", c) for c in verify("verify-vxlan", "-e", "sluice_routing_mode=vxlan",
                                                 "-e", '{"sluice_verify_only": ["pod-to-pod-cross-node-vxlan"]}')]
        converge("site-native")

        step(f"5. Remove the service '{REMOVED_SERVICE}' from the inventory and re-converge")
        hosts, service = inventory_without_service(REMOVED_SERVICE)
        converge("site-service-removed", "-i", hosts)
        absent = [{"vip": service["vip"], "port": service["port"], "protocol": service["protocol"]}]
        name = f"removed-service-{service['vip']}-{service['port']}-{service['protocol']}"
        results += [("service removed", c) for c in verify(
            "verify-service-removed", "-i", hosts, "-e", json.dumps({"sluice_verify_absent_services": absent,
                                                                     "sluice_verify_only": [name]}))]
        converge("site-restored")
        print(f"   the real inventory is converged again ('{REMOVED_SERVICE}' is back)")

        step("6. Kubernetes: a Deployment over three nodes, pods across nodes, pods recreated, a Service")
        results += [("kubernetes", c) for c in kubernetes_demo(the_lab)]

        step("7. NetworkPolicy by kubectl: echo pods refuse all but role=client, then the policies go")
        results += [("networkpolicy", c) for c in policy_demo(the_lab)]
    except DemoFailed as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        return 1
    finally:
        if results:
            step("Summary")
            rows = [[phase, c["name"], "pass" if c["passed"] else "FAIL", path_taken(c)] for phase, c in results]
            print(table(rows, ["phase", "check", "result", "datapath path (node hook/outcome +packets)"]))
            for phase, c in results:
                if not c["passed"]:
                    print(f"   {phase} {c['name']}: " + "; ".join(c["reasons"]))

    failed = [c for _phase, c in results if not c["passed"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed.")
    print("Inspect a node:  .venv/bin/python lab/lab.py exec node1 -- /opt/sluice/venv/bin/sluice status")
    print("                 (also: sluice endpoints | services | routes | metrics | policy NAMESPACE/POD)")
    print(f"Kubernetes:      {images.k8s_bin_dir()}/kubectl --kubeconfig {kube.Cluster(lab.Lab(lab.DEFAULT_NAME)).admin_conf} "
          "get pods -A -o wide")
    print("Conformance:     make conformance   (the upstream sig-network and NetworkPolicy e2e suites, on this lab)")
    print("Tear down:       make lab-down")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
