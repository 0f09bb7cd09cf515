"""NetworkPolicy resolved, Cilium-style, into what the datapath of one node enforces.

- Identities: one per distinct (namespace, pod labels) among the cluster's pods (from FIRST_POD_IDENTITY),
  one per prefix any ipBlock of a policy selecting a local endpoint names, its cidr and each except (from
  FIRST_CIDR_IDENTITY); reserved: ID_ANY (a wildcard peer in an entry, never an address's), ID_HOST,
  ID_WORLD (an address nothing names), ID_REMOTE_NODE. The numbers are this node's own (each node
  allocates them), so the datapath must find a peer's identity in its own ipcache, never carry it
  across nodes.
- ipcache: every pod address -> its pod identity, every node's InternalIP -> ID_HOST (this node) or
  ID_REMOTE_NODE. cidrs: each ipBlock prefix -> its CIDR identity, looked up by longest prefix.
- The datapath allows a packet in a direction an endpoint is isolated in when an entry of that endpoint
  and direction names the peer's ipcache identity, its longest-prefix CIDR identity, or ID_ANY, with
  protocol 0 or the packet's, and a port prefix holding its port. An ipBlock allows the CIDR identities
  of the prefixes inside its cidr and outside its excepts: exact under longest-prefix match, because the
  cidr and every except are prefixes of the map themselves. So an ipBlock matches pods' addresses too.
- Isolation: a local endpoint is isolated in a direction when any policy of that type selects it; the
  entries are the union of what every such policy's rules allow (those the parser refused allow nothing:
  see sluice.policy.model). An entry another one covers (the same identity or ID_ANY; protocol 0, or the
  same protocol and a port prefix as wide or wider) is left out. The number of entries of an endpoint is
  about its rules' peer identities times their port prefixes: a rule towards every pod of the cluster with
  a port range gives one entry per pod identity per prefix.

Named ports: ingress, the selected pod's own container ports of that name and protocol; egress, each
destination identity gets the union of the numbers its pods give that name (an over-approximation when
pods sharing labels disagree on the number); with every peer allowed, the identities of the pods that
have such a port; towards an ipBlock, nothing (an address carries no port names).
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

from .model import (EGRESS, EVERYTHING, INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PROTOCOLS, Labels, Namespace,
                    NetworkPolicy, Peer, Pod, PortSpec, Rule, Selector)

__all__ = ["ID_ANY", "ID_HOST", "ID_WORLD", "ID_REMOTE_NODE", "FIRST_POD_IDENTITY", "FIRST_CIDR_IDENTITY",
           "INGRESS", "EGRESS", "PROTO_TCP", "PROTO_UDP", "PROTO_SCTP", "PolicyEntry", "Identities",
           "Resolution", "resolve", "port_blocks"]

ID_ANY, ID_HOST, ID_WORLD, ID_REMOTE_NODE = 0, 1, 2, 3
FIRST_POD_IDENTITY = 256
FIRST_CIDR_IDENTITY = 1 << 24
_RANGES = {"pod": (FIRST_POD_IDENTITY, FIRST_CIDR_IDENTITY - 1), "cidr": (FIRST_CIDR_IDENTITY, (1 << 32) - 1)}
_EVERY_PORT = PortSpec(0, 0, 0, "")         # a rule without ports: every port of every protocol
_DIRECTIONS = ((INGRESS, "ingress"), (EGRESS, "egress"))
_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


class PolicyEntry(NamedTuple):
    endpoint: str           # a local pod's IPv4 address
    direction: int          # INGRESS / EGRESS
    identity: int           # the peer's
    proto: int              # 0: every protocol and port
    port: int
    port_bits: int          # leading bits of port that must match: 0 every port, 16 exactly port


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """The fewest (port, port_bits) prefixes covering exactly first..last."""
    blocks = []
    while first <= last:
        size = first & -first or 1 << 16            # the largest block aligned at first...
        while first + size - 1 > last:              # ...that ends within the range
            size >>= 1
        blocks.append((first, 17 - size.bit_length()))
        first += size
    return blocks


class Identities:
    """Identity numbers by key (pod_key, cidr_key), kept across restarts with load/save.

    A new key takes the next free number of its range after the last one given, wrapping around, so the
    same history of calls gives the same numbers, and a number released is not given again soon (a number
    seen in a counter or a log keeps its meaning a while). A key keeps its number until release_unused."""

    def __init__(self, ids: Mapping[str, int] | None = None, last: Mapping[str, int] | None = None):
        self.ids: dict[str, int] = dict(ids or {})
        self.last = {kind: first - 1 for kind, (first, _end) in _RANGES.items()} | dict(last or {})
        self._taken = set(self.ids.values())

    @staticmethod
    def pod_key(namespace: str, labels: Labels) -> str:
        return f"pod:{namespace}:" + ",".join(f"{k}={v}" for k, v in labels)    # labels hold no ',' or '='

    @staticmethod
    def cidr_key(prefix: str) -> str:
        return f"cidr:{prefix}"

    def get(self, key: str) -> int:
        """The key's number, allocated if it has none."""
        number = self.ids.get(key)
        if number is None:
            kind = key.split(":", 1)[0]
            first, end = _RANGES[kind]
            number = self.last[kind]
            while True:
                number = number + 1 if number < end else first
                if number not in self._taken:
                    break
            self.ids[key] = self.last[kind] = number
            self._taken.add(number)
        return number

    def release_unused(self, used_keys: Iterable[str]) -> dict[str, int]:
        """Frees the numbers of the keys not in used_keys (call it once the maps no longer hold them);
        returns what it freed."""
        used = set(used_keys)
        freed = {key: number for key, number in self.ids.items() if key not in used}
        for key, number in freed.items():
            del self.ids[key]
            self._taken.discard(number)
        return freed

    @classmethod
    def load(cls, path: str) -> Identities:
        """An empty allocation when the file does not exist; ValueError naming the file if it is not one."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise ValueError(f"identity file {path}: {e}") from None
        try:
            ids, last = data["ids"], data["last"]
            for key, number in ids.items():
                first, end = _RANGES[key.split(":", 1)[0]]
                if isinstance(number, bool) or not isinstance(number, int) or not first <= number <= end:
                    raise ValueError(f"{key!r}: {number!r} is outside {first}-{end}")
            for kind, number in last.items():
                first, end = _RANGES[kind]
                if isinstance(number, bool) or not isinstance(number, int) or not first - 1 <= number <= end:
                    raise ValueError(f"last {kind}: {number!r} is outside {first - 1}-{end}")
            if len(set(ids.values())) != len(ids):
                raise ValueError("a number is given to two keys")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"identity file {path}: not an identity allocation ({e})") from None
        return cls(ids, last)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"ids": self.ids, "last": self.last}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass
class Resolution:
    ipcache: dict[str, int]             # "a.b.c.d/32" -> identity
    cidrs: dict[str, int]               # ipBlock prefix -> CIDR identity
    isolation: dict[str, int]           # local endpoint address -> INGRESS | EGRESS (isolated ones only)
    entries: frozenset[PolicyEntry]
    keys: frozenset[str]                # identity keys in use: release the others once the maps hold this
    _resolver: _Resolver = field(repr=False, compare=False)

    def explain(self, pod_key: str) -> dict:
        """What `sluice policy POD` prints for the pod namespace/name: its identity, labels and addresses, the
        directions it is isolated in, and per direction per policy per rule the peers and ports as written
        and what they resolved to (identities, the pods or prefixes behind them, protocol/port/port_bits)."""
        return self._resolver.explain(pod_key, self.isolation)


def resolve(pods: Mapping[str, Pod], namespaces: Mapping[str, Namespace], policies: Mapping[str, NetworkPolicy],
            nodes: Mapping[str, tuple[str, ...]], node_name: str, local_endpoints: Mapping[str, str],
            identities: Identities) -> Resolution:
    """Everything the datapath of node `node_name` needs for `policies`.

    pods, namespaces, policies: the reflectors' stores; nodes: node name -> InternalIPs; local_endpoints:
    address -> namespace/name of the local pod the CNI gave it (authoritative for that address: the API's
    status may not show it yet, or may still show a deleted pod there). A pod of this node whose status
    shows an address is a local endpoint too. An address the CNI gave a pod the API does not show yet is
    in no policy's selection (nothing isolates it) until the pod appears: resolve again then.
    Identities are allocated in `identities`, in the order of pod keys and prefixes (deterministic)."""
    return _Resolver(pods, namespaces, nodes, node_name, local_endpoints, identities).run(policies)


def _within(network: int, prefixlen: int, hole: tuple[int, int]) -> bool:
    hole_network, hole_len = hole
    return prefixlen >= hole_len and network >> (32 - hole_len) == hole_network >> (32 - hole_len)


class _Resolver:
    def __init__(self, pods: Mapping[str, Pod], namespaces: Mapping[str, Namespace],
                 nodes: Mapping[str, tuple[str, ...]], node_name: str, local_endpoints: Mapping[str, str],
                 identities: Identities):
        # a copy: explain must see what this resolution saw, not the reflector's store as it is later
        self.pods, self.node_name, self.identities = dict(pods), node_name, identities
        owner: dict[str, str] = {}                  # address -> pod key
        for key in sorted(pods):
            if not pods[key].host_network:
                for ip in pods[key].ips:
                    owner.setdefault(ip, key)
        for ip, key in local_endpoints.items():
            if key in pods and not pods[key].host_network:
                owner[ip] = key
            else:
                owner.pop(ip, None)                 # the API's claim on the address is stale
        self.local = {ip: key for ip, key in owner.items() if ip in local_endpoints or pods[key].node == node_name}
        self.ips_of: dict[str, list[str]] = {}
        for ip, key in sorted(owner.items()):
            self.ips_of.setdefault(key, []).append(ip)

        self.identity_of: dict[str, int] = {}       # pod key -> identity
        self.keys: set[str] = set()
        self.members: dict[int, list[str]] = {}     # pod identity -> its pods' keys
        self.labels_of: dict[str, dict[int, dict[str, str]]] = {}  # namespace -> identity -> labels
        self.index: dict[str, dict[object, set[int]]] = {}  # namespace -> (key, value) or key -> identities
        self.named_ports: dict[tuple[str, int], dict[int, set[int]]] = {}  # (name, proto) -> identity -> ports
        self.ipcache: dict[str, int] = {}
        for key in sorted(self.ips_of):
            pod = pods[key]
            id_key = Identities.pod_key(pod.namespace, pod.labels)
            identity = self.identity_of[key] = identities.get(id_key)
            self.keys.add(id_key)
            self.members.setdefault(identity, []).append(key)
            if identity not in self.labels_of.setdefault(pod.namespace, {}):
                self.labels_of[pod.namespace][identity] = dict(pod.labels)
                index = self.index.setdefault(pod.namespace, {})
                for label in pod.labels:
                    index.setdefault(label, set()).add(identity)
                    index.setdefault(label[0], set()).add(identity)
            for name, proto, port in pod.ports:
                self.named_ports.setdefault((name, proto), {}).setdefault(identity, set()).add(port)
            for ip in self.ips_of[key]:
                self.ipcache[f"{ip}/32"] = identity
        for name, addresses in nodes.items():
            for ip in addresses:
                self.ipcache[f"{ip}/32"] = ID_HOST if name == node_name else ID_REMOTE_NODE

        self.namespace_labels = {name: dict(ns.labels) for name, ns in namespaces.items()}
        self.cidrs: dict[str, int] = {}
        self.prefix_order: list[tuple[int, int, int]] = []     # (network, prefixlen, identity), sorted
        self.prefix_of: dict[int, str] = {}
        # per resolution: what one selector, peer or rule resolves to is computed once
        self.selects = functools.cache(lambda selector, labels: selector.matches(dict(labels)))
        self.pods_matching = functools.cache(self._pods_matching)
        self.namespaces_matching = functools.cache(self._namespaces_matching)
        self.peer_identities = functools.cache(self._peer_identities)
        self.rule_identities = functools.cache(self._rule_identities)
        self.rule_allows = functools.cache(self._rule_allows)
        self.endpoint_allows = functools.cache(self._endpoint_allows)

    def run(self, policies: Mapping[str, NetworkPolicy]) -> Resolution:
        local_by_namespace: dict[str, list[tuple[str, Pod]]] = {}
        for ip, key in sorted(self.local.items()):
            pod = self.pods[key]
            local_by_namespace.setdefault(pod.namespace, []).append((ip, pod))
        self.selected: list[tuple[NetworkPolicy, tuple[str, ...]]] = []
        prefixes = set()
        for key in sorted(policies):
            policy = policies[key]
            endpoints = tuple(ip for ip, pod in local_by_namespace.get(policy.namespace, ())
                              if self.selects(policy.pod_selector, pod.labels))
            if endpoints:
                self.selected.append((policy, endpoints))
                for _direction, rule in self.rules(policy):
                    for peer in rule.peers:
                        if peer.cidr and ":" not in peer.cidr:  # IPv6 blocks match no IPv4 address
                            prefixes.update((peer.cidr,) + peer.excepts)
        for network in sorted(map(ipaddress.IPv4Network, prefixes)):     # by address, then length
            prefix, id_key = str(network), Identities.cidr_key(str(network))
            identity = self.cidrs[prefix] = self.identities.get(id_key)
            self.keys.add(id_key)
            self.prefix_order.append((int(network.network_address), network.prefixlen, identity))
            self.prefix_of[identity] = prefix

        isolation: dict[str, int] = {}
        applying: dict[tuple[str, int], list[tuple[str, Rule]]] = {}  # (endpoint, direction) -> (namespace, rule)
        for policy, endpoints in self.selected:
            for ip in endpoints:
                for direction in policy.types:
                    isolation[ip] = isolation.get(ip, 0) | direction
                for direction, rule in self.rules(policy):
                    applying.setdefault((ip, direction), []).append((policy.namespace, rule))
        entries = []
        for (ip, direction), rules in applying.items():
            named = direction == INGRESS and any(spec.name for _policy, rule in rules for spec in rule.ports)
            ports = self.pods[self.local[ip]].ports if named else ()
            entries.extend(PolicyEntry._make((ip, direction) + allow)
                           for allow in self.endpoint_allows(direction, tuple(rules), ports))
        return Resolution(self.ipcache, self.cidrs, isolation, frozenset(entries), frozenset(self.keys), self)

    @staticmethod
    def rules(policy: NetworkPolicy) -> list[tuple[int, Rule]]:
        """The rules that apply: those of the directions the policy isolates (others are ignored, as the API
        says), refused ones left out (they allow nothing)."""
        return [(direction, rule) for direction, rules in ((INGRESS, policy.ingress), (EGRESS, policy.egress))
                if direction in policy.types for rule in rules if not rule.error]

    def _endpoint_allows(self, direction: int, rules: tuple[tuple[str, Rule], ...],
                         endpoint_ports: tuple) -> frozenset[tuple[int, int, int, int]]:
        """What rules (namespace, rule) allow an endpoint together, once for all the endpoints they select
        (endpoint_ports: the endpoint's named ports where an ingress rule names one, else ())."""
        return _without_redundant(set().union(*(
            self.rule_allows(namespace, direction, rule, endpoint_ports if any(s.name for s in rule.ports) else ())
            for namespace, rule in rules)))

    def _rule_allows(self, namespace: str, direction: int, rule: Rule,
                     endpoint_ports: tuple) -> frozenset[tuple[int, int, int, int]]:
        """(identity, proto, port, port_bits) the rule allows."""
        peers = self.rule_identities(namespace, rule)
        return frozenset(allow for spec in rule.ports or (_EVERY_PORT,)
                         for allow in self.port_allows(spec, direction, peers, endpoint_ports))

    def port_allows(self, spec: PortSpec, direction: int, peers: frozenset[int],
                    endpoint_ports: tuple) -> list[tuple[int, int, int, int]]:
        if not spec.name:
            blocks = port_blocks(spec.port, spec.end_port or spec.port) if spec.port else [(0, 0)]
            return [(peer, spec.proto, port, bits) for peer in peers for port, bits in blocks]
        if direction == INGRESS:
            numbers = {port for name, proto, port in endpoint_ports if (name, proto) == (spec.name, spec.proto)}
            return [(peer, spec.proto, port, 16) for peer in peers for port in numbers]
        by_identity = self.named_ports.get((spec.name, spec.proto), {})
        targets = by_identity if ID_ANY in peers else (peers & by_identity.keys())   # never a CIDR identity
        return [(peer, spec.proto, port, 16) for peer in targets for port in by_identity[peer]]

    def _rule_identities(self, namespace: str, rule: Rule) -> frozenset[int]:
        if not rule.peers:
            return frozenset((ID_ANY,))
        return frozenset().union(*(self.peer_identities(namespace, peer) for peer in rule.peers))

    def _peer_identities(self, namespace: str, peer: Peer) -> frozenset[int]:
        if peer.cidr:
            return self.block_identities(peer)
        if peer.namespace_selector is None:
            return self.pods_matching(namespace, peer.pod_selector)
        return frozenset().union(*(self.pods_matching(ns, peer.pod_selector or EVERYTHING)
                                   for ns in self.namespaces_matching(peer.namespace_selector)))

    def _namespaces_matching(self, selector: Selector) -> tuple[str, ...]:
        return tuple(name for name, labels in self.namespace_labels.items() if selector.matches(labels))

    def _pods_matching(self, namespace: str, selector: Selector) -> frozenset[int]:
        labels_of, index = self.labels_of.get(namespace, {}), self.index.get(namespace, {})
        candidates = labels_of.keys()
        # a match has every matchLabels pair and every key an In or Exists names: start from the fewest
        for needed in selector.labels + tuple(key for key, op, _values in selector.expressions if op in ("In", "Exists")):
            having = index.get(needed, ())
            if len(having) < len(candidates):
                candidates = having
        return frozenset(identity for identity in candidates if selector.matches(labels_of[identity]))

    def block_identities(self, peer: Peer) -> frozenset[int]:
        """The CIDR identities of the prefixes inside the block's cidr and outside its excepts."""
        if ":" in peer.cidr:
            return frozenset()
        block = ipaddress.IPv4Network(peer.cidr)
        holes = [(int(h.network_address), h.prefixlen) for h in map(ipaddress.IPv4Network, peer.excepts)]
        # every prefix whose network lies in the block and is no shorter than it is inside it
        low = bisect.bisect_left(self.prefix_order, (int(block.network_address),))
        high = bisect.bisect_left(self.prefix_order, (int(block.broadcast_address) + 1,))
        return frozenset(identity for network, prefixlen, identity in self.prefix_order[low:high]
                         if prefixlen >= block.prefixlen and not any(_within(network, prefixlen, h) for h in holes))

    def explain(self, key: str, isolation: Mapping[str, int]) -> dict:
        pod = self.pods.get(key)
        if pod is None:
            return {"pod": key, "error": "the API has no such pod (yet)"}
        ips = sorted(ip for ip, owner in self.local.items() if owner == key)
        out = {"pod": key, "node": pod.node, "identity": self.identity_of.get(key), "labels": dict(pod.labels),
               "ips": self.ips_of.get(key, [])}
        if not ips:
            out["note"] = (f"not an endpoint of node {self.node_name}: policy for it is enforced on the node it "
                           "runs on" if not pod.host_network else "a host-network pod: no policy applies to it")
            return out
        flags = isolation.get(ips[0], 0)
        out["isolated"] = [name for direction, name in _DIRECTIONS if flags & direction]
        selecting = [policy for policy, endpoints in self.selected if ips[0] in endpoints]
        if not selecting:
            out["note"] = "no NetworkPolicy selects this pod: all its traffic is allowed"
        for direction, name in _DIRECTIONS:
            out[name] = [self.explain_policy(policy, direction, pod)
                         for policy in selecting if direction in policy.types]
        return out

    def explain_policy(self, policy: NetworkPolicy, direction: int, pod: Pod) -> dict:
        out = {"policy": f"{policy.namespace}/{policy.name}"}
        if policy.error:
            out["refused"] = policy.error + " (enforced fail-closed: what is wrong allows nothing)"
        out["rules"] = []
        for rule in policy.ingress if direction == INGRESS else policy.egress:
            if rule.error:
                out["rules"].append({"refused": rule.error, "allows": "nothing"})
                continue
            if rule.peers:
                peers = [{"peer": _peer_text(peer),
                          **self.explain_identities(self.peer_identities(policy.namespace, peer))}
                         for peer in rule.peers]
            else:
                peers = [{"peer": "every peer", **self.explain_identities(frozenset((ID_ANY,)))}]
            identities = self.rule_identities(policy.namespace, rule)
            ports = []
            for spec in rule.ports or (_EVERY_PORT,):
                # a named port's number towards a destination is that destination's own: shown per identity
                per_identity = bool(spec.name) and direction == EGRESS
                resolved = sorted({(identity if per_identity else ID_ANY, proto, port, bits)
                                   for identity, proto, port, bits in
                                   self.port_allows(spec, direction, identities, pod.ports)})
                ports.append({"port": _port_text(spec), "resolved": [
                    {**({"identity": identity} if per_identity else {}), "proto": proto, "port": port,
                     "port_bits": bits} for identity, proto, port, bits in resolved]})
            out["rules"].append({"peers": peers, "ports": ports})
        return out

    def explain_identities(self, identities: frozenset[int]) -> dict:
        out: dict = {"identities": sorted(identities)}
        if ID_ANY in identities:
            out["addresses"] = "every address"
        prefixes = sorted(self.prefix_of[i] for i in identities if i in self.prefix_of)
        if prefixes:
            out["prefixes"] = prefixes
        pods = [{"pod": key, "ips": self.ips_of[key]} for i in sorted(identities) for key in self.members.get(i, ())]
        if pods or not (ID_ANY in identities or prefixes):
            out["pods"] = pods
        return out


def _peer_text(peer: Peer) -> dict:
    if peer.cidr:
        return {"ipBlock": {"cidr": peer.cidr, "except": list(peer.excepts)}}
    out = {}
    if peer.pod_selector is not None:
        out["podSelector"] = peer.pod_selector.text() or "{} (every pod)"
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = peer.namespace_selector.text() or "{} (every namespace)"
    return out


def _port_text(spec: PortSpec) -> dict | str:
    if spec == _EVERY_PORT:
        return "every port of every protocol"
    out: dict = {"protocol": _PROTOCOL_NAMES[spec.proto]}
    if spec.port or spec.name:
        out["port"] = spec.port or spec.name
    if spec.end_port:
        out["endPort"] = spec.end_port
    return out


def _without_redundant(allows: set[tuple[int, int, int, int]]) -> frozenset[tuple[int, int, int, int]]:
    """The (identity, proto, port, port_bits) no other one makes redundant: one for the same peer identity
    or ID_ANY, with protocol 0, or with the same protocol and a port prefix as wide or wider."""
    if (ID_ANY, 0, 0, 0) in allows:
        return frozenset(((ID_ANY, 0, 0, 0),))
    widths: dict[tuple[int, int], set[int]] = {}       # (identity, proto) -> port_bits in use
    for identity, proto, _port, bits in allows:
        widths.setdefault((identity, proto), set()).add(bits)

    def redundant(allow: tuple[int, int, int, int]) -> bool:
        identity, proto, port, bits = allow
        if proto and (identity, 0) in widths:
            return True
        for peer in (identity, ID_ANY):
            for wider in widths.get((peer, proto), ()):
                if (wider < bits or wider == bits and peer != identity) and \
                        (peer, proto, port >> (16 - wider) << (16 - wider), wider) in allows:
                    return True
        return False

    return frozenset(allow for allow in allows if not redundant(allow))
