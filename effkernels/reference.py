"""Plain-PyTorch implementations of every effkernels op.

This is the oracle: the tests compare every backend against these functions run in float64, the
benchmarks verify against them, and the `reference` backend calls them. Each one is written as
the op's definition, with no cleverness, using F.batch_norm so that running statistics are
updated exactly as PyTorch does (in place, unbiased variance in the running estimate).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "relu6", "hswish", "silu", "hsigmoid", "sigmoid")


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "relu6":
        if z.dtype == torch.float64:
            # The float64 oracle: F.relu6's values, and one gradient at z = NaN (passed, as
            # activation.h) where hardtanh's backward passes it in PyTorch's scalar loops but
            # gives 0 in its vectorised ones (so it depends on the tensors' layout).
            return torch.where(z >= 6, 6.0, F.relu(z))
        return F.relu6(z)
    if name == "hswish":
        return _divided_by_six_exactly(z, F.hardswish(z), times_z=True)
    if name == "silu":
        return F.silu(z)
    if name == "hsigmoid":
        return _divided_by_six_exactly(z, F.hardsigmoid(z), times_z=False)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def _divided_by_six_exactly(z, pytorchs, times_z):
    """hardswish / hardsigmoid with an exact division by 6 in float64, as PyTorch's CPU
    kernels and activation.h compute them: PyTorch's CUDA kernels multiply by float's 1/6, a
    3e-8 relative error that float64 sees. The correction is a constant to autograd (the
    gradient stays PyTorch's backward); a non-finite one (inf - inf) is dropped. The C++ twin:
    csrc/include/effkernels/aten_activation.h."""
    if z.dtype != torch.float64 or z.device.type == "cpu":
        return pytorchs
    with torch.no_grad():
        r = (z + 3).clamp(0, 6)
        correction = (z * r if times_z else r) / 6 - pytorchs
        correction = torch.where(correction.isfinite(), correction, 0.0)
    return pytorchs + correction


def _in_format_of(x, out):
    """`out` in x's memory format, as every op returns it. PyTorch's convolutions mostly keep
    channels_last, but not all of them (float64 on CUDA, which cuDNN does not run). Tested on
    x's contiguity rather than by torch._prims_common.suggest_memory_format, which fails under
    torch.jit tracing (the ONNX TorchScript export traces the reference)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _bn(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)


def dwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                  padding=None, dilation=1, act="relu6", training=False, momentum=0.1, eps=1e-5):
    """ACT(BN(depthwise_conv(x))), weight (C, 1, k, k), padding None -> dilation*(k-1)//2."""
    k = weight.shape[-1]
    if padding is None:
        padding = dilation * (k - 1) // 2
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])
    return _in_format_of(x, activation(act, _bn(y, bn_weight, bn_bias, running_mean,
                                                running_var, training, momentum, eps)))


def pwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, act="relu6",
                  residual: Optional[torch.Tensor] = None, training=False, momentum=0.1,
                  eps=1e-5):
    """ACT(BN(conv1x1(x)) + residual), weight (Cout, Cin, 1, 1)."""
    z = _bn(F.conv2d(x, weight), bn_weight, bn_bias, running_mean, running_var, training,
            momentum, eps)
    if residual is not None:
        z = z + residual
    return _in_format_of(x, activation(act, z))


def mixconv_bn_act(x, weights: Sequence[torch.Tensor], bn_weight, bn_bias, running_mean,
                   running_var, *, stride=1, dilation=1, act="relu6", training=False,
                   momentum=0.1, eps=1e-5):
    """MixNet's mixed depthwise conv: channel group i convolved with weights[i] (C_i, 1, k_i, k_i)
    padded by dilation*(k_i-1)//2; the groups are concatenated and share one BatchNorm."""
    splits = [w.shape[0] for w in weights]
    parts = [
        F.conv2d(xi, w, None, stride, dilation * (w.shape[-1] - 1) // 2, dilation,
                 groups=w.shape[0])
        for xi, w in zip(torch.split(x, splits, dim=1), weights)
    ]
    y = torch.cat(parts, dim=1)
    return _in_format_of(x, activation(act, _bn(y, bn_weight, bn_bias, running_mean,
                                                running_var, training, momentum, eps)))


def squeeze_excite(x, reduce_weight, reduce_bias, expand_weight, expand_bias, *, act="relu",
                   gate="sigmoid"):
    """x * gate(conv_expand(act(conv_reduce(mean_hw(x))))), the SE module of timm/torchvision.
    Its 1x1 convolutions on the pooled (N, C, 1, 1) map are computed as F.linear on (N, C):
    the same products, but conv2d's CPU path for a 1x1 map in channels_last is the slow im2col
    convolution (the unfused MixNet blocks run this function at every SE)."""
    s = x.mean((2, 3))
    s = activation(act, F.linear(s, reduce_weight.flatten(1), reduce_bias))
    s = F.linear(s, expand_weight.flatten(1), expand_bias)
    return x * activation(gate, s)[:, :, None, None]


def inverted_residual(x, expand: Sequence[torch.Tensor], depthwise: Sequence[torch.Tensor],
                      se: Sequence[torch.Tensor], project: Sequence[torch.Tensor], *, stride=1,
                      dilation=1, act="relu6", se_act="relu", se_gate="sigmoid", skip=None,
                      training=False, momentum=0.1, eps=1e-5, pw=None, dw=None):
    """expand pw+BN+act -> dw+BN+act -> [SE] -> project pw+BN -> [+ x].

    expand/depthwise/project: [weight, bn_weight, bn_bias, running_mean, running_var]; expand
    may be empty (expansion ratio 1); se: [] or [reduce_w, reduce_b, expand_w, expand_b].
    skip None means "when stride == 1 and the channel counts match", as in MobileNetV2.
    pw/dw: the pointwise and depthwise implementations to compose (default: this module's);
    a backend without a fused block composes its own ops with this definition.
    """
    pw = pw or pwconv_bn_act
    dw = dw or dwconv_bn_act
    bn_kw = dict(training=training, momentum=momentum, eps=eps)
    if skip is None:
        skip = stride == 1 and x.shape[1] == project[0].shape[0]
    h = x
    if len(expand):
        h = pw(h, *expand, act=act, **bn_kw)
    h = dw(h, *depthwise, stride=stride, dilation=dilation, act=act, **bn_kw)
    if len(se):
        h = squeeze_excite(h, *se, act=se_act, gate=se_gate)
    return pw(h, *project, act="identity", residual=x if skip else None, **bn_kw)
