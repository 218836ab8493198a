"""CPU inference of an inverted-residual block and of whole models: effkernels' fused block
(effkernels::inverted_residual_inference) vs PyTorch eager (channels_last and NCHW),
torch.compile and ONNX Runtime, in the same run.

The machine may be shared: every implementation is timed in interleaved rounds (each round
runs every implementation `--inner` times), and the table reports medians over the rounds and
the ratios of those medians, so that load changes hit all implementations alike. Every
implementation's output is checked against the float64 reference first.

    python -m bench.block_cpu                     # block, batch 1 and 8, 2 threads
    python -m bench.block_cpu --models            # also mobilenetv2_100, mobilenetv3_large_100,
                                                  # mixnet_s at 224x224
    python -m bench.block_cpu --no-compile        # skip torch.compile (slow to compile)
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch

import effkernels
from effkernels import ops, reference

from . import common

CL = torch.channels_last


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters (fresh BNs are the identity)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def _ort_session(module: torch.nn.Module, x: torch.Tensor, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x.contiguous(),), f, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])
    xn = x.contiguous().numpy()

    def run():
        return torch.from_numpy(sess.run(None, {"x": xn})[0])
    return run


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, inner: int,
                warmup: int = 3, clock=time.perf_counter) -> Dict[str, Dict[str, float]]:
    """Median / p20 / p80 milliseconds per call over `rounds` interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # no fixed "who runs after whom"
        for k in order:
            t0 = clock()
            for _ in range(inner):
                fns[k]()
            samples[k].append((clock() - t0) * 1e3 / inner)
    out = {}
    for k, s in samples.items():
        q = statistics.quantiles(s, n=10) if len(s) > 1 else [s[0]] * 9
        out[k] = {"median_ms": statistics.median(s), "p20_ms": q[1], "p80_ms": q[7]}
    return out


def _check(name: str, got: torch.Tensor, ref64: torch.Tensor, tol: float = 1e-4) -> None:
    err = (got.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    if not err <= tol * scale:
        raise SystemExit(f"{name}: WRONG, max error {err:.3g} (scale {scale:.3g})")


# ---- the block -------------------------------------------------------------------------------

def block_impls(n: int, threads: int, compile_: bool, hw: int = 56, c: int = 24, t: int = 6):
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    block = _randomize_bn(InvertedResidual(c, c, 1, t)).eval()
    seq = block.conv
    (e_conv, e_bn, _), (d_conv, d_bn, _), p_conv, p_bn = seq[0], seq[1], seq[2], seq[3]

    def stage(conv, bn):
        return [conv.weight.detach(), bn.weight.detach(), bn.bias.detach(), bn.running_mean,
                bn.running_var]

    expand, depthwise, project = stage(e_conv, e_bn), stage(d_conv, d_bn), stage(p_conv, p_bn)
    x = torch.randn(n, c, hw, hw)
    x_cl = x.contiguous(memory_format=CL)
    block_cl = _randomize_bn(InvertedResidual(c, c, 1, t)).eval()
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
    ort_run = _ort_session(block, x, threads)
    if ort_run is not None:
        fns["onnxruntime"] = ort_run
    return fns, ref


# ---- whole models ----------------------------------------------------------------------------

def model_impls(name: str, n: int, threads: int, compile_: bool, res: int = 224):
    import timm

    from effkernels import models

    torch.manual_seed(0)
    theirs = _randomize_bn(timm.create_model(name)).eval()
    ours = models.create_model(name).eval()
    ours.load_state_dict(theirs.state_dict())
    ours = ours.to(memory_format=CL)
    theirs_cl = _randomize_bn(timm.create_model(name)).eval()
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
    ort_run = _ort_session(theirs, x, threads)
    if ort_run is not None:
        fns["onnxruntime"] = ort_run
    return fns, ref


# ---- driver ----------------------------------------------------------------------------------

COLUMNS = ["effkernels", "eager_cl", "eager_nchw", "compile_cl", "onnxruntime"]


CLOCK = time.perf_counter


def measure(what: str, fns, ref, rounds: int, inner: int, rows: List[dict], table: List[str]):
    with torch.inference_mode():
        for k, fn in fns.items():
            _check(f"{what} {k}", fn(), ref, tol=1e-4 if "block" in what else 2e-3)
        res = interleaved(fns, rounds, inner, clock=CLOCK)
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
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--inner", type=int, default=5)
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
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {common.device_name('cpu')}; {common.versions()}; effkernels backend "
          f"{effkernels.available_backends('cpu')['cpu']}", file=sys.stderr)
    header = (f"{'case (fp32, channels_last)':<34} " + " ".join(f"{c[:8]:>8}" for c in COLUMNS)
              + "   " + " ".join(f"{'/' + c[:6]:>7}" for c in COLUMNS[1:]))
    table = [header, "(ms: medians over interleaved rounds; /x = x's time / effkernels' time)"]
    rows: List[dict] = []
    if not args.only_models:
        for n in batches:
            fns, ref = block_impls(n, args.threads, not args.no_compile)
            measure(f"block mbv2 24x56x56 t6 s1 N={n}", fns, ref, args.rounds, args.inner,
                    rows, table)
            print(table[-1], file=sys.stderr)
    if args.models or args.only_models:
        for name in args.model_names.split(","):
            for n in batches:
                fns, ref = model_impls(name, n, args.threads, not args.no_compile)
                measure(f"{name} 224 N={n}", fns, ref, max(11, args.rounds // 3),
                        max(1, args.inner // 2) if n > 1 else args.inner, rows, table)
                print(table[-1], file=sys.stderr)
    print("\n".join(table))
    if not args.no_csv:
        common.append_rows(common.csv_path("cpu"), rows)


if __name__ == "__main__":
    main()
