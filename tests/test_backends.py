"""Backend selection: what is available and why not, explicit choices, no silent fallback, and
the package working on the reference path when the extension is missing."""
import subprocess
import sys

import pytest
import torch

import effkernels
from effkernels import ops

from .helpers import bn_params, conv_weight


def _dw(x):
    g, b, rm, rv = bn_params(x.shape[1], x.device)
    w = conv_weight((x.shape[1], 1, 3, 3), x.dtype, x.device)
    return ops.dwconv_bn_act(x, w, g, b, rm, rv)


def test_available_backends_names_every_backend_with_a_reason():
    for device in ("cpu", "cuda"):
        status = effkernels.available_backends(device)
        assert set(status) == {"cpu", "cuda", "triton", "reference"}
        assert status["reference"] == "available"
        for name, why in status.items():
            assert isinstance(why, str) and why, name
    assert effkernels.available_backends("cpu")["cpu"] == "available"
    assert "CUDA tensors only" in effkernels.available_backends("cpu")["cuda"]


def test_set_backend_and_context_manager():
    assert effkernels.get_backend() == "auto"
    with effkernels.backend("reference"):
        assert effkernels.get_backend() == "reference"
    assert effkernels.get_backend() == "auto"
    effkernels.set_backend("cpu")
    assert effkernels.get_backend() == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        effkernels.set_backend("cudnn")


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert effkernels._backend.resolve(torch.empty(1)) == "cpu"


def test_explicit_backend_that_cannot_serve_raises():
    x = torch.randn(1, 4, 5, 5)
    with effkernels.backend("cuda"), pytest.raises(RuntimeError, match="cannot run this input"):
        _dw(x)
    with effkernels.backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        _dw(x)


def test_package_works_without_the_extension():
    """With effkernels._C unavailable, import works, says why, and ops run on the reference."""
    code = r"""
import sys
sys.modules["effkernels._C"] = None   # makes `import effkernels._C` fail
import torch, effkernels
from effkernels import ops
status = effkernels.available_backends("cpu")
assert "could not be loaded" in status["cpu"], status
assert effkernels.extension_error()
x = torch.randn(2, 3, 6, 6)
g, b, rm, rv = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
y = ops.dwconv_bn_act(x, torch.randn(3, 1, 3, 3), g, b, rm, rv, training=True)
assert y.shape == (2, 3, 6, 6) and rm.abs().sum() > 0
with effkernels.backend("cpu"):
    try:
        ops.dwconv_bn_act(x, torch.randn(3, 1, 3, 3), g, b, rm, rv)
    except RuntimeError as e:
        assert "could not be loaded" in str(e)
    else:
        raise AssertionError("cpu backend must not silently fall back")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_triton_kernels_install_under_effkernels_only(tmp_path):
    """triton_kernels/ is importable as effkernels.triton_kernels and not as a top-level
    `triton_kernels` (other packages own that name). Checked from a neutral directory, since
    pytest puts the repository root on sys.path."""
    code = r"""
import importlib.util, pathlib
import effkernels.triton_kernels as tk
ours = pathlib.Path(tk.__file__).resolve().parent
assert ours.name == "triton_kernels", ours
spec = importlib.util.find_spec("triton_kernels")
assert spec is None or pathlib.Path(spec.origin).resolve().parent != ours, spec
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_auto_picks_cuda_kernels_only_where_faster(monkeypatch):
    """"auto" picks the C++ CUDA kernels for CUDA tensors of the ops where they are GPU-verified
    and faster than Triton's (CUDA_FIRST_OPS: mixconv_bn_act), for every op with
    EFFK_CUDA_KERNELS=1 (an explicit backend("cuda") always may)."""
    order = effkernels._backend.auto_order
    monkeypatch.delenv("EFFK_CUDA_KERNELS", raising=False)
    assert effkernels._backend.CUDA_FIRST_OPS == ("mixconv_bn_act",)
    for op in (None, "dwconv_bn_act", "pwconv_bn_act", "inverted_residual"):
        assert order("cuda", op) == ("triton",), op
    assert order("cuda", "mixconv_bn_act") == ("cuda", "triton")
    monkeypatch.setenv("EFFK_CUDA_KERNELS", "1")
    for op in (None, "dwconv_bn_act", "mixconv_bn_act"):
        assert order("cuda", op) == ("cuda", "triton"), op
    assert order("cpu") == ("cpu",) and order("cpu", "mixconv_bn_act") == ("cpu",)


def test_cuda_backend_claims_only_ops_with_kernels():
    """Per op: the cuda backend lists exactly the ops whose forward and backward both have
    CUDA kernels registered, and names the others as missing."""
    have = effkernels._backend.cuda_ops()
    for op in ("dwconv_bn_act", "pwconv_bn_act", "mixconv_bn_act"):
        registered = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels::{name}",
                                                                         "CUDA")
                         for name in (op, f"{op}_backward"))
        assert (op in have) == registered, op
        why = effkernels.available_backends("cuda", op)["cuda"]
        if not _extension_built_with_cuda():
            assert "without CUDA" in why or "could not be loaded" in why
        elif not registered:
            assert f"CUDA kernels of {op} are not part of this build" in why
        elif not torch.cuda.is_available():
            assert why == "no CUDA device is available"
    if not all(o in have for o in ("dwconv_bn_act", "pwconv_bn_act", "mixconv_bn_act")):
        assert "inverted_residual" not in have


def _extension_built_with_cuda():
    return effkernels._extension.built_with_cuda()


def test_calls_autograd_would_not_record_go_straight_to_the_kernel():
    """ops._call skips torch.library's Python autograd wrapper when no input needs a gradient,
    for plain eager tensors only: a dispatch mode (FlopCounterMode, FakeTensorMode), a vmap or a
    tensor requiring grad keeps the full dispatch. Same result either way."""
    from torch.utils.flop_counter import FlopCounterMode

    from effkernels import ops

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(10, 6, 1, 1)
    g, b, rm, rv = torch.rand(10) + 0.5, torch.randn(10), torch.randn(10), torch.rand(10) + 0.5
    args = (x, w, g, b, rm, rv, None, "relu6", False, 1e-5)
    assert ops._direct(args)
    with torch.no_grad():
        assert ops._direct(args[:1] + (w.requires_grad_(),) + args[2:])
    assert not ops._direct(args)  # grad mode on and w requires grad
    w.requires_grad_(False)
    with FlopCounterMode(display=False):
        assert not ops._direct(args)
    assert not ops._direct(([x, x.clone().requires_grad_()],))
    # Module weights are nn.Parameter: plain (a marker subclass); other subclasses are not.
    param = torch.nn.Parameter(w.clone())
    with torch.no_grad():
        assert ops._direct(args[:1] + (param,) + args[2:])
    assert not ops._direct(args[:1] + (param,) + args[2:])  # grad mode on, param needs grad

    class Sub(torch.Tensor):
        pass

    assert not ops._direct(args[:1] + (w.as_subclass(Sub),) + args[2:])
    assert not ops._direct(([x, w.as_subclass(Sub)],))
    direct = ops._call("cpu", "pwconv_bn_act", *args)[0]
    full = torch.ops.effkernels.pwconv_bn_act(*args)[0]
    assert torch.equal(direct, full)


def test_eval_calls_skip_the_python_checks_and_bad_ones_still_name_the_argument(monkeypatch):
    """Eval calls that go straight to a CPU kernel (ops._eval_direct) leave the argument checks
    to the C++ op; an input it refuses takes the checked Python path, whose error names the
    argument (ValueError/TypeError, not the kernel's RuntimeError)."""
    from effkernels import _checks, ops

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 3, 3)
    g, b, rm, rv = torch.rand(6) + 0.5, torch.randn(6), torch.randn(6), torch.rand(6) + 0.5
    with torch.no_grad(), effkernels.backend("cpu"):
        checked = ops.dwconv_bn_act(x, w, g, b, rm, rv, stride=2)
        calls = []
        monkeypatch.setattr(_checks, "depthwise", lambda *a, **k: calls.append(a))
        fast = ops.dwconv_bn_act(x, w, g, b, rm, rv, stride=2)
        assert calls == [] and torch.equal(fast, checked)
        # Refused by the C++ op, then by the (restored) Python check with its own message.
        monkeypatch.undo()
        for bad, match in (
                (dict(stride=3), "stride must be 1 or 2"),
                (dict(x=torch.randn(2, 0, 5, 7)), "at least one channel"),
                (dict(w=w[:4]), r"weight must have shape \(C, 1, k, k\)"),
                (dict(act="gelu"), "act must be one of")):
            kw = {**dict(x=x, w=w, stride=1, act="relu6"), **bad}
            with pytest.raises((ValueError, TypeError), match=match):
                ops.dwconv_bn_act(kw["x"], kw["w"], g, b, rm, rv, stride=kw["stride"],
                                  act=kw["act"])
        # Cout = 0 and empty H/W: refused by the C++ op itself too (direct torch.ops calls).
        with pytest.raises(RuntimeError, match="Cout >= 1"):
            torch.ops.effkernels.pwconv_bn_act(x, torch.randn(0, 6, 1, 1), g[:0], b[:0], rm[:0],
                                               rv[:0], None, "relu", False, 1e-5)
        with pytest.raises(RuntimeError, match="non-empty H and W"):
            torch.ops.effkernels.dwconv_bn_act(x[:, :, :0], w, g, b, rm, rv, 1, 1, 1, "relu",
                                               False, 1e-5)


def test_eval_block_calls_from_modules_skip_the_python_checks(monkeypatch):
    """An eval-mode inverted-residual module (Parameters for weights) goes straight to the fused
    kernel (ops._eval_direct with api_op): no Python argument check runs, same result as the
    checked path; a bad argument still gets the Python API's error."""
    from effkernels import _checks, nn as enn, ops

    torch.manual_seed(0)
    block = enn.InvertedResidual(16, 24, stride=2, expand_ratio=4, se_ratio=0.25,
                                 act="hswish").eval()
    x = torch.randn(1, 16, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effkernels.backend("cpu"):
        checked = block(x)
        calls = []
        monkeypatch.setattr(_checks, "tensor", lambda *a, **k: calls.append(a))
        fast = block(x)
        assert calls == [] and torch.equal(fast, checked)
        monkeypatch.undo()
        stages = [[torch.randn(8, 16, 1, 1), *(torch.rand(8) + 0.5 for _ in range(4))],
                  [torch.randn(8, 1, 3, 3), *(torch.rand(8) + 0.5 for _ in range(4))],
                  [torch.randn(16, 8, 1, 1), *(torch.rand(16) + 0.5 for _ in range(4))]]
        with pytest.raises(ValueError, match="se must be"):
            ops.inverted_residual(x, stages[0], stages[1], [torch.randn(2, 8, 1, 1)], stages[2])
