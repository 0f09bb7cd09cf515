"""XDP: the per-packet cost of xdp_nic measured with BPF_PROG_TEST_RUN
(sluice.bpf.libbpf.test_run, as tests/bpf/test_xdp.py calls it, from inside a
node namespace with the NIC as ingress_ifindex):
the failsafe (the default management ports loaded: a packet to another port
pays its two lookups, one to the node's SSH port also the FIB lookup that
tells the node's own address), prefilter with 10,000 CIDRs (a listed source
dropped, an unlisted one passed) and the L4 load balancer (an established flow
rewritten and sent with XDP_TX), each relative to an unfiltered packet passing
an empty failsafe and an empty prefilter. Then a
flood: trafgen (netsniff-ng) in an attacker namespace sends 64-byte UDP
frames from sources spread over the 10,000 CIDRs into a victim namespace's
veth, where either xdp_nic (native XDP, prefilter) or an iptables raw-table
PREROUTING DROP of the same 10,000 CIDRs disposes of them. Sender and the
victim's receive processing share CPU 0, so a cheaper drop leaves more of the
CPU to the sender: the rate the filter drops is the figure compared."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import tempfile
import time

from lib import netns, packets
from sluice.bpf import libbpf as lb
from sluice.datapath import Datapath
from sluice.maps import Backend, BackendsMap, ConfigMap, FailsafeMap, LbVipsMap, MetricsMap, PrefilterMap
from sluice.state.schema import DEFAULT_FAILSAFE, failsafe_ports

from .common import (BPF_BUILD, CPU, fmt_spread, namespaces, paired_ratios, pin_root, sh, spawn, stop,
                     summary, sysctl, iptables_restore)

NAME = "xdp"
TITLE = "XDP: prefilter and load balancer per-packet cost, drop rate under a flood"

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
CIDRS = 10000
NODE_IP, VIP, VPORT, CLIENT = "10.0.0.1", "192.0.2.10", 80, "198.51.100.7"
BACKENDS = {i: Backend(f"10.0.0.{10 + i}", 8080 + i) for i in range(1, 5)}
VICTIM_IP = "10.77.0.1"


def cidr(i: int) -> str:
    """The i-th prefiltered CIDR: 16.0.0.0/24, 16.0.1.0/24, ... (10,000 of them up to 16.39.15.0/24)."""
    return f"16.{i >> 8}.{i & 255}.0/24"


def _lb_node(ns: str) -> int:
    """nic0 10.0.0.1/24 with forwarding on and permanent neighbours for the backends (bpf_fib_lookup needs them)."""
    sh(ns, "ip", "link", "add", "nic0", "type", "veth", "peer", "name", "wire0")
    sh(ns, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "nic0")
    for dev in ("nic0", "wire0"):
        sh(ns, "ip", "link", "set", dev, "up")
    sysctl(ns, {"net.ipv4.ip_forward": 1})
    sh(ns, "ip", "route", "add", "default", "via", "10.0.0.254", "dev", "nic0")
    for i, b in BACKENDS.items():
        sh(ns, "ip", "neigh", "add", b.ip, "lladdr", f"02:00:00:00:be:{i:02x}", "nud", "permanent", "dev", "nic0")
    sh(ns, "ip", "neigh", "add", "10.0.0.254", "lladdr", "02:00:00:00:00:fe", "nud", "permanent", "dev", "nic0")
    return netns.ifindex(ns, "nic0")


def _test_run(prog: int, ns: str, ifindex: int, frame: bytes, repeat: int, expect: int) -> float:
    """Mean ns per run over `repeat` runs in one BPF_PROG_TEST_RUN. The runs share
    one buffer, so only for programs that leave the packet unchanged."""
    with netns.entered(ns):
        ret, ns_per_run = lb.test_run(prog, frame, ctx=packets.xdp_ctx_for(frame, ifindex), repeat=repeat)[::2]
    if ret != expect:
        raise RuntimeError(f"xdp_nic returned {ret}, expected {expect}")
    return float(ns_per_run)


def _test_run_single(prog: int, ns: str, ifindex: int, frame: bytes, runs: int, expect: int) -> float:
    """Median of `runs` single test runs (repeat=1, the way tests/bpf/test_xdp.py calls it):
    every run starts from the original frame, so a NAT rewrite can be measured."""
    ctx = packets.xdp_ctx_for(frame, ifindex)
    durations = []
    with netns.entered(ns):
        for _run in range(runs):
            ret, ns_run = lb.test_run(prog, frame, ctx=ctx)[::2]
            if ret != expect:
                raise RuntimeError(f"xdp_nic returned {ret}, expected {expect}")
            durations.append(ns_run)
    return float(statistics.median(durations))


# ---- flood -----------------------------------------------------------------------------

def _trafgen_conf(dst_mac: str, src_mac: str) -> str:
    """64-byte UDP frames to the victim, sources 16.X.Y.1 with X cycling 0..38 and Y random:
    spread over the first 9,984 prefiltered /24s."""
    def mac(m: str) -> str:
        return ", ".join(f"0x{b}" for b in m.split(":"))

    return ("{\n"
            f"  {mac(dst_mac)}, {mac(src_mac)}, 0x08, 0x00,\n"
            "  0x45, 0x00, const16(46), const16(0), const16(0), 0x40, 0x11, csumip(14, 33),\n"
            "  16, dinc(0, 38), drnd(), 1,\n"
            f"  {', '.join(VICTIM_IP.split('.'))},\n"
            "  const16(1024), const16(9), const16(26), const16(0),\n"
            "  fill(0x41, 18)\n"
            "}\n")


def _tx_packets(ns: str, dev: str) -> int:
    data = json.loads(sh(ns, "ip", "-s", "-j", "link", "show", dev).stdout)[0]
    return data["stats64"]["tx"]["packets"]


def _iptables_drops(ns: str) -> int:
    out = sh(ns, "iptables-save", "-c", "-t", "raw").stdout
    return sum(int(p) for p in re.findall(r"^\[(\d+):\d+\] -A PREROUTING", out, re.M))


def _flood(atk: str, seconds: float, conf: str) -> tuple[int, float]:
    """trafgen from `atk` for `seconds`; (frames sent on the wire, elapsed s)."""
    before = _tx_packets(atk, "eth0")
    t0 = time.monotonic()
    proc = spawn(atk, "trafgen", "-o", "eth0", "-i", conf, "-P", "1", "-q", cpu=CPU)
    time.sleep(seconds)
    stop(proc, signal.SIGINT, timeout=10)
    elapsed = time.monotonic() - t0
    return _tx_packets(atk, "eth0") - before, elapsed


def run(opts) -> dict:
    reps, repeat, singles = (3, 200_000, 5000) if opts.quick else (5, 1_000_000, 20000)
    flood_s, flood_rounds = (1.5, 2) if opts.quick else (3, 3)
    res = {"cidrs": CIDRS, "repeat": repeat, "singles": singles, "rounds": reps, "per_packet_ns": {}, "flood": {}}
    with contextlib.ExitStack() as stack:
        node, atk1, vic1, atk2, vic2, atk3, vic3 = stack.enter_context(
            namespaces("xn", "xa1", "xv1", "xa2", "xv2", "xa3", "xv3"))
        dp = Datapath(stack.enter_context(pin_root()), BPF_BUILD)
        dp.load()
        prog = dp.prog_fd("xdp_nic")
        stack.callback(os.close, prog)
        nic0 = _lb_node(node)
        with dp.open_map(ConfigMap) as cfg, dp.open_map(BackendsMap) as bm, dp.open_map(LbVipsMap) as vips:
            cfg.set(NODE_IP, nic0)
            bm.put_many(BACKENDS)
            vips.put(VIP, VPORT, "tcp", BACKENDS)
        frames = {      # UDP to port 9999: no failsafe port
            "pass": (packets.udp("203.0.113.9", NODE_IP, dport=9999), XDP_PASS),
            "failsafe_miss": (packets.udp("203.0.113.9", NODE_IP, dport=9999), XDP_PASS),
            "failsafe_hit": (packets.tcp("203.0.113.9", NODE_IP, 40000, 22, flags="A"), XDP_PASS),
            "prefilter_drop": (packets.udp("16.19.136.1", NODE_IP, dport=9999), XDP_DROP),    # listed: CIDR #5000
            "prefilter_pass": (packets.udp("203.0.113.9", NODE_IP, dport=9999), XDP_PASS),
            "lb_tx": (packets.tcp(CLIENT, VIP, 40000, VPORT, flags="A"), XDP_TX),
        }
        raw = {k: [] for k in frames}              # mean of repeat=N (packet-preserving cases)
        single = {k: [] for k in frames}           # median of single runs (all cases)
        with dp.open_map(PrefilterMap) as pf, dp.open_map(FailsafeMap) as fs:
            for _rep in range(reps):      # empty failsafe and prefilter first, then the failsafe, then 10,000 CIDRs
                pf.clear()
                fs.clear()
                frame, expect = frames["pass"]
                raw["pass"].append(_test_run(prog, node, nic0, frame, repeat, expect))
                single["pass"].append(_test_run_single(prog, node, nic0, frame, singles, expect))
                for proto, port in failsafe_ports(DEFAULT_FAILSAFE):
                    fs.put(proto, port)
                for k in ("failsafe_miss", "failsafe_hit"):
                    frame, expect = frames[k]
                    raw[k].append(_test_run(prog, node, nic0, frame, repeat, expect))
                    single[k].append(_test_run_single(prog, node, nic0, frame, singles, expect))
                pf.put_many({cidr(i): i + 1 for i in range(CIDRS)})
                for k in ("prefilter_drop", "prefilter_pass", "lb_tx"):
                    frame, expect = frames[k]
                    if k != "lb_tx":
                        raw[k].append(_test_run(prog, node, nic0, frame, repeat, expect))
                    single[k].append(_test_run_single(prog, node, nic0, frame, singles, expect))
        res["per_packet_ns"] = {k: summary(v) for k, v in raw.items()}
        res["per_packet_single_ns"] = {k: summary(v) for k, v in single.items()}
        res["per_packet_raw"] = {"repeat": raw, "single": single}
        res["per_packet_vs_pass"] = {k: paired_ratios(raw[k], raw["pass"]) for k in raw}
        res["per_packet_single_vs_pass"] = {k: paired_ratios(single[k], single["pass"]) for k in single}
        print("  test_run ns/packet (single runs): " +
              ", ".join(f"{k} {summary(v)['median']:.0f}" for k, v in single.items()), flush=True)

        # flood: (atk1 -> vic1: native XDP prefilter), (atk2 -> vic2: iptables raw DROP)
        conf_dir = tempfile.mkdtemp(prefix="slbench-")
        stack.callback(shutil.rmtree, conf_dir, ignore_errors=True)
        confs = {}
        pairs = {"xdp": (atk1, vic1), "iptables": (atk2, vic2), "iptables_1rule": (atk3, vic3)}
        for tag, (atk, vic) in pairs.items():
            sh(atk, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", vic)
            sh(vic, "ip", "addr", "add", f"{VICTIM_IP}/24", "dev", "eth0")
            sh(atk, "ip", "addr", "add", "10.77.0.2/24", "dev", "eth0")
            for ns in (atk, vic):
                sh(ns, "ip", "link", "set", "eth0", "up")
            path = os.path.join(conf_dir, f"{tag}.cfg")
            with open(path, "w") as f:
                f.write(_trafgen_conf(netns.mac(vic, "eth0"), netns.mac(atk, "eth0")))
            confs[tag] = path
        with netns.entered(vic1):
            mode = dp.attach_nic("eth0", "native")
        rules = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" + \
            "".join(f"-A PREROUTING -s {cidr(i)} -j DROP\n" for i in range(CIDRS)) + "COMMIT\n"
        iptables_restore(vic2, rules)
        iptables_restore(vic3, "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                         "-A PREROUTING -s 16.0.0.0/10 -j DROP\nCOMMIT\n")
        metrics = stack.enter_context(dp.open_map(MetricsMap))
        short_hooks, short_outcomes = dp.enums()      # the BTF enums, as MetricsMap.read takes them
        hooks = {f"SL_HOOK_{k.upper()}": v for k, v in short_hooks.items()}
        outcomes = {("SL_" if k.startswith("drop") else "SL_OUT_") + k.upper(): v for k, v in short_outcomes.items()}

        def xdp_drops() -> int:
            return metrics.read(hooks, outcomes).get(("SL_HOOK_XDP_NIC", "SL_DROP_PREFILTER"), (0, 0))[0]

        flood = {t: [] for t in pairs}
        for r in range(flood_rounds):
            for tag in (list(pairs) if r % 2 == 0 else list(pairs)[::-1]):
                atk, vic = pairs[tag]
                count = xdp_drops if tag == "xdp" else (lambda v=vic: _iptables_drops(v))
                d0 = count()
                sent, elapsed = _flood(atk, flood_s, confs[tag])
                time.sleep(0.2)
                dropped = count() - d0
                flood[tag].append({"sent": sent, "dropped": dropped, "seconds": elapsed,
                                   "sent_pps": sent / elapsed, "dropped_pps": dropped / elapsed})
        res["flood"] = {"raw": flood, "xdp_mode": mode.get("xdp_mode"), "seconds": flood_s, "rounds": flood_rounds,
                        "summary": {t: {"sent_pps": summary([x["sent_pps"] for x in v]),
                                        "dropped_pps": summary([x["dropped_pps"] for x in v]),
                                        "dropped_share": summary([x["dropped"] / x["sent"] if x["sent"] else 0
                                                                  for x in v])}
                                    for t, v in flood.items()},
                        "xdp_vs_iptables": paired_ratios([x["dropped_pps"] for x in flood["xdp"]],
                                                         [x["dropped_pps"] for x in flood["iptables"]]),
                        "xdp_vs_iptables_1rule": paired_ratios([x["dropped_pps"] for x in flood["xdp"]],
                                                               [x["dropped_pps"] for x in flood["iptables_1rule"]])}
        print("  flood: " + ", ".join(f"{t} dropped {summary([x['dropped_pps'] for x in v])['median'] / 1e6:.3f} Mpps"
                                      for t, v in flood.items()), flush=True)
    res["targets"] = []
    return res


def markdown(res: dict) -> list[str]:
    p, vs = res["per_packet_ns"], res["per_packet_vs_pass"]
    q, qs = res["per_packet_single_ns"], res["per_packet_single_vs_pass"]
    labels = {"pass": "unlisted source, empty failsafe and prefilter (reference)",
              "failsafe_miss": "the default failsafe loaded, a port not in it (every packet's cost)",
              "failsafe_hit": "the default failsafe loaded, TCP to the node's SSH port → XDP_PASS",
              "prefilter_drop": f"listed source, {res['cidrs']:,} CIDRs → XDP_DROP",
              "prefilter_pass": f"unlisted source, {res['cidrs']:,} CIDRs → XDP_PASS",
              "lb_tx": f"LB VIP, established flow → NAT rewrite + XDP_TX ({res['cidrs']:,} CIDRs loaded)"}
    lines = [f"BPF_PROG_TEST_RUN, {res['rounds']} rounds; median [min–max] over rounds of (a) the kernel's mean ns "
             f"per run with repeat={res['repeat']:,} (the runs share one buffer, so not for the LB, which rewrites "
             f"the packet) and (b) the median of {res['singles']:,} single runs (repeat=1, each from the original "
             "frame; includes the kernel's timing overhead).", "",
             "| packet | (a) ns/packet | vs reference | (b) ns/packet | vs reference |", "|---|---|---|---|---|"]
    for k, label in labels.items():
        a = (fmt_spread(p[k], digits=1), fmt_spread(vs[k], '×')) if p[k]["n"] else ("n/a", "n/a")
        lines.append(f"| {label} | {a[0]} | {a[1]} | {fmt_spread(q[k], digits=1)} | {fmt_spread(qs[k], '×')} |")
    f = res["flood"]
    s = f["summary"]
    lines += ["", f"Flood: {f['rounds']} rounds × {f['seconds']} s of trafgen per variant, 64-byte UDP frames from "
              f"sources across the {res['cidrs']:,} CIDRs (XDP attached in {f['xdp_mode']} mode).", "",
              "| filter | frames sent (Mpps) | dropped by the filter (Mpps) | share of sent frames dropped by it |",
              "|---|---|---|---|"]
    for t, label in (("xdp", "xdp_nic prefilter (10,000 CIDRs, LPM trie)"),
                     ("iptables", "iptables raw PREROUTING DROP, the same 10,000 CIDRs (10,000 rules)"),
                     ("iptables_1rule", "for scale: iptables raw DROP of one /10 covering them (1 rule)")):
        lines.append(f"| {label} | {fmt_spread(s[t]['sent_pps'], scale=1e-6, digits=3)} | "
                     f"{fmt_spread(s[t]['dropped_pps'], scale=1e-6, digits=3)} | "
                     f"{fmt_spread(s[t]['dropped_share'], '', 1, 3)} |")
    lines += ["", f"XDP / iptables drop rate (per-round pairs): {fmt_spread(f['xdp_vs_iptables'], '×')} against "
              f"the same 10,000 CIDRs, {fmt_spread(f['xdp_vs_iptables_1rule'], '×')} against the one-rule "
              "aggregate."]
    return lines


def plot(res: dict, plt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    p = res["per_packet_single_ns"]
    keys = ["pass", "failsafe_miss", "failsafe_hit", "prefilter_drop", "prefilter_pass", "lb_tx"]
    med = [p[k]["median"] for k in keys]
    axes[0].bar(["empty", "failsafe\nmiss", "failsafe\nhit", "10k CIDRs\ndrop", "10k CIDRs\npass", "LB\nXDP_TX"], med,
                yerr=[[m - p[k]["min"] for k, m in zip(keys, med)], [p[k]["max"] - m for k, m in zip(keys, med)]],
                capsize=4, color="tab:green")
    axes[0].set_ylabel("ns per packet (test_run, single runs)")
    axes[0].set_title("xdp_nic per-packet cost")
    s = res["flood"]["summary"]
    tags = ["xdp", "iptables", "iptables_1rule"]
    med = [s[t]["dropped_pps"]["median"] / 1e6 for t in tags]
    axes[1].bar(["XDP prefilter\n10k CIDRs", "iptables raw\n10k rules", "iptables raw\n1 rule"], med,
                yerr=[[m - s[t]["dropped_pps"]["min"] / 1e6 for t, m in zip(tags, med)],
                      [s[t]["dropped_pps"]["max"] / 1e6 - m for t, m in zip(tags, med)]],
                capsize=4, color=["tab:green", "tab:orange", "tab:gray"])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("Mpps dropped (log)")
    axes[1].set_title("flood from 10,000 CIDRs (one CPU)")
    return fig
