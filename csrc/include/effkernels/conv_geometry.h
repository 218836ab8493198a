// Output-size and BatchNorm-folding arithmetic shared by every backend.
#pragma once

#include <cmath>
#include <cstdint>

#include "effkernels/macros.h"

namespace effkernels {

// Same formula as torch.nn.Conv2d: floor((in + 2p - d(k-1) - 1) / s) + 1.
EFFK_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

// floor(a / b) for b > 0 (C++ integer division truncates toward zero instead).
EFFK_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// The input extent read by `out_extent` consecutive outputs: (out - 1) * stride + reach, with
// reach = dil * (k - 1) + 1 (the size of a tile plus its halo).
EFFK_HD int64_t conv_in_extent(int64_t out_extent, int64_t k, int64_t stride, int64_t dil) {
  return (out_extent - 1) * stride + dil * (k - 1) + 1;
}

// The transposed direction (grad_input): the outputs o whose window o*stride - pad + t*dil
// (t in [0, k)) reaches some input index in [in_lo, in_hi] lie in [lo, hi], unclipped to the
// output size. Every pair (i, t) with i + pad - t*dil divisible by stride maps to an o in it.
struct IndexRange {
  int64_t lo, hi;
};

EFFK_HD IndexRange transposed_range(int64_t in_lo, int64_t in_hi, int64_t k, int64_t stride,
                                    int64_t pad, int64_t dil) {
  return {floor_div(in_lo + pad - (k - 1) * dil, stride), floor_div(in_hi + pad, stride)};
}

// Rows of a matrix, as the pointwise GEMMs of every backend read them: row p starts at element
// offset off(p). `flat`: p * step (dense matrices, contiguous NHWC and channel slices of it: no
// divisions); otherwise p is a pixel (n, h, w) of a 4-D channels-innermost tensor.
struct PixelRows {
  int64_t HW = 1, W = 1, sN = 0, sH = 0, sW = 0, step = 0;
  bool flat = true;

  EFFK_HD int64_t off(int64_t p) const {
    if (flat) return p * step;
    const int64_t n = p / HW, q = p - n * HW, h = q / W, w = q - h * W;
    return n * sN + h * sH + w * sW;
  }
};

// The pixel rows of an (N, C, H, W) tensor with unit channel stride and strides sN, sH, sW.
EFFK_HD PixelRows pixel_rows(int64_t N, int64_t H, int64_t W, int64_t sN, int64_t sH,
                             int64_t sW) {
  PixelRows r;
  r.HW = H * W;
  r.W = W;
  r.sN = sN;
  r.sH = sH;
  r.sW = sW;
  r.step = W > 1 ? sW : H > 1 ? sH : sN;
  r.flat = (W == 1 || sW == r.step) && (H == 1 || sH == r.step * W) &&
           (N == 1 || sN == r.step * H * W);
  return r;
}

// A dense [rows][ld] matrix.
EFFK_HD PixelRows dense_rows(int64_t ld) {
  PixelRows r;
  r.step = ld;
  return r;
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

// Chan's parallel combination of (count, mean, M2) statistics: merges a part (nb, mb, m2b) into
// the running (n, mean, m2). The CPU (cpu::ChannelStats) and CUDA (per-tile partials) batch
// statistics both combine their parts with it, in a fixed order.
template <typename T>
EFFK_HD void chan_merge(T& n, T& mean, T& m2, T nb, T mb, T m2b) {
  if (nb == T(0)) return;
  const T delta = mb - mean;
  const T total = n + nb;
  mean += delta * nb / total;
  m2 += m2b + delta * delta * n * nb / total;
  n = total;
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

// dL/dy = a * g + b * xhat + c. In eval mode b == c == 0 and xhat is not read: a non-finite y
// (from a non-finite x) then stays out of grad_x, as in PyTorch's eval-mode backward.
template <typename T>
EFFK_HD T bn_dy(T a, T b, T c, T g, T xhat) {
  const T x = b != T(0) ? xhat : T(0);  // the training-mode arithmetic stays the same
  return a * g + b * x + c;
}

template <typename T>
EFFK_HD BnBackwardCoeffs<T> bn_backward_coeffs(T gamma, T invstd, T sum_g, T sum_gx, T count,
                                               bool training) {
  const T a = gamma * invstd;
  if (!training) return {a, T(0), T(0)};
  return {a, -a * sum_gx / count, -a * sum_g / count};
}

}  // namespace effkernels
