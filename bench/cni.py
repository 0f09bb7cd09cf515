"""CNI ADD and DEL latency, executed as a container runtime executes plugins
(tests/lib/cni_exec: CNI_* environment, configuration on stdin, one process
per call, from the node's network namespace), at concurrency 1 and 20:
Sluice's plugin (cni/sluice.c as `make artifacts` builds it and the cni role
ships it, handing the request to a real sluice-agent running in the node
namespace)
against Debian's reference Go plugins `bridge` + `host-local`
(/usr/lib/cni, containernetworking-plugins). Each pod is a fresh slbench-*
namespace; latency is the wall time of one plugin execution."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
import time

from lib import netns
from lib.agent import AgentProcess
from lib.cgroup import cgroup
from lib.cni_exec import REFERENCE_PLUGINS, SLUICE_PLUGIN, exec_plugin

from .common import (BPF_BUILD, add_namespace, del_namespace, fmt_ratio, fmt_spread, namespaces, percentile, pin_root,
                     ratio, sh, summary, target)

NAME = "cni"
TITLE = "CNI ADD/DEL latency: Sluice vs the reference bridge + host-local plugins"
CONCURRENCY = (1, 20)
# Sluice / reference, each at most 1.0 (issue 15): latency percentiles, and the time a batch of ADDs takes
# (the inverse of ADDs/s).
MEASURES = [(f"{op}_{q}", f"CNI {op.upper()} {q}") for op in ("add", "del") for q in ("p50", "p99")] + \
    [("add_batch", "CNI ADD batch time (1 / ADDs/s)")]
TARGETS = [(f"{label} vs reference plugins, concurrency {c}", 1.0) for c in CONCURRENCY for _key, label in MEASURES]


class Plugin:
    def __init__(self, name: str, node: str, path: str, cni_path: str, conf: dict,
                 settled=lambda: None):
        self.name, self.node, self.path, self.cni_path, self.conf = name, node, path, cni_path, conf
        self.settled = settled  # returns once work left after the answers is done (Sluice: a DEL's veth deletion)

    def version(self) -> float:
        """One VERSION call: the plugin's start-up floor (Sluice answers it without the agent)."""
        t0 = time.perf_counter()
        code, out = exec_plugin(self.path, "VERSION", self.conf, cni_path=self.cni_path)
        elapsed = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"{self.name} VERSION exited {code}: {out}")
        return elapsed

    def call(self, command: str, cid: str, pod_ns: str) -> float:
        with netns.entered(self.node):          # the runtime (and so the plugin) runs in the node's netns
            t0 = time.perf_counter()
            code, out = exec_plugin(self.path, command, self.conf, cid, f"/run/netns/{pod_ns}",
                                    cni_path=self.cni_path)
            elapsed = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"{self.name} {command} for {cid} exited {code}: {out}")
        return elapsed


def _batch(plugin: Plugin, pods: int, concurrency: int, tag: str) -> dict:
    """ADD `pods` pods, then DEL them, `concurrency` at a time; per-call seconds and batch wall times."""
    names = [add_namespace(tag) for _pod in range(pods)]
    cids = [f"{n}-{i}" for i, n in enumerate(names)]
    out = {"add": [], "del": []}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            for command in ("ADD", "DEL"):
                t0 = time.perf_counter()
                out[command.lower()] = list(pool.map(lambda a: plugin.call(command, *a), zip(cids, names)))
                out[f"{command.lower()}_wall"] = time.perf_counter() - t0
            plugin.settled()
            out["del_settled_wall"] = time.perf_counter() - t0
    finally:
        for n in names:
            del_namespace(n)
    return out


@contextlib.contextmanager
def _sluice(stack: contextlib.ExitStack, work: str):
    (node,) = stack.enter_context(namespaces("cns"))
    sh(node, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic1")
    sh(node, "ip", "addr", "add", "192.168.61.1/24", "dev", "nic0")
    for dev in ("nic0", "nic1"):
        sh(node, "ip", "link", "set", dev, "up")
    state_file = os.path.join(work, "state.json")
    with open(state_file, "w") as f:
        json.dump({"node": {"name": "bench", "ip": "192.168.61.1", "nic": "nic0", "pod_cidr": "10.240.0.0/22"}}, f)
    cg = stack.enter_context(cgroup())
    config = {"state_file": state_file, "pin_root": stack.enter_context(pin_root()), "obj_dir": BPF_BUILD,
              "socket": os.path.join(work, "agent.sock"), "metrics_address": "",
              "ipam_dir": os.path.join(work, "ipam"), "cgroup": cg.path, "poll_interval": 1.0}
    agent = AgentProcess(node, config, work)
    agent.start(timeout=60)
    stack.callback(agent.stop)
    conf = {"cniVersion": "1.0.0", "name": "sluice-bench", "type": "sluice", "agentSocket": config["socket"]}
    yield Plugin("sluice", node, SLUICE_PLUGIN, os.path.dirname(SLUICE_PLUGIN), conf, settled=agent.settled)


@contextlib.contextmanager
def _reference(stack: contextlib.ExitStack, work: str):
    (node,) = stack.enter_context(namespaces("cnr"))
    conf = {"cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge", "bridge": "cni0", "isGateway": True,
            "ipMasq": False, "ipam": {"type": "host-local", "subnet": "10.241.0.0/22",
                                      "dataDir": os.path.join(work, "host-local")}}
    yield Plugin("bridge", node, os.path.join(REFERENCE_PLUGINS, "bridge"), REFERENCE_PLUGINS, conf)


def run(opts) -> dict:
    pods = {1: 15, 20: 40} if opts.quick else {1: 40, 20: 100}
    rounds = 1 if opts.quick else 2
    raw: dict = {}
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="slbench-")     # short: a socket path has at most 107 bytes
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        os.mkdir(os.path.join(work, "s"))
        os.mkdir(os.path.join(work, "r"))
        plugins = [stack.enter_context(_sluice(stack, os.path.join(work, "s"))),
                   stack.enter_context(_reference(stack, os.path.join(work, "r")))]
        # one untimed pod each: page cache, the bridge device's creation, the agent's first request
        for p in plugins:
            _batch(p, 1, 1, "cnw")
        version = {p.name: [] for p in plugins}
        for _call in range(20):
            for p in plugins:
                version[p.name].append(p.version())
        for r in range(rounds):
            for c in CONCURRENCY:
                for p in (plugins if r % 2 == 0 else plugins[::-1]):
                    b = _batch(p, pods[c], c, "cnp")
                    entry = raw.setdefault(p.name, {}).setdefault(
                        c, {"add": [], "del": [], "add_wall": [], "del_wall": [], "del_settled_wall": []})
                    for k in ("add", "del"):
                        entry[k] += b[k]
                        entry[f"{k}_wall"].append(b[f"{k}_wall"])
                    entry["del_settled_wall"].append(b["del_settled_wall"])
                    print(f"  {p.name:6} c={c:<2} ADD p50 {percentile(b['add'], 50) * 1000:6.1f} ms "
                          f"p99 {percentile(b['add'], 99) * 1000:6.1f} ms, DEL p50 {percentile(b['del'], 50) * 1000:6.1f}"
                          f" ms ({pods[c]} pods)", flush=True)
    res = {"pods": pods, "rounds": rounds, "raw": raw, "summary": {}, "ratios": {},
           "version_ms": {k: summary([x * 1000 for x in v]) for k, v in version.items()}}
    for name, per_c in raw.items():
        for c, e in per_c.items():
            res["summary"].setdefault(name, {})[c] = {
                op: {"p50_ms": percentile(e[op], 50) * 1000, "p99_ms": percentile(e[op], 99) * 1000,
                     "n": len(e[op]), "pods_per_s": summary([pods[c] / w for w in e[f"{op}_wall"]])}
                for op in ("add", "del")}
            res["summary"][name][c]["del"]["settled_s"] = summary(e["del_settled_wall"])
    for c in CONCURRENCY:
        s, b = res["summary"]["sluice"][c], res["summary"]["bridge"][c]
        res["ratios"][c] = {f"{op}_{q}": ratio(s[op][f"{q}_ms"], b[op][f"{q}_ms"])
                            for op in ("add", "del") for q in ("p50", "p99")}
        res["ratios"][c]["add_batch"] = ratio(b["add"]["pods_per_s"]["median"], s["add"]["pods_per_s"]["median"])
        res["ratios"][c]["del_settled"] = ratio(s["del"]["settled_s"]["median"], b["del"]["settled_s"]["median"])
    res["targets"] = [target(f"{label} vs reference plugins, concurrency {c}", res["ratios"][c][key], 1.0,
                             f"Sluice / bridge+host-local, {c}-way") for c in CONCURRENCY for key, label in MEASURES]
    return res


def markdown(res: dict) -> list[str]:
    lines = [f"{res['rounds']} round(s), plugins alternated; {res['pods'][1]} pods per round at concurrency 1, "
             f"{res['pods'][20]} at concurrency 20; percentiles over all calls.", "",
             "| plugin | concurrency | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | ADDs/s |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("sluice", "Sluice (plugin → agent)"), ("bridge", "reference bridge + host-local")):
        for c, s in res["summary"][name].items():
            lines.append(f"| {label} | {c} | {s['add']['p50_ms']:.1f} | {s['add']['p99_ms']:.1f} | "
                         f"{s['del']['p50_ms']:.1f} | {s['del']['p99_ms']:.1f} | "
                         f"{fmt_spread(s['add']['pods_per_s'], digits=1)} |")
    v = res["version_ms"]
    lines += ["", f"Start-up floor, one VERSION call (answered by the executable alone): Sluice "
              f"{fmt_spread(v['sluice'], ' ms', digits=1)}, bridge {fmt_spread(v['bridge'], ' ms', digits=1)} "
              f"({fmt_ratio(ratio(v['sluice']['median'], v['bridge']['median']))}); the rest of a Sluice ADD is "
              "the agent's work.", ""]
    lines += ["| Sluice / reference | ADD p50 | ADD p99 | DEL p50 | DEL p99 | ADD batch time (1 / ADDs/s) |",
              "|---|---|---|---|---|---|"]
    for c, r in res["ratios"].items():
        lines.append(f"| concurrency {c} | {fmt_ratio(r['add_p50'])} | {fmt_ratio(r['add_p99'])} | "
                     f"{fmt_ratio(r['del_p50'])} | {fmt_ratio(r['del_p99'])} | {fmt_ratio(r['add_batch'])} |")
    lines += ["", "A Sluice DEL answers once the pod is off the node (address freed, endpoint entry and node route "
              "gone); the agent deletes the veth after the answer (the kernel's wait for RCU callbacks), holding "
              "the attachment meanwhile. A DEL batch until every veth is gone as well (the reference's DEL "
              "answers after its deletion):", ""]
    for c in res["ratios"]:
        s, b = res["summary"]["sluice"][c]["del"]["settled_s"], res["summary"]["bridge"][c]["del"]["settled_s"]
        lines.append(f"- concurrency {c}, {res['pods'][c]} pods: Sluice {fmt_spread(s, ' s', digits=2)}, "
                     f"reference {fmt_spread(b, ' s', digits=2)} ({fmt_ratio(res['ratios'][c]['del_settled'])})")
    return lines


def plot(res: dict, plt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, c in zip(axes, sorted(res["summary"]["sluice"], key=int)):
        labels, vals, colors = [], [], []
        for op in ("add", "del"):
            for q in ("p50", "p99"):
                for name, color in (("sluice", "tab:green"), ("bridge", "tab:orange")):
                    labels.append(f"{op.upper()} {q}\n{name}")
                    vals.append(res["summary"][name][c][op][f"{q}_ms"])
                    colors.append(color)
        ax.bar(labels, vals, color=colors)
        ax.set_ylabel("ms")
        ax.set_title(f"concurrency {c}")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("CNI plugin latency: Sluice vs bridge + host-local")
    return fig
