"""Fixtures shared by the whole suite. Tests run as root on the real kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPF_BUILD = os.path.join(ROOT, "build", "bpf")
BPFFS = "/sys/fs/bpf"

sys.path.insert(0, os.path.join(ROOT, "tests"))


def ensure_bpffs() -> None:
    if subprocess.run(["mountpoint", "-q", BPFFS], check=False).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)


@pytest.fixture
def pin_root():
    """A private pin directory on the bpffs, removed with everything in it."""
    ensure_bpffs()
    path = os.path.join(BPFFS, f"sluice-test-{uuid.uuid4().hex[:8]}")
    os.makedirs(path, mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def datapath(pin_root):
    """The whole datapath loaded and pinned under pin_root, removed afterwards."""
    from sluice.datapath import Datapath  # pylint: disable=import-outside-toplevel

    dp = Datapath(pin_root, BPF_BUILD)
    dp.load()
    yield dp
    dp.remove()


def bpf_object_path(name: str) -> str:
    path = os.path.join(BPF_BUILD, f"{name}.o")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run `make bpf`")
    return path


@pytest.fixture
def load_object(pin_root):
    """load_object('tc_pod') -> a loaded BpfObject whose maps are pinned in pin_root."""
    from sluice.bpf.object import BpfObject

    opened = []

    def load(name: str):
        obj = BpfObject(bpf_object_path(name), pin_root)
        opened.append(obj)
        return obj

    yield load
    for obj in opened:
        obj.close()
