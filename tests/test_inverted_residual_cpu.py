"""The fused CPU inference block (effkernels::inverted_residual_inference,
csrc/cpu/inverted_residual.cpp) against the float64 reference block in eval mode, and the
routing of effkernels.ops.inverted_residual to it (inference) or to the composite (training,
gradients)."""
from __future__ import annotations

import textwrap

import pytest
import torch

import effkernels
from effkernels import ops, reference

from .helpers import (RecordOps, assert_close, assert_lowp_close, bn_params, conv_weight,
                      make_input, per_thread_count, run_with_isa)

pytestmark = pytest.mark.skipif(
    effkernels.available_backends("cpu")["cpu"] != "available",
    reason="the C++ CPU backend is not available")

OP = None if not hasattr(torch.ops, "effkernels") else torch.ops.effkernels


def _stage(w_shape, dtype):
    return [conv_weight(w_shape, dtype), *bn_params(w_shape[0], dtype=dtype)]


def make_block(cin, hidden, cout, k, se=False, dtype=torch.float64):
    """expand/depthwise/se/project lists (expand empty when hidden is None)."""
    expand = _stage((hidden, cin, 1, 1), dtype) if hidden else []
    c = hidden or cin
    depthwise = _stage((c, 1, k, k), dtype)
    se_list = []
    if se:
        cr = max(1, c // 4)
        se_list = [conv_weight((cr, c, 1, 1), dtype), torch.randn(cr, dtype=dtype) * 0.1,
                   conv_weight((c, cr, 1, 1), dtype), torch.randn(c, dtype=dtype) * 0.1 + 1.0]
    project = _stage((cout, c, 1, 1), dtype)
    return expand, depthwise, se_list, project


def _cast(block, dtype):
    return [[t.to(dtype) for t in stage] for stage in block]


# (N, Cin, H, W, hidden, Cout, k, stride, dilation, se, act, se_act, se_gate)
CASES = {
    "mbv2_s1_skip": (2, 24, 14, 14, 144, 24, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "mbv2_s2": (2, 24, 15, 13, 144, 32, 3, 2, 1, False, "relu6", "relu", "sigmoid"),
    "no_expand": (2, 32, 12, 10, None, 16, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "no_expand_se_skip": (1, 24, 9, 9, None, 24, 3, 1, 1, True, "silu", "silu", "sigmoid"),
    "k5_se_hsig": (2, 16, 12, 12, 72, 24, 5, 2, 1, True, "hswish", "relu", "hsigmoid"),
    "k5_s1_se_skip": (3, 20, 11, 7, 60, 20, 5, 1, 1, True, "hswish", "relu", "hsigmoid"),
    "k7_s1": (1, 12, 13, 9, 40, 12, 7, 1, 1, False, "silu", "relu", "sigmoid"),
    "k7_s2": (2, 12, 13, 9, 40, 20, 7, 2, 1, False, "relu", "relu", "sigmoid"),
    "dil2": (2, 16, 12, 14, 48, 16, 3, 1, 2, False, "relu6", "relu", "sigmoid"),
    "dil2_k5_s2_se": (1, 16, 17, 15, 48, 8, 5, 2, 2, True, "relu", "relu", "sigmoid"),
    "odd_7x11_c_odd": (1, 13, 7, 11, 37, 13, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "odd_7x11_s2_se": (3, 13, 7, 11, 37, 19, 3, 2, 1, True, "hswish", "relu", "hsigmoid"),
    # SE on a map with fewer pixels than output channels: the gates multiply the depthwise
    # rows (the others above fold them into per-image project panels); 3 images: groups of 2.
    "se_gate_rows_7x7": (3, 40, 7, 7, 120, 64, 5, 1, 1, True, "hswish", "relu", "hsigmoid"),
    "k9_generic": (1, 8, 12, 12, 24, 8, 9, 1, 1, False, "relu", "relu", "sigmoid"),
    "tiny_1x1": (2, 8, 1, 1, 16, 8, 3, 1, 1, True, "relu6", "relu", "sigmoid"),
    "wide_7x7_960": (1, 160, 7, 7, 960, 160, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    # One output panel, 196 pixels at N=1: the project phase splits the pixels in 4 chunks.
    "one_panel_14x14": (1, 64, 14, 14, 96, 40, 3, 1, 1, False, "relu6", "relu", "sigmoid"),
    "sigmoid_act": (1, 8, 6, 6, 20, 8, 3, 1, 1, False, "hsigmoid", "relu", "sigmoid"),
}


def _args(case, dtype, layout, skip=None):
    n, cin, h, w, hidden, cout, k, stride, dil, se, act, se_act, se_gate = CASES[case]
    x = make_input((n, cin, h, w), torch.float64, layout)
    block = make_block(cin, hidden, cout, k, se)
    if skip is None:
        pad = dil * (k - 1) // 2
        same = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1 == h
        skip = stride == 1 and cin == cout and same
    kw = dict(stride=stride, dilation=dil, act=act, se_act=se_act, se_gate=se_gate, skip=skip)
    return x, block, kw


def _fused(x, block, kw, eps=1e-5):
    e, d, s, p = block
    return OP.inverted_residual_inference(x, e, d, s, p, kw["stride"], kw["dilation"], kw["act"],
                                          kw["se_act"], kw["se_gate"], kw["skip"], eps)


def _ref(x, block, kw):
    e, d, s, p = block
    return reference.inverted_residual(x, e, d, s, p, training=False, **kw)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fused_fp32(case, layout):
    x64, block64, kw = _args(case, torch.float32, layout)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = _fused(x, _cast(block64, torch.float32), kw)
    ref = _ref(x.double(), block64, kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    if layout == "channels_last" and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    assert_close(out, ref, torch.float32, "out")


@pytest.mark.parametrize("case", ["mbv2_s1_skip", "k5_s1_se_skip", "odd_7x11_s2_se", "dil2"])
@pytest.mark.parametrize("layout", ["strided", "strided_cl"])
def test_fused_strided(case, layout):
    x64, block64, kw = _args(case, torch.float64, layout)
    # A strided fp32 view (helpers.make_input's .to(dtype) would return a dense copy): every
    # other column and a channel offset of a larger NCHW or NHWC tensor.
    n, c, h, w = x64.shape
    fmt = torch.channels_last if layout == "strided_cl" else torch.contiguous_format
    x = torch.randn(n, c + 3, h, 2 * w).contiguous(memory_format=fmt)[:, 2:2 + c, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out = _fused(x, _cast(block64, torch.float32), kw)
    assert_close(out, _ref(x.double(), block64, kw), torch.float32, "out")


@pytest.mark.parametrize("case", ["mbv2_s1_skip", "k5_se_hsig", "dil2_k5_s2_se", "no_expand",
                                  "odd_7x11_c_odd"])
def test_fused_fp64(case):
    x, block, kw = _args(case, torch.float64, "channels_last")
    assert_close(_fused(x, block, kw), _ref(x, block, kw), torch.float64, "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mbv2_s1_skip", "k5_se_hsig", "odd_7x11_c_odd",
                                  "dil2_k5_s2_se"])  # the last two at N=1: channel slices
def test_fused_low_precision(case, dtype):
    x64, block64, kw = _args(case, torch.float64, "channels_last")
    x = x64.to(dtype)
    block = _cast(block64, dtype)
    out = _fused(x, block, kw)
    assert out.dtype == dtype
    ref64 = _ref(x.double(), _cast(block, torch.float64), kw)
    theirs = _ref(x, block, kw)  # PyTorch's own block in this dtype
    assert_lowp_close(out, ref64, theirs, dtype, "out")


# ---- grouped (block-diagonal) 1x1 weights: MixNet's split convolutions -------------------------
# The GEMMs read each panel's nonzero k range only for finite rows; otherwise the whole K (a zero
# weight times Inf/NaN is NaN, as for any dense weight).

def _block_diagonal(w, groups):
    out, cin = w.shape[:2]
    mask = torch.zeros(out, cin, dtype=torch.bool)
    for g in range(groups):
        mask[g * out // groups:(g + 1) * out // groups, g * cin // groups:(g + 1) * cin // groups] = 1
    return w * mask[:, :, None, None].to(w.dtype)


# (N, Cin, H, W, hidden, Cout, stride, dilation, se, expand groups, project groups, kernel
# sizes: one, or MixConv's per channel group, zero-padded to the largest)
GROUPED = {
    "mixnet_a2_p2_se": (1, 40, 14, 14, 240, 40, 1, 1, True, 2, 2, (5,)),
    "p2_7x7_se": (1, 80, 7, 7, 480, 96, 1, 1, True, 1, 2, (3,)),
    "a4_p4_s2_odd": (2, 24, 11, 9, 96, 64, 2, 1, False, 4, 4, (3,)),
    "a3_no_se_skip": (2, 24, 10, 10, 144, 24, 1, 1, False, 3, 3, (3,)),
    # MixConv: groups of 120 / 60 channels (vectors of 16 mixing two kernel sizes)
    "mix35_a2_p2_se": (1, 40, 14, 14, 240, 40, 1, 1, True, 2, 2, (3, 5)),
    "mix3579_s2_p2": (2, 24, 13, 11, 240, 32, 2, 1, False, 1, 2, (3, 5, 7, 9)),
    "mix357_no_expand": (1, 48, 9, 9, None, 48, 1, 1, False, 0, 2, (3, 5, 7)),
    "mix3to11_s2_se": (1, 64, 14, 14, 300, 64, 2, 1, True, 1, 1, (3, 5, 7, 9, 11)),
    "mix35_dil2_bands": (3, 16, 12, 10, 96, 16, 1, 2, False, 2, 2, (3, 5)),
}


def _mixconv_weight(c, sizes, dtype=torch.float64):
    """Groups of c // len(sizes) channels (the last takes the rest), each kernel centred in
    zeros of the largest size."""
    kmax, parts, done = max(sizes), [], 0
    for i, k in enumerate(sizes):
        n = c - done if i == len(sizes) - 1 else c // len(sizes)
        o = (kmax - k) // 2
        parts.append(torch.nn.functional.pad(conv_weight((n, 1, k, k), dtype), (o, o, o, o)))
        done += n
    return torch.cat(parts)


def _grouped_args(case, layout="channels_last"):
    n, cin, h, w, hidden, cout, stride, dil, se, ge, gp, sizes = GROUPED[case]
    x = make_input((n, cin, h, w), torch.float64, layout)
    e, d, s, p = make_block(cin, hidden, cout, max(sizes), se)
    if e:
        e[0] = _block_diagonal(e[0], ge)
    d[0] = _mixconv_weight(hidden or cin, sizes)
    p[0] = _block_diagonal(p[0], gp)
    pad = dil * (max(sizes) - 1) // 2
    same = (h + 2 * pad - dil * (max(sizes) - 1) - 1) // stride + 1 == h
    kw = dict(stride=stride, dilation=dil, act="relu6", se_act="relu", se_gate="sigmoid",
              skip=stride == 1 and cin == cout and same)
    return x, [e, d, s, p], kw


# ---- the same weights in parts: each stage [parts..., bn_weight, bn_bias, mean, var] -----------
# (effkernels.nn's MixNet blocks on the CPU: the split 1x1 convs' diagonal blocks, MixConv's
# kernels; packed without a dense copy, to the same bytes the dense weights pack to.)

def _parts_of(case, block):
    """block (_grouped_args's dense weights) with each stage's weight as its parts: views of
    the dense weight (row-strided 1x1 blocks, MixConv kernels cut from the padded ones)."""
    n, cin, h, w, hidden, cout, stride, dil, se, ge, gp, sizes = GROUPED[case]
    e, d, s, p = block

    def blocks(weight, groups):
        out, c = weight.shape[:2]
        return [weight[g * out // groups:(g + 1) * out // groups,
                       g * c // groups:(g + 1) * c // groups] for g in range(groups)]

    c, kmax, kernels, done = hidden or cin, max(sizes), [], 0
    for i, k in enumerate(sizes):
        m = c - done if i == len(sizes) - 1 else c // len(sizes)
        o = (kmax - k) // 2
        kernels.append(d[0][done:done + m, :, o:o + k, o:o + k])
        done += m
    return [blocks(e[0], ge) + e[1:] if e else [], kernels + d[1:], s, blocks(p[0], gp) + p[1:]]


def _pack_and_run(x, block, kw):
    e, d, s, p = block
    packed = OP.inverted_residual_pack(x, e, d, s, p, kw["stride"], kw["dilation"], kw["act"],
                                       kw["se_act"], kw["se_gate"], kw["skip"], 1e-5)
    return OP.inverted_residual_packed(x, packed, *ops._packed_args(d, p, kw["stride"],
                                                                    kw["dilation"]))


@pytest.mark.parametrize("case", list(GROUPED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_grouped_weights(case, dtype):
    x64, block64, kw = _grouped_args(case)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    block = _cast(block64, dtype)
    out = _fused(x, block, kw)
    ref64 = _ref(x.double(), _cast(block, torch.float64), kw)
    if dtype in (torch.float32, torch.float64):
        assert_close(out, ref64, dtype, "out")
    else:
        assert_lowp_close(out, ref64, _ref(x, block, kw), dtype, "out")
    # The same weights in parts: the same bits, per call and packed.
    parts = _parts_of(case, block)
    assert any(len(stage) > 5 for stage in parts)
    assert torch.equal(_fused(x, parts, kw), out), "parts"
    assert torch.equal(_pack_and_run(x, parts, kw), out), "parts, pack + packed"


def _same_nonfinite(out, ref):
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs"
    assert torch.equal(out.isinf(), ref.isinf()), "Inf pattern differs"
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32, "finite part")


@pytest.mark.parametrize("case", ["mixnet_a2_p2_se", "a4_p4_s2_odd", "a3_no_se_skip",
                                  "mix357_no_expand", "mix35_dil2_bands"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_fused_grouped_nonfinite_input(case, value):
    """An Inf/NaN in x: the dense block-diagonal GEMM makes NaN in the other groups' channels
    (0 * Inf), and a zero-padded MixConv tap NaN two pixels away, as the reference's dense
    convolutions do: neither the zero ranges nor the zero taps are skipped then."""
    x, block, kw = _grouped_args(case)
    x[0, 1, 2, 3] = value
    block32 = _cast(block, torch.float32)
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    out = _fused(x32, block32, kw)
    ref = _ref(x.float().double(), _cast(block32, torch.float64), kw)
    assert ref.isnan().any()
    _same_nonfinite(out, ref)
    # The weights in parts: NaN through the zeros between them as through the dense zeros.
    got = _fused(x32, _parts_of(case, block32), kw)
    assert torch.equal(got.isnan(), out.isnan()) and torch.equal(got.nan_to_num(),
                                                                  out.nan_to_num())


def test_fused_grouped_nonfinite_gate():
    """A NaN SE gate (finite hidden rows): the gated zero weights are NaN, so the project GEMM
    reads the whole K and every output pixel is NaN, as in the reference."""
    x, block, kw = _grouped_args("p2_7x7_se")  # 96 outputs: more than one project panel
    block[2][3][7] = float("nan")  # SE expand bias of hidden channel 7 (the first group)
    block32 = _cast(block, torch.float32)
    out = _fused(x.float().contiguous(memory_format=torch.channels_last), block32, kw)
    ref = _ref(x.float().double(), _cast(block32, torch.float64), kw)
    assert ref.isnan().all()
    _same_nonfinite(out, ref)


@pytest.mark.parametrize("n", [1, 3])
def test_fused_grouped_threads_bitwise(n):
    x, block, kw = _grouped_args("mixnet_a2_p2_se")
    x = x.repeat(n, 1, 1, 1).float().contiguous(memory_format=torch.channels_last)
    block = _cast(block, torch.float32)
    outs = per_thread_count(lambda: _fused(x, block, kw))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("what,match", [
    ("expand_cols", r"expand's weight parts must take 40 input channels in all; got 39"),
    ("project_cols", r"project's weight parts must take 240 input channels in all; got 241"),
    ("expand_not_1x1", r"expand\[1\] \(weight part\) must have shape \[120, 20, 1, 1\]"),
    ("dw_even", r"depthwise\[1\] \(weight part\) must have an odd kernel size"),
    ("dw_channels", r"depthwise weight parts must have 240 channels in all; got 239"),
    ("dw_rank", r"depthwise\[0\] \(weight part\) must be 4-D"),
    ("bn_len", r"project: bn_weight must have shape"),
])
def test_weight_parts_errors(what, match):
    x, block, kw = _grouped_args("mix35_a2_p2_se")
    x = x.float().contiguous(memory_format=torch.channels_last)
    e, d, s, p = _parts_of("mix35_a2_p2_se", _cast(block, torch.float32))
    if what == "expand_cols":
        e[1] = e[1][:, :-1]
    elif what == "project_cols":
        p[1] = torch.cat([p[1], p[1][:, :1]], 1)
    elif what == "expand_not_1x1":
        e[1] = e[1].expand(-1, -1, 3, 3)
    elif what == "dw_even":
        d[1] = d[1][:, :, :4, :4]
    elif what == "dw_channels":
        d[1] = d[1][:-1]
    elif what == "dw_rank":
        d[0] = d[0][:, 0]
    elif what == "bn_len":
        p[-4] = p[-4][:-1]
    with pytest.raises((RuntimeError, ValueError), match=match):
        _fused(x, (e, d, s, p), kw)
    with pytest.raises((RuntimeError, ValueError), match=match):
        _pack_and_run(x, (e, d, s, p), kw)


def test_fused_eps_and_forced_no_skip():
    x, block, kw = _args("mbv2_s1_skip", torch.float32, "channels_last", skip=False)
    out = _fused(x.float(), _cast(block, torch.float32), kw, eps=1e-3)
    ref = reference.inverted_residual(x, *block, training=False, eps=1e-3, **kw)
    assert_close(out, ref, torch.float32, "out")


# At N=1 with 2 or 3 threads the small maps take the channel-sliced two-phase path (hidden
# channels split over the threads, project split by output panels or pixel chunks); 1 thread
# never does.
@pytest.mark.parametrize("case", ["mbv2_s1_skip", "k5_s1_se_skip", "odd_7x11_s2_se", "dil2",
                                  "k7_s2", "k7_s1", "k9_generic", "wide_7x7_960",
                                  "one_panel_14x14"])
@pytest.mark.parametrize("n", [1, 3])
def test_threads_bitwise(case, n):
    x, block, kw = _args(case, torch.float32, "channels_last")
    x = torch.cat([x] * n)[:n].float().contiguous(memory_format=torch.channels_last)
    block = _cast(block, torch.float32)
    outs = per_thread_count(lambda: _fused(x, block, kw))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_opcheck():
    blocks = [_args(case, torch.float32, "channels_last") for case in ("mbv2_s1_skip",
                                                                        "k5_se_hsig")]
    x, block, kw = _grouped_args("mix3579_s2_p2")  # weights in parts
    blocks.append((x, _parts_of("mix3579_s2_p2", block), kw))
    for x, block, kw in blocks:
        e, d, s, p = _cast(block, torch.float32)
        torch.library.opcheck(
            OP.inverted_residual_inference.default,
            (x.float(), e, d, s, p, kw["stride"], kw["dilation"], kw["act"], kw["se_act"],
             kw["se_gate"], kw["skip"], 1e-5))


def _routed(x, block, kw, training=False):
    with RecordOps() as mode:
        out = ops.inverted_residual(x, *block, training=training, **kw)
    return out, mode.names


def test_routing():
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    x, block = x.float(), _cast(block, torch.float32)
    # No gradient needed -> fused.
    out, names = _routed(x, block, kw)
    assert "effkernels.inverted_residual_inference" in names
    assert_close(out, _ref(x.double(), _cast(block, torch.float64), kw), torch.float32, "out")
    # Parameters requiring grad, grad mode on -> the differentiable composite; same result.
    block_g = [[t.clone().requires_grad_(i in (0, 1, 2)) for i, t in enumerate(st)]
               for st in block]
    block_g[2] = [t.clone().requires_grad_() for t in block[2]]
    out_g, names_g = _routed(x, block_g, kw)
    assert "effkernels.inverted_residual_inference" not in names_g
    assert out_g.requires_grad
    assert_close(out_g.detach(), out, torch.float32, "composite vs fused")
    # ... but under no_grad the fused block again.
    with torch.no_grad():
        _, names_ng = _routed(x, block_g, kw)
    assert "effkernels.inverted_residual_inference" in names_ng
    # Training mode -> composite (batch statistics).
    _, names_t = _routed(x, [[t.clone() for t in st] for st in block], kw, training=True)
    assert "effkernels.inverted_residual_inference" not in names_t


def test_no_gradient():
    x, block, kw = _args("mbv2_s1_skip", torch.float32, "channels_last")
    x = x.float().requires_grad_()
    out = _fused(x, _cast(block, torch.float32), kw)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


@pytest.mark.parametrize("composed", [False, True], ids=["fused", "composed"])
def test_compile_fullgraph(composed, request):
    """torch.compile(fullgraph=True) over the fused CPU block and over the composed path (what
    CUDA tensors take), which is traced once."""
    calls = request.getfixturevalue("compose_on_cpu") if composed else None
    case = "dil2_k5_s2_se" if composed else "k5_se_hsig"
    x, block, kw = _args(case, torch.float32, "channels_last")
    x, block = x.float(), _cast(block, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager" if composed else "eager")
    def f(x):
        return ops.inverted_residual(x, *block, **kw)

    with torch.no_grad():
        out = f(x)
    if composed:
        assert calls == ["cpu"]
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, _ref(x.double(), _cast(block, torch.float64), kw), torch.float32,
                 "compiled")


# ---- the composed eval path (what CUDA tensors take unless EFFK_FUSED_BLOCK=1) ---------------
# On a GPU the backends' fused block kernels are slower than their ops composed, so eval-mode
# blocks on CUDA tensors compose the ops (ops._composes_block). Its decision and the composition
# are checked here on the CPU (the composition on the cpu backend's ops); tests/test_ops.py and
# tests/test_cuda_kernels.py check both paths on a GPU, tests/triton the Triton composition.

def _composed(x, block, kw, eps=1e-5):
    return ops._composed_inference("cpu", x, *block, kw["stride"], kw["dilation"], kw["act"],
                                   kw["se_act"], kw["se_gate"], kw["skip"], eps)


def test_composes_block_on_cuda_tensors_unless_fused_block_set(monkeypatch):
    monkeypatch.delenv("EFFK_FUSED_BLOCK", raising=False)
    assert ops._composes_block("cuda", "cuda") and ops._composes_block("triton", "cuda")
    # CPU tensors keep the fused blocks (the CPU kernel; the Triton one in the interpreter).
    assert not ops._composes_block("cpu", "cpu") and not ops._composes_block("triton", "cpu")
    monkeypatch.setenv("EFFK_FUSED_BLOCK", "1")
    assert not ops._composes_block("cuda", "cuda") and not ops._composes_block("triton", "cuda")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided", "strided_cl"])
def test_composed_fp32(case, layout):
    """The composition against the float64 reference, output in x's (suggested) format."""
    x64, block64, kw = _args(case, torch.float64, layout)
    x = x64.float()
    out = _composed(x, _cast(block64, torch.float32), kw)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
    assert_close(out, _ref(x64, block64, kw), torch.float32, "out")


@pytest.mark.parametrize("case", ["k5_se_hsig", "no_expand_se_skip"])
def test_composed_fp64_and_low_precision(case):
    x, block, kw = _args(case, torch.float64, "channels_last")
    ref = _ref(x, block, kw)
    assert_close(_composed(x, block, kw), ref, torch.float64, "fp64")
    for dtype in (torch.bfloat16, torch.float16):
        xl, bl = x.to(dtype), _cast(block, dtype)
        assert_lowp_close(_composed(xl, bl, kw), ref, _ref(xl, bl, kw), dtype, f"{dtype}")


def test_composed_skip_error():
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    with pytest.raises(ValueError, match="inverted_residual: skip needs stride 1"):
        _composed(x.float(), _cast(block, torch.float32), dict(kw, skip=True))


@pytest.fixture
def compose_on_cpu(monkeypatch):
    """ops._composes_block answering yes for the cpu backend, as it does for CUDA tensors."""
    monkeypatch.setattr(ops, "_composes_block", lambda impl, device_type: impl == "cpu")
    calls = []
    real = ops._composed_inference
    monkeypatch.setattr(ops, "_composed_inference", lambda *a: calls.append(a[0]) or real(*a))
    return calls


def test_routing_to_composed(compose_on_cpu):
    """Where _composes_block says so, eval calls without gradients take the composition: the
    direct (below Autograd) call and the checked one alike; gradients and training do not."""
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    x, block = x.float(), _cast(block, torch.float32)
    ref = _ref(x.double(), _cast(block, torch.float64), kw)
    assert_close(ops.inverted_residual(x, *block, **kw), ref, torch.float32, "direct")
    assert compose_on_cpu == ["cpu"]
    out, names = _routed(x, block, kw)  # a dispatch mode: the checked path
    assert compose_on_cpu == ["cpu", "cpu"]
    assert "effkernels.inverted_residual_inference" not in names
    assert {"effkernels.pwconv_bn_act", "effkernels.dwconv_bn_act"} <= set(names)
    assert_close(out, ref, torch.float32, "checked")
    block_g = [[t.clone().requires_grad_(i < 3) for i, t in enumerate(st)] for st in block]
    block_g[2] = [t.clone().requires_grad_() for t in block[2]]
    _routed(x, block_g, kw)
    _routed(x, [[t.clone() for t in st] for st in block], kw, training=True)
    assert compose_on_cpu == ["cpu", "cpu"]


@pytest.mark.parametrize("what,match", [
    ("expand_shape", r"expand\[0\] \(weight\) must have shape"),
    ("project_cin", r"project\[0\] \(weight\) must have shape"),
    ("dw_channels", r"depthwise: weight must have shape"),
    ("bn_len", r"project: bn_weight must have shape"),
    ("se_shape", r"se\[2\] \(expand_weight\) must have shape"),
    ("skip", r"skip needs stride 1"),
    ("stride", r"stride must be 1 or 2"),
    ("act", r"act must be one of"),
    ("dtype", r"must have dtype"),
])
def test_errors(what, match):
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    x, (e, d, s, p) = x.float(), _cast(block, torch.float32)
    if what == "expand_shape":
        e = [e[0][:, :-1]] + e[1:]
    elif what == "project_cin":
        p = [p[0][:, :-1]] + p[1:]
    elif what == "dw_channels":
        d = [d[0][:-1]] + d[1:]
    elif what == "bn_len":
        p = p[:1] + [p[1][:-1]] + p[2:]
    elif what == "se_shape":
        s = s[:2] + [s[2][:-1]] + s[3:]
    elif what == "skip":
        kw["skip"] = True
    elif what == "stride":
        kw["stride"] = 3
    elif what == "act":
        kw["act"] = "gelu"
    elif what == "dtype":
        p = [p[0].double()] + p[1:]
    with pytest.raises((RuntimeError, ValueError), match=match):
        _fused(x, (e, d, s, p), kw)


_ISA_SCRIPT = textwrap.dedent("""
    import torch, effkernels
    from effkernels import reference
    from tests.test_inverted_residual_cpu import _args, _cast, _fused, _ref, CASES
    from tests.helpers import assert_close
    torch.manual_seed(0)
    for case in ("mbv2_s1_skip", "k5_s1_se_skip", "odd_7x11_s2_se", "k7_s2", "dil2"):
        x, block, kw = _args(case, torch.float32, "channels_last")
        out = _fused(x.float(), _cast(block, torch.float32), kw)
        assert_close(out, _ref(x, block, kw), torch.float32, case)
        out64 = _fused(x, block, kw)
        assert_close(out64, _ref(x, block, kw), torch.float64, case + " fp64")
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_narrower_isa(isa):
    """The AVX2 and baseline (SSE2) builds of the kernels, forced with EFFK_CPU_ISA."""
    run_with_isa(isa, _ISA_SCRIPT)
