// Argument validation shared by every C++ backend, so that a direct torch.ops.effkernels call
// is as safe as the Python API. Messages name the op, the argument and the expectation.
#pragma once

#include <optional>
#include <utility>

#include <ATen/core/Tensor.h>

#include "effkernels/activation.h"

namespace effkernels {

struct DwGeometry {
  int64_t N, C, H, W;     // input
  int64_t K;              // kernel size (square)
  int64_t Ho, Wo;         // output
  int64_t stride, pad, dil;
};

// Checks the BatchNorm parameter/statistics tensors: 1-D, `channels` long, same device as x.
// Running statistics are required when !training. prefix: of the argument names in errors
// (an op with two BatchNorms: "stem_").
void check_bn_args(const char* op, const at::Tensor& x, int64_t channels,
                   const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                   const std::optional<at::Tensor>& running_mean,
                   const std::optional<at::Tensor>& running_var, bool training,
                   const char* prefix = "");

// x: (N, C, H, W) floating; weight: (C, 1, k, k) with 1 <= k <= 11, same dtype/device as x.
DwGeometry check_dwconv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             int64_t channels, int64_t stride,
                             int64_t padding, int64_t dilation);

// Backward ops: the saved statistics (mean, var) are floating, (channels,), on x's device.
void check_saved_stats(const char* op, const at::Tensor& x, int64_t channels,
                       const at::Tensor& mean, const at::Tensor& var);

void check_float_input(const char* op, const char* name, const at::Tensor& t, int64_t dim);
void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x);

// Batch statistics of a single value per channel are refused, as F.batch_norm does.
void check_training_count(const char* op, int64_t count_per_channel, bool training);

// Every argument of dwconv_bn_act / dwconv_bn_act_backward (one sequence for every backend):
// returns the geometry and the parsed activation.
std::pair<DwGeometry, Act> check_dwconv_forward(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, c10::string_view act, bool training);
std::pair<DwGeometry, Act> check_dwconv_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t padding, int64_t dilation,
    c10::string_view act, bool training);

// Every argument of mixconv_bn_act / mixconv_bn_act_backward (one sequence for every backend):
// x (N, C, H, W); weights[i] (C_i, 1, k_i, k_i) with odd k_i, padding dilation * (k_i - 1) / 2,
// sum C_i == C. Returns the layer's geometry (all C channels, the output size shared by the
// groups; K the largest kernel and pad its padding, each group i being padded by
// dilation * (k_i - 1) / 2) and the activation.
struct MixProblem {
  DwGeometry g;
  Act act;
};
MixProblem check_mixconv_forward(const char* op, const at::Tensor& x, at::TensorList weights,
                                 const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                 const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, int64_t stride,
                                 int64_t dilation, c10::string_view act, bool training);
MixProblem check_mixconv_backward(const char* op, const at::Tensor& grad_out,
                                  const at::Tensor& x, at::TensorList weights,
                                  const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                  const at::Tensor& mean, const at::Tensor& var, int64_t stride,
                                  int64_t dilation, c10::string_view act, bool training);

// pwconv_bn_act: the problem as the backends see it (M = N * H * W pixels).
struct PwProblem {
  int64_t N, Cin, H, W, Cout, M;
  Act act;
  bool training;
  double eps;
  bool has_conv_out = false;  // backward: the forward's y was given (check_pwconv_backward)
};

// x, residual (shape (N, Cout, H, W)), act and eps of a pointwise conv with Cout outputs whose
// weight the caller has checked or packed (pwconv_bn_act_packed).
PwProblem check_pwconv_input(const char* op, const at::Tensor& x, int64_t Cout,
                             const std::optional<at::Tensor>& residual, c10::string_view act,
                             bool training, double eps);

// Every argument of pwconv_bn_act / pwconv_bn_act_backward (one sequence for every backend).
PwProblem check_pwconv_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& residual, c10::string_view act,
                               bool training, double eps);
PwProblem check_pwconv_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& bn_weight,
                                const at::Tensor& bn_bias, const at::Tensor& mean,
                                const at::Tensor& var, const std::optional<at::Tensor>& residual,
                                c10::string_view act, bool training, double eps,
                                const std::optional<at::Tensor>& conv_out);

// inverted_residual_inference: the block as the fused backends see it (hidden C channels; pad
// = dilation * (k - 1) / 2).
struct IrProblem {
  int64_t N, Cin, H, W;
  int64_t C, Cout;             // hidden and output channels
  int64_t K, stride, dil, pad;  // depthwise
  int64_t Ho, Wo;
  bool has_expand, has_se, skip;
  Act act, se_act, se_gate;
};

// Every argument of inverted_residual_inference (one sequence for every backend).
// weight_parts: a stage's weight may be given as several parts (the CPU kernels: a split 1x1
// conv's diagonal blocks, MixConv's kernels; each stage is then [parts..., bn_weight, bn_bias,
// running_mean, running_var]); otherwise exactly one weight per stage.
IrProblem check_inverted_residual_inference(const char* op, const at::Tensor& x,
                                            at::TensorList expand, at::TensorList depthwise,
                                            at::TensorList se, at::TensorList project,
                                            int64_t stride, int64_t dilation,
                                            c10::string_view act, c10::string_view se_act,
                                            c10::string_view se_gate, bool skip, double eps,
                                            bool weight_parts = false);

}  // namespace effkernels
