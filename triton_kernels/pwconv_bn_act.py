"""Pointwise (1x1) conv + BatchNorm + activation (+ residual) in Triton, forward and backward.

A 1x1 conv on NHWC data is a GEMM: y[P = N*H*W, Cout] = x[P, Cin] @ W^T. Everything else is
the epilogue of that GEMM. ONE kernel, `_pw_gemm_kernel`, computes C = A @ B over strided
operands (fp32 accumulation, fp64 for fp64) and ends in one of five constexpr epilogues:

  STATS  forward, training pass 1: per 64-row tile of y, (mean, M2) per output channel; no store
  FWD    out = act(y*scale + shift [+ residual])  (eval: running stats; training pass 2: batch)
  BWD_A  backward pass 1: recompute y, z; g = grad_out * act'(z); grad_residual = g; per 64-row
         tile sums of g and g*xhat; in eval also dy = a*g (no batch-stat terms: no pass 2)
  BWD_B  backward pass 2 (training): recompute y, g; dy = a*g + b*xhat + c
  STORE  a plain GEMM: grad_x = dy @ W, and grad_weight = dy^T @ x split over fixed pixel chunks

The forward/backward never store y: it is recomputed from x (for the expansion layers of
MobileNetV2, Cin << Cout, reading x again costs far less than writing and reading y).

Layouts: x is read as a dense NHWC matrix; an x that is not channels_last-contiguous is copied to
channels_last once (an NCHW x costs that conversion). Everything indexed by pixel rows in the
epilogue (out, residual, grad_out, grad_residual, grad_x) is addressed through its own 4-D
strides, so residual/grad_out in any layout are read in place, and out/grad_x are written
directly in x's memory format (no conversion copy on the way back).

dtypes: fp16/bf16 operands go to tl.dot directly (tensor cores, fp32 accumulate); fp32 uses
input_precision="ieee" (no TF32: results meet 1e-5); fp64 uses tl.dot on fp64 operands with an
fp64 accumulator (Triton lowers it to DMMA/FMA on GPU, numpy in the interpreter).
Triton 3.8's interpreter returns garbage for a bf16 x bf16 tl.dot, so under TRITON_INTERPRET=1
bf16 operands are upcast to fp32 before tl.dot (constexpr UPCAST). The interpreter therefore
proves the bf16 loads/stores/epilogues but NOT the bf16 tensor-core dot: that path is only
proven by the compiled tests on a GPU.

Determinism: no atomics. BN statistics and dgamma/dbeta are per-(64-row tile, channel)
partials reduced on the host in float64 in a fixed order (batchnorm.combine_partials, torch
sums); those two modes always use BLOCK_M = 64 tiles, so the autotuner's choice (BLOCK_N,
BLOCK_K, warps, stages) does not move the reduction tree. grad_weight partials are per fixed
pixel chunk (chosen from the shape only) and summed with torch in chunk order.

Speed notes (H200, MobileNetV2 at N=64, fp16 channels_last, measured with triton 3.6): the eval
forward of 24->144 @56x56 takes 39 us (HBM floor ~17 us; PyTorch eager conv+BN+ReLU6: ~150 us);
144->24 @56x56 with residual 27 us (floor ~20 us). The STATS and BWD_A passes are latency bound
(a 64-row tile of x is only 3 KB in flight per CTA); the next step there is to prefetch the
epilogue operands (residual, grad_out) before the K loop and, for K <= BLOCK_K, to keep W
resident and stream several M tiles per program. The host side (checks, BN arithmetic in small
torch ops, launches) costs ~0.2 ms (eval forward) to ~1 ms (training forward, backward) of CPU
per call, more than the kernels: capture in a CUDA graph to hide it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _checks
from .._registration import _like
from . import batchnorm
from .activation import CODES, act_backward, act_forward
from .host import on_input_device

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen for an H200 on MobileNetV2's
# 1x1 layers at N=64 (fp16 channels_last): P = 200704 pixel rows at 56x56, Cin/Cout 16..960.
# These GEMMs are memory bound (K = Cin as small as 16..24): BLOCK_M tiles streaming x,
# BLOCK_N covering much of Cout so that x is re-read (from L2) few times. On the H200 the
# autotuner picked 128x64x32 (4 warps, 3 stages) for the 24->144 forward and 128x32 tiles for
# the 144->24 projection.
# BLOCK_K >= 16 (tl.dot). The STATS and BWD_A epilogues reduce whole tiles over their rows, so
# they use the BLOCK_M == STAT_ROWS configs only (their partials do not depend on the choice).
CONFIGS = [
    (128, 32, 32, 4, 4),   # projections (Cout 16..32)
    (128, 32, 64, 4, 3),   # projections from wide inputs (K = 96..960)
    (128, 64, 32, 4, 3),   # expansions (Cout 96..960)
    (128, 128, 32, 8, 3),
    (64, 32, 32, 4, 4),    # BLOCK_M = STAT_ROWS: statistics, dgamma/dbeta
    (64, 64, 32, 4, 4),
    (64, 64, 64, 4, 3),    # also small-P late layers (7x7, 14x14): more programs for 132 SMs
    (64, 128, 32, 4, 3),
]
STAT_ROWS = 64          # rows per BN-statistics / dgamma-dbeta partial
DW_CHUNK_QUANTUM = 256  # grad_weight pixel chunks are multiples of this (and of every BLOCK_K)
DW_TARGET_PROGRAMS = 512  # grad_weight: split the pixels until about this many programs

# Epilogue modes.
STATS, FWD, BWD_A, BWD_B, STORE = 0, 1, 2, 3, 4

# Test hook: an index into CONFIGS forces that config (tests run every config's code path).
_FORCED_CONFIG = None


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _prune(configs, named_args, **kwargs):
    """Keep BLOCK_M == STAT_ROWS for the modes that write per-tile partials; drop configs whose
    BLOCK_N / BLOCK_K far exceed the problem (pure masking waste). fp64 (a correctness path,
    for gradcheck), the interpreter and EFFK_TRITON_AUTOTUNE=0 get one config, unbenchmarked."""
    args = {**named_args, **kwargs}
    if args["MODE"] in (STATS, BWD_A):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] == STAT_ROWS]
    if _FORCED_CONFIG is not None:
        forced = CONFIGS[_FORCED_CONFIG]
        # (partial-writing modes: the forced tile's BLOCK_N/BLOCK_K with BLOCK_M = STAT_ROWS)
        return [min(configs, key=lambda c: (c.kwargs["BLOCK_N"] != forced[1],
                                            c.kwargs["BLOCK_K"] != forced[2],
                                            c.kwargs["BLOCK_M"] != forced[0]))]
    if args["ACC"] == tl.float64:
        return configs[:1]  # the smallest tile: fp64 doubles registers and shared memory
    n_cap, k_cap = max(32, _next_pow2(args["N"])), max(32, _next_pow2(args["K_CHUNK"]))
    if args["a_ptr"].dtype == torch.float32:
        k_cap = 32  # fp32 "ieee" dots run on FMA units from registers: BLOCK_K=64 spills
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    keep = keep or configs[:1]
    return keep[-1:] if _INTERPRET or not _autotune() else keep


def _autotune() -> bool:
    """EFFK_TRITON_AUTOTUNE=0: one config per problem, unbenchmarked (as in the interpreter).
    The autotuner times every kept config for each new (M, N, K, mode) (do_bench's defaults:
    ~0.125 s per config, up to 8 configs, so about 1 s per key; an estimate, not measured),
    and every test shape is a new key: the GPU test runs set it (bench/gpu_check.sh), while
    test_every_config still compiles and checks each config. Read per key, not at import."""
    return os.environ.get("EFFK_TRITON_AUTOTUNE", "1") != "0"


@triton.jit
def _tile_offsets(rm, rn, H, W, s_n, s_h, s_w, s_c, NHWC: tl.constexpr, ALIGN: tl.constexpr):
    """Element offsets of a [rows, columns] tile of a 4-D tensor indexed by pixel rows
    p = (n*H + h)*W + w and channels. NHWC (dense channels_last): row p starts at p*s_w (s_w =
    C, a multiple of ALIGN), unit channel stride: vectorised, no divisions. Otherwise any
    strides, through the (n, h, w) decomposition of p."""
    if NHWC:
        ld = s_w // ALIGN * ALIGN  # == s_w; written so that the compiler knows ALIGN | s_w
        return (rm * ld)[:, None] + rn[None, :]
    else:
        hw = rm % (H * W)
        rows = (rm // (H * W)) * s_n + (hw // W) * s_h + (hw % W) * s_w
        return rows[:, None] + rn[None, :] * s_c


@triton.jit
def _pw_gemm_kernel(
        a_ptr, b_ptr, c_ptr,                    # A [M, K], B [K, N], C: the stored result
        res_ptr, gout_ptr, gres_ptr,            # residual, grad_out, grad_residual (4-D)
        scale_ptr, shift_ptr, mean_ptr, invstd_ptr, coef_b_ptr, coef_c_ptr,  # per column
        part0_ptr, part1_ptr,                   # [groups, N] partials (STATS, BWD_A)
        M, N, K, K_CHUNK, H, W,
        lda, ldb,                               # the non-unit strides of A and B
        stride_cn, stride_ch, stride_cw, stride_cc, stride_cs,  # C rows as pixels; split-K slab
        stride_rn, stride_rh, stride_rw, stride_rc,
        stride_gn, stride_gh, stride_gw, stride_gc,
        stride_qn, stride_qh, stride_qw, stride_qc,
        MODE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DY: tl.constexpr,
        ACC: tl.constexpr, UPCAST: tl.constexpr, STAT_ROWS: tl.constexpr,
        A_KMAJOR: tl.constexpr, B_NMAJOR: tl.constexpr,  # A[m, k] at m*lda + k, else m + k*lda
        C_NHWC: tl.constexpr, R_NHWC: tl.constexpr, G_NHWC: tl.constexpr, Q_NHWC: tl.constexpr,
        ALIGN: tl.constexpr,  # a power of 2 dividing K, K_CHUNK, N, lda, ldb, NHWC row strides
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # `v // ALIGN * ALIGN` (== v, checked on the host) lets the compiler prove alignment, so
    # that loads, stores and masks vectorise for channel counts that are multiples of 8 but
    # not of 16 (24, 40, 72, ...), which the JIT's own divisibility-by-16 specialisation misses.
    N = N // ALIGN * ALIGN
    K = K // ALIGN * ALIGN
    K_CHUNK = K_CHUNK // ALIGN * ALIGN
    lda = lda // ALIGN * ALIGN
    ldb = ldb // ALIGN * ALIGN
    if not A_KMAJOR:
        M = M // ALIGN * ALIGN  # M is then A's contiguous dimension (grad_weight: Cout)
    pid = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    # N-tiles of one M-tile are neighbours in launch order: the A tile (x, the big operand) is
    # re-read from L2 rather than HBM; B (the weight) is small and stays in L2.
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_CHUNK + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N

    # Split-K (grad_weight): this program reduces k in [k_lo, k_hi). Masked loads pad K (Cin
    # may be 1..3) up to BLOCK_K >= 16, as tl.dot needs.
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)
    if A_KMAJOR:
        a_ptrs = a_ptr + (rm * lda)[:, None] + rk[None, :]
        a_step = BLOCK_K
    else:
        a_ptrs = a_ptr + rm[:, None] + (rk * lda)[None, :]
        a_step = BLOCK_K * lda
    if B_NMAJOR:
        b_ptrs = b_ptr + (rk * ldb)[:, None] + rn[None, :]
        b_step = BLOCK_K * ldb
    else:
        b_ptrs = b_ptr + rk[:, None] + (rn * ldb)[None, :]
        b_step = BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (rk + (k0 - k_lo)) < k_hi
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot is broken
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
        a_ptrs += a_step
        b_ptrs += b_step

    mask = m_ok[:, None] & n_ok[None, :]
    if MODE == 4:  # STORE
        c_off = _tile_offsets(rm, rn, H, W, stride_cn, stride_ch, stride_cw, stride_cc, C_NHWC,
                              ALIGN)
        slab = pid_k * (stride_cs // ALIGN * ALIGN)
        tl.store(c_ptr + slab + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif MODE == 0:  # STATS: (mean, M2) of this tile's rows per column, two-pass, from acc
        tl.static_assert(BLOCK_M == STAT_ROWS)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        mean = tl.sum(acc, axis=0) / cnt  # rows past M are 0 (masked A loads)
        dev = tl.where(m_ok[:, None], acc - mean[None, :], 0.0)
        tl.store(part0_ptr + pid_m * N + rn, mean, mask=n_ok)
        tl.store(part1_ptr + pid_m * N + rn, tl.sum(dev * dev, axis=0), mask=n_ok)
    else:  # FWD, BWD_A, BWD_B: the BN/residual/activation epilogue
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        shift = tl.load(shift_ptr + rn, mask=n_ok, other=0.0)
        z = acc * scale[None, :] + shift[None, :]
        if HAS_RES:
            r_off = _tile_offsets(rm, rn, H, W, stride_rn, stride_rh, stride_rw, stride_rc,
                                  R_NHWC, ALIGN)
            z += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(ACC)
        c_off = _tile_offsets(rm, rn, H, W, stride_cn, stride_ch, stride_cw, stride_cc, C_NHWC,
                              ALIGN)
        if MODE == 1:  # FWD
            tl.store(c_ptr + c_off, act_forward(z, ACT).to(c_ptr.dtype.element_ty), mask=mask)
        else:
            g_off = _tile_offsets(rm, rn, H, W, stride_gn, stride_gh, stride_gw, stride_gc,
                                  G_NHWC, ALIGN)
            gout = tl.load(gout_ptr + g_off, mask=mask, other=0.0)
            g = act_backward(gout.to(ACC), z, ACT)  # 0 on masked rows/columns
            if MODE == 2:  # BWD_A
                mean = tl.load(mean_ptr + rn, mask=n_ok, other=0.0)
                invstd = tl.load(invstd_ptr + rn, mask=n_ok, other=0.0)
                xhat = (acc - mean[None, :]) * invstd[None, :]
                if HAS_RES:
                    q_off = _tile_offsets(rm, rn, H, W, stride_qn, stride_qh, stride_qw,
                                          stride_qc, Q_NHWC, ALIGN)
                    tl.store(gres_ptr + q_off, g.to(gres_ptr.dtype.element_ty), mask=mask)
                tl.static_assert(BLOCK_M == STAT_ROWS)
                tl.store(part0_ptr + pid_m * N + rn, tl.sum(g, axis=0), mask=n_ok)
                tl.store(part1_ptr + pid_m * N + rn, tl.sum(g * xhat, axis=0), mask=n_ok)
                if WRITE_DY:  # eval: dy = a * g, a = gamma * invstd = scale
                    tl.store(c_ptr + c_off, (g * scale[None, :]).to(c_ptr.dtype.element_ty),
                             mask=mask)
            else:  # BWD_B: dy = a*g + b*xhat + c = a*g + (b*invstd)*(y - mean) + c, with
                # b*invstd folded on the host (one vector and one live tile fewer)
                mean = tl.load(mean_ptr + rn, mask=n_ok, other=0.0)
                cb = tl.load(coef_b_ptr + rn, mask=n_ok, other=0.0)
                cc = tl.load(coef_c_ptr + rn, mask=n_ok, other=0.0)
                dy = g * scale[None, :] + (acc - mean[None, :]) * cb[None, :] + cc[None, :]
                tl.store(c_ptr + c_off, dy.to(c_ptr.dtype.element_ty), mask=mask)


_gemm = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                           num_stages=s) for bm, bn, bk, w, s in CONFIGS],
    key=["M", "N", "K", "K_CHUNK", "MODE"],
    prune_configs_by={"early_config_prune": _prune},
)(_pw_gemm_kernel)


# ---- host side ------------------------------------------------------------------------------

def _acc_dtype(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _desc(t):
    """(NHWC, (s_n, s_h, s_w, s_c)) of a 4-D tensor for _tile_offsets: dense channels_last
    takes the fast path (row stride C, unit channel stride), anything else its own strides."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return True, (0, 0, t.shape[1], 1)
    return False, (t.stride(0), t.stride(2), t.stride(3), t.stride(1))


def _matrix_desc(cols):
    """A dense row-major [rows, cols] matrix as a 4-D NHWC descriptor."""
    return True, (0, 0, cols, 1)


def _nhwc_matrix(t):
    """t as a dense [N*H*W, C] matrix: one channels_last copy unless it already is one."""
    n, c, h, w = t.shape
    if not t.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _pow2_dividing(*values, cap=16):
    """The largest power of 2 <= cap dividing every value."""
    a = cap
    for v in values:
        while a > 1 and v % a:
            a //= 2
    return a


_NO_DESC = (True, (0, 0, 0, 1))


def _launch(mode, a, lda, a_kmajor, b, ldb, b_nmajor, c, c_desc, M, N, K, H, W, *,
            k_chunk=None, splits=1, stride_cs=0, res=None, gout=None, gres=None, vecs=(),
            parts=(), act=0, write_dy=False, acc=tl.float32, upcast=False):
    """One _pw_gemm_kernel launch; unused pointers get a harmless stand-in (never read)."""
    v = list(vecs) + [c] * (6 - len(vecs))
    p = list(parts) + [c] * (2 - len(parts))
    k_chunk = max(K, 1) if k_chunk is None else k_chunk
    descs = [c_desc] + [_desc(t) if t is not None else _NO_DESC for t in (res, gout, gres)]
    align = _pow2_dividing(K, k_chunk, N, lda, ldb, stride_cs, 0 if a_kmajor else M,
                           *(d[1][2] for d in descs if d[0]))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)

    _gemm[grid](
        a, b, c, *(t if t is not None else c for t in (res, gout, gres)), *v, *p,
        M, N, K, k_chunk, H, W, lda, ldb, *c_desc[1], stride_cs,
        *descs[1][1], *descs[2][1], *descs[3][1],
        MODE=mode, ACT=act, HAS_RES=res is not None, WRITE_DY=write_dy, ACC=acc,
        UPCAST=upcast, STAT_ROWS=STAT_ROWS, A_KMAJOR=a_kmajor, B_NMAJOR=b_nmajor,
        C_NHWC=descs[0][0], R_NHWC=descs[1][0], G_NHWC=descs[2][0], Q_NHWC=descs[3][0],
        ALIGN=align)


def _check_common(op, x, weight, residual):
    _checks.tensor(op, "x", x, 4)
    _checks.tensor(op, "weight", weight, 4, like=x)
    cout = weight.shape[0]
    if weight.shape[1] != x.shape[1] or weight.shape[2] != 1 or weight.shape[3] != 1:
        raise ValueError(f"{op}: weight must have shape (Cout, Cin, 1, 1) with Cin == "
                         f"{x.shape[1]}; got {tuple(weight.shape)}")
    expected = (x.shape[0], cout, x.shape[2], x.shape[3])
    if residual is not None:
        _checks.tensor(op, "residual", residual, 4, like=x)
        if tuple(residual.shape) != expected:
            raise ValueError(f"{op}: residual must have shape {expected}; got "
                             f"{tuple(residual.shape)}")
    return cout, expected


def _operands(x, weight):
    """x as a dense [P, Cin] NHWC matrix and W as a dense [Cout, Cin] one; an empty x (Cin ==
    0) becomes a one-element stand-in that the zero-trip K loop never reads."""
    xm = _nhwc_matrix(x)
    if xm.numel() == 0:
        xm = torch.zeros((1, 1), dtype=x.dtype, device=x.device)
    wm = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    if wm.numel() == 0:
        wm = torch.zeros((1, 1), dtype=x.dtype, device=x.device)
    return xm, wm


def _upcast(x):
    return _INTERPRET and x.dtype == torch.bfloat16


@on_input_device
def forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, act, training,
            eps):
    """(out, mean, var): out = act(BN(conv1x1(x)) [+ residual]) in x's memory format; mean/var
    are the statistics used (training: batch mean and biased variance), float32 (float64 for
    float64 x). Running statistics are not touched (the caller updates them)."""
    op = "pwconv_bn_act"
    cout, out_shape = _check_common(op, x, weight, residual)
    _checks.bn(op, x, cout, bn_weight, bn_bias, running_mean, running_var, training)
    _checks.act(op, "act", act)
    n, cin, h, w = x.shape
    P = n * h * w
    _checks.training_count(op, P, training)

    sd = batchnorm.stat_dtype(x)
    out = _like(x, out_shape)
    if training and (P == 0 or cout == 0):
        mean = torch.zeros(cout, dtype=sd, device=x.device)
        var = torch.zeros(cout, dtype=sd, device=x.device)
    elif not training:
        mean = torch.empty(cout, dtype=sd, device=x.device).copy_(running_mean)
        var = torch.empty(cout, dtype=sd, device=x.device).copy_(running_var)
    if P == 0 or cout == 0:
        return out, mean, var

    xm, wm = _operands(x, weight)
    # y = x @ W^T: A = x (k-major, lda = Cin), B[k, n] = W[n, k] (k-major, ldb = Cin).
    gemm = (xm, xm.shape[1], True, wm, wm.shape[1], False)
    common = dict(acc=_acc_dtype(x), upcast=_upcast(x))
    if training:
        groups = triton.cdiv(P, STAT_ROWS)
        pmean = torch.empty((groups, cout), dtype=sd, device=x.device)
        pm2 = torch.empty_like(pmean)
        _launch(STATS, *gemm, pmean, _NO_DESC, P, cout, cin, h, w, parts=(pmean, pm2),
                **common)
        counts = (P - torch.arange(groups, dtype=torch.float64, device=x.device) * STAT_ROWS
                  ).clamp(max=STAT_ROWS)  # rows per group (made on the device: no sync)
        mean, var = batchnorm.combine_partials(pmean, pm2, counts)
        mean, var = mean.to(sd), var.to(sd)
    scale, shift = batchnorm.fold(bn_weight, bn_bias, mean, var, eps)
    _launch(FWD, *gemm, out, _desc(out), P, cout, cin, h, w, res=residual,
            vecs=(scale, shift), act=CODES[act], **common)
    return out, mean, var


def _dw_chunk(P, cout, cin):
    """Pixel rows per grad_weight partial: from the shape only (determinism), a multiple of
    DW_CHUNK_QUANTUM, enough chunks to fill the GPU when Cout x Cin has few tiles."""
    tiles = triton.cdiv(cout, 64) * triton.cdiv(cin, 64)
    chunks = max(1, min(triton.cdiv(P, DW_CHUNK_QUANTUM), triton.cdiv(DW_TARGET_PROGRAMS, tiles)))
    return triton.cdiv(triton.cdiv(P, chunks), DW_CHUNK_QUANTUM) * DW_CHUNK_QUANTUM


@on_input_device
def backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, residual, act, training, eps,
             conv_out=None):
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias, grad_residual), each in its input's
    dtype (grad_residual: empty when there is no residual). y = conv(x) is recomputed: a given
    conv_out (the C++ CPU forward's) is checked, not used."""
    op = "pwconv_bn_act_backward"
    cout, out_shape = _check_common(op, x, weight, residual)
    _checks.conv_out(op, conv_out, x, cout)
    _checks.tensor(op, "grad_out", grad_out, 4, like=x)
    if tuple(grad_out.shape) != out_shape:
        raise ValueError(f"{op}: grad_out must have shape {out_shape}; got "
                         f"{tuple(grad_out.shape)}")
    _checks.bn(op, x, cout, bn_weight, bn_bias, None, None, True)
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != cout \
                or t.device != x.device or not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor of shape ({cout},) "
                             f"on {x.device}; got {getattr(t, 'shape', type(t).__name__)}")
    _checks.act(op, "act", act)
    n, cin, h, w = x.shape
    P = n * h * w

    grad_x = _like(x)
    grad_w = torch.empty_like(weight)
    grad_g = torch.empty_like(bn_weight)
    grad_b = torch.empty_like(bn_bias)
    grad_res = _like(residual) if residual is not None else x.new_empty((0,))
    if P == 0 or cout == 0:
        for t in (grad_x, grad_w, grad_g, grad_b, grad_res):
            t.zero_()
        return grad_x, grad_w, grad_g, grad_b, grad_res

    sd = batchnorm.stat_dtype(x)
    mean = mean.to(sd).contiguous()
    var = var.to(sd).contiguous()
    xm, wm = _operands(x, weight)
    gemm = (xm, xm.shape[1], True, wm, wm.shape[1], False)  # y = x @ W^T, as in forward
    common = dict(acc=_acc_dtype(x), upcast=_upcast(x))
    zeros = torch.zeros(cout, dtype=sd, device=x.device)
    scale, shift = batchnorm.fold(bn_weight, bn_bias, mean, var, eps)
    _, _, _, invstd = batchnorm.backward_coeffs(bn_weight, mean, var, eps, zeros, zeros, P,
                                                False)
    invstd = invstd.contiguous()

    # dy = dL/dy as an NHWC [P, Cout] matrix: fp32/fp64 for fp32/fp64 x, else x's dtype (so the
    # dx / dW GEMMs run on tensor cores).
    dy = torch.empty((P, cout), dtype=x.dtype, device=x.device)
    groups = triton.cdiv(P, STAT_ROWS)
    psum_g = torch.empty((groups, cout), dtype=sd, device=x.device)
    psum_gx = torch.empty_like(psum_g)
    epi = dict(res=residual, gout=grad_out, act=CODES[act], **common)
    _launch(BWD_A, *gemm, dy, _matrix_desc(cout), P, cout, cin, h, w,
            gres=grad_res if residual is not None else None,
            vecs=(scale, shift, mean, invstd), parts=(psum_g, psum_gx), write_dy=not training,
            **epi)
    sum_g = psum_g.double().sum(0)
    sum_gx = psum_gx.double().sum(0)
    grad_b.copy_(sum_g)
    grad_g.copy_(sum_gx)
    if training:
        _, coef_b, coef_c, _ = batchnorm.backward_coeffs(bn_weight, mean, var, eps, sum_g,
                                                         sum_gx, P, True)
        b_y = (coef_b.double() * invstd.double()).to(sd)  # b * xhat = (b * invstd) * (y - mean)
        _launch(BWD_B, *gemm, dy, _matrix_desc(cout), P, cout, cin, h, w,
                vecs=(scale, shift, mean, invstd, b_y, coef_c.contiguous()), **epi)
    if cin == 0:
        return grad_x, grad_w, grad_g, grad_b, grad_res

    # grad_x[P, Cin] = dy @ W, written straight into x's memory format.
    # (A = dy k-major, lda = Cout; B = W n-major, ldb = Cin.)
    _launch(STORE, dy, cout, True, wm, cin, True, grad_x, _desc(grad_x), P, cin, cout, h, w,
            **common)
    # grad_weight[Cout, Cin] = dy^T @ x, reduced over fixed pixel chunks (one partial each),
    # summed in chunk order.
    chunk = _dw_chunk(P, cout, cin)
    splits = triton.cdiv(P, chunk)
    partial = torch.empty((splits, cout, cin), dtype=sd, device=x.device)
    # (A = dy^T m-major, lda = Cout; B = x n-major, ldb = Cin; C = slab pid_k of partial.)
    _launch(STORE, dy, cout, False, xm, xm.shape[1], True, partial, _matrix_desc(cin), cout,
            cin, P, 1, 1, k_chunk=chunk, splits=splits, stride_cs=cout * cin, **common)
    grad_w.copy_(partial.sum(0).view(cout, cin, 1, 1))
    return grad_x, grad_w, grad_g, grad_b, grad_res


# ---- ahead-of-time compile specs (make kernels-report) --------------------------------------

def _aot_specs():
    """Every epilogue mode x its autotune configs x {fp16, fp32}, for the MobileNet case: dense
    NHWC tensors, channel counts multiples of 8 (ALIGN=8), a residual, relu6. STORE is the
    grad_x GEMM (dy @ W)."""
    specs = []
    names = _pw_gemm_kernel.arg_names
    ann = _pw_gemm_kernel.fn.__annotations__  # (also there in the interpreter)
    constexpr_args = [n for n in names if "constexpr" in str(ann.get(n, ""))]
    stat_ptrs = ("scale_ptr", "shift_ptr", "mean_ptr", "invstd_ptr", "coef_b_ptr",
                 "coef_c_ptr", "part0_ptr", "part1_ptr")
    modes = {"stats": STATS, "fwd": FWD, "bwd_a": BWD_A, "bwd_b": BWD_B, "store": STORE}
    # The JIT specialises 16-byte-aligned pointers (tt.divisibility 16); without it the AOT
    # code would be scalar and far more register-hungry than what runs. Pass as
    # ASTSource(..., attrs=spec["attrs"]).
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a.endswith("_ptr")}
    for dname, tdt in (("fp16", "*fp16"), ("fp32", "*fp32")):
        for mname, mode in modes.items():
            for bm, bn, bk, nw, ns in CONFIGS:
                if (mode in (STATS, BWD_A) and bm != STAT_ROWS) or (dname == "fp32" and bk > 32):
                    continue  # configs _prune never runs for that mode / dtype
                sig = {}
                for a in names:
                    if a in constexpr_args:
                        sig[a] = "constexpr"
                    elif a.endswith("_ptr"):
                        fp32 = a in stat_ptrs or (a == "c_ptr" and mode == STATS)
                        sig[a] = "*fp32" if fp32 else tdt
                    else:
                        sig[a] = "i32"
                cx = dict(MODE=mode, ACT=CODES["relu6"], HAS_RES=mode != STORE, WRITE_DY=False,
                          ACC=tl.float32, UPCAST=False, STAT_ROWS=STAT_ROWS, A_KMAJOR=True,
                          B_NMAJOR=mode == STORE, C_NHWC=True, R_NHWC=True, G_NHWC=True,
                          Q_NHWC=True, ALIGN=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                specs.append(dict(label=f"pw_{mname}_{dname}_m{bm}n{bn}k{bk}w{nw}s{ns}",
                                  fn=_pw_gemm_kernel, signature=sig, constexprs=cx,
                                  options={"num_warps": nw, "num_stages": ns}, attrs=attrs))
    return specs


AOT_SPECS = _aot_specs()
