"""The C++ CUDA kernels (csrc/cuda) on a GPU: the paths the generic op tests may not reach
(unrolled kernel sizes vs the staged any-k path, the shared-memory fallback for large dilations,
unaligned channel vectors, tiles cut by the image border, mixconv blocks that straddle groups),
float64 gradcheck and opcheck on CUDA tensors, and bitwise determinism of forward and backward
(two-stage reductions, no atomics). Everything here is marked `cuda` (skipped without a GPU);
the backend is named explicitly, as "auto" does not pick these kernels yet (effkernels/_backend.py).
"""
import pytest
import torch

import effkernels
from effkernels import ops

from .helpers import bn_params, conv_weight, make_input
from .opcase import check_op

pytestmark = pytest.mark.cuda


def _need_cuda_kernels(op):
    why = effkernels.available_backends("cuda", op)["cuda"]
    if why != "available":
        pytest.skip(f"cuda: {why}")


def _dw(shape, dtype, layout="channels_last", act="hswish", training=True, padding=None):
    n, c, h, w, k, stride, dil = shape
    g, b, rm, rv = bn_params(c, "cuda")
    tensors = dict(x=make_input((n, c, h, w), dtype, layout, "cuda"),
                   weight=conv_weight((c, 1, k, k), dtype, "cuda"), bn_weight=g, bn_bias=b,
                   running_mean=rm, running_var=rv)
    return tensors, dict(stride=stride, padding=padding, dilation=dil, act=act,
                         training=training)


def _mix(n, h, w, groups, stride, dil, dtype, layout="channels_last", act="silu",
         training=True):
    c = sum(ci for ci, _ in groups)
    g, b, rm, rv = bn_params(c, "cuda")
    tensors = dict(x=make_input((n, c, h, w), dtype, layout, "cuda"),
                   weights=[conv_weight((ci, 1, k, k), dtype, "cuda") for ci, k in groups],
                   bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv)
    return tensors, dict(stride=stride, dilation=dil, act=act, training=training)


# (N, C, H, W, k, stride, dilation): every unrolled k at both strides, the staged path (k 1, 2,
# 4, 11; k 9 at dilation 7, whose halo tile exceeds shared memory), channel counts that do and
# do not fill 16-byte vectors (4 fp32 / 8 fp16 channels) and channel blocks (16), tiles cut by
# the image border (H, W not multiples of 8 / 16).
DW_CUDA_SHAPES = [
    (2, 32, 19, 23, 3, 1, 1), (1, 24, 17, 33, 3, 2, 1), (2, 16, 14, 14, 5, 1, 1),
    (1, 40, 15, 15, 5, 2, 1), (2, 8, 12, 20, 7, 1, 1), (1, 13, 13, 11, 7, 2, 1),
    (2, 48, 9, 10, 9, 1, 1), (1, 7, 21, 21, 9, 2, 1), (2, 5, 8, 9, 1, 1, 1),
    (1, 6, 9, 9, 1, 2, 1), (2, 20, 16, 16, 11, 1, 1), (1, 17, 24, 23, 11, 2, 1),
    (2, 9, 18, 18, 3, 1, 3), (1, 12, 70, 70, 9, 1, 7), (1, 3, 6, 40, 3, 2, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", DW_CUDA_SHAPES, ids=str)
def test_dwconv_cuda_paths(shape, training, dtype):
    _need_cuda_kernels("dwconv_bn_act")
    check_op("dwconv_bn_act", *_dw(shape, dtype, training=training), "cuda", dtype)


@pytest.mark.parametrize("k,padding", [(2, 0), (4, 1), (4, 2), (3, 0)])
def test_dwconv_cuda_even_kernels_and_padding(k, padding):
    _need_cuda_kernels("dwconv_bn_act")
    check_op("dwconv_bn_act", *_dw((2, 10, 11, 12, k, 1, 1), torch.float32, padding=padding),
             "cuda", torch.float32)
    check_op("dwconv_bn_act", *_dw((2, 10, 11, 12, k, 2, 1), torch.float32, padding=padding),
             "cuda", torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "strided_cl"])
def test_dwconv_cuda_unaligned_and_nchw(layout):
    """Channel slices (base not 16-byte aligned), every-other-column views, NCHW."""
    _need_cuda_kernels("dwconv_bn_act")
    for dtype in (torch.float32, torch.float16):
        check_op("dwconv_bn_act", *_dw((2, 16, 13, 14, 3, 1, 1), dtype, layout), "cuda", dtype)
        check_op("dwconv_bn_act", *_dw((1, 24, 11, 9, 5, 2, 1), dtype, layout), "cuda", dtype)


# (N, H, W, groups, stride, dilation): MixNet-like splits, groups that straddle channel blocks,
# one k only (the table dropped), k 11 (its blocks take the staged branch of the mixed kernel).
MIX_CUDA_SHAPES = [
    (2, 14, 14, [(16, 3), (16, 5), (16, 7), (16, 9)], 1, 1),
    (1, 15, 17, [(10, 3), (9, 5), (7, 7)], 2, 1),
    (2, 12, 12, [(20, 3), (20, 3)], 1, 1),
    (1, 13, 13, [(5, 3), (12, 11)], 1, 1),
    (2, 16, 16, [(8, 3), (8, 5)], 1, 2),
    (1, 9, 9, [(3, 1), (4, 3)], 2, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", MIX_CUDA_SHAPES, ids=str)
def test_mixconv_cuda_paths(shape, training, dtype):
    _need_cuda_kernels("mixconv_bn_act")
    n, h, w, groups, stride, dil = shape
    check_op("mixconv_bn_act", *_mix(n, h, w, groups, stride, dil, dtype, training=training),
             "cuda", dtype)


# ---- float64 gradcheck and opcheck on CUDA tensors -------------------------------------------

def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k,stride,dil", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (4, 2, 1)])
def test_gradcheck_dwconv_cuda(training, k, stride, dil):
    _need_cuda_kernels("dwconv_bn_act")
    x = make_input((2, 5, 7, 9), torch.float64, "channels_last", "cuda", requires_grad=True)
    w = conv_weight((5, 1, k, k), torch.float64, "cuda").requires_grad_()
    g, b, rm, rv = (t.double().requires_grad_(i < 2)
                    for i, t in enumerate(bn_params(5, "cuda")))

    def fn(x, w, g, b):
        return ops.dwconv_bn_act(x, w, g, b, rm.clone(), rv.clone(), stride=stride,
                                 dilation=dil, act="silu", training=training)
    with effkernels.backend("cuda"):
        _gradcheck(fn, (x, w, g, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_mixconv_cuda(training):
    _need_cuda_kernels("mixconv_bn_act")
    x = make_input((2, 11, 8, 7), torch.float64, "contiguous", "cuda", requires_grad=True)
    ws = [conv_weight((5, 1, 3, 3), torch.float64, "cuda").requires_grad_(),
          conv_weight((6, 1, 5, 5), torch.float64, "cuda").requires_grad_()]
    g, b, rm, rv = (t.double().requires_grad_(i < 2)
                    for i, t in enumerate(bn_params(11, "cuda")))

    def fn(x, w0, w1, g, b):
        return ops.mixconv_bn_act(x, [w0, w1], g, b, rm.clone(), rv.clone(), stride=2,
                                  act="hswish", training=training)
    with effkernels.backend("cuda"):
        _gradcheck(fn, (x, *ws, g, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_opcheck_cuda(training, dtype):
    _need_cuda_kernels("dwconv_bn_act")
    _need_cuda_kernels("mixconv_bn_act")
    x = make_input((2, 12, 7, 9), dtype, "channels_last", "cuda", requires_grad=True)
    w = conv_weight((12, 1, 3, 3), dtype, "cuda").requires_grad_()
    g, b, rm, rv = bn_params(12, "cuda")
    g.requires_grad_()
    b.requires_grad_()
    args = (x, w, g, b, rm, rv, 2, 1, 1, "hswish", training, 1e-5)
    torch.library.opcheck(torch.ops.effkernels.dwconv_bn_act.default, args)
    out, mean, var = torch.ops.effkernels.dwconv_bn_act(*args)
    bargs = (torch.randn_like(out), x.detach(), w.detach(), g.detach(), b.detach(), mean, var,
             2, 1, 1, "hswish", training, 1e-5)
    torch.library.opcheck(torch.ops.effkernels.dwconv_bn_act_backward.default, bargs)
    ws = [conv_weight((5, 1, 3, 3), dtype, "cuda").requires_grad_(),
          conv_weight((7, 1, 5, 5), dtype, "cuda").requires_grad_()]
    margs = (x, ws, g, b, rm, rv, 1, 1, "silu", training, 1e-5)
    torch.library.opcheck(torch.ops.effkernels.mixconv_bn_act.default, margs)


# ---- determinism -----------------------------------------------------------------------------

def _run_once(op, tensors, kwargs, grad_seed=1):
    leaves = {}
    args = {}
    for name, t in tensors.items():
        if isinstance(t, list):
            args[name] = [w.detach().clone().requires_grad_() for w in t]
            for i, w in enumerate(args[name]):
                leaves[f"{name}[{i}]"] = w
        elif name.startswith("running"):
            args[name] = t.clone()
        else:
            args[name] = t.detach().clone().requires_grad_()
            leaves[name] = args[name]
    with effkernels.backend("cuda"):
        out = getattr(ops, op)(**args, **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(grad_seed)
    grad = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)
    out.backward(grad)
    results = {"out": out.detach(), "running_mean": args["running_mean"],
               "running_var": args["running_var"]}
    results.update({f"grad {k}": v.grad for k, v in leaves.items()})
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["dwconv_bn_act", "mixconv_bn_act"])
def test_cuda_bitwise_deterministic(op, dtype):
    """Forward, running statistics and every gradient bit-identical over repeated runs, on a
    layer big enough for many tiles per channel (the reductions' partials)."""
    _need_cuda_kernels(op)
    if op == "dwconv_bn_act":
        tensors, kwargs = _dw((8, 96, 56, 56, 5, 1, 1), dtype, act="silu")
    else:
        tensors, kwargs = _mix(8, 28, 28, [(40, 3), (40, 5), (40, 7), (36, 9)], 1, 1, dtype)
    first = _run_once(op, tensors, kwargs)
    for _ in range(3):
        again = _run_once(op, tensors, kwargs)
        for name, t in first.items():
            assert torch.equal(t, again[name]), f"{op} {name} differs between runs"
