"""The runtime's one netlink layer: links, veths, addresses, routes (lwtunnel encap included), XDP state,
tc dumps and requests (sluice.tc encodes its messages, this module carries them), and generic netlink (a
device's XDP features).

What runs per pod (the CNI commands) and per reconcile (routes Sluice owns, which networks a NIC is on)
goes through `Rtnl`, a plain rtnetlink socket of the netns it was opened in: one request and its
answer per operation, a few tens of microseconds each. pyroute2 (an asyncio event loop per handle,
~1 ms to open one and ~0.5 ms per request) is kept for what runs rarely and is long to encode by hand:
creating the VXLAN device, link details with XDP state, and a NIC's MTU (sluice.nic); tc qdiscs and
cls_bpf filters go through `Rtnl` (sluice.tc encodes them), as a pod's filter is added on every CNI ADD.
Errors are pyroute2's NetlinkError either way (`.code` is the errno), so callers catch one type. No
route, link or address is changed by running `ip`; NIC tuning (sluice.nic) runs ethtool, whose
channels, rings and offloads are its own to encode.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

# IFLA_XDP_ATTACHED, as the kernel numbers it and as pyroute2 names it
XDP_ATTACHED = {0: "none", 1: "native", 2: "generic", 3: "offload", 4: "multi",
                "none": "none", "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}


class LinkNotFound(LookupError):
    pass


@contextlib.contextmanager
def ipr():
    ip = IPRoute()
    try:
        yield ip
    finally:
        ip.close()


def link(ifname: str) -> dict:
    """ifindex, mac, mtu, operstate and XDP mode of a device in this netns."""
    with ipr() as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            raise LinkNotFound(f"interface {ifname!r} does not exist")
        msg = ip.get_links(idx[0])[0]
    xdp = msg.get_attr("IFLA_XDP")
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else 0
    return {
        "ifname": ifname,
        "ifindex": msg["index"],
        "mac": msg.get_attr("IFLA_ADDRESS"),
        "mtu": msg.get_attr("IFLA_MTU"),
        "operstate": msg.get_attr("IFLA_OPERSTATE"),
        "kind": _kind(msg),
        "xdp": XDP_ATTACHED.get(attached or 0, str(attached)),
    }


def _kind(msg) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def xdp_attached_mode(ifname: str) -> str:
    return link(ifname)["xdp"]


def ifindex(ifname: str) -> int | None:
    """The index of `ifname` in the calling thread's netns, None when there is none (SIOCGIFINDEX: no
    netlink needed)."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def exists(ifname: str) -> bool:
    """Whether `ifname` exists in the calling thread's netns."""
    return ifindex(ifname) is not None


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """os.setns() and os.CLONE_NEWNET arrive in Python 3.12; the venv runs 3.11."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(path: str):
    """setns() the calling thread into the netns at `path`, and back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError:
        os.close(own)
        raise
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


def ensure_vxlan(name: str, dstport: int, underlay: str, mtu: int | None = None) -> bool:
    """An external (collect_md) VXLAN device: the tunnel key comes from the BPF program."""
    with ipr() as ip:
        if ip.link_lookup(ifname=name):
            return False
        dev = ip.link_lookup(ifname=underlay)
        if not dev:
            raise LinkNotFound(f"underlay interface {underlay!r} does not exist")
        ip.link("add", ifname=name, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=dstport,
                vxlan_learning=0, **({"mtu": mtu} if mtu else {}))
        ip.link("set", index=ip.link_lookup(ifname=name)[0], state="up")
        return True


def delete_link(ifname: str, rtnl: "Rtnl | None" = None) -> bool:
    """Delete a device by name (one RTM_DELLINK); False when there was none."""
    with _rtnl(rtnl) as nl:
        return nl.delete_link(ifname)


def connected_networks(ifname: str, rtnl: "Rtnl | None" = None) -> list[ipaddress.IPv4Network]:
    """The networks directly connected through `ifname`: main-table unicast routes through it without a
    gateway (what the kernel asks of a route's gateway on that device)."""
    with _rtnl(rtnl) as nl:
        try:
            index = socket.if_nametoindex(ifname)
        except OSError:
            return []
        return [ipaddress.IPv4Network(f"{r.dst}/{r.dst_len}") for r in nl.routes()
                if r.oif == index and r.gateway is None and r.type == RTN_UNICAST and r.table == RT_TABLE_MAIN]


def on_link(address: str, ifname: str) -> bool:
    """Whether `address` lies on a network directly connected through `ifname`."""
    return any(ipaddress.IPv4Address(address) in net for net in connected_networks(ifname))


def owned_routes(proto: int, rtnl: "Rtnl | None" = None) -> dict[str, dict]:
    """IPv4 routes of the main table carrying rtnetlink protocol `proto`."""
    with _rtnl(rtnl) as nl:
        return {f"{r.dst}/{r.dst_len}": {"gateway": r.gateway, "oif": r.oif}
                for r in nl.routes() if r.protocol == proto and r.table == RT_TABLE_MAIN}


def replace_route(cidr: str, proto: int, dev: str, gateway: str | None = None,
                  vxlan_vni: int | None = None, vxlan_dst: str | None = None) -> None:
    """Add or replace a route Sluice owns. A VXLAN route carries its tunnel key as lwtunnel
    `encap ip id VNI dst REMOTE` (what the external-mode VXLAN device encapsulates with)."""
    try:
        index = socket.if_nametoindex(dev)
    except OSError:
        raise LinkNotFound(f"interface {dev!r} does not exist") from None
    with _rtnl(None) as nl:
        nl.replace_route(cidr, index, gateway=gateway, proto=proto,
                         encap=(vxlan_vni or 0, vxlan_dst) if vxlan_dst else None)


def delete_route(cidr: str, proto: int) -> bool:
    with _rtnl(None) as nl:
        return nl.delete_route(cidr, proto)


# ---- plain rtnetlink --------------------------------------------------------------------------

# linux/rtnetlink.h, linux/netlink.h, linux/if_link.h, linux/veth.h, linux/neighbour.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x100, 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE, RTA_ENCAP_TYPE, RTA_ENCAP = 1, 4, 5, 15, 21, 22
LWTUNNEL_ENCAP_IP, LWTUNNEL_IP_ID, LWTUNNEL_IP_DST = 2, 1, 2     # linux/lwtunnel.h
NDA_DST, NDA_LLADDR = 1, 2
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4               # what pyroute2 gave the routes Sluice adds without a protocol of its own
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
NUD_PERMANENT = 0x80
NLA_F_NESTED = 0x8000

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")       # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")        # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")        # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")         # family, ifindex, state, flags, type
_U32 = struct.Struct("=I")


def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute (struct nlattr + payload, padded to 4 bytes)."""
    size = _NLATTR.size + len(data)
    return _NLATTR.pack(size, kind) + data + b"\0" * (-size % 4)


def nest(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def _str(value: str) -> bytes:
    return value.encode() + b"\0"


def _ip(address: str) -> bytes:
    return socket.inet_aton(address)


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(p, 16) for p in mac.split(":"))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The netlink attributes in `data` from `offset` on, by type (nested/byte-order flags stripped)."""
    out = {}
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _NLATTR.size: offset + length]
        offset += (length + 3) & ~3
    return out


def cstr(raw: bytes | None) -> str | None:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


@dataclass(frozen=True)
class LinkMsg:
    """What a caller needs of an RTM_NEWLINK answer."""

    name: str
    index: int
    flags: int
    mac: str | None
    mtu: int | None
    kind: str | None       # linkinfo kind (veth, vxlan, ...)
    peer_index: int        # IFLA_LINK: a veth's peer, as an ifindex of the peer's netns


@dataclass(frozen=True)
class RouteMsg:
    dst: str
    dst_len: int
    table: int
    protocol: int
    scope: int
    type: int
    oif: int | None
    gateway: str | None


def _link_msg(payload: bytes) -> LinkMsg:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    attrs = parse_attrs(payload, _IFINFOMSG.size)
    info = parse_attrs(attrs[IFLA_LINKINFO], 0) if IFLA_LINKINFO in attrs else {}
    mac = attrs.get(IFLA_ADDRESS)
    return LinkMsg(name=cstr(attrs.get(IFLA_IFNAME)) or "", index=index, flags=flags,
                   mac=":".join(f"{b:02x}" for b in mac) if mac is not None else None,
                   mtu=_U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else None,
                   kind=cstr(info.get(IFLA_INFO_KIND)),
                   peer_index=_U32.unpack(attrs[IFLA_LINK])[0] if IFLA_LINK in attrs else 0)


def _route_msg(payload: bytes) -> RouteMsg:
    _family, dst_len, _src_len, _tos, table, protocol, scope, rtype, _flags = _RTMSG.unpack_from(payload)
    attrs = parse_attrs(payload, _RTMSG.size)
    return RouteMsg(dst=socket.inet_ntoa(attrs[RTA_DST]) if RTA_DST in attrs else "0.0.0.0", dst_len=dst_len,
                    table=_U32.unpack(attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else table,
                    protocol=protocol, scope=scope, type=rtype,
                    oif=_U32.unpack(attrs[RTA_OIF])[0] if RTA_OIF in attrs else None,
                    gateway=socket.inet_ntoa(attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None)


class Rtnl:
    """A plain NETLINK_ROUTE socket. It belongs to the netns of the thread that opened it, and keeps
    talking to that netns whatever thread uses it later (one thread at a time)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msg_type: int, flags: int, body: bytes) -> int:
        self._seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags | NLM_F_REQUEST, self._seq, 0)
                       + body)
        return self._seq

    def _answers(self, seq: int):
        """(type, payload) of every message answering `seq`, up to the ACK, error or end of dump."""
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size: offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue            # a late answer to an earlier request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                yield kind, payload

    def request(self, msg_type: int, flags: int, body: bytes) -> list[bytes]:
        """One request, answered by an ACK or an error (raised as NetlinkError); what came before the ACK."""
        return [payload for _kind, payload in self._answers(self._send(msg_type, flags | NLM_F_ACK, body))]

    def dump(self, msg_type: int, body: bytes) -> list[bytes]:
        return [payload for _kind, payload in self._answers(self._send(msg_type, NLM_F_DUMP, body))]

    # ---- links

    def link(self, name: str) -> LinkMsg | None:
        """The device `name` of this netns, or None."""
        try:
            answers = self.request(RTM_GETLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                                   + attr(IFLA_IFNAME, _str(name)))
        except NetlinkError as e:
            if e.code == 19:    # ENODEV
                return None
            raise
        return _link_msg(answers[0]) if answers else None

    def links(self) -> list[LinkMsg]:
        return [_link_msg(p) for p in self.dump(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]

    def set_up(self, name: str | None = None, index: int = 0) -> None:
        """IFF_UP on a device, by index or by name."""
        self.request(RTM_NEWLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
                     + (attr(IFLA_IFNAME, _str(name)) if name and not index else b""))

    def add_veth(self, name: str, peer: str, peer_netns_fd: int, mtu: int) -> None:
        """A veth pair: `name` up in this netns, `peer` (down) created directly in the netns of `peer_netns_fd`."""
        peer_info = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _str(peer))
                     + attr(IFLA_NET_NS_FD, _U32.pack(peer_netns_fd)) + attr(IFLA_MTU, _U32.pack(mtu)))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                     _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP) + attr(IFLA_IFNAME, _str(name))
                     + attr(IFLA_MTU, _U32.pack(mtu))
                     + nest(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _str("veth")),
                            nest(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))))

    def delete_link(self, name: str) -> bool:
        try:
            self.request(RTM_DELLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _str(name)))
        except NetlinkError as e:
            if e.code == 19:    # ENODEV: not there (or gone meanwhile)
                return False
            raise
        return True

    # ---- addresses, neighbours, routes

    def replace_addr(self, index: int, address: str, prefixlen: int) -> None:
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE,
                     _IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                     + attr(IFA_LOCAL, _ip(address)) + attr(IFA_ADDRESS, _ip(address)))

    def addrs(self, index: int) -> list[str]:
        """"ip/prefixlen" of every IPv4 address on device `index`."""
        out = []
        for payload in self.dump(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            _family, prefixlen, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(payload)
            attrs = parse_attrs(payload, _IFADDRMSG.size)
            if ifindex == index and IFA_ADDRESS in attrs:
                out.append(f"{socket.inet_ntoa(attrs[IFA_ADDRESS])}/{prefixlen}")
        return out

    def replace_neigh(self, index: int, address: str, mac: str, state: int = NUD_PERMANENT) -> None:
        self.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE,
                     _NDMSG.pack(socket.AF_INET, index, state, 0, 0)
                     + attr(NDA_DST, _ip(address)) + attr(NDA_LLADDR, _mac_bytes(mac)))

    def replace_route(self, cidr: str, oif: int, gateway: str | None = None, scope: int = RT_SCOPE_UNIVERSE,
                      proto: int = RTPROT_STATIC, encap: tuple[int, str] | None = None) -> None:
        """A main-table unicast route to `cidr` through device `oif` (and `gateway`), added or replaced;
        `encap` (tunnel id, remote address): the lwtunnel `encap ip` a tunnel device in external mode
        takes its key from."""
        net = ipaddress.IPv4Network(cidr)
        lwt = b""
        if encap:
            lwt = attr(RTA_ENCAP_TYPE, struct.pack("=H", LWTUNNEL_ENCAP_IP)) + nest(
                RTA_ENCAP, attr(LWTUNNEL_IP_ID, struct.pack(">Q", encap[0])), attr(LWTUNNEL_IP_DST, _ip(encap[1])))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE,
                     _RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, RT_TABLE_MAIN, proto, scope, RTN_UNICAST, 0)
                     + attr(RTA_DST, net.network_address.packed) + attr(RTA_OIF, _U32.pack(oif))
                     + (attr(RTA_GATEWAY, _ip(gateway)) if gateway else b"") + lwt)

    def delete_route(self, cidr: str, proto: int, oif: int | None = None) -> bool:
        """Delete the main-table route to `cidr` of protocol `proto` (through device `oif` only, when
        given); False when there is none."""
        net = ipaddress.IPv4Network(cidr)
        try:
            self.request(RTM_DELROUTE, 0,
                         _RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, RT_TABLE_MAIN, proto, RT_SCOPE_NOWHERE, 0, 0)
                         + attr(RTA_DST, net.network_address.packed)
                         + (attr(RTA_OIF, _U32.pack(oif)) if oif is not None else b""))
        except NetlinkError as e:
            if e.code == 3:     # ESRCH: not there
                return False
            raise
        return True

    def routes(self) -> list[RouteMsg]:
        """Every IPv4 route of every table."""
        return [_route_msg(p) for p in self.dump(RTM_GETROUTE, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0))]


@contextlib.contextmanager
def _rtnl(rtnl: Rtnl | None):
    """`rtnl` as it is, or a socket of the calling thread's netns for the duration."""
    if rtnl is not None:
        yield rtnl
        return
    with Rtnl() as own:
        yield own


def netns_rtnl(path: str) -> Rtnl:
    """An Rtnl of the netns at `path`; only its creation needs setns."""
    with in_netns(path):
        return Rtnl()


# ---- generic netlink: the `netdev` family's xdp-features ------------------------------------

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NETDEV_CMD_DEV_GET = 1
NETDEV_A_DEV_IFINDEX, NETDEV_A_DEV_XDP_FEATURES = 1, 3
NETDEV_XDP_ACT_BASIC = 1
_GENLMSGHDR = struct.Struct("=BBH")         # cmd, version, reserved


def _genl_request(sock, family: int, cmd: int, attrs: bytes, seq: int) -> dict[int, bytes] | None:
    """The attributes of the answer to one generic netlink request, or None for an error."""
    body = _GENLMSGHDR.pack(cmd, 1, 0) + attrs
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, NLM_F_REQUEST, seq, 0) + body)
    data = sock.recv(65536)
    length, msg_type = struct.unpack_from("=IH", data)
    if msg_type == NLMSG_ERROR:
        return None
    return parse_attrs(data[_NLMSGHDR.size + _GENLMSGHDR.size:length])


def xdp_features(ifindex: int) -> int | None:
    """The device's XDP features (NETDEV_XDP_ACT_*) as the kernel reports them; None where it cannot."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
            sock.settimeout(2)
            fam = _genl_request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, _str("netdev")), 1)
            if not fam or CTRL_ATTR_FAMILY_ID not in fam:
                return None
            family = struct.unpack("=H", fam[CTRL_ATTR_FAMILY_ID][:2])[0]
            dev = _genl_request(sock, family, NETDEV_CMD_DEV_GET, attr(NETDEV_A_DEV_IFINDEX, _U32.pack(ifindex)), 2)
    except OSError:
        return None
    if not dev or NETDEV_A_DEV_XDP_FEATURES not in dev:
        return None
    return struct.unpack("=Q", dev[NETDEV_A_DEV_XDP_FEATURES][:8])[0]
