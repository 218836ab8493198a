"""Issue 4's GPU targets that `bench.run --targets` does not measure, in one run:

  python -m bench.gpu_targets [--dtype float16] [--csv PATH]
  python -m bench.gpu_targets --device cpu --small      # a dry run of this script (CI, no GPU)

- the copy bandwidth (a 1 GiB device-to-device copy, bytes read + written), and the depthwise
  forward's bytes (input read once, output written once) over its time, as a share of it;
- the depthwise weight gradient against PyTorch's native depthwise kernel and cuDNN (ours is
  the whole backward op: dx, dweight and the BN gradients; theirs the weight gradient alone);
- the pointwise forward against cuBLAS's GEMM alone (ours also applies BN and the activation);
- the C++ CUDA kernels against the Triton kernels, op by op (eval forward, training forward,
  backward) at the same shapes, and the eval-mode block: each backend's fused kernel, its
  three ops composed and effkernels.ops.inverted_residual (the path users get), against
  PyTorch eager.
Shapes: issue 4's (N=64, channels_last). Times are medians of triton.testing's
do_bench_cudagraph (CUDA-graph replay: GPU time without Python's launch overhead), or of
do_bench where a graph cannot be captured (the `timer` column says which). Each op's output is
checked against PyTorch's (float32) before it is timed; a mismatch is printed as WRONG.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import common, ops

CL = torch.channels_last
ACT = "relu6"


def _time(fn: Callable[[], object], device: str) -> tuple:
    """(median ms, timer)."""
    if device != "cuda":
        return common.time_fn(fn, device, min_time=0.05, min_samples=3)["median_ms"], "cpu"
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # JIT compiles and caches outside any capture
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=60, return_mode="median"), "graph"
    except Exception:  # noqa: BLE001 - not capturable (a host sync, another stream)
        torch.cuda.synchronize()
        return do_bench(fn, rep=60, return_mode="median"), "launch"


EAGER_BWD = "eager_cl (autograd)"


def _eager_backward(forward, inputs, grad_out) -> Callable[[], object]:
    """The backward of PyTorch eager's forward(*inputs) (training mode) for grad_out: every
    input's gradient, the graph kept for the next call."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = forward(*leaves)
    return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)


def _bn(c, device):
    """(gamma, beta, running mean, running var) of c channels, as the op benchmarks draw them."""
    return [t.to(device) for t in ops._bn(c)]


def _eager_act(y):
    return F.relu6(y)


class Run:
    def __init__(self, device: str, dtype: torch.dtype,
                 on_row: Optional[Callable[[dict], None]] = None):
        self.device, self.dtype, self.rows = device, dtype, []
        self.on_row = on_row  # called with each row as it is measured

    def _add(self, row: dict) -> None:
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def time(self, target: str, impl: str, fn: Callable[[], object], *,
             moved_bytes: Optional[int] = None, check: Optional[tuple] = None) -> Optional[float]:
        """Times fn (after checking check=(got_fn, expected, atol) when given)."""
        row = {"target": target, "impl": impl}
        try:
            if check is not None:
                got_fn, expected, atol = check
                got = got_fn().float()
                err = (got - expected.float()).abs().max().item()
                row["max_abs_err"] = f"{err:.3g}"
                if not err <= atol:  # NaN fails too
                    row["verified"] = f"WRONG (max abs err {err:.3g} > {atol})"
                    self._add(row)
                    return None
            ms, timer = _time(fn, self.device)
            row.update(median_ms=ms, timer=timer)
            if moved_bytes:
                row["GB_per_s"] = moved_bytes / ms / 1e6
        except Exception as e:  # noqa: BLE001 - report and go on
            row["verified"] = f"ERROR {type(e).__name__}: {e}"[:160]
        self._add(row)
        return row.get("median_ms")


def _backends(device):
    import effkernels

    avail = effkernels.available_backends(device)
    if device == "cuda":
        names = [("cuda", "effkernels"), ("triton", "effkernels_triton")]
    else:
        names = [("cpu", "effkernels")]
    out = {}
    for name, ns in names:
        if avail.get(name) == "available":
            out[name] = getattr(torch.ops, ns)
        else:
            print(f"   backend {name}: {avail.get(name)}", file=sys.stderr)
    return out


@contextlib.contextmanager
def _env(name: str, value: str):
    """os.environ[name] = value inside the block (the C++ side reads some switches per call, so
    a CUDA graph captured inside keeps the kernels chosen then)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _dw_eval_rows(run: Run, target: str, backends, args, pad, ref, tol, moved,
                  triton_configs: bool = False) -> None:
    """Each backend's eval-mode dwconv_bn_act; for cuda also its tiled kernel (EFFK_DW_DIRECT=0,
    csrc/cuda/dw_host.cu), which the direct kernel replaced for these shapes; with
    triton_configs, Triton's with each of its tile configs forced (BLOCK_W x BLOCK_C; its
    default row is one of them)."""
    eps = 1e-5
    for name, ns in backends.items():
        def fn(ns=ns):
            return ns.dwconv_bn_act(*args, 1, pad, 1, ACT, False, eps)[0]
        run.time(target, name, fn, moved_bytes=moved, check=(fn, ref, tol))
        if name == "cuda":
            with _env("EFFK_DW_DIRECT", "0"):
                run.time(target, "cuda tiled", fn, moved_bytes=moved, check=(fn, ref, tol))
        if name == "triton" and triton_configs:  # each tile config, forced
            from effkernels.triton_kernels import dwconv_bn_act as tdw

            for i, cfg in enumerate(tdw.CONFIGS):
                tdw._FORCED_CONFIG = i
                try:
                    run.time(target, f"triton {cfg['BLOCK_W']}x{cfg['BLOCK_C']}", fn,
                             moved_bytes=moved, check=(fn, ref, tol))
                finally:
                    tdw._FORCED_CONFIG = None


def measure(run: Run, small: bool) -> None:
    dev, dt = run.device, run.dtype
    backends = _backends(dev)
    n, c, h = (2, 16, 12) if small else (64, 144, 56)
    eps = 1e-5
    tol = 0.05 if dt != torch.float32 else 1e-3

    # --- copy bandwidth -----------------------------------------------------------------
    numel = (1 << 20) if small else (1 << 29)  # 1 GiB of fp16
    src = torch.randn(numel, device=dev, dtype=torch.float16)
    dst = torch.empty_like(src)
    run.time("copy 1 GiB", "torch copy_", lambda: dst.copy_(src), moved_bytes=2 * src.nbytes)
    del src, dst

    # --- depthwise k3 forward (eval) ----------------------------------------------------
    x = torch.randn(n, c, h, h, device=dev, dtype=dt).contiguous(memory_format=CL)
    w = (torch.randn(c, 1, 3, 3, device=dev) / 3).to(dt)
    g, b, rm, rv = _bn(c, dev)
    moved = 2 * x.nbytes

    def eager_dw():
        return _eager_act(F.batch_norm(F.conv2d(x, w, None, 1, 1, 1, c), rm, rv, g.to(dt),
                                       b.to(dt), False, 0.0, eps))

    ref = eager_dw().float()
    target = f"dw fwd eval C{c} {h}x{h} k3 N{n}"
    run.time(target, "eager_cl (cuDNN)", eager_dw, moved_bytes=moved)
    _dw_eval_rows(run, target, backends, (x, w, g, b, rm, rv), 1, ref, tol, moved,
                  triton_configs=True)

    # --- depthwise k5 forward (eval), a MobileNetV3 / EfficientNet layer -----------------
    c5, h5 = (16, 12) if small else (240, 28)
    x5 = torch.randn(n, c5, h5, h5, device=dev, dtype=dt).contiguous(memory_format=CL)
    w5 = (torch.randn(c5, 1, 5, 5, device=dev) / 5).to(dt)
    g5, b5, rm5, rv5 = _bn(c5, dev)

    def eager_dw5():
        return _eager_act(F.batch_norm(F.conv2d(x5, w5, None, 1, 2, 1, c5), rm5, rv5,
                                       g5.to(dt), b5.to(dt), False, 0.0, eps))

    target = f"dw fwd eval C{c5} {h5}x{h5} k5 N{n}"
    run.time(target, "eager_cl (cuDNN)", eager_dw5, moved_bytes=2 * x5.nbytes)
    _dw_eval_rows(run, target, backends, (x5, w5, g5, b5, rm5, rv5), 2, eager_dw5().float(),
                  tol, 2 * x5.nbytes)
    del x5

    # --- depthwise training forward and backward ---------------------------------------
    target = f"dw fwd train C{c} {h}x{h} k3 N{n}"
    for name, ns in backends.items():
        run.time(target, name, lambda ns=ns: ns.dwconv_bn_act(x, w, g, b, None, None, 1, 1, 1,
                                                                ACT, True, eps))
    go = torch.randn_like(x)
    mean = x.float().mean((0, 2, 3))  # any statistics serve for timing
    var = x.float().var((0, 2, 3), unbiased=False) + 0.5
    target = f"dw bwd (dx, dw, dBN) C{c} {h}x{h} k3 N{n}"
    for name, ns in backends.items():
        run.time(target, name, lambda ns=ns: ns.dwconv_bn_act_backward(
            go, x, w, g, b, mean, var, 1, 1, 1, ACT, True, eps))
    run.time(target, EAGER_BWD, _eager_backward(
        lambda xr, wr, gr, br: _eager_act(F.batch_norm(F.conv2d(xr, wr, None, 1, 1, 1, c), None,
                                                       None, gr, br, True, 0.0, eps)),
        (x, w, g.to(dt), b.to(dt)), go))

    # PyTorch's weight gradient alone (output_mask), with cuDNN and with its native kernel.
    target = f"dweight alone C{c} {h}x{h} k3 N{n}"
    for label, xi, cudnn in (("cuDNN, channels_last", x, True),
                             ("native, NCHW (cuDNN off)", x.contiguous(), False)):
        go_i = go.contiguous(memory_format=CL if xi is x else torch.contiguous_format)

        def fn(xi=xi, go_i=go_i, cudnn=cudnn):
            with torch.backends.cudnn.flags(enabled=cudnn):
                return torch.ops.aten.convolution_backward(
                    go_i, xi, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], c,
                    [False, True, False])[1]
        run.time(target, label, fn)

    # --- pointwise forward (eval): 24 -> 144 at 56x56 --------------------------------
    cin, cout = (8, 16) if small else (24, 144)
    xp = torch.randn(n, cin, h, h, device=dev, dtype=dt).contiguous(memory_format=CL)
    wp = (torch.randn(cout, cin, 1, 1, device=dev) / cin ** 0.5).to(dt)
    gp, bp, rmp, rvp = _bn(cout, dev)
    a2d = xp.permute(0, 2, 3, 1).reshape(-1, cin)  # a view: channels_last rows
    b2d = wp.view(cout, cin).t()
    target = f"pw fwd eval {cin}->{cout} {h}x{h} N{n}"
    run.time(target, "cuBLAS GEMM alone", lambda: torch.mm(a2d, b2d),
             moved_bytes=xp.nbytes + xp.nbytes // cin * cout)

    def eager_pw():
        return _eager_act(F.batch_norm(F.conv2d(xp, wp), rmp, rvp, gp.to(dt), bp.to(dt), False,
                                       0.0, eps))
    ref = eager_pw().float()
    run.time(target, "eager_cl (cuDNN)", eager_pw)
    for name, ns in backends.items():
        def fn(ns=ns):
            return ns.pwconv_bn_act(xp, wp, gp, bp, rmp, rvp, None, ACT, False, eps)[0]
        run.time(target, name, fn, moved_bytes=xp.nbytes + xp.nbytes // cin * cout,
                 check=(fn, ref, tol))
    target = f"pw fwd train {cin}->{cout} {h}x{h} N{n}"
    for name, ns in backends.items():
        run.time(target, name, lambda ns=ns: ns.pwconv_bn_act(xp, wp, gp, bp, None, None, None,
                                                                ACT, True, eps))
    gop = torch.randn(n, cout, h, h, device=dev, dtype=dt).contiguous(memory_format=CL)
    meanp = torch.zeros(cout, device=dev)
    varp = torch.ones(cout, device=dev)
    target = f"pw bwd {cin}->{cout} {h}x{h} N{n}"
    for name, ns in backends.items():
        run.time(target, name, lambda ns=ns: ns.pwconv_bn_act_backward(
            gop, xp, wp, gp, bp, meanp, varp, None, ACT, True, eps))
    run.time(target, EAGER_BWD, _eager_backward(
        lambda xr, wr, gr, br: _eager_act(F.batch_norm(F.conv2d(xr, wr), None, None, gr, br,
                                                       True, 0.0, eps)),
        (xp, wp, gp.to(dt), bp.to(dt)), gop))

    # --- mixconv (MixNet-M-like: 4 groups, k 3/5/7/9) -----------------------------------
    cm, hm = (16, 10) if small else (192, 28)
    xm = torch.randn(n, cm, hm, hm, device=dev, dtype=dt).contiguous(memory_format=CL)
    ks = (3, 5, 7, 9)
    wm = [(torch.randn(cm // 4, 1, k, k, device=dev) / k).to(dt) for k in ks]
    gm, bm, rmm, rvm = _bn(cm, dev)

    def eager_mix():
        parts = torch.split(xm, cm // 4, 1)
        y = torch.cat([F.conv2d(p, wk, None, 1, k // 2, 1, cm // 4)
                       for p, wk, k in zip(parts, wm, ks)], 1)
        return _eager_act(F.batch_norm(y, rmm, rvm, gm.to(dt), bm.to(dt), False, 0.0, eps))
    ref = eager_mix().float()
    target = f"mixconv fwd eval C{cm} {hm}x{hm} k3,5,7,9 N{n}"
    run.time(target, "eager_cl (cuDNN)", eager_mix, moved_bytes=2 * xm.nbytes)
    for name, ns in backends.items():
        def fn(ns=ns):
            return ns.mixconv_bn_act(xm, wm, gm, bm, rmm, rvm, 1, 1, ACT, False, eps)[0]
        run.time(target, name, fn, moved_bytes=2 * xm.nbytes, check=(fn, ref, tol))
    gom = torch.randn_like(xm)
    target = f"mixconv bwd C{cm} {hm}x{hm} k3,5,7,9 N{n}"
    for name, ns in backends.items():
        run.time(target, name, lambda ns=ns: ns.mixconv_bn_act_backward(
            gom, xm, wm, gm, bm, torch.zeros(cm, device=dev), torch.ones(cm, device=dev), 1, 1,
            ACT, True, eps))

    # --- the eval-mode block (C24 t6 k3 56x56, skip): each backend's fused kernel, its three
    # ops composed, and effkernels.ops.inverted_residual (what users get: on CUDA tensors the
    # ops composed, unless EFFK_FUSED_BLOCK=1, since the fused kernels were the slower) ------
    import effkernels

    cb, hid = (8, 48) if small else (24, 144)
    xb = torch.randn(n, cb, h, h, device=dev, dtype=dt).contiguous(memory_format=CL)

    def stage(cout, cin, k):
        return [(torch.randn(cout, cin, k, k, device=dev) / (cin * k * k) ** 0.5).to(dt)] \
            + _bn(cout, dev)
    e, d, pj = stage(hid, cb, 1), stage(hid, 1, 3), stage(cb, hid, 1)

    def eager_block():
        def bn(y, s):
            return F.batch_norm(y, s[3], s[4], s[1].to(dt), s[2].to(dt), False, 0.0, eps)
        y = _eager_act(bn(F.conv2d(xb, e[0]), e))
        y = _eager_act(bn(F.conv2d(y, d[0], None, 1, 1, 1, hid), d))
        return bn(F.conv2d(y, pj[0]), pj) + xb
    ref = eager_block().float()
    target = f"block fwd eval C{cb} t6 k3 {h}x{h} N{n}"
    run.time(target, "eager_cl (cuDNN)", eager_block)
    with torch.no_grad():
        for name, ns in backends.items():
            def composed(ns=ns):
                y = ns.pwconv_bn_act(xb, *e, None, ACT, False, eps)[0]
                y = ns.dwconv_bn_act(y, *d, 1, 1, 1, ACT, False, eps)[0]
                return ns.pwconv_bn_act(y, *pj, xb, "identity", False, eps)[0]
            run.time(target, f"{name} composed", composed, check=(composed, ref, tol))

            def fused(name=name, ns=ns):  # the op itself: ops.inverted_residual composes
                if name == "triton":
                    return ns.inverted_residual(xb, e, d, [], pj, 1, 1, ACT, "relu", "sigmoid",
                                                True, False, eps)[0]
                return ns.inverted_residual_inference(xb, e, d, [], pj, 1, 1, ACT, "relu",
                                                      "sigmoid", True, eps)
            run.time(target, f"{name} fused", fused, check=(fused, ref, tol))

            def api(name=name):
                with effkernels.backend(name):
                    return effkernels.ops.inverted_residual(xb, e, d, [], pj, act=ACT)
            run.time(target, f"{name} ops.inverted_residual", api, check=(api, ref, tol))

    # --- the block's training step (forward with batch statistics + backward): what
    # ops.inverted_residual does on each backend (triton: its fused block; cuda: the C++
    # composite of its ops), each backend's ops composed in Python, and eager ------------
    target = f"block train step C{cb} t6 k3 {h}x{h} N{n}"
    gob = torch.randn_like(xb)

    def step(forward):
        """forward(x, expand, depthwise, project) and the gradients of x and of every stage's
        weight, bn_weight, bn_bias (the running statistics updated in place on each call)."""
        xr = xb.detach().requires_grad_()
        stages = [[t.detach().clone().requires_grad_(i < 3) for i, t in enumerate(st)]
                  for st in (e, d, pj)]
        leaves = [xr] + [t for st in stages for t in st[:3]]
        return lambda: torch.autograd.grad(forward(xr, *stages), leaves, gob)

    def eager_train(xr, e_, d_, p_):
        def bn(y, s):
            return F.batch_norm(y, s[3], s[4], s[1], s[2], True, 0.1, eps)
        y = _eager_act(bn(F.conv2d(xr, e_[0]), e_))
        y = _eager_act(bn(F.conv2d(y, d_[0], None, 1, 1, 1, hid), d_))
        return bn(F.conv2d(y, p_[0]), p_) + xr
    run.time(target, EAGER_BWD, step(eager_train))
    for name in backends:
        def api_train(xr, e_, d_, p_, name=name):
            with effkernels.backend(name):
                return effkernels.ops.inverted_residual(xr, e_, d_, [], p_, act=ACT,
                                                        training=True)
        run.time(target, f"{name} ops.inverted_residual", step(api_train))

        def composed_train(xr, e_, d_, p_, name=name):
            with effkernels.backend(name):
                y = effkernels.ops.pwconv_bn_act(xr, *e_, act=ACT, training=True)
                y = effkernels.ops.dwconv_bn_act(y, *d_, act=ACT, training=True)
                return effkernels.ops.pwconv_bn_act(y, *p_, act="identity", residual=xr,
                                                    training=True)
        run.time(target, f"{name} composed", step(composed_train))


def table(rows: List[dict]) -> str:
    lines = [f"{'target':<44} {'impl':<30} {'median ms':>10} {'GB/s':>8}  timer / check"]
    for r in rows:
        ms = f"{r['median_ms']:.4f}" if "median_ms" in r else "-"
        gbs = f"{r['GB_per_s']:.0f}" if "GB_per_s" in r else ""
        note = r.get("verified") or r.get("timer", "")
        lines.append(f"{r['target']:<44} {r['impl']:<30} {ms:>10} {gbs:>8}  {note}")
    return "\n".join(lines)


def summary(rows: List[dict]) -> str:
    """Issue 4's ratios, from the rows of one run."""
    by: Dict[tuple, float] = {(r["target"], r["impl"]): r["median_ms"] for r in rows
                              if "median_ms" in r}
    gbs = {(r["target"], r["impl"]): r.get("GB_per_s") for r in rows}
    out = []

    def ratio(t, slow, fast):
        a, b = by.get((t, slow)), by.get((t, fast))
        return f"{a / b:.2f}x" if a and b else "n/a"

    copy = next((v for (t, _), v in gbs.items() if t.startswith("copy") and v), None)
    for t in dict.fromkeys(r["target"] for r in rows):
        if t.startswith("dw fwd eval"):
            ours = gbs.get((t, "cuda"))
            share = f"{ours / copy:.0%}" if ours and copy else "n/a"
            out.append(f"{t}: cuda at {share} of the copy bandwidth (target >= 80%); "
                       f"{ratio(t, 'eager_cl (cuDNN)', 'cuda')} eager cuDNN (target >= 2x); "
                       f"{ratio(t, 'cuda tiled', 'cuda')} its tiled kernel")
        if t.startswith("dw bwd"):
            d = t.replace("dw bwd (dx, dw, dBN)", "dweight alone")
            for label, want in (("native, NCHW (cuDNN off)", "5x"),
                                ("cuDNN, channels_last", "2x")):
                a, b = by.get((d, label)), by.get((t, "cuda"))
                r = f"{a / b:.2f}x" if a and b else "n/a"
                out.append(f"{t}: cuda's whole backward vs {label} dweight alone: {r} "
                           f"(target >= {want})")
        if t.startswith("pw fwd eval"):
            a, b = by.get((t, "cuda")), by.get((t, "cuBLAS GEMM alone"))
            r = f"{a / b:.2f}x" if a and b else "n/a"
            out.append(f"{t}: cuda takes {r} cuBLAS's GEMM time (target <= 1.2x)")
        if t.startswith("block fwd"):
            for b in ("cuda", "triton"):
                for how in ("fused", "composed", "ops.inverted_residual"):
                    out.append(f"{t}: {b} {how} {ratio(t, 'eager_cl (cuDNN)', f'{b} {how}')} "
                               f"eager channels_last (target >= 4x)")
        if (t, EAGER_BWD) in by:
            impls = [f"{b} {how}" for b in ("cuda", "triton")
                     for how in ("ops.inverted_residual", "composed")] \
                if t.startswith("block train") else ["cuda", "triton"]
            for b in impls:
                out.append(f"{t}: {b} {ratio(t, EAGER_BWD, b)} PyTorch eager's "
                           f"{'step' if t.startswith('block') else 'backward'} (>1: ours faster)")
        if (t, "triton") in by or (t, "cuda") in by:
            out.append(f"{t}: cuda vs triton {ratio(t, 'triton', 'cuda')} (>1: cuda faster)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--small", action="store_true", help="tiny shapes (a dry run of the script)")
    p.add_argument("--csv", default=None, help="default: bench/results/targets/<device>-<date>"
                                               ".csv (beside, not among, bench.run's CSVs)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_targets: no CUDA device here", file=sys.stderr)
        return 2
    # Each row goes to the CSV (and the log) as it is measured: a run cut by its time limit
    # keeps what it measured.
    path = Path(args.csv) if args.csv else (
        common.RESULTS / "targets" / f"{args.device}-{common.now()[:10]}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"timestamp": common.now(), "device_name": common.device_name(args.device),
             "versions": common.versions(), "dtype": args.dtype}
    keys = list(stamp) + ["target", "impl", "median_ms", "GB_per_s", "timer", "max_abs_err",
                          "verified"]
    new = not path.exists()
    with path.open("a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        if new:
            wr.writeheader()

        def on_row(row):
            wr.writerow({**stamp, **row})
            f.flush()
            print(table([row]).splitlines()[1], flush=True)

        run = Run(args.device, getattr(torch, args.dtype), on_row)
        print(f"== {common.device_name(args.device)}; {common.versions()}; {args.dtype}",
              flush=True)
        print(table([]), flush=True)  # the header; the rows come as they are measured
        measure(run, args.small)
    print(summary(run.rows))
    print(f"wrote {path}")
    return 1 if any("verified" in r for r in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
