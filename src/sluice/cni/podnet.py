"""The pod's network plumbing, done from the node's netns: the veth pair, the
pod's address, routes and gateway neighbour, and the node's route to the pod
(plugins/pkg/ip and pkg/ns of containernetworking/plugins).

Plain rtnetlink sockets (sluice.netlink.Rtnl), one per netns per CNI operation
(`Sockets`): an ADD is about a dozen request/answer pairs on two sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Iterator

from .. import netlink
from ..netlink import Rtnl

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


class Sockets:
    """The netlink sockets of one CNI operation: the node's netns' (opened by the calling thread, which
    is in the node's netns), and the pod's, opened on first use; each is opened once."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._host: Rtnl | None = None
        self._pod: Rtnl | None = None

    @property
    def host(self) -> Rtnl:
        if self._host is None:
            self._host = Rtnl()
        return self._host

    @property
    def pod(self) -> Rtnl:
        if self._pod is None:
            self._pod = netlink.netns_rtnl(self.netns)
        return self._pod

    def close(self) -> None:
        for sock in (self._host, self._pod):
            if sock is not None:
                sock.close()
        self._host = self._pod = None

    def __enter__(self) -> "Sockets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _sockets(nl: Sockets | None, netns: str | None = None) -> Iterator[Sockets]:
    """`nl` as it is, or sockets of our own for the duration of one call."""
    if nl is not None:
        yield nl
        return
    with Sockets(netns) as own:
        yield own


def host_ifname(container_id: str, ifname: str) -> str:
    return "sl" + hashlib.sha256((container_id + ifname).encode()).hexdigest()[:11]


def _link(msg: netlink.LinkMsg) -> Link:
    return Link(name=msg.name, index=msg.index, mac=msg.mac, mtu=msg.mtu, up=bool(msg.flags & IFF_UP),
                kind=msg.kind, peer_index=msg.peer_index)


def get_link(rtnl: Rtnl, name: str) -> Link | None:
    msg = rtnl.link(name)
    return _link(msg) if msg is not None else None


def host_link(name: str, nl: Sockets | None = None) -> Link | None:
    with _sockets(nl) as socks:
        return get_link(socks.host, name)


def host_veths(nl: Sockets | None = None) -> list[str]:
    """Node-side veths named like the ones ADD creates."""
    with _sockets(nl) as socks:
        return [msg.name for msg in socks.host.links() if msg.kind == "veth" and HOST_IFNAME.fullmatch(msg.name)]


def pod_link(netns: str, ifname: str, nl: Sockets | None = None) -> Link | None:
    with _sockets(nl, netns) as socks:
        return get_link(socks.pod, ifname)


def create_veth(host: str, netns: str, ifname: str, mtu: int, nl: Sockets | None = None) -> tuple[Link, Link]:
    """A veth pair, `host` up in this netns and `ifname` directly in `netns`, so the
    pod end never sits in the node's netns under a name that could clash."""
    with _sockets(nl, netns) as socks:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            socks.host.add_veth(host, ifname, fd, mtu)
        finally:
            os.close(fd)
        return get_link(socks.host, host), get_link(socks.pod, ifname)


def configure_pod(netns: str, ifname: str, address: str, gateway: str, gateway_mac: str,
                  nl: Sockets | None = None, index: int | None = None) -> None:
    """Up, POD_IP/32, an on-link route to the gateway, the default route through it and a
    permanent neighbour entry for it, so the pod never ARPs for its gateway. Re-runnable.
    `index`: the pod interface's ifindex, when the caller knows it."""
    with _sockets(nl, netns) as socks:
        pod = socks.pod
        pod.set_up("lo")
        if index is None:
            link = pod.link(ifname)
            if link is None:
                raise netlink.NetlinkError(19, f"{ifname} does not exist in {netns}")
            index = link.index
        pod.set_up(index=index)
        pod.replace_addr(index, address, 32)
        pod.replace_neigh(index, gateway, gateway_mac, NUD_PERMANENT)
        pod.replace_route(f"{gateway}/32", index, scope=RT_SCOPE_LINK)
        pod.replace_route("0.0.0.0/0", index, gateway=gateway)


def inspect_pod(netns: str, ifname: str, nl: Sockets | None = None) -> PodView:
    with _sockets(nl, netns) as socks:
        link = get_link(socks.pod, ifname)
        if link is None:
            return PodView(None, frozenset(), frozenset())
        addresses = frozenset(socks.pod.addrs(link.index))
        routes = frozenset((f"{r.dst}/{r.dst_len}", r.gateway) for r in socks.pod.routes()
                           if r.table == netlink.RT_TABLE_MAIN and r.oif == link.index)
    return PodView(link, addresses, routes)


def replace_host_route(host_index: int, address: str, nl: Sockets | None = None) -> None:
    """POD_IP/32 dev HOSTVETH: how the node (and its stack) reaches the pod."""
    with _sockets(nl) as socks:
        socks.host.replace_route(f"{address}/32", host_index, scope=RT_SCOPE_LINK)


def delete_host_route(host_index: int, address: str, nl: Sockets | None = None) -> bool:
    """Delete POD_IP/32 dev HOSTVETH if it still goes through that veth; False when it does not."""
    with _sockets(nl) as socks:
        return socks.host.delete_route(f"{address}/32", netlink.RTPROT_STATIC, oif=host_index)


def host_route_oif(address: str, nl: Sockets | None = None) -> int | None:
    """The device of the node's POD_IP/32 route, if there is one."""
    with _sockets(nl) as socks:
        # A dump filtered here: asking for the route to the address would do a FIB lookup and find the default route.
        for route in socks.host.routes():
            if route.table == netlink.RT_TABLE_MAIN and route.dst_len == 32 and route.dst == address:
                return route.oif
    return None
