"""Shared test utilities: inputs, tolerances, verbose comparisons, backends to test."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import effkernels

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (atol, rtol) against the float64 reference, relative to the tensor's scale (see assert_close).
# Low precision also follows flash-attention's rule where a PyTorch result in the same dtype
# exists: our error is at most 2x PyTorch's own error against the float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


# The backends that serve tensors of each device type.
DEVICE_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def backends_for(device: str, op: str = None):
    """The device's backends, each as a pytest param skipped (with the reason) where it cannot
    run here; with `op`, where it cannot run that op (the cuda backend has kernels for some ops
    only, and nothing may claim a kernel that does not exist)."""
    params = []
    status_of = effkernels.available_backends(device, op)
    for name in DEVICE_BACKENDS[device]:
        status = status_of[name]
        marks = [] if status == "available" else [pytest.mark.skip(reason=f"{name}: {status}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def gpu_backends_for(op: str = None):
    """backends_for("cuda", op), each param also marked `cuda` (skipped without a GPU)."""
    return [pytest.param(b.values[0], marks=[*b.marks, pytest.mark.cuda], id=b.id)
            for b in backends_for("cuda", op)]


def make_input(shape, dtype, layout="contiguous", device="cpu", requires_grad=False):
    """Random normal input in a given layout: contiguous, channels_last, or strided (a view into
    a larger tensor: every other column and a channel offset), strided_cl (same, NHWC)."""
    n, c, h, w = shape
    if layout in ("strided", "strided_cl"):
        fmt = torch.channels_last if layout == "strided_cl" else torch.contiguous_format
        big = torch.randn(n, c + 3, h, 2 * w, dtype=torch.float64, device=device).to(dtype)
        big = big.contiguous(memory_format=fmt)
        x = big[:, 2:2 + c, :, ::2]  # sliced after the cast: a real view in every dtype
    else:
        x = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    if requires_grad:
        x.requires_grad_(True)
    return x


def bn_params(channels, device="cpu", dtype=torch.float32):
    """gamma, beta, running_mean, running_var: random, away from degenerate values."""
    g = torch.rand(channels, dtype=dtype, device=device) + 0.5
    b = torch.randn(channels, dtype=dtype, device=device) * 0.2
    rm = torch.randn(channels, dtype=dtype, device=device) * 0.2
    rv = torch.rand(channels, dtype=dtype, device=device) + 0.5
    return g, b, rm, rv


def conv_weight(shape, dtype, device="cpu"):
    fan_in = shape[1] * shape[2] * shape[3]
    return (torch.randn(shape, dtype=torch.float64, device=device) / math.sqrt(fan_in)).to(dtype)


def mismatch_report(actual, expected, atol, rtol, name=""):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if not bad.any():
        return None
    nan = torch.isnan(a).sum().item()
    inf = torch.isinf(a).sum().item()
    worst = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err - bound)
    idx = tuple(int(i) for i in torch.unravel_index(worst.argmax(), a.shape))
    return (f"{name}: {int(bad.sum())}/{a.numel()} mismatched (atol={atol:g}, rtol={rtol:g}); "
            f"NaN={nan} inf={inf}; worst at {idx}: got {a[idx].item():.8g}, expected "
            f"{e[idx].item():.8g}; max abs err {err.nan_to_num(math.inf).max().item():.3g}")


def assert_close(actual, expected, dtype, name="", scale_tol=True, factor=1.0):
    """|actual - expected| <= atol*scale + rtol*|expected| elementwise, where scale is
    max(1, max|expected|) so that values near zero in a large tensor are judged by its scale."""
    atol, rtol = TOL[dtype]
    atol, rtol = atol * factor, rtol * factor
    if scale_tol:
        atol = atol * max(1.0, expected.detach().abs().max().item() if expected.numel() else 1.0)
    msg = mismatch_report(actual, expected, atol, rtol, name)
    assert msg is None, msg


def max_err(actual, expected):
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_lowp_close(actual, expected64, torch_lowp, dtype, name=""):
    """Low-precision rule: max error <= 2x PyTorch's same-dtype max error (+ a small floor)."""
    ours = max_err(actual, expected64)
    theirs = max_err(torch_lowp, expected64)
    scale = max(1.0, expected64.abs().max().item() if expected64.numel() else 1.0)
    floor = TOL[dtype][0] * 0.1 * scale
    assert ours <= 2 * theirs + floor, (
        f"{name}: max error {ours:.4g} exceeds 2x PyTorch's {dtype} error {theirs:.4g} "
        f"(+ floor {floor:.2g})\n" + (mismatch_report(actual, expected64, *TOL[dtype], name) or ""))


class RecordOps(TorchDispatchMode):
    """Records the overload packets (e.g. "effkernels.inverted_residual_inference") dispatched
    while it is active, in `names`: which kernel a call was routed to."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def per_thread_count(fn, counts=(1, 2, 3)):
    """fn() run with each of torch's intra-op thread counts in `counts` (restored after)."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)


def run_with_isa(isa: str, script: str) -> None:
    """Runs `script` in a fresh Python with the CPU kernels capped at `isa` (EFFK_CPU_ISA:
    avx2, base) and the repository on the path; it must print "ok"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, EFFK_CPU_ISA=isa,
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
