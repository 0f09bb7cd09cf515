"""What every benchmark section shares: namespaces and processes that are
always cleaned up, commands pinned to a CPU, and the statistics the report uses
(medians, percentiles, spreads and ratios, never a lone absolute time)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid

from . import ROOT
from lib import netns

BPF_BUILD = os.path.join(ROOT, "build", "bpf")
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
BPFFS = "/sys/fs/bpf"
PREFIX = netns.PREFIX            # "slbench-"
CPU = 0                          # both ends of every latency measurement run here (PLATFORM.md)


class Skipped(Exception):
    """A section that cannot be measured here (reported as "not measured")."""


# ---- everything this run created, for the last-resort cleanup ------------------------------

_namespaces: set[str] = set()
_processes: dict[int, subprocess.Popen] = {}
_pin_roots: set[str] = set()


def _sweep() -> None:
    """Kill what this run started (by pid) and delete what it created; idempotent."""
    for pid, proc in list(_processes.items()):
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        _processes.pop(pid, None)
    for root in list(_pin_roots):
        _remove_pin_root(root)
    for ns in list(_namespaces):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        _namespaces.discard(ns)


def _remove_pin_root(root: str) -> None:
    from sluice.datapath import Datapath

    with contextlib.suppress(Exception):
        Datapath(root, BPF_BUILD).remove()
    shutil.rmtree(root, ignore_errors=True)
    _pin_roots.discard(root)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    import atexit

    atexit.register(_sweep)


@contextlib.contextmanager
def namespaces(*tags: str):
    """slbench-<tag>-<random> namespaces with lo up, deleted on exit (tests/lib/netns)."""
    with netns.namespaces(*tags) as names:
        _namespaces.update(names)
        try:
            yield names
        finally:
            _namespaces.difference_update(names)


def add_namespace(tag: str) -> str:
    """One more namespace, tracked for cleanup; delete it with del_namespace."""
    name = netns.unique(tag)
    netns.run("ip", "netns", "add", name)
    _namespaces.add(name)
    return name


def del_namespace(name: str) -> None:
    netns.run("ip", "netns", "del", name, check=False)
    _namespaces.discard(name)


@contextlib.contextmanager
def pin_root():
    """A private bpffs directory for one datapath; detached and removed on exit."""
    from sluice.datapath import ensure_bpffs

    ensure_bpffs(BPFFS)
    path = os.path.join(BPFFS, f"{PREFIX}{uuid.uuid4().hex[:8]}")
    os.makedirs(path, mode=0o700)
    _pin_roots.add(path)
    try:
        yield path
    finally:
        _remove_pin_root(path)


# ---- commands ------------------------------------------------------------------------------

def sh(ns: str | None, *argv: str, cpu: int | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(ns, argv, cpu), check=check, text=True, capture_output=True, **kw)


def _argv(ns: str | None, argv, cpu: int | None) -> list[str]:
    out = list(map(str, argv))
    if cpu is not None:
        out = ["taskset", "-c", str(cpu), *out]
    if ns:
        out = ["nsenter", f"--net=/run/netns/{ns}", *out]
    return out


def spawn(ns: str | None, *argv: str, cpu: int | None = None, **kw) -> subprocess.Popen:
    """A background process in a process group of its own (trafgen forks workers),
    tracked so that group is killed, by its id, if the run is interrupted."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    proc = subprocess.Popen(_argv(ns, argv, cpu), text=True, start_new_session=True, **kw)
    _processes[proc.pid] = proc
    return proc


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group spawn() created for `proc` (its id is proc.pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5) -> str:
    """Signal a process we started and whatever it forked, reap it, return what it printed."""
    _signal_group(proc, sig)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        out = proc.communicate()[0]
    _signal_group(proc, signal.SIGKILL)     # workers that ignored `sig`
    _processes.pop(proc.pid, None)
    return out or ""


@contextlib.contextmanager
def running(ns: str | None, *argv: str, cpu: int | None = None, ready: float = 0.3, **kw):
    proc = spawn(ns, *argv, cpu=cpu, **kw)
    try:
        time.sleep(ready)
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        yield proc
    finally:
        stop(proc)


def sysctl(ns: str, values: dict) -> None:
    for key, value in values.items():
        sh(ns, "sysctl", "-qw", f"{key}={value}")


def iptables_restore(ns: str, rules: str, noflush: bool = False, timeout: float = 600) -> float:
    """Load `rules` with iptables-restore inside `ns`; seconds it took."""
    argv = ["iptables-restore"] + (["--noflush"] if noflush else [])
    t0 = time.perf_counter()
    sh(ns, *argv, input=rules, timeout=timeout)
    return time.perf_counter() - t0


# ---- statistics ----------------------------------------------------------------------------

def percentile(values, p: float) -> float:
    """Linear-interpolated percentile (p in 0..100)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values) -> dict:
    """Median and spread of repeated measurements of one quantity."""
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "p25": percentile(xs, 25), "p75": percentile(xs, 75)}


def ratio(a, b) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b


def paired_ratios(num: list[float], den: list[float]) -> dict:
    """Ratios of measurements taken in the same round (interleaved), summarised."""
    return summary([a / b for a, b in zip(num, den) if b])


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def fmt_spread(s: dict, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)}{unit} [{f.format(s['min'] * scale)}–{f.format(s['max'] * scale)}]"


def target(name: str, measured: float | None, limit: float, detail: str = "", below: bool = True) -> dict:
    """A target from the issue: met when measured <= limit (or >= when below=False)."""
    if measured is None:
        met = None
    else:
        met = measured <= limit if below else measured >= limit
    return {"target": name, "measured": measured, "limit": limit, "met": met, "detail": detail,
            "direction": "<=" if below else ">="}


# ---- the benchmarks' own labs (lab/lab.py), converged by the real playbooks ----------------------------

def lab_cli(name: str, *args: str) -> None:
    """`lab.py --name NAME ARGS...`; RuntimeError with its output's tail when it fails."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", name, *args],
                         capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"lab.py {' '.join(args)} failed: {(out.stdout + out.stderr).strip()[-1000:]}")


def lab_play(name: str, playbook: str) -> None:
    """Run playbooks/PLAYBOOK against lab NAME's inventory; RuntimeError with its output's tail when it fails."""
    out = subprocess.run([os.path.join(ROOT, ".venv", "bin", "ansible-playbook"), "-i",
                          f"/var/lib/sluice-lab/{name}/inventory/hosts.yml", os.path.join(ROOT, "playbooks", playbook)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{playbook} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-1000:]}")


def kubernetes_lab(name: str, subnet: str):
    """A two-node Kubernetes lab NAME on SUBNET converged by site.yml: (lab.Lab, kube.Cluster), its nodes Ready."""
    sys.path.insert(0, os.path.join(ROOT, "lab"))
    import kube  # pylint: disable=import-outside-toplevel
    import lab  # pylint: disable=import-outside-toplevel

    lab_cli(name, "up", "--kubernetes", "--nodes", "2", "--subnet", subnet)
    lab_play(name, "site.yml")
    the_lab = lab.Lab(name)
    k8s = kube.Cluster(the_lab)
    k8s.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=180s")
    return the_lab, k8s


def wait_until(what: str, ready, seconds: float, interval: float = 0.2) -> float:
    """Seconds until ready() held; RuntimeError naming `what` after `seconds`."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > seconds:
            raise RuntimeError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def node_agent(the_lab, node: int = 1) -> dict:
    """The agent section of a lab node's `sluice --json status` ({} while it does not answer)."""
    out = the_lab.node_run(node, "/opt/sluice/venv/bin/sluice", "--json", "status", check=False)
    return json.loads(out.stdout).get("agent") or {} if out.returncode == 0 else {}


# Runs in a lab node's python: SETUP defines holds(*fields); for each line of stdin (its fields) it says "armed",
# polls holds() every 0.5 ms and answers with the wall-clock time it first held, or "timeout".
_POLLER = r"""
import sys, time
{setup}
print("ready", flush=True)
for line in sys.stdin:
    fields = line.split()
    print("armed", flush=True)
    deadline = time.monotonic() + {timeout}
    while time.monotonic() < deadline:
        if holds(*fields):
            print(time.time(), flush=True)
            break
        time.sleep(0.0005)
    else:
        print("timeout", flush=True)
"""


class NodePoller:
    """A poller of node1's BPF maps in lab NAME (see _POLLER): `until(fields, change)` arms it, runs `change()`
    (which returns the wall-clock time it made the change) and returns that time and the one the maps showed it."""

    def __init__(self, name: str, setup: str, timeout: float, *args: str):
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", name, "exec",
                                      "node1", "--", "/opt/sluice/venv/bin/python", "-c",
                                      _POLLER.format(setup=setup, timeout=timeout), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the poller in node1 did not start")

    def until(self, fields: str, change) -> tuple[float, float]:
        self.proc.stdin.write(fields + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "armed":
            raise RuntimeError("the poller in node1 stopped")
        sent = change()
        seen = self.proc.stdout.readline().strip()
        if seen == "timeout":
            raise RuntimeError(f"node1's maps did not show {fields!r} within {self.timeout:.0f} s")
        return sent, float(seen)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
