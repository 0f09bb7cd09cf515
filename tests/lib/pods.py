"""A pod wired by hand the way the CNI plugin wires one, for tests that drive the datapath
without the plugin."""

from __future__ import annotations

from lib import netns
from sluice.maps import Endpoint

GATEWAY = "169.254.1.1"     # every pod's default gateway, answered by its host veth's MAC


def add_pod(node: str, pod: str, host_dev: str, ip: str, mtu: int = 1500) -> Endpoint:
    """eth0 in namespace `pod` with a /32, its peer `host_dev` in `node`, a default route via a
    link-local gateway whose MAC (the host veth's) is a permanent neighbour; the endpoint to map."""
    netns.ns_exec(node, "ip", "link", "add", host_dev, "mtu", str(mtu), "type", "veth",
                  "peer", "name", "eth0", "mtu", str(mtu), "netns", pod)
    netns.ns_exec(node, "ip", "link", "set", host_dev, "up")
    host_mac = netns.mac(node, host_dev)
    for argv in (("addr", "add", f"{ip}/32", "dev", "eth0"),
                 ("link", "set", "eth0", "up"),
                 ("route", "add", GATEWAY, "dev", "eth0", "scope", "link"),
                 ("route", "add", "default", "via", GATEWAY, "dev", "eth0"),
                 ("neigh", "replace", GATEWAY, "lladdr", host_mac, "dev", "eth0", "nud", "permanent")):
        netns.ns_exec(pod, "ip", *argv)
    return Endpoint(netns.ifindex(node, host_dev), netns.mac(pod, "eth0"), host_mac)
