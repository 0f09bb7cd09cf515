"""sluice.network.datapath with real objects in a private pin root, a veth in a `sltest-` namespace
and a throwaway cgroup (the host's root cgroup is never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess

from ansible_collections.sluice.network.plugins.modules import datapath

from .utils import fail_module, run_module

from sluice.datapath import OBJECTS, Datapath  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
PROGRAMS = {p for ps in OBJECTS.values() for p in ps}
CGROUP_LINKS = {"cgroup/sock_connect4", "cgroup/sock_sendmsg4", "cgroup/sock_recvmsg4", "cgroup/sock_getpeer4",
                "cgroup/sockops_tcp"}


def live_links(dp):
    return {f"{lk['target']}/{lk['program']}" for lk in dp.links() if lk["attached"]}


def test_missing_objects_fail_and_pin_nothing(pin_root, tmp_path):
    result = fail_module(datapath, {"pin_root": pin_root, "obj_dir": str(tmp_path)})
    assert "missing" in result["msg"] and str(tmp_path / "tc_pod.o") in result["msg"]
    assert not os.path.exists(pin_root)


def test_check_mode_computes_tags_and_pins_nothing(pin_root, bpf_objects, cgroup):
    result = run_module(datapath, {"pin_root": pin_root, "obj_dir": bpf_objects, "cgroup": cgroup},
                        check_mode=True, diff=True)
    assert result["changed"] is True
    assert set(result["programs"]) == PROGRAMS and all(result["programs"].values())
    assert sorted(result["replaced"]) == sorted(PROGRAMS)
    assert set(result["links_created"]) == CGROUP_LINKS | {"sockhash/sk_msg_redir"}
    assert result["diff"]["before"]["programs"] == {}
    assert result["diff"]["after"]["programs"] == result["programs"]
    assert not os.path.exists(os.path.join(pin_root, "progs"))


def test_present_attaches_then_is_idempotent(netns, pin_root, bpf_objects, cgroup):
    a = {"pin_root": pin_root, "obj_dir": bpf_objects, "cgroup": cgroup, "nic": "sleth0"}
    result = run_module(datapath, a, diff=True)
    dp = Datapath(pin_root, bpf_objects)
    assert result["changed"] is True
    assert result["programs"] == dp.pinned_tags()
    assert result["object_hash"] == dp.object_hash()
    assert set(result["links_created"]) == CGROUP_LINKS | {"sockhash/sk_msg_redir", "sleth0/tc_from_nic"}
    assert live_links(dp) == set(result["links_created"])

    check = run_module(datapath, a, check_mode=True, diff=True)
    assert check["changed"] is False and check["replaced"] == []
    again = run_module(datapath, a, diff=True)
    assert again["changed"] is False
    assert again["links_created"] == [] and again["replaced"] == [] and again["links_updated"] == []
    assert again["diff"]["before"] == again["diff"]["after"]


def test_check_mode_reports_the_links_a_run_creates(netns, pin_root, bpf_objects, cgroup):
    a = {"pin_root": pin_root, "obj_dir": bpf_objects, "cgroup": cgroup, "nic": "sleth0"}
    check = run_module(datapath, a, check_mode=True)
    assert set(check["links_created"]) == CGROUP_LINKS | {"sockhash/sk_msg_redir", "sleth0/tc_from_nic"}
    assert sorted(run_module(datapath, a)["links_created"]) == sorted(check["links_created"])


def test_legacy_tc_mode_attaches_a_cls_bpf_filter(netns, pin_root, bpf_objects, cgroup):
    a = {"pin_root": pin_root, "obj_dir": bpf_objects, "cgroup": cgroup, "nic": "sleth0", "tc_mode": "legacy"}
    assert run_module(datapath, a)["changed"] is True
    dp = Datapath(pin_root, bpf_objects, tc_mode="legacy")
    nic = [lk for lk in dp.links() if lk["target"] == "sleth0"]
    assert [(lk["kind"], lk["program"]) for lk in nic] == [("cls_bpf", "tc_from_nic")]
    assert nic[0]["tag"] == dp.pinned_tags()["tc_from_nic"]
    assert run_module(datapath, a)["changed"] is False


def test_socket_lb_and_sockmap_false_detach(pin_root, bpf_objects, cgroup):
    a = {"pin_root": pin_root, "obj_dir": bpf_objects, "cgroup": cgroup}
    run_module(datapath, a)
    check = run_module(datapath, dict(a, socket_lb=False, sockmap=False), check_mode=True)
    assert check["changed"] is True and len(check["links_removed"]) == 6
    dp = Datapath(pin_root, bpf_objects)
    assert live_links(dp) == CGROUP_LINKS | {"sockhash/sk_msg_redir"}
    result = run_module(datapath, dict(a, socket_lb=False, sockmap=False))
    assert set(result["links_removed"]) == CGROUP_LINKS | {"sockhash/sk_msg_redir"}
    assert live_links(dp) == set()
    assert run_module(datapath, dict(a, socket_lb=False, sockmap=False))["changed"] is False


def test_unknown_nic_and_cgroup_are_named(pin_root, bpf_objects):
    a = {"pin_root": pin_root, "obj_dir": bpf_objects}
    assert "'slnope0'" in fail_module(datapath, dict(a, nic="slnope0"))["msg"]
    assert "/nonexistent/cg" in fail_module(datapath, dict(a, cgroup="/nonexistent/cg"))["msg"]
    assert not os.path.exists(pin_root)


def test_verifier_rejection_keeps_the_running_datapath(pin_root, bpf_objects, cgroup, tmp_path):
    objs = tmp_path / "objs"
    shutil.copytree(bpf_objects, objs)
    a = {"pin_root": pin_root, "obj_dir": str(objs), "cgroup": cgroup}
    run_module(datapath, a)
    dp = Datapath(pin_root, str(objs))
    tags, links = dp.pinned_tags(), dp.links()
    build = os.path.dirname(bpf_objects)  # build/, which holds vmlinux.h
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I", build,
                    "-I", os.path.join(ROOT, "bpf"), "-I", os.path.join(ROOT, "bpf", "lib"),
                    "-c", os.path.join(ROOT, "tests", "fixtures", "bpf", "tc_pod_rejected.c"),
                    "-o", str(objs / "tc_pod.o")], check=True, capture_output=True)
    for check_mode in (True, False):
        result = fail_module(datapath, a, check_mode=check_mode)
        assert "verifier rejected" in result["msg"]
        assert result["verifier_log"] and result["verifier_log"].strip().splitlines()[-1] in result["msg"]
        assert result["changed"] is False
        assert dp.pinned_tags() == tags and dp.links() == links


def test_absent(pin_root, bpf_objects, cgroup):
    a = {"pin_root": pin_root, "obj_dir": bpf_objects, "cgroup": cgroup}
    run_module(datapath, a)
    check = run_module(datapath, dict(a, state="absent"), check_mode=True, diff=True)
    assert check["changed"] is True and os.path.isdir(pin_root)
    assert set(check["diff"]["before"]["programs"]) == PROGRAMS and check["diff"]["after"] == {}
    result = run_module(datapath, dict(a, state="absent"))
    assert result["changed"] is True and not os.path.exists(pin_root)
    assert run_module(datapath, dict(a, state="absent"))["changed"] is False
