"""The inverted-residual block (op `inverted_residual` of csrc/ops.cpp) fused in Triton:
expand 1x1 + BN + act -> depthwise k x k + BN + act -> [SE] -> project 1x1 + BN -> [+ x],
without ever writing the expanded (t x Cin channel) tensor or the depthwise output to memory.

Forward, ONE kernel (`_ir_kernel`), NHWC. A program owns BLOCK_P output pixels of one image and
BLOCK_CO output channels (all of Cout up to MAX_BLOCK_CO). It loops over hidden-channel blocks
of BLOCK_H; per block and depthwise tap it gathers the tap's shifted input pixels [BLOCK_P, Cin]
and recomputes their expansion with tl.dot against the expand weight block [Cin, BLOCK_H]
(k*k expand GEMMs per output pixel instead of one: FLOPs for memory traffic), folds BN + act,
zeroes the taps that fall in the padding (the padding is of the *expanded* activation), and
accumulates tap weight x expansion. Then depthwise BN + act, the SE gate, and
acc_out += dw_out @ W_proj[block]. Epilogue: project BN (+ x), stored in x's memory format.
Expansion ratio 1 (expand == []) reads the tap's channels of x directly.

The same kernel body, cut short by the constexpr MODE, makes the passes the BN statistics need
(each recomputes from x instead of storing anything; partials are per (program, channel),
combined on the host in float64 in a fixed order as in batchnorm.py: deterministic, no atomics):
  `_ir_expand_stats_kernel`  training: (mean, M2) of x @ W_e^T per input-pixel tile (one GEMM
                             per pixel). (Computing them from x's mean and Cin x Cin covariance,
                             var_e = diag(W Cov W^T), would cost Cin^2 instead of Cin*t*Cin per
                             pixel, but cancels catastrophically when W is near-orthogonal to
                             x's dominant directions; this pass is exact and still small next to
                             the k*k-fold recompute of the other passes.)
  DSTATS  training: (mean, M2) of the depthwise conv output per hidden channel.
  POOL    with SE: per-(tile, hidden channel) sums of the depthwise activation; the host sums
          them per image, runs the tiny SE MLP in torch (float32, float64 for float64) and hands
          the (N, hidden) gate to the next passes, which multiply it in before the project dot.
  PSTATS  training: (mean, M2) of the projection output per Cout channel.
  OUT     the output.
DSTATS and POOL parallelise over hidden blocks (grid axis 1) as they need no projection.
Passes run: eval: OUT (+ POOL with SE); training: expand stats (without expand: none), DSTATS,
(POOL,) PSTATS, OUT. DSTATS and POOL cost the expand/depthwise recompute, PSTATS and OUT that
plus the project GEMM; with Cout split over several programs (Cout > MAX_BLOCK_CO) each of them
recomputes the hidden activations.

dtypes: fp16/bf16 operands go to tl.dot as they are (fp32 accumulation). fp32 dots use
input_precision="ieee" (no TF32); fp64 runs fp64 dots with an fp64 accumulator (gradcheck).
Rounding: the expanded activation, the depthwise activation and the gated projection input are
rounded to x's dtype where the unfused ops would store them (no-ops in fp32/fp64). This is not
for show: the backward recomputes those tensors with the unfused ops, and in training the BN
backward is only exact for the statistics of the very tensor it differentiates; statistics from
unrounded fp32 values made the bf16 gradients of x and of the BN parameters measurably worse
(max error up to 10-15x PyTorch's own bf16 error over 10 random small blocks, against <= 2x
with the rounding, as good as the composed Triton ops).
Under TRITON_INTERPRET=1 bf16 dot operands are upcast to fp32 (the interpreter's bf16 dot is
broken, see pwconv_bn_act.py): the bf16 tensor-core dot is proven only by compiled runs.

Backward (`backward`): recompute, not saved. The autograd node saves x, the parameters and the
batch statistics only. The backward recomputes the expanded activation and the depthwise
activation stage by stage with the Triton pw/dw forward launchers (eval mode with the saved
statistics: bit-for-bit the BN the forward used) -- transient tensors living only inside the
backward -- and chains the pw/dw backward launchers; the SE backward runs in torch on (N, hidden)
tensors. So the backward, unlike the forward, does materialise the expanded tensor (transiently).

Not fused (explicit fallback to the composed Triton ops, same results): empty inputs (any of
N, H, W, Cin, hidden, Cout, Ho, Wo is 0), and images whose element offsets do not fit in int32
(one image of x or of out spanning >= 2**31 elements: the kernels index within an image in
int32, see _ir_kernel). Every other case -- stride 1/2, dilation, k = 1..11, any channel
counts, SE or not, skip or not -- runs the fused kernels.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _checks
from .. import reference as _reference
from .._registration import _like
from . import batchnorm
from . import dwconv_bn_act as _dw
from . import pwconv_bn_act as _pw
from .activation import CODES, act_forward
from .host import channels_innermost, in_format, on_input_device

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Modes of _ir_kernel.
DSTATS, POOL, PSTATS, OUT = 0, 1, 2, 3

# Tile configs in one place: BLOCK_P output pixels x BLOCK_H hidden channels per step, warps.
# BLOCK_CI (input channels per expand-dot step) and BLOCK_CO (output channels per program) come
# from the layer: the smallest power of 2 >= 16 covering Cin / Cout, capped at MAX_BLOCK_CI /
# MAX_BLOCK_CO (beyond, Cin is looped over and Cout split over programs, each recomputing the
# hidden activations). Not timed on a GPU yet: chosen for MobileNetV2's blocks (Cin 16..160,
# hidden 96..960, Cout 16..320) so that no variant spills on sm_80 / sm_90 (make
# kernels-report): the [BLOCK_P, BLOCK_CO] project accumulator lives through the whole hidden
# loop, so wide Cout tiles take fewer pixels.
CONFIGS = [
    dict(BLOCK_P=64, BLOCK_H=32, num_warps=8),   # BLOCK_CO <= 64
    dict(BLOCK_P=32, BLOCK_H=32, num_warps=4),   # BLOCK_CO = 128; small images (<= 14x14)
]
MAX_BLOCK_CI = 64
MAX_BLOCK_CO = 128
NUM_STAGES = 1

_FORCED_CONFIG = None  # tests: an index into CONFIGS


# ---- device code ----------------------------------------------------------------------------

@triton.jit
def _expand_gemm(x_pix, ok, we_ptr, hc, h_ok, CIN, M,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_CI: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_P, BLOCK_H] = x[pixels, :Cin] @ W_e^T[:Cin, hc] (dtype ACC). x_pix: pointers to
    channel 0 of each pixel (channel stride 1); rows with ok false read 0. we_ptr: W_e^T as a
    dense [Cin, M] matrix."""
    acc = tl.zeros([BLOCK_P, BLOCK_H], ACC)
    ci = tl.arange(0, BLOCK_CI)
    for c0 in range(0, CIN, BLOCK_CI):
        c_ok = (c0 + ci) < CIN
        xt = tl.load(x_pix[:, None] + (c0 + ci)[None, :], mask=ok[:, None] & c_ok[None, :],
                     other=0.0)
        wt = tl.load(we_ptr + (c0 + ci)[:, None] * M + hc[None, :],
                     mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot is broken
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _tile_stats(v, ok, part0_ptr, part1_ptr, row, cols, cols_ok, ncols):
    """(mean, M2) over the rows of v [rows, cols] where ok, stored at part[row, cols]."""
    cnt = tl.maximum(tl.sum(ok.to(v.dtype), axis=0), 1.0)
    vm = tl.where(ok[:, None], v, 0.0)
    mean = tl.sum(vm, axis=0) / cnt
    dev = tl.where(ok[:, None], v - mean[None, :], 0.0)
    tl.store(part0_ptr + row * ncols + cols, mean, mask=cols_ok)
    tl.store(part1_ptr + row * ncols + cols, tl.sum(dev * dev, axis=0), mask=cols_ok)


@triton.jit
def _ir_expand_stats_kernel(x_ptr, we_ptr, part0_ptr, part1_ptr,
                            CIN, M, H, W, n_tiles, sxn, sxh, sxw,
                            ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_CI: tl.constexpr, BLOCK_H: tl.constexpr):
    """Training: (mean, M2) of the expand conv output x @ W_e^T over BLOCK_P input pixels of one
    image, for BLOCK_H hidden channels; partial row = program id 0."""
    pid = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    n = pid // n_tiles
    q = (pid % n_tiles).to(tl.int32) * BLOCK_P + tl.arange(0, BLOCK_P)  # int32 in the image
    ok = q < H * W
    pix = x_ptr + n * sxn + (q // W) * sxh + (q % W) * sxw
    hc = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hc < M
    e = _expand_gemm(pix, ok, we_ptr, hc, h_ok, CIN, M, ACC, UPCAST, BLOCK_P, BLOCK_CI, BLOCK_H)
    _tile_stats(e, ok, part0_ptr, part1_ptr, pid, hc, h_ok, M)


@triton.jit
def _ir_kernel(x_ptr, we_ptr, wd_ptr, wp_ptr,
               scale_e_ptr, shift_e_ptr, scale_d_ptr, shift_d_ptr, gate_ptr,
               scale_p_ptr, shift_p_ptr, out_ptr, part0_ptr, part1_ptr,
               CIN, M, COUT, H, W, HO, WO, PAD, DIL, n_tiles,
               sxn, sxh, sxw, son, soh, sow, soc,
               K: tl.constexpr, STRIDE: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
               HAS_EXPAND: tl.constexpr, HAS_SE: tl.constexpr, HAS_RES: tl.constexpr,
               ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_CI: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Program (pid, pid_c): output pixels [t*BLOCK_P, (t+1)*BLOCK_P) of image n (pid = n *
    n_tiles + t); pid_c is the hidden block (DSTATS, POOL) or the Cout block (PSTATS, OUT).
    x: channels innermost (strides sxn, sxh, sxw); we: W_e^T [Cin, M]; wd: [K*K, M] (tap-major);
    wp: W_p^T [M, Cout]; gate: [N, M]; out: any strides (son, soh, sow, soc)."""
    # Offsets: the image's base in int64 (pid is int64); within one image (< 2**31 elements,
    # checked on the host) int32, which halves the registers of the per-pixel index vectors.
    # pid_c (a channel block) only ever multiplies a channel block size: int32.
    pid = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    n = pid // n_tiles
    q = (pid % n_tiles).to(tl.int32) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = q < HO * WO
    oh = q // WO
    ow = q % WO
    x_img = x_ptr + n * sxn
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    if MODE <= 1:  # DSTATS, POOL: one hidden block per program
        h_lo = pid_c * BLOCK_H
        h_hi = tl.minimum(h_lo + BLOCK_H, M)
    else:
        h_lo = 0
        h_hi = M
    co = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    acc_o = tl.zeros([BLOCK_P, BLOCK_CO], ACC)
    for h0 in range(h_lo, h_hi, BLOCK_H):
        hc = h0 + tl.arange(0, BLOCK_H)
        h_ok = hc < M
        if HAS_EXPAND:
            scale_e = tl.load(scale_e_ptr + hc, mask=h_ok, other=0.0)[None, :]
            shift_e = tl.load(shift_e_ptr + hc, mask=h_ok, other=0.0)[None, :]
        d = tl.zeros([BLOCK_P, BLOCK_H], ACC)
        # The taps as a run-time loop: the body (a GEMM) is large, unrolling k*k of them would
        # multiply code size and compile time for no gain.
        for tap in range(K * K):
            ih = ih0 + (tap // K) * DIL
            iw = iw0 + (tap % K) * DIL
            ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = x_img + ih * sxh + iw * sxw
            if HAS_EXPAND:
                e = _expand_gemm(pix, ok, we_ptr, hc, h_ok, CIN, M, ACC, UPCAST, BLOCK_P,
                                 BLOCK_CI, BLOCK_H)
                e = act_forward(e * scale_e + shift_e, ACT)
                e = tl.where(ok[:, None], e, 0.0)  # zero padding of the expanded activation
                e = e.to(x_ptr.dtype.element_ty).to(ACC)  # see "Rounding" (module docstring)
            else:
                e = tl.load(pix[:, None] + hc[None, :], mask=ok[:, None] & h_ok[None, :],
                            other=0.0).to(ACC)
            wd = tl.load(wd_ptr + tap * M + hc, mask=h_ok, other=0.0).to(ACC)
            d += e * wd[None, :]
        if MODE == 0:  # DSTATS
            _tile_stats(d, p_ok, part0_ptr, part1_ptr, pid, hc, h_ok, M)
        else:
            scale_d = tl.load(scale_d_ptr + hc, mask=h_ok, other=0.0)
            shift_d = tl.load(shift_d_ptr + hc, mask=h_ok, other=0.0)
            a = act_forward(d * scale_d[None, :] + shift_d[None, :], ACT)
            a = a.to(x_ptr.dtype.element_ty).to(ACC)
            if MODE == 1:  # POOL
                tl.store(part0_ptr + pid * M + hc,
                         tl.sum(tl.where(p_ok[:, None], a, 0.0), axis=0), mask=h_ok)
            else:
                if HAS_SE:
                    a = a * tl.load(gate_ptr + n * M + hc, mask=h_ok, other=0.0)[None, :]
                # Hidden channels past M: their W_p rows are 0 (masked), whatever a holds.
                wp = tl.load(wp_ptr + hc[:, None] * COUT + co[None, :],
                             mask=h_ok[:, None] & co_ok[None, :], other=0.0)
                a = a.to(wp_ptr.dtype.element_ty)
                if UPCAST:
                    a = a.to(tl.float32)
                    wp = wp.to(tl.float32)
                acc_o = tl.dot(a, wp, acc_o, input_precision="ieee", out_dtype=ACC)
    if MODE == 2:  # PSTATS
        _tile_stats(acc_o, p_ok, part0_ptr, part1_ptr, pid, co, co_ok, COUT)
    elif MODE == 3:  # OUT
        scale_p = tl.load(scale_p_ptr + co, mask=co_ok, other=0.0)
        shift_p = tl.load(shift_p_ptr + co, mask=co_ok, other=0.0)
        z = acc_o * scale_p[None, :] + shift_p[None, :]
        mask = p_ok[:, None] & co_ok[None, :]
        if HAS_RES:  # skip: stride 1 and Cout == Cin, so pixel (oh, ow) of x, channel co
            res = tl.load((x_img + oh * sxh + ow * sxw)[:, None] + co[None, :], mask=mask,
                          other=0.0)
            z += res.to(ACC)
        offs = (oh * soh + ow * sow)[:, None] + (co * soc)[None, :]
        tl.store(out_ptr + n * son + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


# ---- host side ------------------------------------------------------------------------------

def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _blocks(cin: int, mid: int, cout: int, pixels: int):
    """(BLOCK_P, BLOCK_CI, BLOCK_H, BLOCK_CO, num_warps) for a layer. The interpreter runs
    programs one after the other at a fixed cost per op: there, few and large programs."""
    bci = min(MAX_BLOCK_CI, max(16, _pow2(cin)))
    bco = min(MAX_BLOCK_CO, max(16, _pow2(cout)))
    if _FORCED_CONFIG is not None:
        cfg = CONFIGS[_FORCED_CONFIG]
    else:
        cfg = CONFIGS[1 if bco > 64 or pixels <= 14 * 14 else 0]
    bp, bh = cfg["BLOCK_P"], cfg["BLOCK_H"]
    if _INTERPRET and _FORCED_CONFIG is None:
        bp, bh = min(128, max(16, _pow2(pixels))), min(64, max(16, _pow2(mid)))
    return bp, bci, bh, bco, cfg["num_warps"]


def _check(op, x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate, skip,
           training, n_stage):
    """Shapes, dtypes, devices of the block's tensors; returns (mid, cout, k, pad)."""
    _checks.tensor(op, "x", x, 4)
    cin = x.shape[1]
    if len(depthwise) not in n_stage or len(depthwise) == 0 or len(project) not in n_stage \
            or len(project) == 0:
        raise ValueError(f"{op}: depthwise and project must each be [weight, bn_weight, "
                         f"bn_bias{', running_mean, running_var' if 5 in n_stage else ''}]; "
                         f"got {len(depthwise)} and {len(project)} tensors")
    if len(expand) not in (0,) + tuple(n_stage):
        raise ValueError(f"{op}: expand must be [] or [weight, bn_weight, bn_bias"
                         f"{', running_mean, running_var' if 5 in n_stage else ''}]; got "
                         f"{len(expand)} tensors")
    if len(se) not in (0, 4):
        raise ValueError(f"{op}: se must be [] or [reduce_weight, reduce_bias, expand_weight, "
                         f"expand_bias]; got {len(se)} tensors")
    for name in ("act", "se_act", "se_gate"):
        _checks.act(op, name, {"act": act, "se_act": se_act, "se_gate": se_gate}[name])
    if expand:
        _checks.tensor(op, "expand weight", expand[0], 4, like=x)
        mid = expand[0].shape[0]
        if tuple(expand[0].shape) != (mid, cin, 1, 1):
            raise ValueError(f"{op}: expand weight must have shape (hidden, {cin}, 1, 1); got "
                             f"{tuple(expand[0].shape)}")
    else:
        mid = cin
    k = depthwise[0].shape[-1] if isinstance(depthwise[0], torch.Tensor) else 0
    pad = dilation * (k - 1) // 2
    _checks.depthwise(op, x, depthwise[0], mid, stride, pad, dilation, name="depthwise weight")
    _checks.tensor(op, "project weight", project[0], 4, like=x)
    cout = project[0].shape[0]
    if tuple(project[0].shape) != (cout, mid, 1, 1):
        raise ValueError(f"{op}: project weight must have shape (Cout, {mid}, 1, 1); got "
                         f"{tuple(project[0].shape)}")
    for name, stage, ch in (("expand", expand, mid), ("depthwise", depthwise, mid),
                            ("project", project, cout)):
        if stage:
            rest = list(stage[1:]) + [None] * (5 - len(stage))
            _checks.bn(op, x, ch, *rest, training if len(stage) == 5 else True)
    if se:
        r = se[0].shape[0]
        expected = ((r, mid, 1, 1), (r,), (mid, r, 1, 1), (mid,))
        for i, (t, shape) in enumerate(zip(se, expected)):
            _checks.tensor(op, f"se[{i}]", t, len(shape), like=x)
            if tuple(t.shape) != shape:
                raise ValueError(f"{op}: se[{i}] must have shape {shape}; got {tuple(t.shape)}")
    if skip:
        _checks.skip(op, x, cout, k, stride, pad, dilation)
    return mid, cout, k, pad


def _offsets_fit_int32(x: torch.Tensor, cout: int, ho: int, wo: int) -> bool:
    """Whether every element offset within one image of x (read in place when channels are
    innermost, else from a dense channels_last copy) and of out fits in int32."""
    n, c, h, w = x.shape
    if x.stride(1) == 1 or c == 1:
        x_span = (h - 1) * x.stride(2) + (w - 1) * x.stride(3) + c
    else:
        x_span = h * w * c
    return max(x_span, cout * ho * wo) < 2 ** 31


def _se_gate(pooled, se, se_act, se_gate, keep=False):
    """The SE MLP on the pooled (N, hidden) means: gate = se_gate(W2 se_act(W1 s + b1) + b2),
    in pooled's dtype. keep: also return what _se_backward needs."""
    dt = pooled.dtype
    w1, b1, w2, b2 = (t.to(dt) for t in se)
    r = w1.shape[0]
    w1, w2 = w1.reshape(r, -1), w2.reshape(-1, r)
    z1 = pooled @ w1.t() + b1
    s1 = _reference.activation(se_act, z1)
    z2 = s1 @ w2.t() + b2
    gate = _reference.activation(se_gate, z2)
    return (gate, (pooled, w1, w2, z1, s1, z2)) if keep else gate


def _act_backward(name: str, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g * d act(z) / dz by PyTorch's own backward ops. activation.py follows them, except at a
    NaN pre-activation of relu6 / hswish, where PyTorch's answer depends on the layout."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(g, z, 0)
    if name == "relu6":
        return aten.hardtanh_backward(g, z, 0, 6)
    if name == "hswish":
        return aten.hardswish_backward(g, z)
    if name == "silu":
        return aten.silu_backward(g, z)
    if name == "hsigmoid":
        return aten.hardsigmoid_backward(g, z)
    if name == "sigmoid":
        return aten.sigmoid_backward(g, torch.sigmoid(z))
    return g


def _se_backward(grad_gate, saved, se, se_act, se_gate):
    """(d pooled, [dW1, db1, dW2, db2]) of the SE MLP, by hand: the op's backward runs below
    the autograd dispatch key, where torch.autograd cannot record a graph."""
    pooled, w1, w2, z1, s1, z2 = saved
    dz2 = _act_backward(se_gate, grad_gate, z2)
    dz1 = _act_backward(se_act, dz2 @ w2, z1)
    grads = (dz1.t() @ pooled, dz1.sum(0), dz2.t() @ s1, dz2.sum(0))
    return dz1 @ w1, [g.reshape(t.shape).to(t.dtype) for g, t in zip(grads, se)]


def _tile_counts(images: int, pixels: int, bp: int, device) -> torch.Tensor:
    """Valid pixels of each partial row (image-major, BLOCK_P-pixel tiles of one image)."""
    t = torch.arange(_cdiv(pixels, bp), dtype=torch.float64, device=device)
    return (pixels - t * bp).clamp(max=bp).repeat(images)


def _composed(x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate, skip,
              training, eps, pad):
    """The block over the Triton pw/dw ops (the unfused path: empty inputs only)."""
    stats = []
    h = x
    if expand:
        h, mean, var = _pw.forward(h, *expand, None, act, training, eps)
        stats += [mean, var]
    h, mean, var = _dw.forward(h, *depthwise, stride, pad, dilation, act, training, eps)
    stats += [mean, var]
    if se:
        h = _reference.squeeze_excite(h, *se, act=se_act, gate=se_gate)
    out, mean, var = _pw.forward(h, *project, x if skip else None, "identity", training, eps)
    return out, stats + [mean, var]


@on_input_device
def forward(x: torch.Tensor, expand: Sequence[torch.Tensor], depthwise: Sequence[torch.Tensor],
            se: Sequence[torch.Tensor], project: Sequence[torch.Tensor], stride: int,
            dilation: int, act: str, se_act: str, se_gate: str, skip: bool, training: bool,
            eps: float) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(out, stats): out in x's memory format; stats = [mean, var] per stage (expand if any,
    depthwise, project): the statistics used (training: batch mean and biased variance; eval:
    copies of the running ones), float32 (float64 for float64 x). Running statistics are not
    updated here (the caller does)."""
    op = "inverted_residual"
    expand, depthwise, se, project = list(expand), list(depthwise), list(se), list(project)
    mid, cout, k, pad = _check(op, x, expand, depthwise, se, project, stride, dilation, act,
                               se_act, se_gate, skip, training, (5,))
    n, cin, h, w = x.shape
    ho = _checks.conv_out_size(h, k, stride, pad, dilation)
    wo = _checks.conv_out_size(w, k, stride, pad, dilation)
    if expand:
        _checks.training_count(op, n * h * w, training)
    _checks.training_count(op, n * ho * wo, training)
    if min(n, cin, mid, cout, h, w, ho, wo) == 0 or not _offsets_fit_int32(x, cout, ho, wo):
        return _composed(x, expand, depthwise, se, project, stride, dilation, act, se_act,
                         se_gate, skip, training, eps, pad)

    sd = batchnorm.stat_dtype(x)
    acc = _acc(x)
    dev = x.device
    xc = channels_innermost(x)
    out = _like(x, (n, cout, ho, wo))
    bp, bci, bh, bco, warps = _blocks(cin, mid, cout, ho * wo)
    we = expand[0].reshape(mid, cin).t().contiguous() if expand else xc
    wd = depthwise[0].reshape(mid, k * k).t().contiguous()
    wp = project[0].reshape(cout, mid).t().contiguous()
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    xs = (xc.stride(0), xc.stride(2), xc.stride(3))
    stats: List[torch.Tensor] = []

    def running(stage):
        return stage[3].to(sd, copy=True), stage[4].to(sd, copy=True)

    def combined(p0, p1, counts):
        mean, var = batchnorm.combine_partials(p0, p1, counts)
        return mean.to(sd), var.to(sd)

    scale_e = shift_e = None
    if expand:
        if training:
            n_t = _cdiv(h * w, bp)
            p0 = torch.empty((n * n_t, mid), dtype=sd, device=dev)
            p1 = torch.empty_like(p0)
            _ir_expand_stats_kernel[(n * n_t, _cdiv(mid, bh))](
                xc, we, p0, p1, cin, mid, h, w, n_t, *xs, ACC=acc, UPCAST=upcast,
                BLOCK_P=bp, BLOCK_CI=bci, BLOCK_H=bh, num_warps=warps,
                num_stages=NUM_STAGES)
            mean, var = combined(p0, p1, _tile_counts(n, h * w, bp, dev))
        else:
            mean, var = running(expand)
        stats += [mean, var]
        scale_e, shift_e = batchnorm.fold(expand[1], expand[2], mean, var, eps)

    n_t = _cdiv(ho * wo, bp)
    counts = _tile_counts(n, ho * wo, bp, dev)
    vecs = dict(scale_e=scale_e, shift_e=shift_e, scale_d=None, shift_d=None, gate=None,
                scale_p=None, shift_p=None)

    def launch(mode, grid_c, part0=None, part1=None, dst=None):
        stand_in = wd  # never read: the mode's constexprs skip it
        v = [t if t is not None else stand_in for t in vecs.values()]
        o = dst if dst is not None else stand_in
        os_ = (o.stride(0), o.stride(2), o.stride(3), o.stride(1)) if dst is not None \
            else (0, 0, 0, 0)
        _ir_kernel[(n * n_t, grid_c)](
            xc, we, wd, wp, *v, o, part0 if part0 is not None else stand_in,
            part1 if part1 is not None else stand_in,
            cin, mid, cout, h, w, ho, wo, pad, dilation, n_t, *xs, *os_,
            K=k, STRIDE=stride, ACT=CODES[act], MODE=mode, HAS_EXPAND=bool(expand),
            HAS_SE=vecs["gate"] is not None, HAS_RES=bool(skip) and mode == OUT, ACC=acc,
            UPCAST=upcast, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_H=bh, BLOCK_CO=bco,
            num_warps=warps, num_stages=NUM_STAGES)

    if training:
        p0 = torch.empty((n * n_t, mid), dtype=sd, device=dev)
        p1 = torch.empty_like(p0)
        launch(DSTATS, _cdiv(mid, bh), p0, p1)
        mean, var = combined(p0, p1, counts)
    else:
        mean, var = running(depthwise)
    stats += [mean, var]
    vecs["scale_d"], vecs["shift_d"] = batchnorm.fold(depthwise[1], depthwise[2], mean, var,
                                                      eps)
    if se:
        p0 = torch.empty((n * n_t, mid), dtype=sd, device=dev)
        launch(POOL, _cdiv(mid, bh), p0)
        pooled = (p0.view(n, n_t, mid).sum(1, dtype=torch.float64) / (ho * wo)).to(sd)
        vecs["gate"] = _se_gate(pooled, se, se_act, se_gate).contiguous()
    n_cob = _cdiv(cout, bco)
    if training:
        p0 = torch.empty((n * n_t, cout), dtype=sd, device=dev)
        p1 = torch.empty_like(p0)
        launch(PSTATS, n_cob, p0, p1)
        mean, var = combined(p0, p1, counts)
    else:
        mean, var = running(project)
    stats += [mean, var]
    vecs["scale_p"], vecs["shift_p"] = batchnorm.fold(project[1], project[2], mean, var, eps)
    launch(OUT, n_cob, dst=out)
    return out, stats


@on_input_device
def backward(grad_out: torch.Tensor, x: torch.Tensor, expand: Sequence[torch.Tensor],
             depthwise: Sequence[torch.Tensor], se: Sequence[torch.Tensor],
             project: Sequence[torch.Tensor], stats: Sequence[torch.Tensor], stride: int,
             dilation: int, act: str, se_act: str, se_gate: str, skip: bool, training: bool,
             eps: float):
    """(grad_x, grad_expand, grad_depthwise, grad_se, grad_project). expand/depthwise/project:
    [weight, bn_weight, bn_bias] (expand may be []); their gradients come in the same order;
    stats: what the forward returned. The intermediate activations are recomputed (see the
    module docstring), never taken from the forward."""
    op = "inverted_residual_backward"
    expand, depthwise, se, project = list(expand), list(depthwise), list(se), list(project)
    mid, cout, k, pad = _check(op, x, expand, depthwise, se, project, stride, dilation, act,
                               se_act, se_gate, skip, training, (3,))
    n_stats = 2 * (3 if expand else 2)
    if len(stats) != n_stats:
        raise ValueError(f"{op}: stats must hold {n_stats} tensors (mean, var per stage); got "
                         f"{len(stats)}")
    n, cin, h, w = x.shape
    ho = _checks.conv_out_size(h, k, stride, pad, dilation)
    wo = _checks.conv_out_size(w, k, stride, pad, dilation)
    _checks.tensor(op, "grad_out", grad_out, 4, like=x)
    if tuple(grad_out.shape) != (n, cout, ho, wo):
        raise ValueError(f"{op}: grad_out must have shape {(n, cout, ho, wo)}; got "
                         f"{tuple(grad_out.shape)}")
    stats = list(stats)
    if expand:
        mean_e, var_e = stats[:2]
        stats = stats[2:]
        e = _pw.forward(x, *expand, mean_e, var_e, None, act, False, eps)[0]
    else:
        e = x
    mean_d, var_d, mean_p, var_p = stats
    a = _dw.forward(e, *depthwise, mean_d, var_d, stride, pad, dilation, act, False, eps)[0]
    grad_se: List[torch.Tensor] = []
    if se:
        sd = batchnorm.stat_dtype(x)
        gate, saved = _se_gate(a.to(sd).mean((2, 3)), se, se_act, se_gate, keep=True)
        hmid = (a.to(sd) * gate[:, :, None, None]).to(a.dtype)  # as the forward rounds it
    else:
        hmid = a
    dh, gwp, ggp, gbp, gres = _pw.backward(grad_out, hmid, *project, mean_p, var_p,
                                           x if skip else None, "identity", training, eps)
    del hmid
    if se:
        dh32 = dh.to(sd)
        dgate = (dh32 * a.to(sd)).sum((2, 3))
        dpooled, grad_se = _se_backward(dgate, saved, se, se_act, se_gate)
        da = dh32 * gate[:, :, None, None] + dpooled[:, :, None, None] / (ho * wo)
        da = in_format(da.to(x.dtype), a)
        del dh32, dgate
    else:
        da = dh
    del a, dh
    de, gwd, ggd, gbd = _dw.backward(da, e, *depthwise, mean_d, var_d, stride, pad, dilation,
                                     act, training, eps)
    del da
    if expand:
        del e
        gx, gwe, gge, gbe, _ = _pw.backward(de, x, *expand, mean_e, var_e, None, act, training,
                                            eps)
        grad_expand = [gwe, gge, gbe]
    else:
        gx, grad_expand = de, []
    if skip:
        gx = gx + gres
    return in_format(gx, x), grad_expand, [gwd, ggd, gbd], grad_se, [gwp, ggp, gbp]


# ---- ahead-of-time compile specs (make kernels-report) --------------------------------------

def _aot_specs():
    """The MobileNetV2 case: dense NHWC, k=3, relu6, every mode (PSTATS/OUT with SE, OUT with
    the skip), fp16 and fp32, each CONFIGS entry with BLOCK_CI = BLOCK_CO = 32 (Cin, Cout
    17..32) and with its widest channel tiles (BLOCK_CI = 64: Cin >= 33; BLOCK_CO = 64 / 128).
    DSTATS and POOL have no Cout tile (BLOCK_CO unused)."""
    specs = []
    f32 = ("scale_e_ptr", "shift_e_ptr", "scale_d_ptr", "shift_d_ptr", "gate_ptr",
           "scale_p_ptr", "shift_p_ptr", "part0_ptr", "part1_ptr")
    div16 = {"sxn", "sxh", "sxw", "son", "soh", "sow"}

    def one(label, fn, dt, cx, nw):
        names = fn.arg_names
        ann = fn.fn.__annotations__ if hasattr(fn, "fn") else fn.__annotations__
        sig = {}
        for a in names:
            if "constexpr" in str(ann.get(a, "")):
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*fp32" if a in f32 else f"*{dt}"
            else:
                sig[a] = "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
                 if a.endswith("_ptr") or a in div16}
        specs.append(dict(label=label, fn=fn, signature=sig, constexprs=cx,
                          options={"num_warps": nw, "num_stages": NUM_STAGES}, attrs=attrs))

    modes = {"dstats": DSTATS, "pool": POOL, "pstats": PSTATS, "out": OUT}
    # (config, BLOCK_CI, BLOCK_CO): each config with a narrow and its widest channel tiles.
    tiles = ((0, 32, 32), (0, 64, 64), (1, 32, 32), (1, 64, 128))
    for dt in ("fp16", "fp32"):
        for ci, bci, bco in tiles:
            bp, bh, nw = CONFIGS[ci]["BLOCK_P"], CONFIGS[ci]["BLOCK_H"], CONFIGS[ci]["num_warps"]
            tag = f"{dt} p{bp}h{bh}ci{bci}w{nw}"
            one(f"ir_expand_stats {tag}", _ir_expand_stats_kernel, dt,
                dict(ACC=tl.float32, UPCAST=False, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_H=bh), nw)
            for mname, mode in modes.items():
                one(f"ir_{mname} {tag}{f'co{bco}' if mode >= PSTATS else ''} k3 relu6",
                    _ir_kernel, dt,
                    dict(K=3, STRIDE=1, ACT=CODES["relu6"], MODE=mode, HAS_EXPAND=True,
                         HAS_SE=mode in (PSTATS, OUT), HAS_RES=mode == OUT, ACC=tl.float32,
                         UPCAST=False, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_H=bh,
                         BLOCK_CO=bco if mode >= PSTATS else 16), nw)
    return specs


AOT_SPECS = _aot_specs()
