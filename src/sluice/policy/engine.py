"""The agent's NetworkPolicy: what the API says (Pods, Namespaces, NetworkPolicies, Nodes), resolved for this
node (sluice.policy.resolve) and written into the datapath's policy maps as the difference from what they
hold. Nothing is flushed when the agent starts: the maps are read back once and only what differs is
written, so connections and policies carry on across a restart.

Writes go in the order that never denies what both the old and the new policies allow: new entries, ipBlock
prefixes and identities first, then the isolation of pods, then what is no longer allowed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Mapping, NamedTuple

from .. import maps as m
from .model import Namespace, NetworkPolicy, Pod
from .resolve import Identities, Resolution, resolve

log = logging.getLogger("sluice.policy")

CT_GC_INTERVAL = 30.0       # seconds between removals of expired sl_ct entries


class PolicyInputs(NamedTuple):
    pods: Mapping[str, Pod]
    namespaces: Mapping[str, Namespace]
    policies: Mapping[str, NetworkPolicy]
    nodes: Mapping[str, tuple[str, ...]]        # node name -> InternalIPs


class Applied(NamedTuple):
    """What the policy maps hold."""

    ipcache: dict[str, int]
    cidrs: dict[str, int]
    isolation: dict[str, int]
    entries: frozenset


class PolicyEngine:
    def __init__(self, datapath, node_name: str, identities_path: str):
        self.dp = datapath
        self.node_name = node_name
        self.identities_path = identities_path
        self.lock = threading.Lock()
        try:
            self.identities = Identities.load(identities_path)
        except (OSError, ValueError) as e:
            log.error("starting identities afresh: %s", e)
            self.identities = Identities()
        self.local: dict[str, str] = {}         # the CNI's pods: address -> namespace/name
        self.inputs: PolicyInputs | None = None
        self.resolution: Resolution | None = None
        self._applied: Applied | None = None
        self._last_gc = time.monotonic()
        self.health = {"synced": False, "policies": 0, "isolated_endpoints": 0, "entries": 0, "identities": 0,
                       "last_apply": None, "last_apply_seconds": None, "last_apply_changes": None, "last_error": None,
                       "ct_expired": 0}

    def update(self, inputs: PolicyInputs) -> None:
        """Resolve `inputs` (the API's stores) and bring the maps in line."""
        with self.lock:
            self.inputs = inputs
            self._apply()

    def endpoint_added(self, address: str, pod: str) -> None:
        """The CNI gave `address` to pod namespace/name: its policies are in the maps before the runtime starts
        the pod's containers, when the API's objects are known. Only a policy of its own namespace can isolate
        it; without one, the API's next change brings the pod's address in."""
        namespace = pod.partition("/")[0]
        with self.lock:
            self.local[address] = pod
            if self.inputs is not None and any(p.namespace == namespace for p in self.inputs.policies.values()):
                self._apply()

    def endpoint_deleted(self, pod: str) -> None:
        """The CNI took pod namespace/name's address back: an isolation of it goes at once, before the address
        can be another pod's."""
        with self.lock:
            gone = [a for a, p in self.local.items() if p == pod]
            for address in gone:
                del self.local[address]
            isolated = self.resolution.isolation if self.resolution is not None else {}
            if self.inputs is not None and any(a in isolated for a in gone):
                self._apply()

    def _apply(self) -> None:
        started = time.monotonic()
        try:
            res = resolve(self.inputs.pods, self.inputs.namespaces, self.inputs.policies, self.inputs.nodes,
                          self.node_name, dict(self.local), self.identities)
            changes = self._write(res)
            self.identities.release_unused(res.keys)
            self.identities.save(self.identities_path)
        except Exception as e:  # noqa: BLE001 - the agent keeps enforcing what the maps hold and says why
            log.exception("applying NetworkPolicies failed")
            self.health["last_error"] = str(e)
            self._applied = None        # read the maps back next time
            return
        self.resolution = res
        self.health.update(synced=True, policies=len(self.inputs.policies), isolated_endpoints=len(res.isolation),
                           entries=len(res.entries), identities=len(self.identities.ids), last_apply=time.time(),
                           last_apply_seconds=round(time.monotonic() - started, 4), last_apply_changes=changes,
                           last_error=None)

    def _write(self, res: Resolution) -> int:
        """Returns how many entries it wrote or removed."""
        with self.dp.open_map(m.PolicyMap) as pm, self.dp.open_map(m.PolicyCidrsMap) as cm, \
                self.dp.open_map(m.IpcacheMap) as im, self.dp.open_map(m.PolicyIsolationMap) as iso:
            have = self._applied or Applied(im.items(), cm.items(), iso.items(), frozenset(pm.entries()))
            entries = frozenset(res.entries)
            added, gone = entries - have.entries, have.entries - entries
            pm.add(added)
            changes = len(added) + len(gone) + cm.sync(res.cidrs, have.cidrs) + im.sync(res.ipcache, have.ipcache)
            changes += iso.sync(res.isolation, have.isolation)
            pm.discard(gone)
        self._applied = Applied(dict(res.ipcache), dict(res.cidrs), dict(res.isolation), entries)
        return changes

    def gc_conntrack(self) -> None:
        """Remove expired connection-tracking entries, every CT_GC_INTERVAL seconds."""
        if time.monotonic() - self._last_gc < CT_GC_INTERVAL:
            return
        self._last_gc = time.monotonic()
        with self.dp.open_map(m.CtMap) as ct:
            self.health["ct_expired"] += ct.expire()

    def pods_of(self) -> dict[str, str]:
        """Local pod address -> namespace/name, as the last resolution had them."""
        with self.lock:
            pods = dict(self.local)
            if self.inputs is not None:
                for key, pod in self.inputs.pods.items():
                    if pod.node == self.node_name and not pod.host_network:
                        pods.update(dict.fromkeys(pod.ips, key))
            return pods

    def explain(self, pod: str) -> dict:
        """`sluice policy POD`: what the last resolution says of the pod, and its policy drops so far."""
        with self.lock:
            if self.resolution is None:
                return {"pod": pod, "error": "no NetworkPolicy resolved yet (the API's objects are not listed yet)"}
            out = self.resolution.explain(pod)
        drops = self.drops()
        out["drops"] = {direction: drops.get((pod, direction), 0) for direction in ("ingress", "egress")}
        return out

    def drops(self) -> dict[tuple[str, str], int]:
        """{(namespace/name or address, direction): packets} the policies dropped."""
        names = self.pods_of()
        out: dict[tuple[str, str], int] = {}
        with self.dp.open_map(m.PolicyDropsMap) as dm:
            for (address, direction), (packets, _bytes) in dm.read().items():
                key = (names.get(address, address), "ingress" if direction == m.INGRESS else "egress")
                out[key] = out.get(key, 0) + packets
        return out
