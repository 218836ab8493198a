#include "effkernels/op_checks.h"

#include <c10/util/Exception.h>

#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"

namespace effkernels {

void check_float_input(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D; got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16; got ", st);
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " like x; got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              x.scalar_type(), " like x; got ", t.scalar_type());
}

void check_bn_args(const char* op, const at::Tensor& x, int64_t channels,
                   const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                   const std::optional<at::Tensor>& running_mean,
                   const std::optional<at::Tensor>& running_var, bool training) {
  auto check_vec = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape (",
                channels, ",); got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                " like x; got ", t.device());
    TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point; got ",
                t.scalar_type());
  };
  check_vec("bn_weight", bn_weight);
  check_vec("bn_bias", bn_bias);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, op,
              ": running_mean and running_var must both be given or both be None");
  TORCH_CHECK(training || has_mean, op,
              ": running_mean and running_var are required when training=False");
  if (has_mean) {
    check_vec("running_mean", *running_mean);
    check_vec("running_var", *running_var);
  }
}

DwGeometry check_dwconv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             int64_t channels, int64_t stride,
                             int64_t padding, int64_t dilation) {
  check_float_input(op, "x", x, 4);
  check_float_input(op, "weight", weight, 4);
  check_same(op, "weight", weight, x);
  const int64_t k = weight.size(2);
  TORCH_CHECK(weight.size(0) == channels && weight.size(1) == 1 && weight.size(3) == k, op,
              ": weight must have shape (C, 1, k, k) with C == ", channels, "; got ",
              weight.sizes());
  TORCH_CHECK(k >= 1 && k <= 11, op, ": kernel size must be in 1..11; got ", k);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2; got ", stride);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1; got ", dilation);
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0; got ", padding);
  DwGeometry g{};
  g.N = x.size(0);
  g.C = channels;
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = k;
  g.stride = stride;
  g.pad = padding;
  g.dil = dilation;
  const int64_t reach = dilation * (k - 1) + 1;
  TORCH_CHECK(g.H + 2 * padding >= reach && g.W + 2 * padding >= reach, op,
              ": input of spatial size ", g.H, "x", g.W, " with padding ", padding,
              " is smaller than the kernel's reach ", reach, " (k=", k, ", dilation=", dilation,
              ")");
  g.Ho = conv_out_size(g.H, k, stride, padding, dilation);
  g.Wo = conv_out_size(g.W, k, stride, padding, dilation);
  return g;
}

std::pair<int64_t, int64_t> check_mixconv_groups(const char* op, const at::Tensor& x,
                                                 at::TensorList weights, int64_t stride,
                                                 int64_t dilation) {
  check_float_input(op, "x", x, 4);
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one (C_i, 1, k_i, k_i) tensor");
  int64_t total = 0;
  std::pair<int64_t, int64_t> out_hw{-1, -1};
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    check_float_input(op, "weights[i]", w, 4);
    const int64_t k = w.size(2);
    TORCH_CHECK(k % 2 == 1, op, ": weights[", i, "] must have an odd kernel size so that the "
                "groups' outputs align; got ", k);
    const auto g = check_dwconv_args(op, x, w, w.size(0), stride, dilation * (k - 1) / 2,
                                     dilation);
    if (i == 0) out_hw = {g.Ho, g.Wo};
    total += w.size(0);
  }
  TORCH_CHECK(total == x.size(1), op, ": the weights' channel counts must sum to C == ",
              x.size(1), "; got ", total);
  return out_hw;
}

void check_saved_stats(const char* op, const at::Tensor& x, int64_t channels,
                       const at::Tensor& mean, const at::Tensor& var) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                                {"var", var}}) {
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == channels && t.is_floating_point() &&
                    t.device() == x.device(),
                op, ": ", name, " must be a floating-point tensor of shape (", channels,
                ",) on ", x.device(), "; got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
                t.device());
  }
}

void check_training_count(const char* op, int64_t count_per_channel, bool training) {
  TORCH_CHECK_VALUE(!training || count_per_channel != 1, op,
                    ": expected more than 1 value per channel when training; got ",
                    count_per_channel);
}

std::pair<DwGeometry, Act> check_dwconv_forward(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, c10::string_view act, bool training) {
  check_float_input(op, "x", x, 4);
  const DwGeometry g = check_dwconv_args(op, x, weight, x.size(1), stride, padding, dilation);
  check_bn_args(op, x, g.C, bn_weight, bn_bias, running_mean, running_var, training);
  check_training_count(op, g.N * g.Ho * g.Wo, training);
  return {g, parse_act(op, act)};
}

std::pair<DwGeometry, Act> check_dwconv_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t padding, int64_t dilation,
    c10::string_view act, bool training) {
  check_float_input(op, "x", x, 4);
  const DwGeometry g = check_dwconv_args(op, x, weight, x.size(1), stride, padding, dilation);
  check_bn_args(op, x, g.C, bn_weight, bn_bias, std::nullopt, std::nullopt, /*training=*/true);
  check_saved_stats(op, x, g.C, mean, var);
  check_training_count(op, g.N * g.Ho * g.Wo, training);
  check_float_input(op, "grad_out", grad_out, 4);
  check_same(op, "grad_out", grad_out, x);
  EFFK_CHECK(op, grad_out.sizes() == at::IntArrayRef({g.N, g.C, g.Ho, g.Wo}),
             "grad_out must have shape (", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "); got ",
             grad_out.sizes());
  return {g, parse_act(op, act)};
}

}  // namespace effkernels
