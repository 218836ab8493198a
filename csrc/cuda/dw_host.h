// Host side of the CUDA depthwise kernels, shared by dwconv_bn_act.cu and mixconv_bn_act.cu: a
// layer description (geometry + channel-block table + packed weights), the forward and the
// backward pass sequences, and the kernel-variant choice.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "effkernels/activation.h"
#include "effkernels/op_checks.h"

namespace effkernels::cuda {

// The accumulation dtype (fp32 for fp32/fp16/bf16, fp64 for fp64) and the channel block of
// the kernels for x's dtype (Tiling<A>::kCB: 16 or 8 channels).
at::ScalarType acc_dtype(at::ScalarType dtype);
int64_t channel_block(at::ScalarType dtype);

// A depthwise (one kernel size) or mixed depthwise layer as the kernels see it.
struct DwLayer {
  DwGeometry g;      // g.K: the kernel size (mixconv: the largest); g.pad: padding when uniform
  at::Tensor table;  // int64 [cblocks][3] = (k, pad, woff) on x's device; undefined = uniform
  int64_t cblocks = 0;
  int64_t P = 0;           // packed weight length: sum over blocks of k_b * k_b * CB
  bool has_k[12] = {};     // the kernel sizes of the blocks
};

// Returns (out, mean, var) as the CPU op does. wpack: packed weights (acc dtype, length P).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_forward(
    const at::Tensor& x, const at::Tensor& wpack, const DwLayer& layer, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, Act act, bool training, double eps);

// Returns (grad_x in x's memory format, grad of the packed weights (float64, length P),
// grad_bn_weight, grad_bn_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wpack,
    const DwLayer& layer, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& var, Act act, bool training, double eps);

}  // namespace effkernels::cuda
