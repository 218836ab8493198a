"""The C++ CUDA kernels (csrc/cuda) on a GPU: the paths the generic op tests may not reach
(unrolled kernel sizes vs the staged any-k path, the shared-memory fallback for large dilations,
unaligned channel vectors, tiles cut by the image border, mixconv blocks that straddle groups;
pwconv's GEMM tiles cut by M / Cin / Cout tails, vector vs element loads, tensor-core vs FFMA
paths, several grad_weight pixel chunks),
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
# the image border (H, W not multiples of 8 / 16). The eval forward of the vector-aligned shapes
# takes the direct kernel (csrc/cuda/dw_direct.cuh: k 3/5/7/9 at both strides, dilated too,
# output rows not a multiple of its 4 rows per thread); the rest takes the tiled one.
DW_CUDA_SHAPES = [
    (2, 32, 19, 23, 3, 1, 1), (1, 24, 17, 33, 3, 2, 1), (2, 16, 14, 14, 5, 1, 1),
    (1, 40, 15, 15, 5, 2, 1), (2, 8, 12, 20, 7, 1, 1), (1, 13, 13, 11, 7, 2, 1),
    (2, 48, 9, 10, 9, 1, 1), (1, 7, 21, 21, 9, 2, 1), (2, 5, 8, 9, 1, 1, 1),
    (1, 6, 9, 9, 1, 2, 1), (2, 20, 16, 16, 11, 1, 1), (1, 17, 24, 23, 11, 2, 1),
    (2, 9, 18, 18, 3, 1, 3), (1, 12, 70, 70, 9, 1, 7), (1, 3, 6, 40, 3, 2, 2),
    (1, 16, 19, 17, 9, 2, 1), (2, 24, 13, 15, 3, 2, 2), (1, 8, 11, 7, 5, 1, 2),
    (1, 16, 18, 13, 7, 2, 1),
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 32, 19, 23, 3, 1, 1), (1, 24, 17, 33, 5, 2, 1)], ids=str)
def test_dwconv_cuda_tiled_eval_forward(shape, dtype, monkeypatch):
    """EFFK_DW_DIRECT=0: the eval forward of vector-aligned shapes on the tiled kernel (the
    direct kernel serves them by default), still correct."""
    _need_cuda_kernels("dwconv_bn_act")
    monkeypatch.setenv("EFFK_DW_DIRECT", "0")
    check_op("dwconv_bn_act", *_dw(shape, dtype, training=False), "cuda", dtype)


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


def _pw(shape, dtype, layout="channels_last", act="relu6", training=True):
    n, cin, cout, h, w, with_res = shape
    g, b, rm, rv = bn_params(cout, "cuda")
    tensors = dict(x=make_input((n, cin, h, w), dtype, layout, "cuda"),
                   weight=conv_weight((cout, cin, 1, 1), dtype, "cuda"), bn_weight=g, bn_bias=b,
                   running_mean=rm, running_var=rv)
    if with_res:
        other = "contiguous" if layout == "channels_last" else "channels_last"
        tensors["residual"] = make_input((n, cout, h, w), dtype, other, "cuda")
    return tensors, dict(act=act, training=training)


# (N, Cin, Cout, H, W, residual): odd channel counts (element loads, masked tile columns), counts
# that fill 16-byte vectors (8 fp16 / 4 fp32 channels), M tails of the 128/64-row tiles, several
# column tiles (Cout > 64) and k steps (Cin > 32), N = 1, a 1-channel input, M = 2 (two values per
# channel in training), M > 512 (several grad_weight chunks).
PW_CUDA_SHAPES = [
    (1, 13, 21, 7, 11, True), (2, 16, 24, 14, 14, False), (2, 24, 144, 9, 10, True),
    (1, 1, 7, 5, 4, False), (3, 40, 8, 17, 19, True), (1, 160, 130, 6, 6, False),
    (2, 8, 8, 1, 1, True), (1, 96, 64, 23, 29, False),
]


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", PW_CUDA_SHAPES, ids=str)
def test_pwconv_cuda_paths(shape, training, dtype, layout):
    """Forward, every gradient (x, weight, BN affine, residual) and the running statistics
    against the float64 reference, both memory formats."""
    _need_cuda_kernels("pwconv_bn_act")
    check_op("pwconv_bn_act", *_pw(shape, dtype, layout, training=training), "cuda", dtype)


@pytest.mark.parametrize("act", ["identity", "relu", "relu6", "hswish", "silu", "hsigmoid",
                                 "sigmoid"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pwconv_cuda_acts(act, training):
    _need_cuda_kernels("pwconv_bn_act")
    for dtype in (torch.float32, torch.float16):
        check_op("pwconv_bn_act", *_pw((2, 13, 21, 7, 11, True), dtype, act=act,
                                       training=training), "cuda", dtype)


@pytest.mark.parametrize("layout", ["strided", "strided_cl"])
def test_pwconv_cuda_strided(layout):
    """Channel slices (unaligned base, element loads) and every-other-column views, read in
    place (strided_cl) or through the NCHW copy (strided)."""
    _need_cuda_kernels("pwconv_bn_act")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in [(2, 16, 24, 13, 14, True), (1, 13, 40, 11, 9, False)]:
            check_op("pwconv_bn_act", *_pw(shape, dtype, layout), "cuda", dtype)


def test_pwconv_cuda_empty():
    """Empty batch: the op returns the CPU op's results (no launch)."""
    _need_cuda_kernels("pwconv_bn_act")
    x = torch.randn(0, 5, 3, 4, device="cuda")
    w = torch.randn(7, 5, 1, 1, device="cuda")
    g, b, rm, rv = bn_params(7, "cuda")
    for training in (True, False):
        cuda = torch.ops.effkernels.pwconv_bn_act(x, w, g, b, rm, rv, None, "relu", training,
                                                  1e-5)
        cpu = torch.ops.effkernels.pwconv_bn_act(x.cpu(), w.cpu(), g.cpu(), b.cpu(), rm.cpu(),
                                                 rv.cpu(), None, "relu", training, 1e-5)
        # out, mean, var (conv_out: the CPU op keeps y in training, CUDA recomputes it)
        assert cuda[3].numel() == 0 and cpu[3].numel() == 0
        for a, e in zip(cuda[:3], cpu[:3]):
            assert a.shape == e.shape and a.dtype == e.dtype
            torch.testing.assert_close(a.cpu(), e)


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


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gradcheck_pwconv_cuda(layout, training, residual):
    _need_cuda_kernels("pwconv_bn_act")
    x = make_input((2, 6, 5, 7), torch.float64, layout, "cuda", requires_grad=True)
    w = conv_weight((9, 6, 1, 1), torch.float64, "cuda").requires_grad_()
    g, b, rm, rv = (t.double().requires_grad_(i < 2)
                    for i, t in enumerate(bn_params(9, "cuda")))
    res = (make_input((2, 9, 5, 7), torch.float64, "contiguous", "cuda", requires_grad=True)
           if residual else None)

    def fn(x, w, g, b, *res):
        return ops.pwconv_bn_act(x, w, g, b, rm.clone(), rv.clone(), act="silu",
                                 residual=res[0] if res else None, training=training)
    with effkernels.backend("cuda"):
        _gradcheck(fn, (x, w, g, b, *([res] if residual else [])))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_opcheck_pwconv_cuda(training, dtype):
    _need_cuda_kernels("pwconv_bn_act")
    x = make_input((2, 13, 7, 9), dtype, "channels_last", "cuda", requires_grad=True)
    w = conv_weight((21, 13, 1, 1), dtype, "cuda").requires_grad_()
    g, b, rm, rv = bn_params(21, "cuda")
    g.requires_grad_()
    b.requires_grad_()
    res = make_input((2, 21, 7, 9), dtype, "contiguous", "cuda", requires_grad=True)
    args = (x, w, g, b, rm, rv, res, "hswish", training, 1e-5)
    torch.library.opcheck(torch.ops.effkernels.pwconv_bn_act.default, args)
    out, mean, var, _ = torch.ops.effkernels.pwconv_bn_act(*args)
    bargs = (torch.randn_like(out), x.detach(), w.detach(), g.detach(), b.detach(), mean, var,
             res.detach(), "hswish", training, 1e-5)
    torch.library.opcheck(torch.ops.effkernels.pwconv_bn_act_backward.default, bargs)


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
@pytest.mark.parametrize("op", ["dwconv_bn_act", "mixconv_bn_act", "pwconv_bn_act"])
def test_cuda_bitwise_deterministic(op, dtype):
    """Forward, running statistics and every gradient bit-identical over repeated runs, on a
    layer big enough for many tiles per channel (the reductions' partials)."""
    _need_cuda_kernels(op)
    if op == "dwconv_bn_act":
        tensors, kwargs = _dw((8, 96, 56, 56, 5, 1, 1), dtype, act="silu")
    elif op == "mixconv_bn_act":
        tensors, kwargs = _mix(8, 28, 28, [(40, 3), (40, 5), (40, 7), (36, 9)], 1, 1, dtype)
    else:  # 25088 pixels: 196 row tiles, 49 grad_weight chunks
        tensors, kwargs = _pw((8, 24, 144, 56, 56, True), dtype, act="relu6")
    first = _run_once(op, tensors, kwargs)
    for _ in range(3):
        again = _run_once(op, tensors, kwargs)
        for name, t in first.items():
            assert torch.equal(t, again[name]), f"{op} {name} differs between runs"


# ---- the fused inverted-residual block, eval mode (csrc/cuda/inverted_residual.cu) -----------

def _need_fused_ir():
    _need_cuda_kernels("inverted_residual")
    from effkernels import _backend

    if not _backend.fused_inference("cuda"):
        pytest.skip("cuda: effkernels::inverted_residual_inference has no CUDA kernel in this "
                    "build")


# (N, Cin, H, W, hidden, Cout, k, stride, dilation, se, act, se_act, se_gate): MobileNetV2 blocks
# (t = 6, k = 3, stride 1 with skip / stride 2 without), several 8 x 8 tiles and tiles cut by the
# border, odd sizes (7 x 11, channel counts not multiples of 4 / 8 / 32, N = 1), k = 5 / 7 / 9,
# dilation (a larger halo), SE (the pooled-sums pass + the gated pass), no expand stage (t = 1),
# a 1 x 1 image, the late stages (C = 160, t = 6: 30 hidden chunks; Cout = 320: 4 x 8 tiles),
# Cout > 768 (several output-channel passes of 16-pixel tiles), stride 2 over several tiles in
# both directions.
IR_CUDA_CASES = {
    "mbv2_c24_t6_s1_skip": (2, 24, 14, 14, 144, 24, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "mbv2_c24_32_s2": (2, 24, 15, 13, 144, 32, 3, 2, 1, False, "relu6", "relu", "sigmoid"),
    "mbv2_56x56": (1, 24, 56, 56, 144, 24, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "k5_se_s2": (2, 16, 12, 12, 72, 24, 5, 2, 1, True, "hswish", "relu", "hsigmoid"),
    "k5_se_s1_skip": (3, 20, 11, 7, 60, 20, 5, 1, 1, True, "hswish", "relu", "hsigmoid"),
    "odd_7x11_n1": (1, 13, 7, 11, 37, 13, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "odd_7x11_s2_se": (3, 13, 7, 11, 37, 19, 3, 2, 1, True, "hswish", "relu", "hsigmoid"),
    "no_expand_se_skip": (1, 24, 9, 9, None, 24, 3, 1, 1, True, "silu", "silu", "sigmoid"),
    "k7_s2": (2, 12, 13, 9, 40, 20, 7, 2, 1, False, "relu", "relu", "sigmoid"),
    "dil2_k5_s2_se": (1, 16, 17, 15, 48, 8, 5, 2, 2, True, "relu", "relu", "sigmoid"),
    "k9": (1, 8, 12, 12, 24, 8, 9, 1, 1, False, "relu", "relu", "sigmoid"),
    "tiny_1x1": (2, 8, 1, 1, 16, 8, 3, 1, 1, True, "relu6", "relu", "sigmoid"),
    "late_c160_t6": (2, 160, 7, 7, 960, 160, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "late_c160_320_se": (1, 160, 7, 7, 960, 320, 3, 1, 1, True, "silu", "silu", "sigmoid"),
    "cout_800_passes": (1, 9, 5, 5, 20, 800, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "s2_multitile_se": (2, 8, 37, 29, 20, 12, 3, 2, 1, True, "relu6", "relu", "sigmoid"),
    "s2_k5_multitile": (1, 10, 33, 35, 30, 16, 5, 2, 1, False, "hswish", "relu", "sigmoid"),
}


def _ir_cuda_args(case, dtype, layout):
    from .test_inverted_residual_cpu import make_block

    n, cin, h, w, hidden, cout, k, stride, dil, se, act, se_act, se_gate = IR_CUDA_CASES[case]
    block64 = [[t.cuda() for t in stage] for stage in make_block(cin, hidden, cout, k, se)]
    x = make_input((n, cin, h, w), dtype, layout, "cuda")
    pad = dil * (k - 1) // 2
    skip = (stride == 1 and cin == cout
            and (h + 2 * pad - dil * (k - 1) - 1) // stride + 1 == h)
    kw = dict(stride=stride, dilation=dil, act=act, se_act=se_act, se_gate=se_gate, skip=skip)
    return x, block64, kw


def _ir_fused(x, block, kw, eps=1e-5):
    e, d, s, p = block
    return torch.ops.effkernels.inverted_residual_inference(
        x, e, d, s, p, kw["stride"], kw["dilation"], kw["act"], kw["se_act"], kw["se_gate"],
        kw["skip"], eps)


def _ir_ref(x, block, kw):
    from effkernels import reference

    return reference.inverted_residual(x, *block, training=False, **kw)


def _cast_block(block, dtype):
    return [[t.to(dtype) for t in stage] for stage in block]


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("case", list(IR_CUDA_CASES))
def test_inverted_residual_cuda_eval(case, dtype, layout):
    """The fused eval-mode block against the float64 reference (fp16/bf16: at most ~2x the error
    of PyTorch's own block in that dtype), in x's memory format."""
    from .helpers import assert_close, assert_lowp_close

    _need_fused_ir()
    x, block64, kw = _ir_cuda_args(case, dtype, layout)
    block = _cast_block(block64, dtype)
    out = _ir_fused(x, block, kw)
    ref = _ir_ref(x.double(), _cast_block(block, torch.float64), kw)
    assert out.dtype == dtype and out.shape == ref.shape and out.device == x.device
    if layout == "channels_last" and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    if dtype in (torch.float16, torch.bfloat16):
        assert_lowp_close(out, ref, _ir_ref(x, block, kw), dtype, "out")
    else:
        assert_close(out, ref, dtype, "out")


@pytest.mark.parametrize("layout", ["strided", "strided_cl"])
@pytest.mark.parametrize("case", ["mbv2_c24_t6_s1_skip", "odd_7x11_s2_se", "no_expand_se_skip"])
def test_inverted_residual_cuda_strided(case, layout):
    """A strided x (every other column, a channel offset): read in place (channels innermost)
    or through one copy, as the CPU op."""
    from .helpers import assert_close

    _need_fused_ir()
    x, block64, kw = _ir_cuda_args(case, torch.float32, layout)
    block = _cast_block(block64, torch.float32)
    assert_close(_ir_fused(x, block, kw), _ir_ref(x.double(), block64, kw), torch.float32, "out")


@pytest.mark.parametrize("fused_block", [False, True], ids=["composed", "EFFK_FUSED_BLOCK=1"])
def test_inverted_residual_cuda_matches_cpu_and_routing(fused_block, monkeypatch):
    """ops.inverted_residual on the cuda backend: eval without gradients -> the CUDA ops
    composed (the default: faster than the fused kernel on a GPU, effkernels/_backend.py) or,
    with EFFK_FUSED_BLOCK=1, the fused kernel; either gives the CPU fused op's result. With
    gradients or training -> the composite."""
    from .helpers import RecordOps, assert_close

    _need_fused_ir()
    if fused_block:
        monkeypatch.setenv("EFFK_FUSED_BLOCK", "1")
    else:
        monkeypatch.delenv("EFFK_FUSED_BLOCK", raising=False)
    composed = []
    real = ops._composed_inference
    monkeypatch.setattr(ops, "_composed_inference", lambda *a: composed.append(a[0]) or real(*a))
    x, block64, kw = _ir_cuda_args("k5_se_s2", torch.float32, "channels_last")
    block = _cast_block(block64, torch.float32)
    with effkernels.backend("cuda"), RecordOps() as mode:
        out = ops.inverted_residual(x, *block, training=False, **kw)
    assert ("effkernels.inverted_residual_inference" in mode.names) == fused_block
    assert ("effkernels.pwconv_bn_act" in mode.names) != fused_block
    with effkernels.backend("cuda"):  # no dispatch mode: the call below Autograd, same path
        assert torch.equal(ops.inverted_residual(x, *block, training=False, **kw), out)
    assert composed == ([] if fused_block else ["cuda", "cuda"])
    if effkernels.available_backends("cpu")["cpu"] == "available":
        cpu = _ir_fused(x.cpu(), [[t.cpu() for t in st] for st in block], kw)
        assert_close(out.cpu(), cpu, torch.float32, "cuda vs cpu fused")
    block_g = [[t.clone().requires_grad_() for t in st] for st in block]
    with effkernels.backend("cuda"), RecordOps() as mode:
        out_g = ops.inverted_residual(x, *block_g, training=False, **kw)
    assert "effkernels.inverted_residual_inference" not in mode.names
    assert_close(out_g.detach(), out, torch.float32, "composite vs eval path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_opcheck_inverted_residual_cuda(dtype):
    _need_fused_ir()
    for case in ("mbv2_c24_t6_s1_skip", "k5_se_s2"):
        x, block64, kw = _ir_cuda_args(case, dtype, "channels_last")
        e, d, s, p = _cast_block(block64, dtype)
        torch.library.opcheck(
            torch.ops.effkernels.inverted_residual_inference.default,
            (x, e, d, s, p, kw["stride"], kw["dilation"], kw["act"], kw["se_act"],
             kw["se_gate"], kw["skip"], 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("se", [False, True], ids=["nose", "se"])
def test_inverted_residual_cuda_bitwise_deterministic(se, dtype):
    """Bit-identical outputs over repeated runs (no atomics; the SE sums two-stage, fixed
    order), on a layer with many tiles."""
    from .test_inverted_residual_cpu import make_block

    _need_fused_ir()
    block = _cast_block([[t.cuda() for t in st] for st in make_block(24, 144, 24, 5, se)], dtype)
    x = make_input((8, 24, 56, 56), dtype, "channels_last", "cuda")
    kw = dict(stride=1, dilation=1, act="hswish", se_act="relu", se_gate="hsigmoid", skip=True)
    first = _ir_fused(x, block, kw)
    for _ in range(3):
        assert torch.equal(first, _ir_fused(x, block, kw)), "inverted_residual_inference differs"


def test_inverted_residual_cuda_empty():
    _need_fused_ir()
    x, block64, kw = _ir_cuda_args("mbv2_c24_t6_s1_skip", torch.float32, "channels_last")
    out = _ir_fused(x[:0], _cast_block(block64, torch.float32), kw)
    assert out.shape == (0, 24, 14, 14)
