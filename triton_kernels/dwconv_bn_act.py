"""Depthwise k x k conv + BatchNorm + activation in Triton (op `dwconv_bn_act` of csrc/ops.cpp).

Layout: NHWC. x (and grad_out) are read through a channels-innermost view (channel stride 1, any
N/H/W strides, so channels_last tensors and their channel slices are used in place); any other
input (plain NCHW) costs one channels_last copy on the way in, and the NHWC result one copy back
to NCHW on the way out. Results are returned in x's suggested memory format, as the C++ op does.

Tiles: a tile is (image n, output row, BLOCK_W output columns, BLOCK_C channels); channels are
contiguous in NHWC, so x loads are 16-byte vectors when C % 8 == 0 (fp16). The k*k taps are
unrolled (K is a constexpr, the tap loops are tl.static_range), pointers stepped from tap to
tap, the weights packed per channel block so every tap's weights sit at a constant offset;
accumulation in fp32 (fp64 for fp64). A program takes ROWS x WB_PER tiles (run-time loops); on a
GPU that is one tile (see _split: the loop-free specialisation needs half the registers).

Forward  eval:      one pass, BN folded (batchnorm.fold) into scale/shift + act in the epilogue.
         training:  pass 1 (STATS) recomputes nothing but the conv and writes per-program
                    (mean, M2, count) partials per channel, no y; batchnorm.combine_partials;
                    pass 2 = the eval pass with the batch statistics. Same kernel body.
Backward kernel A (SUMS): recomputes y, z = y*scale + shift, g = grad_out * act'(z) and writes
                    per-program partial sums of g and g*xhat per channel (host sums them in
                    float64, fixed order -> batchnorm.backward_coeffs);
         kernel B (WRITE_DY): recomputes y and writes dy = a*g + b*xhat + c (fp32 NHWC buffer).
                    Eval needs no batch terms, so A and B run as one launch there.
         kernel C: dx as the transposed depthwise conv of dy (stride 2: input columns of one
                    parity class per tile, so each tap maps them onto consecutive output
                    columns), then the program's dweight partials [programs, k*k, C], tap by tap
                    over the same region of dy and x it just touched (L1/L2-resident), summed on
                    the host. One launch; x and dy come from DRAM about once.
Every reduction is per-program partials reduced with torch in a fixed order: no atomics, the
same bits on every run.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from effkernels import _checks

from . import batchnorm
from .activation import CODES, act_backward, act_forward
from .host import acc_dtype, channels_innermost, in_format, on_input_device

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tile configs, in one place: BLOCK_W output columns x BLOCK_C channels (1024 elements: one
# 16-byte fp16 vector per thread and tap at 4 warps), num_warps. _tile() picks the one with the
# fewest padded slots for the layer (C = 144, W = 56 -> 64x16). No run-time autotuning: the op
# is specialised on K, stride, act and dtype already, and autotuning each specialisation would
# multiply compile time. AOT_SPECS compiles each of them.
CONFIGS = [
    dict(BLOCK_W=64, BLOCK_C=16, num_warps=4),
    dict(BLOCK_W=32, BLOCK_C=32, num_warps=4),
    dict(BLOCK_W=16, BLOCK_C=64, num_warps=4),
    dict(BLOCK_W=8, BLOCK_C=128, num_warps=4),
]
NUM_STAGES = 1  # no software pipelining: on a GPU the kernels do not loop over tiles


# ---- device helpers -----------------------------------------------------------------------

@triton.jit
def _program(n_rg, n_wg, n_cb):
    """(n, row group, column group, channel block) of this program; channel blocks vary
    fastest, so the programs sharing pixels (and DRAM pages) run together."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_cb
    t = pid // n_cb
    wg = t % n_wg
    t = t // n_wg
    return t // n_rg, t % n_rg, wg, cb


@triton.jit
def _i64(v):
    """A runtime int argument as int64 (Triton passes 1 as a constexpr): offsets never
    overflow, and the interpreter skips its per-op int32 overflow checks."""
    return tl.cast(v, tl.int64)


@triton.jit
def _weight_block(w_ptr, cb, K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pointers to tap 0 of channel block cb in the packed weights [blocks, k*k, BLOCK_C]
    (zero-padded channels): tap t sits at the constant offset t*BLOCK_C, so the unrolled taps
    share one base register and need no mask."""
    return w_ptr + cb * (K * K * BLOCK_C) + tl.arange(0, BLOCK_C)


@triton.jit
def _conv_tile(x_img, w_blk, ih0, iw0, ch, ch_ok, ok, H, W, sH, sW, DIL,
               K: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """y[BLOCK_W, BLOCK_C] (dtype ACC) of the depthwise conv: tap (kh, kw) of output column j
    reads input (ih0 + kh*DIL, iw0[j] + kw*DIL). w_blk: this channel block's weights, see
    _weight_block. Pointers and indices are stepped from tap to tap (adds, no multiplies)."""
    acc = tl.zeros([BLOCK_W, BLOCK_C], ACC)
    tile_ok = ok[:, None] & ch_ok[None, :]
    x_row = x_img + ih0 * sH + (iw0[:, None] * sW + ch[None, :])
    w_tap = w_blk
    ih = ih0
    for kh in tl.static_range(K):
        row_ok = tile_ok & ((ih >= 0) & (ih < H))
        x_tap = x_row
        iw = iw0
        for kw in tl.static_range(K):
            m = row_ok & ((iw >= 0) & (iw < W))[:, None]
            xv = tl.load(x_tap, mask=m, other=0.0)
            wv = tl.load(w_tap)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
            x_tap += DIL * sW
            iw += DIL
            w_tap += BLOCK_C
        x_row += DIL * sH
        ih += DIL
    return acc


@triton.jit
def _divides(q, STRIDE: tl.constexpr):
    """q is a multiple of STRIDE (q >= 0 is checked by the caller)."""
    if STRIDE == 1:
        return q >= 0
    else:
        return (q % STRIDE) == 0


# ---- forward ------------------------------------------------------------------------------

@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr, pmean_ptr, pm2_ptr, pcnt_ptr,
                   C, H, W, Ho, Wo, sN, sH, sW, PAD, DIL, ROWS, WB_PER, n_rg, n_wg, n_cb,
                   K: tl.constexpr, STRIDE: tl.constexpr, ACT: tl.constexpr,
                   STATS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """STATS: per-program (mean, M2, count) of y per channel; else out = act(y*scale + shift).
    A program covers ROWS output rows x WB_PER column blocks of one image."""
    C, H, W, Ho, Wo = _i64(C), _i64(H), _i64(W), _i64(Ho), _i64(Wo)
    sN, sH, sW, PAD, DIL = _i64(sN), _i64(sH), _i64(sW), _i64(PAD), _i64(DIL)
    n, rg, wg, cb = _program(n_rg, n_wg, n_cb)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    x_img = x_ptr + n * sN
    w_blk = _weight_block(w_ptr, cb, K, BLOCK_C)
    acc_t = pmean_ptr.dtype.element_ty
    if STATS:
        # Welford per (column slot, channel): no cross-thread reduction inside the loop.
        mean = tl.zeros([BLOCK_W, BLOCK_C], acc_t)
        m2 = tl.zeros([BLOCK_W, BLOCK_C], acc_t)
        cnt = tl.zeros([BLOCK_W], acc_t)
    else:
        scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0).to(acc_t)
        shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0).to(acc_t)
    for r in range(ROWS):
        oh = rg * ROWS + r
        for j in range(WB_PER):
            ow = (wg * WB_PER + j) * BLOCK_W + tl.arange(0, BLOCK_W)
            ok = (ow < Wo) & (oh < Ho)
            y = _conv_tile(x_img, w_blk, oh * STRIDE - PAD, ow * STRIDE - PAD, ch, ch_ok, ok,
                           H, W, sH, sW, DIL, K, acc_t, BLOCK_W, BLOCK_C)
            if STATS:
                cnt += ok.to(acc_t)
                d = y - mean
                mean += tl.where(ok[:, None], d / tl.maximum(cnt, 1.0)[:, None], 0.0)
                m2 += tl.where(ok[:, None], d * (y - mean), 0.0)
            else:
                z = act_forward(y * scale[None, :] + shift[None, :], ACT)
                offs = ((n * Ho + oh) * Wo + ow)[:, None] * C + ch[None, :]
                tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty),
                         mask=ok[:, None] & ch_ok[None, :])
    if STATS:
        # Chan's combination of the column slots (empty slots have count 0, mean 0, M2 0).
        tot = tl.sum(cnt, axis=0)
        cw = cnt[:, None]
        pmean = tl.sum(mean * cw, axis=0) / tl.maximum(tot, 1.0)
        d = mean - pmean[None, :]
        pm2 = tl.sum(m2 + cw * d * d, axis=0)
        tile = (n * n_rg + rg) * n_wg + wg
        tl.store(pmean_ptr + tile * C + ch, pmean, mask=ch_ok)
        tl.store(pm2_ptr + tile * C + ch, pm2, mask=ch_ok)
        tl.store(pcnt_ptr + tile, tot, mask=cb == 0)


# ---- backward -----------------------------------------------------------------------------

@triton.jit
def _dw_bwd_dy_kernel(x_ptr, w_ptr, go_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                      ca_ptr, cb_ptr, cc_ptr, dy_ptr, psg_ptr, psgx_ptr,
                      C, H, W, Ho, Wo, sN, sH, sW, gN, gH, gW, PAD, DIL, ROWS, WB_PER,
                      n_rg, n_wg, n_cb,
                      K: tl.constexpr, STRIDE: tl.constexpr, ACT: tl.constexpr,
                      SUMS: tl.constexpr, WRITE_DY: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Recompute y, z = y*scale + shift, g = grad_out * act'(z), xhat = (y - mean)*invstd.
    SUMS: per-program partial sums of g and g*xhat; WRITE_DY: dy = a*g + b*xhat + c (NHWC)."""
    C, H, W, Ho, Wo = _i64(C), _i64(H), _i64(W), _i64(Ho), _i64(Wo)
    sN, sH, sW, PAD, DIL = _i64(sN), _i64(sH), _i64(sW), _i64(PAD), _i64(DIL)
    gN, gH, gW = _i64(gN), _i64(gH), _i64(gW)
    n, rg, wg, cb = _program(n_rg, n_wg, n_cb)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    x_img = x_ptr + n * sN
    go_img = go_ptr + n * gN
    w_blk = _weight_block(w_ptr, cb, K, BLOCK_C)
    acc_t = scale_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    mean = tl.load(mean_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    if WRITE_DY:
        ca = tl.load(ca_ptr + ch, mask=ch_ok, other=0.0)[None, :]
        cb_ = tl.load(cb_ptr + ch, mask=ch_ok, other=0.0)[None, :]
        cc = tl.load(cc_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    if SUMS:
        sg = tl.zeros([BLOCK_W, BLOCK_C], acc_t)
        sgx = tl.zeros([BLOCK_W, BLOCK_C], acc_t)
    for r in range(ROWS):
        oh = rg * ROWS + r
        for j in range(WB_PER):
            ow = (wg * WB_PER + j) * BLOCK_W + tl.arange(0, BLOCK_W)
            ok = (ow < Wo) & (oh < Ho)
            m = ok[:, None] & ch_ok[None, :]
            y = _conv_tile(x_img, w_blk, oh * STRIDE - PAD, ow * STRIDE - PAD, ch, ch_ok, ok,
                           H, W, sH, sW, DIL, K, acc_t, BLOCK_W, BLOCK_C)
            go = tl.load(go_img + oh * gH + ow[:, None] * gW + ch[None, :], mask=m, other=0.0)
            # Masked positions: go = 0, so g = 0 and they add nothing to the sums.
            g = act_backward(go.to(acc_t), y * scale + shift, ACT)
            xhat = (y - mean) * invstd
            if SUMS:
                sg += g
                sgx += g * xhat
            if WRITE_DY:
                offs = ((n * Ho + oh) * Wo + ow)[:, None] * C + ch[None, :]
                tl.store(dy_ptr + offs, ca * g + cb_ * xhat + cc, mask=m)
    if SUMS:
        tile = (n * n_rg + rg) * n_wg + wg
        tl.store(psg_ptr + tile * C + ch, tl.sum(sg, axis=0), mask=ch_ok)
        tl.store(psgx_ptr + tile * C + ch, tl.sum(sgx, axis=0), mask=ch_ok)


@triton.jit
def _dw_bwd_input_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, pdw_ptr,
                         C, H, W, Ho, Wo, sN, sH, sW, PAD, DIL, ROWS, n_rg, n_cb, n_wbi, n_wbo,
                         K: tl.constexpr, STRIDE: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_C channels of image n, output rows [rg*ROWS, (rg+1)*ROWS) and input
    rows [rg*ROWS*STRIDE, (rg+1)*ROWS*STRIDE).
    dx[ih, iw] = sum over taps of dy[(ih + PAD - kh*DIL)/S, (iw + PAD - kw*DIL)/S] * w[kh, kw]
    (where divisible and in range); then the dweight partials
    pdw[program, kh*K + kw, c] = sum dy[oh, ow] * x[oh*S - PAD + kh*DIL, ow*S - PAD + kw*DIL]."""
    C, H, W, Ho, Wo = _i64(C), _i64(H), _i64(W), _i64(Ho), _i64(Wo)
    sN, sH, sW, PAD, DIL = _i64(sN), _i64(sH), _i64(sW), _i64(PAD), _i64(DIL)
    n, rg, _unused, cb = _program(n_rg, 1, n_cb)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    acc_t = dy_ptr.dtype.element_ty
    x_img = x_ptr + n * sN
    dy_ch = dy_ptr + n * Ho * Wo * C + ch[None, :]
    dx_ch = dx_ptr + n * H * W * C + ch[None, :]

    # dx: input columns p, p + S, p + 2S, ... per tile, so that every tap maps the tile onto
    # consecutive output columns (for stride 2 the taps of the wrong parity are masked whole).
    for r in range(ROWS * STRIDE):
        ih = rg * ROWS * STRIDE + r
        for p in tl.static_range(STRIDE):
            for j in range(n_wbi):
                iw = p + STRIDE * (j * BLOCK_W + tl.arange(0, BLOCK_W))
                ok = (iw < W) & (ih < H)
                acc = tl.zeros([BLOCK_W, BLOCK_C], acc_t)
                w_tap = _weight_block(w_ptr, cb, K, BLOCK_C)
                qh = ih + PAD
                for kh in tl.static_range(K):
                    oh = qh // STRIDE
                    h_ok = ok & (qh >= 0) & (oh < Ho) & _divides(qh, STRIDE)
                    qw = iw + PAD
                    for kw in tl.static_range(K):
                        ow = qw // STRIDE
                        mw = h_ok & (qw >= 0) & (ow < Wo) & _divides(qw, STRIDE)
                        dyv = tl.load(dy_ch + ((oh * Wo + ow) * C)[:, None],
                                      mask=mw[:, None] & ch_ok[None, :], other=0.0)
                        wv = tl.load(w_tap)
                        acc += dyv * wv.to(acc_t)[None, :]
                        qw -= DIL
                        w_tap += BLOCK_C
                    qh -= DIL
                tl.store(dx_ch + ((ih * W + iw) * C)[:, None], acc.to(dx_ptr.dtype.element_ty),
                         mask=ok[:, None] & ch_ok[None, :])

    # dweight: one tap at a time over this program's output rows (one accumulator tile; the
    # region was just read for dx, so these loads hit L1/L2).
    x_ch = x_img + ch[None, :]
    pdw = pdw_ptr + (n * n_rg + rg) * (K * K) * C + ch
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            acc = tl.zeros([BLOCK_W, BLOCK_C], acc_t)
            for r in range(ROWS):
                oh = rg * ROWS + r
                ih = oh * STRIDE - PAD + kh * DIL
                h_ok = (oh < Ho) & (ih >= 0) & (ih < H)
                for j in range(n_wbo):
                    ow = j * BLOCK_W + tl.arange(0, BLOCK_W)
                    iw = ow * STRIDE - PAD + kw * DIL
                    m = (h_ok & (ow < Wo) & (iw >= 0) & (iw < W))[:, None] & ch_ok[None, :]
                    dyv = tl.load(dy_ch + ((oh * Wo + ow) * C)[:, None], mask=m, other=0.0)
                    xv = tl.load(x_ch + (ih * sH + iw * sW)[:, None], mask=m, other=0.0)
                    acc += dyv * xv.to(acc_t)
            tl.store(pdw, tl.sum(acc, axis=0), mask=ch_ok)
            pdw += C


# ---- host side ----------------------------------------------------------------------------

def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_FORCED_CONFIG: Optional[int] = None  # tests and benchmarks: index into CONFIGS


def _tile(channels: int, width: int):
    """(BLOCK_W, BLOCK_C, num_warps): the CONFIGS entry, shrunk to the problem (small layers,
    tests), with the fewest padded (column x channel) slots for this row width and channel
    count; ties go to the first listed."""
    best = None
    configs = CONFIGS if _FORCED_CONFIG is None else [CONFIGS[_FORCED_CONFIG]]
    for cfg in configs:
        bw = min(cfg["BLOCK_W"], _pow2(width))
        bc = min(cfg["BLOCK_C"], max(4, _pow2(channels)))
        slots = _cdiv(width, bw) * bw * _cdiv(channels, bc) * bc
        if best is None or slots < best[0]:
            best = (slots, (bw, bc, cfg["num_warps"]))
    return best[1]


# Work per program. On a GPU a program takes one tile (ROWS = WB_PER = 1, which Triton
# specialises to constants): the loop-free kernels need about half the registers of the looping
# ones (ptxas, sm_90: 80 against 162 for the fp16 64x16 output pass), so twice the tiles are in
# flight per SM, which is what a memory-bound kernel needs. Passes that write per-program
# partials loop over rows only where the partials would otherwise exceed 1/32 of x. The
# interpreter runs programs one by one at a fixed cost per op: there one program per image and
# channel block is fastest.
_PARTIAL_FRACTION = 32


def _split(n: int, ho: int, n_wb: int, c: int, partials: bool, x_numel: int):
    """(rows, column blocks) per program for an output pass (partials=False) or a pass writing
    per-program (P, C) partials."""
    if _INTERPRET:
        return ho, n_wb
    rows = 1
    while partials and rows < ho and n * _cdiv(ho, rows) * n_wb * c * _PARTIAL_FRACTION > x_numel:
        rows *= 2
    return rows, 1


def _launch_split(n, ho, n_wb, n_cb, rows, wb_per):
    """Grid size and the (n_rg, n_wg) decomposition of the program id for a split."""
    n_rg, n_wg = _cdiv(ho, rows), _cdiv(n_wb, wb_per)
    return n * n_rg * n_wg * n_cb, n_rg, n_wg


def _packed_weight(weight: torch.Tensor, block_c: int) -> torch.Tensor:
    """(C, 1, k, k) -> [cdiv(C, block_c), k*k, block_c] in x's dtype, channels zero-padded:
    per channel block, one contiguous vector per tap (see _weight_block)."""
    c, k = weight.shape[0], weight.shape[-1]
    blocks = _cdiv(c, block_c)
    wp = weight.new_zeros((blocks * block_c, k * k))
    wp[:c] = weight.reshape(c, k * k)
    return wp.view(blocks, block_c, k * k).transpose(1, 2).contiguous()


def _geometry(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    ho = _checks.conv_out_size(h, k, stride, padding, dilation)
    wo = _checks.conv_out_size(w, k, stride, padding, dilation)
    return n, c, h, w, k, ho, wo


def _check_stats(op, name, t, channels, x):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != channels \
            or not t.is_floating_point() or t.device != x.device:
        got = f"shape {tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) \
            else type(t).__name__
        raise ValueError(f"{op}: {name} must be a floating-point ({channels},) tensor on "
                         f"{x.device}; got {got}")


@on_input_device
def forward(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor,
            bn_bias: torch.Tensor, running_mean: Optional[torch.Tensor],
            running_var: Optional[torch.Tensor], stride: int, padding: int, dilation: int,
            act: str, training: bool, eps: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var): out = act(BN(depthwise_conv(x))) in x's memory format; mean/var the
    statistics used (training: batch mean and biased variance; eval: copies of the running
    ones), float32 (float64 for float64 x). Running statistics are not updated here."""
    op = "dwconv_bn_act"
    _checks.tensor(op, "x", x, 4)
    channels = x.shape[1]
    _checks.depthwise(op, x, weight, channels, stride, padding, dilation)
    _checks.bn(op, x, channels, bn_weight, bn_bias, running_mean, running_var, training)
    _checks.act(op, "act", act)
    n, c, h, w, k, ho, wo = _geometry(x, weight, stride, padding, dilation)
    _checks.training_count(op, n * ho * wo, training)
    acc = acc_dtype(x)
    sd = batchnorm.stat_dtype(x)

    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    has_running = running_mean is not None
    if not training or (has_running and x.numel() == 0):
        # Eval; or an empty training batch: the running statistics (zeros without them), so the
        # caller's momentum update leaves them unchanged, as the C++ op does.
        mean, var = running_mean.to(sd, copy=True), running_var.to(sd, copy=True)
    else:
        mean = torch.zeros(c, dtype=sd, device=x.device)
        var = torch.zeros(c, dtype=sd, device=x.device)
    if x.numel() == 0 or out.numel() == 0:
        return in_format(out, x), mean, var

    xc = channels_innermost(x)
    bw, bc, warps = _tile(c, wo)
    wp = _packed_weight(weight, bc)
    n_cb, n_wb = _cdiv(c, bc), _cdiv(wo, bw)
    geo = (c, h, w, ho, wo, xc.stride(0), xc.stride(2), xc.stride(3), padding, dilation)
    meta = dict(K=k, STRIDE=stride, ACT=CODES[act], BLOCK_W=bw, BLOCK_C=bc, num_warps=warps,
                num_stages=NUM_STAGES)
    if training:
        # Pass 1: per-program (mean, M2, count) partials; no y is stored.
        rows, wb_per = _split(n, ho, n_wb, c, True, x.numel())
        grid, n_rg, n_wg = _launch_split(n, ho, n_wb, n_cb, rows, wb_per)
        parts = n * n_rg * n_wg
        pmean = torch.empty((parts, c), dtype=acc, device=x.device)
        pm2 = torch.empty_like(pmean)
        pcnt = torch.empty((parts,), dtype=acc, device=x.device)
        _dw_fwd_kernel[(grid,)](
            xc, wp, pmean, pmean, out, pmean, pm2, pcnt, *geo, rows, wb_per, n_rg, n_wg,
            n_cb, STATS=True, **meta)
        bmean, bvar = batchnorm.combine_partials(pmean, pm2, pcnt)
        mean, var = bmean.to(sd), bvar.to(sd)
    scale, shift = batchnorm.fold(bn_weight, bn_bias, mean, var, eps)
    # Output pass: act(y * scale + shift).
    rows, wb_per = _split(n, ho, n_wb, c, False, x.numel())
    grid, n_rg, n_wg = _launch_split(n, ho, n_wb, n_cb, rows, wb_per)
    _dw_fwd_kernel[(grid,)](
        xc, wp, scale, shift, out, scale, scale, scale, *geo, rows, wb_per, n_rg, n_wg, n_cb,
        STATS=False, **meta)
    return in_format(out, x), mean, var


@on_input_device
def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor,
             var: torch.Tensor, stride: int, padding: int, dilation: int, act: str,
             training: bool, eps: float
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias), each in its input's dtype (grad_x
    in x's memory format). mean/var: the statistics the forward used."""
    op = "dwconv_bn_act_backward"
    _checks.tensor(op, "x", x, 4)
    channels = x.shape[1]
    _checks.depthwise(op, x, weight, channels, stride, padding, dilation)
    _checks.bn(op, x, channels, bn_weight, bn_bias, None, None, True)
    _check_stats(op, "mean", mean, channels, x)
    _check_stats(op, "var", var, channels, x)
    _checks.act(op, "act", act)
    n, c, h, w, k, ho, wo = _geometry(x, weight, stride, padding, dilation)
    _checks.training_count(op, n * ho * wo, training)
    _checks.tensor(op, "grad_out", grad_out, 4, like=x)
    if tuple(grad_out.shape) != (n, c, ho, wo):
        raise ValueError(f"{op}: grad_out must have shape {(n, c, ho, wo)}; got "
                         f"{tuple(grad_out.shape)}")
    acc = acc_dtype(x)
    sd = batchnorm.stat_dtype(x)

    grad_x = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    grad_weight = torch.empty_like(weight)
    grad_gamma = torch.empty_like(bn_weight)
    grad_beta = torch.empty_like(bn_bias)
    if x.numel() == 0 or grad_out.numel() == 0:
        if x.numel() != 0:
            grad_x.zero_()
        grad_weight.zero_()
        grad_gamma.zero_()
        grad_beta.zero_()
        return in_format(grad_x, x), grad_weight, grad_gamma, grad_beta

    xc = channels_innermost(x)
    goc = channels_innermost(grad_out)
    mean_s, var_s = mean.to(sd), var.to(sd)
    scale, shift = batchnorm.fold(bn_weight, bn_bias, mean_s, var_s, eps)
    count = n * ho * wo
    ca, cb, cc, invstd = batchnorm.backward_coeffs(bn_weight, mean_s, var_s, eps, None, None,
                                                   count, False)
    bw, bc, warps = _tile(c, wo)
    wp = _packed_weight(weight, bc)
    n_cb, n_wb = _cdiv(c, bc), _cdiv(wo, bw)
    geo = (c, h, w, ho, wo, xc.stride(0), xc.stride(2), xc.stride(3), goc.stride(0),
           goc.stride(2), goc.stride(3), padding, dilation)
    meta = dict(K=k, STRIDE=stride, ACT=CODES[act], BLOCK_W=bw, BLOCK_C=bc, num_warps=warps,
                num_stages=NUM_STAGES)
    dy = torch.empty((n, ho, wo, c), dtype=acc, device=x.device)
    # Kernel A: partial sums of g and g*xhat (+ kernel B's dy in eval, which has no
    # batch terms: one launch).
    rows, wb_per = _split(n, ho, n_wb, c, True, x.numel())
    grid, n_rg, n_wg = _launch_split(n, ho, n_wb, n_cb, rows, wb_per)
    psg = torch.empty((n * n_rg * n_wg, c), dtype=acc, device=x.device)
    psgx = torch.empty_like(psg)
    tensors = (xc, wp, goc, scale, shift, mean_s, invstd)
    _dw_bwd_dy_kernel[(grid,)](
        *tensors, ca, cb, cc, dy, psg, psgx, *geo, rows, wb_per, n_rg, n_wg, n_cb,
        SUMS=True, WRITE_DY=not training, **meta)
    sum_g = psg.sum(0, dtype=torch.float64)
    sum_gx = psgx.sum(0, dtype=torch.float64)
    if training:
        ca, cb, cc, invstd = batchnorm.backward_coeffs(bn_weight, mean_s, var_s, eps, sum_g,
                                                       sum_gx, count, True)
        # Kernel B: dy = a*g + b*xhat + c with the batch terms.
        rows, wb_per = _split(n, ho, n_wb, c, False, x.numel())
        grid, n_rg, n_wg = _launch_split(n, ho, n_wb, n_cb, rows, wb_per)
        _dw_bwd_dy_kernel[(grid,)](
            *tensors, ca, cb, cc, dy, psg, psgx, *geo, rows, wb_per, n_rg, n_wg, n_cb,
            SUMS=False, WRITE_DY=True, **meta)

    # Kernel C: dx and the dweight partials.
    bwi, bci, _ = _tile(c, _cdiv(w, stride))
    bc3 = min(bc, bci)
    bw3 = min(max(bw, bwi), _pow2(max(wo, _cdiv(w, stride))))
    n_cb3 = _cdiv(c, bc3)
    # Partials [programs, k*k, C] kept to about an eighth of x's bytes, and enough
    # programs for the GPU (the interpreter: one per image and channel block).
    budget = max(1, (x.numel() * x.element_size()) // 8 // (k * k * c * dy.element_size()))
    rows = ho if _INTERPRET else max(1, min(8, ho // max(1, _cdiv(8 * 132, n * n_cb3))))
    while rows < ho and n * _cdiv(ho, rows) > budget:
        rows *= 2
    n_rg = max(_cdiv(ho, rows), _cdiv(h, rows * stride))
    pdw = torch.empty((n * n_rg, k * k, c), dtype=acc, device=x.device)
    dx = grad_x
    _dw_bwd_input_kernel[(n * n_rg * n_cb3,)](
        xc, wp if bc3 == bc else _packed_weight(weight, bc3), dy, dx, pdw, c, h, w, ho, wo,
        xc.stride(0), xc.stride(2), xc.stride(3),
        padding, dilation, rows, n_rg, n_cb3, _cdiv(_cdiv(w, stride), bw3), _cdiv(wo, bw3),
        K=k, STRIDE=stride, BLOCK_W=bw3, BLOCK_C=bc3, num_warps=warps,
        num_stages=NUM_STAGES)
    dw = pdw.sum(0, dtype=torch.float64)  # [k*k, C]
    grad_weight.copy_(dw.t().reshape(c, 1, k, k))
    grad_gamma.copy_(sum_gx)
    grad_beta.copy_(sum_g)
    return in_format(grad_x, x), grad_weight, grad_gamma, grad_beta


# ---- ahead-of-time compile specs (make kernels-report) --------------------------------------

def _spec(label, fn, ints, ptrs, constexprs, cfg):
    """One AOT_SPECS entry. ints: the i32 arguments; ptrs: {name: element type}. ROWS/WB_PER
    are the constant 1 a GPU launch specialises them to (one tile per program, see _split);
    attrs: the 16-divisibility Triton gives aligned pointers and sizes/strides at launch
    (C % 16 == 0 here), for compilers that take it (triton.compiler.ASTSource(attrs=...))."""
    ones = {n: 1 for n in ("ROWS", "WB_PER") if n in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in ptrs:
            signature[name] = "*" + ptrs[name]
        elif name in ints and name not in ones:
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
    div16 = {"C", "sN", "sH", "sW", "gN", "gH", "gW"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in ptrs or name in div16}
    tile = dict(BLOCK_W=cfg["BLOCK_W"], BLOCK_C=cfg["BLOCK_C"])
    return dict(label=label, fn=fn, signature=signature, constexprs={**constexprs, **ones, **tile},
                options={"num_warps": cfg["num_warps"], "num_stages": NUM_STAGES}, attrs=attrs)


def _aot_specs():
    geo = ("C", "H", "W", "Ho", "Wo", "sN", "sH", "sW", "PAD", "DIL")
    specs = []
    for dt in ("fp16", "fp32"):
        acc = {p: "fp32" for p in ("scale_ptr", "shift_ptr", "pmean_ptr", "pm2_ptr", "pcnt_ptr",
                                   "mean_ptr", "invstd_ptr", "ca_ptr", "cb_ptr", "cc_ptr",
                                   "dy_ptr", "psg_ptr", "psgx_ptr", "pdw_ptr")}
        ptrs = {**acc, "x_ptr": dt, "w_ptr": dt, "out_ptr": dt, "go_ptr": dt, "dx_ptr": dt}
        for cfg in CONFIGS:
            tag = f"{dt} {cfg['BLOCK_W']}x{cfg['BLOCK_C']}w{cfg['num_warps']} k3"
            for stats in (True, False):
                specs.append(_spec(
                    f"dw_fwd {'stats' if stats else 'out'} {tag} relu6", _dw_fwd_kernel,
                    geo + ("ROWS", "WB_PER", "n_rg", "n_wg", "n_cb"), ptrs,
                    dict(K=3, STRIDE=1, ACT=CODES["relu6"], STATS=stats), cfg))
            for sums, write in ((True, False), (False, True), (True, True)):
                kind = "+".join(n for n, f in (("sums", sums), ("dy", write)) if f)
                specs.append(_spec(
                    f"dw_bwd_dy {kind} {tag} hswish", _dw_bwd_dy_kernel,
                    geo + ("gN", "gH", "gW", "ROWS", "WB_PER", "n_rg", "n_wg", "n_cb"), ptrs,
                    dict(K=3, STRIDE=1, ACT=CODES["hswish"], SUMS=sums, WRITE_DY=write), cfg))
            for stride in (1, 2):
                specs.append(_spec(
                    f"dw_bwd_input {tag} s{stride}", _dw_bwd_input_kernel,
                    geo + ("ROWS", "n_rg", "n_cb", "n_wbi", "n_wbo"), ptrs,
                    dict(K=3, STRIDE=stride), cfg))
    return specs


AOT_SPECS = _aot_specs()
