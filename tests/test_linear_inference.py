"""effkernels::linear_inference (csrc/cpu/linear_inference.cpp), the classifier heads' linear
layer at small batch in inference (with the heads' global pooling of a 4-D input and an
activation), and ops._linear's routing to it: against the float64 product, odd sizes, strided
views and layouts, every activation, bitwise across thread counts, errors, opcheck, and no
gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effkernels
from effkernels import ops, reference

from .helpers import assert_close, per_thread_count

pytestmark = pytest.mark.skipif(
    effkernels.available_backends("cpu")["cpu"] != "available",
    reason="the C++ CPU backend is not available")

OP = None if not hasattr(torch.ops, "effkernels") else torch.ops.effkernels


def _expected(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("in_f,out_f", [(1280, 1000), (1001, 13), (7, 33), (16, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_against_float64(n, in_f, out_f, with_bias):
    torch.manual_seed(n * 7 + in_f)
    x, w = torch.randn(n, in_f), torch.randn(out_f, in_f) / in_f ** 0.5
    b = torch.randn(out_f) if with_bias else None
    y = OP.linear_inference(x, w, b)
    assert y.shape == (n, out_f) and y.dtype == torch.float32
    assert_close(y, _expected(x, w, b), torch.float32, "y")


ACTS = ["identity", "relu", "relu6", "hswish", "silu", "hsigmoid", "sigmoid"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("n,c,h,w,out_f", [(1, 960, 7, 7, 1280), (3, 13, 7, 11, 33),
                                           (2, 40, 1, 1, 5)])
def test_pooled_input(layout, n, c, h, w, out_f):
    """A 4-D x is averaged over H and W first: the float64 mean, then the product."""
    torch.manual_seed(c + h)
    x = torch.randn(n, c, h, w) + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, 2 * c, h, w + 3)[:, ::2, :, 1:w + 1]
    wt, b = torch.randn(out_f, c) / c ** 0.5, torch.randn(out_f)
    y = OP.linear_inference(x, wt, b)
    assert y.shape == (n, out_f) and y.is_contiguous()
    assert_close(y, _expected(x.double().mean((2, 3)), wt, b), torch.float32, "y")


@pytest.mark.parametrize("act", ACTS)
def test_activations(act):
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 64), torch.randn(300, 64) / 2, torch.randn(300)
    y = OP.linear_inference(x, w, b, act)
    assert_close(y, reference.activation(act, _expected(x, w, b)), torch.float32, act)


def test_strided_views():
    torch.manual_seed(0)
    x = torch.randn(3, 2 * 515)[:, ::2]        # row stride 1030, column stride 2
    w = torch.randn(515, 77).t()               # (77, 515) with column stride 77
    b = torch.randn(2 * 77)[::2]
    assert_close(OP.linear_inference(x, w, b), _expected(x, w, b), torch.float32, "y")


def test_bitwise_across_thread_counts():
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 1280), torch.randn(1000, 1280), torch.randn(1000)
    outs = per_thread_count(lambda: OP.linear_inference(x, w, b))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_nan_and_empty():
    x, w = torch.randn(2, 40), torch.randn(5, 40)
    x[1, 3] = float("nan")
    y = OP.linear_inference(x, w, None)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    assert OP.linear_inference(torch.randn(0, 40), w, None).shape == (0, 5)
    x4 = torch.randn(2, 40, 3, 3)
    x4[0, 7, 2, 1] = float("nan")
    y = OP.linear_inference(x4, w, None, "relu6")  # NaN through the pooling and relu6
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    assert OP.linear_inference(torch.randn(0, 40, 2, 2), w, None).shape == (0, 5)


def test_errors():
    x, w = torch.randn(2, 40), torch.randn(5, 40)
    with pytest.raises(RuntimeError, match=r"linear_inference: x must be 2-D \(N, in_features\),"
                                           r" or 4-D \(N, in_features, H, W\)"):
        OP.linear_inference(x[None], w, None)
    with pytest.raises(ValueError, match="linear_inference: act must be one of"):
        OP.linear_inference(x, w, None, "gelu")
    with pytest.raises(RuntimeError, match=r"linear_inference: weight must have shape "
                                           r"\(out_features, 40\)"):
        OP.linear_inference(x[:, :, None, None].expand(2, 40, 3, 3), w[:, :39], None)
    with pytest.raises(RuntimeError, match="linear_inference: x must be a float32 CPU tensor"):
        OP.linear_inference(x.double(), w.double(), None)
    with pytest.raises(RuntimeError, match=r"linear_inference: weight must have shape "
                                           r"\(out_features, 40\)"):
        OP.linear_inference(x, w[:, :39], None)
    with pytest.raises(RuntimeError, match="linear_inference: weight must have dtype"):
        OP.linear_inference(x, w.double(), None)
    with pytest.raises(RuntimeError, match=r"linear_inference: bias must have shape \(5,\)"):
        OP.linear_inference(x, w, torch.randn(4))


def test_opcheck_and_no_gradient():
    x, w, b = torch.randn(2, 40), torch.randn(5, 40), torch.randn(5)
    torch.library.opcheck(OP.linear_inference.default, (x, w, b))
    torch.library.opcheck(OP.linear_inference.default,
                          (torch.randn(2, 40, 3, 5).contiguous(memory_format=torch.channels_last),
                           w, b, "hswish"))
    y = OP.linear_inference(x.requires_grad_(), w, b)
    with pytest.raises(RuntimeError, match="inference-only and has no gradient"):
        y.sum().backward()


def test_routing():
    torch.manual_seed(2)
    w, b = torch.randn(1000, 1280), torch.randn(1000)
    x = torch.randn(1, 1280)
    with torch.no_grad():
        # Small batch, fp32, CPU, no gradient: the kernel (bit-for-bit the op).
        assert torch.equal(ops._linear(x, w, b), OP.linear_inference(x, w, b))
        # Larger batches, other dtypes and the reference backend: F.linear.
        x16 = torch.randn(ops._LINEAR_MAX_ROWS + 1, 1280)
        assert torch.equal(ops._linear(x16, w, b), F.linear(x16, w, b))
        assert torch.equal(ops._linear(x.double(), w.double(), b.double()),
                           F.linear(x.double(), w.double(), b.double()))
        with effkernels.backend("reference"):
            assert torch.equal(ops._linear(x, w, b), F.linear(x, w, b))
    # A gradient recorded: F.linear, differentiable.
    wg = w.clone().requires_grad_()
    y = ops._linear(x, wg, b)
    assert y.requires_grad and torch.equal(y.detach(), F.linear(x, w, b))
    # Pooled and activated: the kernel bit-for-bit; with a gradient, mean + F.linear + act.
    x4 = torch.randn(1, 1280, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(ops._linear(x4, w, b, "hswish"),
                           OP.linear_inference(x4, w, b, "hswish"))
    y = ops._linear(x4, wg, b, "hswish")
    assert y.requires_grad
    assert torch.equal(y.detach(), F.hardswish(F.linear(x4.mean((2, 3)), w, b)))
    assert_close(y.detach(), OP.linear_inference(x4, w, b, "hswish"), torch.float32, "pooled")
