"""Services from the Kubernetes API at scale, on a Kubernetes lab of the benchmark's own (lab/lab.py
`--kubernetes`, name `slbk8s`, 2 nodes, converged by playbooks/site.yml): 10,000 Services with 5
endpoints each (50,000 endpoints in 10,000 EndpointSlices), created through the API; then one
EndpointSlice changed at a time (one endpoint replaced), and the time from the API write to the change in
the datapath measured on both sides of the same lab in the same run:

- Sluice: the agent on node1 (no kube-proxy there); the change is seen when a poller in node1 (0.5 ms
  interval) finds the new backend in the BPF maps.
- kube-proxy in iptables mode on node2, built from the same Kubernetes module as the cluster, with its
  default settings (`--iptables-min-sync-period` 1 s); the change is applied when the first iptables sync
  that starts after the API write completes (its `-v=2` log lines, microsecond timestamps).

Also: the time for all 10,000 Services to be programmed after the last one was created, each side's
memory (RSS) once synced, and the agent's start-up at that scale after `kill -9` (serving from its cache,
then synced with the API and applied). The lab is taken down at the end, also on failure.
`python -m bench --no-lab` skips it."""

from __future__ import annotations

import concurrent.futures
import datetime
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

from sluice.k8s.client import Kubeconfig

from . import ROOT
from .common import NodePoller, fmt_ratio, kubernetes_lab, lab_cli, node_agent, percentile, ratio, summary, wait_until

sys.path.insert(0, os.path.join(ROOT, "lab"))
import kube  # noqa: E402  pylint: disable=wrong-import-position
import lab  # noqa: E402  pylint: disable=wrong-import-position

NAME = "kubernetes"
TITLE = "Kubernetes Services: 10,000 Services / 50,000 endpoints through the API, change to datapath"
LAB = "slbk8s"
SUBNET = "192.168.96.0/24"
NS = "bench"
COUNT, PER = 10000, 5
SLUICE = "/opt/sluice/venv/bin/sluice"
TARGETS: list = []

# node1's maps show a change when the service VIP:PORT's backends include IP (a NodePoller's fields).
SERVICE_HAS_BACKEND = """
from sluice.datapath import Datapath
from sluice.maps import BackendsMap, ServicesMap
dp = Datapath("/sys/fs/bpf/sluice", "/opt/sluice/bpf")
sm, bm = dp.open_map(ServicesMap), dp.open_map(BackendsMap)
def holds(vip, port, ip):
    svc = sm.get(vip, int(port), "tcp")
    return bool(svc) and any((bm.get(b) or (None,))[0] == ip for b in svc.backend_ids)
"""


def _endpoint_ip(i: int, k: int) -> str:
    n = i * PER + k
    return f"10.200.{n >> 8 & 255}.{n & 255}" if n < 65536 else f"10.201.{(n - 65536) >> 8 & 255}.{n & 255}"


def _objects(count: int) -> list[dict]:
    objs = []
    for i in range(count):
        name = f"svc-{i}"
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
                     "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        objs.append(_slice(i, [_endpoint_ip(i, k) for k in range(PER)]))
    return objs


def _slice(i: int, ips: list[str]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}", "namespace": NS, "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


class Api:
    """Writes through the API server with the admin's credentials, timed at the request."""

    def __init__(self, kubeconfig: str):
        self.config = Kubeconfig.load(kubeconfig)
        self.host, port = self.config.server.removeprefix("https://").split(":")
        self.port = int(port)

    def patch_slice(self, i: int, ips: list[str]) -> float:
        body = json.dumps({"endpoints": _slice(i, ips)["endpoints"]}).encode()
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.config.ssl_context, timeout=30)
        try:
            conn.connect()
            sent = time.time()
            conn.request("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/svc-{i}", body=body,
                         headers={"Content-Type": "application/merge-patch+json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"PATCH endpointslice svc-{i}: {resp.status} {resp.reason}")
        finally:
            conn.close()
        return sent


def _klog_time(line: str, year: int) -> float:
    """The wall-clock time of a klog line (`I1202 05:30:01.123456 ...`, UTC on this machine)."""
    stamp = datetime.datetime.strptime(f"{year}{line[1:21]}", "%Y%m%d %H:%M:%S.%f")
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


def _kube_proxy_applied(log_path: str, after: float, timeout: float = 60) -> float:
    """When the first iptables sync that started after `after` completed."""
    deadline = time.monotonic() + timeout
    year = datetime.datetime.now(datetime.timezone.utc).year
    while time.monotonic() < deadline:
        started = None
        with open(log_path, errors="replace") as f:
            for line in f:
                if not re.match(r"I\d{4} ", line):
                    continue
                if "Syncing iptables rules" in line and started is None and _klog_time(line, year) > after:
                    started = line
                elif started is not None and "SyncProxyRules complete" in line:
                    return _klog_time(line, year)
        time.sleep(0.1)
    raise RuntimeError(f"kube-proxy logged no sync after {after} within {timeout} s ({log_path})")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def _sluice_services(the_lab: lab.Lab) -> int:
    out = the_lab.node_run(1, SLUICE, "--json", "services", check=False)
    return sum(1 for s in json.loads(out.stdout) if s["frontend"].endswith(":80/tcp")) if out.returncode == 0 else 0


def _kube_proxy_services(the_lab: lab.Lab) -> int:
    out = the_lab.node_run(2, "iptables-save", "-t", "nat", check=False)
    return len(re.findall(r"^-A KUBE-SERVICES .* --dport 80 ", out.stdout, re.M))


def run(opts) -> dict:
    if not opts.lab:
        return {"measured": False, "reason": "skipped (--no-lab)"}
    count = 1000 if opts.quick else COUNT
    changes = 10 if opts.quick else 40
    res: dict = {"measured": True, "services": count, "endpoints": count * PER, "changes": changes}
    poller = None
    try:
        the_lab, k8s = kubernetes_lab(LAB, SUBNET)
        proxy_log = the_lab.daemon_log("node2", "kube-proxy")
        the_lab.start_daemon("node2", "kube-proxy", [
            f"{k8s.bin}/kube-proxy", f"--kubeconfig={k8s.admin_conf}", "--proxy-mode=iptables",
            "--hostname-override=node2", f"--cluster-cidr={kube.CLUSTER_CIDR}", "--conntrack-max-per-core=0",
            "--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256", "-v=2"])
        the_lab.save_state()

        k8s.kubectl("create", "namespace", NS)
        objs = _objects(count)
        t0 = time.monotonic()
        # Four kubectl processes at a time: one kubectl writes its objects one request after the other.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda start: k8s.kubectl("create", "-f", "-", stdin=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": objs[start:start + 1000]})),
                range(0, len(objs), 1000)))
        res["create_s"] = time.monotonic() - t0
        print(f"  created {count} Services and EndpointSlices through the API in {res['create_s']:.0f} s", flush=True)
        res["sluice_program_s"] = wait_until("Sluice to program every Service",
                                             lambda: _sluice_services(the_lab) >= count, 900, 2)
        res["kube_proxy_program_s"] = wait_until("kube-proxy to program every Service",
                                                 lambda: _kube_proxy_services(the_lab) >= count, 900, 2)
        agent = node_agent(the_lab)
        kube_proxy_pid = int(subprocess.run(["pgrep", "-n", "-x", "kube-proxy"], capture_output=True, text=True,
                                            check=True).stdout)
        res["rss_mib"] = {"sluice": _rss_mib(agent["pid"]), "kube_proxy": _rss_mib(kube_proxy_pid)}
        print(f"  programmed: Sluice {res['sluice_program_s']:.0f} s, kube-proxy {res['kube_proxy_program_s']:.0f} s"
              f" after the last create; RSS agent {res['rss_mib']['sluice']:.0f} MiB, "
              f"kube-proxy {res['rss_mib']['kube_proxy']:.0f} MiB", flush=True)

        api = Api(k8s.admin_conf)
        poller = NodePoller(LAB, SERVICE_HAS_BACKEND, 60)
        vips = {s["metadata"]["name"]: s["spec"]["clusterIP"] for s in json.loads(
            k8s.kubectl("get", "services", "-n", NS, "-o", "json").stdout)["items"]}
        raw = {"sluice": [], "kube_proxy": []}
        for n in range(changes):
            i = (n * 7919) % count
            ips = [_endpoint_ip(i, k) for k in range(PER)]
            ips[0] = f"10.202.{n >> 8 & 255}.{n & 255}"
            sent, seen = poller.until(f"{vips[f'svc-{i}']} 80 {ips[0]}", lambda: api.patch_slice(i, ips))
            raw["sluice"].append(seen - sent)
            raw["kube_proxy"].append(_kube_proxy_applied(proxy_log, sent) - sent)
            time.sleep(1.5)     # past kube-proxy's minimum sync period, so each change is timed alone
        res["raw"] = raw
        res["latency"] = {side: {**summary(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
                          for side, v in raw.items()}
        print(f"  change -> datapath p50: Sluice {res['latency']['sluice']['p50'] * 1000:.1f} ms, "
              f"kube-proxy {res['latency']['kube_proxy']['p50'] * 1000:.1f} ms", flush=True)

        old = agent["pid"]
        os.kill(old, signal.SIGKILL)

        def restarted(synced: bool) -> bool:
            a = node_agent(the_lab)
            k = a.get("kubernetes") or {}
            return a.get("pid") not in (None, old) and bool(a.get("ready")) and \
                (not synced or bool(k.get("synced") and k.get("last_apply")))

        serving = wait_until("the restarted agent to serve", lambda: restarted(False), 300)
        res["agent_restart"] = {"serving_s": serving,
                                "synced_s": serving + wait_until("the restarted agent to sync with the API",
                                                                 lambda: restarted(True), 600)}
        print(f"  agent after kill -9: serving in {res['agent_restart']['serving_s']:.1f} s, synced and applied in "
              f"{res['agent_restart']['synced_s']:.1f} s (restart by its supervisor included)", flush=True)
    finally:
        if poller is not None:
            poller.close()
        lab_cli(LAB, "down")
    return res


def markdown(res: dict) -> list[str]:
    if not res["measured"]:
        return [f"Not measured: {res['reason']}."]
    lat, rss = res["latency"], res["rss_mib"]
    s, k = lat["sluice"], lat["kube_proxy"]

    def ms(v: float) -> str:
        return f"{v * 1000:.1f} ms"

    return [
        f"{res['services']:,} Services, {res['endpoints']:,} endpoints; created through the API in "
        f"{res['create_s']:.0f} s; {res['changes']} changes.",
        "",
        "| | Sluice agent (node1) | kube-proxy iptables (node2) | Sluice / kube-proxy |",
        "|---|---|---|---|",
        f"| EndpointSlice change → datapath, p50 | {ms(s['p50'])} | {ms(k['p50'])} | "
        f"{fmt_ratio(ratio(s['p50'], k['p50']))} |",
        f"| EndpointSlice change → datapath, p99 | {ms(s['p99'])} | {ms(k['p99'])} | "
        f"{fmt_ratio(ratio(s['p99'], k['p99']))} |",
        f"| all Services programmed, after the last create | {res['sluice_program_s']:.0f} s | "
        f"{res['kube_proxy_program_s']:.0f} s | (polled every 2 s) |",
        f"| memory (RSS) once synced | {rss['sluice']:.0f} MiB | {rss['kube_proxy']:.0f} MiB | "
        f"{fmt_ratio(ratio(rss['sluice'], rss['kube_proxy']))} |",
        f"| agent after `kill -9`: serving (from its cache) | {res['agent_restart']['serving_s']:.1f} s | | |",
        f"| agent after `kill -9`: synced with the API and applied | {res['agent_restart']['synced_s']:.1f} s | | |",
    ]


def plot(res: dict, plt):
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, label, color in (("sluice", "Sluice agent", "tab:green"), ("kube_proxy", "kube-proxy iptables",
                                                                         "tab:orange")):
        xs = sorted(v * 1000 for v in res["raw"][side])
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("EndpointSlice change → datapath (ms, log)")
    ax.set_ylabel("fraction of changes")
    ax.legend()
    ax.set_title(f"{res['services']:,} Services / {res['endpoints']:,} endpoints")
    return fig
