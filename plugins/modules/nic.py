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
author:
  - Sluice developers (@sluice-network)
extends_documentation_fragment:
  - sluice.network.sluice
attributes:
  check_mode:
    support: full
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

import os

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


def _xdp_wanted(mode):
    return {"best-effort": ["native", "generic"], "disabled": []}.get(mode, [mode])


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
        _run(module, nic)
    except sl_nic.NicError as e:
        module.fail_json(msg=str(e), interface=ifname, changed=False)
    except (DatapathError, BpfError) as e:
        module.fail_json(msg=f"{ifname}: {e}", interface=ifname)


def _run(module, nic):
    p = module.params
    ifname = p["name"]
    link = nic.link()  # fails naming the interface when it does not exist
    if p["mtu"] is not None:
        nic.check_mtu(p["mtu"])
    requested = {k: {kk: vv for kk, vv in (p[k] or {}).items() if vv is not None} for k in ("channels", "rings")}
    offloads_wanted = {}
    for name, value in (p["offloads"] or {}).items():
        try:
            offloads_wanted[name] = boolean(value, strict=True)
        except TypeError:
            raise sl_nic.NicError(f"offloads.{name}: {value!r} is not a boolean") from None

    # ---- read everything and plan every change before touching the device ----
    unsupported = []
    current = {}
    for what, reader in (("channels", nic.channels), ("rings", nic.rings)):
        try:
            current[what] = reader()
        except sl_nic.Unsupported:
            current[what] = None
            unsupported.append(what)
            if requested[what]:
                raise sl_nic.Unsupported(f"{what}: {ifname} (driver {nic.driver()}) does not support "
                                         f"`ethtool {'-L' if what == 'channels' else '-G'}`; "
                                         f"remove {what} from the task for this NIC")
    changes = {}
    if p["mtu"] is not None and link["mtu"] != p["mtu"]:
        changes["mtu"] = p["mtu"]
    if requested["channels"]:
        planned = nic.plan_channels(requested["channels"], current["channels"])
        if planned:
            changes["channels"] = planned
    if requested["rings"]:
        planned = nic.plan_rings(requested["rings"], current["rings"])
        if planned:
            changes["rings"] = planned
    offloads_before = nic.offloads(offloads_wanted) if offloads_wanted else {}
    if offloads_wanted:
        planned = nic.plan_offloads(offloads_wanted)
        if planned:
            changes["offloads"] = planned

    driver_name = nic.driver()
    modprobe = module.get_bin_path("modprobe")
    driver_out = {"name": driver_name, "builtin": None, "files": []}
    if driver_name:
        driver_out["builtin"] = sl_nic.driver_builtin(driver_name, modprobe=modprobe)
    driver_files = {}   # path -> wanted text, None to remove
    files_before = {}
    if p["driver"]:
        driver_out, driver_files, files_before = _plan_driver(module, nic, driver_name, modprobe, changes)

    dp = datapath(module)
    xdp_before = dp.xdp_mode(ifname)
    wanted = _xdp_wanted(p["xdp_mode"])
    xdp_after = xdp_before
    if (wanted and xdp_before not in wanted) or (not wanted and xdp_before != "none"):
        if not dp.is_loaded():
            raise sl_nic.NicError(f"xdp_mode {p['xdp_mode']}: the Sluice datapath is not loaded under "
                                  f"{p['pin_root']}; run sluice.network.datapath first")
        if wanted:
            native = nic.native_xdp()
            if p["xdp_mode"] == "native" and native is False:
                raise sl_nic.NicError(f"xdp_mode native: {ifname} (driver {driver_name}) cannot run XDP programs "
                                      "natively; use xdp_mode generic or best-effort")
            xdp_after = "generic" if native is False or wanted == ["generic"] else "native"
        else:
            xdp_after = "none"
        changes["xdp_mode"] = xdp_after
    if dp.is_loaded() and p["xdp_mode"] != "disabled" and not any(
            lk["target"] == ifname and lk["program"] == "tc_from_nic" and lk["attached"] for lk in dp.links()):
        changes["tc_from_nic"] = "attach"

    before = {"mtu": link["mtu"], "xdp_mode": xdp_before}
    after = {"mtu": changes.get("mtu", link["mtu"]), "xdp_mode": xdp_after}
    for what in ("channels", "rings"):
        if requested[what]:
            cur = current[what]["current"]
            before[what] = {k: cur.get(k) for k in requested[what]}
            after[what] = dict(before[what], **changes.get(what, {}))
    if offloads_wanted:
        before["offloads"] = offloads_before
        after["offloads"] = dict(offloads_before, **changes.get("offloads", {}))
    if driver_files:
        before["driver_files"] = files_before
        after["driver_files"] = driver_files

    # ---- apply, in an order where a failure leaves the least behind ----
    if changes and not module.check_mode:
        for path, text in driver_files.items():
            if text is None:
                os.unlink(path)
            else:
                sl_nic.write_file(path, text)
        if "modprobe" in changes:
            rc, out, err = module.run_command(changes["modprobe"])
            if rc != 0:
                raise sl_nic.NicError(f"driver {p['driver']['name']}: `{' '.join(changes['modprobe'])}` failed: "
                                      f"{(err or out).strip()}")
        if "mtu" in changes:
            nic.set_mtu(changes["mtu"])
        nic.set_channels(changes.get("channels", {}))
        nic.set_rings(changes.get("rings", {}))
        nic.set_offloads(changes.get("offloads", {}))
        if "xdp_mode" in changes or "tc_from_nic" in changes:
            xdp_after = dp.attach_nic(ifname, p["xdp_mode"])["xdp_mode"]
            after["xdp_mode"] = xdp_after
        for what in ("channels", "rings"):
            if what in changes:
                current[what] = getattr(nic, what)()
        after["mtu"] = nic.link()["mtu"]
    driver_out["files"] = sorted(driver_files)

    result = dict(
        changed=bool(changes),
        interface=ifname,
        mtu=after["mtu"],
        xdp_mode=xdp_after,
        driver=driver_out,
        channels=(current["channels"] or {}).get("current"),
        rings=(current["rings"] or {}).get("current"),
        offloads=after.get("offloads", {}),
        unsupported=unsupported,
        changes=changes,
    )
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before, after=after)
    module.exit_json(**result)


def _plan_driver(module, nic, driver_name, modprobe, changes):
    """(driver result, files to write or remove, their current content); adds to `changes`."""
    d = module.params["driver"]
    options = {k: str(v) for k, v in (d["options"] or {}).items()}
    sl_nic.check_driver(d["name"], options)
    if driver_name and sl_nic.module_name(driver_name) != sl_nic.module_name(d["name"]):
        module.warn(f"driver.name {d['name']!r} is not the driver of {nic.ifname} ({driver_name})")
    builtin = sl_nic.driver_builtin(d["name"], modprobe=modprobe)
    out = {"name": d["name"], "builtin": builtin, "files": []}
    files, before = {}, {}
    if builtin:
        if options:
            cmdline = " ".join(f"{d['name']}.{k}={v}" for k, v in sorted(options.items()))
            module.warn(f"driver {d['name']} is built into the kernel (or this kernel cannot load modules): "
                        f"its options need the kernel command line ({cmdline})")
        return out, files, before
    for path, text in sl_nic.driver_files(d["name"], options).items():
        have = sl_nic.read_file(path)
        if (d["persist"] and have != text) or (not d["persist"] and have is not None):
            files[path] = text if d["persist"] else None
            before[path] = have
    if files:
        changes["driver_files"] = sorted(files)
    if not sl_nic.module_loaded(d["name"]):
        changes["modprobe"] = sl_nic.modprobe_argv(d["name"], options, modprobe)
    else:
        params = sl_nic.module_params(d["name"])
        differ = sorted(k for k, v in options.items() if k in params and params[k] != v)
        if differ:
            module.warn(f"driver {d['name']} is loaded with other values of {', '.join(differ)}: "
                        "the new options take effect when the module is next loaded (e.g. after a reboot)")
    return out, files, before


if __name__ == "__main__":
    main()
