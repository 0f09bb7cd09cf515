"""sluice.network.lockout_check: prefilter CIDRs and VIPs that would cut the operators or the cluster off a node
are refused on the controller, naming the value, where it is and what it collides with; the lab's own values pass."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.sluice.network.plugins.filter.cluster import cluster_plan
from ansible_collections.sluice.network.plugins.filter.lockout import lockout_check

CLUSTER = "10.244.0.0/16"

# inventory/lab/group_vars/sluice_nodes.yml
LAB = {
    "sluice_services": [
        {"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "tcp",
         "backends": [{"ip": "10.244.1.10", "port": 8080}, {"ip": "10.244.2.10", "port": 8080}]},
        {"name": "dns", "vip": "10.96.0.53", "port": 53, "protocol": "udp",
         "backends": [{"ip": "10.244.2.10", "port": 5353}]},
        {"name": "legacy", "vip": "10.96.0.99", "port": 80, "protocol": "tcp",
         "backends": [{"ip": "10.244.1.11", "port": 8080}]},
    ],
    "sluice_lb_vips": [
        {"name": "public-web", "vip": "10.97.0.10", "port": 80, "protocol": "tcp",
         "backends": [{"ip": "10.244.1.10", "port": 8080}, {"ip": "10.244.2.10", "port": 8080}]},
    ],
    "sluice_prefilter": ["10.98.0.0/24"],
}


def lab(ssh_from=None, **group_vars):
    """The lab's three nodes (192.168.77.11-13) with its group vars, updated by `group_vars`; `ssh_from`: the
    controller's address in the facts of the SSH_CONNECTION gather."""
    hostvars = {}
    for i in (1, 2, 3):
        hv = {"ansible_host": f"192.168.77.1{i}", "sluice_node_index": i, **LAB, **group_vars}
        if ssh_from:
            hv["ansible_facts"] = {"env": {"SSH_CONNECTION": f"{ssh_from} 40022 192.168.77.1{i} 22"}}
        hostvars[f"node{i}"] = hv
    return hostvars


def check(hostvars, **kwargs):
    return lockout_check(cluster_plan(list(hostvars), hostvars, CLUSTER), hostvars, CLUSTER, **kwargs)


def kubeconfig(tmp_path, server):
    path = tmp_path / "admin.conf"
    path.write_text(f"apiVersion: v1\nkind: Config\ncurrent-context: lab\ncontexts:\n- name: lab\n  context:\n"
                    f"    cluster: lab\n    user: admin\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n")
    return str(path)


def vips(vip, port=80, name="ext"):
    """A service or LB VIP list of one entry."""
    return [{"name": name, "vip": vip, "port": port, "protocol": "tcp",
             "backends": [{"ip": "10.244.1.10", "port": 80}]}]


def test_the_lab_inventory_passes_and_the_plan_is_returned_unchanged(tmp_path):
    hostvars = lab(ssh_from="192.168.77.1")
    plan = cluster_plan(list(hostvars), hostvars, CLUSTER)
    nodes = [{"name": f"node{i}", "pod_cidrs": [f"10.244.{i}.0/24"], "addresses": {"InternalIP": f"192.168.77.1{i}"}}
             for i in (1, 2, 3)]
    assert lockout_check(plan, hostvars, CLUSTER, kubeconfig=kubeconfig(tmp_path, "https://192.168.77.2:6443"),
                         kubernetes_nodes=nodes) == plan


def test_the_example_inventory_passes():
    hostvars = {f"node-{c}": {"ansible_host": f"10.0.0.1{i}", "sluice_node_index": i,
                              "sluice_services": vips("10.96.0.10", name="svc"), "sluice_lb_vips": vips("10.0.0.200"),
                              "sluice_prefilter": ["203.0.113.0/24"]} for i, c in enumerate("abc", 1)}
    check(hostvars)


@pytest.mark.parametrize("group_vars, message", [
    ({"sluice_prefilter": ["192.168.77.0/24"]},
     r"node1: sluice_prefilter\[0\] 192\.168\.77\.0/24 covers node1's address 192\.168\.77\.11: node1 would drop "
     r"its packets at the NIC"),
    ({"sluice_prefilter": ["10.98.0.0/24", "192.168.77.13/32"]},
     r"node1: sluice_prefilter\[1\] 192\.168\.77\.13/32 covers node3's address 192\.168\.77\.13"),
    ({"sluice_prefilter": ["0.0.0.0/0"]}, r"sluice_prefilter\[0\] 0\.0\.0\.0/0 covers node1's address"),
    ({"agent_prefilter": ["192.168.77.12/32"]}, r"node1: agent_prefilter\[0\] 192\.168\.77\.12/32 covers node2's"),
    # The override is for the cluster CIDR only: it never lets a prefilter cover a node.
    ({"sluice_prefilter": ["192.168.77.0/24"], "sluice_allow_prefilter_overlap": ["192.168.77.0/24"],
      "sluice_routing_mode": "vxlan"}, r"sluice_prefilter\[0\] 192\.168\.77\.0/24 covers node1's address"),
])
def test_a_prefilter_covering_a_node_is_refused(group_vars, message):
    with pytest.raises(AnsibleFilterError, match=message):
        check(lab(**group_vars))


def test_a_prefilter_covering_the_controller_as_the_nodes_see_it_is_refused():
    hostvars = lab(sluice_prefilter=["198.51.100.0/24"])
    check(hostvars)     # before the gather, nothing tells where the controller is
    with pytest.raises(AnsibleFilterError, match=r"node1: sluice_prefilter\[0\] 198\.51\.100\.0/24 covers the "
                                                 r"controller's address 198\.51\.100\.7 \(as node1 sees it over "
                                                 r"SSH\): node1 would drop its packets at the NIC"):
        check(lab(ssh_from="198.51.100.7", sluice_prefilter=["198.51.100.0/24"]))


def test_a_prefilter_overlapping_a_management_cidr_is_refused():
    with pytest.raises(AnsibleFilterError, match=r"node1: sluice_prefilter\[0\] 10\.98\.0\.0/24 overlaps the management "
                                                 r"network 10\.98\.0\.128/25 \(sluice_management_cidrs\[0\]\)"):
        check(lab(sluice_management_cidrs=["10.98.0.128/25"]))


def test_a_prefilter_covering_the_kubernetes_api_server_is_refused(tmp_path):
    with pytest.raises(AnsibleFilterError, match=r"node1: sluice_prefilter\[0\] 10\.98\.0\.0/24 covers the Kubernetes "
                                                 r"API server's address 10\.98\.0\.2 \(sluice_kubeconfig\)"):
        check(lab(), kubeconfig=kubeconfig(tmp_path, "https://10.98.0.2:6443"))


@pytest.mark.parametrize("group_vars, message", [
    ({"sluice_prefilter": ["10.244.2.0/24"]},
     r"node1: sluice_prefilter\[0\] 10\.244\.2\.0/24 overlaps node2's pod CIDR 10\.244\.2\.0/24: node1 routes "
     r"natively"),
    ({"sluice_prefilter": ["10.0.0.0/8"]}, r"sluice_prefilter\[0\] 10\.0\.0\.0/8 overlaps node1's pod CIDR"),
    ({"sluice_prefilter": ["10.244.200.0/24"]},
     r"sluice_prefilter\[0\] 10\.244\.200\.0/24 overlaps the cluster CIDR 10\.244\.0\.0/16"),
    # The override does not apply to native routing: pods' packets there carry pod sources.
    ({"sluice_prefilter": ["10.244.0.0/16"], "sluice_allow_prefilter_overlap": ["10.244.0.0/16"]},
     r"sluice_prefilter\[0\] 10\.244\.0\.0/16 overlaps node1's pod CIDR 10\.244\.1\.0/24: node1 routes natively"),
    ({"sluice_prefilter": ["10.244.0.0/16"], "sluice_routing_mode": "vxlan"},
     r"sluice_prefilter\[0\] 10\.244\.0\.0/16 overlaps node1's pod CIDR .*list it in sluice_allow_prefilter_overlap"),
])
def test_a_prefilter_overlapping_the_cluster_cidr_is_refused(group_vars, message):
    with pytest.raises(AnsibleFilterError, match=message):
        check(lab(**group_vars))


def test_a_prefilter_of_pod_sources_passes_with_vxlan_and_the_override():
    check(lab(sluice_prefilter=["10.244.0.0/16"], sluice_routing_mode="vxlan",
              sluice_allow_prefilter_overlap=["10.244.0.0/16"]))


@pytest.mark.parametrize("group_vars, message", [
    ({"sluice_lb_vips": vips("192.168.77.11", 22, "ssh")},
     r"node1: sluice_lb_vips\[0\] \(ssh\) 192\.168\.77\.11:22/tcp is node1's address 192\.168\.77\.11: packets for it "
     r"reaching a node's NIC would go to the LB's backends"),
    ({"sluice_services": vips("192.168.77.12", 6443, "api")},
     r"node1: sluice_services\[0\] \(api\) 192\.168\.77\.12:6443/tcp is node2's address 192\.168\.77\.12: every "
     r"node's own connections to it would go to the service's backends"),
    ({"sluice_services": vips("10.96.0.10", name="svc") + vips("192.168.77.13", name="third")},
     r"sluice_services\[1\] \(third\) 192\.168\.77\.13:80/tcp is node3's address"),
])
def test_a_vip_on_a_node_address_is_refused(group_vars, message):
    with pytest.raises(AnsibleFilterError, match=message):
        check(lab(**group_vars))


def test_a_vip_on_the_address_a_node_is_reached_on_or_its_kubernetes_address_is_refused():
    hostvars = lab(ssh_from="192.168.77.1", sluice_lb_vips=vips("172.16.0.11", 22))
    hostvars["node1"]["ansible_facts"]["env"]["SSH_CONNECTION"] = "192.168.77.1 40022 172.16.0.11 22"
    with pytest.raises(AnsibleFilterError, match=r"sluice_lb_vips\[0\] \(ext\) 172\.16\.0\.11:22/tcp is node1's "
                                                 r"address 172\.16\.0\.11"):
        check(hostvars)
    nodes = [{"name": "node2", "pod_cidrs": ["10.244.2.0/24"], "addresses": {"InternalIP": "172.16.0.12"}}]
    with pytest.raises(AnsibleFilterError, match=r"sluice_services\[0\] \(svc\) 172\.16\.0\.12:80/tcp is node2's "
                                                 r"address 172\.16\.0\.12"):
        check(lab(sluice_services=vips("172.16.0.12", name="svc")), kubernetes_nodes=nodes)


def test_a_vip_on_the_controller_a_management_network_or_the_api_server_is_refused(tmp_path):
    with pytest.raises(AnsibleFilterError, match=r"sluice_lb_vips\[0\] \(ext\) 192\.168\.77\.1:80/tcp is the "
                                                 r"controller's address 192\.168\.77\.1 \(as node1 sees it over SSH\)"):
        check(lab(ssh_from="192.168.77.1", sluice_lb_vips=vips("192.168.77.1")))
    with pytest.raises(AnsibleFilterError, match=r"sluice_services\[0\] \(svc\) 10\.10\.0\.5:80/tcp is inside the "
                                                 r"management network 10\.10\.0\.0/16 \(sluice_management_cidrs\[0\]\)"):
        check(lab(sluice_services=vips("10.10.0.5", name="svc"), sluice_management_cidrs=["10.10.0.0/16"]))
    with pytest.raises(AnsibleFilterError, match=r"sluice_services\[0\] \(svc\) 192\.168\.77\.2:443/tcp is the "
                                                 r"Kubernetes API server's address 192\.168\.77\.2 \(sluice_kubeconfig\)"):
        check(lab(sluice_services=vips("192.168.77.2", 443, name="svc")),
              kubeconfig=kubeconfig(tmp_path, "https://192.168.77.2:6443"))


@pytest.mark.parametrize("vip, message", [
    ("10.244.2.7", r"node1: sluice_lb_vips\[0\] \(ext\) 10\.244\.2\.7:80/tcp is inside node2's pod CIDR "
                   r"10\.244\.2\.0/24, where pods get their addresses"),
    ("10.244.99.1", r"sluice_lb_vips\[0\] \(ext\) 10\.244\.99\.1:80/tcp is inside the cluster CIDR 10\.244\.0\.0/16"),
    ("127.0.0.1", r"sluice_lb_vips\[0\] \(ext\) 127\.0\.0\.1:80/tcp: 127\.0\.0\.1 is a loopback address"),
    ("0.0.0.0", r"0\.0\.0\.0:80/tcp: 0\.0\.0\.0 is in 0\.0\.0\.0/8, which connect\(\) takes for the node itself"),
    ("239.1.1.1", r"239\.1\.1\.1:80/tcp: 239\.1\.1\.1 is a multicast address"),
    ("255.255.255.255", r"255\.255\.255\.255:80/tcp: 255\.255\.255\.255 is in 240\.0\.0\.0/4"),
    ("10.97.0.300", r"node1: sluice_lb_vips\[0\] \(ext\) vip '10\.97\.0\.300' is not an IPv4 address"),
])
def test_a_vip_that_is_no_address_of_its_own_is_refused(vip, message):
    with pytest.raises(AnsibleFilterError, match=message):
        check(lab(sluice_lb_vips=vips(vip)))


def test_a_vip_in_both_the_service_and_the_lb_lists_is_refused():
    with pytest.raises(AnsibleFilterError, match=r"node1: sluice_lb_vips\[0\] \(ext\) 10\.96\.0\.53:443/tcp is also "
                                                 r"the VIP of sluice_services\[1\] \(dns\)"):
        check(lab(sluice_lb_vips=vips("10.96.0.53", 443)))


def test_a_malformed_prefilter_or_management_cidr_is_refused_naming_it():
    with pytest.raises(AnsibleFilterError, match=r"node1: sluice_prefilter\[0\] 10\.98\.0\.1/24 is not an IPv4 CIDR"):
        check(lab(sluice_prefilter=["10.98.0.1/24"]))
    with pytest.raises(AnsibleFilterError, match=r"node1: sluice_management_cidrs\[0\] x is not an IPv4 CIDR"):
        check(lab(sluice_management_cidrs=["x"]))


def test_a_route_to_a_pod_cidr_over_a_node_the_controller_or_a_nic_network_is_refused():
    """A pod CIDR (here node3's, set by hand in a cluster CIDR that holds the nodes' network) that the other
    nodes route to node3 would take their packets to the hosts in it, their answers to the controller too."""
    cluster = "192.168.0.0/16"

    def routed(pod_cidr, **host_vars):
        hostvars = lab(**host_vars)
        hostvars["node3"]["sluice_pod_cidr"] = pod_cidr
        lockout_check(cluster_plan(list(hostvars), hostvars, cluster), hostvars, cluster)

    with pytest.raises(AnsibleFilterError, match=r"node1: the route to node3's pod CIDR 192\.168\.77\.0/28 \(via "
                                                 r"192\.168\.77\.13\) covers node1's address 192\.168\.77\.11: node1 "
                                                 r"would send its packets to it \(its answers too\) to node3 instead"):
        routed("192.168.77.0/28")
    with pytest.raises(AnsibleFilterError, match=r"node1: the route to node3's pod CIDR 192\.168\.77\.0/30 .* covers "
                                                 r"the controller's address 192\.168\.77\.1 \(as node1 sees it"):
        routed("192.168.77.0/30", ssh_from="192.168.77.1")
    with pytest.raises(AnsibleFilterError, match=r"node1: the route to node3's pod CIDR 192\.168\.10\.0/24 .* overlaps "
                                                 r"the management network 192\.168\.10\.0/23 \(sluice_management_"
                                                 r"cidrs\[0\]\)"):
        routed("192.168.10.0/24", sluice_management_cidrs=["192.168.10.0/23"])
    # No node address, no controller in it: only the NIC's network, from the network facts, tells.
    routed("192.168.77.128/25", sluice_nic="eth0")
    hostvars = lab(sluice_nic="eth0")
    hostvars["node3"]["sluice_pod_cidr"] = "192.168.77.128/25"
    for i, hv in enumerate(hostvars.values(), 1):
        hv["ansible_facts"] = {"eth0": {"ipv4": {"address": f"192.168.77.1{i}", "netmask": "255.255.255.0"},
                                        "ipv4_secondaries": [{"address": "10.1.0.1", "netmask": "255.255.0.0"}]}}
    with pytest.raises(AnsibleFilterError, match=r"node1: the route to node3's pod CIDR 192\.168\.77\.128/25 \(via "
                                                 r"192\.168\.77\.13\) overlaps eth0's network 192\.168\.77\.0/24: "
                                                 r"node1 would send .* pod CIDRs must lie outside the nodes' networks"):
        lockout_check(cluster_plan(list(hostvars), hostvars, cluster), hostvars, cluster)


@pytest.mark.parametrize("group_vars,message", [
    ({"sluice_failsafe": ["tcp:6443", "udp:53"]},
     r"node1: sluice_failsafe lacks tcp:22, the port Ansible reaches node1 on: a prefilter or LB entry could then "
     r"cut the controller off it"),
    ({"ansible_port": 2222},
     r"node1: Ansible reaches node1 on port 2222, which the default failsafe does not hold: set sluice_failsafe "
     r"with tcp:2222"),
    ({"ansible_port": 2222, "sluice_failsafe": ["udp:2222"]}, r"node1: sluice_failsafe lacks tcp:2222"),
    ({"sluice_failsafe": ["tcp:22", "ssh"]}, r"node1: sluice_failsafe\[1\] 'ssh' is not PROTOCOL:PORT"),
    ({"sluice_failsafe": ["tcp:30-20"]}, r"node1: sluice_failsafe\[0\] 'tcp:30-20' is not PROTOCOL:PORT"),
    ({"agent_failsafe": ["tcp:80"]}, r"node1: agent_failsafe lacks tcp:22"),
], ids=["ssh-missing", "other-ssh-port-default", "other-ssh-port-udp", "malformed", "reversed-range", "agent-var"])
def test_a_failsafe_without_the_ssh_port_or_malformed_is_refused(group_vars, message):
    with pytest.raises(AnsibleFilterError, match=message):
        check(lab(**group_vars))


def test_a_failsafe_holding_the_ssh_port_passes():
    check(lab(ansible_port=2222, sluice_failsafe=["tcp:2200-2299", "udp:53"]))
    check(lab(sluice_failsafe=["tcp:22"]))
