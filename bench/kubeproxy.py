"""iptables rules laid out the way kube-proxy's iptables mode writes them
(pkg/proxy/iptables/proxier.go): KUBE-SERVICES -> KUBE-SVC-<hash> (masquerade
mark for traffic from outside the cluster CIDR, then one `statistic` rule per
endpoint) -> KUBE-SEP-<hash> (hairpin mark, DNAT), plus KUBE-POSTROUTING and
the filter table's KUBE-FORWARD. Loaded with `iptables-restore` without
--noflush: with --noflush this iptables (1.8.9, nf_tables) slows down
super-linearly (PLATFORM.md)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress

CLUSTER_CIDR = "10.0.0.0/8"
SERVICE_BASE = ipaddress.IPv4Address("10.96.0.0")  # service VIPs: 10.96.0.0/12 and up


def vip(i: int) -> str:
    """The VIP of service number i (0-based): 10.96.0.1, 10.96.0.2, ..."""
    return str(SERVICE_BASE + 1 + i)


def _chain(prefix: str, key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


Service = tuple[str, int, list[tuple[str, int]]]   # (vip, port, [(backend ip, port)])


def services(count: int, backends: list[tuple[str, int]], port: int = 80) -> list[Service]:
    return [(vip(i), port, list(backends)) for i in range(count)]


def _service(n: int, ip: str, port: int, eps: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """(chains, rules) of service number n, as kube-proxy writes them."""
    chains, rules = [], []
    name = f"bench/svc-{n}:http"
    svc = _chain("KUBE-SVC-", f"{name}{ip}{port}")
    chains.append(svc)
    rules.append(f'-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" '
                 f"-m tcp --dport {port} -j {svc}")
    rules.append(f'-A {svc} ! -s {CLUSTER_CIDR} -d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" '
                 f"-m tcp --dport {port} -j KUBE-MARK-MASQ")
    for k, (bip, bport) in enumerate(eps):
        sep = _chain("KUBE-SEP-", f"{name}{bip}{bport}")
        chains.append(sep)
        left = len(eps) - k
        stat = f" -m statistic --mode random --probability {1 / left:.11f}" if left > 1 else ""
        rules.append(f'-A {svc} -m comment --comment "{name} -> {bip}:{bport}"{stat} -j {sep}')
        rules.append(f'-A {sep} -s {bip}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ')
        rules.append(f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp -j DNAT --to-destination {bip}:{bport}')
    return chains, rules


def ruleset(svcs: list[Service], with_filter: bool = True) -> str:
    """A full nat (and filter) table for iptables-restore."""
    chains, rules = [], []
    for n, (ip, port, eps) in enumerate(svcs):
        c, r = _service(n, ip, port, eps)
        chains += c
        rules += r
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
                 'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    out = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
           ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    out += [f":{c} - [0:0]" for c in chains]
    out += ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    out += rules
    out.append("COMMIT")
    if with_filter:
        out += ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                ":KUBE-FORWARD - [0:0]",
                '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
                "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 '
                "-j ACCEPT",
                '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "COMMIT"]
    return "\n".join(out) + "\n"


def changed_chain(svcs: list[Service], index: int, new_backend: tuple[str, int]) -> str:
    """What a minimal (partial) kube-proxy sync restores with --noflush after the
    last endpoint of service `index` is replaced: the service chain (flushed by
    its declaration) and the new endpoint's chain."""
    ip, port, eps = svcs[index]
    chains, rules = _service(index, ip, port, eps[:-1] + [new_backend])
    rules = [r for r in rules if not r.startswith("-A KUBE-SERVICES ")]
    return "\n".join(["*nat", *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT"]) + "\n"
