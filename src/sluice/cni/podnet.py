"""The pod's network plumbing, done from the node's netns with pyroute2: the
veth pair, the pod's address, routes and gateway neighbour, and the node's
route to the pod (plugins/pkg/ip and pkg/ns of containernetworking/plugins)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Iterator

from pyroute2 import IPRoute

from ..netlink import in_netns, ipr

HOST_IFNAME = re.compile(r"sl[0-9a-f]{11}")
IFF_UP = 0x1
RT_SCOPE_LINK = 253
NUD_PERMANENT = 0x80


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mac: str
    mtu: int
    up: bool            # administratively up
    kind: str | None
    peer_index: int     # a veth's peer, as an ifindex of the peer's netns


@dataclass(frozen=True)
class PodView:
    """What CHECK compares: the pod interface, its addresses and the routes through it."""
    link: Link | None
    addresses: frozenset[str]                     # "ip/prefixlen"
    routes: frozenset[tuple[str, str | None]]     # (dst/len, gateway) via the pod interface


def host_ifname(container_id: str, ifname: str) -> str:
    return "sl" + hashlib.sha256((container_id + ifname).encode()).hexdigest()[:11]


@contextlib.contextmanager
def netns_ipr(netns: str) -> Iterator[IPRoute]:
    """An IPRoute whose socket lives in the netns at `netns`; only its creation needs setns."""
    with in_netns(netns):
        ip = IPRoute()
    try:
        yield ip
    finally:
        ip.close()


def _link(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    return Link(name=msg.get_attr("IFLA_IFNAME"), index=msg["index"], mac=msg.get_attr("IFLA_ADDRESS"),
                mtu=msg.get_attr("IFLA_MTU"), up=bool(msg["flags"] & IFF_UP),
                kind=info.get_attr("IFLA_INFO_KIND") if info is not None else None,
                peer_index=msg.get_attr("IFLA_LINK") or 0)


def get_link(ip: IPRoute, name: str) -> Link | None:
    index = ip.link_lookup(ifname=name)
    return _link(ip.get_links(index[0])[0]) if index else None


def host_link(name: str) -> Link | None:
    with ipr() as ip:
        return get_link(ip, name)


def host_veths() -> list[str]:
    """Node-side veths named like the ones ADD creates."""
    with ipr() as ip:
        return [link.name for link in map(_link, ip.get_links())
                if link.kind == "veth" and HOST_IFNAME.fullmatch(link.name)]


def pod_link(netns: str, ifname: str) -> Link | None:
    with netns_ipr(netns) as ip:
        return get_link(ip, ifname)


def create_veth(host: str, netns: str, ifname: str, mtu: int) -> tuple[Link, Link]:
    """A veth pair, `host` up in this netns and `ifname` directly in `netns`, so the
    pod end never sits in the node's netns under a name that could clash."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        with ipr() as ip:
            ip.link("add", ifname=host, kind="veth", mtu=mtu, peer={"ifname": ifname, "net_ns_fd": fd, "mtu": mtu})
            index = ip.link_lookup(ifname=host)[0]
            ip.link("set", index=index, state="up")
            host_end = get_link(ip, host)
    finally:
        os.close(fd)
    return host_end, pod_link(netns, ifname)


def configure_pod(netns: str, ifname: str, address: str, gateway: str, gateway_mac: str) -> None:
    """Up, POD_IP/32, an on-link route to the gateway, the default route through it and a
    permanent neighbour entry for it, so the pod never ARPs for its gateway. Re-runnable."""
    with netns_ipr(netns) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
        index = ip.link_lookup(ifname=ifname)[0]
        ip.link("set", index=index, state="up")
        ip.addr("replace", index=index, address=address, prefixlen=32)
        ip.neigh("replace", dst=gateway, lladdr=gateway_mac, ifindex=index, state=NUD_PERMANENT)
        ip.route("replace", dst=f"{gateway}/32", oif=index, scope=RT_SCOPE_LINK)
        ip.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index)


def inspect_pod(netns: str, ifname: str) -> PodView:
    with netns_ipr(netns) as ip:
        link = get_link(ip, ifname)
        if link is None:
            return PodView(None, frozenset(), frozenset())
        addresses = frozenset(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                              for a in ip.get_addr(family=socket.AF_INET, index=link.index))
        routes = frozenset((f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", r.get_attr("RTA_GATEWAY"))
                           for r in ip.get_routes(family=socket.AF_INET, table=254, oif=link.index))
    return PodView(link, addresses, routes)


def replace_host_route(host_index: int, address: str) -> None:
    """POD_IP/32 dev HOSTVETH: how the node (and its stack) reaches the pod."""
    with ipr() as ip:
        ip.route("replace", dst=f"{address}/32", oif=host_index, scope=RT_SCOPE_LINK)


def host_route_oif(address: str) -> int | None:
    """The device of the node's POD_IP/32 route, if there is one."""
    with ipr() as ip:
        # A dump filtered here: get_routes(dst=...) would do a FIB lookup and find the default route.
        for route in ip.get_routes(family=socket.AF_INET, table=254):
            if route["dst_len"] == 32 and route.get_attr("RTA_DST") == address:
                return route.get_attr("RTA_OIF")
    return None
