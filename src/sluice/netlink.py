"""Netlink operations (pyroute2) the runtime needs: links, veths, addresses, routes, XDP state."""

from __future__ import annotations

import contextlib
import ctypes
import os

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


def exists(ifname: str) -> bool:
    with ipr() as ip:
        return bool(ip.link_lookup(ifname=ifname))


CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """os.setns() and os.CLONE_NEWNET arrive in Python 3.12; the venv runs 3.11."""
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
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


def delete_link(ifname: str) -> bool:
    with ipr() as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            return False
        try:
            ip.link("del", index=idx[0])
        except NetlinkError as e:
            if e.code != 19:  # ENODEV: gone meanwhile
                raise
        return True


def on_link(address: str, ifname: str) -> bool:
    """Whether `address` lies on a network directly connected through `ifname` (a main-table route
    through it without a gateway): what the kernel asks of a route's gateway on that device."""
    import ipaddress

    with ipr() as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            return False
        for r in ip.get_routes(family=2, table=254):
            if r.get_attr("RTA_OIF") == idx[0] and r.get_attr("RTA_GATEWAY") is None and r["type"] == 1:
                net = ipaddress.IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")
                if ipaddress.IPv4Address(address) in net:
                    return True
    return False


def owned_routes(proto: int) -> dict[str, dict]:
    """IPv4 routes of the main table carrying rtnetlink protocol `proto`."""
    out = {}
    with ipr() as ip:
        for r in ip.get_routes(family=2, proto=proto):
            cidr = f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            out[cidr] = {"gateway": r.get_attr("RTA_GATEWAY"), "oif": r.get_attr("RTA_OIF")}
    return out


def replace_route(cidr: str, proto: int, dev: str, gateway: str | None = None,
                  vxlan_vni: int | None = None, vxlan_dst: str | None = None) -> None:
    """Add or replace a route Sluice owns. A VXLAN route carries its tunnel
    key as lwtunnel `encap ip`, which pyroute2 cannot express: iproute2 does it."""
    if vxlan_dst:
        import subprocess

        subprocess.run(["ip", "route", "replace", cidr, "encap", "ip", "id", str(vxlan_vni), "dst", vxlan_dst,
                        "dev", dev, "proto", str(proto)], check=True, capture_output=True, text=True)
        return
    with ipr() as ip:
        idx = ip.link_lookup(ifname=dev)
        if not idx:
            raise LinkNotFound(f"interface {dev!r} does not exist")
        ip.route("replace", dst=cidr, gateway=gateway, oif=idx[0], proto=proto)


def delete_route(cidr: str, proto: int) -> bool:
    with ipr() as ip:
        try:
            ip.route("del", dst=cidr, proto=proto)
        except NetlinkError as e:
            if e.code == 3:  # ESRCH: not there
                return False
            raise
    return True
