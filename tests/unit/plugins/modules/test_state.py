"""sluice.network.state against a real datapath in a private pin root, the node NIC a veth in a `sltest-`
namespace (so the kernel routes it applies land there), the state file in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from ansible_collections.sluice.network.plugins.modules import state

from .utils import fail_module, run_module

from sluice import maps as m  # pylint: disable=wrong-import-order
from sluice import netlink  # pylint: disable=wrong-import-order
from sluice.state import ROUTE_PROTO, DesiredState, Reconciler  # pylint: disable=wrong-import-order

NODE = {"name": "node1", "ip": "192.168.93.11", "nic": "sleth0", "pod_cidr": "10.244.1.0/24"}
ROUTES = [{"cidr": "10.244.2.0/24", "nexthop": "192.168.93.12", "node": "node2"}]
SERVICES = [{"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "tcp",
             "backends": [{"ip": "10.244.1.5", "port": 8080}, {"ip": "10.244.2.7", "port": 8080}]}]
PREFILTER = ["203.0.113.0/24"]
PREVIOUS = '{"previous": "content"}\n'


@pytest.fixture
def node(netns, loaded):
    """The loaded datapath; sleth0 (the node NIC) addressed so the other node's IP is a reachable gateway."""
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ip", "addr", "add", f"{NODE['ip']}/24", "dev", "sleth0"],
                   check=True, capture_output=True)
    return loaded


def args(dp, path, **kw):
    a = {"path": str(path), "node": dict(NODE), "routes": list(ROUTES), "services": list(SERVICES),
         "prefilter": list(PREFILTER), "pin_root": dp.root, "obj_dir": dp.obj_dir}
    a.update(kw)
    return a


def document(a):
    """The state file the module writes for args `a` (the options as given, defaults filled in)."""
    def frontend(s, **defaults):
        return dict({"protocol": "tcp", "backends": []}, **defaults, **s)

    return {"node": a["node"], "routes": a["routes"], "services": [frontend(s) for s in a["services"]],
            "prefilter": a["prefilter"], "lb_vips": [frontend(s, keep_source=False) for s in a.get("lb_vips", [])]}


def maps_now(dp):
    """What the maps hold (routes, services, prefilter...), to show a task left them alone."""
    cur = Reconciler(dp).current()
    return {k: getattr(cur, k) for k in ("routes", "services", "lb_vips", "prefilter", "backends")}


def test_check_mode_writes_and_applies_nothing(node, tmp_path):
    path = tmp_path / "etc" / "state.json"
    a = args(node, path)
    empty = maps_now(node)
    result = run_module(state, a, check_mode=True, diff=True)
    assert result["changed"] is True and result["file_changed"] is True and result["applied"] is False
    assert result["plan"]["routes"]["add"] == [{"cidr": "10.244.2.0/24", "nexthop": "192.168.93.12", "mode": "native"}]
    assert result["plan"]["services"]["add"] == [{"frontend": "10.96.0.10:80/tcp",
                                                  "backends": ["10.244.1.5:8080", "10.244.2.7:8080"]}]
    assert result["plan"]["prefilter"]["add"] == PREFILTER
    assert "+ cidr=10.244.2.0/24" in result["plan_text"]
    assert result["diff"]["before"] == "" and json.loads(result["diff"]["after"]) == document(a)
    assert result["diff"]["before_header"] == result["diff"]["after_header"] == str(path)
    assert not os.path.exists(path.parent)
    assert maps_now(node) == empty and netlink.owned_routes(ROUTE_PROTO) == {}


def test_apply_then_idempotent(node, tmp_path):
    path = tmp_path / "state.json"
    a = args(node, path)
    result = run_module(state, a, diff=True)
    assert result["changed"] is True and result["file_changed"] is True and result["applied"] is True
    assert set(result["plan"]) == {"routes", "services", "prefilter", "failsafe", "config"}
    assert path.read_text() == result["diff"]["after"] and json.loads(path.read_text()) == document(a)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not Reconciler(node).plan(DesiredState.from_file(str(path))).changed
    assert set(netlink.owned_routes(ROUTE_PROTO)) == {"10.244.2.0/24"}
    with node.open_map(m.PrefilterMap) as pm:
        assert set(pm.items()) == set(PREFILTER)

    check = run_module(state, a, check_mode=True, diff=True)
    assert check["changed"] is False and check["plan"] == {}
    again = run_module(state, a, diff=True)
    assert again["changed"] is False and again["file_changed"] is False and again["applied"] is False
    assert again["plan"] == {} and again["plan_text"] == "No changes: the datapath matches the state."
    assert again["diff"]["before"] == again["diff"]["after"] == path.read_text()


def test_change_is_planned_exactly_then_applied(node, tmp_path):
    path = tmp_path / "state.json"
    a = args(node, path)
    run_module(state, a)
    new = args(node, path, routes=[], prefilter=["198.51.100.0/24"],
               services=[dict(SERVICES[0], backends=[{"ip": "10.244.2.7", "port": 8080}])])
    check = run_module(state, new, check_mode=True, diff=True)
    assert check["changed"] is True and check["applied"] is False
    assert check["plan"] == {
        "routes": {"add": [], "change": [], "remove": [{"cidr": "10.244.2.0/24"}]},
        "services": {"add": [], "change": [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.2.7:8080"],
                                            "was": ["10.244.1.5:8080", "10.244.2.7:8080"]}], "remove": []},
        "prefilter": {"add": ["198.51.100.0/24"], "change": [], "remove": ["203.0.113.0/24"]},
    }
    assert json.loads(check["diff"]["before"]) == document(a) and json.loads(check["diff"]["after"]) == document(new)
    assert json.loads(path.read_text()) == document(a)
    result = run_module(state, new)
    assert result["changed"] is True and result["applied"] is True and result["plan"] == check["plan"]
    assert json.loads(path.read_text()) == document(new)
    assert netlink.owned_routes(ROUTE_PROTO) == {}
    assert run_module(state, new)["changed"] is False


def test_session_affinity_of_a_service_reaches_the_map_and_converges(node, tmp_path):
    a = args(node, tmp_path / "state.json", services=[dict(SERVICES[0], affinity_timeout=30)])
    result = run_module(state, a)
    assert result["changed"] is True and json.loads((tmp_path / "state.json").read_text())["services"][0][
        "affinity_timeout"] == 30
    with node.open_map(m.ServicesMap) as sm:
        assert sm.get("10.96.0.10", 80, "tcp").affinity_timeout == 30
    assert run_module(state, a)["changed"] is False


def test_an_lb_vip_s_keep_source_and_affinity_reach_the_map_and_converge(node, tmp_path):
    vip = {"name": "ext", "vip": "192.0.2.80", "port": 443, "backends": [{"ip": "10.244.1.9", "port": 8443}],
           "keep_source": True, "affinity_timeout": 600}
    a = args(node, tmp_path / "state.json", lb_vips=[vip])
    result = run_module(state, a)
    assert result["changed"] is True
    assert result["plan"]["lb_vips"]["add"] == [{"frontend": "192.0.2.80:443/tcp", "backends": ["10.244.1.9:8443"],
                                                 "affinity_timeout": 600, "keep_source": True}]
    with node.open_map(m.LbVipsMap) as lm:
        assert lm.entry("192.0.2.80", 443, "tcp")[2] == m.LbOptions(keep_source=True, affinity_timeout=600)
    assert run_module(state, a)["changed"] is False
    a["lb_vips"] = [dict(vip, keep_source=False)]
    result = run_module(state, a)
    assert result["plan"]["lb_vips"]["change"][0]["keep_source"] is False
    with node.open_map(m.LbVipsMap) as lm:
        assert lm.entry("192.0.2.80", 443, "tcp")[2] == m.LbOptions(affinity_timeout=600)


def test_the_kubernetes_api_s_frontends_count_as_desired_and_the_inventory_wins(node, tmp_path):
    """The agent's cache of the API's frontends: applied with the file's, never removed by a run, and a
    Service asking for a frontend the file serves does not get it."""
    from sluice.state.sources import ApiFrontends, save_service  # pylint: disable=import-outside-toplevel

    cache = tmp_path / "kubernetes"
    api_fe, clash = ("10.100.0.20", 80, "tcp"), ("10.96.0.10", 80, "tcp")
    save_service(str(cache), "team/api", ApiFrontends(
        {api_fe: (m.Backend("10.244.1.9", 8080, "tcp"),), clash: (m.Backend("10.244.1.9", 8080, "tcp"),)},
        {}, {api_fe: "team/api", clash: "team/api"}))
    a = args(node, tmp_path / "state.json", kubernetes_cache=str(cache))
    result = run_module(state, a)
    assert {e["frontend"] for e in result["plan"]["services"]["add"]} == {"10.100.0.20:80/tcp", "10.96.0.10:80/tcp"}
    with node.open_map(m.ServicesMap) as sm, node.open_map(m.BackendsMap) as bm:
        assert [bm.get(b).ip for b in sm.get(*api_fe).backend_ids] == ["10.244.1.9"]
        assert sorted(bm.get(b).ip for b in sm.get(*clash).backend_ids) == ["10.244.1.5", "10.244.2.7"]
    assert "10.100.0.20" not in (tmp_path / "state.json").read_text()   # the file stays the inventory's
    again = run_module(state, a)
    assert again["changed"] is False and again["plan"] == {}


def test_apply_false_writes_only_the_file(node, tmp_path):
    path = tmp_path / "state.json"
    empty = maps_now(node)
    first = run_module(state, args(node, path, apply=False))
    assert first["changed"] is True and first["file_changed"] is True and first["applied"] is False
    assert first["plan"]["routes"]["add"]  # pending: for the agent to apply
    assert maps_now(node) == empty and path.exists()
    # Same file, the plan still pending but not this task's to apply: not changed.
    second = run_module(state, args(node, path, apply=False))
    assert second["changed"] is False and second["plan"] == first["plan"]
    # apply=true with the file already right: changed through the plan alone.
    third = run_module(state, args(node, path))
    assert third["changed"] is True and third["file_changed"] is False and third["applied"] is True
    assert run_module(state, args(node, path))["changed"] is False


def test_maps_drifting_from_the_file_are_changed_back(node, tmp_path):
    path = tmp_path / "state.json"
    a = args(node, path)
    run_module(state, a)
    with node.open_map(m.PrefilterMap) as pm:
        pm.delete(PREFILTER[0])
    result = run_module(state, a)
    assert result["changed"] is True and result["file_changed"] is False and result["applied"] is True
    assert result["plan"] == {"prefilter": {"add": PREFILTER, "change": [], "remove": []}}
    assert run_module(state, a)["changed"] is False


BAD = [
    ({"node": dict(NODE, pod_cidr="10.244.1.0/33")}, "10.244.1.0/33"),
    ({"node": dict(NODE, pod_cidr="10.244.1.1/24")}, "'10.244.1.1/24' has host bits set"),
    ({"node": dict(NODE, ip="192.168.93.300")}, "192.168.93.300"),
    ({"node": dict(NODE, nic="slnope0")}, "'slnope0'"),
    ({"routes": [{"cidr": "10.244.1.128/25", "nexthop": "192.168.93.12"}]}, "10.244.1.128/25 overlaps 10.244.1.0/24"),
    ({"routes": [{"cidr": "10.244.2.0/24", "nexthop": "node-2"}]}, "'node-2'"),
    ({"routing": {"mode": "geneve"}}, "geneve"),
    ({"routing": {"vni": 1 << 24}}, str(1 << 24)),
    ({"services": [dict(SERVICES[0], port=70000)]}, "70000"),
    ({"services": [dict(SERVICES[0], protocol="sctp")]}, "sctp"),
    ({"services": [dict(SERVICES[0], backends=[{"ip": "10.244.1.5"}])]}, "services[0] (web).backends[0]"),
    ({"services": [SERVICES[0], dict(SERVICES[0], name="web2")]}, "duplicate frontend 10.96.0.10:80/tcp"),
    ({"prefilter": ["203.0.113.0/99"]}, "203.0.113.0/99"),
    ({"xdp": {"cpumap_cpus": [4096]}}, "4096"),
]


@pytest.mark.parametrize("bad, named", BAD, ids=[named for _bad, named in BAD])
@pytest.mark.parametrize("check_mode", [False, True], ids=["run", "check"])
def test_bad_input_is_named_and_nothing_is_touched(node, tmp_path, bad, named, check_mode):
    path = tmp_path / "state.json"
    path.write_text(PREVIOUS)
    before = maps_now(node)
    result = fail_module(state, args(node, path, **bad), check_mode=check_mode)
    assert named in result["msg"]
    assert result.get("changed") is not True
    assert path.read_text() == PREVIOUS
    assert maps_now(node) == before and netlink.owned_routes(ROUTE_PROTO) == {}


def test_apply_without_a_datapath_fails_and_writes_nothing(pin_root, bpf_objects, tmp_path):
    path = tmp_path / "state.json"
    result = fail_module(state, {"path": str(path), "node": NODE, "pin_root": pin_root, "obj_dir": bpf_objects})
    assert "not loaded" in result["msg"] and pin_root in result["msg"] and result["changed"] is False
    assert not path.exists()


def test_apply_false_without_a_datapath_writes_and_warns(pin_root, bpf_objects, tmp_path):
    path = tmp_path / "state.json"
    a = {"path": str(path), "node": NODE, "pin_root": pin_root, "obj_dir": bpf_objects, "apply": False}
    result = run_module(state, a)
    assert result["changed"] is True and result["plan"] is None and result["plan_text"] == ""
    assert any(pin_root in w for w in result["warnings"])
    assert json.loads(path.read_text())["node"] == NODE
    assert run_module(state, a)["changed"] is False
    assert not os.path.exists(pin_root)


def test_confirm_timeout_keeps_the_state_in_force_as_the_checkpoint_until_confirmed(node, tmp_path):
    """A change of an existing state file is armed: the file before it is the checkpoint the agent would
    restore; a first state file (nothing to go back to) and an unchanged one are not armed."""
    from sluice.state import confirm  # pylint: disable=import-outside-toplevel

    path = tmp_path / "state.json"
    first = run_module(state, args(node, path, confirm_timeout=30))
    assert first["changed"] is True and first["confirm_pending"] is False and first["confirm_deadline"] is None
    before = path.read_text()
    changed = run_module(state, args(node, path, prefilter=["198.51.100.0/24"], confirm_timeout=30))
    assert changed["confirm_pending"] is True and changed["confirm_deadline"] > time.time() + 25
    assert (tmp_path / "state.json.checkpoint").read_text() == before
    assert confirm.pending(str(path))["plan"]["prefilter"]["add"] == ["198.51.100.0/24"]
    assert confirm.confirm(str(path), changed["confirm_deadline"]) == {"confirmed": True}
    assert not (tmp_path / "state.json.checkpoint").exists() and confirm.pending(str(path)) is None
    again = run_module(state, args(node, path, prefilter=["198.51.100.0/24"], confirm_timeout=30))
    assert again["changed"] is False and again["confirm_pending"] is False
