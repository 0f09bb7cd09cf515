"""sluice.policy.engine on a loaded datapath: the API's objects resolved into the policy maps, a change written
as its difference, a restarted engine (the agent's) that reads the maps back and rewrites nothing, and a pod
the CNI just created isolated before its runtime starts it."""

from __future__ import annotations

import pytest

from sluice import maps as m
from sluice.policy.engine import PolicyEngine, PolicyInputs
from sluice.policy.model import namespace_from_api, pod_from_api, policy_from_api
from sluice.policy.resolve import ID_HOST

pytestmark = pytest.mark.kernel

NODE = "node1"


def api_pod(name, ip, node=NODE, labels=None, ns="web"):
    return pod_from_api({"metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
                         "spec": {"nodeName": node, "containers": [{"name": "c"}]},
                         "status": {"phase": "Running", "podIPs": [{"ip": ip}] if ip else []}})


def inputs(*policies, pods=None) -> PolicyInputs:
    pods = pods or [api_pod("server", "10.1.1.5"), api_pod("client", "10.1.2.7", node="node2")]
    return PolicyInputs({f"{p.namespace}/{p.name}": p for p in pods},
                        {"web": namespace_from_api({"metadata": {"name": "web",
                                                                 "labels": {"kubernetes.io/metadata.name": "web"}}})},
                        {f"web/{i}": policy_from_api({"metadata": {"name": str(i), "namespace": "web"}, "spec": spec})
                         for i, spec in enumerate(policies)},
                        {NODE: ("192.168.1.11",), "node2": ("192.168.1.12",)})


ALLOW_CLIENT_8080 = {"podSelector": {"matchLabels": {"app": "server"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"port": 8080}]}]}


def maps_of(dp):
    with dp.open_map(m.PolicyMap) as pm, dp.open_map(m.IpcacheMap) as im, \
            dp.open_map(m.PolicyIsolationMap) as iso, dp.open_map(m.PolicyCidrsMap) as cm:
        return pm.entries(), im.items(), iso.items(), cm.items()


def test_policies_reach_the_maps_as_their_difference_and_a_restart_rewrites_nothing(datapath, tmp_path):
    dp = datapath
    identities = str(tmp_path / "identities.json")
    engine = PolicyEngine(dp, NODE, identities)
    engine.update(inputs(ALLOW_CLIENT_8080))
    entries, ipcache, isolation, _cidrs = maps_of(dp)
    client = ipcache["10.1.2.7/32"]
    assert ipcache["192.168.1.11/32"] == ID_HOST
    assert isolation == {"10.1.1.5": m.INGRESS}
    assert entries == {("10.1.1.5", m.INGRESS, client, 6, 8080, 16)}

    # A second rule: one entry more, nothing else written.
    engine.update(inputs(ALLOW_CLIENT_8080, {"podSelector": {"matchLabels": {"app": "server"}},
                                             "ingress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}))
    assert engine.health["last_apply_changes"] == 1
    assert maps_of(dp)[0] == {("10.1.1.5", m.INGRESS, client, 6, 8080, 16), ("10.1.1.5", m.INGRESS, 0, 17, 53, 16)}

    restarted = PolicyEngine(dp, NODE, identities)
    restarted.update(inputs(ALLOW_CLIENT_8080, {"podSelector": {"matchLabels": {"app": "server"}},
                                                "ingress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}))
    assert restarted.health["last_apply_changes"] == 0
    assert restarted.health["last_error"] is None

    # Every policy gone: nothing isolated, no entry left; the ipcache stays (pods still exist).
    restarted.update(inputs())
    entries, ipcache, isolation, cidrs = maps_of(dp)
    assert (entries, isolation, cidrs) == (set(), {}, {})
    assert "10.1.2.7/32" in ipcache


def test_a_pod_the_cni_just_created_is_isolated_before_the_api_shows_its_address(datapath, tmp_path):
    dp = datapath
    engine = PolicyEngine(dp, NODE, str(tmp_path / "identities.json"))
    fresh = api_pod("server", None)                  # scheduled, no address in its status yet
    engine.update(inputs({"podSelector": {}, "policyTypes": ["Ingress"]},
                         pods=[fresh, api_pod("client", "10.1.2.7", node="node2")]))
    assert maps_of(dp)[2] == {}
    engine.endpoint_added("10.1.1.9", "web/server")
    assert maps_of(dp)[2] == {"10.1.1.9": m.INGRESS}
    engine.endpoint_deleted("web/server")
    assert maps_of(dp)[2] == {}
