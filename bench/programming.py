"""Programming cost: installing 10,000 services with 5 backends each (50,000
distinct backends) into empty tables, and then changing one of them (one
backend replaced), Sluice against kube-proxy's iptables mode.

Sluice is measured three ways: through sluice.state.Reconciler.apply (a full
reconcile, what the agent runs at start and periodically, `sluice apply` and
the Ansible module: it reads every map back with batch lookups, computes the
plan from that one snapshot, then writes backends with one batch update and
each service's slots with batch updates), through Reconciler.update (what the
agent runs when the state file changes: the delta from the state it applied
last, each changed entry checked before it is written), and as the bare map
writes of sluice.maps (BackendsMap.put_many and ServicesMap batch updates), the
floor. iptables is
one iptables-restore of the whole ruleset without --noflush (kube-proxy's full
sync), and for the change also a partial --noflush restore of the changed
chains (kube-proxy's minimal sync)."""

from __future__ import annotations

import contextlib
import statistics
import time

from lib import netns
from sluice.datapath import Datapath
from sluice.maps import Backend, BackendsMap, Service, ServicesMap
from sluice.state import DesiredState, Reconciler

from . import kubeproxy, workload
from .common import (BPF_BUILD, fmt_ratio, fmt_spread, iptables_restore, namespaces, pin_root, ratio, sh, summary,
                     target)

NAME = "programming"
TITLE = "Programming cost: 10,000 services × 5 backends, then one change"
TARGETS = [("10,000 services programmed", 1.0, " s"), ("one change applied", 0.010, " s")]
COUNT, PER = 10000, 5
CHANGED = COUNT // 2


def _clear(dp: Datapath) -> None:
    with dp.open_map(ServicesMap) as sm, dp.open_map(BackendsMap) as bm:
        sm.clear()
        bm.clear()


def _direct_install(dp: Datapath) -> float:
    """The same content written straight through sluice.maps: backends, then every service's slots."""
    t0 = time.perf_counter()
    with dp.open_map(ServicesMap) as sm, dp.open_map(BackendsMap) as bm:
        bm.put_many({i * PER + k + 1: Backend(workload.backend(i, k, PER), workload.BACKEND_PORT)
                     for i in range(COUNT) for k in range(PER)})
        pairs = []
        for i in range(COUNT):
            pairs += sm.entries(kubeproxy.vip(i), workload.PORT, "tcp",
                                Service(i + 1, tuple(i * PER + k + 1 for k in range(PER))))
        sm.update_batch(pairs)
    return time.perf_counter() - t0


def _direct_change(dp: Datapath) -> float:
    """One service re-pointed: a new backend entry, then ServicesMap.put of that service."""
    t0 = time.perf_counter()
    with dp.open_map(ServicesMap) as sm, dp.open_map(BackendsMap) as bm:
        new_id = COUNT * PER + 1
        bm.put(new_id, Backend("10.250.0.1", workload.BACKEND_PORT))
        ids = tuple(CHANGED * PER + k + 1 for k in range(PER - 1)) + (new_id,)
        sm.put(kubeproxy.vip(CHANGED), workload.PORT, "tcp", Service(CHANGED + 1, ids))
    return time.perf_counter() - t0


def run(opts) -> dict:
    reps_sluice = 2 if opts.quick else 3
    reps_ipt = 1 if opts.quick else 2
    raw = {k: [] for k in ("sluice_install", "sluice_change", "sluice_update", "maps_install", "maps_change",
                           "ipt_install", "ipt_change_full", "ipt_change_partial")}
    base = DesiredState.parse(workload.state(COUNT, PER))
    changed = DesiredState.parse(workload.state(COUNT, PER, changed=CHANGED))
    kube = workload.kube_services(COUNT, PER)
    rules = kubeproxy.ruleset(kube)
    vip, port, eps = kube[CHANGED]
    rules_changed = kubeproxy.ruleset(kube[:CHANGED] + [(vip, port, eps[:-1] + [("10.250.0.1", 8080)])]
                                      + kube[CHANGED + 1:])
    partial = kubeproxy.changed_chain(kube, CHANGED, ("10.250.0.1", 8080))
    with contextlib.ExitStack() as stack:
        node, ipt = stack.enter_context(namespaces("prg", "pri"))
        sh(node, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic1")
        sh(node, "ip", "addr", "add", f"{workload.NODE['ip']}/24", "dev", "nic0")
        sh(node, "ip", "link", "set", "nic0", "up")
        dp = Datapath(stack.enter_context(pin_root()), BPF_BUILD)
        dp.load()
        rec = Reconciler(dp)
        with netns.entered(node):       # the Reconciler resolves the NIC and kernel routes in the node's netns
            for _rep in range(reps_sluice):
                _clear(dp)
                t0 = time.perf_counter()
                rec.apply(base)
                raw["sluice_install"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                plan = rec.apply(changed)
                raw["sluice_change"].append(time.perf_counter() - t0)
                assert plan.to_dict()["services"]["change"], plan.to_dict()
                for target_state in (base, changed):    # the same backend changed back, and again
                    t0 = time.perf_counter()
                    plan = rec.update(target_state)
                    raw["sluice_update"].append(time.perf_counter() - t0)
                    assert rec.last_kind == "delta" and len(plan.to_dict()["services"]["change"]) == 1, plan.to_dict()
                _clear(dp)
                raw["maps_install"].append(_direct_install(dp))
                raw["maps_change"].append(_direct_change(dp))
        print(f"  sluice: Reconciler install {statistics.median(raw['sluice_install']):.2f} s, change "
              f"{statistics.median(raw['sluice_change']) * 1000:.0f} ms (apply), "
              f"{statistics.median(raw['sluice_update']) * 1000:.1f} ms (update); maps install "
              f"{statistics.median(raw['maps_install']):.2f} s, change {statistics.median(raw['maps_change']) * 1e6:.0f} µs",
              flush=True)
        for _rep in range(reps_ipt):
            iptables_restore(ipt, "*nat\nCOMMIT\n*filter\nCOMMIT\n")    # empty tables
            raw["ipt_install"].append(iptables_restore(ipt, rules))
            raw["ipt_change_full"].append(iptables_restore(ipt, rules_changed))
            raw["ipt_change_partial"].append(iptables_restore(ipt, partial, noflush=True))
        print(f"  iptables: install {statistics.median(raw['ipt_install']):.2f} s, full re-sync "
              f"{statistics.median(raw['ipt_change_full']):.2f} s, partial --noflush "
              f"{statistics.median(raw['ipt_change_partial']) * 1000:.0f} ms", flush=True)
    s = {k: summary(v) for k, v in raw.items()}
    res = {"count": COUNT, "backends_per_service": PER, "raw": raw, "summary": s,
           "iptables_rules": rules.count("\n-A "),
           "ratios": {
               "install: Reconciler / iptables-restore": ratio(s["sluice_install"]["median"], s["ipt_install"]["median"]),
               "install: maps / iptables-restore": ratio(s["maps_install"]["median"], s["ipt_install"]["median"]),
               "change: Reconciler / iptables full re-sync": ratio(s["sluice_change"]["median"],
                                                                   s["ipt_change_full"]["median"]),
               "change: Reconciler / iptables partial --noflush": ratio(s["sluice_change"]["median"],
                                                                        s["ipt_change_partial"]["median"]),
               "change: Reconciler.update / iptables partial --noflush": ratio(s["sluice_update"]["median"],
                                                                               s["ipt_change_partial"]["median"]),
               "change: maps / iptables partial --noflush": ratio(s["maps_change"]["median"],
                                                                  s["ipt_change_partial"]["median"]),
           }}
    res["targets"] = [
        {**target("10,000 services programmed (Reconciler.apply)", s["sluice_install"]["median"], 1.0,
                  f"{fmt_ratio(res['ratios']['install: Reconciler / iptables-restore'])} of iptables-restore"),
         "unit": " s"},
        {**target("one change applied (Reconciler.update, the agent's path)", s["sluice_update"]["median"], 0.010,
                  f"{fmt_ratio(res['ratios']['change: Reconciler.update / iptables partial --noflush'])} of a "
                  "partial iptables-restore --noflush"), "unit": " s"},
        {**target("one change applied (Reconciler.apply, full reconcile)", s["sluice_change"]["median"], 0.010,
                  f"{fmt_ratio(res['ratios']['change: Reconciler / iptables partial --noflush'])} of a partial "
                  "iptables-restore --noflush"), "unit": " s"},
        {**target("one change applied (sluice.maps writes alone)", s["maps_change"]["median"], 0.010,
                  f"{fmt_ratio(res['ratios']['change: maps / iptables partial --noflush'])} of a partial "
                  "iptables-restore --noflush"), "unit": " s"},
    ]
    return res


def markdown(res: dict) -> list[str]:
    s = res["summary"]
    rows = [("install, Sluice Reconciler.apply (full reconcile)", "sluice_install"),
            ("install, Sluice map writes alone (sluice.maps batch)", "maps_install"),
            ("install, iptables-restore (kube-proxy full sync)", "ipt_install"),
            ("one change, Sluice Reconciler.apply (full reconcile: every map read back)", "sluice_change"),
            ("one change, Sluice Reconciler.update (agent: delta from the last applied state)", "sluice_update"),
            ("one change, Sluice map writes alone", "maps_change"),
            ("one change, iptables-restore of the whole ruleset (full sync)", "ipt_change_full"),
            ("one change, iptables-restore --noflush of the changed chains (partial sync)", "ipt_change_partial")]
    lines = [f"{res['count']:,} services × {res['backends_per_service']} backends "
             f"({res['iptables_rules']:,} iptables rules). Cells: median [min–max] over {s['sluice_install']['n']} "
             f"(Sluice) / {s['ipt_install']['n']} (iptables) repetitions.", "",
             "| operation | time |", "|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {fmt_spread(s[key], ' ms', 1000, 1)} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_ratio(v)} |" for k, v in res["ratios"].items()]
    return lines


def plot(res: dict, plt):
    s = res["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    install = [("Reconciler", "sluice_install"), ("maps", "maps_install"), ("iptables-restore", "ipt_install")]
    change = [("Reconciler", "sluice_change"), ("update", "sluice_update"), ("maps", "maps_change"),
              ("iptables full", "ipt_change_full"),
              ("iptables partial", "ipt_change_partial")]
    for ax, keys, title in ((axes[0], install, "install 10,000 × 5"), (axes[1], change, "change one service")):
        labels = [k[0] for k in keys]
        med = [s[k[1]]["median"] * 1000 for k in keys]
        err = [[m - s[k[1]]["min"] * 1000 for k, m in zip(keys, med)],
               [s[k[1]]["max"] * 1000 - m for k, m in zip(keys, med)]]
        ax.bar(labels, med, yerr=err, capsize=4,
               color=["tab:green" if lb in ("Reconciler", "update", "maps") else "tab:orange" for lb in labels])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(title)
    fig.suptitle("Programming cost: Sluice vs kube-proxy iptables")
    return fig
