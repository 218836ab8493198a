// CPU linear layer for inference at small batch (effkernels::linear_inference): y = x W^T + b,
// the classifier heads of these models (MobileNetV3's 960->1280 and 1280->1000, MobileNetV2's
// 1280->1000) at batch 1. There the product is a matrix-vector product that reads the whole
// weight matrix (5-10 MB, from memory in a full forward) once per row block of x; F.linear's
// MKL call ran it on one thread (~740 us for MobileNetV3's two layers with a cold cache, 190 us
// warm). Here the threads split the output features, each weight row is read once for up to
// kRows rows of x, and each output is a fixed-order sum (16 lanes along the row, then the lanes
// and the tail in order): the bits do not depend on the thread count. fp32 only (the callers
// use F.linear otherwise); any N, in blocks of kRows.
// A 4-D x (N, in_features, H, W) is first averaged over H and W (the heads' global pooling),
// and `act` is applied to the outputs: a batch-1 head is then two calls (MobileNetV3:
// pool + 1x1 conv + hswish, then the classifier) rather than five, each of whose dispatch
// and Python costs ~30-170 us right after a forward has streamed the weights through the
// caches (x.mean alone ~170 us then, for ~50K additions).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "cpu_common.h"
#include "cpu_gemm.h"
#include "effkernels/checks.h"
#include "effkernels/op_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The 64-byte vectors never cross a call boundary (their helpers are always_inline).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace effkernels::cpu {
namespace {

constexpr const char* kOp = "linear_inference";
constexpr int kRows = 4;               // rows of x per pass over the weights
constexpr int64_t kGrainBytes = 1 << 16;  // weight bytes per parallel task, at least

struct LinearArgs {
  const float* x;  // [N][I], rows ldx apart
  int64_t ldx, N;
  const float* w;  // [O][I], rows ldw apart
  int64_t ldw, I;
  const float* bias;  // [O] or null
  float* y;           // [N][O], dense
  int64_t O, o0, o1;  // this task's output features [o0, o1)
  Act act;
};

using V = GccVec<float, 16>::type;

EFFK_INLINE V load16(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// y[n][o] for R rows of x from n0, outputs [o0, o1).
template <int R>
EFFK_INLINE void rows_kernel(const LinearArgs& a, int64_t n0) {
  const int64_t I16 = a.I / 16 * 16;
  for (int64_t o = a.o0; o < a.o1; ++o) {
    const float* wr = a.w + o * a.ldw;
    V acc[R] = {};
    for (int64_t i = 0; i < I16; i += 16) {
      const V wv = load16(wr + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] += load16(a.x + (n0 + r) * a.ldx + i) * wv;
    }
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int l = 0; l < 16; ++l) s += acc[r][l];
      const float* xr = a.x + (n0 + r) * a.ldx;
      for (int64_t i = I16; i < a.I; ++i) s += xr[i] * wr[i];
      a.y[(n0 + r) * a.O + o] = act_forward(a.act, a.bias ? s + a.bias[o] : s);
    }
  }
}

struct LinearRows {
  using Args = LinearArgs;
  template <Isa>
  static void run(const Args& a) {
    int64_t n = 0;
    for (; n + kRows <= a.N; n += kRows) rows_kernel<kRows>(a, n);
    switch (a.N - n) {
      case 3: rows_kernel<3>(a, n); break;
      case 2: rows_kernel<2>(a, n); break;
      case 1: rows_kernel<1>(a, n); break;
      default: break;
    }
  }
};

// The mean of x (N, C, H, W; any strides) over H and W, as a dense (N, C) tensor: per channel
// a sum in pixel order, divided by H*W (as torch.mean; NaN for an empty map).
at::Tensor global_average(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor pooled = at::empty({N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.const_data_ptr<float>();
  float* pp = pooled.data_ptr<float>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* __restrict acc = pp + n * C;
      std::fill(acc, acc + C, 0.0f);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const float* __restrict px = xp + n * sN + h * sH + w * sW;
          if (sC == 1) {  // channels_last: one contiguous row per pixel
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) acc[c] += px[c];
          } else {
            for (int64_t c = 0; c < C; ++c) acc[c] += px[c * sC];
          }
        }
      const float hw = static_cast<float>(H * W);
      for (int64_t c = 0; c < C; ++c) acc[c] /= hw;
    }
  });
  return pooled;
}

}  // namespace

at::Tensor linear_inference(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view act) {
  const Act a = parse_act(kOp, act);
  EFFK_CHECK(kOp, x.defined() && (x.dim() == 2 || x.dim() == 4),
             "x must be 2-D (N, in_features), or 4-D (N, in_features, H, W) to be averaged "
             "over H and W; got ", x.defined() ? x.sizes() : at::IntArrayRef{});
  check_float_input(kOp, "x", x, x.dim());
  EFFK_CHECK(kOp, x.scalar_type() == at::kFloat && x.device().is_cpu(),
             "x must be a float32 CPU tensor; got ", x.scalar_type(), " on ", x.device());
  check_float_input(kOp, "weight", weight, 2);
  check_same(kOp, "weight", weight, x);
  EFFK_CHECK(kOp, weight.size(1) == x.size(1), "weight must have shape (out_features, ",
             x.size(1), "); got ", weight.sizes());
  const int64_t N = x.size(0), I = x.size(1), O = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    check_float_input(kOp, "bias", *bias, 1);
    check_same(kOp, "bias", *bias, x);
    EFFK_CHECK(kOp, bias->size(0) == O, "bias must have shape (", O, ",); got ", bias->sizes());
  }
  at::Tensor y = at::empty({N, O}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const at::Tensor rows = x.dim() == 4 ? global_average(x) : x;
  const at::Tensor xc = rows.stride(1) == 1 ? rows : rows.contiguous();
  const at::Tensor wc = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const KernelFn<LinearRows> kernel = select_kernel<LinearRows>(cpu_isa());
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, I * 4));
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
    kernel({xc.const_data_ptr<float>(), std::max<int64_t>(xc.stride(0), 1), N,
            wc.const_data_ptr<float>(), std::max<int64_t>(wc.stride(0), 1), I,
            bc.defined() ? bc.const_data_ptr<float>() : nullptr, y.data_ptr<float>(), O, o0,
            o1, a});
  });
  return y;
}

}  // namespace effkernels::cpu

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("linear_inference", &effkernels::cpu::linear_inference);
}
