// Host-side helpers shared by the CUDA op entry points (pwconv_bn_act.cu, inverted_residual.cu).
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/core/ScalarType.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace effkernels::cuda {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(std::type_identity<S>{}) with S the device storage type of a floating dtype (fp32 for any
// other: the op checks have refused those before).
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: f(std::type_identity<__half>{}); break;
    case at::kBFloat16: f(std::type_identity<__nv_bfloat16>{}); break;
    case at::kDouble: f(std::type_identity<double>{}); break;
    default: f(std::type_identity<float>{}); break;
  }
}

}  // namespace effkernels::cuda
