"""The fused Triton inverted_residual (triton_kernels/inverted_residual.py) against the float64
reference (effkernels.reference.inverted_residual): output, every gradient (x, each stage's
weight / bn_weight / bn_bias, SE's four tensors) and the running statistics (check_op), in
training and eval, with and without expansion, SE and the skip, stride 1 and 2, dilation 2,
k = 3 and 5, odd sizes, N = 1 and 2, both memory formats and their strided views; fp32, bf16,
fp16, fp64; the tile loops (several pixel tiles, hidden blocks, Cin blocks and Cout blocks);
plus gradcheck, opcheck, that neither the forward composes the unfused ops nor the autograd node
saves the expanded tensor, determinism, double backward refused, empty input, argument errors.

The interpreter is slow: tiny shapes. Under TRITON_INTERPRET=1 bf16 dots run on operands upcast
to fp32 (see pwconv_bn_act.py): the bf16 tensor-core dot is proven only by compiled runs."""
import pytest
import torch

import effkernels
from effkernels import ops, reference
from effkernels.triton_kernels import inverted_residual as ir

from ..helpers import RecordOps, assert_close, bn_params, conv_weight, make_input
from ..opcase import check_op
from ..test_ops import ir_case


@pytest.fixture(autouse=True)
def _need_triton(device):
    status = effkernels.available_backends(device)["triton"]
    if status != "available":
        pytest.skip(f"triton: {status}")


def _case(shape, dtype, layout, training, device, dilation=1, skip=None):
    tensors, kwargs = ir_case(shape, dtype, layout, training, device)
    kwargs.update(dilation=dilation, skip=skip)
    return tensors, kwargs


# (N, Cin, Cout, H, W, expand ratio, k, stride, SE, (act, se_act, se_gate)) as in
# tests/test_ops.IR_SHAPES; then layout, training, dilation, skip (None: the default rule).
A = (2, 8, 8, 7, 11, 3, 3, 1, False, ("relu6", "relu", "sigmoid"))     # skip, 7x11
B = (1, 6, 10, 9, 9, 4, 5, 2, True, ("hswish", "relu", "hsigmoid"))    # k5, stride 2, SE, N=1
C = (2, 8, 8, 6, 7, 1, 3, 1, True, ("silu", "silu", "sigmoid"))        # no expand, SE, skip
CASES = [
    (A, "channels_last", True, 1, None),
    (A, "contiguous", False, 1, None),
    (B, "contiguous", True, 1, None),
    (B, "channels_last", False, 1, None),
    (C, "channels_last", True, 1, None),
    (C, "contiguous", False, 1, None),
    ((1, 5, 5, 7, 11, 3, 3, 1, False, ("relu", "relu", "sigmoid")), "strided_cl", True, 2,
     None),                                                            # dilation 2, C=5, skip
    ((2, 7, 9, 11, 7, 2, 3, 2, True, ("hswish", "silu", "sigmoid")), "strided", True, 1,
     None),                                                            # stride 2 on odd sizes
    ((2, 6, 6, 5, 6, 2, 5, 1, True, ("relu6", "relu", "hsigmoid")), "channels_last", False, 1,
     False),                                                           # Cin == Cout, no skip
    ((2, 5, 3, 8, 7, 1, 3, 2, False, ("hswish", "relu", "sigmoid")), "contiguous", True, 2,
     None),                                                            # no expand, s2, dil 2
]


@pytest.mark.parametrize("shape,layout,training,dilation,skip", CASES,
                         ids=[f"{s[:8]}{'-se' if s[8] else ''}-{lay}-"
                              f"{'train' if t else 'eval'}-d{d}{'-noskip' if sk is False else ''}"
                              for s, lay, t, d, sk in CASES])
def test_fp32(shape, layout, training, dilation, skip, device):
    check_op("inverted_residual",
             *_case(shape, torch.float32, layout, training, device, dilation, skip),
             "triton", torch.float32)


# fp64 takes a sigmoid SE gate: F.hardsigmoid's float64 CPU backward uses 1/6 rounded to float32
# (3e-8 relative, above fp64's 1e-10), ours the exact 1/6; the oracle is exact only where it
# avoids F.hardsigmoid.
B64 = B[:9] + (("hswish", "relu", "sigmoid"),)


@pytest.mark.parametrize("dtype,training,shape", [(torch.bfloat16, True, B),
                                                  (torch.float16, False, B),
                                                  (torch.float64, True, B64),
                                                  (torch.float64, False, B64)], ids=str)
def test_dtypes(dtype, training, shape, device):
    """bf16/fp16: at most 2x PyTorch's own error in that dtype against float64 (check_op);
    fp64 to 1e-10."""
    check_op("inverted_residual", *_case(shape, dtype, "channels_last", training, device),
             "triton", dtype)


def test_tile_loops(device, monkeypatch):
    """The GPU tiling under the interpreter: 32-pixel tiles (3 per image), 32-channel hidden
    blocks (2), and Cin / Cout capped at 16 per block, so Cin = Cout = 20 loops over two Cin
    blocks and splits Cout over two programs. Training: every pass (statistics, pool, out)."""
    monkeypatch.setattr(ir, "_FORCED_CONFIG", 1)
    monkeypatch.setattr(ir, "MAX_BLOCK_CI", 16)
    monkeypatch.setattr(ir, "MAX_BLOCK_CO", 16)
    assert ir._blocks(20, 40, 20, 90) == (32, 16, 32, 16, 4)
    shape = (2, 20, 20, 9, 10, 2, 3, 1, True, ("relu6", "relu", "sigmoid"))
    check_op("inverted_residual", *_case(shape, torch.float32, "channels_last", True, device),
             "triton", torch.float32)


# Eval-mode blocks on CUDA tensors compose the Triton ops (faster than the fused block on a GPU;
# effkernels/_backend.py) unless EFFK_FUSED_BLOCK=1: that composition here (on CPU tensors in
# the interpreter), and on a GPU which path each setting takes.
@pytest.mark.parametrize("shape,layout,training,dilation,skip", CASES,
                         ids=[f"{s[:8]}{'-se' if s[8] else ''}-{lay}-d{d}"
                              f"{'-noskip' if sk is False else ''}"
                              for s, lay, _, d, sk in CASES])
def test_composed_eval(shape, layout, training, dilation, skip, device):
    """ops._composed_inference on the Triton ops against the float64 reference, in x's format
    (every case of test_fp32, in eval)."""
    tensors, kw = _case(shape, torch.float32, layout, False, device, dilation, skip)
    x, e, d, se, p = (tensors[k] for k in ("x", "expand", "depthwise", "se", "project"))
    if kw["skip"] is None:
        kw["skip"] = kw["stride"] == 1 and x.shape[1] == p[0].shape[0]
    out = ops._composed_inference("triton", x, e, d, se, p, kw["stride"], dilation, kw["act"],
                                  kw["se_act"], kw["se_gate"], kw["skip"], 1e-5)
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
    ref = reference.inverted_residual(
        x.double(), *([t.double() for t in st] for st in (e, d, se, p)),
        **{k: v for k, v in kw.items() if k != "training"})
    assert_close(out, ref, torch.float32, "out")


@pytest.mark.parametrize("fused_block", [False, True], ids=["default", "EFFK_FUSED_BLOCK=1"])
def test_eval_block_path(device, fused_block, monkeypatch):
    """ops.inverted_residual in eval without gradients: CPU tensors (the interpreter) take the
    fused Triton block either way; CUDA tensors the Triton ops composed, unless
    EFFK_FUSED_BLOCK=1. Both match the reference."""
    if fused_block:
        monkeypatch.setenv("EFFK_FUSED_BLOCK", "1")
    else:
        monkeypatch.delenv("EFFK_FUSED_BLOCK", raising=False)
    x, exp, dw, se, proj = _tiny(device, False, torch.float32, shape=(2, 4, 6, 5))
    with torch.no_grad(), effkernels.backend("triton"), RecordOps() as mode:
        out = ops.inverted_residual(x, exp, dw, se, proj, act="hswish", se_gate="hsigmoid")
    fused = device == "cpu" or fused_block
    assert ("effkernels_triton.inverted_residual" in mode.names) == fused, mode.names
    assert ("effkernels_triton.pwconv_bn_act" in mode.names) == (not fused), mode.names
    ref = reference.inverted_residual(
        x.double(), *([t.double() for t in st] for st in (exp, dw, se, proj)), act="hswish",
        se_gate="hsigmoid")
    assert_close(out, ref, torch.float32, "out")


def _tiny(device, training, dtype=torch.float64, expand=True, se=True, shape=(1, 3, 4, 5)):
    """(x, expand, depthwise, se, project) with Cout == Cin (skip), hidden 2*Cin."""
    n, cin, h, w = shape
    mid = 2 * cin if expand else cin

    def stage(cout, cin_, k=None):
        wshape = (cout, 1, k, k) if k else (cout, cin_, 1, 1)
        g, b, rm, rv = (t.to(dtype) for t in bn_params(cout, device))
        return [conv_weight(wshape, dtype, device), g, b, rm, rv]
    x = make_input(shape, dtype, "channels_last", device)
    se_t = [conv_weight((2, mid, 1, 1), dtype, device), torch.randn(2, device=device).to(dtype),
            conv_weight((mid, 2, 1, 1), dtype, device),
            torch.randn(mid, device=device).to(dtype)] if se else []
    return x, stage(mid, cin) if expand else [], stage(mid, 1, 3), se_t, stage(cin, mid)


def test_gradcheck_fp64(device):
    """Training mode, every differentiable input (x, and all parameters packed in one vector,
    cut into the op's tensors inside fn: fast mode perturbs each gradcheck input along one
    random direction, so two inputs take a handful of interpreted forwards, not dozens). Eval
    mode's gradients are held to the float64 reference at 1e-10 by check_op (test_dtypes)."""
    x, exp, dw, se, proj = _tiny(device, True)
    params = [*exp[:3], *dw[:3], *se, *proj[:3]]
    flat = torch.cat([t.reshape(-1) for t in params]).requires_grad_()
    x.requires_grad_()

    def fn(x, flat):
        ts = [c.view(t.shape) for c, t in zip(flat.split([t.numel() for t in params]), params)]
        return ops.inverted_residual(
            x, [*ts[0:3], exp[3].clone(), exp[4].clone()],
            [*ts[3:6], dw[3].clone(), dw[4].clone()], ts[6:10],
            [*ts[10:13], proj[3].clone(), proj[4].clone()], stride=1, dilation=1,
            act="hswish", se_act="silu", se_gate="sigmoid", training=True)
    with effkernels.backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, flat), eps=1e-6, atol=1e-6, rtol=1e-5,
                                        fast_mode=True)


def test_opcheck(device):
    x, exp, dw, se, proj = _tiny(device, True)
    for t in [x, *exp[:3], *dw[:3], *se, *proj[:3]]:
        t.requires_grad_()
    args = (x, exp, dw, se, proj, 1, 1, "relu6", "relu", "hsigmoid", True, True, 1e-5)
    torch.library.opcheck(torch.ops.effkernels_triton.inverted_residual.default, args)
    out, stats = torch.ops.effkernels_triton.inverted_residual(*args)
    d = lambda ts: [t.detach() for t in ts]  # noqa: E731
    bargs = (torch.randn_like(out), x.detach(), d(exp[:3]), d(dw[:3]), d(se), d(proj[:3]),
             d(stats), *args[5:])
    torch.library.opcheck(torch.ops.effkernels_triton.inverted_residual_backward.default,
                          bargs)


def test_forward_is_fused(device, monkeypatch):
    """The forward never calls the unfused pw/dw ops (which would write the expanded tensor):
    with them disabled it still runs, and matches the reference."""
    def refuse(*args, **kwargs):
        raise AssertionError("the fused forward called an unfused op")
    x, exp, dw, se, proj = _tiny(device, True, torch.float32, shape=(2, 4, 6, 5))
    ref = reference.inverted_residual(x.double(), [t.double() for t in exp],
                                      [t.double() for t in dw], [t.double() for t in se],
                                      [t.double() for t in proj], act="relu6", training=True)
    monkeypatch.setattr(ir._pw, "forward", refuse)
    monkeypatch.setattr(ir._dw, "forward", refuse)
    out, _ = torch.ops.effkernels_triton.inverted_residual(
        x, exp, dw, se, proj, 1, 1, "relu6", "relu", "sigmoid", True, True, 1e-5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def test_saves_no_hidden_activation(device):
    """The autograd node saves x, parameters and statistics, never an (N, hidden, *, *)
    activation; the unfused composition (reference backend) does, so the hook sees them."""
    x, exp, dw, se, proj = _tiny(device, True, torch.float32, shape=(2, 4, 6, 5))
    n, mid = x.shape[0], exp[0].shape[0]
    for t in [x, *exp[:3], *dw[:3], *se, *proj[:3]]:
        t.requires_grad_()

    def run():
        return ops.inverted_residual(x, exp, dw, se, proj, act="relu6", training=True)

    def hidden(shapes):
        return [s for s in shapes if len(s) == 4 and s[:2] == (n, mid) and s[2] * s[3] > 1]
    with effkernels.backend("reference"):
        _, ref_shapes = _saved_shapes(run)
    assert hidden(ref_shapes), "control: the composition should save hidden activations"
    with effkernels.backend("triton"):
        out, shapes = _saved_shapes(run)
    assert shapes, "the triton op saved nothing: is autograd registered?"
    assert not hidden(shapes), f"saved a hidden activation: {shapes}"
    saved = sum(torch.Size(s).numel() for s in shapes)
    params = sum(t.numel() for t in [*exp, *dw, *se, *proj])
    assert saved <= x.numel() + params, f"saved {saved} elements: {shapes}"
    out.sum().backward()  # the saved tensors suffice
    assert x.grad is not None and exp[0].grad is not None and se[0].grad is not None


def test_double_backward_refused(device):
    x, exp, dw, se, proj = _tiny(device, True, torch.float32, se=False)
    x.requires_grad_()
    with effkernels.backend("triton"):
        out = ops.inverted_residual(x, exp, dw, se, proj, training=True)
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()


def test_deterministic(device):
    x, exp, dw, se, proj = _tiny(device, True, torch.float32, shape=(2, 4, 6, 5))
    args = (x, exp, dw, se, proj, 1, 1, "relu6", "relu", "sigmoid", True, True, 1e-5)
    (o1, s1), (o2, s2) = (torch.ops.effkernels_triton.inverted_residual(*args)
                          for _ in range(2))
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_empty_falls_back(device):
    """N = 0 is not fused: the composed Triton ops, same shapes as the reference."""
    x, exp, dw, se, proj = _tiny(device, False, torch.float32, shape=(0, 4, 6, 5))
    out, stats = torch.ops.effkernels_triton.inverted_residual(
        x, exp, dw, se, proj, 1, 1, "relu6", "relu", "sigmoid", True, False, 1e-5)
    assert out.shape == (0, 4, 6, 5) and len(stats) == 6
    torch.testing.assert_close(stats[0], exp[3])  # eval: the running statistics


def test_int32_overflow_falls_back(device, monkeypatch):
    """Images past int32 offsets take the composed ops (faked here: no 2**31-element tensor),
    and give the block's result, not the fused kernel's."""
    x, exp, dw, se, proj = _tiny(device, True, torch.float32, shape=(2, 4, 6, 5))
    monkeypatch.setattr(ir, "_offsets_fit_int32", lambda *args: False)
    monkeypatch.setattr(ir, "_ir_kernel", None)  # launching it would raise
    out, _ = torch.ops.effkernels_triton.inverted_residual(
        x, exp, dw, se, proj, 1, 1, "relu6", "relu", "sigmoid", True, True, 1e-5)
    ref = reference.inverted_residual(x.double(), [t.double() for t in exp],
                                      [t.double() for t in dw], [t.double() for t in se],
                                      [t.double() for t in proj], act="relu6", training=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_argument_errors(device):
    x, exp, dw, se, proj = _tiny(device, True, torch.float32, se=False)
    op = torch.ops.effkernels_triton.inverted_residual
    with pytest.raises(ValueError, match="inverted_residual: skip needs stride 1"):
        op(x, exp, dw, se, proj, 2, 1, "relu6", "relu", "sigmoid", True, True, 1e-5)
    # An even kernel at stride 1 shrinks the map by one: the skip cannot be added.
    even = [torch.randn_like(dw[0][..., :2, :2])] + dw[1:]
    with pytest.raises(ValueError, match=r"skip needs .* an output as large as x; got stride 1"):
        op(x, exp, even, se, proj, 1, 1, "relu6", "relu", "sigmoid", True, True, 1e-5)
    bad = [proj[0][:, :3]] + proj[1:]
    with pytest.raises(ValueError, match=r"inverted_residual: project weight must have shape"):
        op(x, exp, dw, se, bad, 1, 1, "relu6", "relu", "sigmoid", True, True, 1e-5)
    with pytest.raises(ValueError, match="inverted_residual: se must be"):
        op(x, exp, dw, [se for se in proj[:2]], proj, 1, 1, "relu6", "relu", "sigmoid", True,
           True, 1e-5)
    with pytest.raises(ValueError, match="inverted_residual: act must be one of"):
        op(x, exp, dw, se, proj, 1, 1, "gelu", "relu", "sigmoid", True, True, 1e-5)
