"""The benchmark harness shared by the op, block and model suites.

A Case is one (suite, op/model, shape, batch, mode) measurement point; Case.build() makes its
implementations lazily (so that a long run holds one case's tensors at a time). For each case
the harness

  1. computes the reference result (float64 reference ops, or the timm/torch module in float64
     or float32),
  2. for every implementation: sets it up (torch.compile warm-up, ONNX export; the time is
     printed and recorded, never part of the timing), verifies its result against the
     reference — a wrong one is recorded as WRONG and not timed
     (a baseline outside the tolerance is marked "inexact" and still timed: it is PyTorch or
     ONNX Runtime itself),
  3. times the verified implementations together, in interleaved rounds (CPU), then measures
     each one's peak memory,
  4. returns one CSV row per implementation; baseline rows carry the speed-up of effkernels
     over them (baseline median / effkernels median).
"""
from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import common

OURS = "effkernels"
# Column order of the printed table and the plots: PyTorch eager NCHW and channels_last,
# torch.compile (inductor) of the eager function/model, ONNX Runtime (CPU), and, with
# --compile-ours, torch.compile of our model; on the CPU in eval mode, our block/model with
# effkernels.nn.prepack_for_inference (weights packed once, as ONNX Runtime packs them).
BASELINES = ("eager_nchw", "eager_cl", "compile", "onnxruntime")
OURS_COMPILE = "effkernels_compile"
OURS_PREPACKED = "effkernels_prepacked"
IMPLS = BASELINES + (OURS, OURS_COMPILE, OURS_PREPACKED)

# Verification tolerance (relative to max |reference|), added to twice PyTorch's own error at
# the same precision (flash-attention's rule), so deep train-mode nets are judged against
# PyTorch's rounding noise, not an absolute number.
SETTLE_S = 0.05  # pause after an own_threads slice (0.02 s was not enough for ORT's pool)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Impl:
    name: str
    run: Callable[[], object]                       # the timed call
    result: Callable[[], Sequence[torch.Tensor]]    # output (+ grads) for verification
    setup: Optional[Callable[[], None]] = None      # compile warm-up / export, untimed
    compiles: bool = False                          # setup counts against the compile budget
    # Runs on a thread pool of its own whose idle threads spin for a while after a call (ONNX
    # Runtime): in the interleaved rounds its slices are followed by an untimed pause
    # (SETTLE_S), else the spinning threads take the cores from the next function.
    own_threads: bool = False
    note: str = ""


@dataclass
class Built:
    impls: List[Impl]
    reference: Callable[[], Sequence[torch.Tensor]]  # float64 (or float32) reference results
    tol: float = 1e-4
    noise_from: str = "eager_nchw"  # PyTorch's own error at this precision: that impl's error
    skipped: Dict[str, str] = field(default_factory=dict)  # impl -> why not run


@dataclass
class Case:
    suite: str           # ops | blocks | models
    op: str              # op name, block name or model name
    shape: str           # layer shape without the batch
    batch: int
    mode: str            # fwd | bwd | fwd+bwd (ops, blocks); eval | train-step (models)
    build: Callable[[], Built]
    items: int = 0       # images per call, for items_per_s (models)

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape} N{self.batch} {self.mode}"


class CompileBudget:
    """Seconds of torch.compile warm-up allowed per key (a suite and op/model kind); once spent,
    later compile baselines of that key are skipped (and say so) to keep the run bounded."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.spent: Dict[str, float] = {}

    def allows(self, key: str) -> bool:
        return self.spent.get(key, 0.0) < self.seconds

    def charge(self, key: str, seconds: float) -> None:
        self.spent[key] = self.spent.get(key, 0.0) + seconds


def configure_dynamo() -> None:
    """Many cases compile closures of the same code object: without a high limit dynamo would
    silently fall back to eager after 8 recompiles (the harness also resets between cases)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)


def rel_err(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max over tensors of max|a - r| / max(max|r|, 1e-6), in float64; inf on a NaN/inf the
    reference lacks or a shape mismatch."""
    if len(results) != len(reference):
        return math.inf
    worst = 0.0
    for a, r in zip(results, reference):
        a = a.detach().to("cpu", torch.float64)
        r = r.detach().to("cpu", torch.float64)
        if a.shape != r.shape or (not torch.isfinite(a).all() and torch.isfinite(r).all()):
            return math.inf
        worst = max(worst, ((a - r).abs().max() / r.abs().max().clamp_min(1e-6)).item())
    return worst


# ---------------------------------------------------------------------------------------------
# Implementations of one function f(*inputs) in the three training modes.

def fwd_impl(name: str, fn: Callable, inputs: Sequence, **kw) -> Impl:
    """Inference: fn(*inputs) under torch.no_grad."""
    def run():
        with torch.no_grad():
            return fn(*inputs)

    return Impl(name, run, lambda: [run()], setup=run if kw.get("compiles") else None, **kw)


def grad_impl(name: str, fn: Callable, inputs: Sequence, wrt: Sequence[torch.Tensor],
              dy: torch.Tensor, mode: str, **kw) -> Impl:
    """Training: mode 'fwd+bwd' times fn(*inputs) and the gradients w.r.t. `wrt`; 'bwd' runs
    the forward once and times the backward alone (retain_graph)."""
    def result():
        out = fn(*inputs)
        return [out.detach()] + list(torch.autograd.grad(out, wrt, dy))

    if mode == "fwd+bwd":
        def run():
            return torch.autograd.grad(fn(*inputs), wrt, dy)
    elif mode == "bwd":
        state = {}

        def run():
            if "out" not in state:
                state["out"] = fn(*inputs)
            return torch.autograd.grad(state["out"], wrt, dy, retain_graph=True)
    else:
        raise ValueError(mode)
    return Impl(name, run, result, setup=run if kw.get("compiles") else None, **kw)


def compiled(fn: Callable, **kw) -> Callable:
    return torch.compile(fn, backend="inductor", fullgraph=True, **kw)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime (CPU, float32, inference only)

def ort_available() -> Optional[str]:
    try:
        import onnxruntime  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime not installed ({type(e).__name__})"
    return None


def ort_impl(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Impl:
    """Exports `module` (NCHW inputs) with torch.onnx.export and runs it with onnxruntime,
    intra-op threads = torch.get_num_threads(). Setup = export + session creation."""
    import onnxruntime as ort

    state = {}
    feeds_np = [t.detach().contiguous().cpu().numpy() for t in inputs]

    def setup():
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: the dynamo one needs onnxscript, not a dependency here.
            torch.onnx.export(module, tuple(inputs), buf, dynamo=False,
                              input_names=[f"in{i}" for i in range(len(inputs))])
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        state["sess"] = sess
        state["feed"] = {f"in{i}": a for i, a in enumerate(feeds_np)}

    def run():
        return state["sess"].run(None, state["feed"])

    def result():
        return [torch.from_numpy(run()[0])]

    return Impl("onnxruntime", run, result, setup=setup, own_threads=True)


class _Module(torch.nn.Module):
    """Wraps a function of tensors for torch.onnx.export."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def fn_module(fn: Callable) -> torch.nn.Module:
    return _Module(fn)


# ---------------------------------------------------------------------------------------------

def _time_all(case: Case, device: str, impls: List[Impl], rows: Dict[str, dict],
              min_time: float, min_samples: int, measure_memory: bool) -> None:
    """Times the implementations in interleaved rounds (common.time_interleaved: the ratios
    do not depend on which one a slow spell of the machine hit; ONNX Runtime's time alone varied
    4-7 ms from one minute to the next at batch 1 here). Those with own_threads (a pool that
    spins after a call) are followed by an untimed pause of SETTLE_S, so that the next slice
    starts on idle cores (without it, ours measured up to 1.5x slower next to ORT). Each is
    timed on its own should the rounds raise (so that the others are still measured). Then
    their peak memory."""
    settle = {i.name: SETTLE_S for i in impls if i.own_threads}
    try:
        stats = common.time_interleaved({i.name: i.run for i in impls}, device, min_time,
                                        min_samples=min_samples, settle=settle)
    except Exception:  # noqa: BLE001 - find the failing one, time the rest
        stats = {}
    for impl in impls:
        if impl.name not in stats:
            try:
                stats[impl.name] = common.time_fn(impl.run, device, min_time,
                                                  min_samples=min_samples)
            except Exception as e:  # noqa: BLE001
                rows[impl.name].update(verified=f"ERROR: {type(e).__name__}: {str(e)[:160]}")
    for impl in impls:
        row = rows[impl.name]
        if impl.name not in stats:
            continue
        row.update(stats[impl.name])
        if case.items:
            row["items_per_s"] = case.items / (row["median_ms"] / 1e3)
        if measure_memory:
            try:
                mem, what = common.peak_memory_mb(impl.run, device)
            except Exception as e:  # noqa: BLE001
                row.update(verified=f"ERROR: {type(e).__name__}: {str(e)[:160]}")
                row.pop("median_ms", None)
                continue
            if mem is not None:
                row["peak_mem_mb"], row["mem_measure"] = mem, what


def run_case(case: Case, device: str, min_time: float, budget: CompileBudget,
             measure_memory: bool = True, min_samples: int = 5) -> List[dict]:
    built = case.build()
    base = {"suite": case.suite, "op": case.op, "shape": case.shape, "batch": case.batch,
            "mode": case.mode}
    rows: Dict[str, dict] = {}
    for name, why in built.skipped.items():
        rows[name] = {**base, "impl": name, "verified": "skipped", "note": why}
    ref = built.reference()
    noise = 0.0
    budget_key = f"{case.suite}:{case.op}"
    timed: List[Impl] = []  # verified (or inexact baselines), timed together below
    for impl in built.impls:
        row = {**base, "impl": impl.name, "note": impl.note}
        rows[impl.name] = row
        try:
            if impl.setup is not None:
                if impl.compiles and not budget.allows(budget_key):
                    row.update(verified="skipped",
                               note=f"compile budget ({budget.seconds:.0f} s) spent for {case.op}")
                    continue
                t0 = time.perf_counter()
                impl.setup()
                common.synchronize(device)
                setup_s = time.perf_counter() - t0
                row["setup_s"] = setup_s
                if impl.compiles:
                    budget.charge(budget_key, setup_s)
                    row["compile_s"] = setup_s
            err = rel_err(impl.result(), ref)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            row.update(verified=f"ERROR: {msg}")
            continue
        row["max_err"] = err
        if impl.name == built.noise_from:
            noise = err if math.isfinite(err) else 0.0
        if err <= built.tol + 2 * noise:
            row["verified"] = "ok"
        else:
            why = f"rel err {err:.3g} > {built.tol:.0e} + 2x {built.noise_from}'s {noise:.2g}"
            if impl.name not in BASELINES:
                row["verified"] = f"WRONG: {why}"  # ours: reported, never timed
                continue
            # A baseline is PyTorch or ONNX Runtime itself: its inaccuracy is reported (e.g.
            # CPU channels_last train-mode BatchNorm backward in float32), and it is timed.
            row["verified"] = f"inexact: {why}"
        timed.append(impl)
    _time_all(case, device, timed, rows, min_time, min_samples, measure_memory)
    if any(i.compiles for i in built.impls):
        import torch._dynamo

        torch._dynamo.reset()
    ours = rows.get(OURS, {}).get("median_ms")
    for name, row in rows.items():
        if ours and name != OURS and row.get("median_ms"):
            row["speedup"] = row["median_ms"] / ours
    return [rows[n] for n in IMPLS if n in rows] + [r for n, r in rows.items() if n not in IMPLS]
