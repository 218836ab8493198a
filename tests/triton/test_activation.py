"""The Triton epilogue activations and derivatives against PyTorch's forward and autograd."""
import pytest
import torch
import triton
import triton.language as tl

from effkernels import reference
from effkernels.triton_kernels.activation import CODES, act_derivative, act_forward


@triton.jit
def _act_kernel(z_ptr, y_ptr, d_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, act_forward(z, ACT), mask=mask)
    tl.store(d_ptr + offs, act_derivative(z, ACT), mask=mask)


@pytest.mark.parametrize("act", list(CODES))
def test_activation_and_derivative(act, device):
    # Points on the kinks (-3, 0, 3, 6) included: the conventions must equal PyTorch's.
    z = torch.cat([torch.linspace(-8, 8, 1001), torch.tensor([-3.0, 0.0, 3.0, 6.0])])
    z = z.to(device)
    y = torch.full_like(z, float("nan"))
    d = torch.full_like(z, float("nan"))
    _act_kernel[(triton.cdiv(z.numel(), 256),)](z, y, d, z.numel(), ACT=CODES[act], BLOCK=256)
    zz = z.double().requires_grad_()
    ref = reference.activation(act, zz)
    (ref_d,) = torch.autograd.grad(ref.sum(), zz, allow_unused=True)
    if ref_d is None:
        ref_d = torch.ones_like(zz)
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d.double(), ref_d, atol=1e-6, rtol=1e-6)
