"""effkernels.convert: swaps the blocks of an existing timm or torchvision model for effkernels
modules, in place, keeping every parameter and buffer (under the same state_dict keys).

    model = torchvision.models.mobilenet_v3_large(weights=...)
    model = effkernels.convert(model)       # the same model object, now on effkernels ops
    print(model.effkernels_convert_report)  # what was converted, and what was left as it was

Converted: torchvision's MobileNetV2/V3 InvertedResidual, MNASNet _InvertedResidual,
EfficientNet MBConv and Conv2dNormActivation; timm's InvertedResidual, DepthwiseSeparableConv
and ConvBnAct. Anything else (and a block with, e.g., a non-BatchNorm norm or an activation the
ops lack) is left as it is and listed in the report.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .nn import _functional as F_
from .nn.blocks import _Block
from .nn.modules import NotScriptable

_ACTS = {"relu": "relu", "relu6": "relu6", "hardswish": "hswish", "hardswishme": "hswish",
         "silu": "silu", "swish": "silu", "swishme": "silu", "identity": "identity",
         "hardsigmoid": "hsigmoid", "hardsigmoidme": "hsigmoid", "sigmoid": "sigmoid"}

_TORCHVISION_BLOCKS = {"InvertedResidual": ("conv", "block"), "_InvertedResidual": ("layers",),
                       "MBConv": ("block",)}
_TIMM_BLOCKS = ("InvertedResidual", "DepthwiseSeparableConv", "ConvBnAct")


class Unsupported(Exception):
    pass


@dataclass
class ConvertReport:
    converted: List[str] = field(default_factory=list)
    unsupported: List[Tuple[str, str]] = field(default_factory=list)  # (name, why)

    def __str__(self) -> str:
        lines = [f"effkernels.convert: {len(self.converted)} modules converted"]
        lines += [f"  left as is: {name} ({why})" for name, why in self.unsupported]
        return "\n".join(lines)


def _act_name(module: Optional[nn.Module]) -> str:
    if module is None:
        return "identity"
    name = type(module).__name__.lower()
    if name not in _ACTS:
        raise Unsupported(f"activation {type(module).__name__} has no effkernels kernel")
    return _ACTS[name]


def _is_depthwise(conv: nn.Module) -> bool:
    return all(c.groups == c.in_channels == c.out_channels for c in F_.convs(conv))


def _is_pointwise(conv: nn.Module) -> bool:
    return all(c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1
               for c in F_.convs(conv))


def _is_same(conv: nn.Module) -> bool:
    return any(type(c).__name__ == "Conv2dSame" for c in F_.convs(conv))


def _check_conv(conv: nn.Module, path) -> None:
    for c in F_.convs(conv):
        if not isinstance(c, nn.Conv2d) or c.bias is not None or c.padding_mode != "zeros":
            raise Unsupported(f"{'.'.join(path)} is not a bias-free zero-padded nn.Conv2d")


def _adopt(module: nn.Module, source: nn.Module) -> None:
    """Gives module the source's children under their names (so the same state_dict keys),
    its public plain attributes (use_res_connect, out_channels, ...; also torchvision's
    _is_cn, read by its detection backbones) and a `source` naming the replaced class."""
    for name, child in source.named_children():
        module.add_module(name, child)
    for key, value in vars(source).items():
        if (not key.startswith("_") or key == "_is_cn") and \
                isinstance(value, (bool, int, float, str, tuple)):
            setattr(module, key, value)
    module.source = f"{type(source).__module__}.{type(source).__name__}"


class AdoptedBlock(_Block):
    """An inverted-residual / depthwise-separable block of another library, run by effkernels:
    the source block's children are kept under their names (same state_dict keys) and its
    public attributes (use_res_connect, out_channels, ...) are copied."""

    def __init__(self, source: nn.Module, roles: Dict[str, tuple], **config):
        super().__init__()
        _adopt(self, source)
        self._setup(roles, **config)


class AdoptedConvBNAct(NotScriptable, nn.Module):
    """conv + BatchNorm + act (+ skip) of another library (torchvision's Conv2dNormActivation,
    timm's ConvBnAct), run by effkernels with the source's children and keys."""

    def __init__(self, source: nn.Module, conv: str, bn: str, act: str, skip: bool = False,
                 same: bool = False):
        super().__init__()
        _adopt(self, source)
        self._conv, self._bn, self.act, self.skip, self.same = conv, bn, act, skip, same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.conv_bn_act(x, self._modules[self._conv], self._modules[self._bn], self.act,
                              self.same, residual=x if self.skip else None)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, skip={self.skip}, source={self.source}"


def _sequential_roles(seq_name: str, seq: nn.Sequential):
    """Roles of a torchvision block body: [expand] depthwise [SE] project, each a conv, a
    BatchNorm and an optional activation (flat, or grouped in Conv2dNormActivation)."""
    stages, se = [], None
    for name, child in seq.named_children():
        items = [((name,), child)]
        if isinstance(child, nn.Sequential):
            items = [((name, n), c) for n, c in child.named_children()]
        for path, mod in items:
            path = (seq_name,) + path
            if isinstance(mod, nn.Conv2d):
                _check_conv(mod, path)
                stages.append(dict(conv=path, mod=mod, bn=None, act=None))
            elif isinstance(mod, nn.BatchNorm2d) and stages and stages[-1]["bn"] is None:
                stages[-1]["bn"] = path
            elif hasattr(mod, "fc1") and hasattr(mod, "fc2"):  # torchvision SqueezeExcitation
                se = dict(se_reduce=path + ("fc1",), se_expand=path + ("fc2",),
                          se_act=_act_name(mod.activation),
                          se_gate=_act_name(mod.scale_activation))
            elif stages and stages[-1]["act"] is None and stages[-1]["bn"] is not None:
                stages[-1]["act"] = _act_name(mod)
            else:
                raise Unsupported(f"unexpected {type(mod).__name__} at {'.'.join(path)}")
    if len(stages) not in (2, 3) or any(s["bn"] is None for s in stages):
        raise Unsupported("not [1x1] -> depthwise -> 1x1, each with a BatchNorm2d")
    *expand, dw, project = stages
    if not _is_depthwise(dw["mod"]) or not all(_is_pointwise(s["mod"]) for s in expand +
                                                   [project]):
        raise Unsupported("not 1x1 -> depthwise -> 1x1")
    act = dw["act"] or "identity"
    if expand and (expand[0]["act"] or "identity") != act:
        raise Unsupported("the expand and depthwise activations differ")
    roles = dict(dw_conv=dw["conv"], dw_bn=dw["bn"], project_conv=project["conv"],
                 project_bn=project["bn"])
    if expand:
        roles.update(expand_conv=expand[0]["conv"], expand_bn=expand[0]["bn"])
    config = dict(act=act, project_act=project["act"] or "identity")
    if se:
        roles.update(se_reduce=se.pop("se_reduce"), se_expand=se.pop("se_expand"))
        config.update(se)
    return roles, config


def _torchvision_block(module: nn.Module) -> nn.Module:
    for seq_name in _TORCHVISION_BLOCKS[type(module).__name__]:
        seq = getattr(module, seq_name, None)
        if isinstance(seq, nn.Sequential):
            break
    else:
        raise Unsupported("no block body")
    roles, config = _sequential_roles(seq_name, seq)
    skip = bool(getattr(module, "use_res_connect", getattr(module, "apply_residual", False)))
    if hasattr(module, "stochastic_depth"):
        roles["drop_path"] = ("stochastic_depth",)
    return AdoptedBlock(module, roles, skip=skip, **config)


def _bn_act(bn: nn.Module) -> str:
    """The activation of timm's BatchNormAct2d (act after the norm), identity for a plain BN."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise Unsupported(f"norm {type(bn).__name__} is not a BatchNorm2d")
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise Unsupported("BatchNormAct2d with dropout")
    return _act_name(getattr(bn, "act", None))


def _timm_block(module: nn.Module) -> nn.Module:
    kind = type(module).__name__
    for attr in ("conv_s2d", "aa"):
        extra = getattr(module, attr, None)
        if extra is not None and not isinstance(extra, nn.Identity):
            raise Unsupported(f"{attr} is not supported")
    skip = bool(getattr(module, "has_skip", False))
    if kind == "ConvBnAct":
        _check_conv(module.conv, ("conv",))
        return AdoptedConvBNAct(module, "conv", "bn1", _bn_act(module.bn1), skip,
                                _is_same(module.conv))
    if kind == "InvertedResidual":
        names = dict(expand_conv="conv_pw", expand_bn="bn1", dw_conv="conv_dw", dw_bn="bn2",
                     project_conv="conv_pwl", project_bn="bn3")
        act, project_act = _bn_act(module.bn2), _bn_act(module.bn3)
        if _bn_act(module.bn1) != act:
            raise Unsupported("the expand and depthwise activations differ")
    else:  # DepthwiseSeparableConv
        names = dict(dw_conv="conv_dw", dw_bn="bn1", project_conv="conv_pw", project_bn="bn2")
        act, project_act = _bn_act(module.bn1), _bn_act(module.bn2)
    for role, name in names.items():
        if role.endswith("conv"):
            _check_conv(getattr(module, name), (name,))
            if (role == "dw_conv") != (not _is_pointwise(getattr(module, name))) or \
                    role == "dw_conv" and not _is_depthwise(module.conv_dw):
                raise Unsupported("not [1x1] -> depthwise -> 1x1")
    roles = {role: (name,) for role, name in names.items()}
    config = dict(act=act, project_act=project_act, same=_is_same(module.conv_dw))
    se = module.se
    if not isinstance(se, nn.Identity):
        if not (hasattr(se, "conv_reduce") and hasattr(se, "conv_expand")):
            raise Unsupported(f"attention module {type(se).__name__}")
        roles.update(se_reduce=("se", "conv_reduce"), se_expand=("se", "conv_expand"))
        config.update(se_act=_act_name(se.act1), se_gate=_act_name(se.gate))
    if not isinstance(getattr(module, "drop_path", nn.Identity()), nn.Identity):
        roles["drop_path"] = ("drop_path",)
    return AdoptedBlock(module, roles, skip=skip, **config)


def _converter(module: nn.Module):
    kind, where = type(module).__name__, type(module).__module__
    if where.startswith("torchvision.") and kind in _TORCHVISION_BLOCKS:
        return _torchvision_block
    if where.startswith("torchvision.") and kind == "Conv2dNormActivation":
        return _torchvision_conv_norm_act
    if where.startswith("timm.") and kind in _TIMM_BLOCKS:
        return _timm_block
    return None


def _torchvision_conv_norm_act(module: nn.Module) -> nn.Module:
    children = list(module.children())
    if len(children) not in (2, 3) or not isinstance(children[0], nn.Conv2d) \
            or not isinstance(children[1], nn.BatchNorm2d):
        raise Unsupported("not Conv2d + BatchNorm2d [+ activation]")
    _check_conv(children[0], ("0",))
    return AdoptedConvBNAct(module, "0", "1", _act_name(children[2] if len(children) == 3
                                                        else None))


def convert(model: nn.Module, *, return_report: bool = False):
    """Replaces, in place, every supported block of `model` by an effkernels module holding the
    same parameters and buffers (state_dict keys unchanged) and returns the model (and, with
    return_report, what was converted and what was left as it was, with the reason; the
    report is also at model.effkernels_convert_report). Blocks of a supported type that cannot
    be converted are also named in a warning."""
    report = ConvertReport()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            convert_one = _converter(child)
            if convert_one is not None:
                try:
                    setattr(parent, name, convert_one(child))
                    report.converted.append(full)
                    continue
                except Unsupported as why:
                    report.unsupported.append((full, f"{type(child).__name__}: {why}"))
            visit(child, full + ".")

    visit(model, "")
    if report.unsupported:
        warnings.warn(str(report), stacklevel=2)
    model.effkernels_convert_report = report
    return (model, report) if return_report else model
