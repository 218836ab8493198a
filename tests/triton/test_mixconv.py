"""The Triton mixconv_bn_act (triton_kernels/mixconv_bn_act.py) against the float64 reference:
output, all gradients and running statistics (check_op), in the interpreter on CPU tensors
(TRITON_INTERPRET=1) or compiled on a GPU. The interpreter runs ~10k Triton ops a second, so
the shapes are tiny and chosen to cover the kernel's cases: groups that straddle an 8-channel
block boundary (C_i = 5, 6, 7), 3 and 4 groups, k = 1 and 11, stride 2 on odd sizes,
dilation 2, N = 1, C not a multiple of 8."""
import pytest
import torch

import effkernels
from effkernels import ops

from ..helpers import bn_params, conv_weight, make_input
from ..opcase import check_op
from ..test_ops import mix_case

BACKEND = "triton"

# (N, H, W, [(C_i, k_i)], stride, dilation), as test_ops.MIX_SHAPES.
MIXNET3 = (1, 7, 9, [(5, 3), (6, 5), (7, 7)], 2, 1)  # uneven groups, stride 2, odd H/W
MIXNET4 = (1, 7, 9, [(5, 3), (6, 5), (7, 7), (4, 9)], 2, 1)
ODD_C = (2, 5, 6, [(9, 3), (8, 5)], 1, 1)  # C = 17, blocks split at channel 8
DILATED = (1, 6, 7, [(4, 3), (4, 5)], 1, 2)
K1_K11 = (1, 4, 5, [(8, 1), (3, 11)], 1, 1)  # the smallest and the largest kernel
TINY = (1, 4, 5, [(4, 3), (4, 5)], 1, 1)

CASES = [  # (shape, layout, training)
    (MIXNET3, "channels_last", True),
    (MIXNET3, "contiguous", False),
    (MIXNET4, "channels_last", True),
    (MIXNET4, "strided", False),
    (ODD_C, "strided_cl", True),
    (ODD_C, "contiguous", False),
    (DILATED, "strided", True),
    (K1_K11, "channels_last", True),
    (K1_K11, "contiguous", False),
]


@pytest.fixture(autouse=True)
def _triton_available(device):
    status = effkernels.available_backends(device)[BACKEND]
    assert status == "available", status


def _id(case):
    shape, layout, training = case
    groups = "_".join(f"{c}k{k}" for c, k in shape[3])
    return (f"n{shape[0]}_{shape[1]}x{shape[2]}_{groups}_s{shape[4]}_d{shape[5]}_{layout}_"
            f"{'train' if training else 'eval'}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_mixconv_fp32(case, device):
    shape, layout, training = case
    check_op("mixconv_bn_act",
             *mix_case(shape, torch.float32, layout, "silu", training, device=device),
             BACKEND, torch.float32)


@pytest.mark.parametrize("act", ["identity", "relu", "relu6", "hswish", "silu", "hsigmoid",
                                 "sigmoid"])
def test_mixconv_acts(act, device):
    check_op("mixconv_bn_act",
             *mix_case(TINY, torch.float32, "channels_last", act, True, device=device),
             BACKEND, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_mixconv_dtypes(dtype, device):
    check_op("mixconv_bn_act",
             *mix_case(MIXNET3, dtype, "channels_last", "hswish", True, device=device),
             BACKEND, dtype)


def _op_args(device, training, dtype=torch.float64):
    # opcheck calls the ops a dozen times: a very small case (k = 1 and 3, 6 output rows).
    x = make_input((2, 7, 3, 4), dtype, "channels_last", device, requires_grad=True)
    ws = [conv_weight((4, 1, 1, 1), dtype, device).requires_grad_(),
          conv_weight((3, 1, 3, 3), dtype, device).requires_grad_()]
    g, b, rm, rv = (t.to(dtype) for t in bn_params(7, device))
    return (x, ws, g.requires_grad_(), b.requires_grad_(), rm, rv, 1, 1, "silu", training, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mixconv_opcheck(training, device):
    fwd = torch.ops.effkernels_triton.mixconv_bn_act
    bwd = torch.ops.effkernels_triton.mixconv_bn_act_backward
    args = _op_args(device, training)
    torch.library.opcheck(fwd.default, args)
    out, mean, var = fwd(*args)
    bargs = (torch.randn_like(out), args[0].detach(), [w.detach() for w in args[1]],
             args[2].detach(), args[3].detach(), mean, var, *args[6:])
    torch.library.opcheck(bwd.default, bargs)


def test_mixconv_deterministic(device):
    """Same bits on every run: no atomics, fixed-order reductions."""
    tensors, kwargs = mix_case((2, 4, 5, [(9, 3), (8, 5)], 1, 1), torch.float32,
                               "channels_last", "silu", True, device=device)

    def run():
        x = tensors["x"].detach().clone().requires_grad_()
        ws = [w.detach().clone().requires_grad_() for w in tensors["weights"]]
        g = tensors["bn_weight"].detach().clone().requires_grad_()
        b = tensors["bn_bias"].detach().clone().requires_grad_()
        rm, rv = tensors["running_mean"].clone(), tensors["running_var"].clone()
        with effkernels.backend(BACKEND):
            out = ops.mixconv_bn_act(x, ws, g, b, rm, rv, **kwargs)
        out.backward(torch.ones_like(out) * 0.5 + out.detach())
        return [out, x.grad, *[w.grad for w in ws], g.grad, b.grad, rm, rv]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mixconv_empty(device):
    """N = 0: correctly shaped results, no launch; eval statistics are the running ones."""
    fwd = torch.ops.effkernels_triton.mixconv_bn_act
    bwd = torch.ops.effkernels_triton.mixconv_bn_act_backward
    x = torch.randn(0, 7, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(4, 1, 3, 3, device=device), torch.randn(3, 1, 5, 5, device=device)]
    g, b, rm, rv = bn_params(7, device)
    for training in (True, False):
        out, mean, var = fwd(x, ws, g, b, rm, rv, 2, 1, "relu", training, 1e-5)
        assert out.shape == (0, 7, 3, 3)
        assert torch.equal(mean, rm) and torch.equal(var, rv)
        dx, dws, dg, db = bwd(out, x, ws, g, b, mean, var, 2, 1, "relu", training, 1e-5)
        assert dx.shape == x.shape and [d.shape for d in dws] == [w.shape for w in ws]
        assert not dg.any() and not db.any() and not any(d.any() for d in dws)


def test_mixconv_errors(device):
    """Direct op calls are checked too, naming the argument."""
    fwd = torch.ops.effkernels_triton.mixconv_bn_act
    bwd = torch.ops.effkernels_triton.mixconv_bn_act_backward
    x = torch.randn(2, 7, 5, 6, device=device)
    ws = [torch.randn(4, 1, 3, 3, device=device), torch.randn(3, 1, 5, 5, device=device)]
    g, b, rm, rv = bn_params(7, device)
    with pytest.raises(ValueError, match=r"mixconv_bn_act: the weights' channel counts"):
        fwd(x, ws[:1], g, b, rm, rv, 1, 1, "relu", True, 1e-5)
    with pytest.raises(ValueError, match=r"mixconv_bn_act: weights\[1\] must have an odd"):
        fwd(x, [ws[0], torch.randn(3, 1, 4, 4, device=device)], g, b, rm, rv, 1, 1, "relu",
            True, 1e-5)
    with pytest.raises(ValueError, match=r"mixconv_bn_act: stride must be 1 or 2"):
        fwd(x, ws, g, b, rm, rv, 3, 1, "relu", True, 1e-5)
    with pytest.raises(ValueError, match=r"mixconv_bn_act: act must be one of"):
        fwd(x, ws, g, b, rm, rv, 1, 1, "gelu", True, 1e-5)
    with pytest.raises(ValueError, match=r"mixconv_bn_act: running_mean and running_var are"):
        fwd(x, ws, g, b, None, None, 1, 1, "relu", False, 1e-5)
    with pytest.raises(ValueError, match=r"mixconv_bn_act_backward: grad_out must have shape"):
        bwd(torch.randn(2, 7, 4, 6, device=device), x, ws, g, b, rm, rv, 1, 1, "relu", True,
            1e-5)
