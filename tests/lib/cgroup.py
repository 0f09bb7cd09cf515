"""A throwaway cgroup v2 for tests of cgroup BPF hooks: named sltest-<random>
under the unified hierarchy, programs attached through bpf_links (closing the
link detaches), processes placed in it from birth, removed on exit."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid

from sluice.bpf import libbpf

UNIFIED = "/sys/fs/cgroup/unified"


def _own_cgroup() -> str:
    """This process's cgroup in the unified hierarchy (the `0::` line)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(UNIFIED, line.strip()[3:].lstrip("/"))
    return UNIFIED


class Cgroup:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.links: list[int] = []

    def attach(self, prog_fd: int, attach_type: int) -> int:
        link = libbpf.link_create(prog_fd, self.fd, attach_type)
        self.links.append(link)
        return link

    def enter(self) -> None:
        """preexec_fn for subprocess: the child joins the cgroup before exec,
        so every socket it creates belongs to it."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]


@contextlib.contextmanager
def cgroup():
    path = os.path.join(UNIFIED, f"sltest-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    cg = None
    try:
        cg = Cgroup(path)
        yield cg
    finally:
        if cg:
            for link in cg.links:
                os.close(link)
            os.close(cg.fd)
            # Processes the test left behind go back to where we run; a
            # cgroup can only be removed once it is empty.
            procs = os.path.join(_own_cgroup(), "cgroup.procs")
            for pid in cg.pids():
                with contextlib.suppress(OSError), open(procs, "w") as f:
                    f.write(str(pid))
        # A process that just exited can keep the cgroup busy for a moment.
        for _attempt in range(50):
            try:
                os.rmdir(path)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
        else:
            os.rmdir(path)
