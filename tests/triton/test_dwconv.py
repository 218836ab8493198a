"""The Triton dwconv_bn_act (triton_kernels/dwconv_bn_act.py) against the float64 reference:
output, every gradient and the running statistics (check_op), over odd shapes (stride 2 on odd
sizes, N=1, C not a multiple of 8, dilation 2, k = 1..11), layouts, training/eval, every
activation and every dtype; plus opcheck, determinism, empty inputs and argument errors.

The interpreter is slow (each op of each program is Python), so the shapes here are tiny; the
compiled-only tests at the end run GPU-sized layers (vectorised channel loads, every tile
config) when these tests run on a GPU."""
import os

import pytest
import torch

import effkernels
from effkernels.triton_kernels import dwconv_bn_act as dw
from effkernels.triton_kernels.activation import CODES

from ..helpers import bn_params, conv_weight, make_input
from ..opcase import check_op
from ..test_ops import DW_SHAPES, dw_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
compiled_only = pytest.mark.skipif(INTERPRET, reason="GPU-sized: compiled runs only")


@pytest.fixture(autouse=True)
def _need_triton(device):
    status = effkernels.available_backends(device)["triton"]
    if status != "available":
        pytest.skip(f"triton: {status}")


def _check(shape, dtype, layout, device, act="relu6", training=True):
    check_op("dwconv_bn_act", *dw_case(shape, dtype, layout, act, training, device=device),
             "triton", dtype)


# (shape, layout, training): the shapes of test_ops.DW_SHAPES but its k=7 and k=11 ones, which
# come on smaller images (the interpreter's cost grows with k*k*H), each layout and mode several
# times. Compiled on a GPU, these small images take the looping kernels (rows per program > 1,
# see dwconv_bn_act._split) and test_every_config/test_gpu_sized the one-tile ones.
FP32_CASES = [
    (DW_SHAPES[0], "contiguous", True),        # k3, odd W
    (DW_SHAPES[0], "strided_cl", False),
    (DW_SHAPES[1], "channels_last", True),     # k5 stride 2 on odd sizes, N=1, C=13
    (DW_SHAPES[1], "strided", False),
    (DW_SHAPES[3], "channels_last", False),    # k9 stride 2
    (DW_SHAPES[4], "strided", True),           # k1
    (DW_SHAPES[5], "strided_cl", True),        # dilation 2
    (DW_SHAPES[6], "contiguous", True),        # stride 2, padding 0
    (DW_SHAPES[6], "channels_last", False),
    (DW_SHAPES[8], "channels_last", True),     # C=17, N=3, stride 2
    ((1, 3, 8, 7, 7, 1, 1, None), "channels_last", True),   # k7
    ((1, 2, 6, 6, 11, 1, 1, None), "contiguous", False),    # k11, padding 5 > H/2
    ((2, 5, 6, 5, 3, 2, 3, 4), "channels_last", True),      # stride 2, dilation 3, padding 4
]


@pytest.mark.parametrize("shape,layout,training", FP32_CASES,
                         ids=[f"{s}-{lay}-{'train' if t else 'eval'}"
                              for s, lay, t in FP32_CASES])
def test_dwconv_fp32(shape, layout, training, device):
    _check(shape, torch.float32, layout, device, training=training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dwconv_dtypes(dtype, device):
    _check(DW_SHAPES[0], dtype, "channels_last", device, training=True)
    _check(DW_SHAPES[1], dtype, "contiguous", device, training=False)


@pytest.mark.parametrize("act", list(CODES))
def test_dwconv_acts(act, device):
    # Alternate the mode: the derivative enters the batch-statistics terms only in training.
    _check(DW_SHAPES[0], torch.float32, "channels_last", device, act=act,
           training=list(CODES).index(act) % 2 == 0)


def _dw_args(device, dtype=torch.float64, training=True, shape=(2, 3, 5, 6), k=3, stride=2):
    n, c, h, w = shape
    x = make_input(shape, dtype, "channels_last", device).requires_grad_()
    wt = conv_weight((c, 1, k, k), dtype, device).requires_grad_()
    g, b, rm, rv = (t.to(dtype) for t in bn_params(c, device))
    return (x, wt, g.requires_grad_(), b.requires_grad_(), rm, rv, stride, k // 2, 1, "hswish",
            training, 1e-5)


def _backward_args(args):
    out, mean, var = torch.ops.effkernels_triton.dwconv_bn_act(*args)
    d = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    return (torch.randn_like(out), *d[:4], mean, var, *d[6:])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training, device):
    args = _dw_args(device, training=training)
    torch.library.opcheck(torch.ops.effkernels_triton.dwconv_bn_act.default, args)
    torch.library.opcheck(torch.ops.effkernels_triton.dwconv_bn_act_backward.default,
                          _backward_args(args))


def test_deterministic(device):
    """Same bits on every run: every reduction is per-program partials summed in a fixed
    order."""
    args = _dw_args(device, torch.float32, True, shape=(2, 6, 7, 8), k=3, stride=1)
    bargs = _backward_args(args)
    runs = [(torch.ops.effkernels_triton.dwconv_bn_act(*args),
             torch.ops.effkernels_triton.dwconv_bn_act_backward(*bargs)) for _ in range(2)]
    for a, b in zip(*(tuple(f) + tuple(g) for f, g in runs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty(training, device):
    x = torch.empty(0, 4, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    w = conv_weight((4, 1, 3, 3), torch.float32, device)
    g, b, rm, rv = bn_params(4, device)
    out, mean, var = dw.forward(x, w, g, b, rm, rv, 1, 1, 1, "relu", training, 1e-5)
    assert out.shape == (0, 4, 6, 6) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mean, rm)  # the running statistics: a no-op momentum update
    gx, gw, gg, gb = dw.backward(torch.empty_like(out), x, w, g, b, mean, var, 1, 1, 1, "relu",
                                 training, 1e-5)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert not gw.any() and not gg.any() and not gb.any()


def test_argument_errors(device):
    x = torch.randn(1, 4, 6, 6, device=device)
    w = torch.randn(4, 1, 3, 3, device=device)
    g, b, rm, rv = bn_params(4, device)
    with pytest.raises(ValueError, match=r"dwconv_bn_act: weight must have shape \(C, 1, k, k\)"):
        dw.forward(x, w[:3], g, b, rm, rv, 1, 1, 1, "relu", False, 1e-5)
    with pytest.raises(ValueError, match="dwconv_bn_act: stride must be 1 or 2"):
        dw.forward(x, w, g, b, rm, rv, 3, 1, 1, "relu", False, 1e-5)
    with pytest.raises(ValueError, match="dwconv_bn_act: act must be one of"):
        dw.forward(x, w, g, b, rm, rv, 1, 1, 1, "gelu", False, 1e-5)
    with pytest.raises(ValueError, match="dwconv_bn_act: running_mean and running_var are"):
        dw.forward(x, w, g, b, None, None, 1, 1, 1, "relu", False, 1e-5)
    out = torch.randn(1, 4, 6, 6, device=device)
    with pytest.raises(ValueError, match="dwconv_bn_act_backward: grad_out must have shape"):
        dw.backward(out[:, :, :5], x, w, g, b, rm, rv, 1, 1, 1, "relu", True, 1e-5)
    with pytest.raises(ValueError, match=r"dwconv_bn_act_backward: var must be a floating"):
        dw.backward(out, x, w, g, b, rm, rv[:2], 1, 1, 1, "relu", True, 1e-5)


# ---- compiled only: GPU-sized layers --------------------------------------------------------

@compiled_only
@pytest.mark.parametrize("config", range(len(dw.CONFIGS)),
                         ids=[f"w{c['BLOCK_W']}c{c['BLOCK_C']}n{c['num_warps']}"
                              for c in dw.CONFIGS])
def test_every_config(config, device, monkeypatch):
    """Each tile config forced on a layer big enough not to shrink it (C % 16 == 0:
    vectorised loads), with a ragged last channel block and column block."""
    monkeypatch.setattr(dw, "_FORCED_CONFIG", config)
    for dtype in (torch.float16, torch.float32):
        _check((2, 144, 20, 37, 3, 1, 1, None), dtype, "channels_last", device, act="hswish")
    _check((2, 40, 21, 21, 5, 2, 1, None), torch.float32, "channels_last", device,
           training=False)


@compiled_only
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (9, 2), (11, 1)])
def test_gpu_sized(k, stride, device):
    for dtype in (torch.float16, torch.bfloat16):
        _check((4, 96, 28, 28, k, stride, 1, None), dtype, "channels_last", device, act="silu")
