"""Network namespaces for tests: every name starts with `sltest-` and every
namespace is deleted on exit, even when the test fails."""

from __future__ import annotations

import contextlib
import subprocess
import uuid

from sluice.netlink import in_netns

PREFIX = "sltest-"


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)


def ns_exec(ns: str, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command inside `ns` with nsenter, which (unlike `ip netns exec`)
    keeps /sys/fs/bpf visible."""
    return run("nsenter", f"--net=/run/netns/{ns}", *argv, check=check, **kw)


def ns_popen(ns: str, *argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *argv], text=True, **kw)


def unique(tag: str) -> str:
    """A namespace name like sltest-pod1-1a2b3c (at most 15 chars of link names follow from it)."""
    return f"{PREFIX}{tag}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def namespaces(*tags: str):
    names = [unique(t) for t in tags]
    try:
        for n in names:
            run("ip", "netns", "add", n)
            ns_exec(n, "ip", "link", "set", "lo", "up")
        yield names
    finally:
        for n in names:
            run("ip", "netns", "del", n, check=False)


def veth(a: str, a_ns: str | None, b: str, b_ns: str | None) -> None:
    """Create a veth pair a<->b and move each end into its namespace (None: this one)."""
    run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    for dev, ns in ((a, a_ns), (b, b_ns)):
        if ns:
            run("ip", "link", "set", dev, "netns", ns)


def link_info(ns: str | None, dev: str) -> dict:
    import json

    argv = ("ip", "-j", "link", "show", dev)
    out = ns_exec(ns, *argv).stdout if ns else run(*argv).stdout
    return json.loads(out)[0]


def ifindex(ns: str | None, dev: str) -> int:
    return link_info(ns, dev)["ifindex"]


def mac(ns: str | None, dev: str) -> str:
    return link_info(ns, dev)["address"]


def entered(ns: str):
    """setns() this thread into `ns` for the duration (for bpf_link creation
    and ifindex-relative calls that must happen inside the namespace)."""
    return in_netns(f"/run/netns/{ns}")
