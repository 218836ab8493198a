// The direct depthwise forward kernel (dwconv_bn_act, eval epilogue only): no shared memory, one
// thread = one 16-byte vector of channels (8 fp16/bf16 or 4 fp32 channels) x kDirectRows output
// rows of one output column. Included only by dw_fwd_direct_s*.cu.
//
// Why a second forward kernel. The tiled kernel (dw_kernels.cuh) stages a 16-channel x tile in
// shared memory as fp32; in fp16 every pixel of the tile is 32 bytes of a 288-byte (C=144) pixel,
// so its loads and stores use a quarter of each 128-byte line, and it ran at 31% of the copy
// bandwidth on an H200 (bench/NOTES.md). Here consecutive threads own consecutive 16-byte
// vectors of the same output row (channels, then columns: NHWC is exactly that order), so every
// warp reads and writes 512 contiguous bytes per tap; the k*k taps' overlapping reads of
// neighbouring columns and rows are L1/L2 hits. The weights (fp32, packed [C/16][k*k][16]) are
// L1-resident and read per tap.
//
// Served: uniform kernel size 3, 5, 7 or 9, any dilation, stride 1 or 2, fp32/fp16/bf16 with
// 16-byte vectors of x (aligned base, strides and C), the kOut pass (eval forward and the
// training forward's last pass). Everything else stays on the tiled kernels (dw_host.cu).
#pragma once

#include "dw_kernels.cuh"

namespace effkernels::cuda {

// grid = (ceil(Wo * C / V / kDirectThreads), ceil(Ho / kDirectRows), N).
template <typename T, int K, int S>
__global__ void __launch_bounds__(kDirectThreads, direct_min_blocks<K>())
    dw_fwd_direct_kernel(const DwFwdParams<float> p) {
  constexpr int V = kDirectVec<T>, R = kDirectRows, CB = Tiling<float>::kCB;
  const int64_t vecs = p.C / V;
  const int64_t l = static_cast<int64_t>(blockIdx.x) * kDirectThreads + threadIdx.x;
  if (l >= p.Wo * vecs) return;
  const int64_t wo = l / vecs, c0 = (l - wo * vecs) * V;
  const int64_t n = blockIdx.z, ho0 = static_cast<int64_t>(blockIdx.y) * R;
  const T* xn = static_cast<const T*>(p.x) + n * p.x_sn + c0;
  // Channel c0's weight of tap t: w[(c0 / CB) * K*K*CB + t * CB + c0 % CB], V contiguous.
  const float* wc = p.w + (c0 / CB) * (K * K * CB) + c0 % CB;
  const int64_t ih0 = ho0 * S - p.pad, iw0 = wo * S - p.pad;
  float acc[R][V];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[r][i] = 0.f;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      float wv[V];
#pragma unroll
      for (int i = 0; i < V; i += 4) {
        const float4 w4 = __ldg(reinterpret_cast<const float4*>(wc + (kh * K + kw) * CB + i));
        wv[i] = w4.x;
        wv[i + 1] = w4.y;
        wv[i + 2] = w4.z;
        wv[i + 3] = w4.w;
      }
      const int64_t iw = iw0 + kw * p.dil;
      if (iw < 0 || iw >= p.W) continue;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t ih = ih0 + r * S + kh * p.dil;
        if (ih < 0 || ih >= p.H) continue;
        float xv[V];
        load_n<V>(xn + ih * p.x_sh + iw * p.x_sw, true, V, xv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[r][i] += xv[i] * wv[i];
      }
    }
  }
  // Epilogue: BatchNorm folded from (gamma, beta, mean, var), the activation, one 16-byte store
  // per row.
  float sc[V], sh[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const BnAffine<float> f = fold_bn<float>(p.gamma[c0 + i], p.beta[c0 + i], p.mean[c0 + i],
                                             p.var[c0 + i], p.eps);
    sc[i] = f.scale;
    sh[i] = f.shift;
  }
  with_act(p.act, [&](auto a) { apply_act<decltype(a)::value>(acc, sc, sh); });
  T* out = static_cast<T*>(p.out) + ((n * p.Ho + ho0) * p.Wo + wo) * p.C + c0;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (ho0 + r < p.Ho) store_n<V>(out + r * p.Wo * p.C, true, V, acc[r]);
}

template <typename T, int K, int S>
void launch_dw_fwd_direct(const DwFwdParams<float>& p, cudaStream_t stream) {
  const int64_t vecs = p.C / kDirectVec<T>;
  const int64_t gx = (p.Wo * vecs + kDirectThreads - 1) / kDirectThreads;
  const int64_t gy = (p.Ho + kDirectRows - 1) / kDirectRows;
  TORCH_CHECK(gx <= INT32_MAX && gy <= 65535 && p.N <= 65535,
              "effkernels cuda: dwconv grid too large (", gx, ", ", gy, ", ", p.N, ")");
  dw_fwd_direct_kernel<T, K, S>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(p.N)),
         kDirectThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace effkernels::cuda

#define EFFK_INSTANTIATE_DW_FWD_DIRECT(T, K, S)                                              \
  template void effkernels::cuda::launch_dw_fwd_direct<T, K, S>(                            \
      const effkernels::cuda::DwFwdParams<float>&, cudaStream_t);
// Every dtype and kernel size at stride S (one .cu file per stride: a parallel build).
#define EFFK_INSTANTIATE_DW_FWD_DIRECT_K(K, S)                                             \
  EFFK_INSTANTIATE_DW_FWD_DIRECT(float, K, S)                                              \
  EFFK_INSTANTIATE_DW_FWD_DIRECT(__half, K, S)                                             \
  EFFK_INSTANTIATE_DW_FWD_DIRECT(__nv_bfloat16, K, S)
#define EFFK_INSTANTIATE_DW_FWD_DIRECT_ALL(S)                                              \
  EFFK_INSTANTIATE_DW_FWD_DIRECT_K(3, S)                                                   \
  EFFK_INSTANTIATE_DW_FWD_DIRECT_K(5, S)                                                   \
  EFFK_INSTANTIATE_DW_FWD_DIRECT_K(7, S)                                                   \
  EFFK_INSTANTIATE_DW_FWD_DIRECT_K(9, S)
