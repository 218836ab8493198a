// Parameters and launcher of the fused CUDA inverted-residual inference kernel
// (inverted_residual_inference): expand 1x1 + BN + act -> depthwise kxk + BN + act -> [SE gate]
// -> project 1x1 + BN [+ x], every BatchNorm folded from its running statistics (fold_bn). The
// kernel is defined in ir_kernels.cuh and instantiated in ir_fwd_*.cu; the host code
// (inverted_residual.cu) includes this header only.
//
// Tiling. One thread block (256 threads) = one image n x one output tile of NT pixels (TH x TW:
// 8 x 8, 4 x 8 or 4 x 4) x one pass of output channels. The block loops over the hidden channels
// in chunks of CC (32, or 16 / 8 / 4 when shared memory is short):
//   1. expand: hid[P_in][CC] = act(x_tile . We_chunk^T * scale + shift) for the P_in = IH x IW
//      input pixels the depthwise window of the output tile reads (the halo, stride and
//      dilation aware: IH = conv_in_extent(TH, k, s, d)); zero outside the image (the depthwise
//      conv pads its input, the hidden activations, with zeros). x is staged through shared
//      memory KC = 16 input channels at a time, the partial sums accumulated in hid. Without an
//      expand stage (t = 1), hid is x's chunk of channels;
//   2. depthwise: dws[NT][CC] = act(dw(hid) * scale + shift) (* gate[n][c] with SE);
//   3. project: the block's fp32 accumulators (registers: thread (warp w, lane l) owns pixels
//      w + 8i and output channels l + 32j of the pass) += dws . Wp_chunk^T (Wp chunk, BN scale
//      folded in, in shared memory [CC][J*32]).
// After the last chunk: + shift (+ x), cast, store (NHWC, channels coalesced). The hidden tile
// never leaves shared memory. All three products are FFMA in the accumulation type A (fp32 for
// fp32/fp16/bf16, fp64 for fp64): the shared tiles hold A, converted once on load.
//
// Output-channel passes. The accumulators per thread are bounded (kAccRegs A values: 48 fp32 /
// 24 fp64), so a block covers JM * 32 output channels with JM = kAccRegs * 8 / NT; the host
// picks the largest NT whose JM * 32 >= Cout, else NT = 16 with several passes (grid.z), each
// recomputing the hidden tile (only Cout > 768 fp32 / 384 fp64, not in the common models).
//
// Squeeze-excite (two launches of the same kernel + a tiny torch MLP on the host):
//   kIrPool: steps 1-2 only; per tile and hidden channel the sum of the depthwise outputs over
//            the tile's valid pixels, in pixel order -> part[n][tile][c] (no atomics);
//   host:    pooled = sum over tiles (float64, fixed order) / (Ho * Wo); gate = se_gate(We .
//            se_act(Wr . pooled + br) + be) (float64), as A;
//   kIrProject with gate: the hidden tile recomputed, the gate applied to the depthwise output
//            as the projection loads it (step 2), projected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime_api.h>

#include "effkernels/activation.h"

namespace effkernels::cuda {

template <typename T>
using ir_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kIrThreads = 256;
constexpr int kIrKC = 16;  // input channels staged per expand step

// Accumulator registers per thread (A values).
template <typename A>
constexpr int kIrAccRegs = std::is_same_v<A, double> ? 24 : 48;

// Output tile of NT pixels.
template <int NT>
struct IrTile {
  static_assert(NT == 64 || NT == 32 || NT == 16, "tile");
  static constexpr int TH = NT == 64 ? 8 : 4;
  static constexpr int TW = NT / TH;
  static constexpr int kPix = NT / 8;  // pixels per thread in the projection (8 warps)
};

// Output-channel groups of 32 per block pass.
template <typename A, int NT>
constexpr int ir_jmax() {
  return kIrAccRegs<A> * 8 / NT;
}

enum IrMode : int {
  kIrProject = 0,  // the whole block, output stored
  kIrPool = 1,     // SE pass 1: per-tile sums of the depthwise output, nothing else stored
};

template <typename T>
struct IrParams {
  using A = ir_acc_t<T>;
  const T* x;               // (N, Cin, H, W), channels innermost: x[n*sN + h*sH + w*sW + c]
  int64_t sN, sH, sW;
  const T* we;              // expand weight [C][Cin]; nullptr: no expand stage (C == Cin)
  const T* wd;              // depthwise weight [C][K*K]
  const T* wp;              // project weight [Cout][C]
  const A* bn_e[4];         // expand BN (gamma, beta, running mean, running var), A, [C]
  const A* bn_d[4];         // depthwise BN, [C]
  const A* bn_p[4];         // project BN, [Cout]
  A eps;
  const A* gate;            // [N][C] SE gate (kIrProject), or nullptr
  A* part;                  // kIrPool: [N][tiles][C]
  T* out;                   // (N, Cout, Ho, Wo) NHWC dense
  int64_t N, Cin, H, W, C, Cout, Ho, Wo;
  int K, stride, dil, pad;
  int tiles_w, tiles;       // output tiles per image row of tiles / per image
  int IH, IW;               // input (hidden) tile extents
  int CC;                   // hidden channels per chunk (multiple of 4)
  int J;                    // output-channel groups of 32 per pass (<= ir_jmax)
  int mode;
  bool skip;
  Act act;
};

// Dynamic shared memory (bytes) of a launch: the tiles listed in ir_kernels.cuh.
template <typename A>
constexpr size_t ir_smem_bytes(int64_t pin, int64_t nt, int64_t cc, int64_t kk, int64_t jp,
                               bool expand, bool project) {
  const int64_t elems = (expand ? pin * (kIrKC + 1) + kIrKC * (cc + 1) : 0) + pin * (cc + 1) +
                        kk * (cc + 1) + nt * cc + (project ? cc * (jp + 1) : 0);
  return static_cast<size_t>(elems) * sizeof(A);
}

// grid = (tiles, N, passes); smem: ir_smem_bytes. Sets the kernel's dynamic shared-memory limit
// when above the default 48 KB.
template <typename T, int NT>
void launch_ir_forward(const IrParams<T>& p, int64_t passes, size_t smem, cudaStream_t stream);

}  // namespace effkernels::cuda
