// Pass sequences of the CUDA depthwise / mixed depthwise conv + BN + act ops.
//
// Layout: the kernels read x and grad_out through a channels-innermost view (channel stride 1,
// any N/H/W strides: channels_last tensors and their slices are used in place). A plain NCHW
// (contiguous) input costs one channels_last copy on the way in (cpu::channels_innermost, as
// the CPU and Triton backends do) and the NHWC result one copy back to NCHW on the way out
// (in_format); a dedicated NCHW kernel is not worth its build time while the models run
// channels_last.
//
// Forward, eval:      one launch (kOut): conv, BN folded (fold_bn) + act in the epilogue; the
//                     direct kernel where it fits (direct_fits), else the tiled one.
// Forward, training:  (1) kStats: conv, per-tile (mean, M2) partials per channel, nothing
//                     stored; (2) stats_combine: Chan's combination in float64, fixed order;
//                     (3) kOut with the batch statistics. The conv is recomputed in (3) rather
//                     than stored by (1): storing y costs a 4-byte write and read per output,
//                     recomputing reads x again (2 bytes per element in fp16, mostly L2 hits for
//                     the halo), and it keeps one kernel body for both passes.
// Backward:           (1) kBwd: conv recomputed, y stored (acc dtype), per-tile partial sums of
//                     g = grad_out * act'(z) and g * xhat; (2) col_sum (float64, fixed order)
//                     and bn_coeffs; (3) bn_dy: dy = a*g + b*xhat + c in place over y;
//                     (4) grad-input kernel: dx (transposed depthwise conv of dy from a shared
//                     dy halo) and per-tile dweight partials from the same shared x and dy tiles
//                     (x is read from global memory once per tile, never k*k times); (5) col_sum
//                     of the dweight partials in float64. dgamma = sum g*xhat, dbeta = sum g.
#include "dw_host.h"

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../cpu/cpu_common.h"
#include "dw_params.h"
#include "effkernels/conv_geometry.h"

namespace effkernels::cuda {

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t channel_block(at::ScalarType dtype) {
  return dtype == at::kDouble ? Tiling<double>::kCB : Tiling<float>::kCB;
}

namespace {

using cpu::channels_innermost;
using cpu::empty_nhwc;
using cpu::in_format;
using cpu::output_format;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return kF32;
  }
}

// Vectors of `vec` elements at (n, h, w, c) are aligned: base, N/H/W strides and C.
bool vec_ok(const at::Tensor& t, int64_t vec) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  return vec > 1 && addr % (vec * t.element_size()) == 0 && t.size(1) % vec == 0 &&
         t.stride(0) % vec == 0 && t.stride(2) % vec == 0 && t.stride(3) % vec == 0;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Variant {
  int k;  // 3/5/7/9, kStaged or kMixed
  size_t smem;
};

bool unrolled(int k) { return k == 3 || k == 5 || k == 7 || k == 9; }

// Picks the kernel variant and its dynamic shared memory (the formulas mirror the kernels').
template <typename A>
Variant pick_variant(const DwLayer& L, bool forward) {
  using Tl = Tiling<A>;
  const int64_t S = L.g.stride, D = L.g.dil;
  const size_t pix = Tl::kCB * sizeof(A);
  auto halo = [&](int64_t k) -> size_t {
    if (forward) {
      const int64_t tw = S == 1 ? FwdShape<1>::kTW : FwdShape<2>::kTW;
      const int64_t ih = conv_in_extent(Tl::kRows, k, S, D), iw = conv_in_extent(tw, k, S, D);
      return static_cast<size_t>(k * k + ih * (iw | 1)) * pix;
    }
    // transposed_range spans at most (extent - 1 + (k-1)*dil) / stride + 2 outputs.
    const int64_t oh = (Tl::kRows - 1 + (k - 1) * D) / S + 2;
    const int64_t ow = (BwdShape::kTW - 1 + (k - 1) * D) / S + 2;
    return static_cast<size_t>(k * k + oh * (ow | 1) + Tl::kRows * (BwdShape::kTW | 1)) * pix;
  };
  auto staged = [&](int64_t k) -> size_t {
    const int64_t tw = forward ? (S == 1 ? FwdShape<1>::kTW : FwdShape<2>::kTW) : BwdShape::kTW;
    const int64_t tiles = forward ? 1 : 2;
    return static_cast<size_t>(k * k + tiles * Tl::kRows * (tw | 1)) * pix;
  };
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        c10::cuda::current_device()));
  // Less the static shared memory of the kernels (reduction scratch) and a margin.
  const size_t budget = static_cast<size_t>(optin) - 1024;
  const int kmax = static_cast<int>(L.g.K);
  if (std::is_same_v<A, double>) return {kStaged, staged(kmax)};
  if (!L.table.defined()) {
    if (unrolled(kmax) && halo(kmax) <= budget) return {kmax, halo(kmax)};
    return {kStaged, staged(kmax)};
  }
  size_t need = 0;
  for (int k = 1; k <= 11; ++k)
    if (L.has_k[k]) need = std::max(need, unrolled(k) ? halo(k) : staged(k));
  if (need <= budget) return {kMixed, need};
  return {kStaged, staged(kmax)};
}

template <typename A, int S>
void run_fwd(int variant, const DwFwdParams<A>& p, int64_t tiles, int64_t cblocks, size_t smem,
             cudaStream_t stream) {
  if constexpr (std::is_same_v<A, double>) {
    launch_dw_fwd<double, kStaged, S>(p, tiles, cblocks, smem, stream);
  } else {
    switch (variant) {
      case 3: launch_dw_fwd<float, 3, S>(p, tiles, cblocks, smem, stream); break;
      case 5: launch_dw_fwd<float, 5, S>(p, tiles, cblocks, smem, stream); break;
      case 7: launch_dw_fwd<float, 7, S>(p, tiles, cblocks, smem, stream); break;
      case 9: launch_dw_fwd<float, 9, S>(p, tiles, cblocks, smem, stream); break;
      case kMixed: launch_dw_fwd<float, kMixed, S>(p, tiles, cblocks, smem, stream); break;
      default: launch_dw_fwd<float, kStaged, S>(p, tiles, cblocks, smem, stream); break;
    }
  }
}

template <typename A, int S>
void run_bwd_input(int variant, const DwBwdInputParams<A>& p, int64_t tiles, int64_t cblocks,
                   size_t smem, cudaStream_t stream) {
  if constexpr (std::is_same_v<A, double>) {
    launch_dw_bwd_input<double, kStaged, S>(p, tiles, cblocks, smem, stream);
  } else {
    switch (variant) {
      case 3: launch_dw_bwd_input<float, 3, S>(p, tiles, cblocks, smem, stream); break;
      case 5: launch_dw_bwd_input<float, 5, S>(p, tiles, cblocks, smem, stream); break;
      case 7: launch_dw_bwd_input<float, 7, S>(p, tiles, cblocks, smem, stream); break;
      case 9: launch_dw_bwd_input<float, 9, S>(p, tiles, cblocks, smem, stream); break;
      case kMixed: launch_dw_bwd_input<float, kMixed, S>(p, tiles, cblocks, smem, stream); break;
      default: launch_dw_bwd_input<float, kStaged, S>(p, tiles, cblocks, smem, stream); break;
    }
  }
}

// The forward-kernel parameters shared by the forward passes and backward pass 1.
template <typename A>
DwFwdParams<A> fwd_params(const at::Tensor& xc, const at::Tensor& wpack, const DwLayer& L,
                          const at::Tensor& gamma, const at::Tensor& beta, Act act, double eps) {
  const DwGeometry& g = L.g;
  DwFwdParams<A> p{};
  p.x = xc.data_ptr();
  p.x_sn = xc.stride(0);
  p.x_sh = xc.stride(2);
  p.x_sw = xc.stride(3);
  p.dtype = dtype_code(xc.scalar_type());
  p.x_vec = vec_ok(xc, 16 / xc.element_size());
  p.N = g.N;
  p.C = g.C;
  p.H = g.H;
  p.W = g.W;
  p.Ho = g.Ho;
  p.Wo = g.Wo;
  p.pad = g.pad;
  p.dil = g.dil;
  p.k = static_cast<int>(g.K);
  p.w = wpack.data_ptr<A>();
  p.table = L.table.defined() ? L.table.data_ptr<int64_t>() : nullptr;
  p.gamma = gamma.data_ptr<A>();
  p.beta = beta.data_ptr<A>();
  p.eps = static_cast<A>(eps);
  p.act = act;
  p.tiles_h = cdiv(g.Ho, Tiling<A>::kRows);
  p.tiles_w = cdiv(g.Wo, g.stride == 1 ? FwdShape<1>::kTW : FwdShape<2>::kTW);
  return p;
}

// The direct kernel (dw_direct.cuh) serves the kOut passes of uniform k = 3/5/7/9 on 16-bit and
// fp32 inputs with 16-byte channel vectors; EFFK_DW_DIRECT=0 (read per call) keeps them on the
// tiled kernel, for A/B timing (bench.gpu_targets).
template <typename A>
bool direct_fits(const DwFwdParams<A>& p, const DwLayer& L) {
  if constexpr (std::is_same_v<A, double>) {
    return false;
  } else {
    const char* env = std::getenv("EFFK_DW_DIRECT");
    return p.mode == kOut && p.x_vec && !L.table.defined() && unrolled(p.k) &&
           p.N <= 65535 && cdiv(p.Ho, kDirectRows) <= 65535 && !(env && env[0] == '0');
  }
}

template <int K, int S>
void run_fwd_direct(const DwFwdParams<float>& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kF16: launch_dw_fwd_direct<__half, K, S>(p, stream); break;
    case kBF16: launch_dw_fwd_direct<__nv_bfloat16, K, S>(p, stream); break;
    default: launch_dw_fwd_direct<float, K, S>(p, stream); break;
  }
}

template <int S>
void run_fwd_direct(const DwFwdParams<float>& p, cudaStream_t stream) {
  switch (p.k) {
    case 3: run_fwd_direct<3, S>(p, stream); break;
    case 5: run_fwd_direct<5, S>(p, stream); break;
    case 7: run_fwd_direct<7, S>(p, stream); break;
    default: run_fwd_direct<9, S>(p, stream); break;
  }
}

template <typename A>
void launch_fwd_pass(const DwFwdParams<A>& p, const DwLayer& L, cudaStream_t stream) {
  if constexpr (!std::is_same_v<A, double>) {
    if (direct_fits(p, L)) {
      if (L.g.stride == 1) {
        run_fwd_direct<1>(p, stream);
      } else {
        run_fwd_direct<2>(p, stream);
      }
      return;
    }
  }
  const Variant v = pick_variant<A>(L, /*forward=*/true);
  const int64_t tiles = p.N * p.tiles_h * p.tiles_w;
  if (L.g.stride == 1) {
    run_fwd<A, 1>(v.k, p, tiles, L.cblocks, v.smem, stream);
  } else {
    run_fwd<A, 2>(v.k, p, tiles, L.cblocks, v.smem, stream);
  }
}

template <typename A>
void forward_impl(const at::Tensor& xc, const at::Tensor& wpack, const DwLayer& L,
                  const at::Tensor& bn_weight, const at::Tensor& bn_bias, Act act,
                  bool training, double eps, at::Tensor& mean, at::Tensor& var,
                  at::Tensor& out) {
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor gamma = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
  DwFwdParams<A> p = fwd_params<A>(xc, wpack, L, gamma, beta, act, eps);
  if (training) {
    const int64_t tiles = p.N * p.tiles_h * p.tiles_w;
    at::Tensor part = at::empty({tiles, 2, p.C}, xc.options().dtype(acc));
    at::Tensor counts = at::empty({tiles}, xc.options().dtype(acc));
    p.mode = kStats;
    p.part = part.data_ptr<A>();
    p.counts = counts.data_ptr<A>();
    launch_fwd_pass<A>(p, L, stream);
    launch_stats_combine<A>(p.part, p.counts, tiles, p.C, mean.data_ptr<A>(), var.data_ptr<A>(),
                            stream);
  }
  p.mode = kOut;
  p.mean = mean.data_ptr<A>();
  p.var = var.data_ptr<A>();
  p.out = out.data_ptr();
  p.out_vec = p.C % Tiling<A>::kVec == 0;
  launch_fwd_pass<A>(p, L, stream);
}

template <typename A>
void backward_impl(const at::Tensor& goc, const at::Tensor& xc, const at::Tensor& wpack,
                   const DwLayer& L, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                   const at::Tensor& mean, const at::Tensor& var, Act act, bool training,
                   double eps, at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& sums) {
  using Tl = Tiling<A>;
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const DwGeometry& g = L.g;
  const at::Tensor gamma = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
  const at::Tensor mean_a = mean.to(acc).contiguous(), var_a = var.to(acc).contiguous();
  const auto opts = xc.options().dtype(acc);

  // (1) y = conv(x), sums of g and g * xhat.
  DwFwdParams<A> p = fwd_params<A>(xc, wpack, L, gamma, beta, act, eps);
  const int64_t tiles = p.N * p.tiles_h * p.tiles_w;
  at::Tensor y = at::empty({g.N * g.Ho * g.Wo * g.C}, opts);
  at::Tensor part = at::empty({tiles, 2, g.C}, opts);
  p.mode = kBwd;
  p.mean = mean_a.data_ptr<A>();
  p.var = var_a.data_ptr<A>();
  p.y = y.data_ptr<A>();
  p.go = goc.data_ptr();
  p.go_sn = goc.stride(0);
  p.go_sh = goc.stride(2);
  p.go_sw = goc.stride(3);
  p.go_vec = vec_ok(goc, Tl::kVec);
  p.part = part.data_ptr<A>();
  launch_fwd_pass<A>(p, L, stream);

  // (2) the per-channel sums, the BN backward coefficients.
  launch_col_sum<A>(p.part, tiles, 2 * g.C, sums.data_ptr<double>(), stream);
  at::Tensor coef = at::empty({3 * g.C}, opts);
  launch_bn_coeffs<A>(sums.data_ptr<double>(), p.gamma, p.var, p.eps,
                      static_cast<double>(g.N * g.Ho * g.Wo), training, g.C, coef.data_ptr<A>(),
                      stream);

  // (3) y -> dy in place.
  BnDyParams<A> d{};
  d.y = p.y;
  d.go = p.go;
  d.go_sn = p.go_sn;
  d.go_sh = p.go_sh;
  d.go_sw = p.go_sw;
  d.dtype = p.dtype;
  d.N = g.N;
  d.Ho = g.Ho;
  d.Wo = g.Wo;
  d.C = g.C;
  d.gamma = p.gamma;
  d.beta = p.beta;
  d.mean = p.mean;
  d.var = p.var;
  d.coef = coef.data_ptr<A>();
  d.eps = p.eps;
  d.act = act;
  launch_bn_dy<A>(d, stream);

  // (4) grad_x and the dweight partials.
  DwBwdInputParams<A> q{};
  q.x = p.x;
  q.x_sn = p.x_sn;
  q.x_sh = p.x_sh;
  q.x_sw = p.x_sw;
  q.dtype = p.dtype;
  q.x_vec = p.x_vec;
  q.N = g.N;
  q.C = g.C;
  q.H = g.H;
  q.W = g.W;
  q.Ho = g.Ho;
  q.Wo = g.Wo;
  q.pad = g.pad;
  q.dil = g.dil;
  q.k = p.k;
  q.w = p.w;
  q.table = p.table;
  q.dy = p.y;
  q.dy_vec = g.C % Tl::kVec == 0;
  q.dx = grad_x.data_ptr();
  q.dx_vec = g.C % Tl::kVec == 0;
  q.P = L.P;
  q.tiles_h = cdiv(g.H, Tl::kRows);
  q.tiles_w = cdiv(g.W, BwdShape::kTW);
  const int64_t tiles2 = g.N * q.tiles_h * q.tiles_w;
  at::Tensor dw_part = at::empty({tiles2, L.P}, opts);
  q.dw_part = dw_part.data_ptr<A>();
  const Variant v = pick_variant<A>(L, /*forward=*/false);
  if (g.stride == 1) {
    run_bwd_input<A, 1>(v.k, q, tiles2, L.cblocks, v.smem, stream);
  } else {
    run_bwd_input<A, 2>(v.k, q, tiles2, L.cblocks, v.smem, stream);
  }
  // (5) dweight.
  launch_col_sum<A>(q.dw_part, tiles2, L.P, grad_w.data_ptr<double>(), stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_forward(
    const at::Tensor& x, const at::Tensor& wpack, const DwLayer& layer, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, Act act, bool training, double eps) {
  const DwGeometry& g = layer.g;
  const c10::cuda::CUDAGuard guard(x.device());
  auto [mean, var] = cpu::initial_stats(x, g.C, running_mean, running_var, training);
  at::Tensor out = empty_nhwc({g.N, g.C, g.Ho, g.Wo}, x.options());
  if (x.numel() > 0 && out.numel() > 0) {
    const at::Tensor xc = channels_innermost(x);
    if (x.scalar_type() == at::kDouble) {
      forward_impl<double>(xc, wpack, layer, bn_weight, bn_bias, act, training, eps, mean, var,
                           out);
    } else {
      forward_impl<float>(xc, wpack, layer, bn_weight, bn_bias, act, training, eps, mean, var,
                          out);
    }
  }
  return {in_format(out, output_format(x)), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wpack,
    const DwLayer& layer, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& var, Act act, bool training, double eps) {
  const DwGeometry& g = layer.g;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = empty_nhwc(x.sizes(), x.options());
  at::Tensor grad_w = at::zeros({layer.P}, x.options().dtype(at::kDouble));
  at::Tensor sums = at::zeros({2 * g.C}, x.options().dtype(at::kDouble));
  if (x.numel() > 0 && grad_out.numel() > 0) {
    const at::Tensor xc = channels_innermost(x);
    const at::Tensor goc = channels_innermost(grad_out);
    if (x.scalar_type() == at::kDouble) {
      backward_impl<double>(goc, xc, wpack, layer, bn_weight, bn_bias, mean, var, act, training,
                            eps, grad_x, grad_w, sums);
    } else {
      backward_impl<float>(goc, xc, wpack, layer, bn_weight, bn_bias, mean, var, act, training,
                           eps, grad_x, grad_w, sums);
    }
  } else if (grad_x.numel() > 0) {
    grad_x.zero_();
  }
  at::Tensor grad_gamma = at::empty_like(bn_weight).copy_(sums.narrow(0, g.C, g.C));
  at::Tensor grad_beta = at::empty_like(bn_bias).copy_(sums.narrow(0, 0, g.C));
  return {in_format(grad_x, output_format(x)), grad_w, grad_gamma, grad_beta};
}

}  // namespace effkernels::cuda
