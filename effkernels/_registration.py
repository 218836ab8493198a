"""Fake (meta) kernels and autograd for the effkernels ops: the C++ ops declared in
csrc/ops.cpp (namespace `effkernels`, registered when the library is loaded) and the Triton
backend's ops with the same signatures (namespace `effkernels_triton`, effkernels/_triton_ops.py).

Each forward op's gradient is its *_backward op in the same namespace; the backward ops refuse
double backward with a clear error instead of silently returning zeros.
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from ._checks import conv_out_size



def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An empty tensor with t's (suggested) memory format, as the C++ kernels return."""
    shape = t.shape if shape is None else shape
    fmt = suggest_memory_format(t) if t.dim() == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def _stats(x, channels):
    mean = x.new_empty((channels,), dtype=_stat_dtype(x))
    return mean, torch.empty_like(mean)


# ---- fake kernels ---------------------------------------------------------------------------

def _dw_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
             dilation, act, training, eps):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    torch._check(weight.shape[0] == c, lambda: "dwconv_bn_act: weight must have C channels")
    out = _like(x, (n, c, conv_out_size(h, k, stride, padding, dilation),
                    conv_out_size(w, k, stride, padding, dilation)))
    return (out, *_stats(x, c))


def _dw_bwd_fake(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, padding, dilation,
                 act, training, eps):
    return _like(x), torch.empty_like(weight), torch.empty_like(bn_weight), \
        torch.empty_like(bn_bias)


def _pw_fake_for(namespace: str):
    """pwconv_bn_act's fake: (out, mean, var, conv_out). conv_out is y = conv1x1(x) where the
    backend keeps it for the backward -- the C++ CPU kernels in training with keep_conv_out
    (csrc/cpu/pwconv_bn_act.cpp): (N, Cout, H, W) channels_last in the statistics' dtype --
    else empty."""
    def fake(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, act, training,
             eps, keep_conv_out=True):
        n, _, h, w = x.shape
        cout = weight.shape[0]
        torch._check(weight.shape[1] == x.shape[1], lambda: "pwconv_bn_act: weight must have Cin")
        if training and keep_conv_out and namespace == "effkernels" and x.device.type == "cpu":
            conv_out = x.new_empty((n, h, w, cout), dtype=_stat_dtype(x)).permute(0, 3, 1, 2)
        else:
            conv_out = x.new_empty((0,), dtype=_stat_dtype(x))
        return (_like(x, (n, cout, h, w)), *_stats(x, cout), conv_out)
    return fake


def _pw_bwd_fake(grad_out, x, weight, bn_weight, bn_bias, mean, var, residual, act, training,
                 eps, conv_out=None):
    grad_residual = _like(residual) if residual is not None else x.new_empty((0,))
    return _like(x), torch.empty_like(weight), torch.empty_like(bn_weight), \
        torch.empty_like(bn_bias), grad_residual


def _mix_fake(x, weights, bn_weight, bn_bias, running_mean, running_var, stride, dilation, act,
              training, eps):
    n, c, h, w = x.shape
    out = _like(x, (n, c, (h - 1) // stride + 1, (w - 1) // stride + 1))
    return (out, *_stats(x, c))


def _mix_bwd_fake(grad_out, x, weights, bn_weight, bn_bias, mean, var, stride, dilation, act,
                  training, eps):
    return _like(x), [torch.empty_like(w) for w in weights], torch.empty_like(bn_weight), \
        torch.empty_like(bn_bias)


def _ir_inference_fake(x, expand, depthwise, se, project, stride, dilation, act, se_act,
                       se_gate, skip, eps):
    # A stage's weight may come in parts (all but its 4 BatchNorm tensors): a split 1x1 conv's
    # diagonal blocks, MixConv's kernels centred in the largest.
    n, _, h, w = x.shape
    k = max(t.shape[-1] for t in depthwise[:-4])
    hidden = sum(t.shape[0] for t in expand[:-4]) if len(expand) else x.shape[1]
    torch._check(sum(t.shape[0] for t in depthwise[:-4]) == hidden,
                 lambda: "inverted_residual_inference: depthwise weight must have the hidden "
                         "channels")
    torch._check(sum(t.shape[1] for t in project[:-4]) == hidden,
                 lambda: "inverted_residual_inference: project weight must take the hidden "
                         "channels")
    pad = dilation * (k - 1) // 2
    return _like(x, (n, sum(t.shape[0] for t in project[:-4]),
                     conv_out_size(h, k, stride, pad, dilation),
                     conv_out_size(w, k, stride, pad, dilation)))


def _ir_packed_fake(x, packed, out_channels, kernel_size, stride, dilation):
    n, _, h, w = x.shape
    pad = dilation * (kernel_size - 1) // 2
    return _like(x, (n, out_channels, conv_out_size(h, kernel_size, stride, pad, dilation),
                     conv_out_size(w, kernel_size, stride, pad, dilation)))


def _stem_ir_packed_fake(x, packed, out_channels, kernel_size, stride, dilation, stem_weight,
                         stem_bias, stem_bn_weight, stem_bn_bias, stem_running_mean,
                         stem_running_var, stem_stride, stem_padding, stem_eps, stem_act):
    k = stem_weight.shape[2:]
    stem = _like(x, (x.shape[0], stem_weight.shape[0],
                     *(conv_out_size(x.shape[2 + i], k[i], stem_stride[i], stem_padding[i], 1)
                       for i in range(2))))  # in x's memory format, as the output
    return _ir_packed_fake(stem, packed, out_channels, kernel_size, stride, dilation)


def _pw_pack_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, eps):
    # The size depends on the panel width the CPU's ISA selects: data-dependent here.
    return x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


def _pw_packed_fake(x, packed, out_channels, act, residual=None):
    n, _, h, w = x.shape
    return _like(x, (n, out_channels, h, w))


def _linear_inference_fake(x, weight, bias, act="identity"):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _conv_inference_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                         stride, padding, dilation, eps, act):
    k = weight.shape[2:]
    size = [conv_out_size(x.shape[2 + i], k[i], stride[i], padding[i], dilation[i])
            for i in range(2)]
    return _like(x, (x.shape[0], weight.shape[0], *size))


def _ir_pack_fake(x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate,
                  skip, eps):
    # The size depends on the panel widths the CPU's ISA selects: data-dependent here.
    return x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


# ---- autograd -------------------------------------------------------------------------------

def _setup(ctx, inputs, output, residual=None, n_params=6):
    """Shared by the three conv ops: inputs are (x, weight(s), bn_weight, bn_bias,
    running_mean, running_var, [residual,] *params), outputs (out, mean, var[, conv_out]); save
    what the backward op takes."""
    x, weight, bn_weight, bn_bias = inputs[:4]
    mean, var, *conv_out = output[1:]
    is_list = isinstance(weight, (list, tuple))
    weights = list(weight) if is_list else [weight]
    ctx.n_weights = len(weights) if is_list else None
    ctx.has_residual = residual is not None
    ctx.has_conv_out = bool(conv_out)
    extra = ([residual] if residual is not None else []) + conv_out
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, *extra, *weights)
    ctx.params = inputs[n_params:]
    ctx.mark_non_differentiable(mean, var, *conv_out)


def _backward_op(ctx, name):
    return getattr(getattr(torch.ops, ctx.namespace), f"{name}_backward")


def _saved(ctx):
    x, bn_weight, bn_bias, mean, var, *rest = ctx.saved_tensors
    residual = rest.pop(0) if ctx.has_residual else None
    ctx.conv_out = rest.pop(0) if ctx.has_conv_out else None
    weight = rest if ctx.n_weights is not None else rest[0]
    return x, weight, bn_weight, bn_bias, mean, var, residual


def _no_grads(ctx):
    """None for every input, the weight list's as a list (the structure autograd checks)."""
    weights = [None] * ctx.n_weights if ctx.n_weights is not None else None
    return (None, weights) + (None,) * (len(ctx.needs_input_grad) - 2)


def _dw_backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # no gradient reached out (grads are not materialised)
        return _no_grads(ctx)
    x, weight, bn_weight, bn_bias, mean, var, _ = _saved(ctx)
    grads = _backward_op(ctx, "dwconv_bn_act")(
        grad_out, x, weight, bn_weight, bn_bias, mean, var, *ctx.params)
    return (*grads, None, None) + (None,) * len(ctx.params)


def _mix_backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # no gradient reached out (grads are not materialised)
        return _no_grads(ctx)
    x, weights, bn_weight, bn_bias, mean, var, _ = _saved(ctx)
    grads = _backward_op(ctx, "mixconv_bn_act")(
        grad_out, x, weights, bn_weight, bn_bias, mean, var, *ctx.params)
    return (*grads, None, None) + (None,) * len(ctx.params)


def _pw_setup(ctx, inputs, output):
    # inputs[7:10]: act, training, eps (the backward's params); inputs[10]: keep_conv_out
    _setup(ctx, inputs[:10], output, residual=inputs[6], n_params=7)


def _pw_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_conv_out):
    if grad_out is None:  # no gradient reached out (grads are not materialised)
        return _no_grads(ctx)
    x, weight, bn_weight, bn_bias, mean, var, residual = _saved(ctx)
    # conv_out: the forward's y (empty where the backend recomputes it).
    dx, dw, dg, db, dres = _backward_op(ctx, "pwconv_bn_act")(
        grad_out, x, weight, bn_weight, bn_bias, mean, var, residual, *ctx.params, ctx.conv_out)
    return (dx, dw, dg, db, None, None, dres if residual is not None else None) + \
        (None,) * (len(ctx.needs_input_grad) - 7)  # act, training, eps, keep_conv_out


def _refuse_double_backward(qualname):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{qualname}: double backward (the gradient of a gradient) is not supported; use "
            "the reference backend (effkernels.backend('reference')) for it")
    return backward


_FAKES = {
    "dwconv_bn_act": _dw_fake, "dwconv_bn_act_backward": _dw_bwd_fake,
    "pwconv_bn_act_backward": _pw_bwd_fake,
    "mixconv_bn_act": _mix_fake, "mixconv_bn_act_backward": _mix_bwd_fake,
}
_AUTOGRAD = {
    "dwconv_bn_act": (_dw_backward, _setup),
    "pwconv_bn_act": (_pw_backward, _pw_setup),
    "mixconv_bn_act": (_mix_backward, _setup),
}


# ---- autocast ---------------------------------------------------------------------------------

# The arguments autocast casts to its lower-precision dtype: the input, the conv weights and the
# residual. BatchNorm parameters and running statistics stay as they are (fp32 under AMP, as
# nn.BatchNorm2d keeps them), so the in-place running-statistics update lands in the caller's
# tensors; torch.library.register_autocast would cast every floating tensor argument.
_AUTOCAST_ARGS = {"dwconv_bn_act": (0, 1), "pwconv_bn_act": (0, 1, 6), "mixconv_bn_act": (0, 1)}
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_cast(arg, device_type: str, dtype: torch.dtype):
    if isinstance(arg, (list, tuple)):
        return [_autocast_cast(a, device_type, dtype) for a in arg]
    if isinstance(arg, torch.Tensor) and arg.device.type == device_type \
            and arg.dtype in _AUTOCAST_DTYPES and arg.dtype != dtype:
        return arg.to(dtype)
    return arg


def _register_autocast(namespace: str, name: str, device_type: str) -> None:
    positions = _AUTOCAST_ARGS[name]
    op = getattr(getattr(torch.ops, namespace), name).default
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [_autocast_cast(a, device_type, dtype) if i in positions else a
                for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*args)

    if op.has_kernel_for_dispatch_key(getattr(torch._C.DispatchKey, key)):
        op.py_kernels.pop(getattr(torch._C.DispatchKey, key), None)
    op.py_impl(getattr(torch._C.DispatchKey, key))(run)  # the Python dispatcher (tracing)
    lib = _autocast_libs.setdefault(namespace, torch.library.Library(namespace, "IMPL"))
    lib.impl(name, lambda _keyset, *args: run(*args), key, with_keyset=True)


_autocast_libs = {}


def _refuse_inference_grad(name):
    def backward(ctx, grad_out):
        raise RuntimeError(
            f"{name} is inference-only and has no gradient; effkernels.ops.inverted_residual "
            "uses the differentiable block when a gradient is needed")
    return backward


def _no_context(ctx, inputs, output):
    pass


def register(namespace: str) -> None:
    """Fake kernels, autograd and autocast for the conv ops of `namespace` (same
    signatures)."""
    inference_ops = {"inverted_residual_inference": _ir_inference_fake,  # C++ only
                     "inverted_residual_pack": _ir_pack_fake,
                     "inverted_residual_packed": _ir_packed_fake,
                     "stem_inverted_residual_packed": _stem_ir_packed_fake,
                     "pwconv_bn_act_pack": _pw_pack_fake,
                     "pwconv_bn_act_packed": _pw_packed_fake,
                     "linear_inference": _linear_inference_fake,
                     "conv_bn_act_inference": _conv_inference_fake}
    for op, fake in inference_ops.items():
        if namespace == "effkernels" and hasattr(torch.ops.effkernels, op):
            name = f"{namespace}::{op}"
            torch.library.register_fake(name, fake)
            torch.library.register_autograd(name, _refuse_inference_grad(name),
                                            setup_context=_no_context)
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_fake(f"{namespace}::pwconv_bn_act", _pw_fake_for(namespace))
    for name, (backward, setup) in _AUTOGRAD.items():
        def setup_context(ctx, inputs, output, setup=setup):
            ctx.namespace = namespace
            # The non-differentiable outputs (mean, var, conv_out) get no gradient: autograd
            # would otherwise fill a zero tensor for each per call (conv_out: the size of the
            # fp32 output, ~5% of a CPU training step in torch.profiler).
            ctx.set_materialize_grads(False)
            setup(ctx, inputs, output)
        torch.library.register_autograd(f"{namespace}::{name}", backward,
                                        setup_context=setup_context)
        torch.library.register_autograd(f"{namespace}::{name}_backward",
                                        _refuse_double_backward(f"{namespace}::{name}_backward"))
    for name in _AUTOCAST_ARGS:
        for device_type in ("cpu", "cuda"):
            _register_autocast(namespace, name, device_type)
