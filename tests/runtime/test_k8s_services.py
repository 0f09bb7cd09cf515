"""What a Kubernetes Service becomes in the datapath on one node (sluice.k8s.services): objects as the API
server returns them, frontends and backends as the reconciler gets them."""

from __future__ import annotations

import pytest

from sluice.k8s import services as ks
from sluice.state import Backend, DesiredState
from sluice.state.sources import ApiFrontends, merge, prune_cache, save_service


def service(name="web", ns="default", type_="ClusterIP", cluster_ip="10.100.0.20", ports=None, **spec):
    ports = ports if ports is not None else [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}]
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"type": type_, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports, **spec}}


def endpoint(ip, node="node1", ready=True, serving=None, terminating=False):
    cond = {"ready": ready, "serving": ready if serving is None else serving, "terminating": terminating}
    return {"addresses": [ip], "nodeName": node, "conditions": cond}


def slice_(endpoints, name="web-abc", svc="web", ports=None, address_type="IPv4"):
    return {"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": address_type, "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "http", "protocol": "TCP", "port": 8080}]}


NODES = {"node1": ks.Node(("192.168.1.11",), "10.244.1.0/24"), "node2": ks.Node(("192.168.1.12",), "10.244.2.0/24")}


def frontends(svc, *slices, node="node1", node_ip="192.168.1.11"):
    return ks.service_frontends(ks.service_from_api(svc), [ks.endpoint_slice_from_api(s) for s in slices],
                                node, node_ip, NODES)


def test_cluster_ip_serves_the_ready_endpoints_on_the_port_of_the_same_name():
    sock, xdp = frontends(service(), slice_([endpoint("10.244.1.5"), endpoint("10.244.2.7", "node2"),
                                             endpoint("10.244.2.8", "node2", ready=False)]))
    assert sock == {("10.100.0.20", 80, "tcp"): (Backend("10.244.1.5", 8080, "tcp"), Backend("10.244.2.7", 8080, "tcp"))}
    assert xdp == {}


def test_terminating_endpoints_serve_only_when_no_endpoint_is_ready():
    old = endpoint("10.244.1.5", ready=False, serving=True, terminating=True)
    assert frontends(service(), slice_([old]))[0][("10.100.0.20", 80, "tcp")] == (Backend("10.244.1.5", 8080, "tcp"),)
    new = endpoint("10.244.2.9", "node2")
    assert frontends(service(), slice_([old, new]))[0][("10.100.0.20", 80, "tcp")] == \
        (Backend("10.244.2.9", 8080, "tcp"),)
    not_serving = endpoint("10.244.1.5", ready=False, serving=False, terminating=True)
    assert frontends(service(), slice_([not_serving]))[0][("10.100.0.20", 80, "tcp")] == ()


def test_multiple_ports_and_protocols_and_several_slices():
    ports = [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "dns-tcp", "protocol": "TCP", "port": 53},
             {"name": "sctp", "protocol": "SCTP", "port": 9}]
    slice_ports = [{"name": "dns", "protocol": "UDP", "port": 5353}, {"name": "dns-tcp", "protocol": "TCP", "port": 5354}]
    sock, _xdp = frontends(service(ports=ports), slice_([endpoint("10.244.1.5")], "a", ports=slice_ports),
                           slice_([endpoint("10.244.2.6", "node2")], "b", ports=slice_ports))
    assert sock == {("10.100.0.20", 53, "udp"): (Backend("10.244.1.5", 5353, "udp"), Backend("10.244.2.6", 5353, "udp")),
                    ("10.100.0.20", 53, "tcp"): (Backend("10.244.1.5", 5354, "tcp"), Backend("10.244.2.6", 5354, "tcp"))}


def test_node_port_answers_on_every_node_address_and_at_the_nic_of_this_node():
    ports = [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 31000}]
    sock, xdp = frontends(service(type_="NodePort", ports=ports), slice_([endpoint("10.244.2.7", "node2")]))
    backends = (Backend("10.244.2.7", 8080, "tcp"),)
    assert sock == {("10.100.0.20", 80, "tcp"): backends, ("192.168.1.11", 31000, "tcp"): backends,
                    ("192.168.1.12", 31000, "tcp"): backends}
    assert xdp == {("192.168.1.11", 31000, "tcp"): backends}


def test_traffic_policies_local_keep_the_nodes_own_endpoints():
    ports = [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 31000}]
    svc = service(type_="LoadBalancer", ports=ports, externalTrafficPolicy="Local", internalTrafficPolicy="Local",
                  externalIPs=["203.0.113.7"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example"}]}}
    sock, xdp = frontends(svc, slice_([endpoint("10.244.1.5"), endpoint("10.244.2.7", "node2")]))
    mine, theirs = (Backend("10.244.1.5", 8080, "tcp"),), (Backend("10.244.2.7", 8080, "tcp"),)
    assert sock[("10.100.0.20", 80, "tcp")] == mine
    assert sock[("192.168.1.11", 31000, "tcp")] == mine
    assert sock[("192.168.1.12", 31000, "tcp")] == theirs       # node2's NodePort leads to node2's endpoints
    assert xdp == {("192.168.1.11", 31000, "tcp"): mine, ("203.0.113.7", 80, "tcp"): mine,
                   ("198.51.100.1", 80, "tcp"): mine}


@pytest.mark.parametrize("spec", [{"type": "ExternalName", "externalName": "example.org"}, {"clusterIP": "None"}])
def test_external_name_and_headless_services_have_no_frontend(spec):
    svc = service(**{"cluster_ip": spec.pop("clusterIP", "10.100.0.20")})
    svc["spec"].update(spec)
    if svc["spec"]["clusterIP"] == "None":
        svc["spec"]["clusterIPs"] = ["None"]
    assert ks.service_from_api(svc) is None


def test_ipv6_slices_and_slices_of_no_service_are_ignored():
    assert ks.endpoint_slice_from_api(slice_([endpoint("fd00::1")], address_type="IPv6")) is None
    orphan = slice_([endpoint("10.244.1.5")])
    del orphan["metadata"]["labels"]
    assert ks.endpoint_slice_from_api(orphan) is None


def test_the_inventory_wins_a_frontend_both_ask_for():
    state = DesiredState.parse({"node": {"name": "node1", "ip": "192.168.1.11", "nic": "eth0",
                                         "pod_cidr": "10.244.1.0/24"},
                                "services": [{"name": "infra", "vip": "10.96.0.10", "port": 80,
                                              "backends": [{"ip": "10.244.1.9", "port": 80}]}]})
    api = ApiFrontends.parse({"services": [
        {"name": "team/web", "vip": "10.96.0.10", "port": 80, "backends": [{"ip": "10.244.2.2", "port": 8080}]},
        {"name": "team/api", "vip": "10.100.0.5", "port": 443, "backends": []}]})
    merged, conflicts = merge(state, api)
    assert merged.services == {("10.96.0.10", 80, "tcp"): (Backend("10.244.1.9", 80, "tcp"),),
                               ("10.100.0.5", 443, "tcp"): ()}
    assert conflicts == ["Service team/web: 10.96.0.10:80/tcp is served by the inventory's services, which wins; "
                         "the Service's frontend is not programmed"]


def test_client_ip_affinity_with_its_timeout_reaches_the_state_and_survives_the_cache(tmp_path):
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})
    assert ks.service_from_api(svc).affinity_timeout == 30
    assert ks.service_from_api(service(sessionAffinity="ClientIP")).affinity_timeout == 10800
    assert ks.service_from_api(service()).affinity_timeout == 0
    fe = ("10.100.0.20", 80, "tcp")
    api = ApiFrontends({fe: (Backend("10.244.1.5", 8080, "tcp"),)}, {}, {fe: "default/web"}, {fe: 30})
    save_service(str(tmp_path), "default/web", api)
    assert ApiFrontends.load(str(tmp_path)) == api
    state = DesiredState.parse({"node": {"name": "node1", "ip": "192.168.1.11", "nic": "eth0",
                                         "pod_cidr": "10.244.1.0/24"}})
    merged, conflicts = merge(state, api)
    assert merged.affinity == {fe: 30} and merged.services == api.services and not conflicts


def test_external_traffic_policy_local_and_affinity_reach_the_xdp_lb_and_survive_the_cache(tmp_path):
    """externalTrafficPolicy Local keeps the client's source on the XDP LB's frontends (NodePort at the NIC,
    external IPs), ClientIP affinity holds there too; the cluster IP is the socket LB's, without either."""
    from sluice import maps as m
    from sluice.k8s.source import KubernetesSource

    ports = [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080}]
    svc = service(type_="NodePort", ports=ports, externalTrafficPolicy="Local", externalIPs=["203.0.113.9"],
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    source = KubernetesSource.__new__(KubernetesSource)
    source.node_name, source.node_ip = "node1", "192.168.1.11"
    part = source._service("default/web", ks.service_from_api(svc),
                           [ks.endpoint_slice_from_api(slice_([endpoint("10.244.1.5")]))], NODES)
    xdp = {("192.168.1.11", 30080, "tcp"), ("203.0.113.9", 80, "tcp")}
    assert set(part.lb_vips) == set(part.lb_options) == xdp
    assert set(part.lb_options.values()) == {m.LbOptions(keep_source=True, affinity_timeout=60)}
    assert part.affinity[("10.100.0.20", 80, "tcp")] == 60
    save_service(str(tmp_path), "default/web", part)
    assert ApiFrontends.load(str(tmp_path)) == part
    state = DesiredState.parse({"node": {"name": "node1", "ip": "192.168.1.11", "nic": "eth0",
                                         "pod_cidr": "10.244.1.0/24"}})
    merged, _conflicts = merge(state, part)
    assert merged.lb_options == part.lb_options
    # a Cluster policy: the XDP LB translates the source, as before
    plain = source._service("default/web", ks.service_from_api(service(type_="NodePort", ports=ports)),
                            [ks.endpoint_slice_from_api(slice_([endpoint("10.244.1.5")]))], NODES)
    assert plain.lb_vips and not plain.lb_options


def test_two_services_asking_for_one_frontend_the_first_wins_in_the_cache_and_in_the_watch(tmp_path):
    """An external IP two Services claim: the one of first precedence gets it, the same after a restart
    (the cache) as while watching, and the other takes over when it lets go."""
    from sluice.k8s.source import KubernetesSource

    shared = ("203.0.113.7", 80, "tcp")

    def part(key, backend):
        return ApiFrontends({shared: (Backend(backend, 8080, "tcp"),)}, {}, {shared: key})

    a, b = part("team-a/web", "10.244.1.5"), part("team-b/web", "10.244.2.6")
    source = KubernetesSource.__new__(KubernetesSource)
    source.api, source._claims, source._per_service = ApiFrontends(), {}, {}
    for key, p in (("team-b/web", b), ("team-a/web", a)):
        source._per_service[key] = p
        source._claim(key, p)
        save_service(str(tmp_path), key, p)
    assert source.api.services[shared] == a.services[shared]
    assert ApiFrontends.load(str(tmp_path)).services == source.api.services
    source._release("team-a/web", a)
    del source._per_service["team-a/web"]
    assert source.api.services[shared] == b.services[shared] and source.api.owner[shared] == "team-b/web"
    prune_cache(str(tmp_path), {"team-b/web"})
    assert ApiFrontends.load(str(tmp_path)) == source.api


def test_node_routes_add_what_the_inventory_lacks_and_never_override_it():
    state = DesiredState.parse({"node": {"name": "node1", "ip": "192.168.1.11", "nic": "eth0",
                                         "pod_cidr": "10.244.1.0/24"},
                                "routes": [{"cidr": "10.244.2.0/24", "nexthop": "192.168.1.12"}]})
    api = ApiFrontends(routes={"10.244.2.0/24": "192.168.1.12",      # the same: nothing to say
                               "10.244.3.0/24": "192.168.1.13",      # a Node the inventory lacks
                               "10.244.2.0/23": "192.168.1.14",      # overlaps the inventory's route
                               "10.244.4.0/24": "10.9.9.9"})         # nexthop off the NIC's networks
    merged, conflicts = merge(state, api, lambda _cidr, nexthop: None if nexthop.startswith("192.168.1.")
                              else f"nexthop {nexthop} is not on a network of eth0")
    assert merged.routes == {"10.244.2.0/24": "192.168.1.12", "10.244.3.0/24": "192.168.1.13"}
    assert conflicts == ["Node route 10.244.2.0/23 via 192.168.1.14: overlaps 10.244.2.0/24, which the inventory "
                         "routes; not programmed",
                         "Node route 10.244.4.0/24 via 10.9.9.9: nexthop 10.9.9.9 is not on a network of eth0; not "
                         "programmed"]
    assert ks.node_from_api({"spec": {"podCIDRs": ["fd00:1::/64", "10.244.3.0/24"]},
                             "status": {"addresses": [{"type": "Hostname", "address": "node3"},
                                                      {"type": "InternalIP", "address": "192.168.1.13"}]}}) == \
        ks.Node(("192.168.1.13",), "10.244.3.0/24")


def test_an_external_ip_that_is_a_node_address_is_never_served():
    """externalIPs: [a node's address] with port 22 would take the node's SSH away (CVE-2020-8554's class)."""
    ports = [{"name": "ssh", "protocol": "TCP", "port": 22}]
    svc = service(ports=ports, externalIPs=["192.168.1.12", "203.0.113.9"])
    sock, xdp = frontends(svc, slice_([endpoint("10.244.1.5")], ports=[{"name": "ssh", "protocol": "TCP",
                                                                        "port": 2222}]))
    assert set(sock) == {("10.100.0.20", 22, "tcp"), ("203.0.113.9", 22, "tcp")}
    assert set(xdp) == {("203.0.113.9", 22, "tcp")}
