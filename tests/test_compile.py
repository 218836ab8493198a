"""A small network of effkernels ops under torch.compile(fullgraph=True): no graph breaks, same
outputs, gradients and running statistics as eager."""
import copy

import pytest
import torch
from torch import nn

import effkernels
from effkernels import ops

from .helpers import assert_close, bn_params


class _BN(nn.Module):
    def __init__(self, c):
        super().__init__()
        g, b, rm, rv = bn_params(c)
        self.weight, self.bias = nn.Parameter(g), nn.Parameter(b)
        self.register_buffer("running_mean", rm)
        self.register_buffer("running_var", rv)

    def args(self):
        return self.weight, self.bias, self.running_mean, self.running_var


class TinyNet(nn.Module):
    """expand pw -> mixconv -> dw (stride 2) -> project pw + residual-free -> block."""

    def __init__(self):
        super().__init__()
        self.w_exp = nn.Parameter(torch.randn(12, 4, 1, 1) * 0.3)
        self.bn_exp = _BN(12)
        self.w_mix = nn.ParameterList([nn.Parameter(torch.randn(6, 1, 3, 3) * 0.3),
                                       nn.Parameter(torch.randn(6, 1, 5, 5) * 0.2)])
        self.bn_mix = _BN(12)
        self.w_dw = nn.Parameter(torch.randn(12, 1, 3, 3) * 0.3)
        self.bn_dw = _BN(12)
        self.w_proj = nn.Parameter(torch.randn(4, 12, 1, 1) * 0.3)
        self.bn_proj = _BN(4)
        self.block_exp = [nn.Parameter(torch.randn(8, 4, 1, 1) * 0.3), _BN(8)]
        self.block_dw = [nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3), _BN(8)]
        self.block_proj = [nn.Parameter(torch.randn(4, 8, 1, 1) * 0.3), _BN(4)]
        self.block = nn.ModuleList([self.block_exp[1], self.block_dw[1], self.block_proj[1]])
        self.block_w = nn.ParameterList([self.block_exp[0], self.block_dw[0], self.block_proj[0]])

    def forward(self, x):
        t = self.training
        h = ops.pwconv_bn_act(x, self.w_exp, *self.bn_exp.args(), act="relu6", training=t)
        h = ops.mixconv_bn_act(h, list(self.w_mix), *self.bn_mix.args(), act="silu", training=t)
        h = ops.dwconv_bn_act(h, self.w_dw, *self.bn_dw.args(), stride=2, act="hswish",
                              training=t)
        h = ops.pwconv_bn_act(h, self.w_proj, *self.bn_proj.args(), act="identity", training=t)
        stage = lambda i: [self.block_w[i], *self.block[i].args()]
        return ops.inverted_residual(h, stage(0), stage(1), [], stage(2), act="relu6",
                                     training=t)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(backend, training):
    torch.manual_seed(0)
    eager = TinyNet().train(training)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(2, 4, 9, 11).contiguous(memory_format=torch.channels_last)
    with effkernels.backend(backend):
        compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
        y_ref = eager(x)
        y = compiled(x)
        y_ref.square().sum().backward()
        y.square().sum().backward()
    assert_close(y, y_ref, torch.float32, "out")
    for (name, p), p_ref in zip(compiled_model.named_parameters(), eager.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float32, f"grad {name}", factor=10)
    for (name, b), b_ref in zip(compiled_model.named_buffers(), eager.buffers()):
        assert_close(b, b_ref, torch.float32, name)


def test_compile_inductor_eval():
    """The inductor backend (C++ codegen on CPU) around our ops, eval forward."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with effkernels.backend("cpu"), torch.no_grad():
        y_ref = model(x)
        y = torch.compile(model, fullgraph=True)(x)
    assert_close(y, y_ref, torch.float32, "out")
