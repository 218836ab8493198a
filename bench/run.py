"""`make bench`: verify and benchmark every kernel on the devices present, print a table with
speed-up ratios, append the results to bench/results/<device>-<date>.csv.

    python -m bench.run [--quick] [--op dwconv|pwconv] [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import effkernels

from . import common, ops


def _progress(i, n, what):
    print(f"\r[{i + 1}/{n}] {what:<60}", end="", file=sys.stderr, flush=True)


def _table(rows):
    """One line per (op, shape): baselines' and our medians, and the speed-ups."""
    by_case = {}
    for r in rows:
        key = (r["op"], r["shape"], r["mode"])
        entry = by_case.setdefault(key, {})
        if "median_ms" in r:
            entry[r["impl"]] = r["median_ms"]
        if r.get("speedup_vs"):
            entry[f"x{r['speedup_vs']}"] = r["speedup"]
        if str(r.get("verified", "")).startswith("WRONG"):
            entry["wrong"] = r["verified"]
    lines = [f"{'op':<15} {'shape':<26} {'eager_cl ms':>11} {'eager_nchw':>10} "
             f"{'ours ms':>8} {'vs cl':>6} {'vs nchw':>7}"]
    for (op, shape, mode), e in by_case.items():
        if "wrong" in e:
            lines.append(f"{op:<15} {shape:<26} {e['wrong']}")
            continue
        lines.append(f"{op:<15} {shape:<26} {e.get('eager_cl', 0):>11.3f} "
                     f"{e.get('eager_nchw', 0):>10.3f} {e.get('effkernels', 0):>8.3f} "
                     f"{e.get('xeager_cl', 0):>5.2f}x {e.get('xeager_nchw', 0):>6.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few shapes, short timings (CI)")
    p.add_argument("--op", default=None, help="only ops whose name contains this")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: every device present")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU runs (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                          else [])
    failed = False
    for device in devices:
        print(f"== {device}: {common.device_name(device)}; {common.versions()}")
        print(f"   backends: {effkernels.available_backends(device)}")
        if device != "cpu":
            print("   (GPU op benchmarks arrive with the GPU backends)")
            continue
        t0 = time.time()
        rows = ops.run(device, args.quick, args.op, _progress)
        print(file=sys.stderr)
        meta = {"timestamp": common.now(), "device": device,
                "device_name": common.device_name(device), "versions": common.versions()}
        rows = [{**meta, **r} for r in rows]
        path = common.csv_path(device)
        common.append_rows(path, rows)
        print(_table(rows))
        print(f"({len(rows)} rows appended to {path.relative_to(common.RESULTS.parent.parent)}, "
              f"{time.time() - t0:.0f} s; eval-mode forward, fp32, channels_last input; "
              f"speed-up = PyTorch eager median / effkernels median, same run)")
        failed |= any(str(r.get("verified", "")).startswith("WRONG") for r in rows)
    if failed:
        print("Some kernels gave WRONG results (see above).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
