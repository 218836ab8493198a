// The activations as ATen ops (traced by autograd), for the parts of a block that ATen
// computes: the SE MLP of the composite inverted_residual (csrc/inverted_residual.cpp) and the
// gate of the CUDA fused block (csrc/cuda/inverted_residual.cu). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/div.h>
#include <ATen/ops/hardsigmoid.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>
#include <c10/core/GradMode.h>

#include "effkernels/activation.h"

namespace effkernels {

// hardswish / hardsigmoid divided by 6 exactly in float64, as PyTorch's CPU kernels, the
// reference (effkernels/reference.py) and activation.h compute them: PyTorch's CUDA kernels
// multiply by float's 1/6, a 3e-8 relative error that float64 sees. The correction is a
// constant to autograd, so the gradient stays PyTorch's backward; a non-finite correction
// (inf - inf, NaN - NaN) is dropped, leaving PyTorch's value.
inline at::Tensor divided_by_six_exactly(const at::Tensor& z, const at::Tensor& pytorchs,
                                         bool times_z) {
  if (z.scalar_type() != at::kDouble || z.is_cpu()) return pytorchs;
  at::Tensor correction;
  {
    c10::NoGradGuard no_grad;
    const at::Tensor r = at::clamp(at::add(z, 3), 0, 6);
    correction = at::sub(at::div(times_z ? at::mul(z, r) : r, 6), pytorchs);
    correction = at::where(at::isfinite(correction), correction, 0.0);
  }
  return at::add(pytorchs, correction);
}

inline at::Tensor aten_activation(const at::Tensor& z, Act a) {
  switch (a) {
    case Act::ReLU: return at::relu(z);
    case Act::ReLU6: return at::hardtanh(z, 0, 6);
    case Act::HSwish: return divided_by_six_exactly(z, at::hardswish(z), true);
    case Act::SiLU: return at::silu(z);
    case Act::HSigmoid: return divided_by_six_exactly(z, at::hardsigmoid(z), false);
    case Act::Sigmoid: return at::sigmoid(z);
    default: return z;
  }
}

}  // namespace effkernels
