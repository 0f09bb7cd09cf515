"""Local multi-node Sluice lab on one kernel.

Each node is a network namespace (NIC `eth0`, a veth into bridge `br0` that lives
in the lab's own underlay namespace) plus a private mount, UTS and cgroup namespace
held by the node's sshd: the directories Sluice writes, /run, /sys (so /sys/class/net
shows the node's links), a fresh bpffs at /sys/fs/bpf and a cgroup2 at
/sys/fs/cgroup/unified are the node's own. Ansible reaches every node over SSH from
the root namespace through a veth (`<name>-host`) into the same bridge. An
"external" client namespace sits on the underlay, outside the cluster.

    lab.py up [--nodes N] [--name NAME] [--subnet CIDR] [--kubernetes]
    lab.py down [--name NAME]
    lab.py status [--name NAME]
    lab.py exec [--name NAME] NODE -- CMD...     (NODE: node1, 1, ext or cp)

With --kubernetes the lab is a Kubernetes cluster (lab/kube.py): a control plane in its own namespace on the
underlay (`<name>-cp`), containerd and kubelet in every node, whose v1 cgroup controllers (the host's layout)
are mounted in the node, rooted at the node's own cgroup.

Everything the lab creates is found again by name (namespaces `<name>-*`, link
`<name>-host`, cgroup `sluice-lab-<name>`, state in /var/lib/sluice-lab/<name>), so
`down` also cleans up after a half-failed `up`. Standard library only: the node
processes run this file with whatever interpreter started it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import kube

LAB_PY = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(LAB_PY))
LAB_ROOT = "/var/lib/sluice-lab"
# Mountpoints the lab had to create on the host filesystem; the last lab down removes them.
CREATED_MOUNTPOINTS = os.path.join(LAB_ROOT, "created-mountpoints.json")
# The host's values of the sysctls kubelet sets, put back when the last lab goes.
HOST_SYSCTLS = os.path.join(LAB_ROOT, "host-sysctls.json")
CGROUP2 = "/sys/fs/cgroup/unified"
DEFAULT_NAME = "sllab"
DEFAULT_SUBNET = "192.168.77.0/24"
NODE_NIC = "eth0"
BRIDGE = "br0"
# Persistent per-node directories, bind-mounted from the node's state dir so they
# survive an sshd restart. /run (hence /run/sluice) is a per-node tmpfs instead.
NODE_DIRS = ("/etc/sluice", "/etc/cni/net.d", "/opt/cni/bin", "/opt/sluice", "/var/lib/sluice",
             "/etc/sysctl.d", "/etc/iproute2/rt_protos.d", "/var/log/sluice",
             # what a Kubernetes node's containerd and kubelet keep (lab/kube.py)
             "/etc/containerd", "/var/lib/containerd", "/etc/kubernetes", "/var/lib/kubelet",
             "/var/log/pods", "/var/log/containers")
MAX_NODES = 80  # node addresses .11 .. .90 stay below the external client's .100
SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR")


def log(msg: str) -> None:
    print(f"lab: {msg}", flush=True)


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, check=False, text=True, capture_output=True, **kw)
    if check and result.returncode != 0:
        raise SystemExit(f"lab: `{shlex.join(argv)}` failed ({result.returncode}): "
                         f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def in_netns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    # nsenter rather than `ip netns exec`, which remounts /sys.
    return run("nsenter", f"--net=/run/netns/{ns}", *argv, check=check)


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: tells a PID apart from a later reuse of it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@contextlib.contextmanager
def lab_lock():
    """Serialise up/down of all labs: they share the host mountpoints and LAB_ROOT."""
    with open(LAB_PY) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class Lab:
    def __init__(self, name: str, subnet: str | None = None):
        if not re.fullmatch(r"[a-z][a-z0-9]{1,9}", name):
            # `<name>-host` must fit the 15-character link name limit.
            raise SystemExit("lab: --name must be 2-10 lowercase letters/digits, starting with a letter")
        self.name = name
        self.state_dir = os.path.join(LAB_ROOT, name)
        self.state_file = os.path.join(self.state_dir, "state.json")
        self.state = self._load_state()
        recorded = self.state.get("subnet")
        if subnet and recorded and subnet != recorded:
            raise SystemExit(f"lab: {name} is up on {recorded}; run `down` before changing --subnet")
        self.subnet = ipaddress.ip_network(subnet or recorded or DEFAULT_SUBNET)
        if self.subnet.prefixlen > 24:
            raise SystemExit("lab: --subnet must be a /24 or larger")
        self.underlay_ns = f"{name}-underlay"
        self.ext_ns = f"{name}-ext"
        self.cp_ns = f"{name}-cp"  # the Kubernetes control plane (lab/kube.py), when the lab has one
        self.host_link = f"{name}-host"
        self.cgroup = os.path.join(CGROUP2, f"sluice-lab-{name}")
        self.ssh_dir = os.path.join(self.state_dir, "ssh")
        self.client_key = os.path.join(self.ssh_dir, "id_ed25519")
        # The default lab writes the inventory ansible.cfg points at; other labs keep theirs in the state dir.
        self.inventory_dir = (os.path.join(REPO, "inventory", "lab") if name == DEFAULT_NAME
                              else os.path.join(self.state_dir, "inventory"))
        self.inventory = os.path.join(self.inventory_dir, "hosts.yml")

    # --- naming and addressing -------------------------------------------------------

    def node_ns(self, i: int) -> str:
        return f"{self.name}-node{i}"

    def node_ip(self, i: int) -> str:
        return str(self.subnet.network_address + 10 + i)

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ext_ip(self) -> str:
        return str(self.subnet.network_address + 100)

    @property
    def cp_ip(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def kubernetes(self) -> bool:
        return bool(self.state.get("kubernetes"))

    def cidr(self, ip: str) -> str:
        return f"{ip}/{self.subnet.prefixlen}"

    def node_dir(self, i: int) -> str:
        return os.path.join(self.state_dir, f"node{i}")

    def existing_namespaces(self) -> list[str]:
        pattern = re.compile(rf"{self.name}-(underlay|ext|cp|node\d+)")
        try:
            return sorted(n for n in os.listdir("/run/netns") if pattern.fullmatch(n))
        except FileNotFoundError:
            return []

    def existing_node_indexes(self) -> set[int]:
        found = {int(n.rsplit("node", 1)[1]) for n in self.existing_namespaces() if "-node" in n}
        return found | {int(i) for i in self.state.get("nodes", {})}

    # --- state -----------------------------------------------------------------------

    def _load_state(self) -> dict:
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def save_state(self) -> None:
        self.state["subnet"] = str(self.subnet)
        write_json(self.state_file, self.state)

    def holder_pid(self, i: int) -> int | None:
        """PID of node i's sshd (which holds its namespaces), if it is still the one we started."""
        rec = self.state.get("nodes", {}).get(str(i))
        start = process_start_time(rec["pid"]) if rec else None
        return rec["pid"] if start is not None and start == rec["start"] else None

    # --- cgroups ---------------------------------------------------------------------

    def ensure_v1_cgroups(self) -> None:
        """The lab's cgroup in each of the host's v1 hierarchies, below the one this process is in (the
        controllers live there on this layout; containerd and kubelet in a node need them). Recorded,
        so that `down` from any other process finds them."""
        if "cgroup_v1" not in self.state:
            self.state["cgroup_v1"] = [os.path.join(path, f"sluice-lab-{self.name}") for path in own_v1_cgroups()]
            self.save_state()
        for path in self.state["cgroup_v1"]:
            make_cgroup(path)

    def node_cgroups(self, i: int) -> list[str]:
        """Node i's cgroup in the v2 hierarchy (first) and in every v1 one."""
        return [os.path.join(lab_dir, f"node{i}") for lab_dir in [self.cgroup, *self.state.get("cgroup_v1", [])]]

    def join_node_cgroups(self, i: int) -> None:
        """Move this process into node i's cgroups: what it starts is the node's, and a cgroup
        namespace made now is rooted there in every hierarchy."""
        for cgroup in self.node_cgroups(i):
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    # --- up --------------------------------------------------------------------------

    def up(self, nodes: int, kubernetes: bool = False) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise SystemExit(f"lab: --nodes must be between 1 and {MAX_NODES}")
        if self.state.get("nodes") and kubernetes != self.kubernetes:
            raise SystemExit(f"lab: {self.name} is up {'with' if self.kubernetes else 'without'} Kubernetes; "
                             "run `down` before changing --kubernetes")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.check_subnet_free()
        self.state["kubernetes"] = kubernetes
        self.save_state()  # from here on `down` knows the lab even if `up` fails
        self.ensure_keys()
        ensure_host_mountpoints()
        os.makedirs(self.cgroup, exist_ok=True)
        self.ensure_v1_cgroups()
        self.ensure_underlay()
        self.ensure_port(self.ext_ns, "ext", self.ext_ip)
        os.makedirs(os.path.join(self.cgroup, "ext"), exist_ok=True)
        if kubernetes:
            self.ensure_port(self.cp_ns, "cp", self.cp_ip)
            os.makedirs(os.path.join(self.cgroup, "cp"), exist_ok=True)
        for i in sorted(self.existing_node_indexes() - set(range(1, nodes + 1))):
            self.remove_node(i)
        for i in range(1, nodes + 1):
            self.ensure_node(i)
        self.verify(nodes)
        if kubernetes:
            kube.save_host_sysctls(HOST_SYSCTLS)
            kube.Cluster(self).up(nodes)
        self.write_inventory(nodes)
        log(f"{self.name} is up: {nodes} node(s) on {self.subnet}, inventory {self.inventory}"
            + (f", kubeconfig {kube.Cluster(self).admin_conf}" if kubernetes else ""))

    # --- processes the lab keeps running (the control plane, each node's containerd and kubelet) ---

    def start_daemon(self, where: str, name: str, argv: list[str]) -> None:
        """Start `argv` in the namespaces and cgroups of `where` (cp or nodeN) unless it runs already, and
        restart it whenever it exits, as a node's init would; its output goes to <state dir>/logs/<where>-<name>.log."""
        key = f"{where}/{name}"
        rec = self.state.setdefault("daemons", {}).get(key)
        if rec and process_start_time(rec["pid"]) == rec["start"]:
            return
        os.makedirs(os.path.join(self.state_dir, "logs"), exist_ok=True)
        with open(self.daemon_log(where, name), "ab") as logf:
            proc = subprocess.Popen([sys.executable, LAB_PY, "--name", self.name, "exec", where, "--",
                                     sys.executable, LAB_PY, "_restart", *argv],
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.state["daemons"][key] = {"pid": proc.pid, "start": process_start_time(proc.pid)}
        self.save_state()

    def daemon_log(self, where: str, name: str) -> str:
        return os.path.join(self.state_dir, "logs", f"{where}-{name}.log")

    def node_run(self, i: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(sys.executable, LAB_PY, "--name", self.name, "exec", f"node{i}", "--", *argv, check=check)

    def ns_run(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return in_netns(ns, *argv, check=check)

    def check_subnet_free(self) -> None:
        """Refuse a subnet the root namespace already routes elsewhere (another lab, a real network)."""
        for route in json.loads(run("ip", "-j", "-4", "route", "show").stdout):
            dst = route.get("dst", "")
            if dst == "default" or route.get("dev") == self.host_link:
                continue
            if ipaddress.ip_network(dst if "/" in dst else f"{dst}/32").overlaps(self.subnet):
                raise SystemExit(f"lab: {self.subnet} overlaps {dst} on {route.get('dev')}; pick another --subnet")

    def ensure_keys(self) -> None:
        os.makedirs(self.ssh_dir, mode=0o700, exist_ok=True)
        for key in ("host_ed25519_key", "id_ed25519"):
            path = os.path.join(self.ssh_dir, key)
            if not os.path.exists(path):
                run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sluice-lab-{self.name}", "-f", path)
        with open(self.client_key + ".pub") as pub, open(os.path.join(self.ssh_dir, "authorized_keys"), "w") as auth:
            auth.write(pub.read())

    def ensure_netns(self, ns: str) -> None:
        if not os.path.exists(f"/run/netns/{ns}"):
            run("ip", "netns", "add", ns)
        in_netns(ns, "ip", "link", "set", "lo", "up")

    def ensure_underlay(self) -> None:
        self.ensure_netns(self.underlay_ns)
        ul = ("ip", "-n", self.underlay_ns)
        if run(*ul, "link", "show", "dev", BRIDGE, check=False).returncode != 0:
            run(*ul, "link", "add", BRIDGE, "type", "bridge")
        run(*ul, "link", "set", BRIDGE, "up")
        if run("ip", "link", "show", "dev", self.host_link, check=False).returncode != 0:
            run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "host", "netns", self.underlay_ns)
        run(*ul, "link", "set", "host", "master", BRIDGE, "up")
        run("ip", "addr", "replace", self.cidr(self.host_ip), "dev", self.host_link)
        run("ip", "link", "set", self.host_link, "up")

    def ensure_port(self, ns: str, port: str, ip: str) -> None:
        """Namespace `ns` with eth0 at `ip`, its peer `port` plugged into the underlay bridge."""
        self.ensure_netns(ns)
        ul = ("ip", "-n", self.underlay_ns)
        if run(*ul, "link", "show", "dev", port, check=False).returncode != 0:
            # A MAC derived from the address: a re-created node keeps it, so neighbours'
            # cached entries stay right (with a new random MAC it is unreachable for tens of seconds).
            mac = "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ip).packed)
            run(*ul, "link", "add", port, "type", "veth", "peer", "name", NODE_NIC, "address", mac, "netns", ns)
        run(*ul, "link", "set", port, "master", BRIDGE, "up")
        self.make_wire(ns, port)
        in_netns(ns, "ip", "addr", "replace", self.cidr(ip), "dev", NODE_NIC)
        in_netns(ns, "ip", "link", "set", NODE_NIC, "up")

    def make_wire(self, ns: str, port: str) -> None:
        """Make the veth between `ns` and the bridge behave like a cable into a switch port.

        A veth hands over packets whose L4 checksum is only the pseudo-header sum (the
        "hardware" would finish it); a real wire carries complete ones, which the nodes'
        XDP rewrites incrementally and sends on with XDP_TX. And frames sent with XDP_TX
        reach the switch side only when it runs an XDP program (lab/xdp_pass.c)."""
        in_netns(ns, "ethtool", "-K", NODE_NIC, "tx", "off")
        link = json.loads(run("ip", "-n", self.underlay_ns, "-j", "link", "show", "dev", port).stdout)[0]
        if "xdp" not in link:
            # `ip -n` loads the object in a private mount namespace: no pins on the host's bpffs.
            run("ip", "-n", self.underlay_ns, "link", "set", "dev", port, "xdpdrv", "obj", self.xdp_pass_object(),
                "sec", "xdp")

    def xdp_pass_object(self) -> str:
        obj = os.path.join(self.state_dir, "xdp_pass.o")
        if not os.path.exists(obj):
            run("clang", "-O2", "-target", "bpf", "-c", os.path.join(REPO, "lab", "xdp_pass.c"), "-o", obj)
        return obj

    def ensure_node(self, i: int) -> None:
        self.ensure_port(self.node_ns(i), f"node{i}", self.node_ip(i))
        if self.holder_pid(i):
            return
        self.kill_cgroup(os.path.join(self.cgroup, f"node{i}"))  # leftovers of a dead node
        node_dir = self.node_dir(i)
        for path in NODE_DIRS:
            os.makedirs(node_dir + "/root" + path, exist_ok=True)
        config = os.path.join(node_dir, "sshd_config")
        with open(config, "w") as f:
            f.write(self.sshd_config(i))
        for cgroup in self.node_cgroups(i):
            make_cgroup(cgroup)
        with open(os.path.join(node_dir, "sshd.log"), "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, LAB_PY, "_node-boot", "--name", self.name, str(i)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.state.setdefault("nodes", {})[str(i)] = {"pid": proc.pid, "start": process_start_time(proc.pid)}
        self.save_state()
        self.wait_for_sshd(i, proc)
        self.state["nodes"][str(i)]["mnt_ns"] = ns_inode(f"/proc/{proc.pid}/ns/mnt")
        self.save_state()

    def sshd_config(self, i: int) -> str:
        return "\n".join([
            f"# Generated by lab/lab.py for {self.node_ns(i)}.",
            f"ListenAddress {self.node_ip(i)}",
            f"HostKey {self.ssh_dir}/host_ed25519_key",
            f"AuthorizedKeysFile {self.ssh_dir}/authorized_keys",
            f"PidFile {self.node_dir(i)}/sshd.pid",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "PrintMotd no",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            "",
        ])

    def wait_for_sshd(self, i: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with open(os.path.join(self.node_dir(i), "sshd.log")) as f:
                    tail = f.read()[-2000:]
                raise SystemExit(f"lab: node{i} sshd exited ({proc.returncode}):\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection((self.node_ip(i), 22), timeout=0.5):
                return
            time.sleep(0.05)
        raise SystemExit(f"lab: node{i} sshd is not listening on {self.node_ip(i)}:22")

    def write_inventory(self, nodes: int) -> None:
        os.makedirs(self.inventory_dir, exist_ok=True)
        if self.name != DEFAULT_NAME:
            link = os.path.join(self.inventory_dir, "group_vars")
            if not os.path.islink(link):
                os.symlink(os.path.join(REPO, "inventory", "lab", "group_vars"), link)
        hosts = "".join(
            f"    node{i}:\n"
            f"      ansible_host: {self.node_ip(i)}\n"
            f"      sluice_node_index: {i}\n"
            for i in range(1, nodes + 1))
        text = (
            f"---\n# Generated by lab/lab.py for lab {self.name!r}: `up` rewrites it, `down` removes it.\n"
            "# Same layout as inventory/example: cluster settings live in group_vars/sluice_nodes.yml.\n"
            "sluice_nodes:\n"
            "  vars:\n"
            "    ansible_user: root\n"
            f"    ansible_ssh_private_key_file: {self.client_key}\n"
            f"    ansible_ssh_common_args: {' '.join(SSH_OPTIONS)}\n"
            "    # The nodes share this machine's /root, whose shell profile would make interpreter\n"
            "    # discovery pick a pyenv shim; a real Debian node has /usr/bin/python3.\n"
            "    ansible_python_interpreter: /usr/bin/python3\n"
            "  hosts:\n"
            + hosts +
            "all:\n"
            "  vars:\n"
            "    # The external client is a network namespace on the underlay, outside the cluster, not\n"
            "    # an SSH host: run commands in it with `lab/lab.py exec ext -- CMD` (or nsenter --net).\n"
            f"    sluice_lab_name: {self.name}\n"
            f"    sluice_lab_underlay_cidr: {self.subnet}\n"
            f"    sluice_lab_external_netns: {self.ext_ns}\n"
            f"    sluice_lab_external_address: {self.ext_ip}\n"
            + (f"    # The cluster's admin kubeconfig (lab/kube.py): plan.yml checks every node's pod CIDR against it.\n"
               f"    sluice_kubeconfig: {kube.Cluster(self).admin_conf}\n"
               "    # sluice-agent's own credentials (user sluice-agent, roles/agent/files/kubernetes-rbac.yml).\n"
               f"    sluice_agent_kubeconfig: {kube.Cluster(self).dir}/sluice-agent.conf\n"
               "    # hostPort, as Calico and kubeadm clusters get it: the reference portmap plugin after Sluice.\n"
               "    cni_chained_plugins: [{type: portmap, capabilities: {portMappings: true}}]\n"
               if self.kubernetes else ""))
        with open(self.inventory, "w") as f:
            f.write(text)

    def ssh(self, i: int, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", self.client_key, *SSH_OPTIONS, "-o", "BatchMode=yes",
             "-o", "ConnectTimeout=5", f"root@{self.node_ip(i)}", shlex.join(argv)],
            check=False, text=True, capture_output=True, timeout=timeout)

    def verify(self, nodes: int) -> None:
        """SSH lands in each node's own namespaces; files and pins do not leak between nodes."""
        bpffs_devs = {os.stat("/sys/fs/bpf").st_dev}
        for i in range(1, nodes + 1):
            r = self.ssh(i, "sh", "-c", 'readlink /proc/self/ns/net /proc/self/ns/mnt; stat -c %d /sys/fs/bpf')
            if r.returncode != 0:
                raise SystemExit(f"lab: ssh to node{i} failed: {r.stderr.strip()}")
            net, mnt, dev = r.stdout.split()
            want_net = f"net:[{ns_inode(f'/run/netns/{self.node_ns(i)}')}]"
            want_mnt = f"mnt:[{ns_inode(f'/proc/{self.holder_pid(i)}/ns/mnt')}]"
            if (net, mnt) != (want_net, want_mnt):
                raise SystemExit(f"lab: node{i} ssh session runs in {net} {mnt}, not {want_net} {want_mnt}")
            if int(dev) in bpffs_devs:
                raise SystemExit(f"lab: node{i} shares its /sys/fs/bpf with the host or another node")
            bpffs_devs.add(int(dev))
        self.verify_isolation(nodes)

    def verify_isolation(self, nodes: int) -> None:
        probe = f"lab-probe-{uuid.uuid4().hex[:8]}"
        file_probe, pin_probe = f"/etc/sluice/{probe}", f"/sys/fs/bpf/{probe}"
        made = self.ssh(1, "sh", "-c", f"touch {file_probe} && bpftool map create {pin_probe} "
                        "type array key 4 value 4 entries 1 name lab_probe")
        if made.returncode != 0:
            raise SystemExit(f"lab: could not create probes on node1: {made.stderr.strip()}")
        try:
            leaks = [f"host sees {p}" for p in (file_probe, pin_probe) if os.path.exists(p)]
            if nodes > 1 and self.ssh(2, "test", "-e", file_probe).returncode == 0:
                leaks.append(f"node2 sees {file_probe}")
            if nodes > 1 and self.ssh(2, "test", "-e", pin_probe).returncode == 0:
                leaks.append(f"node2 sees {pin_probe}")
        finally:
            self.ssh(1, "rm", "-f", file_probe, pin_probe)
        if leaks:
            raise SystemExit("lab: node1 is not isolated: " + "; ".join(leaks))

    # --- down ------------------------------------------------------------------------

    def down(self) -> None:
        namespaces = self.existing_namespaces()
        if not (namespaces or os.path.exists(self.state_dir) or os.path.exists(self.cgroup)
                or os.path.exists(f"/sys/class/net/{self.host_link}")):
            log(f"{self.name} is not up; nothing to remove")
            return
        self.kill_lab_processes(namespaces, sorted(self.existing_node_indexes()), self.lab_cgroups())
        if os.path.exists(f"/sys/class/net/{self.host_link}"):
            run("ip", "link", "del", self.host_link)
        for ns in namespaces:
            run("ip", "netns", "del", ns)
        self.remove_cgroup_tree()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.name == DEFAULT_NAME:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.inventory)
        release_host_mountpoints()
        log(f"{self.name} is down")

    def remove_node(self, i: int) -> None:
        log(f"removing node{i}")
        ns = self.node_ns(i)
        self.kill_lab_processes([ns], [i], [os.path.join(self.cgroup, f"node{i}")])
        run("ip", "-n", self.underlay_ns, "link", "del", f"node{i}", check=False)
        if os.path.exists(f"/run/netns/{ns}"):
            run("ip", "netns", "del", ns)
        for cgroup in self.node_cgroups(i):
            remove_cgroup(cgroup)
        shutil.rmtree(self.node_dir(i), ignore_errors=True)
        self.state.get("nodes", {}).pop(str(i), None)
        self.save_state()

    def lab_cgroups(self) -> list[str]:
        """One cgroup per node, and one for the external client."""
        try:
            return [d.path for d in os.scandir(self.cgroup) if d.is_dir()]
        except FileNotFoundError:
            return []

    def kill_lab_processes(self, namespaces: list[str], nodes: list[int], cgroups: list[str]) -> None:
        """Kill everything running in (part of) the lab: its cgroups, which every node
        process and `lab.py exec` joins, the recorded sshd holders, and anything else
        that entered the lab's network namespaces or a node's mount namespace."""
        for cgroup in cgroups:
            self.kill_cgroup(cgroup)
        inodes = {("net", ns_inode(f"/run/netns/{ns}")) for ns in namespaces}
        for i in nodes:
            rec = self.state.get("nodes", {}).get(str(i), {})
            inodes.add(("mnt", rec.get("mnt_ns")))
            pid = self.holder_pid(i)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        inodes = {(kind, ino) for kind, ino in inodes if ino}
        victims = [pid for pid in all_pids() if pid != os.getpid() and any(
            ns_inode(f"/proc/{pid}/ns/{kind}") == ino for kind, ino in inodes)]
        for pid in victims:
            log(f"killing pid {pid} ({comm(pid)}), still inside the lab's namespaces")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(victims + [p for p in (self.holder_pid(i) for i in nodes) if p])

    def kill_cgroup(self, cgroup: str) -> None:
        if not os.path.isdir(cgroup):
            return
        with open(os.path.join(cgroup, "cgroup.kill"), "w") as f:
            f.write("1")
        deadline = time.monotonic() + 10
        while "populated 1" in read(os.path.join(cgroup, "cgroup.events")):
            if time.monotonic() > deadline:
                raise SystemExit(f"lab: processes in {cgroup} did not exit")
            time.sleep(0.02)

    def remove_cgroup_tree(self) -> None:
        for lab_dir in [self.cgroup, *self.state.get("cgroup_v1", [])]:
            remove_cgroup(lab_dir)

    # --- status and exec -------------------------------------------------------------

    def status(self) -> int:
        if not os.path.exists(self.state_file):
            log(f"{self.name} is not up")
            return 1
        print(f"lab {self.name}: underlay {self.subnet} (bridge {BRIDGE} in {self.underlay_ns}), "
              f"host {self.host_link} {self.host_ip}, inventory {self.inventory}")
        ext_present = os.path.exists(f"/run/netns/{self.ext_ns}")
        print(f"  ext    {self.ext_ns:<18} {self.ext_ip:<15} netns {'present' if ext_present else 'MISSING'}")
        healthy = True
        for i in sorted(self.existing_node_indexes()):
            pid = self.holder_pid(i)
            ssh_ok = bool(pid) and self.ssh(i, "true", timeout=10).returncode == 0
            healthy &= ssh_ok
            print(f"  node{i:<3}{self.node_ns(i):<18} {self.node_ip(i):<15} sshd pid {pid or 'DEAD':<8} "
                  f"ssh {'ok' if ssh_ok else 'FAILED'}")
        if self.kubernetes:
            print(f"  cp     {self.cp_ns:<18} {self.cp_ip:<15} Kubernetes control plane")
        for key, rec in sorted(self.state.get("daemons", {}).items()):
            alive = process_start_time(rec["pid"]) == rec["start"]
            healthy &= alive
            where, name = key.split("/")
            print(f"  {where:<6} {name:<24} pid {rec['pid'] if alive else 'DEAD':<8} log {self.daemon_log(where, name)}")
        return 0 if healthy else 1

    def exec(self, node: str, argv: list[str]) -> None:
        if not argv:
            raise SystemExit("lab: exec needs a command after --")
        # Join the lab's cgroups so `down` finds whatever this starts.
        if node in ("ext", "cp"):
            ns = self.ext_ns if node == "ext" else self.cp_ns
            if not os.path.exists(f"/run/netns/{ns}"):
                raise SystemExit(f"lab: {ns} is not up")
            with open(os.path.join(self.cgroup, node, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            nsenter = ["nsenter", f"--net=/run/netns/{ns}"]
        else:
            if not re.fullmatch(r"(node)?\d+", node):
                raise SystemExit(f"lab: unknown node {node!r}: use node1, 1, ext or cp")
            i = int(node.removeprefix("node"))
            pid = self.holder_pid(i)
            if not pid:
                raise SystemExit(f"lab: node{i} of {self.name} is not running")
            self.join_node_cgroups(i)
            nsenter = ["nsenter", f"--target={pid}", "--net", "--mount", "--uts", "--cgroup"]
        os.execvp("nsenter", [*nsenter, "--", *argv])


# --- node process (runs inside the node's namespaces) ---------------------------------

def node_boot(lab: Lab, i: int) -> None:
    """Join the node's cgroup, then enter its netns and new mount/UTS/cgroup namespaces.
    Every exec keeps the PID, so the PID `up` recorded ends up being the node's sshd."""
    lab.join_node_cgroups(i)
    os.execvp("nsenter", ["nsenter", f"--net=/run/netns/{lab.node_ns(i)}",
                          "unshare", "--mount", "--uts", "--cgroup", "--propagation", "private", "--",
                          sys.executable, LAB_PY, "_node-init", "--name", lab.name, str(i)])


def node_init(lab: Lab, i: int) -> None:
    """Make the node's private filesystem view, then become its sshd."""
    def mount(*argv: str) -> None:
        run("mount", *argv)

    hierarchies = v1_hierarchies()  # read before the host's copies below are detached

    # Detach the copies of the host's /sys and /run mounts (its bpffs, the nsfs mounts of
    # /run/netns) so this namespace holds no reference to them.
    for prefix in ("/sys", "/run"):
        for target in mounts_under(prefix):
            run("umount", "--lazy", target)
    for path in NODE_DIRS:
        mount("--bind", lab.node_dir(i) + "/root" + path, path)
    mount("-t", "sysfs", "sysfs", "/sys")  # mounted from the node's netns: /sys/class/net is the node's
    mount("-t", "bpf", "bpf", "/sys/fs/bpf")
    mount("-t", "tmpfs", "-o", "mode=755", "cgroup", "/sys/fs/cgroup")
    os.mkdir("/sys/fs/cgroup/unified")
    mount("-t", "cgroup2", "cgroup2", "/sys/fs/cgroup/unified")  # rooted at the node's cgroup
    # The host's layout (v1 controllers beside the unified hierarchy), each rooted at the node's cgroup:
    # runc and kubelet find their controllers where they would on a real node of this kind.
    for mountpoint, controllers in hierarchies.items():
        target = os.path.join("/sys/fs/cgroup", os.path.basename(mountpoint))
        os.mkdir(target)
        mount("-t", "cgroup", "-o", controllers, "cgroup", target)
    mount("-t", "tmpfs", "-o", "mode=755", "run", "/run")
    os.makedirs("/run/sshd", mode=0o755)
    os.makedirs("/run/lock", mode=0o1777)
    os.makedirs("/run/sluice", mode=0o755)
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(f"node{i}")
    os.execv("/usr/sbin/sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(lab.node_dir(i), "sshd_config")])


def restart_forever(argv: list[str]) -> None:
    """Run `argv` again a second after each exit (the lab's daemons; `down` kills the whole cgroup)."""
    while True:
        code = subprocess.call(argv)
        log(f"{argv[0]} exited ({code}); restarting it in 1 s")
        time.sleep(1)


def mounts_under(prefix: str) -> list[str]:
    """Mountpoints at or below `prefix`, deepest first."""
    with open("/proc/self/mountinfo") as f:
        targets = {line.split()[4] for line in f}
    inside = [t for t in targets if t == prefix or t.startswith(prefix + "/")]
    return sorted(inside, key=lambda t: t.count("/"), reverse=True)


# --- cgroups ---------------------------------------------------------------------------

def v1_hierarchies() -> dict[str, str]:
    """The cgroup v1 hierarchies this process sees: mountpoint -> its controllers, as mount options."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, fs = line.split(" - ", 1)
            fstype, _source, options = fs.split()
            if fstype == "cgroup":
                found[fields.split()[4]] = ",".join(
                    o for o in options.split(",") if o not in ("rw", "ro") and "=" not in o or o.startswith("name="))
    return found


def own_v1_cgroups() -> list[str]:
    """This process's cgroup directory in each v1 hierarchy."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy != "0":
                paths[frozenset(controllers.split(","))] = path
    return [mountpoint + paths[frozenset(controllers.split(","))].rstrip("/")
            for mountpoint, controllers in v1_hierarchies().items()]


def make_cgroup(path: str) -> None:
    if os.path.isdir(path):
        return
    os.mkdir(path)
    # A new v1 cpuset has no CPUs or memory nodes, and no task can join it until it is given its parent's.
    for name in ("cpuset.cpus", "cpuset.mems"):
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name), "w") as f:
                f.write(read(os.path.join(os.path.dirname(path), name)))


def remove_cgroup(path: str) -> None:
    """Remove a cgroup and the ones its processes made below it (kubelet's, runc's), deepest first."""
    for below, _dirs, _files in sorted(os.walk(path), key=lambda entry: entry[0].count("/"), reverse=True):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(below)


# --- host mountpoints shared by all labs -----------------------------------------------

def ensure_host_mountpoints() -> None:
    """A bind mount needs an existing directory: create the missing ones and remember them."""
    missing = []
    for path in NODE_DIRS:
        while not os.path.exists(path) and path not in missing:
            missing.append(path)
            path = os.path.dirname(path)
    # Record before creating, so that an interrupted `up` cannot leave an unrecorded one.
    write_json(CREATED_MOUNTPOINTS, sorted(set(load_created_mountpoints() + missing)))
    for d in sorted(missing, key=len):
        os.mkdir(d)


def release_host_mountpoints() -> None:
    """Once no lab is left, remove the mountpoints the labs created, then LAB_ROOT."""
    if not os.path.isdir(LAB_ROOT) or any(d.is_dir() for d in os.scandir(LAB_ROOT)):
        return
    kube.restore_host_sysctls(HOST_SYSCTLS)
    for d in sorted(load_created_mountpoints(), key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)  # only if empty: never remove anything we did not create
    shutil.rmtree(LAB_ROOT)


def load_created_mountpoints() -> list[str]:
    try:
        with open(CREATED_MOUNTPOINTS) as f:
            return json.load(f)
    except FileNotFoundError:
        return []


def write_json(path: str, data) -> None:
    """Replace `path` atomically: an interrupted run must not leave a truncated file."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


# --- /proc helpers ----------------------------------------------------------------------

def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def comm(pid: int) -> str:
    try:
        return read(f"/proc/{pid}/comm").strip()
    except OSError:
        return "?"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(process_start_time(p) is not None for p in pids):
        if time.monotonic() > deadline:
            raise SystemExit(f"lab: processes {pids} did not exit")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=DEFAULT_NAME, help="lab name, prefix of everything it creates")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,down,status,exec}")
    p_up = sub.add_parser("up", help="create or reconcile the lab")
    p_up.add_argument("--nodes", type=int, default=3)
    p_up.add_argument("--subnet", help=f"underlay subnet (default {DEFAULT_SUBNET})")
    p_up.add_argument("--kubernetes", action="store_true",
                      help="a Kubernetes cluster: control plane, containerd and kubelet on every node (lab/kube.py)")
    sub.add_parser("down", help="remove everything the lab created")
    sub.add_parser("status", help="nodes, addresses, sshd PIDs and whether SSH works")
    p_exec = sub.add_parser("exec", help="run a command inside a node's (or ext's) namespaces")
    p_exec.add_argument("node", help="node1, 1 or ext")
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER)
    for internal in ("_node-boot", "_node-init"):
        sub.add_parser(internal).add_argument("index", type=int)
    sub.add_parser("_restart").add_argument("cmd", nargs=argparse.REMAINDER)
    # Let `--name` also follow the subcommand.
    for p in sub.choices.values():
        p.add_argument("--name", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        raise SystemExit("lab: needs root (namespaces, mounts, cgroups)")
    if args.command == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        Lab(args.name).exec(args.node, cmd)
    if args.command == "_node-boot":
        node_boot(Lab(args.name), args.index)
    if args.command == "_node-init":
        node_init(Lab(args.name), args.index)
    if args.command == "_restart":
        restart_forever(args.cmd)
    if args.command == "status":
        return Lab(args.name).status()
    with lab_lock():
        if args.command == "up":
            Lab(args.name, args.subnet).up(args.nodes, args.kubernetes)
        else:
            Lab(args.name).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
