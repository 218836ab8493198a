// Parameters and launchers of the CUDA pointwise (1x1) conv + BN + act kernels (pwconv_bn_act).
// The kernels are defined in pw_kernels.cuh and instantiated explicitly in pw_gemm_*.cu (one
// storage dtype per file, so that the build compiles them in parallel); the host code
// (pwconv_bn_act.cu) includes this header only.
//
// One GEMM kernel serves the three products of the op, C[i][j] = sum_k A(i, k) * B(j, k):
//   forward      C[M][Cout] = x[M][Cin] . W[Cout][Cin]^T      A = x rows,  B = W rows
//   grad_input   C[M][Cin]  = dy[M][Cout] . W[Cout][Cin]       A = dy rows, B = W^T (columns)
//   grad_weight  C[Cout][Cin] = dy^T . x over pixel chunks     A = dy^T,    B = x^T
// Each operand is a matrix whose inner (unit-stride) index is either k or i/j and whose outer
// index addresses rows through PwRows (dense rows, or pixels of a channels-innermost tensor with
// any N/H/W strides). The block's epilogue (a run-time, block-uniform mode) reads the fp32/fp64
// result tile from shared memory.
//
// Tiles (PwTile<T>): 256 threads; fp16/bf16: 128 x 64 x 32 (tensor cores: nvcuda::wmma
// 16x16x16, fp32 accumulators, 8 warps of 32 x 32); fp32: 128 x 64 x 16 (FFMA, 8 x 4 results
// per thread); fp64: 64 x 64 x 16 (FFMA, 4 x 4 per thread). The operands are never converted:
// both are T in shared memory (grad_weight/grad_input read dy rounded to T, as PyTorch's own
// low-precision backward does).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "effkernels/activation.h"
#include "effkernels/conv_geometry.h"
#include "effkernels/macros.h"

namespace effkernels::cuda {

// fp32 accumulation for fp32/fp16/bf16, fp64 for fp64.
template <typename T>
using pw_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct PwTile {  // fp16 / bf16: tensor cores
  static constexpr int BM = 128, BN = 64, BK = 32;
  static constexpr bool kTensorCores = true;
};
template <>
struct PwTile<float> {
  static constexpr int BM = 128, BN = 64, BK = 16;
  static constexpr bool kTensorCores = false;
};
template <>
struct PwTile<double> {
  static constexpr int BM = 64, BN = 64, BK = 16;
  static constexpr bool kTensorCores = false;
};

constexpr int kPwThreads = 256;

// Rows of an operand: effkernels::PixelRows (conv_geometry.h, shared with the CPU GEMM).
using PwRows = PixelRows;

// A GEMM operand X(i, k) (i < rows of C for A, columns of C for B): element
// p[rows.off(outer) + inner] with (outer, inner) = (i, k) if k_inner, else (k, i).
// vec: 16-byte vector loads along the inner index are safe (aligned base and row offsets, inner
// extent a multiple of the vector).
struct PwOperand {
  const void* p = nullptr;
  PwRows rows;
  bool k_inner = true;
  bool vec = false;
};

// What the GEMM block does with its result tile (block-uniform run-time switch: the tile is in
// shared memory by then, so the modes share one main loop and cost no registers there).
enum PwMode : int {
  kPwOut = 0,    // out[i][j] = act(c * scale_j + shift_j (+ residual)), T; BN folded from
                 // (gamma, beta, mean, var); gamma == nullptr: a plain store of c (grad_input)
  kPwStats = 1,  // per-tile (mean, M2) of each column over the tile's rows (training stats)
  kPwBwd = 2,    // y = c stored (acc), g = grad_out * act'(z), grad_residual = g, per-tile sums of
                 // g and g * xhat
  kPwAcc = 3,    // out[z][i][j] = c (acc type): a grad_weight partial of pixel chunk z
};

template <typename T>
struct PwGemmParams {
  using A = pw_acc_t<T>;
  PwOperand a, b;
  int64_t M, N, K;  // C is M x N, the reduction runs over K
  int64_t kchunk;   // blockIdx.z covers k in [z * kchunk, min(K, (z + 1) * kchunk))
  int mode;
  Act act;
  A eps;
  const A *gamma, *beta, *mean, *var;  // per column j (kPwOut, kPwBwd)
  const T* res;                        // residual (N, Cout, H, W) by pixel rows; nullptr: none
  PwRows res_rows;
  void* out;  // kPwOut: T [M][ldo]; kPwAcc: A [z][M][ldo] (out_zstride elements per z)
  int64_t ldo, out_zstride;
  // kPwOut: 16-byte vectors of T along the columns of out (and of res, when there is one) are
  // aligned and never cross column N (the host's vec_columns): the epilogue stores vectors.
  bool out_vec;
  const T* go;  // kPwBwd: grad_out by pixel rows
  PwRows go_rows;
  A* y;         // kPwBwd: [M][N]
  T* grad_res;  // kPwBwd: [M][N] when res
  A* part;      // kPwStats: [tiles_m][2][N] (mean, M2); kPwBwd: [tiles_m][2][N] (g, g * xhat)
  A* counts;    // kPwStats: [tiles_m] rows per tile
};

// dy = a*g + b*xhat + c (bn_dy), recomputing g and xhat from y, grad_out and the residual;
// written as T (the grad GEMMs' operand). dy may alias y when T == A.
template <typename T>
struct PwDyParams {
  using A = pw_acc_t<T>;
  const A* y;
  T* dy;
  const T* go;
  PwRows go_rows;
  const T* res;
  PwRows res_rows;
  int64_t M, C;
  const A *gamma, *beta, *mean, *var, *coef;  // coef: [3][C] = a, b, c
  A eps;
  Act act;
};

// grid = (ceil(M / BM), ceil(N / BN), zsplit).
template <typename T>
void launch_pw_gemm(const PwGemmParams<T>& p, int64_t zsplit, cudaStream_t stream);
template <typename T>
void launch_pw_dy(const PwDyParams<T>& p, cudaStream_t stream);

}  // namespace effkernels::cuda
