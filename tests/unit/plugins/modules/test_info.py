"""sluice.network.info against a real datapath in a private pin root, a veth in a `sltest-` namespace, a state
file written by sluice.network.state and a real sluice.agent.Agent serving its socket from this process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time

import pytest

from ansible_collections.sluice.network.plugins.modules import info, state

from .utils import fail_module, run_module

from sluice import maps as m  # pylint: disable=wrong-import-order
from sluice.agent import Agent, AgentConfig  # pylint: disable=wrong-import-order

NODE = {"name": "node1", "ip": "192.168.94.11", "nic": "sleth0", "pod_cidr": "10.244.1.0/24"}
SERVICES = [{"name": "web", "vip": "10.96.0.10", "port": 80, "backends": [{"ip": "10.244.1.5", "port": 8080}]}]
ENDPOINT = m.Endpoint(ifindex=7, pod_mac="02:00:00:00:01:05", host_mac="02:00:00:00:01:06")


def args(pin_root, obj_dir, tmp_path, **kw):
    a = {"pin_root": pin_root, "obj_dir": obj_dir, "agent_socket": str(tmp_path / "run" / "agent.sock"),
         "state_path": str(tmp_path / "state.json"), "timeout": 2.0}
    a.update(kw)
    return a


def write_state(dp, tmp_path, **kw):
    """The state file through sluice.network.state (not applied unless apply=True)."""
    a = {"path": str(tmp_path / "state.json"), "node": NODE, "services": SERVICES, "pin_root": dp.root,
         "obj_dir": dp.obj_dir, "apply": False}
    a.update(kw)
    return run_module(state, a)


def file_stamp(path):
    st = os.stat(path)
    with open(path) as f:
        return f.read(), st.st_mtime_ns, st.st_ino


def test_nothing_there_is_reported_not_failed(pin_root, bpf_objects, tmp_path):
    a = args(pin_root, bpf_objects, tmp_path)
    result = run_module(info, a)
    assert result["changed"] is False
    sl = result["sluice"]
    assert sl["datapath"] == {"root": pin_root, "loaded": False, "programs": {}, "links": [], "maps": {}}
    assert sl["xdp"] == {} and sl["endpoints"] == {}
    assert sl["agent"] == {"reachable": False,
                           "error": f"{a['agent_socket']} does not exist (is sluice-agent running?)"}
    assert sl["state"] == {"path": a["state_path"], "exists": False, "valid": None, "in_sync": None, "plan": None,
                           "applied": None}
    assert run_module(info, a, check_mode=True) == result
    assert not os.path.exists(pin_root) and not os.path.exists(tmp_path / "run")


def test_datapath_xdp_and_endpoints(netns, loaded, tmp_path):
    loaded.attach_nic("sleth0")
    with loaded.open_map(m.EndpointsMap) as eps:
        eps.put("10.244.1.5", ENDPOINT)
    tags, links = loaded.pinned_tags(), loaded.links()
    a = args(loaded.root, loaded.obj_dir, tmp_path)
    result = run_module(info, a)
    assert result["changed"] is False
    sl = result["sluice"]
    assert sl["datapath"]["loaded"] is True and sl["datapath"]["programs"] == tags
    assert {(lk["target"], lk["program"], lk["kind"], lk["attached"]) for lk in sl["datapath"]["links"]} == {
        ("sleth0", "tc_from_nic", "tcx", True), ("sleth0", "xdp_nic", "xdp", True)}
    assert sl["datapath"]["maps"]["sl_endpoints"]["entries"] == 1
    assert sl["xdp"] == {"sleth0": "native"}  # veth: native XDP
    assert sl["endpoints"] == {"10.244.1.5": dataclasses.asdict(ENDPOINT)}
    # Reading changed nothing; check mode reads the same.
    assert loaded.pinned_tags() == tags and loaded.links() == links
    assert run_module(info, a, check_mode=True) == result

    # The NIC goes away: its XDP link stays pinned but detached, and is reported as no XDP.
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ip", "link", "del", "sleth0"],
                   check=True, capture_output=True)
    gone = run_module(info, a)["sluice"]
    assert gone["xdp"] == {"sleth0": "none"}
    assert not any(lk["attached"] for lk in gone["datapath"]["links"])


def test_state_file_in_sync_and_plan(netns, loaded, tmp_path):
    written = write_state(loaded, tmp_path)
    a = args(loaded.root, loaded.obj_dir, tmp_path)
    before = file_stamp(a["state_path"])
    st = run_module(info, a)["sluice"]["state"]
    assert st["exists"] is True and st["valid"] is True and st["in_sync"] is False
    assert st["plan"] == written["plan"] and st["plan"]["services"]["add"]
    assert st["applied"] is None  # no agent to ask
    assert file_stamp(a["state_path"]) == before

    applied = write_state(loaded, tmp_path, apply=True)
    assert applied["applied"] is True and applied["file_changed"] is False
    st = run_module(info, a)["sluice"]["state"]
    assert st["valid"] is True and st["in_sync"] is True and st["plan"] == {}
    assert run_module(info, a, check_mode=True)["sluice"]["state"] == st


@pytest.mark.parametrize("content, named", [
    (dict(node=dict(NODE, pod_cidr="10.244.1.0/33")), "10.244.1.0/33"),
    (dict(node=NODE, services=[dict(SERVICES[0], port=0)]), "port 0"),
    ('{"node": ', "is not valid JSON"),
])
def test_invalid_state_file_is_named_and_left_alone(netns, loaded, tmp_path, content, named):
    path = tmp_path / "state.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    before = file_stamp(path)
    result = run_module(info, args(loaded.root, loaded.obj_dir, tmp_path))
    assert result["changed"] is False
    st = result["sluice"]["state"]
    assert st["exists"] is True and st["valid"] is False and named in st["error"]
    assert st["in_sync"] is None and st["plan"] is None
    assert file_stamp(path) == before


def test_agent_health_and_whether_it_applied_the_file(netns, loaded, cgroup, tmp_path):
    write_state(loaded, tmp_path)
    a = args(loaded.root, loaded.obj_dir, tmp_path)
    agent = Agent(AgentConfig(state_file=a["state_path"], pin_root=loaded.root, obj_dir=loaded.obj_dir,
                              socket=a["agent_socket"], metrics_address="", ipam_dir=str(tmp_path / "ipam"),
                              cgroup=cgroup))
    assert agent.reconcile(force=True)  # what the agent's loop does, here in the test's namespace
    agent.serve_socket()
    try:
        sl = run_module(info, a)["sluice"]
        assert sl["agent"]["reachable"] is True
        assert sl["agent"]["health"]["ready"] is True and sl["agent"]["health"]["last_error"] is None
        assert sl["state"]["applied"] is True and sl["state"]["in_sync"] is True
        assert sl["xdp"] == {"sleth0": "native"}  # the agent attached the node NIC

        # A new state file the agent has not reconciled yet.
        time.sleep(0.05)  # past the coarse clock behind file mtimes
        write_state(loaded, tmp_path, services=[])
        st = run_module(info, a)["sluice"]["state"]
        assert st["applied"] is False and st["in_sync"] is False
        assert st["plan"]["services"]["remove"] == [{"frontend": "10.96.0.10:80/tcp"}]

        assert agent.reconcile()
        st = run_module(info, a)["sluice"]["state"]
        assert st["applied"] is True and st["in_sync"] is True
    finally:
        agent.close()

    # The socket is still there, nobody answers: unreachable, reported, not a failure.
    down = run_module(info, a)
    assert down["changed"] is False
    assert down["sluice"]["agent"]["reachable"] is False and a["agent_socket"] in down["sluice"]["agent"]["error"]
    assert down["sluice"]["state"]["applied"] is None


@pytest.mark.parametrize("bad, named", [
    ({"timeout": 0}, "timeout: 0.0"),
    ({"timeout": -1.5}, "timeout: -1.5"),
    ({"timeout": "soon"}, "timeout"),
    ({"state_file": "/etc/sluice/state.json"}, "state_file"),
])
def test_bad_input_is_named(pin_root, bpf_objects, tmp_path, bad, named):
    path = tmp_path / "state.json"
    path.write_text('{"previous": "content"}\n')
    before = file_stamp(path)
    result = fail_module(info, args(pin_root, bpf_objects, tmp_path, **bad))
    assert named in result["msg"]
    assert file_stamp(path) == before and not os.path.exists(pin_root)
