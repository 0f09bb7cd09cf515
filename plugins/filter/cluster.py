# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Cluster-wide planning from the inventory, done on the controller before any
node is touched: every node's pod CIDR (explicit, or derived from the cluster
CIDR and a stable node index) and the routes each node needs to the others."""

from __future__ import annotations

DOCUMENTATION = r"""
name: cluster_plan
short_description: Pod CIDRs and inter-node routes for every Sluice node
description:
  - Computes each node's pod CIDR (C(sluice_pod_cidr) when set on the host, else the
    C(sluice_node_index)-th subnet of size C(sluice_node_cidr_prefix) of C(sluice_cluster_cidr))
    and the routes to every other node's pod CIDR.
  - Fails, naming the bad value, on a malformed CIDR, a pod CIDR outside the cluster CIDR,
    two nodes with overlapping pod CIDRs, a node index beyond the cluster CIDR, or a node IP used twice.
  - With O(kubernetes_nodes) (the cluster's Node objects, from the P(sluice.network.kubernetes_nodes#lookup) lookup),
    also fails when a node is not a Node of the cluster (by C(sluice_kubernetes_node_name), default the inventory
    name), has no pod CIDR yet, or was given another pod CIDR than the plan's (Sluice would route pods where
    Kubernetes does not put them).
extends_documentation_fragment:
  - sluice.network.sluice.cluster
options:
  _input:
    description: Names of the node hosts (for example C(groups['sluice_nodes'])).
    type: list
    elements: str
    required: true
  node_prefix:
    description: Prefix length of derived pod CIDRs.
    type: int
    default: 24
  kubernetes_nodes:
    description: The cluster's Node objects (C(name), C(pod_cidrs)); omitted where the nodes run no Kubernetes.
    type: list
    elements: dict
"""

EXAMPLES = r"""
- name: Plan the cluster
  ansible.builtin.set_fact:
    sluice_cluster: "{{ groups['sluice_nodes'] | sluice.network.cluster_plan(hostvars, sluice_cluster_cidr) }}"
"""

RETURN = r"""
_value:
  description: Per node name, C(ip), C(pod_cidr), C(index) and C(routes) (list of C(cidr), C(nexthop), C(node)).
  type: dict
"""

import ipaddress

from ansible.errors import AnsibleFilterError


def _network(value, what):
    try:
        return ipaddress.IPv4Network(str(value), strict=True)
    except ValueError as e:
        raise AnsibleFilterError(f"{what}: {value!r} is not a valid IPv4 CIDR ({e})") from None


def cluster_plan(nodes, hostvars, cluster_cidr, node_prefix=24, kubernetes_nodes=None):
    cluster = _network(cluster_cidr, "sluice_cluster_cidr")
    # Extra vars (-e sluice_node_cidr_prefix=25) arrive as strings.
    if isinstance(node_prefix, bool) or not str(node_prefix).isdigit():
        raise AnsibleFilterError(f"sluice_node_cidr_prefix: {node_prefix!r} is not a prefix length")
    node_prefix = int(node_prefix)
    if not cluster.prefixlen <= node_prefix <= 30:
        raise AnsibleFilterError(
            f"sluice_node_cidr_prefix: /{node_prefix} does not fit in the cluster CIDR {cluster} (need {cluster.prefixlen}..30)")
    subnets = 1 << (node_prefix - cluster.prefixlen)
    plan = {}
    for name in sorted(nodes):
        hv = hostvars[name]
        ip_value = hv.get("sluice_node_ip") or hv.get("ansible_host") or name
        try:
            ip = str(ipaddress.IPv4Address(ip_value))
        except ValueError:
            raise AnsibleFilterError(f"{name}: node address {ip_value!r} is not an IPv4 address (set sluice_node_ip)") from None
        index = hv.get("sluice_node_index")
        if hv.get("sluice_pod_cidr"):
            pod = _network(hv["sluice_pod_cidr"], f"{name}: sluice_pod_cidr")
            if not pod.subnet_of(cluster):
                raise AnsibleFilterError(f"{name}: sluice_pod_cidr {pod} is outside the cluster CIDR {cluster}")
        elif index is None:
            raise AnsibleFilterError(f"{name}: set sluice_pod_cidr or a stable sluice_node_index")
        else:
            if isinstance(index, bool) or not str(index).isdigit():
                raise AnsibleFilterError(f"{name}: sluice_node_index {index!r} is not a non-negative integer")
            if int(index) >= subnets:
                raise AnsibleFilterError(
                    f"{name}: sluice_node_index {index} is beyond the {subnets} /{node_prefix} pod CIDRs of {cluster}")
            pod = ipaddress.IPv4Network((int(cluster.network_address) + int(index) * (1 << (32 - node_prefix)),
                                         node_prefix))
        plan[name] = {"ip": ip, "pod_cidr": str(pod), "index": index}
    names = sorted(plan)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if ipaddress.IPv4Network(plan[a]["pod_cidr"]).overlaps(ipaddress.IPv4Network(plan[b]["pod_cidr"])):
                raise AnsibleFilterError(
                    f"pod CIDRs overlap: {a} has {plan[a]['pod_cidr']} and {b} has {plan[b]['pod_cidr']}")
            if plan[a]["ip"] == plan[b]["ip"]:
                raise AnsibleFilterError(f"nodes {a} and {b} both have the address {plan[a]['ip']}")
    if kubernetes_nodes is not None:
        _check_kubernetes_pod_cidrs(plan, hostvars, kubernetes_nodes)
    for name in names:
        plan[name]["routes"] = [{"cidr": plan[o]["pod_cidr"], "nexthop": plan[o]["ip"], "node": o}
                                for o in names if o != name]
    return plan


def _check_kubernetes_pod_cidrs(plan, hostvars, kubernetes_nodes):
    cidrs = {node["name"]: node.get("pod_cidrs") or [] for node in kubernetes_nodes}
    for name in sorted(plan):
        node = hostvars[name].get("sluice_kubernetes_node_name") or name
        want = plan[name]["pod_cidr"]
        if node not in cidrs:
            raise AnsibleFilterError(
                f"{name}: no Node named {node!r} in the cluster (Nodes: {', '.join(sorted(cidrs)) or 'none'}); "
                "set sluice_kubernetes_node_name to its Node's name")
        if not cidrs[node]:
            raise AnsibleFilterError(
                f"{name}: Node {node!r} has no pod CIDR yet (the controller-manager allocates one with "
                f"--allocate-node-cidrs); the plan gives it {want}")
        if want not in cidrs[node]:
            raise AnsibleFilterError(
                f"{name}: Kubernetes gave Node {node!r} the pod CIDR {', '.join(cidrs[node])}, the inventory plans "
                f"{want}: set sluice_pod_cidr: {cidrs[node][0]} for {name}, or register the Node with {want}")


class FilterModule:
    def filters(self):
        return {"cluster_plan": cluster_plan}
