"""The launchers' shared host pieces (triton_kernels/host.py): every op's forward and backward
launcher runs with its input's CUDA device current (Triton launches on the current device)."""
import pytest
import torch

from effkernels.triton_kernels import dwconv_bn_act, host, inverted_residual, mixconv_bn_act
from effkernels.triton_kernels import pwconv_bn_act


LAUNCHERS = [(m, name) for m in (dwconv_bn_act, pwconv_bn_act, mixconv_bn_act,
                                 inverted_residual) for name in ("forward", "backward")]


@pytest.mark.parametrize("module,name", LAUNCHERS,
                         ids=[f"{m.__name__.rsplit('.', 1)[-1]}.{n}" for m, n in LAUNCHERS])
def test_every_launcher_is_device_guarded(module, name):
    assert getattr(getattr(module, name), "device_guarded", False), f"{module.__name__}.{name}"


def test_guard_makes_the_input_device_current(monkeypatch):
    """For a CUDA tensor the launcher body runs inside torch.cuda.device(its device); for a CPU
    tensor it runs as is (checked without a GPU through a stand-in tensor and device)."""
    entered = []

    class FakeCudaTensor:
        is_cuda = True
        device = "cuda:1"

    monkeypatch.setattr(torch.cuda, "device", lambda d: _Recorder(entered, d))
    seen = host.on_input_device(lambda t, a, b=0: (entered.copy(), a, b))(FakeCudaTensor(), 1,
                                                                           b=2)
    assert seen == ([("enter", "cuda:1")], 1, 2) and entered[-1] == ("exit", "cuda:1")
    entered.clear()
    assert host.on_input_device(lambda t: entered.copy())(torch.zeros(1)) == []


class _Recorder:
    def __init__(self, log, device):
        self.log, self.device = log, device

    def __enter__(self):
        self.log.append(("enter", self.device))

    def __exit__(self, *exc):
        self.log.append(("exit", self.device))


@pytest.mark.cuda
def test_tensors_on_a_second_gpu():
    """A dwconv on cuda:1 while cuda:0 is current gives the result it gives on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; {torch.cuda.device_count()} here")
    x = torch.randn(2, 16, 9, 9, device="cuda:0").contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 3, 3, device="cuda:0")
    g, b, m, v = (torch.rand(16, device="cuda:0") + 0.5 for _ in range(4))
    args = (1, 1, 1, "relu6", False, 1e-5)
    ref = dwconv_bn_act.forward(x, w, g, b, m, v, *args)[0]
    with torch.cuda.device(0):
        out = dwconv_bn_act.forward(*(t.to("cuda:1") for t in (x, w, g, b, m, v)), *args)[0]
    torch.testing.assert_close(out.to("cuda:0"), ref)
