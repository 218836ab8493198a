// The fused CUDA inverted-residual block for inference (effkernels::inverted_residual_inference):
//   expand 1x1 + BN + act -> depthwise kxk + BN + act -> [SE] -> project 1x1 + BN [+ x]
// with every BatchNorm folded from its running statistics, as the CPU op
// (csrc/cpu/inverted_residual.cpp) does, with the same argument checks (op_checks.cpp) and
// results (outputs in x's memory format; fp32 accumulation and fp32 hidden activations for
// fp16/bf16, fp64 for fp64). The expanded (hidden) activations never exist in global memory:
// one kernel (ir_kernels.cuh, tiling in ir_params.h) holds a tile of them in shared memory, chunk
// by chunk of hidden channels, and accumulates the projection in registers.
//
// Squeeze-excite: the gate needs the mean of the whole depthwise output of an image before any
// output pixel can be projected, so an SE block is two launches of the same kernel: kIrPool
// (expand + depthwise, per-tile channel sums only; nothing else is written), then the tiny SE
// MLP in float64 with ATen ops on the [N][C] pooled means (sum over the tiles in a fixed order:
// deterministic), then kIrProject with the gate (the hidden tile recomputed, the gate applied to
// the depthwise output the projection reads). Recomputing costs the expand and depthwise work
// twice; storing the depthwise output instead would write and read N*Ho*Wo*C values, the very
// tensor this kernel exists not to write.
//
// Training and autograd stay with the composite effkernels::inverted_residual
// (csrc/inverted_residual.cpp) over the CUDA dwconv/pwconv kernels; effkernels.ops routes only
// eval-mode calls that need no gradient here.
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../cpu/cpu_common.h"
#include "cuda_dispatch.h"
#include "effkernels/aten_activation.h"
#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"
#include "effkernels/op_checks.h"
#include "ir_params.h"

namespace effkernels::cuda {
namespace {

constexpr const char* kOp = "inverted_residual_inference";

using cpu::acc_vector;
using cpu::channels_innermost;
using cpu::empty_nhwc;
using cpu::in_format;
using cpu::output_format;
using cpu::stat_dtype;

// f(integral_constant<int, NT>) for the tile sizes the kernel is instantiated for.
template <typename F>
void dispatch_nt(int nt, F&& f) {
  switch (nt) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, 16>{}); break;
  }
}

template <typename T>
void forward_impl(const IrProblem& g, const at::Tensor& x, at::TensorList expand,
                  at::TensorList depthwise, at::TensorList se, at::TensorList project,
                  double eps, at::Tensor& out) {
  using A = ir_acc_t<T>;
  const at::ScalarType acc = stat_dtype(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor xc = channels_innermost(x);
  const int64_t KK = g.K * g.K;
  std::vector<at::Tensor> keep;  // the dense / acc-dtype copies the kernel reads

  IrParams<T> p{};
  p.x = static_cast<const T*>(xc.const_data_ptr());
  p.sN = xc.stride(0);
  p.sH = xc.stride(2);
  p.sW = xc.stride(3);
  auto bn = [&](at::TensorList stage, const A* (&dst)[4]) {
    for (int i = 0; i < 4; ++i) {
      keep.push_back(acc_vector(stage[i + 1], acc));
      dst[i] = keep.back().const_data_ptr<A>();
    }
  };
  if (g.has_expand) {
    keep.push_back(expand[0].reshape({g.C, g.Cin}).contiguous());
    p.we = static_cast<const T*>(keep.back().const_data_ptr());
    bn(expand, p.bn_e);
  }
  keep.push_back(depthwise[0].reshape({g.C, KK}).contiguous());
  p.wd = static_cast<const T*>(keep.back().const_data_ptr());
  bn(depthwise, p.bn_d);
  keep.push_back(project[0].reshape({g.Cout, g.C}).contiguous());
  p.wp = static_cast<const T*>(keep.back().const_data_ptr());
  bn(project, p.bn_p);
  p.eps = static_cast<A>(eps);
  p.out = static_cast<T*>(out.data_ptr());
  p.N = g.N;
  p.Cin = g.Cin;
  p.H = g.H;
  p.W = g.W;
  p.C = g.C;
  p.Cout = g.Cout;
  p.Ho = g.Ho;
  p.Wo = g.Wo;
  p.K = static_cast<int>(g.K);
  p.stride = static_cast<int>(g.stride);
  p.dil = static_cast<int>(g.dil);
  p.pad = static_cast<int>(g.pad);
  p.skip = g.skip;
  p.act = g.act;

  // Tile: the most pixels whose accumulators cover Cout in one pass (ir_params.h).
  constexpr int j64 = ir_jmax<A, 64>(), j32 = ir_jmax<A, 32>(), j16 = ir_jmax<A, 16>();
  const int nt = g.Cout <= j64 * 32 ? 64 : g.Cout <= j32 * 32 ? 32 : 16;
  const int jm = nt == 64 ? j64 : nt == 32 ? j32 : j16;
  p.J = static_cast<int>(std::min<int64_t>(jm, cdiv(g.Cout, 32)));
  const int64_t passes = cdiv(g.Cout, int64_t(p.J) * 32);

  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        c10::cuda::current_device()));
  dispatch_nt(nt, [&](auto ntc) {
    constexpr int NT = decltype(ntc)::value;
    using Tl = IrTile<NT>;
    const int64_t tiles_w = cdiv(g.Wo, Tl::TW), tiles = tiles_w * cdiv(g.Ho, Tl::TH);
    const int64_t ih = conv_in_extent(Tl::TH, g.K, g.stride, g.dil);
    const int64_t iw = conv_in_extent(Tl::TW, g.K, g.stride, g.dil);
    TORCH_CHECK(tiles <= INT32_MAX && ih * iw <= INT32_MAX / 64, kOp,
                ": the CUDA kernel's grid or tile is too large (", tiles, " tiles of ", ih, "x",
                iw, " input pixels)");
    p.tiles_w = static_cast<int>(tiles_w);
    p.tiles = static_cast<int>(tiles);
    p.IH = static_cast<int>(ih);
    p.IW = static_cast<int>(iw);
    // Hidden channels per chunk: 32, halved while the tiles do not fit in shared memory.
    int cc = 32;
    auto bytes = [&](int c, bool proj) {
      return ir_smem_bytes<A>(ih * iw, NT, c, KK, int64_t(p.J) * 32, g.has_expand, proj);
    };
    while (cc > 4 && bytes(cc, true) > static_cast<size_t>(smem_limit)) cc /= 2;
    TORCH_CHECK(bytes(cc, true) <= static_cast<size_t>(smem_limit), kOp,
                ": the CUDA kernel's tile (k=", g.K, ", stride=", g.stride, ", dilation=", g.dil,
                ": ", ih, "x", iw, " input pixels) needs ", bytes(cc, true),
                " bytes of shared memory; the device allows ", smem_limit);
    p.CC = cc;
    at::Tensor gate;
    if (g.has_se) {
      // Pass 1: per-tile sums of the depthwise output; the gate from their means (float64).
      at::Tensor part = at::empty({g.N, tiles, g.C}, x.options().dtype(acc));
      p.mode = kIrPool;
      p.part = part.data_ptr<A>();
      launch_ir_forward<T, NT>(p, 1, bytes(cc, false), stream);
      const at::Tensor pooled =
          part.to(at::kDouble).sum(1).div_(static_cast<double>(g.Ho * g.Wo));  // [N][C]
      const int64_t cr = se[0].size(0);
      const at::Tensor rw = se[0].reshape({cr, g.C}).to(at::kDouble);
      const at::Tensor ew = se[2].reshape({g.C, cr}).to(at::kDouble);
      // The SE MLP in float64 (its activations as the reference computes them).
      const at::Tensor s =
          aten_activation(at::addmm(se[1].to(at::kDouble), pooled, rw.t()), g.se_act);  // [N][Cr]
      gate = aten_activation(at::addmm(se[3].to(at::kDouble), s, ew.t()), g.se_gate)
                 .to(acc)
                 .contiguous();  // [N][C]
      p.gate = gate.const_data_ptr<A>();
      p.part = nullptr;
    }
    p.mode = kIrProject;
    launch_ir_forward<T, NT>(p, passes, bytes(cc, true), stream);
  });
}

at::Tensor inverted_residual_inference(const at::Tensor& x, at::TensorList expand,
                                       at::TensorList depthwise, at::TensorList se,
                                       at::TensorList project, int64_t stride, int64_t dilation,
                                       c10::string_view act, c10::string_view se_act,
                                       c10::string_view se_gate, bool skip, double eps) {
  const IrProblem g = check_inverted_residual_inference(
      kOp, x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate, skip, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_nhwc({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return in_format(out, output_format(x));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    forward_impl<T>(g, x, expand, depthwise, se, project, eps, out);
  });
  return in_format(out, output_format(x));
}

}  // namespace

TORCH_LIBRARY_IMPL(effkernels, CUDA, m) {
  m.impl("inverted_residual_inference", &inverted_residual_inference);
}

}  // namespace effkernels::cuda
