"""sluice-agent as a real process in a node namespace."""

import contextlib
import copy
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import BPF_BUILD
from lib import netns
from lib.agent import AgentProcess
from lib.cgroup import cgroup
from sluice import maps as m
from sluice.bpf import libbpf as lb
from sluice.datapath import Datapath

STATE = {
    "node": {"name": "node1", "ip": "192.168.91.11", "nic": "sleth0", "pod_cidr": "10.245.1.0/24"},
    "routes": [{"cidr": "10.245.2.0/24", "nexthop": "192.168.91.12"}],
    "services": [{"vip": "10.97.0.10", "port": 80, "protocol": "tcp", "backends": [{"ip": "10.245.1.5", "port": 80}]}],
    "prefilter": ["203.0.113.0/24"],
}


def write_state(path, state):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


@contextlib.contextmanager
def agent_node(pin_root, tmp_path, **settings):
    """A node namespace with NIC sleth0, a test cgroup, and a running agent (`settings`: agent config)."""
    with netns.namespaces("node") as (ns,), cgroup() as cg:
        netns.ns_exec(ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        netns.ns_exec(ns, "ip", "addr", "add", "192.168.91.11/24", "dev", "sleth0")
        for dev in ("sleth0", "sleth1"):
            netns.ns_exec(ns, "ip", "link", "set", dev, "up")
        state_file = str(tmp_path / "state.json")
        write_state(state_file, STATE)
        port = 19962
        agent = AgentProcess(ns, {"state_file": state_file, "pin_root": pin_root, "obj_dir": BPF_BUILD,
                                  "socket": str(tmp_path / "run" / "agent.sock"),
                                  "metrics_address": f"127.0.0.1:{port}", "ipam_dir": str(tmp_path / "ipam"),
                                  "cgroup": cg.path, "poll_interval": 0.2, **settings}, str(tmp_path))
        agent.start()
        try:
            yield agent, ns, Datapath(pin_root, BPF_BUILD), state_file
        finally:
            agent.stop()
            Datapath(pin_root, BPF_BUILD).remove()


@pytest.fixture
def node(pin_root, tmp_path):
    with agent_node(pin_root, tmp_path) as parts:
        yield parts


def services(dp):
    with dp.open_map(m.ServicesMap) as sm:
        return {fe: len(s.backend_ids) for fe, s in sm.items().items()}


def test_agent_loads_attaches_and_reconciles(node):
    agent, ns, dp, _state_file = node
    health = agent.health()
    assert health["ready"] and health["last_error"] is None
    targets = {(l["target"], l["program"]) for l in dp.links()}
    assert {("sleth0", "tc_from_nic"), ("sleth0", "xdp_nic"), ("cgroup", "sock_connect4"),
            ("cgroup", "sockops_tcp"), ("sockhash", "sk_msg_redir")} <= targets
    assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}
    with dp.open_map(m.PrefilterMap) as pm:
        assert pm.items() == {"203.0.113.0/24": 1}


def test_agent_follows_state_file_changes(node):
    agent, _ns, dp, state_file = node
    new = copy.deepcopy(STATE)
    new["services"].append({"vip": "10.97.0.11", "port": 53, "protocol": "udp",
                            "backends": [{"ip": "10.245.1.6", "port": 53}, {"ip": "10.245.1.7", "port": 53}]})
    write_state(state_file, new)
    agent.wait_for(lambda: ("10.97.0.11", 53, "udp") in services(dp), what="new service in the map")
    assert services(dp)[("10.97.0.11", 53, "udp")] == 2
    assert agent.health()["last_plan"]["services"]["add"][0]["frontend"] == "10.97.0.11:53/udp"


@pytest.mark.parametrize("content,reason", [
    ("{not json", "not valid JSON"),
    ('{"node": {"name": "n", "ip": "192.168.91.11", "nic": "sleth0", "pod_cidr": "10.245.1.0/24"}, '
     '"services": [{"vip": "10.97.0.12", "port": 0, "backends": []}]}', "port 0"),
    ('{"node": {"name": "n", "ip": "192.168.91.11", "nic": "sleth0", "pod_cidr": "10.245.1.0/24"}, '
     '"routes": [{"cidr": "10.245.1.0/25", "nexthop": "192.168.91.12"}]}', "overlaps"),
])
def test_bad_state_file_keeps_last_good_state(node, content, reason):
    agent, _ns, dp, state_file = node
    before = services(dp)
    with open(state_file, "w") as f:
        f.write(content)
    health = agent.wait_for(lambda: (h := agent.health())["last_error"] and h, what="refusal")
    assert reason in health["last_error"] and "keeping the last good state" in health["last_error"]
    assert services(dp) == before
    write_state(state_file, STATE)  # fixing the file clears the error
    agent.wait_for(lambda: agent.health()["last_error"] is None, what="recovery")


def test_socket_is_root_only(node):
    agent, *_rest = node
    sock = agent.config["socket"]
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700


def test_metrics_endpoint_on_configured_address(node):
    agent, ns, dp, _state_file = node
    with netns.entered(ns):
        body = urllib.request.urlopen(f"http://{agent.config['metrics_address']}/metrics", timeout=5).read().decode()
    assert "sluice_agent_ready 1" in body
    assert 'sluice_map_entries{map="sl_services"} 2' in body
    assert "# TYPE sluice_drops_total counter" in body


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "clean-stop"])
def test_agent_restart_never_detaches(node, sig):
    agent, ns, dp, _state_file = node
    with netns.entered(ns):
        ifindex = netns.ifindex(ns, "sleth0")
        progs_before = lb.prog_query(ifindex, lb.BPF_TCX_INGRESS)
    links_before = dp.links()
    agent.stop(sig)
    with netns.entered(ns):
        assert lb.prog_query(ifindex, lb.BPF_TCX_INGRESS) == progs_before
    assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}
    agent.start()
    assert agent.health()["last_plan"] == {}
    assert dp.links() == links_before


# ---- delta reconciles, drift repair -------------------------------------------------------------

def test_a_changed_state_file_is_applied_as_a_delta(node):
    agent, _ns, dp, state_file = node
    assert agent.health()["last_reconcile_kind"] == "full"     # at start: against the maps
    new = copy.deepcopy(STATE)
    new["services"][0]["backends"].append({"ip": "10.245.1.6", "port": 80})
    new["prefilter"] = []
    write_state(state_file, new)
    health = agent.wait_for(lambda: (h := agent.health())["last_reconcile_kind"] == "delta" and h,
                            what="the change applied")
    assert health["last_reconcile_kind"] == "delta" and health["last_error"] is None
    assert health["last_plan"] == {
        "services": {"add": [], "change": [{"frontend": "10.97.0.10:80/tcp", "backends": ["10.245.1.5:80", "10.245.1.6:80"],
                                            "was": ["10.245.1.5:80"]}], "remove": []},
        "prefilter": {"add": [], "change": [], "remove": ["203.0.113.0/24"]}}
    assert services(dp) == {("10.97.0.10", 80, "tcp"): 2}
    with dp.open_map(m.PrefilterMap) as pm:
        assert pm.items() == {}


def _drift(dp) -> None:
    """Changes behind the agent's back: a service and a prefilter CIDR deleted, a foreign service added."""
    with dp.open_map(m.ServicesMap) as sm, dp.open_map(m.PrefilterMap) as pm:
        sm.delete("10.97.0.10", 80, "tcp")
        sm.put("10.97.9.9", 9, "udp", m.Service(77, (1,)))
        pm.delete("203.0.113.0/24")


REPAIR = {"services": {"add": [{"frontend": "10.97.0.10:80/tcp", "backends": ["10.245.1.5:80"]}], "change": [],
                       "remove": [{"frontend": "10.97.9.9:9/udp"}]},
          "prefilter": {"add": ["203.0.113.0/24"], "change": [], "remove": []}}


def test_a_full_reconcile_on_request_repairs_drift(node):
    agent, _ns, dp, _state_file = node
    _drift(dp)
    # A reconcile of the unchanged file is a delta from the state applied last: nothing to do, the maps
    # are not read back (that is what makes it cheap), so the drift stays.
    reply = agent.request({"op": "reconcile"})
    assert reply["ok"] and reply["result"]["last_reconcile_kind"] == "delta" and reply["result"]["last_plan"] == {}
    assert services(dp) == {("10.97.9.9", 9, "udp"): 1}
    reply = agent.request({"op": "reconcile", "full": True})
    assert reply["ok"] and reply["result"]["last_reconcile_kind"] == "full"
    assert reply["result"]["last_plan"] == REPAIR
    assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}
    with dp.open_map(m.PrefilterMap) as pm:
        assert pm.items() == {"203.0.113.0/24": 1}


def test_the_periodic_full_reconcile_repairs_drift_while_the_file_stays_the_same(pin_root, tmp_path):
    with agent_node(pin_root, tmp_path, full_reconcile_interval=0.5) as (agent, _ns, dp, _state_file):
        before = agent.health()
        started = before["last_full_reconcile"]
        _drift(dp)
        repaired = agent.wait_for(lambda: (h := agent.health())["last_drift_repair"] and h, what="drift repaired")
        assert repaired["last_drift_repair"]["plan"] == REPAIR
        assert repaired["last_full_reconcile"] > started and repaired["last_error"] is None
        assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}
        assert repaired["last_plan"] == before["last_plan"], "last_plan stays the plan of the state file applied last"
        assert "repaired" in agent.logs()


def test_full_reconcile_interval_0_makes_every_reconcile_full_and_repairs_nothing_by_itself(pin_root, tmp_path):
    with agent_node(pin_root, tmp_path, full_reconcile_interval=0) as (agent, _ns, dp, state_file):
        _drift(dp)
        new = copy.deepcopy(STATE)
        new["prefilter"] = []
        time.sleep(0.6)     # polls: the file is unchanged, nothing is due
        assert services(dp) == {("10.97.9.9", 9, "udp"): 1} and agent.health()["last_drift_repair"] is None
        before = agent.health()["last_reconcile"]
        write_state(state_file, new)
        health = agent.wait_for(lambda: (h := agent.health())["last_reconcile"] != before and h, what="a reconcile")
        # a full reconcile: the drift is repaired with the change (the prefilter CIDR was gone already)
        assert health["last_reconcile_kind"] == "full" and health["last_plan"] == {"services": REPAIR["services"]}
        assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}


@pytest.mark.parametrize("key", ["full_reconcile_interval", "hand_edit_confirm_timeout"])
@pytest.mark.parametrize("value", [-1, "60", True, float("inf")])
def test_intervals_must_be_numbers_of_seconds(tmp_path, key, value):
    from sluice.agent import AgentConfig

    path = tmp_path / "agent.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=key):
        AgentConfig.load(str(path))


def test_an_unconfirmed_change_is_reverted_by_the_agent_and_a_confirmed_one_stands(node):
    """Commit-confirm: a change armed and not confirmed in time is undone (the state file restored and
    applied, health says what was reverted), a late `sluice confirm` of it fails; a change confirmed in
    time stands."""
    from sluice.state import confirm

    agent, _ns, dp, state_file = node
    with open(state_file) as f:
        before = f.read()
    cut = copy.deepcopy(STATE)
    cut["services"] = []
    confirm.arm(state_file, before, 1.0, {"services": {"remove": ["10.97.0.10:80/tcp"]}})
    write_state(state_file, cut)
    agent.wait_for(lambda: not services(dp), what="the change applied")
    agent.wait_for(lambda: (agent.health().get("last_revert") or {}).get("restored"), what="the revert")
    assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}
    with open(state_file) as f:
        assert f.read() == before
    deadline = agent.health()["last_revert"]["deadline"]
    late = subprocess.run([sys.executable, "-m", "sluice.cli", "--json", "confirm", "--state-file", state_file,
                           "--deadline", repr(deadline)], capture_output=True, text=True, check=False)
    assert late.returncode == 1 and "too late: the agent reverted" in late.stderr, late
    # Confirmed in time: the change stands, past its deadline.
    record = confirm.arm(state_file, before, 2.0, {})
    write_state(state_file, cut)
    agent.wait_for(lambda: not services(dp), what="the change applied")
    ok = subprocess.run([sys.executable, "-m", "sluice.cli", "--json", "confirm", "--state-file", state_file,
                         "--deadline", repr(record["deadline"])], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"confirmed": True}, ok
    time.sleep(2.5)
    assert not services(dp) and agent.health()["pending_confirm"] is None


# ---- commit-confirm of hand edits ----------------------------------------------------------------------

def test_a_hand_edit_is_armed_by_the_agent_reverted_unconfirmed_and_kept_confirmed(pin_root, tmp_path):
    """Past the state module, nothing arms a change: the agent arms it itself before applying it, the state
    last accepted as its checkpoint. Unconfirmed in time it is reverted like a playbook's change; confirmed
    with `sluice confirm` on the node it stands, and becomes the state the next hand edit goes back to."""
    with agent_node(pin_root, tmp_path, hand_edit_confirm_timeout=6) as (agent, _ns, dp, state_file):
        with open(state_file) as f:
            before = f.read()
        cut = copy.deepcopy(STATE)
        cut["services"] = []
        write_state(state_file, cut)
        armed = agent.wait_for(lambda: (p := agent.health()["pending_confirm"]) and p.get("hand_edit") and p,
                               what="the hand edit armed")
        agent.wait_for(lambda: not services(dp), what="the hand edit applied")
        revert = agent.wait_for(lambda: (r := agent.health().get("last_revert")) and r.get("restored") and r,
                                timeout=15, what="the revert")
        assert revert["hand_edit"] and revert["deadline"] == armed["deadline"]
        assert services(dp) == {("10.97.0.10", 80, "tcp"): 1}
        with open(state_file) as f:
            assert f.read() == before
        assert "was changed by hand" in agent.logs() and "the hand edit of" in agent.logs()

        write_state(state_file, cut)
        agent.wait_for(lambda: (agent.health()["pending_confirm"] or {}).get("hand_edit"), what="armed again")
        ok = subprocess.run([sys.executable, "-m", "sluice.cli", "--json", "confirm", "--state-file", state_file],
                            capture_output=True, text=True, check=False)
        assert ok.returncode == 0 and json.loads(ok.stdout) == {"confirmed": True}, ok
        time.sleep(7)       # past the deadline it had
        health = agent.health()
        assert not services(dp) and health["pending_confirm"] is None and health["last_revert"] == revert
        # The confirmed state is the checkpoint of the next hand edit.
        write_state(state_file, STATE)
        agent.wait_for(lambda: (r := agent.health().get("last_revert")) and r != revert, timeout=20,
                       what="the second hand edit reverted")
        agent.wait_for(lambda: not services(dp), what="the confirmed state applied again")   # after the record


def state_module(ns: str, state_file: str, pin_root: str, tmp_path, state: dict, **options) -> dict:
    """The sluice.network.state module, run by ansible on the node (the agent role's task); its result."""
    args = {"path": state_file, "pin_root": pin_root, "obj_dir": BPF_BUILD,
            "kubernetes_cache": str(tmp_path / "kubernetes"), **state, **options}
    root = os.path.dirname(os.path.dirname(BPF_BUILD))
    proc = netns.ns_exec(ns, os.path.join(os.path.dirname(sys.executable), "ansible"), "localhost", "-i", "localhost,",
                         "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
                         "-m", "sluice.network.state", "-a", json.dumps(args), check=False, cwd=root,
                         env=dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]


def test_a_change_the_state_module_writes_is_never_taken_for_a_hand_edit(pin_root, tmp_path):
    """The module's writes stand as before hand edits were armed: without confirm_timeout, and armed by the module
    and confirmed before the agent looked (stopped meanwhile), the agent arms nothing and reverts nothing. A hand
    edit made while the agent was away is armed when it is back, the module's state as its checkpoint."""
    with agent_node(pin_root, tmp_path, hand_edit_confirm_timeout=1) as (agent, ns, dp, state_file):
        no_services = dict(STATE, services=[])
        assert state_module(ns, state_file, pin_root, tmp_path, no_services)["changed"]
        agent.wait_for(lambda: agent.health()["last_plan"] == {} and not services(dp), what="the module's state")
        time.sleep(2)
        health = agent.health()
        assert health["pending_confirm"] is None and health["last_revert"] is None and not services(dp), health
        agent.stop()
        armed = state_module(ns, state_file, pin_root, tmp_path, dict(no_services, prefilter=[]), confirm_timeout=30)
        assert armed["confirm_pending"], armed
        ok = subprocess.run([sys.executable, "-m", "sluice.cli", "--json", "confirm", "--state-file", state_file,
                             "--deadline", repr(armed["confirm_deadline"])], capture_output=True, text=True,
                            check=False)
        assert ok.returncode == 0 and json.loads(ok.stdout) == {"confirmed": True}, ok
        agent.start()
        time.sleep(2)
        health = agent.health()
        assert health["pending_confirm"] is None and health["last_revert"] is None, health
        with dp.open_map(m.PrefilterMap) as pm:
            assert not services(dp) and pm.items() == {}
        with open(state_file) as f:
            module_text = f.read()

        agent.stop()
        write_state(state_file, STATE)
        agent.start()
        revert = agent.wait_for(lambda: (r := agent.health().get("last_revert")) and r.get("restored") and r,
                                timeout=15, what="the hand edit made while the agent was away reverted")
        assert revert["hand_edit"] and not services(dp)
        with open(state_file) as f:
            assert f.read() == module_text


def test_a_waiting_hand_edit_ends_when_the_module_writes_or_the_edit_is_undone(tmp_path):
    """sluice.state.confirm alone: the state module's write supersedes a hand edit waiting for its confirmation
    (a playbook run without confirm_timeout is never reverted to what came before the hand edit), and a hand edit
    edited back to its checkpoint waits no more; a change the module armed is no hand edit's to end."""
    from sluice.state import confirm

    path = str(tmp_path / "state.json")
    confirm.write(path, "module 1")
    assert confirm.arm_hand_edit(path, "module 1", 60) is None
    with open(path, "w") as f:
        f.write("by hand")
    assert confirm.arm_hand_edit(path, "by hand", 60)["hand_edit"]
    confirm.write(path, "module 2")
    assert confirm.pending(path) is None and confirm.arm_hand_edit(path, "module 2", 60) is None
    with open(path, "w") as f:
        f.write("by hand")
    assert confirm.arm_hand_edit(path, "by hand", 60)
    with open(path, "w") as f:
        f.write("module 2")
    assert confirm.arm_hand_edit(path, "module 2", 60) is None and confirm.pending(path) is None
    assert not os.path.exists(path + ".checkpoint")
    # Another layout of the same state is no change.
    confirm.write(path, '{"a": 1}')
    with open(path, "w") as f:
        f.write('{\n  "a": 1\n}')
    assert confirm.arm_hand_edit(path, '{\n  "a": 1\n}', 60) is None and confirm.pending(path) is None
    with open(path, "w") as f:
        f.write('{"a": 2}')
    assert confirm.arm_hand_edit(path, '{"a": 2}', 60)
    with open(path, "w") as f:
        f.write('{"a":1}')
    assert confirm.arm_hand_edit(path, '{"a":1}', 60) is None and confirm.pending(path) is None
    confirm.write(path, "module 2")
    confirm.arm(path, "module 2", 60, {})
    confirm.write(path, "module 3")
    with open(path, "w") as f:
        f.write("module 2")
    assert confirm.arm_hand_edit(path, "module 2", 60) is None and confirm.pending(path) is not None
    assert confirm.revert_if_due(path, now=time.time() + 61)["restored"]
    with open(path) as f:
        assert f.read() == "module 2"
    assert confirm.arm_hand_edit(path, "module 2", 60) is None and confirm.pending(path) is None
