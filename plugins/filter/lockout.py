# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Refusals, on the controller before any node is touched, of a prefilter, VIP or route that would cut the
operators or the cluster off a node: the XDP prefilter drops by source at the NIC, the XDP LB and the
socket LB take over every packet or connection to a VIP's port, and a node's packets (its answers too)
follow its routes to the other nodes' pod CIDRs."""

from __future__ import annotations

DOCUMENTATION = r"""
name: lockout_check
short_description: Refuse prefilter CIDRs, VIPs and routes that would cut the operators or the cluster off the nodes
description:
  - Checks every node's C(sluice_prefilter), C(sluice_services) and C(sluice_lb_vips) (or the C(agent_*) role
    variables where the inventory sets those) against the addresses the cluster and its operators need, and
    fails naming the value, where it is in the inventory and what it collides with.
  - The protected addresses are every node's address (C(sluice_node_ip), C(ansible_host), the address the
    controller reached it on, the C(InternalIP) and C(ExternalIP) of its Node object), the controller's address as
    each node sees it (C(SSH_CONNECTION) in the facts of a C(gather_subset=env) run of M(ansible.builtin.setup)),
    the C(sluice_management_cidrs), and the Kubernetes API server (the host of C(sluice_kubeconfig)'s server URL).
  - A prefilter CIDR may not cover any of these; it may not overlap the cluster CIDR either, except a CIDR listed
    in C(sluice_allow_prefilter_overlap) on a node that routes with VXLAN (there pods' packets between nodes are
    encapsulated, so the entry only drops unencapsulated packets claiming a pod source).
  - A VIP may not be any of these addresses nor lie in a management CIDR, the cluster CIDR, 0.0.0.0/8,
    127.0.0.0/8, 224.0.0.0/4 or 240.0.0.0/4; and an address is either a service's VIP or an LB VIP, not both.
  - A node's route to another node's pod CIDR (from C(cluster_plan)) may not cover any of these addresses, overlap
    a management CIDR, nor overlap a network of the node's NIC (C(sluice_nic), known once the C(network) facts
    subset was gathered), since the node's packets to the hosts there, its answers to the controller among them,
    would be sent to the other node instead.
  - The port Ansible reaches a node on (C(ansible_port), 22 unless set) must be among its failsafe ports
    (C(sluice_failsafe); empty, the node's default holds C(tcp:22)), which the datapath passes before any filter.
  - Facts not gathered yet are not checked, so the filter can run before any node is contacted and again after
    the gather.
extends_documentation_fragment:
  - sluice.network.sluice.cluster
options:
  _input:
    description: The plan of P(sluice.network.cluster_plan#filter) (per node C(ip) and C(pod_cidr)).
    type: dict
    required: true
  kubeconfig:
    description: Path of the cluster's kubeconfig on the controller; its current context's server is protected.
    type: path
  kubernetes_nodes:
    description: The cluster's Node objects (from the P(sluice.network.kubernetes_nodes#lookup) lookup).
    type: list
    elements: dict
"""

EXAMPLES = r"""
- name: Plan the cluster, refusing lockouts
  ansible.builtin.set_fact:
    sluice_cluster: >-
      {{ groups['sluice_nodes'] | sluice.network.cluster_plan(hostvars, sluice_cluster_cidr)
         | sluice.network.lockout_check(hostvars, sluice_cluster_cidr) }}
"""

RETURN = r"""
_value:
  description: The plan, unchanged.
  type: dict
"""

import ipaddress
import os
import re
import socket
from urllib.parse import urlsplit

import yaml
from ansible.errors import AnsibleFilterError

# Destinations no VIP may be, and why.
NOT_A_VIP = [
    (ipaddress.IPv4Network("0.0.0.0/8"), "in 0.0.0.0/8, which connect() takes for the node itself"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address: the nodes' own local connections to it would be "
                                           "taken over"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "a multicast address, not a unicast destination"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "in 240.0.0.0/4 (reserved, and the broadcast address), not a unicast "
                                           "destination"),
]

# What a VIP takes over, by the variable it is in.
TAKES = {
    "services": "every node's own connections to it would go to the service's backends",
    "lb_vips": "packets for it reaching a node's NIC would go to the LB's backends",
}


def _setting(hv, key, default):
    """What the agent role will get: agent_<key> where the inventory sets it, else sluice_<key>."""
    for var in (f"agent_{key}", f"sluice_{key}"):
        if hv.get(var) is not None:
            return var, hv[var]
    return f"sluice_{key}", default


def _address(value):
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        return None


def _kubernetes_api_addresses(kubeconfig):
    try:
        with open(os.path.expanduser(os.path.expandvars(kubeconfig))) as f:
            config = yaml.safe_load(f) or {}
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        host = urlsplit(cluster["server"]).hostname
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as e:
        raise AnsibleFilterError(f"sluice_kubeconfig {kubeconfig}: no server in its current context ({e!r})") from None
    try:
        return {ipaddress.IPv4Address(info[4][0]) for info in socket.getaddrinfo(host, None, socket.AF_INET)}
    except OSError as e:
        raise AnsibleFilterError(f"sluice_kubeconfig {kubeconfig}: server host {host!r} does not resolve ({e})") \
            from None


def _protected_addresses(plan, hostvars, kubeconfig, kubernetes_nodes):
    """Address -> what it is, for every address the operators and the cluster need."""
    found = {}
    k8s = {node["name"]: node.get("addresses") or {} for node in kubernetes_nodes or []}
    for name in sorted(plan):
        hv = hostvars[name]
        ssh = (hv.get("ansible_facts") or {}).get("env", {}).get("SSH_CONNECTION", "").split()
        node_k8s = k8s.get(hv.get("sluice_kubernetes_node_name") or name, {})
        for value in (plan[name]["ip"], hv.get("ansible_host"), ssh[2] if len(ssh) == 4 else None,
                      node_k8s.get("InternalIP"), node_k8s.get("ExternalIP")):
            if _address(value):
                found.setdefault(_address(value), f"{name}'s address {value}")
        if len(ssh) == 4 and _address(ssh[0]):
            found.setdefault(_address(ssh[0]), f"the controller's address {ssh[0]} (as {name} sees it over SSH)")
    if kubeconfig:
        for address in sorted(_kubernetes_api_addresses(kubeconfig)):
            found.setdefault(address, f"the Kubernetes API server's address {address} (sluice_kubeconfig)")
    return found


def _management_cidrs(plan, hostvars):
    found = {}
    for name in sorted(plan):
        for i, value in enumerate(hostvars[name].get("sluice_management_cidrs") or []):
            try:
                cidr = ipaddress.IPv4Network(str(value))
            except ValueError as e:
                raise AnsibleFilterError(f"{name}: sluice_management_cidrs[{i}] {value} is not an IPv4 CIDR ({e})") \
                    from None
            found.setdefault(cidr, f"the management network {cidr} (sluice_management_cidrs[{i}])")
    return found


def _pod_cidr_of(plan, cidr, cluster):
    """What in the cluster CIDR a prefilter entry or VIP hits: a node's pod CIDR, else the cluster CIDR."""
    for name in sorted(plan):
        if cidr.overlaps(ipaddress.IPv4Network(plan[name]["pod_cidr"])):
            return f"{name}'s pod CIDR {plan[name]['pod_cidr']}"
    return f"the cluster CIDR {cluster}"


def _check_prefilter(name, hv, plan, cluster, protected, management):
    var, entries = _setting(hv, "prefilter", [])
    allowed = {str(c) for c in hv.get("sluice_allow_prefilter_overlap") or []}
    vxlan = _setting(hv, "routing_mode", "native")[1] == "vxlan"
    for i, value in enumerate(entries or []):
        where = f"{name}: {var}[{i}] {value}"
        try:
            cidr = ipaddress.IPv4Network(str(value))
        except ValueError as e:
            raise AnsibleFilterError(f"{where} is not an IPv4 CIDR ({e})") from None
        for address, what in protected.items():
            if address in cidr:
                raise AnsibleFilterError(f"{where} covers {what}: {name} would drop its packets at the NIC")
        for network, what in management.items():
            if cidr.overlaps(network):
                raise AnsibleFilterError(f"{where} overlaps {what}: {name} would drop its packets at the NIC")
        if cidr.overlaps(cluster):
            hit = _pod_cidr_of(plan, cidr, cluster)
            if not vxlan:
                raise AnsibleFilterError(
                    f"{where} overlaps {hit}: {name} routes natively, so pods' packets from other nodes arrive "
                    "with their own addresses and would be dropped at the NIC (sluice_allow_prefilter_overlap "
                    "applies to vxlan routing only)")
            if str(cidr) not in allowed:
                raise AnsibleFilterError(
                    f"{where} overlaps {hit}: with vxlan routing it drops only unencapsulated packets claiming a pod "
                    "source; if that is meant, list it in sluice_allow_prefilter_overlap")


def _nic_networks(hv):
    """The networks of the node's NIC, where the network facts were gathered (Ansible names an interface's
    facts with '-' and ':' as '_')."""
    nic = str(_setting(hv, "nic", "")[1])
    facts = (hv.get("ansible_facts") or {}).get(nic.replace("-", "_").replace(":", "_")) or {}
    found = {}
    for address in [facts.get("ipv4") or {}, *(facts.get("ipv4_secondaries") or [])]:
        if address.get("address") and address.get("netmask"):
            network = ipaddress.IPv4Network(f"{address['address']}/{address['netmask']}", strict=False)
            found.setdefault(network, f"{nic}'s network {network}")
    return found


def _check_routes(name, hv, plan, protected, management):
    """A route to another node's pod CIDR takes the node's packets to every address in it."""
    underlay = _nic_networks(hv)
    for route in plan[name]["routes"]:
        cidr = ipaddress.IPv4Network(route["cidr"])
        where = f"{name}: the route to {route['node']}'s pod CIDR {cidr} (via {route['nexthop']})"
        why = f"{name} would send its packets to it (its answers too) to {route['node']} instead"
        for address, what in protected.items():
            if address in cidr:
                raise AnsibleFilterError(f"{where} covers {what}: {why}")
        for network, what in {**management, **underlay}.items():
            if cidr.overlaps(network):
                raise AnsibleFilterError(f"{where} overlaps {what}: {why}; pod CIDRs must lie outside the nodes' "
                                         "networks (sluice_cluster_cidr, sluice_pod_cidr)")


def _check_vips(name, hv, plan, cluster, protected, management):
    owners = {}
    for key in ("services", "lb_vips"):
        var, entries = _setting(hv, key, [])
        for i, entry in enumerate(entries or []):
            if not isinstance(entry, dict):
                raise AnsibleFilterError(f"{name}: {var}[{i}] {entry!r} is not a mapping (name, vip, port, ...)")
            where = f"{var}[{i}]" + (f" ({entry['name']})" if entry.get("name") else "")
            vip = _address(entry.get("vip"))
            if vip is None:
                raise AnsibleFilterError(f"{name}: {where} vip {entry.get('vip')!r} is not an IPv4 address")
            value = f"{name}: {where} {vip}:{entry.get('port')}/{entry.get('protocol', 'tcp')}"
            for network, why in NOT_A_VIP:
                if vip in network:
                    raise AnsibleFilterError(f"{value}: {vip} is {why}")
            if vip in protected:
                raise AnsibleFilterError(f"{value} is {protected[vip]}: {TAKES[key]}")
            for network, what in management.items():
                if vip in network:
                    raise AnsibleFilterError(f"{value} is inside {what}: {TAKES[key]}")
            if vip in cluster:
                hit = _pod_cidr_of(plan, ipaddress.IPv4Network(vip), cluster)
                raise AnsibleFilterError(f"{value} is inside {hit}, where pods get their addresses: {TAKES[key]}")
            other = owners.get(vip)
            if other and other[0] != key:
                raise AnsibleFilterError(
                    f"{value} is also the VIP of {other[1]}: an address is either a service's (socket LB, the "
                    "nodes' own connections) or an LB VIP (XDP, packets from outside), not both")
            owners.setdefault(vip, (key, where))


FAILSAFE_ENTRY = re.compile(r"(tcp|udp):(\d+)(?:-(\d+))?")
DEFAULT_FAILSAFE_SSH = 22      # the SSH port among the node's default failsafe ports (sluice.state.DEFAULT_FAILSAFE)


def _check_failsafe(name, hv):
    """The port Ansible reaches the node on is a failsafe port: no prefilter or LB entry can take it."""
    port = int(hv.get("ansible_port") or DEFAULT_FAILSAFE_SSH)
    var, entries = _setting(hv, "failsafe", [])
    if not entries:
        if port != DEFAULT_FAILSAFE_SSH:
            raise AnsibleFilterError(f"{name}: Ansible reaches {name} on port {port}, which the default failsafe does "
                                     f"not hold: set {var} with tcp:{port} among the node's management ports")
        return
    covered = False
    for i, entry in enumerate(entries):
        match = FAILSAFE_ENTRY.fullmatch(str(entry))
        low, high = (int(match[2]), int(match[3] or match[2])) if match else (0, 0)
        if not 1 <= low <= high <= 65535:
            raise AnsibleFilterError(f"{name}: {var}[{i}] {entry!r} is not PROTOCOL:PORT or PROTOCOL:FIRST-LAST "
                                     "(protocol tcp or udp, ports 1..65535)")
        covered |= match[1] == "tcp" and low <= port <= high
    if not covered:
        raise AnsibleFilterError(f"{name}: {var} lacks tcp:{port}, the port Ansible reaches {name} on: a prefilter "
                                 "or LB entry could then cut the controller off it")


def lockout_check(plan, hostvars, cluster_cidr, kubeconfig=None, kubernetes_nodes=None):
    cluster = ipaddress.IPv4Network(str(cluster_cidr))
    protected = _protected_addresses(plan, hostvars, kubeconfig, kubernetes_nodes)
    management = _management_cidrs(plan, hostvars)
    for name in sorted(plan):
        _check_failsafe(name, hostvars[name])
        _check_prefilter(name, hostvars[name], plan, cluster, protected, management)
        _check_vips(name, hostvars[name], plan, cluster, protected, management)
        _check_routes(name, hostvars[name], plan, protected, management)
    return plan


class FilterModule:
    def filters(self):
        return {"lockout_check": lockout_check}
