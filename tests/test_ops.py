"""Every op x backend x dtype x memory format x shape against the float64 reference: output,
all gradients and the running statistics, in training and eval mode."""
import pytest
import torch

import effkernels
from effkernels import ops, reference

from .helpers import (DTYPES, RecordOps, assert_close, assert_lowp_close, backends_for,
                      bn_params, conv_weight, gpu_backends_for, make_input)
from .opcase import check_op

LAYOUTS = ["contiguous", "channels_last", "strided", "strided_cl"]
CPU_BACKENDS = backends_for("cpu")
# Tests that call the C++ CPU ops (torch.ops.effkernels) directly.
needs_cpu_kernels = pytest.mark.skipif(
    effkernels.available_backends("cpu")["cpu"] != "available",
    reason="the C++ CPU backend is not available")

# (N, C, H, W, k, stride, dilation, padding)
DW_SHAPES = [
    (2, 8, 7, 11, 3, 1, 1, None),
    (1, 13, 9, 9, 5, 2, 1, None),
    (2, 3, 11, 7, 7, 1, 1, None),
    (1, 5, 12, 10, 9, 2, 1, None),
    (2, 6, 8, 8, 1, 1, 1, None),
    (1, 7, 9, 13, 3, 1, 2, None),
    (2, 4, 10, 9, 3, 2, 1, 0),
    (1, 9, 13, 13, 11, 1, 1, None),
    (3, 17, 5, 6, 3, 2, 1, None),
]
# (N, Cin, Cout, H, W, residual)
PW_SHAPES = [
    (2, 8, 16, 7, 11, False),
    (1, 13, 7, 9, 9, True),
    (2, 3, 17, 5, 6, False),
    (1, 24, 24, 7, 7, True),
    (2, 1, 5, 4, 3, True),
    (1, 40, 33, 3, 5, False),
]
# (N, H, W, [(C_i, k_i)], stride, dilation)
MIX_SHAPES = [
    (2, 7, 11, [(4, 3), (3, 5), (2, 7)], 1, 1),
    (1, 9, 9, [(5, 3), (6, 5)], 2, 1),
    (2, 8, 10, [(3, 3), (3, 5), (3, 7), (2, 9)], 1, 2),
]
# Groups of at least one vector (16 fp32 / 8 fp64 channels) whose widths are not multiples of
# it: the CPU kernels' vector paths (the fp32 sliding-window interior for k 3-9, stride 1/2)
# and the overlapping tail block of each group, in the forward and the backward.
WIDE_SHAPES = [
    ("dwconv_bn_act", (2, 40, 11, 14, 3, 1, 1, None)),
    ("dwconv_bn_act", (1, 24, 13, 17, 5, 2, 1, None)),
    # rows narrower than the window / one 4-pixel tile, other paddings (edge tiles only)
    ("dwconv_bn_act", (1, 20, 6, 2, 7, 1, 1, None)),
    ("dwconv_bn_act", (2, 33, 9, 5, 3, 2, 1, 0)),
    ("dwconv_bn_act", (1, 16, 7, 7, 9, 1, 1, 5)),
    ("mixconv_bn_act", (2, 12, 14, [(20, 3), (17, 5), (35, 7), (16, 9)], 1, 1)),
    ("mixconv_bn_act", (2, 13, 11, [(24, 3), (19, 5), (9, 7)], 2, 1)),
]
ACTS = ["identity", "relu", "relu6", "hswish", "silu"]
# (N, Cin, Cout, H, W, expand ratio, k, stride, SE, (act, se_act, se_gate))
IR_SHAPES = [
    (2, 8, 8, 7, 9, 3, 3, 1, False, ("relu6", "relu", "sigmoid")),
    (1, 6, 10, 9, 9, 4, 5, 2, True, ("hswish", "relu", "hsigmoid")),
    (2, 8, 8, 6, 7, 1, 3, 1, True, ("silu", "silu", "sigmoid")),
]


def _bn_dtype(dtype):
    # Mixed precision keeps BatchNorm parameters in fp32 (autocast, timm's AMP).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dw_case(shape, dtype, layout, act="relu6", training=True, device="cpu"):
    n, c, h, w, k, stride, dil, pad = shape
    g, b, rm, rv = bn_params(c, device, _bn_dtype(dtype))
    tensors = dict(x=make_input((n, c, h, w), dtype, layout, device),
                   weight=conv_weight((c, 1, k, k), dtype, device), bn_weight=g, bn_bias=b,
                   running_mean=rm, running_var=rv)
    kwargs = dict(stride=stride, padding=pad, dilation=dil, act=act, training=training)
    return tensors, kwargs


def pw_case(shape, dtype, layout, act="relu6", training=True, device="cpu"):
    n, cin, cout, h, w, with_res = shape
    g, b, rm, rv = bn_params(cout, device, _bn_dtype(dtype))
    tensors = dict(x=make_input((n, cin, h, w), dtype, layout, device),
                   weight=conv_weight((cout, cin, 1, 1), dtype, device), bn_weight=g, bn_bias=b,
                   running_mean=rm, running_var=rv)
    if with_res:
        other = "contiguous" if layout != "contiguous" else "channels_last"
        tensors["residual"] = make_input((n, cout, h, w), dtype, other, device)
    return tensors, dict(act=act, training=training)


def mix_case(shape, dtype, layout, act="relu6", training=True, device="cpu"):
    n, h, w, groups, stride, dil = shape
    c = sum(ci for ci, _ in groups)
    g, b, rm, rv = bn_params(c, device, _bn_dtype(dtype))
    tensors = dict(x=make_input((n, c, h, w), dtype, layout, device),
                   weights=[conv_weight((ci, 1, k, k), dtype, device) for ci, k in groups],
                   bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv)
    return tensors, dict(stride=stride, dilation=dil, act=act, training=training)


def ir_case(shape, dtype, layout, training=True, device="cpu"):
    n, cin, cout, h, w, t, k, stride, with_se, (act, se_act, se_gate) = shape
    mid = cin * t

    def stage(cout_, cin_, k_):
        wshape = (cout_, 1, k_, k_) if cin_ == 1 else (cout_, cin_, 1, 1)
        return [conv_weight(wshape, dtype, device), *bn_params(cout_, device, _bn_dtype(dtype))]

    se = []
    if with_se:
        r = max(1, mid // 4)
        se = [conv_weight((r, mid, 1, 1), dtype, device), torch.randn(r, device=device).to(dtype),
              conv_weight((mid, r, 1, 1), dtype, device),
              torch.randn(mid, device=device).to(dtype)]
    tensors = dict(x=make_input((n, cin, h, w), dtype, layout, device),
                   expand=stage(mid, cin, 1) if t != 1 else [], depthwise=stage(mid, 1, k),
                   se=se, project=stage(cout, mid, 1))
    return tensors, dict(stride=stride, act=act, se_act=se_act, se_gate=se_gate,
                         training=training)


# ---- depthwise -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=str)
def test_dwconv_fp32(backend, shape, layout, training):
    check_op("dwconv_bn_act", *dw_case(shape, torch.float32, layout, training=training),
             backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DW_SHAPES[:4], ids=str)
def test_dwconv_dtypes(backend, shape, dtype, training):
    check_op("dwconv_bn_act", *dw_case(shape, dtype, "channels_last", training=training),
             backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_dwconv_acts(backend, act):
    for training in (True, False):
        check_op("dwconv_bn_act", *dw_case(DW_SHAPES[0], torch.float32, "channels_last", act,
                                           training), backend, torch.float32)


# ---- pointwise -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", PW_SHAPES, ids=str)
def test_pwconv_fp32(backend, shape, layout, training):
    check_op("pwconv_bn_act", *pw_case(shape, torch.float32, layout, training=training),
             backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PW_SHAPES[:4], ids=str)
def test_pwconv_dtypes(backend, shape, dtype, training):
    check_op("pwconv_bn_act", *pw_case(shape, dtype, "channels_last", training=training),
             backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_pwconv_acts(backend, act):
    for training in (True, False):
        check_op("pwconv_bn_act", *pw_case(PW_SHAPES[1], torch.float32, "contiguous", act,
                                           training), backend, torch.float32)


# Output channel counts whose GEMM panels differ on AVX-512 (cpu_gemm.h shapes_for): 8 -> one
# vector, 24 -> three 256-bit vectors, 32 -> 2 x 12 rows, 48 -> 3 x 8, 64 -> 4 x 6.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cout", [8, 24, 32, 48, 64])
def test_pwconv_every_panel_shape(backend, cout):
    for training, residual in ((True, False), (False, True)):
        check_op("pwconv_bn_act", *pw_case((2, 40, cout, 7, 11, residual), torch.float32,
                                           "channels_last", "silu", training),
                 backend, torch.float32)


# Training keeps the statistics' GEMM result y = conv1x1(x) (the op's conv_out: fp32, fp64 for
# fp64) and makes the output from it; the backward reads it instead of running the GEMM again.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pwconv_training_keeps_conv_output(backend, dtype, layout):
    for shape in ((2, 72, 19, 5, 7, True), (1, 64, 48, 6, 3, False), (2, 63, 33, 3, 4, True),
                  (2, 8, 21, 5, 7, True)):
        check_op("pwconv_bn_act", *pw_case(shape, dtype, layout, "hswish", training=True),
                 backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pwconv_training_large_output(backend):
    # A 17 MB y, beyond the L2 and most of the L3.
    # silu: smooth, so that none of the 4.3M pre-activations' fp32 rounding crosses a kink
    check_op("pwconv_bn_act", *pw_case((1, 8, 64, 260, 260, True), torch.float32,
                                       "channels_last", "silu", training=True),
             backend, torch.float32)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 24, 100, 56, 56, True), (3, 160, 96, 7, 7, False),
                                   (1, 3, 17, 5, 3, True), (1, 64, 48, 3, 6, True)], ids=str)
def test_pwconv_backward_from_conv_out(shape, dtype):
    """The CPU forward's conv_out is y = conv1x1(x) in the statistics' dtype, channels_last
    (empty in eval); the backward given it returns the bits of the backward that recomputes y
    (the same tiles and blocks: many tiles, a partial last panel here). dy is made inside the
    GEMMs, or stored first where the grad_x GEMM splits its columns over the threads (the
    18-pixel case on 2 threads)."""
    n, cin, cout, h, w, res = shape
    x = make_input((n, cin, h, w), dtype, "strided_cl")
    weight = conv_weight((cout, cin, 1, 1), dtype)
    g, b, rm, rv = bn_params(cout)
    r = make_input((n, cout, h, w), dtype, "channels_last") if res else None
    op = torch.ops.effkernels
    out, mean, var, y = op.pwconv_bn_act(x, weight, g, b, rm, rv, r, "hswish", True, 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == acc and y.shape == (n, cout, h, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), torch.nn.functional.conv2d(x.double(), weight.double()),
                               rtol=1e-5 if acc == torch.float32 else 1e-12, atol=1e-5)
    go = torch.randn_like(out)
    recomputed = op.pwconv_bn_act_backward(go, x, weight, g, b, mean, var, r, "hswish", True,
                                           1e-5)
    read = op.pwconv_bn_act_backward(go, x, weight, g, b, mean, var, r, "hswish", True, 1e-5, y)
    for name, p, q in zip(("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias",
                           "grad_residual"), recomputed, read):
        assert torch.equal(p, q), name
    assert op.pwconv_bn_act(x, weight, g, b, rm, rv, r, "hswish", False, 1e-5)[3].numel() == 0
    # keep_conv_out=False (no backward to come): y not returned, the same results.
    out2, mean2, var2, y2 = op.pwconv_bn_act(x, weight, g, b, rm, rv, r, "hswish", True, 1e-5,
                                             False)
    assert y2.numel() == 0
    assert torch.equal(out2, out) and torch.equal(mean2, mean) and torch.equal(var2, var)


@needs_cpu_kernels
def test_pwconv_keeps_conv_out_only_for_a_backward(monkeypatch):
    """effkernels.ops asks the CPU op for conv_out in training only where autograd will run a
    backward (grad mode on and a tensor that requires grad)."""
    seen = []
    real = ops._call

    def spy(impl, name, *args):
        result = real(impl, name, *args)
        if name == "pwconv_bn_act":
            seen.append(result[3].numel() > 0)
        return result
    monkeypatch.setattr(ops, "_call", spy)
    x = make_input((2, 8, 5, 6), torch.float32, "channels_last")
    weight = conv_weight((12, 8, 1, 1), torch.float32)
    g, b, rm, rv = bn_params(12)
    with effkernels.backend("cpu"):
        ops.pwconv_bn_act(x, weight, g, b, rm, rv, training=True)
        ops.pwconv_bn_act(x, weight.requires_grad_(), g, b, rm, rv, training=True)
        with torch.no_grad():
            ops.pwconv_bn_act(x, weight, g, b, rm, rv, training=True)
    assert seen == [False, True, False]


@needs_cpu_kernels
def test_pwconv_backward_conv_out_errors():
    """A conv_out that is not the forward's (format, dtype, shape) is refused, naming it."""
    x = make_input((2, 8, 5, 5), torch.float32)
    weight = conv_weight((4, 8, 1, 1), torch.float32)
    g, b, _, _ = bn_params(4)
    op = torch.ops.effkernels
    out, mean, var, y = op.pwconv_bn_act(x, weight, g, b, None, None, None, "relu", True, 1e-5)
    for bad in (y.contiguous(), y.double(), y[:1]):
        with pytest.raises(RuntimeError, match=r"pwconv_bn_act_backward: conv_out must be the "
                                               r"forward's \(N, Cout, H, W\) = \(2, 4, 5, 5\)"):
            op.pwconv_bn_act_backward(torch.randn_like(out), x, weight, g, b, mean, var, None,
                                      "relu", True, 1e-5, bad)


def _block_diagonal_case(dtype, training, layout="channels_last", groups=((20, 60), (20, 60))):
    """A grouped 1x1 conv as effkernels.nn passes it: the block-diagonal dense weight (the CPU
    kernel skips each panel's all-zero input channels)."""
    cin, cout = sum(g[0] for g in groups), sum(g[1] for g in groups)
    tensors, kwargs = pw_case((2, cin, cout, 9, 11, False), dtype, layout, "silu", training)
    blocks = [conv_weight((co, ci, 1, 1), dtype).flatten(1) for ci, co in groups]
    tensors["weight"] = torch.block_diag(*blocks)[:, :, None, None]
    return tensors, kwargs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_pwconv_block_diagonal_weight(backend, dtype, training):
    check_op("pwconv_bn_act", *_block_diagonal_case(dtype, training), backend, dtype)
    check_op("pwconv_bn_act", *_block_diagonal_case(dtype, training, "strided",
                                                    ((7, 40), (13, 9), (30, 20))), backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pwconv_block_diagonal_weight_nan_like_dense_conv(backend):
    """Skipping zero weights is exact for finite x only: a NaN in x reaches every output channel
    of its pixel, as in F.conv2d with the dense weight (0 * NaN = NaN)."""
    import effkernels
    from effkernels import ops, reference
    tensors, kwargs = _block_diagonal_case(torch.float32, False)
    tensors["x"] = tensors["x"].clone()
    tensors["x"][1, 3, 4, 5] = float("nan")
    with effkernels.backend(backend), torch.no_grad():
        y = ops.pwconv_bn_act(**tensors, **kwargs)
    y_ref = reference.pwconv_bn_act(**tensors, **kwargs)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.isnan(y[1, :, 4, 5]).all() and torch.isnan(y).sum() == y.shape[1]


# ---- mixconv -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", MIX_SHAPES, ids=str)
def test_mixconv_fp32(backend, shape, layout, training):
    check_op("mixconv_bn_act", *mix_case(shape, torch.float32, layout, "silu", training),
             backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixconv_dtypes(backend, dtype):
    check_op("mixconv_bn_act", *mix_case(MIX_SHAPES[0], dtype, "channels_last"), backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "channels_last"),
                                          (torch.float32, "contiguous"),
                                          (torch.float64, "channels_last"),
                                          (torch.bfloat16, "strided_cl")], ids=str)
@pytest.mark.parametrize("op,shape", WIDE_SHAPES, ids=[f"{o}-{s}" for o, s in WIDE_SHAPES])
def test_depthwise_wide_groups(backend, op, shape, dtype, layout, training):
    make = dw_case if op == "dwconv_bn_act" else mix_case
    check_op(op, *make(shape, dtype, layout, training=training), backend, dtype)


# ---- inverted residual ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", IR_SHAPES, ids=str)
def test_inverted_residual_fp32(backend, shape, layout, training):
    check_op("inverted_residual", *ir_case(shape, torch.float32, layout, training), backend,
             torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inverted_residual_dtypes(backend, dtype):
    check_op("inverted_residual", *ir_case(IR_SHAPES[1], dtype, "channels_last"), backend,
             dtype)


# ---- on a GPU: the same checks for the CUDA-device backends ---------------------------------
# Per op: the cuda backend has C++ kernels for some ops only, and a (backend, op) pair without
# kernels is skipped with the reason rather than claimed.

GPU_CASES = {"dwconv_bn_act": (dw_case, DW_SHAPES), "pwconv_bn_act": (pw_case, PW_SHAPES),
             "mixconv_bn_act": (mix_case, MIX_SHAPES), "inverted_residual": (ir_case, IR_SHAPES)}
GPU_PARAMS = [pytest.param(op, b.values[0], marks=b.marks, id=f"{op}-{b.id}")
              for op in GPU_CASES for b in gpu_backends_for(op)]


@pytest.mark.parametrize("op,backend", GPU_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_ops_on_gpu(op, backend, dtype, layout, request):
    case, shapes = GPU_CASES[op]
    if (op, backend, dtype, layout) == ("inverted_residual", "cuda", torch.float16, "strided"):
        # Seen on an H200 on 2026-11-30 (bench/NOTES.md): grad expand[0] 0.0098 against the rule's
        # 0.0075 (2x PyTorch's fp16 error + floor); the CPU backend passes the same case.
        request.node.add_marker(pytest.mark.xfail(
            strict=True, reason="CUDA composite block, fp16 strided: expand weight gradient "
                                "1.3x over the low-precision rule (open)"))
    if op == "inverted_residual" and dtype in (torch.float16, torch.bfloat16):
        # As on the CPU (test_inverted_residual_dtypes): the relu6 block of IR_SHAPES[0] misses
        # the 2x-PyTorch rule in half precision on the CPU backend too (bf16 and fp16 grad x,
        # kink flips: README, Known limits); its float32/float64 cases run.
        shapes = IR_SHAPES[1:2]
    for shape in shapes:
        for training in (True, False):
            tensors, kwargs = case(shape, dtype, layout, training=training, device="cuda")
            check_op(op, tensors, kwargs, backend, dtype)


@pytest.mark.parametrize("op,backend", GPU_PARAMS)
@pytest.mark.parametrize("layout", ["strided_cl"])
def test_ops_on_gpu_strided_cl(op, backend, layout):
    case, shapes = GPU_CASES[op]
    for shape in shapes:
        for training in (True, False):
            tensors, kwargs = case(shape, torch.float32, layout, training=training,
                                   device="cuda")
            check_op(op, tensors, kwargs, backend, torch.float32)


@pytest.mark.parametrize("op,backend", [p for p in GPU_PARAMS if p.values[0] != "inverted_residual"])
@pytest.mark.parametrize("act", ACTS + ["hsigmoid", "sigmoid"])
def test_acts_on_gpu(op, backend, act):
    case, shapes = GPU_CASES[op]
    for training in (True, False):
        check_op(op, *case(shapes[0], torch.float32, "channels_last", act, training,
                           device="cuda"), backend, torch.float32)


# ---- the eval-mode block without gradients on a GPU: both paths ------------------------------
# check_op's calls record gradients, so they take neither. By default CUDA tensors take the
# backend's ops composed (its fused block kernel is the slower there: effkernels/_backend.py);
# EFFK_FUSED_BLOCK=1 takes the fused kernel. (shape, dilation, skip): skip, stride 2 + SE, no
# expand + SE + skip, dilation 2 without the skip, a 1x1 output map.
IR_EVAL_CASES = [(IR_SHAPES[0], 1, None), (IR_SHAPES[1], 1, None), (IR_SHAPES[2], 1, None),
                 (IR_SHAPES[0], 2, False),
                 ((2, 8, 12, 2, 2, 2, 3, 2, True, ("hswish", "relu", "hsigmoid")), 1, None)]
FUSED_OP = {"cuda": "effkernels.inverted_residual_inference",
            "triton": "effkernels_triton.inverted_residual"}


@pytest.mark.parametrize("backend", [b for b in gpu_backends_for("inverted_residual")
                                     if b.values[0] in FUSED_OP])
@pytest.mark.parametrize("fused_block", [False, True], ids=["composed", "EFFK_FUSED_BLOCK=1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_inverted_residual_inference_on_gpu(backend, fused_block, dtype, layout, monkeypatch):
    if fused_block:
        monkeypatch.setenv("EFFK_FUSED_BLOCK", "1")
    else:
        monkeypatch.delenv("EFFK_FUSED_BLOCK", raising=False)
    # Half precision: not the relu6 block of IR_SHAPES[0] (see test_ops_on_gpu).
    lowp = dtype in (torch.float16, torch.bfloat16)
    for shape, dilation, skip in IR_EVAL_CASES:
        if lowp and shape is IR_SHAPES[0]:
            continue
        tensors, kwargs = ir_case(shape, dtype, layout, training=False, device="cuda")
        kwargs.update(dilation=dilation, skip=skip)
        with torch.no_grad(), effkernels.backend(backend), RecordOps() as mode:
            out = ops.inverted_residual(**tensors, **kwargs)
        assert (FUSED_OP[backend] in mode.names) == fused_block, mode.names
        assert (f"{FUSED_OP[backend].split('.')[0]}.pwconv_bn_act" in mode.names) \
            != fused_block, mode.names
        x = tensors["x"]
        assert out.dtype == dtype and out.is_contiguous(
            memory_format=torch._prims_common.suggest_memory_format(x))

        def ref(cast=None):
            t = {k: ([u.to(cast) for u in v] if isinstance(v, list) else v.to(cast))
                 if cast else v for k, v in tensors.items()}
            return reference.inverted_residual(**t, **kwargs)
        if lowp:
            assert_lowp_close(out, ref(torch.float64), ref(), dtype, f"{shape} out")
        else:
            assert_close(out, ref(torch.float64), dtype, f"{shape} out")
        # Without a dispatch mode the call goes below Autograd where it can: same path, result.
        with torch.no_grad(), effkernels.backend(backend):
            assert torch.equal(ops.inverted_residual(**tensors, **kwargs), out)
