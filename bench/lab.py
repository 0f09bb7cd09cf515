"""The Ansible side on a lab of the benchmark's own (lab/lab.py, name `slbench`, its own
subnet, so a running `make lab-up` lab is left alone): playbooks/site.yml converging three
fresh nodes from scratch, then re-run on the converged cluster (a no-op: changed=0 expected);
further rounds start from playbooks/uninstall.yml (not timed). The lab is taken down at the
end, also on failure. `python -m bench --no-lab` (make bench BENCH_NO_LAB=1) skips it."""

from __future__ import annotations

import os
import re
import subprocess
import time

from . import ROOT
from .common import fmt_ratio, fmt_spread, ratio, summary

NAME = "lab"
TITLE = "Lab: site.yml converge from scratch and no-op re-run"
PLAYBOOK = os.path.join(ROOT, ".venv", "bin", "ansible-playbook")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
LAB = "slbench"
SUBNET = "192.168.97.0/24"
NODES = 3
INVENTORY = f"/var/lib/sluice-lab/{LAB}/inventory/hosts.yml"


def _play(name: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run([PLAYBOOK, "-i", INVENTORY, os.path.join(ROOT, "playbooks", name)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-1000:]}")
    recap = {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
             for host, rest in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", out.stdout, re.M)}
    return elapsed, recap


def _lab(*args: str) -> None:
    out = subprocess.run([PYTHON, os.path.join(ROOT, "lab", "lab.py"), "--name", LAB, *args], capture_output=True,
                         text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"lab.py {' '.join(args)} failed: {(out.stdout + out.stderr).strip()[-1000:]}")


def run(opts) -> dict:
    if not opts.lab:
        return {"measured": False, "reason": "skipped (--no-lab)", "targets": []}
    reps = 1 if opts.quick else 2
    raw = {"scratch": [], "noop": []}
    recaps = {}
    try:
        _lab("up", "--nodes", str(NODES), "--subnet", SUBNET)
        for rep in range(reps):
            if rep:
                _play("uninstall.yml")
            t, recaps["scratch"] = _play("site.yml")
            raw["scratch"].append(t)
            t, recaps["noop"] = _play("site.yml")
            raw["noop"].append(t)
            print(f"  site.yml from scratch {raw['scratch'][-1]:.1f} s, no-op {raw['noop'][-1]:.1f} s", flush=True)
    finally:
        _lab("down")
    s = {k: summary(v) for k, v in raw.items()}
    return {"measured": True, "raw": raw, "summary": s, "recaps": recaps, "nodes": len(recaps["noop"]),
            "noop_changed": sum(h.get("changed", 0) for h in recaps["noop"].values()),
            "ratio_noop_scratch": ratio(s["noop"]["median"], s["scratch"]["median"]), "targets": []}


def markdown(res: dict) -> list[str]:
    lines = ["| run | time | vs from scratch | changed |", "|---|---|---|---|"]
    if not res["measured"]:
        lines += [f"| site.yml converge from scratch | not measured: {res['reason']} | | |",
                  f"| site.yml no-op re-run | not measured: {res['reason']} | | |"]
        return lines
    s = res["summary"]
    changed = sum(h.get("changed", 0) for h in res["recaps"]["scratch"].values())
    lines += [f"| site.yml converge from scratch ({res['nodes']} nodes) | {fmt_spread(s['scratch'], ' s', digits=1)} "
              f"| 1.00× | {changed} |",
              f"| site.yml no-op re-run | {fmt_spread(s['noop'], ' s', digits=1)} | "
              f"{fmt_ratio(res['ratio_noop_scratch'])} | {res['noop_changed']} |"]
    return lines
