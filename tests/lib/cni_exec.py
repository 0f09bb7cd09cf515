"""Executing a CNI plugin the way a container runtime does."""

from __future__ import annotations

import json
import os
import subprocess

REFERENCE_PLUGINS = "/usr/lib/cni"
# Sluice's plugin as `make artifacts` builds it (cni/sluice.c), what the cni role ships to nodes.
SLUICE_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "build", "cni", "sluice")


def exec_plugin(plugin: str, command: str, conf, cid: str = "", netns: str = "", ifname: str = "eth0",
                cni_path: str = REFERENCE_PLUGINS, omit: tuple[str, ...] = ()) -> tuple[int, dict | None]:
    """Execute a CNI plugin as a runtime does; (exit status, parsed stdout)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": cni_path}
    for name in omit:
        del env[name]
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    proc = subprocess.run([plugin], input=stdin.encode(), env=env, capture_output=True, timeout=60, check=False)
    assert not proc.stderr, proc.stderr.decode()
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None
