"""The CNI commands, executed inside the agent.

The agent runs them concurrently, one at a time per attachment, GC alone
(sluice.agent.CniLocks). handle() raises CniError and nothing else, so the
agent can always answer the plugin with a CNI error.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from netaddr import IPAddress
from pyroute2 import NetlinkError

from .. import netlink
from ..datapath import Datapath
from ..ipam import Ipam
from ..maps import Endpoint, EndpointsMap
from . import podnet, spec
from .errors import (CHECK_FAILURE, INTERNAL_FAILURE, INVALID_NETWORK_CONFIG, IPAM_FAILURE, PLUGIN_NOT_AVAILABLE,
                     SETUP_FAILURE, UNKNOWN_CONTAINER, CniError)

VALID_ATTACHMENTS = "cni.dev/valid-attachments"
POD_PROGRAM = "tc_from_pod"


@dataclass
class NodeContext:
    datapath: Datapath
    ipam: Ipam
    mtu: int = 1500
    ready: Callable[[], bool] = lambda: True   # the agent's readiness: node state applied
    # after_answer(work): runs `work` once the command has answered, its attachment still held (the agent's
    # CniLocks); None: the command does it before answering.
    after_answer: Callable[[Callable[[], object]], None] | None = None


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    conf: dict

    @property
    def subject(self) -> str:
        return f"{self.command} of {self.ifname} for container {self.container_id}"


def handle(command: str, env: dict, stdin: str, node: NodeContext) -> dict | None:
    """Run one CNI command; the result (ADD, VERSION) or None."""
    command = spec.check_command(command)
    if command == "VERSION":
        return spec.version_info()
    conf = spec.parse_config(stdin, command)
    spec.check_env(command, env)
    req = Request(command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""), env.get("CNI_IFNAME", ""), conf)
    try:
        return COMMANDS[command](req, node)
    except CniError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into a CNI error the runtime can show
        subject = req.subject if req.container_id else command
        raise CniError(INTERNAL_FAILURE, f"{subject} failed: {_reason(e)}", f"{type(e).__name__}: {e}") from e


def _reason(e: Exception) -> str:
    if isinstance(e, NetlinkError):
        return os.strerror(e.code)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


@contextlib.contextmanager
def _step(what: str, code: int = SETUP_FAILURE) -> Iterator[None]:
    try:
        yield
    except CniError:
        raise
    except Exception as e:  # noqa: BLE001 - named after the step that failed
        raise CniError(code, f"{what} failed: {_reason(e)}") from e


def _require_netns(req: Request) -> None:
    if not os.path.exists(req.netns):
        raise CniError(UNKNOWN_CONTAINER,
                       f"network namespace {req.netns} of container {req.container_id} does not exist")


# ---- ADD ----------------------------------------------------------------------------------

def _add(req: Request, node: NodeContext) -> dict:
    _require_netns(req)
    with podnet.Sockets(req.netns) as nl:
        return _add_with(req, node, nl)


def _add_with(req: Request, node: NodeContext, nl: podnet.Sockets) -> dict:
    host = podnet.host_ifname(req.container_id, req.ifname)
    gateway = str(node.ipam.gateway)
    undo: list[tuple[str, Callable[[], object]]] = []   # run in reverse when a later step fails
    try:
        requested = _requested_address(req.conf)
        mtu = _mtu(req.conf, node.mtu)
        with _step("allocating an address", IPAM_FAILURE):
            claimed, new = node.ipam.claim(req.container_id, req.ifname, requested)
            address = str(claimed)
        if new:
            undo.append((f"releasing {address}", lambda: node.ipam.release(req.container_id, req.ifname)))
        with _step(f"creating veth pair {host} - {req.ifname} in {req.netns}"):
            left = podnet.host_link(host, nl)
            pair = _existing_pair(left, req, nl)
            fresh = pair is None
            if fresh:
                if left is not None:
                    netlink.delete_link(host, nl.host)  # left over from an interrupted ADD, without a pod end
                undo.append((f"deleting {host}", lambda: netlink.delete_link(host)))
                pair = podnet.create_veth(host, req.netns, req.ifname, mtu, nl=nl)
        host_end, pod_end = pair
        with _step(f"configuring {req.ifname} in {req.netns}"):
            podnet.configure_pod(req.netns, req.ifname, address, gateway, host_end.mac, nl=nl, index=pod_end.index)
        with _step(f"adding the node route {address}/32 dev {host}"):
            podnet.replace_host_route(host_end.index, address, nl)  # deleted with the veth
        with _step(f"attaching {POD_PROGRAM} to {host}"):
            if fresh:
                undo.append((f"detaching {host}", lambda: node.datapath.detach_device(host)))
            node.datapath.attach_pod(host)
        with _step(f"adding {address} to the endpoints map"), node.datapath.open_map(EndpointsMap) as endpoints:
            if fresh:
                undo.append((f"removing endpoint {address}", lambda: _delete_endpoint(node, address)))
            endpoints.put(address, Endpoint(host_end.index, pod_end.mac, host_end.mac))
    except CniError as e:
        undo_failures = _run_undo(undo)
        raise CniError(e.code, f"{req.subject}: {e.msg}", "; ".join(filter(None, (e.details, undo_failures))))
    return _result(req, host_end, pod_end, address, gateway)


def _mtu(conf: dict, default: int) -> int:
    """The network configuration's MTU (the conflist is per network), else the node's."""
    mtu = conf.get("mtu", default)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise CniError(INVALID_NETWORK_CONFIG, f"mtu {mtu!r} is not an integer in 68..65535")
    return mtu


def _requested_address(conf: dict) -> str | None:
    """The static address a runtime asks for through the `ips` capability, if any."""
    ips = (conf.get("runtimeConfig") or {}).get("ips")
    if ips is None:
        return None
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise CniError(INVALID_NETWORK_CONFIG, f"runtimeConfig.ips must be a list of addresses, not {ips!r}")
    ipv4 = [ip.split("/")[0] for ip in ips if ":" not in ip]
    if len(ipv4) > 1:
        raise CniError(INVALID_NETWORK_CONFIG, f"runtimeConfig.ips asks for {len(ipv4)} IPv4 addresses "
                                               f"({', '.join(ipv4)}); a pod gets one")
    return ipv4[0] if ipv4 else None


def _existing_pair(host_end: podnet.Link | None, req: Request,
                   nl: podnet.Sockets) -> tuple[podnet.Link, podnet.Link] | None:
    """The veth pair of an earlier ADD of the same attachment, if both ends are in place."""
    if host_end is None:
        return None
    pod_end = podnet.pod_link(req.netns, req.ifname, nl)
    if pod_end is None or pod_end.peer_index != host_end.index or host_end.peer_index != pod_end.index:
        return None
    return host_end, pod_end


def _run_undo(undo: list[tuple[str, Callable[[], object]]]) -> str:
    failures = []
    for what, action in reversed(undo):
        try:
            action()
        except Exception as e:  # noqa: BLE001 - keep undoing; report what stayed behind
            failures.append(f"rollback: {what} failed: {_reason(e)}")
    return "; ".join(failures)


def _result(req: Request, host_end: podnet.Link, pod_end: podnet.Link, address: str, gateway: str) -> dict:
    """The ADD result in the configuration's cniVersion."""
    version = req.conf["cniVersion"]
    pod_iface = {"name": pod_end.name, "mac": pod_end.mac, "sandbox": req.netns}
    if version == "1.1.0":
        pod_iface["mtu"] = pod_end.mtu  # new in 1.1.0
    ip = {"address": f"{address}/32", "gateway": gateway, "interface": 1}
    if version == "0.4.0":
        ip = {"version": "4", **ip}
    return {
        "cniVersion": version,
        "interfaces": [{"name": host_end.name, "mac": host_end.mac}, pod_iface],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
    }


# ---- DEL and GC ---------------------------------------------------------------------------

def _del(req: Request, node: NodeContext) -> None:
    # Nothing here enters the pod's netns: DEL must work when it is already gone.
    _teardown(node, req.container_id, req.ifname, node.after_answer)


def _teardown(node: NodeContext, container_id: str, ifname: str,
              after_answer: Callable[[Callable[[], object]], None] | None = None) -> None:
    """Take an attachment off the node: its addresses, endpoint entries and node routes at once; its veth
    (the pod end and the tc attachments with it) and then its pins by `after_answer`, or now.

    The kernel's deletion of a veth waits ~16-20 ms for RCU callbacks, most of a DEL: the pod is out of the
    node's maps and routes before, and nothing else may touch the attachment until it is done (CniLocks)."""
    host = podnet.host_ifname(container_id, ifname)
    index = netlink.ifindex(host)

    def forget(address: str) -> None:
        # Under IPAM's lock: no ADD of another pod can be given the address before its entry and route are gone.
        _delete_endpoint(node, address)
        if index is not None:
            podnet.delete_host_route(index, address)

    node.ipam.release(container_id, ifname, before=lambda addresses: [forget(str(a)) for a in addresses])
    (after_answer or _now)(lambda: _delete_veth(node, host))


def _now(work: Callable[[], object]) -> None:
    work()


def _delete_veth(node: NodeContext, host: str) -> None:
    # Unpinned only once the veth is gone: a tcx link unpinned from a live device would be detached, leaving
    # the pod's packets unchecked meanwhile.
    netlink.delete_link(host)
    node.datapath.detach_device(host)


def _delete_endpoint(node: NodeContext, address: str) -> None:
    with node.datapath.open_map(EndpointsMap) as endpoints:
        endpoints.delete(address)


def _gc(req: Request, node: NodeContext) -> None:
    valid = _valid_attachments(req.conf)
    held = {(record.get("container_id"), record.get("ifname")) for record in node.ipam.allocations().values()}
    for key in sorted(held - valid, key=str):
        if all(isinstance(part, str) and part for part in key):
            _teardown(node, *key)
    node.ipam.gc(valid)  # also records too damaged to name their attachment
    keep = {podnet.host_ifname(*key) for key in valid}
    # Veths an interrupted ADD left without an allocation, and pins of veths already gone.
    links_dir = node.datapath.links_dir
    pinned = set(os.listdir(links_dir)) if os.path.isdir(links_dir) else set()
    for host in sorted(set(podnet.host_veths()) | {name for name in pinned if podnet.HOST_IFNAME.fullmatch(name)}):
        if host not in keep:
            netlink.delete_link(host)   # (first, as in _teardown)
            node.datapath.detach_device(host)
    allocated = {str(address) for address in node.ipam.allocations()}
    with node.datapath.open_map(EndpointsMap) as endpoints:
        for address in endpoints.items():
            if IPAddress(address) in node.ipam.network and address not in allocated:
                endpoints.delete(address)


def _valid_attachments(conf: dict) -> set[tuple[str, str]]:
    entries = conf.get(VALID_ATTACHMENTS)
    if not isinstance(entries, list):
        raise CniError(INVALID_NETWORK_CONFIG, f"GC needs {VALID_ATTACHMENTS} (a list) in the network configuration")
    valid = set()
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("containerID"), str)
                and isinstance(entry.get("ifname"), str)):
            raise CniError(INVALID_NETWORK_CONFIG,
                           f"{VALID_ATTACHMENTS} entry {entry!r} lacks a containerID or ifname string")
        valid.add((entry["containerID"], entry["ifname"]))
    return valid


# ---- CHECK and STATUS ---------------------------------------------------------------------

def _check(req: Request, node: NodeContext) -> None:
    prev = req.conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_NETWORK_CONFIG, "CHECK needs prevResult in the network configuration")
    _require_netns(req)
    with podnet.Sockets(req.netns) as nl:
        _check_with(req, node, prev, nl)


def _check_with(req: Request, node: NodeContext, prev: dict, nl: podnet.Sockets) -> None:
    address, gateway = _prev_address(prev)
    gateway = gateway or str(node.ipam.gateway)
    ip = address.split("/")[0]
    host = podnet.host_ifname(req.container_id, req.ifname)
    container = f"container {req.container_id}"
    where = f"{req.ifname} in {req.netns}"

    def fail(msg: str):
        raise CniError(CHECK_FAILURE, msg)

    host_end = podnet.host_link(host, nl)
    if host_end is None:
        fail(f"host interface {host} for {container} is missing")
    if not host_end.up:
        fail(f"host interface {host} for {container} is down")
    pod = podnet.inspect_pod(req.netns, req.ifname, nl)
    if pod.link is None:
        fail(f"interface {where} of {container} is missing")
    if pod.link.peer_index != host_end.index:
        fail(f"interface {where} is not the peer of host interface {host}")
    if not pod.link.up:
        fail(f"interface {where} is down")
    if address not in pod.addresses:
        fail(f"interface {where} lacks address {address} (has: {', '.join(sorted(pod.addresses)) or 'none'})")
    if (f"{gateway}/32", None) not in pod.routes:
        fail(f"the on-link route to gateway {gateway} on {where} is missing")
    if ("0.0.0.0/0", gateway) not in pod.routes:
        fail(f"the default route via {gateway} on {where} is missing")
    if podnet.host_route_oif(ip, nl) != host_end.index:
        fail(f"the node route {ip}/32 dev {host} is missing")
    held = node.ipam.lookup(req.container_id, req.ifname)
    if str(held) != ip:
        fail(f"IPAM holds {held or 'no address'} for {container}/{req.ifname}, not {ip}")
    if not node.datapath.tc_attached(host, POD_PROGRAM):
        fail(f"{POD_PROGRAM} is not attached to host interface {host}")
    with node.datapath.open_map(EndpointsMap) as endpoints:
        endpoint = endpoints.get(ip)
    if endpoint is None:
        fail(f"the endpoints map has no entry for {ip} of {container}")
    expected = Endpoint(host_end.index, pod.link.mac, host_end.mac)
    if endpoint != expected:
        fail(f"the endpoints map entry for {ip} is {endpoint}, expected {expected} ({host})")


def _prev_address(prev: dict) -> tuple[str, str | None]:
    for ip in prev.get("ips") or []:
        if isinstance(ip, dict) and "." in str(ip.get("address", "")):
            return ip["address"], ip.get("gateway")
    raise CniError(INVALID_NETWORK_CONFIG, "prevResult has no IPv4 address to check")


def _status(req: Request, node: NodeContext) -> None:
    if not node.ready():
        raise CniError(PLUGIN_NOT_AVAILABLE, "the Sluice agent has not applied the node's state yet")
    if not node.datapath.is_loaded():
        raise CniError(PLUGIN_NOT_AVAILABLE, f"the datapath is not loaded under {node.datapath.root}")
    used, capacity = node.ipam.used, node.ipam.capacity
    if used >= capacity:
        raise CniError(PLUGIN_NOT_AVAILABLE, f"pod CIDR {node.ipam.network} has no free address "
                                             f"({used} of {capacity} in use)")


COMMANDS = {"ADD": _add, "DEL": _del, "CHECK": _check, "GC": _gc, "STATUS": _status}
