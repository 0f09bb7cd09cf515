"""Running sockperf and iperf3 between namespaces and reading their results."""

from __future__ import annotations

import json
import re

from .common import CPU, sh, running

SOCKPERF_PORT = 11111
IPERF_PORT = 5201
_PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")
_AVG = re.compile(r"avg-latency=([\d.]+)")


def sockperf_server(ns: str, ip: str, port: int = SOCKPERF_PORT):
    """A TCP sockperf server pinned to the benchmark CPU (a context manager)."""
    return running(ns, "sockperf", "server", "--tcp", "-i", ip, "-p", str(port), cpu=CPU, ready=0.4)


def sockperf_pingpong(ns: str, ip: str, seconds: float, port: int = SOCKPERF_PORT, msg_size: int = 64) -> dict:
    """TCP ping-pong from `ns`, pinned to the same CPU as the server: half round trips in µs."""
    out = sh(ns, "sockperf", "ping-pong", "--tcp", "-i", ip, "-p", str(port), "-t", str(seconds),
             "-m", str(msg_size), cpu=CPU, timeout=seconds + 30, check=False)
    text = out.stdout + out.stderr
    pct = {float(p): float(v) for p, v in _PCT.findall(text)}
    if 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf to {ip} in {ns} gave no percentiles:\n{text[-2000:]}")
    avg = _AVG.search(text)
    return {"p50": pct[50.0], "p99": pct[99.0], "p90": pct.get(90.0), "avg": float(avg.group(1)) if avg else None}


def iperf_server(ns: str, ip: str, port: int = IPERF_PORT, cpu: int | None = CPU):
    return running(ns, "iperf3", "-s", "-B", ip, "-p", str(port), cpu=cpu, ready=0.4)


def iperf_stream(ns: str, ip: str, seconds: float, port: int = IPERF_PORT, cpu: int | None = CPU) -> float:
    """One TCP stream for `seconds`: received Gbit/s."""
    out = sh(ns, "iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-J", cpu=cpu,
             timeout=seconds + 30, check=False)
    try:
        data = json.loads(out.stdout)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"iperf3 to {ip} in {ns} failed ({e}): {out.stdout[-1500:]} {out.stderr[-500:]}") from None
