"""sluice.nic's ethtool parsers: channels from a real veth's `ethtool -l`, rings from the shape
ethtool 6.1 prints for a multi-queue NIC (a veth has no ring parameters). And nic.plan() on
such readings: what the nic module would change, planned without touching anything."""

from __future__ import annotations

import re

import pytest

from lib import netns
from sluice import nic

RINGS_MLX5 = """Ring parameters for enp1s0f0:
Pre-set maximums:
RX:\t\t8192
RX Mini:\tn/a
RX Jumbo:\tn/a
TX:\t\t8192
Current hardware settings:
RX:\t\t1024
RX Mini:\tn/a
RX Jumbo:\tn/a
TX:\t\t1024
RX Buf Len:\t\tn/a
CQE Size:\t\tn/a
TX Push:\toff
TCP data split:\tn/a
"""


def test_channels_of_a_real_veth():
    with netns.namespaces("nic") as (ns,):
        netns.ns_exec(ns, "ip", "link", "add", "slv0", "type", "veth", "peer", "name", "slv1")
        text = netns.ns_exec(ns, "ethtool", "-l", "slv0").stdout
    channels = nic.parse_channels(text)
    assert channels["max"]["rx"] == 2 and channels["max"]["tx"] == 2
    assert channels["current"]["rx"] == 1 and channels["max"]["combined"] is None


def test_rings_keep_known_keys_with_n_a_as_none():
    rings = nic.parse_rings(RINGS_MLX5)
    assert rings["max"] == {"rx": 8192, "rx-mini": None, "rx-jumbo": None, "tx": 8192}
    assert rings["current"]["rx"] == 1024 and rings["current"]["tx"] == 1024
    assert "rx buf len" not in rings["current"] and "tx push" not in rings["current"]


CHANNELS_VETH = """Channel parameters for slv0:
Pre-set maximums:
RX:\t\t2
TX:\t\t2
Other:\t\tn/a
Combined:\tn/a
Current hardware settings:
RX:\t\t1
TX:\t\t1
Other:\t\tn/a
Combined:\tn/a
"""
FEATURES_VETH = """Features for slv0:
generic-receive-offload: off
large-receive-offload: off [fixed]
"""
ETHTOOL = {"-l": (0, CHANNELS_VETH, ""), "-g": (1, "", "netlink error: Operation not supported"),
           "-k": (0, FEATURES_VETH, ""), "-i": (0, "driver: veth\n", "")}


class ReadOnlyNic(nic.Nic):
    """A veth as ethtool and netlink report it; any setter fails the test."""

    def __init__(self):
        super().__init__("slv0", runner=self.ethtool)

    @staticmethod
    def ethtool(argv):
        assert argv[1] in ETHTOOL, f"plan() ran {argv}"
        return ETHTOOL[argv[1]]

    def link(self):
        return {"ifindex": 7, "mtu": 1500}

    def native_xdp(self):
        return True


class LoadedDatapath:
    root = "/sys/fs/bpf/sluice-test"

    def __init__(self, loaded=True):
        self.loaded = loaded

    def is_loaded(self):
        return self.loaded

    def xdp_mode(self, ifname):  # pylint: disable=unused-argument
        return "none"

    def links(self):
        return []


def wanted(**kw):
    return dict(dict(mtu=None, xdp_mode="best-effort", driver=None, channels=None, rings=None, offloads=None), **kw)


def test_plan_reports_every_change_and_makes_none():
    plan = nic.plan(ReadOnlyNic(), LoadedDatapath(), wanted(mtu=9000, channels={"rx": 2}, offloads={"gro": True}),
                    modprobe=None, warn=pytest.fail)
    assert plan.changes == {"mtu": 9000, "channels": {"rx": 2}, "offloads": {"gro": True},
                            "xdp_mode": "native", "tc_from_nic": "attach"}
    assert plan.before == {"mtu": 1500, "xdp_mode": "none", "channels": {"rx": 1}, "offloads": {"gro": False}}
    assert plan.after == {"mtu": 9000, "xdp_mode": "native", "channels": {"rx": 2}, "offloads": {"gro": True}}
    result = plan.result()
    assert result["changed"] and result["unsupported"] == ["rings"] and result["rings"] is None
    assert result["driver"] == {"name": "veth", "builtin": True, "files": []}  # no modprobe: built in


@pytest.mark.parametrize("kw, message", [
    (dict(rings={"rx": 512}), "rings: slv0 (driver veth) does not support `ethtool -G`"),
    (dict(channels={"rx": 5}), "channels.rx: 5 exceeds the maximum 2 of slv0"),
    (dict(offloads={"lro": True}), "cannot turn lro on (fixed by its driver)"),
    (dict(mtu=70000), "mtu 70000 is outside 68..65535"),
])
def test_plan_refuses_what_the_nic_cannot_do(kw, message):
    with pytest.raises(nic.NicError, match=re.escape(message)):
        nic.plan(ReadOnlyNic(), LoadedDatapath(), wanted(xdp_mode="disabled", **kw), modprobe=None, warn=pytest.fail)


def test_plan_needs_the_datapath_for_xdp_only():
    with pytest.raises(nic.NicError, match="not loaded under /sys/fs/bpf/sluice-test"):
        nic.plan(ReadOnlyNic(), LoadedDatapath(loaded=False), wanted(), modprobe=None, warn=pytest.fail)
    plan = nic.plan(ReadOnlyNic(), LoadedDatapath(loaded=False), wanted(xdp_mode="disabled"), modprobe=None,
                    warn=pytest.fail)
    assert plan.changes == {} and plan.result()["changed"] is False
