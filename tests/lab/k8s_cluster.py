"""A Kubernetes lab cluster of two nodes (`lab.py up --kubernetes`) converged by playbooks/site.yml, as the
Kubernetes lab tests start from, and the playbook runner they use."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import kube  # noqa: E402  pylint: disable=wrong-import-position
import lab  # noqa: E402  pylint: disable=wrong-import-position

VENV_BIN = os.path.join(ROOT, ".venv", "bin")


def playbook(the_lab: lab.Lab, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), "-i", the_lab.inventory,
                           os.path.join(ROOT, "playbooks", name), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                          env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", ANSIBLE_FORCE_COLOR="0",
                                   **env))


@contextlib.contextmanager
def converged_cluster(prefix: str, subnet: str):
    """(lab, kube.Cluster) of a lab named `prefix` + 4 hex digits on `subnet`, taken down when the block ends."""
    cli = [sys.executable, os.path.join(ROOT, "lab", "lab.py"), "--name", f"{prefix}{uuid.uuid4().hex[:4]}"]
    try:
        up = subprocess.run([*cli, "up", "--kubernetes", "--nodes", "2", "--subnet", subnet],
                            capture_output=True, text=True, timeout=900, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        the_lab = lab.Lab(cli[-1])
        site = playbook(the_lab, "site.yml")
        assert site.returncode == 0, site.stdout[-6000:] + site.stderr
        k8s = kube.Cluster(the_lab)
        # Settled: the nodes Ready and the add-ons' pods made, so only the tests' own pods come and go.
        k8s.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=180s")
        k8s.kubectl("rollout", "status", "-n", "kube-system", "deployment/coredns", "--timeout=180s")
        yield the_lab, k8s
    finally:
        subprocess.run([*cli, "down"], capture_output=True, timeout=300, check=False)
