"""The Triton pwconv_bn_act (triton_kernels/pwconv_bn_act.py) against the float64 reference:
output, every gradient and the running statistics (check_op), over odd shapes, layouts,
training/eval, every activation, every dtype and every autotune config; plus opcheck,
gradcheck, determinism, empty inputs and argument errors.

Under TRITON_INTERPRET=1 bf16 runs with its tl.dot operands upcast to fp32 (the interpreter's
bf16 dot is broken): the bf16 tensor-core path is only proven when these tests run compiled on
a GPU."""
import os
import zlib

import pytest
import torch

import effkernels
from effkernels import ops
from effkernels.triton_kernels import pwconv_bn_act as pw
from effkernels.triton_kernels.activation import CODES

from ..helpers import bn_params, conv_weight, make_input
from ..opcase import check_op
from ..test_ops import LAYOUTS, PW_SHAPES, pw_case

# P = 2*12*12 = 288 pixel rows: ragged last tiles (64-row statistic tiles and 128-row ones) and
# two grad_weight pixel chunks (split-K); Cin = 5, Cout = 6 exercise the masks.
SPLIT_SHAPE = (2, 5, 6, 12, 12, True)


@pytest.fixture(autouse=True)
def _need_triton(device):
    status = effkernels.available_backends(device)["triton"]
    if status != "available":
        pytest.skip(f"triton: {status}")


@pytest.fixture(autouse=True)
def _spread_configs(request, monkeypatch):
    """Compiled on a GPU, each test forces one autotune config picked from its name: every
    config runs under varied shapes and epilogues, and a test compiles each kernel variant once
    rather than once per config (test_autotuned covers the autotuner itself). The interpreter
    takes one config anyway."""
    if os.environ.get("TRITON_INTERPRET") == "1" or "autotuned" in request.node.name:
        yield
        return
    monkeypatch.setattr(pw, "_FORCED_CONFIG",
                        zlib.crc32(request.node.name.encode()) % len(pw.CONFIGS))
    pw._gemm.cache.clear()
    yield
    pw._gemm.cache.clear()


def _check(shape, dtype, layout, device, act="relu6", training=True):
    check_op("pwconv_bn_act", *pw_case(shape, dtype, layout, act, training, device=device),
             "triton", dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", PW_SHAPES + [SPLIT_SHAPE], ids=str)
def test_pwconv_fp32(shape, layout, training, device):
    _check(shape, torch.float32, layout, device, training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_pwconv_dtypes(dtype, training, device):
    _check(PW_SHAPES[1], dtype, "channels_last", device, training=training)


@pytest.mark.parametrize("act", list(CODES))
def test_pwconv_acts(act, device):
    _check(PW_SHAPES[1], torch.float32, "channels_last", device, act=act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("config", range(len(pw.CONFIGS)),
                         ids=[f"m{c[0]}n{c[1]}k{c[2]}w{c[3]}s{c[4]}" for c in pw.CONFIGS])
def test_pwconv_every_config(config, dtype, device, monkeypatch):
    """Each autotune config's code path, forced (the statistics / dgamma-dbeta passes take the
    BLOCK_M = 64 config closest to it)."""
    monkeypatch.setattr(pw, "_FORCED_CONFIG", config)
    pw._gemm.cache.clear()
    try:
        _check(SPLIT_SHAPE, dtype, "channels_last", device, act="hswish")
    finally:
        pw._gemm.cache.clear()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_autotuned(dtype, device):
    """The autotuner's own choice (benchmarking every surviving config on a GPU)."""
    pw._gemm.cache.clear()
    _check(SPLIT_SHAPE, dtype, "channels_last", device, act="relu6")


def _pw_args(device, dtype, training, residual, shape=(2, 6, 5, 7), cout=6):
    n, cin, h, w = shape
    x = make_input(shape, dtype, "channels_last", device)
    wt = conv_weight((cout, cin, 1, 1), dtype, device)
    g, b, rm, rv = (t.to(dtype) for t in bn_params(cout, device))
    res = make_input((n, cout, h, w), dtype, "contiguous", device) if residual else None
    return [x, wt, g, b, rm, rv, res, "relu6", training, 1e-5]


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training, residual, device):
    args = _pw_args(device, torch.float64, training, residual)
    for i in (0, 1, 2, 3, 6):
        if args[i] is not None:
            args[i] = args[i].requires_grad_()
    torch.library.opcheck(torch.ops.effkernels_triton.pwconv_bn_act.default, tuple(args))
    out, mean, var, _ = torch.ops.effkernels_triton.pwconv_bn_act(*args)
    d = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bargs = (torch.randn_like(out), *d[:4], mean, var, d[6], *d[7:])
    torch.library.opcheck(torch.ops.effkernels_triton.pwconv_bn_act_backward.default, bargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(training, device):
    x, w, g, b, rm, rv, res, act, _, _ = _pw_args(device, torch.float64, training, True,
                                                  shape=(1, 3, 2, 3), cout=4)
    leaves = [t.requires_grad_() for t in (x, w, g, b, res)]

    def fn(x, w, g, b, res):
        return ops.pwconv_bn_act(x, w, g, b, rm.clone(), rv.clone(), act="hswish",
                                 residual=res, training=training)
    with effkernels.backend("triton"):
        assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic(dtype, device):
    """Forward and backward twice: the same bits (no atomics, fixed reduction order)."""
    n, cin, cout, h, w, _ = SPLIT_SHAPE
    args = _pw_args(device, dtype, True, True, shape=(n, cin, h, w), cout=cout)
    runs = []
    for _ in range(2):
        out, mean, var, _ = torch.ops.effkernels_triton.pwconv_bn_act(*args)
        grad = torch.linspace(-1, 1, out.numel(), device=device).view(out.shape).to(dtype)
        grads = torch.ops.effkernels_triton.pwconv_bn_act_backward(
            grad, *args[:4], mean, var, args[6], *args[7:])
        runs.append((out, mean, var, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty(training, device):
    for shape, cout in (((0, 5, 3, 4), 6), ((2, 5, 0, 4), 6), ((2, 0, 3, 4), 6),
                        ((2, 5, 3, 4), 0)):
        args = _pw_args(device, torch.float32, training, True, shape=shape, cout=cout)
        out, mean, var, _ = torch.ops.effkernels_triton.pwconv_bn_act(*args)
        assert out.shape == (shape[0], cout, shape[2], shape[3])
        assert mean.shape == var.shape == (cout,)
        if shape[1] == 0 and out.numel():  # y = 0: the output is act(BN(0) + residual)
            scale, shift = pw.batchnorm.fold(args[2], args[3], mean, var, 1e-5)
            ref = torch.clamp(shift.view(1, -1, 1, 1) + args[6], 0, 6)
            torch.testing.assert_close(out, ref)
        grads = torch.ops.effkernels_triton.pwconv_bn_act_backward(
            torch.ones_like(out), *args[:4], mean, var, args[6], *args[7:])
        for g, t in zip(grads, (args[0], args[1], args[2], args[3], args[6])):
            assert g.shape == t.shape and not g.isnan().any()


def test_argument_errors(device):
    args = _pw_args(device, torch.float32, True, True)
    bad = list(args)
    bad[1] = args[1][:, :4]
    with pytest.raises(ValueError, match="pwconv_bn_act: weight must have shape"):
        torch.ops.effkernels_triton.pwconv_bn_act(*bad)
    bad = list(args)
    bad[6] = args[6][:, :3]
    with pytest.raises(ValueError, match="pwconv_bn_act: residual must have shape"):
        torch.ops.effkernels_triton.pwconv_bn_act(*bad)
    bad = list(args)
    bad[7] = "gelu"
    with pytest.raises(ValueError, match="pwconv_bn_act: act must be one of"):
        torch.ops.effkernels_triton.pwconv_bn_act(*bad)
    out, mean, var, conv_out = torch.ops.effkernels_triton.pwconv_bn_act(*args)
    assert conv_out.numel() == 0  # Triton keeps no y: its backward recomputes it
    with pytest.raises(ValueError, match="pwconv_bn_act_backward: grad_out must have shape"):
        torch.ops.effkernels_triton.pwconv_bn_act_backward(
            out[:, :2], *args[:4], mean, var, args[6], *args[7:])
    # A given conv_out is checked like the C++ backward's (then recomputed, not read).
    wrong = torch.empty(out.shape, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"pwconv_bn_act_backward: conv_out must be the "
                                         r"forward's \(2, 6, 5, 7\) channels_last"):
        torch.ops.effkernels_triton.pwconv_bn_act_backward(
            torch.ones_like(out), *args[:4], mean, var, args[6], *args[7:], wrong)


def test_autotune_off_keeps_one_config(monkeypatch):
    """EFFK_TRITON_AUTOTUNE=0 (the GPU test runs): one config per problem, so the autotuner
    benchmarks nothing; otherwise every fitting config is kept for it to time. Checked on the
    pruning itself, outside the interpreter's own one-config rule."""
    import triton
    import triton.language as tl

    monkeypatch.setattr(pw, "_INTERPRET", False)
    monkeypatch.setattr(pw, "_FORCED_CONFIG", None)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                             num_stages=s) for bm, bn, bk, w, s in pw.CONFIGS]
    args = dict(a_ptr=torch.empty(1, dtype=torch.float16), N=144, K_CHUNK=96, MODE=pw.FWD,
                ACC=tl.float32)
    monkeypatch.delenv("EFFK_TRITON_AUTOTUNE", raising=False)
    assert len(pw._prune(configs, args)) > 1
    monkeypatch.setenv("EFFK_TRITON_AUTOTUNE", "0")
    kept = pw._prune(configs, args)
    assert len(kept) == 1 and kept[0] in configs
