"""python -m bench [--only SECTION,...] [--quick] [--no-lab] [--out DIR]"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback

from . import ROOT
from .common import Skipped, install_signal_handlers

SECTIONS = ["paths", "services", "programming", "xdp", "cni", "reconcile", "lab", "kubernetes", "podchurn", "policy"]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs (for development)")
    ap.add_argument("--no-lab", dest="lab", action="store_false",
                    help="skip timing site.yml on a lab of the benchmark's own")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--stamp", default=datetime.date.today().isoformat(), help="result file name (default: date)")
    opts = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, BPF, iptables)", file=sys.stderr)
        return 2
    chosen = [s for s in opts.only.split(",") if s] or SECTIONS
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    install_signal_handlers()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    results = {"meta": {"date": opts.stamp, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                        "commit": commit, "quick": opts.quick, "loadavg_before": loadavg(), "notes": []},
               "sections": {}}
    if opts.quick:
        results["meta"]["notes"].append("--quick: fewer rounds and shorter runs than a full `make bench`")
    opts.results = results["sections"]
    modules = {}
    t_all = time.monotonic()
    try:
        for name in chosen:
            mod = importlib.import_module(f"bench.{name}")
            modules[name] = mod
            print(f"\n=== {mod.TITLE} ===", flush=True)
            t0 = time.monotonic()
            entry = {}
            try:
                res = mod.run(opts)
                entry = {"ok": True, "result": res}
            except Skipped as e:
                entry = {"ok": False, "status": "not measured", "error": str(e)}
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
                traceback.print_exc()
                entry = {"ok": False, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            entry["elapsed_s"] = time.monotonic() - t0
            results["sections"][name] = entry
            if entry["ok"]:
                print("\n".join(mod.markdown(entry["result"])), flush=True)
            else:
                print(f"{entry['status']}: {entry['error']}", flush=True)
            print(f"({entry['elapsed_s']:.0f} s)", flush=True)
    except KeyboardInterrupt:
        results["meta"]["notes"].append("interrupted: sections after the last one shown did not run")
        print("\nbench: interrupted, cleaning up and writing what was measured", file=sys.stderr)
    results["meta"]["elapsed_s"] = time.monotonic() - t_all
    results["meta"]["loadavg_after"] = loadavg()
    busiest = max(float(results["meta"]["loadavg_before"].split()[0]), float(results["meta"]["loadavg_after"].split()[2]))
    if busiest > 0.5:
        results["meta"]["notes"].append(
            f"The machine was not idle (load average up to {busiest:.1f} on {os.cpu_count()} CPUs; other work ran "
            "alongside): absolute times are inflated and noisier than on an idle machine; the ratios, taken "
            "between variants measured in the same rounds, are the figures to read.")
    from . import report

    paths = report.write(results, modules, opts.out, opts.stamp)
    print(f"\nwrote {paths['json']}, {paths['md']} (and latest.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
