// The dense k x k convolution + BatchNorm + activation of effkernels::conv_bn_act_inference
// (the models' stems), checked, folded and packed once per call and then run one output row at
// a time: by that op (rows into its output tensor), and by effkernels::stem_inverted_residual_
// packed, which computes the stem's rows straight into the first block's ring of hidden rows
// (csrc/cpu/inverted_residual.cpp), so that the stem's output, the models' largest tensor, is
// never stored.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "cpu_common.h"

namespace effkernels::cpu {

struct DenseConvGeometry {
  int64_t N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW;
};

// One output row (all its pixels, all output channels).
struct DenseConvRowArgs {
  const float* strip;       // this row's KH input rows, channels innermost, zero-padded
  const int64_t* seg_off;   // per tap segment: its offset in the strip for pixel 0
  int64_t nseg, seg_len;    // segments of seg_len taps (taps in (kh, kw, ci) order)
  int64_t pixel_step;       // SW * Cin: strip values between neighbouring output pixels
  const float* panels;      // [npanels][taps][NR], BN scale folded, zero past Cout
  int64_t npanels, taps;
  const float* shift;       // [Cout]
  float* out;               // the row's first pixel (its Cout channels contiguous)
  int64_t ldo;              // floats between neighbouring output pixels (>= Cout)
  int64_t OW, Cout;
};

class DenseConv {
 public:
  // Checks the arguments as conv_bn_act_inference does (errors name `op`, and the arguments
  // with `arg_prefix`: "stem_weight"), folds BN and packs the weights for this CPU. x: fp32,
  // any strides; it must outlive the DenseConv.
  DenseConv(const char* op, const char* arg_prefix, const at::Tensor& x, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
            const at::Tensor& bn_bias, const at::Tensor& running_mean,
            const at::Tensor& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
            at::IntArrayRef dilation, double eps, c10::string_view act);

  const DenseConvGeometry& geometry() const { return g_; }
  // Floats of scratch row() needs (per thread).
  int64_t strip_size() const { return g_.KH * strip_w_ * g_.Cin; }
  // Output row oh of image n: act(BN(conv)) of its OW pixels, pixel w's Cout channels at
  // out + w * ldo. strip: strip_size() floats of scratch.
  void row(int64_t n, int64_t oh, float* strip, float* out, int64_t ldo) const;

 private:
  void fill_strip(int64_t n, int64_t oh, float* strip) const;

  DenseConvGeometry g_;
  const float* x_;
  int64_t sN_, sC_, sH_, sW_;
  int64_t strip_w_ = 0, seg_len_ = 0, npanels_ = 0, taps_ = 0;
  std::vector<int64_t> seg_off_;
  std::vector<float> panels_, shift_;
  void (*kernel_)(const DenseConvRowArgs&) = nullptr;
};

}  // namespace effkernels::cpu
