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
from .triton_kernels import dwconv_bn_act as _dw
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
                  residual: Optional[Tensor], act: str, training: bool, eps: float
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    return _pw.forward(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, act,
                       training, eps)


@torch.library.custom_op(f"{NAMESPACE}::pwconv_bn_act_backward", mutates_args=())
def pwconv_bn_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor,
                           bn_bias: Tensor, mean: Tensor, var: Tensor,
                           residual: Optional[Tensor], act: str, training: bool, eps: float
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _pw.backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, residual, act,
                        training, eps)


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
