"""Sluice benchmarks (not tests): `make bench` or `python -m bench`.

The package reuses the node runtime (src/sluice) and the test helpers in
tests/lib by importing them; namespaces it creates are named `slbench-*`.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)   # tests/lib: netns, packets, cgroup, agent, cni_exec

from lib import netns as _netns  # noqa: E402

# lib.netns.unique() reads PREFIX at call time: every namespace the benchmark
# makes through the test helpers is then called slbench-<tag>-<random>.
_netns.PREFIX = "slbench-"
