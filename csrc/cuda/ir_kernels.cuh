// The fused CUDA inverted-residual inference kernel (see ir_params.h for the tiling). Included
// only by the instantiation files ir_fwd_*.cu. Conversions and the activation switch are
// dw_kernels.cuh's; BN folding and the halo arithmetic are effkernels/conv_geometry.h's.
//
// Dynamic shared memory (A = accumulation type), in this order:
//   xs   [P_in][KC + 1]  x channels k0..k0+KC of the input tile (expand only; +1: the 4 pixels
//                        a warp reads at once fall on different banks)
//   wes  [KC][CC + 1]    expand weights * BN scale (expand only)
//   hid  [P_in][CC + 1]  the hidden chunk (expand accumulators, then act(... + shift))
//   wds  [K*K][CC + 1]   depthwise weights * BN scale
//   dws  [NT][CC]        depthwise output chunk (* SE gate)
//   wps  [CC][J*32 + 1]  project weights * BN scale (kIrProject only)
// The +1 pitches keep the transposing stores (weights) and the expand's 4-pixel x 8-channel-group
// warp accesses of hid free of bank conflicts; reads along channels stay conflict-free.
#pragma once

#include "dw_kernels.cuh"
#include "effkernels/conv_geometry.h"
#include "ir_params.h"

namespace effkernels::cuda {
namespace ir {

// 2 resident blocks per SM: <= 128 registers per thread.
constexpr int kMinBlocks = 2;

template <typename A>
__device__ __forceinline__ A bn_scale(const A* const (&bn)[4], int64_t c, A eps) {
  return fold_bn<A>(bn[0][c], bn[1][c], bn[2][c], bn[3][c], eps).scale;
}

template <typename A>
__device__ __forceinline__ A bn_shift(const A* const (&bn)[4], int64_t c, A eps) {
  return fold_bn<A>(bn[0][c], bn[1][c], bn[2][c], bn[3][c], eps).shift;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kIrThreads, kMinBlocks) ir_forward_kernel(const IrParams<T> p) {
  using A = ir_acc_t<T>;
  using Tl = IrTile<NT>;
  constexpr int TH = Tl::TH, TW = Tl::TW, PI = Tl::kPix, JM = ir_jmax<A, NT>();
  constexpr int XP = kIrKC + 1;
  extern __shared__ __align__(16) unsigned char ir_smem[];

  const int tid = threadIdx.x;
  const int tile = blockIdx.x;
  const int64_t n = blockIdx.y;
  const int64_t oh0 = static_cast<int64_t>(tile / p.tiles_w) * TH;
  const int64_t ow0 = static_cast<int64_t>(tile % p.tiles_w) * TW;
  const int64_t ih0 = oh0 * p.stride - p.pad, iw0 = ow0 * p.stride - p.pad;
  const int64_t cob = static_cast<int64_t>(blockIdx.z) * p.J * 32;  // first output channel
  const int CC = p.CC, IW = p.IW, KK = p.K * p.K;
  const int PIN = p.IH * p.IW;
  const int JP = p.J * 32;
  const int CP = CC + 1, WPP = JP + 1;  // pitches (see above)
  const bool expand = p.we != nullptr;
  const bool project = p.mode == kIrProject;

  A* xs = reinterpret_cast<A*>(ir_smem);
  A* wes = xs + (expand ? PIN * XP : 0);
  A* hid = wes + (expand ? kIrKC * CP : 0);
  A* wds = hid + PIN * CP;
  A* dws = wds + KK * CP;
  A* wps = dws + NT * CC;

  const T* xn = p.x + n * p.sN;
  auto in_image = [&](int q, int64_t& off) {  // input-tile pixel q: inside the image?
    const int r = q / IW, c = q - r * IW;
    const int64_t ih = ih0 + r, iw = iw0 + c;
    off = ih * p.sH + iw * p.sW;
    return ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
  };

  // Projection accumulators: pixel pw + 8i, output channel cob + lane + 32j.
  const int lane = tid % 32, pw = tid / 32;
  A acc[PI][JM];
#pragma unroll
  for (int i = 0; i < PI; ++i)
#pragma unroll
    for (int j = 0; j < JM; ++j) acc[i][j] = A(0);

  for (int64_t c0 = 0; c0 < p.C; c0 += CC) {
    // ---- 1. hidden chunk of the input tile ----
    if (expand) {
      for (int64_t k0 = 0; k0 < p.Cin; k0 += kIrKC) {
        __syncthreads();  // xs / wes / hid of the previous step (or chunk) are consumed
        for (int it = tid; it < PIN * kIrKC; it += kIrThreads) {
          const int q = it / kIrKC, kk = it - q * kIrKC;
          const int64_t k = k0 + kk;
          int64_t off;
          const bool ok = in_image(q, off) && k < p.Cin;
          xs[q * XP + kk] = ok ? cvt_in<A>(xn[off + k]) : A(0);
        }
        for (int it = tid; it < CC * kIrKC; it += kIrThreads) {
          const int c = it / kIrKC, kk = it - c * kIrKC;
          const int64_t ch = c0 + c, k = k0 + kk;
          wes[kk * CP + c] = ch < p.C && k < p.Cin
                                 ? cvt_in<A>(p.we[ch * p.Cin + k]) * bn_scale<A>(p.bn_e, ch, p.eps)
                                 : A(0);
        }
        __syncthreads();
        const int CG = CC / 4;
        for (int it = tid; it < PIN * CG; it += kIrThreads) {
          const int q = it / CG, c = (it - q * CG) * 4;
          A a[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = k0 == 0 ? A(0) : hid[q * CP + c + e];
#pragma unroll 4
          for (int kk = 0; kk < kIrKC; ++kk) {
            const A xv = xs[q * XP + kk];
#pragma unroll
            for (int e = 0; e < 4; ++e) a[e] = fma(xv, wes[kk * CP + c + e], a[e]);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) hid[q * CP + c + e] = a[e];
        }
      }
      __syncthreads();
      with_act(p.act, [&](auto tag) {
        constexpr Act ACT = decltype(tag)::value;
        for (int it = tid; it < PIN * CC; it += kIrThreads) {
          const int q = it / CC, c = it - q * CC;
          const int64_t ch = c0 + c;
          int64_t off;
          const bool ok = in_image(q, off) && ch < p.C;
          const A v = p.Cin > 0 ? hid[q * CP + c] : A(0);  // Cin == 0: no expand step ran
          hid[q * CP + c] = ok ? act_forward<ACT>(v + bn_shift<A>(p.bn_e, ch, p.eps)) : A(0);
        }
      });
    } else {
      __syncthreads();  // hid / wds / dws / wps of the previous chunk are consumed
      for (int it = tid; it < PIN * CC; it += kIrThreads) {
        const int q = it / CC, c = it - q * CC;
        const int64_t ch = c0 + c;
        int64_t off;
        const bool ok = in_image(q, off) && ch < p.C;
        hid[q * CP + c] = ok ? cvt_in<A>(xn[off + ch]) : A(0);
      }
    }
    // Depthwise and project weights of the chunk (BN scales folded in), zero past C / Cout.
    for (int it = tid; it < CC * KK; it += kIrThreads) {
      const int c = it / KK, t = it - c * KK;
      const int64_t ch = c0 + c;
      wds[t * CP + c] =
          ch < p.C ? cvt_in<A>(p.wd[ch * KK + t]) * bn_scale<A>(p.bn_d, ch, p.eps) : A(0);
    }
    if (project) {
      for (int it = tid; it < JP * CC; it += kIrThreads) {
        const int j = it / CC, c = it - j * CC;
        const int64_t co = cob + j, ch = c0 + c;
        wps[c * WPP + j] = co < p.Cout && ch < p.C
                              ? cvt_in<A>(p.wp[co * p.C + ch]) * bn_scale<A>(p.bn_p, co, p.eps)
                              : A(0);
      }
    }
    __syncthreads();

    // ---- 2. depthwise chunk: dws[q][c], c fastest (a warp reads one hidden pixel's chunk) ----
    with_act(p.act, [&](auto tag) {
      constexpr Act ACT = decltype(tag)::value;
      for (int it = tid; it < NT * CC; it += kIrThreads) {
        const int q = it / CC, c = it - q * CC;
        const int oy = q / TW, ox = q - oy * TW;
        const int64_t ch = c0 + c;
        const A* h = hid + (oy * p.stride * IW + ox * p.stride) * CP + c;
        A s = A(0);
        for (int i = 0; i < p.K; ++i) {
          const A* hr = h + i * p.dil * IW * CP;
          const A* wr = wds + i * p.K * CP + c;
          for (int j = 0; j < p.K; ++j) s = fma(hr[j * p.dil * CP], wr[j * CP], s);
        }
        A v = A(0);
        if (ch < p.C) {
          v = act_forward<ACT>(s + bn_shift<A>(p.bn_d, ch, p.eps));
          if (p.gate != nullptr) v *= p.gate[n * p.C + ch];
        }
        dws[it] = v;
      }
    });
    __syncthreads();

    if (!project) {
      // ---- SE pass 1: per-tile channel sums over the valid output pixels, pixel order ----
      for (int c = tid; c < CC; c += kIrThreads) {
        const int64_t ch = c0 + c;
        if (ch >= p.C) continue;
        A s = A(0);
        for (int q = 0; q < NT; ++q) {
          const int oy = q / TW, ox = q - oy * TW;
          if (oh0 + oy < p.Ho && ow0 + ox < p.Wo) s += dws[q * CC + c];
        }
        p.part[(n * p.tiles + tile) * p.C + ch] = s;
      }
      continue;  // the next chunk starts with a barrier
    }

    // ---- 3. project: acc[i][j] += sum_c dws[pw + 8i][c] * wps[c][lane + 32j] ----
    for (int c = 0; c < CC; ++c) {
      A d[PI];
#pragma unroll
      for (int i = 0; i < PI; ++i) d[i] = dws[(pw + 8 * i) * CC + c];  // warp broadcast
#pragma unroll
      for (int j = 0; j < JM; ++j) {
        if (j < p.J) {
          const A w = wps[c * WPP + lane + 32 * j];
#pragma unroll
          for (int i = 0; i < PI; ++i) acc[i][j] = fma(d[i], w, acc[i][j]);
        }
      }
    }
    // The next chunk's first writes (xs / hid) come after its first barrier; wps / dws are
    // rewritten only after the barriers that follow, so no barrier is needed here.
  }
  if (!project) return;

  // ---- epilogue: + shift (+ x), cast, store ----
  T* out = p.out + n * p.Ho * p.Wo * p.Cout;
#pragma unroll
  for (int j = 0; j < JM; ++j) {
    if (j >= p.J) continue;
    const int64_t co = cob + lane + 32 * j;
    if (co >= p.Cout) continue;
    const A sh = bn_shift<A>(p.bn_p, co, p.eps);
#pragma unroll
    for (int i = 0; i < PI; ++i) {
      const int q = pw + 8 * i, oy = q / TW, ox = q - oy * TW;
      const int64_t oh = oh0 + oy, ow = ow0 + ox;
      if (oh >= p.Ho || ow >= p.Wo) continue;
      A z = acc[i][j] + sh;
      if (p.skip) z += cvt_in<A>(xn[oh * p.sH + ow * p.sW + co]);
      out[(oh * p.Wo + ow) * p.Cout + co] = cvt_out<T>(z);
    }
  }
}

}  // namespace ir

template <typename T, int NT>
void launch_ir_forward(const IrParams<T>& p, int64_t passes, size_t smem, cudaStream_t stream) {
  if (p.tiles == 0 || p.N == 0 || passes == 0) return;
  TORCH_CHECK(p.N <= 65535 && passes <= 65535,
              "effkernels cuda: inverted_residual grid too large (", p.tiles, " x ", p.N, " x ",
              passes, ")");
  auto kernel = ir::ir_forward_kernel<T, NT>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<dim3(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.N),
                static_cast<unsigned>(passes)),
           kIrThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace effkernels::cuda

#define EFFK_INSTANTIATE_IR(T)                                                                \
  template void effkernels::cuda::launch_ir_forward<T, 64>(                                   \
      const effkernels::cuda::IrParams<T>&, int64_t, size_t, cudaStream_t);                   \
  template void effkernels::cuda::launch_ir_forward<T, 32>(                                   \
      const effkernels::cuda::IrParams<T>&, int64_t, size_t, cudaStream_t);                   \
  template void effkernels::cuda::launch_ir_forward<T, 16>(                                   \
      const effkernels::cuda::IrParams<T>&, int64_t, size_t, cudaStream_t);
