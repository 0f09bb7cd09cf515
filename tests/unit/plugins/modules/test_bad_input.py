"""Bad module arguments: the real module code runs (utils.run_module/fail_module patch only exit_json and
fail_json), fails with a message naming the bad value, and the node is exactly as it was: links,
addresses and routes of the `sltest-` namespace, the pins under the pin root, every datapath map's
contents and the module's files (tests/lib/snapshot.py). Each row starts from a node that already
holds a good configuration, so "nothing changed" also means "nothing good was removed".

The table of all rows is docs/bad-input.md."""

from __future__ import annotations

import subprocess

import pytest

from ansible_collections.sluice.network.plugins.modules import cni_config, nic, state

from .utils import fail_module, run_module

from lib.snapshot import unchanged  # pylint: disable=wrong-import-order

NODE = {"name": "node1", "ip": "192.168.95.11", "nic": "sleth0", "pod_cidr": "10.244.1.0/24"}
ROUTES = [{"cidr": "10.244.2.0/24", "nexthop": "192.168.95.12", "node": "node2"}]
SERVICE = {"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "tcp",
           "backends": [{"ip": "10.244.1.5", "port": 8080}, {"ip": "10.244.2.7", "port": 8080}]}
LB_VIP = {"name": "ext", "vip": "192.168.95.200", "port": 443, "protocol": "tcp",
          "backends": [{"ip": "10.244.1.5", "port": 8443}]}


# ---- sluice.network.state --------------------------------------------------------------------------

@pytest.fixture
def applied(netns, loaded, tmp_path):
    """A node with a good state applied: routes, services, an LB VIP and a prefilter in the maps, the
    kernel route, the state file."""
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ip", "addr", "add", f"{NODE['ip']}/24", "dev", "sleth0"],
                   check=True, capture_output=True)
    good = {"path": str(tmp_path / "state.json"), "node": dict(NODE), "routes": list(ROUTES), "services": [SERVICE],
            "lb_vips": [LB_VIP], "prefilter": ["203.0.113.0/24"], "pin_root": loaded.root, "obj_dir": loaded.obj_dir}
    assert run_module(state, good)["applied"] is True
    return {"ns": netns, "dp": loaded, "args": good, "path": good["path"]}


def node_with(**changes):
    return {"node": dict(NODE, **changes)}


# id: (argument changes, text the message must hold)
STATE_ROWS = {
    "pod_cidr-malformed": (node_with(pod_cidr="10.244.1.0/33"), "'10.244.1.0/33'"),
    "pod_cidr-host-bits": (node_with(pod_cidr="10.244.1.1/24"), "'10.244.1.1/24' has host bits set"),
    "route-cidr-malformed": ({"routes": [dict(ROUTES[0], cidr="10.244.2.0/33")]}, "'10.244.2.0/33'"),
    "prefilter-malformed": ({"prefilter": ["203.0.113.0/99"]}, "'203.0.113.0/99'"),
    "route-overlaps-pod_cidr": ({"routes": [dict(ROUTES[0], cidr="10.244.1.128/25")]},
                                "10.244.1.128/25 overlaps 10.244.1.0/24"),
    "routes-overlap": ({"routes": ROUTES + [{"cidr": "10.244.2.0/23", "nexthop": "192.168.95.13"}]},
                       "10.244.2.0/23 overlaps 10.244.2.0/24"),
    "unknown-interface": (node_with(nic="slnope0"), "'slnope0'"),
    "nexthop-not-on-the-nic": ({"routes": [dict(ROUTES[0], nexthop="198.51.100.12")]}, "nexthop 198.51.100.12"),
    "route-over-the-nic-network": ({"routes": [{"cidr": "192.168.95.1/32", "nexthop": "192.168.95.249"}]},
                                   "routes (192.168.95.1/32): overlaps 192.168.95.0/24, a network directly connected "
                                   "to sleth0"),
    "node-ip-malformed": (node_with(ip="192.168.95.300"), "'192.168.95.300'"),
    "duplicate-service-vip-port": ({"services": [SERVICE, dict(SERVICE, name="web2", backends=[])]},
                                   "duplicate frontend 10.96.0.10:80/tcp"),
    "duplicate-lb-vip-port": ({"lb_vips": [LB_VIP, dict(LB_VIP, name="ext2")]}, "duplicate frontend 192.168.95.200:443/tcp"),
    "backend-without-port": ({"services": [dict(SERVICE, backends=[{"ip": "10.244.1.5"}])]},
                             "services[0] (web).backends[0]: backend {'ip': '10.244.1.5'} needs an ip and a port"),
    "service-port-out-of-range": ({"services": [dict(SERVICE, port=70000)]}, "port 70000"),
    "unknown-routing-mode": ({"routing": {"mode": "geneve"}}, "geneve"),
    "vni-out-of-range": ({"routing": {"mode": "vxlan", "vni": 1 << 24}}, str(1 << 24)),
}


@pytest.mark.parametrize("check_mode", [False, True], ids=["run", "check"])
@pytest.mark.parametrize("row", list(STATE_ROWS))
def test_state_module(applied, row, check_mode):
    changes, named = STATE_ROWS[row]
    with unchanged(applied["ns"], applied["dp"].root, [applied["path"]]):
        result = fail_module(state, dict(applied["args"], **changes), check_mode=check_mode)
    assert named in result["msg"], result["msg"]
    assert result.get("changed") is not True


# ---- sluice.network.nic ----------------------------------------------------------------------------

@pytest.fixture
def nic_node(netns, loaded):
    """sleth0 with Sluice's XDP program in generic mode and its tc program; a bridge slbr0 (no native XDP)."""
    args = {"name": "sleth0", "xdp_mode": "generic", "pin_root": loaded.root, "obj_dir": loaded.obj_dir}
    assert run_module(nic, args)["xdp_mode"] == "generic"
    return {"ns": netns, "dp": loaded, "args": args}


NIC_ROWS = {
    "unknown-interface": ({"name": "slnope0"}, "'slnope0'"),
    "native-xdp-on-a-bridge": ({"name": "slbr0", "xdp_mode": "native", "mtu": 1400}, "slbr0 (driver bridge) cannot run XDP"),
    "mtu-too-small": ({"mtu": 20, "xdp_mode": "native"}, "20"),
    "mtu-too-large": ({"mtu": 70000, "xdp_mode": "native"}, "70000"),
    "unknown-xdp-mode": ({"xdp_mode": "turbo"}, "turbo"),
    "channels-over-maximum": ({"channels": {"rx": 5}, "mtu": 1400}, "channels.rx: 5 exceeds the maximum 2"),
    "unknown-offload": ({"offloads": {"bogus-offload": True}, "mtu": 1400}, "'bogus-offload'"),
}


@pytest.mark.parametrize("row", list(NIC_ROWS))
def test_nic_module(nic_node, row):
    changes, named = NIC_ROWS[row]
    with unchanged(nic_node["ns"], nic_node["dp"].root):
        result = fail_module(nic, dict(nic_node["args"], **changes))
    assert named in result["msg"], result["msg"]
    if row.startswith("mtu"):
        assert "68..65535" in result["msg"]
    assert result.get("changed") is not True


# ---- sluice.network.cni_config -----------------------------------------------------------------------

@pytest.fixture
def cni_dirs(tmp_path):
    """An installed conflist and plugin, and another runtime's configuration that exclusive=true would move."""
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    (conf_dir / "10-bridge.conflist").write_text('{"cniVersion": "1.0.0", "name": "bridge", "plugins": []}\n')
    bin_dir.mkdir()
    (bin_dir / "sluice").write_text("plugin")   # what the cni role copies
    args = {"conf_dir": str(conf_dir), "bin_dir": str(bin_dir), "mtu": 1450}
    assert run_module(cni_config, args)["changed"] is True
    return {"args": dict(args, exclusive=True), "paths": [str(conf_dir), str(bin_dir)]}


CNI_CONFIG_ROWS = {
    "mtu-too-large": ({"mtu": 70000}, "mtu 70000 is outside 68..65535"),
    "mtu-too-small": ({"mtu": 20}, "mtu 20 is outside 68..65535"),
    "unsupported-cni_version": ({"cni_version": "0.3.1"}, "0.3.1"),
    "priority-out-of-range": ({"priority": 100}, "priority 100"),
    "bad-network_name": ({"network_name": "a b"}, "'a b'"),
    "chained-plugin-without-type": ({"chained_plugins": [{"sysctl": {}}]}, "chained_plugins[0]"),
}


@pytest.mark.parametrize("row", list(CNI_CONFIG_ROWS))
def test_cni_config_module(cni_dirs, row):
    changes, named = CNI_CONFIG_ROWS[row]
    with unchanged(paths=cni_dirs["paths"], net=False):
        result = fail_module(cni_config, dict(cni_dirs["args"], **changes))
    assert named in result["msg"], result["msg"]
    assert result.get("changed") is not True


def test_the_snapshot_sees_what_a_good_run_changes(nic_node, cni_dirs):
    """The check above is not vacuous: a module run that does change something fails it."""
    with pytest.raises(AssertionError, match="mtu"):
        with unchanged(nic_node["ns"], nic_node["dp"].root):
            run_module(nic, dict(nic_node["args"], mtu=1400))
    with pytest.raises(AssertionError, match="xdp"):
        with unchanged(nic_node["ns"], nic_node["dp"].root):
            run_module(nic, dict(nic_node["args"], xdp_mode="native"))
    with pytest.raises(AssertionError, match="10-bridge.conflist"):
        with unchanged(paths=cni_dirs["paths"], net=False):
            run_module(cni_config, cni_dirs["args"])  # exclusive: moves the other configuration aside
