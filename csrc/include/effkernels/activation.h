// Activations and their backward, written once for the CPU and CUDA kernels.
//
// The backward, act_backward(g, z) = g * d act(z) / dz, follows PyTorch's own backward
// kernels (checked in tests/test_edge_cases.py and tests/cpp):
// - at the kinks: relu: z > 0; relu6: 0 < z < 6; hardswish: z <= -3 -> 0, z < 3 -> z/3 + 1/2,
//   else 1; hardsigmoid: -3 < z < 3 -> 1/6 (float's 1/6, also in double);
// - where the derivative is zero they select 0, so a NaN or Inf in g stays out of it;
// - at z = NaN relu, relu6 and hardswish pass g, hardsigmoid gives 0: PyTorch's scalar loops
//   and CUDA kernels (its vectorised CPU loops give 0 for relu6 and NaN for hardswish there,
//   so PyTorch's own answer depends on the tensors' layout).
// The forward clamps propagate NaN (relu(NaN) = NaN), as PyTorch's do.
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
// expf for the CPU kernels that the compiler can vectorize (used by sigmoid and SiLU): the
// activation loops (`omp simd`) otherwise call the scalar libm expf once per element, and the
// SiLU/sigmoid epilogues cost 3-5x the depthwise conv they follow (MixNet and EfficientNet use
// SiLU everywhere). In float, 16 lanes per AVX-512 vector: x = n ln2 + r (n = round(x / ln2)
// by the 1.5 * 2^23 rounding constant, ln2 in two parts so that n * ln2_hi is exact, |r| <=
// ln2/2), exp(r) by Cephes' degree-6 polynomial (relative error ~1e-7, about 1 ulp), times
// 2^n in two exponent-bit factors 2^h * 2^(n-h) so that results down to the denormals
// (n >= -150) scale exactly. FMA contraction may move a result by an ulp between ISA builds
// (the fp32 tolerance is ~1e-5). The previous version, in double with a degree-11 polynomial
// (correctly rounded but ~3x slower), was 20-40% of MixNet's fused blocks (bench/NOTES.md).
// Outside [-104, 89] the bits above are meaningless and are replaced, without branches (a
// select would be turned into control flow by GCC and stop the vectorization), by inf (x > 89),
// 0 (x < -104) or x itself (NaN).
EFFK_INLINE float exp_f32(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t's low mantissa bits hold n
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const int32_t h = ni >> 1;
  const float s1 = std::bit_cast<float>((h + 127) << 23);
  const float s2 = std::bit_cast<float>((ni - h + 127) << 23);
  const uint32_t e = std::bit_cast<uint32_t>(p * s1 * s2);
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

// g * d act(z) / dz with PyTorch's backward semantics (see the top of this file).
template <Act A, typename T>
EFFK_HD T act_backward(T g, T z) {
  if constexpr (A == Act::Identity) {
    return g;
  } else if constexpr (A == Act::ReLU) {
    return z <= T(0) ? T(0) : g;
  } else if constexpr (A == Act::ReLU6) {
    return (z <= T(0) || z >= T(6)) ? T(0) : g;
  } else if constexpr (A == Act::HSwish) {
    return z <= T(-3) ? T(0) : (z < T(3) ? g * (z / T(3) + T(0.5)) : g);
  } else if constexpr (A == Act::SiLU) {
    const T s = sigmoid(z);
    return g * (s * (T(1) + z * (T(1) - s)));
  } else if constexpr (A == Act::HSigmoid) {
    // float's 1/6 as PyTorch's hardsigmoid backward has it for every dtype (float64 too), so
    // that float64 models agree with PyTorch's to the last bits.
    return (z > T(-3) && z < T(3)) ? g * T(1.0f / 6.0f) : T(0);
  } else {
    const T s = sigmoid(z);
    return g * (s * (T(1) - s));
  }
}

// d act(z) / dz: the backward of a unit gradient.
template <Act A, typename T>
EFFK_HD T act_derivative(T z) {
  return act_backward<A>(T(1), z);
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
