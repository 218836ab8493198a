"""Prepacked inference weights (effkernels::inverted_residual_pack / _packed, csrc/cpu/
inverted_residual.cpp; effkernels.nn.prepack_for_inference): bit-for-bit the per-call packing
for every fused-block case and dtype, the packed buffer describing the whole block (settings and
SE weights included), refused for another input or block, repacked when a weight changes in
place or is replaced, used only for CPU inference."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import effkernels
from effkernels import models, reference
from effkernels.nn import prepack_for_inference

from .test_inverted_residual_cpu import CASES, GROUPED, OP, _args, _cast, _fused, _grouped_args, _ref
from .helpers import assert_close, bn_params, conv_weight, make_input

pytestmark = pytest.mark.skipif(
    effkernels.available_backends("cpu")["cpu"] != "available",
    reason="the C++ CPU backend is not available")


def _call_args(block, kw, eps=1e-5):
    e, d, s, p = block
    return (e, d, s, p, kw["stride"], kw["dilation"], kw["act"], kw["se_act"], kw["se_gate"],
            kw["skip"], eps)


def _pack(x, block, kw, eps=1e-5):
    return OP.inverted_residual_pack(x, *_call_args(block, kw, eps))


def _packed_args(block, kw):
    e, d, s, p = block
    return (p[0].shape[0], d[0].shape[-1], kw["stride"], kw["dilation"])


def _packed(x, packed, block, kw):
    return OP.inverted_residual_packed(x, packed, *_packed_args(block, kw))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_packed_bitwise(case, dtype):
    """The packed call computes exactly what the per-call packing computes (the same buffer
    layout, built by the same code), and that is the block (against the float64 reference)."""
    x64, block64, kw = _args(case, torch.float64, "channels_last")
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    block = _cast(block64, dtype)
    packed = _pack(x, block, kw)
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() > 0
    out = _packed(x, packed, block, kw)
    expected = _fused(x, block, kw)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out, expected), f"{case} {dtype}: packed differs from per-call packing"
    if dtype in (torch.float32, torch.float64):
        assert_close(out, _ref(x.double(), _cast(block, torch.float64), kw), dtype, "out")
    # The packed weights serve any input of the block: another batch size and layout.
    x2 = torch.cat([x, x.flip(0)]).contiguous()
    assert torch.equal(_packed(x2, packed, block, kw), _fused(x2, block, kw))


@pytest.mark.parametrize("case", list(GROUPED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_bitwise_grouped(case, dtype):
    """Block-diagonal 1x1 weights and zero-padded MixConv kernels (their k ranges and
    depthwise segments are part of the packed buffer)."""
    x64, block64, kw = _grouped_args(case)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    block = _cast(block64, dtype)
    out = _packed(x, _pack(x, block, kw), block, kw)
    assert torch.equal(out, _fused(x, block, kw)), f"{case} {dtype}"


def test_packed_describes_the_block():
    """The packed call takes no weights: the buffer holds the block's settings and SE's weights
    (a snapshot: changing the tensors afterwards does not change what it computes)."""
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    x, block = x.float(), _cast(block, torch.float32)
    packed = _pack(x, block, kw)
    expected = _fused(x, block, kw)
    e, d, s, p = block
    saved = [t.clone() for t in s]
    for t in s:
        t.mul_(-2.0)
    assert torch.equal(_packed(x, packed, block, kw), expected)
    assert not torch.equal(_fused(x, block, kw), expected)
    for t, v in zip(s, saved):
        t.copy_(v)
    # Another activation packs another block.
    other = dict(kw, act="relu")
    assert not torch.equal(_packed(x, _pack(x, block, other), block, other), expected)


def test_packed_refused_for_another_call():
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    x, block = x.float(), _cast(block, torch.float32)
    packed = _pack(x, block, kw)
    args = _packed_args(block, kw)
    with pytest.raises(RuntimeError, match="inverted_residual_packed: x must be Float with 16 "
                                           "channels.*got BFloat16"):
        OP.inverted_residual_packed(x.bfloat16(), packed, *args)
    with pytest.raises(RuntimeError, match="x must be Float with 16 channels.*got Float of "
                                           r"shape \[2, 5, "):
        OP.inverted_residual_packed(x[:, :5], packed, *args)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        OP.inverted_residual_packed(x[0], packed, *args)
    for i, name in enumerate(("out_channels", "kernel_size", "stride", "dilation")):
        bad = list(args)
        bad[i] += 1
        with pytest.raises(RuntimeError, match=f"packed holds a block with .*got .*{name} "
                                               f"{bad[i]}"):
            OP.inverted_residual_packed(x, packed, *bad)
    with pytest.raises(RuntimeError, match="packed must be the contiguous 1-d uint8 CPU tensor"):
        OP.inverted_residual_packed(x, packed.float(), *args)
    with pytest.raises(RuntimeError, match="or is damaged"):
        OP.inverted_residual_packed(x, packed[:-64].clone(), *args)
    with pytest.raises(RuntimeError, match="shorter than its header"):
        OP.inverted_residual_packed(x, packed[:8].clone(), *args)
    with pytest.raises(RuntimeError, match="does not start with the header"):
        OP.inverted_residual_packed(x, torch.zeros_like(packed), *args)


def test_pack_checks_like_the_block():
    x, block, kw = _args("mbv2_s1_skip", torch.float32, "channels_last")
    e, d, s, p = _cast(block, torch.float32)
    with pytest.raises(RuntimeError, match="inverted_residual_pack: depthwise"):
        _pack(x.float(), (e, d[:3], s, p), kw)


def test_opcheck():
    x, block, kw = _args("k5_se_hsig", torch.float32, "channels_last")
    x, block = x.float(), _cast(block, torch.float32)
    packed = _pack(x, block, kw)
    torch.library.opcheck(OP.inverted_residual_packed.default,
                          (x, packed, *_packed_args(block, kw)))
    # The pack's size depends on this CPU's panel widths: its fake kernel has a data-dependent
    # size, which the dynamic-shape AOT test cannot trace; the other checks run.
    torch.library.opcheck(OP.inverted_residual_pack.default, (x, *_call_args(block, kw)),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


# ---- effkernels.nn.prepack_for_inference -----------------------------------------------------

def _model(name="mobilenetv3_large_100"):
    torch.manual_seed(0)
    m = models.create_model(name).eval()
    for mod in m.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return m.to(memory_format=torch.channels_last)


def _entry(module):
    """A prepacked module's packed weights (a model's: its head's, in a dict of its own)."""
    cache = module._packed_cache
    return cache.get("head", cache).get("entry")


def _entries(model):
    return [_entry(m) for m in model.modules() if getattr(m, "_packed_cache", None) is not None]


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv2_100", "mixnet_s"])
def test_prepacked_model_bitwise(name):
    model = _model(name)
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    packed_model = copy.deepcopy(model)
    blocks = [m for m in packed_model.modules() if isinstance(m, effkernels.nn.blocks._Block)]
    # The blocks, and the 1x1 conv + BN layers of ConvBnActBlocks and of the head.
    assert prepack_for_inference(packed_model) == len(_entries(packed_model)) > len(blocks) > 10
    with torch.no_grad():
        first, second = packed_model(x), packed_model(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(e is None or e[3].dtype == torch.uint8 for e in _entries(packed_model))
    assert all(b._packed_cache.get("entry") is not None for b in blocks)
    if hasattr(packed_model, "bn2"):  # the efficientnet-style head: conv_head + bn2 + act
        assert _entry(packed_model) is not None


def test_prepacked_weights_are_used_and_repacked():
    model = _model()
    block = model.blocks[5][0]
    x = torch.randn(1, block.conv_pw.in_channels, 14, 14).contiguous(
        memory_format=torch.channels_last)
    prepack_for_inference(block)
    with torch.no_grad():
        expected = block(x)
        packed = block._packed_cache["entry"][3]
        # The packed buffer is what the call reads: zeroing its weights changes the result.
        saved = packed.clone()
        packed[192:] = 0  # past the header (160 bytes, padded to 192)
        assert not torch.equal(block(x), expected)
        packed.copy_(saved)
        assert torch.equal(block(x), expected)
        # An in-place change through PyTorch (optimizer step, load_state_dict, copy_) packs
        # again: the result is the unpacked block's with the new weight.
        block.conv_pwl.weight.mul_(-0.5)
        block.bn3.running_var.add_(0.25)
        changed = block(x)
        assert block._packed_cache["entry"][3] is not packed
    fresh = copy.deepcopy(block)
    prepack_for_inference(fresh, enabled=False)
    assert fresh._packed_cache is None
    with torch.no_grad():
        assert torch.equal(changed, fresh(x))
        assert not torch.equal(changed, expected)
        # A replaced parameter packs again too.
        block.conv_dw.weight = torch.nn.Parameter(block.conv_dw.weight * 1.5)
        fresh.conv_dw.weight = torch.nn.Parameter(fresh.conv_dw.weight * 1.5)
        assert torch.equal(block(x), fresh(x))
        # load_state_dict (copy_ under no_grad) as well.
        state = {k: v * 0.9 if v.is_floating_point() else v
                 for k, v in _model().blocks[5][0].state_dict().items()}
        block.load_state_dict(state)
        fresh.load_state_dict(state)
        assert torch.equal(block(x), fresh(x))


def test_prepacked_only_for_cpu_inference():
    model = _model()
    prepack_for_inference(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    reference_model = copy.deepcopy(model)
    prepack_for_inference(reference_model, enabled=False)
    # Gradient recorded: the differentiable path, no packing.
    out = model(x)
    assert out.requires_grad and all(e is None for e in _entries(model))
    assert_close(out.detach(), reference_model(x).detach(), torch.float32, "grad path")
    # The reference backend: its own result, no packing.
    with torch.no_grad(), effkernels.backend("reference"):
        assert torch.equal(model(x), reference_model(x))
    assert all(e is None for e in _entries(model))
    # Training mode: batch statistics, running statistics updated, no packing.
    model.train()
    reference_model.train()
    with torch.no_grad():
        assert torch.equal(model(x), reference_model(x))
    assert all(e is None for e in _entries(model))
    for a, b in zip(model.buffers(), reference_model.buffers()):
        assert torch.equal(a, b)


def test_prepacked_model_compiles():
    model = _model("mobilenetv2_100")
    prepack_for_inference(model)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert_close(compiled, eager, torch.float32, "compiled")


@pytest.mark.parametrize("prepacked", [True, False])
def test_replay_follows_every_change(prepacked):
    """The replayed call (blocks._Replay: the block's Python skipped; from the packed weights,
    or, not prepacked, the plain kernel on the modules' own tensors) is dropped by any change
    that the full forward would see; each result equals that of a copy that never replays."""
    model = _model()
    block = model.blocks[4][1]  # MobileNetV3-Large 112 -> 672 -> 112: expand, SE, skip
    x = torch.randn(1, block.conv_pw.in_channels, 14, 14).contiguous(
        memory_format=torch.channels_last)
    if prepacked:
        prepack_for_inference(block)
    fresh = copy.deepcopy(block)

    def check(what):
        with torch.no_grad():
            got = block(x)
            fresh.__dict__.pop("_replay", None)
            want = fresh(x)
        assert torch.equal(got, want), what

    with torch.no_grad():
        block(x)
    assert "replay" in block._packed_cache if prepacked else "_replay" in block.__dict__
    check("replayed")
    if not prepacked:  # the plain replay reads the weights live: .data writes are seen
        for b in (block, fresh):
            b.conv_pwl.weight.data.mul_(0.5)
            b.se.conv_reduce.bias.data.add_(0.5)
        check(".data write")
    new_bn = copy.deepcopy(block.bn3)
    new_bn.running_mean.normal_(0, 0.3)
    for i, change in enumerate((
            lambda b: b.bn2.train(),                                     # one BN in training
            lambda b: setattr(b, "act", "relu"),                         # a setting
            lambda b: setattr(b.bn1, "eps", 1e-3),
            lambda b: setattr(b, "bn3", copy.deepcopy(new_bn)),          # a child replaced
            lambda b: torch.no_grad()(b.se.conv_reduce.bias.add_)(0.5),  # SE, in place
            lambda b: setattr(b.se.conv_expand, "weight",                # SE, replaced
                              torch.nn.Parameter(b.se.conv_expand.weight * 0.5)),
            lambda b: setattr(b.conv_pwl, "weight",
                              torch.nn.Parameter(b.conv_pwl.weight * 0.5)))):
        change(block)
        change(fresh)
        check(f"change {i}")
        check(f"change {i}, twice")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(block(x), fresh(x))
    with torch.no_grad(), effkernels.backend("reference"):
        assert torch.equal(block(x), fresh(x))
    with torch.no_grad():
        assert torch.equal(block(x.double()), fresh(x.double()))


def test_split_block_replay_follows_every_change():
    """MixNet's split convolutions (ModuleLists of 1x1 and of 3x3/5x5 depthwise convs) run
    fused in eval, packed from the parts' own weights (no dense weight built): a change to any
    part's weight, in place or replaced, or a part replaced, repacks; the results equal an
    unprepacked copy's, and timm's block."""
    timm = pytest.importorskip("timm")
    model = _model("mixnet_s")
    block = model.blocks[2][1]  # 40 -> 240 (2 x 120) -> 40, k 3/5, SE, skip
    x = torch.randn(1, 40, 14, 14).contiguous(memory_format=torch.channels_last)
    prepack_for_inference(block)
    fresh = copy.deepcopy(block)
    prepack_for_inference(fresh, enabled=False)
    theirs = timm.create_model("mixnet_s").blocks[2][1].eval()

    def check(what):
        theirs.load_state_dict(block.state_dict())
        with torch.no_grad():
            got, want = block(x), fresh(x)
            assert_close(got, theirs(x), torch.float32, f"{what}: timm's block")
        assert torch.equal(got, want), what

    with torch.no_grad():
        block(x)
    assert "replay" in block._packed_cache
    check("replayed")
    assert "_replay" not in block.__dict__  # (the unprepacked blocks' replay)
    packed_from = block._packed_cache["entry"][1]
    for part in (*block.conv_pw, *block.conv_dw, *block.conv_pwl):
        assert any(t is part.weight for t in packed_from)
    assert "_dense_weights" not in block.__dict__
    for i, change in enumerate((
            lambda b: b.conv_dw[0].weight.data.mul_(1.0),                # no version bump
            lambda b: torch.no_grad()(b.conv_dw[1].weight.mul_)(0.5),    # in place
            lambda b: torch.no_grad()(b.conv_pw[0].weight.add_)(0.1),
            lambda b: setattr(b.conv_pwl[1], "weight",
                              torch.nn.Parameter(b.conv_pwl[1].weight * 0.5)),
            lambda b: b.conv_pw.__setitem__(1, copy.deepcopy(b.conv_pw[0])),  # a part replaced
            lambda b: b.conv_dw.__setitem__(0, torch.nn.Conv2d(120, 120, 3, padding=1,
                                                               groups=120, bias=False)))):
        torch.manual_seed(i)
        change(block)
        torch.manual_seed(i)
        change(fresh)
        check(f"change {i}")
        check(f"change {i}, twice")


def test_split_block_not_prepacked_builds_weights_per_call():
    """Without prepack, a MixNet block passes its parts' own weights to the CPU kernel on every
    call (no dense weight, no version-keyed cache; its replay reads the live tensors), so
    writes through .data are seen."""
    timm = pytest.importorskip("timm")
    block = _model("mixnet_s").blocks[2][1]
    theirs = timm.create_model("mixnet_s").blocks[2][1].eval()
    x = torch.randn(1, 40, 14, 14)
    with torch.no_grad():
        block(x)
        block.conv_pw[1].weight.data.mul_(0.5)
        block.conv_dw[1].weight.data.mul_(2.0)
        theirs.load_state_dict(block.state_dict())
        assert_close(block(x), theirs(x), torch.float32, "after .data writes")
    assert "_dense_weights" not in block.__dict__ and "_replay" in block.__dict__
    # A part replaced by one of another size. Against the composed ops (gradients recorded:
    # the unfused path).
    block.conv_dw[1] = torch.nn.Conv2d(120, 120, 7, padding=3, groups=120, bias=False)
    expected = copy.deepcopy(block)(x).detach()
    with torch.no_grad():
        assert_close(block(x), expected, torch.float32, "a 7x7 part")


def test_split_block_falls_back_to_dense_weights(monkeypatch):
    """Should the CPU kernel refuse a MixNet block's weights in parts, the block takes the dense
    weights' path (the public op, whose checks name a bad argument): the same bits."""
    block = _model("mixnet_s").blocks[2][1]
    x = torch.randn(1, 40, 14, 14).contiguous(memory_format=torch.channels_last)
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        expected = block(x)

    def refuse(x_, args):
        raise RuntimeError("refused")

    monkeypatch.setattr(effkernels.ops, "_inference_call", refuse)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert "_replay" not in fresh.__dict__


# ---- the 1x1 conv + BN layers: effkernels::pwconv_bn_act_pack / _packed --------------------

def _pw_args(n, cin, h, w, cout, dtype, layout, zero_cols=False):
    x = make_input((n, cin, h, w), torch.float64, layout).to(dtype)
    weight = conv_weight((cout, cin, 1, 1), torch.float64)
    if zero_cols:  # block-diagonal, as MixNet's split 1x1 convs: per-panel k ranges
        weight[: cout // 2, cin // 2:] = 0
        weight[cout // 2:, : cin // 2] = 0
    bn = [t.double() for t in bn_params(cout)]
    return x, weight.to(dtype), [t.to(dtype) for t in bn]


def _pw_eval(x, weight, bn, act, residual=None, eps=1e-5):
    return OP.pwconv_bn_act(x, weight, *bn, residual, act, False, eps)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
@pytest.mark.parametrize("act, res", [("relu6", False), ("hswish", False), ("identity", True)])
def test_pw_packed_bitwise(dtype, layout, act, res):
    """The packed call computes exactly what pwconv_bn_act's eval pass computes (the same panels,
    tiles of the same shapes), and that is the layer (against the float64 reference); odd
    shapes, channels not a multiple of 8, an empty batch, another batch from the same pack."""
    x, weight, bn = _pw_args(2, 13, 7, 11, 37, dtype, layout)
    residual = make_input((2, 37, 7, 11), torch.float64, layout).to(dtype) if res else None
    packed = OP.pwconv_bn_act_pack(x, weight, *bn, 1e-5)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    out = OP.pwconv_bn_act_packed(x, packed, 37, act, residual)
    expected = _pw_eval(x, weight, bn, act, residual)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == \
        expected.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected), f"{dtype} {layout} {act}"
    if dtype in (torch.float32, torch.float64):
        ref = reference.pwconv_bn_act(x.double(), weight.double(), *[t.double() for t in bn],
                                      act=act, residual=None if residual is None
                                      else residual.double())
        assert_close(out, ref, dtype, "out")
    x1 = x[:1].clone()
    assert torch.equal(OP.pwconv_bn_act_packed(x1, packed, 37, act, None if residual is None
                                               else residual[:1].clone()),
                       _pw_eval(x1, weight, bn, act, None if residual is None
                                else residual[:1].clone()))
    empty = OP.pwconv_bn_act_packed(x[:0], packed, 37, act, None)
    assert empty.shape == (0, 37, 7, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pw_packed_bitwise_grouped(dtype):
    """A block-diagonal weight: the packed k ranges skip its zeros, as the per-call path does
    (and a NaN in x takes the full K there too)."""
    x, weight, bn = _pw_args(1, 48, 9, 9, 96, dtype, "channels_last", zero_cols=True)
    packed = OP.pwconv_bn_act_pack(x, weight, *bn, 1e-5)
    assert torch.equal(OP.pwconv_bn_act_packed(x, packed, 96, "relu", None),
                       _pw_eval(x, weight, bn, "relu"))
    x[0, 0, 0, 0] = float("nan")
    got, want = OP.pwconv_bn_act_packed(x, packed, 96, "relu", None), _pw_eval(x, weight, bn,
                                                                                "relu")
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_pw_packed_refused():
    x, weight, bn = _pw_args(2, 16, 5, 5, 24, torch.float32, "channels_last")
    packed = OP.pwconv_bn_act_pack(x, weight, *bn, 1e-5)
    with pytest.raises(RuntimeError, match="pwconv_bn_act_packed: x must be Float with 16 "
                                           "channels.*got BFloat16"):
        OP.pwconv_bn_act_packed(x.bfloat16(), packed, 24, "relu", None)
    with pytest.raises(RuntimeError, match="x must be Float with 16 channels.*got Float of "
                                           r"shape \[2, 8, "):
        OP.pwconv_bn_act_packed(x[:, :8], packed, 24, "relu", None)
    with pytest.raises(RuntimeError, match="packed holds 24 output channels; got out_channels "
                                           "25"):
        OP.pwconv_bn_act_packed(x, packed, 25, "relu", None)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        OP.pwconv_bn_act_packed(x, packed, 24, "identity", torch.randn(2, 23, 5, 5))
    with pytest.raises(RuntimeError, match="residual must have dtype Float like x"):
        OP.pwconv_bn_act_packed(x, packed, 24, "identity", torch.randn(2, 24, 5, 5).double())
    with pytest.raises(ValueError, match="act must be one of"):
        OP.pwconv_bn_act_packed(x, packed, 24, "gelu", None)
    with pytest.raises(RuntimeError, match="packed must be the contiguous 1-d uint8"):
        OP.pwconv_bn_act_packed(x, packed.float(), 24, "relu", None)
    with pytest.raises(RuntimeError, match="or is damaged"):
        OP.pwconv_bn_act_packed(x, packed[:-64].clone(), 24, "relu", None)
    with pytest.raises(RuntimeError, match="shorter than its header"):
        OP.pwconv_bn_act_packed(x, packed[:8].clone(), 24, "relu", None)
    with pytest.raises(RuntimeError, match="does not start with the header"):
        OP.pwconv_bn_act_packed(x, torch.zeros_like(packed), 24, "relu", None)
    # The pack checks its arguments as pwconv_bn_act does.
    with pytest.raises(RuntimeError, match="pwconv_bn_act_pack: weight must have shape"):
        OP.pwconv_bn_act_pack(x, weight[:, :8], *bn, 1e-5)


def test_pw_opcheck():
    x, weight, bn = _pw_args(2, 16, 5, 5, 24, torch.float32, "channels_last")
    packed = OP.pwconv_bn_act_pack(x, weight, *bn, 1e-5)
    torch.library.opcheck(OP.pwconv_bn_act_packed.default, (x, packed, 24, "relu6", None))
    torch.library.opcheck(OP.pwconv_bn_act_packed.default,
                          (x, packed, 24, "identity", torch.randn(2, 24, 5, 5)))
    torch.library.opcheck(OP.pwconv_bn_act_pack.default, (x, weight, *bn, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_prepacked_head_repacked():
    """The head's (and a ConvBnActBlock's) packed 1x1 conv + BN follows in-place changes and
    replaced tensors, as the blocks do; results equal an unprepacked copy's."""
    for name in ("mobilenetv2_100", "mobilenetv3_large_100"):
        model = _model(name)
        fresh = copy.deepcopy(model)
        prepack_for_inference(model)
        x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
        layer = model if name == "mobilenetv2_100" else model.blocks[6][0]
        bn = model.bn2 if name == "mobilenetv2_100" else model.blocks[6][0].bn1
        fresh_bn = fresh.bn2 if name == "mobilenetv2_100" else fresh.blocks[6][0].bn1
        with torch.no_grad():
            assert torch.equal(model(x), fresh(x))
            packed = _entry(layer)[3]
            for b in (bn, fresh_bn):
                b.running_var.mul_(1.5)
            assert torch.equal(model(x), fresh(x))
            assert _entry(layer)[3] is not packed
            for b in (bn, fresh_bn):
                b.weight = torch.nn.Parameter(b.weight * 0.5)
            assert torch.equal(model(x), fresh(x))


def _chain_used(model, x, monkeypatch):
    """Whether model(x) ran its blocks through the chained replay (no block forward called)."""
    calls = []
    for cls in (effkernels.nn.blocks._Block, effkernels.nn.blocks.ConvBnActBlock):
        real = cls.forward
        monkeypatch.setattr(cls, "forward",
                            lambda self, x_, real=real: calls.append(self) or real(self, x_))
    with torch.no_grad():
        out = model(x)
    monkeypatch.undo()
    return not calls, out


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mixnet_s"])
def test_prepacked_model_copies(name, monkeypatch):
    """A prepacked model that has run (packed weights, chained replay in its caches) deep-copies,
    pickles and saves; the copies do not take the caches (they refer to the original's modules
    and PyTorch's global hook dicts), pack and chain again, and give the same bits."""
    model = _model(name)
    prepack_for_inference(model)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        expected = model(x)
    assert model._packed_cache.get("chain") is not None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                   torch.load(buffer, weights_only=False)):
        assert copied._packed_cache == {}
        assert all(not m.__dict__.get("_packed_cache") and "_replay" not in m.__dict__
                   for m in copied.modules())
        with torch.no_grad():
            assert torch.equal(copied(x), expected)
        used, out = _chain_used(copied, x, monkeypatch)
        assert used and torch.equal(out, expected)
    assert _chain_used(model, x, monkeypatch)[0]  # the original's caches untouched


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mixnet_s"])
def test_chain_replay_follows_every_change(name, monkeypatch):
    """A prepacked model's blocks run as one chained replay (blocks._ChainReplay: the packed
    kernels one after the other, without module calls), bit for bit the blocks' results, and
    fall back to calling the blocks on any change those calls would see; each result equals
    that of an unprepacked copy that never replays."""
    model = _model(name)
    fresh = copy.deepcopy(model)
    prepack_for_inference(model)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def check(what, chained=True, stem_fused=True):
        used, got = _chain_used(model, x, monkeypatch)
        with torch.no_grad():
            want = fresh(x)
        assert torch.equal(got, want), what
        assert used == chained, f"{what}: chained replay {'not ' if chained else ''}used"
        if chained:  # the stem fused with the first block (_StemReplay) where it can be
            chain = model._packed_cache["chain"]
            assert chain.stem_owner is model and chain.stem_fused == stem_fused, what

    with torch.no_grad():
        model(x)
    assert model._packed_cache.get("chain") is not None  # built in the first call
    check("chained")
    changes = [
        ("in-place weight", lambda m: torch.no_grad()(
            effkernels.nn._functional.convs(m.blocks[3][1].conv_pwl)[0].weight.mul_)(0.5)),
        ("BN statistics", lambda m: torch.no_grad()(m.blocks[1][0].bn2.running_var.add_)(0.5)),
        ("block setting", lambda m: setattr(m.blocks[4][0], "act", "relu")),
        ("BN eps", lambda m: [setattr(getattr(m.blocks[5][0], bn), "eps", 1e-2)
                              for bn in ("bn1", "bn2", "bn3")]),
        ("block replaced", lambda m: m.blocks[2].__setitem__(1, copy.deepcopy(m.blocks[2][1]))),
        ("block appended", lambda m: m.blocks[2].append(copy.deepcopy(m.blocks[2][1]))),
        ("stage replaced", lambda m: m.blocks.__setitem__(
            1, copy.deepcopy(m.blocks[1]).requires_grad_(False))),
        ("stem weight", lambda m: torch.no_grad()(m.conv_stem.weight.mul_)(0.5)),
        ("stem BN statistics", lambda m: torch.no_grad()(m.bn1.running_mean.add_)(0.5)),
        ("stem BN eps", lambda m: setattr(m.bn1, "eps", 1e-2)),
        ("stem act", lambda m: setattr(m, "act", "relu6")),
        ("stem BN replaced", lambda m: setattr(m, "bn1", copy.deepcopy(m.bn1))),
        ("stem conv replaced", lambda m: setattr(m, "conv_stem", copy.deepcopy(m.conv_stem))),
        ("first block replaced", lambda m: m.blocks[0].__setitem__(
            0, copy.deepcopy(m.blocks[0][0]))),
    ]
    if name == "mobilenetv3_large_100":  # the ConvBnActBlock 160 -> 960 in the chain
        last = lambda m: m.blocks[6][0]  # noqa: E731
        changes += [
            ("ConvBnAct weight", lambda m: torch.no_grad()(last(m).conv.weight.mul_)(0.5)),
            ("ConvBnAct act", lambda m: setattr(last(m), "act", "relu")),
            ("ConvBnAct BN replaced", lambda m: setattr(last(m), "bn1",
                                                        copy.deepcopy(last(m).bn1))),
        ]
    for what, change in changes:
        change(model)
        change(fresh)
        check(what, chained=False)  # the layers run (and pack or replay) again
        check(what + ", again")     # chained again
    # A block in training mode (batch statistics) is called every time.
    for m in (model, fresh):
        m.blocks[3][0].train()
    check("block in training", chained=False)
    check("block in training, again", chained=False)
    for m in (model, fresh):
        m.blocks[3][0].eval()
    check("block in eval again", chained=False)
    check("block in eval again, twice")
    # The stem's BN in training mode: the blocks still chained, the stem run on its own.
    for m in (model, fresh):
        m.bn1.train()
    check("stem in training", chained=False)
    check("stem in training, again", stem_fused=False)
    for m in (model, fresh):
        m.bn1.eval()
    check("stem in eval again", chained=False)
    check("stem in eval again, twice")
    # A stem conv of another type (a subclass): the blocks chained, the stem run on its own;
    # a plain one again: fused again.
    class OwnConv(torch.nn.Conv2d):
        pass

    plain_stems = []
    for m in (model, fresh):
        plain_stems.append(m.conv_stem)
        own = OwnConv(3, m.conv_stem.out_channels, 3, 2, 1, bias=False)
        own.load_state_dict(m.conv_stem.state_dict())
        m.conv_stem = own
    check("stem of another type", chained=False)
    check("stem of another type, again", stem_fused=False)
    for m, plain in zip((model, fresh), plain_stems):
        m.conv_stem = plain
    check("plain stem again", chained=False)
    check("plain stem again, twice")
    # Hooks (on a block, a stage, every module) run: the layers are called.
    calls = []

    def hook(*args):
        calls.append(args)

    stage = model.blocks[2]
    for register in (lambda: stage[1].register_forward_hook(hook),
                     lambda: stage.register_forward_pre_hook(hook),
                     lambda: torch.nn.modules.module.register_module_forward_hook(hook)):
        handle = register()
        calls.clear()
        chain = model._packed_cache["chain"]
        check("hook", chained=False)
        check("hook, again", chained=False)
        assert calls
        assert model._packed_cache["chain"] is chain  # kept, not built again after each call
        handle.remove()
        check("hook removed")
    # An instance's own forward is called.
    block = model.blocks[3][1]
    block.forward = lambda x_: type(block).forward(block, x_)
    check("own forward", chained=False)
    del block.forward
    check("own forward removed")
    # Autocast, the reference backend, a gradient: the layers are called.
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(x), fresh(x))
        with effkernels.backend("reference"):
            assert torch.equal(model(x), fresh(x))
    assert_close(model(x).detach(), fresh(x).detach(), torch.float32, "grad")
    check("after the others", chained=False)  # autocast packed bf16 weights: packs again
    check("after the others, again")
    # While the profiler records, the layers are called, so that the profile shows them.
    with torch.profiler.profile() as prof:
        used, _ = _chain_used(model, x, monkeypatch)
    assert not used
    assert any("inverted_residual_packed" in e.name for e in prof.events())
    # Another dtype: the blocks' result (they cast their weights); wrong channels: the blocks'
    # checked error.
    channels = model.blocks[0][0].conv_dw.in_channels
    other = torch.randn(1, channels, 16, 16).double().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = effkernels.nn.blocks.run_sequential(model.blocks, other, model._packed_cache)
        assert got.dtype == torch.float64 and torch.equal(got, fresh.blocks(other))
    bad = torch.randn(1, channels + 1, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), pytest.raises(RuntimeError) as got:
        effkernels.nn.blocks.run_sequential(model.blocks, bad, model._packed_cache)
    with torch.no_grad(), pytest.raises(RuntimeError) as want:
        fresh.blocks(bad)
    assert str(got.value) == str(want.value)
    # Unprepacked: no chain.
    prepack_for_inference(model, enabled=False)
    used, out = _chain_used(model, x, monkeypatch)
    with torch.no_grad():
        assert not used and torch.equal(out, fresh(x))


def test_unchanged_check_in_c_matches_python():
    """_State.unchanged's compiled loop (csrc/python_module.cpp) answers as its Python
    expressions do: identity of dict entries (a missing key is None), settings by ==, tensor
    versions; and raises where they raise."""
    from effkernels.nn import blocks
    check = blocks._UNCHANGED
    assert check is not None, "effkernels._C has no unchanged()"
    conv = torch.nn.Conv2d(3, 4, 1)
    bn = torch.nn.BatchNorm2d(4)
    state = blocks._State()
    state._keep([(conv._parameters, "weight", conv.weight), (conv._parameters, "none", None)],
                [(conv, "stride"), (bn, "eps"), (bn, "training"), (conv, "__class__")],
                [conv.weight, bn.running_mean], [(conv._forward_hooks, 0), (bn._buffers, 3)])
    assert state.set_attr == ["__class__"]  # the others are identity entries of __dict__
    assert (vars(bn), "eps", bn.eps) in zip(state.same_in, state.same_key, state.same_obj)

    def both():
        lists = (state.same_in, state.same_key, state.same_obj, state.set_obj, state.set_attr,
                 state.set_value, state.tensors, state.versions, state.sized, state.sizes)
        saved, blocks._UNCHANGED = blocks._UNCHANGED, None
        try:
            python = state.unchanged()
        finally:
            blocks._UNCHANGED = saved
        compiled = check(*lists)
        assert compiled is python and state.unchanged() is python
        return python

    assert both() is True

    class OtherConv(torch.nn.Conv2d):
        pass

    conv.__class__ = OtherConv  # a setting compared by getattr
    assert both() is False
    conv.__class__ = torch.nn.Conv2d
    assert both() is True
    with torch.no_grad():
        bn.running_mean.add_(1.0)  # a version
    assert both() is False
    state._keep([(conv._parameters, "weight", conv.weight)], [(bn, "eps")], [bn.running_mean])
    assert both() is True
    bn.eps = 1e-3  # a setting
    assert both() is False
    bn.eps = 1e-5
    conv.weight = torch.nn.Parameter(conv.weight.detach().clone())  # a replaced tensor
    assert both() is False
    state._keep([(conv._parameters, "weight", conv.weight)], [(bn, "eps")], [bn.running_mean],
                [(conv._forward_hooks, 0), (bn._buffers, 3)])
    assert both() is True
    handle = conv.register_forward_hook(lambda *a: None)  # a size
    assert both() is False
    handle.remove()
    assert both() is True
    with pytest.raises(ValueError, match="differ in length"):
        check([{}], [], [], [], [], [], [], [], [], [])
    with pytest.raises(ValueError, match="differ in length"):
        check([], [], [], [], [], [], [], [], [{}], [])
    with pytest.raises(TypeError, match="same_in must hold dicts"):
        check([1], ["a"], [None], [], [], [], [], [], [], [])
    with pytest.raises(TypeError):  # len() of an object without one
        check([], [], [], [], [], [], [], [], [1], [0])
    with pytest.raises(AttributeError):
        check([], [], [], [bn], ["no_such_setting"], [0], [], [], [], [])
    with pytest.raises(TypeError, match="tensors must hold tensors"):
        check([], [], [], [], [], [], [1], [0], [], [])
    with torch.inference_mode():
        inference = torch.ones(2)
    with pytest.raises(RuntimeError, match="(?i)inference tensors"):
        check([], [], [], [], [], [], [inference], [0], [], [])
