"""Desired state: validation errors name the bad value; plans are exact; apply converges."""

import copy
import json
import os

import pytest

from conftest import BPF_BUILD
from lib import netns
from sluice import maps as m
from sluice import netlink
from sluice.datapath import Datapath
from sluice.state import ROUTE_PROTO, DesiredState, Reconciler, StateError

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
]


@pytest.mark.parametrize("path,value,expected", BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD])
def test_invalid_state_names_the_bad_value(path, value, expected):
    with pytest.raises(StateError, match=expected.replace(".", r"\.").replace("/", "/")):
        DesiredState.parse(with_change(path, value))


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
    assert cur["services"][("10.96.0.10", 80, "tcp")] == (("10.244.1.5", 8080, "tcp"), ("10.244.2.7", 8080, "tcp"))
    assert cur["lb_vips"][("192.168.90.200", 80, "tcp")] == (("10.244.1.5", 8080, "tcp"),)
    assert cur["prefilter"] == {"203.0.113.0/24"}
    # the backend shared by a service and an LB VIP exists once
    assert sorted(cur["backends"].values()) == [("10.244.1.5", 8080, "tcp"), ("10.244.2.7", 8080, "tcp")]


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
    assert cur["backends"] == {2: ("10.244.2.7", 8080, "tcp")}  # the unused backend is gone
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


def test_missing_nic_is_named(node):
    dp, _ns = node
    with pytest.raises(StateError, match="'sl-missing'"):
        Reconciler(dp).plan(DesiredState.parse(with_change("node.nic", "sl-missing")))
