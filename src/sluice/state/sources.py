"""The node's desired state from its two sources: the state file the Ansible roles write (the
infrastructure: node, routing, prefilter, static services and LB VIPs) and the Kubernetes API
(Services, as sluice.k8s turns them into frontends; the agent keeps the last of them in a cache file).

The one rule where they meet: the inventory wins. A frontend (address:port/protocol) the state file
serves is never taken over by a Service; the Service's frontend is left out and named in the conflicts,
which the agent reports in its health and logs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .schema import Backend, DesiredState, Frontend, StateError, _frontends

DEFAULT_KUBERNETES_CACHE = "/var/lib/sluice/kubernetes.json"


@dataclass
class ApiFrontends:
    """What the Kubernetes API asks of this node's datapath."""

    services: dict[Frontend, tuple[Backend, ...]] = field(default_factory=dict)     # socket LB
    lb_vips: dict[Frontend, tuple[Backend, ...]] = field(default_factory=dict)      # XDP LB
    owner: dict[Frontend, str] = field(default_factory=dict)                        # frontend -> namespace/name
    affinity: dict[Frontend, int] = field(default_factory=dict)                     # ClientIP affinity (s)

    @classmethod
    def parse(cls, raw, where: str = "kubernetes") -> "ApiFrontends":
        """From a document with `services` and `lb_vips` sections (the cache file's form)."""
        if not isinstance(raw, dict):
            raise StateError(f"{where}: expected a JSON object")
        api = cls()
        api.services = _frontends(raw.get("services") or [], f"{where}.services", api.affinity)
        api.lb_vips = _frontends(raw.get("lb_vips") or [], f"{where}.lb_vips")
        for section in ("services", "lb_vips"):
            for s in raw.get(section) or []:
                api.owner.setdefault((s["vip"], s["port"], s.get("protocol", "tcp")), s.get("name", ""))
        return api

    @classmethod
    def load(cls, path: str) -> "ApiFrontends | None":
        """The cache file, or None when there is none."""
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateError(f"{path} is not valid JSON: {e}") from None
        return cls.parse(raw, path)


def merge(state: DesiredState, api: ApiFrontends | None) -> tuple[DesiredState, list[str]]:
    """`state` with the API's frontends added, and a message for each one the state file's own entries
    keep out (the inventory wins)."""
    if api is None:
        return state, []
    conflicts = []

    def combine(section: str, mine: dict, theirs: dict) -> dict:
        out = dict(theirs)
        for fe in mine.keys() & theirs.keys():
            conflicts.append(f"Service {api.owner.get(fe) or '?'}: {fe[0]}:{fe[1]}/{fe[2]} is served by the "
                             f"inventory's {section}, which wins; the Service's frontend is not programmed")
        out.update(mine)
        return out

    affinity = {fe: t for fe, t in api.affinity.items() if fe not in state.services}
    affinity.update(state.affinity)
    merged = dataclasses.replace(state, services=combine("services", state.services, api.services),
                                 lb_vips=combine("lb_vips", state.lb_vips, api.lb_vips), affinity=affinity)
    return merged, sorted(conflicts)
