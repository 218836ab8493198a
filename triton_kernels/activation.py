"""Activations and their derivatives for the Triton kernels' epilogues, with the activation a
compile-time constant. Codes and kink conventions equal csrc/include/effkernels/activation.h
(PyTorch's backward formulas at the kinks); tests/triton/test_activation.py holds them to the
reference."""
import triton
import triton.language as tl

# Same order as effkernels::Act in C++.
CODES = {"identity": 0, "relu": 1, "relu6": 2, "hswish": 3, "silu": 4, "hsigmoid": 5,
         "sigmoid": 6}


@triton.jit
def _clamp06(v):
    return tl.minimum(tl.maximum(v, 0.0), 6.0)


@triton.jit
def act_forward(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = _clamp06(z)
    elif ACT == 3:
        z = z * _clamp06(z + 3.0) / 6.0
    elif ACT == 4:
        z = z * tl.sigmoid(z)
    elif ACT == 5:
        z = _clamp06(z + 3.0) / 6.0
    elif ACT == 6:
        z = tl.sigmoid(z)
    return z


@triton.jit
def act_derivative(z, ACT: tl.constexpr):
    one = tl.full(z.shape, 1.0, z.dtype)
    zero = tl.zeros(z.shape, z.dtype)
    d = one
    if ACT == 1:
        d = tl.where(z > 0.0, one, zero)
    elif ACT == 2:
        d = tl.where((z > 0.0) & (z < 6.0), one, zero)
    elif ACT == 3:
        d = tl.where(z <= -3.0, zero, tl.where(z < 3.0, z / 3.0 + 0.5, one))
    elif ACT == 4:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 5:
        d = tl.where((z > -3.0) & (z < 3.0), one / 6.0, zero)
    elif ACT == 6:
        s = tl.sigmoid(z)
        d = s * (1.0 - s)
    return d
