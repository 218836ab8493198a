"""effkernels::conv_bn_act_inference (csrc/cpu/conv_bn_act_inference.cpp), the models' stems in
inference: a dense k x k convolution with few input channels + folded BatchNorm + activation.
Against the float64 composition, odd sizes, strides, padding, dilation, rectangular kernels,
several panels of output channels, every activation, both memory formats and strided views,
the narrower ISA builds, bitwise across thread counts, errors, opcheck, no gradient, and the
routing of the models' stems (effkernels.nn._functional.dense) to it."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import effkernels
from effkernels import ops, reference
from effkernels.models import create_model
from effkernels.nn import _functional as F_

from .helpers import assert_close, per_thread_count, run_with_isa

pytestmark = pytest.mark.skipif(
    effkernels.available_backends("cpu")["cpu"] != "available",
    reason="the C++ CPU backend is not available")

OP = None if not hasattr(torch.ops, "effkernels") else torch.ops.effkernels
ACTS = ["identity", "relu", "relu6", "hswish", "silu", "hsigmoid", "sigmoid"]


def _case(n, cin, h, w, cout, k, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, kh, kw, generator=g) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    bn = (torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g),
          torch.randn(cout, generator=g) * 0.5, torch.rand(cout, generator=g) + 0.5)
    return x, weight, b, bn


def _expected(x, weight, b, bn, stride, padding, dilation, eps, act):
    y = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), stride,
                 padding, dilation)
    g, beta, mean, var = (t.double() for t in bn)
    return reference.activation(act, F.batch_norm(y, mean, var, g, beta, False, 0.0, eps))


def _run(x, weight, b, bn, stride, padding, dilation, act, eps=1e-5):
    return OP.conv_bn_act_inference(x, weight, b, *bn, list(stride), list(padding),
                                    list(dilation), eps, act)


# (N, Cin, H, W, Cout, kernel, stride, padding, dilation): the stems (3 -> 16/32, 3x3, stride 2,
# padding 1), odd sizes, C not a multiple of 8, output channels over several panels, 1x1,
# rectangular kernels, asymmetric padding and stride, dilation 2.
SHAPES = [
    (1, 3, 32, 32, 32, 3, (2, 2), (1, 1), (1, 1)),
    (2, 3, 7, 11, 16, 3, (2, 2), (1, 1), (1, 1)),
    (1, 3, 9, 13, 40, 5, (1, 1), (2, 2), (1, 1)),
    (3, 1, 10, 9, 72, 3, (1, 1), (2, 2), (2, 2)),
    (1, 4, 12, 12, 100, 1, (1, 1), (0, 0), (1, 1)),
    (1, 3, 17, 15, 24, 7, (3, 3), (3, 3), (1, 1)),
    (2, 5, 11, 7, 13, (3, 5), (2, 1), (1, 2), (1, 1)),
    (1, 8, 12, 19, 130, (5, 3), (1, 2), (0, 3), (2, 1)),
    (1, 3, 5, 5, 8, 3, (1, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("fmt", ["nchw", "channels_last", "strided"])
def test_against_float64(shape, fmt):
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    x, weight, b, bn = _case(n, cin, h, w, cout, k, seed=cout)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif fmt == "strided":  # every other column of a wider NHWC tensor, channels a slice
        wide = torch.randn(n, cin + 2, h, 2 * w).to(memory_format=torch.channels_last)
        wide[:, 1:cin + 1, :, ::2] = x
        x = wide[:, 1:cin + 1, :, ::2]
    for act in ("relu6", "hswish"):
        y = _run(x, weight, b, bn, stride, padding, dilation, act)
        expected = _expected(x, weight, b, bn, stride, padding, dilation, 1e-5, act)
        assert y.shape == expected.shape and y.dtype == torch.float32
        assert y.is_contiguous(memory_format=torch.contiguous_format if fmt == "nchw"
                               else torch.channels_last)
        assert_close(y, expected, torch.float32, f"{shape} {fmt} {act}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_activation(act, bias):
    x, weight, b, bn = _case(2, 3, 13, 10, 36, 3, bias=bias, seed=len(act))
    x = x.to(memory_format=torch.channels_last) * 3  # past hswish's and relu6's kinks
    y = _run(x, weight, b, bn, (2, 2), (1, 1), (1, 1), act, eps=1e-3)
    assert_close(y, _expected(x, weight, b, bn, (2, 2), (1, 1), (1, 1), 1e-3, act),
                 torch.float32, act)


def test_empty_batch_and_nan():
    x, weight, b, bn = _case(0, 3, 8, 8, 16, 3)
    assert _run(x, weight, b, bn, (2, 2), (1, 1), (1, 1), "relu").shape == (0, 16, 4, 4)
    x, weight, b, bn = _case(1, 3, 8, 8, 16, 3)
    x[0, 1, 4, 4] = float("nan")
    y = _run(x, weight, b, bn, (1, 1), (1, 1), (1, 1), "relu")
    # NaN reaches the 3x3 outputs around it, in every channel (relu keeps NaN), and no other.
    nan = torch.isnan(y)
    assert nan[0, :, 3:6, 3:6].all() and nan.sum() == 16 * 9


def test_bitwise_across_thread_counts():
    x, weight, b, bn = _case(2, 3, 45, 37, 32, 3, seed=3)
    x = x.to(memory_format=torch.channels_last)
    outs = per_thread_count(lambda: _run(x, weight, b, bn, (2, 2), (1, 1), (1, 1), "relu6"))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


_ISA_SCRIPT = """
import torch, torch.nn.functional as F
from tests.test_conv_inference import SHAPES, _case, _expected, _run
from tests.helpers import assert_close
for shape in SHAPES:
    n, cin, h, w, cout, k, stride, padding, dilation = shape
    x, weight, b, bn = _case(n, cin, h, w, cout, k, seed=cout)
    x = x.to(memory_format=torch.channels_last)
    y = _run(x, weight, b, bn, stride, padding, dilation, "silu")
    assert_close(y, _expected(x, weight, b, bn, stride, padding, dilation, 1e-5, "silu"),
                 torch.float32, str(shape))
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_narrower_isa(isa):
    """The AVX2 (8-float vectors) and baseline (SSE2, 4-float) builds, forced with
    EFFK_CPU_ISA: other panel widths and row blocks."""
    run_with_isa(isa, _ISA_SCRIPT)


def test_errors():
    x, weight, b, bn = _case(1, 3, 8, 8, 16, 3)
    s, p, d = (1, 1), (1, 1), (1, 1)
    with pytest.raises(RuntimeError, match="conv_bn_act_inference: x must be a float32 CPU"):
        _run(x.double(), weight.double(), b.double(), [t.double() for t in bn], s, p, d, "relu")
    with pytest.raises(RuntimeError, match="conv_bn_act_inference: x must be 4-D"):
        _run(x[0], weight, b, bn, s, p, d, "relu")
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out_channels, 3, kh, kw\)"):
        _run(x, weight[:, :2], b, bn, s, p, d, "relu")
    with pytest.raises(RuntimeError, match=r"bias must have shape \(16,\)"):
        _run(x, weight, b[:4], bn, s, p, d, "relu")
    with pytest.raises(RuntimeError, match=r"running_var must have shape \(16,\)"):
        _run(x, weight, b, (*bn[:3], bn[3][:5]), s, p, d, "relu")
    with pytest.raises(RuntimeError, match="stride must be two integers >= 1"):
        _run(x, weight, b, bn, (0, 1), p, d, "relu")
    with pytest.raises(RuntimeError, match="padding must be two integers >= 0"):
        _run(x, weight, b, bn, s, (-1, 0), d, "relu")
    with pytest.raises(RuntimeError, match="is too small for the 3x3 kernel"):
        _run(x[:, :, :1, :1], weight, b, bn, s, (0, 0), d, "relu")
    with pytest.raises(ValueError, match="act must be one of"):
        _run(x, weight, b, bn, s, p, d, "gelu")


def test_opcheck_and_no_gradient():
    x, weight, b, bn = _case(2, 3, 9, 7, 16, 3)
    args = (x, weight, b, *bn, [2, 2], [1, 1], [1, 1], 1e-5, "hswish")
    torch.library.opcheck(OP.conv_bn_act_inference.default, args)
    y = OP.conv_bn_act_inference(x.requires_grad_(), *args[1:])
    with pytest.raises(RuntimeError, match="inference-only and has no gradient"):
        y.sum().backward()


@pytest.mark.parametrize("name", ["mobilenetv2_100", "mobilenetv3_large_100",
                                  "tf_mixnet_s"])
def test_model_stems_take_it(name):
    """The models' stems in eval with no gradient: the kernel (the same bits as the op);
    torch.conv2d (folded) otherwise: a gradient recorded, training, the reference backend,
    more input channels than ops._CONV_MAX_IN_CHANNELS."""
    model = create_model(name).eval()
    model.bn1.running_mean.normal_()
    model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 37, 29).to(memory_format=torch.channels_last)
    stem, bn1 = model.conv_stem, model.bn1
    with torch.no_grad():
        y = F_.conv_bn_act(x, stem, bn1, model.act, model.same)
        xp = F_.pad_same(x, 3, 2, 1) if model.same else x
        padding = [0, 0] if model.same else list(stem.padding)
        direct = OP.conv_bn_act_inference(xp, stem.weight, None, bn1.weight, bn1.bias,
                                          bn1.running_mean, bn1.running_var, [2, 2], padding,
                                          [1, 1], bn1.eps, model.act)
        assert torch.equal(y, direct)
        composed = reference.activation(model.act, bn1(F.conv2d(xp, stem.weight, None, 2,
                                                                 padding)))
        assert_close(y, composed.double(), torch.float32, name)
    from torch.profiler import profile

    def kernels(fn):
        with profile() as prof:
            fn()
        return {e.key for e in prof.key_averages()}

    op = "effkernels::conv_bn_act_inference"
    with torch.no_grad():
        assert op in kernels(lambda: F_.conv_bn_act(x, stem, bn1, model.act, model.same))
        with effkernels.backend("reference"):
            assert op not in kernels(lambda: F_.conv_bn_act(x, stem, bn1, model.act,
                                                            model.same))
    y_grad = F_.conv_bn_act(x.clone().requires_grad_(), stem, bn1, model.act, model.same)
    assert y_grad.requires_grad
    assert_close(y_grad.detach(), composed.double(), torch.float32, name + " grad path")
    assert op not in kernels(lambda: F_.conv_bn_act(x.clone().requires_grad_(), stem, bn1,
                                                    model.act, model.same))
