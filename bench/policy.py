"""NetworkPolicy: what enforcing it costs the datapath, and how long a change in the API takes to reach it.

Datapath (the topologies of the `paths` section, built by its own functions: pods wired as Sluice's CNI
wires them, same node and across two nodes over native routing), measured interleaved round by round as
`paths` is (sockperf TCP ping-pong p50/p99 of the half round trip, iperf3 one stream, both ends pinned to
CPU 0), for four variants of Sluice's datapath, each on datapaths of its own:

- off: SL_CFG_POLICY clear in sl_config: the datapath as it was before NetworkPolicy.
- on: SL_CFG_POLICY set, no NetworkPolicy: nothing is isolated, every flow is tracked in sl_ct.
- deny+allow: a default-deny ingress policy for the server's namespace and one policy allowing the
  client pod (by its label) to the server's two ports (sockperf's, iperf3's).
- 1,000 policies: those two plus 1,000 NetworkPolicies in the server's namespace, each selecting other
  pods (1,000 of them on the server's node, one label value each) with pod, namespace and ipBlock
  (with except) peers, a TCP port range (endPort) and a UDP port, and an egress rule.

The policy maps are written by the agent's own code: API-shaped Pod, Namespace and NetworkPolicy objects
parsed by sluice.policy.model (pod_from_api, namespace_from_api, policy_from_api) and given to
PolicyEngine.update on every node, which resolves them (sluice.policy.resolve) and writes sl_ipcache,
sl_policy_cidrs, sl_policy_isolation and sl_policy. Ratios are against "off" in the same round. Policy is
judged on a flow's first packet only: every later packet of the flow, both ways, passes on its sl_ct entry,
so what the 1,000 policies could cost (a longer LPM lookup in a larger sl_policy) is paid once per sockperf
or iperf3 connection, and per packet the variants with policy on differ from "off" by the sl_ct lookups. Before
traffic, each variant is checked to do what it says: a connection from the client to a port no policy
allows is refused by the server (off, on) or dropped by policy (deny+allow, 1,000 policies). The engine's
own times are reported too: the first apply of the 1,000 policies into empty maps, resolution alone, and
one policy added and removed on top of them (the agent's path on a change).

API to datapath, on a two-node Kubernetes lab of its own (lab/lab.py `--kubernetes`, name `slbnp`,
192.168.92.0/24, converged by playbooks/site.yml, which enables NetworkPolicy): a pause pod on node1; a
NetworkPolicy selecting it (ingress on one TCP port from every peer) created with a POST to the API
server, timed from the request to the moment a poller in node1 (0.5 ms interval) finds the entry in the
node's pinned sl_policy map; then deleted, timed until the entry is gone. 20 samples each with no other
policy, with the 1,000 policies above (selecting other pods, none of which runs on the lab: the agent
resolves them on every change but they select nothing), and with 1,000 policies that all select the pod
(each with its own ipBlock peers and port ranges, so every change re-resolves a pod under 1,000
policies). The agent's own time for each apply (its health's last_apply_seconds) is shown next to it.
The lab is taken down at the end, also on failure. `python -m bench --no-lab` skips this part."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time

from lib import netns
from sluice.k8s.client import Kubeconfig
from sluice.k8s.reflector import object_key
from sluice.maps import ConfigMap, PolicyDropsMap, CtMap
from sluice.policy.engine import PolicyEngine, PolicyInputs
from sluice.policy.model import namespace_from_api, pod_from_api, policy_from_api
from sluice.policy.resolve import Identities, resolve

from . import ROOT
from .common import (NodePoller, fmt_spread, kubernetes_lab, lab_cli, node_agent, paired_ratios, percentile, sh, summary,
                     wait_until)
from .paths import CLIENT_IP, UNDERLAY, sluice_same_node, sluice_two_nodes
from .traffic import IPERF_PORT, SOCKPERF_PORT, iperf_server, iperf_stream, sockperf_pingpong, sockperf_server

sys.path.insert(0, os.path.join(ROOT, "lab"))
import images  # noqa: E402  pylint: disable=wrong-import-position

NAME = "policy"
TITLE = "NetworkPolicy: datapath cost (off, on, deny+allow, 1,000 policies) and API change to datapath"
TARGETS: list = []

NS = "bench"                    # the server's (and the client's) namespace
PEERS_NS = "peers"
POLICIES = 1000
PEER_ROLES = 50
NODE3_IP = "192.168.50.3"       # a node of the API's cluster with no datapath here (the peers' node)
SAME_NODE_ADDRESS = "192.168.50.1"

PATHS = {"same": "same node", "cross": "two nodes"}
VARIANTS = {"off": "policy off", "on": "policy on, no NetworkPolicy", "allow": "default-deny + allow",
            "many": f"{POLICIES:,} policies + deny + allow"}

LAB = "slbnp"
SUBNET = "192.168.92.0/24"
SLUICE = "/opt/sluice/venv/bin/sluice"
PROBE_PORT = 20000
CONDITIONS = {"none": "no other policy", "others": f"{POLICIES:,} policies selecting other pods",
              "same_pod": f"{POLICIES:,} policies selecting the pod"}

# node1's maps show a change when sl_policy holds ("present") or no longer holds ("absent") the entry allowing
# TCP PORT from every peer into the pod at argv[1] (a NodePoller's fields: WANT PORT).
POLICY_ENTRY = """
from sluice.datapath import Datapath
from sluice.maps import PolicyEntryTuple, PolicyMap, INGRESS
pm = Datapath("/sys/fs/bpf/sluice", "/opt/sluice/bpf").open_map(PolicyMap)
def holds(want, port):
    key = PolicyMap._key(PolicyEntryTuple(sys.argv[1], INGRESS, 0, 6, int(port), 16))
    return (pm.lookup(key) is not None) == (want == "present")
"""


# ---- API-shaped objects ---------------------------------------------------------------------------

def _namespace(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _pod(ns: str, name: str, labels: dict, ip: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "bench", "ports": [
                {"name": "sockperf", "containerPort": SOCKPERF_PORT},
                {"name": "iperf", "containerPort": IPERF_PORT}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _policy(ns: str, name: str, spec: dict, labels: dict | None = None) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, **({"labels": labels} if labels else {})}, "spec": spec}


def deny_and_allow(ns: str) -> list[dict]:
    """Default-deny ingress in `ns`, and the client (by label) allowed to the server's two ports."""
    return [_policy(ns, "default-deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
            _policy(ns, "allow-client", {
                "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                             "ports": [{"protocol": "TCP", "port": SOCKPERF_PORT},
                                       {"protocol": "TCP", "port": IPERF_PORT}]}]})]


def many_policies(ns: str, count: int, selecting) -> list[dict]:
    """`count` policies in `ns`, policy i selecting the pods `selecting(i)` (a podSelector), each with peers
    of its own: pods by label in `ns`, pods by label in namespaces by label, an ipBlock with an except; a TCP
    port range (not aligned: several port prefixes) and a UDP port; and an egress rule."""
    out = []
    for i in range(count):
        low = 8000 + (i % 100) * 10 + i % 7
        block = f"172.{16 + i // 256 % 16}.{i % 256}"
        out.append(_policy(ns, f"np-{i:04d}", {
            "podSelector": selecting(i), "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": f"peer-{i % PEER_ROLES}"}}},
                                  {"namespaceSelector": {"matchLabels": {"team": "peers"}},
                                   "podSelector": {"matchExpressions": [
                                       {"key": "role", "operator": "In",
                                        "values": [f"peer-{(i + 1) % PEER_ROLES}", f"peer-{(i + 2) % PEER_ROLES}"]}]}},
                                  {"ipBlock": {"cidr": f"{block}.0/24", "except": [f"{block}.128/25"]}}],
                         "ports": [{"protocol": "TCP", "port": low, "endPort": low + 20},
                                   {"protocol": "UDP", "port": 53}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"role": f"peer-{i % PEER_ROLES}"}}}],
                        "ports": [{"protocol": "TCP", "port": 5432}]}]}, labels={"bench": "many"}))
    return out


def _api_objects(variant: str, server_node: str, server_ip: str) -> list[dict]:
    """What the API would hold for `variant`: the two pods, and for `many` the other pods, the peers and the
    policies."""
    objs = [_namespace(NS, {"team": "bench"}), _namespace(PEERS_NS, {"team": "peers"}),
            _pod(NS, "client", {"app": "client"}, CLIENT_IP, "node1"),
            _pod(NS, "server", {"app": "server"}, server_ip, server_node)]
    if variant in ("allow", "many"):
        objs += deny_and_allow(NS)
    if variant == "many":
        objs += [_pod(NS, f"other-{i}", {"app": f"other-{i}", "tier": "other"},
                      f"10.64.{i // 250}.{i % 250 + 1}", server_node) for i in range(POLICIES)]
        for n, ns in enumerate((NS, PEERS_NS)):
            objs += [_pod(ns, f"peer-{j}", {"role": f"peer-{j}"}, f"10.65.{n}.{j + 1}", "node3")
                     for j in range(PEER_ROLES)]
        objs += many_policies(NS, POLICIES, _other_pod)
    return objs


def _other_pod(i: int) -> dict:
    return {"matchLabels": {"app": f"other-{i}"}}


def _target(_i: int) -> dict:
    return {"matchLabels": {"app": "target"}}


def inputs_of(objs: list[dict], nodes: dict) -> PolicyInputs:
    """PolicyInputs as the agent's reflectors would hold them (keys namespace/name, the parsers' values)."""
    pods, namespaces, policies = {}, {}, {}
    for obj in objs:
        if obj["kind"] == "Pod":
            pods[object_key(obj)] = pod_from_api(obj)
        elif obj["kind"] == "Namespace":
            namespaces[object_key(obj)] = namespace_from_api(obj)
        else:
            policies[object_key(obj)] = policy_from_api(obj)
    return PolicyInputs(pods, namespaces, policies, nodes)


# ---- part (a): the datapath ----------------------------------------------------------------------

def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def topologies(work: str):
    """{"path/variant": (client ns, server ns, server ip, server's datapath)}, and the engine's times."""
    with contextlib.ExitStack() as stack:
        out, engine = {}, {}
        for variant in VARIANTS:
            for path in PATHS:
                build = sluice_same_node if path == "same" else sluice_two_nodes
                pods = build(stack, f"p{list(VARIANTS).index(variant)}")
                names = [f"node{i + 1}" for i in range(len(pods.nodes))]
                if path == "same":
                    nodes = {"node1": (SAME_NODE_ADDRESS,), "node3": (NODE3_IP,)}
                else:
                    nodes = {"node1": (UNDERLAY[0],), "node2": (UNDERLAY[1],), "node3": (NODE3_IP,)}
                inputs = inputs_of(_api_objects(variant, names[-1], pods.server_ip), nodes)
                for name, (node, dp) in zip(names, pods.nodes):
                    nic = netns.ifindex(node, "nic0") if path == "cross" else 0
                    with dp.open_map(ConfigMap) as config:
                        config.set(nodes[name][0], nic, policy=variant != "off")
                    if variant == "off":
                        continue
                    eng = PolicyEngine(dp, name, os.path.join(work, f"{variant}-{path}-{name}.json"))
                    took = _timed(lambda e=eng: e.update(inputs))
                    if e_err := eng.health["last_error"]:
                        raise RuntimeError(f"{variant}/{path} {name}: the engine failed: {e_err}")
                    if variant == "many" and name == names[-1]:
                        engine[path] = {"first_apply_s": took, **{k: eng.health[k] for k in (
                            "policies", "isolated_endpoints", "entries", "identities", "last_apply_seconds")}}
                        if path == "same":
                            engine["changes"] = _engine_changes(eng, inputs)
                            engine["resolve_s"] = _resolve_only(inputs, name)
                out[f"{path}/{variant}"] = (pods.client, pods.server, pods.server_ip, pods.nodes[-1][1])
        yield out, engine


def _engine_changes(eng: PolicyEngine, inputs: PolicyInputs, reps: int = 5) -> dict:
    """One policy added on top of the 1,000 and removed again, `reps` times: the agent's path on a change."""
    extra = policy_from_api(many_policies(NS, 1, lambda _i: _other_pod(7))[0]
                            | {"metadata": {"name": "np-extra", "namespace": NS}})
    added = inputs._replace(policies={**inputs.policies, f"{NS}/np-extra": extra})
    out = {"add_s": [], "remove_s": []}
    for _rep in range(reps):
        out["add_s"].append(_timed(lambda: eng.update(added)))
        out["remove_s"].append(_timed(lambda: eng.update(inputs)))
    return out


def _resolve_only(inputs: PolicyInputs, node: str, reps: int = 5) -> list[float]:
    return [_timed(lambda: resolve(inputs.pods, inputs.namespaces, inputs.policies, inputs.nodes, node, {},
                                   Identities())) for _rep in range(reps)]


def _connect(cli: str, ip: str, port: int) -> str:
    """"refused", "dropped" (no answer within 1 s) or "connected"."""
    out = sh(cli, "timeout", "1", "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}", check=False)
    return {0: "connected", 124: "dropped"}.get(out.returncode, "refused")


def _check(topo: dict) -> dict:
    """Each variant does what it says: an unallowed port is refused by the server or dropped by policy."""
    out = {}
    for key, (cli, _srv, ip, dp) in topo.items():
        seen = _connect(cli, ip, 9)
        with dp.open_map(PolicyDropsMap) as drops:
            dropped = sum(p for (_ep, _d), (p, _b) in drops.read().items())
        want = "dropped" if key.split("/")[1] in ("allow", "many") else "refused"
        if seen != want or (want == "dropped") != (dropped > 0):
            raise RuntimeError(f"{key}: a connection to port 9 was {seen} ({dropped} policy drops), expected {want}")
        out[key] = {"port_9": seen, "policy_drops": dropped}
    return out


def _datapath(opts) -> dict:
    rounds = 3 if opts.quick else 5
    lat_s, tput_s = (1, 1) if opts.quick else (2, 2)
    keys = [f"{p}/{v}" for v in VARIANTS for p in PATHS]
    lat = {k: [] for k in keys}
    tput = {k: [] for k in keys}
    work = tempfile.mkdtemp(prefix="slbench-")
    t0 = time.monotonic()
    try:
        with topologies(work) as (topo, engine), contextlib.ExitStack() as servers:
            print(f"  {len(topo)} topologies up in {time.monotonic() - t0:.0f} s; engine, {POLICIES:,} policies: "
                  f"first apply {engine['same']['first_apply_s']:.2f} s ({engine['same']['entries']:,} entries)",
                  flush=True)
            checks = _check(topo)
            for _cli, srv, ip, _dp in topo.values():
                servers.enter_context(sockperf_server(srv, ip))
                servers.enter_context(iperf_server(srv, ip))
            for r in range(rounds):
                order = keys[r % len(keys):] + keys[:r % len(keys)]
                for k in order:
                    lat[k].append(sockperf_pingpong(topo[k][0], topo[k][2], lat_s))
                if r < (2 if opts.quick else 3):
                    for k in order:
                        tput[k].append(iperf_stream(topo[k][0], topo[k][2], tput_s))
                print(f"  round {r + 1}/{rounds}", flush=True)
            ct = {}
            for k, (_cli, _srv, _ip, dp) in topo.items():
                with dp.open_map(CtMap) as m:
                    ct[k] = len(m)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"rounds": rounds, "latency_seconds": lat_s, "throughput_seconds": tput_s, "latency_raw": lat,
           "throughput_raw": tput, "engine": engine, "checks": checks, "ct_entries": ct, "summary": {}, "ratios": {}}
    for k in keys:
        res["summary"][k] = {"p50_us": summary([x["p50"] for x in lat[k]]),
                             "p99_us": summary([x["p99"] for x in lat[k]]), "gbit_s": summary(tput[k])}
        off = f"{k.split('/')[0]}/off"
        res["ratios"][k] = {"p50": paired_ratios([x["p50"] for x in lat[k]], [x["p50"] for x in lat[off]]),
                            "p99": paired_ratios([x["p99"] for x in lat[k]], [x["p99"] for x in lat[off]]),
                            "gbit": paired_ratios(tput[k], tput[off])}
    return res


# ---- part (b): API to datapath on a lab ------------------------------------------------------------------

class Api:
    """NetworkPolicy writes through the API server with the admin's credentials, timed at the request."""

    def __init__(self, kubeconfig: str):
        self.config = Kubeconfig.load(kubeconfig)
        self.host, port = self.config.server.removeprefix("https://").split(":")
        self.port = int(port)

    def request(self, method: str, path: str, body: dict | None = None) -> float:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.config.ssl_context, timeout=30)
        try:
            conn.connect()
            sent = time.time()
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status not in (200, 201, 202):
                raise RuntimeError(f"{method} {path}: {resp.status} {resp.reason}: {data[:300]!r}")
        finally:
            conn.close()
        return sent


def _agent_policy(the_lab) -> dict:
    return (node_agent(the_lab).get("kubernetes") or {}).get("network_policy") or {}


def _create_many(k8s, objs: list[dict]) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda start: k8s.kubectl("create", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objs[start:start + 250]})), range(0, len(objs), 250)))


def _settled(the_lab, policies: int) -> None:
    """The agent has resolved `policies` policies and applied nothing new for 2 s."""
    wait_until(f"node1's agent to hold {policies} NetworkPolicies",
               lambda: _agent_policy(the_lab).get("policies") == policies, 300, interval=1.0)
    last = None
    while True:
        now = _agent_policy(the_lab).get("last_apply")
        if now == last:
            return
        last = now
        time.sleep(2)


def _api_to_datapath(opts) -> dict:
    samples = 5 if opts.quick else 20
    res: dict = {"measured": True, "samples": samples, "raw": {}}
    poller = None
    try:
        the_lab, k8s = kubernetes_lab(LAB, SUBNET)
        k8s.apply([_namespace(NS, {"team": "bench"}), _namespace(PEERS_NS, {"team": "peers"}),
                   {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "target", "namespace": NS, "labels": {"app": "target"}},
                    "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 0,
                             "automountServiceAccountToken": False, "enableServiceLinks": False,
                             "containers": [{"name": "pause", "image": images.PAUSE, "imagePullPolicy": "Never"}]}}])
        k8s.kubectl("wait", "-n", NS, "--for=condition=Ready", "pod/target", "--timeout=180s")
        ip = k8s.kubectl("get", "pod", "-n", NS, "target", "-o", "jsonpath={.status.podIP}").stdout.strip()
        base = _agent_policy(the_lab)
        if not base.get("synced"):
            raise RuntimeError(f"node1's agent enforces no NetworkPolicy (health: {base})")
        base_policies = base.get("policies", 0)
        api = Api(k8s.admin_conf)
        poller = NodePoller(LAB, POLICY_ENTRY, 120, ip)

        def until(want: str, port: int, write) -> float:
            sent, seen = poller.until(f"{want} {port}", write)
            return seen - sent

        path = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
        for c, cond in enumerate(CONDITIONS):
            if cond != "none":
                api.request("DELETE", f"{path}?labelSelector=bench%3Dmany")     # one deletecollection
                _settled(the_lab, base_policies)
                t0 = time.monotonic()
                _create_many(k8s, many_policies(NS, POLICIES, _other_pod if cond == "others" else _target))
                _settled(the_lab, base_policies + POLICIES)
                print(f"  {CONDITIONS[cond]}: created and applied in {time.monotonic() - t0:.0f} s", flush=True)
            raw = res["raw"][cond] = {"create": [], "delete": [], "agent_apply_s": []}
            for n in range(samples):
                port = PROBE_PORT + c * 100 + n
                name = f"probe-{c}-{n}"
                body = _policy(NS, name, {"podSelector": _target(n), "policyTypes": ["Ingress"],
                                          "ingress": [{"ports": [{"protocol": "TCP", "port": port}]}]})
                raw["create"].append(until("present", port, lambda b=body: api.request("POST", path, b)))
                time.sleep(0.3)
                raw["agent_apply_s"].append(_agent_policy(the_lab).get("last_apply_seconds"))
                raw["delete"].append(until("absent", port, lambda nm=name: api.request("DELETE", f"{path}/{nm}")))
                time.sleep(0.5)
            res[cond] = {what: {"p50": percentile(v, 50), "p99": percentile(v, 99), **summary(v)}
                         for what, v in raw.items() if all(x is not None for x in v)}
            print(f"  {CONDITIONS[cond]}: create -> sl_policy p50 {res[cond]['create']['p50'] * 1000:.1f} ms, "
                  f"p99 {res[cond]['create']['p99'] * 1000:.1f} ms; delete -> gone p50 "
                  f"{res[cond]['delete']['p50'] * 1000:.1f} ms", flush=True)
    finally:
        if poller is not None:
            poller.close()
        lab_cli(LAB, "down")
    return res


def run(opts) -> dict:
    res = {"datapath": _datapath(opts)}
    print("\n".join(_datapath_markdown(res["datapath"])), flush=True)
    res["api"] = _api_to_datapath(opts) if opts.lab else {"measured": False, "reason": "skipped (--no-lab)"}
    return res


# ---- report ---------------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.1f} ms"


def _datapath_markdown(d: dict) -> list[str]:
    s, r = d["summary"], d["ratios"]
    lines = [f"{d['rounds']} interleaved rounds; sockperf TCP ping-pong {d['latency_seconds']} s per run (64-byte "
             f"messages, half round trip), iperf3 one stream {d['throughput_seconds']} s per run; client and "
             "server pinned to CPU 0. Cells: median [min–max] over rounds; ratios: per round, against policy off "
             "on the same path.", "",
             "| path | datapath | p50 µs | p99 µs | Gbit/s (one CPU) | p50 / off | p99 / off | Gbit/s / off |",
             "|---|---|---|---|---|---|---|---|"]
    for path, plabel in PATHS.items():
        for v, vlabel in VARIANTS.items():
            k = f"{path}/{v}"
            ratios = ["1.00×"] * 3 if v == "off" else [fmt_spread(r[k][x], "×") for x in ("p50", "p99", "gbit")]
            lines.append(f"| {plabel} | {vlabel} | {fmt_spread(s[k]['p50_us'])} | {fmt_spread(s[k]['p99_us'])} | "
                         f"{fmt_spread(s[k]['gbit_s'])} | {' | '.join(ratios)} |")
    e = d["engine"]
    ch = e["changes"]
    lines += ["", f"PolicyEngine.update with {POLICIES:,} policies (plus deny and allow; "
              f"{e['same']['isolated_endpoints']:,} isolated local pods), on the server's node:", "",
              "| what | time | |", "|---|---|---|",
              "| first apply into empty maps, same-node datapath (resolve + write) | "
              f"{_ms(e['same']['first_apply_s'])} | {e['same']['entries']:,} sl_policy entries, {e['same']['identities']:,} identities |",
              f"| first apply into empty maps, two-node datapath | {_ms(e['cross']['first_apply_s'])} | "
              f"{e['cross']['entries']:,} entries |",
              f"| resolution alone (sluice.policy.resolve) | {fmt_spread(summary(e['resolve_s']), ' ms', 1000, 1)} | "
              f"{len(e['resolve_s'])} runs |",
              f"| one policy added on top (the agent's path on a change) | "
              f"{fmt_spread(summary(ch['add_s']), ' ms', 1000, 1)} | {len(ch['add_s'])} runs |",
              f"| that policy removed again | {fmt_spread(summary(ch['remove_s']), ' ms', 1000, 1)} | "
              f"{len(ch['remove_s'])} runs |",
              "", "Checked before traffic, a connection from the client to port 9: " +
              ", ".join(f"{k} {c['port_9']}" for k, c in d["checks"].items()) +
              ". sl_ct entries after the run: " + ", ".join(f"{k} {n}" for k, n in d["ct_entries"].items()) + "."]
    return lines


def markdown(res: dict) -> list[str]:
    lines = _datapath_markdown(res["datapath"])
    a = res["api"]
    lines += ["", "### NetworkPolicy change in the API → node1's sl_policy", ""]
    if not a["measured"]:
        return lines + [f"Not measured: {a['reason']}."]
    lines += [f"{a['samples']} samples per row: a POST creating a policy, timed until its entry is in node1's "
              "sl_policy; its DELETE, timed until the entry is gone. Agent apply: last_apply_seconds from the "
              "agent's health after each create (resolution and map writes, in the agent).", "",
              "| other policies | create → in map p50 | p99 | delete → gone p50 | p99 | agent apply p50 | p99 |",
              "|---|---|---|---|---|---|---|"]
    for cond, label in CONDITIONS.items():
        c = a.get(cond)
        if not c:
            continue
        ag = c.get("agent_apply_s") or {}
        lines.append(f"| {label} | {_ms(c['create']['p50'])} | {_ms(c['create']['p99'])} | "
                     f"{_ms(c['delete']['p50'])} | {_ms(c['delete']['p99'])} | {_ms(ag.get('p50'))} | "
                     f"{_ms(ag.get('p99'))} |")
    return lines


def plot(res: dict, plt):
    d, a = res["datapath"], res["api"]
    panels = 3 if a.get("measured") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    colors = {"off": "tab:gray", "on": "tab:blue", "allow": "tab:green", "many": "tab:orange"}
    for ax, key, title in ((axes[0], "p50_us", "half round trip p50 (µs)"),
                           (axes[1], "gbit_s", "one stream, one CPU (Gbit/s)")):
        for j, (v, label) in enumerate(VARIANTS.items()):
            xs = [i + (j - 1.5) * 0.2 for i in range(len(PATHS))]
            st = [d["summary"][f"{p}/{v}"][key] for p in PATHS]
            med = [x["median"] or 0 for x in st]
            err = [[m - (x["min"] or m) for x, m in zip(st, med)], [(x["max"] or m) - m for x, m in zip(st, med)]]
            ax.bar(xs, med, width=0.2, yerr=err, capsize=3, color=colors[v], label=label)
        ax.set_xticks(range(len(PATHS)), list(PATHS.values()))
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    if panels == 3:
        ax = axes[2]
        for cond, label in CONDITIONS.items():
            if cond in a.get("raw", {}):
                xs = sorted(v * 1000 for v in a["raw"][cond]["create"])
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.set_xlabel("policy created in the API → in sl_policy (ms)")
        ax.set_ylabel("fraction of samples")
        ax.legend(fontsize=7)
        ax.set_title("API → datapath, node1")
    fig.suptitle("NetworkPolicy in Sluice's datapath (median, min–max over rounds)")
    return fig
