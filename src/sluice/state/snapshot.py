"""A typed snapshot of what the live maps hold, read with one batch read of each map."""

from __future__ import annotations

from dataclasses import dataclass

from .. import maps as m
from .schema import Backend, Frontend


@dataclass
class Snapshot:
    """The maps' content in the terms of a DesiredState: frontends with their backends, not ids.
    A backend id that sl_backends lacks reads as Backend("?", 0, protocol)."""

    routes: dict[str, m.Route]                        # pod CIDR -> route
    services: dict[Frontend, tuple[Backend, ...]]     # in slot order
    lb_vips: dict[Frontend, tuple[Backend, ...]]      # sorted: a Maglev table holds a set
    prefilter: set[str]
    failsafe: set[tuple[str, int]]
    config: dict                                      # what ConfigMap.get() returns
    backends: dict[int, Backend]                      # backend id -> backend
    svc_ids: dict[Frontend, int]
    affinity: dict[Frontend, int]                     # services with ClientIP affinity -> timeout (s)
    lb_options: dict[Frontend, m.LbOptions]           # LB VIPs whose options are not the default

    @classmethod
    def read(cls, datapath) -> "Snapshot":
        with datapath.open_map(m.BackendsMap) as bm, datapath.open_map(m.ServicesMap) as sm, \
                datapath.open_map(m.LbVipsMap) as lm, datapath.open_map(m.RoutesMap) as rm, \
                datapath.open_map(m.PrefilterMap) as pm, datapath.open_map(m.ConfigMap) as cm, \
                datapath.open_map(m.FailsafeMap) as fm:
            backends = bm.items()
            svcs = sm.items()
            services = {fe: tuple(backends.get(i) or Backend("?", 0, fe[2]) for i in svc.backend_ids)
                        for fe, svc in svcs.items()}
            lb_vips, lb_options = {}, {}
            for fe, (count, table, options) in lm.tables().items():
                ids = set(table) if count else set()
                lb_vips[fe] = tuple(sorted(backends.get(i) or Backend("?", 0, fe[2]) for i in ids))
                if options != m.LbOptions():
                    lb_options[fe] = options
            return cls(routes=rm.items(), services=services, lb_vips=lb_vips, prefilter=pm.cidrs(), failsafe=fm.ports(),
                       config=cm.get(), backends=backends, svc_ids={fe: svc.svc_id for fe, svc in svcs.items()},
                       affinity={fe: svc.affinity_timeout for fe, svc in svcs.items() if svc.affinity_timeout},
                       lb_options=lb_options)

    def backend_ids(self) -> dict[Backend, int]:
        """backend -> its id in sl_backends."""
        return {b: i for i, b in self.backends.items()}
