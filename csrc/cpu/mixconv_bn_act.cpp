// CPU MixNet mixed depthwise conv + BN + act. For now it composes the CPU depthwise kernel over
// the channel groups: BatchNorm is per channel, so one BN over all C channels equals one BN per
// group slice, in training and eval alike. The groups run on channel-slice views of one NHWC
// copy of x (no per-group copies); the group outputs are concatenated once. A single-pass fused
// kernel comes with the fused-CPU issue.
#include <torch/library.h>

#include <ATen/ops/cat.h>

#include "dwconv_bn_act.h"
#include "cpu_common.h"
#include "effkernels/op_checks.h"

namespace effkernels::cpu {
namespace {

constexpr const char* kOp = "mixconv_bn_act";

std::optional<at::Tensor> narrow_opt(const std::optional<at::Tensor>& t, int64_t c0,
                                     int64_t ci) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->narrow(0, c0, ci);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixconv_bn_act(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t dilation,
    c10::string_view act, bool training, double eps) {
  check_mixconv_groups(kOp, x, weights, stride, dilation);
  check_bn_args(kOp, x, x.size(1), bn_weight, bn_bias, running_mean, running_var, training);
  const at::Tensor xin = channels_innermost(x);
  std::vector<at::Tensor> outs, means, vars;
  int64_t c0 = 0;
  for (const at::Tensor& w : weights) {
    const int64_t ci = w.size(0);
    const int64_t pad = dilation * (w.size(2) - 1) / 2;
    auto [o, m, v] = dwconv_bn_act(xin.narrow(1, c0, ci), w, bn_weight.narrow(0, c0, ci),
                                   bn_bias.narrow(0, c0, ci), narrow_opt(running_mean, c0, ci),
                                   narrow_opt(running_var, c0, ci), stride, pad, dilation,
                                   act, training, eps);
    outs.push_back(o);
    means.push_back(m);
    vars.push_back(v);
    c0 += ci;
  }
  return {in_format(at::cat(outs, 1), output_format(x)), at::cat(means), at::cat(vars)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t dilation, c10::string_view act,
    bool training, double eps) {
  constexpr const char* op = "mixconv_bn_act_backward";
  const auto [ho, wo] = check_mixconv_groups(op, x, weights, stride, dilation);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) &&
                  grad_out.size(1) == x.size(1) && grad_out.size(2) == ho &&
                  grad_out.size(3) == wo,
              op, ": grad_out must have shape (", x.size(0), ", ", x.size(1), ", ", ho, ", ", wo,
              "); got ", grad_out.sizes());
  const at::Tensor xin = channels_innermost(x);
  const at::Tensor gin = channels_innermost(grad_out);
  std::vector<at::Tensor> dxs, dws, dgs, dbs;
  int64_t c0 = 0;
  for (const at::Tensor& w : weights) {
    const int64_t ci = w.size(0);
    const int64_t pad = dilation * (w.size(2) - 1) / 2;
    auto [dx, dw, dg, db] = dwconv_bn_act_backward(
        gin.narrow(1, c0, ci), xin.narrow(1, c0, ci), w, bn_weight.narrow(0, c0, ci),
        bn_bias.narrow(0, c0, ci), mean.narrow(0, c0, ci), var.narrow(0, c0, ci), stride, pad,
        dilation, act, training, eps);
    dxs.push_back(dx);
    dws.push_back(dw);
    dgs.push_back(dg);
    dbs.push_back(db);
    c0 += ci;
  }
  return {in_format(at::cat(dxs, 1), output_format(x)), dws, at::cat(dgs), at::cat(dbs)};
}

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("mixconv_bn_act", &mixconv_bn_act);
  m.impl("mixconv_bn_act_backward", &mixconv_bn_act_backward);
}

}  // namespace effkernels::cpu
