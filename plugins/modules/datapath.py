#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: datapath
short_description: Load, upgrade and attach the Sluice eBPF datapath on a node
version_added: 0.1.0
description:
  - Loads the datapath objects from O(obj_dir), pins programs, maps and links under O(pin_root), and attaches the
    socket hooks (cgroup v2), the sk_msg program (sockhash) and optionally the NIC's tc program.
  - Idempotent by program tag. The tags the objects would load with are computed without pinning anything and
    compared with the pinned programs; only different code is loaded.
  - An upgrade is atomic. Every object must pass the verifier first; then each pinned link is switched to the new
    program with C(BPF_LINK_UPDATE), so no hook is ever without a program.
  - A program the verifier rejects fails the task with the verifier's log and leaves the running datapath attached.
  - The XDP program is attached by M(sluice.network.nic).
extends_documentation_fragment:
  - sluice.network.sluice
attributes:
  check_mode:
    description: Objects are verified by the kernel to compute their tags; nothing is pinned or attached.
  diff_mode:
    support: full
    description: Before and after of the pinned program tags and of the attachments.
options:
  state:
    description:
      - V(present) loads (or upgrades) and attaches the datapath.
      - V(absent) detaches every Sluice link and removes O(pin_root) (uninstall).
    type: str
    choices: [present, absent]
    default: present
  nic:
    description:
      - Also attach C(tc_from_nic) to the tc ingress (tcx) of this interface.
    type: str
  cgroup:
    description:
      - cgroup v2 directory for the socket hooks. Defaults to the root of the cgroup2 hierarchy.
    type: path
  socket_lb:
    description:
      - Attach the cgroup socket load-balancing hooks (connect4, sendmsg4, recvmsg4, getpeername4) and sockops.
      - V(false) detaches them when they are attached.
    type: bool
    default: true
  sockmap:
    description:
      - Attach the sk_msg program to the sockhash (same-node TCP acceleration).
      - V(false) detaches it when it is attached.
    type: bool
    default: true
notes:
  - The cgroup links are pinned by program name; when they are attached to another cgroup than O(cgroup) they are
    left there (detach them first with O(socket_lb=false)).
seealso:
  - module: sluice.network.nic
  - module: sluice.network.info
"""

EXAMPLES = r"""
- name: Load the datapath with every hook, tc on the node NIC
  sluice.network.datapath:
    obj_dir: /opt/sluice/bpf
    nic: eth0

- name: Datapath without the socket hooks
  sluice.network.datapath:
    socket_lb: false
    sockmap: false

- name: Uninstall
  sluice.network.datapath:
    state: absent
"""

RETURN = r"""
programs:
  description: Program name to tag in force (or that would be in force, in check mode).
  returned: always
  type: dict
  sample: {tc_from_pod: 6c2d6f1a5d2c8a2e, tc_from_nic: 0e3b7a6d24c5b1f9}
replaced:
  description: Programs whose code was (or would be) replaced.
  returned: always
  type: list
  elements: str
  sample: [tc_from_pod]
links_updated:
  description: Pinned links switched to new code with C(BPF_LINK_UPDATE) (C(<target>/<program>)).
  returned: always
  type: list
  elements: str
  sample: [eth0/tc_from_nic]
links_created:
  description: Links attached (or that would be) by this task.
  returned: always
  type: list
  elements: str
  sample: [cgroup/sock_connect4, sockhash/sk_msg_redir]
links_removed:
  description: Links detached by this task.
  returned: always
  type: list
  elements: str
  sample: []
object_hash:
  description: Hash of the datapath objects in O(obj_dir).
  returned: when O(state=present)
  type: str
  sample: 3f1c2a9e0b7d6c5a
verifier_log:
  description: The verifier's log of a rejected program.
  returned: failure, when the verifier rejected a program
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sluice.network.plugins.module_utils.sluice import (
    HAS_SLUICE,
    datapath,
    datapath_argument_spec,
    ensure_sluice,
)

if HAS_SLUICE:
    from sluice.bpf.libbpf import BpfError, VerifierError
    from sluice.datapath import NODE_HOOKS, DatapathError, cgroup2_root


def _attached(dp):
    """'<target>/<program>' of every live pinned link."""
    return sorted(f"{lk['target']}/{lk['program']}" for lk in dp.links() if lk["attached"])


def main():
    argument_spec = dict(
        state=dict(type="str", default="present", choices=["present", "absent"]),
        nic=dict(type="str"),
        cgroup=dict(type="path"),
        socket_lb=dict(type="bool", default=True),
        sockmap=dict(type="bool", default=True),
    )
    argument_spec.update(datapath_argument_spec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    ensure_sluice(module)
    dp = datapath(module)
    try:
        if module.params["state"] == "absent":
            _absent(module, dp)
        _present(module, dp)
    except VerifierError as e:
        module.fail_json(msg=f"the verifier rejected the datapath in {module.params['obj_dir']}; the running "
                             f"datapath is unchanged. Verifier log (end):\n{e.excerpt()}",
                         verifier_log=e.log, changed=False)
    except (DatapathError, BpfError, OSError) as e:
        module.fail_json(msg=str(e))


def _absent(module, dp):
    before = {"programs": dp.pinned_tags(), "links": _attached(dp)} if os.path.isdir(dp.root) else {}
    changed = os.path.exists(dp.root)
    if changed and not module.check_mode:
        dp.remove()
    result = dict(changed=changed, programs={}, replaced=[], links_updated=[], links_created=[],
                  links_removed=before.get("links", []))
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before, after={})
    module.exit_json(**result)


def _present(module, dp):
    p = module.params
    if p["nic"]:
        try:
            import socket
            socket.if_nametoindex(p["nic"])
        except OSError:
            module.fail_json(msg=f"nic: interface {p['nic']!r} does not exist")
    if p["cgroup"] and not os.path.isdir(p["cgroup"]):
        module.fail_json(msg=f"cgroup: {p['cgroup']!r} is not a cgroup v2 directory")
    loaded = dp.is_loaded()
    before_links = _attached(dp) if os.path.isdir(dp.root) else []
    before = {"programs": dp.pinned_tags() if os.path.isdir(dp.root) else {}, "links": before_links}

    # programs (check mode: the kernel verifies the objects, nothing is pinned)
    report = dp.load(check_mode=module.check_mode)

    # links: the node's hooks (the NIC's are named after the NIC)
    hooks = {group: [f"{p['nic'] if group == 'nic' else group}/{prog}" for prog in progs]
             for group, progs in NODE_HOOKS.items()}
    wanted, unwanted = [], []
    if p["nic"]:
        wanted += hooks["nic"]
    (wanted if p["socket_lb"] else unwanted).extend(hooks["cgroup"])
    (wanted if p["sockmap"] else unwanted).extend(hooks["sockhash"])
    created, removed = [], []
    if module.check_mode:
        created = [lk for lk in wanted if lk not in before_links]
        removed = [lk for lk in unwanted if lk in before_links]
    else:
        if p["nic"]:
            created += [f"{p['nic']}/{prog}" for prog in NODE_HOOKS["nic"] if dp.attach_tc(p["nic"], prog)]
        if p["socket_lb"]:
            created += [f"cgroup/{h}" for h in dp.attach_cgroup(p["cgroup"] or cgroup2_root())]
        elif any(lk.startswith("cgroup/") for lk in before_links) or os.path.isdir(os.path.join(dp.links_dir, "cgroup")):
            removed += dp.detach_device("cgroup")
        if p["sockmap"]:
            if dp.attach_sockmap():
                created += hooks["sockhash"]
        elif os.path.isdir(os.path.join(dp.links_dir, "sockhash")):
            removed += dp.detach_device("sockhash")

    after_links = sorted((set(before_links) | set(created)) - set(removed))
    after = {"programs": report.programs, "links": after_links}
    result = dict(
        changed=bool(report.changed or created or removed or not loaded),
        programs=report.programs,
        replaced=report.replaced,
        links_updated=report.links_updated,
        links_created=sorted(created),
        links_removed=sorted(removed),
        object_hash=report.object_hash,
    )
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before, after=after)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
