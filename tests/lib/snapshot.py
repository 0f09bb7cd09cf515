"""A snapshot of a node, to show that an operation refused with an error changed nothing.

What it holds, per part:

- links, addresses and routes of the node's network namespace (`ip -j link`, `ip -j -4 addr`,
  `ip -j route show table all`), so veths, XDP programs, MTUs and kernel routes are covered, and its
  qdiscs and the ingress filters of every device with a clsact or ingress qdisc (`tc -j`: the cls_bpf
  filters pod veths get);
- every pin under the datapath's pin root, with the id of the object behind it (a pin replaced by
  a new map, program or bpf_link shows up even under the same name) and its mode;
- the content of every datapath map, read through the sluice.maps classes, except the per-CPU
  metrics counters, which any packet moves (an IPv6 router solicitation on a pod veth included)
  and which are not configuration;
- files and directories given by path: names, modes and contents (not times: a temporary file
  written and removed again changes a directory's mtime, not what it holds).

Usage:

    with unchanged(ns=NAME, pin_root=ROOT, files=[state_file, ipam_dir]):
        ...the failing operation...
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import pprint
import stat
import subprocess

from sluice import maps as m
from sluice.bpf import libbpf as lb

# Per-CPU counters: moved by traffic, not by configuration.
SKIPPED_MAPS = (m.MetricsMap,)


def _ip_json(ns: str | None, *argv: str, tool: str = "ip") -> list:
    prefix = ["nsenter", f"--net=/run/netns/{ns}"] if ns else []
    out = subprocess.run([*prefix, tool, "-j", *argv], check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def _tc(ns: str | None) -> dict:
    qdiscs = _ip_json(ns, "qdisc", "show", tool="tc")
    filters = {q["dev"]: _ip_json(ns, "filter", "show", "dev", q["dev"], "ingress", tool="tc")
               for q in qdiscs if q.get("kind") in ("clsact", "ingress")}
    return {"qdiscs": qdiscs, "ingress_filters": filters}


def network(ns: str | None = None) -> dict:
    """Links, IPv4 addresses, routes (every table) and tc of `ns` (None: this process's netns)."""
    links = [_without_clocks(link) for link in _ip_json(ns, "-d", "link", "show")]
    for link in links:
        link.pop("operstate", None)  # follows the carrier, on its own
    return {"links": links, "addresses": _ip_json(ns, "-4", "addr", "show"),
            "routes": _ip_json(ns, "route", "show", "table", "all"), "tc": _tc(ns)}


def _without_clocks(value):
    """A bridge's running timers (gc_timer, hello_timer...) tick on their own: left out."""
    if isinstance(value, dict):
        return {k: _without_clocks(v) for k, v in value.items() if not k.endswith("_timer")}
    if isinstance(value, list):
        return [_without_clocks(v) for v in value]
    return value


def _pin_identity(path: str, kind: str) -> dict:
    fd = lb.obj_get(path)
    try:
        if kind == "maps":
            info = lb.map_info(fd)
            return {"map_id": info.id, "type": info.type}
        if kind == "progs":
            info = lb.prog_info(fd)
            return {"prog_id": info.id, "tag": bytes(info.tag).hex()}
        info = lb.link_info(fd)
        return {"link_id": info.id, "prog_id": info.prog_id, "type": info.type, "target": bytes(info.u.raw).hex()}
    finally:
        os.close(fd)


def pins(pin_root: str) -> dict:
    """{relative path: mode and the object behind it} of everything under the pin root."""
    out = {}
    if not os.path.isdir(pin_root):
        return out
    for directory, dirs, names in os.walk(pin_root):
        dirs.sort()
        rel_dir = os.path.relpath(directory, pin_root)
        out[rel_dir + "/"] = {"mode": oct(stat.S_IMODE(os.stat(directory).st_mode))}
        for name in sorted(names):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, pin_root)
            entry = {"mode": oct(stat.S_IMODE(os.stat(path).st_mode))}
            kind = rel.split("/")[0]
            try:
                entry.update(_pin_identity(path, kind))
            except OSError as e:
                entry["error"] = str(e)
            out[rel] = entry
    return out


def _raw(value) -> str:
    if isinstance(value, list):  # per-CPU values
        return "|".join(bytes(v).hex() for v in value)
    return bytes(value).hex()


def map_contents(pin_root: str) -> dict:
    """{map name: {key bytes: value bytes}} of every datapath map pinned under pin_root/maps."""
    maps_dir = os.path.join(pin_root, "maps")
    out = {}
    for cls in m.ALL_MAPS:
        if cls in SKIPPED_MAPS or not os.path.exists(os.path.join(maps_dir, cls.name)):
            continue
        with cls.open(maps_dir) as mp:
            out[cls.name] = {bytes(key).hex(): _raw(value) for key, value in mp.raw_items()}
    return out


def files(paths) -> dict:
    """{path: mode and content} of each path, recursively for directories; missing ones as None."""
    out = {}
    for top in paths:
        top = str(top)
        if not os.path.lexists(top):
            out[top] = None
            continue
        walk = os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top), [], [os.path.basename(top)])]
        for directory, dirs, names in walk:
            dirs.sort()
            if os.path.isdir(top):
                out[directory + "/"] = oct(stat.S_IMODE(os.stat(directory).st_mode))
            for name in sorted(names):
                path = os.path.join(directory, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        content = f.read()
                    body = content.decode("utf-8", "backslashreplace")
                elif stat.S_ISLNK(st.st_mode):
                    body = "-> " + os.readlink(path)
                else:
                    body = f"<{stat.filemode(st.st_mode)[0]}>"  # socket, fifo...
                out[path] = (oct(stat.S_IMODE(st.st_mode)), body)
    return out


def snapshot(ns: str | None = None, pin_root: str | None = None, paths=(), net: bool = True, others=()) -> dict:
    """The node's netns `ns` (None: this process's; net=False: none), its pin root, `paths`, and the
    networks of `others` (more namespaces, such as a pod's)."""
    snap = {}
    if net:
        snap["network"] = network(ns)
    for other in others:
        snap[f"network of {other}"] = network(other)
    if pin_root:
        snap["pins"] = pins(pin_root)
        snap["maps"] = map_contents(pin_root)
    if paths:
        snap["files"] = files(paths)
    return snap


def assert_same(before: dict, after: dict, what: str = "the node") -> None:
    if before == after:
        return
    diff = difflib.unified_diff(pprint.pformat(before, width=150).splitlines(),
                                pprint.pformat(after, width=150).splitlines(), "before", "after", lineterm="", n=2)
    raise AssertionError(f"{what} changed:\n" + "\n".join(diff))


@contextlib.contextmanager
def unchanged(ns: str | None = None, pin_root: str | None = None, paths=(), net: bool = True, others=()):
    """Snapshot before the block and assert the snapshot after it is identical (the block may hold a
    pytest.raises; the comparison runs when the block completes normally)."""
    before = snapshot(ns, pin_root, paths, net, others)
    yield before
    assert_same(before, snapshot(ns, pin_root, paths, net, others))
