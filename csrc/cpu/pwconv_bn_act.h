// CPU pointwise (1x1) conv + BatchNorm + activation (+ residual), forward and backward
// (csrc/cpu/pwconv_bn_act.cpp). Exposed for reuse by the other CPU ops.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace effkernels::cpu {

// Returns (out, mean, var) as dwconv_bn_act does, out = act(bn(conv1x1(x)) + residual), and
// conv_out: in training with keep_conv_out, y = conv1x1(x) (acc dtype, NHWC) for the
// backward, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    c10::string_view act, bool training, double eps, bool keep_conv_out);

// Returns (grad_x, grad_weight, grad_bn_weight, grad_bn_bias, grad_residual); grad_residual is
// an empty (0,) tensor when residual is None, else in residual's memory format. conv_out: the
// forward's, or None / empty (y is then recomputed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& residual, c10::string_view act,
    bool training, double eps, const std::optional<at::Tensor>& conv_out);

// Inference with the weights packed once (BN folded from the running statistics): the packed
// uint8 buffer, and the eval forward act(bn(conv1x1(x)) + residual) from it.
at::Tensor pwconv_bn_act_pack(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                              const at::Tensor& running_mean, const at::Tensor& running_var,
                              double eps);
at::Tensor pwconv_bn_act_packed(const at::Tensor& x, const at::Tensor& packed,
                                int64_t out_channels, c10::string_view act,
                                const std::optional<at::Tensor>& residual);

}  // namespace effkernels::cpu
