"""What NetworkPolicy enforcement keeps of Pods, Namespaces and NetworkPolicies (networking.k8s.io/v1): one
API object in, one small hashable value out, for the reflectors' transforms (memory at 10,000s of pods).

A NetworkPolicy the parser cannot read is refused with a PolicyError naming the policy and the bad value,
never widened. The error carries the policy with each bad part replaced by what allows less (fail closed),
for the caller to log and enforce:
- a bad rule (a peer or a port in it) allows nothing; the policy's other rules apply as written;
- bad spec.policyTypes: the policy isolates both directions;
- a bad spec.podSelector: the policy selects every pod of its namespace and allows nothing.
The API server validates all of these, so only an object it did not check can get here.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Mapping, NamedTuple

from ..maps import EGRESS, INGRESS   # the datapath's enum sl_policy_direction

PROTO_TCP, PROTO_UDP, PROTO_SCTP = 6, 17, 132
PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP}
POLICY_TYPES = {"Ingress": INGRESS, "Egress": EGRESS}
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_PORT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,13}[a-z0-9])?")     # IANA_SVC_NAME, as the API checks it

Labels = tuple[tuple[str, str], ...]        # sorted (key, value) pairs


class PolicyError(ValueError):
    """A NetworkPolicy refused; `policy` is its fail-closed reading (see the module's docstring)."""

    def __init__(self, message: str, policy: NetworkPolicy):
        super().__init__(message)
        self.policy = policy


class Selector(NamedTuple):
    """A label selector: matchLabels and matchExpressions, all of which must hold; empty selects everything."""
    labels: Labels
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...]      # (key, operator, values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        for key, op, values in self.expressions:
            if op == "In":
                ok = labels.get(key) in values
            elif op == "NotIn":
                ok = labels.get(key) not in values      # a missing key is not in any set of values
            elif op == "Exists":
                ok = key in labels
            else:
                ok = key not in labels
            if not ok:
                return False
        return True

    def text(self) -> str:
        """kubectl's notation: `app=web,tier in (a,b),tier notin (c),debug,!legacy`; '' selects everything."""
        parts = [f"{k}={v}" for k, v in self.labels]
        for key, op, values in self.expressions:
            parts.append({"In": f"{key} in ({','.join(values)})", "NotIn": f"{key} notin ({','.join(values)})",
                          "Exists": key, "DoesNotExist": f"!{key}"}[op])
        return ",".join(parts)


EVERYTHING = Selector((), ())


class Peer(NamedTuple):
    """One entry of from/to: pods by selectors (namespace_selector None: the policy's namespace), or an
    ipBlock (cidr set, selectors None)."""
    pod_selector: Selector | None
    namespace_selector: Selector | None
    cidr: str                       # normalized prefix; IPv6 ones are kept (they match no IPv4 address)
    excepts: tuple[str, ...]


class PortSpec(NamedTuple):
    proto: int                      # PROTO_*
    port: int                       # 0: every port of proto (or a named port)
    end_port: int                   # 0: port alone
    name: str                       # a named port; port is then 0


class Rule(NamedTuple):
    peers: tuple[Peer, ...]         # empty: every peer
    ports: tuple[PortSpec, ...]     # empty: every port of every protocol
    error: str = ""                 # refused: the rule allows nothing


class NetworkPolicy(NamedTuple):
    namespace: str
    name: str
    pod_selector: Selector
    types: frozenset[int]           # INGRESS, EGRESS: the directions it isolates
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]
    error: str = ""                 # why the parser refused it (this is then its fail-closed reading)


class Pod(NamedTuple):
    namespace: str
    name: str
    labels: Labels
    ips: tuple[str, ...]            # IPv4 only; () until the API's status has one
    node: str
    host_network: bool
    ports: tuple[tuple[str, int, int], ...]     # named container ports: (name, proto, port)


class Namespace(NamedTuple):
    name: str
    labels: Labels


class _Invalid(ValueError):
    pass


def _labels(values) -> Labels:
    # interned: the same few keys and values repeat over 10,000s of pods
    return tuple(sorted((sys.intern(str(k)), sys.intern(str(v))) for k, v in (values or {}).items()))


def pod_from_api(obj: dict) -> Pod | None:
    """None for a pod that has ended (phase Succeeded or Failed: its address may already be another pod's)."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips = []
    for value in [i.get("ip") for i in status.get("podIPs") or ()] or [status.get("podIP")]:
        try:
            ips.append(str(ipaddress.IPv4Address(value)))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            continue
    ports = tuple(dict.fromkeys((p["name"], PROTOCOLS[p.get("protocol") or "TCP"], p["containerPort"])
                                for c in spec.get("containers") or () for p in c.get("ports") or ()
                                if p.get("name") and p.get("containerPort")
                                and (p.get("protocol") or "TCP") in PROTOCOLS))
    return Pod(meta.get("namespace") or "", meta.get("name") or "", _labels(meta.get("labels")), tuple(ips),
               spec.get("nodeName") or "", bool(spec.get("hostNetwork")), ports)


def namespace_from_api(obj: dict) -> Namespace:
    meta = obj.get("metadata") or {}
    return Namespace(meta.get("name") or "", _labels(meta.get("labels")))


def _selector(obj, where: str) -> Selector:
    if not isinstance(obj, dict):
        raise _Invalid(f"{where}: {obj!r} is not a label selector")
    if not isinstance(obj.get("matchLabels") or {}, dict):
        raise _Invalid(f"{where}.matchLabels: {obj['matchLabels']!r} is not a map of labels")
    expressions = []
    for i, e in enumerate(obj.get("matchExpressions") or ()):
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op not in OPERATORS:
            raise _Invalid(f"{where}.matchExpressions[{i}].operator: {op!r} is not one of {', '.join(OPERATORS)}")
        if not key or not isinstance(key, str):
            raise _Invalid(f"{where}.matchExpressions[{i}].key: {key!r} is not a label key")
        if bool(values) != (op in ("In", "NotIn")):
            raise _Invalid(f"{where}.matchExpressions[{i}].values: {values!r} with operator {op}: In and NotIn "
                           "need values, Exists and DoesNotExist take none")
        expressions.append((key, op, tuple(sorted(map(str, values)))))
    return Selector(_labels(obj.get("matchLabels")), tuple(sorted(expressions)))


def _network(value, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        if not isinstance(value, str) or "/" not in value:
            raise ValueError
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Invalid(f"{where}: {value!r} is not a CIDR") from None


def _peer(obj: dict, where: str) -> Peer:
    block, pods, namespaces = obj.get("ipBlock"), obj.get("podSelector"), obj.get("namespaceSelector")
    if block is not None:
        if pods is not None or namespaces is not None:
            raise _Invalid(f"{where}: ipBlock may not be combined with podSelector or namespaceSelector")
        cidr = _network(block.get("cidr"), f"{where}.ipBlock.cidr")
        excepts = []
        for i, value in enumerate(block.get("except") or ()):
            hole = _network(value, f"{where}.ipBlock.except[{i}]")
            if hole.version != cidr.version or not hole.subnet_of(cidr) or hole.prefixlen <= cidr.prefixlen:
                raise _Invalid(f"{where}.ipBlock.except[{i}]: {value!r} is not strictly inside cidr {str(cidr)!r}")
            excepts.append(str(hole))
        return Peer(None, None, str(cidr), tuple(excepts))
    if pods is None and namespaces is None:
        raise _Invalid(f"{where}: {obj!r} names no podSelector, namespaceSelector or ipBlock")
    return Peer(None if pods is None else _selector(pods, f"{where}.podSelector"),
                None if namespaces is None else _selector(namespaces, f"{where}.namespaceSelector"), "", ())


def _port(obj: dict, where: str) -> PortSpec:
    protocol, port, end = obj.get("protocol") or "TCP", obj.get("port"), obj.get("endPort")
    if protocol not in PROTOCOLS:
        raise _Invalid(f"{where}.protocol: {protocol!r} is not TCP, UDP or SCTP")
    proto = PROTOCOLS[protocol]
    if end is not None and not (isinstance(port, int) and isinstance(end, int) and port <= end <= 65535):
        raise _Invalid(f"{where}.endPort: {end!r} needs a numeric port no higher than it, and 65535 at most "
                       f"(port is {port!r})")
    if port is None:
        return PortSpec(proto, 0, 0, "")
    if isinstance(port, str):
        if not (_PORT_NAME.fullmatch(port) and re.search("[a-z]", port) and "--" not in port):
            raise _Invalid(f"{where}.port: {port!r} is not a port name")
        return PortSpec(proto, 0, 0, port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _Invalid(f"{where}.port: {port!r} is not a port (1-65535) or a port name")
    return PortSpec(proto, port, end or 0, "")


def _rules(items, peers_field: str, where: str, errors: list[str]) -> tuple[Rule, ...]:
    rules = []
    for i, item in enumerate(items or ()):
        try:
            peers = tuple(_peer(p, f"{where}[{i}].{peers_field}[{j}]")
                          for j, p in enumerate(item.get(peers_field) or ()))
            ports = tuple(_port(p, f"{where}[{i}].ports[{j}]") for j, p in enumerate(item.get("ports") or ()))
            rules.append(Rule(peers, ports))
        except _Invalid as e:
            errors.append(str(e))
            rules.append(Rule((), (), str(e)))
    return tuple(rules)


def policy_from_api(obj: dict) -> NetworkPolicy:
    """Raises PolicyError (with the policy's fail-closed reading) for what the API server would refuse."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    namespace, name = meta.get("namespace") or "", meta.get("name") or ""
    errors: list[str] = []
    ingress = _rules(spec.get("ingress"), "from", "spec.ingress", errors)
    egress = _rules(spec.get("egress"), "to", "spec.egress", errors)
    written = spec.get("policyTypes")
    if written:
        bad = [t for t in written if t not in POLICY_TYPES]
        if bad:
            errors.append(f"spec.policyTypes: {bad[0]!r} is not Ingress or Egress")
            types = frozenset((INGRESS, EGRESS))
        else:
            types = frozenset(POLICY_TYPES[t] for t in written)
    else:
        types = frozenset((INGRESS, EGRESS) if spec.get("egress") else (INGRESS,))
    try:
        pod_selector = _selector(spec.get("podSelector") or {}, "spec.podSelector")
    except _Invalid as e:
        errors.append(str(e))
        pod_selector, ingress, egress = EVERYTHING, (), ()
    if not errors:
        return NetworkPolicy(namespace, name, pod_selector, types, ingress, egress)
    message = f"networkpolicy {namespace}/{name}: {'; '.join(errors)}"
    raise PolicyError(message, NetworkPolicy(namespace, name, pod_selector, types, ingress, egress, message))
