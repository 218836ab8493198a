// CUDA pointwise (1x1) conv GEMM with the BN / activation / residual / statistics epilogues (see
// pw_params.h for the operands and the tiles). Included only by the instantiation files
// pw_gemm_*.cu. The small helpers (conversions, the activation switch) are dw_kernels.cuh's.
//
// Block structure (256 threads, one BM x BN tile of C, blockIdx.z = one k chunk):
//   main loop over k in steps of BK: both operand tiles are copied global -> shared (16-byte
//     vectors along the operand's contiguous index when `vec`, else element by element; zeros
//     past M, N, K), then multiplied from shared memory:
//       fp16/bf16: nvcuda::wmma 16x16x16 (fp32 accumulators); As [BM][BK+8], Bs [BN][BK+8]
//                  (k innermost, row_major A / col_major B fragments; the +8 pad keeps the
//                  fragment loads' rows on different banks and the 32-byte alignment);
//       fp32/fp64: FFMA micro-tiles (TM x 4 results per thread); As [BK][BM+4], Bs [BK][BN+4]
//                  (i innermost, so a thread's TM rows / 4 columns are vector loads);
//   the result tile goes to shared memory (Cs [BM][BN+4] in the accumulation type, overlaying
//   the operand tiles), then the epilogue: thread t owns column t % 64 and rows t / 64 + 4r,
//   so every row is stored by 64 consecutive threads (coalesced) and per-column reductions need
//   no shuffles: each thread reduces its rows, then the 4 row groups are combined in a fixed
//   order through shared memory (deterministic).
#pragma once

#include <algorithm>

#include <mma.h>

#include <c10/cuda/CUDAFunctions.h>

#include "dw_kernels.cuh"
#include "pw_params.h"

namespace effkernels::cuda {
namespace pw {

// 2 resident blocks per SM (<= 128 registers; `make kernels-report`: 79-116, no spills).
// The operand-copy loops are unrolled twice only: fully unrolled (16 scalar loads in flight per
// thread, with their 64-bit addresses) they took the fp16 kernel to 180 registers.
constexpr int kMinBlocks = 2;

constexpr int kCols = 64;                      // epilogue: one column per thread
constexpr int kRowGroups = kPwThreads / kCols;  // 4

template <typename T>
struct Cfg {
  using Tl = PwTile<T>;
  using A = pw_acc_t<T>;
  static constexpr int BM = Tl::BM, BN = Tl::BN, BK = Tl::BK;
  static constexpr bool TC = Tl::kTensorCores;
  // Shared-memory pitches (elements) and tile sizes.
  static constexpr int AP = TC ? BK + 8 : BM + 4;  // As: TC [BM][AP] (k inner); else [BK][AP]
  static constexpr int BP = TC ? BK + 8 : BN + 4;  // Bs: TC [BN][BP]; else [BK][BP]
  static constexpr int kAElems = TC ? BM * AP : BK * AP;
  static constexpr int kBElems = TC ? BN * BP : BK * BP;
  static constexpr int CP = BN + 4;  // Cs [BM][CP], accumulation type
  static constexpr size_t kOperandBytes = (kAElems + kBElems) * sizeof(T);
  static constexpr size_t kCBytes = static_cast<size_t>(BM) * CP * sizeof(A);
  static constexpr size_t kSmemBytes = kOperandBytes > kCBytes ? kOperandBytes : kCBytes;
  // FFMA micro-tile: 16 x 16 threads, TM x TN results each.
  static constexpr int TM = BM / 16, TN = BN / 16;
  static_assert(BN == kCols, "the epilogue maps one column per thread");
  static_assert(BM % kRowGroups == 0 && BK % 16 == 0, "tile shape");
  static_assert(kSmemBytes + 4 * kRowGroups * kCols * sizeof(A) <= 48 * 1024,
                "static shared memory");
};

// Shared-memory index of operand element (r, kk) of a tile: k innermost (tensor cores) or
// r innermost (FFMA).
template <bool KInner, int P>
__device__ __forceinline__ int sidx(int r, int kk) {
  return KInner ? r * P + kk : kk * P + r;
}

// V elements from src (one 16-byte load when V > 1), or zeros when !in (src not read).
template <int V, typename T>
__device__ __forceinline__ void load_or_zero(const T* src, bool in, T (&v)[V]) {
  if (in) {
    if constexpr (V > 1) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      memcpy(v, &raw, sizeof(raw));
    } else {
      v[0] = *src;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = cvt_out<T>(0.0f);
  }
}

// Copies the operand tile X(i0 + r, k0 + kk), r < R, kk < BK, to shared memory (zeros where
// i >= I or k >= k1). V: elements per global load along the operand's inner index (16 bytes,
// or 1); a vector is either wholly inside or wholly outside the bounds (the host sets vec only
// when the inner extent is a multiple of V, and every tile/chunk start is one too).
// KIn: the inner index is k (R rows of BK / V vectors), else i (BK rows of R / V vectors).
template <bool KIn, int V, int R, int BK, bool SKInner, int P, typename T>
__device__ __forceinline__ void load_tile_v(const PwOperand& op, int64_t i0, int64_t I,
                                            int64_t k0, int64_t k1, T* s) {
  const T* base = static_cast<const T*>(op.p);
  constexpr int CH = KIn ? BK / V : R / V;  // vectors per outer index
  constexpr int OUTER = KIn ? R : BK;
#pragma unroll 2
  for (int it = threadIdx.x; it < OUTER * CH; it += kPwThreads) {
    const int o = it / CH, inner = (it - o * CH) * V;
    const int r = KIn ? o : inner, kk = KIn ? inner : o;
    const int64_t i = i0 + r, k = k0 + kk;
    const bool inside = i < I && k < k1;
    T v[V];
    load_or_zero<V>(inside ? base + (KIn ? op.rows.off(i) + k : op.rows.off(k) + i) : base,
                    inside, v);
#pragma unroll
    for (int e = 0; e < V; ++e)
      s[KIn ? sidx<SKInner, P>(r, kk + e) : sidx<SKInner, P>(r + e, kk)] = v[e];
  }
}

template <int V, int R, int BK, bool SKInner, int P, typename T>
__device__ __forceinline__ void load_operand_v(const PwOperand& op, int64_t i0, int64_t I,
                                               int64_t k0, int64_t k1, T* s) {
  if (op.k_inner)
    load_tile_v<true, V, R, BK, SKInner, P>(op, i0, I, k0, k1, s);
  else
    load_tile_v<false, V, R, BK, SKInner, P>(op, i0, I, k0, k1, s);
}

template <int R, int BK, bool SKInner, int P, typename T>
__device__ __forceinline__ void load_operand(const PwOperand& op, int64_t i0, int64_t I,
                                             int64_t k0, int64_t k1, T* s) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (op.vec) {
    load_operand_v<V, R, BK, SKInner, P>(op, i0, I, k0, k1, s);
  } else {
    load_operand_v<1, R, BK, SKInner, P>(op, i0, I, k0, k1, s);
  }
}

// C tile = sum over k in [k0, k1) -> Cs (shared, accumulation type), tensor cores.
template <typename T>
__device__ __forceinline__ void gemm_tile_tc(const PwGemmParams<T>& p, int64_t i0, int64_t j0,
                                             int64_t kb, int64_t ke, unsigned char* smem) {
  using C = Cfg<T>;
  using namespace nvcuda;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + C::kAElems;
  const int warp = threadIdx.x / 32;
  const int wm = warp % 4, wn = warp / 4;  // 4 x 2 warps of 32 x 32
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
  for (int64_t k0 = kb; k0 < ke; k0 += C::BK) {
    load_operand<C::BM, C::BK, true, C::AP>(p.a, i0, p.M, k0, ke, As);
    load_operand<C::BN, C::BK, true, C::BP>(p.b, j0, p.N, k0, ke, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a)
        wmma::load_matrix_sync(fa[a], As + (wm * 32 + a * 16) * C::AP + kk, C::AP);
#pragma unroll
      for (int b = 0; b < 2; ++b)
        wmma::load_matrix_sync(fb[b], Bs + (wn * 32 + b * 16) * C::BP + kk, C::BP);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
    __syncthreads();  // the tiles are overwritten next (or by Cs)
  }
  float* Cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wmma::store_matrix_sync(Cs + (wm * 32 + a * 16) * C::CP + wn * 32 + b * 16, acc[a][b],
                              C::CP, wmma::mem_row_major);
  __syncthreads();
}

// The same with FFMA (fp32, fp64): thread (ty, tx) of 16 x 16 owns rows ty*TM + r and columns
// tx*TN + c.
template <typename T>
__device__ __forceinline__ void gemm_tile_ffma(const PwGemmParams<T>& p, int64_t i0, int64_t j0,
                                               int64_t kb, int64_t ke, unsigned char* smem) {
  using C = Cfg<T>;
  using A = typename C::A;
  constexpr int TM = C::TM, TN = C::TN;
  constexpr int VA = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte shared load
  static_assert(TM % VA == 0 && TN % VA == 0, "micro-tile vectors");
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + C::kAElems;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  A acc[TM][TN];
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TN; ++c) acc[r][c] = A(0);
  for (int64_t k0 = kb; k0 < ke; k0 += C::BK) {
    load_operand<C::BM, C::BK, false, C::AP>(p.a, i0, p.M, k0, ke, As);
    load_operand<C::BN, C::BK, false, C::BP>(p.b, j0, p.N, k0, ke, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < C::BK; ++kk) {
      A av[TM], bv[TN];
#pragma unroll
      for (int r = 0; r < TM; r += VA) {
        const Pack<T, VA> v = ld<VA>(As + kk * C::AP + ty * TM + r);
#pragma unroll
        for (int e = 0; e < VA; ++e) av[r + e] = v.v[e];
      }
#pragma unroll
      for (int c = 0; c < TN; c += VA) {
        const Pack<T, VA> v = ld<VA>(Bs + kk * C::BP + tx * TN + c);
#pragma unroll
        for (int e = 0; e < VA; ++e) bv[c + e] = v.v[e];
      }
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TN; ++c) acc[r][c] = fma(av[r], bv[c], acc[r][c]);
    }
    __syncthreads();
  }
  A* Cs = reinterpret_cast<A*>(smem);
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TN; ++c) Cs[(ty * TM + r) * C::CP + tx * TN + c] = acc[r][c];
  __syncthreads();
}

// ---- epilogues (the tile in Cs; thread: column c = tid % 64, rows rg, rg + 4, ...) ----------

template <Act ACT, typename T, typename A>
__device__ __forceinline__ void epi_out(const PwGemmParams<T>& p, const A* Cs, int rows,
                                        int64_t i0, int64_t j, int c, int rg, A sc, A sh) {
  T* out = static_cast<T*>(p.out);
  for (int r = rg; r < rows; r += kRowGroups) {
    const int64_t i = i0 + r;
    A z = Cs[r * Cfg<T>::CP + c] * sc + sh;
    if (p.res != nullptr) z += cvt_in<A>(p.res[p.res_rows.off(i) + j]);
    out[i * p.ldo + j] = cvt_out<T>(act_forward<ACT>(z));
  }
}

// The same with 16-byte vectors (p.out_vec): thread t owns the V columns j0 + (t % TPR) * V and
// rows t / TPR + RPP * r, so TPR consecutive threads store one row's 128 bytes (fp16: a thread
// stores 8 columns at once where epi_out stores 1).
template <Act ACT, typename T, typename A>
__device__ __forceinline__ void epi_out_vec(const PwGemmParams<T>& p, const A* Cs, int rows,
                                            int64_t i0, int64_t j0) {
  constexpr int V = 16 / static_cast<int>(sizeof(T)), TPR = Cfg<T>::BN / V;
  constexpr int RPP = kPwThreads / TPR;
  static_assert(Cfg<T>::BN % V == 0 && kPwThreads % TPR == 0, "vector epilogue");
  const int cv = threadIdx.x % TPR;
  const int64_t j = j0 + cv * V;
  if (j >= p.N) return;  // N % V == 0: the vector is whole
  A sc[V], sh[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sc[e] = A(1);
    sh[e] = A(0);
    if (p.gamma != nullptr) {
      const BnAffine<A> f = fold_bn<A>(p.gamma[j + e], p.beta[j + e], p.mean[j + e],
                                       p.var[j + e], p.eps);
      sc[e] = f.scale;
      sh[e] = f.shift;
    }
  }
  T* out = static_cast<T*>(p.out);
  for (int r = threadIdx.x / TPR; r < rows; r += RPP) {
    const int64_t i = i0 + r;
    A z[V];
#pragma unroll
    for (int e = 0; e < V; ++e) z[e] = Cs[r * Cfg<T>::CP + cv * V + e] * sc[e] + sh[e];
    if (p.res != nullptr) {
      T rv[V];
      load_or_zero<V>(p.res + p.res_rows.off(i) + j, true, rv);
#pragma unroll
      for (int e = 0; e < V; ++e) z[e] += cvt_in<A>(rv[e]);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) z[e] = act_forward<ACT>(z[e]);
    store_n<V>(out + i * p.ldo + j, true, V, z);
  }
}

template <Act ACT, typename T, typename A>
__device__ __forceinline__ void epi_bwd(const PwGemmParams<T>& p, const A* Cs, int rows,
                                        int64_t i0, int64_t j, int c, int rg, A mu, A is, A ga,
                                        A be, A& sg, A& sgx) {
  for (int r = rg; r < rows; r += kRowGroups) {
    const int64_t i = i0 + r;
    const A y = Cs[r * Cfg<T>::CP + c];
    const A xhat = (y - mu) * is;
    A z = ga * xhat + be;
    if (p.res != nullptr) z += cvt_in<A>(p.res[p.res_rows.off(i) + j]);
    const A g = act_backward<ACT>(cvt_in<A>(p.go[p.go_rows.off(i) + j]), z);
    p.y[i * p.N + j] = y;
    if (p.res != nullptr) p.grad_res[i * p.N + j] = cvt_out<T>(g);
    sg += g;
    sgx += g * xhat;
  }
}

template <typename T>
__device__ __forceinline__ void epilogue(const PwGemmParams<T>& p, int64_t i0, int64_t j0,
                                         const unsigned char* smem, typename Cfg<T>::A* red) {
  using C = Cfg<T>;
  using A = typename C::A;
  const A* Cs = reinterpret_cast<const A*>(smem);
  const int c = threadIdx.x % kCols, rg = threadIdx.x / kCols;
  const int rows = static_cast<int>(p.M - i0 < C::BM ? p.M - i0 : C::BM);
  const int64_t j = j0 + c;
  const bool col_ok = j < p.N;
  if (p.mode == kPwAcc) {
    if (!col_ok) return;
    A* out = static_cast<A*>(p.out) + static_cast<int64_t>(blockIdx.z) * p.out_zstride;
    for (int r = rg; r < rows; r += kRowGroups) out[(i0 + r) * p.ldo + j] = Cs[r * C::CP + c];
    return;
  }
  if (p.mode == kPwOut) {
    if (p.out_vec) {
      with_act(p.act, [&](auto a) { epi_out_vec<decltype(a)::value>(p, Cs, rows, i0, j0); });
      return;
    }
    if (!col_ok) return;
    A sc = A(1), sh = A(0);
    if (p.gamma != nullptr) {
      const BnAffine<A> f = fold_bn<A>(p.gamma[j], p.beta[j], p.mean[j], p.var[j], p.eps);
      sc = f.scale;
      sh = f.shift;
    }
    with_act(p.act, [&](auto a) {
      epi_out<decltype(a)::value>(p, Cs, rows, i0, j, c, rg, sc, sh);
    });
    return;
  }
  // Per-column reductions: this thread's rows, then the row groups in order (red: [3][4][64]).
  A v0 = A(0), v1 = A(0), v2 = A(0);
  if (p.mode == kPwStats) {
    // (count, mean, M2) of the thread's rows, two passes over shared memory.
    int n = 0;
    A s = A(0);
    for (int r = rg; r < rows; r += kRowGroups, ++n) s += Cs[r * C::CP + c];
    const A mu = n > 0 ? s / A(n) : A(0);
    A m2 = A(0);
    for (int r = rg; r < rows; r += kRowGroups) {
      const A d = Cs[r * C::CP + c] - mu;
      m2 += d * d;
    }
    v0 = A(n);
    v1 = mu;
    v2 = m2;
  } else {  // kPwBwd
    if (col_ok) {
      const A mu = p.mean[j], is = inv_std<A>(p.var[j], p.eps), ga = p.gamma[j], be = p.beta[j];
      with_act(p.act, [&](auto a) {
        epi_bwd<decltype(a)::value>(p, Cs, rows, i0, j, c, rg, mu, is, ga, be, v0, v1);
      });
    }
  }
  red[(0 * kRowGroups + rg) * kCols + c] = v0;
  red[(1 * kRowGroups + rg) * kCols + c] = v1;
  red[(2 * kRowGroups + rg) * kCols + c] = v2;
  __syncthreads();
  if (rg != 0 || !col_ok) return;
  const int64_t row = blockIdx.x;  // the tile of M: partials row
  A* part = p.part + row * 2 * p.N;
  if (p.mode == kPwStats) {
    A n = A(0), mu = A(0), m2 = A(0);
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g)
      chan_merge(n, mu, m2, red[g * kCols + c], red[(kRowGroups + g) * kCols + c],
                 red[(2 * kRowGroups + g) * kCols + c]);
    part[j] = mu;
    part[p.N + j] = m2;
    if (blockIdx.y == 0 && c == 0) p.counts[row] = A(rows);
  } else {
    A sg = A(0), sgx = A(0);
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
      sg += red[g * kCols + c];
      sgx += red[(kRowGroups + g) * kCols + c];
    }
    part[j] = sg;
    part[p.N + j] = sgx;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPwThreads, kMinBlocks) pw_gemm_kernel(const PwGemmParams<T> p) {
  using C = Cfg<T>;
  __shared__ __align__(128) unsigned char smem[C::kSmemBytes];
  __shared__ typename C::A red[3 * kRowGroups * kCols];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * C::BN;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * p.kchunk;
  const int64_t ke = kb + p.kchunk < p.K ? kb + p.kchunk : p.K;
  if constexpr (C::TC) {
    gemm_tile_tc<T>(p, i0, j0, kb, ke, smem);
  } else {
    gemm_tile_ffma<T>(p, i0, j0, kb, ke, smem);
  }
  epilogue<T>(p, i0, j0, smem, red);
}

template <Act ACT, typename T>
__device__ __forceinline__ void dy_loop(const PwDyParams<T>& p) {
  using A = pw_acc_t<T>;
  const int64_t total = p.M * p.C;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C, m = idx / p.C;
    const A xhat = (p.y[idx] - p.mean[c]) * inv_std<A>(p.var[c], p.eps);
    A z = p.gamma[c] * xhat + p.beta[c];
    if (p.res != nullptr) z += cvt_in<A>(p.res[p.res_rows.off(m) + c]);
    const A g = act_backward<ACT>(cvt_in<A>(p.go[p.go_rows.off(m) + c]), z);
    p.dy[idx] = cvt_out<T>(bn_dy(p.coef[c], p.coef[p.C + c], p.coef[2 * p.C + c], g, xhat));
  }
}

template <typename T>
__global__ void __launch_bounds__(256) pw_dy_kernel(const PwDyParams<T> p) {
  with_act(p.act, [&](auto a) { dy_loop<decltype(a)::value>(p); });
}

}  // namespace pw

template <typename T>
void launch_pw_gemm(const PwGemmParams<T>& p, int64_t zsplit, cudaStream_t stream) {
  using C = pw::Cfg<T>;
  const int64_t gm = (p.M + C::BM - 1) / C::BM, gn = (p.N + C::BN - 1) / C::BN;
  if (gm == 0 || gn == 0 || zsplit == 0) return;
  TORCH_CHECK(gm <= INT32_MAX && gn <= 65535 && zsplit <= 65535,
              "effkernels cuda: pwconv GEMM grid too large (", gm, " x ", gn, " x ", zsplit, ")");
  pw::pw_gemm_kernel<T><<<dim3(static_cast<unsigned>(gm), static_cast<unsigned>(gn),
                               static_cast<unsigned>(zsplit)),
                          kPwThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_pw_dy(const PwDyParams<T>& p, cudaStream_t stream) {
  const int64_t total = p.M * p.C;
  if (total == 0) return;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, int64_t(sms) * 16);
  pw::pw_dy_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace effkernels::cuda

#define EFFK_INSTANTIATE_PW(T)                                                              \
  template void effkernels::cuda::launch_pw_gemm<T>(const effkernels::cuda::PwGemmParams<T>&, \
                                                    int64_t, cudaStream_t);                 \
  template void effkernels::cuda::launch_pw_dy<T>(const effkernels::cuda::PwDyParams<T>&,     \
                                                  cudaStream_t);
