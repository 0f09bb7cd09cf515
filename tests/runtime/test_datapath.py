"""The loader on the real kernel: pins, links, atomic upgrades, failed upgrades, removal. The links are
tcx links (attach_tc in tcx mode: a pod veth gets a cls_bpf filter in tc mode auto, see test_tc_modes.py)."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import BPF_BUILD, ROOT
from lib import netns
from sluice import maps as m
from sluice.bpf import libbpf as lb
from sluice.datapath import OBJECTS, Datapath, DatapathError

CLANG_FLAGS = ["-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I", os.path.join(ROOT, "build"),
               "-I", os.path.join(ROOT, "bpf"), "-I", os.path.join(ROOT, "bpf", "lib")]


@pytest.fixture
def obj_copy(tmp_path):
    """A private copy of the objects that a test may replace with other versions."""
    d = tmp_path / "objs"
    shutil.copytree(BPF_BUILD, d)
    return str(d)


def build(src: str, out: str, opt: str = "-O2") -> None:
    subprocess.run(["clang", opt, *CLANG_FLAGS, "-c", src, "-o", out], check=True, capture_output=True)


def test_load_pins_every_program_and_map(datapath):
    progs = {p for ps in OBJECTS.values() for p in ps}
    assert set(os.listdir(datapath.progs_dir)) == progs
    assert {c.name for c in m.ALL_MAPS} <= set(os.listdir(datapath.maps_dir))
    assert oct(os.stat(datapath.root).st_mode & 0o777) == "0o700"
    assert datapath.load().changed is False  # same objects: nothing to do


def test_check_mode_reports_without_touching(pin_root, obj_copy):
    dp = Datapath(pin_root, obj_copy)
    report = dp.load(check_mode=True)
    assert report.changed and not os.listdir(pin_root)


def test_reload_keeps_map_contents_and_swaps_links_atomically(pin_root, obj_copy):
    dp = Datapath(pin_root, obj_copy)
    dp.load()
    try:
        with netns.namespaces("dp") as (ns,):
            netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
            with netns.entered(ns):
                assert dp.attach_tc("slveth0", "tc_from_pod", "tcx") is True
                assert dp.attach_tc("slveth0", "tc_from_pod", "tcx") is False  # already attached
                ifindex = netns.ifindex(ns, "slveth0")
                before = lb.prog_query(ifindex, lb.BPF_TCX_INGRESS)
            with dp.open_map(m.EndpointsMap) as eps:
                eps.put("10.9.0.5", m.Endpoint(ifindex, "02:00:00:00:00:05", "02:00:00:00:00:06"))
            old_link = {l["target"]: l for l in dp.links()}["slveth0"]

            build(os.path.join(ROOT, "bpf", "tc_pod.c"), os.path.join(obj_copy, "tc_pod.o"), opt="-O1")
            report = dp.load()

            assert report.replaced == ["tc_from_pod"]
            assert report.links_updated == ["slveth0/tc_from_pod"]
            new_link = {l["target"]: l for l in dp.links()}["slveth0"]
            assert new_link["link_id"] == old_link["link_id"]          # same link, never detached
            assert new_link["tag"] != old_link["tag"]                  # new code behind it
            with netns.entered(ns):
                after = lb.prog_query(ifindex, lb.BPF_TCX_INGRESS)
            assert len(before) == len(after) == 1 and before != after
            with dp.open_map(m.EndpointsMap) as eps:
                assert eps.get("10.9.0.5").ifindex == ifindex         # map survived the reload
    finally:
        dp.remove()


def test_rejected_upgrade_keeps_running_datapath(pin_root, obj_copy):
    dp = Datapath(pin_root, obj_copy)
    dp.load()
    try:
        with netns.namespaces("dp") as (ns,):
            netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
            with netns.entered(ns):
                dp.attach_tc("slveth0", "tc_from_pod", "tcx")
            tags = dp.pinned_tags()
            links = dp.links()
            build(os.path.join(ROOT, "tests", "fixtures", "bpf", "tc_pod_rejected.c"),
                  os.path.join(obj_copy, "tc_pod.o"))
            with pytest.raises(lb.VerifierError) as err:
                dp.load()
            # the excerpt (what an operator gets) names the fixture's unchecked read and the verifier's reason
            excerpt = err.value.excerpt()
            assert "return data[100];" in excerpt, excerpt
            assert re.search(r"^invalid access to packet, off=100 size=1, R\d", excerpt, re.M), excerpt
            assert dp.pinned_tags() == tags
            assert dp.links() == links
    finally:
        dp.remove()


def test_xdp_modes_on_veth(datapath):
    with netns.namespaces("xdp") as (ns,):
        netns.ns_exec(ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        netns.ns_exec(ns, "ip", "link", "set", "sleth0", "up")
        with netns.entered(ns):
            assert datapath.attach_nic("sleth0", "best-effort")["xdp_mode"] == "native"  # veth has native XDP
            assert datapath.attach_nic("sleth0", "best-effort")["changed"] is False
            assert datapath.attach_nic("sleth0", "generic")["xdp_mode"] == "generic"
            assert netns.link_info(None, "sleth0").get("xdpgeneric") or datapath.xdp_mode("sleth0") == "generic"
            assert datapath.attach_nic("sleth0", "disabled")["xdp_mode"] == "none"
            with pytest.raises(DatapathError, match="'turbo'"):
                datapath.attach_nic("sleth0", "turbo")
            with pytest.raises(DatapathError, match="'sl-nope'"):
                datapath.attach_nic("sl-nope", "native")


def test_stale_link_of_deleted_device_is_replaced(datapath):
    with netns.namespaces("dp") as (ns,):
        for _round in range(2):
            netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
            with netns.entered(ns):
                assert datapath.attach_tc("slveth0", "tc_from_pod", "tcx") is True
            netns.ns_exec(ns, "ip", "link", "del", "slveth0")
        assert [l["attached"] for l in datapath.links()] == [False]


def test_remove_detaches_everything(pin_root):
    dp = Datapath(pin_root, BPF_BUILD)
    dp.load()
    with netns.namespaces("dp") as (ns,):
        netns.ns_exec(ns, "ip", "link", "add", "slveth0", "type", "veth", "peer", "name", "slveth1")
        with netns.entered(ns):
            dp.attach_tc("slveth0", "tc_from_pod", "tcx")
            ifindex = netns.ifindex(ns, "slveth0")
            assert lb.prog_query(ifindex, lb.BPF_TCX_INGRESS)
            assert dp.remove() is True
            assert lb.prog_query(ifindex, lb.BPF_TCX_INGRESS) == []
    assert not os.path.exists(pin_root)
