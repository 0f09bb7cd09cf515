"""Fixtures of the module unit tests. They run as root against the real sluice package and kernel:
a datapath in a private pin root, veths in `sltest-` namespaces, a throwaway cgroup; all removed after.

Run by `ansible-test units` from the collection copy (make sanity), or by plain pytest from the
repository (make test), where the collection is importable through collections/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_COLLECTIONS = os.path.join(ROOT, "collections")
try:
    import ansible_collections.sluice.network.plugins  # noqa: F401 pylint: disable=unused-import
except ImportError:
    sys.path.insert(0, _COLLECTIONS)

BPFFS = "/sys/fs/bpf"
OBJECTS = ("tc_pod", "tc_nic", "xdp_nic", "sock_lb", "sockmap")


def _objects_dir():
    """build/bpf of the repository; from the collection copy (<repo>/build/ansible_collections/sluice/network)
    that is three levels up."""
    for cand in (os.path.join(ROOT, "build", "bpf"), os.path.normpath(os.path.join(ROOT, "..", "..", "..", "bpf"))):
        if all(os.path.exists(os.path.join(cand, f"{o}.o")) for o in OBJECTS):
            return cand
    subprocess.run(["make", "-C", ROOT, "bpf"], check=True, capture_output=True)
    return os.path.join(ROOT, "build", "bpf")


def run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@pytest.fixture(scope="session")
def bpf_objects():
    return _objects_dir()


@pytest.fixture
def pin_root():
    if run("mountpoint", "-q", BPFFS, check=False).returncode != 0:
        run("mount", "-t", "bpf", "bpf", BPFFS)
    path = os.path.join(BPFFS, f"sluice-test-{uuid.uuid4().hex[:8]}")
    yield path
    from sluice.datapath import Datapath

    if os.path.exists(path):
        try:
            Datapath(path, "/nonexistent").remove()
        finally:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loaded(pin_root, bpf_objects):
    """A loaded datapath (no links yet)."""
    from sluice.datapath import Datapath

    dp = Datapath(pin_root, bpf_objects)
    dp.load()
    return dp


@pytest.fixture
def netns():
    """A fresh `sltest-` namespace with veth sleth0<->sleth1 (up) and bridge slbr0; this thread is in it
    for the duration, so netlink, ethtool and bpf_link calls of the module see its devices."""
    from sluice.netlink import in_netns

    name = f"sltest-unit-{uuid.uuid4().hex[:6]}"
    run("ip", "netns", "add", name)
    try:
        ns = ["nsenter", f"--net=/run/netns/{name}"]
        run(*ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        run(*ns, "ip", "link", "add", "slbr0", "type", "bridge")
        for dev in ("lo", "sleth0", "sleth1", "slbr0"):
            run(*ns, "ip", "link", "set", dev, "up")
        with in_netns(f"/run/netns/{name}"):
            yield name
    finally:
        run("ip", "netns", "del", name, check=False)


@pytest.fixture
def cgroup():
    """A throwaway cgroup v2 directory (so socket hooks never land on the host's root cgroup)."""
    from sluice.datapath import cgroup2_root

    path = os.path.join(cgroup2_root(), f"sltest-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    yield path
    os.rmdir(path)
