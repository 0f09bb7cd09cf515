"""sluice.network.cni_config in temporary conf/bin dirs (the plugin itself is the cni role's copy)."""

from __future__ import annotations

import json
import os

import pytest

from ansible_collections.sluice.network.plugins.modules import cni_config

from .utils import fail_module, run_module


@pytest.fixture
def dirs(tmp_path):
    conf, bindir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    return {"conf_dir": str(conf), "bin_dir": str(bindir)}


def test_writes_conflist_then_idempotent(dirs):
    a = dict(dirs, mtu=1450, chained_plugins=[{"type": "portmap", "capabilities": {"portMappings": True}}])
    result = run_module(cni_config, a, diff=True)
    assert result["changed"] is True
    assert result["conflist"] == os.path.join(dirs["conf_dir"], "05-sluice.conflist")
    assert result["plugin"] == os.path.join(dirs["bin_dir"], "sluice")
    with open(result["conflist"]) as f:
        conf = json.load(f)
    assert conf == {"cniVersion": "1.1.0", "name": "sluice",
                    "plugins": [{"type": "sluice", "agentSocket": "/run/sluice/agent.sock", "mtu": 1450,
                                 "capabilities": {"ips": True}},
                                {"type": "portmap", "capabilities": {"portMappings": True}}]}
    assert result["diff"][0]["before"] == "" and json.loads(result["diff"][0]["after"]) == conf
    assert any("plugin" in w and "missing" in w for w in result.get("warnings", [])), result

    again = run_module(cni_config, a, diff=True)
    assert again["changed"] is False and again["moved"] == []
    assert again["diff"][0]["before"] == again["diff"][0]["after"]


def test_check_mode_writes_nothing(dirs):
    result = run_module(cni_config, dict(dirs, priority=10), check_mode=True, diff=True)
    assert result["changed"] is True and result["conflist"].endswith("/10-sluice.conflist")
    assert json.loads(result["diff"][0]["after"])["plugins"][0]["type"] == "sluice"
    assert os.listdir(dirs["conf_dir"]) == [] and not os.path.exists(dirs["bin_dir"])


def test_exclusive_moves_others_and_absent_restores(dirs):
    conf = dirs["conf_dir"]
    for name in ("10-bridge.conflist", "99-loopback.conf", "old.json"):
        with open(os.path.join(conf, name), "w") as f:
            f.write("{}")
    with open(os.path.join(conf, "README"), "w") as f:
        f.write("not a config")
    check = run_module(cni_config, dict(dirs, exclusive=True), check_mode=True)
    assert check["moved"] == ["10-bridge.conflist", "99-loopback.conf", "old.json"]
    assert len(os.listdir(conf)) == 4
    result = run_module(cni_config, dict(dirs, exclusive=True))
    assert result["moved"] == ["10-bridge.conflist", "99-loopback.conf", "old.json"]
    assert sorted(os.listdir(conf)) == [".sluice-moved", "05-sluice.conflist", "README"]
    assert run_module(cni_config, dict(dirs, exclusive=True))["changed"] is False

    os.makedirs(dirs["bin_dir"])
    with open(result["plugin"], "w") as f:      # what the cni role copies
        f.write("plugin")
    gone = run_module(cni_config, dict(dirs, state="absent"), check_mode=True)
    assert gone["changed"] is True and os.path.exists(result["conflist"])
    gone = run_module(cni_config, dict(dirs, state="absent"), diff=True)
    assert gone["changed"] is True and gone["moved"] == ["10-bridge.conflist", "99-loopback.conf", "old.json"]
    assert sorted(os.listdir(conf)) == ["10-bridge.conflist", "99-loopback.conf", "README", "old.json"]
    assert not os.path.exists(result["plugin"])
    assert run_module(cni_config, dict(dirs, state="absent"))["changed"] is False


@pytest.mark.parametrize("bad, named", [
    ({"chained_plugins": [{"capabilities": {}}]}, "chained_plugins[0]"),
    ({"chained_plugins": [{"type": "sluice"}]}, "chained_plugins[0]"),
    ({"priority": 123}, "123"),
    ({"mtu": 10}, "10"),
    ({"cni_version": "0.3.1"}, "0.3.1"),
    ({"network_name": "a b"}, "a b"),
])
def test_bad_input_is_named_and_nothing_written(dirs, bad, named):
    result = fail_module(cni_config, dict(dirs, **bad))
    assert named in result["msg"]
    assert os.listdir(dirs["conf_dir"]) == [] and not os.path.exists(dirs["bin_dir"])
