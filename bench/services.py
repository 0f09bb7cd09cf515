"""Service path: connect() + first byte latency to a service VIP with 1, 1,000,
10,000 and 50,000 services defined (2 backends each), Sluice's socket LB
(sock_lb.o's connect4 hook on the client's cgroup, services written with
batch map updates) against kube-proxy-style iptables DNAT chains
(KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, one iptables-restore without
--noflush) in the client's namespace.

A client namespace reaches two backend addresses in a server namespace over a
veth; the service measured is the middle one of the list (for iptables, half
the KUBE-SERVICES rules are walked before it matches). Client and server are
pinned to one CPU; net.ipv4.tcp_max_tw_buckets=0 in both namespaces of both
variants (short connections otherwise hit TIME_WAIT/PAWS SYN drops)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from lib.cgroup import cgroup
from sluice.bpf import libbpf
from sluice.datapath import Datapath
from sluice.maps import Backend, BackendsMap, Service, ServicesMap

from . import kubeproxy
from .common import (BPF_BUILD, CPU, fmt_ratio, fmt_spread, iptables_restore, namespaces, paired_ratios, percentile,
                     pin_root, running, sh, summary, sysctl, target)

NAME = "services"
TITLE = "Service path: connect latency against the number of services"
TARGETS = [("socket LB connect p50 at 50,000 services vs 1 service", 1.10)]

COUNTS = (1, 1000, 10000, 50000)
CLIENT_IP = "10.200.0.1"
BACKENDS = [("10.200.0.2", 8080), ("10.200.0.3", 8080)]
PORT = 80
SOCK_HOOKS = (("sock_connect4", libbpf.BPF_CGROUP_INET4_CONNECT),
              ("sock_sendmsg4", libbpf.BPF_CGROUP_UDP4_SENDMSG),
              ("sock_recvmsg4", libbpf.BPF_CGROUP_UDP4_RECVMSG),
              ("sock_getpeer4", libbpf.BPF_CGROUP_INET4_GETPEERNAME))

SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.send(b"x")
    c.close()
"""

# N timed connections after WARM untimed ones: connect() then the first byte, in µs.
CLIENT = r"""
import json, socket, sys, time
ip, port, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
clock, out = time.perf_counter_ns, []
for i in range(n + warm):
    s = socket.socket()
    t0 = clock()
    s.connect((ip, port))
    if s.recv(1) != b"x":
        raise SystemExit("no first byte")
    t1 = clock()
    s.close()
    if i >= warm:
        out.append((t1 - t0) / 1000)
print(json.dumps(out))
"""


def _pair(stack: contextlib.ExitStack, tag: str) -> tuple[str, str]:
    cli, srv = stack.enter_context(namespaces(f"{tag}c", f"{tag}s"))
    sh(cli, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", srv)
    sh(cli, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    for ip in (b[0] for b in BACKENDS):
        sh(srv, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    for ns in (cli, srv):
        sh(ns, "ip", "link", "set", "eth0", "up")
        sysctl(ns, {"net.ipv4.tcp_max_tw_buckets": 0})
    # kube-proxy nodes route the service range somewhere; give both variants the same route
    sh(cli, "ip", "route", "add", "10.96.0.0/12", "dev", "eth0")
    stack.enter_context(running(srv, sys.executable, "-c", SERVER, cpu=CPU, ready=0.5))
    return cli, srv


def _client(ns: str, vip: str, conns: int, warm: int, cg=None) -> list[float]:
    out = sh(ns, sys.executable, "-c", CLIENT, vip, PORT, conns, warm, cpu=CPU, timeout=300,
             preexec_fn=cg.enter if cg else None, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"client to {vip} in {ns} exited {out.returncode}: {out.stderr[-1500:]}")
    return json.loads(out.stdout)


def _sluice_services(services: ServicesMap, count: int) -> float:
    """Replace the map's services with `count` of them in one batch update; seconds."""
    services.clear()
    t0 = time.perf_counter()
    pairs = []
    for i in range(count):
        pairs += services.entries(kubeproxy.vip(i), PORT, "tcp", Service(i + 1, (1, 2)))
    services.update_batch(pairs)
    return time.perf_counter() - t0


def run(opts) -> dict:
    rounds, conns, warm = (2, 300, 50) if opts.quick else (3, 1000, 100)
    counts = COUNTS
    res = {"counts": list(counts), "rounds": rounds, "connections": conns, "raw": {}, "program_s": {}}
    with contextlib.ExitStack() as stack:
        s_cli = _pair(stack, "lbs")[0]
        i_cli = _pair(stack, "ipt")[0]
        dp = Datapath(stack.enter_context(pin_root()), BPF_BUILD)
        dp.load()
        cg = stack.enter_context(cgroup())
        for prog, attach_type in SOCK_HOOKS:
            fd = dp.prog_fd(prog)
            try:
                cg.attach(fd, attach_type)
            finally:
                os.close(fd)
        services = stack.enter_context(dp.open_map(ServicesMap))
        with dp.open_map(BackendsMap) as backends:
            backends.put_many({i + 1: Backend(ip, port) for i, (ip, port) in enumerate(BACKENDS)})
        for count in counts:
            svcs = kubeproxy.services(count, BACKENDS, PORT)
            vip = kubeproxy.vip(count // 2)
            sluice_s = _sluice_services(services, count)
            ipt_s = iptables_restore(i_cli, kubeproxy.ruleset(svcs, with_filter=False))
            res["program_s"][count] = {"sluice": sluice_s, "iptables": ipt_s}
            raw = {"sluice": [], "iptables": []}
            for r in range(rounds):
                for variant in (("sluice", "iptables") if r % 2 == 0 else ("iptables", "sluice")):
                    if variant == "sluice":
                        raw[variant].append(_client(s_cli, vip, conns, warm, cg))
                    else:
                        raw[variant].append(_client(i_cli, vip, conns, warm))
            res["raw"][count] = raw
            print(f"  {count:>6} services: sluice p50 {percentile(raw['sluice'][-1], 50):.1f} µs, "
                  f"iptables p50 {percentile(raw['iptables'][-1], 50):.1f} µs "
                  f"(programmed in {sluice_s:.3f} s / {ipt_s:.2f} s)", flush=True)
    res["summary"] = {}
    for count in counts:
        res["summary"][count] = {}
        for v in ("sluice", "iptables"):
            runs = res["raw"][count][v]
            res["summary"][count][v] = {"p50_us": summary([percentile(x, 50) for x in runs]),
                                        "p99_us": summary([percentile(x, 99) for x in runs])}
    base = counts[0]
    res["vs_one"] = {v: {c: _ratio_rounds(res, v, c, base) for c in counts} for v in ("sluice", "iptables")}
    res["sluice_vs_iptables"] = {c: paired_ratios([percentile(x, 50) for x in res["raw"][c]["sluice"]],
                                                  [percentile(x, 50) for x in res["raw"][c]["iptables"]])
                                 for c in counts}
    top = counts[-1]
    res["targets"] = [target(f"socket LB connect p50 at {top:,} services vs 1 service",
                             res["vs_one"]["sluice"][top]["median"], 1.10,
                             "p50 at N / p50 at 1, per-round pairs")]
    return res


def _ratio_rounds(res, variant, count, base) -> dict:
    return paired_ratios([percentile(x, 50) for x in res["raw"][count][variant]],
                         [percentile(x, 50) for x in res["raw"][base][variant]])


def markdown(res: dict) -> list[str]:
    lines = [f"{res['rounds']} rounds of {res['connections']} connections per point, variants alternated; "
             "cells: median [min–max] over rounds of each round's percentile.", "",
             "| services | socket LB p50 µs | p99 µs | vs 1 service | iptables p50 µs | p99 µs | vs 1 service "
             "| socket LB / iptables | programmed in (socket LB / iptables-restore) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in res["counts"]:
        s, i = res["summary"][c]["sluice"], res["summary"][c]["iptables"]
        p = res["program_s"][c]
        lines.append(f"| {c:,} | {fmt_spread(s['p50_us'], digits=1)} | {fmt_spread(s['p99_us'], digits=1)} | "
                     f"{fmt_ratio(res['vs_one']['sluice'][c]['median'])} | {fmt_spread(i['p50_us'], digits=1)} | "
                     f"{fmt_spread(i['p99_us'], digits=1)} | {fmt_ratio(res['vs_one']['iptables'][c]['median'])} | "
                     f"{fmt_ratio(res['sluice_vs_iptables'][c]['median'])} | "
                     f"{p['sluice'] * 1000:.1f} ms / {p['iptables'] * 1000:.0f} ms |")
    return lines


def plot(res: dict, plt):
    counts = res["counts"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, color, label in (("sluice", "tab:green", "Sluice socket LB"), ("iptables", "tab:orange", "kube-proxy iptables")):
        for key, style in (("p50_us", "-o"), ("p99_us", ":x")):
            med = [res["summary"][c][v][key]["median"] for c in counts]
            lo = [m - res["summary"][c][v][key]["min"] for c, m in zip(counts, med)]
            hi = [res["summary"][c][v][key]["max"] - m for c, m in zip(counts, med)]
            ax.errorbar(counts, med, yerr=[lo, hi], fmt=style, color=color, capsize=3,
                        label=f"{label} {key.split('_', maxsplit=1)[0]}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("services defined")
    ax.set_ylabel("connect() + first byte (µs)")
    ax.set_title("Service VIP connect latency vs number of services")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig
