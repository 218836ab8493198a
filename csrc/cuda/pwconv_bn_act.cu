// CUDA pointwise (1x1) conv + BatchNorm + activation (+ residual): the pwconv_bn_act ops' CUDA
// kernels. Argument checks are the CPU op's (op_checks.cpp); the semantics too
// (csrc/cpu/pwconv_bn_act.cpp): out = act(bn(conv1x1(x)) + residual), fp32 accumulation (fp64
// for fp64), outputs in the input's memory format, (mean, var) returned in the accumulation
// dtype (training: the batch mean and biased variance, zeros for an empty batch; eval: a copy
// of the running statistics). No cuBLAS: one GEMM kernel of ours (pw_kernels.cuh) with the BN,
// activation, residual and statistics work fused in its epilogue.
//
// Layout. A 1x1 conv on NHWC data is a GEMM: out[M = N*H*W][Cout] = x[M][Cin] . W^T. x,
// grad_out and the residual are read through a channels-innermost view (channel stride 1, any
// N/H/W strides: channels_last tensors and their slices are used in place, 16-byte vector
// loads when aligned). A plain NCHW (contiguous) input costs one channels_last copy on the way
// in (cpu::channels_innermost, as the CPU and dw backends do) and the NHWC result one copy
// back to NCHW (in_format). W is made a dense (Cout, Cin) matrix (a copy only when it is not).
//
// Paths per dtype (pw_params.h): fp16 / bf16 on tensor cores (nvcuda::wmma 16x16x16, fp32
// accumulators, 128 x 64 x 32 block tiles); fp32 FFMA (128 x 64 x 16, exact fp32, no TF32);
// fp64 FFMA (64 x 64 x 16; for gradcheck). Any Cin / Cout / M: tiles are zero-padded in shared
// memory, vector loads only where the extents and strides allow them. Indexing is int64.
//
// Forward, eval:      one GEMM launch (kPwOut): BN folded (fold_bn) into a per-channel scale and
//                     shift applied to the fp32 accumulators, + residual, act, cast, store.
// Forward, training:  (1) GEMM kPwStats: per 128-row tile, the (mean, M2) of each column of the
//                     result (two passes over the tile in shared memory, the 4 row groups merged
//                     with Chan's formula in a fixed order), nothing stored; (2) dw_reduce.cu's
//                     stats_combine: Chan's combination of the tiles in float64, fixed order;
//                     (3) GEMM kPwOut with the batch statistics. The GEMM is recomputed in (3)
//                     rather than y stored by (1), as the CPU op and the dw backend do: y in fp32
//                     is a 4-byte write and read per output (8x an fp16 output), while the
//                     recompute re-reads x (Cin elements per pixel, mostly from L2 for the
//                     narrow MobileNet layers) and costs tensor-core time that is cheap at these
//                     arithmetic intensities (2 * Cin flops per 2-byte output).
// Backward:           (1) GEMM kPwBwd: y = conv(x) recomputed and stored (acc dtype), g =
//                     grad_out * act'(z) with z = gamma * xhat + beta (+ residual), grad_residual
//                     = g, per-tile sums of g and g * xhat; (2) col_sum (float64, fixed order) and
//                     bn_coeffs (training: through the batch statistics); (3) pw_dy: dy = a*g +
//                     b*xhat + c (bn_dy), g recomputed from y, written in x's dtype (the grad
//                     GEMMs' operand: fp16/bf16 dy as PyTorch's own low-precision backward has);
//                     (4) GEMM grad_x = dy . W (kPwOut, plain store); (5) GEMM grad_weight =
//                     dy^T . x split over fixed pixel chunks (blockIdx.z, kPwAcc: one fp32/fp64
//                     partial per chunk), then col_sum of the partials in float64, chunk order.
//                     dgamma = sum g * xhat, dbeta = sum g.
// Determinism: every reduction (tile statistics, BN sums, grad_weight chunks) has a fixed shape
// given the problem size and is combined in a fixed order; no atomics.
#include <torch/library.h>

#include <type_traits>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cpu/cpu_common.h"
#include "cuda_dispatch.h"
#include "dw_params.h"
#include "effkernels/checks.h"
#include "effkernels/op_checks.h"
#include "pw_params.h"

namespace effkernels::cuda {
namespace {

using cpu::channels_innermost;
using cpu::empty_nhwc;
using cpu::in_format;
using cpu::output_format;
using cpu::stat_copy;
using cpu::stat_dtype;

// Pixel rows of a channels-innermost 4-D tensor: pixel p = (n, h, w); flat when the rows are
// p * step apart (contiguous NHWC and its channel slices).
PwRows pixel_rows(const at::Tensor& t) {
  return effkernels::pixel_rows(t.size(0), t.size(2), t.size(3), t.stride(0), t.stride(2),
                                t.stride(3));
}

// An operand whose inner (unit-stride) index runs over `inner` elements.
template <typename T>
PwOperand operand(const void* p, const PwRows& rows, bool k_inner, int64_t inner) {
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  PwOperand o;
  o.p = p;
  o.rows = rows;
  o.k_inner = k_inner;
  const bool strides_ok = rows.flat ? rows.step % V == 0
                                    : rows.sN % V == 0 && rows.sH % V == 0 && rows.sW % V == 0;
  o.vec = reinterpret_cast<uintptr_t>(p) % 16 == 0 && inner % V == 0 && strides_ok;
  return o;
}

// Whether the kPwOut epilogue may store 16-byte vectors of T (PwGemmParams::out_vec): the output
// [M][ldo] and the residual rows (when `res`) are aligned, and no vector crosses column N.
template <typename T>
bool vec_columns(const void* out, int64_t ldo, int64_t N, const void* res,
                 const PwRows& res_rows) {
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  const bool out_ok = reinterpret_cast<uintptr_t>(out) % 16 == 0 && ldo % V == 0 && N % V == 0;
  return out_ok && (res == nullptr || operand<T>(res, res_rows, true, N).vec);
}

// grad_weight: pixel rows per partial. Fixed by the problem size only (determinism), a multiple
// of every tile's BK, grown to bound the partials' memory (2^24 elements) and the grid's z.
int64_t grad_weight_chunk(int64_t M, int64_t Cout, int64_t Cin) {
  int64_t chunk = 512;
  while (cdiv(M, chunk) > 65535 || cdiv(M, chunk) * Cout * Cin > (int64_t(1) << 24)) chunk *= 2;
  return chunk;
}

template <typename T>
void forward_impl(const PwProblem& pb, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                  const std::optional<at::Tensor>& residual, at::Tensor& mean, at::Tensor& var,
                  at::Tensor& out) {
  using A = pw_acc_t<T>;
  const at::ScalarType acc = stat_dtype(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor xc = channels_innermost(x);
  const at::Tensor w = weight.reshape({pb.Cout, pb.Cin}).contiguous();
  const at::Tensor gamma = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
  PwGemmParams<T> p{};
  p.a = operand<T>(xc.data_ptr(), pixel_rows(xc), /*k_inner=*/true, pb.Cin);
  p.b = operand<T>(w.data_ptr(), dense_rows(pb.Cin), /*k_inner=*/true, pb.Cin);
  p.M = pb.M;
  p.N = pb.Cout;
  p.K = pb.Cin;
  p.kchunk = pb.Cin;
  p.act = pb.act;
  p.eps = static_cast<A>(pb.eps);
  p.gamma = gamma.data_ptr<A>();
  p.beta = beta.data_ptr<A>();
  at::Tensor res_c;
  if (residual.has_value() && residual->defined()) {
    res_c = channels_innermost(*residual);
    p.res = static_cast<const T*>(res_c.data_ptr());
    p.res_rows = pixel_rows(res_c);
  }
  if (pb.training) {
    const int64_t tiles = cdiv(pb.M, PwTile<T>::BM);
    at::Tensor part = at::empty({tiles, 2, pb.Cout}, x.options().dtype(acc));
    at::Tensor counts = at::empty({tiles}, x.options().dtype(acc));
    p.mode = kPwStats;
    p.part = part.data_ptr<A>();
    p.counts = counts.data_ptr<A>();
    launch_pw_gemm<T>(p, 1, stream);
    launch_stats_combine<A>(p.part, p.counts, tiles, pb.Cout, mean.data_ptr<A>(),
                            var.data_ptr<A>(), stream);
  }
  p.mode = kPwOut;
  p.mean = mean.data_ptr<A>();
  p.var = var.data_ptr<A>();
  p.out = out.data_ptr();
  p.ldo = pb.Cout;
  p.out_vec = vec_columns<T>(p.out, p.ldo, p.N, p.res, p.res_rows);
  launch_pw_gemm<T>(p, 1, stream);
}

template <typename T>
void backward_impl(const PwProblem& pb, const at::Tensor& grad_out, const at::Tensor& x,
                   const at::Tensor& weight, const at::Tensor& bn_weight,
                   const at::Tensor& bn_bias, const at::Tensor& mean_in,
                   const at::Tensor& var_in, const std::optional<at::Tensor>& residual,
                   at::Tensor& grad_x, at::Tensor& grad_res, at::Tensor& grad_w,
                   at::Tensor& sums) {
  using A = pw_acc_t<T>;
  const at::ScalarType acc = stat_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor xc = channels_innermost(x);
  const at::Tensor goc = channels_innermost(grad_out);
  const at::Tensor w = weight.reshape({pb.Cout, pb.Cin}).contiguous();
  const at::Tensor gamma = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
  const at::Tensor mean = mean_in.to(acc).contiguous(), var = var_in.to(acc).contiguous();
  const PwRows x_rows = pixel_rows(xc);

  // (1) y = conv(x) stored, grad_residual, per-tile sums of g and g * xhat.
  PwGemmParams<T> p{};
  p.a = operand<T>(xc.data_ptr(), x_rows, /*k_inner=*/true, pb.Cin);
  p.b = operand<T>(w.data_ptr(), dense_rows(pb.Cin), /*k_inner=*/true, pb.Cin);
  p.M = pb.M;
  p.N = pb.Cout;
  p.K = pb.Cin;
  p.kchunk = pb.Cin;
  p.mode = kPwBwd;
  p.act = pb.act;
  p.eps = static_cast<A>(pb.eps);
  p.gamma = gamma.data_ptr<A>();
  p.beta = beta.data_ptr<A>();
  p.mean = mean.data_ptr<A>();
  p.var = var.data_ptr<A>();
  at::Tensor res_c;
  if (residual.has_value() && residual->defined()) {
    res_c = channels_innermost(*residual);
    p.res = static_cast<const T*>(res_c.data_ptr());
    p.res_rows = pixel_rows(res_c);
    p.grad_res = static_cast<T*>(grad_res.data_ptr());  // fresh NHWC: dense [M][Cout]
  }
  p.go = static_cast<const T*>(goc.data_ptr());
  p.go_rows = pixel_rows(goc);
  at::Tensor y = at::empty({pb.M, pb.Cout}, acc_opts);
  p.y = y.data_ptr<A>();
  const int64_t tiles = cdiv(pb.M, PwTile<T>::BM);
  at::Tensor part = at::empty({tiles, 2, pb.Cout}, acc_opts);
  p.part = part.data_ptr<A>();
  launch_pw_gemm<T>(p, 1, stream);

  // (2) dbeta = sum g, dgamma = sum g * xhat (float64), the BN backward coefficients.
  launch_col_sum<A>(p.part, tiles, 2 * pb.Cout, sums.data_ptr<double>(), stream);
  at::Tensor coef = at::empty({3 * pb.Cout}, acc_opts);
  launch_bn_coeffs<A>(sums.data_ptr<double>(), p.gamma, p.var, p.eps,
                      static_cast<double>(pb.M), pb.training, pb.Cout, coef.data_ptr<A>(),
                      stream);

  // (3) dy in x's dtype (in place over y for fp32 / fp64).
  at::Tensor dy = std::is_same_v<T, A> ? y : at::empty({pb.M, pb.Cout}, x.options());
  PwDyParams<T> d{};
  d.y = p.y;
  d.dy = static_cast<T*>(dy.data_ptr());
  d.go = p.go;
  d.go_rows = p.go_rows;
  d.res = p.res;
  d.res_rows = p.res_rows;
  d.M = pb.M;
  d.C = pb.Cout;
  d.gamma = p.gamma;
  d.beta = p.beta;
  d.mean = p.mean;
  d.var = p.var;
  d.coef = coef.data_ptr<A>();
  d.eps = p.eps;
  d.act = pb.act;
  launch_pw_dy<T>(d, stream);
  if (pb.Cin == 0) return;

  // (4) grad_x[M][Cin] = dy[M][Cout] . W[Cout][Cin]: B(j = ci, k = co) = W[co][ci].
  PwGemmParams<T> q{};
  q.a = operand<T>(dy.data_ptr(), dense_rows(pb.Cout), /*k_inner=*/true, pb.Cout);
  q.b = operand<T>(w.data_ptr(), dense_rows(pb.Cin), /*k_inner=*/false, pb.Cin);
  q.M = pb.M;
  q.N = pb.Cin;
  q.K = pb.Cout;
  q.kchunk = pb.Cout;
  q.mode = kPwOut;
  q.act = Act::Identity;
  q.out = grad_x.data_ptr();  // fresh NHWC: dense [M][Cin]
  q.ldo = pb.Cin;
  q.out_vec = vec_columns<T>(q.out, q.ldo, q.N, nullptr, PwRows{});
  launch_pw_gemm<T>(q, 1, stream);

  // (5) grad_weight[Cout][Cin] = sum_m dy[m][co] x[m][ci], one partial per pixel chunk:
  // A(i = co, k = m) = dy[m][co], B(j = ci, k = m) = x(pixel m, ci).
  const int64_t chunk = grad_weight_chunk(pb.M, pb.Cout, pb.Cin);
  const int64_t nchunks = cdiv(pb.M, chunk);
  at::Tensor wpart = at::empty({nchunks, pb.Cout, pb.Cin}, acc_opts);
  PwGemmParams<T> r{};
  r.a = operand<T>(dy.data_ptr(), dense_rows(pb.Cout), /*k_inner=*/false, pb.Cout);
  r.b = operand<T>(xc.data_ptr(), x_rows, /*k_inner=*/false, pb.Cin);
  r.M = pb.Cout;
  r.N = pb.Cin;
  r.K = pb.M;
  r.kchunk = chunk;
  r.mode = kPwAcc;
  r.out = wpart.data_ptr();
  r.ldo = pb.Cin;
  r.out_zstride = pb.Cout * pb.Cin;
  launch_pw_gemm<T>(r, nchunks, stream);
  launch_col_sum<A>(wpart.data_ptr<A>(), nchunks, pb.Cout * pb.Cin, grad_w.data_ptr<double>(),
                    stream);
}

// conv_out (the fourth result) is empty: the CUDA backward recomputes y (csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    c10::string_view act, bool training, double eps, bool /*keep_conv_out*/) {
  constexpr const char* op = "pwconv_bn_act";
  const PwProblem pb = check_pwconv_forward(op, x, weight, bn_weight, bn_bias, running_mean,
                                            running_var, residual, act, training, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = stat_dtype(x);
  at::Tensor mean, var;
  if (training) {
    mean = at::zeros({pb.Cout}, x.options().dtype(acc));
    var = at::zeros({pb.Cout}, x.options().dtype(acc));
  } else {
    mean = stat_copy(*running_mean, acc);
    var = stat_copy(*running_var, acc);
  }
  at::Tensor out = empty_nhwc({pb.N, pb.Cout, pb.H, pb.W}, x.options());
  if (pb.M > 0 && pb.Cout > 0) {
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      forward_impl<T>(pb, x, weight, bn_weight, bn_bias, residual, mean, var, out);
    });
  }
  return {in_format(out, output_format(x)), mean, var, at::empty({0}, x.options().dtype(acc))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& residual, c10::string_view act,
    bool training, double eps, const std::optional<at::Tensor>& conv_out) {
  constexpr const char* op = "pwconv_bn_act_backward";
  // A given conv_out is checked, then unused: the GEMM recomputes y.
  const PwProblem pb = check_pwconv_backward(op, grad_out, x, weight, bn_weight, bn_bias, mean,
                                             var, residual, act, training, eps, conv_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor grad_x = empty_nhwc({pb.N, pb.Cin, pb.H, pb.W}, x.options());
  at::Tensor grad_res = has_res ? empty_nhwc({pb.N, pb.Cout, pb.H, pb.W}, x.options())
                                : at::empty({0}, x.options());
  at::Tensor grad_w = at::zeros({pb.Cout * pb.Cin}, x.options().dtype(at::kDouble));
  at::Tensor sums = at::zeros({2 * pb.Cout}, x.options().dtype(at::kDouble));
  if (pb.M > 0 && pb.Cout > 0) {
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      backward_impl<T>(pb, grad_out, x, weight, bn_weight, bn_bias, mean, var, residual, grad_x,
                       grad_res, grad_w, sums);
    });
  } else if (grad_x.numel() > 0) {
    grad_x.zero_();
  }
  at::Tensor grad_weight =
      grad_w.to(weight.scalar_type()).view({pb.Cout, pb.Cin, 1, 1});
  at::Tensor grad_gamma = at::empty_like(bn_weight).copy_(sums.narrow(0, pb.Cout, pb.Cout));
  at::Tensor grad_beta = at::empty_like(bn_bias).copy_(sums.narrow(0, 0, pb.Cout));
  return {in_format(grad_x, output_format(x)), grad_weight, grad_gamma, grad_beta,
          has_res ? in_format(grad_res, output_format(*residual)) : grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(effkernels, CUDA, m) {
  m.impl("pwconv_bn_act", &pwconv_bn_act);
  m.impl("pwconv_bn_act_backward", &pwconv_bn_act_backward);
}

}  // namespace effkernels::cuda
