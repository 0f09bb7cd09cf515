"""tc attach modes on the real kernel: `auto` picks tcx here (pod veths get cls_bpf filters all the same:
see sluice.datapath); `legacy` (clsact + cls_bpf, what a kernel without tcx gets) carries real traffic, is
upgraded by an atomic filter replace under a UDP flow that loses nothing, finds and removes exactly its own
filters (a foreign cls_bpf filter and a foreign clsact survive), works through the agent and the CNI
plugin, and is reported by `sluice status`.

Every device lives in an `sltest-` namespace; the node namespaces keep IPv4 forwarding off, so pod
traffic only gets through when the program on the host veth redirects it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from conftest import BPF_BUILD, ROOT
from lib import netns, packets
from lib.pods import add_pod
from lib.agent import VENV_BIN, AgentProcess
from lib.cgroup import cgroup
from sluice import cli, tc
from sluice.agent import AgentConfig
from sluice.bpf import libbpf as lb
from sluice.datapath import NIC_PROG, Datapath, DatapathError
from sluice.maps import EndpointsMap
from sluice.netlink import ipr

pytestmark = pytest.mark.kernel

POD1, POD2 = "10.1.7.11", "10.1.7.22"
ECHOES = 3
REDIRECT_PEER = ("tc_from_pod", "redirect_peer")
CLANG = ["clang", "-O1", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I", os.path.join(ROOT, "build"),
         "-I", os.path.join(ROOT, "bpf"), "-I", os.path.join(ROOT, "bpf", "lib")]


# ---- helpers -------------------------------------------------------------------------------

@pytest.fixture
def obj_copy(tmp_path):
    d = tmp_path / "objs"
    shutil.copytree(BPF_BUILD, d)
    return str(d)


@contextlib.contextmanager
def legacy_datapath(pin_root: str, obj_dir: str = BPF_BUILD):
    dp = Datapath(pin_root, obj_dir, tc_mode="legacy")
    dp.load()
    try:
        yield dp
    finally:
        dp.remove()


@contextlib.contextmanager
def two_pods(dp: Datapath):
    """A node namespace (forwarding off) with pods on host veths h1 and h2, tc_from_pod attached to both."""
    with netns.namespaces("node", "pod1", "pod2") as (node, pod1, pod2):
        netns.ns_exec(node, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        with dp.open_map(EndpointsMap) as endpoints:
            for pod, host_dev, ip in ((pod1, "h1", POD1), (pod2, "h2", POD2)):
                endpoints.put(ip, add_pod(node, pod, host_dev, ip))
                with netns.entered(node):
                    assert dp.attach_pod(host_dev) is True
        try:
            yield SimpleNamespace(node=node, pod1=pod1, pod2=pod2)
        finally:
            with dp.open_map(EndpointsMap) as endpoints:
                for ip in (POD1, POD2):
                    endpoints.delete(ip)


def redirected(dp: Datapath) -> int:
    return dp.metrics().get(REDIRECT_PEER, (0, 0))[0]


def sluice_filters(dp: Datapath, node: str) -> dict[str, dict]:
    """{device: link entry} of the cls_bpf filters dp reports in `node`."""
    with netns.entered(node):
        return {lk["target"]: lk for lk in dp.links() if lk["kind"] == "cls_bpf"}


def tc_show(ns: str, *argv: str) -> str:
    """What iproute2 shows (tc does not need the pins, so `-n` would do; nsenter like the rest)."""
    return netns.ns_exec(ns, "tc", *argv).stdout


def pinned_prog_id(dp: Datapath, prog: str) -> int:
    fd = dp.prog_fd(prog)
    try:
        return lb.prog_info(fd).id
    finally:
        os.close(fd)


def foreign_filter(ns: str, dev: str, prio: int, handle: int, name: str = "foreign") -> None:
    """Somebody else's cls_bpf filter (a program returning TC_ACT_UNSPEC: the next filter runs)."""
    fd = tc.load_pass_program("sltest_foreign")
    try:
        with netns.entered(ns), ipr() as ip:
            ip.tc("add-filter", "bpf", socket.if_nametoindex(dev), handle, fd=fd, name=name,
                  parent=tc.INGRESS, prio=prio, direct_action=True)
    finally:
        os.close(fd)  # the filter holds the program


class UdpFlow:
    """Numbered datagrams pod1 -> POD2 every ~0.3 ms until stopped; which ones arrived."""

    def __init__(self, src_ns: str, dst_ns: str):
        with netns.entered(dst_ns):
            self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns.entered(src_ns):
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: the receiver thread may lag
        self.rx.bind((POD2, 0))
        self.rx.settimeout(1.0)
        self.sent = 0
        self.received: set[int] = set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]

    def _send(self):
        port = self.rx.getsockname()[1]
        while not self.stop.is_set():
            self.tx.sendto(struct.pack("!I", self.sent), (POD2, port))
            self.sent += 1
            time.sleep(0.0003)

    def _receive(self):
        while True:
            try:
                self.received.add(struct.unpack("!I", self.rx.recv(64))[0])
            except socket.timeout:
                if self.stop.is_set():
                    return

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        self.tx.close()
        self.rx.close()


# ---- the mode ----------------------------------------------------------------------------------

def test_auto_picks_tcx_on_this_kernel_and_cls_bpf_for_pods(pin_root):
    assert tc.probe_tcx() is True
    dp = Datapath(pin_root, BPF_BUILD)
    assert dp.tc_mode == "auto" and dp.tc_mode_in_force() == "tcx" and dp.pod_tc_mode() == "legacy"
    dp.load()
    try:
        with netns.namespaces("auto") as (ns,):
            netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
            netns.ns_exec(ns, "ip", "link", "add", "slveth2", "type", "veth", "peer", "name", "slveth3")
            with netns.entered(ns):
                assert dp.attach_tc("slveth0", NIC_PROG) is True      # what attach_nic does
                assert dp.attach_pod("slveth2") is True
                assert sorted((lk["target"], lk["kind"]) for lk in dp.links()) == [
                    ("slveth0", "tcx"), ("slveth2", "cls_bpf")]
                assert dp.status()["tc_mode"] == {"setting": "auto", "in_force": "tcx", "pods": "legacy",
                                                  "tcx_available": True}
            assert "clsact" not in tc_show(ns, "qdisc", "show", "dev", "slveth0")
            assert "clsact" in tc_show(ns, "qdisc", "show", "dev", "slveth2")
    finally:
        dp.remove()


def test_tcx_mode_puts_pods_on_tcx_too(pin_root):
    dp = Datapath(pin_root, BPF_BUILD, tc_mode="tcx")
    assert dp.pod_tc_mode() == "tcx"
    dp.load()
    try:
        with netns.namespaces("tcx") as (ns,):
            netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
            with netns.entered(ns):
                assert dp.attach_pod("slveth0") is True
                assert [(lk["target"], lk["kind"]) for lk in dp.links()] == [("slveth0", "tcx")]
            assert "clsact" not in tc_show(ns, "qdisc", "show", "dev", "slveth0")
    finally:
        dp.remove()


def test_auto_falls_back_to_legacy_where_tcx_is_refused(pin_root, monkeypatch):
    # What BPF_LINK_CREATE answers BPF_TCX_INGRESS on a kernel before 6.6: EINVAL.
    def refuse(*args):
        raise lb.BpfError(errno.EINVAL, "create bpf_link: Invalid argument")

    monkeypatch.setattr(tc, "_TCX", {})       # forget this process's probe
    monkeypatch.setattr(lb, "link_create", refuse)
    dp = Datapath(pin_root, BPF_BUILD)
    assert dp.tc_mode_in_force() == "legacy"
    with pytest.raises(DatapathError, match="no tcx.*auto or legacy"):
        Datapath(pin_root, BPF_BUILD, tc_mode="tcx").tc_mode_in_force()
    dp.load()
    try:
        with netns.namespaces("auto") as (ns,):
            netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
            with netns.entered(ns):
                assert dp.attach_pod("slveth0") is True
                assert [(lk["target"], lk["kind"]) for lk in dp.links()] == [("slveth0", "cls_bpf")]
                assert dp.detach_device("slveth0") == ["slveth0/tc_from_pod"]
    finally:
        dp.remove()


def test_bad_tc_mode_is_refused(tmp_path):
    with pytest.raises(DatapathError, match="'turbo'"):
        Datapath("/nonexistent", BPF_BUILD, tc_mode="turbo")
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"tc_mode": "tcx4"}))
    with pytest.raises(ValueError, match="tc_mode 'tcx4'"):
        AgentConfig.load(str(config))
    config.write_text(json.dumps({"tc_mode": "legacy"}))
    assert AgentConfig.load(str(config)).tc_mode == "legacy"


# ---- legacy: traffic, reporting, upgrade ------------------------------------------------------------

def test_legacy_pods_talk_through_cls_bpf(pin_root, capsys):
    with legacy_datapath(pin_root) as dp, two_pods(dp) as n:
        before = redirected(dp)
        assert len(packets.echo(n.pod1, POD2, ECHOES)) == ECHOES
        assert redirected(dp) - before == 2 * ECHOES           # each echo and each reply, on h1 and h2

        filters = sluice_filters(dp, n.node)
        assert set(filters) == {"h1", "h2"}
        pod_prog = pinned_prog_id(dp, "tc_from_pod")
        for lk in filters.values():
            assert (lk["program"], lk["prog_id"], lk["priority"], lk["attached"]) == \
                ("tc_from_pod", pod_prog, tc.PRIORITY, True)
            assert lk["tag"] == dp.pinned_tags()["tc_from_pod"]
        assert not os.path.exists(dp.links_dir) or not os.listdir(dp.links_dir)   # nothing pinned for tc
        shown = tc_show(n.node, "filter", "show", "dev", "h1", "ingress")
        assert f"pref {tc.PRIORITY} bpf" in shown and f"sluice/tc_from_pod@{pin_root} direct-action" in shown
        with netns.entered(n.node):
            assert dp.attach_pod("h1") is False                 # idempotent
            assert dp.tc_attached("h1", "tc_from_pod") and not dp.tc_attached("h1", "tc_from_nic")
            assert dp.status()["tc_mode"]["in_force"] == "legacy"
            capsys.readouterr()
            assert cli.main(["--root", pin_root, "--obj-dir", BPF_BUILD, "--socket", "/nonexistent/agent.sock",
                             "--tc-mode", "legacy", "status"]) == 0
        out = capsys.readouterr().out
        assert "tc mode: legacy (legacy from --tc-mode; kernel has tcx: yes)" in out
        assert any(line.split()[:3] == ["h1", "cls_bpf", "tc_from_pod"] for line in out.splitlines()), out


def test_legacy_upgrade_replaces_filters_atomically_under_traffic(pin_root, obj_copy):
    with legacy_datapath(pin_root, obj_copy) as dp, two_pods(dp) as n:
        netns.ns_exec(n.node, "ip", "link", "add", "slnic0", "type", "veth", "peer", "name", "slnic1")
        with netns.entered(n.node):
            assert dp.attach_tc("slnic0", "tc_from_nic") is True
        before = sluice_filters(dp, n.node)
        tags = dp.pinned_tags()
        for name in ("tc_pod", "tc_nic"):  # the same sources at -O1: new tags, same names and maps
            subprocess.run([*CLANG, "-c", os.path.join(ROOT, "bpf", f"{name}.c"), "-o", os.path.join(obj_copy, f"{name}.o")],
                           check=True, capture_output=True)
        assert len(packets.echo(n.pod1, POD2, 1)) == 1
        counted = redirected(dp)

        with UdpFlow(n.pod1, n.pod2) as flow:
            time.sleep(0.3)
            with netns.entered(n.node):   # filters live in the node's netns: the upgrade runs there
                report = dp.load()
            time.sleep(0.3)

        assert sorted(report.replaced) == ["tc_from_nic", "tc_from_pod"]
        assert sorted(report.links_updated) == ["h1/tc_from_pod", "h2/tc_from_pod", "slnic0/tc_from_nic"]
        after = sluice_filters(dp, n.node)
        assert set(after) == set(before) == {"h1", "h2", "slnic0"}
        for dev, lk in after.items():
            prog = lk["program"]
            assert lk["prog_id"] != before[dev]["prog_id"] and lk["prog_id"] == pinned_prog_id(dp, prog)
            assert lk["tag"] != tags[prog] and lk["tag"] == dp.pinned_tags()[prog]
            assert lk["handle"] == before[dev]["handle"]
        for dev in ("h1", "h2"):           # replaced in place: still one filter, no second one added
            shown = tc_show(n.node, "filter", "show", "dev", dev, "ingress")
            assert shown.count("direct-action") == 1, shown
        assert flow.sent > 1000
        assert len(flow.received) == flow.sent, f"{flow.sent - len(flow.received)} of {flow.sent} datagrams lost"
        assert redirected(dp) - counted >= flow.sent           # the counters survived and kept counting
        assert len(packets.echo(n.pod1, POD2, ECHOES)) == ECHOES


# ---- legacy: exactly its own ----------------------------------------------------------------------------

def test_legacy_removes_only_its_own_filters(pin_root):
    with legacy_datapath(pin_root) as dp, netns.namespaces("own") as (ns,):
        for a, b in (("slveth0", "slveth1"), ("slveth2", "slveth3")):
            netns.ns_exec(ns, "ip", "link", "add", a, "type", "veth", "peer", "name", b)
        # slveth0: somebody's clsact with somebody's cls_bpf filter before Sluice's, and one after it.
        netns.ns_exec(ns, "tc", "qdisc", "add", "dev", "slveth0", "clsact")
        foreign_filter(ns, "slveth0", prio=100, handle=7)
        foreign_filter(ns, "slveth0", prio=tc.PRIORITY + 1, handle=1, name="foreign-after")
        with netns.entered(ns):
            assert dp.attach_pod("slveth0") is True
            assert dp.attach_pod("slveth2") is True        # no qdisc there: Sluice adds the clsact
        assert "clsact" in tc_show(ns, "qdisc", "show", "dev", "slveth2")
        shown = tc_show(ns, "filter", "show", "dev", "slveth0", "ingress")
        assert all(name in shown for name in ("foreign direct-action", "foreign-after direct-action", "sluice/"))

        with netns.entered(ns):
            assert dp.detach_device("slveth0") == ["slveth0/tc_from_pod"]
            assert dp.detach_device("slveth0") == []
            assert dp.detach_device("slveth2") == ["slveth2/tc_from_pod"]
            assert dp.detach_device("sl-nope") == []
        shown = tc_show(ns, "filter", "show", "dev", "slveth0", "ingress")
        assert "sluice/" not in shown and "foreign direct-action" in shown and "foreign-after direct-action" in shown
        assert "clsact" in tc_show(ns, "qdisc", "show", "dev", "slveth0")      # somebody else's: stays
        assert "clsact" not in tc_show(ns, "qdisc", "show", "dev", "slveth2")  # Sluice's, now empty: gone

        # remove() likewise, and leaves another pin root's filter in the same netns alone.
        other = Datapath(pin_root + "-other", BPF_BUILD, tc_mode="legacy")
        other.load()
        try:
            with netns.entered(ns):
                dp.attach_pod("slveth0")
                other.attach_pod("slveth2")
                assert dp.remove() is True
                assert [(lk["target"], lk["kind"]) for lk in other.links()] == [("slveth2", "cls_bpf")]
                assert dp.links() == []
        finally:
            with netns.entered(ns):
                other.remove()
            shutil.rmtree(other.root, ignore_errors=True)
        shown = tc_show(ns, "filter", "show", "dev", "slveth0", "ingress")
        assert "sluice/" not in shown and "foreign direct-action" in shown and "foreign-after direct-action" in shown
        assert "clsact" in tc_show(ns, "qdisc", "show", "dev", "slveth0")
        assert tc_show(ns, "filter", "show", "dev", "slveth2", "ingress") == ""


def test_legacy_refuses_a_foreign_filter_in_its_slot(pin_root):
    with legacy_datapath(pin_root) as dp, netns.namespaces("slot") as (ns,):
        netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
        netns.ns_exec(ns, "tc", "qdisc", "add", "dev", "slveth0", "clsact")
        foreign_filter(ns, "slveth0", prio=tc.PRIORITY, handle=tc.HANDLES["tc_from_pod"], name="squatter")
        with netns.entered(ns):
            with pytest.raises(DatapathError, match=r"slveth0: .* not this datapath's \(bpf 'squatter'\)"):
                dp.attach_pod("slveth0")
            assert dp.links() == [] and dp.remove() is True
        assert "squatter direct-action" in tc_show(ns, "filter", "show", "dev", "slveth0", "ingress")


def test_switching_modes_attaches_before_it_detaches(pin_root):
    with legacy_datapath(pin_root) as legacy, netns.namespaces("switch") as (ns,):
        tcx = Datapath(pin_root, BPF_BUILD, tc_mode="tcx")
        netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
        index = netns.ifindex(ns, "slveth0")
        with netns.entered(ns):
            assert legacy.attach_pod("slveth0") is True
            assert [lk["kind"] for lk in legacy.links()] == ["cls_bpf"]
            assert tcx.attach_pod("slveth0") is True
            assert [lk["kind"] for lk in tcx.links()] == ["tcx"]
            assert len(lb.prog_query(index, lb.BPF_TCX_INGRESS)) == 1
            assert legacy.attach_pod("slveth0") is True
            assert [lk["kind"] for lk in legacy.links()] == ["cls_bpf"]
            assert lb.prog_query(index, lb.BPF_TCX_INGRESS) == []
            assert not os.path.exists(os.path.join(legacy.links_dir, "slveth0"))


# ---- legacy through the agent and the CNI plugin -------------------------------------------------------

def cni(agent: AgentProcess, command: str, cid: str, netns_path: str, **conf) -> dict:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni"}
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "sltest", "type": "sluice", **conf})
    return agent.request({"op": "cni", "command": command, "env": env, "stdin": stdin})


def test_agent_and_cni_in_legacy_mode(pin_root, tmp_path):
    with netns.namespaces("node", "pod") as (node, pod), cgroup() as cg:
        netns.ns_exec(node, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        netns.ns_exec(node, "ip", "addr", "add", "192.168.93.11/24", "dev", "sleth0")
        for dev in ("sleth0", "sleth1"):
            netns.ns_exec(node, "ip", "link", "set", dev, "up")
        state = {"node": {"name": "n1", "ip": "192.168.93.11", "nic": "sleth0", "pod_cidr": "10.246.9.0/24"}}
        (tmp_path / "state.json").write_text(json.dumps(state))
        sock = os.path.join("/tmp", f"slcni-{uuid.uuid4().hex[:8]}", "agent.sock")  # short: at most 107 bytes
        agent = AgentProcess(node, {"state_file": str(tmp_path / "state.json"), "pin_root": pin_root,
                                    "obj_dir": BPF_BUILD, "socket": sock, "metrics_address": "",
                                    "ipam_dir": str(tmp_path / "ipam"), "cgroup": cg.path, "poll_interval": 0.2,
                                    "tc_mode": "legacy"}, str(tmp_path))
        dp = Datapath(pin_root, BPF_BUILD)
        agent.start()
        try:
            assert agent.health()["tc_mode"] == "legacy"
            assert sluice_filters(dp, node)["sleth0"]["program"] == "tc_from_nic"
            status = netns.ns_exec(node, os.path.join(VENV_BIN, "sluice"), "--root", pin_root, "--obj-dir", BPF_BUILD,
                                   "--socket", sock, "status").stdout
            assert "tc mode: legacy (legacy from agent; kernel has tcx: yes)" in status
            assert "tc mode legacy" in status   # the agent's line

            cid, netns_path = f"sltest-{uuid.uuid4().hex[:12]}", f"/run/netns/{pod}"
            added = cni(agent, "ADD", cid, netns_path)
            assert added["ok"], added
            host = added["result"]["interfaces"][0]["name"]
            filters = sluice_filters(dp, node)
            assert filters[host]["program"] == "tc_from_pod" and filters[host]["kind"] == "cls_bpf"
            assert not os.path.exists(os.path.join(dp.links_dir, host))
            checked = cni(agent, "CHECK", cid, netns_path, prevResult=added["result"])
            assert checked == {"ok": True, "result": None}, checked
            assert cni(agent, "DEL", cid, netns_path)["ok"]
            agent.settled()
            assert set(sluice_filters(dp, node)) == {"sleth0"}
            with netns.entered(node):
                assert not dp.tc_attached(host, "tc_from_pod")
        finally:
            agent.stop()
            with netns.entered(node):
                dp.remove()
            shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
