// Second stages of the depthwise kernels' reductions (the pointwise backend, pwconv_bn_act.cu,
// uses col_sum, stats_combine and bn_coeffs too), and the depthwise dy pass. Every
// reduction here runs in an order fixed by the problem size (per-column thread strides, then
// the block's threads in index order): no atomics, the same bits on every run and GPU.
#include "dw_kernels.cuh"

#include <algorithm>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

namespace effkernels::cuda {
namespace {

constexpr int kColX = 32;  // columns per block (coalesced over the partials' rows)
constexpr int kColY = 32;  // threads per column, each summing rows y, y + kColY, ...

template <typename A>
__global__ void __launch_bounds__(kColX* kColY)
    col_sum_kernel(const A* part, int64_t rows, int64_t cols, double* out) {
  __shared__ double sm[kColY][kColX];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;
  double s = 0.0;
  if (j < cols)
    for (int64_t i = threadIdx.y; i < rows; i += kColY) s += static_cast<double>(part[i * cols + j]);
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    double t = 0.0;
    for (int y = 0; y < kColY; ++y) t += sm[y][threadIdx.x];
    out[j] = t;
  }
}

template <typename A>
__global__ void __launch_bounds__(kColX* kColY)
    stats_combine_kernel(const A* part, const A* counts, int64_t rows, int64_t C, A* mean,
                         A* var) {
  __shared__ double sn[kColY][kColX], sm[kColY][kColX], s2[kColY][kColX];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;
  double n = 0.0, mu = 0.0, m2 = 0.0;
  if (c < C)
    for (int64_t i = threadIdx.y; i < rows; i += kColY)
      chan_merge(n, mu, m2, static_cast<double>(counts[i]),
                 static_cast<double>(part[i * 2 * C + c]),
                 static_cast<double>(part[i * 2 * C + C + c]));
  sn[threadIdx.y][threadIdx.x] = n;
  sm[threadIdx.y][threadIdx.x] = mu;
  s2[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double tn = 0.0, tm = 0.0, t2 = 0.0;
    for (int y = 0; y < kColY; ++y)
      chan_merge(tn, tm, t2, sn[y][threadIdx.x], sm[y][threadIdx.x], s2[y][threadIdx.x]);
    mean[c] = static_cast<A>(tm);
    var[c] = static_cast<A>(tn > 0.0 ? t2 / tn : 0.0);
  }
}

template <typename A>
__global__ void bn_coeffs_kernel(const double* sums, const A* gamma, const A* var, A eps,
                                 A count, bool training, int64_t C, A* coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BnBackwardCoeffs<A> k =
      bn_backward_coeffs<A>(gamma[c], inv_std<A>(var[c], eps), static_cast<A>(sums[c]),
                            static_cast<A>(sums[C + c]), count, training);
  coef[c] = k.a;
  coef[C + c] = k.b;
  coef[2 * C + c] = k.c;
}

template <Act ACT, typename T, typename A>
__device__ __forceinline__ void bn_dy_loop(const BnDyParams<A>& p) {
  const int64_t total = p.N * p.Ho * p.Wo * p.C;
  const T* go = static_cast<const T*>(p.go);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C, m = idx / p.C;
    const int64_t ow = m % p.Wo, m2 = m / p.Wo;
    const int64_t oh = m2 % p.Ho, n = m2 / p.Ho;
    const A gv = cvt_in<A>(go[n * p.go_sn + oh * p.go_sh + ow * p.go_sw + c]);
    const A xhat = (p.y[idx] - p.mean[c]) * inv_std<A>(p.var[c], p.eps);
    const A g = act_backward<ACT>(gv, p.gamma[c] * xhat + p.beta[c]);
    p.y[idx] = bn_dy(p.coef[c], p.coef[p.C + c], p.coef[2 * p.C + c], g, xhat);
  }
}

template <typename A>
__global__ void __launch_bounds__(256) bn_dy_kernel(const BnDyParams<A> p) {
  with_dtype<A>(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_act(p.act, [&](auto a) { bn_dy_loop<decltype(a)::value, T>(p); });
  });
}

}  // namespace

template <typename A>
void launch_col_sum(const A* part, int64_t rows, int64_t cols, double* out,
                    cudaStream_t stream) {
  if (cols == 0) return;
  col_sum_kernel<A><<<static_cast<unsigned>((cols + kColX - 1) / kColX), dim3(kColX, kColY), 0,
                      stream>>>(part, rows, cols, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void launch_stats_combine(const A* part, const A* counts, int64_t rows, int64_t C, A* mean,
                          A* var, cudaStream_t stream) {
  if (C == 0) return;
  stats_combine_kernel<A><<<static_cast<unsigned>((C + kColX - 1) / kColX), dim3(kColX, kColY),
                            0, stream>>>(part, counts, rows, C, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void launch_bn_coeffs(const double* sums, const A* gamma, const A* var, A eps, double count,
                      bool training, int64_t C, A* coef, cudaStream_t stream) {
  if (C == 0) return;
  bn_coeffs_kernel<A><<<static_cast<unsigned>((C + 255) / 256), 256, 0, stream>>>(
      sums, gamma, var, eps, static_cast<A>(count), training, C, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void launch_bn_dy(const BnDyParams<A>& p, cudaStream_t stream) {
  const int64_t total = p.N * p.Ho * p.Wo * p.C;
  if (total == 0) return;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, int64_t(sms) * 16);
  bn_dy_kernel<A><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define EFFK_INSTANTIATE_REDUCE(A)                                                               \
  template void launch_col_sum<A>(const A*, int64_t, int64_t, double*, cudaStream_t);           \
  template void launch_stats_combine<A>(const A*, const A*, int64_t, int64_t, A*, A*,           \
                                        cudaStream_t);                                          \
  template void launch_bn_coeffs<A>(const double*, const A*, const A*, A, double, bool, int64_t, \
                                    A*, cudaStream_t);                                          \
  template void launch_bn_dy<A>(const BnDyParams<A>&, cudaStream_t);

EFFK_INSTANTIATE_REDUCE(float)
EFFK_INSTANTIATE_REDUCE(double)

}  // namespace effkernels::cuda
