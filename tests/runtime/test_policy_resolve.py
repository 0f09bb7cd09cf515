"""NetworkPolicy resolved for one node's datapath (sluice.policy): objects shaped as the API server returns
them, checked against what the API documentation says each policy means, through a model of the datapath's
lookups (ipcache, longest-prefix CIDR map, entries by identity, protocol and port prefix)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from sluice.policy import model as m
from sluice.policy import resolve as r

TCP, UDP, SCTP = r.PROTO_TCP, r.PROTO_UDP, r.PROTO_SCTP
NODES = {"node1": ("192.168.1.11",), "node2": ("192.168.1.12",)}


def pod(name, ns="default", labels=None, ip="", node="node1", ports=(), phase="Running", host_network=False):
    spec = {"nodeName": node, "containers": [{"name": "main", "image": "agnhost", "ports": [
        {"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]}
    if host_network:
        spec["hostNetwork"] = True
    status = {"phase": phase}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec, "status": status,
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}, "uid": f"uid-{ns}-{name}"}}


def namespace(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}}}


def policy(name, spec, ns="default"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def cluster():
    """node1: default/client, default/server, team-a/api; node2: default/remote, team-b/client."""
    return [pod("client", labels={"app": "client"}, ip="10.244.1.10"),
            pod("server", labels={"app": "server"}, ip="10.244.1.20",
                ports=[("http", 8080, "TCP"), ("dns", 5353, "UDP")]),
            pod("api", "team-a", {"app": "api"}, ip="10.244.1.30", ports=[("http", 9090, "TCP")]),
            pod("remote", labels={"app": "client", "tier": "web"}, ip="10.244.2.10", node="node2"),
            pod("client", "team-b", {"app": "client"}, ip="10.244.2.20", node="node2")]


NAMESPACES = (namespace("default"), namespace("team-a", team="a"), namespace("team-b", team="b"))


def resolve(policies, pods=None, namespaces=NAMESPACES, node="node1", local=None, identities=None):
    pods = {f"{p.namespace}/{p.name}": p for p in map(m.pod_from_api, cluster() if pods is None else pods) if p}
    nss = {n.name: n for n in map(m.namespace_from_api, namespaces)}
    pols = {f"{p.namespace}/{p.name}": p for p in map(m.policy_from_api, policies)}
    return r.resolve(pods, nss, pols, NODES, node, local or {}, identities or r.Identities())


def peer_identities(res, ip):
    """What the datapath finds for an address: its ipcache identity, its longest-prefix CIDR identity, ID_ANY."""
    found = {r.ID_ANY, res.ipcache.get(f"{ip}/32", r.ID_WORLD)}
    inside = [n for n in map(ipaddress.IPv4Network, res.cidrs) if ipaddress.IPv4Address(ip) in n]
    if inside:
        found.add(res.cidrs[str(max(inside, key=lambda n: n.prefixlen))])
    return found


def allowed(res, endpoint, direction, peer, port, proto=TCP):
    if not res.isolation.get(endpoint, 0) & direction:
        return True
    ids = peer_identities(res, peer)
    return any(e.endpoint == endpoint and e.direction == direction and e.identity in ids and e.proto in (0, proto)
               and (e.proto == 0 or port >> (16 - e.port_bits) == e.port >> (16 - e.port_bits))
               for e in res.entries)


def ingress(res, dst, src, port=80, proto=TCP):
    return allowed(res, dst, r.INGRESS, src, port, proto)


def egress(res, src, dst, port=80, proto=TCP):
    return allowed(res, src, r.EGRESS, dst, port, proto)


CLIENT, SERVER, API, REMOTE, B_CLIENT = "10.244.1.10", "10.244.1.20", "10.244.1.30", "10.244.2.10", "10.244.2.20"
OUTSIDE = "203.0.113.9"


def server_ingress(*rules, types=None):
    spec = {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": list(rules)}
    if types:
        spec["policyTypes"] = types
    return policy("server-in", spec)


# the objects

def test_pod_keeps_what_the_resolver_needs_ipv4_only():
    obj = pod("web", labels={"b": "2", "a": "1"}, ip="10.244.1.5", ports=[("http", 8080, "TCP"), ("q", 53, "UDP")])
    obj["status"]["podIPs"].append({"ip": "fd00::5"})
    obj["spec"]["containers"][0]["ports"].append({"containerPort": 9000, "protocol": "TCP"})     # unnamed
    assert m.pod_from_api(obj) == m.Pod("default", "web", (("a", "1"), ("b", "2")), ("10.244.1.5",), "node1", False,
                                        (("http", TCP, 8080), ("q", UDP, 53)))
    assert m.pod_from_api(pod("new")).ips == ()             # no address yet: kept, its CNI may know one
    assert m.pod_from_api(pod("done", ip="10.244.1.6", phase="Succeeded")) is None
    assert m.pod_from_api(pod("gone", ip="10.244.1.7", phase="Failed")) is None
    assert m.pod_from_api(pod("h", ip="192.168.1.11", host_network=True)).host_network


def test_policy_defaults_types_from_its_rules_and_protocol_tcp():
    p = m.policy_from_api(policy("p", {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}))
    assert p.types == {r.INGRESS} and p.ingress == (m.Rule((), (m.PortSpec(TCP, 80, 0, ""),)),) and p.egress == ()
    p = m.policy_from_api(policy("p", {"podSelector": {}, "egress": [{}]}))
    assert p.types == {r.INGRESS, r.EGRESS}
    assert m.policy_from_api(policy("p", {"podSelector": {}, "egress": []})).types == {r.INGRESS}


# isolation and default deny

def test_ipcache_has_every_pod_and_node_and_no_ended_or_host_network_pod():
    pods = cluster() + [pod("done", ip="10.244.1.99", phase="Succeeded"),
                        pod("h", ip="192.168.1.11", host_network=True), pod("pending")]
    res = resolve([], pods)
    ids = {ip: res.ipcache[f"{ip}/32"] for ip in (CLIENT, SERVER, API, REMOTE, B_CLIENT)}
    assert all(i >= r.FIRST_POD_IDENTITY for i in ids.values())
    assert ids[CLIENT] != ids[B_CLIENT]             # same labels, other namespace: another identity
    assert ids[CLIENT] != ids[REMOTE]               # other labels
    assert res.ipcache["192.168.1.11/32"] == r.ID_HOST and res.ipcache["192.168.1.12/32"] == r.ID_REMOTE_NODE
    assert len(res.ipcache) == 7 and res.isolation == {} and res.entries == frozenset() and res.cidrs == {}


def test_pods_with_the_same_labels_in_a_namespace_share_an_identity():
    res = resolve([], cluster() + [pod("client-2", labels={"app": "client"}, ip="10.244.2.11", node="node2")])
    assert res.ipcache[f"{CLIENT}/32"] == res.ipcache["10.244.2.11/32"]


def test_default_deny_ingress_isolates_every_pod_of_the_namespace_and_allows_nothing_in():
    res = resolve([policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    assert res.isolation == {CLIENT: r.INGRESS, SERVER: r.INGRESS}     # team-a/api is in another namespace
    assert res.entries == frozenset()
    assert not ingress(res, SERVER, CLIENT) and not ingress(res, SERVER, OUTSIDE)
    assert egress(res, SERVER, OUTSIDE) and ingress(res, API, CLIENT)


def test_default_deny_egress_leaves_ingress_open():
    res = resolve([policy("deny", {"podSelector": {}, "policyTypes": ["Egress"]})])
    assert res.isolation == {CLIENT: r.EGRESS, SERVER: r.EGRESS} and res.entries == frozenset()
    assert not egress(res, CLIENT, SERVER) and not egress(res, CLIENT, OUTSIDE, 53, UDP)
    assert ingress(res, CLIENT, OUTSIDE)


def test_policy_types_egress_only_ignores_its_ingress_rules_and_leaves_ingress_open():
    res = resolve([server_ingress({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]},
                                  types=["Egress"])])
    assert res.isolation == {SERVER: r.EGRESS} and res.entries == frozenset()
    assert ingress(res, SERVER, OUTSIDE) and not egress(res, SERVER, CLIENT)


def test_allow_all_ingress_with_an_empty_rule():
    res = resolve([server_ingress({})])
    assert res.entries == {r.PolicyEntry(SERVER, r.INGRESS, r.ID_ANY, 0, 0, 0)}
    assert ingress(res, SERVER, OUTSIDE, 1, SCTP)


# peers

def test_allow_from_pods_by_label_in_the_policys_namespace_only():
    db = "10.244.2.50"
    res = resolve([server_ingress({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                   "ports": [{"protocol": "TCP", "port": 80}]})],
                  cluster() + [pod("db", labels={"app": "db"}, ip=db, node="node2")])
    assert not ingress(res, SERVER, db, 80)             # the policy's namespace, other labels
    assert ingress(res, SERVER, CLIENT, 80) and ingress(res, SERVER, REMOTE, 80)    # matchLabels: a subset
    assert not ingress(res, SERVER, CLIENT, 81) and not ingress(res, SERVER, CLIENT, 80, UDP)
    assert not ingress(res, SERVER, B_CLIENT, 80)       # same labels, other namespace
    assert not ingress(res, SERVER, API, 80) and not ingress(res, SERVER, OUTSIDE, 80)
    assert res.isolation == {SERVER: r.INGRESS}


def test_match_expressions_operators():
    def selected(*expressions):
        res = resolve([policy("p", {"podSelector": {"matchExpressions": list(expressions)},
                                    "policyTypes": ["Ingress"]})])
        return set(res.isolation)

    assert selected({"key": "app", "operator": "In", "values": ["client", "server"]}) == {CLIENT, SERVER}
    assert selected({"key": "app", "operator": "NotIn", "values": ["client"]}) == {SERVER}
    assert selected({"key": "app", "operator": "Exists"}) == {CLIENT, SERVER}
    assert selected({"key": "app", "operator": "DoesNotExist"}) == set()
    assert selected({"key": "tier", "operator": "NotIn", "values": ["web"]}) == {CLIENT, SERVER}  # no key: not in
    assert selected({"key": "app", "operator": "In", "values": ["client"]},
                    {"key": "tier", "operator": "DoesNotExist"}) == {CLIENT}


def test_namespace_selector_allows_every_pod_of_the_matching_namespaces():
    res = resolve([server_ingress({"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]})])
    assert ingress(res, SERVER, B_CLIENT) and not ingress(res, SERVER, CLIENT) and not ingress(res, SERVER, API)
    res = resolve([server_ingress({"from": [{"namespaceSelector": {}}]})])
    assert all(ingress(res, SERVER, ip) for ip in (CLIENT, API, REMOTE, B_CLIENT))
    assert not ingress(res, SERVER, OUTSIDE) and not ingress(res, SERVER, "192.168.1.12")    # pods only
    by_name = {"matchLabels": {"kubernetes.io/metadata.name": "team-a"}}
    res = resolve([server_ingress({"from": [{"namespaceSelector": by_name}]})])
    assert ingress(res, SERVER, API) and not ingress(res, SERVER, B_CLIENT)


def test_pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or():
    clients = {"podSelector": {"matchLabels": {"app": "client"}}}
    team_b = {"namespaceSelector": {"matchLabels": {"team": "b"}}}
    both = resolve([server_ingress({"from": [{**clients, **team_b}]})])
    assert ingress(both, SERVER, B_CLIENT)
    assert not ingress(both, SERVER, CLIENT)            # a client, but not in team b
    either = resolve([server_ingress({"from": [clients, team_b]})])
    assert ingress(either, SERVER, B_CLIENT) and ingress(either, SERVER, CLIENT)    # client in the policy's ns
    assert not ingress(either, SERVER, API)
    everything = resolve([server_ingress({"from": [{"podSelector": {}, "namespaceSelector": {}}]})])
    assert ingress(everything, SERVER, API) and not ingress(everything, SERVER, OUTSIDE)


def test_ip_block_with_except_matches_addresses_and_pods_inside_it_only():
    block = {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24", "10.244.1.30/32"]}}
    world = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}
    res = resolve([server_ingress({"from": [block]}),
                   policy("client-out", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                                         "egress": [{"to": [world]}]})])
    assert set(res.cidrs) == {"10.244.0.0/16", "10.244.2.0/24", "10.244.1.30/32", "0.0.0.0/0", "10.0.0.0/8"}
    assert all(i >= r.FIRST_CIDR_IDENTITY for i in res.cidrs.values())
    assert ingress(res, SERVER, CLIENT) and ingress(res, SERVER, "10.244.7.1")      # a pod, an address
    assert not ingress(res, SERVER, REMOTE) and not ingress(res, SERVER, B_CLIENT)  # inside the except
    assert not ingress(res, SERVER, API)                                          # the /32 except, a pod's
    assert not ingress(res, SERVER, OUTSIDE)
    assert egress(res, CLIENT, OUTSIDE) and egress(res, CLIENT, "192.168.1.12")   # a node's address too
    assert not egress(res, CLIENT, SERVER) and not egress(res, CLIENT, "10.1.2.3")
    # the 10.244 prefixes are inside the world block, and inside its except: not its peers
    assert {e.identity for e in res.entries if e.direction == r.EGRESS} == {res.cidrs["0.0.0.0/0"]}


def test_ip_block_prefixes_come_only_from_policies_selecting_a_local_endpoint():
    remote_only = policy("remote", {"podSelector": {"matchLabels": {"tier": "web"}},
                                    "ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}]})
    assert resolve([remote_only]).cidrs == {}
    assert set(resolve([remote_only], node="node2").cidrs) == {"198.51.100.0/24"}


# ports

@pytest.mark.parametrize("first,last,count", [(80, 81, 1), (1, 65535, 16), (32000, 32767, 2), (443, 443, 1),
                                              (1000, 2000, 8)])
def test_port_ranges_become_the_fewest_prefixes_covering_exactly_the_range(first, last, count):
    blocks = r.port_blocks(first, last)
    covered = [port for base, bits in blocks for port in range(base, base + (1 << (16 - bits)))]
    assert sorted(covered) == list(range(first, last + 1)) and len(blocks) == count


def test_end_port_rule_allows_the_range_and_nothing_around_it():
    res = resolve([server_ingress({"ports": [{"protocol": "TCP", "port": 32000, "endPort": 32767},
                                             {"protocol": "UDP", "port": 80, "endPort": 81}]})])
    assert {(e.proto, e.port, e.port_bits) for e in res.entries} == {(TCP, 32000, 8), (TCP, 32256, 7), (UDP, 80, 15)}
    assert ingress(res, SERVER, OUTSIDE, 32000) and ingress(res, SERVER, OUTSIDE, 32767)
    assert not ingress(res, SERVER, OUTSIDE, 31999) and not ingress(res, SERVER, OUTSIDE, 32768)
    assert ingress(res, SERVER, OUTSIDE, 81, UDP) and not ingress(res, SERVER, OUTSIDE, 82, UDP)


def test_protocol_without_port_allows_every_port_of_that_protocol_only():
    res = resolve([server_ingress({"ports": [{"protocol": "SCTP"}]})])
    assert ingress(res, SERVER, OUTSIDE, 9, SCTP) and not ingress(res, SERVER, OUTSIDE, 9, TCP)
    assert res.entries == {r.PolicyEntry(SERVER, r.INGRESS, r.ID_ANY, SCTP, 0, 0)}


def test_named_port_ingress_is_the_selected_pods_own_container_port():
    res = resolve([policy("in", {"podSelector": {},
                                 "ingress": [{"ports": [{"port": "http"}]}, {"ports": [{"port": "dns", "protocol": "UDP"}]}]})])
    assert ingress(res, SERVER, OUTSIDE, 8080) and not ingress(res, SERVER, OUTSIDE, 9090)
    assert ingress(res, SERVER, OUTSIDE, 5353, UDP) and not ingress(res, SERVER, OUTSIDE, 5353, TCP)
    assert not ingress(res, CLIENT, OUTSIDE, 8080)       # the client has no port named http: nothing
    assert res.isolation[CLIENT] == r.INGRESS


def test_named_port_egress_is_each_destinations_port_and_the_union_over_pods_sharing_labels():
    pods = cluster() + [pod("api-2", "team-a", {"app": "api"}, ip="10.244.2.31", node="node2",
                            ports=[("http", 9091, "TCP")])]
    to_api = {"namespaceSelector": {"matchLabels": {"team": "a"}}}
    res = resolve([policy("out", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                                  "egress": [{"to": [to_api, {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                              "ports": [{"port": "http"}]}]})], pods)
    assert egress(res, CLIENT, API, 9090) and egress(res, CLIENT, API, 9091)     # over-approximated, documented
    assert not egress(res, CLIENT, SERVER, 8080)       # http there too, but ipBlock peers get no named port
    assert not egress(res, CLIENT, API, 80)


def test_named_port_egress_to_every_peer_resolves_to_the_pods_having_that_port():
    res = resolve([policy("out", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                                  "egress": [{"ports": [{"port": "http", "protocol": "TCP"}]}]})])
    assert egress(res, CLIENT, SERVER, 8080) and egress(res, CLIENT, API, 9090)
    assert not egress(res, CLIENT, API, 8080) and not egress(res, CLIENT, OUTSIDE, 8080)
    assert {e.identity for e in res.entries} == {res.ipcache[f"{SERVER}/32"], res.ipcache[f"{API}/32"]}


def test_entries_another_entry_covers_are_dropped():
    clients = {"podSelector": {"matchLabels": {"app": "client"}}}
    res = resolve([server_ingress({"from": [clients], "ports": [{"port": 80}, {"port": 80, "endPort": 95}]},
                                  {"from": [clients], "ports": [{"port": 443}]},
                                  {"ports": [{"port": 443}]}, {"from": [clients]})])
    client_id = res.ipcache[f"{CLIENT}/32"]
    remote_id = res.ipcache[f"{REMOTE}/32"]
    assert res.entries == {r.PolicyEntry(SERVER, r.INGRESS, client_id, 0, 0, 0),
                           r.PolicyEntry(SERVER, r.INGRESS, remote_id, 0, 0, 0),
                           r.PolicyEntry(SERVER, r.INGRESS, r.ID_ANY, TCP, 443, 16)}
    res = resolve([server_ingress({"from": [clients], "ports": [{"port": 80}, {"port": 64, "endPort": 127}]})])
    assert {(e.port, e.port_bits) for e in res.entries} == {(64, 10)}


# combining

def test_two_policies_combine_as_a_union_and_either_isolates():
    res = resolve([server_ingress({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                   "ports": [{"port": 80}]}),
                   policy("server-in-2", {"podSelector": {"matchLabels": {"app": "server"}},
                                          "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                                                       "ports": [{"port": 443}]}]}),
                   policy("client-out", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                                         "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}]})])
    assert ingress(res, SERVER, CLIENT, 80) and not ingress(res, SERVER, CLIENT, 443)
    assert ingress(res, SERVER, API, 443) and not ingress(res, SERVER, API, 80)
    assert res.isolation == {SERVER: r.INGRESS, CLIENT: r.EGRESS}
    assert egress(res, CLIENT, SERVER, 80) and not egress(res, CLIENT, API, 443)


def test_a_policy_in_another_namespace_does_not_select_pods_here():
    res = resolve([policy("deny", {"podSelector": {}}, ns="team-a")])
    assert res.isolation == {API: r.INGRESS}


# local endpoints and identities

def test_a_local_pod_the_api_shows_without_address_is_an_endpoint_by_the_cnis_word():
    pods = cluster() + [pod("fresh", labels={"app": "server"}), pod("old", labels={"app": "x"}, ip="10.244.1.50")]
    res = resolve([server_ingress()], pods, local={"10.244.1.40": "default/fresh", "10.244.1.50": "default/unknown"})
    assert res.isolation == {SERVER: r.INGRESS, "10.244.1.40": r.INGRESS}
    assert res.ipcache["10.244.1.40/32"] == res.ipcache[f"{SERVER}/32"]
    assert "10.244.1.50/32" not in res.ipcache       # the CNI gave it to a pod the API does not show yet


def test_a_pod_whose_labels_change_gets_another_identity_and_the_old_one_stays_until_released():
    identities = r.Identities()
    before = resolve([], identities=identities)
    pods = cluster()
    pods[0]["metadata"]["labels"] = {"app": "client", "version": "2"}
    after = resolve([server_ingress({"from": [{"podSelector": {"matchLabels": {"version": "2"}}}]})], pods,
                    identities=identities)
    old, new = before.ipcache[f"{CLIENT}/32"], after.ipcache[f"{CLIENT}/32"]
    assert new != old and ingress(after, SERVER, CLIENT) and not ingress(after, SERVER, REMOTE)
    assert old in identities.ids.values()
    freed = identities.release_unused(after.keys)
    assert list(freed.values()) == [old] and old not in identities.ids.values()
    assert resolve([], identities=identities).ipcache[f"{REMOTE}/32"] == after.ipcache[f"{REMOTE}/32"]


def test_identities_are_stable_across_save_and_load_and_deterministic(tmp_path):
    path = str(tmp_path / "identities.json")
    assert r.Identities.load(path).ids == {}                 # no file yet
    first = r.Identities()
    res = resolve([server_ingress({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]})], identities=first)
    first.save(path)
    loaded = r.Identities.load(path)
    assert loaded.ids == first.ids
    again = resolve([server_ingress({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]})], identities=loaded)
    assert again.ipcache == res.ipcache and again.cidrs == res.cidrs and again.entries == res.entries
    assert resolve([server_ingress({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]})]).ipcache == res.ipcache
    # a released number is not given again at once: the next key takes the one after the last given
    server = r.Identities.pod_key("default", (("app", "server"),))
    [freed] = loaded.release_unused(set(loaded.ids) - {server}).values()
    new = loaded.get(r.Identities.pod_key("x", (("a", "b"),)))
    assert new != freed and new == max(res.ipcache.values()) + 1
    assert loaded.get(r.Identities.cidr_key("10.1.0.0/16")) == res.cidrs["10.0.0.0/8"] + 1


def test_identity_file_that_is_not_one_is_refused_naming_it(tmp_path):
    path = tmp_path / "identities.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="identity file .*identities.json"):
        r.Identities.load(str(path))
    path.write_text(json.dumps({"ids": {"pod:a:": 7}, "last": {}}))
    with pytest.raises(ValueError, match="'pod:a:': 7 is outside 256-"):
        r.Identities.load(str(path))


# refusals

@pytest.mark.parametrize("rule,bad", [
    ({"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}, "'10.0.0.300/8' is not a CIDR"),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}, "'10.0.0.0' is not a CIDR"),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]},
     "except[0]: '11.0.0.0/16' is not strictly inside cidr '10.0.0.0/8'"),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}, "'10.0.0.0/8' is not strictly"),
    ({"ports": [{"endPort": 90}]}, "endPort: 90 needs a numeric port"),
    ({"ports": [{"port": "http", "endPort": 90}]}, "endPort: 90 needs a numeric port"),
    ({"ports": [{"port": 100, "endPort": 90}]}, "endPort: 90 needs a numeric port no higher"),
    ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "protocol: 'ICMP' is not TCP, UDP or SCTP"),
    ({"ports": [{"port": 70000}]}, "port: 70000 is not a port"),
    ({"ports": [{"port": "80"}]}, "port: '80' is not a port name"),
    ({"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}}]},
     "operator: 'Equals' is not one of In, NotIn, Exists, DoesNotExist"),
    ({"from": [{"namespaceSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}]},
     "values: [] with operator In"),
    ({"from": [{"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}]}, "ipBlock may not be combined"),
    ({"from": [{}]}, "names no podSelector, namespaceSelector or ipBlock"),
])
def test_a_bad_rule_is_refused_naming_policy_and_value_and_allows_nothing(rule, bad):
    good = {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}
    with pytest.raises(m.PolicyError) as refused:
        m.policy_from_api(server_ingress(good, rule))
    assert str(refused.value).startswith("networkpolicy default/server-in: spec.ingress[1].")
    assert bad in str(refused.value)
    fail_closed = refused.value.policy
    assert fail_closed.ingress[0] == m.Rule((m.Peer(m.Selector((("app", "client"),), ()), None, "", ()),), ())
    assert fail_closed.ingress[1].error and fail_closed.error == str(refused.value)
    pods = {f"{p.namespace}/{p.name}": p for p in map(m.pod_from_api, cluster())}
    nss = {n.name: n for n in map(m.namespace_from_api, NAMESPACES)}
    res = r.resolve(pods, nss, {"default/server-in": fail_closed}, NODES, "node1", {}, r.Identities())
    assert res.isolation == {SERVER: r.INGRESS}
    assert ingress(res, SERVER, CLIENT) and not ingress(res, SERVER, OUTSIDE) and not ingress(res, SERVER, API)


def test_a_bad_pod_selector_or_policy_type_fails_closed():
    bad_selector = {"matchExpressions": [{"key": "app", "operator": "Equal", "values": ["server"]}]}
    with pytest.raises(m.PolicyError, match=r"default/p: spec.podSelector.matchExpressions\[0\].operator: 'Equal'") \
            as refused:
        m.policy_from_api(policy("p", {"podSelector": bad_selector, "ingress": [{}]}))
    assert refused.value.policy.pod_selector == m.EVERYTHING and refused.value.policy.ingress == ()
    with pytest.raises(m.PolicyError, match="spec.policyTypes: 'ingress' is not Ingress or Egress") as refused:
        m.policy_from_api(policy("p", {"podSelector": {}, "policyTypes": ["ingress"]}))
    assert refused.value.policy.types == {r.INGRESS, r.EGRESS}


def test_ipv6_ip_block_is_accepted_and_matches_no_ipv4_address():
    res = resolve([server_ingress({"from": [{"ipBlock": {"cidr": "fd00::/8"}}]})])
    assert res.isolation == {SERVER: r.INGRESS} and res.entries == frozenset() and res.cidrs == {}


# explain

def test_explain_shows_selectors_identities_pods_and_ports():
    res = resolve([server_ingress({"from": [{"podSelector": {"matchLabels": {"app": "client"}},
                                             "namespaceSelector": {"matchLabels": {"team": "b"}}},
                                            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.2.0/24"]}}],
                                   "ports": [{"port": 80, "endPort": 81}, {"port": "http"}]})])
    out = res.explain("default/server")
    json.dumps(out)                                          # what `sluice policy POD` prints
    assert out["identity"] == res.ipcache[f"{SERVER}/32"] and out["labels"] == {"app": "server"}
    assert out["isolated"] == ["ingress"] and out["egress"] == [] and out["ips"] == [SERVER]
    [explained] = out["ingress"]
    assert explained["policy"] == "default/server-in"
    [rule] = explained["rules"]
    pods_peer, block_peer = rule["peers"]
    assert pods_peer["peer"] == {"podSelector": "app=client", "namespaceSelector": "team=b"}
    assert pods_peer["identities"] == [res.ipcache[f"{B_CLIENT}/32"]]
    assert pods_peer["pods"] == [{"pod": "team-b/client", "ips": [B_CLIENT]}]
    assert block_peer["peer"] == {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.2.0/24"]}}
    assert block_peer["prefixes"] == ["10.0.0.0/8"] and block_peer["identities"] == [res.cidrs["10.0.0.0/8"]]
    assert rule["ports"] == [{"port": {"protocol": "TCP", "port": 80, "endPort": 81},
                              "resolved": [{"proto": TCP, "port": 80, "port_bits": 15}]},
                             {"port": {"protocol": "TCP", "port": "http"},
                              "resolved": [{"proto": TCP, "port": 8080, "port_bits": 16}]}]


def test_explain_a_pod_no_policy_selects_says_so():
    out = resolve([server_ingress()]).explain("default/client")
    assert out["isolated"] == [] and out["ingress"] == [] and "no NetworkPolicy selects" in out["note"]
    assert "not an endpoint of node node1" in resolve([]).explain("default/remote")["note"]
    assert "error" in resolve([]).explain("default/nobody")


# scale

def test_a_thousand_policies_over_a_thousand_pods_resolve():
    pods = [pod(f"p{i}", f"ns{i % 20}", {"app": f"app{i % 50}", "tier": f"t{i % 7}"},
                ip=f"10.244.{i // 250}.{i % 250 + 1}", node="node1" if i % 10 == 0 else "node2",
                ports=[("http", 8000 + i % 3, "TCP")]) for i in range(1000)]
    namespaces = [namespace(f"ns{i}", team=f"team{i % 4}") for i in range(20)]
    policies = [policy(f"pol{i}", {
        "podSelector": {"matchLabels": {"app": f"app{i % 50}"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                     "values": [f"t{i % 7}", f"t{(i + 1) % 7}"]}]},
                               "namespaceSelector": {"matchLabels": {"team": f"team{i % 4}"}}},
                              {"ipBlock": {"cidr": f"172.{16 + i % 16}.0.0/16",
                                           "except": [f"172.{16 + i % 16}.{i % 256}.0/24"]}}],
                     "ports": [{"port": 80 + i % 10}, {"port": "http"}]}],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": f"team{i % 4}"}},
                            "podSelector": {"matchLabels": {"tier": f"t{i % 7}"}}}],
                    "ports": [{"port": 30000, "endPort": 30000 + i % 100}]},
                   {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app0"}}}],
                    "ports": [{"port": 53, "protocol": "UDP"}]}]},
        ns=f"ns{i % 20}") for i in range(1000)]
    res = resolve(policies, pods, namespaces)
    assert len(res.ipcache) == 1000 + 2 and len(res.isolation) == 100 and res.entries
