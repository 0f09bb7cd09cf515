"""The Kubernetes API as a source of the node's desired state: Services, EndpointSlices and Nodes
watched (sluice.k8s.reflector), turned into frontends (sluice.k8s.services) one changed Service at a
time, and kept on disk so an agent that starts while the API server is unreachable serves what it
last learnt.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time

from ..state import Backend, Frontend
from ..state.sources import ApiFrontends
from . import services as ks
from .client import ApiClient, Kubeconfig
from .reflector import Reflector

log = logging.getLogger("sluice.k8s")

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
NODES = "nodes"
PATHS = {SERVICES: "/api/v1/services", ENDPOINT_SLICES: "/apis/discovery.k8s.io/v1/endpointslices",
         NODES: "/api/v1/nodes"}
TRANSFORMS = {SERVICES: ks.service_from_api, ENDPOINT_SLICES: ks.endpoint_slice_from_api, NODES: ks.node_from_api}

Frontends = dict[Frontend, tuple[Backend, ...]]


class KubernetesSource:
    """Frontends of every Service for the node `node_name` (underlay address `node_ip`).

    Reflector threads mark Services dirty; `wait_changed()` blocks until something changed and
    `frontends()` recomputes only the dirty Services. `frontends()` is only meaningful once `synced`."""

    def __init__(self, client: ApiClient, node_name: str, node_ip: str, cache_file: str):
        self.node_name = node_name
        self.node_ip = node_ip
        self.cache_file = cache_file
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.reflectors = {name: Reflector(client, name, PATHS[name], TRANSFORMS[name], self._on_change, self.lock)
                           for name in PATHS}
        self._slice_owner: dict[str, str] = {}            # EndpointSlice key -> its Service's key
        self._slices_of: dict[str, set[str]] = {}          # Service key -> its EndpointSlices' keys
        self._dirty: set[str] = set()
        self._all_dirty = True
        self._per_service: dict[str, tuple[Frontends, Frontends]] = {}
        self.last_change: float | None = None

    @classmethod
    def from_kubeconfig(cls, path: str, node_name: str, node_ip: str, cache_file: str) -> "KubernetesSource":
        return cls(ApiClient(Kubeconfig.load(path)), node_name, node_ip, cache_file)

    def set_node(self, node_name: str, node_ip: str) -> None:
        """This node's name and address, as the state file gives them now."""
        with self.lock:
            if (node_name, node_ip) != (self.node_name, self.node_ip):
                self.node_name, self.node_ip, self._all_dirty = node_name, node_ip, True

    def start(self, stop: threading.Event) -> None:
        for r in self.reflectors.values():
            r.start(stop)

    @property
    def synced(self) -> bool:
        return all(r.synced for r in self.reflectors.values())

    def _on_change(self, name: str, keys: set[str]) -> None:
        """Called by a reflector with the lock held."""
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
            self._all_dirty = True              # NodePorts answer on every node's addresses
        self.last_change = time.monotonic()
        self.changed.notify_all()

    def wait_changed(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self._dirty or self._all_dirty, timeout)

    def frontends(self) -> ApiFrontends:
        """The socket and XDP LB frontends of every Service, their affinity, and which Service asks for each."""
        with self.lock:
            services = self.reflectors[SERVICES].store
            slices = self.reflectors[ENDPOINT_SLICES].store
            nodes = self.reflectors[NODES].store
            dirty = set(services) | set(self._per_service) if self._all_dirty else self._dirty
            self._dirty, self._all_dirty = set(), False
            for key in dirty:
                svc = services.get(key)
                if svc is None:
                    self._per_service.pop(key, None)
                    continue
                owned = [slices[k] for k in sorted(self._slices_of.get(key, ()))]
                self._per_service[key] = ks.service_frontends(svc, owned, self.node_name, self.node_ip, nodes)
        api = ApiFrontends()
        for key in sorted(self._per_service):
            sock, xdp = self._per_service[key]
            timeout = services[key].affinity_timeout if key in services else 0
            for fe in (*sock, *xdp):
                api.owner.setdefault(fe, key)
            for fe, backends in sock.items():
                if api.owner[fe] == key:
                    api.services[fe] = backends
                    if timeout:
                        api.affinity[fe] = timeout
            for fe, backends in xdp.items():
                if api.owner[fe] == key:
                    api.lb_vips[fe] = backends
        return api

    def health(self) -> dict:
        with self.lock:
            return {"synced": self.synced,
                    "watches": {name: {"synced": r.synced, "objects": len(r.store), "error": r.error,
                                       "resource_version": r.resource_version, "relists": r.relists,
                                       "events": r.events}
                                for name, r in self.reflectors.items()}}


def document(api: ApiFrontends) -> dict:
    """The API's frontends as the `services` and `lb_vips` sections of a state document."""
    def section(frontends: Frontends) -> list[dict]:
        return [{"name": api.owner.get(fe, ""), "vip": fe[0], "port": fe[1], "protocol": fe[2],
                 "backends": [{"ip": b.ip, "port": b.port} for b in backends],
                 **({"affinity_timeout": api.affinity[fe]} if fe in api.affinity else {})}
                for fe, backends in sorted(frontends.items())]
    return {"services": section(api.services), "lb_vips": section(api.lb_vips)}


def save_cache(path: str, doc: dict) -> None:
    """Atomically: a reader never sees half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".kubernetes-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
