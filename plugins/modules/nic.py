#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) Sluice developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: nic
short_description: Prepare a node NIC for the Sluice datapath (MTU, XDP mode, driver, ethtool settings)
version_added: 0.1.0
description:
  - Sets the MTU, ethtool channels, rings and offloads of the node's NIC, configures the NIC driver's module options,
    and attaches Sluice's XDP program in the wanted mode (the tc program of the NIC is attached with it).
  - Every requested value is checked against what the device reports before anything is changed, so bad input
    fails naming the value and leaves the NIC as it was.
  - The logic lives in the C(sluice.nic) and C(sluice.datapath) modules of the node package; this module is glue.
extends_documentation_fragment:
  - sluice.network.sluice
attributes:
  check_mode:
    description: Reports what would change; nothing is changed.
  diff_mode:
    support: full
    description: Before and after of the managed settings.
options:
  name:
    description:
      - Interface name, in the network namespace the module runs in.
    type: str
    required: true
  mtu:
    description:
      - MTU to set (68 to 65535). Left alone when not given.
    type: int
  xdp_mode:
    description:
      - How Sluice's XDP program is attached.
      - V(native) needs a driver with native XDP support and fails (changing nothing) on one without.
      - V(generic) uses the kernel's generic (skb) XDP hook, which works on every device.
      - V(best-effort) uses native XDP when the driver has it, generic XDP otherwise.
      - V(disabled) detaches Sluice's XDP program.
      - Any mode but V(disabled) needs the datapath loaded under O(pin_root) (see M(sluice.network.datapath)).
    type: str
    choices: [native, generic, best-effort, disabled]
    default: best-effort
  driver:
    description:
      - Kernel module of the NIC and its options.
      - A driver built into the kernel (or a kernel that cannot load modules) is detected and reported through
        RV(driver.builtin) with a warning, because its options can only be given on the kernel command line.
    type: dict
    suboptions:
      name:
        description: Kernel module name, for example V(ixgbe) or V(mlx5_core).
        type: str
        required: true
      options:
        description: Module parameters (name to value).
        type: dict
        default: {}
      persist:
        description:
          - Write C(/etc/modprobe.d/sluice-<name>.conf) (options) and C(/etc/modules-load.d/sluice-<name>.conf)
            (load at boot). V(false) removes those files.
        type: bool
        default: true
  channels:
    description:
      - Queue counts, set with C(ethtool -L). Fails when the driver does not support a requested count.
    type: dict
    suboptions:
      combined:
        description: Combined channels.
        type: int
      rx:
        description: RX-only channels.
        type: int
      tx:
        description: TX-only channels.
        type: int
  rings:
    description:
      - Ring sizes, set with C(ethtool -G). Fails when the driver does not support them (veth does not).
    type: dict
    suboptions:
      rx:
        description: RX ring size.
        type: int
      tx:
        description: TX ring size.
        type: int
  offloads:
    description:
      - Features to turn on (V(true)) or off (V(false)) with C(ethtool -K), by short (V(lro)) or long
        (V(large-receive-offload)) name. XDP typically wants V(lro) off.
      - A feature the driver has fixed to the other value fails the task.
    type: dict
notes:
  - C(ethtool) and C(modprobe) run with argument lists, never through a shell.
  - Settings the driver cannot report (for example rings on veth) are listed in RV(unsupported) and only fail the task
    when they were requested.
seealso:
  - module: sluice.network.datapath
"""

EXAMPLES = r"""
- name: Node NIC with native XDP when possible, LRO off
  sluice.network.nic:
    name: eth0
    mtu: 9000
    xdp_mode: best-effort
    offloads:
      lro: false

- name: Driver options that persist across reboots, 8 combined queues
  sluice.network.nic:
    name: ens1f0
    xdp_mode: native
    driver:
      name: ixgbe
      options:
        allow_unsupported_sfp: "1"
    channels:
      combined: 8
    rings:
      rx: 4096
      tx: 4096

- name: Take XDP off a NIC
  sluice.network.nic:
    name: eth0
    xdp_mode: disabled
"""

RETURN = r"""
interface:
  description: The interface name.
  returned: always
  type: str
  sample: eth0
mtu:
  description: MTU in force (or that would be in force, in check mode).
  returned: always
  type: int
  sample: 1500
xdp_mode:
  description: XDP mode in force after the task, V(native), V(generic) or V(none).
  returned: always
  type: str
  sample: native
driver:
  description: The NIC's driver.
  returned: always
  type: dict
  contains:
    name:
      description: Driver name (the O(driver.name) given, else what C(ethtool -i) reports).
      type: str
      sample: veth
    builtin:
      description: Whether the driver is built into the kernel (options then need the kernel command line).
      type: bool
      sample: true
    files:
      description: Persistent configuration files written (or removed) for the driver.
      type: list
      elements: str
      sample: [/etc/modprobe.d/sluice-ixgbe.conf, /etc/modules-load.d/sluice-ixgbe.conf]
channels:
  description: Channel counts in force (C(ethtool -l)), null when the driver cannot report them.
  returned: always
  type: dict
  sample: {combined: null, rx: 1, tx: 1, other: null}
rings:
  description: Ring sizes in force (C(ethtool -g)), null when the driver cannot report them.
  returned: always
  type: dict
  sample: null
offloads:
  description: State of the requested offloads after the task.
  returned: always
  type: dict
  sample: {lro: false}
unsupported:
  description: Settings the driver cannot report or change (not requested, so not a failure).
  returned: always
  type: list
  elements: str
  sample: [rings]
changes:
  description: What was (or would be) changed, per setting.
  returned: always
  type: dict
  sample: {mtu: 9000, offloads: {gro: true}}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.parsing.convert_bool import boolean

from ansible_collections.sluice.network.plugins.module_utils.sluice import (
    HAS_SLUICE,
    datapath,
    datapath_argument_spec,
    ensure_sluice,
)

if HAS_SLUICE:
    from sluice import nic as sl_nic
    from sluice.datapath import DatapathError
    from sluice.bpf.libbpf import BpfError


def main():
    argument_spec = dict(
        name=dict(type="str", required=True),
        mtu=dict(type="int"),
        xdp_mode=dict(type="str", default="best-effort", choices=["native", "generic", "best-effort", "disabled"]),
        driver=dict(type="dict", options=dict(
            name=dict(type="str", required=True),
            options=dict(type="dict", default={}),
            persist=dict(type="bool", default=True),
        )),
        channels=dict(type="dict", options=dict(combined=dict(type="int"), rx=dict(type="int"), tx=dict(type="int"))),
        rings=dict(type="dict", options=dict(rx=dict(type="int"), tx=dict(type="int"))),
        offloads=dict(type="dict"),
    )
    argument_spec.update(datapath_argument_spec())
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    ensure_sluice(module)
    p = module.params
    ifname = p["name"]

    def runner(argv):
        return module.run_command(argv)

    nic = sl_nic.Nic(ifname, runner=runner, ethtool=module.get_bin_path("ethtool") or "ethtool")
    try:
        dp = datapath(module)
        plan = sl_nic.plan(nic, dp, dict(p, offloads=_offloads(p["offloads"])),
                           modprobe=module.get_bin_path("modprobe"), warn=module.warn)
        if plan.changes and not module.check_mode:
            sl_nic.apply(nic, dp, plan, p["xdp_mode"])
    except sl_nic.NicError as e:
        module.fail_json(msg=str(e), interface=ifname, changed=False)
    except (DatapathError, BpfError) as e:
        module.fail_json(msg=f"{ifname}: {e}", interface=ifname)
    result = dict(plan.result(), interface=ifname)
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=plan.before, after=plan.after)
    module.exit_json(**result)


def _offloads(offloads):
    """The offloads option with Ansible's booleans ("yes", "off", ...) as bool."""
    out = {}
    for name, value in (offloads or {}).items():
        try:
            out[name] = boolean(value, strict=True)
        except TypeError:
            raise sl_nic.NicError(f"offloads.{name}: {value!r} is not a boolean") from None
    return out


if __name__ == "__main__":
    main()
