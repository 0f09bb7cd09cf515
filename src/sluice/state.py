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

import ipaddress
import json
import socket
from dataclasses import dataclass, field

from . import maps as m
from . import netlink

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


def _ip(value, where: str) -> str:
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


def _frontends(items, section: str) -> dict[Frontend, tuple[BackendT, ...]]:
    out: dict[Frontend, tuple[BackendT, ...]] = {}
    for i, s in enumerate(items):
        where = f"{section}[{i}]" + (f" ({s.get('name')})" if isinstance(s, dict) and s.get("name") else "")
        if not isinstance(s, dict):
            raise StateError(f"{where}: expected an object")
        proto = _proto(s.get("protocol", "tcp"), where)
        key = (_ip(s.get("vip"), f"{where}.vip"), _port(s.get("port"), f"{where}.port"), proto)
        if key in out:
            raise StateError(f"{where}: duplicate frontend {key[0]}:{key[1]}/{proto}")
        backends = []
        for j, b in enumerate(s.get("backends") or []):
            bw = f"{where}.backends[{j}]"
            if not isinstance(b, dict) or "port" not in b:
                raise StateError(f"{bw}: backend {b!r} needs an ip and a port")
            backends.append((_ip(b.get("ip"), bw), _port(b["port"], bw), proto))
        if len(set(backends)) != len(backends):
            raise StateError(f"{where}: a backend is listed twice")
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


class Reconciler:
    """Computes and applies plans against a loaded datapath (sluice.datapath.Datapath)."""

    def __init__(self, datapath):
        self.dp = datapath

    # current state, read back from the maps
    def current(self) -> dict:
        with self.dp.open_map(m.BackendsMap) as bm, self.dp.open_map(m.ServicesMap) as sm, \
                self.dp.open_map(m.LbVipsMap) as lm, self.dp.open_map(m.RoutesMap) as rm, \
                self.dp.open_map(m.PrefilterMap) as pm, self.dp.open_map(m.ConfigMap) as cm:
            backends = {i: (b.ip, b.port, b.proto) for i, b in bm.items().items()}
            svcs = sm.items()
            services = {fe: tuple(backends.get(i, ("?", 0, fe[2])) for i in svc.backend_ids)
                        for fe, svc in svcs.items()}
            lb_vips = {}
            for fe, count in lm.items().items():
                ids = set(lm.table(*fe) or []) if count else set()
                lb_vips[fe] = tuple(sorted(backends.get(i, ("?", 0, fe[2])) for i in ids))
            return {"routes": rm.items(), "services": services, "lb_vips": lb_vips,
                    "prefilter": set(pm.items()), "config": cm.get(), "backends": backends,
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
        if state.routing_mode == "native":
            for cidr, nexthop in sorted(state.routes.items()):
                if not netlink.on_link(nexthop, state.nic):
                    raise StateError(f"routes ({cidr}): nexthop {nexthop} is not on a network of {state.nic}; "
                                     "native routing needs the other nodes directly reachable through the NIC")

    def plan(self, state: DesiredState) -> Plan:
        self.check_node(state)
        cur = self.current()
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
        kernel = netlink.owned_routes(ROUTE_PROTO)
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
        plan = self.plan(state)
        if not plan.changed:
            return plan
        cur = self.current()
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
            for cidr in (set(cur["routes"]) | set(netlink.owned_routes(ROUTE_PROTO))) - set(state.routes):
                rm.delete(cidr)
                netlink.delete_route(cidr, ROUTE_PROTO)
        with self.dp.open_map(m.PrefilterMap) as pm:
            pm.put_many({c: i + 1 for i, c in enumerate(sorted(state.prefilter - cur["prefilter"]))})
            for cidr in cur["prefilter"] - state.prefilter:
                pm.delete(cidr)
        self._apply_frontends(state, cur)
        with self.dp.open_map(m.ConfigMap) as cm, self.dp.open_map(m.CpuMap) as cpu, \
                self.dp.open_map(m.CpuListMap) as cpus:
            cm.set(state.node_ip, socket.if_nametoindex(state.nic))
            cpu.set_cpus(cpus, cm, list(state.cpumap_cpus))
        return plan

    def _apply_frontends(self, state: DesiredState, cur: dict) -> None:
        """Backends first, then frontends pointing at them, then what is unused."""
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
