"""effkernels.models against timm (pinned in requirements.txt): every name builds with timm's
state_dict keys and shapes; eval outputs match after a strict load; one train step gives the
same loss, gradients and BatchNorm buffers; models run under torch.compile(fullgraph=True).
One model per family runs in CI; the rest carry the `slow` marker."""
import copy

import pytest
import torch

import effkernels
from effkernels import models

from .model_helpers import assert_rel, assert_train_matches, randomize_bn

timm = pytest.importorskip("timm")

FAST = ["mobilenetv1_100", "mobilenetv2_050", "mobilenetv3_large_075", "mobilenetv3_small_050",
        "mixnet_s", "tf_mixnet_s", "efficientnet_b0", "mnasnet_050", "semnasnet_050",
        "mnasnet_small"]
TRAIN = ["mobilenetv2_050", "mixnet_s", "tf_mixnet_s", "mobilenetv3_small_050",
         "efficientnet_b0"]


def _marked(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_every_family_is_listed():
    names = models.list_models()
    expected = {*timm.list_models("mobilenetv1_*"), *timm.list_models("mobilenetv2_*"),
                *timm.list_models("mobilenetv3_large_*"), *timm.list_models("mobilenetv3_small_*"),
                *timm.list_models("mixnet_*"), *timm.list_models("tf_mixnet_*"),
                *[f"efficientnet_b{i}" for i in range(8)], *timm.list_models("mnasnet_*"),
                *timm.list_models("semnasnet_*")}
    assert set(names) == expected
    assert models.list_models("mixnet_*") == ["mixnet_l", "mixnet_m", "mixnet_s", "mixnet_xl",
                                              "mixnet_xxl"]


@pytest.mark.parametrize("name", models.list_models())
def test_state_dict_keys_and_shapes_equal_timm(name):
    ours = models.create_model(name).state_dict()
    theirs = timm.create_model(name).state_dict()
    assert list(ours) == list(theirs)
    bad = [(k, tuple(ours[k].shape), tuple(theirs[k].shape)) for k in theirs
           if ours[k].shape != theirs[k].shape]
    assert not bad, bad[:5]


def _pair(name, **kwargs):
    theirs = randomize_bn(timm.create_model(name, **kwargs)).eval()
    ours = models.create_model(name, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", _marked(models.list_models()))
def test_eval_outputs_match_timm(name):
    ours, theirs = _pair(name)
    x = torch.randn(2, 3, 64, 72)  # not square, not 224: every stride-2 stage sees odd sizes
    with torch.no_grad():
        expected = theirs(x)
        assert_rel(ours(x), expected, 1e-5, f"{name} eval fp32")
        assert_rel(ours(x.to(memory_format=torch.channels_last)), expected, 1e-5,
                   f"{name} eval fp32 channels_last")


@pytest.mark.parametrize("name", TRAIN)
def test_train_step_matches_timm(name):
    ours, theirs = _pair(name)
    x = torch.randn(4, 3, 40, 48)
    target = torch.randint(0, 1000, (4,))
    assert_train_matches(ours, theirs, x, target)


def test_drop_path_and_dropout_train():
    """Stochastic depth and dropout (kwargs as timm's): random in training, deterministic and
    equal to timm's in eval."""
    ours, theirs = _pair("efficientnet_b0", drop_rate=0.2, drop_path_rate=0.2)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_rel(ours(x), theirs(x), 1e-5, "eval with drop_path_rate")
    ours.train()
    out = ours(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in ours.parameters())


def test_checkpoint_file_loads(tmp_path):
    theirs = randomize_bn(timm.create_model("mixnet_s")).eval()
    path = tmp_path / "mixnet_s.pth"
    torch.save({"state_dict": theirs.state_dict()}, path)
    ours = models.create_model("mixnet_s", checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_rel(ours(x), theirs(x), 1e-5, "checkpoint")


def test_num_classes_and_in_chans():
    m = models.create_model("mobilenetv3_small_050", num_classes=7, in_chans=1).eval()
    t = timm.create_model("mobilenetv3_small_050", num_classes=7, in_chans=1)
    m.load_state_dict(t.state_dict(), strict=True)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    features = models.create_model("efficientnet_b0", num_classes=0).eval()
    assert features(torch.randn(1, 3, 32, 32)).shape == (1, 1280)


def test_efficientnet_compound_scaling():
    """One base definition, scaled in width, depth and resolution."""
    b0, b4 = models.create_model("efficientnet_b0"), models.create_model("efficientnet_b4")
    assert b0.default_input_size == (3, 224, 224) and b4.default_input_size == (3, 380, 380)
    assert sum(len(s) for s in b4.blocks) > sum(len(s) for s in b0.blocks)
    assert b4.conv_stem.out_channels == 48 and b0.conv_stem.out_channels == 32


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        models.create_model("resnet50")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        models.create_model("mixnet_s", pretrained=True)


@pytest.mark.parametrize("name", ["mixnet_s", "mobilenetv3_small_050"])
def test_compile_fullgraph_no_graph_breaks(name):
    ours, _ = _pair(name)
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        expected = ours(x)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_rel(compiled(x), expected, 1e-6, "compiled eval")
    train = copy.deepcopy(ours).train()
    ref = copy.deepcopy(ours).train()
    out = torch.compile(train, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    ref(x).sum().backward()
    for (n, p), q in zip(train.named_parameters(), ref.parameters()):
        assert_rel(p.grad, q.grad, 1e-4, f"compiled grad {n}")
    for (k, v), w in zip(train.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(v.double(), w.double(), rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
def test_compile_inductor_model():
    ours, _ = _pair("mobilenetv2_050")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        torch._dynamo.reset()
        assert_rel(torch.compile(ours, fullgraph=True)(x), expected, 1e-5, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_models())
def test_every_model_compiles_fullgraph(name):
    """No graph breaks in any model (eval; the training step is compiled above for two)."""
    model = models.create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_rel(compiled(x), model(x), 1e-6, f"{name} compiled")
