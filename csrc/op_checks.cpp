#include "effkernels/op_checks.h"

#include <string>

#include <c10/util/Exception.h>

#include "cpu/cpu_common.h"
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

// Only the batch may be empty: F.conv2d refuses an empty C, H or W, and so does the Python API.
void check_nonempty(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": x must have at least one channel and non-empty H and W (only N may be 0, as "
              "for torch.nn.functional.conv2d); got shape ", x.sizes());
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
                   const std::optional<at::Tensor>& running_var, bool training,
                   const char* prefix) {
  auto check_vec = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.defined(), op, ": ", prefix, name, " must be a tensor");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", prefix, name,
                " must have shape (", channels, ",); got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), op, ": ", prefix, name, " must be on ", x.device(),
                " like x; got ", t.device());
    TORCH_CHECK(t.is_floating_point(), op, ": ", prefix, name, " must be floating point; got ",
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

namespace {

// The groups of a mixconv layer. Returns the layer's geometry: the largest kernel's group's, with all C channels (odd kernels padded
// by dilation * (k - 1) / 2 give every group the same output size).
DwGeometry check_mixconv_groups(const char* op, const at::Tensor& x, at::TensorList weights,
                                int64_t stride, int64_t dilation) {
  check_float_input(op, "x", x, 4);
  check_nonempty(op, x);
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one (C_i, 1, k_i, k_i) tensor");
  int64_t total = 0;
  DwGeometry layer{};
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    check_float_input(op, "weights[i]", w, 4);
    const int64_t k = w.size(2);
    TORCH_CHECK(k % 2 == 1, op, ": weights[", i, "] must have an odd kernel size so that the "
                "groups' outputs align; got ", k);
    const DwGeometry g = check_dwconv_args(op, x, w, w.size(0), stride, dilation * (k - 1) / 2,
                                           dilation);
    if (i == 0 || g.K > layer.K) layer = g;
    total += w.size(0);
  }
  TORCH_CHECK(total == x.size(1), op, ": the weights' channel counts must sum to C == ",
              x.size(1), "; got ", total);
  layer.C = x.size(1);
  return layer;
}

// grad_out: floating, on x's device with x's dtype, of the forward output's shape.
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                    at::IntArrayRef shape) {
  check_float_input(op, "grad_out", grad_out, 4);
  check_same(op, "grad_out", grad_out, x);
  EFFK_CHECK(op, grad_out.sizes() == shape, "grad_out must have shape (", shape[0], ", ",
             shape[1], ", ", shape[2], ", ", shape[3], "); got ", grad_out.sizes());
}

}  // namespace

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

namespace {

// What a depthwise-layer backward checks after its geometry (dwconv and mixconv alike): the BN
// affine parameters, the saved batch statistics, the training count and grad_out's shape.
void check_depthwise_backward_tail(const char* op, const DwGeometry& g, const at::Tensor& grad_out,
                                   const at::Tensor& x, const at::Tensor& bn_weight,
                                   const at::Tensor& bn_bias, const at::Tensor& mean,
                                   const at::Tensor& var, bool training) {
  check_bn_args(op, x, g.C, bn_weight, bn_bias, std::nullopt, std::nullopt, /*training=*/true);
  check_saved_stats(op, x, g.C, mean, var);
  check_training_count(op, g.N * g.Ho * g.Wo, training);
  check_grad_out(op, grad_out, x, {g.N, g.C, g.Ho, g.Wo});
}

}  // namespace

std::pair<DwGeometry, Act> check_dwconv_forward(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, c10::string_view act, bool training) {
  check_float_input(op, "x", x, 4);
  check_nonempty(op, x);
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
  check_depthwise_backward_tail(op, g, grad_out, x, bn_weight, bn_bias, mean, var, training);
  return {g, parse_act(op, act)};
}

MixProblem check_mixconv_forward(const char* op, const at::Tensor& x, at::TensorList weights,
                                 const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                 const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, int64_t stride,
                                 int64_t dilation, c10::string_view act, bool training) {
  const DwGeometry g = check_mixconv_groups(op, x, weights, stride, dilation);
  check_bn_args(op, x, g.C, bn_weight, bn_bias, running_mean, running_var, training);
  check_training_count(op, g.N * g.Ho * g.Wo, training);
  return {g, parse_act(op, act)};
}

MixProblem check_mixconv_backward(const char* op, const at::Tensor& grad_out,
                                  const at::Tensor& x, at::TensorList weights,
                                  const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                  const at::Tensor& mean, const at::Tensor& var, int64_t stride,
                                  int64_t dilation, c10::string_view act, bool training) {
  const DwGeometry g = check_mixconv_groups(op, x, weights, stride, dilation);
  check_depthwise_backward_tail(op, g, grad_out, x, bn_weight, bn_bias, mean, var, training);
  return {g, parse_act(op, act)};
}

PwProblem check_pwconv_input(const char* op, const at::Tensor& x, int64_t Cout,
                             const std::optional<at::Tensor>& residual, c10::string_view act,
                             bool training, double eps) {
  check_float_input(op, "x", x, 4);
  check_nonempty(op, x);
  PwProblem pb{};
  pb.N = x.size(0);
  pb.Cin = x.size(1);
  pb.H = x.size(2);
  pb.W = x.size(3);
  pb.Cout = Cout;
  pb.M = pb.N * pb.H * pb.W;
  if (residual.has_value() && residual->defined()) {
    check_float_input(op, "residual", *residual, 4);
    check_same(op, "residual", *residual, x);
    EFFK_CHECK(op, residual->sizes() == at::IntArrayRef({pb.N, pb.Cout, pb.H, pb.W}),
               "residual must have shape (N, Cout, H, W) = (", pb.N, ", ", pb.Cout, ", ", pb.H,
               ", ", pb.W, "); got ", residual->sizes());
  }
  EFFK_CHECK(op, eps >= 0.0, "eps must be >= 0; got ", eps);
  pb.act = parse_act(op, act);
  pb.training = training;
  pb.eps = eps;
  return pb;
}

namespace {

PwProblem check_pwconv_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& residual, c10::string_view act,
                              bool training, double eps) {
  check_float_input(op, "x", x, 4);
  check_nonempty(op, x);
  check_float_input(op, "weight", weight, 4);
  check_same(op, "weight", weight, x);
  EFFK_CHECK(op, weight.size(0) >= 1,
             "weight must have shape (Cout, Cin, 1, 1) with Cout >= 1; got ", weight.sizes());
  EFFK_CHECK(op, weight.size(1) == x.size(1) && weight.size(2) == 1 && weight.size(3) == 1,
             "weight must have shape (Cout, Cin, 1, 1) with Cin == x.size(1) == ", x.size(1),
             "; got ", weight.sizes());
  return check_pwconv_input(op, x, weight.size(0), residual, act, training, eps);
}

void check_pw_stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                   int64_t channels) {
  EFFK_CHECK(op, t.defined(), name, " must be a tensor");
  EFFK_CHECK(op, t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels,
             ",); got ", t.sizes());
  EFFK_CHECK(op, t.device() == x.device(), name, " must be on ", x.device(), " like x; got ",
             t.device());
  EFFK_CHECK(op, t.is_floating_point(), name, " must be floating point; got ", t.scalar_type());
}

}  // namespace

PwProblem check_pwconv_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& residual, c10::string_view act,
                               bool training, double eps) {
  const PwProblem pb = check_pwconv_common(op, x, weight, residual, act, training, eps);
  check_bn_args(op, x, pb.Cout, bn_weight, bn_bias, running_mean, running_var, training);
  check_training_count(op, pb.M, training);
  return pb;
}

PwProblem check_pwconv_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& bn_weight,
                                const at::Tensor& bn_bias, const at::Tensor& mean,
                                const at::Tensor& var, const std::optional<at::Tensor>& residual,
                                c10::string_view act, bool training, double eps,
                                const std::optional<at::Tensor>& conv_out) {
  PwProblem pb = check_pwconv_common(op, x, weight, residual, act, training, eps);
  check_float_input(op, "grad_out", grad_out, 4);
  check_same(op, "grad_out", grad_out, x);
  EFFK_CHECK(op, grad_out.sizes() == at::IntArrayRef({pb.N, pb.Cout, pb.H, pb.W}),
             "grad_out must have shape (N, Cout, H, W) = (", pb.N, ", ", pb.Cout, ", ", pb.H,
             ", ", pb.W, "); got ", grad_out.sizes());
  check_bn_args(op, x, pb.Cout, bn_weight, bn_bias, std::nullopt, std::nullopt,
                /*training=*/true);
  check_pw_stat(op, "mean", mean, x, pb.Cout);
  check_pw_stat(op, "var", var, x, pb.Cout);
  // conv_out: the forward's y, or nothing (None or empty: the backward recomputes it).
  pb.has_conv_out = conv_out.has_value() && conv_out->defined() && conv_out->numel() > 0;
  if (pb.has_conv_out) {
    const at::Tensor& y = *conv_out;
    const at::ScalarType acc = cpu::stat_dtype(x);
    EFFK_CHECK(op, y.device() == x.device() && y.scalar_type() == acc &&
                       y.sizes() == at::IntArrayRef({pb.N, pb.Cout, pb.H, pb.W}) &&
                       y.is_contiguous(at::MemoryFormat::ChannelsLast),
               "conv_out must be the forward's (N, Cout, H, W) = (", pb.N, ", ", pb.Cout, ", ",
               pb.H, ", ", pb.W, ") channels_last ", acc, " tensor on ", x.device(),
               ", or None; got ", y.scalar_type(), " of shape ", y.sizes(), " and strides ",
               y.strides(), " on ", y.device());
  }
  return pb;
}

// ---- inverted_residual_inference --------------------------------------------------------------

namespace {

void check_ir_stage(const char* op, const char* name, at::TensorList stage, bool may_be_empty,
                    bool weight_parts) {
  EFFK_CHECK(op, stage.size() == 5 || (weight_parts && stage.size() > 5) ||
                     (may_be_empty && stage.empty()),
             name, " must be [weight, bn_weight, bn_bias, running_mean, running_var]",
             weight_parts ? " (the weight possibly given as several parts)" : "",
             may_be_empty ? " or empty" : "", "; got ", stage.size(), " tensors");
}

void check_ir_weight(const char* op, const std::string& what, const at::Tensor& w,
                     const at::Tensor& x, at::IntArrayRef shape) {
  check_float_input(op, what.c_str(), w, static_cast<int64_t>(shape.size()));
  check_same(op, what.c_str(), w, x);
  EFFK_CHECK(op, w.sizes() == shape, what, " must have shape ", shape, "; got ", w.sizes());
}

void check_ir_bn(const char* op, const char* name, at::TensorList stage, const at::Tensor& x,
                 int64_t channels) {
  const std::string what = std::string(op) + ": " + name;
  const size_t b = stage.size() - 4;
  check_bn_args(what.c_str(), x, channels, stage[b], stage[b + 1], stage[b + 2], stage[b + 3],
                /*training=*/false);
}

// A 1x1 stage's weight: one (rows, cols, 1, 1) tensor, or its parts, the diagonal blocks
// (rows_i, cols_i, 1, 1) of a block-diagonal weight (MixNet's split 1x1 convolutions), with
// cols_i summing to `cols`. Returns rows (the sum of rows_i).
int64_t check_ir_pointwise(const char* op, const char* name, at::TensorList stage,
                           const at::Tensor& x, int64_t cols) {
  const size_t n = stage.size() - 4;
  int64_t rows = 0, total_cols = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string what = std::string(name) + "[" + std::to_string(i) + "] (weight" +
                             (n > 1 ? " part)" : ")");
    check_float_input(op, what.c_str(), stage[i], 4);
    const int64_t c = n > 1 ? stage[i].size(1) : cols;
    check_ir_weight(op, what, stage[i], x, {stage[i].size(0), c, 1, 1});
    rows += stage[i].size(0);
    total_cols += c;
  }
  EFFK_CHECK(op, total_cols == cols, name, "'s weight parts must take ", cols,
             " input channels in all; got ", total_cols);
  return rows;
}

// The depthwise stage's weight: one (C, 1, k, k) tensor, or its parts (C_i, 1, k_i, k_i) with
// odd k_i over consecutive channel groups (MixNet's MixConv), each centred in the largest
// (padding dilation * (k_i - 1) / 2 gives every group the same output size). Returns the
// geometry of the largest kernel's group, with all C channels.
DwGeometry check_ir_depthwise(const char* op, at::TensorList stage, const at::Tensor& x,
                              int64_t channels, int64_t stride, int64_t dilation) {
  const std::string dw_op = std::string(op) + ": depthwise";
  const size_t n = stage.size() - 4;
  DwGeometry layer{};
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = stage[i];
    const std::string what = "depthwise[" + std::to_string(i) + "] (weight" +
                             (n > 1 ? " part)" : ")");
    check_float_input(op, what.c_str(), w, 4);
    const int64_t k = w.size(2);
    EFFK_CHECK(op, n == 1 || k % 2 == 1, what,
               " must have an odd kernel size so that the groups' outputs align; got ", k);
    const DwGeometry g = check_dwconv_args(dw_op.c_str(), x, w, n > 1 ? w.size(0) : channels,
                                           stride, dilation * (k - 1) / 2, dilation);
    if (i == 0 || g.K > layer.K) layer = g;
    total += w.size(0);
  }
  EFFK_CHECK(op, total == channels, "the depthwise weight parts must have ", channels,
             " channels in all; got ", total);
  layer.C = channels;
  return layer;
}

}  // namespace

IrProblem check_inverted_residual_inference(const char* op, const at::Tensor& x,
                                            at::TensorList expand, at::TensorList depthwise,
                                            at::TensorList se, at::TensorList project,
                                            int64_t stride, int64_t dilation,
                                            c10::string_view act, c10::string_view se_act,
                                            c10::string_view se_gate, bool skip, double eps,
                                            bool weight_parts) {
  check_float_input(op, "x", x, 4);
  check_nonempty(op, x);
  check_ir_stage(op, "expand", expand, true, weight_parts);
  check_ir_stage(op, "depthwise", depthwise, false, weight_parts);
  check_ir_stage(op, "project", project, false, weight_parts);
  EFFK_CHECK(op, se.empty() || se.size() == 4,
             "se must be [] or [reduce_weight, reduce_bias, expand_weight, expand_bias]; got ",
             se.size(), " tensors");
  IrProblem g{};
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.has_expand = !expand.empty();
  g.C = g.has_expand ? check_ir_pointwise(op, "expand", expand, x, g.Cin) : g.Cin;
  if (g.has_expand) check_ir_bn(op, "expand", expand, x, g.C);
  const DwGeometry dg = check_ir_depthwise(op, depthwise, x, g.C, stride, dilation);
  const int64_t k = dg.K;
  check_ir_bn(op, "depthwise", depthwise, x, g.C);
  g.Cout = check_ir_pointwise(op, "project", project, x, g.C);
  check_ir_bn(op, "project", project, x, g.Cout);
  g.has_se = !se.empty();
  if (g.has_se) {
    const int64_t cr = se[0].size(0);
    check_ir_weight(op, "se[0] (reduce_weight)", se[0], x, {cr, g.C, 1, 1});
    check_ir_weight(op, "se[1] (reduce_bias)", se[1], x, {cr});
    check_ir_weight(op, "se[2] (expand_weight)", se[2], x, {g.C, cr, 1, 1});
    check_ir_weight(op, "se[3] (expand_bias)", se[3], x, {g.C});
  }
  g.K = k;
  g.stride = stride;
  g.dil = dilation;
  g.pad = dg.pad;
  g.Ho = dg.Ho;
  g.Wo = dg.Wo;
  g.skip = skip;
  if (skip) {
    EFFK_CHECK(op, stride == 1 && g.Cout == g.Cin && g.Ho == g.H && g.Wo == g.W,
               "skip needs stride 1, Cout == Cin and an output as large as x; got stride ",
               stride, ", Cin ", g.Cin, ", Cout ", g.Cout, ", output ", g.Ho, "x", g.Wo,
               " from ", g.H, "x", g.W);
  }
  EFFK_CHECK(op, eps >= 0.0, "eps must be >= 0; got ", eps);
  g.act = parse_act(op, act);
  g.se_act = parse_act(op, se_act);
  g.se_gate = parse_act(op, se_gate);
  return g;
}

}  // namespace effkernels
