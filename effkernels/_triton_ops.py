"""The Triton backend as dispatcher ops: namespace `effkernels_triton`, the same signatures and
semantics as the C++ ops of csrc/ops.cpp, so that the same fake kernels and autograd serve them
(effkernels/_registration.py) and torch.compile(fullgraph=True) traces them. Each op calls the
launchers of its file in triton_kernels/ (installed as effkernels.triton_kernels).

Imported on first use of the triton backend (importing triton is not free)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _registration
from ._checks import conv_out_size
from .triton_kernels import dwconv_bn_act as _dw
from .triton_kernels import inverted_residual as _ir
from .triton_kernels import mixconv_bn_act as _mix
from .triton_kernels import pwconv_bn_act as _pw

NAMESPACE = "effkernels_triton"


@torch.library.custom_op(f"{NAMESPACE}::dwconv_bn_act", mutates_args=())
def dwconv_bn_act(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], stride: int,
                  padding: int, dilation: int, act: str, training: bool, eps: float
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    return _dw.forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                       padding, dilation, act, training, eps)


@torch.library.custom_op(f"{NAMESPACE}::dwconv_bn_act_backward", mutates_args=())
def dwconv_bn_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                           bn_bias: Tensor, mean: Tensor, var: Tensor, stride: int,
                           padding: int, dilation: int, act: str, training: bool, eps: float
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _dw.backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, padding,
                        dilation, act, training, eps)


@torch.library.custom_op(f"{NAMESPACE}::pwconv_bn_act", mutates_args=())
def pwconv_bn_act(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  residual: Optional[Tensor], act: str, training: bool, eps: float,
                  keep_conv_out: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out, mean, var = _pw.forward(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                 residual, act, training, eps)
    return out, mean, var, mean.new_empty((0,))  # no conv_out: the backward recomputes y


@torch.library.custom_op(f"{NAMESPACE}::pwconv_bn_act_backward", mutates_args=())
def pwconv_bn_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                           bn_bias: Tensor, mean: Tensor, var: Tensor,
                           residual: Optional[Tensor], act: str, training: bool, eps: float,
                           conv_out: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _pw.backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, residual, act,
                        training, eps, conv_out)


@torch.library.custom_op(f"{NAMESPACE}::mixconv_bn_act", mutates_args=())
def mixconv_bn_act(x: Tensor, weights: List[Tensor], bn_weight: Tensor, bn_bias: Tensor,
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], stride: int,
                   dilation: int, act: str, training: bool, eps: float
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    return _mix.forward(x, weights, bn_weight, bn_bias, running_mean, running_var, stride,
                        dilation, act, training, eps)


@torch.library.custom_op(f"{NAMESPACE}::mixconv_bn_act_backward", mutates_args=())
def mixconv_bn_act_backward(grad_out: Tensor, x: Tensor, weights: List[Tensor],
                            bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                            stride: int, dilation: int, act: str, training: bool, eps: float
                            ) -> Tuple[Tensor, List[Tensor], Tensor, Tensor]:
    return _mix.backward(grad_out, x, weights, bn_weight, bn_bias, mean, var, stride, dilation,
                         act, training, eps)


_registration.register(NAMESPACE)


# ---- inverted_residual: the fused block -------------------------------------------------------
# Registered here rather than in _registration: the C++ effkernels::inverted_residual is
# CompositeImplicitAutograd (autograd from the ops it calls), only this op has its own backward.

@torch.library.custom_op(f"{NAMESPACE}::inverted_residual", mutates_args=())
def inverted_residual(x: Tensor, expand: List[Tensor], depthwise: List[Tensor], se: List[Tensor],
                      project: List[Tensor], stride: int, dilation: int, act: str, se_act: str,
                      se_gate: str, skip: bool, training: bool, eps: float
                      ) -> Tuple[Tensor, List[Tensor]]:
    return _ir.forward(x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate,
                       skip, training, eps)


@torch.library.custom_op(f"{NAMESPACE}::inverted_residual_backward", mutates_args=())
def inverted_residual_backward(grad_out: Tensor, x: Tensor, expand: List[Tensor],
                               depthwise: List[Tensor], se: List[Tensor], project: List[Tensor],
                               stats: List[Tensor], stride: int, dilation: int, act: str,
                               se_act: str, se_gate: str, skip: bool, training: bool, eps: float
                               ) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor],
                                          List[Tensor]]:
    """expand/depthwise/project: [weight, bn_weight, bn_bias] (expand may be []); returns the
    gradients of x and of each of those lists' tensors (and of se's), in the same order."""
    return _ir.backward(grad_out, x, expand, depthwise, se, project, stats, stride, dilation,
                        act, se_act, se_gate, skip, training, eps)


@inverted_residual.register_fake
def _ir_fake(x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate, skip,
             training, eps):
    n, _, h, w = x.shape
    k = depthwise[0].shape[-1]
    pad = dilation * (k - 1) // 2
    mid = expand[0].shape[0] if expand else x.shape[1]
    torch._check(depthwise[0].shape[0] == mid,
                 lambda: "inverted_residual: depthwise weight must have the hidden channels")
    torch._check(project[0].shape[1] == mid,
                 lambda: "inverted_residual: project weight must take the hidden channels")
    out = _registration._like(x, (n, project[0].shape[0],
                                  conv_out_size(h, k, stride, pad, dilation),
                                  conv_out_size(w, k, stride, pad, dilation)))
    stats = []
    for stage in ([expand] if expand else []) + [depthwise, project]:
        stats += list(_registration._stats(x, stage[0].shape[0]))
    return out, stats


@inverted_residual_backward.register_fake
def _ir_backward_fake(grad_out, x, expand, depthwise, se, project, stats, stride, dilation, act,
                      se_act, se_gate, skip, training, eps):
    return (_registration._like(x), [torch.empty_like(t) for t in expand],
            [torch.empty_like(t) for t in depthwise], [torch.empty_like(t) for t in se],
            [torch.empty_like(t) for t in project])


def _ir_setup(ctx, inputs, output):
    """Saves x, the stages' weight/bn_weight/bn_bias, SE's tensors and the batch statistics:
    no activation (the backward recomputes them)."""
    x, expand, depthwise, se, project = inputs[:5]
    _, stats = output
    ctx.n_expand, ctx.n_se = (3 if expand else 0), len(se)
    ctx.n_bundle = (len(expand), len(depthwise), len(project))
    ctx.save_for_backward(x, *expand[:3], *depthwise[:3], *se, *project[:3], *stats)
    ctx.params = inputs[5:]
    ctx.mark_non_differentiable(*stats)


def _ir_backward(ctx, grad_out, _grad_stats):
    x, *rest = ctx.saved_tensors
    expand, rest = rest[:ctx.n_expand], rest[ctx.n_expand:]
    depthwise, rest = rest[:3], rest[3:]
    se, rest = rest[:ctx.n_se], rest[ctx.n_se:]
    project, stats = rest[:3], rest[3:]
    if grad_out is None:
        raise RuntimeError(f"{NAMESPACE}::inverted_residual: no gradient for out")
    gx, g_exp, g_dw, g_se, g_proj = torch.ops.effkernels_triton.inverted_residual_backward(
        grad_out, x, expand, depthwise, se, project, stats, *ctx.params)

    def pad(grads, n):  # no gradient for running_mean / running_var
        return list(grads) + [None] * (n - len(grads))

    n_exp, n_dw, n_proj = ctx.n_bundle
    return (gx, pad(g_exp, n_exp), pad(g_dw, n_dw), list(g_se), pad(g_proj, n_proj)) + \
        (None,) * len(ctx.params)


torch.library.register_autograd(f"{NAMESPACE}::inverted_residual", _ir_backward,
                                setup_context=_ir_setup)
torch.library.register_autograd(
    f"{NAMESPACE}::inverted_residual_backward",
    _registration._refuse_double_backward(f"{NAMESPACE}::inverted_residual_backward"))
