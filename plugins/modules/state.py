#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: state
short_description: Write the node's Sluice desired state and apply it to the datapath maps
version_added: 0.1.0
description:
  - Validates the desired state with C(sluice.state.DesiredState.parse) (an error names the bad value and nothing is
    written), writes it as JSON to O(path), and with O(apply=true) applies it to the datapath maps at once through
    C(sluice.state.Reconciler) instead of waiting for the agent's file watch.
  - The plan (what applying changes in the maps and kernel routes) is computed against the live maps and returned,
    so C(--check --diff) reports exactly the pending changes.
extends_documentation_fragment:
  - sluice.network.sluice
attributes:
  check_mode:
    description: Validates, computes the plan and the file diff; writes and applies nothing.
  diff_mode:
    support: full
    description: Before and after of the state file; RV(plan) holds the pending map changes.
options:
  path:
    description: The state file the agent watches.
    type: path
    default: /etc/sluice/state.json
  node:
    description: This node.
    type: dict
    required: true
    suboptions:
      name:
        description: Node name.
        type: str
        required: true
      ip:
        description: Node IPv4 address.
        type: str
        required: true
      nic:
        description: The node NIC (routes to other nodes leave through it in V(native) routing).
        type: str
        required: true
      pod_cidr:
        description: This node's pod CIDR.
        type: str
        required: true
  routing:
    description: How pod traffic reaches other nodes.
    type: dict
    suboptions:
      mode:
        description: V(native) routes to the other nodes' IPs; V(vxlan) encapsulates.
        type: str
        choices: [native, vxlan]
        default: native
      vxlan_device:
        description: Name of the (collect_md) VXLAN device.
        type: str
        default: sluice_vxlan
      vxlan_port:
        description: VXLAN UDP port.
        type: int
        default: 4789
      vni:
        description: VXLAN network identifier.
        type: int
        default: 1
  routes:
    description: Other nodes' pod CIDRs and how to reach them.
    type: list
    elements: dict
    default: []
    suboptions:
      cidr:
        description: Pod CIDR of the other node.
        type: str
        required: true
      nexthop:
        description: The other node's IP.
        type: str
        required: true
      node:
        description: The other node's name (informational).
        type: str
  services:
    description: Cluster services (socket and tc load balancing).
    type: list
    elements: dict
    default: []
    suboptions: &frontend
      name:
        description: Service name (used in error messages).
        type: str
      vip:
        description: Virtual IP.
        type: str
        required: true
      port:
        description: Virtual port.
        type: int
        required: true
      protocol:
        description: Protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      backends:
        description: Backends, each a dict with C(ip) and C(port).
        type: list
        elements: dict
        default: []
      affinity_timeout:
        description:
          - Seconds of ClientIP session affinity (1 to 86400). A client (a pod or a node for a service, an address
            for an LB VIP) keeps its backend while it reuses it within this time. Unset for none.
        type: int
  prefilter:
    description: CIDRs the XDP prefilter drops.
    type: list
    elements: str
    default: []
  failsafe:
    description:
      - The node's management ports, C(PROTOCOL:PORT) or C(PROTOCOL:FIRST-LAST). A packet to the node on one of them,
        or from one of them to the node (the reply to its own connection), passes before the prefilter, the load
        balancers or any later filter see it, whatever else the state says.
      - Unset or empty, the node's default, C(sluice.state.DEFAULT_FAILSAFE) (SSH C(tcp:22), the Kubernetes API
        C(tcp:6443), etcd C(tcp:2379-2380), kubelet C(tcp:10250), DNS C(tcp:53) and C(udp:53), DHCP C(udp:67-68));
        a node always keeps a failsafe. At most 64 ports.
    type: list
    elements: str
  network_policy:
    description:
      - Enforce Kubernetes NetworkPolicy in the datapath. The node's pods' flows are tracked, and the agent, given a
        kubeconfig, isolates pods as the API's NetworkPolicies say. Without the API nothing is isolated.
    type: bool
    default: false
  lb_vips:
    description: External load-balancer VIPs (XDP, Maglev), same shape as O(services), and O(lb_vips[].keep_source).
    type: list
    elements: dict
    default: []
    suboptions:
      <<: *frontend
      keep_source:
        description:
          - A backend that is a pod of this node sees the client's address and port (Kubernetes'
            C(externalTrafficPolicy=Local)); other backends are reached with the node's address, as without it.
        type: bool
        default: false
  xdp:
    description: XDP settings.
    type: dict
    suboptions:
      cpumap_cpus:
        description: CPUs the XDP program spreads packets to through the cpumap (empty for none).
        type: list
        elements: int
        default: []
  kubernetes_cache:
    description:
      - The agent's record of the frontends it last learnt from the Kubernetes API (a directory, one file per
        Service). The plan and the apply count them as desired too, so this task never removes a Kubernetes
        Service's entries. Where a Service and the state file ask for the same frontend, the state file wins (the
        agent reports the Service as a conflict).
      - Without the directory (no API, or the agent has not synced yet), the state file alone.
    type: path
    default: /var/lib/sluice/kubernetes
  apply:
    description:
      - Apply the state to the datapath maps now. With V(false) only the file is written and the agent applies it.
    type: bool
    default: true
  confirm_timeout:
    description:
      - Seconds within which the change must be confirmed (C(sluice confirm) on the node, over a new connection
        from the controller), or the node's agent restores the state in force before it and applies that
        (commit-confirm; the agent role does both). V(0), no confirmation.
      - Only a change of an existing state file is armed; RV(confirm_deadline) says until when it waits.
      - Whatever this option, the file's text is recorded beside it as the module's, so the agent does not take the
        change for a hand edit, which it arms itself (its setting C(hand_edit_confirm_timeout)); a hand edit still
        waiting for its confirmation is superseded by the module's state.
    type: int
    default: 0
notes:
  - The task reports a change when the state file content differs (RV(file_changed)), or when O(apply=true) and
    RV(plan) is not empty.
  - Without a loaded datapath the plan cannot be computed; O(apply=true) then fails before anything is written.
seealso:
  - module: sluice.network.datapath
  - module: sluice.network.info
"""

EXAMPLES = r"""
- name: Desired state of a node, applied at once
  sluice.network.state:
    node:
      name: node1
      ip: 192.0.2.11
      nic: eth0
      pod_cidr: 10.244.1.0/24
    routing:
      mode: native
    routes:
      - cidr: 10.244.2.0/24
        nexthop: 192.0.2.12
        node: node2
    services:
      - name: web
        vip: 10.96.0.10
        port: 80
        protocol: tcp
        backends:
          - ip: 10.244.1.5
            port: 8080
          - ip: 10.244.2.7
            port: 8080
    prefilter:
      - 198.51.100.0/24
  register: sluice_state

- name: Show what is pending
  ansible.builtin.debug:
    var: sluice_state.plan
"""

RETURN = r"""
path:
  description: The state file.
  returned: always
  type: str
  sample: /etc/sluice/state.json
plan:
  description:
    - Changes applying the state makes (or made) to the maps and routes, per section, each with C(add), C(change)
      and C(remove) lists. Empty when the datapath already matches. Null when no datapath is loaded.
  returned: always
  type: dict
  sample: {services: {add: [{frontend: 10.96.0.10:80/tcp, backends: ["10.244.1.5:8080"]}], change: [], remove: []}}
plan_text:
  description: The plan as the C(sluice) CLI renders it.
  returned: always
  type: str
  sample: "No changes: the datapath matches the state."
file_changed:
  description: Whether the state file content was (or would be) changed.
  returned: always
  type: bool
applied:
  description: Whether the plan was applied to the maps by this task.
  returned: always
  type: bool
confirm_pending:
  description: Whether the change waits for its confirmation (O(confirm_timeout)); unconfirmed, the agent reverts it.
  returned: always
  type: bool
confirm_deadline:
  description: Until when (seconds since the epoch) the change waits for its confirmation; null when none waits.
  returned: always
  type: float
"""

import json

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sluice.network.plugins.module_utils.sluice import (
    HAS_SLUICE,
    datapath,
    datapath_argument_spec,
    ensure_sluice,
)

if HAS_SLUICE:
    from sluice.bpf.libbpf import BpfError
    from sluice.datapath import DatapathError
    from sluice.state import DesiredState, Reconciler, StateError
    from sluice.state import confirm
    from sluice.state.sources import ApiFrontends, merge

FRONTEND = dict(
    name=dict(type="str"),
    vip=dict(type="str", required=True),
    port=dict(type="int", required=True),
    protocol=dict(type="str", default="tcp", choices=["tcp", "udp"]),
    backends=dict(type="list", elements="dict", default=[]),
    affinity_timeout=dict(type="int"),
)
LB_VIP = dict(FRONTEND, keep_source=dict(type="bool", default=False))


def build_state(p):
    """The state file document from the module options (only what is set)."""
    def clean(d):
        return {k: v for k, v in d.items() if v is not None}

    raw = {"node": clean(p["node"])}
    if p["routing"]:
        raw["routing"] = clean(p["routing"])
    raw["routes"] = [clean(r) for r in p["routes"]]
    raw["services"] = [clean(s) for s in p["services"]]
    raw["prefilter"] = list(p["prefilter"])
    if p["failsafe"]:
        raw["failsafe"] = list(p["failsafe"])
    raw["lb_vips"] = [clean(s) for s in p["lb_vips"]]
    if p["network_policy"]:
        raw["network_policy"] = True
    if p["xdp"]:
        raw["xdp"] = clean(p["xdp"])
    return raw


def main():
    argument_spec = dict(
        path=dict(type="path", default="/etc/sluice/state.json"),
        node=dict(type="dict", required=True, options=dict(
            name=dict(type="str", required=True),
            ip=dict(type="str", required=True),
            nic=dict(type="str", required=True),
            pod_cidr=dict(type="str", required=True),
        )),
        routing=dict(type="dict", options=dict(
            mode=dict(type="str", default="native", choices=["native", "vxlan"]),
            vxlan_device=dict(type="str", default="sluice_vxlan"),
            vxlan_port=dict(type="int", default=4789),
            vni=dict(type="int", default=1),
        )),
        routes=dict(type="list", elements="dict", default=[], options=dict(
            cidr=dict(type="str", required=True),
            nexthop=dict(type="str", required=True),
            node=dict(type="str"),
        )),
        services=dict(type="list", elements="dict", default=[], options=FRONTEND),
        prefilter=dict(type="list", elements="str", default=[]),
        failsafe=dict(type="list", elements="str"),
        network_policy=dict(type="bool", default=False),
        lb_vips=dict(type="list", elements="dict", default=[], options=LB_VIP),
        xdp=dict(type="dict", options=dict(cpumap_cpus=dict(type="list", elements="int", default=[]))),
        kubernetes_cache=dict(type="path", default="/var/lib/sluice/kubernetes"),
        apply=dict(type="bool", default=True),
        confirm_timeout=dict(type="int", default=0),
    )
    argument_spec.update(datapath_argument_spec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    ensure_sluice(module)
    p = module.params
    path = p["path"]
    raw = build_state(p)
    try:
        state = DesiredState.parse(raw)
    except StateError as e:
        module.fail_json(msg=f"invalid desired state: {e}", path=path, changed=False)
    try:
        state = merge(state, ApiFrontends.load(p["kubernetes_cache"]), Reconciler.route_check(state))[0]
    except StateError as e:
        module.fail_json(msg=f"the agent's Kubernetes cache is unusable: {e}", path=path, changed=False)
    text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
    try:
        with open(path) as f:
            before = f.read()
    except FileNotFoundError:
        before = None
    except OSError as e:
        module.fail_json(msg=f"cannot read {path}: {e}")
    file_changed = before != text

    dp = datapath(module)
    plan = None
    try:
        if dp.is_loaded():
            plan = Reconciler(dp).plan(state)
        elif p["apply"]:
            module.fail_json(msg=f"apply: the Sluice datapath is not loaded under {p['pin_root']}; run "
                                 "sluice.network.datapath first (or set apply=false to let the agent apply it)",
                             path=path, changed=False)
        else:
            module.warn(f"no datapath is loaded under {p['pin_root']}: the plan cannot be computed")
    except StateError as e:
        module.fail_json(msg=f"invalid desired state: {e}", path=path, changed=False)
    except (DatapathError, BpfError, OSError) as e:
        module.fail_json(msg=f"cannot compute the plan against the datapath under {p['pin_root']}: {e}",
                         path=path, changed=False)

    pending = bool(p["apply"] and plan is not None and plan.changed)
    applied = False
    armed = None
    if p["confirm_timeout"] < 0:
        module.fail_json(msg=f"confirm_timeout: {p['confirm_timeout']} is not a number of seconds (0: none)")
    if not module.check_mode:
        if p["confirm_timeout"] and before is not None and (file_changed or pending):
            try:
                armed = confirm.arm(path, before, p["confirm_timeout"], plan.to_dict() if plan is not None else {})
            except OSError as e:
                module.fail_json(msg=f"cannot keep the state in force as the checkpoint of {path}: {e}", changed=False)
        if file_changed:
            try:
                # Recorded as the module's (not a hand edit, which the agent would arm itself) as it is written.
                confirm.write(path, text)
            except OSError as e:
                module.fail_json(msg=f"cannot write {path}: {e}")
        if pending:
            try:
                plan = Reconciler(dp).apply(state)
                applied = True
            except (StateError, DatapathError, BpfError, OSError) as e:
                module.fail_json(msg=f"applying the state to the datapath failed: {e}", path=path,
                                 changed=file_changed, file_changed=file_changed)
    result = dict(
        changed=file_changed or pending,
        path=path,
        plan=plan.to_dict() if plan is not None else None,
        plan_text=plan.render() if plan is not None else "",
        file_changed=file_changed,
        applied=applied,
        confirm_pending=armed is not None,
        confirm_deadline=armed["deadline"] if armed else None,
    )
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before or "", after=text, before_header=path, after_header=path)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
