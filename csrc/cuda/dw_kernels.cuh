// CUDA depthwise / mixed depthwise conv + BatchNorm + activation kernels (see dw_params.h for
// the tiling and the variants). Included only by the instantiation files dw_fwd_*.cu and
// dw_bwd_*.cu, each of which instantiates a few (A, K, S) combinations, so that the build runs
// them in parallel.
//
// Compute type. The shared-memory tiles hold the accumulation type A (fp32 for fp32/fp16/bf16,
// fp64 for fp64): the global -> shared copy converts, so the unrolled conv loops are one
// instantiation per (A, K, S) for all three 16/32-bit dtypes; the dtype is a block-uniform
// run-time switch around the memory accesses only (tile loads, epilogue loads and stores).
// Global loads of x are 16-byte vectors when the base, the strides and C allow (x_vec).
//
// Shared-memory layout: [weights k*k][kCB] then the input tile [rows][pitch][kCB], pitch odd so
// that the two pixel threads of a quarter warp (adjacent tile rows) hit different banks with
// their 16-byte loads; a thread's kVec channels are one 16-byte vector.
#pragma once

#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "dw_params.h"
#include "effkernels/activation.h"
#include "effkernels/conv_geometry.h"

namespace effkernels::cuda {

// Resident blocks per SM that the register allocation of the mixed kernels (several unrolled
// bodies in one function) must allow: 4 (<= 128 registers per thread). Without the bound, ptxas
// (sm_90) squeezed the mixed forward kernel into 56 registers and spilled. The single-k
// forward kernels: dw_fwd_min_blocks below; the grad-input kernels keep ptxas' own choice.
constexpr int kMixedMinBlocks = 4;

// ---- small vectors, conversions, dtype switch --------------------------------------------------

template <typename A, int N>
struct alignas(sizeof(A) * N) Pack {
  A v[N];
};

template <int V, typename A>
__device__ __forceinline__ Pack<A, V> ld(const A* p) {
  return *reinterpret_cast<const Pack<A, V>*>(p);
}

template <int V, typename A>
__device__ __forceinline__ void st(A* p, const Pack<A, V>& v) {
  *reinterpret_cast<Pack<A, V>*>(p) = v;
}

template <int Bytes>
struct RawOf;
template <>
struct RawOf<16> {
  using type = uint4;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<4> {
  using type = unsigned int;
};
template <>
struct RawOf<2> {
  using type = unsigned short;
};

template <typename A, typename T>
__device__ __forceinline__ A cvt_in(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
__device__ __forceinline__ T cvt_out(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

// N channels of T at p, converted to A. vec: p is aligned to N * sizeof(T) (one vector access),
// used only when all N channels are valid; otherwise `valid` scalar loads, zeros beyond.
template <int N, typename A, typename T>
__device__ __forceinline__ void load_n(const T* p, bool vec, int valid, A (&o)[N]) {
  if (vec && valid >= N) {
    using R = typename RawOf<N * sizeof(T)>::type;
    const R r = *reinterpret_cast<const R*>(p);
    T t[N];
    memcpy(t, &r, sizeof(r));
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = cvt_in<A>(t[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = i < valid ? cvt_in<A>(p[i]) : A(0);
  }
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_n(T* p, bool vec, int valid, const A (&v)[N]) {
  if (vec && valid >= N) {
    T t[N];
#pragma unroll
    for (int i = 0; i < N; ++i) t[i] = cvt_out<T>(v[i]);
    using R = typename RawOf<N * sizeof(T)>::type;
    R r;
    memcpy(&r, t, sizeof(r));
    *reinterpret_cast<R*>(p) = r;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < valid) p[i] = cvt_out<T>(v[i]);
  }
}

// f(T{}) with T the storage type of `dtype` (fp64 kernels serve fp64 only).
template <typename A, typename F>
__device__ __forceinline__ void with_dtype(int dtype, F&& f) {
  if constexpr (std::is_same_v<A, double>) {
    f(double{});
  } else {
    switch (dtype) {
      case kF16: f(__half{}); break;
      case kBF16: f(__nv_bfloat16{}); break;
      default: f(float{}); break;
    }
  }
}

// f(std::integral_constant<Act, ACT>{}): the activation as a compile-time constant (the same
// cases as EFFK_DISPATCH_ACT, whose macro argument cannot hold template argument lists).
template <typename F>
__device__ __forceinline__ void with_act(Act a, F&& f) {
  switch (a) {
    case Act::ReLU: f(std::integral_constant<Act, Act::ReLU>{}); break;
    case Act::ReLU6: f(std::integral_constant<Act, Act::ReLU6>{}); break;
    case Act::HSwish: f(std::integral_constant<Act, Act::HSwish>{}); break;
    case Act::SiLU: f(std::integral_constant<Act, Act::SiLU>{}); break;
    case Act::HSigmoid: f(std::integral_constant<Act, Act::HSigmoid>{}); break;
    case Act::Sigmoid: f(std::integral_constant<Act, Act::Sigmoid>{}); break;
    default: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

// ---- block-level pieces ----------------------------------------------------------------------

// dst[(r * pitch + c) * kCB + ch] = src(h0 + r*hs, w0 + c*ws, ch) for r < rows, c < cols,
// ch < kCB, zero outside [0, H) x [0, W) and beyond `cvalid` channels. src points at the image
// and the block's first channel; sh/sw are its row/pixel strides (elements).
template <typename A, typename T>
__device__ __forceinline__ void load_tile(A* dst, int rows, int cols, int pitch, const T* src,
                                          int64_t sh, int64_t sw, int64_t h0, int64_t hs,
                                          int64_t w0, int64_t ws, int64_t H, int64_t W,
                                          int64_t cvalid, bool vec) {
  constexpr int CB = Tiling<A>::kCB, V = Tiling<A>::kVec;
  if (vec) {
    constexpr int VT = 16 / static_cast<int>(sizeof(T));  // one 16-byte global load
    static_assert(CB % VT == 0 && VT % V == 0, "tile chunks");
    constexpr int chunks = CB / VT;
    const int items = rows * cols * chunks;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
      const int ch = i % chunks, pix = i / chunks;
      const int r = pix / cols, c = pix - r * cols;
      const int64_t h = h0 + r * hs, w = w0 + c * ws;
      A v[VT];
      if (h >= 0 && h < H && w >= 0 && w < W && ch * VT < cvalid) {
        load_n<VT>(src + h * sh + w * sw + ch * VT, true, VT, v);
      } else {
#pragma unroll
        for (int j = 0; j < VT; ++j) v[j] = A(0);
      }
      A* d = dst + (r * pitch + c) * CB + ch * VT;
#pragma unroll
      for (int j = 0; j < VT; j += V) {
        Pack<A, V> pk;
#pragma unroll
        for (int e = 0; e < V; ++e) pk.v[e] = v[j + e];
        st<V>(d + j, pk);
      }
    }
  } else {
    const int items = rows * cols * CB;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
      const int ch = i % CB, pix = i / CB;
      const int r = pix / cols, c = pix - r * cols;
      const int64_t h = h0 + r * hs, w = w0 + c * ws;
      const bool ok = h >= 0 && h < H && w >= 0 && w < W && ch < cvalid;
      dst[(r * pitch + c) * CB + ch] = ok ? cvt_in<A>(src[h * sh + w * sw + ch]) : A(0);
    }
  }
}

// Sums v over the 32 pixel threads of each channel lane in a fixed tree (shuffles inside each
// warp, then the 4 warps in order through `red` [4][kCB]): the result lands in threads
// tid < kLanes (lane = tid). Every thread of the block must call it.
template <typename A, int V>
__device__ __forceinline__ void reduce_lanes(A (&v)[V], A* red) {
  constexpr int CB = Tiling<A>::kCB, L = Tiling<A>::kLanes;
  static_assert(Tiling<A>::kThreads == 128, "4 warps");
#pragma unroll
  for (int off = L; off < 32; off <<= 1)
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  const int tid = threadIdx.x, lane = tid % L, warp = tid / 32;
  if (tid % 32 < L)
#pragma unroll
    for (int i = 0; i < V; ++i) red[warp * CB + lane * V + i] = v[i];
  __syncthreads();
  if (tid < L)
#pragma unroll
    for (int i = 0; i < V; ++i)
      v[i] = ((red[lane * V + i] + red[CB + lane * V + i]) + red[2 * CB + lane * V + i]) +
             red[3 * CB + lane * V + i];
  __syncthreads();
}

// The block's kernel size, padding and packed-weight offset (see DwFwdParams::table).
template <typename A>
__device__ __forceinline__ void block_geometry(const int64_t* table, int k, int64_t pad,
                                               int64_t cb, int& kb, int64_t& padb,
                                               int64_t& woff) {
  if (table != nullptr) {
    kb = static_cast<int>(table[3 * cb]);
    padb = table[3 * cb + 1];
    woff = table[3 * cb + 2];
  } else {
    kb = k;
    padb = pad;
    woff = cb * k * k * Tiling<A>::kCB;
  }
}

// Copies the block's k*k x kCB packed weights to shared memory.
template <typename A>
__device__ __forceinline__ void load_weights(A* dst, const A* w, int k) {
  constexpr int V = Tiling<A>::kVec, CB = Tiling<A>::kCB;
  for (int i = threadIdx.x; i < k * k * CB / V; i += blockDim.x) st<V>(dst + i * V, ld<V>(w + i * V));
}

// ---- forward -------------------------------------------------------------------------------

struct Ctx {
  int tid, lane, pt, row, ct;  // thread: channel lane, pixel thread (row, column thread)
  int64_t tile, n, r0, c0w;    // tile index, image, first tile row / column
  int64_t cb, c0;              // channel block, its first channel
  int k;                       // the block's kernel size
  int64_t pad, woff;
};

template <typename A>
__device__ __forceinline__ Ctx make_ctx(int64_t tiles_h, int64_t tiles_w, int tile_w,
                                        const int64_t* table, int k, int64_t pad) {
  using Tl = Tiling<A>;
  Ctx t;
  t.tid = threadIdx.x;
  t.lane = t.tid % Tl::kLanes;
  t.pt = t.tid / Tl::kLanes;
  // Adjacent pixel threads are adjacent rows (see the pitch note at the top).
  t.row = t.pt % Tl::kRows;
  t.ct = t.pt / Tl::kRows;
  t.tile = blockIdx.x;
  const int64_t tw = t.tile % tiles_w, rest = t.tile / tiles_w;
  t.n = rest / tiles_h;
  t.r0 = (rest % tiles_h) * Tl::kRows;
  t.c0w = tw * tile_w;
  t.cb = blockIdx.y;
  t.c0 = t.cb * Tl::kCB;
  block_geometry<A>(table, k, pad, t.cb, t.k, t.pad, t.woff);
  return t;
}

// acc[q] += sum over the K x K taps, from the shared tile of the input plus its halo.
template <typename A, int KT, int S>
__device__ __forceinline__ void fwd_conv_halo(const DwFwdParams<A>& p, const Ctx& t, A* smem,
                                              A (&acc)[FwdShape<S>::kPX][Tiling<A>::kVec]) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, PX = FwdShape<S>::kPX, TW = FwdShape<S>::kTW;
  const int D = static_cast<int>(p.dil);
  const int IH = static_cast<int>(conv_in_extent(Tl::kRows, KT, S, D));
  const int IW = static_cast<int>(conv_in_extent(TW, KT, S, D));
  const int IWP = IW | 1;
  A* tile = smem + KT * KT * CB;
  const int64_t ih0 = t.r0 * S - t.pad, iw0 = t.c0w * S - t.pad;
  with_dtype<A>(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xn = static_cast<const T*>(p.x) + t.n * p.x_sn + t.c0;
    load_tile<A>(tile, IH, IW, IWP, xn, p.x_sh, p.x_sw, ih0, 1, iw0, 1, p.H, p.W, p.C - t.c0,
                 p.x_vec);
  });
  __syncthreads();
#pragma unroll
  for (int kh = 0; kh < KT; ++kh) {
    const A* trow = tile + ((t.row * S + kh * D) * IWP + t.ct * PX * S) * CB + t.lane * V;
#pragma unroll
    for (int kw = 0; kw < KT; ++kw) {
      const Pack<A, V> wv = ld<V>(smem + (kh * KT + kw) * CB + t.lane * V);
      const A* tp = trow + kw * D * CB;
#pragma unroll
      for (int q = 0; q < PX; ++q) {
        const Pack<A, V> xv = ld<V>(tp + q * S * CB);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[q][i] += xv.v[i] * wv.v[i];
      }
    }
  }
}

// Any k and dilation: the tile of the inputs one tap reads is staged per tap (k*k rounds).
template <typename A, int S>
__device__ __forceinline__ void fwd_conv_staged(const DwFwdParams<A>& p, const Ctx& t, A* smem,
                                                A (&acc)[FwdShape<S>::kPX][Tiling<A>::kVec]) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, PX = FwdShape<S>::kPX, TW = FwdShape<S>::kTW;
  constexpr int TWP = TW | 1;
  const int k = t.k;
  const int64_t D = p.dil;
  A* tile = smem + k * k * CB;
  const int64_t ih0 = t.r0 * S - t.pad, iw0 = t.c0w * S - t.pad;
  for (int kh = 0; kh < k; ++kh) {
    for (int kw = 0; kw < k; ++kw) {
      __syncthreads();  // the previous tap's reads are done
      with_dtype<A>(p.dtype, [&](auto tag) {
        using T = decltype(tag);
        const T* xn = static_cast<const T*>(p.x) + t.n * p.x_sn + t.c0;
        load_tile<A>(tile, Tl::kRows, TW, TWP, xn, p.x_sh, p.x_sw, ih0 + kh * D, S,
                     iw0 + kw * D, S, p.H, p.W, p.C - t.c0, p.x_vec);
      });
      __syncthreads();
      const Pack<A, V> wv = ld<V>(smem + (kh * k + kw) * CB + t.lane * V);
#pragma unroll
      for (int q = 0; q < PX; ++q) {
        const Pack<A, V> xv = ld<V>(tile + (t.row * TWP + t.ct * PX + q) * CB + t.lane * V);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[q][i] += xv.v[i] * wv.v[i];
      }
    }
  }
}

// The epilogue keeps the activation switch (arithmetic, 7 cases) and the dtype switch (memory
// accesses, 3 cases) apart, so that each case's code is generated once rather than 21 times.

// o[q] = act(acc[q] * sc + sh), in place.
template <Act ACT, int PX, int V, typename A>
__device__ __forceinline__ void apply_act(A (&acc)[PX][V], const A* sc, const A* sh) {
#pragma unroll
  for (int q = 0; q < PX; ++q)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[q][i] = act_forward<ACT>(acc[q][i] * sc[i] + sh[i]);
}

// gv[q] = gv[q] * act'(gamma * xhat + beta) (= g), summed into sg and sg * xhat into sgx over
// the valid pixels.
template <Act ACT, int PX, int V, typename A>
__device__ __forceinline__ void bn_act_grad(const A (&acc)[PX][V], A (&gv)[PX][V],
                                            const bool (&ok)[PX], const A* mu, const A* is,
                                            const A* ga, const A* be, A* sg, A* sgx) {
#pragma unroll
  for (int q = 0; q < PX; ++q) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A xhat = (acc[q][i] - mu[i]) * is[i];
      const A g = ok[q] ? act_backward<ACT>(gv[q][i], ga[i] * xhat + be[i]) : A(0);
      sg[i] += g;
      sgx[i] += g * xhat;
    }
  }
}

// Writes the lane's channels [cl, cl + cvalid) of a reduced pair to part[.][C].
template <typename A, int V>
__device__ __forceinline__ void write_pair(A* part, int64_t C, int64_t cl, int cvalid,
                                           const A (&a)[V], const A (&b)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (i < cvalid) {
      part[cl + i] = a[i];
      part[C + cl + i] = b[i];
    }
  }
}

template <typename A, int S, bool EVAL>
__device__ __forceinline__ void fwd_epilogue(const DwFwdParams<A>& p, const Ctx& t,
                                             A (&acc)[FwdShape<S>::kPX][Tiling<A>::kVec],
                                             A* red, A* bmean) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, PX = FwdShape<S>::kPX, TW = FwdShape<S>::kTW;
  const int64_t cl = t.c0 + t.lane * V;
  const int cvalid = static_cast<int>(cl >= p.C ? 0 : (p.C - cl < V ? p.C - cl : V));
  const int64_t oh = t.r0 + t.row;
  bool ok[PX];
#pragma unroll
  for (int q = 0; q < PX; ++q) ok[q] = oh < p.Ho && t.c0w + t.ct * PX + q < p.Wo;
  // Pixel q of this thread lives at pix + q * C (NHWC contiguous output / y).
  const int64_t pix = ((t.n * p.Ho + oh) * p.Wo + t.c0w + t.ct * PX) * p.C + cl;
  if constexpr (EVAL) {  // p.mode == kOut
    A sc[V], sh[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sc[i] = sh[i] = A(0);
      if (i < cvalid) {
        const BnAffine<A> f =
            fold_bn<A>(p.gamma[cl + i], p.beta[cl + i], p.mean[cl + i], p.var[cl + i], p.eps);
        sc[i] = f.scale;
        sh[i] = f.shift;
      }
    }
    with_act(p.act, [&](auto a) { apply_act<decltype(a)::value>(acc, sc, sh); });
    with_dtype<A>(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      T* out = static_cast<T*>(p.out) + pix;
#pragma unroll
      for (int q = 0; q < PX; ++q)
        if (ok[q]) store_n<V>(out + q * p.C, p.out_vec, cvalid, acc[q]);
    });
    return;
  }
  A* part = p.part + t.tile * 2 * p.C;
  if (p.mode == kStats) {
    // Two-pass (mean, M2) of the tile, from the registers: exact enough for Chan's combination.
    const int64_t rows_v = p.Ho - t.r0 < Tl::kRows ? p.Ho - t.r0 : Tl::kRows;
    const int64_t cols_v = p.Wo - t.c0w < TW ? p.Wo - t.c0w : TW;
    const A count = static_cast<A>(rows_v * cols_v);
    A s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      s[i] = A(0);
#pragma unroll
      for (int q = 0; q < PX; ++q) s[i] += ok[q] ? acc[q][i] : A(0);
    }
    reduce_lanes(s, red);
    if (t.tid < Tl::kLanes)
#pragma unroll
      for (int i = 0; i < V; ++i) bmean[t.lane * V + i] = s[i] / count;
    __syncthreads();
    A m2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      m2[i] = A(0);
      const A m = bmean[t.lane * V + i];
#pragma unroll
      for (int q = 0; q < PX; ++q) {
        const A d = acc[q][i] - m;
        m2[i] += ok[q] ? d * d : A(0);
      }
      s[i] = m;
    }
    reduce_lanes(m2, red);
    if (t.tid < Tl::kLanes) write_pair(part, p.C, cl, cvalid, s, m2);
    if (t.cb == 0 && t.tid == 0) p.counts[t.tile] = count;
    return;
  }
  // kBwd: y stored for the dy pass; sums of g and g * xhat.
  A mu[V], is[V], ga[V], be[V], sg[V], sgx[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const bool c_ok = i < cvalid;
    mu[i] = c_ok ? p.mean[cl + i] : A(0);
    is[i] = c_ok ? inv_std<A>(p.var[cl + i], p.eps) : A(0);
    ga[i] = c_ok ? p.gamma[cl + i] : A(0);
    be[i] = c_ok ? p.beta[cl + i] : A(0);
    sg[i] = sgx[i] = A(0);
  }
  A gv[PX][V];
  with_dtype<A>(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(p.go) + t.n * p.go_sn + oh * p.go_sh +
                  (t.c0w + t.ct * PX) * p.go_sw + cl;
#pragma unroll
    for (int q = 0; q < PX; ++q) {
      if (ok[q]) {
        load_n<V>(go + q * p.go_sw, p.go_vec, cvalid, gv[q]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) gv[q][i] = A(0);
      }
    }
  });
  const bool y_vec = p.C % V == 0;
#pragma unroll
  for (int q = 0; q < PX; ++q)
    if (ok[q]) store_n<V>(p.y + pix + q * p.C, y_vec, cvalid, acc[q]);
  with_act(p.act, [&](auto a) {
    bn_act_grad<decltype(a)::value>(acc, gv, ok, mu, is, ga, be, sg, sgx);
  });
  reduce_lanes(sg, red);
  reduce_lanes(sgx, red);
  if (t.tid < Tl::kLanes) write_pair(part, p.C, cl, cvalid, sg, sgx);
}

template <typename A, int K, int S, bool EVAL>
__device__ __forceinline__ void dw_fwd_block(const DwFwdParams<A>& p) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, PX = FwdShape<S>::kPX;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ __align__(16) A red[4 * CB];
  __shared__ __align__(16) A bmean[CB];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const Ctx t = make_ctx<A>(p.tiles_h, p.tiles_w, FwdShape<S>::kTW, p.table, p.k, p.pad);
  load_weights<A>(smem, p.w + t.woff, t.k);
  A acc[PX][V];
#pragma unroll
  for (int q = 0; q < PX; ++q)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[q][i] = A(0);
  if constexpr (K == kMixed) {
    switch (t.k) {  // block-uniform
      case 3: fwd_conv_halo<A, 3, S>(p, t, smem, acc); break;
      case 5: fwd_conv_halo<A, 5, S>(p, t, smem, acc); break;
      case 7: fwd_conv_halo<A, 7, S>(p, t, smem, acc); break;
      case 9: fwd_conv_halo<A, 9, S>(p, t, smem, acc); break;
      default: fwd_conv_staged<A, S>(p, t, smem, acc); break;
    }
  } else if constexpr (K == kStaged) {
    fwd_conv_staged<A, S>(p, t, smem, acc);
  } else {
    fwd_conv_halo<A, K, S>(p, t, smem, acc);
  }
  fwd_epilogue<A, S, EVAL>(p, t, acc, red, bmean);
}

// Resident blocks per SM that the single-k forward kernels' register allocation must allow:
// the most that ptxas fits without spilling (sm_80, sm_90). Unbounded, the k=3 kernel took 88
// registers (5 blocks per SM) and ran latency-bound on an H200 (Nsight Compute: 30% occupancy,
// 23% of DRAM bandwidth); its eval instance fits 64 (8 blocks).
template <int K, bool EVAL>
constexpr int dw_fwd_min_blocks() {
  if constexpr (!EVAL) return 5;
  return K == 3 ? 8 : (K == 5 || K == kStaged) ? 6 : 5;
}

template <typename A, int K, int S, bool EVAL>
__global__ void __launch_bounds__(Tiling<A>::kThreads, dw_fwd_min_blocks<K, EVAL>())
    dw_fwd_kernel(const DwFwdParams<A> p) {
  dw_fwd_block<A, K, S, EVAL>(p);
}

template <typename A, int S, bool EVAL>
__global__ void __launch_bounds__(Tiling<A>::kThreads, kMixedMinBlocks)
    dw_fwd_mixed_kernel(const DwFwdParams<A> p) {
  dw_fwd_block<A, kMixed, S, EVAL>(p);
}

// ---- backward: grad_input (transposed depthwise conv of dy) and dweight partials -------------

// Input column of pixel q of column thread ct (BwdShape): at stride 2 one parity class.
template <int S>
__device__ __forceinline__ int bwd_col(int ct, int q) {
  if constexpr (S == 1) {
    return ct * BwdShape::kPX + q;
  } else {
    return (ct >> 1) * 2 * BwdShape::kPX + (ct & 1) + 2 * q;
  }
}

template <typename A, int S, typename T>
__device__ __forceinline__ void bwd_store_dx(const DwBwdInputParams<A>& p, const Ctx& t,
                                             const A (&acc)[BwdShape::kPX][Tiling<A>::kVec],
                                             int cvalid) {
  constexpr int V = Tiling<A>::kVec;
  const int64_t ih = t.r0 + t.row;
  if (ih >= p.H) return;
  T* dx = static_cast<T*>(p.dx) + ((t.n * p.H + ih) * p.W) * p.C + t.c0 + t.lane * V;
#pragma unroll
  for (int q = 0; q < BwdShape::kPX; ++q) {
    const int64_t iw = t.c0w + bwd_col<S>(t.ct, q);
    if (iw < p.W) store_n<V>(dx + iw * p.C, p.dx_vec, cvalid, acc[q]);
  }
}

// dweight partials of the tile from the shared x tile and dy halo: each (tap, lane) item sums
// x(i) * dy(o) over the tile's input pixels i that meet an output o through the tap.
template <typename A, int S>
__device__ __forceinline__ void bwd_dweight_halo(const DwBwdInputParams<A>& p, const Ctx& t,
                                                 int k, const A* xs, const A* dys, int OWP,
                                                 int64_t oh_lo, int64_t ow_lo) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, TW = BwdShape::kTW, XP = TW | 1;
  const int64_t D = p.dil;
  A* part = p.dw_part + t.tile * p.P + t.woff;
  for (int tap = t.pt; tap < k * k; tap += Tl::kPixelThreads) {
    const int kh = tap / k, kw = tap - kh * k;
    const int64_t u0 = t.r0 + t.pad - kh * D, v0 = t.c0w + t.pad - kw * D;  // = o * S at r, c = 0
    const int ra = S == 2 ? static_cast<int>(u0 & 1) : 0;
    const int ca = S == 2 ? static_cast<int>(v0 & 1) : 0;
    const int oc0 = static_cast<int>(floor_div(v0 + ca, S) - ow_lo);
    A s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) s[i] = A(0);
    for (int r = ra; r < Tl::kRows; r += S) {
      const int orow = static_cast<int>(floor_div(u0 + r, S) - oh_lo);
      const A* xr = xs + (r * XP + ca) * CB + t.lane * V;
      const A* dr = dys + (orow * OWP + oc0) * CB + t.lane * V;
#pragma unroll
      for (int j = 0; j < TW / S; ++j) {
        if (S == 2 && ca + 2 * j >= TW) break;
        const Pack<A, V> xv = ld<V>(xr + j * S * CB);
        const Pack<A, V> dv = ld<V>(dr + j * CB);
#pragma unroll
        for (int i = 0; i < V; ++i) s[i] += xv.v[i] * dv.v[i];
      }
    }
    Pack<A, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = s[i];
    st<V>(part + tap * CB + t.lane * V, o);
  }
}

template <typename A, int KT, int S>
__device__ __forceinline__ void bwd_input_halo(const DwBwdInputParams<A>& p, const Ctx& t,
                                               A* smem,
                                               A (&acc)[BwdShape::kPX][Tiling<A>::kVec]) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, PX = BwdShape::kPX, TW = BwdShape::kTW;
  constexpr int XP = TW | 1;
  const int64_t D = p.dil;
  const IndexRange rr = transposed_range(t.r0, t.r0 + Tl::kRows - 1, KT, S, t.pad, D);
  const IndexRange cr = transposed_range(t.c0w, t.c0w + TW - 1, KT, S, t.pad, D);
  const int OHT = static_cast<int>(rr.hi - rr.lo + 1), OWT = static_cast<int>(cr.hi - cr.lo + 1);
  const int OWP = OWT | 1;
  A* dys = smem + KT * KT * CB;
  A* xs = dys + OHT * OWP * CB;
  load_tile<A>(dys, OHT, OWT, OWP, p.dy + t.n * p.Ho * p.Wo * p.C + t.c0, p.Wo * p.C, p.C, rr.lo,
               1, cr.lo, 1, p.Ho, p.Wo, p.C - t.c0, p.dy_vec);
  with_dtype<A>(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xn = static_cast<const T*>(p.x) + t.n * p.x_sn + t.c0;
    load_tile<A>(xs, Tl::kRows, TW, XP, xn, p.x_sh, p.x_sw, t.r0, 1, t.c0w, 1, p.H, p.W,
                 p.C - t.c0, p.x_vec);
  });
  __syncthreads();
  const int64_t ih = t.r0 + t.row, iwa = t.c0w + bwd_col<S>(t.ct, 0);
#pragma unroll
  for (int kh = 0; kh < KT; ++kh) {
    const int64_t u = ih + t.pad - kh * D;
    if (S == 2 && (u & 1)) continue;
    const int orow = static_cast<int>(floor_div(u, S) - rr.lo);
#pragma unroll
    for (int kw = 0; kw < KT; ++kw) {
      const int64_t v = iwa + t.pad - kw * D;
      if (S == 2 && (v & 1)) continue;
      const int ocol = static_cast<int>(floor_div(v, S) - cr.lo);
      const Pack<A, V> wv = ld<V>(smem + (kh * KT + kw) * CB + t.lane * V);
      const A* dp = dys + (orow * OWP + ocol) * CB + t.lane * V;
#pragma unroll
      for (int q = 0; q < PX; ++q) {
        const Pack<A, V> dv = ld<V>(dp + q * CB);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[q][i] += wv.v[i] * dv.v[i];
      }
    }
  }
  bwd_dweight_halo<A, S>(p, t, KT, xs, dys, OWP, rr.lo, cr.lo);
}

// Any k and dilation: per tap, the dy value each tile pixel meets is staged in a tile of the
// input tile's shape; dweight is reduced over the block per tap.
template <typename A, int S>
__device__ __forceinline__ void bwd_input_staged(const DwBwdInputParams<A>& p, const Ctx& t,
                                                 A* smem, A* red,
                                                 A (&acc)[BwdShape::kPX][Tiling<A>::kVec]) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, PX = BwdShape::kPX, TW = BwdShape::kTW;
  constexpr int XP = TW | 1;
  const int k = t.k;
  const int64_t D = p.dil;
  A* dsm = smem + k * k * CB;
  A* xs = dsm + Tl::kRows * XP * CB;
  with_dtype<A>(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xn = static_cast<const T*>(p.x) + t.n * p.x_sn + t.c0;
    load_tile<A>(xs, Tl::kRows, TW, XP, xn, p.x_sh, p.x_sw, t.r0, 1, t.c0w, 1, p.H, p.W,
                 p.C - t.c0, p.x_vec);
  });
  const A* dyn = p.dy + t.n * p.Ho * p.Wo * p.C + t.c0;
  A* part = p.dw_part + t.tile * p.P + t.woff;
  for (int kh = 0; kh < k; ++kh) {
    for (int kw = 0; kw < k; ++kw) {
      __syncthreads();
      constexpr int chunks = CB / V;
      for (int i = threadIdx.x; i < Tl::kRows * TW * chunks; i += blockDim.x) {
        const int ch = i % chunks, pix = i / chunks, r = pix / TW, c = pix - r * TW;
        const int64_t u = t.r0 + r + t.pad - kh * D, v = t.c0w + c + t.pad - kw * D;
        const int64_t oh = floor_div(u, S), ow = floor_div(v, S);
        const int64_t cvalid = p.C - t.c0 - ch * V;
        A val[V];
        if (oh * S == u && ow * S == v && oh >= 0 && oh < p.Ho && ow >= 0 && ow < p.Wo &&
            cvalid > 0) {
          load_n<V>(dyn + (oh * p.Wo + ow) * p.C + ch * V, p.dy_vec,
                    static_cast<int>(cvalid < V ? cvalid : V), val);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) val[e] = A(0);
        }
        Pack<A, V> pk;
#pragma unroll
        for (int e = 0; e < V; ++e) pk.v[e] = val[e];
        st<V>(dsm + (r * XP + c) * CB + ch * V, pk);
      }
      __syncthreads();
      const Pack<A, V> wv = ld<V>(smem + (kh * k + kw) * CB + t.lane * V);
      A s[V];
#pragma unroll
      for (int i = 0; i < V; ++i) s[i] = A(0);
#pragma unroll
      for (int q = 0; q < PX; ++q) {
        const int off = (t.row * XP + bwd_col<S>(t.ct, q)) * CB + t.lane * V;
        const Pack<A, V> dv = ld<V>(dsm + off);
        const Pack<A, V> xv = ld<V>(xs + off);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          acc[q][i] += wv.v[i] * dv.v[i];
          s[i] += xv.v[i] * dv.v[i];
        }
      }
      reduce_lanes(s, red);
      if (t.tid < Tl::kLanes) {
        Pack<A, V> o;
#pragma unroll
        for (int i = 0; i < V; ++i) o.v[i] = s[i];
        st<V>(part + (kh * k + kw) * CB + t.lane * V, o);
      }
    }
  }
}

template <typename A, int K, int S>
__device__ __forceinline__ void dw_bwd_input_block(const DwBwdInputParams<A>& p) {
  using Tl = Tiling<A>;
  constexpr int V = Tl::kVec, CB = Tl::kCB, PX = BwdShape::kPX;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ __align__(16) A red[4 * CB];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const Ctx t = make_ctx<A>(p.tiles_h, p.tiles_w, BwdShape::kTW, p.table, p.k, p.pad);
  load_weights<A>(smem, p.w + t.woff, t.k);
  A acc[PX][V];
#pragma unroll
  for (int q = 0; q < PX; ++q)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[q][i] = A(0);
  if constexpr (K == kMixed) {
    switch (t.k) {  // block-uniform
      case 3: bwd_input_halo<A, 3, S>(p, t, smem, acc); break;
      case 5: bwd_input_halo<A, 5, S>(p, t, smem, acc); break;
      case 7: bwd_input_halo<A, 7, S>(p, t, smem, acc); break;
      case 9: bwd_input_halo<A, 9, S>(p, t, smem, acc); break;
      default: bwd_input_staged<A, S>(p, t, smem, red, acc); break;
    }
  } else if constexpr (K == kStaged) {
    bwd_input_staged<A, S>(p, t, smem, red, acc);
  } else {
    bwd_input_halo<A, K, S>(p, t, smem, acc);
  }
  const int64_t cl = t.c0 + t.lane * V;
  const int cvalid = static_cast<int>(cl >= p.C ? 0 : (p.C - cl < V ? p.C - cl : V));
  with_dtype<A>(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    bwd_store_dx<A, S, T>(p, t, acc, cvalid);
  });
}

template <typename A, int K, int S>
__global__ void __launch_bounds__(Tiling<A>::kThreads)
    dw_bwd_input_kernel(const DwBwdInputParams<A> p) {
  dw_bwd_input_block<A, K, S>(p);
}

template <typename A, int S>
__global__ void __launch_bounds__(Tiling<A>::kThreads, kMixedMinBlocks)
    dw_bwd_input_mixed_kernel(const DwBwdInputParams<A> p) {
  dw_bwd_input_block<A, kMixed, S>(p);
}

// ---- launchers -------------------------------------------------------------------------------

template <typename Kernel>
void prepare_launch(Kernel kernel, int64_t tiles, int64_t cblocks, size_t smem) {
  TORCH_CHECK(tiles >= 1 && tiles <= INT32_MAX, "effkernels cuda: too many spatial tiles (",
              tiles, ")");
  TORCH_CHECK(cblocks >= 1 && cblocks <= 65535, "effkernels cuda: too many channel blocks (",
              cblocks, ")");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
}

template <typename A, int K, int S>
void launch_dw_fwd(const DwFwdParams<A>& p, int64_t tiles, int64_t cblocks, size_t smem,
                   cudaStream_t stream) {
  // The eval forward (kOut) has a kernel of its own: the training modes' epilogue (statistics,
  // the backward's first pass) holds ~40 more registers per thread, which capped a shared kernel
  // at 5 resident blocks per SM (88 registers; H200, Nsight Compute) and left it latency-bound.
  void (*kernel)(const DwFwdParams<A>);
  const bool eval = p.mode == kOut;
  if constexpr (K == kMixed) {
    kernel = eval ? dw_fwd_mixed_kernel<A, S, true> : dw_fwd_mixed_kernel<A, S, false>;
  } else {
    kernel = eval ? dw_fwd_kernel<A, K, S, true> : dw_fwd_kernel<A, K, S, false>;
  }
  prepare_launch(kernel, tiles, cblocks, smem);
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(cblocks)),
           Tiling<A>::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A, int K, int S>
void launch_dw_bwd_input(const DwBwdInputParams<A>& p, int64_t tiles, int64_t cblocks,
                         size_t smem, cudaStream_t stream) {
  void (*kernel)(const DwBwdInputParams<A>);
  if constexpr (K == kMixed) {
    kernel = dw_bwd_input_mixed_kernel<A, S>;
  } else {
    kernel = dw_bwd_input_kernel<A, K, S>;
  }
  prepare_launch(kernel, tiles, cblocks, smem);
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(cblocks)),
           Tiling<A>::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace effkernels::cuda

#define EFFK_INSTANTIATE_DW_FWD(A, K, S)                                                    \
  template void effkernels::cuda::launch_dw_fwd<A, K, S>(                                   \
      const effkernels::cuda::DwFwdParams<A>&, int64_t, int64_t, size_t, cudaStream_t);
#define EFFK_INSTANTIATE_DW_BWD(A, K, S)                                                    \
  template void effkernels::cuda::launch_dw_bwd_input<A, K, S>(                             \
      const effkernels::cuda::DwBwdInputParams<A>&, int64_t, int64_t, size_t, cudaStream_t);
