"""Desired state: validation errors name the bad value; plans are exact; apply converges."""

import copy
import ctypes
import dataclasses
import json
import os
import random
import re
import sys

import pytest

from conftest import BPF_BUILD
from lib import netns
from sluice import maps as m
from sluice import netlink
from sluice.bpf import libbpf as lb
from sluice.datapath import Datapath
from sluice.state import ROUTE_PROTO, DesiredState, Reconciler, StateError
from sluice.state.sources import ApiFrontends, merge

BASE = {
    "node": {"name": "node1", "ip": "192.168.90.11", "nic": "sleth0", "pod_cidr": "10.244.1.0/24"},
    "routing": {"mode": "native"},
    "routes": [{"cidr": "10.244.2.0/24", "nexthop": "192.168.90.12", "node": "node2"}],
    "services": [{"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "tcp",
                  "backends": [{"ip": "10.244.1.5", "port": 8080}, {"ip": "10.244.2.7", "port": 8080}]}],
    "prefilter": ["203.0.113.0/24"],
    "lb_vips": [{"name": "ext", "vip": "192.168.90.200", "port": 80, "protocol": "tcp",
                 "backends": [{"ip": "10.244.1.5", "port": 8080}]}],
}


def with_change(path: str, value):
    """BASE with one value replaced; path like 'services.0.port'."""
    state = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    target = state
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    target[int(last) if last.isdigit() else last] = value
    return state


BAD = [
    ("node.pod_cidr", "10.244.1.0/33", "10.244.1.0/33"),
    ("node.pod_cidr", "10.244.1.1/24", "host bits"),
    ("node.ip", "192.168.90.300", "192.168.90.300"),
    ("routes.0.cidr", "10.244.1.128/25", "overlaps 10.244.1.0/24"),
    ("routes.0.nexthop", "nexthop-2", "nexthop-2"),
    ("routing.mode", "geneve", "geneve"),
    ("services.0.port", 70000, "70000"),
    ("services.0.protocol", "sctp", "sctp"),
    ("services.0.backends.0", {"ip": "10.244.1.5"}, "needs an ip and a port"),
    ("prefilter.0", "203.0.113.0/99", "203.0.113.0/99"),
    ("services.0.affinity_timeout", 86401, "services[0] (web): affinity_timeout 86401 is not an integer in 1..86400"),
    ("services.0.affinity_timeout", -1, "services[0] (web): affinity_timeout -1 is not"),
    ("services.0.affinity_timeout", "60", "services[0] (web): affinity_timeout '60' is not"),
    ("services.0.affinity_timeout", True, "services[0] (web): affinity_timeout True is not"),
    ("services.0.affinity_timeout", 1.5, "services[0] (web): affinity_timeout 1.5 is not"),
    ("lb_vips.0.affinity_timeout", 86401, "lb_vips[0] (ext): affinity_timeout 86401 is not an integer"),
    ("lb_vips.0.keep_source", "yes", "lb_vips[0] (ext): keep_source 'yes' is not true or false"),
    ("services.0.keep_source", True, "services[0] (web): keep_source is for lb_vips (the XDP LB) only"),
    ("failsafe", ["tcp:22", "sctp:9"], "failsafe[1]: 'sctp:9' is not PROTOCOL:PORT or PROTOCOL:FIRST-LAST"),
    ("failsafe", ["tcp:22-21"], "failsafe[0]: 'tcp:22-21' is not PROTOCOL:PORT"),
    ("failsafe", ["udp:0"], "failsafe[0]: 'udp:0' is not"),
    ("failsafe", ["tcp:1000-1100"], "failsafe[0]: 'tcp:1000-1100' makes more than 64 ports"),
    ("failsafe", "tcp:22", "failsafe: expected a list of 'PROTOCOL:PORT' entries, not 'tcp:22'"),
]


@pytest.mark.parametrize("path,value,expected", BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD])
def test_invalid_state_names_the_bad_value(path, value, expected):
    with pytest.raises(StateError, match=re.escape(expected)):
        DesiredState.parse(with_change(path, value))


@pytest.mark.parametrize("value,expected", [(1, 1), (10800, 10800), (86400, 86400), (0, None), ("absent", None)])
def test_affinity_timeout_parses(value, expected):
    raw = copy.deepcopy(BASE)
    if value != "absent":
        raw["services"][0]["affinity_timeout"] = value
    state = DesiredState.parse(raw)
    assert state.affinity == ({("10.96.0.10", 80, "tcp"): expected} if expected else {})


def test_duplicate_service_frontend_rejected():
    state = copy.deepcopy(BASE)
    state["services"].append(dict(state["services"][0], name="web2"))
    with pytest.raises(StateError, match=r"duplicate frontend 10\.96\.0\.10:80/tcp"):
        DesiredState.parse(state)


def test_bad_json_file_is_named(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text('{"node": ')
    with pytest.raises(StateError, match=str(bad)):
        DesiredState.from_file(str(bad))


@pytest.fixture
def node(pin_root):
    """A loaded datapath and a namespace holding the node's NIC (sleth0)."""
    dp = Datapath(pin_root, BPF_BUILD)
    dp.load()
    with netns.namespaces("node") as (ns,):
        netns.ns_exec(ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        netns.ns_exec(ns, "ip", "addr", "add", "192.168.90.11/24", "dev", "sleth0")
        netns.ns_exec(ns, "ip", "link", "set", "sleth0", "up")
        netns.ns_exec(ns, "ip", "link", "set", "sleth1", "up")
        with netns.entered(ns):
            yield dp, ns
    dp.remove()


def kernel_routes(ns):
    out = netns.ns_exec(ns, "ip", "-j", "route", "show", "proto", str(ROUTE_PROTO)).stdout
    return {r["dst"]: r.get("gateway") for r in json.loads(out)}


def test_apply_converges_and_second_plan_is_empty(node):
    dp, ns = node
    rec = Reconciler(dp)
    state = DesiredState.parse(BASE)
    plan = rec.plan(state)
    assert plan.to_dict()["routes"]["add"] == [{"cidr": "10.244.2.0/24", "nexthop": "192.168.90.12", "mode": "native"}]
    assert plan.to_dict()["services"]["add"][0]["frontend"] == "10.96.0.10:80/tcp"
    rec.apply(state)
    assert not rec.plan(state).changed
    with dp.open_map(m.RoutesMap) as rm:
        route = rm.items()["10.244.2.0/24"]
    assert (route.nexthop, route.tunnel) == ("192.168.90.12", False)
    assert kernel_routes(ns) == {"10.244.2.0/24": "192.168.90.12"}
    cur = rec.current()
    assert cur.services[("10.96.0.10", 80, "tcp")] == (("10.244.1.5", 8080, "tcp"), ("10.244.2.7", 8080, "tcp"))
    assert cur.lb_vips[("192.168.90.200", 80, "tcp")] == (("10.244.1.5", 8080, "tcp"),)
    assert cur.prefilter == {"203.0.113.0/24"}
    # the backend shared by a service and an LB VIP exists once
    assert sorted(cur.backends.values()) == [("10.244.1.5", 8080, "tcp"), ("10.244.2.7", 8080, "tcp")]


def test_changes_and_removals_are_planned_exactly_and_applied(node):
    dp, ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    new = copy.deepcopy(BASE)
    new["services"][0]["backends"] = [{"ip": "10.244.2.7", "port": 8080}]
    new["routes"] = []
    new["prefilter"] = ["198.51.100.0/24"]
    new["lb_vips"] = []
    plan = rec.plan(DesiredState.parse(new)).to_dict()
    assert plan == {
        "routes": {"add": [], "change": [], "remove": [{"cidr": "10.244.2.0/24"}]},
        "services": {"add": [], "change": [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.2.7:8080"],
                                            "was": ["10.244.1.5:8080", "10.244.2.7:8080"]}], "remove": []},
        "lb_vips": {"add": [], "change": [], "remove": [{"frontend": "192.168.90.200:80/tcp"}]},
        "prefilter": {"add": ["198.51.100.0/24"], "change": [], "remove": ["203.0.113.0/24"]},
    }
    rec.apply(DesiredState.parse(new))
    assert not rec.plan(DesiredState.parse(new)).changed
    assert kernel_routes(ns) == {}
    cur = rec.current()
    assert cur.backends == {2: ("10.244.2.7", 8080, "tcp")}  # the unused backend is gone
    with dp.open_map(m.ServicesMap) as sm:
        assert len(sm) == 2  # master + one slot: the stale slot was removed


def test_switching_to_vxlan_and_back_adds_and_removes_the_tunnel_device(node):
    dp, ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    vxlan = DesiredState.parse(dict(BASE, routing={"mode": "vxlan", "vxlan_device": "slvx0", "vni": 7}))
    plan = rec.plan(vxlan).to_dict()
    assert plan["tunnel"] == {"add": [{"device": "slvx0", "port": 4789}], "change": [], "remove": []}
    assert not netlink.exists("slvx0")   # planning changes nothing

    rec.apply(vxlan)
    assert not rec.plan(vxlan).changed
    with dp.open_map(m.RoutesMap) as rm:
        route = rm.items()["10.244.2.0/24"]
    assert route.tunnel and route.vni == 7 and route.ifindex == netns.ifindex(ns, "slvx0")
    out = netns.ns_exec(ns, "ip", "route", "show", "proto", str(ROUTE_PROTO)).stdout
    assert "encap ip id 7" in out and "dst 192.168.90.12" in out and "dev slvx0" in out
    details = json.loads(netns.ns_exec(ns, "ip", "-d", "-j", "link", "show", "slvx0").stdout)[0]
    assert details["linkinfo"]["info_data"]["external"] is True
    assert os.path.exists(os.path.join(dp.links_dir, "slvx0", "tc_from_nic"))

    native = DesiredState.parse(dict(BASE, routing={"mode": "native", "vxlan_device": "slvx0"}))
    assert rec.plan(native).to_dict()["tunnel"]["remove"] == [{"device": "slvx0"}]
    rec.apply(native)
    assert not rec.plan(native).changed
    assert not netlink.exists("slvx0")
    assert not os.path.exists(os.path.join(dp.links_dir, "slvx0"))
    assert kernel_routes(ns) == {"10.244.2.0/24": "192.168.90.12"}


def test_affinity_is_planned_applied_and_read_back(node):
    dp, _ns = node
    rec = Reconciler(dp)
    web = ("10.96.0.10", 80, "tcp")
    backends = ["10.244.1.5:8080", "10.244.2.7:8080"]
    state = DesiredState.parse(with_change("services.0.affinity_timeout", 10800))
    assert rec.plan(state).to_dict()["services"]["add"] == [
        {"frontend": "10.96.0.10:80/tcp", "backends": backends, "affinity_timeout": 10800}]
    rec.apply(state)
    assert not rec.plan(state).changed
    assert rec.current().affinity == {web: 10800}
    with dp.open_map(m.ServicesMap) as sm:
        svc = sm.get(*web)
        assert svc.affinity_timeout == 10800 and sm.items()[web] == svc
        master = sm.lookup(sm._key(*web, 0))  # pylint: disable=protected-access
        assert (master.flags, master.affinity_timeout) == (m.ServicesMap.AFFINITY, 10800)

    # the timeout alone changes: the service is a change, its backends as they were
    shorter = DesiredState.parse(with_change("services.0.affinity_timeout", 60))
    assert rec.plan(shorter).to_dict() == {"services": {"add": [], "change": [
        {"frontend": "10.96.0.10:80/tcp", "backends": backends, "was": backends, "affinity_timeout": 60}],
        "remove": []}}
    rec.apply(shorter)
    assert rec.current().affinity == {web: 60} and not rec.plan(shorter).changed

    # no affinity any more: shown as 0, and the master's flag is gone
    plain = DesiredState.parse(BASE)
    assert rec.plan(plain).to_dict()["services"]["change"] == [
        {"frontend": "10.96.0.10:80/tcp", "backends": backends, "was": backends, "affinity_timeout": 0}]
    rec.apply(plain)
    assert rec.current().affinity == {} and not rec.plan(plain).changed
    with dp.open_map(m.ServicesMap) as sm:
        assert sm.lookup(sm._key(*web, 0)).flags == 0  # pylint: disable=protected-access


def test_missing_nic_is_named(node):
    dp, _ns = node
    with pytest.raises(StateError, match="'sl-missing'"):
        Reconciler(dp).plan(DesiredState.parse(with_change("node.nic", "sl-missing")))


def test_a_route_over_a_network_of_the_nic_or_the_node_s_own_address_is_refused_naming_them(node):
    """A route to the controller's address (on the NIC's network) through a nexthop nobody has would take
    the node's answers to it: refused, in either routing mode, naming the route, the network and the NIC;
    so is a route holding the node's own address. Another node's pod CIDR passes (BASE); a Node's route
    from the API that would cut the node off is left out, named in the conflicts."""
    dp, _ns = node
    cut = [{"cidr": "192.168.90.1/32", "nexthop": "192.168.90.249"}]
    for mode in ("native", "vxlan"):
        state = DesiredState.parse(dict(with_change("routes", cut), routing={"mode": mode, "vxlan_device": "slvx0"}))
        with pytest.raises(StateError, match=r"^routes \(192\.168\.90\.1/32\): overlaps 192\.168\.90\.0/24, a "
                                             r"network directly connected to sleth0: this node's packets to the hosts "
                                             r"on it .* would follow the route via 192\.168\.90\.249 instead"):
            Reconciler(dp).plan(state)
    own = with_change("routes", [{"cidr": "10.250.0.0/16", "nexthop": "192.168.90.12"}])
    own["node"]["ip"] = "10.250.0.1"      # an address of the node elsewhere than on the NIC's network
    with pytest.raises(StateError, match=r"^routes \(10\.250\.0\.0/16\): holds this node's own address "
                                         r"10\.250\.0\.1: its pods' packets to the node"):
        Reconciler(dp).plan(DesiredState.parse(own))
    state = DesiredState.parse(BASE)
    api = ApiFrontends(routes={"192.168.90.128/25": "192.168.90.12", "10.244.3.0/24": "192.168.90.13"})
    merged, conflicts = merge(state, api, Reconciler.route_check(state))
    assert merged.routes == {"10.244.2.0/24": "192.168.90.12", "10.244.3.0/24": "192.168.90.13"}
    assert len(conflicts) == 1 and conflicts[0].startswith(
        "Node route 192.168.90.128/25 via 192.168.90.12: overlaps 192.168.90.0/24, a network directly connected to "
        "sleth0"), conflicts
    Reconciler(dp).plan(merged)


# ---- batch reads ------------------------------------------------------------------------------

def _fill_every_map(dp):
    """Entries in every map the runtime reads back: hash maps, LPM tries, arrays."""
    with dp.open_map(m.BackendsMap) as bm, dp.open_map(m.ServicesMap) as sm, dp.open_map(m.LbVipsMap) as lm, \
            dp.open_map(m.RoutesMap) as rm, dp.open_map(m.PrefilterMap) as pm, dp.open_map(m.EndpointsMap) as em, \
            dp.open_map(m.ConfigMap) as cm:
        bm.put_many({i: m.Backend(f"10.250.{i // 250}.{i % 250 + 1}", 8000 + i % 7, ("tcp", "udp")[i % 2])
                     for i in range(1, 3001)})
        for s in range(500):
            sm.put(f"10.96.{s // 250}.{s % 250 + 1}", 80 + s % 3, "tcp", m.Service(s + 1, tuple(range(s * 5 + 1, s * 5 + 6))))
        for v in range(5):
            lm.put(f"192.168.90.{200 + v}", 443, "tcp", {i: m.Backend(f"10.250.0.{i}", 8443) for i in range(1, v + 2)})
        for r in range(40):
            rm.put(f"10.{100 + r}.0.0/16", m.Route(f"192.168.90.{r + 2}", 7, r % 2 == 0, r))
        pm.put_many({f"198.{18 + r // 256}.{r % 256}.0/24": r + 1 for r in range(700)} | {"0.0.0.0/0": 9, "203.0.113.7/32": 5})
        for e in range(300):
            em.put(f"10.244.{e // 250}.{e % 250 + 1}", m.Endpoint(e + 2, "02:00:00:00:00:01", "02:00:00:00:01:02", e % 2))
        cm.set("192.168.90.11", 3, 2)


# The entries _fill_every_map puts in each map, counted from what it writes: a service is a master entry and one
# slot per backend. Arrays and the cpumap instead hold a key for every index, set or not (max_entries).
FILLED = {m.BackendsMap: 3000, m.ServicesMap: 500 * (1 + 5), m.LbVipsMap: 5, m.RoutesMap: 40, m.PrefilterMap: 700 + 2,
          m.EndpointsMap: 300, m.SockHash: 0}


def _iterated(mp) -> tuple[bytes, ...]:
    return tuple(sorted(bytes(k) + bytes(v) for k, v in mp._iter_items()))  # pylint: disable=protected-access


def _dumped(dump: tuple[bytes, bytes, int], ksize: int, vsize: int) -> tuple[bytes, ...]:
    keys, values, count = dump
    assert len(keys) == count * ksize and len(values) == count * vsize
    return tuple(sorted(keys[i * ksize:(i + 1) * ksize] + values[i * vsize:(i + 1) * vsize] for i in range(count)))


@pytest.mark.parametrize("cls", [m.BackendsMap, m.ServicesMap, m.LbVipsMap, m.RoutesMap, m.PrefilterMap, m.EndpointsMap,
                                 m.ConfigMap, m.CpuMap, m.SockHash], ids=lambda c: c.name)
def test_batch_reads_return_exactly_what_iteration_returns(node, monkeypatch, cls):
    """dump() (BPF_MAP_LOOKUP_BATCH where the kernel has it for the map type) holds the entries that
    BPF_MAP_GET_NEXT_KEY + lookup find, in any chunk size; a kernel answering ENOTSUPP gets iteration."""
    dp, _ns = node
    _fill_every_map(dp)
    with dp.open_map(cls) as mp:
        ksize, vsize = ctypes.sizeof(mp.key_type), ctypes.sizeof(mp.value_type)
        expected = _iterated(mp)
        assert _dumped(mp.dump(), ksize, vsize) == expected
        filled = FILLED.get(cls, mp.max_entries)
        assert len(mp) == filled
        assert tuple(sorted(bytes(k) + bytes(v) for k, v in mp.raw_items())) == expected
        try:
            # a tiny chunk: many calls, and hash buckets holding more than fit (ENOSPC, retried larger)
            assert _dumped(lb.map_lookup_batch(mp.fd, ksize, vsize, 1), ksize, vsize) == expected
        except lb.BpfError as e:
            assert e.errno in m.BATCH_UNSUPPORTED and cls in (m.CpuMap, m.SockHash), e
        typed = mp.items() if hasattr(mp, "items") else None

        def unsupported(*args):
            raise lb.BpfError(524, "batch lookup: Unknown error 524")

        monkeypatch.setattr(lb, "map_lookup_batch", unsupported)
        assert _dumped(mp.dump(), ksize, vsize) == expected
        assert len(mp) == filled
        if typed is not None:
            assert mp.items() == typed
    if cls is m.ServicesMap:
        assert len(typed) == 500 and typed[("10.96.0.2", 81, "tcp")] == m.Service(2, (6, 7, 8, 9, 10))
    if cls is m.PrefilterMap:
        assert len(typed) == 702 and typed["0.0.0.0/0"] == 9


def test_current_reads_every_map_once_and_decodes_like_the_typed_getters(node):
    dp, _ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    cur = rec.current()
    with dp.open_map(m.BackendsMap) as bm, dp.open_map(m.ServicesMap) as sm, dp.open_map(m.LbVipsMap) as lm:
        backends = {i: (b.ip, b.port, b.proto) for i, b in bm.items().items()}
        assert cur.backends == backends
        for i, b in cur.backends.items():
            assert bm.get(i) == b
        for fe, svc in sm.items().items():
            assert sm.get(*fe) == svc
            assert cur.services[fe] == tuple(backends[i] for i in svc.backend_ids)
        for fe, (count, table, options) in lm.tables().items():
            assert (count, table, options) == (lm.items()[fe], lm.table(*fe), lm.entry(*fe)[2])


# ---- the agent's path: update() applies the delta from the state applied last ------------------------

def _random_state(rnd: random.Random, pool: list[dict]) -> dict:
    """BASE with a random subset of services and LB VIPs (backends drawn from a small shared pool, so that
    backends come and go and are shared between frontends) and a random prefilter."""
    state = copy.deepcopy(BASE)
    state["services"] = [{"vip": f"10.96.1.{i}", "port": 80 + i % 2, "protocol": ("tcp", "udp")[i % 3 == 0],
                          "backends": rnd.sample(pool, rnd.randint(0, 4))}
                         for i in range(1, 40) if rnd.random() < 0.7]
    state["lb_vips"] = [{"vip": f"192.168.90.{200 + i}", "port": 443, "protocol": "tcp",
                         "backends": rnd.sample(pool, rnd.randint(1, 3)), "keep_source": rnd.random() < 0.3,
                         "affinity_timeout": rnd.choice((0, 0, 30, 60))} for i in range(6) if rnd.random() < 0.6]
    state["prefilter"] = [f"198.51.{i}.0/24" for i in range(12) if rnd.random() < 0.5]
    for s in state["services"]:
        if s["protocol"] == "udp":
            s["backends"] = [dict(b, port=53) for b in s["backends"]]
    return state


def test_update_plans_and_writes_exactly_what_a_full_apply_would(node):
    """A run of random state changes applied as deltas: each plan equals the plan a fresh Reconciler
    computes against the live maps beforehand, and afterwards the maps are in sync (empty full plan)."""
    dp, _ns = node
    rnd = random.Random(1473)
    pool = [{"ip": f"10.244.{k}.{j}", "port": 8080} for k in (1, 2) for j in range(2, 9)]
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    kinds = set()
    for _step in range(25):
        state = DesiredState.parse(_random_state(rnd, pool))
        expected = Reconciler(dp).plan(state).to_dict()
        assert rec.update(state).to_dict() == expected
        assert rec.last_kind == "delta"
        kinds.update(expected)
        assert not Reconciler(dp).plan(state).changed
        cur = rec.current()
        in_use = {b for bs in (*state.services.values(), *state.lb_vips.values()) for b in bs}
        assert set(cur.backends.values()) == in_use, "exactly the backends in use"
    assert kinds == {"services", "lb_vips", "prefilter"}
    assert rec.update(state).to_dict() == {}   # the same state again: nothing to do


def test_update_of_affinity_plans_as_a_full_apply_would(node):
    """Affinity set, changed, kept over a change of backends, and dropped: each a delta whose plan equals
    the full plan; a service whose backends and affinity are unchanged is not rewritten."""
    dp, _ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    other = {"name": "dns", "vip": "10.96.0.11", "port": 53, "protocol": "udp",
             "backends": [{"ip": "10.244.1.5", "port": 53}]}
    steps = []
    for timeout, web_backends in ((30, 2), (90, 2), (90, 1), (0, 1)):
        raw = copy.deepcopy(BASE)
        raw["services"][0]["backends"] = raw["services"][0]["backends"][:web_backends]
        raw["services"][0]["affinity_timeout"] = timeout
        raw["services"].append(dict(other, affinity_timeout=45))
        state = DesiredState.parse(raw)
        expected = Reconciler(dp).plan(state).to_dict()
        assert rec.update(state).to_dict() == expected
        assert rec.last_kind == "delta"
        assert not Reconciler(dp).plan(state).changed
        assert rec.current().affinity == state.affinity
        steps.append(expected["services"])
    dns = {"frontend": "10.96.0.11:53/udp", "backends": ["10.244.1.5:53"], "affinity_timeout": 45}
    assert steps[0]["add"] == [dns] and steps[0]["change"][0]["affinity_timeout"] == 30
    assert [s["change"] for s in steps[1:]] == [
        [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.1.5:8080", "10.244.2.7:8080"],
          "was": ["10.244.1.5:8080", "10.244.2.7:8080"], "affinity_timeout": 90}],
        [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.1.5:8080"],
          "was": ["10.244.1.5:8080", "10.244.2.7:8080"], "affinity_timeout": 90}],
        [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.1.5:8080"], "was": ["10.244.1.5:8080"],
          "affinity_timeout": 0}]]
    # affinity given to a DesiredState built in code (not parsed), as the Kubernetes source may
    state = dataclasses.replace(state, affinity={**state.affinity, ("10.96.0.10", 80, "tcp"): 5})
    expected = Reconciler(dp).plan(state).to_dict()
    assert rec.update(state).to_dict() == expected == {"services": {"add": [], "change": [
        {"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.1.5:8080"], "was": ["10.244.1.5:8080"],
         "affinity_timeout": 5}], "remove": []}}
    assert rec.last_kind == "delta" and not Reconciler(dp).plan(state).changed


def test_update_with_other_sections_changed_is_a_full_apply(node):
    dp, ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    assert rec.update(DesiredState.parse(with_change("routes", []))).to_dict()["routes"]["remove"] == \
        [{"cidr": "10.244.2.0/24"}]
    assert rec.last_kind == "full" and kernel_routes(ns) == {}
    assert Reconciler(dp).update(DesiredState.parse(BASE)).changed  # no earlier apply: full
    assert rec.last_kind == "full"


@pytest.mark.parametrize("drift", ["service-changed", "service-affinity-changed", "service-deleted", "backend-id-taken",
                                   "lb-vip-deleted", "prefilter-added", "prefilter-deleted"])
def test_update_finding_an_entry_changed_behind_its_back_reconciles_in_full(node, drift):
    """Before changing an entry, update() checks that it holds what the last apply left there; if not
    (someone wrote the maps: another tool, `sluice apply`, the Ansible module), it applies in full, so
    the drift is repaired, this entry and every other one."""
    dp, _ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    new = copy.deepcopy(BASE)
    new["services"][0]["backends"].append({"ip": "10.244.2.9", "port": 8080})
    new["services"].append({"vip": "10.96.0.11", "port": 53, "protocol": "udp", "backends": []})
    new["lb_vips"][0]["backends"] = [{"ip": "10.244.2.7", "port": 8080}]
    new["prefilter"] = ["198.51.100.0/24"]
    with dp.open_map(m.ServicesMap) as sm, dp.open_map(m.BackendsMap) as bm, dp.open_map(m.LbVipsMap) as lm, \
            dp.open_map(m.PrefilterMap) as pm:
        if drift == "service-changed":
            sm.put("10.96.0.10", 80, "tcp", m.Service(1, (2,)))
        elif drift == "service-affinity-changed":
            sm.put("10.96.0.10", 80, "tcp", m.Service(1, (1, 2), 99))
        elif drift == "service-deleted":
            sm.delete("10.96.0.10", 80, "tcp")
        elif drift == "backend-id-taken":
            bm.put(rec.applied.next_backend, m.Backend("10.9.9.9", 1))
        elif drift == "lb-vip-deleted":
            lm.delete("192.168.90.200", 80, "tcp")
        elif drift == "prefilter-added":
            pm.put("198.51.100.0/24", 7)
        else:
            pm.delete("203.0.113.0/24")
        # and drift elsewhere, in an entry the delta does not touch: a full apply repairs it too
        sm.put("10.96.9.9", 9, "tcp", m.Service(99, (1,)))
    state = DesiredState.parse(new)
    expected = Reconciler(dp).plan(state).to_dict()
    assert rec.update(state).to_dict() == expected
    assert rec.last_kind == "full"
    assert {"frontend": "10.96.9.9:9/tcp"} in expected["services"]["remove"]
    assert not Reconciler(dp).plan(state).changed
    # and the next change is a delta again
    new["prefilter"] = []
    assert rec.update(DesiredState.parse(new)).to_dict() == {"prefilter": {"add": [], "change": [],
                                                                           "remove": ["198.51.100.0/24"]}}
    assert rec.last_kind == "delta"


def test_a_failed_update_leaves_the_next_one_to_a_full_apply(node, monkeypatch):
    dp, _ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    new = with_change("services.0.backends", [{"ip": "10.244.2.8", "port": 8080}])

    def broken(*args, **kwargs):
        raise lb.BpfError(7, "update sl_services: Argument list too long")

    monkeypatch.setattr(m.ServicesMap, "put", broken)
    with pytest.raises(lb.BpfError):
        rec.update(DesiredState.parse(new))
    monkeypatch.undo()
    assert rec.applied is None
    rec.update(DesiredState.parse(new))
    assert rec.last_kind == "full" and not Reconciler(dp).plan(DesiredState.parse(new)).changed


# ---- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "1.2.3.04", "01.2.3.4", "1.2.3",
                                   "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n", "1.2.3.256", "1.2.3.4.5", "1..2.3",
                                   "١.2.3.4", "1.2.3.4\x00", "", "0x1.2.3.4", 167772161, None, 1.5, True])
def test_addresses_parse_as_ipaddress_says(value):
    """The parser's inet_pton fast path accepts exactly what ipaddress does, and writes it the same way."""
    import ipaddress

    state = with_change("services.0.backends.0.ip", value)
    try:
        want = str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        with pytest.raises(StateError, match=r"services\[0\] \(web\)\.backends\[0\]: .* is not an IPv4 address"):
            DesiredState.parse(state)
        return
    parsed = DesiredState.parse(state).services[("10.96.0.10", 80, "tcp")]
    assert parsed[0] == (want, 8080, "tcp") and type(parsed[0][0]) is str  # pylint: disable=unidiomatic-typecheck
    assert m.be32(want) == int.from_bytes(ipaddress.IPv4Address(want).packed, sys.byteorder)


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80", 80.0, None])
def test_bad_backend_ports_are_named(port):
    with pytest.raises(StateError, match=r"services\[0\] \(web\)\.backends\[1\]: port .* is not an integer"):
        DesiredState.parse(with_change("services.0.backends.1.port", port))


def test_failsafe_defaults_to_the_management_ports_and_follows_the_state(node):
    """A state without a failsafe gets the default (SSH, API, etcd, kubelet, DNS, DHCP); a list replaces it,
    in the plan and in the map, ranges expanded."""
    dp, _ns = node
    rec = Reconciler(dp)
    rec.apply(DesiredState.parse(BASE))
    assert rec.current().failsafe == {("tcp", 22), ("tcp", 6443), ("tcp", 2379), ("tcp", 2380), ("tcp", 10250),
                                      ("tcp", 53), ("udp", 53), ("udp", 67), ("udp", 68)}
    raw = dict(copy.deepcopy(BASE), failsafe=["tcp:2222", "udp:67-68"])
    plan = rec.update(DesiredState.parse(raw)).to_dict()
    assert plan["failsafe"]["add"] == ["tcp:2222"] and "tcp:22" in plan["failsafe"]["remove"]
    assert rec.current().failsafe == {("tcp", 2222), ("udp", 67), ("udp", 68)}
    assert not Reconciler(dp).plan(DesiredState.parse(raw)).changed
