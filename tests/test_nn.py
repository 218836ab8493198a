"""effkernels.nn modules against the torch.nn modules they replace: outputs, gradients,
BatchNorm buffers (incl. num_batches_tracked), in train and eval; the torchvision drop-in; and
the module behaviours users rely on (.to, channels_last, autocast, state_dict, repr, deepcopy,
pickle)."""
import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effkernels
from effkernels import nn as enn
from effkernels import ops, reference

from .helpers import assert_close

from .model_helpers import assert_rel, assert_train_matches, randomize_bn

_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish, "silu": nn.SiLU,
                "identity": nn.Identity}


def _torch_equivalent(module: nn.Module) -> nn.Module:
    """The same computation in plain torch.nn, sharing the parameters (deep-copied)."""
    m = copy.deepcopy(module)

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, residual=None):
            convs = list(m.conv) if isinstance(m.conv, nn.ModuleList) else [m.conv]
            if len(convs) > 1 and convs[0].groups > 1:  # mixed depthwise
                sizes = [c.in_channels for c in convs]
                y = torch.cat([c(t) for c, t in zip(convs, x.split(sizes, 1))], 1)
            elif len(convs) > 1:  # split pointwise
                sizes = [c.in_channels for c in convs]
                y = torch.cat([c(t) for c, t in zip(convs, x.split(sizes, 1))], 1)
            else:
                y = convs[0](x)
            y = m.bn(y)
            if residual is not None:
                y = y + residual
            return reference.activation(m.act, y)

    return Ref()


MODULES = {
    "dw3": lambda: enn.DepthwiseConvBNAct(12, 3, act="relu6"),
    "dw5_s2_hswish": lambda: enn.DepthwiseConvBNAct(12, 5, stride=2, act="hswish"),
    "dw3_dil2": lambda: enn.DepthwiseConvBNAct(12, 3, dilation=2, act="silu"),
    "mixed": lambda: enn.MixedDepthwiseConvBNAct(13, (3, 5, 7), act="relu"),
    "mixed_s2": lambda: enn.MixedDepthwiseConvBNAct(12, (3, 5), stride=2, act="silu"),
    "pw": lambda: enn.PointwiseConvBNAct(12, 20, act="relu6"),
    "pw_groups": lambda: enn.PointwiseConvBNAct(12, 20, act="identity", groups=2),
    "stem": lambda: enn.ConvBNAct(3, 16, 3, stride=2, act="hswish"),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_matches_torch(name, training):
    torch.manual_seed(0)
    ours = randomize_bn(MODULES[name]())
    ref = _torch_equivalent(ours)
    ours.train(training)
    ref.train(training)
    cin = ours.conv.in_channels if isinstance(ours.conv, nn.Conv2d) else \
        sum(c.in_channels for c in ours.conv)
    x = torch.randn(2, cin, 11, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, expected = ours(x), ref(x2)
    assert_rel(out, expected, 1e-5, "output")
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    assert_rel(x.grad, x2.grad, 1e-5, "x.grad")
    for (n, p), q in zip(ours.named_parameters(), ref.m.parameters()):
        assert_rel(p.grad, q.grad, 1e-5, f"{n}.grad")
    for (k, v), w in zip(ours.state_dict().items(), ref.m.state_dict().values()):
        assert torch.allclose(v.double(), w.double(), rtol=1e-5, atol=1e-7), k


def test_pointwise_residual():
    ours = randomize_bn(enn.PointwiseConvBNAct(8, 8, act="relu")).eval()
    x, r = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    assert_rel(ours(x, r), _torch_equivalent(ours)(x, r), 1e-5, "residual")


def _torchvision_mobilenet_v2(monkeypatch, block):
    from torchvision.models import mobilenetv2

    monkeypatch.setattr(mobilenetv2, "InvertedResidual", block)
    return mobilenetv2.mobilenet_v2(width_mult=0.5, dropout=0.0)


def test_torchvision_drop_in(monkeypatch):
    """Patching torchvision's class builds a mobilenet_v2 whose torchvision state_dict loads
    strictly and gives the same outputs and the same training step."""
    from torchvision.models import mobilenetv2

    torch.manual_seed(0)
    theirs = randomize_bn(mobilenetv2.mobilenet_v2(width_mult=0.5, dropout=0.0)).eval()
    ours = _torchvision_mobilenet_v2(monkeypatch, enn.InvertedResidual).eval()
    assert sum(isinstance(m, enn.InvertedResidual) for m in ours.modules()) == 17
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        assert_rel(ours(x), theirs(x), 1e-5, "eval")
    assert_train_matches(ours, theirs, torch.randn(4, 3, 40, 32), torch.randint(0, 1000, (4,)))


def test_torchvision_drop_in_norm_layer(monkeypatch):
    """mobilenet_v2(norm_layer=...) is passed to the block, as torchvision does."""
    from torchvision.models import mobilenetv2

    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=None)
    monkeypatch.setattr(mobilenetv2, "InvertedResidual", enn.InvertedResidual)
    ours = mobilenetv2.mobilenet_v2(width_mult=0.35, norm_layer=norm)
    monkeypatch.undo()
    theirs = mobilenetv2.mobilenet_v2(width_mult=0.35, norm_layer=norm)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.double(), theirs.double()  # exact semantics, not fp32 conditioning
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for _ in range(2):  # momentum=None: cumulative average over num_batches_tracked
        ours(x), theirs(x)
    for (k, v), w in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(v, w, rtol=1e-9, atol=1e-12), k
    with pytest.raises(TypeError, match="must be an nn.BatchNorm2d"):
        enn.InvertedResidual(8, 8, 1, 6, norm_layer=lambda c: nn.GroupNorm(1, c))


def _block_reference(block: enn.InvertedResidual, x: torch.Tensor) -> torch.Tensor:
    """InvertedResidual's definition in plain torch, run with block's own parameters (and
    BatchNorm buffers, which training updates)."""
    b = block
    layers = list(b.conv)
    h = x
    if len(layers) == (5 if b.conv[-3].__class__ is enn.SqueezeExcite else 4):
        conv, bn, _ = layers.pop(0)
        h = reference.activation(b.act, bn(conv(h)))
    conv, bn, _ = layers.pop(0)
    if isinstance(conv, nn.ModuleList):
        sizes = [c.in_channels for c in conv]
        h = torch.cat([c(t) for c, t in zip(conv, h.split(sizes, 1))], 1)
    else:
        h = conv(h)
    h = reference.activation(b.act, bn(h))
    if isinstance(layers[0], enn.SqueezeExcite):
        se = layers.pop(0)
        s = reference.activation(se.act, se.conv_reduce(h.mean((2, 3), keepdim=True)))
        h = h * reference.activation(se.gate, se.conv_expand(s))
    h = layers[1](layers[0](h))
    return h + x if b.use_res_connect else h


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kwargs", [
    dict(inp=16, oup=16, stride=1, expand_ratio=6),
    dict(inp=16, oup=24, stride=2, expand_ratio=1),
    dict(inp=12, oup=12, stride=1, expand_ratio=3, kernel_size=[3, 5], act="silu",
         se_ratio=0.25),
    dict(inp=12, oup=12, stride=1, expand_ratio=4, kernel_size=5, act="hswish", se_ratio=0.25,
         se_gate="hsigmoid", skip=False),
    dict(inp=10, oup=10, stride=1, expand_ratio=2, dilation=2, act="relu"),
], ids=["mnv2", "t1_s2", "mixconv_se", "hswish_noskip", "dilated"])
def test_inverted_residual_options(kwargs, training):
    block = randomize_bn(enn.InvertedResidual(**kwargs)).train(training)
    x = torch.randn(2, kwargs["inp"], 13, 10)
    ref_block = copy.deepcopy(block)
    out = block(x)
    assert_rel(out, _block_reference(ref_block, x), 1e-5, "output")
    if training:
        for (k, v), w in zip(block.state_dict().items(), ref_block.state_dict().values()):
            assert torch.allclose(v.double(), w.double(), rtol=1e-5, atol=1e-7), k


def test_plain_block_runs_the_fused_op(monkeypatch):
    calls = []
    real = effkernels.ops.inverted_residual
    monkeypatch.setattr(effkernels.ops, "inverted_residual",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    enn.InvertedResidual(8, 8, 1, 6).eval()(torch.randn(1, 8, 6, 6))
    enn.InvertedResidual(8, 8, 1, 6).train()(torch.randn(2, 8, 6, 6))
    assert len(calls) == 2
    enn.InvertedResidual(8, 8, 1, 6, kernel_size=[3, 5]).eval()(torch.randn(1, 8, 6, 6))
    assert len(calls) == 3  # MixConv in eval: the fused op (kernels zero-padded to 5x5)
    enn.InvertedResidual(8, 8, 1, 6, kernel_size=[3, 5]).train()(torch.randn(2, 8, 6, 6))
    assert len(calls) == 3  # in training it composes the single ops (mixconv_bn_act)


def test_module_behaviours():
    torch.manual_seed(0)
    block = randomize_bn(enn.InvertedResidual(16, 16, 1, 4, se_ratio=0.25, act="hswish"))
    block.eval()
    x = torch.randn(2, 16, 9, 8)
    expected = block(x)
    assert "act='hswish'" in repr(block) and "skip=True" in repr(block)
    # deepcopy and pickle keep the parameters and the roles
    assert torch.equal(copy.deepcopy(block)(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(block))(x), expected)
    # state_dict round trip into a fresh block
    fresh = enn.InvertedResidual(16, 16, 1, 4, se_ratio=0.25, act="hswish").eval()
    fresh.load_state_dict(block.state_dict(), strict=True)
    assert torch.equal(fresh(x), expected)
    # memory formats and dtypes
    cl = block(x.to(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert_rel(cl, expected, 1e-5, "channels_last")
    b64 = copy.deepcopy(block).to(torch.float64)
    assert b64(x.double()).dtype == torch.float64
    assert_rel(b64(x.double()), expected, 1e-5, "float64")
    bcl = copy.deepcopy(block).to(memory_format=torch.channels_last)
    assert_rel(bcl(x), expected, 1e-5, "channels_last parameters")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    torch.manual_seed(0)
    block = randomize_bn(enn.InvertedResidual(16, 16, 1, 4, se_ratio=0.25)).eval()
    x = torch.randn(2, 16, 9, 8)
    expected = block(x)
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)
    assert out.dtype == dtype
    assert_rel(out.float(), expected, 3e-2, f"autocast {dtype}")
    block.train()
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in block.parameters())


def test_bn_options_track_running_stats_off():
    """BatchNorm without running statistics uses batch statistics in eval too."""
    block = enn.DepthwiseConvBNAct(8, 3, act="relu")
    block.bn = nn.BatchNorm2d(8, track_running_stats=False)
    ref = _torch_equivalent(block)
    x = torch.randn(2, 8, 6, 7)
    for mode in (True, False):
        block.train(mode)
        ref.train(mode)
        assert_rel(block(x), ref(x), 1e-5, f"training={mode}")


def test_bad_arguments():
    with pytest.raises(ValueError, match="act must be one of"):
        enn.DepthwiseConvBNAct(8, 3, act="gelu")
    with pytest.raises(ValueError, match="stride should be 1 or 2"):
        enn.InvertedResidual(8, 8, 3, 6)
    with pytest.raises(ValueError, match="weight must have shape"):
        enn.DepthwiseConvBNAct(8, 3)(torch.randn(1, 6, 5, 5))


def test_modules_follow_the_backend():
    block = randomize_bn(enn.InvertedResidual(8, 8, 1, 3, kernel_size=[3, 5])).eval()
    x = torch.randn(2, 8, 7, 6)
    with effkernels.backend("reference"):
        expected = block(x)
    assert_rel(block(x), expected, 1e-5, "cpu vs reference backend")


@pytest.mark.parametrize("act", ["relu6", "relu", "hswish", "silu", "identity"])
@pytest.mark.parametrize("conv_bias,affine", [(False, True), (True, False)])
@pytest.mark.parametrize("kernel", [True, False])
def test_dense_conv_eval_folds_bn(act, conv_bias, affine, kernel, monkeypatch):
    """A dense conv (the stem) in inference runs effkernels::conv_bn_act_inference (3 input
    channels, affine BN: ops._conv_bn_act_inference) or else folds BN into torch's convolution
    and applies the activation in place (kernel=False: no channel count takes the kernel):
    the conv + BN + act result (float64 reference) either way, and the same as with a
    gradient recorded (the unfolded path)."""
    from effkernels.nn import _functional
    folds, kernel_calls = [], []
    acts = dict(_functional._INPLACE_ACT)
    monkeypatch.setattr(_functional, "_INPLACE_ACT", {
        k: (lambda y, f=f: folds.append(1) or f(y)) for k, f in acts.items()})
    direct = ops._conv_bn_act_inference
    monkeypatch.setattr(ops, "_conv_bn_act_inference", lambda *a: (
        lambda y: kernel_calls.append(y is not None) or y)(direct(*a)))
    if not kernel:
        monkeypatch.setattr(ops, "_CONV_MAX_IN_CHANNELS", 0)
    takes_kernel = kernel and affine and effkernels.available_backends("cpu")["cpu"] == \
        "available"
    torch.manual_seed(0)
    m = enn.ConvBNAct(3, 24, 3, stride=2, act=act).eval()
    if conv_bias:
        m.conv.bias = nn.Parameter(torch.randn(24) * 0.1)
    if not affine:
        m.bn = nn.BatchNorm2d(24, affine=False).eval()
    m.bn.running_mean.normal_(0, 0.2)
    m.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 17, 15).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        folded = m(x)
        m64 = copy.deepcopy(m).double()
        expected = reference.activation(act, F.batch_norm(
            m64.conv(x.double()), m64.bn.running_mean, m64.bn.running_var, m64.bn.weight,
            m64.bn.bias, False, 0.0, m64.bn.eps))
    assert (folds, True in kernel_calls) == (([], True) if takes_kernel else ([1], False))
    unfolded = m(x)  # parameters require grad, grad mode on: conv, then BN, then act
    assert unfolded.requires_grad and not folded.requires_grad
    assert (len(folds), True in kernel_calls) == (0 if takes_kernel else 1, takes_kernel)
    assert_close(folded, expected, torch.float32, "folded")
    assert_close(unfolded.detach(), expected, torch.float32, "unfolded")
