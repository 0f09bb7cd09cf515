"""sluice.network.nic against veths and a bridge in a `sltest-` namespace, with a real datapath."""

from __future__ import annotations

import os

import pytest

from ansible_collections.sluice.network.plugins.module_utils import sluice as sluice_utils
from ansible_collections.sluice.network.plugins.modules import nic

from .utils import fail_module, run_module

from sluice import netlink  # pylint: disable=wrong-import-order


def args(pin_root, bpf_objects, **kw):
    return dict(kw, pin_root=pin_root, obj_dir=bpf_objects)


def test_missing_node_package_fails_with_standard_message(monkeypatch):
    monkeypatch.setattr(sluice_utils, "HAS_SLUICE", False)
    monkeypatch.setattr(sluice_utils, "SLUICE_IMPORT_ERROR", "Traceback: ImportError")
    result = fail_module(nic, {"name": "eth0"})
    assert "sluice (the Sluice node package, installed by the sluice.network.node role)" in result["msg"]
    assert result["exception"] == "Traceback: ImportError"


def test_unknown_interface_is_named(netns, pin_root, bpf_objects):
    result = fail_module(nic, args(pin_root, bpf_objects, name="slnope0"))
    assert "'slnope0'" in result["msg"]


@pytest.mark.parametrize("mtu", [20, 70000])
def test_mtu_out_of_range_is_named_and_nothing_changes(netns, pin_root, bpf_objects, mtu):
    before = netlink.link("sleth0")["mtu"]
    result = fail_module(nic, args(pin_root, bpf_objects, name="sleth0", mtu=mtu, xdp_mode="disabled"))
    assert str(mtu) in result["msg"] and "68..65535" in result["msg"]
    assert netlink.link("sleth0")["mtu"] == before


def test_bad_choice_is_rejected(netns):
    result = fail_module(nic, {"name": "sleth0", "xdp_mode": "turbo"})
    assert "turbo" in result["msg"]


def test_check_mode_reports_and_changes_nothing(netns, loaded):
    a = args(loaded.root, loaded.obj_dir, name="sleth0", mtu=9000, offloads={"gro": True})
    result = run_module(nic, a, check_mode=True, diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"]["mtu"] == 1500 and result["diff"]["after"]["mtu"] == 9000
    assert result["diff"]["before"]["offloads"] == {"gro": False}
    assert result["diff"]["after"]["offloads"] == {"gro": True}
    assert result["diff"]["after"]["xdp_mode"] == "native"  # veth: native XDP
    assert netlink.link("sleth0")["mtu"] == 1500
    assert netlink.link("sleth0")["xdp"] == "none"
    assert loaded.links() == []


def test_apply_then_idempotent(netns, loaded):
    a = args(loaded.root, loaded.obj_dir, name="sleth0", mtu=9000, offloads={"gro": True, "lro": False},
             channels={"rx": 2, "tx": 2})
    result = run_module(nic, a, diff=True)
    assert result["changed"] is True
    assert result["interface"] == "sleth0"
    assert result["mtu"] == 9000 and netlink.link("sleth0")["mtu"] == 9000
    assert result["xdp_mode"] == "native" and netlink.link("sleth0")["xdp"] == "native"
    assert result["channels"]["rx"] == 2
    assert result["offloads"] == {"gro": True, "lro": False}
    assert result["driver"]["name"] == "veth"
    assert "rings" in result["unsupported"]  # veth has no ethtool -g; not asked for, so reported only
    assert {(lk["target"], lk["program"]) for lk in loaded.links()} == {("sleth0", "tc_from_nic"),
                                                                        ("sleth0", "xdp_nic")}
    again = run_module(nic, a, diff=True)
    assert again["changed"] is False, again["changes"]
    assert again["diff"]["before"] == again["diff"]["after"]


def test_xdp_modes(netns, loaded):
    a = args(loaded.root, loaded.obj_dir, name="sleth0")
    assert run_module(nic, dict(a, xdp_mode="generic"))["xdp_mode"] == "generic"
    assert netlink.link("sleth0")["xdp"] == "generic"
    result = run_module(nic, dict(a, xdp_mode="best-effort"))
    assert result["changed"] is False and result["xdp_mode"] == "generic"  # generic satisfies best-effort
    assert run_module(nic, dict(a, xdp_mode="native"))["xdp_mode"] == "native"
    result = run_module(nic, dict(a, xdp_mode="disabled"))
    assert result["changed"] is True and result["xdp_mode"] == "none"
    assert netlink.link("sleth0")["xdp"] == "none"
    assert run_module(nic, dict(a, xdp_mode="disabled"))["changed"] is False


def test_native_on_a_driver_without_native_xdp_fails_and_changes_nothing(netns, loaded):
    result = fail_module(nic, args(loaded.root, loaded.obj_dir, name="slbr0", xdp_mode="native", mtu=1400))
    assert "slbr0" in result["msg"] and "natively" in result["msg"] and "bridge" in result["msg"]
    assert loaded.links() == []
    assert netlink.link("slbr0")["mtu"] == 1500 and netlink.link("slbr0")["xdp"] == "none"
    # best-effort falls back to generic there
    assert run_module(nic, args(loaded.root, loaded.obj_dir, name="slbr0"))["xdp_mode"] == "generic"


def test_xdp_without_a_loaded_datapath_fails_clearly(netns, pin_root, bpf_objects):
    result = fail_module(nic, args(pin_root, bpf_objects, name="sleth0", mtu=1400))
    assert "not loaded" in result["msg"] and pin_root in result["msg"]
    assert netlink.link("sleth0")["mtu"] == 1500
    # disabled needs no datapath
    assert run_module(nic, args(pin_root, bpf_objects, name="sleth0", xdp_mode="disabled"))["changed"] is False


def test_unsupported_rings_fail_only_when_asked(netns, pin_root, bpf_objects):
    result = fail_module(nic, args(pin_root, bpf_objects, name="sleth0", xdp_mode="disabled",
                                   rings={"rx": 512}, mtu=1400))
    assert "rings" in result["msg"] and "sleth0" in result["msg"]
    assert netlink.link("sleth0")["mtu"] == 1500


def test_channels_over_the_maximum_are_named(netns, pin_root, bpf_objects):
    result = fail_module(nic, args(pin_root, bpf_objects, name="sleth0", xdp_mode="disabled", channels={"rx": 5}))
    assert "channels.rx: 5 exceeds the maximum 2" in result["msg"]


def test_unknown_and_fixed_offloads(netns, pin_root, bpf_objects):
    a = args(pin_root, bpf_objects, name="sleth0", xdp_mode="disabled")
    assert "'bogus-offload'" in fail_module(nic, dict(a, offloads={"bogus-offload": True}))["msg"]
    assert "fixed" in fail_module(nic, dict(a, offloads={"lro": True}))["msg"]
    assert "'maybe'" in fail_module(nic, dict(a, offloads={"gro": "maybe"}))["msg"]
    # already off: fixed does not matter
    assert run_module(nic, dict(a, offloads={"lro": False}))["changed"] is False


def test_builtin_driver_is_reported_not_failed(netns, pin_root, bpf_objects):
    result = run_module(nic, args(pin_root, bpf_objects, name="sleth0", xdp_mode="disabled",
                                  driver={"name": "veth", "options": {"foo": "1"}}))
    assert result["driver"] == {"name": "veth", "builtin": True, "files": []}
    assert any("kernel command line" in w and "veth.foo=1" in w for w in result["warnings"])
    assert not os.path.exists("/etc/modprobe.d/sluice-veth.conf")


def test_bad_driver_option_is_named(netns, pin_root, bpf_objects):
    result = fail_module(nic, args(pin_root, bpf_objects, name="sleth0", xdp_mode="disabled",
                                   driver={"name": "veth", "options": {"foo": "a b"}}))
    assert "driver.options.foo" in result["msg"] and "'a b'" in result["msg"]
