"""Tensors above 2^31 elements: the CPU kernels index them correctly (`slow`; `make test-slow`).

Every tensor the kernels index with offsets past 2^31 is really that large (8 GiB of float32),
so a 32-bit offset anywhere (a wrap to a negative or a smaller offset) reads or writes the wrong
element. Each test holds at most two such tensors at once (~16 GiB), takes a lock so that
pytest-xdist workers never run two of them together, and is skipped, saying how much memory it
needed, when the machine has less available (a skip is not a pass).

Correctness is checked without a full float64 copy of anything: the output band by band (96
output rows) against the reference (effkernels.reference) applied in float32 to the matching
input rows (plus the halo, zero-padded at the image edges as the conv pads) -- every band of
the eval results; in training mode every 4th band, the bands named below and every other band
for NaN/Inf (an element no kernel wrote keeps the NaN fresh memory is poisoned with,
conftest.py) -- and the first and last rows and the rows holding (or reading) flat element 2^31
again against the float64 reference at the float32 tolerance of the other tests. The batch
statistics of training mode are checked against a float64 accumulation over the bands.

What is and is not covered:
  * dwconv_bn_act forward (eval, and training with batch statistics), NHWC, k=3 stride 1: input
    and output above 2^31 elements; k=5 stride 2 on a strided (cropped) NHWC view whose input
    offsets pass 2^31.
  * dwconv_bn_act_backward (eval), through the op itself: its float32 conv buffer and grad_x
    above 2^31 elements; x and grad_out there are expanded views (stride 0 over N, and over H
    for grad_out) of small tensors, to stay within 16 GiB, so the backward's *reads* of x do
    not pass 2^31 (the forward tests cover those reads, which use the same conv code).
  * pwconv_bn_act forward: input above 2^31 elements (dense NHWC read in place, and a cropped
    view read through the strided copy path); output above 2^31 elements (eval and training,
    with an expanded residual).
  * NCHW is not run at this size: the C++ kernels never index NCHW memory (an NCHW tensor is
    converted to/from NHWC by PyTorch's own copy, channels_innermost/in_format in
    csrc/cpu/cpu_common.h), and input, NHWC copy and output would need three 8 GiB tensors.
"""
from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

import effkernels
from effkernels import reference

from .helpers import mismatch_report

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(effkernels.available_backends("cpu")["cpu"] != "available",
                       reason=f"cpu backend: {effkernels.available_backends('cpu')['cpu']}"),
]

GiB = 1 << 30
BIG = 1 << 31
MARGIN = 2 * GiB  # for the reference bands, the interpreter and the rest of the machine
BAND = 96         # output rows per compared band
F32_TOL = 1e-4    # float32 kernel vs float32 reference (different summation orders)
F64_TOL = 1e-5    # float32 kernel vs float64 reference (tests/helpers.py TOL[float32])

_cpp = torch.ops.effkernels


def _available_bytes():
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.fixture
def big_memory():
    """One test of this file at a time across pytest-xdist workers (an flock), then
    `need(nbytes)` skips unless nbytes + MARGIN are available. Afterwards the big tensors are
    released even when the test failed: pytest keeps the failing frame (and so its tensors) in
    sys.last_traceback."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (run this file without xdist)
        fcntl = None
    lock = open(os.path.join(tempfile.gettempdir(), "effkernels-test-large.lock"), "w")
    if fcntl is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    gc.collect()

    def need(nbytes):
        avail = _available_bytes()
        want = nbytes + MARGIN
        if avail is None:
            pytest.skip(f"needs {want / GiB:.1f} GiB of memory; cannot tell how much is "
                        "available (no psutil, no /proc/meminfo)")
        if avail < want:
            pytest.skip(f"needs {want / GiB:.1f} GiB of available memory; "
                        f"{avail / GiB:.1f} GiB available")

    try:
        yield need
    finally:
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                setattr(sys, name, None)
        gc.collect()
        lock.close()  # releases the flock


def _numel(shape):
    return math.prod(shape)


def _randn(shape, *, seed):
    """A standard-normal NHWC (channels_last) tensor of NCHW `shape`. Filled as a contiguous
    (N, H, W, C) tensor: normal_ on a channels_last one takes a slow elementwise path (2^31
    elements: minutes instead of seconds)."""
    torch.manual_seed(seed)
    n, c, h, w = shape
    return torch.empty(n, h, w, c).normal_().permute(0, 3, 1, 2)


def _bn(c, seed):
    g = torch.Generator().manual_seed(seed)
    gamma = torch.rand(c, generator=g) + 0.5
    beta = torch.randn(c, generator=g) * 0.2
    mean = torch.randn(c, generator=g) * 0.2
    var = torch.rand(c, generator=g) + 0.5
    return gamma, beta, mean, var


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])


def _bands(n_images, rows, band=BAND):
    """(n, r0, r1) over every image's output rows."""
    for n in range(n_images):
        for r0 in range(0, rows, band):
            yield n, r0, min(rows, r0 + band)


def _band_of_element(index, shape_nhwc, band=3):
    """(n, r0, r1): `band` output rows around flat NHWC element `index` of an (N, H, W, C)
    tensor."""
    n_, h_, w_, c_ = shape_nhwc
    pixel = index // c_
    n, row = pixel // (h_ * w_), (pixel % (h_ * w_)) // w_
    r0 = max(0, min(row - band // 2, h_ - band))
    return n, r0, r0 + band


def _check(actual, expected, tol, what):
    """max|actual - expected| <= 2 * tol * max(1, max|expected|), NaN failing (the bound of
    tests/helpers.py assert_close with atol = rtol = tol, loosened to its largest value: two
    cheap passes, where elementwise bounds cost several); reported verbosely."""
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    inf = float("inf")
    scale = max(1.0, torch.linalg.vector_norm(expected, inf).item())
    err = torch.linalg.vector_norm(actual.to(expected.dtype) - expected, inf).item()
    if not err <= 2 * tol * scale:
        msg = mismatch_report(actual, expected, tol * scale, tol, what)
        assert msg is None, msg
        raise AssertionError(f"{what}: max error {err:.3g} > {2 * tol * scale:.3g}")


def _assert_finite(t, what):
    """No NaN/Inf in t (an element no kernel wrote keeps the NaN it was poisoned with)."""
    if not math.isfinite(torch.linalg.vector_norm(t, float("inf")).item()):
        bad = int((~torch.isfinite(t)).sum())
        raise AssertionError(f"{what}: {bad} NaN/Inf elements")


def _nhwc_shape(t):
    n, c, h, w = t.shape
    return n, h, w, c


def _assert_boundary_inside(t, name):
    assert t.numel() > BIG, f"{name} has {t.numel()} elements, not above 2^31"


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.parts = []

    def lap(self, what):
        t = time.perf_counter()
        self.parts.append(f"{what} {t - self.t0:.1f}s")
        self.t0 = t

    def __str__(self):
        return ", ".join(self.parts)


# ---- dwconv_bn_act ---------------------------------------------------------------------------

def _dw_input_rows(x, n, r0, r1, k, stride, pad, dtype):
    """The input rows output rows [r0, r1) of image n read, zero rows standing in for those
    outside the image and `pad` zero columns on each side: a conv with padding 0 of it gives
    exactly those output rows."""
    h = x.shape[2]
    lo = r0 * stride - pad
    hi = (r1 - 1) * stride - pad + k
    rows = x[n:n + 1, :, max(lo, 0):min(hi, h), :].to(dtype)
    return F.pad(rows, (pad, pad, max(0, -lo), max(0, hi - h)))


def _dw_band_reference(x, n, r0, r1, w, bn, *, k, stride, pad, act, dtype=torch.float32):
    """Eval-mode reference of output rows [r0, r1) of image n."""
    xb = _dw_input_rows(x, n, r0, r1, k, stride, pad, dtype)
    return reference.dwconv_bn_act(xb, w.to(dtype), *(t.to(dtype) for t in bn), stride=stride,
                                   padding=0, act=act)


def _boundary_bands(x, out, n_img, rows, *, stride=1, pad=0, band=3):
    """The first and last output rows, the rows holding output element 2^31 (if any) and
    those reading input element 2^31 (if any)."""
    picks = [(0, 0, band), (n_img - 1, rows - band, rows)]
    if out.numel() > BIG:
        picks.append(_band_of_element(BIG, _nhwc_shape(out), band))
    if x.numel() > BIG:
        n, r, _ = _band_of_element(BIG, _nhwc_shape(x), 1)
        r = min(max(0, (r + pad) // stride - band // 2), rows - band)
        picks.append((n, r, r + band))
    return picks


def _sweep(out, ref_band, picks, *, every, timer):
    """Every `every`-th band of output rows (all when 1) and the bands holding `picks` against
    ref_band(n, r0, r1, torch.float32); the others for NaN/Inf only. Then `picks` against
    ref_band(..., torch.float64) at the float32 tolerance of the other tests."""
    n_img, _, rows, _ = out.shape
    compared = 0
    for i, (n, r0, r1) in enumerate(_bands(n_img, rows)):
        band = out[n:n + 1, :, r0:r1]
        near = any(pn == n and pr0 < r1 and r0 < pr1 for pn, pr0, pr1 in picks)
        if i % every == 0 or near:
            _check(band, ref_band(n, r0, r1, torch.float32), F32_TOL,
                   f"output image {n} rows {r0}:{r1}")
            compared += 1
        else:
            _assert_finite(band, f"output image {n} rows {r0}:{r1}")
    timer.lap(f"{compared} bands vs fp32 ref" + ("" if every == 1 else ", others finite"))
    for n, r0, r1 in picks:
        _check(out[n:n + 1, :, r0:r1], ref_band(n, r0, r1, torch.float64), F64_TOL,
               f"output image {n} rows {r0}:{r1} (fp64)")
    timer.lap("fp64 bands")


def _check_dw_output(out, x, w, bn, *, k, stride, pad, act, timer, every=1):
    def ref_band(n, r0, r1, dtype):
        return _dw_band_reference(x, n, r0, r1, w, bn, k=k, stride=stride, pad=pad, act=act,
                                  dtype=dtype)

    picks = _boundary_bands(x, out, out.shape[0], out.shape[2], stride=stride, pad=pad)
    _sweep(out, ref_band, picks, every=every, timer=timer)


def test_dwconv_forward_nhwc_input_and_output_above_2_31(big_memory):
    """k=3 stride 1 (the fp32 fast path, C=24: one 16-channel block and an 8-channel tail),
    two images so that the second one starts below 2^31 and ends above it. Eval, then
    training (batch statistics checked against a banded float64 accumulation)."""
    shape = (2, 24, 6691, 6700)
    nbytes = 4 * _numel(shape)
    big_memory(2 * nbytes)
    timer = Timer()
    k, stride, pad, act = 3, 1, 1, "relu6"
    x = _randn(shape, seed=1)
    w = _weight((24, 1, k, k), seed=2)
    bn = _bn(24, seed=3)
    _assert_boundary_inside(x, "x")
    timer.lap("input")
    with torch.no_grad(), effkernels.backend("cpu"):
        out = effkernels.ops.dwconv_bn_act(x, w, *bn, stride=stride, act=act)
    timer.lap("eval op")
    assert out.shape == shape and out.is_contiguous(memory_format=torch.channels_last)
    _assert_boundary_inside(out, "output")
    _check_dw_output(out, x, w, bn, k=k, stride=stride, pad=pad, act=act, timer=timer)
    del out

    # Training: momentum 1 puts the batch mean and unbiased variance into the running buffers.
    gamma, beta = bn[0], bn[1]
    rm, rv = torch.zeros(24), torch.ones(24)
    with torch.no_grad(), effkernels.backend("cpu"):
        out = effkernels.ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=stride, act=act,
                                           training=True, momentum=1.0)
    timer.lap("training op")
    s1 = torch.zeros(24, dtype=torch.float64)
    s2 = torch.zeros(24, dtype=torch.float64)
    for n, r0, r1 in _bands(shape[0], shape[2]):
        y = F.conv2d(_dw_input_rows(x, n, r0, r1, k, stride, pad, torch.float32), w,
                     groups=24)
        s1 += y.sum((0, 2, 3), dtype=torch.float64)
        s2 += (y * y).sum((0, 2, 3), dtype=torch.float64)
    count = shape[0] * shape[2] * shape[3]
    mean = s1 / count
    var = s2 / count - mean * mean
    _check(rm.double(), mean, 1e-5, "batch mean")
    _check(rv.double(), var * count / (count - 1), 1e-5, "batch variance (unbiased)")
    timer.lap("batch statistics")
    stats_bn = (gamma, beta, mean.float(), var.float())  # normalised with the biased variance
    _check_dw_output(out, x, w, stats_bn, k=k, stride=stride, pad=pad, act=act, timer=timer,
                     every=4)
    del out, x
    print(f"\n{shape}: {timer}")


def test_dwconv_forward_strided_view_stride2_input_above_2_31(big_memory):
    """k=5 stride 2 (fast path) on an NHWC view cropped in W (row stride != W*C): the input
    offsets pass 2^31, read in place through the view's strides."""
    shape = (3, 32, 4097, 5461)  # cropped from W + 3 columns
    full = (3, 32, 4097, 5464)
    nbytes = 4 * _numel(full)
    big_memory(nbytes + nbytes // 4)
    timer = Timer()
    k, stride, pad, act = 5, 2, 2, "hswish"
    x_full = _randn(full, seed=4)
    x = x_full[..., 1:1 + shape[3]]
    assert x.shape == shape and x.stride(1) == 1 and x.stride(2) == full[3] * 32
    _assert_boundary_inside(x, "x")
    w = _weight((32, 1, k, k), seed=5)
    bn = _bn(32, seed=6)
    timer.lap("input")
    with torch.no_grad(), effkernels.backend("cpu"):
        out = effkernels.ops.dwconv_bn_act(x, w, *bn, stride=stride, act=act)
    timer.lap("eval op")
    assert out.shape == (3, 32, 2049, 2731)
    _check_dw_output(out, x, w, bn, k=k, stride=stride, pad=pad, act=act, timer=timer)
    del out, x, x_full
    print(f"\n{shape}: {timer}")


def test_dwconv_backward_grad_x_above_2_31(big_memory):
    """dwconv_bn_act_backward (eval mode), k=3 stride 1: its float32 conv buffer and grad_x
    have more than 2^31 elements. x is one image expanded over N=16 (stride 0) and grad_out one
    row expanded over N and H, so that the test needs two 8 GiB tensors, not four; every
    image's grad_x must equal the reference of the one image, and the parameter gradients N
    times the one image's."""
    n_img, c, h, w_ = 16, 24, 2365, 2365
    shape = (n_img, c, h, w_)
    nbytes = 4 * _numel(shape)
    big_memory(2 * nbytes + nbytes // 16)  # + the one image of x
    timer = Timer()
    k, stride, pad, act = 3, 1, 1, "silu"
    base = _randn((1, c, h, w_), seed=7)
    go_row = _randn((1, c, 1, w_), seed=8)
    x = base.expand(shape)
    grad_out = go_row.expand(shape)
    _assert_boundary_inside(x, "x")
    w = _weight((c, 1, k, k), seed=9)
    gamma, beta, rm, rv = _bn(c, seed=10)
    timer.lap("input")
    gx, gw, gg, gb = _cpp.dwconv_bn_act_backward(grad_out, x, w, gamma, beta, rm, rv, stride, pad,
                                                 1, act, False, 1e-5)
    timer.lap("backward op")
    assert gx.shape == shape
    _assert_boundary_inside(gx, "grad_x")

    # Reference of one image, with autograd, in float32 (0.5 GiB) and in float64 on bands.
    leaves = [t.clone().requires_grad_() for t in (base, w, gamma, beta)]
    y = reference.dwconv_bn_act(*leaves, rm, rv, stride=stride, padding=pad, act=act)
    y.backward(go_row.expand_as(y))
    ref_gx, ref_gw, ref_gg, ref_gb = (t.grad for t in leaves)
    del y, leaves
    timer.lap("reference")
    for n, r0, r1 in _bands(n_img, h, band=512):
        _check(gx[n:n + 1, :, r0:r1], ref_gx[:, :, r0:r1], F32_TOL,
               f"grad_x image {n} rows {r0}:{r1}")
    for name, got, ref in (("grad_weight", gw, ref_gw), ("grad_bn_weight", gg, ref_gg),
                           ("grad_bn_bias", gb, ref_gb)):
        _check(got, ref * n_img, F32_TOL, name)
    timer.lap("compare all (fp32 ref)")
    for n, r0, r1 in [(0, 0, 4), _band_of_element(BIG, _nhwc_shape(gx), 4),
                      (n_img - 1, h - 4, h)]:
        xb = _dw_input_rows(base, 0, r0 - pad, r1 + pad, k, stride, pad, torch.float64)
        xb = xb.requires_grad_()
        lo = r0 - pad  # output rows [lo, r1 + pad) read input rows [r0 - 2pad, r1 + 2pad)
        yb = reference.dwconv_bn_act(xb, w.double(), gamma.double(), beta.double(), rm.double(),
                                     rv.double(), stride=stride, padding=0, act=act)
        rows = torch.arange(lo, r1 + pad).view(1, 1, -1, 1)
        valid = ((rows >= 0) & (rows < h)).double()  # rows outside the image are not outputs
        yb.backward(go_row.double().expand_as(yb) * valid)
        ref = xb.grad[:, :, 2 * pad:2 * pad + (r1 - r0), pad:pad + w_]
        _check(gx[n:n + 1, :, r0:r1], ref, F64_TOL, f"grad_x image {n} rows {r0}:{r1} (fp64)")
    timer.lap("fp64 bands")
    del gx
    print(f"\n{shape}: {timer}")


# ---- pwconv_bn_act ---------------------------------------------------------------------------

def _pw_band_reference(x, n, r0, r1, w, bn, *, act, residual=None, dtype=torch.float32):
    res = None if residual is None else residual[n:n + 1, :, r0:r1].to(dtype)
    return reference.pwconv_bn_act(x[n:n + 1, :, r0:r1].to(dtype), w.to(dtype),
                                   *(t.to(dtype) for t in bn), act=act, residual=res)


def _check_pw_output(out, x, w, bn, *, act, residual=None, timer, every=1):
    def ref_band(n, r0, r1, dtype):
        return _pw_band_reference(x, n, r0, r1, w, bn, act=act, residual=residual, dtype=dtype)

    picks = _boundary_bands(x, out, out.shape[0], out.shape[2])
    _sweep(out, ref_band, picks, every=every, timer=timer)


@pytest.mark.parametrize("layout", ["nhwc", "cropped_view"])
def test_pwconv_forward_input_above_2_31(big_memory, layout):
    """64 -> 16 channels: x above 2^31 elements, dense NHWC (rows read in place by the GEMM) or
    an NHWC view cropped in W (rows gathered through the strides)."""
    shape = (3, 64, 3343, 3347)
    full = shape if layout == "nhwc" else (3, 64, 3343, 3349)
    nbytes = 4 * _numel(full)
    big_memory(nbytes + nbytes // 4)
    timer = Timer()
    x_full = _randn(full, seed=11)
    x = x_full if layout == "nhwc" else x_full[..., 2:2 + shape[3]]
    assert x.shape == shape and x.stride(1) == 1
    _assert_boundary_inside(x, "x")
    w = _weight((16, 64, 1, 1), seed=12)
    bn = _bn(16, seed=13)
    timer.lap("input")
    with torch.no_grad(), effkernels.backend("cpu"):
        out = effkernels.ops.pwconv_bn_act(x, w, *bn, act="relu6")
    timer.lap("eval op")
    assert out.shape == (3, 16, 3343, 3347)
    _check_pw_output(out, x, w, bn, act="relu6", timer=timer)
    del out, x, x_full
    print(f"\n{shape} {layout}: {timer}")


def test_pwconv_forward_output_above_2_31(big_memory):
    """12 -> 96 channels: the output above 2^31 elements; residual one image expanded over N
    (stride 0). Eval, then training (statistics checked against a banded float64
    accumulation)."""
    n_img, cin, cout, h, w_ = 8, 12, 96, 1673, 1673
    shape = (n_img, cout, h, w_)
    assert _numel(shape) > BIG
    nbytes = 4 * _numel(shape)
    big_memory(nbytes + nbytes // 4)
    timer = Timer()
    x = _randn((n_img, cin, h, w_), seed=14)
    residual = _randn((1, cout, h, w_), seed=15).expand(shape)
    w = _weight((cout, cin, 1, 1), seed=16)
    bn = _bn(cout, seed=17)
    timer.lap("input")
    with torch.no_grad(), effkernels.backend("cpu"):
        out = effkernels.ops.pwconv_bn_act(x, w, *bn, act="hswish", residual=residual)
    timer.lap("eval op")
    assert out.shape == shape
    _assert_boundary_inside(out, "output")
    _check_pw_output(out, x, w, bn, act="hswish", residual=residual, timer=timer)
    del out

    gamma, beta = bn[0], bn[1]
    rm, rv = torch.zeros(cout), torch.ones(cout)
    with torch.no_grad(), effkernels.backend("cpu"):
        out = effkernels.ops.pwconv_bn_act(x, w, gamma, beta, rm, rv, act="hswish",
                                           residual=residual, training=True, momentum=1.0)
    timer.lap("training op")
    s1 = torch.zeros(cout, dtype=torch.float64)
    s2 = torch.zeros(cout, dtype=torch.float64)
    for n, r0, r1 in _bands(n_img, h):
        y = F.conv2d(x[n:n + 1, :, r0:r1], w)
        s1 += y.sum((0, 2, 3), dtype=torch.float64)
        s2 += (y * y).sum((0, 2, 3), dtype=torch.float64)
    count = n_img * h * w_
    mean = s1 / count
    var = s2 / count - mean * mean
    _check(rm.double(), mean, 1e-5, "batch mean")
    _check(rv.double(), var * count / (count - 1), 1e-5, "batch variance (unbiased)")
    timer.lap("batch statistics")
    stats_bn = (gamma, beta, mean.float(), var.float())
    _check_pw_output(out, x, w, stats_bn, act="hswish", residual=residual, timer=timer,
                     every=4)
    del out, x
    print(f"\n{shape}: {timer}")
