"""effkernels with the rest of PyTorch's stack: torch.autocast, torch.export, ONNX export (run
in onnxruntime) and torch.jit.script. See effkernels/ops.py's module docstring for the design."""
import importlib.util
import io

import pytest
import torch

import effkernels
from effkernels import ops
from effkernels.models import create_model

from .helpers import assert_close, bn_params, conv_weight, make_input, mismatch_report

BF16 = torch.bfloat16


# ---- torch.autocast -------------------------------------------------------------------------

def _autocast_cases():
    c = 6
    x = make_input((2, c, 9, 8), torch.float32, "channels_last")

    def stage(shape):
        return [conv_weight(shape, torch.float32), *bn_params(shape[0])]

    se = [conv_weight((3, 12, 1, 1), torch.float32), torch.randn(3),
          conv_weight((12, 3, 1, 1), torch.float32), torch.randn(12)]
    return {
        "dwconv_bn_act": (dict(x=x, weight=conv_weight((c, 1, 5, 5), torch.float32)),
                          bn_params(c), dict(act="hswish")),
        "pwconv_bn_act": (dict(x=x, weight=conv_weight((4, c, 1, 1), torch.float32),
                               residual=make_input((2, 4, 9, 8), torch.float32)),
                          bn_params(4), dict(act="identity")),
        "mixconv_bn_act": (dict(x=x, weights=[conv_weight((3, 1, 3, 3), torch.float32),
                                              conv_weight((3, 1, 5, 5), torch.float32)]),
                           bn_params(c), dict(act="silu")),
        "inverted_residual": (dict(x=x, expand=stage((12, c, 1, 1)),
                                   depthwise=stage((12, 1, 3, 3)), se=se,
                                   project=stage((c, 12, 1, 1))), None, dict(act="relu6")),
    }


def _call(op, tensors, bn, kwargs, training):
    bn_args = {} if bn is None else dict(zip(("bn_weight", "bn_bias", "running_mean",
                                              "running_var"), bn))
    return getattr(ops, op)(**tensors, **bn_args, **kwargs, training=training)


def _clone(tensors, bn, cast=None):
    """Fresh copies; `cast` applied to what autocast casts (x, conv weights, residual, SE),
    never to BatchNorm parameters or running statistics."""
    def conv(t):
        return t.to(cast) if cast is not None else t.clone()

    out = {}
    for name, t in tensors.items():
        if name in ("expand", "depthwise", "project"):
            out[name] = [conv(t[0])] + [u.clone() for u in t[1:]]
        elif isinstance(t, list):
            out[name] = [conv(u) for u in t]
        else:
            out[name] = conv(t)
    return out, None if bn is None else [t.clone() for t in bn]


def _running(tensors, bn):
    if bn is not None:
        return bn[2:]
    return [t for name in ("expand", "depthwise", "project") for t in tensors[name][3:]]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", list(_autocast_cases()))
def test_autocast_bf16(backend, op, training):
    """Under torch.autocast("cpu", bfloat16) an op computes in bf16 with fp32 BatchNorm
    parameters: bit-identical to casting x and the conv weights by hand, the running
    statistics stay fp32 and are updated in place."""
    tensors, bn, kwargs = _autocast_cases()[op]
    t_amp, bn_amp = _clone(tensors, bn)
    t_hand, bn_hand = _clone(tensors, bn, cast=BF16)
    with effkernels.backend(backend):
        with torch.autocast("cpu", dtype=BF16):
            y_amp = _call(op, t_amp, bn_amp, kwargs, training)
        y_hand = _call(op, t_hand, bn_hand, kwargs, training)
    assert y_amp.dtype == BF16
    assert torch.equal(y_amp, y_hand)
    for r_amp, r_hand, r0 in zip(_running(t_amp, bn_amp), _running(t_hand, bn_hand),
                                 _running(tensors, bn)):
        assert r_amp.dtype == torch.float32
        assert torch.equal(r_amp, r_hand)
        assert torch.equal(r_amp, r0) != training, "running statistics not updated in place"
    # and close to the float32 result (bf16 accuracy)
    t32, bn32 = _clone(tensors, bn)
    with effkernels.backend(backend):
        y32 = _call(op, t32, bn32, kwargs, training)
    msg = mismatch_report(y_amp.float(), y32, 0.1, 0.05, "autocast vs fp32")
    assert msg is None, msg


def test_autocast_backward_grads_in_leaf_dtype():
    """Training under autocast: gradients reach the fp32 leaves in fp32 (autograd casts back
    through the .to(bf16)), as for nn.Conv2d under autocast."""
    c = 5
    x = make_input((2, c, 7, 7), torch.float32, requires_grad=True)
    w = conv_weight((c, 1, 3, 3), torch.float32).requires_grad_()
    g, b, rm, rv = bn_params(c)
    g.requires_grad_(), b.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = ops.dwconv_bn_act(x, w, g, b, rm, rv, act="silu", training=True)
    y.float().square().sum().backward()
    for name, t in (("x", x), ("weight", w), ("bn_weight", g), ("bn_bias", b)):
        assert t.grad is not None and t.grad.dtype == torch.float32, name
        assert torch.isfinite(t.grad).all(), name


def test_autocast_direct_torch_ops_call():
    """The dispatcher-level autocast rule: torch.ops.effkernels.* under autocast cast x, the
    weights and the residual, not the BatchNorm tensors."""
    c = 4
    x, w = make_input((2, c, 6, 6), torch.float32), conv_weight((c, 1, 3, 3), torch.float32)
    g, b, rm, rv = bn_params(c)
    with torch.autocast("cpu", dtype=BF16):
        out, mean, var = torch.ops.effkernels.dwconv_bn_act(x, w, g, b, rm, rv, 1, 1, 1,
                                                            "relu", True, 1e-5)
    ref, ref_mean, ref_var = torch.ops.effkernels.dwconv_bn_act(
        x.to(BF16), w.to(BF16), g, b, rm, rv, 1, 1, 1, "relu", True, 1e-5)
    assert out.dtype == BF16 and mean.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(mean, ref_mean) and torch.equal(var, ref_var)
    res = make_input((2, 3, 6, 6), torch.float32)
    g3, b3, rm3, rv3 = bn_params(3)
    with torch.autocast("cpu", dtype=BF16):
        out = torch.ops.effkernels.pwconv_bn_act(x, conv_weight((3, c, 1, 1), torch.float32),
                                                 g3, b3, rm3, rv3, res, "identity", False,
                                                 1e-5)[0]
    assert out.dtype == BF16


# ---- torch.export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050").eval()
    return model, torch.randn(1, 3, 64, 64)


def test_torch_export(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        expected = model(x)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("effkernels.") for t in targets), "no effkernels op in the graph"
    with torch.no_grad():
        got = ep.module()(x)
        other = torch.randn(1, 3, 64, 64)
        assert_close(ep.module()(other), model(other), torch.float32, "exported, new input")
    assert_close(got, expected, torch.float32, "exported program")


# ---- ONNX -----------------------------------------------------------------------------------

def _onnx_run(onnx_bytes, x):
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _assert_standard_onnx(onnx_bytes):
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    onnx.checker.check_model(model)
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains: {domains}"
    kinds = {n.op_type for n in model.graph.node}
    assert "Conv" in kinds, kinds  # BatchNormalization may be folded into Conv (eval)
    return kinds


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime is not installed")
def test_onnx_export_torchscript_exporter(model_and_input):
    """torch.onnx.export(dynamo=False): the ops trace as their reference decomposition into
    standard ONNX ops; onnxruntime reproduces the eager output."""
    model, x = model_and_input
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"])
    kinds = _assert_standard_onnx(buf.getvalue())
    assert "HardSwish" in kinds or "HardSigmoid" in kinds, kinds  # mobilenetv3's activations
    with torch.no_grad():
        expected = model(x)
    got = _onnx_run(buf.getvalue(), x)
    assert_close(got, expected, torch.float32, "onnxruntime vs eager")
    assert not torch.onnx.is_in_onnx_export()


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                    reason="the dynamo ONNX exporter needs onnxscript, which is not installed")
def test_onnx_export_dynamo_exporter(model_and_input):
    model, x = model_and_input
    program = torch.onnx.export(model, (x,), dynamo=True)
    onnx_bytes = program.model_proto.SerializeToString()
    _assert_standard_onnx(onnx_bytes)
    with torch.no_grad():
        expected = model(x)
    assert_close(_onnx_run(onnx_bytes, x), expected, torch.float32, "onnxruntime vs eager")


def test_ops_use_reference_only_while_exporting_to_onnx(monkeypatch):
    """Outside ONNX export the selected backend serves the op (no silent reference)."""
    from effkernels import _backend

    x = make_input((1, 4, 5, 5), torch.float32)
    assert ops._resolve(x, "dwconv_bn_act") == _backend.resolve(x, "dwconv_bn_act") == "cpu"
    from torch.onnx._internal.exporter import _flags

    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    assert ops._resolve(x, "dwconv_bn_act") == "reference"


# ---- torch.jit.script -----------------------------------------------------------------------

def test_jit_script_fails_clearly(model_and_input):
    model, _ = model_and_input
    with pytest.raises(Exception) as info:
        torch.jit.script(model)
    message = str(info.value)
    assert "effkernels" in message and ("torch.compile" in message
                                        or "torch.export" in message), message


@pytest.mark.skipif(effkernels.available_backends("cpu")["cpu"] != "available",
                    reason="the C++ CPU backend is not available")
def test_torch_profiler_sees_the_kernels():
    """Eager inference calls go below the dispatcher's autograd layer (ops._kernel_call), which
    skips the profiler's RecordFunction: while torch.profiler records they take the full
    dispatch, so every effkernels kernel of a forward is in the profile, prepacked or not."""
    from torch.profiler import ProfilerActivity, profile

    model = create_model("mixnet_s").eval()
    x = torch.randn(1, 3, 64, 64)

    def kernels():
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model(x)
        return out, {e.key for e in prof.key_averages() if e.key.startswith("effkernels::")}

    with torch.no_grad():
        expected = model(x)
    out, names = kernels()
    assert torch.equal(out, expected)
    assert {"effkernels::inverted_residual_inference", "effkernels::linear_inference",
            "effkernels::pwconv_bn_act"} <= names, names
    effkernels.nn.prepack_for_inference(model)
    with torch.no_grad():
        model(x)  # packs
    out, names = kernels()
    assert torch.equal(out, expected)
    assert "effkernels::inverted_residual_packed" in names, names
