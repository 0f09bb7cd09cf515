"""Writing a run's results: bench/results/<date>.json, <date>.md (copied to
latest.md) and <date>-*.png plots."""

from __future__ import annotations

import json
import os
import shutil


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seconds(v: float) -> str:
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1000:.1f} ms"
    return f"{v * 1e6:.0f} µs"


def _target_row(t: dict) -> str:
    met = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
    timed = t.get("unit") == " s"
    if t["measured"] is None:
        measured = "n/a"
    else:
        measured = _seconds(t["measured"]) if timed else f"{t['measured']:.3f}×"
    limit = _seconds(t["limit"]) if timed else f"{t['limit']:.2f}×"
    return f"| {t['target']} | {t['direction']} {limit} | {measured} | {met} | {t.get('detail', '')} |"


def _doc(text: str) -> list[str]:
    """A module docstring as markdown: paragraphs re-flowed, "- " lines kept as a list."""
    out = []
    for para in text.strip().split("\n\n"):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith("- ") for ln in lines):
            items: list[str] = []
            for ln in lines:
                if ln.startswith("- ") or not items:
                    items.append(ln)
                else:
                    items[-1] += " " + ln
            out += items
        else:
            out.append(" ".join(lines))
        out.append("")
    return out


def _rounded(x):
    """Floats to 6 significant digits: raw samples stay exact enough, the file stays small."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def write(results: dict, modules: dict, outdir: str, stamp: str) -> dict[str, str]:
    os.makedirs(outdir, exist_ok=True)
    prefix = os.path.join(outdir, stamp)
    plt = None
    try:
        plt = _plt()
    except ImportError:
        results["meta"]["notes"].append("matplotlib is not installed: no plots (make bench installs it)")
    pngs: dict[str, list[str]] = {}
    for name, res in results["sections"].items():
        mod = modules[name]
        if plt is not None and res.get("ok") and hasattr(mod, "plot"):
            try:
                fig = mod.plot(res["result"], plt)
                path = f"{prefix}-{name}.png"
                fig.tight_layout()
                fig.savefig(path, dpi=110)
                plt.close(fig)
                pngs[name] = [os.path.basename(path)]
            except Exception as e:  # noqa: BLE001 - a broken plot must not lose the numbers
                res.setdefault("plot_error", f"{type(e).__name__}: {e}")
    json_path = f"{prefix}.json"
    with open(json_path, "w") as f:
        json.dump(_rounded(results), f, indent=1, default=str)
    md = markdown(results, modules, pngs)
    md_path = f"{prefix}.md"
    with open(md_path, "w") as f:
        f.write(md)
    shutil.copyfile(md_path, os.path.join(outdir, "latest.md"))
    return {"json": json_path, "md": md_path}


def markdown(results: dict, modules: dict, pngs: dict) -> str:
    meta = results["meta"]
    out = [f"# Sluice benchmarks, {meta['date']}", "",
           f"`make bench` on {meta['host']}: kernel {meta['kernel']}, {meta['cpus']} CPUs, commit `{meta['commit']}`; "
           f"ran {meta['elapsed_s']:.0f} s (sections: {', '.join(results['sections'])}).",
           f"Load average before / after: {meta['loadavg_before']} / {meta['loadavg_after']}.", ""]
    out += [f"> {n}" for n in meta["notes"]]
    if meta["notes"]:
        out.append("")
    out += ["Benchmarks, not tests: nothing here passes or fails a build. Every number is a median over "
            "repeated runs with its spread (min–max), and comparisons are ratios measured in the same run. "
            "A missed target is a finding, reported as such.", "",
            "## Targets", "", "| target | limit | measured | result | how |", "|---|---|---|---|---|"]
    for name, sec in results["sections"].items():
        for t in (sec.get("result") or {}).get("targets", []) if sec.get("ok") else []:
            out.append(_target_row(t))
        if not sec.get("ok"):
            for t in getattr(modules[name], "TARGETS", []):
                out.append(_target_row({"target": t[0], "limit": t[1], "measured": None, "met": None,
                                        "direction": "<=", "detail": f"section {name}: {sec.get('status')}",
                                        **({"unit": t[2]} if len(t) > 2 else {})}))
    out.append("")
    for name, sec in results["sections"].items():
        mod = modules[name]
        out += [f"## {mod.TITLE}", ""]
        out += _doc(mod.__doc__ or "")
        if not sec.get("ok"):
            out += [f"**{sec.get('status')}**: {sec.get('error', '')}", ""]
            continue
        out += mod.markdown(sec["result"])
        out.append("")
        for png in pngs.get(name, []):
            out += [f"![{name}]({png})", ""]
        out.append(f"_Section time: {sec['elapsed_s']:.0f} s._")
        out.append("")
    return "\n".join(out)


def _int_keys(x):
    """JSON made int keys (service counts, concurrency) strings: turn them back."""
    if isinstance(x, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_int_keys(v) for v in x]
    return x


def main(argv=None) -> int:
    """python -m bench.report RESULTS.json: render the markdown and plots of a run again."""
    import argparse
    import importlib

    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    ap.add_argument("json")
    opts = ap.parse_args(argv)
    with open(opts.json) as f:
        results = _int_keys(json.load(f))
    modules = {name: importlib.import_module(f"bench.{name}") for name in results["sections"]}
    stamp = os.path.basename(opts.json).removesuffix(".json")
    paths = write(results, modules, os.path.dirname(os.path.abspath(opts.json)), stamp)
    print(f"wrote {paths['md']} (and latest.md) and the plots")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
