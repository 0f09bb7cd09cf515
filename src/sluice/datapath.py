"""Loading, pinning and attaching the node's datapath.

Pin layout under the root (default /sys/fs/bpf/sluice, 0700):

    maps/<map>             every map of bpf/lib/maps.h (libbpf pins and reuses them by name)
    progs/<program>        the programs, so the agent can attach them to new devices
    links/<device>/<prog>  tcx and XDP links, one per (device, program)
    links/cgroup/<prog>    cgroup socket hooks and sockops
    links/sockhash/<prog>  the sk_msg program on the sockhash

Everything Sluice attaches is a pinned bpf_link named after its program, so
status, upgrade and removal find exactly Sluice's attachments and nothing else.
A reload loads the new objects (maps are reused, so contents survive), then
swaps every link to the new program with BPF_LINK_UPDATE: there is no moment
without a program on any hook.

tc programs go through tcx links where the kernel has tcx (tc mode `auto`,
probed once) or always (`tcx`); otherwise (`legacy`) through a cls_bpf filter
on a clsact qdisc (sluice.tc), which no pin can hold: those are found again by
a netlink dump of the calling netns (Sluice's priority, names prefixed
`sluice/<program>@<root>`), and an upgrade replaces each with one netlink
request. Pod veths get a cls_bpf filter in `auto` too (pod_tc_mode): creating a
tcx link waits for an RCU grace period with the RTNL lock held, 8-12 ms on the
machines measured and serial node-wide, more than the reference plugins spend on
a whole CNI ADD; adding a filter to a fresh veth waits for nothing. Whatever the
mode, status, upgrade and removal handle both kinds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field

from . import maps as m
from . import tc
from .bpf import libbpf as lb
from .bpf.btf import Btf
from .bpf.object import BpfObject

DEFAULT_ROOT = "/sys/fs/bpf/sluice"
DEFAULT_OBJ_DIR = "/opt/sluice/bpf"

# object file (without .o) -> its programs
OBJECTS = {
    "tc_pod": ("tc_from_pod",),
    "tc_nic": ("tc_from_nic",),
    "xdp_nic": ("xdp_nic",),
    "sock_lb": ("sock_connect4", "sock_sendmsg4", "sock_recvmsg4", "sock_getpeer4"),
    "sockmap": ("sockops_tcp", "sk_msg_redir"),
}
CGROUP_HOOKS = {
    "sock_connect4": lb.BPF_CGROUP_INET4_CONNECT,
    "sock_sendmsg4": lb.BPF_CGROUP_UDP4_SENDMSG,
    "sock_recvmsg4": lb.BPF_CGROUP_UDP4_RECVMSG,
    "sock_getpeer4": lb.BPF_CGROUP_INET4_GETPEERNAME,
    "sockops_tcp": lb.BPF_CGROUP_SOCK_OPS,
}
NIC_PROG = "tc_from_nic"        # on the node NIC's tc ingress (attach_nic)
SOCKMAP_PROG = "sk_msg_redir"   # on the sockhash (attach_sockmap)
# The hooks a node gets, by link group: the NIC's tc ingress (the group is then the NIC's name),
# the cgroup socket hooks and sockops (attach_cgroup), the sk_msg program (attach_sockmap).
NODE_HOOKS = {"nic": (NIC_PROG,), "cgroup": tuple(CGROUP_HOOKS), "sockhash": (SOCKMAP_PROG,)}
XDP_MODES = ("native", "generic", "best-effort", "disabled")
XDP_FLAGS = {"native": lb.XDP_FLAGS_DRV_MODE, "generic": lb.XDP_FLAGS_SKB_MODE}
TC_MODES = tc.TC_MODES          # auto (tcx if the kernel has it, else legacy), tcx, legacy (clsact + cls_bpf)


def xdp_wanted(policy: str) -> list[str]:
    """XDP modes in force that satisfy an xdp_mode policy (none for `disabled`), in order of preference."""
    return {"best-effort": ["native", "generic"], "disabled": []}.get(policy, [policy])


class DatapathError(Exception):
    """A datapath operation failed; the message names what and why."""


@dataclass
class LoadReport:
    changed: bool = False
    programs: dict[str, str] = field(default_factory=dict)     # name -> tag in force
    replaced: list[str] = field(default_factory=list)          # programs whose code changed
    links_updated: list[str] = field(default_factory=list)     # link pins swapped to new code
    object_hash: str = ""


def cgroup2_root() -> str:
    """Where cgroup v2 is mounted (/sys/fs/cgroup on most hosts, .../unified on hybrid ones)."""
    with open("/proc/mounts") as f:
        for line in f:
            _device, mountpoint, fstype, *_options = line.split()
            if fstype == "cgroup2":
                return mountpoint
    raise DatapathError("no cgroup2 filesystem is mounted; mount one (e.g. on /sys/fs/cgroup)")


def ensure_bpffs(path: str = "/sys/fs/bpf") -> None:
    if not _is_bpffs(path):
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True, capture_output=True)


def _is_bpffs(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in f)


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


class Datapath:
    def __init__(self, root: str = DEFAULT_ROOT, obj_dir: str = DEFAULT_OBJ_DIR, tc_mode: str = "auto"):
        if tc_mode not in TC_MODES:
            raise DatapathError(f"tc mode {tc_mode!r} is not one of {', '.join(TC_MODES)}")
        self.root = root
        self.obj_dir = obj_dir
        self.tc_mode = tc_mode
        self.maps_dir = os.path.join(root, "maps")
        self.progs_dir = os.path.join(root, "progs")
        self.links_dir = os.path.join(root, "links")
        self.cls_bpf = tc.ClsBpf(root)

    # ---- objects and programs ------------------------------------------------

    def object_paths(self) -> dict[str, str]:
        return {name: os.path.join(self.obj_dir, f"{name}.o") for name in OBJECTS}

    def object_hash(self) -> str:
        h = hashlib.sha256()
        for name, path in sorted(self.object_paths().items()):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
        return h.hexdigest()[:16]

    def is_loaded(self) -> bool:
        return all(os.path.exists(os.path.join(self.progs_dir, p)) for progs in OBJECTS.values() for p in progs)

    def pinned_tags(self) -> dict[str, str]:
        tags = {}
        for progs in OBJECTS.values():
            for name in progs:
                path = os.path.join(self.progs_dir, name)
                if os.path.exists(path):
                    fd = lb.obj_get(path)
                    try:
                        tags[name] = lb.prog_tag(fd)
                    finally:
                        os.close(fd)
        return tags

    def load(self, check_mode: bool = False) -> LoadReport:
        """Load every object; pin new programs; swap existing links to them.

        Nothing is replaced unless every object passed the verifier, so a
        rejected upgrade leaves the running datapath exactly as it was."""
        missing = [p for p in self.object_paths().values() if not os.path.exists(p)]
        if missing:
            raise DatapathError(f"datapath object(s) missing: {', '.join(missing)}")
        ensure_bpffs(os.path.dirname(self.root.rstrip("/")) or "/sys/fs/bpf")
        report = LoadReport(object_hash=self.object_hash())
        old_tags = self.pinned_tags()
        if check_mode:
            new_tags = self._tags_without_pinning()
            report.replaced = sorted(n for n, t in new_tags.items() if old_tags.get(n) != t)
            report.changed = bool(report.replaced)
            report.programs = new_tags
            return report
        for d in (self.root, self.maps_dir, self.progs_dir, self.links_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        loaded = []
        try:
            for name, path in self.object_paths().items():
                loaded.append(BpfObject(path, self.maps_dir))
            new = {}
            for obj in loaded:
                for prog, fd in obj.programs.items():
                    new[prog] = (fd, lb.prog_tag(fd))
            for prog, (fd, tag) in new.items():
                report.programs[prog] = tag
                if old_tags.get(prog) == tag:
                    continue
                report.replaced.append(prog)
                # pin under a temporary name, then rename over the old pin: atomic
                tmp = os.path.join(self.progs_dir, f"{prog}__new")
                if os.path.exists(tmp):
                    os.unlink(tmp)
                lb.obj_pin(fd, tmp)
                os.replace(tmp, os.path.join(self.progs_dir, prog))
                report.links_updated += self._update_links(prog, fd)
                if prog in tc.HANDLES:  # cls_bpf filters of this netns, whatever the mode in force
                    report.links_updated += self._tc_call(self.cls_bpf.replace, prog, fd)
        finally:
            for obj in loaded:
                obj.close()
        report.changed = bool(report.replaced)
        return report

    def _tags_without_pinning(self) -> dict[str, str]:
        tags = {}
        for path in self.object_paths().values():
            with BpfObject(path, None) as obj:
                for prog, fd in obj.programs.items():
                    tags[prog] = lb.prog_tag(fd)
        return tags

    def _update_links(self, prog: str, prog_fd: int) -> list[str]:
        updated = []
        for path in self.link_pins():
            if os.path.basename(path) != prog:
                continue
            fd = lb.obj_get(path)
            try:
                lb.link_update(fd, prog_fd)
            finally:
                os.close(fd)
            updated.append(os.path.relpath(path, self.links_dir))
        return updated

    def prog_fd(self, prog: str) -> int:
        path = os.path.join(self.progs_dir, prog)
        if not os.path.exists(path):
            raise DatapathError(f"program {prog} is not loaded under {self.root} (run the datapath load first)")
        return lb.obj_get(path)

    # ---- links ------------------------------------------------------------------

    def link_pins(self) -> list[str]:
        out = []
        if os.path.isdir(self.links_dir):
            for group in sorted(os.listdir(self.links_dir)):
                gdir = os.path.join(self.links_dir, group)
                out += [os.path.join(gdir, p) for p in sorted(os.listdir(gdir))]
        return out

    def _link_path(self, group: str, prog: str) -> str:
        return os.path.join(self.links_dir, group, prog)

    def _attach(self, group: str, prog: str, target_fd: int, attach_type: int, flags: int = 0) -> bool:
        """Create and pin a link unless one is pinned already; True when created."""
        path = self._link_path(group, prog)
        if os.path.exists(path):
            if self._link_alive(path):
                return False
            os.unlink(path)  # the device or cgroup went away; the pin is stale
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        prog_fd = self.prog_fd(prog)
        try:
            link_fd = lb.link_create(prog_fd, target_fd, attach_type, flags)
        finally:
            os.close(prog_fd)
        try:
            lb.obj_pin(link_fd, path)
        finally:
            os.close(link_fd)
        return True

    @staticmethod
    def _link_alive(path: str) -> bool:
        """A tcx/XDP link whose device was deleted stays pinned but detached."""
        fd = lb.obj_get(path)
        try:
            info = lb.link_info(fd)
            if info.type == lb.BPF_LINK_TYPE_TCX:
                return info.u.tcx.ifindex != 0
            if info.type == lb.BPF_LINK_TYPE_XDP:
                return info.u.xdp.ifindex != 0
            return True
        finally:
            os.close(fd)

    def _detach(self, group: str, prog: str | None = None) -> list[str]:
        gdir = os.path.join(self.links_dir, group)
        if not os.path.isdir(gdir):
            return []
        removed = []
        for name in sorted(os.listdir(gdir)):
            if prog is None or name == prog:
                path = os.path.join(gdir, name)
                # Detach now: dropping the last reference alone detaches only
                # once the kernel gets round to freeing the link.
                fd = lb.obj_get(path)
                try:
                    lb.bpf_link_detach(fd)
                finally:
                    os.close(fd)
                os.unlink(path)
                removed.append(f"{group}/{name}")
        if not os.listdir(gdir):
            os.rmdir(gdir)
        return removed

    # ---- tc: tcx links or cls_bpf filters -------------------------------------------

    def tc_mode_in_force(self) -> str:
        """tcx or legacy: what attach_tc uses (auto asks the kernel once per process)."""
        available = self._tc_call(tc.tcx_available)
        if self.tc_mode == "tcx" and not available:
            raise DatapathError("tc mode tcx: this kernel has no tcx (BPF_LINK_CREATE refuses BPF_TCX_INGRESS); "
                                "use tc mode auto or legacy")
        if self.tc_mode == "auto":
            return "tcx" if available else "legacy"
        return self.tc_mode

    @staticmethod
    def _tc_call(fn, *args):
        try:
            return fn(*args)
        except tc.TcError as e:
            raise DatapathError(str(e)) from None

    def pod_tc_mode(self) -> str:
        """How pod veths get tc_from_pod: a tcx link only when tc mode `tcx` asks for it, else a cls_bpf
        filter (see the module's docstring: a tcx link costs every CNI ADD an RCU grace period)."""
        return self.tc_mode_in_force() if self.tc_mode == "tcx" else "legacy"   # (tcx: refused without tcx)

    def attach_tc(self, ifname: str, prog: str, mode: str | None = None) -> bool:
        """`prog` on tc ingress of `ifname` in `mode` (tcx or legacy; default: the tc mode in force);
        True when that changed anything.

        A process in the device's netns must call this (tcx links resolve the
        ifindex there, filters live there). An attachment of the other kind for
        the same program is removed after the new one is in place, so changing
        the mode never leaves the hook without the program."""
        ifindex = _ifindex(ifname)
        if (mode or self.tc_mode_in_force()) == "tcx":
            changed = self._attach(ifname, prog, ifindex, lb.BPF_TCX_INGRESS)
            if changed:
                self._tc_call(self.cls_bpf.detach, ifname, prog)
            return changed
        prog_fd = self.prog_fd(prog)
        try:
            changed = self._tc_call(self.cls_bpf.attach, ifname, prog, prog_fd)
        finally:
            os.close(prog_fd)
        if os.path.exists(self._link_path(ifname, prog)):
            self._detach(ifname, prog)
            changed = True
        return changed

    def tc_attached(self, ifname: str, prog: str) -> bool:
        """Whether `prog` runs on tc ingress of `ifname` (a live tcx link, or a cls_bpf filter in this netns)."""
        path = self._link_path(ifname, prog)
        if os.path.exists(path) and self._link_alive(path):
            return True
        return any(a.program == prog for a in self._tc_call(self.cls_bpf.attachments, ifname))

    def attach_pod(self, host_ifname: str) -> bool:
        return self.attach_tc(host_ifname, "tc_from_pod", self.pod_tc_mode())

    def detach_device(self, ifname: str) -> list[str]:
        """Every Sluice attachment of `ifname` (or of the link group `cgroup`, `sockhash`): links and filters."""
        return self._detach(ifname) + self._tc_call(self.cls_bpf.detach, ifname)

    def attach_nic(self, ifname: str, xdp_mode: str = "best-effort") -> dict:
        """tc ingress + XDP on the node NIC. Returns what is in force."""
        if xdp_mode not in XDP_MODES:
            raise DatapathError(f"XDP mode {xdp_mode!r} is not one of {', '.join(XDP_MODES)}")
        changed = self.attach_tc(ifname, NIC_PROG)
        wanted = xdp_wanted(xdp_mode)
        current = self.xdp_mode(ifname)
        errors = {}
        if current in wanted or (not wanted and current == "none"):
            return {"changed": changed, "xdp_mode": current}
        self._detach(ifname, "xdp_nic")
        for mode in wanted:
            try:
                self._attach(ifname, "xdp_nic", _ifindex(ifname), lb.BPF_XDP, XDP_FLAGS[mode])
                return {"changed": True, "xdp_mode": mode, "xdp_errors": errors}
            except lb.BpfError as e:
                errors[mode] = str(e)
        if wanted:
            raise DatapathError(f"cannot attach XDP to {ifname} in mode {xdp_mode}: "
                                + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        return {"changed": True, "xdp_mode": "none"}

    def xdp_mode(self, ifname: str) -> str:
        """The mode of Sluice's XDP link on `ifname`: native, generic or none."""
        from .netlink import xdp_attached_mode

        if not os.path.exists(self._link_path(ifname, "xdp_nic")):
            return "none"
        return xdp_attached_mode(ifname)

    def attach_cgroup(self, cgroup: str | None = None) -> list[str]:
        """Socket LB hooks and sockops on a cgroup v2 directory (default: the root)."""
        cgroup = cgroup or cgroup2_root()
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return [p for p, t in CGROUP_HOOKS.items() if self._attach("cgroup", p, fd, t)]
        finally:
            os.close(fd)

    def attach_sockmap(self) -> bool:
        fd = lb.obj_get(os.path.join(self.maps_dir, "sl_sock_hash"))
        try:
            return self._attach("sockhash", SOCKMAP_PROG, fd, lb.BPF_SK_MSG_VERDICT)
        finally:
            os.close(fd)

    # ---- maps, status, removal ---------------------------------------------------

    def open_map(self, cls):
        return cls.open(self.maps_dir)

    def enums(self) -> tuple[dict[str, int], dict[str, int]]:
        """(hooks, outcomes) by short name, read from the object's BTF."""
        with Btf(self.object_paths()["tc_pod"]) as btf:
            hooks = {k.removeprefix("SL_HOOK_").lower(): v for k, v in btf.enum("sl_hook").items()
                     if not k.endswith("_MAX")}
            outcomes = {k.removeprefix("SL_OUT_").removeprefix("SL_").lower(): v
                        for k, v in btf.enum("sl_outcome").items()
                        if not k.endswith(("_MAX", "_BASE"))}
        return hooks, outcomes

    def metrics(self) -> dict[tuple[str, str], tuple[int, int]]:
        hooks, outcomes = self.enums()
        with self.open_map(m.MetricsMap) as metrics:
            return metrics.read(hooks, outcomes)

    def links(self) -> list[dict]:
        out = []
        for path in self.link_pins():
            fd = lb.obj_get(path)
            try:
                info = lb.link_info(fd)
                prog = lb.bpf_prog_get_fd_by_id(info.prog_id)
                tag = lb.prog_tag(prog) if prog >= 0 else ""
                _close(prog)
            finally:
                os.close(fd)
            group, prog_name = os.path.relpath(path, self.links_dir).split("/")
            entry = {"target": group, "program": prog_name, "link_id": info.id, "prog_id": info.prog_id,
                     "tag": tag, "attached": self._link_alive(path)}
            if info.type == lb.BPF_LINK_TYPE_TCX:
                entry.update(kind="tcx", ifindex=info.u.tcx.ifindex)
            elif info.type == lb.BPF_LINK_TYPE_XDP:
                entry.update(kind="xdp", ifindex=info.u.xdp.ifindex)
            elif info.type == lb.BPF_LINK_TYPE_CGROUP:
                entry.update(kind="cgroup")
            else:
                entry.update(kind="sockmap")
            out.append(entry)
        for a in self._tc_call(self.cls_bpf.attachments):
            out.append({"target": a.ifname, "program": a.program, "link_id": None, "prog_id": a.prog_id,
                        "tag": a.tag, "attached": True, "kind": "cls_bpf", "ifindex": a.ifindex,
                        "priority": tc.PRIORITY, "handle": a.handle})
        return out

    def map_fill(self) -> dict[str, dict]:
        fill = {}
        for cls in m.ALL_MAPS:
            if cls.percpu or cls in (m.CpuListMap, m.ConfigMap):
                continue
            try:
                with self.open_map(cls) as mp:
                    fill[cls.name] = {"entries": len(mp), "max_entries": mp.max_entries}
            except lb.BpfError:
                fill[cls.name] = {"entries": None, "max_entries": None}
        return fill

    def tc_status(self) -> dict:
        """The tc mode set, the one in force (pods: pod_tc_mode) and whether the kernel has tcx."""
        try:
            return {"setting": self.tc_mode, "in_force": self.tc_mode_in_force(), "pods": self.pod_tc_mode(),
                    "tcx_available": tc.tcx_available()}
        except (DatapathError, lb.BpfError) as e:
            return {"setting": self.tc_mode, "in_force": None, "pods": None, "tcx_available": None, "error": str(e)}

    def status(self) -> dict:
        return {
            "root": self.root,
            "loaded": self.is_loaded(),
            "programs": self.pinned_tags(),
            "links": self.links(),
            "tc_mode": self.tc_status(),
            "maps": self.map_fill() if self.is_loaded() else {},
        }

    def remove(self) -> bool:
        """Detach and unpin everything under the root (uninstall); the root's cls_bpf filters are
        found in the calling netns."""
        filters = self._tc_call(self.cls_bpf.detach_all)
        if not os.path.exists(self.root):
            return bool(filters)
        for group in os.listdir(self.links_dir) if os.path.isdir(self.links_dir) else []:
            self._detach(group)
        shutil.rmtree(self.root)
        return True


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise DatapathError(f"interface {ifname!r} does not exist") from None
