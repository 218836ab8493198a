"""Conv + BatchNorm + activation modules and squeeze-excite. Parameters live in plain nn.Conv2d
and nn.BatchNorm2d children (so state_dicts, .to(), init code and optimizers see what they
expect); forward runs the effkernels ops (effkernels/nn/_functional.py)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .. import reference
from . import _functional as F_

Kernel = Union[int, Sequence[int]]


def _check_act(name: str, value: str) -> str:
    if value not in reference.ACTIVATIONS:
        raise ValueError(f"{name} must be one of {', '.join(reference.ACTIVATIONS)}; got "
                         f"{value!r}")
    return value


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """The nearest multiple of divisor, at least min_value (default divisor), never more than
    10% below v (the channel rounding of the MobileNet/EfficientNet reference code)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def split_channels(channels: int, groups: int) -> List[int]:
    """Equal channel groups, the remainder going to the first (MixNet's, and timm's, split)."""
    sizes = [channels // groups] * groups
    sizes[0] += channels - sum(sizes)
    return sizes


def make_conv(in_channels: int, out_channels: int, kernel_size: Kernel = 1, stride: int = 1,
              dilation: int = 1, depthwise: bool = False, **factory) -> nn.Module:
    """nn.Conv2d without bias, padded dilation*(k-1)//2; a list of kernel sizes gives one conv per
    channel group (an nn.ModuleList, state_dict keys '0', '1', ... as timm's MixedConv2d)."""
    def conv(cin, cout, k):
        return nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation,
                         groups=cin if depthwise else 1, bias=False, **factory)

    if isinstance(kernel_size, int):
        return conv(in_channels, out_channels, kernel_size)
    kernel_size = list(kernel_size)
    ins = split_channels(in_channels, len(kernel_size))
    outs = split_channels(out_channels, len(kernel_size))
    return nn.ModuleList([conv(i, o, k) for i, o, k in zip(ins, outs, kernel_size)])


class NotScriptable:
    """torch.jit.script refuses effkernels modules with a clear message (it calls
    __prepare_scriptable__ on every submodule first)."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"effkernels: {type(self).__name__} cannot be compiled with torch.jit.script (its "
            f"ops are torch.library custom ops called from Python); use torch.compile or "
            f"torch.export instead")


class _ConvBNActBase(NotScriptable, nn.Module):
    """conv (nn.Conv2d or a ModuleList of split convs) + bn (nn.BatchNorm2d) + act."""

    def __init__(self, conv: nn.Module, channels: int, act: str, eps: float, momentum: float,
                 same: bool, **factory):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **factory)
        self.act = _check_act("act", act)
        self.same = same

    def extra_repr(self) -> str:
        return f"act={self.act!r}" + (", padding='same'" if self.same else "")


class DepthwiseConvBNAct(_ConvBNActBase):
    """ACT(BN(depthwise kxk conv(x))): effkernels.ops.dwconv_bn_act. same=True pads as
    TensorFlow's 'SAME' (asymmetric for stride 2), as timm's tf_* models."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 act: str = "relu6", *, same: bool = False, eps: float = 1e-5,
                 momentum: float = 0.1, device=None, dtype=None):
        factory = dict(device=device, dtype=dtype)
        super().__init__(make_conv(channels, channels, kernel_size, stride, dilation, True,
                                   **factory), channels, act, eps, momentum, same, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.depthwise(x, self.conv, self.bn, self.act, self.same)


class MixedDepthwiseConvBNAct(_ConvBNActBase):
    """MixNet's mixed depthwise conv + BN + act in one op (effkernels.ops.mixconv_bn_act):
    channel group i (split_channels) is convolved with kernel_sizes[i]."""

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (3, 5, 7), stride: int = 1,
                 dilation: int = 1, act: str = "relu6", *, same: bool = False,
                 eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None):
        factory = dict(device=device, dtype=dtype)
        super().__init__(make_conv(channels, channels, list(kernel_sizes), stride, dilation,
                                   True, **factory), channels, act, eps, momentum, same,
                         **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.depthwise(x, self.conv, self.bn, self.act, self.same)


class PointwiseConvBNAct(_ConvBNActBase):
    """ACT(BN(1x1 conv(x)) + residual): effkernels.ops.pwconv_bn_act. groups > 1 splits the
    channels into groups with a 1x1 conv each (MixNet's grouped pointwise), run as one GEMM."""

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu6", *,
                 groups: int = 1, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None):
        factory = dict(device=device, dtype=dtype)
        kernel = 1 if groups == 1 else [1] * groups
        super().__init__(make_conv(in_channels, out_channels, kernel, **factory), out_channels,
                         act, eps, momentum, False, **factory)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F_.pointwise(x, self.conv, self.bn, self.act, residual)


class ConvBNAct(_ConvBNActBase):
    """Any conv + BN + act (stems, heads): a 1x1 or depthwise conv runs the effkernels op, a
    dense kxk conv (the 3-channel stem) runs torch's conv and then BN + act."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, groups: int = 1, act: str = "relu6", *,
                 same: bool = False, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None):
        factory = dict(device=device, dtype=dtype)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                         dilation * (kernel_size - 1) // 2, dilation, groups=groups, bias=False,
                         **factory)
        super().__init__(conv, out_channels, act, eps, momentum, same and stride > 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.conv_bn_act(x, self.conv, self.bn, self.act, self.same)


class SqueezeExcite(NotScriptable, nn.Module):
    """x * gate(conv_expand(act(conv_reduce(mean_hw(x))))), timm's layout (conv_reduce,
    conv_expand, both 1x1 with bias)."""

    def __init__(self, channels: int, rd_channels: int, act: str = "relu",
                 gate: str = "sigmoid", device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True, **factory)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True, **factory)
        self.act = _check_act("se_act", act)
        self.gate = _check_act("se_gate", gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.squeeze_excite(x, self.conv_reduce, self.conv_expand, self.act, self.gate)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, gate={self.gate!r}"


class DropPath(nn.Module):
    """Stochastic depth per sample (the residual branch is dropped for a random subset of the
    batch in training and rescaled by 1/keep), as timm's DropPath."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
