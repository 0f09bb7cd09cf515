"""The node's desired state: validation, a plan against the live maps, and applying it.

The Ansible roles write the state file (JSON, default /etc/sluice/state.json);
the agent reconciles the datapath to it; `sluice apply --plan FILE` shows the
plan without applying. Shape:

    {"node": {"name", "ip", "nic", "pod_cidr"},
     "routing": {"mode": "native"|"vxlan", "vxlan_device", "vxlan_port", "vni"},
     "routes": [{"cidr", "nexthop", "node"}],             other nodes' pod CIDRs
     "services": [{"name", "vip", "port", "protocol", "backends": [{"ip", "port"}]}],
     "prefilter": ["CIDR", ...],
     "lb_vips": [{"name", "vip", "port", "protocol", "backends": [...]}],
     "xdp": {"cpumap_cpus": [0, 1]}}
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import json
import logging
import operator
import socket
from collections import Counter
from dataclasses import dataclass, field

from . import maps as m
from . import netlink
from .bpf import libbpf as lb

log = logging.getLogger("sluice.state")

ROUTING_MODES = ("native", "vxlan")
PROTOCOLS = ("tcp", "udp")
DEFAULT_VXLAN_DEVICE = "sluice_vxlan"
DEFAULT_VXLAN_PORT = 4789
# rtnetlink protocol id marking the kernel routes Sluice owns. Unassigned in iproute2's
# rt_protos (186 would be bgp, whose routes a BGP daemon owns); the node role names it
# "sluice" in /etc/iproute2/rt_protos.d so `ip route` shows `proto sluice`.
ROUTE_PROTO = 217


class StateError(ValueError):
    """The desired state is invalid; the message names the bad value."""


def _canonical_ip(value) -> bool:
    """Whether `value` is already the text _ip() returns for it: inet_pton takes exactly a dotted quad
    of decimal octets without leading zeros, which ipaddress writes back unchanged. The common case,
    checked without building an IPv4Address (a state file holds tens of thousands of addresses)."""
    if not isinstance(value, str):
        return False
    try:
        socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):
        return False
    return True


def _ip(value, where: str) -> str:
    if _canonical_ip(value):
        return value
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise StateError(f"{where}: {value!r} is not an IPv4 address") from None


def _cidr(value, where: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, TypeError) as e:
        raise StateError(f"{where}: {value!r} is not an IPv4 CIDR ({e})") from None
    except ValueError:
        raise StateError(f"{where}: {value!r} has host bits set") from None


def _plain_port(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _port(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise StateError(f"{where}: port {value!r} is not an integer in 1..65535")
    return value


def _proto(value, where: str) -> str:
    if value not in PROTOCOLS:
        raise StateError(f"{where}: protocol {value!r} is not one of {', '.join(PROTOCOLS)}")
    return value


Frontend = tuple[str, int, str]          # (vip, port, protocol)
BackendT = tuple[str, int, str]          # (ip, port, protocol)


@dataclass
class DesiredState:
    node_name: str
    node_ip: str
    nic: str
    pod_cidr: str
    routing_mode: str = "native"
    vxlan_device: str = DEFAULT_VXLAN_DEVICE
    vxlan_port: int = DEFAULT_VXLAN_PORT
    vni: int = 1
    routes: dict[str, str] = field(default_factory=dict)                  # cidr -> nexthop
    services: dict[Frontend, tuple[BackendT, ...]] = field(default_factory=dict)
    prefilter: set[str] = field(default_factory=set)
    lb_vips: dict[Frontend, tuple[BackendT, ...]] = field(default_factory=dict)
    cpumap_cpus: tuple[int, ...] = ()

    @classmethod
    def from_file(cls, path: str) -> "DesiredState":
        try:
            with open(path) as f:
                raw = json.load(f)
        except OSError as e:
            raise StateError(f"cannot read state file {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateError(f"state file {path} is not valid JSON: {e}") from None
        return cls.parse(raw)

    @classmethod
    def parse(cls, raw) -> "DesiredState":
        if not isinstance(raw, dict):
            raise StateError(f"state: expected a JSON object, not {type(raw).__name__}")
        node = raw.get("node")
        if not isinstance(node, dict):
            raise StateError("state: 'node' section is missing")
        for key in ("name", "ip", "nic", "pod_cidr"):
            if not node.get(key):
                raise StateError(f"node: '{key}' is missing")
        pod_cidr = _cidr(node["pod_cidr"], "node.pod_cidr")
        routing = raw.get("routing") or {}
        mode = routing.get("mode", "native")
        if mode not in ROUTING_MODES:
            raise StateError(f"routing.mode: {mode!r} is not one of {', '.join(ROUTING_MODES)}")
        vni = routing.get("vni", 1)
        if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni < 1 << 24:
            raise StateError(f"routing.vni: {vni!r} is not in 1..16777215")
        state = cls(node_name=str(node["name"]), node_ip=_ip(node["ip"], "node.ip"), nic=str(node["nic"]),
                    pod_cidr=str(pod_cidr), routing_mode=mode,
                    vxlan_device=routing.get("vxlan_device", DEFAULT_VXLAN_DEVICE),
                    vxlan_port=_port(routing.get("vxlan_port", DEFAULT_VXLAN_PORT), "routing.vxlan_port"),
                    vni=vni)
        seen = {pod_cidr: f"this node's pod CIDR ({node['name']})"}
        for i, r in enumerate(raw.get("routes") or []):
            where = f"routes[{i}]"
            if not isinstance(r, dict):
                raise StateError(f"{where}: expected an object")
            net = _cidr(r.get("cidr"), f"{where}.cidr")
            for other, owner in seen.items():
                if net.overlaps(other):
                    raise StateError(f"{where}.cidr: {net} overlaps {other} ({owner})")
            seen[net] = f"route via {r.get('nexthop')}"
            state.routes[str(net)] = _ip(r.get("nexthop"), f"{where}.nexthop")
        state.services = _frontends(raw.get("services") or [], "services")
        state.lb_vips = _frontends(raw.get("lb_vips") or [], "lb_vips")
        state.prefilter = {str(_cidr(c, f"prefilter[{i}]")) for i, c in enumerate(raw.get("prefilter") or [])}
        cpus = (raw.get("xdp") or {}).get("cpumap_cpus") or []
        for c in cpus:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < m.possible_cpus():
                raise StateError(f"xdp.cpumap_cpus: CPU {c!r} does not exist on this node")
        state.cpumap_cpus = tuple(sorted(set(cpus)))
        return state


def _where(section: str, i: int, s) -> str:
    return f"{section}[{i}]" + (f" ({s.get('name')})" if isinstance(s, dict) and s.get("name") else "")


def _frontends(items, section: str) -> dict[Frontend, tuple[BackendT, ...]]:
    """Locations for error messages are only formatted when there is an error."""
    out: dict[Frontend, tuple[BackendT, ...]] = {}
    for i, s in enumerate(items):
        if not isinstance(s, dict):
            raise StateError(f"{_where(section, i, s)}: expected an object")
        proto = s.get("protocol", "tcp")
        if proto not in PROTOCOLS:
            _proto(proto, _where(section, i, s))
        vip, port = s.get("vip"), s.get("port")
        key = (vip if _canonical_ip(vip) else _ip(vip, f"{_where(section, i, s)}.vip"),
               port if _plain_port(port) else _port(port, f"{_where(section, i, s)}.port"),
               proto)
        if key in out:
            raise StateError(f"{_where(section, i, s)}: duplicate frontend {key[0]}:{key[1]}/{proto}")
        backends = []
        for j, b in enumerate(s.get("backends") or []):
            if isinstance(b, dict) and "port" in b:
                ip, bport = b.get("ip"), b["port"]
                if _canonical_ip(ip) and _plain_port(bport):
                    backends.append((ip, bport, proto))
                    continue
            bw = f"{_where(section, i, s)}.backends[{j}]"
            if not isinstance(b, dict) or "port" not in b:
                raise StateError(f"{bw}: backend {b!r} needs an ip and a port")
            backends.append((_ip(b.get("ip"), bw), _port(b["port"], bw), proto))
        if len(set(backends)) != len(backends):
            raise StateError(f"{_where(section, i, s)}: a backend is listed twice")
        out[key] = tuple(backends)
    return out


# ---- plan --------------------------------------------------------------------------

@dataclass
class Plan:
    """What applying a state changes, per category: add / change / remove."""

    sections: dict[str, dict[str, list]] = field(default_factory=dict)

    def add(self, section: str, kind: str, item) -> None:
        self.sections.setdefault(section, {"add": [], "change": [], "remove": []})[kind].append(item)

    @property
    def changed(self) -> bool:
        return any(v for s in self.sections.values() for v in s.values())

    def to_dict(self) -> dict:
        return {k: v for k, v in self.sections.items() if any(v.values())}

    def render(self) -> str:
        if not self.changed:
            return "No changes: the datapath matches the state."
        lines = []
        for section, kinds in self.to_dict().items():
            lines.append(f"{section}:")
            for kind, sign in (("add", "+"), ("change", "~"), ("remove", "-")):
                lines += [f"  {sign} {_fmt(i)}" for i in kinds[kind]]
        return "\n".join(lines)


def _fmt(item) -> str:
    if isinstance(item, dict):
        return " ".join(f"{k}={v}" for k, v in item.items())
    return str(item)


def _fe(f: Frontend) -> str:
    return f"{f[0]}:{f[1]}/{f[2]}"


def _be_list(backends) -> list[str]:
    return [f"{b[0]}:{b[1]}" for b in backends]


@dataclass
class Applied:
    """What a Reconciler's last apply left in the maps: the state, and the ids it gave it there."""

    state: DesiredState
    backend_ids: dict[BackendT, int]        # every backend the state uses -> its id in sl_backends
    refs: Counter                           # backend -> how many frontends (services, LB VIPs) use it
    svc_ids: dict[Frontend, int]
    next_backend: int
    next_svc: int


class Drift(Exception):
    """A map entry the delta path was about to change does not hold what the last apply left there."""


# What update() leaves to a full apply when it changes: the node, routing and routes sections.
STRUCTURAL = ("node_ip", "nic", "routing_mode", "vxlan_device", "vxlan_port", "vni", "routes", "cpumap_cpus")


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


class Reconciler:
    """Computes and applies plans against a loaded datapath (sluice.datapath.Datapath).

    plan() and apply() work against the live maps: one read of every map (batch lookups), the plan
    from that snapshot, then the writes; what a user or Ansible sees is exactly what is pending.
    update() is the agent's path for a new state file: it applies only what differs from the state this
    Reconciler applied last, checking every entry it changes against what that apply left there, and
    falls back to apply() when anything else changed or a map is not what it left (drift)."""

    def __init__(self, datapath):
        self.dp = datapath
        self.applied: Applied | None = None
        self.last_kind: str | None = None       # "full" or "delta": what the last apply()/update() did

    # current state, read back from the maps
    def current(self) -> dict:
        with self.dp.open_map(m.BackendsMap) as bm, self.dp.open_map(m.ServicesMap) as sm, \
                self.dp.open_map(m.LbVipsMap) as lm, self.dp.open_map(m.RoutesMap) as rm, \
                self.dp.open_map(m.PrefilterMap) as pm, self.dp.open_map(m.ConfigMap) as cm:
            backends = bm.tuples()
            svcs = sm.items()
            services = {fe: tuple(backends.get(i, ("?", 0, fe[2])) for i in svc.backend_ids)
                        for fe, svc in svcs.items()}
            lb_vips = {}
            for fe, (count, table) in lm.tables().items():
                ids = set(table) if count else set()
                lb_vips[fe] = tuple(sorted(backends.get(i, ("?", 0, fe[2])) for i in ids))
            return {"routes": rm.items(), "services": services, "lb_vips": lb_vips,
                    "prefilter": pm.cidrs(), "config": cm.get(), "backends": backends,
                    "svc_ids": {fe: svc.svc_id for fe, svc in svcs.items()}}

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
            self.dp.attach_tc(state.vxlan_device, "tc_from_nic")
        elif netlink.exists(state.vxlan_device):
            self.dp.detach_device(state.vxlan_device)
            netlink.delete_link(state.vxlan_device)

    @staticmethod
    def check_node(state: DesiredState) -> None:
        """What the state asks of this node that parsing cannot check: the NIC exists and, in native
        routing, every nexthop is on a network of the NIC (else the kernel refuses the route after
        the maps were already written)."""
        try:
            socket.if_nametoindex(state.nic)
        except OSError:
            raise StateError(f"node.nic: interface {state.nic!r} does not exist on this node") from None
        if state.routing_mode == "native" and state.routes:
            connected = netlink.connected_networks(state.nic)
            for cidr, nexthop in sorted(state.routes.items()):
                if not any(ipaddress.IPv4Address(nexthop) in net for net in connected):
                    raise StateError(f"routes ({cidr}): nexthop {nexthop} is not on a network of {state.nic}; "
                                     "native routing needs the other nodes directly reachable through the NIC")

    def plan(self, state: DesiredState) -> Plan:
        """What applying `state` changes, against the live maps and kernel routes."""
        self.check_node(state)
        return self._plan(state, self.current(), netlink.owned_routes(ROUTE_PROTO))

    def _plan(self, state: DesiredState, cur: dict, kernel: dict) -> Plan:
        plan = Plan()
        self._plan_tunnel(state, plan)
        ifindex, tunnel = self._route_target(state)
        want_routes = {c: m.Route(nh, ifindex, tunnel, state.vni if tunnel else 0) for c, nh in state.routes.items()}
        for cidr, route in sorted(want_routes.items()):
            have = cur["routes"].get(cidr)
            if have is None:
                plan.add("routes", "add", {"cidr": cidr, "nexthop": route.nexthop, "mode": state.routing_mode})
            elif have != route:
                plan.add("routes", "change", {"cidr": cidr, "nexthop": route.nexthop, "mode": state.routing_mode})
        for cidr in sorted(set(cur["routes"]) | set(kernel)):
            if cidr not in want_routes:
                plan.add("routes", "remove", {"cidr": cidr})
        for cidr in sorted(set(want_routes) - set(kernel)):
            if cidr in cur["routes"] and cur["routes"][cidr] == want_routes[cidr]:
                plan.add("routes", "change", {"cidr": cidr, "kernel_route": "missing"})
        for section, want in (("services", state.services), ("lb_vips", state.lb_vips)):
            have_all = cur[section]
            for fe, backends in sorted(want.items()):
                have = have_all.get(fe)
                norm = tuple(sorted(backends)) if section == "lb_vips" else backends
                if have is None:
                    plan.add(section, "add", {"frontend": _fe(fe), "backends": _be_list(backends)})
                elif have != norm:
                    plan.add(section, "change", {"frontend": _fe(fe), "backends": _be_list(backends),
                                                 "was": _be_list(have)})
            for fe in sorted(set(have_all) - set(want)):
                plan.add(section, "remove", {"frontend": _fe(fe)})
        for cidr in sorted(state.prefilter - cur["prefilter"]):
            plan.add("prefilter", "add", cidr)
        for cidr in sorted(cur["prefilter"] - state.prefilter):
            plan.add("prefilter", "remove", cidr)
        nic_ifindex = socket.if_nametoindex(state.nic)
        want_cfg = {"node_ip": state.node_ip, "nic_ifindex": nic_ifindex,
                    "cpumap": bool(state.cpumap_cpus), "cpu_count": len(state.cpumap_cpus)}
        if cur["config"] != want_cfg:
            plan.add("config", "change", want_cfg)
        return plan

    def apply(self, state: DesiredState) -> Plan:
        """Apply `state` against the live maps: every map read once, the plan from that snapshot, then
        only what the plan changes is written. Repairs whatever changed behind Sluice's back."""
        self.check_node(state)
        self.applied = None     # unknown until this apply is through
        self.last_kind = "full"
        cur = self.current()
        kernel = netlink.owned_routes(ROUTE_PROTO)
        plan = self._plan(state, cur, kernel)
        if not plan.changed:
            self.applied = self._record(state, cur, {b: i for i, b in cur["backends"].items()}, cur["svc_ids"])
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
            for cidr in (set(cur["routes"]) | set(kernel)) - set(state.routes):
                rm.delete(cidr)
                netlink.delete_route(cidr, ROUTE_PROTO)
        with self.dp.open_map(m.PrefilterMap) as pm:
            pm.put_many({c: i + 1 for i, c in enumerate(sorted(state.prefilter - cur["prefilter"]))})
            for cidr in cur["prefilter"] - state.prefilter:
                pm.delete(cidr)
        ids, svc_ids = self._apply_frontends(state, cur)
        with self.dp.open_map(m.ConfigMap) as cm, self.dp.open_map(m.CpuMap) as cpu, \
                self.dp.open_map(m.CpuListMap) as cpus:
            cm.set(state.node_ip, socket.if_nametoindex(state.nic))
            cpu.set_cpus(cpus, cm, list(state.cpumap_cpus))
        self.applied = self._record(state, cur, ids, svc_ids)
        return plan

    @staticmethod
    def _record(state: DesiredState, cur: dict, ids: dict, svc_ids: dict) -> Applied | None:
        """What update() needs to know of the maps after an apply of `state` from snapshot `cur`
        (None, so that the next update() is a full apply, should an id be unknown)."""
        frontends = (*state.services.values(), *state.lb_vips.values())
        refs = Counter(itertools.chain.from_iterable(frontends))
        if not (refs.keys() <= ids.keys() and state.services.keys() <= svc_ids.keys()):
            return None
        return Applied(state=state, backend_ids={b: ids[b] for b in refs}, refs=refs,
                       svc_ids={fe: svc_ids[fe] for fe in state.services},
                       next_backend=max(itertools.chain(cur["backends"], ids.values()), default=0) + 1,
                       next_svc=max(itertools.chain(cur["svc_ids"].values(), svc_ids.values()), default=0) + 1)

    def _apply_frontends(self, state: DesiredState, cur: dict) -> tuple[dict, dict]:
        """Backends first, then frontends pointing at them, then what is unused.
        Returns the ids of the backends and services in the maps now."""
        ids = {b: i for i, b in cur["backends"].items()}
        wanted = {b for bs in (*state.services.values(), *state.lb_vips.values()) for b in bs}
        next_id = max(ids.values(), default=0) + 1
        new = set()
        for b in sorted(wanted - set(ids)):
            ids[b] = next_id
            new.add(next_id)
            next_id += 1
        with self.dp.open_map(m.BackendsMap) as bm:
            bm.put_many({i: m.Backend(*b) for b, i in ids.items() if i in new})
        svc_ids = dict(cur["svc_ids"])
        next_svc = max(svc_ids.values(), default=0) + 1
        with self.dp.open_map(m.ServicesMap) as sm:
            for fe, backends in state.services.items():
                if cur["services"].get(fe) == backends:
                    continue
                if fe not in svc_ids:
                    svc_ids[fe], next_svc = next_svc, next_svc + 1
                sm.put(*fe, m.Service(svc_ids[fe], tuple(ids[b] for b in backends)))
            for fe in set(cur["services"]) - set(state.services):
                sm.delete(*fe)
        with self.dp.open_map(m.LbVipsMap) as lm:
            for fe, backends in state.lb_vips.items():
                if cur["lb_vips"].get(fe) != tuple(sorted(backends)):
                    lm.put(*fe, {ids[b]: m.Backend(*b) for b in backends})
            for fe in set(cur["lb_vips"]) - set(state.lb_vips):
                lm.delete(*fe)
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
            plan = self._apply_delta(last, state)
        except Drift as e:
            log.warning("the maps differ from the last applied state (%s): reconciling against the maps", e)
            return self.apply(state)
        last.state = state
        self.applied = last
        return plan

    def needs_full(self, state: DesiredState) -> bool:
        """Whether update(state) would be a full apply: no earlier apply, or the node, routing or routes
        sections differ from the state applied last."""
        last = self.applied
        return last is None or any(getattr(last.state, f) != getattr(state, f) for f in STRUCTURAL)

    def _apply_delta(self, last: Applied, state: DesiredState) -> Plan:
        """Check every entry the delta changes (reads only), then write: a Drift leaves the maps as they were."""
        plan = Plan()
        old = last.state
        services = _diff(old.services, state.services)
        # an LB VIP's backends are a set (the Maglev table), as in the full plan
        vips = _diff({fe: tuple(sorted(bs)) for fe, bs in old.lb_vips.items()},
                     {fe: tuple(sorted(bs)) for fe, bs in state.lb_vips.items()})
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
        with self.dp.open_map(m.BackendsMap) as bm, self.dp.open_map(m.ServicesMap) as sm, \
                self.dp.open_map(m.LbVipsMap) as lm, self.dp.open_map(m.PrefilterMap) as pm:
            # 1. every entry to change holds what the last apply left there
            live_svc = {}
            for fe, was, _want in services:
                live_svc[fe] = sm.get(*fe)
                expect = m.Service(last.svc_ids[fe], tuple(ids[b] for b in was)) if was is not None else None
                if live_svc[fe] != expect:
                    raise Drift(f"service {_fe(fe)} holds {live_svc[fe]}, the last apply left {expect}")
            for fe, was, _want in vips:
                entry = lm.entry(*fe)
                live = (entry[0], set(entry[1]) if entry[0] else set()) if entry else None
                if live != ((len(was), {ids[b] for b in was}) if was is not None else None):
                    raise Drift(f"LB VIP {_fe(fe)} is not what the last apply left there")
            for i in new.values():
                if bm.get(i) is not None:
                    raise Drift(f"backend id {i} is taken")
            for b in unused:
                if bm.get(ids[b]) != m.Backend(*b):
                    raise Drift(f"backend {ids[b]} is not {b[0]}:{b[1]}/{b[2]}")
            if pf_add or pf_remove:     # an LPM trie has no exact lookup: read it (prefilter changes are rare)
                cidrs = pm.cidrs()
                if cidrs.intersection(pf_add) or not cidrs.issuperset(pf_remove):
                    raise Drift(f"prefilter holds {sorted(cidrs.intersection(pf_add))}, lacks "
                                f"{sorted(set(pf_remove) - cidrs)}")
            # 2. the writes, in the order a full apply makes them: backends, frontends, then what is unused
            for b, i in new.items():    # (batch updates take no BPF_NOEXIST)
                _no_clash(f"backend id {i} is taken", bm.put, i, m.Backend(*b), lb.BPF_NOEXIST)
            for fe, was, want in services:
                if want is None:
                    sm.delete(*fe)
                    del last.svc_ids[fe]
                    plan.add("services", "remove", {"frontend": _fe(fe)})
                    continue
                if fe not in last.svc_ids:
                    last.svc_ids[fe], last.next_svc = last.next_svc, last.next_svc + 1
                sm.put(*fe, m.Service(last.svc_ids[fe], tuple(ids[b] for b in want)), old=live_svc[fe])
                if was is None:
                    plan.add("services", "add", {"frontend": _fe(fe), "backends": _be_list(want)})
                else:
                    plan.add("services", "change", {"frontend": _fe(fe), "backends": _be_list(want),
                                                    "was": _be_list(was)})
            for fe, was, want in vips:
                if want is None:
                    lm.delete(*fe)
                    plan.add("lb_vips", "remove", {"frontend": _fe(fe)})
                    continue
                backends = state.lb_vips[fe]
                lm.put(*fe, {ids[b]: m.Backend(*b) for b in backends})
                if was is None:
                    plan.add("lb_vips", "add", {"frontend": _fe(fe), "backends": _be_list(backends)})
                else:
                    plan.add("lb_vips", "change", {"frontend": _fe(fe), "backends": _be_list(backends),
                                                   "was": _be_list(was)})
            for i, cidr in enumerate(pf_add):     # rule ids as a full apply numbers them
                pm.put(cidr, i + 1)
                plan.add("prefilter", "add", cidr)
            for cidr in pf_remove:
                pm.delete(cidr)
                plan.add("prefilter", "remove", cidr)
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
