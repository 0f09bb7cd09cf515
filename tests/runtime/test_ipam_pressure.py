"""IPAM under pressure, through the real sluice-agent and real plugin processes (tests/lib/cni_node.py).

- 200 ADD and DEL calls at once: no address handed out twice, nothing leaked. Afterwards IPAM records
  == live attachments == endpoints map entries == host veths == node routes == tc link pins.
- Killed in the middle of an ADD, deterministically: the agent is stopped at a failpoint (before one
  of its ADD steps, see cni_node.FAILPOINTS) and then the plugin or the agent gets SIGKILL. The next
  GC (cni.dev/valid-attachments without the pod) reclaims the half-made allocation and interface; a
  retried ADD instead completes the same attachment with the same address.
- Killed after a DEL answered, before the veth's deletion that follows the answer: GC, or the deletion of
  the pod's netns, removes the veth.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from lib import cni_node, netns
from sluice.cni import podnet

pytestmark = pytest.mark.kernel

IFNAME = "eth0"


def test_200_mixed_concurrent_adds_and_dels_leave_no_duplicate_and_no_leak():
    with cni_node.node("10.247.0.0/24") as node:
        # 60 pods up before the burst; 50 of them are deleted during it, 10 are left alone.
        before = [node.pod("pre") for _i in range(60)]
        assert all(status == 0 for status, _out in node.run_all([node.start_plugin("ADD", *pod) for pod in before]))
        new = [node.pod("new") for _i in range(100)]
        racing = [node.pod("race") for _i in range(25)]  # ADD and DEL of the same pod at once
        calls = ([("ADD", cid, path) for cid, path in new] + [("DEL", cid, path) for cid, path in before[:50]]
                 + [(command, cid, path) for cid, path in racing for command in ("ADD", "DEL")])
        assert len(calls) == 200
        random.Random(7).shuffle(calls)

        # Every plugin process running before any gets its configuration, like a burst of pod starts and stops.
        results = list(zip(calls, node.run_all([node.start_plugin(*call) for call in calls])))

        failed = [(call, out) for call, (status, out) in results if status != 0]
        assert not failed, failed
        added = {cid: out["ips"][0]["address"].split("/")[0] for (command, cid, _path), (_status, out) in results
                 if command == "ADD"}
        held = {record["container_id"]: str(address) for address, record in node.ipam.allocations().items()}
        # A racing pod is there when its DEL ran first; either way it is whole or gone (assert_consistent).
        live = {(cid, IFNAME): path for cid, path in new + before[50:]}
        live.update({(cid, IFNAME): path for cid, path in racing if cid in held})
        print(f"{sum(1 for cid, _path in racing if cid in held)} of 25 racing pods ended up present")
        node.assert_consistent(live)
        for cid, _path in new:
            assert held[cid] == added[cid], f"{cid}: ADD answered {added[cid]}, IPAM holds {held[cid]}"
        assert len(set(added.values())) == len(added), "two ADDs were answered with the same address"

        # GC with every live attachment valid removes nothing; DEL of all of them leaves nothing at all.
        node.gc(list(live))
        node.assert_consistent(live)
        procs = [node.start_plugin("DEL", cid, path) for (cid, _ifname), path in live.items()]
        assert all(result == (0, None) for result in node.run_all(procs))
        node.assert_consistent({})
        assert node.agent.health()["ready"]


@pytest.mark.parametrize("failpoint", list(cni_node.FAILPOINTS))
@pytest.mark.parametrize("recovery", ["gc", "retried-add"])
def test_agent_killed_mid_add(failpoint, recovery):
    """SIGKILL of the agent while it stands before `failpoint` of an ADD; restart; GC or a retried ADD."""
    with cni_node.node() as node:
        kept = node.pod("kept")
        node.add(*kept)
        cid, netns_path = node.pod("cut")
        node.agent.stop()
        node.agent.failpoint = failpoint
        node.agent.start()
        plugin = node.start_plugin("ADD", cid, netns_path)
        node.send(plugin, node.conf())
        node.agent.wait_paused()
        allocated = node.ipam.lookup(cid, IFNAME)
        assert allocated is not None, "the failpoints are all after the allocation"
        host = podnet.host_ifname(cid, IFNAME)
        steps = list(cni_node.FAILPOINTS)
        done = steps[:steps.index(failpoint)]
        assert (host in node.host_veths()) == ("create_veth" in done), "half-made: the veth pair"
        assert (str(allocated) in node.pod_routes()) == ("configure_pod" in done), "half-made: the node route"
        assert (host in node.pod_attachments()) == ("attach_pod" in done), "half-made: tc_from_pod"
        assert str(allocated) not in node.endpoints()

        node.agent.stop(signal.SIGKILL)
        status, error = node.collect(plugin)
        # The runtime learns that the ADD failed, with "try again later".
        assert status == 1 and error["code"] == 11 and node.agent.config["socket"] in error["msg"], error

        node.agent.failpoint = None
        node.agent.start()
        live = {(kept[0], IFNAME): kept[1]}
        if recovery == "gc":
            node.gc([(kept[0], IFNAME)])
        else:
            assert node.add(cid, netns_path) == str(allocated), "a retried ADD keeps the address it was given"
            live[(cid, IFNAME)] = netns_path
            status, out = node.plugin("CHECK", cid, netns_path, conf=node.conf(prevResult={
                "cniVersion": "1.1.0", "ips": [{"address": f"{allocated}/32"}]}))
            assert (status, out) == (0, None)
        node.assert_consistent(live)


@pytest.mark.parametrize("recovery", ["gc", "netns-deleted"])
def test_agent_killed_after_a_del_answered(recovery):
    """A DEL answers before its veth is deleted: SIGKILL of the agent in between leaves a veth with no address,
    endpoint entry or node route, which GC removes, or the runtime's deletion of the pod's netns."""
    with cni_node.node() as node:
        kept = node.pod("kept")
        node.add(*kept)
        cid, netns_path = node.pod("cut")
        address = node.add(cid, netns_path)
        node.agent.stop()
        node.agent.failpoint = "delete_veth"
        node.agent.start()
        assert node.plugin("DEL", cid, netns_path) == (0, None)
        node.agent.wait_paused()
        host = podnet.host_ifname(cid, IFNAME)
        assert host in node.host_veths(), "the DEL answered before its veth's deletion"
        assert node.ipam.lookup(cid, IFNAME) is None
        assert address not in node.endpoints() and address not in node.pod_routes()

        node.agent.stop(signal.SIGKILL)
        node.agent.failpoint = None
        node.agent.start()
        if recovery == "gc":
            node.gc([(kept[0], IFNAME)])
        else:
            netns.run("ip", "netns", "del", os.path.basename(netns_path))
            node.agent.wait_for(lambda: host not in node.host_veths(), what="the veth gone with the pod's netns")
        node.assert_consistent({(kept[0], IFNAME): kept[1]})


@pytest.mark.parametrize("recovery", ["gc", "retried-add"])
def test_plugin_killed_mid_add(recovery):
    """SIGKILL of the plugin while the agent works on its ADD: the agent finishes the attachment, but the
    runtime never got a result (it will DEL, or GC); GC reclaims it, a retried ADD returns it unchanged."""
    with cni_node.node() as node:
        cid, netns_path = node.pod("orphan")
        node.agent.stop()
        node.agent.failpoint = "configure_pod"
        node.agent.start()
        plugin = node.start_plugin("ADD", cid, netns_path)
        node.send(plugin, node.conf())
        node.agent.wait_paused()
        plugin.kill()
        assert plugin.wait(30) == -signal.SIGKILL
        plugin.stdout.close()
        plugin.stderr.close()
        node.agent.release()
        # The agent completes the ADD for a plugin that is gone; its answer goes nowhere.
        node.agent.wait_for(lambda: len(node.endpoints()) == 1, what="the orphaned ADD completed")
        address = str(node.ipam.lookup(cid, IFNAME))
        node.assert_consistent({(cid, IFNAME): netns_path})
        if recovery == "gc":
            node.gc([])
            node.assert_consistent({})
        else:
            assert node.add(cid, netns_path) == address
            node.assert_consistent({(cid, IFNAME): netns_path})
        assert node.agent.health()["ready"] and node.agent.proc.poll() is None
