// CPU MixNet mixed depthwise conv + BN + act: the depthwise kernels of dwconv_bn_act.cpp on a
// layer of channel groups, one per kernel size (depthwise_groups_forward/backward). Every pass
// is one parallel loop over image rows in which each group convolves its channels with its own
// kernel size and padding straight into its channel slice of the one NHWC output (and, in
// backward, of grad_x and its own dweight partials); the batch statistics and the BatchNorm
// backward sums are per channel over whole rows, so all groups share those passes too.
#include <torch/library.h>

#include <vector>

#include "dwconv_bn_act.h"
#include "effkernels/op_checks.h"

namespace effkernels::cpu {
namespace {

// Group i's padding, dil * (k_i - 1) / 2.
std::vector<int64_t> group_pads(at::TensorList weights, int64_t dilation) {
  std::vector<int64_t> pads;
  for (const at::Tensor& w : weights) pads.push_back(dilation * (w.size(2) - 1) / 2);
  return pads;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixconv_bn_act(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t dilation,
    c10::string_view act, bool training, double eps) {
  const MixProblem mp = check_mixconv_forward("mixconv_bn_act", x, weights, bn_weight, bn_bias,
                                              running_mean, running_var, stride, dilation, act,
                                              training);
  return depthwise_groups_forward(mp.g, x, weights, group_pads(weights, dilation), bn_weight,
                                  bn_bias, running_mean, running_var, mp.act, training, eps);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t dilation, c10::string_view act,
    bool training, double eps) {
  const MixProblem mp =
      check_mixconv_backward("mixconv_bn_act_backward", grad_out, x, weights, bn_weight,
                             bn_bias, mean, var, stride, dilation, act, training);
  return depthwise_groups_backward(mp.g, grad_out, x, weights, group_pads(weights, dilation),
                                   bn_weight, bn_bias, mean, var, mp.act, training, eps);
}

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("mixconv_bn_act", &mixconv_bn_act);
  m.impl("mixconv_bn_act_backward", &mixconv_bn_act_backward);
}

}  // namespace effkernels::cpu
