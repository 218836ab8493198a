"""The glue between torch.nn parameter holders (nn.Conv2d, nn.BatchNorm2d) and the effkernels
ops: BatchNorm semantics as nn.BatchNorm2d has them (num_batches_tracked, momentum=None,
track_running_stats=False, affine=False), TF 'same' padding, torch.autocast, and MixNet's split
convolutions. Every module of effkernels.nn computes through these functions."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from . import _sync

ConvLike = Union[nn.Conv2d, nn.ModuleList, nn.ModuleDict]


class BNArgs(NamedTuple):
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    training: bool  # normalise with batch statistics
    momentum: float
    eps: float


def bn_args(bn: nn.BatchNorm2d) -> BNArgs:
    """What nn.BatchNorm2d.forward would pass to F.batch_norm (and its num_batches_tracked
    increment, done here as there)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return BNArgs(bn.weight, bn.bias, bn.running_mean if keep_running else None,
                  bn.running_var if keep_running else None, use_batch_stats, momentum, bn.eps)


def bn_kwargs(args: BNArgs) -> dict:
    return dict(training=args.training, momentum=args.momentum, eps=args.eps)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolutions run in: autocast's when it is on for x's device."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) \
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return x.dtype


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def convs(conv: ConvLike) -> List[nn.Conv2d]:
    """The convolutions of a plain or split (MixNet's MixedConv2d-style) convolution."""
    if isinstance(conv, nn.Conv2d):
        return [conv]
    return [m for m in conv.children()]


def pointwise_weight(conv: ConvLike) -> torch.Tensor:
    """(Cout, Cin, 1, 1). A split 1x1 convolution (channel groups, each its own 1x1 conv, as
    MixNet's grouped pointwise) is the block-diagonal weight: one GEMM instead of split/cat.
    The CPU kernel skips each panel's all-zero input channels (for finite x), so it does the
    grouped convolution's FMAs, not the dense ones."""
    parts = convs(conv)
    if len(parts) == 1 and parts[0].groups > 1:
        return block_diagonal(list(parts[0].weight.chunk(parts[0].groups, dim=0)))
    return block_diagonal([p.weight for p in parts])


def depthwise_weight(conv: ConvLike) -> torch.Tensor:
    """(C, 1, k, k). A split depthwise convolution (MixNet's MixConv: channel groups with their
    own odd kernel sizes, each padded by d*(k_i-1)//2) is one k_max x k_max depthwise weight,
    each group's kernel centred in zeros: the same convolution for finite inputs (a zero tap
    adds +0; an Inf/NaN it reaches makes NaN, as any dense weight with zeros would)."""
    parts = convs(conv)
    if len(parts) == 1:
        return parts[0].weight
    kmax = max(p.kernel_size[0] for p in parts)
    padded = []
    for p in parts:
        o = (kmax - p.kernel_size[0]) // 2
        padded.append(F.pad(p.weight, (o, o, o, o)))
    return torch.cat(padded, 0)


def block_diagonal(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(weights) == 1:
        return weights[0]
    return torch.block_diag(*[w.flatten(1) for w in weights])[:, :, None, None]


def same_padding(size: int, k: int, stride: int, dilation: int):
    """TF 'SAME' padding (before, after) of one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, k: int, stride: int, dilation: int) -> torch.Tensor:
    """x padded for TF 'SAME' (asymmetric: the extra row/column at the bottom/right)."""
    (top, bottom), (left, right) = (same_padding(x.shape[d], k, stride, dilation)
                                    for d in (2, 3))
    return F.pad(x, (left, right, top, bottom))


def depthwise(x: torch.Tensor, conv: ConvLike, bn: nn.BatchNorm2d, act: str,
              same: bool = False) -> torch.Tensor:
    """Depthwise conv (plain, or mixed kernel sizes over channel groups) + BN + act.

    same=True (TF 'SAME', stride 2 in timm's tf_* models): the input is padded asymmetrically
    per kernel size, so MixConv groups run as one dwconv_bn_act each on their channel slice
    (BatchNorm is per channel: slices of its parameters and running buffers are exact)."""
    parts = convs(conv)
    dtype = compute_dtype(x)
    first = parts[0]
    stride, dilation = first.stride[0], first.dilation[0]
    weights = [cast(p.weight, dtype) for p in parts]
    x = cast(x, dtype)
    bnp = bn_args(bn)
    group = _sync.group_of(bn)
    if group is not None:
        if same:
            raise NotImplementedError("synchronised BatchNorm with TF 'same' padding in a "
                                      "stride-2 depthwise layer is not supported")
        pads = [first.padding[0] if len(parts) == 1 else dilation * (w.shape[-1] - 1) // 2
                for w in weights]

        def conv_fn(x_, ws):
            sizes = [w.shape[0] for w in ws]
            return torch.cat([F.conv2d(t, w, None, stride, p, dilation, groups=w.shape[0])
                              for t, w, p in zip(x_.split(sizes, 1), ws, pads)], 1)

        def op_eval(x_, ws, g, b, m, v, r):
            if len(ws) > 1:
                return ops.mixconv_bn_act(x_, list(ws), g, b, m, v, stride=stride,
                                          dilation=dilation, act=act, training=False,
                                          eps=bnp.eps)
            return ops.dwconv_bn_act(x_, ws[0], g, b, m, v, stride=stride, padding=pads[0],
                                     dilation=dilation, act=act, training=False, eps=bnp.eps)

        return _sync.conv_bn_act(conv_fn, op_eval, group, x, weights, *bnp[:4],
                                 bnp.momentum, bnp.eps)
    if not same and len(parts) > 1:
        return ops.mixconv_bn_act(x, weights, bnp.weight, bnp.bias, bnp.running_mean,
                                  bnp.running_var, stride=stride, dilation=dilation, act=act,
                                  **bn_kwargs(bnp))
    if not same:
        return ops.dwconv_bn_act(x, weights[0], bnp.weight, bnp.bias, bnp.running_mean,
                                 bnp.running_var, stride=stride, padding=first.padding[0],
                                 dilation=dilation, act=act, **bn_kwargs(bnp))
    outs, start = [], 0
    for w in weights:
        sl = slice(start, start + w.shape[0])
        start = sl.stop
        part = [None if t is None else t[sl] for t in bnp[:4]]
        outs.append(ops.dwconv_bn_act(pad_same(x[:, sl], w.shape[-1], stride, dilation), w,
                                      *part, stride=stride, padding=0, dilation=dilation,
                                      act=act, **bn_kwargs(bnp)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def pointwise(x: torch.Tensor, conv: ConvLike, bn: nn.BatchNorm2d, act: str,
              residual: Optional[torch.Tensor] = None,
              packed_cache: Optional[dict] = None) -> torch.Tensor:
    """1x1 conv (plain or split into groups) + BN [+ residual] + act. packed_cache: the caller's
    dict for weights packed once (effkernels.nn.prepack_for_inference), used in CPU inference
    of a plain conv without casts."""
    dtype = compute_dtype(x)
    bnp = bn_args(bn)
    group = _sync.group_of(bn)
    if (packed_cache is not None and not bnp.training and group is None
            and type(conv) is nn.Conv2d and x.dtype == dtype == conv.weight.dtype
            and (residual is None or residual.dtype == dtype)):
        out = ops._prepacked_pointwise(packed_cache, x, conv.weight, bnp.weight, bnp.bias,
                                       bnp.running_mean, bnp.running_var, act, residual,
                                       bnp.eps)
        if out is not None:
            return out
    if group is not None:
        parts = convs(conv)
        weights = [cast(w, dtype) for w in (parts[0].weight.chunk(parts[0].groups, 0)
                                            if len(parts) == 1 else [p.weight for p in parts])]

        def op_eval(x_, ws, g, b, m, v, r):
            return ops.pwconv_bn_act(x_, block_diagonal(ws), g, b, m, v, act=act, residual=r,
                                     training=False, eps=bnp.eps)

        return _sync.conv_bn_act(lambda x_, ws: F.conv2d(x_, block_diagonal(ws)), op_eval,
                                 group, cast(x, dtype), weights, *bnp[:4], bnp.momentum,
                                 bnp.eps, residual=cast(residual, dtype))
    return ops.pwconv_bn_act(cast(x, dtype), cast(pointwise_weight(conv), dtype), bnp.weight,
                             bnp.bias, bnp.running_mean, bnp.running_var, act=act,
                             residual=cast(residual, dtype), **bn_kwargs(bnp))


def dense(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str,
          same: bool = False) -> torch.Tensor:
    """A k x k convolution that is neither depthwise nor 1x1 (stems): in inference with few
    input channels effkernels::conv_bn_act_inference (ops._conv_bn_act_inference), else torch's
    conv, then BN and act."""
    padding = conv.padding
    if same:
        x = pad_same(x, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        padding = (0, 0)
    bnp = bn_args(bn)
    group = _sync.group_of(bn)

    def conv_fn(x_, ws):
        return F.conv2d(x_, ws[0], conv.bias, conv.stride, padding, conv.dilation, conv.groups)

    if group is not None:
        def op_eval(x_, ws, g, b, m, v, r):
            return reference.activation(act, F.batch_norm(conv_fn(x_, ws), m, v, g, b, False,
                                                          0.0, bnp.eps))

        return _sync.conv_bn_act(conv_fn, op_eval, group, x, [conv.weight], *bnp[:4],
                                 bnp.momentum, bnp.eps)
    foldable = _foldable(x, conv, bnp, act)
    if foldable and _direct_conv(conv, bnp, padding):
        # Few input channels (the stems): effkernels' direct convolution, BN and act fused.
        y = ops._conv_bn_act_inference(x, conv.weight, conv.bias, bnp[:4], conv.stride,
                                       padding, conv.dilation, bnp.eps, act)
        if y is not None:
            return y
    if foldable:
        # Inference: BN folded into the convolution (scale into the weights, shift as its
        # bias) and the activation in place: one pass over the output instead of three (the
        # stem's output is the largest tensor of these models; ONNX Runtime fuses it so too).
        scale = torch.rsqrt(bnp.running_var + bnp.eps)
        if bnp.weight is not None:
            scale = scale * bnp.weight
        shift = -bnp.running_mean * scale
        if bnp.bias is not None:
            shift = shift + bnp.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        y = F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift, conv.stride, padding,
                     conv.dilation, conv.groups)
        return _INPLACE_ACT[act](y)
    y = conv_fn(x, [conv.weight])
    y = F.batch_norm(y, bnp.running_mean, bnp.running_var, bnp.weight, bnp.bias, bnp.training,
                     bnp.momentum, bnp.eps)
    return reference.activation(act, y)


_INPLACE_ACT = {"identity": lambda y: y, "relu": F.relu_,
                "relu6": lambda y: F.hardtanh_(y, 0.0, 6.0),
                "hswish": lambda y: F.hardswish(y, inplace=True),
                "silu": lambda y: F.silu(y, inplace=True)}


def _direct_conv(conv: nn.Conv2d, bnp: BNArgs, padding) -> bool:
    """A foldable dense() call asks effkernels::conv_bn_act_inference (whose own operand
    checks come after): one group, zero padding given as a tuple, BN with weight and bias.
    blocks._StemReplay fuses a stem only where this holds, so one predicate serves both."""
    return (conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(padding, tuple)
            and bnp.weight is not None and bnp.bias is not None)


def _foldable(x: torch.Tensor, conv: nn.Conv2d, bnp: BNArgs, act: str) -> bool:
    """dense() in eval mode with no gradient recorded, fp32/fp64 (folding into bf16/fp16
    weights would round them once more), an activation with an in-place form, and no dispatch
    mode or transform (effkernels.profile and FlopCounterMode see the layer as written, conv +
    BN + act). Under torch.compile too, so that a compiled model computes what the eager one
    does."""
    if bnp.training or bnp.running_mean is None or act not in _INPLACE_ACT:
        return False
    if not (torch.compiler.is_compiling() or ops._plain_context()):
        return False
    if x.dtype not in (torch.float32, torch.float64) or conv.weight.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(
            t is not None and t.requires_grad for t in (conv.weight, conv.bias, bnp.weight,
                                                        bnp.bias))):
        return False
    return True


def conv_bn_act(x: torch.Tensor, conv: ConvLike, bn: nn.BatchNorm2d, act: str,
                same: bool = False, residual: Optional[torch.Tensor] = None,
                packed_cache: Optional[dict] = None) -> torch.Tensor:
    """ACT(BN(conv(x))) [+ residual], through the matching effkernels op: 1x1 ->
    pwconv_bn_act (which fuses the residual when act is identity; packed_cache: see
    pointwise), depthwise -> dwconv/mixconv_bn_act, anything else -> dense()."""
    first = convs(conv)[0]
    k, stride = first.kernel_size, first.stride
    if k == (1, 1) and stride == (1, 1) and first.padding == (0, 0) and first.bias is None:
        if act == "identity":
            return pointwise(x, conv, bn, act, residual, packed_cache)
        out = pointwise(x, conv, bn, act, packed_cache=packed_cache)
    elif first.groups == first.in_channels == first.out_channels and k[0] == k[1] \
            and first.bias is None:
        out = depthwise(x, conv, bn, act, same)
    elif isinstance(conv, nn.Conv2d):
        out = dense(x, conv, bn, act, same)
    else:
        raise ValueError(f"conv_bn_act: a split convolution must be 1x1 or depthwise; got "
                         f"{first}")
    return out if residual is None else out + residual


def squeeze_excite(x: torch.Tensor, reduce: nn.Conv2d, expand: nn.Conv2d, act: str,
                   gate: str) -> torch.Tensor:
    dtype = x.dtype
    return reference.squeeze_excite(x, cast(reduce.weight, dtype), cast(reduce.bias, dtype),
                                    cast(expand.weight, dtype), cast(expand.bias, dtype),
                                    act=act, gate=gate)
