"""Argument checks of the Python API. The C++ ops check again (TORCH_CHECK), so a direct
torch.ops.effkernels call is as safe; both name the argument and what was expected."""
from __future__ import annotations

from typing import Optional

import torch

from .reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """torch.nn.Conv2d's output size; the Python twin of conv_geometry.h's conv_out_size."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"{op}: {msg}")


def tensor(op: str, name: str, t, dim: int, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor; got {type(t).__name__}", TypeError)
    if t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D; got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float64, float16 or bfloat16; got {t.dtype}",
              TypeError)
    if like is not None:
        if t.device != like.device:
            _fail(op, f"{name} must be on {like.device} like x; got {t.device}")
        if t.dtype != like.dtype:
            _fail(op, f"{name} must have dtype {like.dtype} like x; got {t.dtype}", TypeError)


def nonempty(op: str, x: torch.Tensor) -> None:
    """Only the batch may be empty: F.conv2d refuses an empty C, H or W, and so do we."""
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        _fail(op, f"x must have at least one channel and non-empty H and W (only N may be 0, "
                  f"as for torch.nn.functional.conv2d); got shape {tuple(x.shape)}")


def act(op: str, name: str, value: str) -> None:
    if value not in ACTIVATIONS:
        _fail(op, f"{name} must be one of {', '.join(ACTIVATIONS)}; got {value!r}")


def bn(op: str, x: torch.Tensor, channels: int, bn_weight, bn_bias, running_mean, running_var,
       training: bool) -> None:
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor or None; got {type(t).__name__}", TypeError)
        if t.dim() != 1 or t.shape[0] != channels:
            _fail(op, f"{name} must have shape ({channels},); got {tuple(t.shape)}")
        if t.device != x.device:
            _fail(op, f"{name} must be on {x.device} like x; got {t.device}")
        if not t.is_floating_point():
            _fail(op, f"{name} must be floating point; got {t.dtype}", TypeError)
    if (running_mean is None) != (running_var is None):
        _fail(op, "running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        _fail(op, "running_mean and running_var are required when training=False")


def depthwise(op: str, x: torch.Tensor, weight: torch.Tensor, channels: int, stride: int,
              padding: int, dilation: int, name: str = "weight") -> None:
    tensor(op, name, weight, 4, like=x)
    k = weight.shape[-1]
    if channels < 1:
        _fail(op, f"{name} must have at least one channel; got shape {tuple(weight.shape)}")
    if weight.shape[0] != channels or weight.shape[1] != 1 or weight.shape[2] != k:
        _fail(op, f"{name} must have shape (C, 1, k, k) with C == {channels}; got "
                  f"{tuple(weight.shape)}")
    if not 1 <= k <= 11:
        _fail(op, f"kernel size must be in 1..11; got {k}")
    if stride not in (1, 2):
        _fail(op, f"stride must be 1 or 2; got {stride}")
    if dilation < 1:
        _fail(op, f"dilation must be >= 1; got {dilation}")
    if padding < 0:
        _fail(op, f"padding must be >= 0; got {padding}")
    reach = dilation * (k - 1) + 1
    h, w = x.shape[2], x.shape[3]
    if h + 2 * padding < reach or w + 2 * padding < reach:
        _fail(op, f"input of spatial size {h}x{w} with padding {padding} is smaller than the "
                  f"kernel's reach {reach} (k={k}, dilation={dilation})")


def skip(op: str, x: torch.Tensor, cout: int, k: int, stride: int, padding: int,
         dilation: int) -> None:
    """A block's skip connection adds x to its output: same channels, same size (csrc/
    op_checks.cpp has the C++ twin)."""
    size = tuple(conv_out_size(s, k, stride, padding, dilation) for s in x.shape[2:])
    if stride != 1 or cout != x.shape[1] or size != tuple(x.shape[2:]):
        _fail(op, f"skip needs stride 1, Cout == Cin and an output as large as x; got stride "
                  f"{stride}, Cin {x.shape[1]}, Cout {cout}, output {size[0]}x{size[1]} from "
                  f"{x.shape[2]}x{x.shape[3]}")


def conv_out(op: str, y, x: torch.Tensor, cout: int) -> None:
    """pwconv_bn_act_backward's conv_out: None or empty (y is recomputed), or the forward's y;
    csrc/op_checks.cpp has the C++ twin."""
    if y is None or y.numel() == 0:
        return
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (x.shape[0], cout, x.shape[2], x.shape[3])
    if (y.device != x.device or y.dtype != acc or tuple(y.shape) != shape
            or not y.is_contiguous(memory_format=torch.channels_last)):
        _fail(op, f"conv_out must be the forward's {shape} channels_last {acc} tensor on "
                  f"{x.device}, or None; got {y.dtype} of shape {tuple(y.shape)} and strides "
                  f"{y.stride()} on {y.device}")


def training_count(op: str, count: int, training: bool) -> None:
    if training and count == 1:
        _fail(op, f"expected more than 1 value per channel when training; got {count}")
