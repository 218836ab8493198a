"""The public functional API. Each function checks its arguments, picks the backend for the
input (see effkernels.backend), runs the op and, in training mode, updates the running
statistics in place exactly as F.batch_norm does. Gradients flow to x, the conv weights,
bn_weight, bn_bias (and residual) in both modes.

Edge cases follow PyTorch: an empty batch (N=0) gives an empty result and zero parameter
gradients, also in training mode (F.batch_norm accepts it and leaves the running statistics
alone); an empty C, H or W is refused (F.conv2d refuses it); any strides, including
overlapping ones (x.expand along N), are accepted.

torch.autocast: under autocast for x's device the input, conv weights, residual and SE
parameters are cast to autocast's dtype, the BatchNorm parameters and running statistics are
not (fp32 under AMP; the running statistics are updated in place), and the op runs with
autocast off. The same rule is registered for direct torch.ops.effkernels calls
(_registration.py); torch.library.register_autocast is not used because it casts every floating
argument, running statistics included.

Export: torch.export keeps the ops as the custom ops torch.ops.effkernels.* (fake kernels in
_registration.py), for runtimes that have them (AOTInductor with this library loaded). ONNX has
no such ops, so while torch.onnx.export traces (torch.onnx.is_in_onnx_export(): the
TorchScript-based exporter, dynamo=False, and the capture step of the dynamo exporter) every
op takes the reference implementation (effkernels.reference: F.conv2d, F.batch_norm and the
activations), which the exporters translate into standard ONNX ops (Conv,
BatchNormalization, Relu/Clip/HardSwish/HardSigmoid/Sigmoid, Add, ...). That needs no
per-op translation functions (custom_translation_table needs onnxscript and duplicates
the reference's definition) and cannot drift from the oracle the tests use.
"""
from __future__ import annotations

import functools
import inspect
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _backend, _checks, reference

_ops = None  # torch.ops.effkernels, bound on first use


def _cpp():
    global _ops
    if _ops is None:
        _ops = torch.ops.effkernels
    return _ops


# ---- torch.autocast ------------------------------------------------------------------------

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _to(t, dtype):
    """t (a tensor, a list of them, or None) in dtype; other dtypes (fp64, ints) untouched."""
    if isinstance(t, (list, tuple)):
        return [_to(u, dtype) for u in t]
    if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_DTYPES and t.dtype != dtype:
        return t.to(dtype)
    return t


def _stage_weight(stage, dtype):
    """An inverted-residual stage [weight, bn_weight, bn_bias, running_mean, running_var]: the
    conv weight cast, the BatchNorm tensors kept."""
    stage = list(stage)
    return [_to(stage[0], dtype), *stage[1:]] if stage else stage


def _autocast(**casts):
    """Under torch.autocast for x's device, runs the op in autocast's dtype: the arguments
    named in `casts` (input, conv weights, residual, SE) are cast, the BatchNorm parameters and
    running statistics are left alone (fp32 under AMP, updated in place), and the op itself
    runs with autocast off, so every backend computes the same thing. The C++ ops have the same
    rule registered for direct torch.ops.effkernels calls (effkernels/_registration.py)."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def op(x, *args, **kwargs):
            device = x.device.type if isinstance(x, torch.Tensor) else None
            if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device) \
                    or x.dtype not in _AUTOCAST_DTYPES:
                return fn(x, *args, **kwargs)
            dtype = torch.get_autocast_dtype(device)
            bound = signature.bind(x, *args, **kwargs)
            for name, cast in casts.items():
                if name in bound.arguments:
                    bound.arguments[name] = cast(bound.arguments[name], dtype)
            with torch.autocast(device, enabled=False):
                return fn(*bound.args, **bound.kwargs)
        return op
    return wrap


def _affine(bn_weight, bn_bias, channels: int, x: torch.Tensor):
    """BatchNorm(affine=False) is the affine case with weight 1 and bias 0."""
    if bn_weight is None:
        bn_weight = torch.ones(channels, device=x.device, dtype=x.dtype)
    if bn_bias is None:
        bn_bias = torch.zeros(channels, device=x.device, dtype=x.dtype)
    return bn_weight, bn_bias


def _dense_bn(bn_weight, bn_bias, running_mean, running_var, training: bool):
    """BN parameters for the reference path (F.batch_norm), made contiguous. PyTorch's CPU
    batch_norm backward (torch 2.14) reads non-contiguous weight, and in eval mode
    non-contiguous running statistics, wrongly for channels_last inputs (wrong or garbage
    gradients); tests/test_edge_cases.py::test_noncontiguous_parameters. In training mode the
    running statistics are updated in place, so they stay the caller's tensors (their
    contiguity does not matter there)."""
    def dense(t):
        return t if t is None else t.contiguous()

    if not training:
        running_mean, running_var = dense(running_mean), dense(running_var)
    return dense(bn_weight), dense(bn_bias), running_mean, running_var


@torch.no_grad()
def _update_running(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance."""
    if running_mean is None or count == 0:
        return
    unbiased = var * (count / (count - 1))
    running_mean.copy_(running_mean * (1 - momentum) + mean.to(running_mean.dtype) * momentum)
    running_var.copy_(running_var * (1 - momentum) + unbiased.to(running_var.dtype) * momentum)


def _resolve(x: torch.Tensor, op: str) -> str:
    """The backend for this call; during torch.onnx.export, the reference (see the module
    docstring)."""
    if not torch.compiler.is_dynamo_compiling() and torch.onnx.is_in_onnx_export():
        return "reference"
    return _backend.resolve(x, op)


# Straight to the backend kernel, below Autograd, for calls autograd would not record: saves
# torch.library's Python autograd wrapper (~6 us of a ~24 us call on a small tensor; the
# batch-1 models make ~50 calls). Only for plain eager tensors with no transform (vmap), Python
# dispatch mode (FlopCounterMode, FakeTensorMode) or compiler involved, which all need the full
# dispatch. While torch.profiler records, they dispatch in full (_kernel_call), so that the
# profile shows them. Autocast was applied in Python already (_autocast). nn.Parameter counts as plain
# (a marker subclass with torch function handling disabled): the models' weights are
# Parameters, so without it no module call took this path.
_KERNEL_KEYS = {}
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(t, grad: bool) -> bool:
    """t is not a tensor, or a plain one autograd would not record."""
    if type(t) in _PLAIN_TYPES:
        return not (grad and t.requires_grad)
    return not isinstance(t, torch.Tensor)


def _plain_context() -> bool:
    """No compiler, Python dispatch mode or functorch transform active (see above)."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _direct(args) -> bool:
    if not _plain_context():
        return False
    grad = torch.is_grad_enabled()
    for a in args:  # plain loops: this runs ~50 times per batch-1 forward
        if type(a) is list or type(a) is tuple:
            for t in a:
                if not _plain(t, grad):
                    return False
        elif not _plain(a, grad):
            return False
    return True


def _kernel_key(impl: str) -> torch._C.DispatchKeySet:
    if impl not in _KERNEL_KEYS:
        key = torch._C.DispatchKey.CPU if impl == "cpu" else torch._C.DispatchKey.CUDA
        _KERNEL_KEYS[impl] = torch._C.DispatchKeySet(key)
    return _KERNEL_KEYS[impl]


def _kernel_call(op, impl: str, *args):
    """op (an OpOverloadPacket of effkernels) on backend impl's kernel, below Autograd. While a
    profiler records, through the full dispatch instead: redispatch skips RecordFunction, so
    torch.profiler would not see the op (same kernel, same result)."""
    if torch._C._autograd._profiler_enabled():
        return op.default(*args)
    return op.default.redispatch(_kernel_key(impl), *args)


def _eval_direct(name: str, x, args_of, *, api_op: Optional[str] = None):
    """Eval-mode calls that would go straight to a CPU/CUDA kernel (see _direct) skip the
    Python argument checks: the C++ op checks the same things (op_checks.cpp), and eval has no
    side effect to undo, so on any error this returns None and the caller's checked path runs,
    raising the Python API's error (or, should the Python checks pass, the kernel's again).
    The checks cost ~5 of a small call's ~20 us (`python -m bench.spread`). args_of() builds
    the op's arguments; None: take the checked path. `api_op`: the public op that C++ op
    `name` serves in inference (inverted_residual -> the single-output
    inverted_residual_inference, when this build has it for x's device)."""
    if type(x) is not torch.Tensor:
        return None
    try:
        args = args_of()
        if not _direct(args):
            return None
        impl = _resolve(x, api_op or name)
        if impl not in ("cpu", "cuda"):
            return None
        if api_op is not None and (not _backend.fused_inference(x.device.type)
                                   or _composes_block(impl, x.device.type)):
            return None
        out = _kernel_call(getattr(_cpp(), name), impl, *args)
        return out if api_op is not None else out[0]
    except Exception:  # noqa: BLE001 - the checked path names the bad argument
        return None


def _call(impl: str, name: str, *args):
    if impl in ("cpu", "cuda"):
        op = getattr(_cpp(), name)
        if _direct(args):
            return _kernel_call(op, impl, *args)
        return op(*args)
    if impl == "triton":
        from . import _triton_backend

        return getattr(_triton_backend.ops(), name)(*args)
    raise AssertionError(impl)


@_autocast(x=_to, weight=_to)
def dwconv_bn_act(x: torch.Tensor, weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
                  bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                  running_var: Optional[torch.Tensor], *, stride: int = 1,
                  padding: Optional[int] = None, dilation: int = 1, act: str = "relu6",
                  training: bool = False, momentum: float = 0.1, eps: float = 1e-5
                  ) -> torch.Tensor:
    """ACT(F.batch_norm(F.conv2d(x, weight, None, stride, padding, dilation, groups=C),
    running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)).

    weight: (C, 1, k, k), 1 <= k <= 11; stride 1 or 2; padding None = dilation*(k-1)//2.
    The output has x's memory format (contiguous or channels_last).
    """
    op = "dwconv_bn_act"
    if not training:
        out = _eval_direct(op, x, lambda: (
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
            dilation * (weight.shape[-1] - 1) // 2 if padding is None else padding, dilation,
            act, False, eps))
        if out is not None:
            return out
    _checks.tensor(op, "x", x, 4)
    _checks.nonempty(op, x)
    channels = x.shape[1]
    k = weight.shape[-1] if isinstance(weight, torch.Tensor) else 0
    if padding is None:
        padding = dilation * (k - 1) // 2
    _checks.depthwise(op, x, weight, channels, stride, padding, dilation)
    _checks.bn(op, x, channels, bn_weight, bn_bias, running_mean, running_var, training)
    _checks.act(op, "act", act)
    ho = _checks.conv_out_size(x.shape[2], k, stride, padding, dilation)
    wo = _checks.conv_out_size(x.shape[3], k, stride, padding, dilation)
    count = x.shape[0] * ho * wo
    _checks.training_count(op, count, training)
    impl = _resolve(x, op)
    if impl == "reference":
        return reference.dwconv_bn_act(
            x, weight, *_dense_bn(bn_weight, bn_bias, running_mean, running_var, training),
            stride=stride, padding=padding, dilation=dilation, act=act, training=training,
            momentum=momentum, eps=eps)
    bn_weight, bn_bias = _affine(bn_weight, bn_bias, channels, x)
    out, mean, var = _call(impl, op, x, weight, bn_weight, bn_bias, running_mean, running_var,
                           stride, padding, dilation, act, training, eps)
    if training:
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return out


@_autocast(x=_to, weight=_to, residual=_to)
def pwconv_bn_act(x: torch.Tensor, weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
                  bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                  running_var: Optional[torch.Tensor], *, act: str = "relu6",
                  residual: Optional[torch.Tensor] = None, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """ACT(BN(conv1x1(x)) + residual); weight (Cout, Cin, 1, 1); residual (N, Cout, H, W)."""
    op = "pwconv_bn_act"
    if not training:
        out = _eval_direct(op, x, lambda: (x, weight, bn_weight, bn_bias, running_mean,
                                           running_var, residual, act, False, eps))
        if out is not None:
            return out
    _checks.tensor(op, "x", x, 4)
    _checks.nonempty(op, x)
    _checks.tensor(op, "weight", weight, 4, like=x)
    cout, cin = weight.shape[0], weight.shape[1]
    if cin != x.shape[1] or weight.shape[2] != 1 or weight.shape[3] != 1 or cout < 1:
        raise ValueError(f"{op}: weight must have shape (Cout, Cin, 1, 1) with Cin == "
                         f"{x.shape[1]} and Cout >= 1; got {tuple(weight.shape)}")
    if residual is not None:
        _checks.tensor(op, "residual", residual, 4, like=x)
        expected = (x.shape[0], cout, x.shape[2], x.shape[3])
        if tuple(residual.shape) != expected:
            raise ValueError(f"{op}: residual must have shape {expected}; got "
                             f"{tuple(residual.shape)}")
    _checks.bn(op, x, cout, bn_weight, bn_bias, running_mean, running_var, training)
    _checks.act(op, "act", act)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    _checks.training_count(op, count, training)
    impl = _resolve(x, op)
    if impl == "reference":
        return reference.pwconv_bn_act(x, weight, *_dense_bn(bn_weight, bn_bias, running_mean,
                                                             running_var, training),
                                       act=act, residual=residual, training=training,
                                       momentum=momentum, eps=eps)
    bn_weight, bn_bias = _affine(bn_weight, bn_bias, cout, x)
    # The CPU kernels keep y = conv1x1(x) for the backward (conv_out) only where one may run.
    keep = training and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bn_weight, bn_bias, residual))
    out, mean, var = _call(impl, op, x, weight, bn_weight, bn_bias, running_mean, running_var,
                           residual, act, training, eps, keep)[:3]
    if training:
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return out


@_autocast(x=_to, weights=_to)
def mixconv_bn_act(x: torch.Tensor, weights: Sequence[torch.Tensor],
                   bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], *,
                   stride: int = 1, dilation: int = 1, act: str = "relu6",
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5
                   ) -> torch.Tensor:
    """MixNet's mixed depthwise conv + BN + act: channel group i (C_i consecutive channels) is
    convolved with weights[i] of shape (C_i, 1, k_i, k_i), padded by dilation*(k_i-1)//2; one
    BatchNorm over all C channels. sum(C_i) must equal C."""
    op = "mixconv_bn_act"
    if not training:
        out = _eval_direct(op, x, lambda: (x, list(weights), bn_weight, bn_bias, running_mean,
                                           running_var, stride, dilation, act, False, eps))
        if out is not None:
            return out
    _checks.tensor(op, "x", x, 4)
    _checks.nonempty(op, x)
    weights = list(weights)
    if not weights:
        raise ValueError(f"{op}: weights must hold at least one (C_i, 1, k_i, k_i) tensor")
    total = 0
    for i, w in enumerate(weights):
        _checks.tensor(op, f"weights[{i}]", w, 4, like=x)
        k = w.shape[-1]
        if k % 2 == 0:
            raise ValueError(f"{op}: weights[{i}] must have an odd kernel size (the groups' "
                             f"outputs must align); got {k}")
        _checks.depthwise(op, x, w, w.shape[0], stride, dilation * (k - 1) // 2, dilation,
                          name=f"weights[{i}]")
        total += w.shape[0]
    if total != x.shape[1]:
        raise ValueError(f"{op}: the weights' channel counts must sum to C == {x.shape[1]}; "
                         f"got {[w.shape[0] for w in weights]}")
    channels = x.shape[1]
    _checks.bn(op, x, channels, bn_weight, bn_bias, running_mean, running_var, training)
    _checks.act(op, "act", act)
    ho = (x.shape[2] - 1) // stride + 1
    wo = (x.shape[3] - 1) // stride + 1
    count = x.shape[0] * ho * wo
    _checks.training_count(op, count, training)
    impl = _resolve(x, op)
    if impl == "reference":
        return reference.mixconv_bn_act(x, weights, *_dense_bn(bn_weight, bn_bias, running_mean,
                                                               running_var, training),
                                        stride=stride, dilation=dilation, act=act,
                                        training=training, momentum=momentum, eps=eps)
    bn_weight, bn_bias = _affine(bn_weight, bn_bias, channels, x)
    out, mean, var = _call(impl, op, x, weights, bn_weight, bn_bias, running_mean, running_var,
                           stride, dilation, act, training, eps)
    if training:
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return out


@_autocast(x=_to, expand=_stage_weight, depthwise=_stage_weight, project=_stage_weight,
           se=_to)
def inverted_residual(x: torch.Tensor, expand: Sequence[torch.Tensor],
                      depthwise: Sequence[torch.Tensor], se: Sequence[torch.Tensor],
                      project: Sequence[torch.Tensor], *, stride: int = 1, dilation: int = 1,
                      act: str = "relu6", se_act: str = "relu", se_gate: str = "sigmoid",
                      skip: Optional[bool] = None, training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """The inverted-residual block: expand 1x1+BN+act -> depthwise kxk+BN+act -> [SE] ->
    project 1x1+BN -> [+ x].

    expand, depthwise, project: [weight, bn_weight, bn_bias, running_mean, running_var]
    (expand empty for expansion ratio 1); se: [] or [reduce_weight, reduce_bias,
    expand_weight, expand_bias] (1x1 convs with bias; SE computes x * se_gate(expand(
    se_act(reduce(mean_hw(x)))))). skip None: add x when stride == 1 and Cin == Cout.
    """
    op = "inverted_residual"
    if not training:
        out = _eval_direct("inverted_residual_inference", x, lambda: (
            x, list(expand), list(depthwise), list(se), list(project), stride, dilation, act,
            se_act, se_gate,
            stride == 1 and x.shape[1] == project[0].shape[0] if skip is None else skip, eps),
            api_op=op)
        if out is not None:
            return out
    _checks.tensor(op, "x", x, 4)
    _checks.nonempty(op, x)
    expand, depthwise, se, project = list(expand), list(depthwise), list(se), list(project)
    for name, stage in (("expand", expand), ("depthwise", depthwise), ("project", project)):
        if len(stage) != 5 and not (name == "expand" and len(stage) == 0):
            raise ValueError(f"{op}: {name} must be [weight, bn_weight, bn_bias, running_mean, "
                             f"running_var]{' or empty' if name == 'expand' else ''}; got "
                             f"{len(stage)} tensors")
    if len(se) not in (0, 4):
        raise ValueError(f"{op}: se must be [] or [reduce_weight, reduce_bias, expand_weight, "
                         f"expand_bias]; got {len(se)} tensors")
    for name in ("act", "se_act", "se_gate"):
        _checks.act(op, name, locals()[name])
    if skip is None:
        skip = stride == 1 and x.shape[1] == project[0].shape[0]
    impl = _resolve(x, op)
    if impl == "reference":
        expand, depthwise, project = (
            [stage[0], *_dense_bn(*stage[1:], training)] if stage else stage
            for stage in (expand, depthwise, project))
        return reference.inverted_residual(x, expand, depthwise, se, project, stride=stride,
                                           dilation=dilation, act=act, se_act=se_act,
                                           se_gate=se_gate, skip=skip, training=training,
                                           momentum=momentum, eps=eps)
    if not training and not _needs_grad(x, expand, depthwise, se, project):
        if _composes_block(impl, x.device.type):
            # On a GPU the backend's ops composed are 3-4.5x faster than its fused block
            # kernel (H200, fp16 N=64, `python -m bench.gpu_targets`, 2026-12-01: cuda 0.322
            # vs 1.450 ms, triton 0.245 vs 0.809 ms); EFFK_FUSED_BLOCK=1 takes the fused one.
            return _composed_inference(impl, x, expand, depthwise, se, project, stride,
                                       dilation, act, se_act, se_gate, skip, eps)
        if impl in ("cpu", "cuda") and _backend.fused_inference(x.device.type):
            # Inference: the fused block (csrc/cpu/inverted_residual.cpp, csrc/cuda/
            # inverted_residual.cu), BatchNorm folded from the running statistics, the
            # expanded activations never in memory; every dtype, with or without SE.
            return _cpp().inverted_residual_inference(x, expand, depthwise, se, project,
                                                      stride, dilation, act, se_act, se_gate,
                                                      skip, eps)
    # The C++ block (composed from the CPU or CUDA kernels) or the fused Triton block
    # (triton_kernels/inverted_residual.py: the expanded tensor is never written); both return
    # the batch statistics of each stage.
    out, stats = _call(impl, op, x, expand, depthwise, se, project, stride, dilation, act,
                       se_act, se_gate, skip, training, eps)
    if training:
        stages = ([expand] if expand else []) + [depthwise, project]
        counts = _stage_counts(x, expand, depthwise, stride, dilation)
        for i, (stage, count) in enumerate(zip(stages, counts)):
            _update_running(stage[3], stage[4], stats[2 * i], stats[2 * i + 1], count, momentum)
    return out


def _composes_block(impl: str, device_type: str) -> bool:
    """Whether an eval-mode block without gradients runs as backend `impl`'s ops composed
    rather than its fused block kernel: on CUDA tensors unless EFFK_FUSED_BLOCK=1 (the fused
    kernels are the slower there; effkernels/_backend.py's docstring has the numbers)."""
    return (device_type == "cuda" and impl in ("cuda", "triton")
            and not _backend.fused_block_enabled())


def _composed_inference(impl: str, x, expand, depthwise, se, project, stride: int,
                        dilation: int, act: str, se_act: str, se_gate: str, skip: bool,
                        eps: float) -> torch.Tensor:
    """The eval-mode block from backend `impl`'s pwconv_bn_act / dwconv_bn_act kernels: the
    definition of reference.inverted_residual (and of the C++ composite block), SE by
    reference.squeeze_excite in the depthwise output's dtype, the skip fused into the
    project's epilogue as its residual."""
    k = depthwise[0].shape[-1]
    pad = dilation * (k - 1) // 2
    if skip:  # the fused ops' check (the project's residual check would name another op)
        _checks.skip("inverted_residual", x, project[0].shape[0], k, stride, pad, dilation)
    h = x
    if expand:
        h = _call(impl, "pwconv_bn_act", h, *expand, None, act, False, eps)[0]
    h = _call(impl, "dwconv_bn_act", h, *depthwise, stride, pad, dilation, act, False, eps)[0]
    if se:
        h = reference.squeeze_excite(h, *se, act=se_act, gate=se_gate)
    out = _call(impl, "pwconv_bn_act", h, *project, x if skip else None, "identity", False,
                eps)[0]
    # Each op returns its input's format; an intermediate that is both formats (a 1x1 map,
    # one hidden channel) may hand on the other one, so x's is restored here.
    return reference._in_format_of(x, out)


def _pack_current(entry, key, tensors) -> bool:
    """A _cached_pack entry still holds: same key, same tensor objects at the same versions."""
    return (entry is not None and entry[0] == key and len(entry[1]) == len(tensors)
            and all(a is b and a._version == v for a, b, v in zip(tensors, entry[1], entry[2])))


def _cached_pack(cache: dict, key, tensors, pack, *extra) -> tuple:
    """cache["entry"] = (key, tensors, their versions, packed, *extra), kept while the key and
    the same tensor objects at the same version counters hold; else packed again by pack()."""
    entry = cache.get("entry")
    if not _pack_current(entry, key, tensors):
        cache.clear()
        entry = cache["entry"] = (key, tensors, [t._version for t in tensors], pack(), *extra)
    return entry


def _prepacked_block(cache: dict, x, expand, depthwise, se, project, stride, dilation, act,
                     se_act, se_gate, skip, eps) -> Optional[torch.Tensor]:
    """The eval-mode block on the CPU from weights packed once (effkernels::
    inverted_residual_pack: BatchNorm folded, GEMM panels) and kept in `cache` (the caller's
    dict, one entry) while the same tensor objects keep the same version counters: an in-place
    change (optimizer steps, load_state_dict, copy_ under no_grad) or a new tensor packs again.
    Writes through `.data` or numpy bypass the version counter and are not seen. The cache holds
    the tensors it was packed from, so a freed weight's address cannot be mistaken for it.
    None where this does not apply (the same conditions as _eval_direct, CPU kernels only); the
    caller then takes ops.inverted_residual, which also raises the checked errors."""
    if type(x) is not torch.Tensor or x.device.type != "cpu":
        return None
    args = (x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate, skip, eps)
    try:
        if (not _direct(args) or _resolve(x, "inverted_residual") != "cpu"
                or not _backend.fused_inference("cpu")):
            return None
        ops = _cpp()
        # The pack holds the whole block: its settings and SE's weights too.
        tensors = [t for stage in (expand, depthwise, se, project) for t in stage]
        key = (x.dtype, eps, stride, dilation, act, se_act, se_gate, skip)
        entry = _cached_pack(cache, key, tensors,
                             lambda: _kernel_call(ops.inverted_residual_pack, "cpu", *args),
                             _packed_args(depthwise, project, stride, dilation))
        return _packed_call(x, entry[3], entry[4])
    except Exception:  # noqa: BLE001 - the checked path names the bad argument
        return None


# Rows of x up to which _linear takes effkernels::linear_inference: faster than F.linear up to
# 8 rows, equal at 16 (1280->1000, ad-hoc timing: bench/NOTES.md, "The heads' linear layers").
_LINEAR_MAX_ROWS = 8


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            act: str = "identity") -> torch.Tensor:
    """act(F.linear(x, weight, bias)); a 4-D x (N, C, H, W) is averaged over H and W first
    (the models' heads: global pooling, then the layer). For a few rows of an fp32 CPU input
    with no gradient recorded and the cpu backend selected, one effkernels::linear_inference
    call (F.linear's matrix-vector product runs on one thread, and at batch 1 each separate
    call costs more than its arithmetic); else x.mean, F.linear and the activation."""
    if (type(x) is torch.Tensor and x.device.type == "cpu" and x.dim() in (2, 4)
            and x.shape[0] <= _LINEAR_MAX_ROWS and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and _direct((x, weight, bias))):
        try:  # the backend that serves the pointwise op serves the head's linear layer
            if _resolve(x, "pwconv_bn_act") == "cpu":
                return _kernel_call(_cpp().linear_inference, "cpu", x, weight, bias, act)
        except Exception:  # noqa: BLE001 - F.linear raises the usual errors
            pass
    if x.dim() == 4:
        x = x.mean((2, 3))
    return reference.activation(act, F.linear(x, weight, bias))


# Input channels up to which _conv_bn_act_inference takes effkernels::conv_bn_act_inference
# (made for the stems' 3; oneDNN's blocked convolution is the better choice for wide inputs).
_CONV_MAX_IN_CHANNELS = 8


def _conv_inference_operands(x: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], bn: tuple) -> bool:
    """The operands effkernels::conv_bn_act_inference serves: fp32 CPU x with few channels."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
            and weight.dim() == 4 and weight.shape[1] == x.shape[1] <= _CONV_MAX_IN_CHANNELS
            and all(t.dtype == torch.float32
                    for t in (weight, *bn, *(() if bias is None else (bias,)))))


def _takes_conv_inference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          bn: tuple) -> bool:
    """Whether an eager _conv_bn_act_inference call with these operands takes the kernel (the
    models' fused stem, blocks._StemReplay, is built only where the stem's own call would)."""
    return (_conv_inference_operands(x, weight, bias, bn) and type(x) is torch.Tensor
            and _direct((x, weight, bias, *bn)) and _resolve(x, "pwconv_bn_act") == "cpu")


def _conv_bn_act_inference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           bn: tuple, stride, padding, dilation, eps: float,
                           act: str) -> Optional[torch.Tensor]:
    """ACT(BN(conv2d(x, weight, bias, ...))) in eval mode by effkernels::conv_bn_act_inference
    for an fp32 CPU x with few channels, no gradient recorded and the cpu backend selected
    (the models' stems), eager or compiled (a graph op then, so that a compiled model computes
    what the eager one does); None otherwise (the caller runs F.conv2d). bn: (weight, bias,
    running_mean, running_var), all tensors."""
    if not _conv_inference_operands(x, weight, bias, bn):
        return None
    args = (x, weight, bias, *bn, list(stride), list(padding), list(dilation), eps, act)
    if torch.compiler.is_compiling():
        if _resolve(x, "pwconv_bn_act") != "cpu":
            return None
        return _cpp().conv_bn_act_inference(*args)
    if not (type(x) is torch.Tensor and _direct(args[:7])):
        return None
    try:  # the backend that serves the pointwise op serves the stem
        if _resolve(x, "pwconv_bn_act") == "cpu":
            return _kernel_call(_cpp().conv_bn_act_inference, "cpu", *args)
    except Exception:  # noqa: BLE001 - F.conv2d raises the usual errors
        pass
    return None


def _takes_inference_kernel(x: torch.Tensor, dtype: torch.dtype, args) -> bool:
    """Whether an eval-mode inverted_residual call on this x (in dtype, no cast) with the
    inference op's other arguments `args` takes the CPU inference kernel below Autograd
    (_eval_direct's conditions: plain tensors, no transform, mode or compiler), so that
    _inference_call can replay it."""
    return (type(x) is torch.Tensor and x.dtype == dtype and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and _direct((x, *args))
            and _resolve(x, "inverted_residual") == "cpu" and _backend.fused_inference("cpu"))


def _inference_call(x, args):
    """effkernels::inverted_residual_inference on the CPU kernel, below Autograd (callers have
    checked what _direct checks); args: the op's arguments after x."""
    return _kernel_call(_cpp().inverted_residual_inference, "cpu", x, *args)


def _prepacked_pointwise(cache: dict, x, weight, bn_weight, bn_bias, running_mean, running_var,
                         act: str, residual, eps: float) -> Optional[torch.Tensor]:
    """pwconv_bn_act in eval mode on the CPU from its weights packed once (effkernels::
    pwconv_bn_act_pack: BatchNorm folded, GEMM panels), kept in `cache` (the caller's dict) while
    the same tensor objects keep the same version counters, as _prepacked_block keeps a block's.
    None where this does not apply (the conditions of _eval_direct, CPU kernel); the caller then
    takes pwconv_bn_act."""
    if type(x) is not torch.Tensor or x.device.type != "cpu":
        return None
    tensors = [weight, bn_weight, bn_bias, running_mean, running_var]
    try:
        if (not _direct(tensors + [x, residual]) or _resolve(x, "pwconv_bn_act") != "cpu"
                or not _backend.fused_inference("cpu")):
            return None
        ops = _cpp()
        entry = _cached_pack(cache, (x.dtype, eps), tensors,
                             lambda: _kernel_call(ops.pwconv_bn_act_pack, "cpu", x, *tensors, eps))
        return _kernel_call(ops.pwconv_bn_act_packed, "cpu", x, entry[3], weight.shape[0], act,
                            residual)
    except Exception:  # noqa: BLE001 - the checked path names the bad argument
        return None


def _packed_args(depthwise, project, stride, dilation) -> tuple:
    """inverted_residual_packed's arguments after `packed`: the block's out_channels,
    kernel_size, stride and dilation (checked against the packed buffer). The stages' weights
    may be in parts (all but the 4 BatchNorm tensors; _Block._fused)."""
    return (sum(t.shape[0] for t in project[:-4]), max(t.shape[-1] for t in depthwise[:-4]),
            stride, dilation)


def _packed_call(x, packed, args):
    """effkernels::inverted_residual_packed on the CPU kernel, below Autograd (callers have
    checked what _direct checks); args: _packed_args."""
    return _kernel_call(_cpp().inverted_residual_packed, "cpu", x, packed, *args)


def _needs_grad(x, *stages) -> bool:
    """Whether autograd would record the block: grad mode on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t.requires_grad for stage in stages for t in stage)


def _stage_counts(x, expand, depthwise, stride, dilation) -> List[int]:
    n, _, h, w = x.shape
    k = depthwise[0].shape[-1]
    pad = dilation * (k - 1) // 2
    ho = _checks.conv_out_size(h, k, stride, pad, dilation)
    wo = _checks.conv_out_size(w, k, stride, pad, dilation)
    return ([n * h * w] if expand else []) + [n * ho * wo, n * ho * wo]
