"""sluice.nic's ethtool parsers: channels from a real veth's `ethtool -l`, rings from the shape
ethtool 6.1 prints for a multi-queue NIC (a veth has no ring parameters)."""

from __future__ import annotations

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
