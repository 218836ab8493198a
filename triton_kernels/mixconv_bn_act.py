"""MixNet's mixed depthwise conv + BatchNorm + activation (Triton), NHWC.

Channel group i (C_i consecutive channels) is convolved with weights[i] (C_i, 1, k_i, k_i), k_i
odd, padding dilation*(k_i-1)//2, so all groups share the output size ((H-1)//stride+1); one
BatchNorm over all C channels; then the activation. Every kernel size of the layer is served by
ONE launch per pass (no split/cat, no per-group launch).

Layout choice: a per-channel-block kernel-size table with static branches over k, not one
global K_MAX x K_MAX zero-padded window. Depthwise conv in Triton is bound by the per-tap tile
loads (L1) and FMAs, both proportional to the taps computed. For MixNet-M layers (k = 3/5/7/9
in equal splits) a global 9x9 window computes 81 taps for every channel, against 41 on average:
C=240 (4 x 60) costs 19440 lane-taps per pixel instead of 9840 (1.98x; 1.77x for 3/5/7). With
channel blocks that start at multiples of 8 (aligned 16-byte vector loads) and split at the
group boundaries rounded down to 8, each block uses the largest k among its channels (a few
channels of the previous group ride along, zero-padded and centred, in a straddling block):
10496 lane-taps for C=240 (1.07x exact), 1.00-1.05x for the other MixNet-M layers. The block's
k is read from a small table; `if k == K:` branches (one per k present in the layer, a constexpr
bit mask) hold fully unrolled K x K tap loops, so each block runs the unrolled code for its own
k and nothing else.

Packed weights: per block b a (k_b*k_b, BLOCK_C) slab, tap-major, channels contiguous, smaller
kernels centred in the k_b x k_b window (zero taps absorb the padding difference), slabs
concatenated (offset woff_b, a multiple of BLOCK_C). Packing and unpacking (dweight) are single
gathers through index maps cached per layer geometry. The packed weights are in the
accumulation dtype (fp32, fp64 for fp64).

Passes (tiles: one (n, output row) x all columns in BLOCK_W steps x one channel block):
- forward eval: y = conv(x), out = act(y*scale + shift), BN folded in the kernel's prologue
  (batchnorm.fold's formula: on the host it costs ~10 tiny launches per call, measured on the
  H200 to be more CPU time than the kernel's GPU time for the late MixNet layers).
- forward training: pass 1 (STATS) stores nothing but per-(row, channel) Welford partials
  (mean, M2; count Wo) merged in registers along the row; batchnorm.combine_partials on the
  host; pass 2 = the eval body with the batch statistics folded. Same kernel, constexpr flag.
- backward: one kernel body recomputes y and z, g = grad_out*act'(z); STATS writes per-row
  partial sums of g and g*xhat, STORE writes dy = a*g + b*xhat + c (fp32 NHWC): training runs
  two passes with a, b, c from batchnorm.backward_coeffs between them; eval one pass doing both
  (a = gamma*invstd, b = c = 0, computed in the kernel). dx is the
  transposed mixed depthwise conv of dy (stride-2 parity handled by scalar branches, so only
  the contributing taps run); dweight is a per-(row chunk, block) partial per tap (kw as a
  third tile axis so that one dy tile serves a whole kernel row), summed on the host in a fixed
  order. No atomics anywhere: every result is bit-for-bit reproducible.

x may have any N/H/W strides as long as channels are innermost (channels_last, or a channel
slice of one); other inputs (NCHW) are converted once to channels_last, and an NCHW result is
converted back: NCHW costs one conversion each way.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from effkernels import _checks

from . import batchnorm
from .activation import CODES, act_backward, act_forward
from .host import channels_innermost, in_format, on_input_device

# Tile configurations (one list): the launcher picks one per layer shape (_pick_config; cached)
# instead of timing them, because the block table and packed weights depend on BLOCK_C.
# BLOCK_W x BLOCK_C spans num_warps*32 threads with 16-byte channel vectors (fp16).
# num_stages 1: no tl.dot to pipeline, and 3 was slower for the training forward in a first
# (noisy, host-bound) H200 sweep.
CONFIGS = [
    dict(BLOCK_W=8, BLOCK_C=32, num_warps=1, num_stages=1),
    dict(BLOCK_W=16, BLOCK_C=32, num_warps=2, num_stages=1),
    dict(BLOCK_W=8, BLOCK_C=64, num_warps=2, num_stages=1),
    dict(BLOCK_W=16, BLOCK_C=64, num_warps=4, num_stages=1),
]
# dweight: a (KP, BLOCK_W, BLOCK_C) accumulator of DW_TILE elements (KP = next power of 2 >=
# k; BLOCK_W follows), DW_WARPS warps: 32 accumulator registers per thread.
DW_TILE = 4096
DW_WARPS = 4
# dweight partial chunks: about this many programs in all (a constant, not the SM count, so
# that the summation order and hence the bits are the same on every GPU).
DW_TARGET_PROGRAMS = 2048
VEC_ALIGN = 8  # channel blocks start at multiples of 8 channels (16-byte fp16 vectors)

OP = "mixconv_bn_act"
OP_BWD = "mixconv_bn_act_backward"


# ---- device helpers --------------------------------------------------------------------------

@triton.jit
def _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil,
               K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """acc += sum over the K x K taps of x[ih, iw, c] * w[tap, c] for one output row oh and
    the columns ow. xrow0: pointer to x[n, 0, 0, c0]; wrow: the block's weight slab."""
    pad = dil * ((K - 1) // 2)
    ih0 = oh * STRIDE - pad
    iw0 = ow * STRIDE - pad
    dsw = dil * sxw
    offs = iw0[:, None] * sxw + lane[None, :]
    # kh is a loop, kw is unrolled: K loads in flight per iteration. Unrolling kh as well lets
    # the scheduler hoist all K*K tile loads (255 registers and spills for k = 9).
    for kh in range(0, K):
        ih = ih0 + kh * dil
        row_ok = (ih >= 0) & (ih < H)
        # An out-of-range row's loads are all masked; its pointer is kept inside the tensor.
        ptrs = xrow0 + tl.where(row_ok, ih, 0) * sxh + offs
        rmask = cmask[None, :] & row_ok
        wk = wrow + kh * K * BLOCK_C + lane
        for kw in tl.static_range(K):
            iw = iw0 + kw * dil
            m = ((iw >= 0) & (iw < W))[:, None] & rmask
            xv = tl.load(ptrs + kw * dsw, mask=m, other=0.0)
            wv = tl.load(wk + kw * BLOCK_C)
            acc += xv.to(acc.dtype) * wv[None, :]
    return acc


@triton.jit
def _conv_tile(xrow0, wrow, kb, oh, ow, lane, cmask, H, W, sxh, sxw, dil,
               KMASK: tl.constexpr, STRIDE: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """The (BLOCK_W, BLOCK_C) output tile of the block's kernel size kb: one unrolled branch
    per kernel size present in the layer (KMASK bit k)."""
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=wrow.dtype.element_ty)
    if (KMASK >> 1) & 1:
        if kb == 1:
            acc = _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil, 1,
                             STRIDE, BLOCK_C)
    if (KMASK >> 3) & 1:
        if kb == 3:
            acc = _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil, 3,
                             STRIDE, BLOCK_C)
    if (KMASK >> 5) & 1:
        if kb == 5:
            acc = _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil, 5,
                             STRIDE, BLOCK_C)
    if (KMASK >> 7) & 1:
        if kb == 7:
            acc = _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil, 7,
                             STRIDE, BLOCK_C)
    if (KMASK >> 9) & 1:
        if kb == 9:
            acc = _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil, 9,
                             STRIDE, BLOCK_C)
    if (KMASK >> 11) & 1:
        if kb == 11:
            acc = _conv_taps(acc, xrow0, wrow, oh, ow, lane, cmask, H, W, sxh, sxw, dil, 11,
                             STRIDE, BLOCK_C)
    return acc


@triton.jit
def _block(tab_ptr, cb, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel block cb of the table: first channel, end channel, kernel size, weight offset.
    c0 is a multiple of 8 and c1 of ALIGN (host guarantees), which keeps loads vectorized."""
    c0 = tl.multiple_of(tl.load(tab_ptr + cb * 4), 8)
    c1 = tl.multiple_of(tl.load(tab_ptr + cb * 4 + 1), ALIGN)
    kb = tl.load(tab_ptr + cb * 4 + 2)
    woff = tl.multiple_of(tl.load(tab_ptr + cb * 4 + 3), BLOCK_C)
    return c0.to(tl.int64), c1, kb, woff.to(tl.int64)


@triton.jit
def _fold(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, cidx, cmask, acc_t: tl.constexpr):
    """BatchNorm folded to y * scale + shift for the block's channels: batchnorm.fold's
    formula, evaluated here rather than on the host, where it is ~10 tiny launches per call
    (more CPU time than the whole kernel takes on the GPU for the late MixNet layers)."""
    gamma = tl.load(gamma_ptr + cidx, mask=cmask, other=0.0).to(acc_t)
    beta = tl.load(beta_ptr + cidx, mask=cmask, other=0.0).to(acc_t)
    mean = tl.load(mean_ptr + cidx, mask=cmask, other=0.0).to(acc_t)
    var = tl.load(var_ptr + cidx, mask=cmask, other=1.0).to(acc_t)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = gamma * invstd
    return scale, beta - mean * scale, invstd


# ---- forward -----------------------------------------------------------------------------------

@triton.jit
def _mix_fwd_kernel(x_ptr, w_ptr, tab_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                    part_ptr, eps, H, W, Ho, Wo, C_a, sxn_a, sxh_a, sxw_a, n_cb, n_rows, dil,
                    KMASK: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr,
                    STATS: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: output row (n, oh) x one channel block, all columns in BLOCK_W steps.
    STATS: per-row Welford partials (mean, M2) of y into part[0/1, row, c], no output.
    else: out = act(y * scale + shift), BN folded from (gamma, beta, mean, var)."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_cb
    row = pid // n_cb  # n * Ho + oh
    n = row // Ho
    oh = row - n * Ho
    C = C_a * ALIGN
    sxh = sxh_a * ALIGN
    sxw = sxw_a * ALIGN
    c0, c1, kb, woff = _block(tab_ptr, cb, ALIGN, BLOCK_C)
    lane = tl.arange(0, BLOCK_C)
    cmask = c0 + lane < c1
    xrow0 = x_ptr + n * (sxn_a * ALIGN) + c0
    wrow = w_ptr + woff
    acc_t = w_ptr.dtype.element_ty
    if STATS:
        mean = tl.zeros((BLOCK_C,), dtype=acc_t)
        m2 = tl.zeros((BLOCK_C,), dtype=acc_t)
    else:
        scale, shift, _ = _fold(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, c0 + lane, cmask,
                                acc_t)
    out_row = out_ptr + row * Wo * C + c0
    for wb in range(0, tl.cdiv(Wo, BLOCK_W)):
        ow = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        y = _conv_tile(xrow0, wrow, kb, oh, ow, lane, cmask, H, W, sxh, sxw, dil, KMASK,
                       STRIDE, BLOCK_W, BLOCK_C)
        wvalid = ow < Wo
        if STATS:
            # Chan's merge of this tile's (mean, M2) into the row's running pair.
            # (column counts as floats in the accumulation dtype: exact)
            total = tl.minimum(Wo, wb * BLOCK_W + BLOCK_W).to(acc_t)
            nb = total - wb * BLOCK_W
            seen = total - nb
            tile_mean = tl.sum(tl.where(wvalid[:, None], y, 0.0), axis=0) / nb
            d = tl.where(wvalid[:, None], y - tile_mean[None, :], 0.0)
            tile_m2 = tl.sum(d * d, axis=0)
            delta = tile_mean - mean
            mean += delta * (nb / total)
            m2 += tile_m2 + delta * delta * (seen * nb / total)
        else:
            z = y * scale[None, :] + shift[None, :]
            o = act_forward(z, ACT)
            tl.store(out_row + ow[:, None] * C + lane[None, :],
                     o.to(out_ptr.dtype.element_ty),
                     mask=wvalid[:, None] & cmask[None, :])
    if STATS:
        tl.store(part_ptr + row * C + c0 + lane, mean, mask=cmask)
        tl.store(part_ptr + (n_rows + row) * C + c0 + lane, m2, mask=cmask)


# ---- backward ----------------------------------------------------------------------------------

@triton.jit
def _mix_bwd_dy_kernel(x_ptr, go_ptr, w_ptr, tab_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
                       abc_ptr, dy_ptr, part_ptr, eps,
                       H, W, Ho, Wo, C_a, sxn_a, sxh_a, sxw_a, sgn_a, sgh_a, sgw_a, n_cb,
                       n_rows, dil,
                       KMASK: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr,
                       STATS: tl.constexpr, STORE: tl.constexpr, HOST_ABC: tl.constexpr,
                       ACT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Recomputes y = conv(x), xhat and z; g = grad_out * act'(z).
    STATS: per-row partial sums of g and g*xhat into part[0/1, row, c].
    STORE: dy = a*g + b*xhat + c (acc dtype, NHWC); HOST_ABC: a, b, c are the rows of abc
    (batchnorm.backward_coeffs, training), else a = gamma*invstd and b = c = 0 (eval)."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_cb
    row = pid // n_cb
    n = row // Ho
    oh = row - n * Ho
    C = C_a * ALIGN
    sxh = sxh_a * ALIGN
    sxw = sxw_a * ALIGN
    sgw = sgw_a * ALIGN
    c0, c1, kb, woff = _block(tab_ptr, cb, ALIGN, BLOCK_C)
    lane = tl.arange(0, BLOCK_C)
    cmask = c0 + lane < c1
    acc_t = w_ptr.dtype.element_ty
    cidx = c0 + lane
    scale, shift, invstd = _fold(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, cidx, cmask,
                                 acc_t)
    mean = tl.load(mean_ptr + cidx, mask=cmask, other=0.0).to(acc_t)[None, :]
    scale = scale[None, :]
    shift = shift[None, :]
    if STORE:
        if HOST_ABC:
            ca = tl.load(abc_ptr + cidx, mask=cmask, other=0.0)[None, :]
            cb_ = tl.load(abc_ptr + C + cidx, mask=cmask, other=0.0)[None, :]
            cc = tl.load(abc_ptr + 2 * C + cidx, mask=cmask, other=0.0)[None, :]
        else:
            ca = scale
            cb_ = tl.zeros_like(scale)
            cc = tl.zeros_like(scale)
    invstd = invstd[None, :]
    acc_t = w_ptr.dtype.element_ty
    sum_g = tl.zeros((BLOCK_C,), dtype=acc_t)
    sum_gx = tl.zeros((BLOCK_C,), dtype=acc_t)
    xrow0 = x_ptr + n * (sxn_a * ALIGN) + c0
    go_row = go_ptr + n * (sgn_a * ALIGN) + oh * (sgh_a * ALIGN) + c0
    dy_row = dy_ptr + row * Wo * C + c0
    wrow = w_ptr + woff
    for wb in range(0, tl.cdiv(Wo, BLOCK_W)):
        ow = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        m = (ow < Wo)[:, None] & cmask[None, :]
        y = _conv_tile(xrow0, wrow, kb, oh, ow, lane, cmask, H, W, sxh, sxw, dil, KMASK,
                       STRIDE, BLOCK_W, BLOCK_C)
        go = tl.load(go_row + ow[:, None] * sgw + lane[None, :], mask=m, other=0.0).to(acc_t)
        xhat = (y - mean) * invstd
        g = act_backward(go, y * scale + shift, ACT)  # go = 0 where masked
        if STATS:
            sum_g += tl.sum(g, axis=0)
            sum_gx += tl.sum(g * xhat, axis=0)
        if STORE:
            tl.store(dy_row + ow[:, None] * C + lane[None, :], ca * g + cb_ * xhat + cc, mask=m)
    if STATS:
        tl.store(part_ptr + row * C + c0 + lane, sum_g, mask=cmask)
        tl.store(part_ptr + (n_rows + row) * C + c0 + lane, sum_gx, mask=cmask)


@triton.jit
def _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[ih, iw = p + STRIDE*j] += dy[oh, ow] * w[tap] over the taps with
    oh*STRIDE - pad + kh*dil == ih (and the same for columns). Row and column parities are
    scalars (the tile holds one column parity p), so non-contributing taps are skipped."""
    pad = dil * ((K - 1) // 2)
    big = dil * K  # keeps the numerators below non-negative: // and % are exact
    qh0 = ih + pad + STRIDE * big
    qw0 = p + pad + STRIDE * big
    offs = j[:, None] * C + lane[None, :]
    for kh in range(0, K):  # a loop, kw unrolled (see _conv_taps)
        qh = qh0 - kh * dil
        oh = qh // STRIDE - big
        if (qh % STRIDE == 0) & (oh >= 0) & (oh < Ho):
            ptrs = dy_img + oh * Wo * C + offs
            wk = wrow + kh * K * BLOCK_C + lane
            for kw in tl.static_range(K):
                qw = qw0 - kw * dil
                if qw % STRIDE == 0:
                    ow0 = qw // STRIDE - big
                    ow = ow0 + j
                    m = ((ow >= 0) & (ow < Wo))[:, None] & cmask[None, :]
                    v = tl.load(ptrs + ow0 * C, mask=m, other=0.0)
                    wv = tl.load(wk + kw * BLOCK_C)
                    acc += v * wv[None, :]
    return acc


@triton.jit
def _mix_dx_kernel(dy_ptr, w_ptr, tab_ptr, dx_ptr, H, W, Ho, Wo, C_a, n_cb, dil,
                   KMASK: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = transposed mixed depthwise conv of dy. One program: input row (n, ih) x one
    channel block, columns of each parity p in BLOCK_W steps."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_cb
    row = pid // n_cb  # n * H + ih
    n = row // H
    ih = row - n * H
    C = C_a * ALIGN
    c0, c1, kb, woff = _block(tab_ptr, cb, ALIGN, BLOCK_C)
    lane = tl.arange(0, BLOCK_C)
    cmask = c0 + lane < c1
    dy_img = dy_ptr + n * Ho * Wo * C + c0
    dx_row = dx_ptr + row * W * C + c0
    wrow = w_ptr + woff
    for p in tl.static_range(STRIDE):
        nj = (W - p + STRIDE - 1) // STRIDE
        for jb in range(0, tl.cdiv(nj, BLOCK_W)):
            j = jb * BLOCK_W + tl.arange(0, BLOCK_W)
            acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=w_ptr.dtype.element_ty)
            if (KMASK >> 1) & 1:
                if kb == 1:
                    acc = _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                                      1, STRIDE, BLOCK_C)
            if (KMASK >> 3) & 1:
                if kb == 3:
                    acc = _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                                      3, STRIDE, BLOCK_C)
            if (KMASK >> 5) & 1:
                if kb == 5:
                    acc = _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                                      5, STRIDE, BLOCK_C)
            if (KMASK >> 7) & 1:
                if kb == 7:
                    acc = _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                                      7, STRIDE, BLOCK_C)
            if (KMASK >> 9) & 1:
                if kb == 9:
                    acc = _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                                      9, STRIDE, BLOCK_C)
            if (KMASK >> 11) & 1:
                if kb == 11:
                    acc = _tconv_taps(acc, dy_img, wrow, ih, p, j, lane, cmask, Ho, Wo, C, dil,
                                      11, STRIDE, BLOCK_C)
            iw = p + j * STRIDE
            tl.store(dx_row + iw[:, None] * C + lane[None, :], acc.to(dx_ptr.dtype.element_ty),
                     mask=(j < nj)[:, None] & cmask[None, :])


@triton.jit
def _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W, Ho, Wo,
             C, sxh, sxw, dil, K: tl.constexpr, KP: tl.constexpr, STRIDE: tl.constexpr,
             BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """dweight partials of one block over output rows [r0, r1): for each kernel row kh, a
    (KP, BLOCK_W, BLOCK_C) accumulator over kw (KP = next power of 2 >= K), so each dy tile is
    loaded once per kernel row and the K shifted x tiles come in one 3-D load."""
    pad = dil * ((K - 1) // 2)
    kw3 = tl.arange(0, KP)
    kw_ok = kw3 < K
    for kh in range(0, K):
        acc = tl.zeros((KP, BLOCK_W, BLOCK_C), dtype=part_row.dtype.element_ty)
        for r in range(r0, r1):
            n = r // Ho
            oh = r - n * Ho
            ih = oh * STRIDE - pad + kh * dil
            if (ih >= 0) & (ih < H):
                xrow = x_ptr + n * n_img_stride + ih * sxh + c0
                dy_row = dy_ptr + r * Wo * C + c0
                for wb in range(0, tl.cdiv(Wo, BLOCK_W)):
                    ow = wb * BLOCK_W + tl.arange(0, BLOCK_W)
                    g = tl.load(dy_row + ow[:, None] * C + lane[None, :],
                                mask=(ow < Wo)[:, None] & cmask[None, :], other=0.0)
                    iw = ow[None, :, None] * STRIDE - pad + kw3[:, None, None] * dil
                    m = kw_ok[:, None, None] & (iw >= 0) & (iw < W) & cmask[None, None, :]
                    xv = tl.load(xrow + iw * sxw + lane[None, None, :], mask=m, other=0.0)
                    acc += xv.to(acc.dtype) * g[None, :, :]
        tap = kh * K + kw3
        tl.store(part_row + woff + tap[:, None] * BLOCK_C + lane[None, :], tl.sum(acc, axis=1),
                 mask=kw_ok[:, None])


@triton.jit
def _mix_dw_kernel(x_ptr, dy_ptr, tab_ptr, part_ptr, H, W, Ho, Wo, C_a, sxn_a, sxh_a, sxw_a,
                   n_cb, n_rows, rows_per_chunk, part_stride, dil,
                   KMASK: tl.constexpr, STRIDE: tl.constexpr, ALIGN: tl.constexpr,
                   DW_TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: one channel block x one chunk of output rows; writes the block's k*k taps
    of part[chunk] (the packed weight layout). The host sums the chunks in a fixed order.
    The (KP, BLOCK_W, BLOCK_C) accumulator has DW_TILE elements: BLOCK_W = DW_TILE/(KP*BLOCK_C)
    per kernel size, so that k = 9 does not need 4x the registers of k = 3."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_cb
    chunk = pid // n_cb
    r0 = chunk * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, n_rows)
    C = C_a * ALIGN
    sxh = sxh_a * ALIGN
    sxw = sxw_a * ALIGN
    n_img_stride = sxn_a * ALIGN
    c0, c1, kb, woff = _block(tab_ptr, cb, ALIGN, BLOCK_C)
    lane = tl.arange(0, BLOCK_C)
    cmask = c0 + lane < c1
    part_row = part_ptr + chunk * part_stride
    if (KMASK >> 1) & 1:
        if kb == 1:
            _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W,
                     Ho, Wo, C, sxh, sxw, dil, 1, 1, STRIDE,
                     DW_TILE // (1 * BLOCK_C), BLOCK_C)
    if (KMASK >> 3) & 1:
        if kb == 3:
            _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W,
                     Ho, Wo, C, sxh, sxw, dil, 3, 4, STRIDE,
                     DW_TILE // (4 * BLOCK_C), BLOCK_C)
    if (KMASK >> 5) & 1:
        if kb == 5:
            _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W,
                     Ho, Wo, C, sxh, sxw, dil, 5, 8, STRIDE,
                     DW_TILE // (8 * BLOCK_C), BLOCK_C)
    if (KMASK >> 7) & 1:
        if kb == 7:
            _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W,
                     Ho, Wo, C, sxh, sxw, dil, 7, 8, STRIDE,
                     DW_TILE // (8 * BLOCK_C), BLOCK_C)
    if (KMASK >> 9) & 1:
        if kb == 9:
            _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W,
                     Ho, Wo, C, sxh, sxw, dil, 9, 16, STRIDE,
                     DW_TILE // (16 * BLOCK_C), BLOCK_C)
    if (KMASK >> 11) & 1:
        if kb == 11:
            _dw_taps(x_ptr, dy_ptr, part_row, woff, n_img_stride, c0, lane, cmask, r0, r1, H, W,
                     Ho, Wo, C, sxh, sxw, dil, 11, 16, STRIDE,
                     DW_TILE // (16 * BLOCK_C), BLOCK_C)


# ---- host side ---------------------------------------------------------------------------------

class _Layout:
    """Channel blocks of one layer geometry: the block table, the packed-weight size and the
    gather indices between the groups' weights and the packed slabs. Cached per
    (kernel sizes, channel counts, BLOCK_C, device)."""

    def __init__(self, groups: Tuple[Tuple[int, int], ...], block_c: int, device):
        ks = [k for ci, k in groups for _ in range(ci)]  # kernel size of each channel
        c_total = len(ks)
        # Regions start at group starts rounded down to 8: each block is aligned and lies in
        # one region; a block's k is the largest k of its channels.
        starts, c = set(), 0
        for ci, _ in groups:
            if ci > 0:
                starts.add(c // VEC_ALIGN * VEC_ALIGN)
            c += ci
        bounds = sorted(starts) + [c_total]
        self.blocks = []  # (c0, c1, k, woff)
        woff = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            for c0 in range(a, b, block_c):
                c1 = min(c0 + block_c, b)
                kb = max(ks[c0:c1])
                self.blocks.append((c0, c1, kb, woff))
                woff += kb * kb * block_c
        self.packed_size = woff
        self.kmask = 0
        for _, _, kb, _ in self.blocks:
            self.kmask |= 1 << kb
        self.k_max = max((kb for _, _, kb, _ in self.blocks), default=1)
        # Packed index of every element of the concatenated, flattened group weights.
        block_of = {ch: bi for bi, (c0, c1, _, _) in enumerate(self.blocks)
                    for ch in range(c0, c1)}
        src_to_packed, c = [], 0
        for ci, k in groups:
            for ch in range(c, c + ci):
                c0, _, kb, wo = self.blocks[block_of[ch]]
                o = (kb - k) // 2  # centred in the block's kb x kb window
                for kh in range(k):
                    for kw in range(k):
                        src_to_packed.append(wo + ((kh + o) * kb + kw + o) * block_c + ch - c0)
            c += ci
        n_src = len(src_to_packed)
        packed_to_src = [n_src] * self.packed_size  # n_src: a zero appended to the source
        for i, p in enumerate(src_to_packed):
            packed_to_src[p] = i
        rows = [list(b) for b in self.blocks]
        self.table = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1)
        self.packed_to_src = torch.tensor(packed_to_src, dtype=torch.int64, device=device)
        src = torch.tensor(src_to_packed, dtype=torch.int64, device=device)
        self.group_src = torch.split(src, [ci * k * k for ci, k in groups])


_LAYOUTS = {}
_CONFIG_CACHE = {}
_CONSTS = {}


def _layout(weights, block_c, device) -> _Layout:
    groups = tuple((int(w.shape[0]), int(w.shape[-1])) for w in weights)
    key = (groups, block_c, str(device))
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = _Layout(groups, block_c, device)
    return lay


def _const(kind, n, value, dtype, device) -> torch.Tensor:
    """Small read-only constant tensors, made once per device (no H2D copy per call)."""
    key = (kind, n, dtype, str(device))
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.full((n,), value, dtype=dtype, device=device)
    return t


def _pick_config(c: int, wo: int, dtype: torch.dtype) -> dict:
    """Tile choice per layer shape: 64-channel blocks when C is large enough to keep the
    straddling blocks few, BLOCK_W 16 where it divides the row or the row has 9..16 columns
    (else 8 wastes less)."""
    key = (c, wo, dtype)
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        block_c = 64 if c >= 256 else 32
        block_w = 16 if wo % 16 == 0 or 8 < wo <= 16 else 8
        cfg = next(x for x in CONFIGS if x["BLOCK_C"] == block_c and x["BLOCK_W"] == block_w)
        _CONFIG_CACHE[key] = cfg
    return cfg


def _pow2_align(*values) -> int:
    """Largest power of two <= VEC_ALIGN dividing every value (0 divides by anything)."""
    a = VEC_ALIGN
    for v in values:
        while a > 1 and v % a:
            a //= 2
    return a


def _nhw_strides(t: torch.Tensor):
    """(N, H, W) strides; a size-1 dim's stride is arbitrary in torch: use 0 (never used)."""
    return tuple(t.stride(d) if t.shape[d] > 1 else 0 for d in (0, 2, 3))


def _pack(weights, lay: _Layout, acc_dtype) -> torch.Tensor:
    """The packed weights: one cat, one gather, one cast (3 launches for any group count)."""
    zero = _const("zero", 1, 0, weights[0].dtype, weights[0].device)
    flat = torch.cat([w.reshape(-1) for w in weights] + [zero])
    return flat.index_select(0, lay.packed_to_src).to(acc_dtype)


def _check_groups(op: str, x, weights, stride: int, dilation: int):
    _checks.tensor(op, "x", x, 4)
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"{op}: weights must hold at least one (C_i, 1, k_i, k_i) tensor")
    total = 0
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        _checks.tensor(op, name, w, 4, like=x)
        k = w.shape[-1]
        if k % 2 == 0:
            raise ValueError(f"{op}: {name} must have an odd kernel size (the groups' outputs "
                             f"must align); got {k}")
        _checks.depthwise(op, x, w, w.shape[0], stride, dilation * (k - 1) // 2, dilation,
                          name=name)
        total += w.shape[0]
    if total != x.shape[1]:
        raise ValueError(f"{op}: the weights' channel counts must sum to C == {x.shape[1]}; got "
                         f"{[int(w.shape[0]) for w in weights]}")
    return (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1


class _Geometry:
    """Launch parameters shared by the passes of one call."""

    def __init__(self, x, weights, stride, dilation, extra_strides=()):
        self.n, self.c, self.h, self.w = x.shape
        self.ho = (self.h - 1) // stride + 1
        self.wo = (self.w - 1) // stride + 1
        self.stride, self.dil = stride, dilation
        cfg = _pick_config(self.c, self.wo, x.dtype)
        self.block_w, self.block_c = cfg["BLOCK_W"], cfg["BLOCK_C"]
        self.num_warps, self.num_stages = cfg["num_warps"], cfg["num_stages"]
        self.lay = _layout(weights, self.block_c, x.device)
        self.n_cb = len(self.lay.blocks)
        self.sx = _nhw_strides(x)
        self.align = _pow2_align(self.c, *self.sx, *extra_strides)
        self.sx_a = tuple(s // self.align for s in self.sx)
        self.c_a = self.c // self.align
        self.n_rows = self.n * self.ho

    def common(self):
        return dict(KMASK=self.lay.kmask, STRIDE=self.stride, ALIGN=self.align,
                    BLOCK_W=self.block_w, BLOCK_C=self.block_c, num_warps=self.num_warps,
                    num_stages=self.num_stages)


@on_input_device
def forward(x: torch.Tensor, weights: List[torch.Tensor], bn_weight: torch.Tensor,
            bn_bias: torch.Tensor, running_mean: Optional[torch.Tensor],
            running_var: Optional[torch.Tensor], stride: int, dilation: int, act: str,
            training: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, mean, var): out in x's memory format, mean/var the statistics used
    (training: batch mean and biased variance; eval: the running statistics), float32
    (float64 for float64 x). Running statistics are not updated here."""
    ho, wo = _check_groups(OP, x, weights, stride, dilation)
    c = x.shape[1]
    _checks.bn(OP, x, c, bn_weight, bn_bias, running_mean, running_var, training)
    _checks.act(OP, "act", act)
    _checks.training_count(OP, x.shape[0] * ho * wo, training)
    sd = batchnorm.stat_dtype(x)
    n = x.shape[0]
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    if running_mean is not None and (not training or x.numel() == 0):
        # Eval, or an empty training batch (as the C++ op: the running statistics, so the
        # caller's momentum update keeps them).
        mean, var = running_mean.to(sd, copy=True), running_var.to(sd, copy=True)
    elif x.numel() == 0:
        mean = torch.zeros(c, dtype=sd, device=x.device)
        var = torch.zeros(c, dtype=sd, device=x.device)
    if x.numel() == 0:
        return in_format(out, x), mean, var
    xin = channels_innermost(x)
    geo = _Geometry(xin, weights, stride, dilation)
    wpack = _pack(weights, geo.lay, sd)
    grid = (geo.n_rows * geo.n_cb,)

    def conv_pass(stats, part, mean, var):
        _mix_fwd_kernel[grid](
            xin, wpack, geo.lay.table, bn_weight, bn_bias, mean, var, out, part, eps, geo.h,
            geo.w, geo.ho, geo.wo, geo.c_a, *geo.sx_a, geo.n_cb, geo.n_rows, dilation,
            STATS=stats, ACT=CODES[act], **geo.common())

    if training:
        part = torch.empty((2, geo.n_rows, c), dtype=sd, device=x.device)
        conv_pass(True, part, bn_weight, bn_weight)
        counts = _const("count", geo.n_rows, wo, torch.float64, x.device)
        mean64, var64 = batchnorm.combine_partials(part[0], part[1], counts)
        mean, var = mean64.to(sd), var64.to(sd)
    conv_pass(False, out, mean, var)
    return in_format(out, x), mean, var


def _check_backward(grad_out, x, weights, bn_weight, bn_bias, mean, var, stride, dilation, act,
                    training):
    ho, wo = _check_groups(OP_BWD, x, weights, stride, dilation)
    c = x.shape[1]
    _checks.bn(OP_BWD, x, c, bn_weight, bn_bias, None, None, True)
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != c \
                or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{OP_BWD}: {name} must be a floating-point ({c},) tensor on "
                             f"{x.device}; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    _checks.act(OP_BWD, "act", act)
    _checks.training_count(OP_BWD, x.shape[0] * ho * wo, training)
    _checks.tensor(OP_BWD, "grad_out", grad_out, 4, like=x)
    expected = (x.shape[0], c, ho, wo)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"{OP_BWD}: grad_out must have shape {expected}; got "
                         f"{tuple(grad_out.shape)}")


@on_input_device
def backward(grad_out: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
             bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor,
             var: torch.Tensor, stride: int, dilation: int, act: str, training: bool,
             eps: float) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(grad_x in x's memory format, [grad_weights[i]], grad_bn_weight, grad_bn_bias)."""
    _check_backward(grad_out, x, weights, bn_weight, bn_bias, mean, var, stride, dilation, act,
                    training)
    n, c, h, w = x.shape
    grad_x = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    if x.numel() == 0:
        return (in_format(grad_x, x), [torch.zeros_like(wt) for wt in weights],
                torch.zeros_like(bn_weight), torch.zeros_like(bn_bias))
    sd = batchnorm.stat_dtype(x)
    dev = x.device
    xin = channels_innermost(x)
    gin = channels_innermost(grad_out)
    sg = _nhw_strides(gin)
    geo = _Geometry(xin, weights, stride, dilation, extra_strides=sg)
    sg_a = tuple(s // geo.align for s in sg)
    wpack = _pack(weights, geo.lay, sd)
    dy = torch.empty((n, geo.ho, geo.wo, c), dtype=sd, device=dev)
    part = torch.empty((2, geo.n_rows, c), dtype=sd, device=dev)
    grid = (geo.n_rows * geo.n_cb,)

    def g_pass(stats, store, abc):
        _mix_bwd_dy_kernel[grid](
            xin, gin, wpack, geo.lay.table, bn_weight, bn_bias, mean, var, abc, dy, part, eps,
            h, w, geo.ho, geo.wo, geo.c_a, *geo.sx_a, *sg_a, geo.n_cb, geo.n_rows, dilation,
            STATS=stats, STORE=store, HOST_ABC=abc is not part, ACT=CODES[act],
            **geo.common())

    if training:
        # Pass 1: the sums; pass 2: dy with the batch-statistics terms.
        g_pass(True, False, part)
        sums = part.sum(1, dtype=torch.float64)  # (sum g, sum g*xhat), fixed order
        a, b, cc, _ = batchnorm.backward_coeffs(bn_weight, mean, var, eps, sums[0], sums[1],
                                                n * geo.ho * geo.wo, True)
        g_pass(False, True, torch.stack([a, b, cc]).to(sd))
    else:
        # Eval: dy = gamma*invstd*g needs no reduction first: one pass does both.
        g_pass(True, True, part)
        sums = part.sum(1, dtype=torch.float64)
    # copy=True: the two must not alias each other (rows of one tensor).
    grad_gamma = sums[1].to(bn_weight.dtype, copy=True)
    grad_beta = sums[0].to(bn_bias.dtype, copy=True)

    common = geo.common()
    _mix_dx_kernel[(n * h * geo.n_cb,)](
        dy, wpack, geo.lay.table, grad_x, h, w, geo.ho, geo.wo, geo.c_a, geo.n_cb, dilation,
        **common)

    n_chunks = max(1, min(geo.n_rows, triton.cdiv(DW_TARGET_PROGRAMS, geo.n_cb)))
    rows_per_chunk = triton.cdiv(geo.n_rows, n_chunks)
    n_chunks = triton.cdiv(geo.n_rows, rows_per_chunk)
    dpart = torch.empty((n_chunks, geo.lay.packed_size), dtype=sd, device=dev)
    common.pop("BLOCK_W")
    common["num_warps"] = DW_WARPS
    _mix_dw_kernel[(n_chunks * geo.n_cb,)](
        xin, dy, geo.lay.table, dpart, h, w, geo.ho, geo.wo, geo.c_a, *geo.sx_a, geo.n_cb,
        geo.n_rows, rows_per_chunk, geo.lay.packed_size, dilation, DW_TILE=DW_TILE, **common)
    dsum = dpart.sum(0).to(x.dtype)  # chunks summed in a fixed order: deterministic
    grad_w = [dsum.index_select(0, idx).view(wt.shape)
              for idx, wt in zip(geo.lay.group_src, weights)]
    return in_format(grad_x, x), grad_w, grad_gamma, grad_beta


# ---- ahead-of-time compile specs ---------------------------------------------------------------

def _aot_specs():
    """One entry per kernel x config x dtype (fp16, fp32): a MixNet-M layer (k = 3/5/7/9,
    stride 1, SiLU), the forward in both modes and the backward passes."""
    specs = []
    kmask = sum(1 << k for k in (3, 5, 7, 9))
    for cfg in CONFIGS:
        bw, bc, nw, ns = cfg["BLOCK_W"], cfg["BLOCK_C"], cfg["num_warps"], cfg["num_stages"]
        for dt, acc in (("fp16", "fp32"), ("fp32", "fp32")):
            tile = dict(KMASK=kmask, STRIDE=1, ALIGN=8, BLOCK_W=bw, BLOCK_C=bc)
            label = f"bw{bw}_bc{bc}_w{nw}_{dt}"
            ints = lambda *names: {k: "i32" for k in names}  # noqa: E731
            bn = {"gamma_ptr": "*fp32", "beta_ptr": "*fp32", "mean_ptr": "*fp32",
                  "var_ptr": "*fp32"}
            fwd_sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{acc}", "tab_ptr": "*i32", **bn,
                       "out_ptr": f"*{dt}", "part_ptr": f"*{acc}", "eps": "fp32",
                       **ints("H", "W", "Ho", "Wo", "C_a", "sxn_a", "sxh_a", "sxw_a", "n_cb",
                              "n_rows", "dil")}
            for stats in (0, 1):
                cx = dict(tile, STATS=stats, ACT=CODES["silu"])
                specs.append(dict(label=f"fwd_{'stats' if stats else 'out'}_{label}",
                                  fn=_mix_fwd_kernel,
                                  signature={**fwd_sig, **{k: "constexpr" for k in cx}},
                                  constexprs=cx, options={"num_warps": nw, "num_stages": ns}))
            bwd_sig = {"x_ptr": f"*{dt}", "go_ptr": f"*{dt}", "w_ptr": f"*{acc}",
                       "tab_ptr": "*i32", **bn, "abc_ptr": f"*{acc}", "dy_ptr": f"*{acc}",
                       "part_ptr": f"*{acc}", "eps": "fp32",
                       **ints("H", "W", "Ho", "Wo", "C_a", "sxn_a", "sxh_a", "sxw_a", "sgn_a",
                              "sgh_a", "sgw_a", "n_cb", "n_rows", "dil")}
            for stats, store, host_abc in ((1, 0, 1), (0, 1, 1), (1, 1, 0)):
                cx = dict(tile, STATS=stats, STORE=store, HOST_ABC=host_abc,
                          ACT=CODES["silu"])
                kind = {(1, 0): "stats", (0, 1): "store", (1, 1): "eval"}[(stats, store)]
                specs.append(dict(label=f"bwd_dy_{kind}_{label}",
                                  fn=_mix_bwd_dy_kernel,
                                  signature={**bwd_sig, **{k: "constexpr" for k in cx}},
                                  constexprs=cx, options={"num_warps": nw, "num_stages": ns}))
            dx_sig = {"dy_ptr": f"*{acc}", "w_ptr": f"*{acc}", "tab_ptr": "*i32",
                      "dx_ptr": f"*{dt}", **ints("H", "W", "Ho", "Wo", "C_a", "n_cb", "dil")}
            for s in (1, 2):
                cx = dict(tile, STRIDE=s)
                specs.append(dict(label=f"dx_s{s}_{label}", fn=_mix_dx_kernel,
                                  signature={**dx_sig, **{k: "constexpr" for k in cx}},
                                  constexprs=cx, options={"num_warps": nw, "num_stages": ns}))
            dw_sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{acc}", "tab_ptr": "*i32",
                      "part_ptr": f"*{acc}",
                      **ints("H", "W", "Ho", "Wo", "C_a", "sxn_a", "sxh_a", "sxw_a", "n_cb",
                             "n_rows", "rows_per_chunk", "part_stride", "dil")}
            if any(sp["label"] == f"dw_bc{bc}_{dt}" for sp in specs):
                continue  # the dweight kernel has no BLOCK_W: one entry per BLOCK_C
            cx = dict(tile, DW_TILE=DW_TILE)
            del cx["BLOCK_W"]
            specs.append(dict(label=f"dw_bc{bc}_{dt}", fn=_mix_dw_kernel,
                              signature={**dw_sig, **{k: "constexpr" for k in cx}},
                              constexprs=cx, options={"num_warps": DW_WARPS,
                                                      "num_stages": ns}))
    for spec in specs:
        # At run time Triton specializes 16-byte-aligned pointers (torch allocations are);
        # without the same attribute an AOT compile cannot vectorize any load.
        spec["attrs"] = {(i,): [["tt.divisibility", 16]]
                         for i, name in enumerate(spec["fn"].arg_names)
                         if spec["signature"][name].startswith("*")}
    return specs


AOT_SPECS = _aot_specs()
