"""The desired state of a node (DesiredState) and the validation of a state document into it.

The document (the Ansible roles write it as JSON, default /etc/sluice/state.json):

    {"node": {"name", "ip", "nic", "pod_cidr"},
     "routing": {"mode": "native"|"vxlan", "vxlan_device", "vxlan_port", "vni"},
     "routes": [{"cidr", "nexthop", "node"}],             other nodes' pod CIDRs
     "services": [{"name", "vip", "port", "protocol", "backends": [{"ip", "port"}],
                   "affinity_timeout"}],                  seconds of ClientIP affinity, 1..86400 (0: none)
     "failsafe": ["tcp:22", "udp:67-68", ...],            the node's management ports, passed before any
                                                          filter (absent or empty: DEFAULT_FAILSAFE)
     "prefilter": ["CIDR", ...],
     "lb_vips": [{"name", "vip", "port", "protocol", "backends": [...],
                  "affinity_timeout",                     as for services, per client address
                  "keep_source"}],                        true: a local pod backend sees the client's address
     "xdp": {"cpumap_cpus": [0, 1]},
     "network_policy": true}                              NetworkPolicy enforced (pods' flows tracked)

An invalid value raises StateError naming the value and where it stands in the document.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field

from .. import maps as m

DEFAULT_STATE_FILE = "/etc/sluice/state.json"
ROUTING_MODES = ("native", "vxlan")
PROTOCOLS = ("tcp", "udp")
DEFAULT_VXLAN_DEVICE = "sluice_vxlan"
DEFAULT_VXLAN_PORT = 4789
MAX_AFFINITY_TIMEOUT = 86400            # Kubernetes' limit of sessionAffinityConfig.clientIP.timeoutSeconds
# SSH, the Kubernetes API, etcd, kubelet, DNS, DHCP (the roles' sluice_failsafe declares the same list)
DEFAULT_FAILSAFE = ("tcp:22", "tcp:6443", "tcp:2379-2380", "tcp:10250", "tcp:53", "udp:53", "udp:67-68")
MAX_FAILSAFE_PORTS = 64                 # SL_MAX_FAILSAFE, the size of sl_failsafe_ports

Frontend = tuple[str, int, str]          # (vip, port, protocol)
Backend = m.Backend                      # (ip, port, protocol), as sl_backends holds it
_make_backend = Backend._make            # half the cost of Backend(): a state holds tens of thousands


class StateError(ValueError):
    """The desired state is invalid; the message names the bad value."""


def read_text(path: str, what: str = "") -> str:
    """The text of `path`; StateError names the file (`what` says what it is) and the reason."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise StateError(f"cannot read {what}{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise StateError(f"{what}{path} is not valid JSON: {e}") from None


def json_document(text: str, path: str, what: str = ""):
    """The JSON document `text` (read from `path`); StateError names the file and the reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StateError(f"{what}{path} is not valid JSON: {e}") from None


def read_json(path: str, what: str = ""):
    """The JSON document in `path`; StateError names the file (`what` says what it is) and the reason."""
    return json_document(read_text(path, what), path, what)


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
    services: dict[Frontend, tuple[Backend, ...]] = field(default_factory=dict)
    prefilter: set[str] = field(default_factory=set)
    failsafe: frozenset[tuple[str, int]] = field(default_factory=lambda: failsafe_ports(DEFAULT_FAILSAFE))
    lb_vips: dict[Frontend, tuple[Backend, ...]] = field(default_factory=dict)
    cpumap_cpus: tuple[int, ...] = ()
    affinity: dict[Frontend, int] = field(default_factory=dict)          # service -> affinity timeout (s)
    lb_options: dict[Frontend, m.LbOptions] = field(default_factory=dict)  # LB VIP -> options, where not default
    network_policy: bool = False

    @classmethod
    def from_file(cls, path: str) -> "DesiredState":
        return cls.parse(read_json(path, "state file "))

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
        state.services = _frontends(raw.get("services") or [], "services", state.affinity)
        state.lb_vips = _frontends(raw.get("lb_vips") or [], "lb_vips", lb_options=state.lb_options)
        state.prefilter = {str(_cidr(c, f"prefilter[{i}]")) for i, c in enumerate(raw.get("prefilter") or [])}
        if raw.get("failsafe"):     # absent or empty: the default; the node always keeps a failsafe
            state.failsafe = failsafe_ports(raw["failsafe"])
        cpus = (raw.get("xdp") or {}).get("cpumap_cpus") or []
        for c in cpus:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < m.possible_cpus():
                raise StateError(f"xdp.cpumap_cpus: CPU {c!r} does not exist on this node")
        state.cpumap_cpus = tuple(sorted(set(cpus)))
        state.network_policy = raw.get("network_policy", False)
        if not isinstance(state.network_policy, bool):
            raise StateError(f"network_policy: {state.network_policy!r} is not true or false")
        return state


def failsafe_ports(entries, where: str = "failsafe") -> frozenset[tuple[str, int]]:
    """The (protocol, port) pairs of failsafe entries "PROTOCOL:PORT" or "PROTOCOL:FIRST-LAST"."""
    if not isinstance(entries, (list, tuple)):
        raise StateError(f"{where}: expected a list of 'PROTOCOL:PORT' entries, not {entries!r}")
    ports = set()
    for i, entry in enumerate(entries):
        proto, _colon, ports_text = str(entry).partition(":")
        first, _dash, last = ports_text.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            low = high = 0
        if proto not in PROTOCOLS or not 1 <= low <= high <= 65535:
            raise StateError(f"{where}[{i}]: {entry!r} is not PROTOCOL:PORT or PROTOCOL:FIRST-LAST "
                             f"(protocol {' or '.join(PROTOCOLS)}, ports 1..65535)")
        ports.update((proto, p) for p in range(low, high + 1))
        if len(ports) > MAX_FAILSAFE_PORTS:
            raise StateError(f"{where}[{i}]: {entry!r} makes more than {MAX_FAILSAFE_PORTS} ports")
    return frozenset(ports)


def _where(section: str, i: int, s) -> str:
    return f"{section}[{i}]" + (f" ({s.get('name')})" if isinstance(s, dict) and s.get("name") else "")


def _frontends(items, section: str, affinity: dict[Frontend, int] | None = None,
               lb_options: dict[Frontend, m.LbOptions] | None = None) -> dict[Frontend, tuple[Backend, ...]]:
    """The section's frontends; their affinity timeouts go to `affinity` in the socket LB's section, their
    options to `lb_options` in the XDP LB's. Locations for error messages are only formatted when there is
    an error."""
    out: dict[Frontend, tuple[Backend, ...]] = {}
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
                    backends.append(_make_backend((ip, bport, proto)))
                    continue
            bw = f"{_where(section, i, s)}.backends[{j}]"
            if not isinstance(b, dict) or "port" not in b:
                raise StateError(f"{bw}: backend {b!r} needs an ip and a port")
            backends.append(Backend(_ip(b.get("ip"), bw), _port(b["port"], bw), proto))
        if len(set(backends)) != len(backends):
            raise StateError(f"{_where(section, i, s)}: a backend is listed twice")
        out[key] = tuple(backends)
        timeout = s.get("affinity_timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= MAX_AFFINITY_TIMEOUT:
            raise StateError(f"{_where(section, i, s)}: affinity_timeout {timeout!r} is not an integer in "
                             f"1..{MAX_AFFINITY_TIMEOUT} (0: no affinity)")
        keep_source = s.get("keep_source", False)
        if not isinstance(keep_source, bool):
            raise StateError(f"{_where(section, i, s)}: keep_source {keep_source!r} is not true or false")
        if lb_options is not None:
            if timeout or keep_source:
                lb_options[key] = m.LbOptions(keep_source, timeout)
        elif keep_source:
            raise StateError(f"{_where(section, i, s)}: keep_source is for lb_vips (the XDP LB) only")
        elif timeout:
            affinity[key] = timeout
    return out
