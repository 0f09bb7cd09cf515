"""sluice-supervise as the agent role runs it where PID 1 is not systemd: the real
console script, options before `--`, a detached supervisor that restarts its child."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT

SUPERVISE = os.path.join(ROOT, ".venv", "bin", "sluice-supervise")


def supervise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SUPERVISE, *args], capture_output=True, text=True, timeout=30, check=False)


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def paths(tmp_path):
    pidfile, log, child_pidfile = tmp_path / "run" / "sup.pid", tmp_path / "log" / "child.log", tmp_path / "child.pid"
    yield str(pidfile), str(log), str(child_pidfile)
    supervisor = read_int(str(pidfile))
    if supervisor:
        supervise("stop", "--pidfile", str(pidfile))


def test_start_restart_stop(paths):
    pidfile, log, child_pidfile = paths
    cmd = ["--", "/bin/sh", "-c", f'echo $$ > {child_pidfile}; exec sleep 600']

    first = supervise("start", "--pidfile", pidfile, "--log", log, *cmd)
    assert (first.returncode, first.stdout.strip()) == (0, "started"), first.stderr
    assert supervise("start", "--pidfile", pidfile, "--log", log, *cmd).stdout.strip() == "running"
    supervisor = read_int(pidfile)
    assert supervise("status", "--pidfile", pidfile).returncode == 0

    child = wait_for(lambda: read_int(child_pidfile))
    os.kill(child, signal.SIGKILL)
    restarted = wait_for(lambda: (pid := read_int(child_pidfile)) != child and pid)
    assert os.path.exists(f"/proc/{restarted}")
    with open(log) as f:
        assert "exited -9, restarting" in f.read()

    stopped = supervise("stop", "--pidfile", pidfile)
    assert (stopped.returncode, stopped.stdout.strip()) == (0, "stopped")
    wait_for(lambda: not os.path.exists(f"/proc/{supervisor}") and not os.path.exists(f"/proc/{restarted}"))
    assert supervise("status", "--pidfile", pidfile).returncode == 3
    assert supervise("stop", "--pidfile", pidfile).stdout.strip() == "not running"


def test_start_without_command_is_an_error(paths):
    pidfile, log, _child_pidfile = paths
    result = supervise("start", "--pidfile", pidfile, "--log", log)
    assert result.returncode == 2
    assert "start needs a command after --" in result.stderr
