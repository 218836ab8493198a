// The inverted-residual block as a composition of the effkernels ops (CompositeImplicitAutograd:
// autograd and shape propagation come from the ops it calls, on any device that has them).
// It serves training and every call that needs gradients; eval-mode calls without gradients go
// to the fused single-kernel blocks (expanded tensor never in memory), the op
// inverted_residual_inference (csrc/cpu/inverted_residual.cpp, csrc/cuda/inverted_residual.cu),
// as effkernels.ops.inverted_residual routes them: on CPU tensors always, on CUDA tensors only
// with EFFK_FUSED_BLOCK=1 (there the ops composed in Python are the faster; effkernels/
// _backend.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/add.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include "effkernels/aten_activation.h"
#include "effkernels/checks.h"

namespace effkernels {
namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
constexpr const char* kOp = "inverted_residual";

Stats call_pw(const at::Tensor& x, at::TensorList p, const OptTensor& residual,
              c10::string_view act, bool training, double eps) {
  using PwResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effkernels::pwconv_bn_act", "")
                       .typed<PwResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, c10::string_view, bool, double, bool)>();
  // conv_out (the fourth result) lives on in the op's autograd node, not here; it is kept
  // only where a backward may read it.
  const PwResult r = op.call(x, p[0], p[1], p[2], p[3], p[4], residual, act, training, eps,
                             at::GradMode::is_enabled());
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

Stats call_dw(const at::Tensor& x, at::TensorList p, int64_t stride, int64_t dilation,
              c10::string_view act, bool training, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effkernels::dwconv_bn_act", "")
                       .typed<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const OptTensor&, const OptTensor&,
                                    int64_t, int64_t, int64_t, c10::string_view, bool,
                                    double)>();
  const int64_t k = p[0].size(-1);
  return op.call(x, p[0], p[1], p[2], p[3], p[4], stride, dilation * (k - 1) / 2, dilation, act,
                 training, eps);
}

void check_stage(const char* name, at::TensorList stage, bool may_be_empty) {
  TORCH_CHECK(stage.size() == 5 || (may_be_empty && stage.empty()), kOp, ": ", name,
              " must be [weight, bn_weight, bn_bias, running_mean, running_var]",
              may_be_empty ? " or empty" : "", "; got ", stage.size(), " tensors");
}

std::tuple<at::Tensor, std::vector<at::Tensor>> inverted_residual(
    const at::Tensor& x, at::TensorList expand, at::TensorList depthwise, at::TensorList se,
    at::TensorList project, int64_t stride, int64_t dilation, c10::string_view act,
    c10::string_view se_act, c10::string_view se_gate, bool skip, bool training, double eps) {
  check_stage("expand", expand, true);
  check_stage("depthwise", depthwise, false);
  check_stage("project", project, false);
  TORCH_CHECK(se.empty() || se.size() == 4, kOp,
              ": se must be [] or [reduce_weight, reduce_bias, expand_weight, expand_bias]; got ",
              se.size(), " tensors");
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D; got shape ", x.sizes());
  if (skip) {
    TORCH_CHECK(stride == 1 && project[0].size(0) == x.size(1), kOp,
                ": skip needs stride 1 and Cout == Cin; got stride ", stride, ", Cin ",
                x.size(1), ", Cout ", project[0].size(0));
  }
  const Act se_act_v = parse_act(kOp, se_act);
  const Act se_gate_v = parse_act(kOp, se_gate);

  std::vector<at::Tensor> stats;
  auto keep = [&](const Stats& s) {
    stats.push_back(std::get<1>(s));
    stats.push_back(std::get<2>(s));
    return std::get<0>(s);
  };
  at::Tensor h = x;
  if (!expand.empty()) h = keep(call_pw(h, expand, std::nullopt, act, training, eps));
  h = keep(call_dw(h, depthwise, stride, dilation, act, training, eps));
  if (!se.empty()) {
    at::Tensor s = at::mean(h, {2, 3}, /*keepdim=*/true);
    s = aten_activation(at::conv2d(s, se[0], se[1]), se_act_v);
    s = aten_activation(at::conv2d(s, se[2], se[3]), se_gate_v);
    h = at::mul(h, s);
  }
  const OptTensor residual = skip ? OptTensor(x) : std::nullopt;
  h = keep(call_pw(h, project, residual, "identity", training, eps));
  return {h, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(effkernels, CompositeImplicitAutograd, m) {
  m.impl("inverted_residual", &inverted_residual);
}

}  // namespace effkernels
