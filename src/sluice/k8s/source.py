"""The Kubernetes API as a source of the node's desired state: Services, EndpointSlices and Nodes
watched (sluice.k8s.reflector), turned into frontends (sluice.k8s.services) one changed Service at a
time, and into routes to the other Nodes' pod CIDRs. The agent keeps them on disk
(sluice.state.sources), so that when it starts while the API server is unreachable it serves what it
last learnt. With NetworkPolicy enforced, Pods, Namespaces and NetworkPolicies are watched too, for
sluice.policy.engine.
"""

from __future__ import annotations

import logging
import threading

from .. import maps as m
from ..policy import model as pm
from ..policy.engine import PolicyInputs
from ..state import Frontend
from ..state.sources import ApiFrontends, precedence
from . import services as ks
from .client import ApiClient, Kubeconfig
from .reflector import Reflector

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
NODES = "nodes"
PATHS = {SERVICES: "/api/v1/services", ENDPOINT_SLICES: "/apis/discovery.k8s.io/v1/endpointslices",
         NODES: "/api/v1/nodes"}
TRANSFORMS = {SERVICES: ks.service_from_api, ENDPOINT_SLICES: ks.endpoint_slice_from_api, NODES: ks.node_from_api}
PODS = "pods"
NAMESPACES = "namespaces"
NETWORK_POLICIES = "networkpolicies"
POLICY_PATHS = {PODS: "/api/v1/pods", NAMESPACES: "/api/v1/namespaces",
                NETWORK_POLICIES: "/apis/networking.k8s.io/v1/networkpolicies"}

log = logging.getLogger("sluice.k8s")


def policy_from_api(obj: dict) -> pm.NetworkPolicy:
    """A policy the parser refuses is logged and enforced as its fail-closed reading, never widened."""
    try:
        return pm.policy_from_api(obj)
    except pm.PolicyError as e:
        log.warning("%s: enforced so that it allows less, not more", e)
        return e.policy


POLICY_TRANSFORMS = {PODS: pm.pod_from_api, NAMESPACES: pm.namespace_from_api, NETWORK_POLICIES: policy_from_api}


class KubernetesSource:
    """Frontends of every Service for the node `node_name` (underlay address `node_ip`).

    Reflector threads mark Services dirty; `wait_changed()` blocks until something changed and
    `frontends()` recomputes only the dirty Services. `frontends()` is only meaningful once `synced`."""

    def __init__(self, client: ApiClient, node_name: str, node_ip: str, network_policy: bool = False):
        self.node_name = node_name
        self.node_ip = node_ip
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.reflectors = {name: Reflector(client, name, PATHS[name], TRANSFORMS[name], self._on_change, self.lock)
                           for name in PATHS}
        self.policy_reflectors = {name: Reflector(client, name, POLICY_PATHS[name], POLICY_TRANSFORMS[name],
                                                  self._on_change, self.lock)
                                  for name in (POLICY_PATHS if network_policy else ())}
        self._policy_dirty = True
        self._slice_owner: dict[str, str] = {}            # EndpointSlice key -> its Service's key
        self._slices_of: dict[str, set[str]] = {}          # Service key -> its EndpointSlices' keys
        self._dirty: set[str] = set()
        self._all_dirty = True
        self._per_service: dict[str, ApiFrontends] = {}    # Service key -> its frontends
        self._claims: dict[Frontend, set[str]] = {}         # frontend -> the Services asking for it
        self.api = ApiFrontends()                           # every Service's frontends
        self.routes_changed = False

    @classmethod
    def from_kubeconfig(cls, path: str, node_name: str, node_ip: str, network_policy: bool = False) -> "KubernetesSource":
        return cls(ApiClient(Kubeconfig.load(path)), node_name, node_ip, network_policy)

    def set_node(self, node_name: str, node_ip: str) -> None:
        """This node's name and address, as the state file gives them now."""
        with self.lock:
            if (node_name, node_ip) != (self.node_name, self.node_ip):
                self.node_name, self.node_ip, self._all_dirty = node_name, node_ip, True

    def start(self, stop: threading.Event) -> None:
        for r in (*self.reflectors.values(), *self.policy_reflectors.values()):
            r.start(stop)

    @property
    def synced(self) -> bool:
        return all(r.synced for r in self.reflectors.values())

    def _on_change(self, name: str, keys: set[str]) -> None:
        """Called by a reflector with the lock held."""
        if name in (NODES, *POLICY_PATHS):
            self._policy_dirty = True
        if name in POLICY_PATHS:
            self.changed.notify_all()
            return
        if name == SERVICES:
            self._dirty |= keys
        elif name == ENDPOINT_SLICES:
            store = self.reflectors[ENDPOINT_SLICES].store
            for key in keys:
                old = self._slice_owner.pop(key, None)
                if old:
                    self._slices_of.get(old, set()).discard(key)
                    self._dirty.add(old)
                new = store.get(key)
                if new is not None:
                    self._slice_owner[key] = new.service
                    self._slices_of.setdefault(new.service, set()).add(key)
                    self._dirty.add(new.service)
        else:
            self._all_dirty = True              # routes; NodePorts answer on every node's addresses
        self.changed.notify_all()

    def wait_changed(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self._dirty or self._all_dirty, timeout)

    def frontends(self) -> dict[str, ApiFrontends | None]:
        """Bring `api` (every Service's frontends, the other Nodes' routes) up to date with the changes since
        the last call; returns the Services whose frontends changed, with their new ones (None: no frontend
        any more). `routes_changed` says whether the routes did."""
        with self.lock:
            services = self.reflectors[SERVICES].store
            slices = self.reflectors[ENDPOINT_SLICES].store
            nodes = self.reflectors[NODES].store
            dirty = set(services) | set(self._per_service) if self._all_dirty else self._dirty
            self.routes_changed = False
            if self._all_dirty:         # only a Node (or this node's own) change moves the routes
                routes = {n.pod_cidr: n.addresses[0] for name, n in nodes.items()
                          if name != self.node_name and n.pod_cidr and n.addresses}
                self.routes_changed, self.api.routes = routes != self.api.routes, routes
            self._dirty, self._all_dirty = set(), False
            changed = {}
            for key in dirty:
                svc = services.get(key)
                new = None if svc is None else self._service(key, svc, [slices[k] for k in
                                                                        sorted(self._slices_of.get(key, ()))], nodes)
                old = self._per_service.get(key)
                if new == old:
                    continue
                changed[key] = new
                if old is not None:
                    self._release(key, old)
                if new is None:
                    del self._per_service[key]
                else:
                    self._per_service[key] = new
                    self._claim(key, new)
        return changed

    @property
    def policy_synced(self) -> bool:
        return bool(self.policy_reflectors) and all(r.synced for r in (*self.policy_reflectors.values(),
                                                                       self.reflectors[NODES]))

    def wait_policy_changed(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self._policy_dirty and self.policy_synced, timeout)

    def policy_inputs(self) -> PolicyInputs:
        """The stores NetworkPolicy is resolved from, as they are now (their values are immutable)."""
        with self.lock:
            self._policy_dirty = False
            stores = {name: dict(r.store) for name, r in self.policy_reflectors.items()}
            nodes = {name: n.addresses for name, n in self.reflectors[NODES].store.items()}
        return PolicyInputs(stores[PODS], stores[NAMESPACES], stores[NETWORK_POLICIES], nodes)

    def service_keys(self) -> set[str]:
        """The Services that have frontends (whether or not another Service holds some of them)."""
        return set(self._per_service)

    def _service(self, key: str, svc: ks.Service, slices: list, nodes: dict) -> ApiFrontends | None:
        sock, xdp = ks.service_frontends(svc, slices, self.node_name, self.node_ip, nodes)
        if not (sock or xdp):
            return None
        owner = dict.fromkeys((*sock, *xdp), key)
        affinity = dict.fromkeys(sock, svc.affinity_timeout) if svc.affinity_timeout else {}
        # the XDP LB serves clients from outside: externalTrafficPolicy is theirs
        options = m.LbOptions(svc.local_external, svc.affinity_timeout)
        lb_options = dict.fromkeys(xdp, options) if options != m.LbOptions() else {}
        return ApiFrontends(sock, xdp, owner, affinity, lb_options)

    # Two Services may ask for one frontend (an external IP, say): the one of first precedence gets it, as
    # when the cache is loaded; when it lets go, the next one takes over.

    def _claim(self, key: str, part: ApiFrontends) -> None:
        for fe in part.owner:
            claims = self._claims.setdefault(fe, set())
            claims.add(key)
            if min(claims, key=precedence) == key:
                self._install(fe, part)

    def _release(self, key: str, part: ApiFrontends) -> None:
        for fe in part.owner:
            claims = self._claims[fe]
            claims.discard(key)
            if self.api.owner.get(fe) != key:
                continue
            for section in (self.api.services, self.api.lb_vips, self.api.affinity, self.api.lb_options,
                            self.api.owner):
                section.pop(fe, None)
            if claims:
                self._install(fe, self._per_service[min(claims, key=precedence)])
            else:
                del self._claims[fe]

    def _install(self, fe: Frontend, part: ApiFrontends) -> None:
        self.api.owner[fe] = part.owner[fe]
        for mine, theirs in ((self.api.services, part.services), (self.api.lb_vips, part.lb_vips),
                             (self.api.affinity, part.affinity), (self.api.lb_options, part.lb_options)):
            if fe in theirs:
                mine[fe] = theirs[fe]
            else:
                mine.pop(fe, None)

    def health(self) -> dict:
        with self.lock:
            return {"synced": self.synced,
                    "watches": {name: {"synced": r.synced, "objects": len(r.store), "error": r.error,
                                       "resource_version": r.resource_version, "relists": r.relists,
                                       "events": r.events}
                                for name, r in (*self.reflectors.items(), *self.policy_reflectors.items())}}
