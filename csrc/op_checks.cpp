#include "effkernels/op_checks.h"

#include <c10/util/Exception.h>

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

void check_training_count(const char* op, int64_t count_per_channel, bool training) {
  TORCH_CHECK_VALUE(!training || count_per_channel != 1, op,
                    ": expected more than 1 value per channel when training; got ",
                    count_per_channel);
}

}  // namespace effkernels
