"""The connectivity suite's judge: outcome and datapath counters both decide."""

from __future__ import annotations

import json

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.sluice.network.plugins.filter.connectivity_verdict import connectivity_verdict
from ansible_collections.sluice.network.plugins.filter.nth_address import nth_address

CHECK = {"name": "pod-to-service", "expect": {"reply_ips": ["10.244.1.10", "10.244.2.10"], "peer": "10.96.0.10:80"},
         "path": [{"node": "node1", "hook": "sock_connect4", "outcomes": ["sock_xlate"]}]}
BEFORE = {"node1": [{"hook": "sock_connect4", "outcome": "sock_xlate", "packets": 4, "bytes": 0}]}
AFTER = {"node1": [{"hook": "sock_connect4", "outcome": "sock_xlate", "packets": 6, "bytes": 0},
                   {"hook": "tc_from_pod", "outcome": "pass", "packets": 9, "bytes": 900}]}


def probe(**answer):
    return {"stdout": json.dumps(answer), "stderr": "", "rc": 0}


def test_pass_when_answered_by_a_backend_and_the_path_counted():
    answer = probe(ok=True, answered=1, answered_by=["10.244.2.10"], reply={"ip": "10.244.2.10"}, peer="10.96.0.10:80")
    verdict = connectivity_verdict(CHECK, answer, BEFORE, AFTER)
    assert verdict["passed"] and verdict["reasons"] == []
    assert verdict["path"] == [{"node": "node1", "hook": "sock_connect4", "outcomes": ["sock_xlate"], "packets": 2,
                                "by_outcome": {"sock_xlate": 2}}]


def test_the_path_says_which_of_the_allowed_outcomes_counted():
    check = {"name": "lb", "expect": {}, "path": [{"node": "n1", "hook": "xdp_nic", "outcomes": ["xdp_tx", "lb_local"]}]}
    after = {"n1": [{"hook": "xdp_nic", "outcome": "xdp_tx", "packets": 7}, {"hook": "xdp_nic", "outcome": "pass", "packets": 3}]}
    verdict = connectivity_verdict(check, probe(ok=True), {"n1": []}, after)
    assert verdict["path"][0]["packets"] == 7 and verdict["path"][0]["by_outcome"] == {"xdp_tx": 7}


def test_the_right_answer_without_the_counters_is_a_failure():
    answer = probe(ok=True, answered=1, answered_by=["10.244.2.10"], reply={"ip": "10.244.2.10"}, peer="10.96.0.10:80")
    verdict = connectivity_verdict(CHECK, answer, BEFORE, BEFORE)
    assert not verdict["passed"]
    assert verdict["reasons"] == ["node1: sock_connect4 counted nothing as sock_xlate"]


@pytest.mark.parametrize("answer, reason", [
    (dict(ok=False, answered=0, answered_by=[], error="TimeoutError: timed out"), "no answer: TimeoutError: timed out"),
    (dict(ok=True, answered=2, answered_by=["10.244.1.10", "10.0.0.5"], peer="10.96.0.10:80"),
     "answered by 10.0.0.5, not one of 10.244.1.10, 10.244.2.10"),
    (dict(ok=True, answered=1, answered_by=["10.244.1.10"], peer="10.244.1.10:8080"),
     "the peer address is 10.244.1.10:8080, expected 10.96.0.10:80"),
])
def test_wrong_outcomes_are_named(answer, reason):
    verdict = connectivity_verdict(CHECK, probe(**answer), BEFORE, AFTER)
    assert not verdict["passed"] and reason in verdict["reasons"]


def test_expected_silence():
    check = {"name": "prefiltered", "expect": {"ok": False}, "path": []}
    assert connectivity_verdict(check, probe(ok=False, answered=0, error="timed out"), {}, {})["passed"]
    verdict = connectivity_verdict(check, probe(ok=False, answered=1, error="timed out"), {}, {})
    assert verdict["reasons"] == ["answered (1), but should not have"]


def test_a_probe_that_printed_no_json_is_a_failure_naming_its_error():
    verdict = connectivity_verdict(CHECK, {"stdout": "", "stderr": "nsenter: cannot open /run/netns/x\n"}, BEFORE, AFTER)
    assert verdict["reasons"][0] == "no answer: nsenter: cannot open /run/netns/x"


def test_metrics_missing_for_a_node_is_an_error():
    with pytest.raises(AnsibleFilterError, match="no metrics from node 'node1'"):
        connectivity_verdict(CHECK, probe(ok=True), {}, {})


def test_nth_address():
    assert nth_address("10.244.3.0/24", 10) == "10.244.3.10"
    with pytest.raises(AnsibleFilterError, match=r"nth_address: 300 is not an offset inside 10\.244\.3\.0/24"):
        nth_address("10.244.3.0/24", 300)
    with pytest.raises(AnsibleFilterError, match=r"nth_address: 'nope' is not an IPv4 CIDR"):
        nth_address("nope", 1)
