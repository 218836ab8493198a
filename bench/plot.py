"""PNG plots from a bench.run CSV: the speed-up of effkernels over each baseline (baseline median
/ effkernels median of the same run; >1: ours faster), per layer shape for the ops (one figure
per mode) and per block / model.

    python -m bench.plot [CSV ...] [--run TIMESTAMP]

CSV default: the newest bench/results/<device>-*.csv of each device. Only the last run in a
file is plotted (its rows share one timestamp) unless --run picks another. Writes, next to the
CSV, <csv stem>-ops-<mode>.png and <csv stem>-models.png, and prints their paths.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

from . import common

OURS = "effkernels"
BASELINES = ["eager_nchw", "eager_cl", "compile", "onnxruntime", "effkernels_compile",
             "effkernels_prepacked"]
COLORS = {"eager_nchw": "#4C72B0", "eager_cl": "#55A868", "compile": "#C44E52",
          "onnxruntime": "#8172B2", "effkernels_compile": "#CCB974",
          "effkernels_prepacked": "#64B5CD"}


def load(path: Path, run: str = None) -> List[dict]:
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("median_ms") and r.get("batch")]
    if not rows:
        return []
    stamp = run or max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == stamp]


def speedups(rows: List[dict]) -> "OrderedDict[tuple, Dict[str, float]]":
    """(suite, op, shape, batch, mode) -> {baseline: baseline median / our median}."""
    cases: "OrderedDict[tuple, Dict[str, float]]" = OrderedDict()
    medians: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        key = (r["suite"], r["op"], r["shape"], r["batch"], r["mode"])
        medians.setdefault(key, {})[r["impl"]] = float(r["median_ms"])
    for key, m in medians.items():
        if OURS in m:
            cases[key] = {b: m[b] / m[OURS] for b in BASELINES if b in m}
    return cases


def _bars(ax, labels, series: Dict[str, List[float]], title: str):
    import numpy as np

    names = [b for b in BASELINES if b in series]
    y = np.arange(len(labels))
    h = 0.8 / max(1, len(names))
    for i, b in enumerate(names):
        vals = [v if v == v else 0 for v in series[b]]  # NaN (not run) -> no bar
        ax.barh(y + (i - (len(names) - 1) / 2) * h, vals, height=h, label=f"vs {b}",
                color=COLORS.get(b))
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of effkernels (baseline median / ours), log scale; >1: ours faster")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)


def plot(path: Path, run: str = None) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(path, run)
    if not rows:
        print(f"{path}: no timed rows", file=sys.stderr)
        return []
    cases = speedups(rows)
    head = rows[0]
    subtitle = (f"{head['device_name']}, {head['dtype']}, run {head['timestamp']}\n"
                f"{head['versions']}")
    groups: "OrderedDict[str, List[tuple]]" = OrderedDict()
    for key in cases:
        suite, _, _, _, mode = key
        name = f"ops-{mode.replace('+', '')}" if suite == "ops" else "models"
        groups.setdefault(name, []).append(key)
    written = []
    for name, keys in groups.items():
        labels = [f"{k[1]} {k[2]} N{k[3]}" + (f" {k[4]}" if name == "models" else "")
                  for k in keys]
        series = {b: [cases[k].get(b, float("nan")) for k in keys] for b in BASELINES
                  if any(b in cases[k] for k in keys)}
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.28 * len(keys) * max(1, len(series)) / 2))
        what = "ops, mode " + name[4:] if name.startswith("ops") else "blocks and models"
        _bars(ax, labels, series, f"effkernels speed-up: {what}\n{subtitle}")
        fig.tight_layout()
        out = path.with_name(f"{path.stem}-{name}.png")
        fig.savefig(out, dpi=110, bbox_inches="tight")  # long case labels
        plt.close(fig)
        written.append(out)
    return written


def newest_csvs() -> List[Path]:
    by_device: Dict[str, Path] = {}
    for p in sorted(common.RESULTS.glob("*-*.csv"), key=lambda p: p.stat().st_mtime):
        by_device[p.name.split("-", 1)[0]] = p
    # Oldest first: the last is the newest run of any device (bench.report's default).
    return sorted(by_device.values(), key=lambda p: p.stat().st_mtime)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="*", type=Path)
    p.add_argument("--run", default=None, help="the timestamp of the run to plot (default: last)")
    args = p.parse_args(argv)
    paths = args.csv or newest_csvs()
    if not paths:
        print("no CSV given and none in bench/results/", file=sys.stderr)
        return 1
    for path in paths:
        for out in plot(path, args.run):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
