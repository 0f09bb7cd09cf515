"""The CNI plugin on the real kernel: pods are sltest-* namespaces, the node is
this test's own netns, where only links named sl* are created (and deleted).

End-to-end tests execute the plugin as a runtime does (CNI_* environment, the
network configuration on stdin) against the real sluice-agent (sluice.agent.Agent)
serving its socket from this process; detailed tests call ops.handle in-process
on the same node."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid

import pytest

from conftest import BPF_BUILD
from lib import packets
from lib.cni_exec import REFERENCE_PLUGINS, SLUICE_PLUGIN, exec_plugin
from lib.netns import PREFIX, run, unique
from sluice import agent_protocol, netlink
from sluice.agent import Agent, AgentConfig, CniLocks
from sluice.cni import ops, podnet, spec
from sluice.cni.errors import CniError
from sluice.datapath import Datapath
from sluice.ipam import Ipam
from sluice.maps import EndpointsMap
from sluice.state import DesiredState

pytestmark = pytest.mark.kernel

NETWORK = "sluice-test"
MTU = 1450
REDIRECT_PEER = ("tc_from_pod", "redirect_peer")  # a key of Datapath.metrics()


# ---- fixtures ------------------------------------------------------------------------------

class Pods:
    """Pod namespaces and the node-side veths ADD makes for them; all deleted at the end."""

    def __init__(self):
        self.namespaces: list[str] = []
        self.attachments: set[tuple[str, str]] = set()

    def netns(self, tag: str = "pod") -> str:
        name = unique(tag)
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        return f"/run/netns/{name}"

    def container_id(self, tag: str = "pod", ifname: str = "eth0") -> str:
        cid = f"{PREFIX}{tag}-{uuid.uuid4().hex[:12]}"
        self.attachments.add((cid, ifname))
        return cid

    def pod(self, tag: str = "pod") -> tuple[str, str]:
        """(container ID, netns path) of a new pod."""
        return self.container_id(tag), self.netns(tag)

    def cleanup(self) -> None:
        for cid, ifname in self.attachments:
            netlink.delete_link(podnet.host_ifname(cid, ifname))
        for name in self.namespaces:
            run("ip", "netns", "del", name, check=False)


@pytest.fixture
def pods():
    p = Pods()
    try:
        yield p
    finally:
        p.cleanup()


def pod_cidr(prefixlen: int = 24) -> str:
    # Random, so node routes of concurrent runs do not collide.
    return f"10.213.{random.randrange(256)}.0/{prefixlen}"


@pytest.fixture
def node(datapath, tmp_path):
    return ops.NodeContext(datapath=datapath, ipam=Ipam(str(tmp_path / "ipam"), pod_cidr()), mtu=MTU)


@pytest.fixture
def sluice_agent(node, tmp_path):
    """The real agent serving `node` (its datapath, IPAM directory and MTU) on a socket, from this process.
    It is given the node state a reconcile would leave it with: a reconcile also attaches the NIC and
    cgroup hooks, and this node is the test process's netns (tests/lib/cni_node.py runs the agent process
    on a node netns of its own)."""
    directory = tempfile.mkdtemp(prefix="slcni-")  # short: a socket path has at most 107 bytes
    agent = Agent(AgentConfig(pin_root=node.datapath.root, obj_dir=node.datapath.obj_dir,
                              socket=os.path.join(directory, "agent.sock"), metrics_address="",
                              ipam_dir=str(tmp_path / "ipam"), mtu=MTU))
    agent.state = DesiredState.parse({"node": {"name": "sltest", "ip": "192.0.2.1", "nic": "lo",
                                               "pod_cidr": str(node.ipam.network)}})
    agent.health["ready"] = True
    try:
        with contextlib.closing(agent):
            agent.serve_socket()
            yield agent
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def agent(sluice_agent):
    """The agent's socket."""
    return sluice_agent.config.socket


@pytest.fixture(scope="session")
def cni_bin(tmp_path_factory):
    """A CNI_PATH: the plugin as `sluice` plus the reference plugins the conflist chains."""
    directory = tmp_path_factory.mktemp("cni-bin")
    (directory / "sluice").symlink_to(SLUICE_PLUGIN)
    for name in ("tuning", "bandwidth"):
        (directory / name).symlink_to(os.path.join(REFERENCE_PLUGINS, name))
    return str(directory)


# ---- helpers -------------------------------------------------------------------------------

def config(agent_socket: str | None = None, version: str = "1.1.0", **extra) -> dict:
    conf = {"cniVersion": version, "name": NETWORK, "type": "sluice", **extra}
    if agent_socket:
        conf["agentSocket"] = agent_socket
    return conf


def handle(node, command: str, cid: str = "", netns: str = "", ifname: str = "eth0", conf: dict | None = None):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname}
    return ops.handle(command, env, json.dumps(conf or config()), node)


def ns_run(netns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return run("nsenter", f"--net={netns}", *argv, **kw)


def pod_address(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def endpoints(node) -> dict:
    with node.datapath.open_map(EndpointsMap) as m:
        return m.items()


def assert_gone(node, cid: str, ifname: str = "eth0", address: str | None = None, agent: str | None = None) -> None:
    """Nothing of the attachment left. A DEL answers with the address free and the endpoint entry and node route
    gone; `agent`: the socket of the agent that answered it, whose veth deletion (after the answer) a second
    DEL waits for."""
    assert node.ipam.lookup(cid, ifname) is None, "the address is still allocated"
    if address:
        assert address not in endpoints(node), f"endpoint {address} is still in the map"
        assert podnet.host_route_oif(address) is None, f"node route to {address} remains"
    if agent:
        assert exec_plugin(SLUICE_PLUGIN, "DEL", config(agent), cid, "", omit=("CNI_NETNS",), ifname=ifname) \
            == (0, None)
    host = podnet.host_ifname(cid, ifname)
    assert not netlink.exists(host), f"{host} still exists"
    assert not os.path.exists(os.path.join(node.datapath.links_dir, host)), f"link pins of {host} remain"


# ---- VERSION and start-up ----------------------------------------------------------------

def test_version_is_answered_without_agent(cni_bin):
    status, out = exec_plugin(os.path.join(cni_bin, "sluice"), "VERSION", "", cni_path=cni_bin)
    assert (status, out) == (0, spec.version_info())


def test_the_plugin_is_built_from_the_protocol_in_force():
    """The plugin's constants (socket, timeout, versions, error texts) are agent_protocol's as they are now:
    `make artifacts` regenerates its header whenever agent_protocol.py, spec.py or errors.py change."""
    with open(os.path.join(os.path.dirname(SLUICE_PLUGIN), "protocol.h")) as f:
        assert f.read() == agent_protocol.c_header()
    assert os.path.getmtime(SLUICE_PLUGIN) >= os.path.getmtime(os.path.join(os.path.dirname(SLUICE_PLUGIN),
                                                                            "protocol.h"))


# ---- ADD, traffic, CHECK, DEL ------------------------------------------------------------------

def test_two_pods_get_addresses_and_talk_through_redirect_peer(node, agent, pods, cni_bin, tmp_path):
    plugin = os.path.join(cni_bin, "sluice")
    results = {}
    for tag in ("a", "b"):
        cid, netns = pods.pod(tag)
        status, result = exec_plugin(plugin, "ADD", config(agent), cid, netns, cni_path=cni_bin)
        assert status == 0, result
        results[tag] = (netns, result)
        host = podnet.host_ifname(cid, "eth0")
        host_iface, pod_iface = result["interfaces"]
        assert host_iface == {"name": host, "mac": podnet.host_link(host).mac}
        pod_link = json.loads(ns_run(netns, "ip", "-j", "link", "show", "eth0").stdout)[0]
        assert pod_iface == {"name": "eth0", "mac": pod_link["address"], "sandbox": netns, "mtu": MTU}
        assert pod_link["mtu"] == MTU and podnet.host_link(host).mtu == MTU
        gateway = str(node.ipam.gateway)
        assert result["ips"] == [{"address": f"{node.ipam.lookup(cid, 'eth0')}/32", "gateway": gateway,
                                  "interface": 1}]
        assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": gateway}]
        assert result["cniVersion"] == "1.1.0"

    (ns_a, res_a), (ns_b, res_b) = results["a"], results["b"]
    ip_a, ip_b = pod_address(res_a), pod_address(res_b)
    assert ip_a != ip_b
    before = node.datapath.metrics().get(REDIRECT_PEER, (0, 0))[0]

    assert len(packets.echo(ns_a, ip_b)) == 3
    assert len(packets.echo(ns_b, ip_a)) == 3

    payload, received = os.urandom(1 << 20), tmp_path / "received"
    server = subprocess.Popen(["nsenter", f"--net={ns_b}", "socat", "-u", f"TCP-LISTEN:5001,bind={ip_b}",
                               f"CREATE:{received}"], stderr=subprocess.PIPE)
    try:
        subprocess.run(["nsenter", f"--net={ns_a}", "socat", "-u", "STDIN", f"TCP:{ip_b}:5001,retry=100,interval=0.05"],
                       input=payload, check=True, capture_output=True, timeout=30)
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        server.kill()
        server.wait()
    assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(payload).digest()

    redirected = node.datapath.metrics().get(REDIRECT_PEER, (0, 0))[0] - before
    assert redirected >= 12 + 20, f"only {redirected} packets went through bpf_redirect_peer"


def test_netlink_reads_links_addresses_and_routes_as_iproute2_shows_them(node, pods):
    """sluice.netlink.Rtnl, which the CNI commands use, against `ip -j` on the node and in a pod after an ADD."""
    cid, netns = pods.pod("rtnl")
    handle(node, "ADD", cid, netns)
    host = podnet.host_ifname(cid, "eth0")
    with podnet.Sockets(netns) as nl:
        for where, sock, name in (("node", nl.host, host), ("pod", nl.pod, "eth0"), ("pod", nl.pod, "lo")):
            shown = json.loads((ns_run(netns, "ip", "-d", "-j", "link", "show", name) if where == "pod"
                                else run("ip", "-d", "-j", "link", "show", name)).stdout)[0]
            link = sock.link(name)
            assert (link.name, link.index, link.mac, link.mtu, bool(link.flags & 1)) == \
                (shown["ifname"], shown["ifindex"], shown["address"], shown["mtu"], "UP" in shown["flags"]), name
            assert link.kind == shown.get("linkinfo", {}).get("info_kind"), name
            if link.kind == "veth":
                assert link.peer_index == shown["link_index"]
        assert {link.name for link in nl.pod.links()} == {"lo", "eth0"}
        assert nl.host.link("sl-no-such-link") is None and nl.pod.delete_link("sl-no-such-link") is False
        eth0 = nl.pod.link("eth0")
        shown = json.loads(ns_run(netns, "ip", "-j", "-4", "addr", "show", "eth0").stdout)[0]["addr_info"]
        assert nl.pod.addrs(eth0.index) == [f"{a['local']}/{a['prefixlen']}" for a in shown]
        # (on the node, only the routes through this pod's veth: other tests may change the others meanwhile)
        for sock, argv, dev in ((nl.pod, ("nsenter", f"--net={netns}"), None), (nl.host, (), host)):
            shown = json.loads(run(*argv, "ip", "-j", "-4", "route", "show", "table", "all").stdout)
            mine = {(f"{r.dst}/{r.dst_len}", r.gateway, r.table) for r in sock.routes()}
            assert dev is None or any(route.get("dev") == dev for route in shown)
            for route in (r for r in shown if dev is None or r.get("dev") == dev):
                dst = route["dst"] if "/" in route["dst"] else f"{route['dst']}/32"
                dst = "0.0.0.0/0" if route["dst"] == "default" else dst
                table = {"main": 254, "local": 255}.get(route.get("table", "main"), route.get("table"))
                assert (dst, route.get("gateway"), table) in mine, route


def test_repeated_add_returns_the_same_attachment(node, pods):
    cid, netns = pods.pod()
    first = handle(node, "ADD", cid, netns)
    again = handle(node, "ADD", cid, netns)
    assert again == first
    assert len(node.ipam.allocations()) == 1
    handle(node, "CHECK", cid, netns, conf=config(prevResult=first))


def test_runtime_requested_address_through_the_ips_capability(node, pods):
    wanted = str(node.ipam.network.ip + 10)
    cid, netns = pods.pod()
    result = handle(node, "ADD", cid, netns, conf=config(runtimeConfig={"ips": [f"{wanted}/24"]}))
    assert pod_address(result) == wanted and wanted in endpoints(node)
    handle(node, "CHECK", cid, netns, conf=config(prevResult=result))

    other, other_netns = pods.pod()
    with pytest.raises(CniError) as failure:
        handle(node, "ADD", other, other_netns, conf=config(runtimeConfig={"ips": [wanted]}))
    assert failure.value.code == 100 and f"requested address {wanted} is already allocated" in failure.value.msg
    assert not netlink.exists(podnet.host_ifname(other, "eth0"))
    with pytest.raises(CniError) as failure:
        handle(node, "ADD", other, other_netns, conf=config(runtimeConfig={"ips": ["10.1.1.1", "10.1.1.2"]}))
    assert failure.value.code == 7 and "asks for 2 IPv4 addresses (10.1.1.1, 10.1.1.2)" in failure.value.msg


def test_network_configuration_mtu_wins_over_the_nodes(node, pods):
    cid, netns = pods.pod()
    result = handle(node, "ADD", cid, netns, conf=config(mtu=1400))
    assert result["interfaces"][1]["mtu"] == 1400
    assert podnet.host_link(podnet.host_ifname(cid, "eth0")).mtu == 1400
    other, other_netns = pods.pod()
    assert handle(node, "ADD", other, other_netns)["interfaces"][1]["mtu"] == MTU
    with pytest.raises(CniError) as failure:
        handle(node, "ADD", *pods.pod(), conf=config(mtu=40))
    assert failure.value.code == 7 and "mtu 40 is not an integer in 68..65535" in failure.value.msg


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_add_result_follows_the_configured_version(node, pods, version):
    cid, netns = pods.pod()
    result = handle(node, "ADD", cid, netns, conf=config(version=version))
    assert result["cniVersion"] == version
    assert "mtu" not in result["interfaces"][1]
    assert ("version" in result["ips"][0]) == (version == "0.4.0")


def test_check_passes_then_names_the_missing_host_interface(node, agent, pods, cni_bin):
    plugin = os.path.join(cni_bin, "sluice")
    cid, netns = pods.pod()
    result = handle(node, "ADD", cid, netns)
    assert exec_plugin(plugin, "CHECK", config(agent, prevResult=result), cid, netns) == (0, None)

    status, error = exec_plugin(plugin, "CHECK", config(agent), cid, netns)
    assert status == 1 and error["code"] == 7 and "prevResult" in error["msg"]

    host = podnet.host_ifname(cid, "eth0")
    run("ip", "link", "del", host)
    status, error = exec_plugin(plugin, "CHECK", config(agent, prevResult=result), cid, netns)
    assert status == 1
    assert error == {"cniVersion": "1.1.0", "code": 102,
                     "msg": f"host interface {host} for container {cid} is missing"}


def test_check_names_a_missing_endpoint_and_a_wrong_address(node, pods):
    cid, netns = pods.pod()
    result = handle(node, "ADD", cid, netns)
    address = pod_address(result)
    wrong = json.loads(json.dumps(result))
    wrong["ips"][0]["address"] = "10.213.255.254/32"
    with pytest.raises(CniError, match=r"interface eth0 in .* lacks address 10.213.255.254/32"):
        handle(node, "CHECK", cid, netns, conf=config(prevResult=wrong))
    with node.datapath.open_map(EndpointsMap) as m:
        m.delete(address)
    with pytest.raises(CniError, match=f"the endpoints map has no entry for {address}"):
        handle(node, "CHECK", cid, netns, conf=config(prevResult=result))


def test_del_leaves_nothing_and_can_be_repeated(node, agent, pods, cni_bin):
    plugin = os.path.join(cni_bin, "sluice")
    cid, netns = pods.pod()
    address = pod_address(handle(node, "ADD", cid, netns))
    host = podnet.host_ifname(cid, "eth0")
    assert node.datapath.tc_attached(host, "tc_from_pod")
    assert address in endpoints(node)

    assert exec_plugin(plugin, "DEL", config(agent), cid, netns) == (0, None)
    assert_gone(node, cid, address=address, agent=agent)
    assert run("nsenter", f"--net={netns}", "ip", "link", "show", "eth0", check=False).returncode != 0
    assert exec_plugin(plugin, "DEL", config(agent), cid, netns) == (0, None)


def test_an_add_right_after_a_del_of_the_same_attachment_gets_a_whole_pod(node, agent, pods, cni_bin):
    """The DEL answers before its veth is gone; the attachment's next command waits for that (CniLocks), so a
    new ADD is not hit by the old veth's deletion (same names) and keeps its tc program."""
    plugin = os.path.join(cni_bin, "sluice")
    cid, netns = pods.pod()
    host = podnet.host_ifname(cid, "eth0")
    for _round in range(5):
        status, result = exec_plugin(plugin, "ADD", config(agent), cid, netns)
        assert status == 0, result
        assert exec_plugin(plugin, "DEL", config(agent), cid, netns) == (0, None)
        status, result = exec_plugin(plugin, "ADD", config(agent), cid, netns)
        assert status == 0, result
        # CHECK waits for anything still under way on the attachment, then looks at all of it.
        assert exec_plugin(plugin, "CHECK", config(agent, prevResult=result), cid, netns) == (0, None)
        assert node.datapath.tc_attached(host, "tc_from_pod")
        assert exec_plugin(plugin, "DEL", config(agent), cid, netns) == (0, None)


def test_del_after_the_netns_is_gone(node, agent, pods, cni_bin):
    plugin = os.path.join(cni_bin, "sluice")
    cid, netns = pods.pod()
    address = pod_address(handle(node, "ADD", cid, netns))
    run("ip", "netns", "del", os.path.basename(netns))

    assert exec_plugin(plugin, "DEL", config(agent), cid, netns) == (0, None)
    assert_gone(node, cid, address=address, agent=agent)


def test_50_concurrent_adds_get_distinct_addresses(node, agent, pods):
    conf = json.dumps(config(agent))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0",
           "CNI_PATH": REFERENCE_PLUGINS}
    procs = []
    for _attempt in range(50):
        cid, netns = pods.pod("c")
        procs.append(subprocess.Popen([SLUICE_PLUGIN], env={**env, "CNI_CONTAINERID": cid, "CNI_NETNS": netns},
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:  # all running before any gets its config, like a burst of pod starts
        proc.stdin.write(conf.encode())
        proc.stdin.close()
    results = []
    for proc in procs:
        out, err = proc.stdout.read(), proc.stderr.read()
        assert proc.wait(timeout=120) == 0, (out, err)
        results.append(json.loads(out))
    addresses = {pod_address(r) for r in results}
    assert len(addresses) == 50
    assert addresses <= set(endpoints(node))
    assert {str(a) for a in node.ipam.allocations()} == addresses


# ---- the agent's locks (CniLocks) ----------------------------------------------------------

def test_work_left_after_an_answer_holds_its_attachment_gc_and_stop(caplog):
    locks = CniLocks()
    release, started = threading.Event(), threading.Event()
    entered = []

    def later():
        started.set()
        release.wait(10)

    with locks.command(("c1", "eth0"), "CNI DEL of eth0 for container c1") as after_answer:
        after_answer(later)
    assert started.wait(5)

    def enter(name, context):
        with context:
            entered.append(name)

    threads = [threading.Thread(target=enter, args=(name, context)) for name, context in (
        ("same attachment", locks.command(("c1", "eth0"))),
        ("GC", locks.gc()),
    )]
    with locks.command(("c2", "eth0")):
        entered.append("other attachment")  # not held up
    for t in threads:
        t.start()
    assert not locks.wait_idle(0.3)
    assert entered == ["other attachment"]
    release.set()
    for t in threads:
        t.join(5)
    assert sorted(entered) == ["GC", "other attachment", "same attachment"]
    assert locks.wait_idle(1)

    def failing():
        raise OSError(16, "Device or resource busy")

    with locks.command(("c3", "eth0"), "CNI DEL of eth0 for container c3") as after_answer:
        after_answer(failing)
    assert locks.wait_idle(5)
    with locks.command(("c3", "eth0")):
        pass    # released after the failure
    assert "CNI DEL of eth0 for container c3: the work left after its answer failed" in caplog.text


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("stdin, code, named", [
    ("{not json", 6, "'{not json'"),
    ('{"a": 1} x', 6, "character 9"),
    ("[]", 6, "not a JSON object"),
    (b"{\xff}", 6, "not UTF-8"),
])
def test_plugin_rejects_what_is_no_configuration_itself(cni_bin, stdin, code, named):
    # Without a JSON object there is no agentSocket to ask: these requests never get that far.
    plugin = os.path.join(cni_bin, "sluice")
    proc = subprocess.run([plugin], input=stdin if isinstance(stdin, bytes) else stdin.encode(), capture_output=True,
                          env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "sltest-c", "CNI_NETNS": "/run/netns/x",
                               "CNI_IFNAME": "eth0", "CNI_PATH": cni_bin}, check=False)
    error = json.loads(proc.stdout)
    assert proc.returncode == 1 and not proc.stderr
    assert error["cniVersion"] == spec.CNI_VERSION and error["code"] == code and named in error["msg"], error


@pytest.mark.parametrize("stdin, omit, code, named", [
    (config(version="0.3.1"), (), 1, "0.3.1"),
    (config(), ("CNI_NETNS",), 4, "CNI_NETNS"),
    (config(), ("CNI_CONTAINERID",), 4, "CNI_CONTAINERID"),
    (config(agentSocket=["a"]), (), 11, "/run/sluice/agent.sock"),    # not a string: the default socket
])
def test_plugin_relays_the_agents_refusal(agent, cni_bin, stdin, omit, code, named):
    if "agentSocket" not in stdin:
        stdin = dict(stdin, agentSocket=agent)
    status, error = exec_plugin(os.path.join(cni_bin, "sluice"), "ADD", stdin, "sltest-c", "/run/netns/x", omit=omit)
    assert status == 1
    assert error["code"] == code and named in error["msg"], error
    assert error["cniVersion"] == (stdin["cniVersion"] if stdin["cniVersion"] in spec.SUPPORTED_VERSIONS
                                   else spec.CNI_VERSION)


def test_unknown_command_and_unreachable_agent(agent, cni_bin, tmp_path):
    plugin = os.path.join(cni_bin, "sluice")
    status, error = exec_plugin(plugin, "FROB", config(agent), "sltest-c", "/run/netns/x")
    assert (status, error["code"]) == (1, 4) and "FROB" in error["msg"]
    socket_path = str(tmp_path / "no-agent.sock")
    for command in ("ADD", "DEL", "CHECK", "GC", "FROB"):
        status, error = exec_plugin(plugin, command, config(socket_path), "sltest-c", "/run/netns/x")
        assert (status, error["code"]) == (1, 11), error
        assert error["msg"] == agent_protocol.UNREACHABLE.format(socket=socket_path,
                                                                 reason="No such file or directory")
    status, error = exec_plugin(plugin, "STATUS", config(socket_path))
    assert (status, error["code"]) == (1, 50) and socket_path in error["msg"]


@pytest.mark.parametrize("reply, code, message", [
    (b"", 11, agent_protocol.CLOSED.format(socket="{socket}")),
    (b"not json\n", 5, agent_protocol.UNREADABLE.format(socket="{socket}", reason="not a JSON object")),
    (b"[]\n", 5, agent_protocol.UNREADABLE.format(socket="{socket}", reason="not a JSON object")),
    (b'{"result": null}\n', 5, agent_protocol.UNREADABLE.format(socket="{socket}", reason='no "ok"')),
    (b'{"ok": false}\n', 5, agent_protocol.UNREADABLE.format(socket="{socket}", reason='an error without "output"')),
    (json.dumps({"ok": False, "error": {"code": 7, "msg": "as the agent said"},
                 "output": json.dumps({"cniVersion": "1.1.0", "code": 7, "msg": "as the agent said \u2603"})}).encode()
     + b"\n", 7, "as the agent said \u2603"),
])
def test_what_the_plugin_makes_of_an_agents_reply(cni_bin, reply, code, message):
    directory = tempfile.mkdtemp(prefix="slcni-")  # short: a socket path has at most 107 bytes
    path = os.path.join(directory, "agent.sock")

    def answer_once(server):
        conn, _address = server.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(reply)

    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen()
            thread = threading.Thread(target=answer_once, args=(server,))
            thread.start()
            status, error = exec_plugin(os.path.join(cni_bin, "sluice"), "ADD", config(path), "sltest-c",
                                        "/run/netns/x")
            thread.join()
    finally:
        shutil.rmtree(directory)
    assert status == 1 and error["code"] == code and error["msg"] == message.replace("{socket}", path), error


@pytest.mark.parametrize("line, code, named", [
    (b"{not json\n", 6, "request is not JSON"),
    (b"\xff\n", 6, "request is not JSON"),
    (b"[]\n", 6, "request is not a JSON object"),
    (b'{"op": "frob"}\n', 4, "unknown request op 'frob'"),
])
def test_the_agent_answers_a_malformed_request_with_a_cni_error(agent, line, code, named):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(agent)
        sock.sendall(line)
        reply = json.loads(sock.makefile("rb").readline())
    assert reply == {"ok": False, "error": {"code": code, "msg": reply["error"]["msg"]}}
    assert named in reply["error"]["msg"]


@pytest.mark.parametrize("request_", [
    {"op": "cni", "command": "ADD", "env": ["CNI_CONTAINERID"], "stdin": json.dumps(config())},
    {"op": "cni", "command": "DEL", "env": {"CNI_CONTAINERID": ["c"], "CNI_IFNAME": {}}, "stdin": json.dumps(config())},
    {"op": "cni", "command": ["GC"], "env": {}, "stdin": 7},
])
def test_the_agent_answers_a_cni_request_of_the_wrong_shape(agent, request_):
    """Whatever a client puts in a "cni" request, it gets an error result to print, not a closed socket."""
    reply = agent_protocol.request(agent, request_, timeout=30)
    assert reply["ok"] is False and reply["error"]["code"] in (4, 6, 999), reply
    assert json.loads(reply["output"])["code"] == reply["error"]["code"]


def test_missing_netns_is_an_unknown_container(node, agent, pods, cni_bin):
    cid = pods.container_id()
    netns = f"/run/netns/{PREFIX}absent-{uuid.uuid4().hex[:6]}"
    status, error = exec_plugin(os.path.join(cni_bin, "sluice"), "ADD", config(agent), cid, netns)
    assert status == 1
    assert error["code"] == 3 and netns in error["msg"], error
    assert node.ipam.allocations() == {}


def test_exhausted_pool_names_the_cidr_and_rolls_back(datapath, tmp_path, pods):
    cidr = pod_cidr(29)  # network, gateway, broadcast and 5 pod addresses
    node = ops.NodeContext(datapath=datapath, ipam=Ipam(str(tmp_path / "ipam"), cidr), mtu=MTU)
    netns = pods.netns()
    for i in range(5):
        handle(node, "ADD", pods.container_id(ifname=f"eth{i}"), netns, f"eth{i}")
    cid = pods.container_id(ifname="eth5")
    with pytest.raises(CniError) as failure:
        handle(node, "ADD", cid, netns, "eth5")
    assert failure.value.code == 100 and cidr in failure.value.msg, failure.value
    assert not netlink.exists(podnet.host_ifname(cid, "eth5"))
    assert len(node.ipam.allocations()) == 5


def test_failed_add_rolls_back_what_it_did(tmp_path, pin_root, pods):
    # The datapath is not loaded: the veth and address come first, then attaching fails.
    node = ops.NodeContext(datapath=Datapath(root=pin_root, obj_dir=BPF_BUILD),
                           ipam=Ipam(str(tmp_path / "ipam"), pod_cidr()), mtu=MTU)
    cid, netns = pods.pod()
    host = podnet.host_ifname(cid, "eth0")
    with pytest.raises(CniError) as failure:
        handle(node, "ADD", cid, netns)
    assert failure.value.code == 101
    assert f"attaching tc_from_pod to {host} failed" in failure.value.msg and cid in failure.value.msg
    assert not netlink.exists(host)
    assert node.ipam.allocations() == {}
    assert run("nsenter", f"--net={netns}", "ip", "link", "show", "eth0", check=False).returncode != 0


def test_add_fails_cleanly_when_the_pod_interface_name_is_taken(node, pods):
    cid, netns = pods.pod()
    ns_run(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
    with pytest.raises(CniError, match=r"creating veth pair .* failed: File exists"):
        handle(node, "ADD", cid, netns)
    assert node.ipam.allocations() == {}
    assert not netlink.exists(podnet.host_ifname(cid, "eth0"))


# ---- GC and STATUS -------------------------------------------------------------------------

def test_gc_removes_attachments_not_listed(node, agent, pods, cni_bin):
    kept, kept_ns = pods.pod("keep")
    gone, gone_ns = pods.pod("gone")
    kept_result = handle(node, "ADD", kept, kept_ns)
    gone_address = pod_address(handle(node, "ADD", gone, gone_ns))
    orphan = "sl" + uuid.uuid4().hex[:11]  # a node-side veth whose ADD never finished
    run("ip", "link", "add", orphan, "type", "veth", "peer", "name", "sl" + uuid.uuid4().hex[:12])
    try:
        valid = [{"containerID": kept, "ifname": "eth0"}]
        conf = config(agent, **{"cni.dev/valid-attachments": valid})
        assert exec_plugin(os.path.join(cni_bin, "sluice"), "GC", conf) == (0, None)
        assert_gone(node, gone, address=gone_address)
        assert not netlink.exists(orphan)
        handle(node, "CHECK", kept, kept_ns, conf=config(prevResult=kept_result))
    finally:
        netlink.delete_link(orphan)

    with pytest.raises(CniError, match="cni.dev/valid-attachments") as failure:
        handle(node, "GC")
    assert failure.value.code == 7


def test_status(sluice_agent, agent, cni_bin):
    assert exec_plugin(os.path.join(cni_bin, "sluice"), "STATUS", config(agent)) == (0, None)
    sluice_agent.health["ready"] = False
    status, error = exec_plugin(os.path.join(cni_bin, "sluice"), "STATUS", config(agent))
    assert status == 1 and error["code"] == 50 and "not applied" in error["msg"]
    status, error = exec_plugin(os.path.join(cni_bin, "sluice"), "STATUS", config(agent, version="1.0.0"))
    assert status == 1 and error["code"] == 1


# ---- a conflist with the reference plugins --------------------------------------------------

def run_chain(cni_bin: str, command: str, conflist: dict, cid: str, netns: str, prev: dict | None = None):
    """What libcni does for a conflist: each plugin gets name, cniVersion and the previous
    result; DEL runs the list backwards."""
    plugins = conflist["plugins"][::-1] if command == "DEL" else conflist["plugins"]
    for plugin in plugins:
        conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        if prev is not None:
            conf["prevResult"] = prev
        status, out = exec_plugin(os.path.join(cni_bin, plugin["type"]), command, conf, cid, netns,
                                  cni_path=cni_bin)
        assert status == 0, (plugin["type"], out)
        if command == "ADD":
            prev = out
    return prev


def test_conflist_with_tuning_and_bandwidth(node, agent, pods, cni_bin):
    conflist = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [
        {"type": "sluice", "agentSocket": agent},
        {"type": "tuning", "sysctl": {"net.core.somaxconn": "1234"}},
        {"type": "bandwidth", "ingressRate": 100_000_000, "ingressBurst": 1_000_000},
    ]}
    cid, netns = pods.pod()
    host = podnet.host_ifname(cid, "eth0")
    result = run_chain(cni_bin, "ADD", conflist, cid, netns)
    assert result["cniVersion"] == "1.0.0"
    assert result["interfaces"][0]["name"] == host
    assert ns_run(netns, "sysctl", "-n", "net.core.somaxconn").stdout.strip() == "1234"
    assert "tbf" in run("tc", "qdisc", "show", "dev", host).stdout

    run_chain(cni_bin, "CHECK", conflist, cid, netns, prev=result)
    run_chain(cni_bin, "DEL", conflist, cid, netns, prev=result)
    assert_gone(node, cid, address=pod_address(result), agent=agent)
