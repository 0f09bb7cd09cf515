"""A node for CNI tests that need the real sluice-agent: an `sltest-` node namespace with NIC sleth0,
a throwaway cgroup, a state file, a private pin root and IPAM directory, the agent process, the CNI
plugin a runtime would execute, and pod namespaces. Everything is removed on exit.

The node has a network namespace of its own (unlike tests/runtime/test_cni.py, whose node is the test
process's netns) so that a snapshot of its links and routes sees this test's work only, and so that a
GC here can never remove another test's veths.

`failpoint` starts the agent with one of its ADD steps wrapped: the first time the agent reaches that
step it creates <pause dir>/reached and waits, without doing the step, until <pause dir>/release
exists. A test can then kill the agent (or the plugin waiting for it) at exactly that point. Only the
agent's launcher differs: it runs its own code (sluice.agent.main) with its own configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

from lib import netns
from lib.agent import VENV_BIN, AgentProcess
from lib.cgroup import cgroup
from lib.cni_exec import SLUICE_PLUGIN
from sluice.cni import podnet
from sluice.datapath import Datapath
from sluice.ipam import Ipam
from sluice.maps import EndpointsMap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF_BUILD = os.path.join(ROOT, "build", "bpf")
NODE_IP = "192.168.94.11"
PYTHON = os.path.join(VENV_BIN, "python")

# The agent's ADD steps a failpoint can stop before, in the order ADD takes them, and what each wraps.
FAILPOINTS = {
    "create_veth": ("sluice.cni.podnet", "create_veth"),              # the address is allocated
    "configure_pod": ("sluice.cni.podnet", "configure_pod"),          # + the veth pair exists
    "attach_pod": ("sluice.datapath", "Datapath.attach_pod"),         # + pod address, routes, node route
    "endpoint": ("sluice.maps", "EndpointsMap.put"),                  # + tc_from_pod attached and pinned
}
# After a DEL has answered: its veth is still to be deleted.
DEL_FAILPOINTS = {"delete_veth": ("sluice.cni.ops", "_delete_veth")}

AGENT_WITH_FAILPOINT = r"""
import importlib, os, sys, time
pause_dir, module_name, attr = sys.argv[1:4]
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
hit = []
def paused(*args, **kwargs):
    if not hit:
        hit.append(True)
        open(os.path.join(pause_dir, "reached"), "w").close()
        while not os.path.exists(os.path.join(pause_dir, "release")):
            time.sleep(0.01)
    return original(*args, **kwargs)
setattr(owner, name, paused)
from sluice.agent import main
sys.exit(main(sys.argv[4:]))
"""


class Agent(AgentProcess):
    """lib.agent.AgentProcess, optionally started with a failpoint."""

    def __init__(self, ns: str, config: dict, workdir: str):
        super().__init__(ns, config, workdir)
        self.failpoint: str | None = None
        self.pause_dir = os.path.join(workdir, "pause")

    def argv(self) -> list[str]:
        if not self.failpoint:
            return super().argv()
        shutil.rmtree(self.pause_dir, ignore_errors=True)
        os.makedirs(self.pause_dir)
        module_name, attr = {**FAILPOINTS, **DEL_FAILPOINTS}[self.failpoint]
        return [PYTHON, "-c", AGENT_WITH_FAILPOINT, self.pause_dir, module_name, attr, "--config", self.config_path]

    def wait_paused(self, timeout: float = 60.0) -> None:
        """Until the agent stands at its failpoint (fails if it exits or never gets there)."""
        reached = os.path.join(self.pause_dir, "reached")
        deadline = time.time() + timeout
        while not os.path.exists(reached):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice-agent exited {self.proc.returncode}: {self.logs()}")
            if time.time() > deadline:
                raise TimeoutError(f"the agent never reached failpoint {self.failpoint}: {self.logs()}")
            time.sleep(0.01)

    def release(self) -> None:
        open(os.path.join(self.pause_dir, "release"), "w").close()  # pylint: disable=consider-using-with


class Node:
    def __init__(self, ns: str, workdir: str, pin_root: str, cgroup_path: str, pod_cidr: str):
        self.ns = ns
        self.workdir = workdir
        self.pin_root = pin_root
        self.pod_cidr = pod_cidr
        self.state_file = os.path.join(workdir, "state.json")
        self.ipam_dir = os.path.join(workdir, "ipam")
        self.bin_dir = os.path.join(workdir, "bin")
        self.plugin_path = os.path.join(self.bin_dir, "sluice")
        self.state = {"node": {"name": "n1", "ip": NODE_IP, "nic": "sleth0", "pod_cidr": pod_cidr},
                      "services": [{"vip": "10.99.0.10", "port": 80, "protocol": "tcp",
                                    "backends": [{"ip": str(Ipam(self.ipam_dir, pod_cidr).gateway), "port": 80}]}],
                      "prefilter": ["203.0.113.0/24"]}
        self.write_state(self.state)
        os.makedirs(self.bin_dir)
        shutil.copy(SLUICE_PLUGIN, self.plugin_path)     # what a node's CNI bin dir holds
        self.agent = Agent(ns, {"state_file": self.state_file, "pin_root": pin_root, "obj_dir": BPF_BUILD,
                                "socket": os.path.join(workdir, "run", "agent.sock"), "metrics_address": "",
                                "ipam_dir": self.ipam_dir, "cgroup": cgroup_path, "poll_interval": 0.2},
                           workdir)
        self.dp = Datapath(pin_root, BPF_BUILD)
        self.pod_namespaces: list[str] = []

    @property
    def ipam(self) -> Ipam:
        return Ipam(self.ipam_dir, self.pod_cidr)

    def write_state(self, state: dict | str) -> None:
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(state if isinstance(state, str) else json.dumps(state))
        os.replace(tmp, self.state_file)

    # ---- pods and the plugin -------------------------------------------------------------

    def pod(self, tag: str = "pod") -> tuple[str, str]:
        """(container ID, netns path) of a new pod namespace."""
        name = netns.unique(tag)
        netns.run("ip", "netns", "add", name)
        self.pod_namespaces.append(name)
        return f"{netns.PREFIX}{tag}-{uuid.uuid4().hex[:12]}", f"/run/netns/{name}"

    def conf(self, version: str = "1.1.0", **extra) -> dict:
        return {"cniVersion": version, "name": "sluice-test", "type": "sluice",
                "agentSocket": self.agent.config["socket"], **extra}

    def plugin_env(self, command: str, cid: str = "", netns_path: str = "", ifname: str = "eth0",
                   omit: tuple[str, ...] = ()) -> dict:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": netns_path, "CNI_IFNAME": ifname, "CNI_PATH": self.bin_dir}
        for name in omit:
            del env[name]
        return env

    def start_plugin(self, command: str, cid: str = "", netns_path: str = "", conf=None, ifname: str = "eth0",
                     omit: tuple[str, ...] = ()) -> subprocess.Popen:
        """The plugin executed as a runtime does, in the node's netns; stdin still open (see `send`)."""
        return netns.ns_popen(self.ns, self.plugin_path, env=self.plugin_env(command, cid, netns_path, ifname, omit),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    @staticmethod
    def send(proc: subprocess.Popen, conf) -> None:
        """Give a started plugin its network configuration (stdin, then EOF)."""
        proc.stdin.write(conf if isinstance(conf, str) else json.dumps(conf))
        proc.stdin.close()

    @staticmethod
    def collect(proc: subprocess.Popen, timeout: float = 150.0) -> tuple[int, dict | None]:
        """(exit status, parsed stdout) of a plugin given its configuration."""
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout)
        proc.stdout.close()
        proc.stderr.close()
        assert not err, err
        return proc.returncode, json.loads(out) if out.strip() else None

    def run_all(self, procs: list[subprocess.Popen], conf=None) -> list[tuple[int, dict | None]]:
        """Configuration to every started plugin first, then their results: all of them run at once."""
        for proc in procs:
            self.send(proc, self.conf() if conf is None else conf)
        return [self.collect(proc) for proc in procs]

    def plugin(self, command: str, cid: str = "", netns_path: str = "", conf=None, ifname: str = "eth0",
               omit: tuple[str, ...] = ()) -> tuple[int, dict | None]:
        """(exit status, parsed stdout) of one plugin execution."""
        return self.run_all([self.start_plugin(command, cid, netns_path, ifname=ifname, omit=omit)], conf)[0]

    def add(self, cid: str, netns_path: str) -> str:
        status, result = self.plugin("ADD", cid, netns_path)
        assert status == 0, result
        return result["ips"][0]["address"].split("/")[0]

    def gc(self, valid: list[tuple[str, str]]) -> None:
        conf = self.conf(**{"cni.dev/valid-attachments": [{"containerID": c, "ifname": i} for c, i in valid]})
        assert self.plugin("GC", conf=conf) == (0, None)

    # ---- what the node holds -------------------------------------------------------------

    def endpoints(self) -> dict:
        with self.dp.open_map(EndpointsMap) as endpoints:
            return endpoints.items()

    def host_veths(self) -> set[str]:
        links = json.loads(netns.ns_exec(self.ns, "ip", "-j", "-d", "link", "show", "type", "veth").stdout)
        return {link["ifname"] for link in links if podnet.HOST_IFNAME.fullmatch(link["ifname"])}

    def pod_routes(self) -> dict[str, str]:
        """The node's POD_IP/32 routes: {address: device}."""
        routes = json.loads(netns.ns_exec(self.ns, "ip", "-j", "route", "show").stdout)
        return {r["dst"]: r["dev"] for r in routes if podnet.HOST_IFNAME.fullmatch(r.get("dev", ""))}

    def link_pins(self) -> set[str]:
        return {name for name in os.listdir(self.dp.links_dir) if podnet.HOST_IFNAME.fullmatch(name)}

    def pod_attachments(self) -> set[str]:
        """Host veths with tc_from_pod on their ingress: a cls_bpf filter or a live tcx link."""
        with netns.entered(self.ns):
            return {lk["target"] for lk in self.dp.links() if lk["program"] == "tc_from_pod" and lk["attached"]}

    def assert_consistent(self, live: dict[tuple[str, str], str]) -> None:
        """The node holds exactly the attachments in `live` ({(container ID, ifname): netns path}):
        one address each, none shared, and IPAM records == endpoints == host veths == node routes ==
        tc attachments == pod interfaces, and no link pin of a veth that is gone; once the agent's CNI commands
        have ended."""
        self.agent.settled()
        allocations = self.ipam.allocations()
        held = {(r["container_id"], r["ifname"]): str(a) for a, r in allocations.items()}
        assert len(held) == len(allocations), f"an attachment holds two addresses: {allocations}"
        assert set(held) == set(live), (f"IPAM leaks {sorted(set(held) - set(live))}, "
                                        f"lacks {sorted(set(live) - set(held))}")
        addresses = set(held.values())
        assert len(addresses) == len(held), "an address is allocated twice"
        hosts = {podnet.host_ifname(*key): address for key, address in held.items()}
        endpoints = self.endpoints()
        assert set(endpoints) == addresses, (f"endpoints without allocation: {sorted(set(endpoints) - addresses)}, "
                                             f"allocations without endpoint: {sorted(addresses - set(endpoints))}")
        assert self.host_veths() == set(hosts), f"host veths {sorted(self.host_veths() ^ set(hosts))} differ"
        assert self.pod_routes() == {address: host for host, address in hosts.items()}
        assert self.pod_attachments() == set(hosts)
        assert self.link_pins() <= set(hosts), f"stale link pins {sorted(self.link_pins() - set(hosts))}"
        with netns.entered(self.ns):
            for (cid, ifname), netns_path in live.items():
                host = podnet.host_ifname(cid, ifname)
                assert endpoints[held[(cid, ifname)]].ifindex == socket.if_nametoindex(host)
                view = podnet.inspect_pod(netns_path, ifname)
                assert view.link is not None and f"{held[(cid, ifname)]}/32" in view.addresses, (cid, view)

    def cleanup(self) -> None:
        for name in self.pod_namespaces:
            netns.run("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def node(pod_cidr: str = "10.247.1.0/24"):
    """A running Node (see the module docstring); everything it made is removed on exit."""
    workdir = tempfile.mkdtemp(prefix="slnode-")  # short: a socket path has at most 107 bytes
    pin_root = f"/sys/fs/bpf/sluice-test-{uuid.uuid4().hex[:8]}"
    n = None
    try:
        with netns.namespaces("node") as (ns,), cgroup() as cg:
            netns.ns_exec(ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
            netns.ns_exec(ns, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "sleth0")
            for dev in ("sleth0", "sleth1"):
                netns.ns_exec(ns, "ip", "link", "set", dev, "up")
            # No IPv6 on the node: link-local addresses and their DAD would move the snapshot on their own.
            netns.ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            n = Node(ns, workdir, pin_root, cg.path, pod_cidr)
            try:
                n.agent.start()
                yield n
            finally:
                n.agent.stop()
                n.cleanup()
                Datapath(pin_root, BPF_BUILD).remove()
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
