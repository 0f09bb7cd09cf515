"""Inventory changes on a lab converged by the real playbook over SSH: `site.yml --check --diff`
reports exactly the pending changes and changes nothing; adding a node or changing a service and
re-running reconciles every node; removing a node removes its routes everywhere.

The tests run in file order on one lab: each starts from what the previous one converged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import lab  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.kernel
SUBNET = "192.168.96.0/24"
SLUICE = "/opt/sluice/venv/bin/sluice"
STATE_TASK = "Write and apply the node's desired state"
NODE3_CIDR = "10.244.3.0/24"


@pytest.fixture(scope="module")
def cluster():
    name = f"slinv{uuid.uuid4().hex[:4]}"
    cli = [sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", name]
    try:
        up = subprocess.run([*cli, "up", "--nodes", "3", "--subnet", SUBNET], capture_output=True, text=True,
                            timeout=180, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        yield lab.Lab(name)
    finally:
        subprocess.run([*cli, "down"], capture_output=True, timeout=180, check=False)


def inventory(cluster: lab.Lab, tmp_path, nodes=(1, 2, 3), web_backends=None) -> str:
    """A copy of the lab's inventory with only `nodes`, and optionally other backends for service web."""
    directory = tmp_path / f"inventory-{uuid.uuid4().hex[:6]}"
    os.makedirs(directory / "group_vars")
    with open(cluster.inventory) as f:
        hosts = yaml.safe_load(f)
    hosts["sluice_nodes"]["hosts"] = {h: v for h, v in hosts["sluice_nodes"]["hosts"].items()
                                      if int(h.removeprefix("node")) in nodes}
    with open(directory / "hosts.yml", "w") as f:
        yaml.safe_dump(hosts, f)
    with open(os.path.join(ROOT, "inventory", "lab", "group_vars", "sluice_nodes.yml")) as f:
        group_vars = yaml.safe_load(f)
    if web_backends is not None:
        web = next(s for s in group_vars["sluice_services"] if s["name"] == "web")
        web["backends"] = web_backends
    with open(directory / "group_vars" / "sluice_nodes.yml", "w") as f:
        yaml.safe_dump(group_vars, f)
    return str(directory / "hosts.yml")


def site(hosts: str, *args: str) -> dict:
    """Run playbooks/site.yml; the ansible.posix.json callback's document."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", hosts,
                             os.path.join(ROOT, "playbooks", "site.yml"), *args],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=600, check=False)
    try:
        doc = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"ansible-playbook printed no JSON ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}")
    failed = [(host, task["task"]["name"], res.get("msg")) for play in doc["plays"] for task in play["tasks"]
              for host, res in task["hosts"].items() if res.get("failed") or res.get("unreachable")]
    assert result.returncode == 0 and not failed, failed or result.stderr[-2000:]
    return doc


def changed_tasks(run: dict) -> dict[str, list[str]]:
    """Per host, the names of the tasks that reported a change."""
    out: dict[str, list[str]] = {}
    for play in run["plays"]:
        for task in play["tasks"]:
            for host, res in task["hosts"].items():
                if res.get("changed"):
                    out.setdefault(host, []).append(task["task"]["name"].split(" : ")[-1])
    return out


def task_result(run: dict, name: str, host: str) -> dict:
    for play in run["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].endswith(name) and host in task["hosts"]:
                return task["hosts"][host]
    raise AssertionError(f"no result of task {name!r} for {host}")


def node_view(cluster: lab.Lab, i: int) -> dict:
    """What a node's datapath and kernel hold: routes Sluice owns, the routes and services maps, the state file."""
    def ssh(*argv):
        result = cluster.ssh(i, *argv, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    return {"kernel_routes": sorted(r["dst"] for r in json.loads(ssh("ip", "-j", "route", "show", "proto", "217"))),
            "routes": json.loads(ssh(SLUICE, "--json", "routes")),
            "services": json.loads(ssh(SLUICE, "--json", "services")),
            "state_file": ssh("cat", "/etc/sluice/state.json")}


def test_a_two_node_cluster_converges(cluster, tmp_path):
    run = site(inventory(cluster, tmp_path, nodes=(1, 2)))
    assert set(changed_tasks(run)) == {"node1", "node2"}
    assert node_view(cluster, 1)["kernel_routes"] == ["10.244.2.0/24"]
    assert node_view(cluster, 2)["kernel_routes"] == ["10.244.1.0/24"]


def test_check_diff_reports_exactly_the_pending_changes_and_changes_nothing(cluster, tmp_path):
    """A node added and a service's backends changed in the inventory, previewed on the converged nodes."""
    before = {i: node_view(cluster, i) for i in (1, 2)}
    hosts = inventory(cluster, tmp_path, web_backends=[{"ip": "10.244.2.10", "port": 8080}])
    run = site(hosts, "--check", "--diff", "--limit", "node1,node2")

    assert changed_tasks(run) == {"node1": [STATE_TASK], "node2": [STATE_TASK]}
    for host, own, other in (("node1", "10.244.1.0/24", "10.244.2.0/24"), ("node2", "10.244.2.0/24", "10.244.1.0/24")):
        result = task_result(run, STATE_TASK, host)
        assert result["plan"] == {
            "routes": {"add": [{"cidr": NODE3_CIDR, "nexthop": cluster.node_ip(3), "mode": "native"}],
                       "change": [], "remove": []},
            "services": {"add": [], "change": [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.244.2.10:8080"],
                                                "was": ["10.244.1.10:8080", "10.244.2.10:8080"]}], "remove": []},
        }, (host, own, other)
        assert result["applied"] is False and result["file_changed"] is True
        diff = result["diff"][0] if isinstance(result["diff"], list) else result["diff"]
        before_doc, after_doc = json.loads(diff["before"]), json.loads(diff["after"])
        assert [r["cidr"] for r in after_doc["routes"]] == [other, NODE3_CIDR]
        assert [r["cidr"] for r in before_doc["routes"]] == [other]
    assert {i: node_view(cluster, i) for i in (1, 2)} == before


def test_rerun_applies_the_change_on_every_node(cluster, tmp_path):
    hosts = inventory(cluster, tmp_path, web_backends=[{"ip": "10.244.2.10", "port": 8080}])
    site(hosts)
    for i, others in ((1, ["10.244.2.0/24", NODE3_CIDR]), (2, ["10.244.1.0/24", NODE3_CIDR]),
                      (3, ["10.244.1.0/24", "10.244.2.0/24"])):
        view = node_view(cluster, i)
        assert view["kernel_routes"] == others
        assert sorted(view["routes"]) == others
        web = next(s for s in view["services"] if s["frontend"] == "10.96.0.10:80/tcp")
        assert web["backends"] == ["10.244.2.10:8080"]
    assert changed_tasks(site(hosts)) == {}   # and converged: a second run changes nothing


def test_removing_a_node_removes_its_routes_everywhere(cluster, tmp_path):
    site(inventory(cluster, tmp_path, nodes=(1, 2), web_backends=[{"ip": "10.244.2.10", "port": 8080}]))
    for i in (1, 2):
        view = node_view(cluster, i)
        assert NODE3_CIDR not in view["kernel_routes"] and NODE3_CIDR not in view["routes"]


@pytest.fixture(autouse=True)
def _keep_tmp_inventories_small(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
