// CPU dense k x k convolution + BatchNorm + activation for inference, with few input channels
// (effkernels::conv_bn_act_inference): the models' stems (3 -> 16..40 channels, 3x3, stride 2).
// Through oneDNN and a separate activation pass the stem took ~9% of MobileNetV2's prepacked
// batch-1 forward (torch.profiler, bench/NOTES.md). With Cin = 3 an im2col GEMM would gather 27
// scattered 3-float pieces per pixel for 27 multiply-adds per output channel; here each output
// row's k input rows are copied once into a strip (zero-padded, channels innermost: a memcpy per row for
// NHWC x, a gather for other layouts), and a register-blocked micro-kernel reads the strip in
// place. For kernel row kh the taps (kw, ci) of output pixel r are the k*Cin consecutive values
// at kh's strip row + r*stride*Cin (with dilation: Cin values per (kh, kw)), so the taps come
// in a few contiguous segments, each broadcast against packed weight panels [taps][NR] (BN scale
// folded, WeightPanels as in the pointwise GEMM); the epilogue adds the BN shift, applies the
// activation and writes the NHWC row. fp32; each output is one FMA chain in tap order, so the
// bits do not depend on the thread count. DenseConv (conv_bn_act_inference.h) is the checked,
// packed convolution, run a row at a time: here into the output tensor, in
// stem_inverted_residual_packed into the first block's ring.
#include "conv_bn_act_inference.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "cpu_gemm.h"
#include "effkernels/activation.h"
#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"
#include "effkernels/op_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The 64-byte vectors never cross a call boundary (their helpers are always_inline).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace effkernels::cpu {
namespace {

constexpr const char* kOp = "conv_bn_act_inference";
constexpr int kMaxVectors = 4;   // output-channel vectors per panel
constexpr int64_t kRowGrain = 2;  // output rows per parallel task, at least

using Geometry = DenseConvGeometry;
using RowArgs = DenseConvRowArgs;

// c[MR][NV * VW] = the taps of MR output pixels (rows pixel_step apart from x) @ panel b.
template <int MR, int NV, int VW>
EFFK_INLINE void conv_micro_kernel(const RowArgs& a, const float* __restrict x,
                                   const float* __restrict b, float* __restrict c) {
  using V = typename GccVec<float, VW>::type;
  constexpr int NR = NV * VW;
  V acc[MR][NV];
  acc_zero(acc);
  for (int64_t s = 0; s < a.nseg; ++s) {
    const float* xs = x + a.seg_off[s];
    for (int64_t k = 0; k < a.seg_len; ++k, b += NR) acc_step<VW>(acc, xs + k, a.pixel_step, b);
  }
  acc_store<VW>(acc, c, NR);
}

// out[l] = act(c[l] + shift[l]) for one pixel's n output channels.
template <Act ACT>
EFFK_INLINE void epilogue_pixel(int64_t n, const float* __restrict c,
                                const float* __restrict shift, float* __restrict out) {
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) out[l] = act_forward<ACT>(c[l] + shift[l]);
}

template <Act ACT, int NV>
struct ConvRowKernel {
  using Args = RowArgs;
  template <Isa I>
  static void run(const Args& a) {
    constexpr int VW = isa_bytes(I) / static_cast<int>(sizeof(float));
    constexpr int NR = NV * VW;
    constexpr int MR = micro_rows(isa_regs(I), NV);
    alignas(64) float c[MR * NR];
    for (int64_t j = 0; j < a.npanels; ++j) {
      const float* b = a.panels + j * a.taps * NR;
      const int64_t col0 = j * NR, ncols = std::min<int64_t>(NR, a.Cout - col0);
      // Blocks past OW compute pixels the strip holds zeros for; only OW are stored.
      row_blocks<MR>(a.OW, [&](int64_t p0, auto rows) {
        constexpr int R = decltype(rows)::value;
        conv_micro_kernel<R, NV, VW>(a, a.strip + p0 * a.pixel_step, b, c);
        for (int64_t p = 0; p < std::min<int64_t>(R, a.OW - p0); ++p)
          epilogue_pixel<ACT>(ncols, c + p * NR, a.shift + col0,
                              a.out + (p0 + p) * a.ldo + col0);
      });
    }
  }
};

using RowFn = KernelFn<ConvRowKernel<Act::Identity, 1>>;

template <Act ACT>
RowFn row_kernel(Isa isa, int nv) {
  switch (nv) {
    case 1: return select_kernel<ConvRowKernel<ACT, 1>>(isa);
    case 2: return select_kernel<ConvRowKernel<ACT, 2>>(isa);
    case 3: return select_kernel<ConvRowKernel<ACT, 3>>(isa);
    default: return select_kernel<ConvRowKernel<ACT, 4>>(isa);
  }
}

RowFn select_row_kernel(Isa isa, Act act, int nv) {
  return EFFK_DISPATCH_ACT(act, [&] { return row_kernel<ACT>(isa, nv); });
}

// prefix: of the argument names in errors (stem_inverted_residual_packed's "stem_").
Geometry check_args(const char* op, const char* prefix, const at::Tensor& x,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                    const at::Tensor& running_mean,
                    const at::Tensor& running_var, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_float_input(op, "x", x, 4);
  EFFK_CHECK(op, x.scalar_type() == at::kFloat && x.device().is_cpu(),
             "x must be a float32 CPU tensor; got ", x.scalar_type(), " on ", x.device());
  const std::string weight_name = std::string(prefix) + "weight",
                    bias_name = std::string(prefix) + "bias";
  check_float_input(op, weight_name.c_str(), weight, 4);
  check_same(op, weight_name.c_str(), weight, x);
  EFFK_CHECK(op, weight.size(1) == x.size(1) && weight.size(0) > 0, weight_name,
             " must have shape (out_channels, ", x.size(1),
             ", kh, kw) (groups=1) with out_channels >= 1; got ", weight.sizes());
  EFFK_CHECK(op, weight.size(2) >= 1 && weight.size(3) >= 1, weight_name,
             " must have a non-empty kernel; got ", weight.sizes());
  const int64_t Cout = weight.size(0);
  check_bn_args(op, x, Cout, bn_weight, bn_bias, running_mean, running_var,
                /*training=*/false, prefix);
  if (bias.has_value() && bias->defined()) {
    check_float_input(op, bias_name.c_str(), *bias, 1);
    check_same(op, bias_name.c_str(), *bias, x);
    EFFK_CHECK(op, bias->size(0) == Cout, bias_name, " must have shape (", Cout, ",); got ",
               bias->sizes());
  }
  auto pair = [&](const char* name, at::IntArrayRef v, int64_t lo) {
    EFFK_CHECK(op, v.size() == 2 && v[0] >= lo && v[1] >= lo, prefix, name,
               " must be two integers >= ", lo, "; got ", v);
  };
  pair("stride", stride, 1);
  pair("padding", padding, 0);
  pair("dilation", dilation, 1);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), Cout, weight.size(2), weight.size(3),
             stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  EFFK_CHECK(op, g.Cin > 0 && g.H > 0 && g.W > 0,
             "x must have at least one channel and non-empty H and W; got shape ", x.sizes());
  g.OH = conv_out_size(g.H, g.KH, g.SH, g.PH, g.DH);
  g.OW = conv_out_size(g.W, g.KW, g.SW, g.PW, g.DW);
  EFFK_CHECK(op, g.OH > 0 && g.OW > 0, "x of size ", g.H, "x", g.W,
             " is too small for the ", g.KH, "x", g.KW, " kernel with padding ", padding,
             " and dilation ", dilation, " (output size ", g.OH, "x", g.OW, ")");
  return g;
}

}  // namespace

DenseConv::DenseConv(const char* op, const char* arg_prefix, const at::Tensor& x,
                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                     const at::Tensor& running_mean,
                     const at::Tensor& running_var, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                     c10::string_view act)
    : g_(check_args(op, arg_prefix, x, weight, bias, bn_weight, bn_bias, running_mean,
                    running_var, stride, padding, dilation)),
      x_(x.const_data_ptr<float>()),
      sN_(x.stride(0)),
      sC_(x.stride(1)),
      sH_(x.stride(2)),
      sW_(x.stride(3)) {
  const Act a = parse_act(op, act);
  // BN folded: scale into the packed weights, shift (with the conv bias) into the epilogue.
  const at::Tensor gamma = acc_vector(bn_weight, at::kFloat),
                   beta = acc_vector(bn_bias, at::kFloat),
                   mean = acc_vector(running_mean, at::kFloat),
                   var = acc_vector(running_var, at::kFloat);
  const at::Tensor b =
      bias.has_value() && bias->defined() ? acc_vector(*bias, at::kFloat) : at::Tensor();
  std::vector<float> scale(static_cast<size_t>(g_.Cout));
  shift_.resize(static_cast<size_t>(g_.Cout));
  for (int64_t c = 0; c < g_.Cout; ++c) {
    const BnAffine<float> f =
        fold_bn<float>(gamma.const_data_ptr<float>()[c], beta.const_data_ptr<float>()[c],
                       mean.const_data_ptr<float>()[c], var.const_data_ptr<float>()[c],
                       static_cast<float>(eps));
    scale[c] = f.scale;
    shift_[c] = b.defined() ? f.shift + b.const_data_ptr<float>()[c] * f.scale : f.shift;
  }

  const Isa isa = cpu_isa();
  const int vw = isa_bytes(isa) / static_cast<int>(sizeof(float));
  const int nv = static_cast<int>(std::min<int64_t>(kMaxVectors, ceil_div(g_.Cout, vw)));
  const int NR = nv * vw, MR = micro_rows(isa_regs(isa), nv);
  taps_ = g_.KH * g_.KW * g_.Cin;
  npanels_ = ceil_div(g_.Cout, NR);
  // Taps in (kh, kw, ci) order: weight rows (Cout, KH, KW, Cin).
  const at::Tensor w_taps = weight.permute({0, 2, 3, 1}).contiguous().view({g_.Cout, taps_});
  panels_.resize(static_cast<size_t>(npanels_ * taps_ * NR));
  WeightPanels<float, float>(w_taps, isa, NR, scale.data())(0, npanels_, panels_.data());

  // The strip holds every pixel the last row block computes (up to MR - 1 past OW).
  strip_w_ = std::max(g_.PW + g_.W, (g_.OW + MR - 1) * g_.SW + (g_.KW - 1) * g_.DW + 1);
  if (g_.DW == 1) {  // the KW * Cin taps of a kernel row are consecutive
    for (int64_t kh = 0; kh < g_.KH; ++kh) seg_off_.push_back(kh * strip_w_ * g_.Cin);
    seg_len_ = g_.KW * g_.Cin;
  } else {
    for (int64_t kh = 0; kh < g_.KH; ++kh)
      for (int64_t kw = 0; kw < g_.KW; ++kw)
        seg_off_.push_back(kh * strip_w_ * g_.Cin + kw * g_.DW * g_.Cin);
    seg_len_ = g_.Cin;
  }
  kernel_ = select_row_kernel(isa, a, nv);
}

// Copies the KH input rows of output row (n, oh) into strip[kh][strip_w][Cin]: input column iw
// at PW + iw, zeros in the padding, past the input and for rows outside it.
void DenseConv::fill_strip(int64_t n, int64_t oh, float* strip) const {
  const int64_t row = strip_w_ * g_.Cin, left = g_.PW * g_.Cin, body = g_.W * g_.Cin;
  const bool nhwc = sC_ == 1 && sW_ == g_.Cin;
  for (int64_t kh = 0; kh < g_.KH; ++kh) {
    float* d = strip + kh * row;
    const int64_t ih = oh * g_.SH - g_.PH + kh * g_.DH;
    if (ih < 0 || ih >= g_.H) {
      std::fill(d, d + row, 0.0f);
      continue;
    }
    std::fill(d, d + left, 0.0f);
    std::fill(d + left + body, d + row, 0.0f);
    const float* s = x_ + n * sN_ + ih * sH_;
    if (nhwc) {
      std::memcpy(d + left, s, sizeof(float) * body);
    } else {
      for (int64_t iw = 0; iw < g_.W; ++iw)
        for (int64_t ci = 0; ci < g_.Cin; ++ci) d[left + iw * g_.Cin + ci] = s[iw * sW_ + ci * sC_];
    }
  }
}

void DenseConv::row(int64_t n, int64_t oh, float* strip, float* out, int64_t ldo) const {
  fill_strip(n, oh, strip);
  kernel_({strip, seg_off_.data(), static_cast<int64_t>(seg_off_.size()), seg_len_,
           g_.SW * g_.Cin, panels_.data(), npanels_, taps_, shift_.data(), out, ldo, g_.OW,
           g_.Cout});
}

at::Tensor conv_bn_act_inference(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, double eps, c10::string_view act) {
  const DenseConv conv(kOp, "", x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                       stride, padding, dilation, eps, act);
  const DenseConvGeometry& g = conv.geometry();
  at::Tensor out = empty_nhwc({g.N, g.Cout, g.OH, g.OW}, x.options());
  if (g.N == 0) return in_format(out, output_format(x));
  float* od = out.data_ptr<float>();
  parallel_items(g.N * g.OH, kRowGrain, [&](const auto& next) {
    float* strip = thread_scratch<float>(0, conv.strip_size());
    for (int64_t item = 0; next(item);)
      conv.row(item / g.OH, item % g.OH, strip, od + item * g.OW * g.Cout, g.Cout);
  });
  return in_format(out, output_format(x));
}

}  // namespace effkernels::cpu

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("conv_bn_act_inference", &effkernels::cpu::conv_bn_act_inference);
}
