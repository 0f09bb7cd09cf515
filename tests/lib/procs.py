"""Small Python programs run inside test namespaces (and optionally a test
cgroup) that report JSON lines on stdout; every child is killed by its own pid
and reaped."""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys

from lib.netns import ns_popen


class Child:
    def __init__(self, ns: str, code: str, *args, cgroup=None):
        self.proc = ns_popen(ns, sys.executable, "-c", code, *map(str, args),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=cgroup.enter if cgroup else None)

    def read(self, timeout: float = 5.0):
        """The next JSON line the child prints."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"no output within {timeout}s from {self.proc.args[-1]}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout)
            raise RuntimeError(f"child exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return json.loads(line)

    def release(self) -> None:
        """Tell a child waiting on stdin that it may finish."""
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()

    def stop(self, grace: float = 0) -> int:
        """Wait up to `grace` seconds for the child to exit, then kill and reap it."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
        return self.proc.returncode


@contextlib.contextmanager
def children():
    """Collects Childs and stops each one on exit, even when the test fails."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for c in started:
            c.stop()
