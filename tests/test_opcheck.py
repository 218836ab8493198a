"""torch.library.opcheck for every C++ op (schema, fake kernel, autograd registration, AOT
dispatch), and float64 gradcheck of every op through the public API on the C++ CPU backend."""
import pytest
import torch

import effkernels
from effkernels import _extension, ops

from .helpers import bn_params, conv_weight, make_input


@pytest.fixture(autouse=True)
def _need_extension():
    assert _extension.loaded(), _extension.load_error


def _dw_args(dtype=torch.float64, training=True, layout="channels_last"):
    x = make_input((2, 5, 7, 9), dtype, layout, requires_grad=True)
    w = conv_weight((5, 1, 3, 3), dtype).requires_grad_()
    g, b, rm, rv = (t.to(dtype) for t in bn_params(5))
    return (x, w, g.requires_grad_(), b.requires_grad_(), rm, rv, 2, 1, 1, "hswish", training,
            1e-5)


def _pw_args(dtype=torch.float64, training=True, residual=True, layout="channels_last"):
    x = make_input((2, 6, 5, 7), dtype, layout, requires_grad=True)
    w = conv_weight((6, 6, 1, 1), dtype).requires_grad_()
    g, b, rm, rv = (t.to(dtype) for t in bn_params(6))
    res = make_input((2, 6, 5, 7), dtype, "contiguous", requires_grad=True) if residual else None
    return (x, w, g.requires_grad_(), b.requires_grad_(), rm, rv, res, "relu6", training, 1e-5)


def _mix_args(dtype=torch.float64, training=True, layout="contiguous"):
    x = make_input((2, 7, 9, 8), dtype, layout, requires_grad=True)
    ws = [conv_weight((4, 1, 3, 3), dtype).requires_grad_(),
          conv_weight((3, 1, 5, 5), dtype).requires_grad_()]
    g, b, rm, rv = (t.to(dtype) for t in bn_params(7))
    return (x, ws, g.requires_grad_(), b.requires_grad_(), rm, rv, 1, 1, "silu", training, 1e-5)


def _backward_args(fwd_args, op, extra_before_params):
    """Arguments of op's *_backward: (grad_out, x, weight(s), bn_w, bn_b, mean, var, ...)."""
    out, mean, var = op(*fwd_args)[:3]
    grad = torch.randn_like(out)
    x, w, g, b = (a.detach() if isinstance(a, torch.Tensor) else [t.detach() for t in a]
                  for a in fwd_args[:4])
    return (grad, x, w, g, b, mean, var, *extra_before_params)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck_dwconv(training, dtype):
    args = _dw_args(dtype, training)
    torch.library.opcheck(torch.ops.effkernels.dwconv_bn_act.default, args)
    bargs = _backward_args(args, torch.ops.effkernels.dwconv_bn_act, args[6:])
    torch.library.opcheck(torch.ops.effkernels.dwconv_bn_act_backward.default, bargs)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_pwconv(training, residual):
    args = _pw_args(torch.float64, training, residual)
    torch.library.opcheck(torch.ops.effkernels.pwconv_bn_act.default, args)
    torch.library.opcheck(torch.ops.effkernels.pwconv_bn_act.default, (*args, False))
    res = args[6].detach() if residual else None
    bargs = _backward_args(args, torch.ops.effkernels.pwconv_bn_act, (res, *args[7:]))
    torch.library.opcheck(torch.ops.effkernels.pwconv_bn_act_backward.default, bargs)
    # With the forward's conv_out (y; empty in eval), as autograd passes it.
    conv_out = torch.ops.effkernels.pwconv_bn_act(*args)[3].detach()
    assert conv_out.numel() == (args[0].numel() if training else 0)
    torch.library.opcheck(torch.ops.effkernels.pwconv_bn_act_backward.default,
                          (*bargs, conv_out))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_mixconv(training):
    args = _mix_args(torch.float64, training)
    torch.library.opcheck(torch.ops.effkernels.mixconv_bn_act.default, args)
    bargs = _backward_args(args, torch.ops.effkernels.mixconv_bn_act, args[6:])
    torch.library.opcheck(torch.ops.effkernels.mixconv_bn_act_backward.default, bargs)


def _ir_args(training, se=True, expand=True):
    def stage(cout, cin, k):
        g, b, rm, rv = (t.double() for t in bn_params(cout))
        shape = (cout, 1, k, k) if cin == 1 else (cout, cin, 1, 1)
        return [conv_weight(shape, torch.float64).requires_grad_(), g.requires_grad_(),
                b.requires_grad_(), rm, rv]
    x = make_input((2, 4, 6, 7), torch.float64, "channels_last", requires_grad=True)
    exp = stage(12, 4, 1) if expand else []
    mid = 12 if expand else 4
    dw = stage(mid, 1, 3)
    se_p = [conv_weight((3, mid, 1, 1), torch.float64).requires_grad_(),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            conv_weight((mid, 3, 1, 1), torch.float64).requires_grad_(),
            torch.randn(mid, dtype=torch.float64, requires_grad=True)] if se else []
    proj = stage(4, mid, 1)
    return (x, exp, dw, se_p, proj, 1, 1, "hswish", "relu", "hsigmoid", True, training, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_inverted_residual(training):
    torch.library.opcheck(torch.ops.effkernels.inverted_residual.default, _ir_args(training))


# ---- float64 gradcheck through the public API (C++ CPU backend) -----------------------------

def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_gradcheck_dwconv(training, layout):
    x, w, g, b, rm, rv, stride, pad, dil, act, _, eps = _dw_args(torch.float64, training, layout)

    def fn(x, w, g, b):
        return ops.dwconv_bn_act(x, w, g, b, rm.clone(), rv.clone(), stride=stride,
                                 padding=pad, dilation=dil, act=act, training=training)
    with effkernels.backend("cpu"):
        _gradcheck(fn, (x, w, g, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_gradcheck_pwconv(training, layout):
    x, w, g, b, rm, rv, res, act, _, eps = _pw_args(torch.float64, training, True, layout)

    def fn(x, w, g, b, res):
        return ops.pwconv_bn_act(x, w, g, b, rm.clone(), rv.clone(), act=act, residual=res,
                                 training=training)
    with effkernels.backend("cpu"):
        _gradcheck(fn, (x, w, g, b, res))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_mixconv(training):
    x, ws, g, b, rm, rv, stride, dil, act, _, eps = _mix_args(torch.float64, training)

    def fn(x, w0, w1, g, b):
        return ops.mixconv_bn_act(x, [w0, w1], g, b, rm.clone(), rv.clone(), stride=stride,
                                  dilation=dil, act=act, training=training)
    with effkernels.backend("cpu"):
        _gradcheck(fn, (x, *ws, g, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_inverted_residual(training):
    x, exp, dw, se, proj, stride, dil, act, se_act, se_gate, skip, _, eps = _ir_args(training)
    leaves = [x, exp[0], exp[1], exp[2], dw[0], dw[1], dw[2], *se, proj[0], proj[1], proj[2]]

    def fn(x, e0, e1, e2, d0, d1, d2, s0, s1, s2, s3, p0, p1, p2):
        return ops.inverted_residual(
            x, [e0, e1, e2, exp[3].clone(), exp[4].clone()],
            [d0, d1, d2, dw[3].clone(), dw[4].clone()], [s0, s1, s2, s3],
            [p0, p1, p2, proj[3].clone(), proj[4].clone()], stride=stride, dilation=dil,
            act=act, se_act=se_act, se_gate=se_gate, skip=skip, training=training)
    with effkernels.backend("cpu"):
        _gradcheck(fn, tuple(leaves))


def test_double_backward_is_refused():
    x, w, g, b, rm, rv, *_ = _dw_args(torch.float64, True)
    with effkernels.backend("cpu"):
        out = ops.dwconv_bn_act(x, w, g, b, rm, rv, training=True)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
