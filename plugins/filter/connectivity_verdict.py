# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""connectivity_verdict: judges one check of the connectivity suite (playbooks/verify.yml)."""

from __future__ import annotations

import json

from ansible.errors import AnsibleFilterError

DOCUMENTATION = r"""
name: connectivity_verdict
short_description: Judge a connectivity check by its probe's answer and the datapath counters it moved
description:
  - A check passes when the probe's outcome is the expected one (answered or not; by which backend; seen from
    which address) and every step of its datapath path counted packets between the two metric readings.
options:
  _input:
    description:
      - The check, with C(name), C(expect) (C(ok), and optionally C(reply_ips), C(peer), C(from)) and C(path)
        (steps, each with C(node), C(hook) and C(outcomes), a list of outcome names that count).
    type: dict
    required: true
  probe:
    description: The registered result of C(sluice connectivity probe) (its C(stdout) is JSON).
    type: dict
    required: true
  before:
    description: Per node, the C(sluice --json metrics) reading before the probe.
    type: dict
    required: true
  after:
    description: The same, after the probe.
    type: dict
    required: true
"""

EXAMPLES = r"""
- name: Judge a check
  ansible.builtin.set_fact:
    verdict: "{{ check | sluice.network.connectivity_verdict(probe_result, before, after) }}"
"""

RETURN = r"""
_value:
  description: C(name), C(passed), C(reasons) (why it failed), C(answer) (the probe's JSON) and C(path) (each step
    with the C(packets) it counted, and C(by_outcome), the outcomes that counted them).
  type: dict
"""


def _packets(reading, hook, outcome):
    return sum(int(m["packets"]) for m in reading if m["hook"] == hook and m["outcome"] == outcome)


def _answer(probe):
    try:
        return json.loads(probe.get("stdout") or "")
    except ValueError:
        return {"ok": False, "error": (probe.get("stderr") or probe.get("msg") or "no output").strip()}


def connectivity_verdict(check, probe, before, after):
    expect = check.get("expect", {})
    answer = _answer(probe)
    reasons = []
    want_ok = expect.get("ok", True)
    answered = answer.get("answered", 1 if answer.get("ok") else 0)
    if want_ok and not answer.get("ok"):
        reasons.append(f"no answer: {answer.get('error')}")
    if not want_ok and answered:
        reasons.append(f"answered ({answered}), but should not have")
    if want_ok and answer.get("ok"):
        strangers = sorted(set(answer.get("answered_by") or []) - set(expect.get("reply_ips") or []))
        if expect.get("reply_ips") and strangers:
            reasons.append(f"answered by {', '.join(strangers)}, not one of {', '.join(expect['reply_ips'])}")
        for key in ("peer", "from"):
            if expect.get(key) and answer.get(key) != expect[key]:
                reasons.append(f"the {key} address is {answer.get(key)}, expected {expect[key]}")
    path = []
    for step in check.get("path", []):
        node, hook, outcomes = step["node"], step["hook"], step["outcomes"]
        if node not in after or node not in before:
            raise AnsibleFilterError(f"connectivity_verdict: {check.get('name')}: no metrics from node {node!r}")
        by_outcome = {o: _packets(after[node], hook, o) - _packets(before[node], hook, o) for o in outcomes}
        packets = sum(by_outcome.values())
        path.append({"node": node, "hook": hook, "outcomes": outcomes, "packets": packets,
                     "by_outcome": {o: n for o, n in by_outcome.items() if n}})
        if packets <= 0:
            reasons.append(f"{node}: {hook} counted nothing as {' or '.join(outcomes)}")
    return {"name": check.get("name"), "passed": not reasons, "reasons": reasons, "answer": answer, "path": path}


class FilterModule:
    def filters(self):
        return {"connectivity_verdict": connectivity_verdict}
