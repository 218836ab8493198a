// CPU depthwise conv + BatchNorm + activation, forward and backward (csrc/cpu/dwconv_bn_act.cpp).
// Exposed for reuse by the other CPU ops (mixconv composes it over channel groups).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace effkernels::cpu {

// Returns (out, mean, var): out in x's memory format; mean/var the per-channel statistics used
// (batch mean and biased variance in training, the running statistics otherwise), float32
// (float64 for float64 x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, c10::string_view act, bool training, double eps);

// Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias), each with its input's dtype;
// grad_x in x's memory format.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t padding, int64_t dilation,
    c10::string_view act, bool training, double eps);

}  // namespace effkernels::cpu
