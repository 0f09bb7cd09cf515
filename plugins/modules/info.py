#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: info
short_description: Report the Sluice datapath, XDP, agent and endpoint state of a node
version_added: 0.1.0
description:
  - Reads the node's Sluice state and changes nothing.
  - Datapath status (programs and tags, pinned links with their targets and whether they are attached, map fill),
    the XDP mode in force on every NIC Sluice attached to, the agent's health over its socket (an unreachable agent
    is reported, not a failure), the pod endpoints, and the state file with whether the agent has applied it.
extends_documentation_fragment:
  - sluice.network.sluice
attributes:
  check_mode:
    description: The module never changes anything.
  diff_mode:
    support: none
    description: Nothing to diff.
options:
  agent_socket:
    description: The Sluice agent's Unix socket.
    type: path
    default: /run/sluice/agent.sock
  state_path:
    description: The desired state file.
    type: path
    default: /etc/sluice/state.json
  timeout:
    description: Seconds to wait for the agent's answer (more than 0).
    type: float
    default: 5.0
seealso:
  - module: sluice.network.datapath
  - module: sluice.network.state
"""

EXAMPLES = r"""
- name: Gather the Sluice state of the node
  sluice.network.info:
  register: node_info

- name: The datapath must be loaded and the agent healthy
  ansible.builtin.assert:
    that:
      - node_info.sluice.datapath.loaded
      - node_info.sluice.agent.reachable
      - node_info.sluice.state.applied
"""

RETURN = r"""
sluice:
  description: The node's Sluice state.
  returned: always
  type: dict
  contains:
    datapath:
      description: C(root), C(loaded), C(programs) (name to tag), C(links) (target, program, kind, attached, ids,
        tag) and C(maps) (name to C(entries)/C(max_entries)).
      type: dict
      sample: {root: /sys/fs/bpf/sluice, loaded: true, programs: {tc_from_pod: 6c2d6f1a5d2c8a2e}, links: [], maps: {}}
    xdp:
      description: Interface to the XDP mode in force (V(native), V(generic) or V(none)) for every device Sluice
        attached XDP to.
      type: dict
      sample: {eth0: native}
    agent:
      description: C(reachable), and C(health) from the agent or C(error) when it cannot be reached.
      type: dict
      sample: {reachable: true, health: {ready: true, last_error: null}}
    endpoints:
      description: Pod IP to endpoint (C(ifindex), C(pod_mac), C(host_mac), C(flags)) from the endpoints map.
      type: dict
      sample: {10.244.1.5: {ifindex: 12, pod_mac: "02:00:00:00:00:05", host_mac: "02:00:00:00:00:06", flags: 0}}
    state:
      description: >-
        C(path), C(exists), C(valid) with C(error) when it is not, C(in_sync) (the maps match it: the plan is
        empty), C(plan), and C(applied) (the agent reports it reconciled this file after its last change, with no
        error; null when the agent is unreachable).
      type: dict
      sample: {path: /etc/sluice/state.json, exists: true, valid: true, in_sync: true, applied: true, plan: {}}
"""

import dataclasses
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sluice.network.plugins.module_utils.sluice import (
    HAS_SLUICE,
    datapath,
    datapath_argument_spec,
    ensure_sluice,
)

if HAS_SLUICE:
    from sluice import agent_protocol
    from sluice import maps as sl_maps
    from sluice.bpf.libbpf import BpfError
    from sluice.datapath import DatapathError
    from sluice.netlink import LinkNotFound
    from sluice.state import DesiredState, Reconciler, StateError


def _agent(socket_path, timeout):
    if not os.path.exists(socket_path):
        return {"reachable": False, "error": f"{socket_path} does not exist (is sluice-agent running?)"}
    try:
        reply = agent_protocol.request(socket_path, {"op": "health"}, timeout=timeout)
    except (OSError, ValueError) as e:
        return {"reachable": False, "error": f"{socket_path}: {e}"}
    if not reply.get("ok"):
        return {"reachable": True, "error": str(reply.get("error"))}
    return {"reachable": True, "health": reply.get("result")}


def main():
    argument_spec = dict(
        agent_socket=dict(type="path", default="/run/sluice/agent.sock"),
        state_path=dict(type="path", default="/etc/sluice/state.json"),
        timeout=dict(type="float", default=5.0),
    )
    argument_spec.update(datapath_argument_spec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    ensure_sluice(module)
    p = module.params
    if not p["timeout"] > 0:
        module.fail_json(msg=f"timeout: {p['timeout']} is not a positive number of seconds")
    dp = datapath(module)
    out = {}
    try:
        if os.path.isdir(dp.root):
            status = dp.status()
        else:
            status = {"root": dp.root, "loaded": False, "programs": {}, "links": [], "maps": {}}
        out["datapath"] = status
        xdp = {}
        for lk in status["links"]:
            if lk["program"] == "xdp_nic":
                try:
                    xdp[lk["target"]] = dp.xdp_mode(lk["target"]) if lk["attached"] else "none"
                except LinkNotFound:
                    xdp[lk["target"]] = "none"
        out["xdp"] = xdp
        endpoints = {}
        if status["loaded"]:
            with dp.open_map(sl_maps.EndpointsMap) as eps:
                endpoints = {ip: dataclasses.asdict(ep) for ip, ep in sorted(eps.items().items())}
        out["endpoints"] = endpoints
    except (DatapathError, BpfError, OSError) as e:
        module.fail_json(msg=f"cannot read the datapath under {p['pin_root']}: {e}")

    out["agent"] = _agent(p["agent_socket"], p["timeout"])

    path = p["state_path"]
    st = {"path": path, "exists": os.path.exists(path), "valid": None, "in_sync": None, "plan": None,
          "applied": None}
    if st["exists"]:
        try:
            state = DesiredState.from_file(path)
            st["valid"] = True
            if out["datapath"]["loaded"]:
                plan = Reconciler(dp).plan(state)
                st["plan"] = plan.to_dict()
                st["in_sync"] = not plan.changed
        except StateError as e:
            st["valid"] = False
            st["error"] = str(e)
        except (DatapathError, BpfError, OSError) as e:
            st["error"] = f"cannot compute the plan: {e}"
        health = out["agent"].get("health")
        if health is not None:
            last = health.get("last_reconcile")
            st["applied"] = bool(health.get("ready") and not health.get("last_error") and last
                                 and health.get("state_file") == path and last >= os.stat(path).st_mtime)
    out["state"] = st
    module.exit_json(changed=False, sluice=out)


if __name__ == "__main__":
    main()
