"""Runs one op case on a backend and on the float64 reference, and compares everything:
output, every gradient, and the running statistics."""
from __future__ import annotations

import torch

import effkernels
from effkernels import ops, reference

from .helpers import TOL, assert_close, assert_lowp_close

STAT_NAMES = ("running_mean", "running_var")
# inverted_residual's stage bundles: [weight, bn_weight, bn_bias, running_mean, running_var].
STAGES = ("expand", "depthwise", "project")


def _is_stat(name, index):
    return name in STAT_NAMES or (name in STAGES and index in (3, 4))


def _leaf(t, requires_grad):
    """A detached copy that keeps t's strides (views stay views), optionally requiring grad."""
    t = t.detach()
    return t.requires_grad_(requires_grad) if requires_grad else t


def _prepare(tensors, cast=None):
    """Fresh leaves (requiring grad) for differentiable tensors, clones for running stats."""
    def one(name, index, t):
        t = t.to(cast) if cast else t
        return t.clone() if _is_stat(name, index) else _leaf(t, True)

    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
        elif isinstance(t, (list, tuple)):
            out[name] = [one(name, i, w) for i, w in enumerate(t)]
        else:
            out[name] = one(name, None, t)
    return out


def _run(fn, tensors, kwargs, grad_out):
    out = fn(**tensors, **kwargs)
    out.backward(grad_out.to(out.dtype))
    grads, stats = {}, {}
    for name, t in tensors.items():
        items = enumerate(t) if isinstance(t, list) else [(None, t)]
        for i, w in items:
            if w is None:
                continue
            key = name if i is None else f"{name}[{i}]"
            if _is_stat(name, i):
                stats[key] = w
            else:
                grads[key] = w.grad
    return out, grads, stats


def check_op(op_name, tensors, kwargs, backend, dtype):
    """tensors: the op's tensor arguments by name, already in the tested dtype and layout."""
    fn_ops = getattr(ops, op_name)
    fn_ref = getattr(reference, op_name)

    with effkernels.backend(backend):
        probe = fn_ops(**_prepare(tensors), **kwargs).detach()
    grad_out = torch.randn(probe.shape, dtype=torch.float64, device=probe.device).to(dtype).double()

    with effkernels.backend(backend):
        out, grads, stats = _run(fn_ops, _prepare(tensors), kwargs, grad_out)
    ref_out, ref_grads, ref_stats = _run(fn_ref, _prepare(tensors, torch.float64), kwargs,
                                         grad_out)

    # Outputs keep the input's memory format.
    x = tensors["x"]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    assert out.dtype == dtype and out.shape == ref_out.shape

    lowp = dtype in (torch.float16, torch.bfloat16)
    if lowp:
        pt_out, pt_grads, _ = _run(fn_ref, _prepare(tensors), kwargs, grad_out)
        assert_lowp_close(out, ref_out, pt_out, dtype, "out")
        for name, g in ref_grads.items():
            assert_lowp_close(grads[name], g, pt_grads[name], dtype, f"grad {name}")
    else:
        assert_close(out, ref_out, dtype, "out")
        # Gradients are reductions over many elements: judged at 10x the elementwise tolerance.
        for name, g in ref_grads.items():
            assert grads[name] is not None, f"no gradient for {name}"
            assert grads[name].dtype == tensors_dtype(tensors, name), f"grad {name} dtype"
            assert_close(grads[name], g, dtype, f"grad {name}", factor=10.0)
    for name, s in ref_stats.items():
        stat_dtype = stats[name].dtype
        tol_dtype = torch.float64 if stat_dtype == torch.float64 else torch.float32
        assert_close(stats[name], s, tol_dtype if not lowp else dtype, name,
                     factor=10.0)


def tensors_dtype(tensors, name):
    base = name.split("[")[0]
    t = tensors[base]
    if isinstance(t, list):
        t = t[int(name.split("[")[1].rstrip("]"))]
    return t.dtype
