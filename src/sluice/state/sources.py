"""The node's desired state from its two sources: the state file the Ansible roles write (the
infrastructure: node, routing, prefilter, static services and LB VIPs) and the Kubernetes API
(Services, as sluice.k8s turns them into frontends; the agent keeps the last of them in a cache
directory, one file per Service, so a change costs one small write).

The one rule where they meet: the inventory wins. A frontend (address:port/protocol) the state file
serves is never taken over by a Service, nor a pod CIDR it routes (or overlaps) by a Node; the Service's
frontend or the Node's route is left out and named in the conflicts, which the agent reports in its
health and logs. The API's routes add the Nodes the inventory does not know (yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import tempfile
from typing import Callable
from dataclasses import dataclass, field

from .. import maps as m
from .plan import frontend_options
from .schema import Backend, DesiredState, Frontend, StateError, _cidr, _frontends, _ip, read_json

DEFAULT_KUBERNETES_CACHE = "/var/lib/sluice/kubernetes"


@dataclass
class ApiFrontends:
    """What the Kubernetes API asks of this node's datapath: of one Service, or of all of them."""

    services: dict[Frontend, tuple[Backend, ...]] = field(default_factory=dict)     # socket LB
    lb_vips: dict[Frontend, tuple[Backend, ...]] = field(default_factory=dict)      # XDP LB
    owner: dict[Frontend, str] = field(default_factory=dict)                        # frontend -> namespace/name
    affinity: dict[Frontend, int] = field(default_factory=dict)                     # ClientIP affinity (s)
    lb_options: dict[Frontend, m.LbOptions] = field(default_factory=dict)           # where not default
    routes: dict[str, str] = field(default_factory=dict)        # other Nodes' pod CIDR -> InternalIP

    def document(self) -> dict:
        """As the `services` and `lb_vips` sections of a state document (the cache's form)."""
        def section(name: str, frontends: dict) -> list[dict]:
            return [{"name": self.owner.get(fe, ""), "vip": fe[0], "port": fe[1], "protocol": fe[2],
                     "backends": [{"ip": b.ip, "port": b.port} for b in backends],
                     **{k: v for k, v in frontend_options(name, self, fe).items() if v}}
                    for fe, backends in sorted(frontends.items())]
        return {"services": section("services", self.services), "lb_vips": section("lb_vips", self.lb_vips)}

    @classmethod
    def parse(cls, raw, where: str = "kubernetes") -> "ApiFrontends":
        if not isinstance(raw, dict):
            raise StateError(f"{where}: expected a JSON object")
        api = cls()
        api.services = _frontends(raw.get("services") or [], f"{where}.services", api.affinity)
        api.lb_vips = _frontends(raw.get("lb_vips") or [], f"{where}.lb_vips", lb_options=api.lb_options)
        for section in ("services", "lb_vips"):
            for s in raw.get(section) or []:
                api.owner.setdefault((s["vip"], s["port"], s.get("protocol", "tcp")), s.get("name", ""))
        return api

    @classmethod
    def load(cls, directory: str) -> "ApiFrontends | None":
        """The cache: one file per Service (save_service). None when there is no cache."""
        try:
            names = sorted((n for n in os.listdir(directory) if n.endswith(".json")), key=lambda n: n[:-5])
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {directory}: {e.strerror}") from None
        api = cls(routes=_load_routes(directory))
        for name in names:
            path = os.path.join(directory, name)
            api.add(cls.parse(read_json(path), path))
        return api

    def add(self, part: "ApiFrontends") -> None:
        """One Service's frontends, unless a Service added before has them (Services are added in the
        order of `precedence`: the first one wins)."""
        for section, options in (("services", "affinity"), ("lb_vips", "lb_options")):
            for fe, backends in getattr(part, section).items():
                if self.owner.setdefault(fe, part.owner[fe]) == part.owner[fe]:
                    getattr(self, section)[fe] = backends
                    if fe in getattr(part, options):
                        getattr(self, options)[fe] = getattr(part, options)[fe]


def precedence(service: str) -> str:
    """Of two Services asking for one frontend, the one whose precedence sorts first gets it; also the
    name of its file in the cache (Kubernetes names never hold `_`)."""
    return service.replace("/", "_")


def cache_file(directory: str, service: str) -> str:
    return os.path.join(directory, precedence(service) + ".json")


ROUTES_FILE = "nodes.routes"    # not *.json: no Service's file


def _load_routes(directory: str) -> dict[str, str]:
    path = os.path.join(directory, ROUTES_FILE)
    if not os.path.exists(path):
        return {}
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("routes"), dict):
        raise StateError(f"{path}: expected an object with a 'routes' object")
    return {str(_cidr(c, f"{path}: routes")): _ip(nh, f"{path}: routes[{c}]") for c, nh in raw["routes"].items()}


def save_routes(directory: str, routes: dict[str, str]) -> None:
    _write(os.path.join(directory, ROUTES_FILE), {"routes": routes})


def prune_cache(directory: str, keep: set[str]) -> None:
    """Remove the files of Services not in `keep` (deleted while the agent was away)."""
    wanted = {os.path.basename(cache_file(directory, k)) for k in keep}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if name.endswith(".json") and name not in wanted:
                os.unlink(os.path.join(directory, name))


def save_service(directory: str, service: str, part: ApiFrontends | None) -> None:
    """Write (atomically) or, with no `part`, remove one Service's file of the cache."""
    path = cache_file(directory, service)
    if part is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    _write(path, part.document())


def _write(path: str, doc: dict) -> None:
    """Atomically: a reader never sees half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def merge(state: DesiredState, api: ApiFrontends | None,
          route_refusal: Callable[[str, str], str | None] = lambda _cidr, _nexthop: None) \
        -> tuple[DesiredState, list[str]]:
    """`state` with the API's frontends and routes added, and a message for each one the state file's own
    entries keep out (the inventory wins). A route `route_refusal` (cidr, nexthop) gives a reason against
    (Reconciler.route_check: it would cut the node off, or its nexthop is not reachable the way the node
    routes) is left out too."""
    if api is None:
        return state, []
    conflicts = []
    routes = dict(state.routes)
    taken = [ipaddress.IPv4Network(c) for c in (state.pod_cidr, *state.routes)]
    for cidr, nexthop in sorted(api.routes.items()):
        if state.routes.get(cidr) == nexthop:
            continue
        net = ipaddress.IPv4Network(cidr)
        clash = next((str(t) for t in taken if t.overlaps(net)), None)
        why = f"overlaps {clash}, which the inventory routes" if clash else route_refusal(cidr, nexthop)
        if why:
            conflicts.append(f"Node route {cidr} via {nexthop}: {why}; not programmed")
            continue
        routes[cidr] = nexthop
        taken.append(net)

    def combine(section: str, mine: dict, theirs: dict) -> dict:
        out = dict(theirs)
        for fe in mine.keys() & theirs.keys():
            conflicts.append(f"Service {api.owner.get(fe) or '?'}: {fe[0]}:{fe[1]}/{fe[2]} is served by the "
                             f"inventory's {section}, which wins; the Service's frontend is not programmed")
        out.update(mine)
        return out

    affinity = {fe: t for fe, t in api.affinity.items() if fe not in state.services}
    affinity.update(state.affinity)
    lb_options = {fe: o for fe, o in api.lb_options.items() if fe not in state.lb_vips}
    lb_options.update(state.lb_options)
    merged = dataclasses.replace(state, services=combine("services", state.services, api.services),
                                 lb_vips=combine("lb_vips", state.lb_vips, api.lb_vips), affinity=affinity,
                                 lb_options=lb_options, routes=routes)
    return merged, sorted(conflicts)
