// CPU depthwise conv + BatchNorm + activation, forward and backward (csrc/cpu/dwconv_bn_act.cpp).
// The kernels work on a layer of channel groups, each with its own kernel size and padding:
// dwconv_bn_act is a layer of one group, mixconv_bn_act (csrc/cpu/mixconv_bn_act.cpp) one group
// per kernel size, computed in the same fused passes.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "effkernels/activation.h"
#include "effkernels/op_checks.h"

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

// The same for a layer of channel groups, arguments already checked: weights[i] (C_i, 1, k_i,
// k_i) convolves the next C_i channels of x with padding pads[i] (sum C_i == C); every group
// has the layer's stride and dilation and gives the output size g.Ho x g.Wo. g: the layer's
// geometry (g.C all channels; g.K and g.pad are not read).
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_groups_forward(
    const DwGeometry& g, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef pads, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    Act act, bool training, double eps);

// Returns (grad_x, grad_weights (one per group), grad_bn_weight, grad_bn_bias).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> depthwise_groups_backward(
    const DwGeometry& g, const at::Tensor& grad_out, const at::Tensor& x,
    at::TensorList weights, at::IntArrayRef pads, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, Act act,
    bool training, double eps);

}  // namespace effkernels::cpu
