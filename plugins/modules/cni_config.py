#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: cni_config
short_description: Install the Sluice CNI network configuration
version_added: 0.1.0
description:
  - Writes the conflist C(<conf_dir>/<priority>-sluice.conflist) with the C(sluice) plugin first and the
    O(chained_plugins) after it.
  - The plugin itself, C(<bin_dir>/sluice), is a compiled program (C(cni/sluice.c), built by C(make artifacts)) that
    the C(sluice.network.cni) role copies; O(state=absent) removes it with the conflist.
  - With O(exclusive=true) every other C(*.conf), C(*.conflist) and C(*.json) in O(conf_dir) is moved into
    C(<conf_dir>/.sluice-moved/) so the runtime cannot pick a stale configuration; O(state=absent) puts them back.
  - Rendering and file handling live in C(sluice.cniconf) and C(sluice.files) of the node package.
author:
  - Sluice developers (@sluice-network)
requirements:
  - sluice (the Sluice node package, installed by the sluice.network.node role)
attributes:
  check_mode:
    support: full
    description: Reports what would be written, moved or removed.
  diff_mode:
    support: full
    description: Before and after of the conflist text.
options:
  state:
    description:
      - V(present) writes the conflist; V(absent) removes it and the plugin and restores moved configurations.
    type: str
    choices: [present, absent]
    default: present
  conf_dir:
    description: The container runtime's CNI configuration directory.
    type: path
    default: /etc/cni/net.d
  bin_dir:
    description: The container runtime's CNI plugin directory.
    type: path
    default: /opt/cni/bin
  network_name:
    description: The C(name) of the CNI network.
    type: str
    default: sluice
  cni_version:
    description: The C(cniVersion) of the conflist.
    type: str
    choices: ['0.4.0', '1.0.0', '1.1.0']
    default: '1.1.0'
  mtu:
    description: MTU of the pod interfaces (the C(mtu) of the sluice plugin configuration). Omitted when not given.
    type: int
  agent_socket:
    description: The Sluice agent's Unix socket the plugin talks to.
    type: path
    default: /run/sluice/agent.sock
  chained_plugins:
    description:
      - Plugin configurations appended after the sluice plugin, as they appear in the conflist. Each needs a C(type).
    type: list
    elements: dict
    default: []
  priority:
    description: File name prefix (0 to 99) deciding the conflist's place among the runtime's configurations.
    type: int
    default: 5
  exclusive:
    description:
      - Move every other configuration in O(conf_dir) into C(<conf_dir>/.sluice-moved/).
    type: bool
    default: false
seealso:
  - module: sluice.network.state
"""

EXAMPLES = r"""
- name: Sluice as the only CNI network, with portmap chained
  sluice.network.cni_config:
    mtu: 1450
    exclusive: true
    chained_plugins:
      - type: portmap
        capabilities:
          portMappings: true

- name: Remove the Sluice CNI configuration and restore the ones it moved aside
  sluice.network.cni_config:
    state: absent
"""

RETURN = r"""
conflist:
  description: Path of the conflist.
  returned: always
  type: str
  sample: /etc/cni/net.d/05-sluice.conflist
plugin:
  description: Path of the plugin (O(bin_dir)/sluice).
  returned: always
  type: str
  sample: /opt/cni/bin/sluice
moved:
  description:
    - Configurations moved aside into C(.sluice-moved/) by this task (O(state=present)), or put back (O(state=absent)).
  returned: always
  type: list
  elements: str
  sample: [10-bridge.conflist]
kept_aside:
  description: Moved configurations not restored because O(conf_dir) has a file of that name again.
  returned: when O(state=absent)
  type: list
  elements: str
  sample: []
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sluice.network.plugins.module_utils.sluice import HAS_SLUICE, ensure_sluice

if HAS_SLUICE:
    from sluice import cniconf, files


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="present", choices=["present", "absent"]),
            conf_dir=dict(type="path", default="/etc/cni/net.d"),
            bin_dir=dict(type="path", default="/opt/cni/bin"),
            network_name=dict(type="str", default="sluice"),
            cni_version=dict(type="str", default="1.1.0", choices=["0.4.0", "1.0.0", "1.1.0"]),
            mtu=dict(type="int"),
            agent_socket=dict(type="path", default="/run/sluice/agent.sock"),
            chained_plugins=dict(type="list", elements="dict", default=[]),
            priority=dict(type="int", default=5),
            exclusive=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    ensure_sluice(module)
    p = module.params
    try:
        conflist = os.path.join(p["conf_dir"], cniconf.conflist_name(p["priority"]))
        plugin = os.path.join(p["bin_dir"], cniconf.PLUGIN_NAME)
        if p["state"] == "absent":
            _absent(module, conflist, plugin)
        text = cniconf.render_conflist(cniconf.conflist(p["network_name"], p["cni_version"], p["mtu"],
                                                        p["agent_socket"], p["chained_plugins"]))
    except cniconf.CniConfError as e:
        module.fail_json(msg=str(e))

    before = files.read(conflist)
    others = cniconf.other_configs(p["conf_dir"], os.path.basename(conflist)) if p["exclusive"] else []
    changed = before != text or bool(others)
    if changed and not module.check_mode:
        try:
            cniconf.move_aside(p["conf_dir"], others)
            files.write(conflist, text, 0o644)
        except OSError as e:
            module.fail_json(msg=f"cannot install the CNI configuration: {e}", moved=others)
    if not os.access(plugin, os.X_OK):
        module.warn(f"the plugin {plugin} is missing (yet): the runtime cannot use the conflist without it")
    result = dict(changed=changed, conflist=conflist, plugin=plugin, moved=others)
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = [dict(before=before or "", after=text, before_header=conflist, after_header=conflist)]
        if others:
            result["diff"].append(dict(before="\n".join(others) + "\n", after="",
                                       before_header=f"{p['conf_dir']} (moved to .sluice-moved/)",
                                       after_header=p["conf_dir"]))
    module.exit_json(**result)


def _absent(module, conflist, plugin):
    p = module.params
    before = files.read(conflist)
    back, kept = cniconf.restorable(p["conf_dir"])
    changed = before is not None or os.path.exists(plugin) or bool(back)
    if changed and not module.check_mode:
        cniconf.remove(conflist)
        cniconf.remove(plugin)
        back, kept = cniconf.restore_moved(p["conf_dir"])
    if kept:
        module.warn(f"kept in {os.path.join(p['conf_dir'], cniconf.MOVED_DIR)} because {p['conf_dir']} has a file "
                    f"of the same name again: {', '.join(kept)}")
    result = dict(changed=changed, conflist=conflist, plugin=plugin, moved=back, kept_aside=kept)
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before or "", after="", before_header=conflist, after_header=conflist)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
