"""effkernels.models: the MobileNetV1/V2/V3, MixNet, EfficientNet and MnasNet models by timm's
names, built from architecture strings by one builder, with timm's state_dict keys and shapes:

    model = effkernels.models.create_model("efficientnet_b0")
    model.load_state_dict(timm_state_dict)          # strict; e.g. torch.load(checkpoint_file)
    model = effkernels.models.create_model("mixnet_m", checkpoint_path="mixnet_m.pth")
"""
from __future__ import annotations

import fnmatch
from functools import partial
from typing import List, Optional

import torch

from ._archs import ARCHS, MODELS
from ._builder import BuildConfig, decode_arch, make_divisible, round_channels
from .network import EfficientNet

__all__ = ["create_model", "list_models", "EfficientNet", "load_checkpoint"]


def list_models(pattern: Optional[str] = None) -> List[str]:
    """The model names, optionally filtered by a wildcard pattern ('mixnet_*')."""
    names = sorted(MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _build(arch: str, *, stem: int, act: str, width: float = 1.0, depth: float = 1.0,
           num_features: int = 1280, scale_head: bool = False, head_always_scaled: bool = False,
           fix_stem_head: bool = False, depth_trunc: str = "ceil", head: str = "efficientnet",
           se_from_exp: bool = False, se_round: str = "round", se_act: Optional[str] = None,
           se_gate: str = "sigmoid", eps: float = 1e-5, same: bool = False,
           resolution: int = 224, num_classes: int = 1000, in_chans: int = 3,
           drop_rate: float = 0.0, drop_path_rate: float = 0.0, bn_eps: Optional[float] = None,
           bn_momentum: float = 0.1) -> EfficientNet:
    round_chs = partial(round_channels, multiplier=width)
    cfg = BuildConfig(round_chs=round_chs, act=act, se_from_exp=se_from_exp,
                      se_round=make_divisible if se_round == "make_divisible" else round,
                      se_act=se_act, se_gate=se_gate, same=same,
                      eps=eps if bn_eps is None else bn_eps, momentum=bn_momentum,
                      drop_path_rate=drop_path_rate)
    stages = decode_arch(ARCHS[arch], depth, depth_trunc, fix_first_last=fix_stem_head)
    fix_stem = fix_stem_head or (head == "mobilenetv3" and width < 0.75)
    stem_chs = stem if fix_stem else round_chs(stem)
    if head_always_scaled:
        num_features = round_chs(num_features)
    elif scale_head and not fix_stem_head:
        num_features = max(num_features, round_chs(num_features))
    model = EfficientNet(stages, cfg, stem_chs=stem_chs, num_features=num_features,
                         num_classes=num_classes, in_chans=in_chans, head=head,
                         drop_rate=drop_rate)
    model.default_input_size = (in_chans, resolution, resolution)
    return model


def create_model(name: str, num_classes: int = 1000, *, checkpoint_path: Optional[str] = None,
                 **kwargs) -> EfficientNet:
    """Builds the model `name` (see list_models()). kwargs: in_chans, drop_rate,
    drop_path_rate, bn_eps, bn_momentum. checkpoint_path: a timm state_dict file of the same
    model (a plain state_dict, or a dict holding it under 'state_dict' or 'model'), loaded
    with strict=True."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; effkernels.models.list_models() has "
                         f"{len(MODELS)}: {', '.join(list_models())}")
    allowed = {"in_chans", "drop_rate", "drop_path_rate", "bn_eps", "bn_momentum"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"create_model: unexpected keyword arguments {sorted(unknown)}; "
                        f"accepted: {sorted(allowed)}")
    model = _build(**MODELS[name], num_classes=num_classes, **kwargs)
    model.model_name = name
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
