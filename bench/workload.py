"""The service sets the programming and reconcile sections install: N
services with B distinct backends each, as a Sluice state and as the
equivalent kube-proxy iptables services."""

from __future__ import annotations

import ipaddress

from . import kubeproxy

NODE = {"name": "bench", "ip": "192.168.60.1", "nic": "nic0", "pod_cidr": "10.128.0.0/24"}
BACKEND_BASE = ipaddress.IPv4Address("10.129.0.0")
PORT, BACKEND_PORT = 80, 8080


def backend(i: int, k: int, per: int) -> str:
    return str(BACKEND_BASE + 1 + i * per + k)


def kube_services(count: int, per: int) -> list:
    return [(kubeproxy.vip(i), PORT, [(backend(i, k, per), BACKEND_PORT) for k in range(per)]) for i in range(count)]


def state(count: int, per: int, changed: int | None = None) -> dict:
    """A state file's contents; `changed`: that service's last backend replaced."""
    svcs = []
    for i in range(count):
        backends = [{"ip": backend(i, k, per), "port": BACKEND_PORT} for k in range(per)]
        if i == changed:
            backends[-1] = {"ip": "10.250.0.1", "port": BACKEND_PORT}
        svcs.append({"name": f"svc-{i}", "vip": kubeproxy.vip(i), "port": PORT, "protocol": "tcp",
                     "backends": backends})
    return {"node": dict(NODE), "services": svcs}
