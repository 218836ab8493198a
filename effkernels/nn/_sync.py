"""Synchronised BatchNorm for the fused conv+BN+act ops: a module whose BatchNorm is a
torch.nn.SyncBatchNorm (e.g. after nn.SyncBatchNorm.convert_sync_batchnorm(model)) normalises
with the statistics of the whole process group in training, as SyncBatchNorm does — on CPU
too, where torch's own SyncBatchNorm refuses to run.

Forward: per-channel sum and sum of squares of the conv output (local), all-reduced with the
count; then the fused op in eval form with the global mean/variance (one fused pass for the
output). Backward: the fused op's backward with those statistics, plus the two per-channel
reductions of BatchNorm's gradient (sum g and sum g*xhat) all-reduced and applied as the exact
correction (the terms a local batch-statistics backward would have used locally), through the
convolution's own derivative. Running statistics get the global batch's (unbiased) variance.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


def group_of(bn: nn.Module):
    """The process group to synchronise bn over in this call, or None (no sync needed)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _global_stats(y: torch.Tensor, group):
    y64 = y.detach().double()
    local = torch.cat([y64.sum((0, 2, 3)), (y64 * y64).sum((0, 2, 3)),
                       y64.new_tensor([y.numel() // y.shape[1]])])
    dist.all_reduce(local, group=group)
    c = y.shape[1]
    count = local[-1]
    mean = local[:c] / count
    var = (local[c:2 * c] / count - mean * mean).clamp_min(0)
    return mean, var, int(count.item())


class _SyncConvBNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, conv: Callable, op_eval: Callable, group, eps: float, n_weights: int,
                x, gamma, beta, residual, running_mean, running_var, momentum, *weights):
        with torch.no_grad():
            mean, var, count = _global_stats(conv(x, weights), group)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype),
                                                    alpha=momentum)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, var = mean.to(stat_dtype), var.to(stat_dtype)
        out = op_eval(x, weights, gamma, beta, mean, var, residual)
        ctx.save_for_backward(x, gamma, beta, residual, mean, var, *weights)
        ctx.conv, ctx.op_eval, ctx.group, ctx.eps, ctx.count = conv, op_eval, group, eps, count
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gamma, beta, residual, mean, var, *weights = ctx.saved_tensors
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (x, gamma, beta, residual)]
        w_leaves = [w.detach().requires_grad_() for w in weights]
        with torch.enable_grad():
            out = ctx.op_eval(leaves[0], w_leaves, leaves[1], leaves[2], mean, var, leaves[3])
            inputs = [t for t in leaves if t is not None] + w_leaves
            grads = list(torch.autograd.grad(out, inputs, grad_out))
        dx, dgamma, dbeta = grads[0], grads[1], grads[2]
        dres = grads[3] if ctx.has_residual else None
        dws = grads[4 if ctx.has_residual else 3:]
        # BatchNorm's batch-statistics terms, over the whole group: sum g = dbeta and
        # sum g*xhat = dgamma (the eval backward's), all-reduced.
        sums = torch.cat([dbeta.detach(), dgamma.detach()]).double()
        dist.all_reduce(sums, group=ctx.group)
        c = gamma.shape[0]
        invstd = (var.double() + ctx.eps).rsqrt()
        scale = gamma.detach().double() * invstd / ctx.count
        # d y = -gamma*invstd/count * (sum_g + xhat * sum_gxhat), an affine function of y
        b = -(scale * sums[c:] * invstd)
        a = -(scale * sums[:c]) - b * mean.double()
        xl = x.detach().requires_grad_()
        wl = [w.detach().requires_grad_() for w in weights]
        with torch.enable_grad():
            y = ctx.conv(xl, wl)
            shape = (1, c, 1, 1)
            corr = (a.view(shape) + b.view(shape) * y.detach().double()).to(y.dtype)
            extra = torch.autograd.grad(y, [xl] + wl, corr)
        dx = dx + extra[0]
        dws = [d + e for d, e in zip(dws, extra[1:])]
        return (None, None, None, None, None, dx, dgamma, dbeta, dres, None, None, None, *dws)


def conv_bn_act(conv: Callable, op_eval: Callable, group, x: torch.Tensor,
                weights: Sequence[torch.Tensor], gamma, beta, running_mean, running_var,
                momentum: float, eps: float, residual: Optional[torch.Tensor] = None):
    """op_eval(x, weights, gamma, beta, mean, var, residual) with the group's batch statistics
    of conv(x, weights) (the convolution alone, in plain torch)."""
    if gamma is None or beta is None:
        raise ValueError("synchronised BatchNorm needs affine=True")
    return _SyncConvBNAct.apply(conv, op_eval, group, eps, len(weights), x, gamma, beta,
                                residual, running_mean, running_var, momentum, *weights)
