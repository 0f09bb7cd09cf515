"""Agent reconcile time: the real sluice-agent (started as tests/lib/agent
starts it, in a node namespace of its own) with a state file of 10,000
services × 5 backends. Measured: start-up to ready on empty maps (load the
datapath, attach, parse, plan, apply), then, with the agent running, a forced
reconcile (the agent's `reconcile` request, answered once it is done) after
the state file changed one backend (the agent applies the delta from the state
it applied last), after it was rewritten unchanged (no-op), and a full
reconcile (`"full": true`: every map read back and repaired, what the agent
also runs periodically) after one backend changed back. Compared with
kube-proxy's equivalent full sync, one
iptables-restore of the same services (taken from the programming section
when it ran, measured here otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

from lib.agent import AgentProcess
from lib.cgroup import cgroup

from . import kubeproxy, workload
from .common import BPF_BUILD, fmt_ratio, fmt_spread, iptables_restore, namespaces, pin_root, ratio, sh, summary

NAME = "reconcile"
TITLE = "Agent reconcile: state file with 10,000 services"
COUNT, PER = 10000, 5


def _write(path: str, content: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(content, f)
    os.replace(path + ".tmp", path)


def run(opts) -> dict:
    reps = 2 if opts.quick else 3
    raw = {"start": [], "change": [], "noop": [], "full": []}
    base, changed = workload.state(COUNT, PER), workload.state(COUNT, PER, changed=COUNT // 2)
    with contextlib.ExitStack() as stack:
        (node,) = stack.enter_context(namespaces("agt"))
        sh(node, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic1")
        sh(node, "ip", "addr", "add", f"{workload.NODE['ip']}/24", "dev", "nic0")
        for dev in ("nic0", "nic1"):
            sh(node, "ip", "link", "set", dev, "up")
        work = tempfile.mkdtemp(prefix="slbench-")    # short: a socket path has at most 107 bytes
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        state_file = os.path.join(work, "state.json")
        _write(state_file, base)
        cg = stack.enter_context(cgroup())
        root = stack.enter_context(pin_root())
        config = {"state_file": state_file, "pin_root": root, "obj_dir": BPF_BUILD,
                  "socket": os.path.join(work, "agent.sock"), "metrics_address": "",
                  "ipam_dir": os.path.join(work, "ipam"), "cgroup": cg.path, "poll_interval": 3600}
        agent = AgentProcess(node, config, work)
        t0 = time.perf_counter()
        agent.start(timeout=120)
        raw["start"].append(time.perf_counter() - t0)
        stack.callback(agent.stop)
        health = agent.health()
        if not health.get("ready"):
            raise RuntimeError(f"agent not ready: {health}")
        for _rep in range(reps):
            for key, content in (("change", changed), ("noop", changed), ("full", base)):
                _write(state_file, content)
                t0 = time.perf_counter()
                reply = agent.request({"op": "reconcile", "full": key == "full"})
                raw[key].append(time.perf_counter() - t0)
                if not reply.get("ok"):
                    raise RuntimeError(f"reconcile refused: {reply}")
        plan = agent.health().get("last_plan")
        print(f"  agent: start {raw['start'][0]:.2f} s, change {summary(raw['change'])['median']:.2f} s, "
              f"no-op {summary(raw['noop'])['median']:.2f} s, full {summary(raw['full'])['median']:.2f} s", flush=True)
    ipt = None
    prog = getattr(opts, "results", {}).get("programming")
    if prog and prog.get("ok"):
        ipt = prog["result"]["summary"]["ipt_install"]
        source = "programming section"
    else:
        with namespaces("rci") as (ns,):
            ipt = summary([iptables_restore(ns, kubeproxy.ruleset(workload.kube_services(COUNT, PER)))])
        source = "measured here"
    s = {k: summary(v) for k, v in raw.items()}
    res = {"count": COUNT, "backends_per_service": PER, "raw": raw, "summary": s, "iptables_full_sync": ipt,
           "iptables_source": source, "last_plan_sections": sorted((plan or {}).keys()),
           "ratios": {"agent start / iptables full sync": ratio(s["start"]["median"], ipt["median"]),
                      "change reconcile / iptables full sync": ratio(s["change"]["median"], ipt["median"]),
                      "no-op reconcile / change reconcile": ratio(s["noop"]["median"], s["change"]["median"])}}
    res["targets"] = []
    return res


def markdown(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"{res['count']:,} services × {res['backends_per_service']} backends; median [min–max] over "
             f"repetitions (start-up once). iptables full sync of the same services: "
             f"{fmt_spread(res['iptables_full_sync'], ' s')} ({res['iptables_source']}).", "",
             "| agent operation | time | vs iptables full sync |", "|---|---|---|",
             f"| start-up to ready on empty maps (load, attach, reconcile) | {fmt_spread(s['start'], ' s')} | "
             f"{fmt_ratio(res['ratios']['agent start / iptables full sync'])} |",
             f"| reconcile after one backend changed (delta from the state applied last) | {fmt_spread(s['change'], ' s')} | "
             f"{fmt_ratio(res['ratios']['change reconcile / iptables full sync'])} |",
             f"| reconcile of an unchanged state (no-op) | {fmt_spread(s['noop'], ' s')} | "
             f"{fmt_ratio(ratio(s['noop']['median'], res['iptables_full_sync']['median']))} |"]
    if "full" in s:     # runs from before full reconciles were measured have no such row
        lines.append(f"| full reconcile (every map read back) after one backend changed | {fmt_spread(s['full'], ' s')} | "
                     f"{fmt_ratio(ratio(s['full']['median'], res['iptables_full_sync']['median']))} |")
    return lines
