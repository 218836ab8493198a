"""Host-side pieces shared by the ops' launchers: the device guard, the channels-innermost view
of an input, the output's memory format, the accumulation dtype."""
from __future__ import annotations

import functools

import torch
from torch._prims_common import suggest_memory_format


def on_input_device(launcher):
    """Runs `launcher` with its first argument's CUDA device current: Triton launches on the
    current device, so a tensor on another GPU (a model on cuda:1 without
    torch.cuda.set_device) would otherwise be read through the wrong device's context."""
    @functools.wraps(launcher)
    def guarded(first: torch.Tensor, *args, **kwargs):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    guarded.device_guarded = True
    return guarded


def channels_innermost(t: torch.Tensor) -> torch.Tensor:
    """t itself when its channel stride is 1 (NHWC and its channel/column slices), else one
    channels_last copy."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def in_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's suggested memory format (the ops return their input's format)."""
    fmt = suggest_memory_format(like)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
