"""The one model class of effkernels.models: stem -> stages of blocks -> head, with timm's
parameter names (conv_stem, bn1, blocks.i.j.*, conv_head, bn2, classifier), so that a timm
state_dict of the same model loads with strict=True."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import _functional as F_
from ..nn.blocks import InferenceCaches, run_sequential
from ..nn.modules import NotScriptable, _check_act
from ._builder import BlockArgs, BuildConfig, build_stages


class EfficientNet(InferenceCaches, NotScriptable, nn.Module):
    """MobileNetV1/V2/V3, MixNet, EfficientNet and MnasNet, as timm builds them.

    head='efficientnet': blocks -> 1x1 conv_head + bn2 + act (when num_features > 0) -> global
    average pool -> classifier. head='mobilenetv3': blocks -> global average pool -> 1x1
    conv_head with bias -> act -> classifier (MobileNetV3's efficient last stage).
    """

    # effkernels.nn.prepack_for_inference: the head's 1x1 conv + BN packed once (ops.
    # _prepacked_pointwise's cache) and the blocks' chained replay (run_sequential); None:
    # packed per call.
    _packed_cache: Optional[dict] = None

    def __init__(self, stages: List[List[BlockArgs]], cfg: BuildConfig, *, stem_chs: int,
                 num_features: int, num_classes: int = 1000, in_chans: int = 3,
                 head: str = "efficientnet", drop_rate: float = 0.0):
        super().__init__()
        if head not in ("efficientnet", "mobilenetv3"):
            raise ValueError(f"head must be 'efficientnet' or 'mobilenetv3'; got {head!r}")
        self.act = _check_act("act", cfg.act)
        self.head = head
        self.same = cfg.same
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        bn = dict(eps=cfg.eps, momentum=cfg.momentum)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, 2, padding=0 if cfg.same else 1,
                                   bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs, **bn)
        self.blocks, head_chs = build_stages(stages, stem_chs, cfg)
        if head == "mobilenetv3":
            self.num_features = head_chs
            self.head_hidden_size = num_features
            self.conv_head = nn.Conv2d(head_chs, num_features, 1, bias=True)
            classifier_in = num_features
        elif num_features > 0:
            self.num_features = num_features
            self.conv_head = nn.Conv2d(head_chs, num_features, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(num_features, **bn)
            classifier_in = num_features
        else:
            self.num_features = classifier_in = head_chs
            self.conv_head = None
        self.classifier = nn.Linear(classifier_in, num_classes) if num_classes > 0 \
            else nn.Identity()
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._packed_cache
        x = run_sequential(self.blocks, x, cache, stem=self)
        if self.head == "efficientnet" and self.conv_head is not None:
            # The head's pack in a dict of its own (packing again clears its dict, which must
            # not drop the blocks' chain).
            x = F_.pointwise(x, self.conv_head, self.bn2, self.act,
                             packed_cache=None if cache is None else cache.setdefault("head", {}))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        dropout = self.drop_rate > 0.0 and self.training
        linear = type(self.classifier) is nn.Linear
        if self.head == "mobilenetv3":
            # Global pooling, the 1x1 conv on the pooled map (a matrix-vector product) and act
            # in one ops._linear call (conv2d's CPU path for a 1x1 map in channels_last is the
            # slow im2col convolution).
            x = ops._linear(x, self.conv_head.weight.flatten(1), self.conv_head.bias, self.act)
        elif linear and not (dropout or pre_logits):
            # Pooling and the classifier in one call (at small batch with no gradient:
            # effkernels' threaded matrix-vector product).
            return ops._linear(x, self.classifier.weight, self.classifier.bias)
        else:
            x = x.mean((2, 3))
        if dropout:
            x = F.dropout(x, p=self.drop_rate, training=True)
        if pre_logits:
            return x
        if linear:
            return ops._linear(x, self.classifier.weight, self.classifier.bias)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """The MnasNet/EfficientNet reference initialisation: convs N(0, sqrt(2 / fan_out)), BN 1/0,
    the classifier U(+-1/sqrt(fan_out))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.shape[0])
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
