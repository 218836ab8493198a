"""`make bench`: verify, then benchmark the effkernels ops, the inverted-residual block and whole
models against PyTorch eager (NCHW, channels_last), torch.compile and ONNX Runtime; print tables
with speed-up ratios; append the results to bench/results/<device>-<date>.csv
(plots: python -m bench.plot).

    python -m bench.run [--quick] [--op dwconv|pwconv|mixconv|inverted_residual]
                        [--model mixnet_s,...] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                        [--threads N] [--compile-budget S] [--compile-ours]
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace
from typing import Dict, List

import torch

import effkernels

from . import blocks, common, harness, models, ops

SUITES = ("ops", "blocks", "models")
# Seconds of torch.compile warm-up per op kind / block / model (see harness.CompileBudget).
# quick: one compile per kind; targets: one per op kind (no op target is against compile),
# every block and model (issue 7's model targets are).
BUDGET = {"full": {"ops": 30, "blocks": 60, "models": 90},
          "quick": {"ops": 1e-3, "blocks": 1e-3, "models": 0},
          "targets": {"ops": 1e-3, "blocks": 60, "models": 150}}
MIN_TIME = {"full": {"ops": 0.15, "blocks": 0.3, "models": 0.5},
            "quick": {"ops": 0.05, "blocks": 0.1, "models": 0.1},
            "targets": {"ops": 0.3, "blocks": 0.5, "models": 1.0}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _progress(i, n, what, t0):
    el = time.time() - t0
    print(f"\r[{i + 1}/{n} {el:4.0f}s] {what:<70}", end="", file=sys.stderr, flush=True)


def _cell(rows_by_impl: Dict[str, dict], impl: str) -> str:
    r = rows_by_impl.get(impl)
    if r is None:
        return "-"
    v = str(r.get("verified", ""))
    if v.startswith("WRONG"):
        return "WRONG"
    if v.startswith("ERROR"):
        return "error"
    if v == "skipped":
        return "skip"
    star = "*" if v.startswith("inexact") else ""
    if impl == harness.OURS:
        return f"{r['median_ms']:.3f}" if r.get("median_ms") else "-"
    return f"{r['speedup']:.2f}x{star}" if r.get("speedup") else "-"


def table(rows: List[dict]) -> str:
    """One line per case: our median and our speed-up over each baseline (>1: ours faster)."""
    cols = [harness.OURS] + [b for b in harness.BASELINES + (harness.OURS_COMPILE,
                                                             harness.OURS_PREPACKED)
                            if any(r["impl"] == b for r in rows)]
    head = {"effkernels": "ours ms", "eager_nchw": "vs nchw", "eager_cl": "vs cl",
            "compile": "vs compile", "onnxruntime": "vs ort",
            "effkernels_compile": "vs ours+compile", "effkernels_prepacked": "vs prepacked"}
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (r["suite"], r["op"], r["shape"], r["batch"], r["mode"])
        cases.setdefault(key, {})[r["impl"]] = r
    w = max([len(f"{k[1]} {k[2]}") for k in cases] + [10])
    lines = [f"{'case':<{w}} {'N':>3} {'mode':<10} " + " ".join(f"{head[c]:>10}" for c in cols)]
    suite = None
    for key, by_impl in cases.items():
        if key[0] != suite:
            suite = key[0]
            lines.append(f"-- {suite}")
        lines.append(f"{key[1] + ' ' + key[2]:<{w}} {key[3]:>3} {key[4]:<10} "
                     + " ".join(f"{_cell(by_impl, c):>10}" for c in cols))
    return "\n".join(lines)


def problems(rows: List[dict]) -> List[str]:
    out = []
    for r in rows:
        v = str(r.get("verified", ""))
        if v.startswith(("WRONG", "ERROR", "inexact")):
            out.append(f"{r['impl']:<18} {r['op']} {r['shape']} N{r['batch']} {r['mode']}: {v}"
                       + (f" ({r['note']})" if r.get("note") else ""))
    return out


def _backend(device: str) -> str:
    """The effkernels backend to benchmark: named explicitly, so that a missing extension shows
    up as an error instead of a silent fallback to the reference."""
    avail = effkernels.available_backends(device)
    order = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    for name in order:
        if avail.get(name) == "available":
            return name
    return order[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1-2 cases per suite, short timings, no model compiles (CI)")
    p.add_argument("--op", default=None,
                   help="only ops/blocks whose name contains this (models only with --model)")
    p.add_argument("--model", default=None,
                   help="only these models (comma-separated substrings; ops only with --op)")
    p.add_argument("--suite", default=None, help="comma-separated subset of " + ",".join(SUITES))
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: every device present")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (and ONNX Runtime's intra-op threads)")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of torch.compile warm-up per op kind/block/model before later "
                        "compile baselines of it are skipped; 0: no torch.compile; default: "
                        + ", ".join(f"{k} {v}" for k, v in BUDGET["full"].items())
                        + " (--quick: " + ", ".join(f"{k} {v}" for k, v in BUDGET["quick"].items())
                        + ")")
    p.add_argument("--compile-ours", action="store_true",
                   help="also time torch.compile of our op/block/model")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--targets", action="store_true",
                   help="only the cases the issues set speed targets on, per device: CPU: the "
                        "MobileNetV2 dw/pw layers (eval, N=1 and 8), the MobileNetV2 block and "
                        "three models (eval, batch 1 and 8); GPU: the N=64 op and block cases")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.steady_malloc()
    harness.configure_dynamo()
    level = "targets" if args.targets else "quick" if args.quick else "full"
    suites = args.suite.split(",") if args.suite else [
        s for s in SUITES if (s == "models" and (args.model or not args.op))
        or (s != "models" and (args.op or not args.model))]

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                          else [])
    failed = False
    for device in devices:
        dtype = DTYPES[args.dtype]
        backend = _backend(device)
        print(f"== {device}: {common.device_name(device)}; {common.versions()}; malloc: "
              f"{common.malloc_setting()}")
        isa = f"; CPU kernels' ISA: {effkernels.cpu_isa()}" if device == "cpu" else ""
        print(f"   effkernels backend: {backend}; available: "
              f"{effkernels.available_backends(device)}{isa}")
        ort = harness.ort_available() if device == "cpu" else "CPU only"
        todo = []
        for suite in suites:
            budget = BUDGET[level][suite] if args.compile_budget is None else args.compile_budget
            opts = SimpleNamespace(**{**vars(args), "device": device, "dtype": dtype,
                                      "ort": ort, "compile_budget": budget})
            mod = {"ops": ops, "blocks": blocks, "models": models}[suite]
            for case in mod.cases(opts):
                if suite != "models" and args.op and args.op not in case.op \
                        and args.op != suite:
                    continue
                todo.append((case, MIN_TIME[level][suite]))
        budgets = {s: harness.CompileBudget(BUDGET[level][s] if args.compile_budget is None
                                            else args.compile_budget) for s in SUITES}
        meta = {"timestamp": common.now(), "device": device,
                "device_name": common.device_name(device),
                "versions": common.versions() + (
                    f", malloc {common.malloc_setting()}, CPU kernels' ISA {effkernels.cpu_isa()}"
                    if device == "cpu" else ""),
                "threads": torch.get_num_threads(), "backend": backend, "dtype": args.dtype,
                "command": " ".join(["python -m bench.run"] + list(sys.argv[1:] if argv is None
                                                                    else argv))}
        path = common.csv_path(device)
        t0 = time.time()
        rows: List[dict] = []
        effkernels.set_backend(backend)
        try:
            for i, (case, min_time) in enumerate(todo):
                _progress(i, len(todo), case.label, t0)
                try:
                    case_rows = harness.run_case(case, device, min_time, budgets[case.suite],
                                                 measure_memory=not args.no_memory,
                                                 min_samples=3 if args.quick else 5)
                except Exception as e:  # noqa: BLE001 - building the case failed
                    case_rows = [{"suite": case.suite, "op": case.op, "shape": case.shape,
                                  "batch": case.batch, "mode": case.mode, "impl": harness.OURS,
                                  "verified": f"ERROR: building the case: "
                                              f"{type(e).__name__}: {e}"[:200]}]
                for r in case_rows:
                    if r.get("compile_s"):
                        msg = (f"   torch.compile warm-up ({r['impl']}) {r['op']} {r['shape']} "
                               f"N{r['batch']} {r['mode']}: {r['compile_s']:.1f} s (not timed)")
                        print(f"\r{msg:<90}", file=sys.stderr)
                case_rows = [{**meta, **r} for r in case_rows]
                common.append_rows(path, case_rows)  # per case: a killed run keeps its results
                rows += case_rows
        finally:
            effkernels.set_backend("auto")
        print(file=sys.stderr)
        print(table(rows))
        spent = {s: b.spent for s, b in budgets.items() if b.spent}
        print(f"({len(rows)} rows appended to {path.relative_to(common.RESULTS.parent.parent)}, "
              f"{time.time() - t0:.0f} s. {args.dtype}, {torch.get_num_threads()} threads. "
              f"Speed-up = baseline median / effkernels median, same run (>1: ours faster); "
              f"ours = effkernels on channels_last input; compile = torch.compile(inductor) of "
              f"the eager function/model on channels_last; compile time excluded, spent "
              f"{sum(sum(v.values()) for v in spent.values()):.0f} s; skip = not run (see the "
              f"CSV's note column); * = that baseline's result is outside the tolerance. Plots: python -m bench.plot {path.relative_to(common.RESULTS.parent.parent)})")
        bad = problems(rows)
        if bad:
            print("Verification problems (ours WRONG fails the run; a baseline's 'inexact' is "
                  "information):\n  " + "\n  ".join(bad))
        # Our implementation WRONG or failing is a failure; a baseline that fails is reported.
        failed |= any(r["impl"] in (harness.OURS, harness.OURS_COMPILE, harness.OURS_PREPACKED)
                      and str(r.get("verified", "")).startswith(("WRONG", "ERROR")) for r in rows)
    if failed:
        print("effkernels gave WRONG results or failed (see Problems above).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
