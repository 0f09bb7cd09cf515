"""The agent's path for a new state: apply only what differs from the state applied last.

Each map entry the delta changes is first checked against what the last apply left
there (Applied); an entry that differs raises Drift, before anything is written, and
the Reconciler then reconciles in full against the maps.
"""

from __future__ import annotations

import errno
import itertools
import operator
from collections import Counter
from dataclasses import dataclass

from .. import maps as m
from ..bpf import libbpf as lb
from .plan import Plan, frontend_options, frontend_text
from .schema import Backend, DesiredState, Frontend
from .snapshot import Snapshot

# What a delta leaves to a full apply when it changes: the node, routing, routes, xdp, failsafe and network_policy
# sections.
STRUCTURAL = ("node_ip", "nic", "routing_mode", "vxlan_device", "vxlan_port", "vni", "routes", "cpumap_cpus",
              "failsafe", "network_policy")


class Drift(Exception):
    """A map entry the delta path was about to change does not hold what the last apply left there."""


@dataclass
class Applied:
    """What a Reconciler's last apply left in the maps: the state, and the ids it gave it there."""

    state: DesiredState
    backend_ids: dict[Backend, int]         # every backend the state uses -> its id in sl_backends
    refs: Counter                           # backend -> how many frontends (services, LB VIPs) use it
    svc_ids: dict[Frontend, int]
    next_backend: int
    next_svc: int

    @classmethod
    def after_full_apply(cls, state: DesiredState, snap: Snapshot, ids: dict[Backend, int],
                         svc_ids: dict[Frontend, int]) -> "Applied | None":
        """What a delta needs to know of the maps after a full apply of `state` from snapshot `snap`
        (None, so that the next update is a full apply, should an id be unknown)."""
        frontends = (*state.services.values(), *state.lb_vips.values())
        refs = Counter(itertools.chain.from_iterable(frontends))
        if not (refs.keys() <= ids.keys() and state.services.keys() <= svc_ids.keys()):
            return None
        return cls(state=state, backend_ids={b: ids[b] for b in refs}, refs=refs,
                   svc_ids={fe: svc_ids[fe] for fe in state.services},
                   next_backend=max(itertools.chain(snap.backends, ids.values()), default=0) + 1,
                   next_svc=max(itertools.chain(snap.svc_ids.values(), svc_ids.values()), default=0) + 1)


def _diff(old: dict, new: dict) -> list[tuple]:
    """(key, old value or None, new value or None) for every key whose value differs, sorted by key.
    The keys that differ are found by map()/compress() in C: a loop in Python costs twice as much on
    10,000 services."""
    get = old.get
    differs = map(operator.ne, map(get, new.keys()), new.values())
    changed = [(k, get(k), new[k]) for k in itertools.compress(new.keys(), differs)]
    added = sum(1 for c in changed if c[1] is None)
    if len(old) > len(new) - added:     # some keys of `old` are gone
        changed += [(k, old[k], None) for k in old.keys() - new.keys()]
    return sorted(changed, key=lambda c: c[0])


def _options_changed(changes: list[tuple], old_options: dict, new_options: dict, old: dict, new: dict) -> list[tuple]:
    """`changes` (of _diff) with the frontends whose options alone changed (affinity, LB options): those are
    rewritten too, as in the full plan. Options hold only what is not the default."""
    seen = {c[0] for c in changes}
    extra = [(fe, old[fe], new[fe]) for fe in old_options.keys() | new_options.keys()
             if old_options.get(fe) != new_options.get(fe) and fe not in seen and fe in old and fe in new]
    return sorted(changes + extra, key=lambda c: c[0]) if extra else changes


def apply_delta(datapath, last: Applied, state: DesiredState) -> Plan:
    """Apply `state` as a change from `last` (updated in place to describe the maps after it).
    Every entry the delta changes is checked first (reads only), then written: a Drift leaves the
    maps as they were."""
    plan = Plan()
    old = last.state
    services = _options_changed(_diff(old.services, state.services), old.affinity, state.affinity, old.services,
                                state.services)
    # an LB VIP's backends are a set (the Maglev table), as in the full plan
    old_vips = {fe: tuple(sorted(bs)) for fe, bs in old.lb_vips.items()}
    new_vips = {fe: tuple(sorted(bs)) for fe, bs in state.lb_vips.items()}
    vips = _options_changed(_diff(old_vips, new_vips), old.lb_options, state.lb_options, old_vips, new_vips)
    pf_add, pf_remove = sorted(state.prefilter - old.prefilter), sorted(old.prefilter - state.prefilter)
    if not (services or vips or pf_add or pf_remove):
        return plan
    ids, refs = last.backend_ids, last.refs
    touched = set()
    for _frontend, was, want in (*services, *vips):
        refs.update(want or ())
        refs.subtract(was or ())
        touched.update(want or (), was or ())
    new = {}
    for b in sorted(touched):
        if refs[b] > 0 and b not in ids:
            ids[b] = new[b] = last.next_backend
            last.next_backend += 1
    unused = sorted(b for b in touched if refs[b] <= 0)
    with datapath.open_map(m.BackendsMap) as bm, datapath.open_map(m.ServicesMap) as sm, \
            datapath.open_map(m.LbVipsMap) as lm, datapath.open_map(m.PrefilterMap) as pm, \
            datapath.open_map(m.LbAffinityMap) as am:
        # 1. every entry to change holds what the last apply left there
        live_svc = {}
        for fe, was, _want in services:
            live_svc[fe] = sm.get(*fe)
            expect = (m.Service(last.svc_ids[fe], tuple(ids[b] for b in was), old.affinity.get(fe, 0))
                      if was is not None else None)
            if live_svc[fe] != expect:
                raise Drift(f"service {frontend_text(fe)} holds {live_svc[fe]}, the last apply left {expect}")
        for fe, was, _want in vips:
            entry = lm.entry(*fe)
            live = (entry[0], set(entry[1]) if entry[0] else set(), entry[2]) if entry else None
            if live != ((len(was), {ids[b] for b in was}, old.lb_options.get(fe, m.LbOptions()))
                        if was is not None else None):
                raise Drift(f"LB VIP {frontend_text(fe)} is not what the last apply left there")
        for i in new.values():
            if bm.get(i) is not None:
                raise Drift(f"backend id {i} is taken")
        for b in unused:
            if bm.get(ids[b]) != b:
                raise Drift(f"backend {ids[b]} is not {b.ip}:{b.port}/{b.proto}")
        if pf_add or pf_remove:     # an LPM trie has no exact lookup: read it (prefilter changes are rare)
            cidrs = pm.cidrs()
            if cidrs.intersection(pf_add) or not cidrs.issuperset(pf_remove):
                raise Drift(f"prefilter holds {sorted(cidrs.intersection(pf_add))}, lacks "
                            f"{sorted(set(pf_remove) - cidrs)}")
        # 2. the writes, in the order a full apply makes them: backends, frontends, then what is unused
        for b, i in new.items():    # (batch updates take no BPF_NOEXIST)
            _no_clash(f"backend id {i} is taken", bm.put, i, b, lb.BPF_NOEXIST)
        for fe, was, want in services:
            if want is None:
                sm.delete(*fe)
                del last.svc_ids[fe]
            else:
                if fe not in last.svc_ids:
                    last.svc_ids[fe], last.next_svc = last.next_svc, last.next_svc + 1
                sm.put(*fe, m.Service(last.svc_ids[fe], tuple(ids[b] for b in want), state.affinity.get(fe, 0)),
                       old=live_svc[fe])
            plan.frontend("services", fe, want, was, frontend_options("services", state, fe),
                          frontend_options("services", old, fe) if was is not None else None)
        forget = {}     # VIPs that had affinity -> the backend ids their clients may keep (None: none)
        for fe, was, want in vips:
            sticky = was is not None and old.lb_options.get(fe, m.LbOptions()).affinity_timeout
            if want is None:
                lm.delete(*fe)
                if sticky:
                    forget[fe] = None
                plan.frontend("lb_vips", fe, None, was)
                continue
            backends, options = state.lb_vips[fe], state.lb_options.get(fe, m.LbOptions())
            lm.put(*fe, {ids[b]: b for b in backends}, options)
            if sticky:
                forget[fe] = {ids[b] for b in backends} if options.affinity_timeout else None
            plan.frontend("lb_vips", fe, backends, was, frontend_options("lb_vips", state, fe),
                          frontend_options("lb_vips", old, fe) if was is not None else None)
        for i, cidr in enumerate(pf_add):     # rule ids as a full apply numbers them
            pm.put(cidr, i + 1)
        for cidr in pf_remove:
            pm.delete(cidr)
        plan.prefilter(pf_add, pf_remove)
        if forget:
            am.forget(forget)
        for b in unused:
            del refs[b]
            bm.delete(ids.pop(b))
    return plan


def _no_clash(what: str, write, *args) -> None:
    """A BPF_NOEXIST write; an existing entry means the maps are not what the last apply left."""
    try:
        write(*args)
    except lb.BpfError as e:
        if e.errno == errno.EEXIST:
            raise Drift(what) from None
        raise
