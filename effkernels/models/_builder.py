"""Decodes architecture strings into blocks: the one builder of every effkernels model.

A stage is a list of block strings, e.g. 'ir_r2_k3_s2_e6_c24_se0.25' (the notation of the
MnasNet/EfficientNet TPU reference code, also timm's): block type ds (depthwise-separable),
dsa (depthwise-separable with an activation after the 1x1, MobileNetV1), ir (inverted
residual), cn (conv+BN+act); r repeats; k depthwise kernel ('3.5.7': MixConv groups); a / p the
expand / project 1x1 split into groups ('1.1': two groups); s stride of the first repeat; e
expansion ratio; c output channels; se squeeze-excite ratio; nre/nr6/nhs/nsw the activation
(relu, relu6, hswish, silu); noskip / skip.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Union

from torch import nn

from ..nn import ConvBnActBlock, DepthwiseSeparable, MBConv
from ..nn.modules import make_divisible

Kernel = Union[int, List[int]]
_ACTS = {"re": "relu", "r6": "relu6", "hs": "hswish", "sw": "silu"}


def round_channels(channels: float, multiplier: float = 1.0, divisor: int = 8) -> int:
    return make_divisible(channels * multiplier, divisor) if multiplier else int(channels)


@dataclass
class BlockArgs:
    kind: str
    repeats: int
    out_chs: int
    stride: int
    kernel: Kernel = 3
    exp_kernel: Kernel = 1
    pw_kernel: Kernel = 1
    exp_ratio: float = 1.0
    se_ratio: float = 0.0
    act: Optional[str] = None
    skip: Optional[bool] = None  # None: the block type's rule


def _kernel(text: str) -> Kernel:
    return int(text) if text.isdigit() else [int(k) for k in text.split(".")]


def decode_block(text: str) -> BlockArgs:
    kind, *tokens = text.split("_")
    if kind not in ("ir", "ds", "dsa", "cn"):
        raise ValueError(f"block string {text!r}: unknown block type {kind!r} (ir, ds, dsa, cn)")
    opts, act, skip = {}, None, None
    for tok in tokens:
        if tok in ("noskip", "skip"):
            skip = tok == "skip"
        elif tok.startswith("n") and tok[1:] in _ACTS:
            act = _ACTS[tok[1:]]
        else:
            key, value = re.match(r"([a-z]+)(\d.*)", tok).groups()
            opts[key] = value
    return BlockArgs(kind=kind, repeats=int(opts["r"]), out_chs=int(opts["c"]),
                     stride=int(opts["s"]), kernel=_kernel(opts.get("k", "3")),
                     exp_kernel=_kernel(opts.get("a", "1")), pw_kernel=_kernel(opts.get("p", "1")),
                     exp_ratio=float(opts.get("e", "1")), se_ratio=float(opts.get("se", "0")),
                     act=act, skip=skip)


def _scale_depth(stage: List[BlockArgs], multiplier: float, trunc: str) -> List[BlockArgs]:
    """Compound depth scaling of one stage: the total repeat count is scaled (ceil, or round),
    then shared out over the stage's block strings from the last one back."""
    repeats = [b.repeats for b in stage]
    total = sum(repeats)
    scaled_total = max(1, round(total * multiplier)) if trunc == "round" \
        else int(math.ceil(total * multiplier))
    scaled = []
    for r in reversed(repeats):
        rs = max(1, round(r / total * scaled_total))
        scaled.append(rs)
        total -= r
        scaled_total -= rs
    out = []
    for b, r in zip(stage, reversed(scaled)):
        out += [replace(b, repeats=1) for _ in range(r)]
    return out


def decode_arch(arch: Sequence[Sequence[str]], depth_multiplier: float = 1.0,
                depth_trunc: str = "ceil", fix_first_last: bool = False
                ) -> List[List[BlockArgs]]:
    stages = []
    for i, strings in enumerate(arch):
        fixed = fix_first_last and i in (0, len(arch) - 1)
        stages.append(_scale_depth([decode_block(s) for s in strings],
                                   1.0 if fixed else depth_multiplier, depth_trunc))
    return stages


@dataclass
class BuildConfig:
    round_chs: Callable[[float], int]
    act: str
    se_from_exp: bool = False  # SE reduction relative to the expanded channels
    se_round: Callable[[float], int] = round
    se_act: Optional[str] = None  # None: the block's activation
    se_gate: str = "sigmoid"
    same: bool = False  # TF 'SAME' padding
    eps: float = 1e-5
    momentum: float = 0.1
    drop_path_rate: float = 0.0


def build_stages(stages: List[List[BlockArgs]], in_chs: int, cfg: BuildConfig
                 ) -> tuple[nn.Sequential, int]:
    """The blocks as nn.Sequential of stages (timm's 'blocks.i.j' layout); returns them and the
    output channel count."""
    total = sum(len(s) for s in stages)
    index = 0
    out_stages = []
    for stage in stages:
        blocks = []
        for j, b in enumerate(stage):
            stride = b.stride if j == 0 else 1
            out_chs = cfg.round_chs(b.out_chs)
            act = b.act or cfg.act
            se_act = cfg.se_act or act
            dpr = cfg.drop_path_rate * index / total
            common = dict(stride=stride, act=act, same=cfg.same, eps=cfg.eps,
                          momentum=cfg.momentum)
            se_ratio = b.se_ratio / (1.0 if cfg.se_from_exp else b.exp_ratio)
            if b.kind == "ir":
                mid = make_divisible(in_chs * b.exp_ratio)
                rd = cfg.se_round(mid * se_ratio) if se_ratio else 0
                block = MBConv(in_chs, out_chs, mid, dw_kernel_size=b.kernel,
                               exp_kernel_size=b.exp_kernel, pw_kernel_size=b.pw_kernel,
                               rd_channels=rd, se_act=se_act, se_gate=cfg.se_gate,
                               noskip=b.skip is False, drop_path_rate=dpr, **common)
            elif b.kind in ("ds", "dsa"):
                rd = cfg.se_round(in_chs * se_ratio) if se_ratio else 0
                block = DepthwiseSeparable(in_chs, out_chs, dw_kernel_size=b.kernel,
                                           pw_kernel_size=b.pw_kernel, pw_act=b.kind == "dsa",
                                           rd_channels=rd, se_act=se_act, se_gate=cfg.se_gate,
                                           noskip=b.kind == "dsa" or b.skip is False,
                                           drop_path_rate=dpr, **common)
            else:
                block = ConvBnActBlock(in_chs, out_chs, b.kernel, skip=b.skip is True,
                                       **common)
            blocks.append(block)
            in_chs = out_chs
            index += 1
        out_stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*out_stages), in_chs
