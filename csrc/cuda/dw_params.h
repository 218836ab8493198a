// Parameters and launchers of the CUDA depthwise conv + BN + act kernels (dwconv_bn_act and
// mixconv_bn_act share them: a depthwise conv is a mixconv with one group). The kernels are
// defined in dw_kernels.cuh and instantiated explicitly in dw_fwd_*.cu / dw_bwd_*.cu; the host
// code (dw_host.cu) includes this header only.
//
// Tiling. NHWC, one thread block = one image n x a spatial tile x one channel block of kCB
// channels (kLanes lanes of kVec channels in the accumulation type: 16 fp32 or 8 fp64 channels,
// 64 bytes per pixel). 128 threads = 4 channel lanes x 32 pixel threads; a pixel thread owns
// kPX pixels of one row. Forward tiles are output tiles (8 x 16 at stride 1, 8 x 8 at stride 2);
// the grad-input kernel's tiles are input tiles (8 x 16).
//
// Kernel-size variants (template parameter K): 3, 5, 7, 9 fully unrolled over a shared-memory
// tile of the input plus its halo; kStaged, any k in 1..11 and any dilation (the taps at run
// time, the input staged tap by tap through a small shared tile, so the shared memory does not
// grow with the dilation); kMixed, mixconv with several kernel sizes in one launch: each channel
// block reads its k from the block table and branches (block-uniformly) to the unrolled body of
// that k, or to the staged one.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "effkernels/activation.h"

namespace effkernels::cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

constexpr int kStaged = -1;
constexpr int kMixed = -2;

// What the forward conv kernel does with conv(x) in its epilogue (a run-time, block-uniform
// switch: the three share the conv body, and making the mode a template parameter would triple
// the instantiations and the build time for no measurable gain).
enum Mode : int {
  kOut = 0,    // out = act(y * scale + shift), BN folded from (gamma, beta, mean, var)
  kStats = 1,  // per-tile (mean, M2) partials of y per channel (training statistics, pass 1)
  kBwd = 2,    // y stored (acc type), per-tile partial sums of g and g * xhat (backward pass 1)
};

template <typename A>
struct Tiling {
  static constexpr int kLanes = 4;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(A));  // channels per lane
  static constexpr int kCB = kLanes * kVec;                         // channels per block
  static constexpr int kThreads = 128;
  static constexpr int kPixelThreads = kThreads / kLanes;  // 32
  static constexpr int kRows = 8;                          // tile rows (one per pixel thread row)
  static constexpr int kColThreads = kPixelThreads / kRows;  // 4
};

// Forward (output-space) tile width: kColThreads x kPX pixels.
template <int S>
struct FwdShape {
  static constexpr int kPX = S == 1 ? 4 : 2;
  static constexpr int kTW = 4 * kPX;
};

// Grad-input (input-space) tile: 8 x 16, 4 pixels per thread (at stride 2 a thread's pixels
// are one column parity class, so every tap maps them onto consecutive dy columns).
struct BwdShape {
  static constexpr int kPX = 4;
  static constexpr int kTW = 16;
};

// The channel-block table (mixconv): per block cb, {k, pad, woff}: its kernel size (the largest
// of the groups it overlaps; smaller kernels are centred in the k x k window with zero taps), its
// padding dil * (k - 1) / 2, and the offset of its packed weights [k*k][kCB]. nullptr: every
// block has kernel size `k`, padding `pad` and woff = cb * k * k * kCB.
template <typename A>
struct DwFwdParams {
  const void* x;  // x(n, c, h, w) = x[n*x_sn + h*x_sh + w*x_sw + c], dtype `dtype`
  int64_t x_sn, x_sh, x_sw;
  int dtype;
  bool x_vec;  // 16-byte aligned channel vectors: aligned base, strides and C
  int64_t N, C, H, W, Ho, Wo;
  int64_t pad, dil;
  int k;
  const A* w;  // packed weights
  const int64_t* table;
  const A *gamma, *beta, *mean, *var;  // [C], acc type
  A eps;
  int mode;
  Act act;
  void* out;  // kOut: NHWC contiguous (N, Ho, Wo, C), dtype `dtype`
  bool out_vec;
  A* y;  // kBwd: NHWC contiguous (N, Ho, Wo, C), acc type
  const void* go;  // kBwd: grad_out, same indexing as x with its own strides
  int64_t go_sn, go_sh, go_sw;
  bool go_vec;
  A* part;    // kStats: [tiles][2][C] (mean, M2); kBwd: [tiles][2][C] (sum g, sum g*xhat)
  A* counts;  // kStats: [tiles] valid pixels per tile
  int64_t tiles_h, tiles_w;
};

template <typename A>
struct DwBwdInputParams {
  const void* x;
  int64_t x_sn, x_sh, x_sw;
  int dtype;
  bool x_vec;
  int64_t N, C, H, W, Ho, Wo;
  int64_t pad, dil;
  int k;
  const A* w;
  const int64_t* table;
  const A* dy;  // NHWC contiguous (N, Ho, Wo, C), acc type
  bool dy_vec;  // C % kVec == 0
  void* dx;     // NHWC contiguous (N, C, H, W), dtype `dtype`
  bool dx_vec;
  A* dw_part;  // [tiles][P]: per-tile dweight partials in the packed layout
  int64_t P;
  int64_t tiles_h, tiles_w;
};

// dy = a*g + b*xhat + c in place over y (elementwise; g = go * act'(gamma*xhat + beta)).
template <typename A>
struct BnDyParams {
  A* y;
  const void* go;
  int64_t go_sn, go_sh, go_sw;
  int dtype;
  int64_t N, Ho, Wo, C;
  const A *gamma, *beta, *mean, *var, *coef;  // coef: [3][C] = a, b, c
  A eps;
  Act act;
};

// The direct forward kernel (dw_direct.cuh): one thread = one 16-byte vector of channels of T
// (kDirectVec<T>) x kDirectRows output rows of one column; no shared memory.
template <typename T>
constexpr int kDirectVec = 16 / static_cast<int>(sizeof(T));
constexpr int kDirectRows = 4;
constexpr int kDirectThreads = 256;
// Resident blocks per SM its register allocation must allow: the most without spills (sm_80,
// sm_90; fp16/bf16 hold 8 channels x 4 rows of fp32 sums): 3 (<= 85 registers) for k <= 5,
// 2 for k = 7, 9.
template <int K>
constexpr int direct_min_blocks() {
  return K <= 5 ? 3 : 2;
}

// grid = (spatial tiles, channel blocks); smem = dynamic shared memory bytes.
template <typename A, int K, int S>
void launch_dw_fwd(const DwFwdParams<A>& p, int64_t tiles, int64_t cblocks, size_t smem,
                   cudaStream_t stream);
// The direct kernel, kOut only: T the storage dtype (fp32, fp16, bf16), K in 3/5/7/9, uniform.
template <typename T, int K, int S>
void launch_dw_fwd_direct(const DwFwdParams<float>& p, cudaStream_t stream);
template <typename A, int K, int S>
void launch_dw_bwd_input(const DwBwdInputParams<A>& p, int64_t tiles, int64_t cblocks,
                         size_t smem, cudaStream_t stream);

// Second stages (dw_reduce.cu), all in a fixed order (bitwise reproducible):
// out[j] = sum_i part[i * cols + j] in double.
template <typename A>
void launch_col_sum(const A* part, int64_t rows, int64_t cols, double* out, cudaStream_t stream);
// Chan's parallel combination (double) of per-tile (mean, M2, count) -> mean, biased var.
template <typename A>
void launch_stats_combine(const A* part, const A* counts, int64_t rows, int64_t C, A* mean,
                          A* var, cudaStream_t stream);
// sums = [sum g][sum g*xhat] (double, [2][C]) -> coef [3][C] (bn_backward_coeffs).
template <typename A>
void launch_bn_coeffs(const double* sums, const A* gamma, const A* var, A eps, double count,
                      bool training, int64_t C, A* coef, cudaStream_t stream);
template <typename A>
void launch_bn_dy(const BnDyParams<A>& p, cudaStream_t stream);

}  // namespace effkernels::cuda
