"""sluice.network.cluster_plan: every node's pod CIDR and routes, and inventory mistakes refused
(naming the value) before any node is touched."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.sluice.network.plugins.filter.cluster import cluster_plan


def hosts(**nodes):
    return {name: dict(ansible_host=f"192.0.2.{10 + i}", **hv) for i, (name, hv) in enumerate(nodes.items(), 1)}


def test_pod_cidrs_from_index_or_explicit_and_routes_to_every_other_node():
    hv = hosts(a={"sluice_node_index": 1}, b={"sluice_node_index": 2}, c={"sluice_pod_cidr": "10.244.200.0/24"})
    plan = cluster_plan(list(hv), hv, "10.244.0.0/16")
    pod_cidrs = {n: p["pod_cidr"] for n, p in plan.items()}
    assert pod_cidrs == {"a": "10.244.1.0/24", "b": "10.244.2.0/24", "c": "10.244.200.0/24"}
    assert plan["a"]["routes"] == [{"cidr": "10.244.2.0/24", "nexthop": "192.0.2.12", "node": "b"},
                                   {"cidr": "10.244.200.0/24", "nexthop": "192.0.2.13", "node": "c"}]
    assert plan["a"]["ip"] == "192.0.2.11"


def test_removing_a_node_removes_its_routes_everywhere():
    hv = hosts(a={"sluice_node_index": 1}, b={"sluice_node_index": 2}, c={"sluice_node_index": 3})
    plan = cluster_plan(["a", "b"], hv, "10.244.0.0/16")
    assert [r["node"] for r in plan["a"]["routes"]] == ["b"]
    assert "c" not in plan


def test_a_prefix_given_as_extra_vars_text_counts_as_its_number():
    hv = hosts(a={"sluice_node_index": 1})
    assert cluster_plan(list(hv), hv, "10.244.0.0/16", "25")["a"]["pod_cidr"] == "10.244.0.128/25"


def test_node_ip_prefers_sluice_node_ip():
    hv = hosts(a={"sluice_node_index": 1, "sluice_node_ip": "198.51.100.7"}, b={"sluice_node_index": 2})
    assert cluster_plan(list(hv), hv, "10.244.0.0/16")["b"]["routes"][0]["nexthop"] == "198.51.100.7"


@pytest.mark.parametrize("nodes, cidr, prefix, message", [
    ({"a": {"sluice_pod_cidr": "10.244.1.0/24"}, "b": {"sluice_pod_cidr": "10.244.1.0/24"}}, "10.244.0.0/16", 24,
     r"pod CIDRs overlap: a has 10\.244\.1\.0/24 and b has 10\.244\.1\.0/24"),
    ({"a": {"sluice_node_index": 1}, "b": {"sluice_pod_cidr": "10.244.1.128/25"}}, "10.244.0.0/16", 24,
     r"pod CIDRs overlap: a has 10\.244\.1\.0/24 and b has 10\.244\.1\.128/25"),
    ({"a": {"sluice_pod_cidr": "10.99.1.0/24"}}, "10.244.0.0/16", 24, r"a: sluice_pod_cidr 10\.99\.1\.0/24 is outside"),
    ({"a": {"sluice_pod_cidr": "10.244.1.1/24"}}, "10.244.0.0/16", 24, r"a: sluice_pod_cidr: '10\.244\.1\.1/24'"),
    ({"a": {"sluice_node_index": 256}}, "10.244.0.0/16", 24, r"a: sluice_node_index 256 is beyond the 256 /24"),
    ({"a": {"sluice_node_index": "x"}}, "10.244.0.0/16", 24, r"a: sluice_node_index 'x' is not a non-negative"),
    ({"a": {}}, "10.244.0.0/16", 24, r"a: set sluice_pod_cidr or a stable sluice_node_index"),
    ({"a": {"sluice_node_index": 1}}, "10.244.0.0/33", 24, r"sluice_cluster_cidr: '10\.244\.0\.0/33'"),
    ({"a": {"sluice_node_index": 1}}, "10.244.0.0/16", 8, r"sluice_node_cidr_prefix: /8 does not fit"),
    ({"a": {"sluice_node_index": 1}}, "10.244.0.0/16", "x", r"sluice_node_cidr_prefix: 'x' is not a prefix length"),
])
def test_inventory_mistakes_are_refused_naming_the_value(nodes, cidr, prefix, message):
    hv = hosts(**nodes)
    with pytest.raises(AnsibleFilterError, match=message):
        cluster_plan(list(hv), hv, cidr, prefix)


def test_two_nodes_with_one_address_are_refused():
    hv = {"a": {"ansible_host": "192.0.2.1", "sluice_node_index": 1},
          "b": {"ansible_host": "192.0.2.1", "sluice_node_index": 2}}
    with pytest.raises(AnsibleFilterError, match=r"nodes a and b both have the address 192\.0\.2\.1"):
        cluster_plan(list(hv), hv, "10.244.0.0/16")


def k8s_nodes(**cidrs):
    return [{"name": name, "pod_cidrs": list(value), "addresses": {}} for name, value in cidrs.items()]


def test_kubernetes_pod_cidrs_that_agree_with_the_plan_pass():
    hv = hosts(a={"sluice_node_index": 1}, b={"sluice_node_index": 2, "sluice_kubernetes_node_name": "b.example"})
    plan = cluster_plan(list(hv), hv, "10.244.0.0/16",
                        kubernetes_nodes=k8s_nodes(a=["10.244.1.0/24"], **{"b.example": ["10.244.2.0/24"]}))
    assert plan["a"]["routes"] == [{"cidr": "10.244.2.0/24", "nexthop": "192.0.2.12", "node": "b"}]


@pytest.mark.parametrize("nodes, message", [
    (k8s_nodes(a=["10.244.7.0/24"]), r"a: Kubernetes gave Node 'a' the pod CIDR 10\.244\.7\.0/24, the inventory "
                                     r"plans 10\.244\.1\.0/24: set sluice_pod_cidr: 10\.244\.7\.0/24 for a"),
    (k8s_nodes(a=[]), r"a: Node 'a' has no pod CIDR yet .* the plan gives it 10\.244\.1\.0/24"),
    (k8s_nodes(other=["10.244.1.0/24"]), r"a: no Node named 'a' in the cluster \(Nodes: other\)"),
])
def test_kubernetes_pod_cidrs_that_disagree_are_refused(nodes, message):
    hv = hosts(a={"sluice_node_index": 1})
    with pytest.raises(AnsibleFilterError, match=message):
        cluster_plan(list(hv), hv, "10.244.0.0/16", kubernetes_nodes=nodes)
