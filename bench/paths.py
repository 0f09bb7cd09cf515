"""Pod-to-pod datapath: TCP request/response latency (sockperf ping-pong, p50
and p99 of the half round trip) and one-stream TCP throughput (iperf3), same
node and across two nodes, for:

- sluice: tc_from_pod on the pod's host veth, bpf_redirect_peer into a local
  pod, bpf_redirect_neigh out of the underlay NIC to another node's pod CIDR,
  where tc_from_nic redirects into the pod. Node namespaces keep IPv4
  forwarding off: only the programs move packets.
- bridge: what Kubernetes would otherwise run: pods on a Linux bridge, kernel
  routing between nodes, br_netfilter and conntrack on, and kube-proxy's
  iptables rules for 1,000 services (2 endpoints each) in every node.
- veth: the floor, one veth pair directly between the two pod namespaces.

Both ends of a latency run are pinned to one CPU (taskset), iperf3 too, so
throughput is per CPU. Variants are measured interleaved, round by round, and
the report gives medians over rounds with their spread and per-round ratios."""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

from lib import netns
from sluice.cni import podnet
from sluice.datapath import Datapath
from sluice.maps import Endpoint, EndpointsMap, Route, RoutesMap

from . import kubeproxy
from .common import (BPF_BUILD, fmt_ratio, fmt_spread, iptables_restore, namespaces, paired_ratios, pin_root, sh,
                     summary, sysctl, target)
from .traffic import iperf_server, iperf_stream, sockperf_pingpong, sockperf_server

NAME = "paths"
TITLE = "Pod-to-pod datapath: latency and throughput"

GATEWAY = "169.254.1.1"                 # Sluice pods' default gateway (the host veth's MAC answers)
UNDERLAY = ("192.168.50.1", "192.168.50.2")
POD_CIDRS = ("10.1.1.0/24", "10.1.2.0/24")
CLIENT_IP = "10.1.1.11"
SAME_NODE_IP = "10.1.1.12"
OTHER_NODE_IP = "10.1.2.22"
BASELINE_SERVICES = 1000

VARIANTS = {
    "same/sluice": "same node, Sluice (tc redirect_peer)",
    "same/bridge": "same node, bridge + iptables (1,000 services)",
    "cross/sluice": "two nodes, Sluice (redirect_neigh + tc_from_nic)",
    "cross/bridge": "two nodes, bridge + routing + iptables (1,000 services)",
    "veth": "floor: bare veth pair between the two pods",
}


# ---- topologies -------------------------------------------------------------------------

def _sluice_node(stack: contextlib.ExitStack, node: str) -> Datapath:
    sysctl(node, {"net.ipv4.ip_forward": 0})
    dp = Datapath(stack.enter_context(pin_root()), BPF_BUILD)
    dp.load()
    return dp


def _sluice_pod(dp: Datapath, node: str, pod: str, host: str, ip: str) -> None:
    """Wired as Sluice's CNI wires a pod (sluice.cni.podnet), tc_from_pod on the host end."""
    path = f"/run/netns/{pod}"
    with netns.entered(node):
        host_end, pod_end = podnet.create_veth(host, path, "eth0", 1500)
        podnet.configure_pod(path, "eth0", ip, GATEWAY, host_end.mac)
        podnet.replace_host_route(host_end.index, ip)
        dp.attach_pod(host)
    with dp.open_map(EndpointsMap) as endpoints:
        endpoints.put(ip, Endpoint(host_end.index, pod_end.mac, host_end.mac))


def _underlay(node1: str, node2: str) -> None:
    sh(node1, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "nic0", "netns", node2)
    for node, addr in ((node1, UNDERLAY[0]), (node2, UNDERLAY[1])):
        sh(node, "ip", "addr", "add", f"{addr}/24", "dev", "nic0")
        sh(node, "ip", "link", "set", "nic0", "up")


def _bridge_node(node: str, cidr: str) -> None:
    """br0 as the pods' gateway, forwarding and br_netfilter on, kube-proxy's rules loaded."""
    gw = cidr.replace(".0/24", ".1/24")
    sh(node, "ip", "link", "add", "br0", "type", "bridge")
    sh(node, "ip", "addr", "add", gw, "dev", "br0")
    sh(node, "ip", "link", "set", "br0", "up")
    sysctl(node, {"net.ipv4.ip_forward": 1, "net.bridge.bridge-nf-call-iptables": 1})
    backends = [(CLIENT_IP, 8080), (OTHER_NODE_IP, 8080)]
    iptables_restore(node, kubeproxy.ruleset(kubeproxy.services(BASELINE_SERVICES, backends)))


def _bridge_pod(node: str, pod: str, host: str, ip: str, cidr: str) -> None:
    sh(node, "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod)
    sh(node, "ip", "link", "set", host, "master", "br0")
    sh(node, "ip", "link", "set", host, "up")
    sh(pod, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    sh(pod, "ip", "link", "set", "eth0", "up")
    sh(pod, "ip", "route", "add", "default", "via", cidr.replace(".0/24", ".1"))


class SluicePods(NamedTuple):
    """A client pod and a server pod wired by Sluice; nodes: (node namespace, its datapath), the client's first."""
    client: str
    server: str
    server_ip: str
    nodes: tuple[tuple[str, Datapath], ...]


def sluice_same_node(stack: contextlib.ExitStack, tag: str = "s") -> SluicePods:
    """Two Sluice pods on one node (redirect_peer between them)."""
    node, a, b = stack.enter_context(namespaces(f"{tag}n", f"{tag}a", f"{tag}b"))
    dp = _sluice_node(stack, node)
    _sluice_pod(dp, node, a, "h-a", CLIENT_IP)
    _sluice_pod(dp, node, b, "h-b", SAME_NODE_IP)
    return SluicePods(a, b, SAME_NODE_IP, ((node, dp),))


def sluice_two_nodes(stack: contextlib.ExitStack, tag: str = "s") -> SluicePods:
    """A Sluice pod on each of two nodes, native routing over nic0 (UNDERLAY)."""
    n1, n2, a, b = stack.enter_context(namespaces(f"{tag}n1", f"{tag}n2", f"{tag}xa", f"{tag}xb"))
    _underlay(n1, n2)
    dps = (_sluice_node(stack, n1), _sluice_node(stack, n2))
    for dpx, node, pod, ip, other_cidr, nexthop in ((dps[0], n1, a, CLIENT_IP, POD_CIDRS[1], UNDERLAY[1]),
                                                    (dps[1], n2, b, OTHER_NODE_IP, POD_CIDRS[0], UNDERLAY[0])):
        with netns.entered(node):
            dpx.attach_tc("nic0", "tc_from_nic")
        _sluice_pod(dpx, node, pod, "h-x", ip)
        with dpx.open_map(RoutesMap) as routes:
            routes.put(other_cidr, Route(nexthop, netns.ifindex(node, "nic0")))
    return SluicePods(a, b, OTHER_NODE_IP, ((n1, dps[0]), (n2, dps[1])))


@contextlib.contextmanager
def topologies():
    """Every variant at once (so rounds can interleave): {variant: (client ns, server ns, server ip)}."""
    with contextlib.ExitStack() as stack:
        out = {}
        out["same/sluice"] = sluice_same_node(stack)[:3]
        # same node, bridge + iptables
        node, a, b = stack.enter_context(namespaces("bn", "ba", "bb"))
        _bridge_node(node, POD_CIDRS[0])
        _bridge_pod(node, a, "h-a", CLIENT_IP, POD_CIDRS[0])
        _bridge_pod(node, b, "h-b", SAME_NODE_IP, POD_CIDRS[0])
        out["same/bridge"] = (a, b, SAME_NODE_IP)
        out["cross/sluice"] = sluice_two_nodes(stack)[:3]
        # two nodes, bridge + routing + iptables
        n1, n2, a, b = stack.enter_context(namespaces("bn1", "bn2", "bxa", "bxb"))
        _underlay(n1, n2)
        for node, pod, ip, cidr, other_cidr, nexthop in ((n1, a, CLIENT_IP, POD_CIDRS[0], POD_CIDRS[1], UNDERLAY[1]),
                                                         (n2, b, OTHER_NODE_IP, POD_CIDRS[1], POD_CIDRS[0], UNDERLAY[0])):
            _bridge_node(node, cidr)
            _bridge_pod(node, pod, "h-x", ip, cidr)
            sh(node, "ip", "route", "add", other_cidr, "via", nexthop)
        out["cross/bridge"] = (a, b, OTHER_NODE_IP)
        # the floor
        a, b = stack.enter_context(namespaces("va", "vb"))
        sh(a, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, ip in ((a, CLIENT_IP), (b, SAME_NODE_IP)):
            sh(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            sh(ns, "ip", "link", "set", "eth0", "up")
        out["veth"] = (a, b, SAME_NODE_IP)
        yield out


# ---- the benchmark ------------------------------------------------------------------------

def run(opts) -> dict:
    rounds = 3 if opts.quick else 5
    lat_s, tput_s = (1, 1) if opts.quick else (2, 2)
    lat = {v: [] for v in VARIANTS}
    tput = {v: [] for v in VARIANTS}
    t0 = time.monotonic()
    with topologies() as topo, contextlib.ExitStack() as servers:
        for _cli, srv, ip in topo.values():
            servers.enter_context(sockperf_server(srv, ip))
            servers.enter_context(iperf_server(srv, ip))
        for r in range(rounds):
            order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]
            for v in order:
                cli, ip = topo[v][0], topo[v][2]
                lat[v].append(sockperf_pingpong(cli, ip, lat_s))
            if r < (2 if opts.quick else 3):
                for v in order:
                    cli, ip = topo[v][0], topo[v][2]
                    tput[v].append(iperf_stream(cli, ip, tput_s))
    res = {"variants": VARIANTS, "rounds": rounds, "latency_seconds": lat_s, "throughput_seconds": tput_s,
           "latency_raw": lat, "throughput_raw": tput, "elapsed_s": time.monotonic() - t0, "summary": {}}
    for v in VARIANTS:
        res["summary"][v] = {"p50_us": summary([x["p50"] for x in lat[v]]),
                             "p99_us": summary([x["p99"] for x in lat[v]]),
                             "gbit_s": summary(tput[v])}

    def pr(a, b, key):
        if key == "gbit":
            return paired_ratios(tput[a], tput[b])
        return paired_ratios([x[key] for x in lat[a]], [x[key] for x in lat[b]])

    ratios = {}
    for a, b in (("same/sluice", "same/bridge"), ("same/sluice", "veth"), ("same/bridge", "veth"),
                 ("cross/sluice", "cross/bridge"), ("cross/sluice", "veth"), ("cross/bridge", "veth")):
        ratios[f"{a} / {b}"] = {"p50": pr(a, b, "p50"), "p99": pr(a, b, "p99"), "gbit": pr(a, b, "gbit")}
    res["ratios"] = ratios
    res["targets"] = [
        target("same-node pod↔pod p50 latency vs bridge+iptables", ratios["same/sluice / same/bridge"]["p50"]["median"],
               0.90, "Sluice p50 / bridge p50, median of per-round ratios"),
        target("same-node pod↔pod p50 latency vs bare veth floor", ratios["same/sluice / veth"]["p50"]["median"],
               1.05, "Sluice p50 / veth p50, median of per-round ratios"),
    ]
    return res


def markdown(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"{res['rounds']} interleaved rounds; sockperf TCP ping-pong {res['latency_seconds']} s per run "
             "(64-byte messages, half round trip), iperf3 one stream "
             f"{res['throughput_seconds']} s per run; client and server pinned to CPU 0. "
             "Cells: median [min–max] over rounds.", "",
             "| path | p50 µs | p99 µs | Gbit/s (one CPU) | p50 vs floor |", "|---|---|---|---|---|"]
    for v, label in res["variants"].items():
        vs = paired_ratios([x["p50"] for x in res["latency_raw"][v]], [x["p50"] for x in res["latency_raw"]["veth"]])
        lines.append(f"| {label} | {fmt_spread(s[v]['p50_us'])} | {fmt_spread(s[v]['p99_us'])} | "
                     f"{fmt_spread(s[v]['gbit_s'])} | {fmt_ratio(vs['median'])} |")
    lines += ["", "Per-round ratios (median [min–max]):", "", "| ratio | p50 | p99 | throughput |", "|---|---|---|---|"]
    for name, r in res["ratios"].items():
        lines.append(f"| {name} | {fmt_spread(r['p50'], '×')} | {fmt_spread(r['p99'], '×')} | "
                     f"{fmt_spread(r['gbit'], '×')} |")
    return lines


def plot(res: dict, plt):
    labels = list(res["variants"])
    s = res["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "p50_us", "half round trip p50 (µs)"), (axes[1], "gbit_s", "one stream, one CPU (Gbit/s)")):
        med = [s[v][key]["median"] or 0 for v in labels]
        err = [[m - (s[v][key]["min"] or m) for v, m in zip(labels, med)],
               [(s[v][key]["max"] or m) - m for v, m in zip(labels, med)]]
        colors = ["tab:green" if "sluice" in v else "tab:gray" if v == "veth" else "tab:orange" for v in labels]
        ax.bar(labels, med, yerr=err, color=colors, capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Pod↔pod: Sluice vs bridge+iptables vs bare veth (median, min–max over rounds)")
    return fig
