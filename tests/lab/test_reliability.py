"""Issue 7 on a lab: restarts, upgrades, a failed upgrade and an uninstall, under traffic.

One 2-node lab of its own (a unique `slrel*` name, subnet 192.168.95.0/24), converged once by
playbooks/site.yml with `cni_exclusive: true` over a CNI config that was already on each node. Flow
servers sit at the 10th address of each node's pod CIDR, the backends of the lab inventory's services;
a client pod on node1 keeps sequence-numbered TCP streams and UDP flows (`sluice connectivity flow`)
going to the pod on node2, the pod on node1 and the services' VIPs while each disruption happens, and
every lost datagram, every reset and every error fails the test. In order:

  1. the agent killed with SIGKILL on each node and restarted by sluice-supervise;
  2. a clean agent restart (what the agent role's handler does) on each node;
  3. playbooks/upgrade.yml to a set with an object the verifier rejects: node1 fails with the verifier's
     message, node2 is never touched, the running datapath (tags, links) and its files stay as they were;
     and an upgrade after which node1 is unhealthy: the health gate stops the rollout before node2;
  4. playbooks/upgrade.yml to a new datapath version (SL_DATAPATH_VERSION=2): every program's tag and
     version change, links are swapped in place, map contents and ids stay, counters do not reset;
  5. playbooks/uninstall.yml: nothing of Sluice's is left on any node, the moved CNI config is back;
  6. a re-install (site.yml, then the connectivity suite, verify.yml) works.

`make soak` adds rounds of all of that (kill -9, restart, upgrade to alternating versions) under one
long flow before the uninstall: SLUICE_SOAK_ROUNDS=N, skipped otherwise.

The artifacts (objects, wheels, cnitool) are copied first, so a concurrent `make artifacts` cannot
change them under the test. The lab goes down at the end, also when a test fails.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
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

NODES = (1, 2)
SUBNET = "192.168.95.0/24"
LAB_PY = os.path.join(ROOT, "lab", "lab.py")
INSPECT = os.path.join(ROOT, "tests", "lab", "node_inspect.py")
SLUICE = "/opt/sluice/venv/bin/sluice"
SUPERVISE = "/opt/sluice/venv/bin/sluice-supervise"
SUPERVISE_PIDFILE = "/run/sluice/agent-supervise.pid"
AGENT_START = [SUPERVISE, "start", "--pidfile", SUPERVISE_PIDFILE, "--log", "/var/log/sluice/agent.log", "--",
               "/opt/sluice/venv/bin/sluice-agent", "--config", "/etc/sluice/agent.json"]
OBJ_DIR = "/opt/sluice/bpf"
SERVER_POD, CLIENT_POD, WORKLOAD_POD = "slflow-s", "slflow-c", "slwork"
FLOW_RATE = 100  # messages (datagrams) per second and flow
# A CNI config another network plugin left on every node before Sluice was installed.
OTHER_CNI = "05-other.conflist"
OTHER_CNI_TEXT = json.dumps({"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "bridge"}]}, indent=2)
# `make soak`: rounds of restarts and upgrades under one long flow (0: the soak test is skipped).
SOAK_ROUNDS = int(os.environ.get("SLUICE_SOAK_ROUNDS", "0") or 0)
# What the upgrade tests expect the kernel's verifier to say about tests/fixtures/bpf/tc_pod_rejected.c.
VERIFIER_SAYS = "invalid access to packet"


def run(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, text=True, capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=timeout, **kw)


class Lab:
    """The test's lab: nodes, artifacts, Ansible against its inventory."""

    def __init__(self, name: str, artifacts: str):
        self.name = name
        self.artifacts = artifacts
        self.lab = lab.Lab(name)
        self.extra_vars = os.path.join(artifacts, "extra-vars.json")
        with open(self.extra_vars, "w") as f:
            json.dump({
                "node_wheels_src": os.path.join(artifacts, "wheels"),
                "datapath_objects_src": os.path.join(artifacts, "v1"),
                "cni_exclusive": True,
                # the nodes share this machine's /usr, which has the packages: skip apt
                "node_install_packages": False,
                "sluice_verify_cnitool": os.path.join(artifacts, "cnitool"),
                "sluice_verify_report": os.path.join(artifacts, "verify-report.json"),
            }, f)

    def playbook(self, name: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        result = run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", self.lab.inventory,
                      os.path.join("playbooks", name), "-e", f"@{self.extra_vars}", *args],
                     timeout=900, cwd=ROOT, env=env)
        if expect_ok:
            assert result.returncode == 0, f"{name} failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
        return result

    def sh(self, i: int, *argv: str, timeout: float = 60) -> str:
        """A command inside node i (its namespaces, over SSH); fails the test when it fails."""
        result = self.lab.ssh(i, *argv, timeout=timeout)
        assert result.returncode == 0, f"node{i}: {' '.join(argv)}: {result.stderr or result.stdout}"
        return result.stdout

    def sluice(self, i: int, *args: str):
        return json.loads(self.sh(i, SLUICE, "--json", *args))

    def inspect(self, i: int, what: str) -> dict:
        return json.loads(self.sh(i, sys.executable, INSPECT, what))

    def host_path(self, i: int, path: str) -> str:
        """Where a file of one of node i's private directories (lab.NODE_DIRS) is on this host."""
        return os.path.join(self.lab.node_dir(i), "root", path.lstrip("/"))

    def state(self, i: int) -> dict:
        with open(self.host_path(i, "/etc/sluice/state.json")) as f:
            return json.load(f)

    def pod_ip(self, i: int, n: int) -> str:
        return str(ipaddress.ip_network(self.state(i)["node"]["pod_cidr"])[n])

    def agent_pids(self, i: int) -> tuple[int, int]:
        """(supervisor, agent) of node i. The lab has no PID namespace: these are this host's PIDs."""
        sup = int(self.sh(i, "cat", SUPERVISE_PIDFILE).split()[0])
        with open(f"/proc/{sup}/task/{sup}/children") as f:
            children = [int(p) for p in f.read().split()]
        agents = [p for p in children if b"sluice-agent" in read_bytes(f"/proc/{p}/cmdline")]
        assert len(agents) == 1, f"node{i}: supervisor {sup} has children {children}"
        return sup, agents[0]

    def wait_agent_ready(self, i: int, not_pid: int | None = None, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            agent = self.sluice(i, "status")["agent"]
            if agent.get("ready") and agent.get("pid") not in (None, not_pid):
                return agent["pid"]
            assert time.monotonic() < deadline, f"node{i}: agent not ready (again) after {timeout}s: {agent}"
            time.sleep(0.5)

    def snapshots(self) -> dict[int, dict]:
        """snapshot() of every node, taken side by side."""
        with concurrent.futures.ThreadPoolExecutor(len(NODES)) as pool:
            return dict(zip(NODES, pool.map(self.snapshot, NODES)))

    def snapshot(self, i: int) -> dict:
        """The datapath of node i as the tests compare it."""
        status = self.sluice(i, "status")
        snap = self.inspect(i, "datapath")
        snap["links"] = {f"{lk['target']}/{lk['program']}": (lk["link_id"], lk["tag"], lk["attached"])
                         for lk in status["links"]}
        snap["counters"] = {(m["hook"], m["outcome"]): m["packets"] for m in self.sluice(i, "metrics")}
        snap["objects"] = dir_digest(self.host_path(i, OBJ_DIR))
        snap["agent"] = self.agent_pids(i)
        return snap


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def dir_digest(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def lab_cli(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run([sys.executable, LAB_PY, "--name", name, *args])
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def build_objects(out: str, version: int) -> None:
    """The datapath objects as `make bpf` builds them, with another SL_DATAPATH_VERSION."""
    result = run(["make", "-s", "--no-print-directory", "-C", ROOT, "bpf", f"BPF_OUT={out}",
                  f"SL_DATAPATH_VERSION={version}"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def build_rejected_set(good: str, out: str) -> None:
    """A good set with tc_pod.o replaced by an object the verifier rejects."""
    shutil.copytree(good, out)
    result = run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I", os.path.join(ROOT, "build"),
                  "-I", os.path.join(ROOT, "bpf"), "-I", os.path.join(ROOT, "bpf", "lib"), "-c",
                  os.path.join(ROOT, "tests", "fixtures", "bpf", "tc_pod_rejected.c"), "-o", os.path.join(out, "tc_pod.o")])
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def rlab(tmp_path_factory):
    artifacts = str(tmp_path_factory.mktemp("reliability"))
    for src, dst in (("build/bpf", "v1"), ("build/wheels", "wheels"), ("build/cnitool", "cnitool")):
        if not os.path.exists(os.path.join(ROOT, src)):
            pytest.fail(f"{src} is missing: run `make artifacts build/cnitool`")
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, src)) else shutil.copy2)(
            os.path.join(ROOT, src), os.path.join(artifacts, dst))
    name = f"slrel{uuid.uuid4().hex[:4]}"
    try:
        lab_cli(name, "up", "--nodes", str(len(NODES)), "--subnet", SUBNET)
        ctx = Lab(name, artifacts)
        for i in NODES:
            with open(ctx.host_path(i, f"/etc/cni/net.d/{OTHER_CNI}"), "w") as f:
                f.write(OTHER_CNI_TEXT)
        ctx.playbook("site.yml")
        yield ctx
    finally:
        lab_cli(name, "down", check=False)
        assert not os.path.exists(os.path.join(lab.LAB_ROOT, name)), f"lab {name} is not down"


@pytest.fixture(scope="module")
def flow_targets(rlab):
    """Flow servers at the 10th address of each node's pod CIDR (the services' backends), a client pod on
    node1; the --tcp/--udp arguments of its flows: pod on node2, pod on node1, the TCP and UDP service VIPs."""
    cnitool = os.path.join(rlab.artifacts, "cnitool")
    servers = {i: rlab.pod_ip(i, 10) for i in NODES}
    for i, ip in servers.items():
        rlab.sh(i, SLUICE, "connectivity", "pod-add", SERVER_POD, "--ip", ip, "--server", "flow", "--cnitool", cnitool)
    rlab.sh(1, SLUICE, "connectivity", "pod-add", CLIENT_POD, "--ip", rlab.pod_ip(1, 20), "--cnitool", cnitool)
    services = rlab.state(1)["services"]
    tcp = next(s for s in services if s["protocol"] == "tcp")
    udp = next(s for s in services if s["protocol"] == "udp")
    for svc in (tcp, udp):
        strays = [b for b in svc["backends"] if b["ip"] not in servers.values()]
        assert not strays, f"service {svc['name']}: backends {strays} are not flow servers {servers}"
    return ["--tcp", f"{servers[2]}:8080", "--udp", f"{servers[2]}:5353", "--tcp", f"{servers[1]}:8080",
            "--tcp", f"{tcp['vip']}:{tcp['port']}", "--tcp", f"{tcp['vip']}:{tcp['port']}",
            "--udp", f"{udp['vip']}:{udp['port']}"]


class Flows:
    """`sluice connectivity flow` in node1's client pod for the length of a `with` block."""

    def __init__(self, ctx: Lab, targets: list[str], duration: float = 600):
        # The duration only bounds a flow the test could not stop: the block's end stops it (SIGTERM).
        self.argv = [sys.executable, LAB_PY, "--name", ctx.name, "exec", "node1", "--", SLUICE, "connectivity", "flow",
                     "--netns", f"/run/netns/{CLIENT_POD}", *targets, "--rate", str(FLOW_RATE),
                     "--duration", str(duration)]
        self.proc: subprocess.Popen | None = None
        self.report: dict = {}

    def __enter__(self) -> "Flows":
        # lab.py exec, nsenter and `sluice connectivity` exec each other: this PID is the flow process.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        ready, _w, _x = select.select([self.proc.stderr], [], [], 30)
        line = self.proc.stderr.readline() if ready else ""
        if "flows answered" not in line:
            self._kill()
            pytest.fail(f"the flows did not start: {line!r}")
        time.sleep(0.5)  # traffic before the disruption ...
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self._kill()
            return
        time.sleep(0.5)  # ... and after it
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        self.report = json.loads(out)

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def assert_nothing_lost(self, what: str) -> None:
        summary = [{k: f[k] for k in ("kind", "dst", "sent", "received", "lost", "resets", "max_stall_ms")}
                   for f in self.report["flows"]]
        print(f"{what}: {summary}")
        for flow in self.report["flows"]:
            assert flow["sent"] > FLOW_RATE and flow["received"] == flow["sent"], f"{what}: {flow}"
            assert flow["lost"] == 0 and not flow["gaps"], f"{what}: lost {flow}"
            assert flow["resets"] == 0 and not flow["errors"], f"{what}: reset or error {flow}"
        assert self.report["ok"], self.report


def upgrade_play(output: str) -> str:
    """The `Upgrade Sluice nodes` play of an upgrade.yml run, without the recap."""
    assert "PLAY [Upgrade Sluice nodes]" in output, output
    play = output.split("PLAY [Upgrade Sluice nodes]", 1)[1]
    return play.split("PLAY RECAP", 1)[0]


def assert_failed_in(play: str, task: str, host: str) -> None:
    """`host` failed in `task` (the first task of that name), not in another one."""
    start = play.find(f"TASK [{task}]")
    end = play.find("TASK [", start + 1)
    assert start >= 0 and f"fatal: [{host}]" in play[start:end if end > 0 else None], \
        f"{host} did not fail in {task!r}:\n{play}"


# ---- under traffic, nothing lost -------------------------------------------------------------


def test_agent_killed_and_restarted_by_its_supervisor_loses_nothing(rlab, flow_targets):
    before = {i: rlab.agent_pids(i) for i in NODES}
    with Flows(rlab, flow_targets) as flows:
        for i in NODES:  # both at once
            os.kill(before[i][1], signal.SIGKILL)
        for i in NODES:
            rlab.wait_agent_ready(i, not_pid=before[i][1])
    flows.assert_nothing_lost("agent kill -9")
    for i in NODES:
        sup, agent = rlab.agent_pids(i)
        assert sup == before[i][0] and agent != before[i][1], "the supervisor restarted the agent"


def test_clean_agent_restart_loses_nothing(rlab, flow_targets):
    before = {i: rlab.agent_pids(i) for i in NODES}
    with Flows(rlab, flow_targets) as flows:
        for i in NODES:
            assert rlab.sh(i, SUPERVISE, "stop", "--pidfile", SUPERVISE_PIDFILE).strip() == "stopped"
            assert rlab.sh(i, *AGENT_START).strip() == "started"
            rlab.wait_agent_ready(i, not_pid=before[i][1])
    flows.assert_nothing_lost("clean agent restart")
    for i in NODES:
        assert rlab.agent_pids(i)[0] != before[i][0]


# ---- upgrades --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_version(rlab):
    """The datapath built as version 2, and the same set with tc_pod.o replaced by a rejected object."""
    good, bad = os.path.join(rlab.artifacts, "v2"), os.path.join(rlab.artifacts, "v2-rejected")
    build_objects(good, 2)
    build_rejected_set(good, bad)
    return good, bad


def test_failed_upgrade_stops_at_the_first_node_and_changes_nothing(rlab, flow_targets, new_version):
    before = rlab.snapshots()
    with Flows(rlab, flow_targets) as flows:
        result = rlab.playbook("upgrade.yml", "-e", f"datapath_objects_src={new_version[1]}", expect_ok=False)
    flows.assert_nothing_lost("failed upgrade")

    out = result.stdout
    assert result.returncode != 0, out
    play = upgrade_play(out)
    # node1 fails in the verification of the new objects, with the verifier's own words
    assert_failed_in(play, "sluice.network.datapath : Load the staged objects into the kernel (check mode, nothing pinned "
                           "or attached)", "node1")
    assert "the verifier rejected the datapath" in play and VERIFIER_SAYS in play, play
    # the rollout stops there: nothing ran on node2 (the plan plays only read its login environment)
    assert "node2" not in play, play
    assert re.search(r"^node2\s+: ok=\d+\s+changed=0 ", out, re.M), out
    for i, after in rlab.snapshots().items():
        for key in ("programs", "links", "maps", "objects", "agent"):
            assert after[key] == before[i][key], f"node{i}: {key} changed by a failed upgrade"
        assert not os.path.exists(rlab.host_path(i, OBJ_DIR + ".staged")), "staged objects left behind"


def test_unhealthy_node_stops_the_rollout(rlab, flow_targets):
    """An upgrade after which node1's agent no longer listens where the CNI plugin talks to it: the health
    gate fails node1 and node2 is never touched. (The next upgrade puts the agent's socket back.)"""
    before = rlab.snapshot(2)
    with Flows(rlab, flow_targets) as flows:
        result = rlab.playbook("upgrade.yml", "-e", "agent_socket=/run/sluice/elsewhere.sock",
                               "-e", "sluice_upgrade_health_retries=2", expect_ok=False)
    flows.assert_nothing_lost("upgrade stopped by the health gate")
    out = result.stdout
    assert result.returncode != 0, out
    play = upgrade_play(out)
    assert_failed_in(play, "Read the node's datapath facts", "node1")
    assert "node2" not in play, play
    assert re.search(r"^node2\s+: ok=\d+\s+changed=0 ", out, re.M), out
    after = rlab.snapshot(2)
    for key in ("programs", "links", "maps", "objects", "agent"):
        assert after[key] == before[key], f"node2: {key} changed by a rollout that stopped at node1"


def test_upgrade_to_a_new_datapath_version_keeps_state_and_loses_nothing(rlab, flow_targets, new_version):
    before = rlab.snapshots()
    with Flows(rlab, flow_targets) as flows:
        result = rlab.playbook("upgrade.yml", "-e", f"datapath_objects_src={new_version[0]}")
    flows.assert_nothing_lost("upgrade to datapath version 2")

    # rolling: node1 is done, health gate included, before node2 starts
    play = upgrade_play(result.stdout)
    assert play.rindex("[node1]") < play.index("[node2]"), play
    after = rlab.snapshots()
    for i in NODES:
        old, new = before[i], after[i]
        assert {p["version"] for p in old["programs"].values()} == {1}
        assert {p["version"] for p in new["programs"].values()} == {2}, new["programs"]
        assert new["programs"].keys() == old["programs"].keys()
        for prog, info in new["programs"].items():
            assert info["tag"] != old["programs"][prog]["tag"], f"node{i}: {prog} has its old tag"
        # every link swapped in place (BPF_LINK_UPDATE): same link, new program behind it
        assert new["links"].keys() == old["links"].keys()
        for link, (link_id, tag, attached) in new["links"].items():
            assert link_id == old["links"][link][0] and attached, f"node{i}: {link} re-created or detached"
            assert tag == new["programs"][link.rsplit("/", 1)[1]]["tag"] != old["links"][link][1]
        # the same maps (ids), the same endpoints, services, routes, ... (contents)
        assert new["maps"] == old["maps"], f"node{i}: maps changed"
        # counters carried on: none went down, and the flows' paths kept counting
        dropped = {k: (v, new["counters"].get(k)) for k, v in old["counters"].items() if new["counters"].get(k, 0) < v}
        assert not dropped, f"node{i}: counters reset {dropped}"
        assert new["objects"] == dir_digest(new_version[0])
    for node, hook, outcome in ((1, "tc_from_pod", "redirect_neigh"), (2, "tc_from_nic", "redirect_peer"),
                                (1, "sock_sendmsg4", "sock_xlate"), (1, "sock_connect4", "sock_xlate")):
        assert after[node]["counters"][(hook, outcome)] > before[node]["counters"][(hook, outcome)], (hook, outcome)


@pytest.mark.skipif(not SOAK_ROUNDS, reason="soak: `make soak` (SLUICE_SOAK_ROUNDS=N)")
def test_soak_restarts_and_upgrades_under_one_long_flow(rlab, flow_targets, new_version, tmp_path):
    """`make soak`: SLUICE_SOAK_ROUNDS rounds of kill -9 of both agents, a clean restart and an upgrade
    (datapath version 3, then 2, then 3, ...), all under one flow that must lose nothing."""
    sets = {2: new_version[0], 3: str(tmp_path / "v3")}
    build_objects(sets[3], 3)
    start = rlab.snapshots()
    with Flows(rlab, flow_targets, duration=24 * 3600) as flows:
        for rnd in range(SOAK_ROUNDS):
            version = 3 if rnd % 2 == 0 else 2
            for i in NODES:
                sup, agent = rlab.agent_pids(i)
                os.kill(agent, signal.SIGKILL)
                rlab.wait_agent_ready(i, not_pid=agent)
                assert rlab.agent_pids(i)[0] == sup
            assert rlab.sh(2, SUPERVISE, "stop", "--pidfile", SUPERVISE_PIDFILE).strip() == "stopped"
            assert rlab.sh(2, *AGENT_START).strip() == "started"
            rlab.wait_agent_ready(2)
            rlab.playbook("upgrade.yml", "-e", f"datapath_objects_src={sets[version]}")
            for i, now in rlab.snapshots().items():
                assert {p["version"] for p in now["programs"].values()} == {version}, f"round {rnd}: node{i}"
                assert {k: v[0] for k, v in now["links"].items()} == {k: v[0] for k, v in start[i]["links"].items()}
                assert now["maps"] == start[i]["maps"], f"round {rnd}: node{i} maps changed"
                assert all(now["counters"].get(k, 0) >= v for k, v in start[i]["counters"].items())
            print(f"soak round {rnd + 1}/{SOAK_ROUNDS}: datapath version {version}", flush=True)
    flows.assert_nothing_lost(f"soak, {SOAK_ROUNDS} rounds")


# ---- clean uninstall, and a re-install -------------------------------------------------------


def test_uninstall_leaves_nothing_and_restores_moved_cni_configs(rlab, flow_targets):
    for i in NODES:
        rlab.sh(i, SLUICE, "connectivity", "pod-del", SERVER_POD, "--cnitool", os.path.join(rlab.artifacts, "cnitool"))
    rlab.sh(1, SLUICE, "connectivity", "pod-del", CLIENT_POD, "--cnitool", os.path.join(rlab.artifacts, "cnitool"))
    # A workload the runtime still has when Sluice is uninstalled (no server in it).
    rlab.sh(1, "ip", "netns", "add", WORKLOAD_POD)
    added = json.loads(rlab.sh(1, "env", "NETCONFPATH=/etc/cni/net.d", "CNI_PATH=/opt/cni/bin",
                               os.path.join(rlab.artifacts, "cnitool"), "add", "sluice", f"/run/netns/{WORKLOAD_POD}"))
    workload_veth = added["interfaces"][0]["name"]
    assert workload_veth in rlab.sh(1, "ip", "-o", "link")
    programs = set()
    for i in NODES:
        assert not os.path.exists(rlab.host_path(i, f"/etc/cni/net.d/{OTHER_CNI}")), "exclusive: moved aside"
        assert os.path.exists(rlab.host_path(i, f"/etc/cni/net.d/.sluice-moved/{OTHER_CNI}"))
        programs |= {p["id"] for p in rlab.inspect(i, "datapath")["programs"].values()}
    host_log = os.stat("/var/log/sluice").st_ino if os.path.isdir("/var/log/sluice") else None

    rlab.playbook("uninstall.yml")

    for i in NODES:
        leftovers = {kind: found for kind, found in rlab.inspect(i, "leftovers").items() if found}
        assert not leftovers, f"node{i} after uninstall.yml: {json.dumps(leftovers, indent=2)}"
        with open(rlab.host_path(i, f"/etc/cni/net.d/{OTHER_CNI}")) as f:
            assert f.read() == OTHER_CNI_TEXT, "the moved CNI config is back, unchanged"
    # no program Sluice loaded is still in the kernel (nothing holds one: no link, pin, filter or fd)
    deadline = time.monotonic() + 10
    while alive := [p for p in programs if run(["bpftool", "prog", "show", "id", str(p)]).returncode == 0]:
        assert time.monotonic() < deadline, f"programs still loaded: {alive}"
        time.sleep(0.2)
    # node directories are the node's own: the host's /var/log/sluice was not touched
    assert (os.stat("/var/log/sluice").st_ino if os.path.isdir("/var/log/sluice") else None) == host_log
    rlab.sh(1, "ip", "netns", "del", WORKLOAD_POD)


def test_reinstall_after_uninstall_works(rlab):
    rlab.playbook("site.yml")
    for i in NODES:
        assert os.path.exists(rlab.host_path(i, f"/etc/cni/net.d/.sluice-moved/{OTHER_CNI}"))
    rlab.playbook("verify.yml")
    with open(os.path.join(rlab.artifacts, "verify-report.json")) as f:
        checks = json.load(f)["checks"]
    assert checks and all(c["passed"] for c in checks), checks
