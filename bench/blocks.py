"""Block suite: the inverted-residual block, timm's module (PyTorch eager, NCHW and
channels_last; torch.compile of it; ONNX Runtime on CPU) against the same block converted by
effkernels.convert (one fused effkernels.ops.inverted_residual call), channels_last input.

  fwd      eval mode, torch.no_grad
  fwd+bwd  train mode (batch statistics), forward + gradients w.r.t. x and every parameter

Verified against timm's block in float64 first.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import List

import torch
from torch import nn

import effkernels
import effkernels.nn

from . import harness
from .harness import Built, Case

CL = torch.channels_last

# name -> (timm InvertedResidual kwargs, C, H, description)
BLOCKS = {
    "ir_mbv2": (dict(in_chs=24, out_chs=24, dw_kernel_size=3, exp_ratio=6.0, act="relu6"), 24,
                56, "C24 t6 k3 56x56 relu6"),
    "mbconv_se_b0": (dict(in_chs=40, out_chs=40, dw_kernel_size=5, exp_ratio=6.0, act="silu",
                          se=1 / 24), 40, 28, "C40 t6 k5 SE 28x28 silu"),
}
QUICK = [("ir_mbv2", 8, "fwd"), ("ir_mbv2", 8, "fwd+bwd")]


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random, well-conditioned BN state (never the init's 1/0), as tests/model_helpers.py."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 0.6, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


class TorchBlock(nn.Module):
    """The block in plain torch.nn with timm's parameter names: the baseline where timm is not
    installed (the GPU machine's image); effkernels.nn.MBConv loads its state_dict."""

    def __init__(self, in_chs, out_chs, dw_kernel_size, exp_ratio, act, se=None):
        super().__init__()
        mid, k = int(in_chs * exp_ratio), dw_kernel_size
        self.conv_pw, self.bn1 = nn.Conv2d(in_chs, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, k, 1, k // 2, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.rd = round(mid * se) if se else 0
        self.se = nn.Sequential() if not se else nn.Module()
        if se:
            self.se.conv_reduce = nn.Conv2d(mid, self.rd, 1)
            self.se.conv_expand = nn.Conv2d(self.rd, mid, 1)
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs)
        self.act = act()
        self.skip = in_chs == out_chs

    def forward(self, x):
        h = self.act(self.bn2(self.conv_dw(self.act(self.bn1(self.conv_pw(x))))))
        if self.rd:
            s = self.act(self.se.conv_reduce(h.mean((2, 3), keepdim=True)))
            h = h * torch.sigmoid(self.se.conv_expand(s))
        h = self.bn3(self.conv_pwl(h))
        return h + x if self.skip else h


def _blocks_pair(kw):
    """(baseline, ours): timm's block and effkernels.convert of it, or without timm the plain
    torch.nn block and an effkernels.nn.MBConv holding its weights."""
    try:
        theirs = randomize_bn(timm_block(kw))
        return theirs, effkernels.convert(nn.Sequential(copy.deepcopy(theirs)))
    except ImportError:
        kw = dict(kw)
        name = kw.pop("act")
        act = {"relu6": nn.ReLU6, "silu": nn.SiLU, "relu": nn.ReLU}[name]
        theirs = randomize_bn(TorchBlock(kw["in_chs"], kw["out_chs"], kw["dw_kernel_size"],
                                         kw["exp_ratio"], act, kw.get("se")))
        mid = theirs.conv_pw.out_channels
        ours = effkernels.nn.MBConv(kw["in_chs"], kw["out_chs"], mid,
                                    dw_kernel_size=kw["dw_kernel_size"], act=name,
                                    rd_channels=theirs.rd, se_act=name)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        return theirs, ours


def timm_block(kw) -> nn.Module:
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    kw = dict(kw)
    act = {"relu6": nn.ReLU6, "silu": nn.SiLU, "relu": nn.ReLU}[kw.pop("act")]
    se = kw.pop("se", None)
    if se:
        kw["se_layer"] = partial(SqueezeExcite, rd_ratio=se)
    return InvertedResidual(act_layer=act, **kw)


def module_built(theirs: nn.Module, ours: nn.Module, x: torch.Tensor, mode: str, opts) -> Built:
    """Implementations of a module forward (fwd) or forward + backward (fwd+bwd)."""
    device, dtype = opts.device, opts.dtype
    train = mode != "fwd"
    theirs = theirs.to(device, dtype).train(train)
    ours = ours.to(device, dtype).train(train)
    x = x.to(device, dtype)

    def variant(module, memory_format, compile_it=False):
        m = copy.deepcopy(module).to(memory_format=memory_format)
        xi = x.contiguous(memory_format=memory_format)
        fn = harness.compiled(m) if compile_it else m
        return m, xi, fn

    out = theirs(x)
    dy = torch.randn_like(out)

    def make(name, module, memory_format, compile_it=False):
        m, xi, fn = variant(module, memory_format, compile_it)
        if not train:
            return harness.fwd_impl(name, fn, [xi], compiles=compile_it)
        xi = xi.detach().requires_grad_()
        wrt = [xi] + list(m.parameters())
        return harness.grad_impl(name, fn, [xi], wrt, dy.contiguous(memory_format=memory_format),
                                 mode, compiles=compile_it)

    impls = [make("eager_nchw", theirs, torch.contiguous_format), make("eager_cl", theirs, CL)]
    skipped = {}
    if opts.compile_budget > 0:
        impls.append(make("compile", theirs, CL, compile_it=True))
    else:
        skipped["compile"] = "--compile-budget 0"
    if not train and device == "cpu" and dtype == torch.float32 and opts.ort is None:
        impls.append(harness.ort_impl(copy.deepcopy(theirs), [x.contiguous()]))
    elif not train and device == "cpu":
        skipped["onnxruntime"] = opts.ort or "float32 only"
    impls.append(make(harness.OURS, ours, CL))
    if not train and device == "cpu":
        prepacked = copy.deepcopy(ours)
        effkernels.nn.prepack_for_inference(prepacked)
        impls.append(make(harness.OURS_PREPACKED, prepacked, CL))
    if opts.compile_ours:
        impls.append(make(harness.OURS_COMPILE, ours, CL, compile_it=True))

    def ref():
        m = copy.deepcopy(theirs).to("cpu", torch.float64)
        xi = x.detach().to("cpu", torch.float64)
        if not train:
            with torch.no_grad():
                return [m(xi)]
        xi.requires_grad_()
        o = m(xi)
        return [o.detach()] + list(torch.autograd.grad(o, [xi] + list(m.parameters()),
                                                       dy.to("cpu", torch.float64)))

    return Built(impls, ref, tol=harness.TOL[dtype], skipped=skipped)


def block_case(name: str, n: int, mode: str, opts) -> Case:
    kw, c, h, desc = BLOCKS[name]

    def build():
        torch.manual_seed(0)
        theirs, ours = _blocks_pair(kw)
        return module_built(theirs, ours, torch.randn(n, c, h, h), mode, opts)

    return Case("blocks", "inverted_residual", f"{name} {desc}", n, mode, build)


# --targets: issue 7's CPU block (eval, N=1 and 8: >= ONNX Runtime, >= 3x eager) and the GPU
# target of issues 3 and 4 (bench/gpu_check.sh: --targets --dtype float16).
CPU_TARGETS = [("ir_mbv2", 1, "fwd"), ("ir_mbv2", 8, "fwd")]
GPU_TARGETS = [("ir_mbv2", 64, "fwd")]


def cases(opts) -> List[Case]:
    if getattr(opts, "targets", False):
        targets = CPU_TARGETS if opts.device == "cpu" else GPU_TARGETS
        return [block_case(b, n, m, opts) for b, n, m in targets]
    if opts.quick:
        return [block_case(b, n, m, opts) for b, n, m in QUICK]
    return [block_case(b, n, m, opts) for b in BLOCKS for m in ("fwd", "fwd+bwd") for n in (1, 8)]
