"""effkernels.convert on torchvision and timm models: blocks replaced in place, state_dict keys
and values kept, eval outputs unchanged, still trainable (same training step), unsupported
blocks left as they are and reported."""
import copy

import pytest
import torch
from torch import nn

import effkernels
from effkernels._convert import AdoptedBlock, AdoptedConvBNAct

from .model_helpers import assert_rel, assert_train_matches, randomize_bn

tv = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

SOURCES = {
    "tv_mobilenet_v2": lambda: tv.mobilenet_v2(width_mult=0.5, dropout=0.0),
    "tv_mobilenet_v3_small": lambda: tv.mobilenet_v3_small(dropout=0.0),
    "tv_mobilenet_v3_large": lambda: tv.mobilenet_v3_large(dropout=0.0),
    "tv_mnasnet0_5": lambda: tv.mnasnet0_5(dropout=0.0),
    "tv_efficientnet_b0": lambda: tv.efficientnet_b0(dropout=0.0, stochastic_depth_prob=0.0),
    "timm_mixnet_s": lambda: timm.create_model("mixnet_s"),
    "timm_tf_mixnet_s": lambda: timm.create_model("tf_mixnet_s"),
    "timm_mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm_mobilenetv1_100": lambda: timm.create_model("mobilenetv1_100"),
}
TRAIN = ["tv_mobilenet_v3_small", "tv_efficientnet_b0", "timm_mixnet_s"]


def _converted(name):
    torch.manual_seed(0)
    original = randomize_bn(SOURCES[name]()).eval()
    converted = copy.deepcopy(original)
    converted, report = effkernels.convert(converted, return_report=True)
    return original, converted, report


@pytest.mark.parametrize("name", list(SOURCES))
def test_convert_keeps_weights_and_outputs(name):
    original, converted, report = _converted(name)
    assert report.converted and not report.unsupported
    assert converted.effkernels_convert_report is report
    blocks = [m for m in converted.modules() if isinstance(m, (AdoptedBlock, AdoptedConvBNAct))]
    assert len(blocks) == len(report.converted)
    ref_state = original.state_dict()
    state = converted.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    x = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        assert_rel(converted(x), original(x), 1e-5, f"{name} eval")


@pytest.mark.parametrize("name", TRAIN)
def test_converted_model_trains_like_the_original(name):
    original, converted, _ = _converted(name)
    assert_train_matches(converted, original, torch.randn(4, 3, 40, 48),
                         torch.randint(0, 1000, (4,)))


def test_torchvision_stochastic_depth_still_applies():
    torch.manual_seed(0)
    model = effkernels.convert(tv.efficientnet_b0(stochastic_depth_prob=0.5)).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # random drops differ between calls in training
    model.eval()
    assert torch.equal(model(x), model(x))


def test_unsupported_blocks_are_left_and_reported():
    model = tv.mobilenet_v2(width_mult=0.35, norm_layer=lambda c: nn.GroupNorm(1, c))
    with pytest.warns(UserWarning, match="left as is"):
        model, report = effkernels.convert(model, return_report=True)
    assert not report.converted
    assert len(report.unsupported) > 10
    assert "GroupNorm" in str(report) or "BatchNorm2d" in str(report)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_converted_model_compiles_fullgraph():
    original, converted, _ = _converted("tv_mobilenet_v3_small")
    x = torch.randn(2, 3, 40, 40)
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_rel(compiled(x), original(x), 1e-5, "compiled converted")


@pytest.mark.parametrize("name", ["tv_mobilenet_v3_large", "tv_efficientnet_b0",
                                  "timm_efficientnet_b0"])
def test_converted_model_prepacks(name):
    """effkernels.nn.prepack_for_inference on a converted model: its adopted blocks keep
    packed weights and replay their calls; the outputs are bit-for-bit the unpacked ones."""
    _, converted, _ = _converted(name)
    converted = converted.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 72).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = converted(x)
    assert effkernels.nn.prepack_for_inference(converted) > 0
    with torch.no_grad():
        first, replayed = converted(x), converted(x)
    assert torch.equal(first, expected) and torch.equal(replayed, expected)
    caches = [m._packed_cache for m in converted.modules()
              if getattr(m, "_packed_cache", None) is not None]
    assert any("replay" in c for c in caches)
