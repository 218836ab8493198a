"""The Triton epilogue activations and their backward against PyTorch's forward and autograd."""
import pytest
import torch
import triton
import triton.language as tl

from effkernels import reference
from effkernels.triton_kernels.activation import CODES, act_backward, act_forward


@triton.jit
def _act_kernel(z_ptr, g_ptr, y_ptr, d_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, act_forward(z, ACT), mask=mask)
    tl.store(d_ptr + offs, act_backward(g, z, ACT), mask=mask)


def _run(act, z, g):
    y = torch.full_like(z, float("nan"))
    d = torch.full_like(z, float("nan"))
    _act_kernel[(triton.cdiv(z.numel(), 256),)](z, g, y, d, z.numel(), ACT=CODES[act],
                                                 BLOCK=256)
    return y, d


@pytest.mark.parametrize("act", list(CODES))
def test_activation_and_backward(act, device):
    # Points on the kinks (-3, 0, 3, 6) included: the conventions must equal PyTorch's.
    z = torch.cat([torch.linspace(-8, 8, 1001), torch.tensor([-3.0, 0.0, 3.0, 6.0])])
    z = z.to(device)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(device)
    y, d = _run(act, z, g)
    zz = z.double().requires_grad_()
    ref = reference.activation(act, zz)
    (ref_d,) = torch.autograd.grad(ref, zz, g.double(), allow_unused=True)
    if ref_d is None:
        ref_d = g.double()
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d.double(), ref_d, atol=1e-6, rtol=1e-6)


# g * act'(NaN): PyTorch's scalar loops and CUDA kernels (its vectorised CPU loops differ for
# relu6 and hswish, so PyTorch's own answer depends on the layout): activation.h's convention.
NAN_Z_PASSES_G = {"identity": True, "relu": True, "relu6": True, "hswish": True,
                  "hsigmoid": False, "silu": None, "sigmoid": None}  # None: NaN


@pytest.mark.parametrize("act", list(CODES))
def test_backward_nonfinite(act, device):
    """NaN/Inf in g and z: 0 where the derivative is zero whatever g holds, as PyTorch."""
    special = [-float("inf"), -7.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 7.0, float("inf"),
               float("nan")]
    zs, gs = [], []
    for gv in (2.0, float("nan"), float("inf"), -float("inf")):
        zs += special
        gs += [gv] * len(special)
    z = torch.tensor(zs * 4, device=device)  # 176 elements: PyTorch's vectorised loops
    g = torch.tensor(gs * 4, device=device)
    _, d = _run(act, z, g)
    d, z, g = d[:len(zs)].cpu(), z[:len(zs)].cpu(), g[:len(zs)].cpu()
    zz = z.clone().requires_grad_()
    (ref_d,) = torch.autograd.grad(reference.activation(act, zz), zz, g, allow_unused=True)
    if ref_d is None:
        ref_d = g
    nan_z = z.isnan()
    torch.testing.assert_close(d[~nan_z], ref_d[~nan_z], equal_nan=True, atol=1e-6, rtol=1e-6)
    passes = NAN_Z_PASSES_G[act]
    expected = g[nan_z] if passes else torch.zeros_like(g[nan_z]) if passes is False \
        else torch.full_like(g[nan_z], float("nan"))
    torch.testing.assert_close(d[nan_z], expected, equal_nan=True)
