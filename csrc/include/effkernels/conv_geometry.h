// Output-size and BatchNorm-folding arithmetic shared by every backend.
#pragma once

#include <cstdint>

#include "effkernels/macros.h"

namespace effkernels {

// Same formula as torch.nn.Conv2d: floor((in + 2p - d(k-1) - 1) / s) + 1.
EFFK_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

// Eval-mode BatchNorm folded into a per-channel affine map: bn(y) = y * scale + shift.
template <typename T>
struct BnAffine {
  T scale;
  T shift;
};

template <typename T>
EFFK_HD T inv_std(T var, T eps) {
#if defined(__CUDA_ARCH__)
  return rsqrt(var + eps);
#else
  return T(1) / std::sqrt(var + eps);
#endif
}

template <typename T>
EFFK_HD BnAffine<T> fold_bn(T gamma, T beta, T mean, T var, T eps) {
  const T scale = gamma * inv_std(var, eps);
  return {scale, beta - mean * scale};
}

// Backward through z = gamma * (y - mean) * invstd + beta for one channel, given the reductions
// sum_g = sum(dL/dz) and sum_gx = sum(dL/dz * xhat) over the channel's M elements.
// Training mode also differentiates through the batch mean and variance.
template <typename T>
struct BnBackwardCoeffs {
  T a;  // dL/dy = a * g + b * xhat + c
  T b;
  T c;
};

template <typename T>
EFFK_HD BnBackwardCoeffs<T> bn_backward_coeffs(T gamma, T invstd, T sum_g, T sum_gx, T count,
                                               bool training) {
  const T a = gamma * invstd;
  if (!training) return {a, T(0), T(0)};
  return {a, -a * sum_gx / count, -a * sum_g / count};
}

}  // namespace effkernels
