"""CPU inference of an inverted-residual block and of whole models: effkernels' fused block
(effkernels::inverted_residual_inference) vs PyTorch eager (channels_last and NCHW),
torch.compile and ONNX Runtime, in the same run.

The machine may be shared: the implementations are timed in interleaved rounds
(common.time_interleaved, as bench.run: ONNX Runtime's slices followed by a pause for its
spinning pool), and the table reports medians and the ratios of those medians, so that load
changes hit all implementations alike. Every implementation's output is checked against the
float64 reference first. bench.run --targets times the same block and models into the CSV the
README reports; this script adds --cpu-time and the per-batch/per-model selection.

    python -m bench.block_cpu                     # block, batch 1 and 8, 2 threads
    python -m bench.block_cpu --models            # also mobilenetv2_100, mobilenetv3_large_100,
                                                  # mixnet_s at 224x224
    python -m bench.block_cpu --no-compile        # skip torch.compile (slow to compile)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List

import torch

import effkernels
from effkernels import ops, reference

from . import common, harness
from .blocks import randomize_bn

CL = torch.channels_last
ORT = "onnxruntime"


def _add_ort(fns: Dict[str, Callable[[], object]], module: torch.nn.Module,
             x: torch.Tensor) -> None:
    """ONNX Runtime on the exported module (harness.ort_impl), when installed."""
    if harness.ort_available() is not None:  # the reason it is not
        return
    impl = harness.ort_impl(module, [x])
    impl.setup()
    fns[ORT] = lambda: impl.result()[0]


def _check(name: str, got: torch.Tensor, ref64: torch.Tensor, tol: float = 1e-4) -> None:
    err = (got.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    if not err <= tol * scale:
        raise SystemExit(f"{name}: WRONG, max error {err:.3g} (scale {scale:.3g})")


# ---- the block -------------------------------------------------------------------------------

def block_impls(n: int, compile_: bool, hw: int = 56, c: int = 24, t: int = 6):
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    block = randomize_bn(InvertedResidual(c, c, 1, t)).eval()
    seq = block.conv
    (e_conv, e_bn, _), (d_conv, d_bn, _), p_conv, p_bn = seq[0], seq[1], seq[2], seq[3]

    def stage(conv, bn):
        return [conv.weight.detach(), bn.weight.detach(), bn.bias.detach(), bn.running_mean,
                bn.running_var]

    expand, depthwise, project = stage(e_conv, e_bn), stage(d_conv, d_bn), stage(p_conv, p_bn)
    x = torch.randn(n, c, hw, hw)
    x_cl = x.contiguous(memory_format=CL)
    block_cl = randomize_bn(InvertedResidual(c, c, 1, t)).eval()
    block_cl.load_state_dict(block.state_dict())
    block_cl = block_cl.to(memory_format=CL)
    with torch.no_grad():
        ref = reference.inverted_residual(x.double(), [s.double() for s in expand],
                                          [s.double() for s in depthwise], [],
                                          [s.double() for s in project], act="relu6", skip=True)
    fns = {
        "effkernels": lambda: ops.inverted_residual(x_cl, expand, depthwise, [], project,
                                                    act="relu6", skip=True),
        "eager_cl": lambda: block_cl(x_cl),
        "eager_nchw": lambda: block(x),
    }
    if compile_:
        compiled = torch.compile(block_cl)
        fns["compile_cl"] = lambda: compiled(x_cl)
    _add_ort(fns, block, x)
    return fns, ref


# ---- whole models ----------------------------------------------------------------------------

def model_impls(name: str, n: int, compile_: bool, res: int = 224):
    import timm

    from effkernels import models

    torch.manual_seed(0)
    theirs = randomize_bn(timm.create_model(name)).eval()
    ours = models.create_model(name).eval()
    ours.load_state_dict(theirs.state_dict())
    ours = ours.to(memory_format=CL)
    theirs_cl = randomize_bn(timm.create_model(name)).eval()
    theirs_cl.load_state_dict(theirs.state_dict())
    theirs_cl = theirs_cl.to(memory_format=CL)
    x = torch.randn(n, 3, res, res)
    x_cl = x.contiguous(memory_format=CL)
    with torch.no_grad():
        ref = theirs.double()(x.double()).float().double()
        theirs.float()
    fns = {
        "effkernels": lambda: ours(x_cl),
        "eager_cl": lambda: theirs_cl(x_cl),
        "eager_nchw": lambda: theirs(x),
    }
    if compile_:
        compiled = torch.compile(theirs_cl)
        fns["compile_cl"] = lambda: compiled(x_cl)
    _add_ort(fns, theirs, x)
    return fns, ref


# ---- driver ----------------------------------------------------------------------------------

COLUMNS = ["effkernels", "eager_cl", "eager_nchw", "compile_cl", "onnxruntime"]


CLOCK = time.perf_counter


def measure(what: str, fns, ref, rounds: int, min_time: float, rows: List[dict],
            table: List[str]):
    with torch.inference_mode():
        for k, fn in fns.items():
            _check(f"{what} {k}", fn(), ref, tol=1e-4 if "block" in what else 2e-3)
        res = common.time_interleaved(fns, "cpu", min_time, rounds=rounds,
                                      settle={ORT: harness.SETTLE_S}, clock=CLOCK)
    ours = res["effkernels"]["median_ms"]
    cells = []
    for k in COLUMNS:
        if k in res:
            cells.append(f"{res[k]['median_ms']:8.3f}")
        else:
            cells.append(f"{'-':>8}")
    ratios = [f"{res[k]['median_ms'] / ours:6.2f}x" if k in res else f"{'-':>7}"
              for k in COLUMNS[1:]]
    table.append(f"{what:<34} " + " ".join(cells) + "   " + " ".join(ratios))
    stamp, dev, ver = common.now(), common.device_name("cpu"), common.versions()
    for k, r in res.items():
        rows.append({"timestamp": stamp, "device": "cpu", "device_name": dev, "versions": ver,
                     "suite": "block_cpu", "op": what.split(" ")[0], "shape": what,
                     "dtype": "float32", "mode": "inference", "impl": k, **r,
                     "speedup_vs": "" if k == "effkernels" else k,
                     "speedup": "" if k == "effkernels" else r["median_ms"] / ours,
                     "verified": "ok"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds of calls per implementation over all rounds")
    p.add_argument("--models", action="store_true", help="also the whole models")
    p.add_argument("--only-models", action="store_true")
    p.add_argument("--model-names", default="mobilenetv2_100,mobilenetv3_large_100,mixnet_s")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process CPU time instead of the wall clock: with "
                        "--threads 1 on a shared machine it ignores the time other processes "
                        "take the core (but not their cache pressure)")
    args = p.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    common.steady_malloc()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {common.device_name('cpu')}; {common.versions()}; malloc: "
          f"{common.malloc_setting()}; effkernels backend "
          f"{effkernels.available_backends('cpu')['cpu']}", file=sys.stderr)
    header = (f"{'case (fp32, channels_last)':<34} " + " ".join(f"{c[:8]:>8}" for c in COLUMNS)
              + "   " + " ".join(f"{'/' + c[:6]:>7}" for c in COLUMNS[1:]))
    table = [header, "(ms: medians of interleaved rounds; /x = x's time / effkernels' time)"]
    rows: List[dict] = []
    if not args.only_models:
        for n in batches:
            fns, ref = block_impls(n, not args.no_compile)
            measure(f"block mbv2 24x56x56 t6 s1 N={n}", fns, ref, args.rounds, args.min_time,
                    rows, table)
            print(table[-1], file=sys.stderr)
    if args.models or args.only_models:
        for name in args.model_names.split(","):
            for n in batches:
                fns, ref = model_impls(name, n, not args.no_compile)
                measure(f"{name} 224 N={n}", fns, ref, args.rounds, args.min_time, rows,
                        table)
                print(table[-1], file=sys.stderr)
    print("\n".join(table))
    if not args.no_csv:
        common.append_rows(common.csv_path("cpu"), rows)


if __name__ == "__main__":
    main()
