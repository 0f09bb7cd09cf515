"""Bad input is refused with an error naming the bad value, and the node is left exactly as it was
(tests/lib/snapshot.py: links, addresses, routes, pins, map contents, files). The table of every row,
module arguments included (tests/unit/plugins/modules/test_bad_input.py), is docs/bad-input.md.

- CNI requests, through the plugin as a runtime executes it and straight to the agent's socket (the
  agent checks what the plugin checks: other clients may call it), with the spec's error codes.
- The agent's state file: corrupt, truncated or invalid, while the agent runs or when it starts; it
  keeps the last good state (the maps stay as they are) and says why in its health and log.
- The inventory: sluice.network.cluster_plan fails the plan play before any node is contacted.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from conftest import ROOT
from lib import cni_node, netns
from lib.snapshot import assert_same, snapshot, unchanged
from sluice.cni import podnet

pytestmark = pytest.mark.kernel

POD_CIDR = "10.247.8.0/29"  # 5 pod addresses: the node below fills them


@pytest.fixture(scope="module")
def full_node():
    """A node whose pod CIDR is full: 5 pods attached through the plugin."""
    with cni_node.node(POD_CIDR) as node:
        for _i in range(5):
            node.add(*node.pod("full"))
        yield node


def node_paths(node) -> list[str]:
    return [node.ipam_dir, node.state_file, os.path.dirname(node.agent.config["socket"])]


# ---- CNI ----------------------------------------------------------------------------------------

# id: (command, configuration (None: a good one), env changes, omitted env, spec error code, text the error must hold)
CNI_ROWS = {
    "malformed-json": ("ADD", "{not json", {}, (), 6, "'{not json'"),
    "unsupported-cniVersion": ("ADD", {"cniVersion": "0.3.1"}, {}, (), 1, "'0.3.1'"),
    "missing-CNI_NETNS": ("ADD", None, {}, ("CNI_NETNS",), 4, "CNI_NETNS"),
    "missing-CNI_CONTAINERID": ("ADD", None, {}, ("CNI_CONTAINERID",), 4, "CNI_CONTAINERID"),
    "bad-CNI_IFNAME": ("ADD", None, {"CNI_IFNAME": "eth0/1"}, (), 4, "'eth0/1'"),
    "unknown-CNI_COMMAND": ("FROB", None, {}, (), 4, "'FROB'"),
    "netns-does-not-exist": ("ADD", None, {"CNI_NETNS": "/run/netns/sltest-gone"}, (), 3, "/run/netns/sltest-gone"),
    "ipam-exhausted": ("ADD", None, {}, (), 100, f"pod CIDR {POD_CIDR} is exhausted"),
}


@pytest.mark.parametrize("via", ["plugin", "agent"])
@pytest.mark.parametrize("row", list(CNI_ROWS))
def test_cni_bad_request(full_node, row, via):
    node = full_node
    command, conf, env_changes, omit, code, named = CNI_ROWS[row]
    cid, netns_path = node.pod("bad")
    if isinstance(conf, dict):
        conf = node.conf(**conf)
    elif conf is None:
        conf = node.conf()
    env = dict(node.plugin_env(command, cid, netns_path), **env_changes)
    for name in omit:
        del env[name]
    pod_ns = os.path.basename(netns_path)
    with unchanged(node.ns, node.pin_root, node_paths(node), others=[pod_ns]):
        if via == "plugin":
            proc = netns.ns_popen(node.ns, node.plugin_path, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            node.send(proc, conf)
            status, error = node.collect(proc)
            assert status == 1 and error["cniVersion"] == "1.1.0"
        else:
            stdin = conf if isinstance(conf, str) else json.dumps(conf)
            reply = node.agent.request({"op": "cni", "command": command, "env": env, "stdin": stdin})
            assert reply["ok"] is False, reply
            error = reply["error"]
        assert error["code"] == code and named in error["msg"], error
    assert node.ipam.lookup(cid, "eth0") is None
    assert node.agent.health()["ready"]


# ---- the agent's state file ----------------------------------------------------------------------

def good_state(node) -> dict:
    return json.loads(json.dumps(node.state))


def state_with(node, section: str, value) -> str:
    state = good_state(node)
    if section == "node.nic":
        state["node"]["nic"] = value
    else:
        state[section] = value
    return json.dumps(state)


# id: (the file's content: text, bytes, None to delete it, or a function of the node; text the reason must hold)
STATE_ROWS = {
    "truncated": (lambda node: json.dumps(good_state(node))[:57], "is not valid JSON"),
    "corrupt-binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not valid JSON"),
    "empty": ("", "is not valid JSON"),
    "not-an-object": ("[]", "expected a JSON object, not list"),
    "missing": (None, "No such file or directory"),
    "service-port-0": (lambda node: state_with(node, "services", [{"vip": "10.99.0.11", "port": 0}]), "port 0"),
    "overlapping-route": (lambda node: state_with(node, "routes", [{"cidr": "10.247.8.0/28", "nexthop": "192.168.94.12"}]),
                          "10.247.8.0/28 overlaps 10.247.8.0/29"),
    "unknown-nic": (lambda node: state_with(node, "node.nic", "slnope0"), "'slnope0'"),
    "unknown-nic-vxlan": (lambda node: json.dumps(dict(json.loads(state_with(node, "node.nic", "slnope0")),
                                                       routing={"mode": "vxlan", "vxlan_device": "slvx0"})), "'slnope0'"),
    "nexthop-off-link": (lambda node: state_with(node, "routes", [{"cidr": "10.247.9.0/24", "nexthop": "203.0.113.9"}]),
                         "203.0.113.9"),
    # The controller's address on the NIC's network through a nexthop nobody has: the node's answers would follow.
    "route-over-the-nic-network": (lambda node: state_with(node, "routes", [{"cidr": "192.168.94.1/32",
                                                                             "nexthop": "192.168.94.249"}]),
                                   "routes (192.168.94.1/32): overlaps 192.168.94.0/24, a network directly connected "
                                   "to sleth0"),
}


def write_raw(path: str, content) -> None:
    if content is None:
        os.unlink(path)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:6]}"
    with open(tmp, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    os.replace(tmp, path)


@pytest.mark.parametrize("row", list(STATE_ROWS))
def test_bad_state_file_keeps_the_last_good_state_and_says_why(full_node, row):
    node = full_node
    content, reason = STATE_ROWS[row]
    if callable(content):
        content = content(node)
    # The state file itself is what changes: the snapshot holds everything else.
    with unchanged(node.ns, node.pin_root, [node.ipam_dir]):
        write_raw(node.state_file, content)
        health = node.agent.wait_for(lambda: (h := node.agent.health())["last_error"] and h, what="refusal")
    try:
        assert reason in health["last_error"], health
        assert "keeping the last good state" in health["last_error"]
        if row in ("truncated", "corrupt-binary", "empty", "missing"):
            assert node.state_file in health["last_error"]
        assert node.agent.proc.poll() is None, node.agent.logs()
        assert f"refused: {health['last_error'].split(' (keeping')[0]}" in node.agent.logs()
        # Still serving CNI with the last good state: a DEL of an unknown container succeeds.
        cid, netns_path = node.pod("after")
        assert node.plugin("DEL", cid, netns_path) == (0, None)
    finally:
        node.write_state(node.state)  # fixing the file clears the error
        node.agent.wait_for(lambda: node.agent.health()["last_error"] is None, what="recovery")


def test_agent_started_on_a_corrupt_state_file_changes_nothing_and_refuses_cni():
    with cni_node.node("10.247.10.0/29") as node:
        cid, netns_path = node.pod("live")
        node.add(cid, netns_path)
        node.agent.stop()
        write_raw(node.state_file, json.dumps(node.state)[:40])
        with unchanged(node.ns, node.pin_root, [node.ipam_dir]):
            node.agent.start()
            health = node.agent.health()
            assert health["ready"] is False
            assert node.state_file in health["last_error"] and "nothing applied yet" in health["last_error"]
            new_cid, new_netns = node.pod("refused")
            status, error = node.plugin("ADD", new_cid, new_netns)
            assert status == 1 and error["code"] == 11 and "no valid state" in error["msg"], error
        node.write_state(node.state)
        node.agent.wait_for(lambda: node.agent.health()["ready"], what="the state applied once fixed")
        node.assert_consistent({(cid, "eth0"): netns_path})


# ---- the inventory ---------------------------------------------------------------------------------

INVENTORY = """\
sluice_nodes:
  vars:
    sluice_cluster_cidr: 10.244.0.0/16
    # Never contacted: TEST-NET-1 addresses, a user that does not exist, a short timeout.
    ansible_user: sltest-nobody
    ansible_ssh_common_args: -o ConnectTimeout=2 -o BatchMode=yes
  hosts:
    node-a:
      ansible_host: 192.0.2.11
      sluice_pod_cidr: 10.244.5.0/24
    node-b:
      ansible_host: 192.0.2.12
      sluice_pod_cidr: 10.244.5.0/24
"""


def test_two_nodes_with_the_same_pod_cidr_fail_site_yml_before_any_node_is_contacted(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(INVENTORY)
    proc = subprocess.run([os.path.join(ROOT, ".venv", "bin", "ansible-playbook"), "-i", str(inventory),
                           os.path.join(ROOT, "playbooks", "site.yml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env=dict(os.environ, ANSIBLE_NOCOLOR="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "pod CIDRs overlap: node-a has 10.244.5.0/24 and node-b has 10.244.5.0/24" in out, out
    # Nothing ran on a node: no connection was attempted, no role task started.
    assert "UNREACHABLE" not in out and "Gathering Facts" not in out, out
    assert "TASK [sluice.network.node" not in out and "PLAY [Converge Sluice nodes]" not in out, out


def test_the_snapshot_sees_what_an_add_changes():
    """The snapshots above are not vacuous: a good ADD changes every part of one."""
    with cni_node.node("10.247.11.0/29") as node:
        cid, netns_path = node.pod("seen")
        before = snapshot(node.ns, node.pin_root, [node.ipam_dir])
        address = node.add(cid, netns_path)
        after = snapshot(node.ns, node.pin_root, [node.ipam_dir])
        host = podnet.host_ifname(cid, "eth0")
        assert host in {link["ifname"] for link in after["network"]["links"]} - \
            {link["ifname"] for link in before["network"]["links"]}
        assert after["network"]["routes"] != before["network"]["routes"]
        assert host in set(after["network"]["tc"]["ingress_filters"]) - set(before["network"]["tc"]["ingress_filters"])
        assert len(after["maps"]["sl_endpoints"]) == len(before["maps"]["sl_endpoints"]) + 1
        assert any(path.endswith(f"/{address}") for path in set(after["files"]) - set(before["files"]))
        with pytest.raises(AssertionError, match=host):
            assert_same(before, after)
