"""The Reconciler: plans and applies a DesiredState against a loaded datapath.

The full reconcile reads every map once (a Snapshot), computes the plan from it, then
writes only what the plan changes; update() takes the delta path (sluice.state.delta)
when only services, LB VIPs or prefilter CIDRs changed since the state it applied last.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from .. import maps as m
from .. import netlink
from ..datapath import NIC_PROG
from . import delta
from .plan import Plan, frontend_options
from .schema import Backend, DesiredState, Frontend, StateError
from .snapshot import Snapshot

log = logging.getLogger("sluice.state")

# rtnetlink protocol id marking the kernel routes Sluice owns. Unassigned in iproute2's
# rt_protos (186 would be bgp, whose routes a BGP daemon owns); the node role names it
# "sluice" in /etc/iproute2/rt_protos.d so `ip route` shows `proto sluice`.
ROUTE_PROTO = 217


class Reconciler:
    """Computes and applies plans against a loaded datapath (sluice.datapath.Datapath).

    plan() and apply() work against the live maps: one read of every map (batch lookups), the plan
    from that snapshot, then the writes; what a user or Ansible sees is exactly what is pending.
    update() is the agent's path for a new state file: it applies only what differs from the state this
    Reconciler applied last, checking every entry it changes against what that apply left there, and
    falls back to apply() when anything else changed or a map is not what it left (drift)."""

    def __init__(self, datapath):
        self.dp = datapath
        self.applied: delta.Applied | None = None
        self.last_kind: str | None = None       # "full" or "delta": what the last apply()/update() did

    def current(self) -> Snapshot:
        """What the maps hold now."""
        return Snapshot.read(self.dp)

    def _route_target(self, state: DesiredState) -> tuple[int, bool]:
        """(ifindex, tunnel) routes go through; 0 for a VXLAN device the plan still has to add."""
        tunnel = state.routing_mode == "vxlan"
        dev = state.vxlan_device if tunnel else state.nic
        try:
            return socket.if_nametoindex(dev), tunnel
        except OSError:
            if tunnel:
                return 0, tunnel
            raise StateError(f"node.nic: interface {dev!r} does not exist on this node") from None

    @staticmethod
    def _plan_tunnel(state: DesiredState, plan: Plan) -> None:
        """The collect_md VXLAN device exists exactly in VXLAN mode."""
        exists = netlink.exists(state.vxlan_device)
        if state.routing_mode == "vxlan" and not exists:
            plan.add("tunnel", "add", {"device": state.vxlan_device, "port": state.vxlan_port})
        elif state.routing_mode != "vxlan" and exists:
            plan.add("tunnel", "remove", {"device": state.vxlan_device})

    def _apply_tunnel(self, state: DesiredState) -> None:
        if state.routing_mode == "vxlan":
            netlink.ensure_vxlan(state.vxlan_device, state.vxlan_port, state.nic)
            # Decapsulated packets for local pods: redirect_peer, as on the NIC.
            self.dp.attach_tc(state.vxlan_device, NIC_PROG)
        elif netlink.exists(state.vxlan_device):
            self.dp.detach_device(state.vxlan_device)
            netlink.delete_link(state.vxlan_device)

    @staticmethod
    def check_node(state: DesiredState) -> None:
        """What the state asks of this node that parsing cannot check: the NIC exists, and every route can
        be programmed without cutting the node off (route_check: else the kernel refuses the route after
        the maps were already written, or the node's own packets follow it)."""
        try:
            socket.if_nametoindex(state.nic)
        except OSError:
            raise StateError(f"node.nic: interface {state.nic!r} does not exist on this node") from None
        if state.routes:
            refusal = Reconciler.route_check(state)
            for cidr, nexthop in sorted(state.routes.items()):
                why = refusal(cidr, nexthop)
                if why:
                    raise StateError(f"routes ({cidr}): {why}")

    @staticmethod
    def route_check(state: DesiredState):
        """Why a route (cidr via nexthop) cannot be programmed on this node, or None. Its prefix may not
        overlap a network directly connected to the NIC (the node's packets to its neighbours there, its
        answers to the controller among them, would follow the route) nor hold the node's own address
        (tc_from_pod would send pods' packets to the node away); another node's pod CIDR never does. In
        native routing the nexthop must be directly reachable through the NIC."""
        networks = []
        node_ip = ipaddress.IPv4Address(state.node_ip)

        def refusal(cidr: str, nexthop: str) -> str | None:
            if not networks:
                networks.extend(netlink.connected_networks(state.nic))
            net = ipaddress.IPv4Network(cidr)
            # A gateway-less default route makes every address on-link: overlapping it tells nothing.
            taken = next((n for n in networks if n.prefixlen and n.overlaps(net)), None)
            if taken:
                return (f"overlaps {taken}, a network directly connected to {state.nic}: this node's packets to "
                        f"the hosts on it (its answers to the controller or the other nodes there) would follow the "
                        f"route via {nexthop} instead of reaching them directly")
            if node_ip in net:
                return (f"holds this node's own address {state.node_ip}: its pods' packets to the node (answers to "
                        f"kubelet's probes among them) would be sent via {nexthop}")
            if state.routing_mode == "native" and not any(ipaddress.IPv4Address(nexthop) in n for n in networks):
                return (f"nexthop {nexthop} is not on a network of {state.nic}; native routing needs the other "
                        "nodes directly reachable through the NIC")
            return None
        return refusal

    def plan(self, state: DesiredState) -> Plan:
        """What applying `state` changes, against the live maps and kernel routes."""
        self.check_node(state)
        return self._plan(state, self.current(), netlink.owned_routes(ROUTE_PROTO))

    def _plan(self, state: DesiredState, snap: Snapshot, kernel: dict) -> Plan:
        plan = Plan()
        self._plan_tunnel(state, plan)
        ifindex, tunnel = self._route_target(state)
        want_routes = {c: m.Route(nh, ifindex, tunnel, state.vni if tunnel else 0) for c, nh in state.routes.items()}
        for cidr, route in sorted(want_routes.items()):
            have = snap.routes.get(cidr)
            if have is None:
                plan.add("routes", "add", {"cidr": cidr, "nexthop": route.nexthop, "mode": state.routing_mode})
            elif have != route:
                plan.add("routes", "change", {"cidr": cidr, "nexthop": route.nexthop, "mode": state.routing_mode})
        for cidr in sorted(set(snap.routes) | set(kernel)):
            if cidr not in want_routes:
                plan.add("routes", "remove", {"cidr": cidr})
        for cidr in sorted(set(want_routes) - set(kernel)):
            if cidr in snap.routes and snap.routes[cidr] == want_routes[cidr]:
                plan.add("routes", "change", {"cidr": cidr, "kernel_route": "missing"})
        for section, want, have_all in (("services", state.services, snap.services),
                                        ("lb_vips", state.lb_vips, snap.lb_vips)):
            for fe, backends in sorted(want.items()):
                have = have_all.get(fe)
                options, had = frontend_options(section, state, fe), frontend_options(section, snap, fe)
                # an LB VIP's backends are a set (its Maglev table)
                if have != (tuple(sorted(backends)) if section == "lb_vips" else backends) or options != had:
                    plan.frontend(section, fe, backends, have, options, had)
            for fe in sorted(set(have_all) - set(want)):
                plan.frontend(section, fe, None, have_all[fe])
        plan.prefilter(sorted(state.prefilter - snap.prefilter), sorted(snap.prefilter - state.prefilter))
        for kind, ports in (("add", state.failsafe - snap.failsafe), ("remove", snap.failsafe - state.failsafe)):
            for proto, port in sorted(ports):
                plan.add("failsafe", kind, f"{proto}:{port}")
        nic_ifindex = socket.if_nametoindex(state.nic)
        want_cfg = {"node_ip": state.node_ip, "nic_ifindex": nic_ifindex,
                    "cpumap": bool(state.cpumap_cpus), "cpu_count": len(state.cpumap_cpus),
                    "network_policy": state.network_policy}
        if snap.config != want_cfg:
            plan.add("config", "change", want_cfg)
        return plan

    def apply(self, state: DesiredState) -> Plan:
        """Apply `state` against the live maps: every map read once, the plan from that snapshot, then
        only what the plan changes is written. Repairs whatever changed behind Sluice's back."""
        self.check_node(state)
        self.applied = None     # unknown until this apply is through
        self.last_kind = "full"
        snap = self.current()
        kernel = netlink.owned_routes(ROUTE_PROTO)
        plan = self._plan(state, snap, kernel)
        if not plan.changed:
            self.applied = delta.Applied.after_full_apply(state, snap, snap.backend_ids(), snap.svc_ids)
            return plan
        self._apply_tunnel(state)
        ifindex, tunnel = self._route_target(state)
        with self.dp.open_map(m.RoutesMap) as rm:
            for cidr, nh in state.routes.items():
                rm.put(cidr, m.Route(nh, ifindex, tunnel, state.vni if tunnel else 0))
                # the host's own traffic (e.g. socket-LB'd to a remote backend) takes the kernel route
                if tunnel:
                    netlink.replace_route(cidr, ROUTE_PROTO, state.vxlan_device, vxlan_vni=state.vni, vxlan_dst=nh)
                else:
                    netlink.replace_route(cidr, ROUTE_PROTO, state.nic, gateway=nh)
            for cidr in (set(snap.routes) | set(kernel)) - set(state.routes):
                rm.delete(cidr)
                netlink.delete_route(cidr, ROUTE_PROTO)
        # The failsafe first: a change that adds a port and a prefilter entry never drops the port between them.
        with self.dp.open_map(m.FailsafeMap) as fm:
            for proto, port in state.failsafe - snap.failsafe:
                fm.put(proto, port)
            for proto, port in snap.failsafe - state.failsafe:
                fm.delete(proto, port)
        with self.dp.open_map(m.PrefilterMap) as pm:
            pm.put_many({c: i + 1 for i, c in enumerate(sorted(state.prefilter - snap.prefilter))})
            for cidr in snap.prefilter - state.prefilter:
                pm.delete(cidr)
        ids, svc_ids = self._apply_frontends(state, snap)
        with self.dp.open_map(m.ConfigMap) as cm, self.dp.open_map(m.CpuMap) as cpu, \
                self.dp.open_map(m.CpuListMap) as cpus:
            cm.set(state.node_ip, socket.if_nametoindex(state.nic), policy=state.network_policy)
            cpu.set_cpus(cpus, cm, list(state.cpumap_cpus))
        self.applied = delta.Applied.after_full_apply(state, snap, ids, svc_ids)
        return plan

    def _apply_frontends(self, state: DesiredState, snap: Snapshot) -> tuple[dict[Backend, int], dict[Frontend, int]]:
        """Backends first, then frontends pointing at them, then what is unused.
        Returns the ids of the backends and services in the maps now."""
        ids = snap.backend_ids()
        wanted = {b for bs in (*state.services.values(), *state.lb_vips.values()) for b in bs}
        next_id = max(ids.values(), default=0) + 1
        new = set()
        for b in sorted(wanted - set(ids)):
            ids[b] = next_id
            new.add(next_id)
            next_id += 1
        with self.dp.open_map(m.BackendsMap) as bm:
            bm.put_many({i: b for b, i in ids.items() if i in new})
        svc_ids = dict(snap.svc_ids)
        next_svc = max(svc_ids.values(), default=0) + 1
        with self.dp.open_map(m.ServicesMap) as sm:
            for fe, backends in state.services.items():
                affinity = state.affinity.get(fe, 0)
                if snap.services.get(fe) == backends and snap.affinity.get(fe, 0) == affinity:
                    continue
                if fe not in svc_ids:
                    svc_ids[fe], next_svc = next_svc, next_svc + 1
                sm.put(*fe, m.Service(svc_ids[fe], tuple(ids[b] for b in backends), affinity))
            for fe in set(snap.services) - set(state.services):
                sm.delete(*fe)
        forget = {}     # VIPs that had affinity -> the backend ids their clients may keep (None: none)
        with self.dp.open_map(m.LbVipsMap) as lm:
            for fe, backends in state.lb_vips.items():
                options, had = state.lb_options.get(fe, m.LbOptions()), snap.lb_options.get(fe, m.LbOptions())
                if snap.lb_vips.get(fe) != tuple(sorted(backends)) or had != options:
                    lm.put(*fe, {ids[b]: b for b in backends}, options)
                    if had.affinity_timeout:     # no client sticks to a backend the VIP lost
                        forget[fe] = {ids[b] for b in backends} if options.affinity_timeout else None
            for fe in set(snap.lb_vips) - set(state.lb_vips):
                lm.delete(*fe)
                if snap.lb_options.get(fe, m.LbOptions()).affinity_timeout:
                    forget[fe] = None
        if forget:
            with self.dp.open_map(m.LbAffinityMap) as am:
                am.forget(forget)
        with self.dp.open_map(m.BackendsMap) as bm:
            for b, i in ids.items():
                if b not in wanted:
                    bm.delete(i)
        return ids, svc_ids

    # ---- the agent's path: a delta from the last applied state ---------------------------

    def update(self, state: DesiredState) -> Plan:
        """Apply `state` as a change from the state this Reconciler applied last (self.applied): only the
        services, LB VIPs and prefilter CIDRs that differ are written, each checked first against what
        that apply left in the maps; the plan lists exactly those. A full apply() instead when there was
        no earlier apply, when the node, routing or routes sections changed, or when an entry to change
        is not what the last apply left there (the maps were changed behind this Reconciler's back)."""
        if self.needs_full(state):
            return self.apply(state)
        last = self.applied
        self.applied = None     # unknown until the delta is through: a failure means a full apply next time
        self.last_kind = "delta"
        try:
            plan = delta.apply_delta(self.dp, last, state)
        except delta.Drift as e:
            log.warning("the maps differ from the last applied state (%s): reconciling against the maps", e)
            return self.apply(state)
        last.state = state
        self.applied = last
        return plan

    def needs_full(self, state: DesiredState) -> bool:
        """Whether update(state) would be a full apply: no earlier apply, or the node, routing or routes
        sections differ from the state applied last."""
        last = self.applied
        return last is None or any(getattr(last.state, f) != getattr(state, f) for f in delta.STRUCTURAL)
