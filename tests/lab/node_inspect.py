"""Inspect a lab node from inside it (`lab.py exec NODE -- PYTHON THIS_FILE COMMAND`, or over SSH), with
the checkout's venv python, which the node sees. Prints one JSON object.

    leftovers   everything of Sluice's still on the node, a list of findings per kind. A lab node starts
                with lo and eth0, an empty bpffs, nothing attached to its cgroup2 and no Sluice files;
                after an uninstall it must be back there. Directories that are mountpoints of their own
                (the lab's private bind mounts) may stay, empty.
    datapath    the pinned programs (id, tag, the datapath version in their metadata) and the pinned
                maps (id; the contents of the maps that traffic does not change).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys

BPFFS = "/sys/fs/bpf"
KERNEL_PINS = {f"{BPFFS}/maps.debug", f"{BPFFS}/progs.debug"}  # every bpffs mount has these (bpf_preload)
CGROUP2 = "/sys/fs/cgroup/unified"
ROUTE_PROTO = "217"
NODE_LINKS = {"lo", "eth0"}
PATHS = ("/etc/sluice", "/opt/sluice", "/var/lib/sluice", "/run/sluice", "/var/log/sluice", "/opt/cni/bin/sluice",
         "/etc/sysctl.d/90-sluice.conf", "/etc/iproute2/rt_protos.d/sluice.conf",
         "/etc/systemd/system/sluice-agent.service", "/etc/cni/net.d/.sluice-moved")
GLOBS = ("/etc/cni/net.d/*sluice*", "/opt/cni/bin/*sluice*", "/etc/sysctl.d/*sluice*")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def pins() -> list[str]:
    found = []
    for root, dirs, names in os.walk(BPFFS):
        found += [os.path.join(root, n) for n in dirs + names]
    return sorted(set(found) - KERNEL_PINS)


def links() -> list[str]:
    found = []
    for link in json.loads(sh("ip", "-d", "-j", "link", "show")):
        name = link["ifname"]
        if name not in NODE_LINKS:
            found.append(f"interface {name} ({link.get('linkinfo', {}).get('info_kind', '?')})")
        if "xdp" in link:
            found.append(f"XDP on {name}: {link['xdp']}")
    return found


def tc() -> list[str]:
    """tcx programs (BPF_PROG_QUERY; bpftool 7.1 does not know tcx), clsact qdiscs and tc filters."""
    found = []
    try:
        from sluice.bpf import libbpf as lb
    except ImportError as e:
        return [f"cannot query tcx: {e}"]
    for ifindex, name in socket.if_nameindex():
        for attach, hook in ((lb.BPF_TCX_INGRESS, "ingress"), (lb.BPF_TCX_EGRESS, "egress")):
            try:
                ids = lb.prog_query(ifindex, attach)
            except OSError as e:
                found.append(f"tcx {hook} query on {name} failed: {e}")
                continue
            found += [f"tcx {hook} program id {i} on {name}" for i in ids]
        for qdisc in json.loads(sh("tc", "-j", "qdisc", "show", "dev", name) or "[]"):
            if qdisc.get("kind") == "clsact":
                found.append(f"clsact qdisc on {name}")
                for hook in ("ingress", "egress"):
                    found += [f"tc {hook} filter on {name}: {f}" for f in json.loads(
                        sh("tc", "-j", "filter", "show", "dev", name, hook) or "[]") if f.get("kind")]
    return found


def cgroup() -> list[str]:
    found = []
    for entry in json.loads(sh("bpftool", "-j", "cgroup", "tree", CGROUP2) or "[]"):
        found += [f"{entry['cgroup']}: {p['attach_type']} {p['name']} (id {p['id']})" for p in entry["programs"]]
    return found


def routes() -> list[str]:
    out = sh("ip", "-4", "route", "show", "table", "all", "proto", ROUTE_PROTO)
    return [line for line in out.splitlines() if line.strip()]


def is_mountpoint(path: str) -> bool:
    return subprocess.run(["mountpoint", "-q", path], check=False).returncode == 0


def files() -> list[str]:
    found = []
    for path in sorted(set(PATHS) | {p for g in GLOBS for p in glob.glob(g)}):
        if not os.path.lexists(path):
            continue
        if os.path.isdir(path) and is_mountpoint(path):
            found += [f"{path}/{n}" for n in sorted(os.listdir(path))]  # the lab's mount stays, empty
        else:
            found.append(path)
    return found


def processes() -> list[str]:
    """Processes of this node (its cgroup namespace's root and below) that are Sluice's."""
    found = []
    for root, _dirs, names in os.walk(CGROUP2):
        if "cgroup.procs" not in names:
            continue
        with open(os.path.join(root, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if re.search(r"sluice-(agent|supervise)|/opt/sluice/", cmdline):
                found.append(f"pid {pid}: {cmdline}")
    return found


PIN_ROOT = f"{BPFFS}/sluice"
# Maps whose contents only the agent changes (not traffic: NAT and socket tables, counters).
STABLE_MAPS = ("sl_config", "sl_endpoints", "sl_routes", "sl_services", "sl_backends", "sl_prefilter", "sl_lb_vips",
               "sl_cpus")


def datapath() -> dict:
    programs, maps = {}, {}
    for name in sorted(os.listdir(f"{PIN_ROOT}/progs")):
        info = json.loads(sh("bpftool", "-j", "prog", "show", "pinned", f"{PIN_ROOT}/progs/{name}"))
        programs[name] = {"id": info["id"], "tag": info["tag"],
                          "version": info.get("metadata", {}).get("sluice_datapath_version")}
    for name in sorted(os.listdir(f"{PIN_ROOT}/maps")):
        info = json.loads(sh("bpftool", "-j", "map", "show", "pinned", f"{PIN_ROOT}/maps/{name}"))
        maps[name] = {"id": info["id"]}
        if name in STABLE_MAPS:
            entries = json.loads(sh("bpftool", "-j", "map", "dump", "pinned", f"{PIN_ROOT}/maps/{name}"))
            maps[name]["entries"] = sorted(json.dumps([e["key"], e["value"]]) for e in entries)
    return {"programs": programs, "maps": maps}


def leftovers() -> dict:
    report = {}
    for kind, fn in (("pins", pins), ("links", links), ("tc", tc), ("cgroup", cgroup), ("routes", routes),
                     ("files", files), ("processes", processes)):
        try:
            report[kind] = fn()
        except (OSError, subprocess.CalledProcessError, ValueError) as e:
            report[kind] = [f"could not enumerate: {e}"]
    return report


def main(argv: list[str]) -> int:
    commands = {"leftovers": leftovers, "datapath": datapath}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: {sys.argv[0]} {{{','.join(commands)}}}", file=sys.stderr)
        return 2
    print(json.dumps(commands[argv[0]](), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
