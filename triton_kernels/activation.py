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
def act_backward(g, z, ACT: tl.constexpr):
    """g * d act(z) / dz with PyTorch's backward semantics, as csrc/include/effkernels/
    activation.h: where the derivative is zero, 0 whatever g holds (NaN, Inf); at z = NaN relu,
    relu6 and hardswish pass g, hardsigmoid gives 0; hardsigmoid's slope is float32's 1/6 in
    every dtype."""
    zero = tl.zeros(z.shape, g.dtype)
    d = g
    if ACT == 1:
        d = tl.where(z <= 0.0, zero, g)
    elif ACT == 2:
        d = tl.where((z <= 0.0) | (z >= 6.0), zero, g)
    elif ACT == 3:
        d = tl.where(z <= -3.0, zero, tl.where(z < 3.0, g * (z / 3.0 + 0.5), g))
    elif ACT == 4:
        s = tl.sigmoid(z)
        d = g * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 5:
        d = tl.where((z > -3.0) & (z < 3.0), g * 0.1666666716337204, zero)
    elif ACT == 6:
        s = tl.sigmoid(z)
        d = g * (s * (1.0 - s))
    return d
