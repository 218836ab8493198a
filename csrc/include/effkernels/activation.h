// Activations and their derivatives, written once for the CPU and CUDA kernels.
//
// Every derivative is taken with respect to the pre-activation `z` and follows PyTorch's own
// backward formulas at the kinks (relu: z > 0; relu6/hardtanh: 0 < z < 6; hardswish:
// z <= -3 -> 0, z < 3 -> z/3 + 1/2, else 1; hardsigmoid: -3 < z < 3 -> 1/6), so that our
// gradients equal autograd's on the reference exactly at the kinks too. NaN follows PyTorch
// as well: the clamps propagate it (relu(NaN) = NaN), and relu/relu6 pass the gradient at NaN
// (their backward tests z <= 0 / z >= 6, false for NaN), hardsigmoid's does not.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "effkernels/macros.h"

namespace effkernels {

enum class Act : int {
  Identity = 0,
  ReLU = 1,
  ReLU6 = 2,
  HSwish = 3,
  SiLU = 4,
  HSigmoid = 5,
  Sigmoid = 6,
};

constexpr int kNumActs = 7;

#if !defined(__CUDA_ARCH__)
// expf for the CPU kernels that the compiler can vectorize: the activation loops (`omp simd`)
// otherwise call the scalar libm expf once per element, and the SiLU/sigmoid epilogues cost
// 3-5x the depthwise conv they follow (MixNet and EfficientNet use SiLU everywhere).
// Evaluated in double: x = n ln2 + r (|r| <= ln2/2), exp(r) by its degree-11 Taylor polynomial
// (relative error < 1e-12), 2^n put into the exponent bits of the round-to-integer constant
// 1.5 * 2^52 that produced n; one rounding to float at the end. So the result is the correctly
// rounded expf except within ~1e-4 ulp of a rounding tie: it differed from glibc's expf (0.502
// ulp) on 0.008% of the floats in [-104, 89] (by 1 ulp), and the fp32 results of the kernels
// stay those of the scalar code to the last bit almost everywhere. ~1.1 ns per element on one
// Zen 4 core with AVX-512 (libm: ~4.7 ns). Outside [-104, 89] the bits above are meaningless
// and are replaced, without branches (a select would be turned into control flow by GCC and
// stop the vectorization), by inf (x > 89), 0 (x < -104) or x itself (NaN).
EFFK_INLINE float exp_f32(float x) {
  const double xd = static_cast<double>(x);
  const double nm = xd * 1.4426950408889634 + 6755399441055744.0;  // n in the low bits
  const double n = nm - 6755399441055744.0;                        // round(x / ln2)
  const double r = (xd - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  double p = 1.0 / 39916800;
  p = p * r + 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const double s = std::bit_cast<double>((std::bit_cast<uint64_t>(nm) + 1023) << 52);
  const uint32_t e = std::bit_cast<uint32_t>(static_cast<float>(p * s));
  const uint32_t over = 0u - static_cast<uint32_t>(x > 89.0f);
  const uint32_t under = 0u - static_cast<uint32_t>(x < -104.0f);
  const uint32_t nan = 0u - static_cast<uint32_t>(x != x);
  const uint32_t inside = ~(over | under | nan);
  return std::bit_cast<float>((e & inside) | (0x7f800000u & over) |
                              (std::bit_cast<uint32_t>(x) & nan));
}
#endif

template <typename T>
EFFK_HD T effk_exp(T v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  if constexpr (std::is_same_v<T, float>) {
    return exp_f32(v);
  } else {
    return std::exp(v);
  }
#endif
}

// min(max(r, 0), 6) that keeps NaN (every comparison with NaN is false).
template <typename T>
EFFK_HD T clamp0_6(T r) {
  return r > T(6) ? T(6) : (r <= T(0) ? T(0) : r);
}

template <typename T>
EFFK_HD T sigmoid(T z) {
  return T(1) / (T(1) + effk_exp(-z));
}

// act(z) with the activation known at compile time (the kernels' hot path).
template <Act A, typename T>
EFFK_HD T act_forward(T z) {
  if constexpr (A == Act::Identity) {
    return z;
  } else if constexpr (A == Act::ReLU) {
    return z <= T(0) ? T(0) : z;
  } else if constexpr (A == Act::ReLU6) {
    return clamp0_6(z);
  } else if constexpr (A == Act::HSwish) {
    return z * clamp0_6(z + T(3)) / T(6);
  } else if constexpr (A == Act::SiLU) {
    return z * sigmoid(z);
  } else if constexpr (A == Act::HSigmoid) {
    return clamp0_6(z + T(3)) / T(6);
  } else {
    return sigmoid(z);
  }
}

// d act(z) / dz, matching PyTorch's backward kernels at the kinks.
template <Act A, typename T>
EFFK_HD T act_derivative(T z) {
  if constexpr (A == Act::Identity) {
    return T(1);
  } else if constexpr (A == Act::ReLU) {
    return z <= T(0) ? T(0) : T(1);
  } else if constexpr (A == Act::ReLU6) {
    return (z <= T(0) || z >= T(6)) ? T(0) : T(1);
  } else if constexpr (A == Act::HSwish) {
    return z <= T(-3) ? T(0) : (z < T(3) ? z / T(3) + T(0.5) : T(1));
  } else if constexpr (A == Act::SiLU) {
    const T s = sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == Act::HSigmoid) {
    return (z > T(-3) && z < T(3)) ? T(1) / T(6) : T(0);
  } else {
    const T s = sigmoid(z);
    return s * (T(1) - s);
  }
}

// Runtime-selected versions, for code that is not performance critical (tests, small tensors).
template <typename T>
EFFK_HD T act_forward(Act a, T z) {
  switch (a) {
    case Act::ReLU: return act_forward<Act::ReLU>(z);
    case Act::ReLU6: return act_forward<Act::ReLU6>(z);
    case Act::HSwish: return act_forward<Act::HSwish>(z);
    case Act::SiLU: return act_forward<Act::SiLU>(z);
    case Act::HSigmoid: return act_forward<Act::HSigmoid>(z);
    case Act::Sigmoid: return act_forward<Act::Sigmoid>(z);
    default: return z;
  }
}

template <typename T>
EFFK_HD T act_derivative(Act a, T z) {
  switch (a) {
    case Act::ReLU: return act_derivative<Act::ReLU>(z);
    case Act::ReLU6: return act_derivative<Act::ReLU6>(z);
    case Act::HSwish: return act_derivative<Act::HSwish>(z);
    case Act::SiLU: return act_derivative<Act::SiLU>(z);
    case Act::HSigmoid: return act_derivative<Act::HSigmoid>(z);
    case Act::Sigmoid: return act_derivative<Act::Sigmoid>(z);
    default: return T(1);
  }
}

}  // namespace effkernels

// Turns a runtime Act into a compile-time constant `ACT` visible inside the body:
//   EFFK_DISPATCH_ACT(act, [&] { kernel<ACT>(...); });
#define EFFK_ACT_CASE(NAME, BODY)                    \
  case ::effkernels::Act::NAME: {                    \
    constexpr ::effkernels::Act ACT = ::effkernels::Act::NAME; \
    return BODY();                                   \
  }

#define EFFK_DISPATCH_ACT(ACT_VALUE, BODY)   \
  [&] {                                      \
    switch (ACT_VALUE) {                     \
      EFFK_ACT_CASE(ReLU, BODY)              \
      EFFK_ACT_CASE(ReLU6, BODY)             \
      EFFK_ACT_CASE(HSwish, BODY)            \
      EFFK_ACT_CASE(SiLU, BODY)              \
      EFFK_ACT_CASE(HSigmoid, BODY)          \
      EFFK_ACT_CASE(Sigmoid, BODY)           \
      default: {                             \
        constexpr ::effkernels::Act ACT = ::effkernels::Act::Identity; \
        return BODY();                       \
      }                                      \
    }                                        \
  }()
