"""The node's CNI configuration: the conflist, and moving other configs aside.

A container runtime picks the lexically first configuration in its conf dir;
`exclusive` moves every other one into <conf_dir>/.sluice-moved/ so a stale
configuration cannot win, and `restore_moved` puts them back on uninstall.
"""

from __future__ import annotations

import json
import os

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
MOVED_DIR = ".sluice-moved"
PLUGIN_NAME = "sluice"


class CniConfError(ValueError):
    """Bad input; the message names the value."""


def conflist_name(priority: int) -> str:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 99:
        raise CniConfError(f"priority {priority!r} is not an integer in 0..99")
    return f"{priority:02d}-{PLUGIN_NAME}.conflist"


def conflist(network_name: str = "sluice", cni_version: str = "1.1.0", mtu: int | None = None,
             agent_socket: str = "/run/sluice/agent.sock", chained_plugins: list | None = None) -> dict:
    if not network_name or not isinstance(network_name, str) or any(c in network_name for c in "/ \t\n"):
        raise CniConfError(f"network_name {network_name!r} is not a valid CNI network name")
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniConfError(f"cni_version {cni_version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535):
        raise CniConfError(f"mtu {mtu!r} is outside 68..65535")
    if not agent_socket or not os.path.isabs(agent_socket):
        raise CniConfError(f"agent_socket {agent_socket!r} is not an absolute path")
    # `ips`: a runtime may ask for a pod's static address (runtimeConfig.ips).
    sluice = {"type": PLUGIN_NAME, "agentSocket": agent_socket, "capabilities": {"ips": True}}
    if mtu is not None:
        sluice["mtu"] = mtu
    plugins = [sluice]
    for i, p in enumerate(chained_plugins or []):
        if not isinstance(p, dict):
            raise CniConfError(f"chained_plugins[{i}]: {p!r} is not a plugin configuration (a dict)")
        if not isinstance(p.get("type"), str) or not p.get("type"):
            raise CniConfError(f"chained_plugins[{i}]: {p!r} has no 'type'")
        if p["type"] == PLUGIN_NAME:
            raise CniConfError(f"chained_plugins[{i}]: the {PLUGIN_NAME} plugin is already first in the chain")
        plugins.append(p)
    return {"cniVersion": cni_version, "name": network_name, "plugins": plugins}


def render_conflist(conf: dict) -> str:
    return json.dumps(conf, indent=2) + "\n"


def remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def other_configs(conf_dir: str, keep: str) -> list[str]:
    """Names of configuration files in conf_dir besides `keep` (the runtime would consider them)."""
    if not os.path.isdir(conf_dir):
        return []
    return sorted(n for n in os.listdir(conf_dir)
                  if n != keep and n.endswith(CONFIG_SUFFIXES) and os.path.isfile(os.path.join(conf_dir, n)))


def move_aside(conf_dir: str, names: list[str]) -> list[str]:
    """Move configs into <conf_dir>/.sluice-moved/; returns the names moved."""
    if not names:
        return []
    moved_dir = os.path.join(conf_dir, MOVED_DIR)
    os.makedirs(moved_dir, mode=0o700, exist_ok=True)
    for n in names:
        os.replace(os.path.join(conf_dir, n), os.path.join(moved_dir, n))
    return list(names)


def moved(conf_dir: str) -> list[str]:
    moved_dir = os.path.join(conf_dir, MOVED_DIR)
    return sorted(os.listdir(moved_dir)) if os.path.isdir(moved_dir) else []


def restorable(conf_dir: str) -> tuple[list[str], list[str]]:
    """(names that can go back, names kept aside because conf_dir has a file of that name again)."""
    back, kept = [], []
    for n in moved(conf_dir):
        (kept if os.path.exists(os.path.join(conf_dir, n)) else back).append(n)
    return back, kept


def restore_moved(conf_dir: str) -> tuple[list[str], list[str]]:
    """Move configs back from .sluice-moved/; (restored, kept aside)."""
    back, kept = restorable(conf_dir)
    moved_dir = os.path.join(conf_dir, MOVED_DIR)
    for n in back:
        os.replace(os.path.join(moved_dir, n), os.path.join(conf_dir, n))
    if os.path.isdir(moved_dir) and not os.listdir(moved_dir):
        os.rmdir(moved_dir)
    return back, kept
