"""Bad input gets a clear error naming the argument and the expectation, through the Python API
and through direct torch.ops.effkernels calls (checked again in C++)."""
import pytest
import torch

import effkernels
from effkernels import ops

from .helpers import bn_params

C = 6


def _dw_inputs():
    g, b, rm, rv = bn_params(C)
    return torch.randn(2, C, 8, 8), torch.randn(C, 1, 3, 3), g, b, rm, rv


def _pw_inputs():
    g, b, rm, rv = bn_params(4)
    return torch.randn(2, C, 5, 5), torch.randn(4, C, 1, 1), g, b, rm, rv


DW_BAD = [
    (lambda x, w, *r: (x[0], w, *r), {}, "x must be 4-D"),
    (lambda x, w, *r: (x, w[:4], *r), {}, r"weight must have shape \(C, 1, k, k\) with C == 6"),
    (lambda x, w, *r: (x, w[:, :, :2], *r), {}, r"weight must have shape \(C, 1, k, k\)"),
    (lambda x, w, *r: (x, torch.randn(C, 1, 13, 13), *r), {}, "kernel size must be in 1..11"),
    (lambda x, w, *r: (x, w.double(), *r), {}, "weight must have dtype torch.float32"),
    (lambda x, w, *r: (x.int(), w, *r), {}, "x must be float32, float64, float16 or bfloat16"),
    (lambda x, w, g, *r: (x, w, g[:3], *r), {}, r"bn_weight must have shape \(6,\)"),
    (lambda x, w, g, b, rm, rv: (x, w, g, b, None, rv), {},
     "running_mean and running_var must both be given"),
    (lambda x, w, g, b, rm, rv: (x, w, g, b, None, None), {},
     "required when training=False"),
    (lambda *a: a, {"stride": 3}, "stride must be 1 or 2"),
    (lambda *a: a, {"dilation": 0}, "dilation must be >= 1"),
    (lambda *a: a, {"act": "gelu"}, "act must be one of"),
    (lambda x, w, *r: (x[:, :, :2, :2], w, *r), {"padding": 0}, "smaller than the kernel"),
    (lambda x, w, *r: (x[:1, :, :1, :1], w, *r), {"training": True, "padding": 1},
     "more than 1 value per channel"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mutate,kwargs,match", DW_BAD, ids=[m for *_, m in DW_BAD])
def test_dwconv_bad_input(backend, mutate, kwargs, match):
    with effkernels.backend(backend), pytest.raises((ValueError, TypeError), match=match):
        ops.dwconv_bn_act(*mutate(*_dw_inputs()), **kwargs)


PW_BAD = [
    (lambda x, w, *r: (x, w[:, :4], *r), {}, r"weight must have shape \(Cout, Cin, 1, 1\)"),
    (lambda x, w, *r: (x, w, *r), {"residual": torch.randn(2, 5, 5, 5)},
     r"residual must have shape \(2, 4, 5, 5\)"),
    (lambda x, w, *r: (x, w, *r), {"residual": torch.randn(2, 4, 5, 5).double()},
     "residual must have dtype torch.float32"),
    (lambda x, w, g, *r: (x, w, g.reshape(2, 2), *r), {}, r"bn_weight must have shape \(4,\)"),
]


@pytest.mark.parametrize("mutate,kwargs,match", PW_BAD, ids=[m for *_, m in PW_BAD])
def test_pwconv_bad_input(mutate, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.pwconv_bn_act(*mutate(*_pw_inputs()), **kwargs)


def test_mixconv_bad_input():
    g, b, rm, rv = bn_params(C)
    x = torch.randn(2, C, 8, 8)
    with pytest.raises(ValueError, match="must sum to C == 6"):
        ops.mixconv_bn_act(x, [torch.randn(2, 1, 3, 3), torch.randn(2, 1, 5, 5)], g, b, rm, rv)
    with pytest.raises(ValueError, match="odd kernel size"):
        ops.mixconv_bn_act(x, [torch.randn(3, 1, 3, 3), torch.randn(3, 1, 4, 4)], g, b, rm, rv)
    with pytest.raises(ValueError, match="at least one"):
        ops.mixconv_bn_act(x, [], g, b, rm, rv)


def test_inverted_residual_bad_bundle():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="depthwise must be"):
        ops.inverted_residual(x, [], [torch.randn(4, 1, 3, 3)], [], [])
    with pytest.raises(ValueError, match="se must be"):
        ops.inverted_residual(x, [], [None] * 5, [torch.randn(1)], [None] * 5)


# Direct calls bypass the Python checks: the C++ TORCH_CHECKs must catch the same mistakes.
def test_direct_op_calls_are_checked_in_cpp():
    x, w, g, b, rm, rv = _dw_inputs()
    dw = torch.ops.effkernels.dwconv_bn_act
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C, 1, k, k\)"):
        dw(x, w[:4], g, b, rm, rv, 1, 1, 1, "relu", False, 1e-5)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        dw(x, w, g, b, rm, rv, 4, 1, 1, "relu", False, 1e-5)
    with pytest.raises((RuntimeError, ValueError), match="act must be one of"):
        dw(x, w, g, b, rm, rv, 1, 1, 1, "swish", False, 1e-5)
    with pytest.raises(RuntimeError, match="required when training=False"):
        dw(x, w, g, b, None, None, 1, 1, 1, "relu", False, 1e-5)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        dw(x[0], w, g, b, rm, rv, 1, 1, 1, "relu", False, 1e-5)
    xp, wp, gp, bp, rmp, rvp = _pw_inputs()
    pw = torch.ops.effkernels.pwconv_bn_act
    with pytest.raises(RuntimeError, match="weight must have shape"):
        pw(xp, wp[:, :3], gp, bp, rmp, rvp, None, "relu", False, 1e-5)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        pw(xp, wp, gp, bp, rmp, rvp, torch.randn(2, 4, 5, 4), "relu", False, 1e-5)
    mix = torch.ops.effkernels.mixconv_bn_act
    with pytest.raises(RuntimeError, match="must sum to C"):
        mix(x, [torch.randn(2, 1, 3, 3)], g, b, rm, rv, 1, 1, "relu", False, 1e-5)
    mix_bwd = torch.ops.effkernels.mixconv_bn_act_backward
    ws = [torch.randn(3, 1, 3, 3), torch.randn(3, 1, 5, 5)]
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(2, 6, 8, 8\)"):
        mix_bwd(torch.randn(2, 6, 7, 8), x, ws, g, b, rm, rv, 1, 1, "relu", True, 1e-5)
    with pytest.raises(RuntimeError, match="mean must"):
        mix_bwd(torch.randn(2, 6, 8, 8), x, ws, g, b, rm[:2], rv, 1, 1, "relu", True, 1e-5)
