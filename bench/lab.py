"""The Ansible side on the local lab (optional: `make bench BENCH_LAB=1`, or
`python -m bench --lab`, with the lab already up through `make lab-up`; the
benchmark never brings it up): playbooks/site.yml converging the nodes from
scratch (after playbooks/uninstall.yml, not timed) and re-run on a converged
cluster (no-op, changed=0 expected). Without the flag, or when
`lab/lab.py status` does not report a healthy lab, the rows say "not measured"."""

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
INVENTORY = os.path.join(ROOT, "inventory", "lab", "hosts.yml")


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


def _lab_up() -> tuple[bool, str]:
    if not os.path.exists(INVENTORY):
        return False, "the lab is not up (no inventory/lab/hosts.yml; `make lab-up` creates it)"
    py = os.path.join(ROOT, ".venv", "bin", "python")
    st = subprocess.run([py, os.path.join(ROOT, "lab", "lab.py"), "status"], capture_output=True, text=True,
                        timeout=120, check=False)
    if st.returncode != 0:
        return False, f"`lab/lab.py status` does not report a healthy lab: {(st.stdout + st.stderr).strip()[-300:]}"
    return True, ""


def run(opts) -> dict:
    if not opts.lab:
        return {"measured": False, "reason": "not requested (run `make bench BENCH_LAB=1` with the lab up)",
                "targets": []}
    up, why = _lab_up()
    if not up:
        return {"measured": False, "reason": why, "targets": []}
    reps = 1 if opts.quick else 2
    raw = {"scratch": [], "noop": []}
    recaps = {}
    for _rep in range(reps):
        _play("uninstall.yml")
        t, recaps["scratch"] = _play("site.yml")
        raw["scratch"].append(t)
        t, recaps["noop"] = _play("site.yml")
        raw["noop"].append(t)
        print(f"  site.yml from scratch {raw['scratch'][-1]:.1f} s, no-op {raw['noop'][-1]:.1f} s", flush=True)
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
