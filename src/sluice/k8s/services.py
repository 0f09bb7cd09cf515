"""What the datapath serves for Kubernetes Services: the objects the agent keeps, and the frontends one
Service gives on one node.

Frontends, as kube-proxy serves them:
- every IPv4 cluster IP:port, through the socket LB (pods and the node itself);
- NodePort: every node's InternalIP:nodePort through the socket LB, and this node's address through
  the XDP LB, for clients outside the cluster;
- externalIPs and LoadBalancer ingress IPs: socket LB and XDP LB, except a node's own address: an
  application team's Service must not be able to take a node's SSH or kubelet port away from it.
sessionAffinity ClientIP holds in the socket LB, per client network namespace (a pod, or the node).
Backends: the IPv4 endpoints of the Service's EndpointSlices on the port of the same name; the ready
ones, else the serving and terminating ones (kube-proxy's fallback, so connections still land while
every endpoint is terminating). internalTrafficPolicy Local keeps only this node's endpoints for the
cluster IP, externalTrafficPolicy Local for NodePorts and external addresses. Headless and
ExternalName Services and SCTP ports have no frontend; DNS serves the first two.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from ..state import Backend, Frontend

PROTOCOLS = {"TCP": "tcp", "UDP": "udp"}
DEFAULT_AFFINITY_TIMEOUT = 10800        # the API's default for sessionAffinityConfig.clientIP.timeoutSeconds


class ServicePort(NamedTuple):
    name: str
    protocol: str           # tcp / udp
    port: int
    node_port: int          # 0: none


class Service(NamedTuple):
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...]       # spec.externalIPs and status.loadBalancer.ingress[].ip
    local_internal: bool                # internalTrafficPolicy: Local
    local_external: bool                # externalTrafficPolicy: Local
    affinity_timeout: int               # sessionAffinity ClientIP: seconds; 0: none


class Endpoint(NamedTuple):
    ip: str
    node: str
    ready: bool
    serving: bool
    terminating: bool


class EndpointSlice(NamedTuple):
    service: str                        # namespace/name of the Service it belongs to
    ports: tuple[tuple[str, str, int], ...]     # (name, protocol, port)
    endpoints: tuple[Endpoint, ...]


class Node(NamedTuple):
    addresses: tuple[str, ...]          # InternalIPs (IPv4)
    pod_cidr: str                       # the IPv4 one; empty when none is set


def _ipv4(values) -> tuple[str, ...]:
    out = []
    for v in values or ():
        try:
            out.append(str(ipaddress.IPv4Address(v)))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            continue
    return tuple(out)


def service_from_api(obj: dict) -> Service | None:
    spec = obj.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    cluster_ips = _ipv4(spec.get("clusterIPs") or [spec.get("clusterIP")])
    ports = tuple(ServicePort(p.get("name") or "", PROTOCOLS[p.get("protocol", "TCP")], p["port"],
                              p.get("nodePort") or 0)
                  for p in spec.get("ports") or () if p.get("protocol", "TCP") in PROTOCOLS and p.get("port"))
    ingress = [i.get("ip") for i in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()]
    external = _ipv4(spec.get("externalIPs")) + _ipv4(ingress)
    if not (cluster_ips or external) or not ports:
        return None             # headless, or nothing to serve
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        affinity = config.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT
    return Service(cluster_ips, ports, tuple(dict.fromkeys(external)),
                   spec.get("internalTrafficPolicy") == "Local", spec.get("externalTrafficPolicy") == "Local",
                   affinity)


def endpoint_slice_from_api(obj: dict) -> EndpointSlice | None:
    if obj.get("addressType") != "IPv4":
        return None
    meta = obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    if not service:
        return None
    ports = tuple((p.get("name") or "", PROTOCOLS[p.get("protocol", "TCP")], p["port"])
                  for p in obj.get("ports") or () if p.get("protocol", "TCP") in PROTOCOLS and p.get("port"))
    endpoints = []
    for e in obj.get("endpoints") or ():
        cond = e.get("conditions") or {}
        ready = cond.get("ready") is not False           # unset means ready
        serving = cond.get("serving", ready) is not False
        for ip in _ipv4(e.get("addresses"))[:1]:         # the first address is the one to use
            endpoints.append(Endpoint(ip, e.get("nodeName") or "", ready, serving, bool(cond.get("terminating"))))
    return EndpointSlice(f"{meta.get('namespace')}/{service}", ports, tuple(endpoints))


def node_from_api(obj: dict) -> Node:
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    internal = [a.get("address") for a in status.get("addresses") or () if a.get("type") == "InternalIP"]
    pod_cidr = ""
    for cidr in spec.get("podCIDRs") or [spec.get("podCIDR")]:
        try:
            pod_cidr = str(ipaddress.IPv4Network(cidr))
            break
        except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError, TypeError):
            continue
    return Node(_ipv4(internal), pod_cidr)


def _backends(slices: list[EndpointSlice], port: ServicePort, node: str | None) -> tuple[Backend, ...]:
    """The endpoints serving `port`, as kube-proxy picks them (on `node` only, unless None)."""
    ready, terminating = {}, {}
    for s in slices:
        for name, proto, target in s.ports:
            if name != port.name or proto != port.protocol:
                continue
            for e in s.endpoints:
                if node is not None and e.node != node:
                    continue
                if e.ready:
                    ready[Backend(e.ip, target, proto)] = None
                elif e.serving and e.terminating:
                    terminating[Backend(e.ip, target, proto)] = None
    return tuple(sorted(ready or terminating))


def service_frontends(svc: Service, slices: list[EndpointSlice], node_name: str, node_ip: str,
                      nodes: dict[str, Node]) -> tuple[dict[Frontend, tuple[Backend, ...]],
                                                       dict[Frontend, tuple[Backend, ...]]]:
    """(socket LB frontends, XDP LB frontends) of one Service on node `node_name` (address `node_ip`).
    A NodePort answers on every address of every node in `nodes`; with externalTrafficPolicy Local,
    each node's address leads to that node's endpoints."""
    sock: dict[Frontend, tuple[Backend, ...]] = {}
    xdp: dict[Frontend, tuple[Backend, ...]] = {}
    node_addresses = {node_ip: node_name}
    for name, node in nodes.items():
        node_addresses.update(dict.fromkeys(node.addresses, name))
    for port in svc.ports:
        internal = _backends(slices, port, node_name if svc.local_internal else None)
        external = _backends(slices, port, node_name if svc.local_external else None)
        for ip in svc.cluster_ips:
            sock[(ip, port.port, port.protocol)] = internal
        if port.node_port:
            for ip, owner in node_addresses.items():
                backends = _backends(slices, port, owner) if svc.local_external and owner != node_name else external
                sock[(ip, port.node_port, port.protocol)] = backends
            xdp[(node_ip, port.node_port, port.protocol)] = external
        for ip in svc.external_ips:
            if ip in node_addresses:
                continue        # a Service never takes over a node's own address (its SSH, its kubelet)
            sock[(ip, port.port, port.protocol)] = external
            xdp[(ip, port.port, port.protocol)] = external
    return sock, xdp
