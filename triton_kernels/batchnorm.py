"""BatchNorm arithmetic shared by the Triton ops, on small per-channel tensors (host side, plain
torch ops: deterministic, float64 where it matters). The same formulas as
csrc/include/effkernels/conv_geometry.h (fold_bn, bn_backward_coeffs) and cpu_common.h
(ChannelStats)."""
from __future__ import annotations

from typing import Tuple

import torch


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def combine_partials(partial_mean: torch.Tensor, partial_m2: torch.Tensor,
                     counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance from per-tile partials (Chan et al.): partial_mean
    and partial_m2 are (P, C) (mean and sum of squared deviations of each tile), counts (P,)
    the tiles' element counts. Combined in float64 with torch reductions: deterministic."""
    pm, pm2 = partial_mean.double(), partial_m2.double()
    cnt = counts.double().unsqueeze(1)
    total = cnt.sum()
    mean = (cnt * pm).sum(0) / total
    var = (pm2.sum(0) + (cnt * (pm - mean) ** 2).sum(0)) / total
    return mean, var


def fold(gamma, beta, mean, var, eps) -> Tuple[torch.Tensor, torch.Tensor]:
    """bn(y) = y * scale + shift (float32; float64 inputs stay float64)."""
    dt = torch.float64 if mean.dtype == torch.float64 else torch.float32
    invstd = torch.rsqrt(var.to(torch.float64) + eps)
    scale = gamma.to(torch.float64) * invstd
    shift = beta.to(torch.float64) - mean.to(torch.float64) * scale
    return scale.to(dt).contiguous(), shift.to(dt).contiguous()


def backward_coeffs(gamma, mean, var, eps, sum_g, sum_gx, count, training):
    """dL/dy = a * g + b * xhat + c per channel (see conv_geometry.h bn_backward_coeffs), with
    xhat = (y - mean) * invstd. Returns (a, b, c, invstd) in float32 (float64 for float64)."""
    dt = torch.float64 if mean.dtype == torch.float64 else torch.float32
    invstd = torch.rsqrt(var.to(torch.float64) + eps)
    a = gamma.to(torch.float64) * invstd
    if training:
        b = -a * sum_gx.double() / count
        c = -a * sum_g.double() / count
    else:
        b = torch.zeros_like(a)
        c = torch.zeros_like(a)
    return a.to(dt), b.to(dt), c.to(dt), invstd.to(dt)
