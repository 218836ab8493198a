// CPU MixNet mixed depthwise conv + BN + act: the depthwise kernels of dwconv_bn_act.cpp on a
// layer of channel groups, one per kernel size (depthwise_groups_forward/backward). Every pass
// is one parallel loop over image rows in which each group convolves its channels with its own
// kernel size and padding straight into its channel slice of the one NHWC output (and, in
// backward, of grad_x and its own dweight partials); the batch statistics and the BatchNorm
// backward sums are per channel over whole rows, so all groups share those passes too.
#include <torch/library.h>

#include <vector>

#include "dwconv_bn_act.h"
#include "effkernels/checks.h"
#include "effkernels/op_checks.h"

namespace effkernels::cpu {
namespace {

// The layer's geometry (K and pad are per group) and each group's padding dil * (k_i - 1) / 2.
std::pair<DwGeometry, std::vector<int64_t>> mix_geometry(const at::Tensor& x,
                                                         at::TensorList weights, int64_t ho,
                                                         int64_t wo, int64_t stride,
                                                         int64_t dilation) {
  DwGeometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Ho = ho;
  g.Wo = wo;
  g.stride = stride;
  g.dil = dilation;
  std::vector<int64_t> pads;
  for (const at::Tensor& w : weights) pads.push_back(dilation * (w.size(2) - 1) / 2);
  return {g, pads};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixconv_bn_act(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t dilation,
    c10::string_view act, bool training, double eps) {
  constexpr const char* op = "mixconv_bn_act";
  const auto [ho, wo] = check_mixconv_groups(op, x, weights, stride, dilation);
  check_bn_args(op, x, x.size(1), bn_weight, bn_bias, running_mean, running_var, training);
  check_training_count(op, x.size(0) * ho * wo, training);
  const Act a = parse_act(op, act);
  const auto [g, pads] = mix_geometry(x, weights, ho, wo, stride, dilation);
  return depthwise_groups_forward(g, x, weights, pads, bn_weight, bn_bias, running_mean,
                                  running_var, a, training, eps);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t dilation, c10::string_view act,
    bool training, double eps) {
  constexpr const char* op = "mixconv_bn_act_backward";
  const auto [ho, wo] = check_mixconv_groups(op, x, weights, stride, dilation);
  const int64_t C = x.size(1);
  check_bn_args(op, x, C, bn_weight, bn_bias, std::nullopt, std::nullopt, /*training=*/true);
  check_saved_stats(op, x, C, mean, var);
  check_training_count(op, x.size(0) * ho * wo, training);
  check_float_input(op, "grad_out", grad_out, 4);
  check_same(op, "grad_out", grad_out, x);
  EFFK_CHECK(op, grad_out.sizes() == at::IntArrayRef({x.size(0), C, ho, wo}),
             "grad_out must have shape (", x.size(0), ", ", C, ", ", ho, ", ", wo, "); got ",
             grad_out.sizes());
  const Act a = parse_act(op, act);
  const auto [g, pads] = mix_geometry(x, weights, ho, wo, stride, dilation);
  return depthwise_groups_backward(g, grad_out, x, weights, pads, bn_weight, bn_bias, mean,
                                   var, a, training, eps);
}

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("mixconv_bn_act", &mixconv_bn_act);
  m.impl("mixconv_bn_act_backward", &mixconv_bn_act_backward);
}

}  // namespace effkernels::cpu
