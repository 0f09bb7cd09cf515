"""Security: the bpffs pin root and the agent's socket are root-only, the metrics endpoint listens only
on its configured address (loopback by default), and no user-supplied value can reach a shell: the code
runs argv lists only and the Ansible content uses no shell task.

(tests/runtime/test_agent.py::test_socket_is_root_only checks the modes of a running agent's socket.)"""

from __future__ import annotations

import ast
import contextlib
import errno
import glob
import os
import shutil
import socket
import stat
import subprocess
import tempfile

import pytest
import yaml

from conftest import BPF_BUILD, ROOT
from lib import netns
from lib.cgroup import cgroup
from sluice.agent import Agent, AgentConfig
from sluice.agent_protocol import request
from sluice.datapath import Datapath

pytestmark = pytest.mark.kernel

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable and executable by nobody (the venv's lives under /root)


# ---- bpffs ---------------------------------------------------------------------------------------

def test_pin_root_is_root_only_and_so_is_everything_in_it(pin_root):
    root = pin_root
    os.chmod(root, 0o755)  # left open by someone: the load closes it
    dp = Datapath(root, BPF_BUILD)
    with netns.namespaces("sec") as (ns,), cgroup() as cg:
        netns.ns_exec(ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        try:
            dp.load()
            with netns.entered(ns):
                dp.attach_nic("sleth0", "generic")
            dp.attach_cgroup(cg.path)
            dp.attach_sockmap()
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
            modes = {}
            for directory, _dirs, names in os.walk(root):
                modes[directory] = stat.S_IMODE(os.stat(directory).st_mode)
                for name in names:
                    modes[os.path.join(directory, name)] = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            assert any("/links/sleth0/" in path for path in modes) and any("/maps/" in path for path in modes)
            open_to_others = {path: oct(mode) for path, mode in modes.items() if mode & 0o077}
            assert not open_to_others, f"group/other bits under the pin root: {open_to_others}"
        finally:
            dp.remove()


def test_default_pin_root_is_under_the_bpffs():
    assert Datapath().root == "/sys/fs/bpf/sluice"


# ---- the agent's socket ----------------------------------------------------------------------------

def connect_as_nobody(path: str) -> int:
    """errno of connect() to the Unix socket at `path` by uid/gid nobody (0: connected)."""
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
            "except OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n")
    proc = subprocess.run([SYSTEM_PYTHON, "-c", code, path], user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True, check=True, timeout=30)
    return int(proc.stdout)


def test_agent_socket_is_root_only():
    assert AgentConfig().socket == "/run/sluice/agent.sock"
    top = tempfile.mkdtemp(prefix="slsec-")
    try:
        os.chmod(top, 0o755)  # nobody may reach run/, so what stops it is Sluice's own modes
        run_dir = os.path.join(top, "run")
        os.makedirs(run_dir, mode=0o755)
        os.chmod(run_dir, 0o755)  # a socket directory someone left open: the agent closes it
        path = os.path.join(run_dir, "agent.sock")
        with contextlib.closing(Agent(AgentConfig(socket=path, metrics_address=""))) as agent:
            agent.serve_socket()
            assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert connect_as_nobody(path) == errno.EACCES
            os.chmod(run_dir, 0o755)  # even with the directory open, the socket itself refuses nobody
            assert connect_as_nobody(path) == errno.EACCES
            assert request(path, {"op": "health"}, timeout=30)["ok"] is True  # root gets in
    finally:
        shutil.rmtree(top)


# ---- metrics -------------------------------------------------------------------------------------

def refused(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((address, port)) == errno.ECONNREFUSED


@pytest.mark.parametrize("configured, bound", [
    (None, ("127.0.0.1", 9962)),             # the default
    (":9963", ("127.0.0.1", 9963)),          # a port alone: still loopback
    ("192.168.96.1:9964", ("192.168.96.1", 9964)),
], ids=["default", "port-only", "configured"])
def test_metrics_listen_only_on_the_configured_address(configured, bound):
    assert AgentConfig().metrics_address == "127.0.0.1:9962"
    config = AgentConfig() if configured is None else AgentConfig(metrics_address=configured)
    with netns.namespaces("metrics") as (ns,):
        netns.ns_exec(ns, "ip", "link", "add", "sleth0", "type", "veth", "peer", "name", "sleth1")
        netns.ns_exec(ns, "ip", "addr", "add", "192.168.96.1/24", "dev", "sleth0")
        netns.ns_exec(ns, "ip", "link", "set", "sleth0", "up")
        netns.ns_exec(ns, "ip", "link", "set", "sleth1", "up")
        with netns.entered(ns), contextlib.closing(Agent(config)) as agent:
            agent.serve_metrics()
            (server,) = agent._servers  # pylint: disable=protected-access
            assert server.socket.getsockname() == bound
            with socket.create_connection(bound, timeout=5):
                pass
            other = "192.168.96.1" if bound[0] == "127.0.0.1" else "127.0.0.1"
            assert refused(other, bound[1]), f"metrics answer on {other} too"


def test_metrics_off_when_the_address_is_empty():
    agent = Agent(AgentConfig(metrics_address=""))
    agent.serve_metrics()
    assert agent._servers == []  # pylint: disable=protected-access


def test_agent_role_default_metrics_address_is_loopback():
    with open(os.path.join(ROOT, "roles", "agent", "defaults", "main.yml")) as f:
        defaults = yaml.safe_load(f)
    host = defaults["agent_metrics_address"].rpartition(":")[0]
    assert host in ("127.0.0.1", "[::1]", "localhost"), defaults["agent_metrics_address"]


# ---- no shell ----------------------------------------------------------------------------------------

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("asyncio", "create_subprocess_shell")}
ARGV_CALLS = {"run", "Popen", "call", "check_call", "check_output"}  # of subprocess; and AnsibleModule.run_command


def python_files() -> list[str]:
    files = []
    for top in ("src/sluice", "plugins", "lab"):
        files += glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)
    assert len(files) > 20
    return sorted(files)


def _is_text(node: ast.AST) -> bool:
    """A command given as one string (a literal, an f-string, or built with + or %)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.BinOp) and (_is_text(node.left) or _is_text(node.right))


def shell_uses(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{os.path.relpath(path, ROOT)}:{node.lineno}"
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if (owner, name) in SHELL_CALLS:
            found.append(f"{where}: {owner}.{name}()")
        for kw in node.keywords:
            if kw.arg in ("shell", "use_unsafe_shell") and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{where}: {name}(..., {kw.arg}={ast.unparse(kw.value)})")
        argv_call = owner == "subprocess" and name in ARGV_CALLS or name == "run_command"
        if argv_call and node.args and _is_text(node.args[0]):
            found.append(f"{where}: {name}({ast.unparse(node.args[0])}) is a command line, not an argv list")
    return found


def test_no_shell_in_the_code():
    found = [use for path in python_files() for use in shell_uses(path)]
    assert not found, "a shell could see user-supplied values:\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nos.system('ls ' + d)\nsubprocess.run(cmd, shell=True, check=False)\n"
                   "os.popen(x)\nsubprocess.run(f'ip link del {dev}', check=True)\n"
                   "module.run_command(argv, use_unsafe_shell=True)\nsubprocess.run(['ip'], shell=False, check=True)\n")
    found = shell_uses(str(bad))
    assert len(found) == 5, found


SHELL_MODULES = {"shell", "raw", "script"}


def _tasks(items):
    """Every task in a list of tasks or plays, into blocks, rescue/always and handlers."""
    for item in items or []:
        if not isinstance(item, dict):
            continue
        nested = [item.get(key) for key in ("block", "rescue", "always", "tasks", "pre_tasks", "post_tasks",
                                            "handlers")]
        if any(nested):
            for inner in nested:
                yield from _tasks(inner)
        else:
            yield item


def ansible_files() -> list[str]:
    files = glob.glob(os.path.join(ROOT, "playbooks", "**", "*.yml"), recursive=True)
    for part in ("tasks", "handlers"):
        files += glob.glob(os.path.join(ROOT, "roles", "*", part, "*.yml"))
    return sorted(files)


@pytest.mark.parametrize("path", ansible_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_shell_task(path):
    with open(path) as f:
        content = yaml.safe_load(f)
    found = []
    for task in _tasks(content if isinstance(content, list) else []):
        for key in task:
            if key.rpartition(".")[2] in SHELL_MODULES and (key.count(".") == 0 or key.startswith("ansible.")):
                found.append(f"{task.get('name', '(unnamed)')}: {key}")
    assert not found, f"{os.path.relpath(path, ROOT)} runs tasks through a shell: {found}"
