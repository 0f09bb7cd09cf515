"""Node NIC settings: MTU, ethtool channels/rings/offloads, driver options and XDP capability.

Everything runs in the caller's network namespace (netlink and `ethtool`, never
/sys/class/net, which shows the namespace sysfs was mounted in). External tools
are run through a `runner(argv) -> (rc, stdout, stderr)` so the Ansible module
can pass its own `run_command`; argv lists only, never a shell string.

Every setter comes with a reader and a planner: `plan_*` checks the wanted value
against what the device reports (maximums, fixed features) and raises NicError
naming the bad value before anything is changed. `plan()` does that for a whole
NIC (MTU, queues, offloads, driver, XDP and tc programs) and `apply()` then makes
the planned changes: the nic Ansible module is these two calls.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from . import files, netlink
from .datapath import NIC_PROG, xdp_wanted

MTU_MIN, MTU_MAX = 68, 65535
CHANNEL_KEYS = ("combined", "rx", "tx", "other")
RING_KEYS = ("rx", "tx", "rx-mini", "rx-jumbo")

# ethtool's short feature names -> the names `ethtool -k` prints
FEATURE_ALIASES = {
    "rx": "rx-checksumming",
    "tx": "tx-checksumming",
    "sg": "scatter-gather",
    "tso": "tcp-segmentation-offload",
    "ufo": "udp-fragmentation-offload",
    "gso": "generic-segmentation-offload",
    "gro": "generic-receive-offload",
    "lro": "large-receive-offload",
    "rxvlan": "rx-vlan-offload",
    "txvlan": "tx-vlan-offload",
    "ntuple": "ntuple-filters",
    "rxhash": "receive-hashing",
}

Runner = Callable[[list], tuple]


class NicError(Exception):
    """Bad input or a failed operation; the message names the value and the device."""


class Unsupported(NicError):
    """The device (driver) does not support an operation, e.g. ethtool -G on veth."""


def default_runner(argv: list) -> tuple:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    return p.returncode, p.stdout, p.stderr


def _int_or_none(value: str):
    value = value.strip()
    return int(value) if value.isdigit() else None


def _parse_sections(text: str, keys, aliases: dict | None = None) -> dict:
    """The "Pre-set maximums" and "Current hardware settings" sections of `ethtool -l`/`-g`:
    {"max": {...}, "current": {...}} of `keys`, with None for n/a."""
    out = {"max": {}, "current": {}}
    section = None
    for line in text.splitlines():
        if line.startswith("Pre-set maximums"):
            section = "max"
        elif line.startswith("Current hardware settings"):
            section = "current"
        elif section and ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            key = (aliases or {}).get(key, key)
            if key in keys:
                out[section][key] = _int_or_none(value)
    return out


def parse_channels(text: str) -> dict:
    """`ethtool -l` -> {"max": {...}, "current": {...}} with None for n/a."""
    return _parse_sections(text, CHANNEL_KEYS)


def parse_rings(text: str) -> dict:
    """`ethtool -g` -> {"max": {...}, "current": {...}}."""
    return _parse_sections(text, RING_KEYS, {"rx mini": "rx-mini", "rx jumbo": "rx-jumbo"})


def parse_features(text: str) -> dict:
    """`ethtool -k` -> {feature: {"on": bool, "fixed": bool}}."""
    out = {}
    for line in text.splitlines()[1:]:
        m = re.match(r"^\s*([\w-]+):\s+(on|off)(.*)$", line)
        if m:
            out[m.group(1)] = {"on": m.group(2) == "on", "fixed": "[fixed]" in m.group(3)}
    return out


def feature_name(name: str) -> str:
    return FEATURE_ALIASES.get(name, name)


class Nic:
    def __init__(self, ifname: str, runner: Runner = default_runner, ethtool: str = "ethtool"):
        self.ifname = ifname
        self.run = runner
        self.ethtool_bin = ethtool

    # ---- basics --------------------------------------------------------------------

    def link(self) -> dict:
        try:
            return netlink.link(self.ifname)
        except netlink.LinkNotFound:
            raise NicError(f"interface {self.ifname!r} does not exist") from None

    def _ethtool(self, *args: str) -> str:
        rc, out, err = self.run([self.ethtool_bin, *args])
        if rc == 0:
            return out
        msg = (err or out).strip()
        if rc == 127 or ("not found" in msg and self.ethtool_bin in msg):
            raise NicError(f"ethtool is not installed (needed for {' '.join(args[:1])} on {self.ifname})")
        if "not supported" in msg.lower() or "operation not supported" in msg.lower():
            raise Unsupported(f"{self.ifname}: `ethtool {' '.join(args)}` is not supported by its driver: {msg}")
        raise NicError(f"{self.ifname}: `ethtool {' '.join(args)}` failed (rc={rc}): {msg}")

    def driver(self) -> str | None:
        try:
            out = self._ethtool("-i", self.ifname)
        except NicError:
            return None
        for line in out.splitlines():
            if line.startswith("driver:"):
                return line.split(":", 1)[1].strip() or None
        return None

    # ---- MTU -----------------------------------------------------------------------

    @staticmethod
    def check_mtu(mtu: int) -> int:
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
            raise NicError(f"mtu {mtu!r} is outside {MTU_MIN}..{MTU_MAX}")
        return mtu

    def set_mtu(self, mtu: int) -> bool:
        self.check_mtu(mtu)
        info = self.link()
        if info["mtu"] == mtu:
            return False
        with netlink.ipr() as ip:
            try:
                ip.link("set", index=info["ifindex"], mtu=mtu)
            except netlink.NetlinkError as e:
                raise NicError(f"{self.ifname}: cannot set mtu {mtu}: {e}") from None
        return True

    # ---- channels and rings --------------------------------------------------------

    def channels(self) -> dict:
        return parse_channels(self._ethtool("-l", self.ifname))

    def rings(self) -> dict:
        return parse_rings(self._ethtool("-g", self.ifname))

    def _plan_counts(self, what: str, wanted: dict, have: dict, keys) -> dict:
        """The subset of `wanted` that differs from the device, after checking it against the maximums."""
        changes = {}
        for key, value in sorted(wanted.items()):
            if value is None:
                continue
            if key not in keys:
                raise NicError(f"{what}: {key!r} is not one of {', '.join(keys)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise NicError(f"{what}.{key}: {value!r} is not a non-negative integer")
            maximum = have["max"].get(key)
            if maximum is None:
                raise Unsupported(f"{self.ifname}: {what}.{key} is not supported by its driver (ethtool reports n/a)")
            if value > maximum:
                raise NicError(f"{what}.{key}: {value} exceeds the maximum {maximum} of {self.ifname}")
            if have["current"].get(key) != value:
                changes[key] = value
        return changes

    def plan_channels(self, wanted: dict, have: dict | None = None) -> dict:
        """Changes `ethtool -L` has to make; `have` is a prior channels() reading."""
        return self._plan_counts("channels", wanted, have or self.channels(), CHANNEL_KEYS)

    def plan_rings(self, wanted: dict, have: dict | None = None) -> dict:
        """Changes `ethtool -G` has to make; `have` is a prior rings() reading."""
        return self._plan_counts("rings", wanted, have or self.rings(), RING_KEYS)

    def set_channels(self, changes: dict) -> None:
        if changes:
            self._ethtool("-L", self.ifname, *[str(x) for kv in sorted(changes.items()) for x in kv])

    def set_rings(self, changes: dict) -> None:
        if changes:
            self._ethtool("-G", self.ifname, *[str(x) for kv in sorted(changes.items()) for x in kv])

    # ---- offloads ------------------------------------------------------------------

    def features(self) -> dict:
        return parse_features(self._ethtool("-k", self.ifname))

    def offloads(self, names) -> dict:
        """Current on/off of the given features (short or long names), keyed as given."""
        have = self.features()
        return {n: have[feature_name(n)]["on"] for n in names if feature_name(n) in have}

    def plan_offloads(self, wanted: dict) -> dict:
        have = self.features()
        changes = {}
        for name, on in sorted(wanted.items()):
            if not isinstance(on, bool):
                raise NicError(f"offloads.{name}: {on!r} is not a boolean")
            feat = have.get(feature_name(name))
            if feat is None:
                raise NicError(f"offloads: {self.ifname} has no feature {name!r}")
            if feat["on"] == on:
                continue
            if feat["fixed"]:
                raise Unsupported(f"offloads.{name}: {self.ifname} cannot turn {name} "
                                  f"{'on' if on else 'off'} (fixed by its driver)")
            changes[name] = on
        return changes

    def set_offloads(self, changes: dict) -> None:
        if not changes:
            return
        args = [x for name, on in sorted(changes.items()) for x in (name, "on" if on else "off")]
        self._ethtool("-K", self.ifname, *args)
        have = self.offloads(changes)
        refused = sorted(n for n, on in changes.items() if have.get(n) != on)
        if refused:
            raise Unsupported(f"offloads: {self.ifname} refused to change {', '.join(refused)}")

    # ---- XDP capability --------------------------------------------------------------

    def xdp_features(self) -> int | None:
        """NETDEV_A_DEV_XDP_FEATURES of the device (kernel 6.3+), None when the kernel cannot tell."""
        return netlink.xdp_features(self.link()["ifindex"])

    def native_xdp(self) -> bool | None:
        """True/False when the kernel reports whether the driver does native XDP, else None."""
        features = self.xdp_features()
        return None if features is None else bool(features & netlink.NETDEV_XDP_ACT_BASIC)


# ---- kernel modules (drivers) -------------------------------------------------------------

def module_name(module: str) -> str:
    return module.replace("-", "_")


def driver_builtin(name: str, sysroot: str = "/", modprobe: str | None = "auto") -> bool:
    """True when `name` is built into the kernel (or modules cannot be loaded at all).

    A loadable module that is loaded has /sys/module/<name>/initstate; a built-in
    one has no initstate (and may have no /sys/module entry at all), and is
    listed in /lib/modules/<release>/modules.builtin."""
    mod = module_name(name)
    sysmod = os.path.join(sysroot, "sys/module", mod)
    if os.path.exists(os.path.join(sysmod, "initstate")):
        return False
    if os.path.isdir(sysmod):
        return True
    builtin = os.path.join(sysroot, "lib/modules", os.uname().release, "modules.builtin")
    try:
        with open(builtin) as f:
            if any(module_name(os.path.basename(line.strip())).removesuffix(".ko") == mod for line in f):
                return True
    except OSError:
        pass
    if modprobe == "auto":
        modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/usr/sbin:/sbin")
    return not modprobe


def module_loaded(name: str, sysroot: str = "/") -> bool:
    return os.path.exists(os.path.join(sysroot, "sys/module", module_name(name), "initstate"))


def module_params(name: str, sysroot: str = "/") -> dict:
    """Readable parameters of a loaded module."""
    pdir = os.path.join(sysroot, "sys/module", module_name(name), "parameters")
    out = {}
    if os.path.isdir(pdir):
        for p in sorted(os.listdir(pdir)):
            try:
                with open(os.path.join(pdir, p)) as f:
                    out[p] = f.read().strip()
            except OSError:
                continue
    return out


_TOKEN = re.compile(r"^[A-Za-z0-9_.,:/+=-]+$")


def check_driver(name: str, options: dict) -> None:
    if not name or not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise NicError(f"driver.name {name!r} is not a kernel module name")
    for key, value in (options or {}).items():
        if not re.match(r"^[A-Za-z0-9_]+$", str(key)):
            raise NicError(f"driver.options: {key!r} is not a module parameter name")
        if not _TOKEN.match(str(value)):
            raise NicError(f"driver.options.{key}: {value!r} contains characters a module parameter cannot hold")


def modprobe_conf(name: str, options: dict) -> str:
    """/etc/modprobe.d/sluice-<name>.conf"""
    text = "# Managed by sluice.network.nic\n"
    if options:
        text += f"options {module_name(name)} " + " ".join(f"{k}={v}" for k, v in sorted(options.items())) + "\n"
    return text


def modules_load_conf(name: str) -> str:
    """/etc/modules-load.d/sluice-<name>.conf"""
    return f"# Managed by sluice.network.nic\n{module_name(name)}\n"


def driver_files(name: str, options: dict, sysroot: str = "/") -> dict:
    """path -> wanted content of the persistent driver configuration."""
    return {
        os.path.join(sysroot, "etc/modprobe.d", f"sluice-{name}.conf"): modprobe_conf(name, options),
        os.path.join(sysroot, "etc/modules-load.d", f"sluice-{name}.conf"): modules_load_conf(name),
    }


def modprobe_argv(name: str, options: dict, modprobe: str = "modprobe") -> list:
    return [modprobe, module_name(name)] + [f"{k}={v}" for k, v in sorted((options or {}).items())]


# ---- the whole NIC: plan every change, then apply it ----------------------------------------

@dataclass
class NicPlan:
    changes: dict = field(default_factory=dict)       # setting -> what is (or would be) changed
    before: dict = field(default_factory=dict)        # the managed settings now
    after: dict = field(default_factory=dict)         # ... once the changes are made
    current: dict = field(default_factory=dict)       # channels/rings readings, None where the driver has none
    unsupported: list = field(default_factory=list)   # settings the driver cannot report (not requested)
    driver: dict = field(default_factory=dict)        # name, builtin, files
    driver_files: dict = field(default_factory=dict)  # path -> wanted text, None to remove

    def result(self) -> dict:
        """What the nic module returns (its RETURN), as planned or, after apply(), as in force."""
        return dict(
            changed=bool(self.changes),
            mtu=self.after["mtu"],
            xdp_mode=self.after["xdp_mode"],
            driver=self.driver,
            channels=(self.current["channels"] or {}).get("current"),
            rings=(self.current["rings"] or {}).get("current"),
            offloads=self.after.get("offloads", {}),
            unsupported=self.unsupported,
            changes=self.changes,
        )


def plan(nic: Nic, dp, wanted: dict, modprobe: str | None, warn: Callable[[str], None]) -> NicPlan:
    """Read the NIC and plan every change before anything is touched; bad or unsupported input raises
    NicError naming the value. `wanted`: the nic module's settings (name aside): mtu, xdp_mode, driver,
    channels, rings, offloads (name -> bool); None or empty leaves a setting alone. `dp` is the
    sluice.datapath.Datapath whose programs the NIC gets; `warn` reports what is not a failure."""
    ifname = nic.ifname
    link = nic.link()  # fails naming the interface when it does not exist
    if wanted["mtu"] is not None:
        nic.check_mtu(wanted["mtu"])
    requested = {k: {kk: vv for kk, vv in (wanted[k] or {}).items() if vv is not None} for k in ("channels", "rings")}
    offloads = wanted["offloads"] or {}
    p = NicPlan()
    for what, reader in (("channels", nic.channels), ("rings", nic.rings)):
        try:
            p.current[what] = reader()
        except Unsupported:
            p.current[what] = None
            p.unsupported.append(what)
            if requested[what]:
                raise Unsupported(f"{what}: {ifname} (driver {nic.driver()}) does not support "
                                  f"`ethtool {'-L' if what == 'channels' else '-G'}`; "
                                  f"remove {what} from the task for this NIC") from None
    if wanted["mtu"] is not None and link["mtu"] != wanted["mtu"]:
        p.changes["mtu"] = wanted["mtu"]
    for what, planner in (("channels", nic.plan_channels), ("rings", nic.plan_rings)):
        if requested[what]:
            planned = planner(requested[what], p.current[what])
            if planned:
                p.changes[what] = planned
    offloads_before = nic.offloads(offloads) if offloads else {}
    if offloads:
        planned = nic.plan_offloads(offloads)
        if planned:
            p.changes["offloads"] = planned

    driver_name = nic.driver()
    files_before = {}
    if wanted["driver"]:
        files_before = _plan_driver(p, nic, driver_name, wanted["driver"], modprobe, warn)
    else:
        p.driver = {"name": driver_name, "files": [],
                    "builtin": driver_builtin(driver_name, modprobe=modprobe) if driver_name else None}

    policy = wanted["xdp_mode"]
    xdp_before = dp.xdp_mode(ifname)
    xdp_after = xdp_before
    modes = xdp_wanted(policy)
    if (modes and xdp_before not in modes) or (not modes and xdp_before != "none"):
        if not dp.is_loaded():
            raise NicError(f"xdp_mode {policy}: the Sluice datapath is not loaded under {dp.root}; "
                           "run sluice.network.datapath first")
        if modes:
            native = nic.native_xdp()
            if policy == "native" and native is False:
                raise NicError(f"xdp_mode native: {ifname} (driver {driver_name}) cannot run XDP programs "
                               "natively; use xdp_mode generic or best-effort")
            xdp_after = "generic" if native is False or modes == ["generic"] else "native"
        else:
            xdp_after = "none"
        p.changes["xdp_mode"] = xdp_after
    if dp.is_loaded() and policy != "disabled" and not any(
            lk["target"] == ifname and lk["program"] == NIC_PROG and lk["attached"] for lk in dp.links()):
        p.changes[NIC_PROG] = "attach"

    p.before = {"mtu": link["mtu"], "xdp_mode": xdp_before}
    p.after = {"mtu": p.changes.get("mtu", link["mtu"]), "xdp_mode": xdp_after}
    for what in ("channels", "rings"):
        if requested[what]:
            cur = p.current[what]["current"]
            p.before[what] = {k: cur.get(k) for k in requested[what]}
            p.after[what] = dict(p.before[what], **p.changes.get(what, {}))
    if offloads:
        p.before["offloads"] = offloads_before
        p.after["offloads"] = dict(offloads_before, **p.changes.get("offloads", {}))
    if p.driver_files:
        p.before["driver_files"] = files_before
        p.after["driver_files"] = p.driver_files
    return p


def _plan_driver(p: NicPlan, nic: Nic, driver_name: str | None, d: dict, modprobe: str | None, warn) -> dict:
    """Plan the driver settings `d` (name, options, persist) into `p`; the current content of the files."""
    options = {k: str(v) for k, v in (d["options"] or {}).items()}
    check_driver(d["name"], options)
    if driver_name and module_name(driver_name) != module_name(d["name"]):
        warn(f"driver.name {d['name']!r} is not the driver of {nic.ifname} ({driver_name})")
    builtin = driver_builtin(d["name"], modprobe=modprobe)
    p.driver = {"name": d["name"], "builtin": builtin, "files": []}
    before = {}
    if builtin:
        if options:
            cmdline = " ".join(f"{d['name']}.{k}={v}" for k, v in sorted(options.items()))
            warn(f"driver {d['name']} is built into the kernel (or this kernel cannot load modules): "
                 f"its options need the kernel command line ({cmdline})")
        return before
    for path, text in driver_files(d["name"], options).items():
        have = files.read(path)
        if (d["persist"] and have != text) or (not d["persist"] and have is not None):
            p.driver_files[path] = text if d["persist"] else None
            before[path] = have
    p.driver["files"] = sorted(p.driver_files)
    if p.driver_files:
        p.changes["driver_files"] = sorted(p.driver_files)
    if not module_loaded(d["name"]):
        p.changes["modprobe"] = modprobe_argv(d["name"], options, modprobe)
    else:
        params = module_params(d["name"])
        differ = sorted(k for k, v in options.items() if k in params and params[k] != v)
        if differ:
            warn(f"driver {d['name']} is loaded with other values of {', '.join(differ)}: "
                 "the new options take effect when the module is next loaded (e.g. after a reboot)")
    return before


def apply(nic: Nic, dp, p: NicPlan, xdp_mode: str) -> None:
    """Make the changes of plan `p`, in an order where a failure leaves the least behind; `p.after` and
    `p.current` then hold what is in force."""
    for path, text in p.driver_files.items():
        if text is None:
            os.unlink(path)
        else:
            files.write(path, text)
    if "modprobe" in p.changes:
        rc, out, err = nic.run(p.changes["modprobe"])
        if rc != 0:
            raise NicError(f"driver {p.driver['name']}: `{' '.join(p.changes['modprobe'])}` failed: "
                           f"{(err or out).strip()}")
    if "mtu" in p.changes:
        nic.set_mtu(p.changes["mtu"])
    nic.set_channels(p.changes.get("channels", {}))
    nic.set_rings(p.changes.get("rings", {}))
    nic.set_offloads(p.changes.get("offloads", {}))
    if "xdp_mode" in p.changes or NIC_PROG in p.changes:
        p.after["xdp_mode"] = dp.attach_nic(nic.ifname, xdp_mode)["xdp_mode"]
    for what in ("channels", "rings"):
        if what in p.changes:
            p.current[what] = getattr(nic, what)()
    p.after["mtu"] = nic.link()["mtu"]
