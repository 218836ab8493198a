"""effkernels::stem_inverted_residual_packed (csrc/cpu/inverted_residual.cpp): the models' stem
(conv_bn_act_inference's convolution) and first block (inverted_residual_packed, no expand
stage) in one pass, the stem's rows computed into the block's ring. Bit for bit the two ops
called one after the other, and against the float64 composition: odd sizes, C not a multiple
of 8, skip (read from the ring), SE, block stride 2, dilation, MixConv segments, every layout,
bitwise across thread counts, the narrower ISA builds, errors, opcheck, and the models' chained
replay taking it (tests/test_prepack.py holds the replay's checks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effkernels
from effkernels import reference

from .helpers import assert_close, bn_params, conv_weight, make_input, per_thread_count, \
    run_with_isa
from .test_inverted_residual_cpu import _mixconv_weight, make_block

pytestmark = pytest.mark.skipif(
    effkernels.available_backends("cpu")["cpu"] != "available",
    reason="the C++ CPU backend is not available")

OP = None if not hasattr(torch.ops, "effkernels") else torch.ops.effkernels

# (N, H, W, stem channels, stem k, stem stride, stem padding, stem act, stem bias;
#  block Cout, k, stride, dilation, se, act, mixconv sizes or None)
CASES = {
    "mbv2": (1, 32, 32, 32, 3, 2, 1, "relu6", False, 16, 3, 1, 1, False, "relu6", None),
    "mbv3_skip": (2, 23, 17, 16, 3, 2, 1, "hswish", False, 16, 3, 1, 1, False, "relu", None),
    "effnet_se": (1, 29, 31, 32, 3, 2, 1, "silu", False, 16, 3, 1, 1, True, "silu", None),
    "odd_c13_k5_skip": (3, 14, 22, 13, 3, 2, 1, "relu", True, 13, 5, 1, 1, False, "relu6",
                        None),
    "block_s2": (2, 19, 25, 24, 3, 2, 1, "relu6", False, 40, 3, 2, 1, False, "relu6", None),
    "stem_s1_k5_dil2": (1, 13, 11, 20, 5, 1, 2, "identity", True, 20, 3, 1, 2, False, "hswish",
                        None),
    "mixconv_skip": (1, 26, 20, 48, 3, 2, 1, "relu", False, 48, None, 1, 1, False, "relu",
                     (3, 5, 7)),
}


def _case(name, seed=0):
    (n, h, w, cs, sk, ss, sp, sact, sbias, cout, k, stride, dil, se, act, sizes) = CASES[name]
    torch.manual_seed(seed)
    x = make_input((n, 3, h, w), torch.float32, "channels_last")
    stem = (conv_weight((cs, 3, sk, sk), torch.float32),
            torch.randn(cs) * 0.1 if sbias else None, *bn_params(cs))
    kmax = max(sizes) if sizes else k
    e, d, s, p = make_block(cs, None, cout, kmax, se, dtype=torch.float32)
    if sizes:
        d[0] = _mixconv_weight(cs, sizes, torch.float32)
    ho = (h + 2 * sp - sk) // ss + 1
    wo = (w + 2 * sp - sk) // ss + 1
    pad = dil * (kmax - 1) // 2
    same = (ho + 2 * pad - dil * (kmax - 1) - 1) // stride + 1 == ho
    kw = dict(stride=stride, dilation=dil, act=act, se_act="relu", se_gate="sigmoid",
              skip=stride == 1 and cs == cout and same)
    stem_kw = dict(stride=[ss, ss], padding=[sp, sp], act=sact)
    return x, stem, [e, d, s, p], kw, stem_kw


def _pack(x_block, block, kw, eps=1e-5):
    e, d, s, p = block
    return OP.inverted_residual_pack(x_block, e, d, s, p, kw["stride"], kw["dilation"],
                                     kw["act"], kw["se_act"], kw["se_gate"], kw["skip"], eps)


def _block_args(block, kw):
    return (block[3][0].shape[0], block[1][0].shape[-1], kw["stride"], kw["dilation"])


def _fused(x, packed, stem, block, kw, stem_kw, eps=1e-3):
    return OP.stem_inverted_residual_packed(x, packed, *_block_args(block, kw), *stem,
                                            stem_kw["stride"], stem_kw["padding"], eps,
                                            stem_kw["act"])


def _stem(x, stem, stem_kw, eps=1e-3):
    return OP.conv_bn_act_inference(x, *stem, stem_kw["stride"], stem_kw["padding"], [1, 1],
                                    eps, stem_kw["act"])


def _expected(x, stem, block, kw, stem_kw, eps=1e-3):
    w, b, g, beta, mean, var = (None if t is None else t.double() for t in stem)
    h = F.conv2d(x.double(), w, b, stem_kw["stride"], stem_kw["padding"])
    h = reference.activation(stem_kw["act"], F.batch_norm(h, mean, var, g, beta, False, 0.0,
                                                          eps))
    e, d, s, p = ([t.double() for t in stage] for stage in block)
    return reference.inverted_residual(h, e, d, s, p, training=False, **kw)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided", "strided_cl"])
def test_equals_the_two_ops(name, layout):
    x, stem, block, kw, stem_kw = _case(name)
    x = make_input(tuple(x.shape), torch.float32, layout) if layout != "channels_last" else x
    h = _stem(x, stem, stem_kw)
    packed = _pack(h, block, kw)
    expected = OP.inverted_residual_packed(h, packed, *_block_args(block, kw))
    out = _fused(x, packed, stem, block, kw, stem_kw)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if layout in (
        "channels_last", "strided_cl") else torch.contiguous_format)  # x's format
    assert torch.equal(out, expected), f"{name} {layout}: differs from the two ops"
    assert_close(out, _expected(x, stem, block, kw, stem_kw), torch.float32, name)


def test_bitwise_across_thread_counts():
    x, stem, block, kw, stem_kw = _case("mbv3_skip")
    x = torch.cat([x, x.flip(0)])
    packed = _pack(_stem(x, stem, stem_kw), block, kw)
    outs = per_thread_count(lambda: _fused(x, packed, stem, block, kw, stem_kw))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_nan_stays_where_it_reaches():
    """A NaN pixel: the stem's 3x3 outputs around it, then the block's window around those
    (and its skip); no other output (the ring's borders and padding stay zeros)."""
    x, stem, block, kw, stem_kw = _case("mbv3_skip")
    x = x[:1].clone()
    x[0, 1, 10, 8] = float("nan")
    h = _stem(x, stem, stem_kw)
    packed = _pack(h, block, kw)
    out = _fused(x, packed, stem, block, kw, stem_kw)
    expected = OP.inverted_residual_packed(h, packed, *_block_args(block, kw))
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out).any()
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert not torch.isnan(out[0, :, :2]).any() and not torch.isnan(out[0, :, 9:]).any()


_ISA_SCRIPT = """
import torch
from tests.test_stem_block import CASES, _case, _expected, _fused, _pack, _stem
from tests.helpers import assert_close
for name in CASES:
    x, stem, block, kw, stem_kw = _case(name)
    out = _fused(x, _pack(_stem(x, stem, stem_kw), block, kw), stem, block, kw, stem_kw)
    assert_close(out, _expected(x, stem, block, kw, stem_kw), torch.float32, name)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_narrower_isa(isa):
    run_with_isa(isa, _ISA_SCRIPT)


def test_errors():
    x, stem, block, kw, stem_kw = _case("mbv3_skip")
    h = _stem(x, stem, stem_kw)
    packed = _pack(h, block, kw)
    name = "stem_inverted_residual_packed"
    with pytest.raises(RuntimeError, match=f"{name}: x must be a float32 CPU"):
        _fused(x.double(), packed, [None if t is None else t.double() for t in stem], block,
               kw, stem_kw)
    with pytest.raises(RuntimeError, match=r"stem_weight must have shape \(out_channels, 2"):
        _fused(x[:, :2], packed, stem, block, kw, stem_kw)
    with pytest.raises(RuntimeError, match=r"stem_running_var must have shape \(16,\)"):
        _fused(x, packed, (*stem[:5], stem[5][:4]), block, kw, stem_kw)
    with pytest.raises(RuntimeError, match="stem_stride must be two integers >= 1"):
        _fused(x, packed, stem, block, kw, dict(stem_kw, stride=[0, 2]))
    with pytest.raises(RuntimeError, match="stem_weight must have the block's 16 input channels"):
        narrow = (stem[0][:8], None, *(t[:8] for t in stem[2:]))
        _fused(x, packed, narrow, block, kw, stem_kw)
    with pytest.raises(RuntimeError, match="without an expand stage"):
        e, d, s, p = make_block(16, 32, 16, 3, dtype=torch.float32)
        _fused(x, _pack(h, [e, d, s, p], kw), stem, [e, d, s, p], kw, stem_kw)
    with pytest.raises(RuntimeError, match="float32 block"):
        _fused(x, _pack(h.double(), [[t.double() for t in st] for st in block], kw), stem,
               block, kw, stem_kw)
    with pytest.raises(RuntimeError, match="both a skip and squeeze-excite"):
        se_block = make_block(16, None, 16, 3, se=True, dtype=torch.float32)
        _fused(x, _pack(h, se_block, kw), stem, se_block, kw, stem_kw)
    with pytest.raises(RuntimeError, match="packed holds a block with out_channels 16"):
        OP.stem_inverted_residual_packed(x, packed, 24, 3, 1, 1, *stem, stem_kw["stride"],
                                         stem_kw["padding"], 1e-3, stem_kw["act"])
    with pytest.raises(RuntimeError, match="packed"):
        _fused(x, packed[:-8], stem, block, kw, stem_kw)
    with pytest.raises(ValueError, match="act must be one of"):
        _fused(x, packed, stem, block, kw, dict(stem_kw, act="gelu"))


def test_opcheck_and_no_gradient():
    x, stem, block, kw, stem_kw = _case("mbv2")
    packed = _pack(_stem(x, stem, stem_kw), block, kw)
    args = (x, packed, *_block_args(block, kw), *stem, stem_kw["stride"], stem_kw["padding"],
            1e-3, stem_kw["act"])
    torch.library.opcheck(OP.stem_inverted_residual_packed.default, args)
    y = OP.stem_inverted_residual_packed(x.clone().requires_grad_(), *args[1:])
    with pytest.raises(RuntimeError, match="inference-only and has no gradient"):
        y.sum().backward()
