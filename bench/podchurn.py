"""Pod churn through kubelet, on a Kubernetes lab of the benchmark's own (lab/lab.py `--kubernetes`, name
`slbchurn`, 2 nodes, converged by playbooks/site.yml): a Deployment of pause pods pinned to one node, scaled
from 0 to 100 replicas and timed until every pod is Ready, then scaled back to 0 and timed until every pod
is gone from the API. In each round one node runs its pods through Sluice (the conflist, plugin and agent
site.yml installed) and the other through Debian's reference `bridge` + `host-local` plugins (a conflist
of its own put first in the node's CNI directory, on its pod CIDR); the nodes swap plugins every two
rounds and the order alternates every round, so neither node nor order favours a plugin. What is timed
is everything kubelet and containerd do for a pod (the sandbox, the CNI ADD or DEL, the container), so
the CNI's share shows as a difference, not as the whole. The lab is taken down at the end, also on
failure.
`python -m bench --no-lab` skips it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import time

from sluice.k8s.client import Kubeconfig

from . import ROOT
from .common import fmt_ratio, fmt_spread, lab_cli, lab_play, ratio, summary

sys.path.insert(0, os.path.join(ROOT, "lab"))
import images  # noqa: E402  pylint: disable=wrong-import-position
import kube  # noqa: E402  pylint: disable=wrong-import-position
import lab  # noqa: E402  pylint: disable=wrong-import-position

NAME = "podchurn"
TITLE = "Pod churn through kubelet: a Deployment scaled 0 → 100 pods on one node and back, Sluice vs bridge"
LAB = "slbchurn"
SUBNET = "192.168.98.0/24"
NS = "churn"
REFERENCE = ("bridge", "host-local")
REFERENCE_CONFLIST = "00-bench-bridge.conflist"
TARGETS: list = []


def _install_reference(the_lab: lab.Lab, index: int) -> None:
    root = os.path.join(the_lab.node_dir(index), "root")
    for plugin in REFERENCE:
        shutil.copy2(os.path.join(kube.REFERENCE_PLUGIN_DIR, plugin), f"{root}/opt/cni/bin/{plugin}")


def _use(the_lab: lab.Lab, index: int, plugin: str) -> None:
    """node<index> runs its pods through `plugin`: bridge + host-local by a conflist the runtime picks
    before Sluice's (the lexically first), Sluice once that is gone. containerd watches the directory."""
    path = os.path.join(the_lab.node_dir(index), "root", "etc", "cni", "net.d", REFERENCE_CONFLIST)
    if plugin == "sluice":
        if os.path.exists(path):
            os.unlink(path)
        return
    conflist = {"cniVersion": "1.0.0", "name": "bench-bridge", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": kube.node_pod_cidr(index)}]]}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    with open(path, "w") as f:
        json.dump(conflist, f, indent=2)


def _deployment(node: str) -> dict:
    app = f"churn-{node}"
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app, "namespace": NS},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": app}},
                     "template": {"metadata": {"labels": {"app": app}}, "spec": {
                         "nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                         "enableServiceLinks": False, "automountServiceAccountToken": False,
                         "containers": [{"name": "pause", "image": images.PAUSE, "imagePullPolicy": "Never"}]}}}}


class Api:
    """Requests to the API server with the admin's credentials."""

    def __init__(self, kubeconfig: str):
        self.config = Kubeconfig.load(kubeconfig)
        self.host, port = self.config.server.removeprefix("https://").split(":")
        self.port = int(port)

    def call(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json"):
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.config.ssl_context, timeout=30)
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers={"Content-Type": content_type})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {resp.reason}: {data[:300]!r}")
        finally:
            conn.close()
        return json.loads(data)

    def scale(self, name: str, replicas: int) -> None:
        self.call("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/scale",
                  {"spec": {"replicas": replicas}}, "application/merge-patch+json")

    def pods(self, name: str) -> tuple[int, int]:
        """(pods of the Deployment, of which Ready and not being deleted): counted from the pods themselves,
        not from the Deployment's status, which lags behind them."""
        items = self.call("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=app%3D{name}")["items"]
        ready = sum(1 for pod in items if not pod["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])))
        return len(items), ready

    def settled(self, name: str, replicas: int) -> bool:
        status = self.call("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}")["status"]
        return status.get("replicas", 0) == replicas and status.get("readyReplicas", 0) == replicas


def _timed(what: str, done, timeout: float) -> float:
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - t0


def _churn(api: Api, node: str, pods: int) -> tuple[float, float]:
    """(seconds from the scale request to `pods` Ready, seconds from the scale to 0 to no pod left)."""
    name = f"churn-{node}"
    t0 = time.monotonic()
    api.scale(name, pods)
    _timed(f"{pods} Ready pods on {node}", lambda: api.pods(name)[1] >= pods, 900)
    up = time.monotonic() - t0
    t0 = time.monotonic()
    api.scale(name, 0)
    _timed(f"no pod left on {node}", lambda: api.pods(name)[0] == 0, 900)
    down = time.monotonic() - t0
    _timed(f"the Deployment on {node} to settle at 0", lambda: api.settled(name, 0), 120)   # untimed
    return up, down


def run(opts) -> dict:
    if not opts.lab:
        return {"measured": False, "reason": "skipped (--no-lab)"}
    pods = 30 if opts.quick else 100
    rounds = 1 if opts.quick else 4
    res: dict = {"measured": True, "pods": pods, "rounds": rounds,
                 "raw": {side: {"up": [], "down": [], "node": []} for side in ("sluice", "bridge")}}
    try:
        lab_cli(LAB, "up", "--kubernetes", "--nodes", "2", "--subnet", SUBNET)
        lab_play(LAB, "site.yml")
        the_lab = lab.Lab(LAB)
        k8s = kube.Cluster(the_lab)
        for index in (1, 2):
            _install_reference(the_lab, index)
        k8s.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=180s")
        k8s.kubectl("create", "namespace", NS)
        k8s.apply([_deployment(f"node{index}") for index in (1, 2)])
        api = Api(k8s.admin_conf)
        for r in range(rounds):
            nodes = {"sluice": 1, "bridge": 2} if r // 2 % 2 == 0 else {"sluice": 2, "bridge": 1}
            for side, index in nodes.items():
                _use(the_lab, index, side)
            time.sleep(2)                # containerd picks the configuration up
            if r % 2 == 0:              # untimed: each node's first sandbox through its new plugin
                for index in (1, 2):
                    _churn(api, f"node{index}", 2)
            for side in (("sluice", "bridge") if r % 2 == 0 else ("bridge", "sluice")):
                up, down = _churn(api, f"node{nodes[side]}", pods)
                for key, value in (("up", up), ("down", down), ("node", nodes[side])):
                    res["raw"][side][key].append(value)
                print(f"  {side:6} (node{nodes[side]}): 0 → {pods} Ready in {up:.1f} s, back to 0 in {down:.1f} s",
                      flush=True)
        res["summary"] = {side: {k: summary(raw[k]) for k in ("up", "down")} for side, raw in res["raw"].items()}
        res["ratios"] = {k: ratio(res["summary"]["sluice"][k]["median"], res["summary"]["bridge"][k]["median"])
                         for k in ("up", "down")}
    finally:
        lab_cli(LAB, "down")
    return res


def markdown(res: dict) -> list[str]:
    if not res["measured"]:
        return [f"Not measured: {res['reason']}."]
    s, b, r = res["summary"]["sluice"], res["summary"]["bridge"], res["ratios"]
    return [
        f"{res['rounds']} round(s), the nodes swapping plugins every two rounds and the order alternating; "
        f"{res['pods']} pause pods per Deployment, on one node.", "",
        "| | Sluice | bridge + host-local | Sluice / bridge |", "|---|---|---|---|",
        f"| scale 0 → {res['pods']}, until every pod is Ready | {fmt_spread(s['up'], ' s', digits=1)} | "
        f"{fmt_spread(b['up'], ' s', digits=1)} | {fmt_ratio(r['up'])} |",
        f"| scale {res['pods']} → 0, until no pod is left | {fmt_spread(s['down'], ' s', digits=1)} | "
        f"{fmt_spread(b['down'], ' s', digits=1)} | {fmt_ratio(r['down'])} |",
    ]


def plot(res: dict, plt):
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"0 → {res['pods']}", f"{res['pods']} → 0"]
    for offset, (side, color) in enumerate((("sluice", "tab:green"), ("bridge", "tab:orange"))):
        vals = [res["summary"][side][k]["median"] for k in ("up", "down")]
        ax.bar([i + offset * 0.4 for i in range(2)], vals, width=0.4, color=color, label=side)
    ax.set_xticks([i + 0.2 for i in range(2)], labels)
    ax.set_ylabel("s")
    ax.legend()
    ax.set_title("Deployment scaling on one node")
    return fig
