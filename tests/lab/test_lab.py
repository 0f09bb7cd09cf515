"""The local lab (lab/lab.py) on the real kernel: a 2-node lab under a unique `sltest*`
name and its own subnet, so it never touches a user's running `sllab`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import lab  # noqa: E402

pytestmark = pytest.mark.kernel
NODES = 2


def lab_cli(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", name, *args],
                            check=False, text=True, capture_output=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def lab_subnet(offset: int) -> str:
    """192.168.78.0/24 and up: one pair of /24s per xdist worker, so parallel labs never share one."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    return f"192.168.{78 + 2 * worker + offset}.0/24"


def snapshot(name: str) -> dict:
    """What a running lab consists of, to check later that all of it is gone."""
    state = lab.Lab(name).state
    pids = {int(i): (rec["pid"], rec["start"]) for i, rec in state.get("nodes", {}).items()}
    mnt = {os.stat(f"/proc/{pid}/ns/mnt").st_ino for pid, _start in pids.values() if os.path.exists(f"/proc/{pid}")}
    mnt.discard(os.stat("/proc/self/ns/mnt").st_ino)  # an sshd caught before it unshared
    return {"pids": pids, "mnt_ns": mnt}


def assert_nothing_left(name: str, before: dict) -> None:
    netns = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert not re.search(rf"^{name}-", netns, re.M), netns
    links = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
    assert f"{name}-host" not in links
    with open("/proc/mounts") as f:
        assert name not in f.read()
    for pid, start in before["pids"].values():
        assert lab.process_start_time(pid) != start, f"sshd {pid} still running"
    # No process left in a node's mount namespace: the namespace, its bpffs and pins are gone.
    for pid in lab.all_pids():
        assert lab.ns_inode(f"/proc/{pid}/ns/mnt") not in before["mnt_ns"], f"pid {pid} in a node mount ns"
    assert not os.path.exists(os.path.join(lab.LAB_ROOT, name))
    assert not os.path.exists(os.path.join(lab.CGROUP2, f"sluice-lab-{name}"))


@pytest.fixture(scope="module")
def test_lab():
    name = f"sltest{uuid.uuid4().hex[:4]}"
    try:
        lab_cli(name, "up", "--nodes", str(NODES), "--subnet", lab_subnet(0))
        yield lab.Lab(name)
    finally:
        lab_cli(name, "down", check=False)


def ssh(test_lab: lab.Lab, i: int, *argv: str) -> str:
    result = test_lab.ssh(i, *argv)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_ssh_lands_in_each_nodes_namespaces(test_lab):
    mount_namespaces = {os.readlink("/proc/self/ns/mnt")}
    for i in range(1, NODES + 1):
        assert f"inet {test_lab.node_ip(i)}/24" in ssh(test_lab, i, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
        assert ssh(test_lab, i, "hostname").strip() == f"node{i}"
        mount_namespaces.add(ssh(test_lab, i, "readlink", "/proc/self/ns/mnt").strip())
        for path in (*lab.NODE_DIRS, "/run", "/sys/fs/bpf"):
            ssh(test_lab, i, "mountpoint", "-q", path)
    assert len(mount_namespaces) == NODES + 1


def test_files_and_pins_are_private_to_a_node(test_lab):
    probe = f"test-{uuid.uuid4().hex[:8]}"
    ssh(test_lab, 1, "touch", f"/etc/sluice/{probe}")
    ssh(test_lab, 1, "bpftool", "map", "create", f"/sys/fs/bpf/{probe}",
        "type", "array", "key", "4", "value", "4", "entries", "1", "name", "probe")
    # `exec` enters the same namespaces as SSH.
    lab_cli(test_lab.name, "exec", "node1", "--", "test", "-e", f"/sys/fs/bpf/{probe}")
    for path in (f"/etc/sluice/{probe}", f"/sys/fs/bpf/{probe}"):
        assert not os.path.exists(path)
        assert lab_cli(test_lab.name, "exec", "node2", "--", "test", "-e", path, check=False).returncode == 1


def test_ansible_reaches_every_node_over_ssh(test_lab):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ansible"), "-i", test_lab.inventory,
         "sluice_nodes", "-m", "ansible.builtin.ping"],
        cwd=ROOT, env=env, check=False, stdin=subprocess.DEVNULL, text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(1, NODES + 1):
        assert re.search(rf"^node{i} \| SUCCESS", result.stdout, re.M), result.stdout


def test_up_again_changes_nothing_and_reconciles_the_node_count(test_lab):
    before = snapshot(test_lab.name)
    lab_cli(test_lab.name, "up", "--nodes", str(NODES))
    assert snapshot(test_lab.name) == before

    lab_cli(test_lab.name, "up", "--nodes", str(NODES + 1))
    grown = snapshot(test_lab.name)
    assert set(grown["pids"]) == set(range(1, NODES + 2))
    lab_cli(test_lab.name, "up", "--nodes", str(NODES))
    assert snapshot(test_lab.name) == before
    removed_pid, removed_start = grown["pids"][NODES + 1]
    assert lab.process_start_time(removed_pid) != removed_start
    assert not os.path.exists(f"/run/netns/{test_lab.node_ns(NODES + 1)}")


def test_status_reports_every_node(test_lab):
    out = lab_cli(test_lab.name, "status").stdout
    for i in range(1, NODES + 1):
        assert re.search(rf"node{i}\s.*{re.escape(test_lab.node_ip(i))}.*ssh ok", out), out


def test_down_removes_everything_and_is_idempotent(test_lab):
    # A daemon a role could leave behind, a pod namespace made inside the node, and a
    # process that entered the external namespace without `lab.py exec`.
    ssh(test_lab, 1, "sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & ip netns add pod1")
    stray = subprocess.Popen(["nsenter", f"--net=/run/netns/{test_lab.ext_ns}", "sleep", "600"])
    before = snapshot(test_lab.name)
    try:
        lab_cli(test_lab.name, "down")
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert_nothing_left(test_lab.name, before)
        lab_cli(test_lab.name, "down")
    finally:
        if stray.poll() is None:
            stray.kill()


def test_down_cleans_up_after_an_interrupted_up():
    name = f"sltest{uuid.uuid4().hex[:4]}"
    up = subprocess.Popen([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", name,
                           "up", "--nodes", "2", "--subnet", lab_subnet(1)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill `up` as soon as the first node's sshd is recorded, half way through.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and up.poll() is None and not lab.Lab(name).state.get("nodes"):
            time.sleep(0.01)
        up.kill()
        up.wait()
        before = snapshot(name)
        assert before["pids"], "up finished before it could be interrupted"
    finally:
        lab_cli(name, "down")
    assert_nothing_left(name, before)
