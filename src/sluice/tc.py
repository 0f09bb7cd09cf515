"""tc ingress attachments where tcx is missing: clsact + cls_bpf, and which one a kernel gets.

tcx (BPF_TCX_INGRESS bpf_links, Linux 6.6+) is what the Datapath uses when the
kernel has it. Older kernels get the legacy hook: a `clsact` qdisc (added when
the device has none, removed only when Sluice's filter was on it and no filter
of anyone's is left) and one cls_bpf filter in direct-action mode per program on
the ingress hook, at a fixed priority and handle that Sluice owns, attached by
the fd of the pinned program (never `tc ... obj`).

A pin cannot hold a cls_bpf attachment, so Sluice finds its filters again with a
netlink dump: a filter is Sluice's when it sits at PRIORITY on the ingress hook
and its name is `sluice/<program>@<pin root>`. The root in the name keeps two
pin roots in one netns (tests, benches) apart; the filter's program id and tag
come from the same dump (TCA_BPF_ID/TCA_BPF_TAG). Dumps and requests go through
a plain rtnetlink socket (sluice.netlink.Rtnl): a pod's filter is attached on
every CNI ADD, where pyroute2's ~1 ms per handle would count. Filters live in a
network namespace: every function works on the calling thread's netns, like tcx
links, which must be created from inside it.

An upgrade is one RTM_NEWTFILTER (`replace-filter`) per device with the new
program's fd: cls_bpf swaps the program under RCU, the hook is never empty.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from .bpf import libbpf as lb
from .netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NetlinkError, Rtnl, attr, cstr, nest, parse_attrs

TC_MODES = ("auto", "tcx", "legacy")

PRIORITY = 0x5C1                   # 1473: before filters added without a priority (49152 and down)
HANDLES = {"tc_from_pod": 1, "tc_from_nic": 2}
NAME_PREFIX = "sluice/"
CLSACT_HANDLE = 0xFFFF0000
INGRESS = 0xFFFFFFF2               # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003

# rtnetlink (linux/rtnetlink.h, linux/pkt_sched.h, linux/pkt_cls.h)
RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
TC_H_CLSACT = 0xFFFFFFF1           # the clsact qdisc's parent
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_TAG = 10
TCA_BPF_ID = 11
TCA_BPF_FLAG_ACT_DIRECT = 1
_TCMSG = struct.Struct("=BxxxiIII")

BPF_PROG_TYPE_SCHED_CLS = 3


class TcError(Exception):
    """A tc operation failed; the message names the device and why."""


@dataclass(frozen=True)
class Filter:
    """One filter on a tc hook, as the kernel dumps it."""

    ifindex: int
    parent: int
    priority: int
    handle: int
    kind: str
    name: str = ""
    prog_id: int = 0
    tag: str = ""


# ---- which hook the kernel has ------------------------------------------------------------

_TCX: dict = {}


def tcx_available() -> bool:
    """Whether this kernel has tcx, probed once per process (see probe_tcx)."""
    if "available" not in _TCX:
        _TCX["available"] = probe_tcx()
    return _TCX["available"]


def probe_tcx() -> bool:
    """BPF_LINK_CREATE with BPF_TCX_INGRESS on ifindex 0: a kernel with tcx looks the
    device up and answers ENODEV; one without refuses the attach type (EINVAL) or
    the link (EOPNOTSUPP). Asking the kernel, not its version: backports exist."""
    fd = load_pass_program("sl_tcx_probe")
    try:
        link = lb.link_create(fd, 0, lb.BPF_TCX_INGRESS)
    except lb.BpfError as e:
        if e.errno == errno.ENODEV:
            return True
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: the kernel's ENOTSUPP
            return False
        raise TcError(f"cannot tell whether the kernel has tcx: {e}") from None
    os.close(link)  # ifindex 0 exists nowhere; should a kernel accept it anyway, it has tcx
    return True


def load_pass_program(name: str = "sl_pass") -> int:
    """A two-instruction SCHED_CLS program returning TC_ACT_UNSPEC (r0 = -1; exit); the caller closes it."""
    insns = struct.pack("<BBhi", 0xB7, 0, 0, -1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    buf = ctypes.create_string_buffer(insns, len(insns))
    return lb.check(lb.bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, name.encode(), b"GPL", buf, 2, None),
                    f"load the {name} program")


# ---- netlink dumps ----------------------------------------------------------------------------

def _dump(msg_type: int, ifindex: int = 0, parent: int = 0) -> list[Filter]:
    """An RTM_GETQDISC or RTM_GETTFILTER dump of the calling thread's netns."""
    try:
        with Rtnl() as rtnl:
            messages = rtnl.dump(msg_type, _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0))
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):  # no device or no qdisc: nothing
            return []
        raise TcError(f"netlink dump of tc objects on ifindex {ifindex}: {os.strerror(e.code)}") from None
    out = []
    for msg in messages:
        _family, index, handle, msg_parent, info = _TCMSG.unpack_from(msg)
        attrs = parse_attrs(msg, _TCMSG.size)
        opts = parse_attrs(attrs.get(TCA_OPTIONS, b""))
        out.append(Filter(ifindex=index, parent=msg_parent, priority=info >> 16, handle=handle,
                          kind=cstr(attrs.get(TCA_KIND)) or "", name=cstr(opts.get(TCA_BPF_NAME)) or "",
                          prog_id=struct.unpack("=I", opts[TCA_BPF_ID])[0] if TCA_BPF_ID in opts else 0,
                          tag=opts.get(TCA_BPF_TAG, b"").hex()))
    return out


def qdiscs(ifindex: int | None = None) -> list[Filter]:
    """Qdiscs of this netns (kind, handle, parent), or of one device."""
    return [q for q in _dump(RTM_GETQDISC, ifindex or 0) if ifindex is None or q.ifindex == ifindex]


def filters(ifindex: int, parent: int = INGRESS) -> list[Filter]:
    """Every filter of anyone's on a hook (entries with handle 0 are the per-priority heads)."""
    return _dump(RTM_GETTFILTER, ifindex, parent)


def _ifindex(ifname: str) -> int | None:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex}"


# ---- Sluice's filters -------------------------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """Sluice's cls_bpf filter of one program on one device."""

    ifname: str
    ifindex: int
    program: str
    handle: int
    prog_id: int
    tag: str


class ClsBpf:
    """The cls_bpf filters of the pin root `root` in the calling thread's netns."""

    def __init__(self, root: str):
        self.root = root

    def name(self, prog: str) -> str:
        return f"{NAME_PREFIX}{prog}@{self.root}"

    def _program(self, f: Filter) -> str | None:
        """The program of a filter that is this root's, else None."""
        if f.kind != "bpf" or f.priority != PRIORITY or f.handle == 0 or f.parent != INGRESS:
            return None
        prog, sep, root = f.name.removeprefix(NAME_PREFIX).partition("@")
        if not f.name.startswith(NAME_PREFIX) or not sep or root != self.root or HANDLES.get(prog) != f.handle:
            return None
        return prog

    def attachments(self, ifname: str | None = None) -> list[Attachment]:
        """This root's filters on `ifname`, or on every device of the netns that has a clsact."""
        if ifname is not None:
            index = _ifindex(ifname)
            devices = [index] if index else []
        else:
            devices = sorted({q.ifindex for q in qdiscs() if q.handle == CLSACT_HANDLE})
        out = []
        for index in devices:
            for f in filters(index):
                prog = self._program(f)
                if prog:
                    out.append(Attachment(ifname or _ifname(index), index, prog, f.handle, f.prog_id, f.tag))
        return sorted(out, key=lambda a: (a.ifname, a.program))

    @staticmethod
    def _handle(prog: str) -> int:
        if prog not in HANDLES:
            raise TcError(f"{prog} is not a tc program ({', '.join(HANDLES)})")
        return HANDLES[prog]

    def attach(self, ifname: str, prog: str, prog_fd: int) -> bool:
        """The program on ingress of `ifname`; True when a filter was added or now runs another program."""
        handle = self._handle(prog)
        index = _ifindex(ifname)
        if index is None:
            raise TcError(f"interface {ifname!r} does not exist")
        want = lb.prog_info(prog_fd).id
        self._ensure_clsact(ifname, index)
        held = [f for f in filters(index) if f.priority == PRIORITY and f.handle == handle]
        if held and self._program(held[0]) != prog:
            raise TcError(f"{ifname}: ingress priority {PRIORITY} handle {handle} holds a filter that is not "
                          f"this datapath's ({held[0].kind} {held[0].name!r}); remove it or move it to another priority")
        if held and held[0].prog_id == want:
            return False
        self._request("replace-filter" if held else "add-filter", ifname, index, prog, prog_fd)
        return True

    def _request(self, command: str, ifname: str, index: int, prog: str, prog_fd: int | None = None) -> None:
        """add-filter, replace-filter (with `prog_fd`) or del-filter of `prog`'s filter on `ifname`."""
        msg_type, flags = {"add-filter": (RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL),
                           "replace-filter": (RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_REPLACE),
                           "del-filter": (RTM_DELTFILTER, 0)}[command]
        body = (_TCMSG.pack(socket.AF_UNSPEC, index, self._handle(prog), INGRESS,
                            PRIORITY << 16 | socket.htons(ETH_P_ALL)) + attr(TCA_KIND, b"bpf\0"))
        if prog_fd is not None:
            body += nest(TCA_OPTIONS, attr(TCA_BPF_FD, struct.pack("=I", prog_fd)),
                         attr(TCA_BPF_NAME, self.name(prog).encode() + b"\0"),
                         attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT)))
        try:
            with Rtnl() as rtnl:
                rtnl.request(msg_type, flags, body)
        except NetlinkError as e:
            raise TcError(f"{command} {self.name(prog)} on {ifname} ingress (priority {PRIORITY}): "
                          f"{os.strerror(e.code)}") from None

    @staticmethod
    def _ensure_clsact(ifname: str, index: int) -> None:
        """A clsact qdisc on `ifname`, unless it has one, or an ingress qdisc: both hold ffff:fff2 (EEXIST)."""
        try:
            with Rtnl() as rtnl:
                rtnl.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL,
                             _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0)
                             + attr(TCA_KIND, b"clsact\0"))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise TcError(f"adding a clsact qdisc to {ifname}: {os.strerror(e.code)}") from None

    def replace(self, prog: str, prog_fd: int) -> list[str]:
        """Swap every filter of `prog` in this netns to `prog_fd`: one request per device, no empty hook."""
        done = []
        for a in self.attachments():
            if a.program == prog:
                try:
                    self._request("replace-filter", a.ifname, a.ifindex, prog, prog_fd)
                except TcError:
                    if _ifindex(a.ifname) == a.ifindex:
                        raise
                    continue  # the device went away meanwhile
                done.append(f"{a.ifname}/{prog}")
        return done

    def detach(self, ifname: str, prog: str | None = None) -> list[str]:
        """Remove this root's filters (of `prog`, or all) from `ifname`; the clsact goes too when
        Sluice's filter was on it and no filter of anyone's is left."""
        removed = []
        for a in self.attachments(ifname):
            if prog is None or a.program == prog:
                try:
                    self._request("del-filter", ifname, a.ifindex, a.program)
                except TcError:
                    if _ifindex(ifname) == a.ifindex:
                        raise
                    return removed  # the device went away meanwhile, and its filters with it
                removed.append(f"{ifname}/{a.program}")
        if removed:
            self._release_clsact(ifname)
        return removed

    @staticmethod
    def _release_clsact(ifname: str) -> None:
        index = _ifindex(ifname)
        if index is None or filters(index, INGRESS) or filters(index, EGRESS):
            return
        if not any(q.handle == CLSACT_HANDLE and q.kind == "clsact" for q in qdiscs(index)):
            return
        try:
            with Rtnl() as rtnl:
                rtnl.request(RTM_DELQDISC, 0, _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0)
                             + attr(TCA_KIND, b"clsact\0"))
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise TcError(f"removing the clsact qdisc of {ifname}: {os.strerror(e.code)}") from None

    def detach_all(self) -> list[str]:
        removed = []
        for ifname in sorted({a.ifname for a in self.attachments()}):
            removed += self.detach(ifname)
        return removed
