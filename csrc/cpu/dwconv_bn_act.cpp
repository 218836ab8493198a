// CPU depthwise conv + BatchNorm + activation, forward and backward.
//
// Layout. Every pass reads x (and grad_out) through channels_innermost(): channel stride 1 with
// any N/H/W strides, so NHWC tensors, their channel slices (mixconv) and W-strided views are
// used in place. Results are computed into fresh NHWC buffers and returned in x's memory format.
// An NCHW input therefore costs one NHWC copy of x (and of grad_out in backward) on the way in
// and one copy of the result back to NCHW on the way out; NHWC is the fast path.
//
// Channel groups. The kernels work on a layer of channel groups, each with its own kernel size
// and padding (ConvParams / GradInputParams describe one group: its channels, K, pad, and
// pointers at its first channel; `ldo` is the layer's pixel stride). dwconv_bn_act is a layer
// of one group; mixconv_bn_act one group per kernel size. Every pass runs all groups of an
// image row in the same parallel task, straight into their channel slices of one NHWC buffer;
// BN statistics and BN-backward sums are per channel over whole rows. A group's channel tail
// (C % 16) is one more overlapping vector block (tail_block), not scalar steps.
//
// Passes (each an at::parallel_for over image rows; every reduction is split into chunks fixed
// by the problem and combined in chunk order, so the bits do not depend on the thread count):
//   forward, eval      conv with the BN scale folded into the weights -> + shift -> act -> out
//                      (outputs larger than the threads' caches: streaming stores, stream_results).
//   forward, training  (1) y = conv(x) into the output buffer (fp32 scratch for fp16/bf16) and
//                      cpu::ChannelStats over fixed runs of output rows; (2) out = act(y * scale
//                      + shift) elementwise, in place (scale/shift from fold_bn).
//   backward           (1) y = conv(x) into an fp32 (fp64) NHWC buffer, per-chunk sums of
//                      g = grad_out * act'(z) and g * xhat; (2) y -> dy in place;
//                      (3) per input row: grad_x by transposed conv of dy, scattered into a
//                      private row buffer, and the chunk's dweight partials from the same x row.
//
// ISA. The library is built without arch flags (x86-64 baseline), so each hot row kernel is a
// function template with target_clones (x86-64-v4 / v3 / default): the loader picks AVX-512 or
// AVX2 code at run time. GCC does not inline ordinary functions (lambdas included, so also
// EFFK_DISPATCH_ACT's) into a clone of another `arch=`, hence `flatten` on the clones: everything
// they call is compiled into them with their ISA. Accumulators are GCC vectors of 64 bytes
// (16 floats, 8 doubles): one zmm in the v4 clone, two ymm in v3, four xmm in the default one.
//
// Forward conv (measured on the 2-core Zen 4 build machine; numbers in the comments below):
//   fast path   fp32 and bf16, k in {3, 5, 7, 9} (template), stride 1/2, dilation 1, the
//               columns whose window is inside the row (window rows outside the image read a
//               zero row): per channel block of 16, the k*k weight vectors are loaded once
//               per row and each input vector once per window row (sliding window over 4
//               output pixels).
//   generic     any k/stride/dilation/dtype: 4 pixels x 16 channels per step with run-time tap
//               loops; border columns 1 pixel x 64 channels with their own tap ranges.
//   Both add the BN shift and apply the activation from the registers (no second pass), and
//   prefetch the input rows the next output row adds.
#include "dwconv_bn_act.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "effkernels/activation.h"
#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"
#include "effkernels/op_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The 64-byte vectors never cross a call boundary (their helpers are always_inline), so GCC's
// note that passing them by value would change the ABI without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define EFFK_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define EFFK_CPU_CLONES
#endif

namespace effkernels::cpu {
namespace {

// ---- index helpers (candidates for conv_geometry.h) -----------------------------------------

// The taps t in [lo, hi) of a `taps`-long filter with step `step` whose input index
// i0 + t * step lies in [0, n). Also used with the output columns as "taps" in backward.
struct TapRange {
  int64_t lo, hi;
};

EFFK_INLINE TapRange tap_range(int64_t i0, int64_t n, int64_t taps, int64_t step) {
  const int64_t lo = i0 >= 0 ? 0 : (-i0 + step - 1) / step;
  const int64_t hi = i0 > n - 1 ? 0 : std::min(taps, (n - 1 - i0) / step + 1);
  return {std::min(lo, taps), std::max(std::min(lo, taps), hi)};
}

// Rows [begin, end) of chunk `i` when `rows` rows are cut into chunks of `per` rows.
struct Chunking {
  int64_t rows, per, count;
  explicit Chunking(int64_t rows_, int64_t partial_size) : rows(rows_) {
    // Enough chunks for the threads, bounded partial memory, and never a function of the
    // thread count (so the combined sums are bitwise reproducible).
    const int64_t by_mem =
        std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, partial_size));
    const int64_t want = std::max<int64_t>(1, std::min({rows, int64_t(64), by_mem}));
    per = (rows + want - 1) / want;
    count = (rows + per - 1) / per;
  }
  int64_t begin(int64_t i) const { return i * per; }
  int64_t end(int64_t i) const { return std::min(rows, (i + 1) * per); }
};

// ---- vectors of channels ---------------------------------------------------------------------

template <typename A>
constexpr int kLanes = 64 / static_cast<int>(sizeof(A));

// L channels of accumulation type A: a GCC vector for L > 1, a scalar for the channel tail.
template <typename A, int L>
struct LanesOf {
  typedef A type __attribute__((vector_size(L * sizeof(A))));
};
template <typename A>
struct LanesOf<A, 1> {
  using type = A;
};
template <typename A, int L>
using Vec = typename LanesOf<A, L>::type;

// Integer vectors of L lanes for the bf16 conversions (a bf16 is the top half of an fp32).
template <typename U, int L>
using UVec = typename GccVec<U, L>::type;

// Loads L channels of T as A (fp16/bf16 are widened at the load; bf16 by a vector zero-extend
// and shift, fp16 element by element).
template <typename A, int L, typename T>
EFFK_INLINE Vec<A, L> load(const T* p) {
  if constexpr (L == 1) {
    return static_cast<A>(*p);
  } else {
    Vec<A, L> v;
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(&v, p, sizeof(v));
    } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
      UVec<uint16_t, L> h;
      std::memcpy(&h, p, sizeof(h));
      const UVec<uint32_t, L> bits = __builtin_convertvector(h, UVec<uint32_t, L>) << 16;
      std::memcpy(&v, &bits, sizeof(v));
    } else {
      A tmp[L];
#pragma omp simd
      for (int i = 0; i < L; ++i) tmp[i] = static_cast<A>(p[i]);
      std::memcpy(&v, tmp, sizeof(v));
    }
    return v;
  }
}

template <typename A, int L>
EFFK_INLINE void store(A* p, const Vec<A, L>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// ---- forward conv ----------------------------------------------------------------------------

constexpr int kTile = 4;         // interior step: kTile pixels x 1 channel block
constexpr int kBorderGroup = 4;  // border step: 1 pixel x kBorderGroup channel blocks

// One channel group of a layer (dwconv: the only one; mixconv: one per kernel size). Channel
// indices c are the group's own, [0, g.C); x, shift and the output rows point at its first
// channel, whose index in the layer is c0.
template <typename T>
struct ConvParams {
  using A = acc_type<T>;
  DwGeometry g;  // the group's channels g.C, kernel g.K and padding g.pad; the rest the layer's
  int64_t c0;    // the group's first channel in the layer
  const T* x;    // x(n, c, h, w) = x[n*sn + h*sh + w*sw + c]
  int64_t sn, sh, sw;
  int64_t ldo;     // pixel stride of the output rows (the layer's channel count)
  const A* w;      // weights [kh][kw][c]; the BN scale is folded in for the output pass
  const A* shift;  // [c], added before the activation (zeros for the raw conv)
  Act act;         // Identity for the raw conv
  bool stream;     // streaming stores (stream_results) for the fast path's output lines
  // W * sw zeros: stands in for the window rows above and below the image in the fast path,
  // whose unrolled loops cannot afford a row check (it cost 30%).
  const T* zero_row;
};

// acc[q][b] += x(pixel q, taps, channels of block b) * w(taps, block b) over the taps kh x kw.
// x points at image n, channel block 0; `off` is the (possibly negative) offset of tap (0, 0) of
// pixel 0, so only in-range taps are ever dereferenced.
template <int P, int B, int L, typename T, typename A>
EFFK_INLINE void conv_tile(Vec<A, L> (&acc)[P][B], const ConvParams<T>& p, const T* x,
                           int64_t off, const A* w, TapRange kh, TapRange kw) {
  const DwGeometry& g = p.g;
  const int64_t row_step = g.dil * p.sh, tap_step = g.dil * p.sw, pixel_step = g.stride * p.sw;
  for (int64_t i = kh.lo; i < kh.hi; ++i) {
    const int64_t row = off + i * row_step;
    const A* wr = w + i * g.K * g.C;
    for (int64_t j = kw.lo; j < kw.hi; ++j) {
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const Vec<A, L> wv = load<A, L>(wr + j * g.C + b * L);
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q)
          acc[q][b] += load<A, L>(x + row + j * tap_step + q * pixel_step + b * L) * wv;
      }
    }
  }
}

// out[0..L) = O(act(acc + shift)). (L comes as a tag: template argument lists with commas do not
// survive EFFK_DISPATCH_ACT's macro argument.)
template <Act ACT, int L, typename A, typename O>
EFFK_INLINE void store_act(std::integral_constant<int, L>, O* out, const Vec<A, L>& acc,
                           const A* shift) {
  A z[L];
  store<A, L>(z, acc + load<A, L>(shift));
#pragma omp simd
  for (int i = 0; i < L; ++i) z[i] = act_forward<ACT>(z[i]);
  store_lanes<L>(z, out);
}

// The fast path's store: streaming stores are for fp32 lines only (the overload below).
template <Act ACT, int L, typename A, typename O>
EFFK_INLINE void store_act(std::integral_constant<int, L> lanes, O* out, const Vec<A, L>& acc,
                           const A* shift, bool /*stream*/) {
  store_act<ACT>(lanes, out, acc, shift);
}

// The same for a line of 16 fp32 results, written around the caches (stream_results) when
// `stream` and out is line-aligned.
template <Act ACT>
EFFK_INLINE void store_act(std::integral_constant<int, 16>, float* out,
                           const Vec<float, 16>& acc, const float* shift, bool stream) {
  float z[16];
  store<float, 16>(z, acc + load<float, 16>(shift));
#pragma omp simd
  for (int i = 0; i < 16; ++i) z[i] = act_forward<ACT>(z[i]);
  if (!(stream && stream_line(out, z))) std::memcpy(out, z, sizeof(z));
}

// P output pixels from column ow, channels [c, c + B*L) of output row `out`.
template <int P, int B, int L, typename T, typename O>
EFFK_INLINE void conv_step(const ConvParams<T>& p, const T* xn, O* out, int64_t ih0, TapRange kh,
                           int64_t ow, TapRange kw, int64_t c) {
  using A = acc_type<T>;
  const DwGeometry& g = p.g;
  using Lanes = std::integral_constant<int, L>;
  Vec<A, L> acc[P][B] = {};
  conv_tile<P, B, L>(acc, p, xn + c, ih0 * p.sh + (ow * g.stride - g.pad) * p.sw, p.w + c, kh, kw);
  EFFK_DISPATCH_ACT(p.act, [&] {
    for (int q = 0; q < P; ++q)
      for (int b = 0; b < B; ++b)
        store_act<ACT>(Lanes{}, out + (ow + q) * p.ldo + c + b * L, acc[q][b], p.shift + c + b * L);
  });
}

// The channel tail of a group of C >= L channels (C % L of them) is done as one more vector
// block [C - L, C) that overlaps the previous one: the overlapped channels are computed again by
// the same code with the same operands, so they get the same bits. Scalar tail steps cost as
// much as a dozen vector blocks (MixNet's groups of 120, 90, 300 channels paid ~1.5x for them).
// Only groups narrower than one vector take scalar steps.
EFFK_INLINE int64_t tail_block(int64_t C, int64_t L) { return C >= L ? C - L : -1; }

// Channels [0, C) of P pixels: groups of B vector blocks, then single blocks, then the tail.
template <int P, int B, typename T, typename O>
EFFK_INLINE void conv_pixels(const ConvParams<T>& p, const T* xn, O* out, int64_t ih0,
                             TapRange kh, int64_t ow, TapRange kw) {
  constexpr int L = kLanes<acc_type<T>>;
  const int64_t C = p.g.C;
  int64_t c = 0;
  for (; c + B * L <= C; c += B * L) conv_step<P, B, L>(p, xn, out, ih0, kh, ow, kw, c);
  for (; c + L <= C; c += L) conv_step<P, 1, L>(p, xn, out, ih0, kh, ow, kw, c);
  if (c == C) return;
  if (tail_block(C, L) >= 0) {
    conv_step<P, 1, L>(p, xn, out, ih0, kh, ow, kw, tail_block(C, L));
    return;
  }
  for (; c < C; ++c) conv_step<P, 1, 1>(p, xn, out, ih0, kh, ow, kw, c);
}

// Prefetches, for input columns [iw, iw + cols) and channels [c, c + nc), the input rows that the
// next output row adds (the bottom `stride` rows of its window). The hardware prefetchers see
// short per-pixel streams and do not run a row ahead on their own; this made the DRAM-bound
// layers 1.2-1.4x faster. Callers spread the requests over the row (a burst is dropped).
template <typename T>
EFFK_INLINE void prefetch_next_rows(const ConvParams<T>& p, const T* xn, int64_t ih0, int64_t iw,
                                    int64_t cols, int64_t c, int64_t nc) {
#if defined(__GNUC__)
  const DwGeometry& g = p.g;
  const int64_t lo = std::max<int64_t>(iw, 0), hi = std::min(iw + cols, g.W);
  const int64_t bytes = nc * static_cast<int64_t>(sizeof(T));
  xn += c;
  for (int64_t j = 0; j < g.stride; ++j) {
    const int64_t ih = ih0 + g.stride + (g.K - 1) * g.dil - j;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t col = lo; col < hi; ++col) {
      const char* px = reinterpret_cast<const char*>(xn + ih * p.sh + col * p.sw);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(px + b, 0, 2);
    }
  }
#endif
}

// kTile output pixels from column ow of channels [c, c + L), fp32, compile-time kernel size K
// and stride S (dilation 1). Each input vector of a window row is loaded once and used by every
// (pixel, tap) pair that reads it: ((kTile-1)*S + K) / (kTile*K) loads per FMA, where the
// generic step needs 5 loads per 4 FMAs (Zen 4 loads 64 bytes a cycle: the generic step is
// load-bound). EDGE tiles have input columns outside the row (those read as zeros) or fewer
// than kTile pixels in the row (`pixels` of them are stored); the others check neither.
template <int K, int S, bool EDGE, typename T, typename O>
EFFK_INLINE void conv_tile_k(const ConvParams<T>& p, const T* xn, O* out, int64_t ih0,
                             int64_t ow, int64_t c, const Vec<float, kLanes<float>> (&w)[K][K],
                             int64_t pixels) {
  constexpr int L = kLanes<float>, P = kTile;
  using V = Vec<float, L>;
  using Lanes = std::integral_constant<int, L>;
  const DwGeometry& g = p.g;
  const int64_t iw0 = ow * S - g.pad;
  prefetch_next_rows(p, xn, ih0, iw0, P * S, c, L);
  V acc[P] = {};
#pragma GCC unroll 16
  for (int i = 0; i < K; ++i) {
    const T* x = (ih0 + i >= 0 && ih0 + i < g.H ? xn + (ih0 + i) * p.sh : p.zero_row) + c;
#pragma GCC unroll 32
    for (int col = 0; col < (P - 1) * S + K; ++col) {
      // Edge columns outside the row read zeros too (a pointer select, not a branch).
      const bool inside =
          !EDGE || static_cast<uint64_t>(iw0 + col) < static_cast<uint64_t>(g.W);
      const V xv = load<float, L>(inside ? x + (iw0 + col) * p.sw : p.zero_row);
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) {
        const int j = col - q * S;
        if (j >= 0 && j < K) acc[q] += xv * w[i][j];
      }
    }
  }
  EFFK_DISPATCH_ACT(p.act, [&] {
    for (int q = 0; q < P; ++q)
      if (!EDGE || q < pixels)
        store_act<ACT>(Lanes{}, out + (ow + q) * p.ldo + c, acc[q], p.shift + c, p.stream);
  });
}

// A whole output row, every channel (C >= 16; the tail block overlaps), in kTile-pixel tiles
// from column 0: the tiles whose window leaves the row and a last partial tile are EDGE tiles.
// Per channel block the K*K weight vectors are loaded once per row (they stay in registers for
// K <= 5). Window rows outside the image read p.zero_row: the unrolled loops cannot afford a
// row check (it cost 30%). k=3/5 layers ran 1.4-1.7x faster than the generic step, k=7/9 1.1x;
// on 7x7/14x14 rows the edge tiles (instead of generic border pixels, 3 of 7 columns) another
// 5-10%. Tried without gain: 8-pixel tiles for k=3 (1.2x slower on 14x14-56x56 layers), the
// activation as a template parameter (no per-tile switch). A function of its own (one call per
// row): inlined into the big flattened conv_row, its k=5 code lost 40% to register allocation.
template <int K, int S, typename T, typename O>
EFFK_CPU_CLONES void conv_row_k(const ConvParams<T>& p, const T* xn, O* out, int64_t ih0) {
  constexpr int L = kLanes<float>, P = kTile;
  const DwGeometry& g = p.g;
  for (int64_t cb = 0; cb < g.C; cb += L) {
    const int64_t c = std::min(cb, g.C - L);
    Vec<float, L> w[K][K];
#pragma GCC unroll 16
    for (int i = 0; i < K; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < K; ++j) w[i][j] = load<float, L>(p.w + (i * K + j) * g.C + c);
    for (int64_t ow0 = 0; ow0 < g.Wo; ow0 += P) {
      // A last partial tile moves left over its neighbour (those pixels are computed again,
      // to the same bits): only rows narrower than a tile store fewer pixels.
      const int64_t ow = std::max<int64_t>(0, std::min(ow0, g.Wo - P));
      const int64_t iw0 = ow * S - g.pad;
      if (iw0 >= 0 && (P - 1) * S + K + iw0 <= g.W && ow + P <= g.Wo) {
        conv_tile_k<K, S, false>(p, xn, out, ih0, ow, c, w, P);
      } else {
        conv_tile_k<K, S, true>(p, xn, out, ih0, ow, c, w, std::min<int64_t>(P, g.Wo - ow));
      }
    }
  }
}

template <int K, typename T, typename O>
EFFK_INLINE void conv_row_s(const ConvParams<T>& p, const T* xn, O* out, int64_t ih0) {
  if (p.g.stride == 1) {
    conv_row_k<K, 1>(p, xn, out, ih0);
  } else {
    conv_row_k<K, 2>(p, xn, out, ih0);
  }
}

// The fast path where it applies (fp32 and bf16 x, to an output of x's dtype (eval) or fp32
// (training statistics, backward); k in 3/5/7/9, stride 1/2, dilation 1, groups of at least 16
// channels): does the whole output row and returns true. fp16 and fp64 take the generic steps
// (each dtype pair is 8 kernels x 3 ISAs of build time).
template <typename T, typename O>
EFFK_INLINE bool conv_row_fast(const ConvParams<T>& p, const T* xn, O* out, int64_t ih0) {
  if constexpr ((std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) &&
                (std::is_same_v<O, T> || std::is_same_v<O, float>)) {
    const DwGeometry& g = p.g;
    if (g.dil != 1 || g.C < kLanes<float> || g.stride > 2) return false;
    switch (g.K) {
      case 3: conv_row_s<3>(p, xn, out, ih0); return true;
      case 5: conv_row_s<5>(p, xn, out, ih0); return true;
      case 7: conv_row_s<7>(p, xn, out, ih0); return true;
      case 9: conv_row_s<9>(p, xn, out, ih0); return true;
      default: return false;
    }
  }
  return false;
}

// out[Wo][C] = O(act(conv(x) + shift)) for output row (n, oh): O is x's dtype for the output
// pass, the accumulation type for the raw conv (statistics, backward).
template <typename T, typename O>
EFFK_CPU_CLONES void conv_row(const ConvParams<T>& p, int64_t n, int64_t oh, O* out) {
  const DwGeometry& g = p.g;
  const int64_t ih0 = oh * g.stride - g.pad;
  const T* xn = p.x + n * p.sn;
  if (conv_row_fast(p, xn, out, ih0)) return;
  const TapRange kh = tap_range(ih0, g.H, g.K, g.dil);
  // Output columns [ow_lo, ow_hi) have all their taps inside the row.
  const int64_t ow_lo = std::min(g.Wo, (g.pad + g.stride - 1) / g.stride);
  const int64_t last = g.W - 1 - (g.K - 1) * g.dil + g.pad;
  const int64_t ow_hi = std::max(ow_lo, last >= 0 ? std::min(g.Wo, last / g.stride + 1) : 0);
  const TapRange all{0, g.K};
  const int64_t ow_tiles = ow_lo + (ow_hi - ow_lo) / kTile * kTile;
  for (int64_t ow = ow_lo; ow < ow_tiles; ow += kTile) {
    prefetch_next_rows(p, xn, ih0, ow * g.stride - g.pad, kTile * g.stride, 0, g.C);
    conv_pixels<kTile, 1>(p, xn, out, ih0, kh, ow, all);
  }
  // Border columns and the interior remainder: one pixel, kBorderGroup blocks at a time.
  auto border = [&](int64_t ow) {
    prefetch_next_rows(p, xn, ih0, ow * g.stride - g.pad, g.stride, 0, g.C);
    const TapRange kw = tap_range(ow * g.stride - g.pad, g.W, g.K, g.dil);
    conv_pixels<1, kBorderGroup>(p, xn, out, ih0, kh, ow, kw);
  };
  for (int64_t ow = 0; ow < ow_lo; ++ow) border(ow);
  for (int64_t ow = ow_tiles; ow < g.Wo; ++ow) border(ow);
}

// ChannelStats::add_chunk compiled into the clones (flatten): from the baseline-ISA host code
// it ran at SSE2 speed and took as long as the conv itself.
template <typename A>
EFFK_CPU_CLONES void add_stats_chunk(ChannelStats& stats, int64_t chunk, const A* values,
                                     int64_t n, int64_t ld) {
  stats.add_chunk(chunk, values, n, ld);
}

// out[i][c] = O(act(y[i][c] * scale[c] + shift[c])) for `pixels` pixels (y and out may alias).
template <Act ACT, typename A, typename T>
EFFK_INLINE void bn_act(const A* y, const A* scale, const A* shift, int64_t pixels, int64_t C,
                        T* out) {
  for (int64_t i = 0; i < pixels; ++i) {
    const A* yi = y + i * C;
    T* oi = out + i * C;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      store_bf16_row(C, oi, [&](int64_t c) {
        return act_forward<ACT>(yi[c] * scale[c] + shift[c]);
      });
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        oi[c] = static_cast<T>(act_forward<ACT>(yi[c] * scale[c] + shift[c]));
    }
  }
}

template <typename T>
EFFK_CPU_CLONES void bn_act_rows(const acc_type<T>* y, const acc_type<T>* scale,
                                 const acc_type<T>* shift, int64_t pixels, int64_t C, Act act,
                                 T* out) {
  EFFK_DISPATCH_ACT(act, [&] { bn_act<ACT>(y, scale, shift, pixels, C, out); });
}

// ---- backward --------------------------------------------------------------------------------

template <typename T>
struct BnGradParams {
  using A = acc_type<T>;
  int64_t C, Wo;
  Act act;
  const A *mean, *invstd, *gamma, *beta;  // per channel
  const A *a, *b, *c;                     // dy = a*g + b*xhat + c (bn_backward_coeffs)
};

// One output row of the BN/act backward, with xhat = (y - mean) * invstd and
// g = go * act'(gamma * xhat + beta); go has pixel stride go_sw.
//   DY = false (pass 1): sum_g[c] += g, sum_gx[c] += g * xhat.
//   DY = true  (pass 2): y -> dy = a*g + b*xhat + c in place.
template <Act ACT, bool DY, typename T, typename A>
EFFK_INLINE void bn_grad(std::bool_constant<DY>, const BnGradParams<T>& p, A* y, const T* go,
                         int64_t go_sw, A* sum_g, A* sum_gx) {
  for (int64_t i = 0; i < p.Wo; ++i) {
    A* yi = y + i * p.C;
    const T* gi = go + i * go_sw;
#pragma omp simd
    for (int64_t c = 0; c < p.C; ++c) {
      const A xhat = (yi[c] - p.mean[c]) * p.invstd[c];
      const A g = act_backward<ACT>(static_cast<A>(gi[c]), p.gamma[c] * xhat + p.beta[c]);
      if constexpr (DY) {
        yi[c] = bn_dy(p.a[c], p.b[c], p.c[c], g, xhat);
      } else {
        sum_g[c] += g;
        sum_gx[c] += g * xhat;
      }
    }
  }
}

template <bool DY, typename T>
EFFK_CPU_CLONES void bn_grad_row(const BnGradParams<T>& p, acc_type<T>* y, const T* go,
                                 int64_t go_sw, acc_type<T>* sum_g, acc_type<T>* sum_gx) {
  using Mode = std::bool_constant<DY>;
  EFFK_DISPATCH_ACT(p.act, [&] { bn_grad<ACT>(Mode{}, p, y, go, go_sw, sum_g, sum_gx); });
}

template <typename T>
struct GradInputParams {
  using A = acc_type<T>;
  DwGeometry g;  // as in ConvParams: one channel group
  const T* x;
  int64_t sn, sh, sw;
  int64_t ldo;  // pixel stride of dy and grad_x (the layer's channel count)
  const A* w;   // raw weights [kh][kw][c]
  const A* dy;  // NHWC (N, Ho, Wo, ldo), at the group's first channel
};

// For one (kh, kw) tap and L channels: gx[iw] += dy[ow] * w and dw += sum x[iw] * dy[ow] over
// the output columns whose input column iw = iw0 + ow*stride is inside the row. gx is the
// block's compact row buffer [W][L].
template <int L, typename T, typename A>
EFFK_INLINE void grad_input_tap(const GradInputParams<T>& p, const T* x, const A* dy, A* gx,
                                const A* w, A* dw, int64_t iw0, TapRange ow) {
  using V = Vec<A, L>;
  const int64_t C = p.ldo, s = p.g.stride;
  const V wv = load<A, L>(w);
  V acc[2] = {};  // two chains: the dweight sum is a loop-carried dependency
  int64_t o = ow.lo;
  for (; o + 2 <= ow.hi; o += 2) {
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q) {
      const int64_t iw = iw0 + (o + q) * s;
      const V d = load<A, L>(dy + (o + q) * C);
      store<A, L>(gx + iw * L, load<A, L>(gx + iw * L) + d * wv);
      acc[q] += load<A, L>(x + iw * p.sw) * d;
    }
  }
  if (o < ow.hi) {
    const int64_t iw = iw0 + o * s;
    const V d = load<A, L>(dy + o * C);
    store<A, L>(gx + iw * L, load<A, L>(gx + iw * L) + d * wv);
    acc[0] += load<A, L>(x + iw * p.sw) * d;
  }
  store<A, L>(dw, load<A, L>(dw) + (acc[0] + acc[1]));
}

// Channels [c, c + L) of input row (n, ih): the block's rows of x, dy and gx stay in L1 while
// all K*K taps run over them. dw: the block's dweight partials, tap t at dw + t * ldw.
template <int L, typename T, typename A>
EFFK_INLINE void grad_input_block(const GradInputParams<T>& p, int64_t n, int64_t ih, int64_t c,
                                  A* gx, A* dw, int64_t ldw, T* grad_x) {
  const DwGeometry& g = p.g;
  std::fill(gx, gx + g.W * L, A(0));
  const T* xr = p.x + n * p.sn + ih * p.sh + c;
  for (int64_t kh = 0; kh < g.K; ++kh) {
    const int64_t t = ih + g.pad - kh * g.dil;  // = oh * stride
    if (t < 0 || t % g.stride != 0 || t / g.stride >= g.Ho) continue;
    const A* dyr = p.dy + (n * g.Ho + t / g.stride) * g.Wo * p.ldo + c;
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const int64_t iw0 = kw * g.dil - g.pad;  // input column of output column 0
      const TapRange ow = tap_range(iw0, g.W, g.Wo, g.stride);
      const int64_t tap = kh * g.K + kw;
      grad_input_tap<L>(p, xr, dyr, gx, p.w + tap * g.C + c, dw + tap * ldw, iw0, ow);
    }
  }
  for (int64_t iw = 0; iw < g.W; ++iw) store_lanes<L>(gx + iw * L, grad_x + iw * p.ldo + c);
}

// Input row (n, ih) of one channel group: grad_x (gather over the output rows that read it,
// scatter over columns into a private row buffer gx[W][L]) and dweight partials
// dw[kh][kw][c] += x * dy. The channel tail is an overlapping vector block (tail_block), whose
// dweight sums go to a scratch `tail` [K*K][L] of which only the new channels are added.
template <typename T>
EFFK_CPU_CLONES void grad_input_row(const GradInputParams<T>& p, int64_t n, int64_t ih,
                                    acc_type<T>* gx, acc_type<T>* dw, acc_type<T>* tail,
                                    T* grad_x) {
  using A = acc_type<T>;
  constexpr int L = kLanes<A>;
  const int64_t C = p.g.C, taps = p.g.K * p.g.K;
  int64_t c = 0;
  for (; c + L <= C; c += L) grad_input_block<L>(p, n, ih, c, gx, dw + c, C, grad_x);
  if (c == C) return;
  const int64_t cb = tail_block(C, L);
  if (cb < 0) {
    for (; c < C; ++c) grad_input_block<1>(p, n, ih, c, gx, dw + c, C, grad_x);
    return;
  }
  std::fill(tail, tail + taps * L, A(0));
  grad_input_block<L>(p, n, ih, cb, gx, tail, L, grad_x);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t i = c - cb; i < L; ++i) dw[t * C + cb + i] += tail[t * L + i];
}

// ---- host side -------------------------------------------------------------------------------

// A channel group of the layer: channels [c0, c0 + C) with a K x K kernel padded `pad`; its
// packed weights (and its dweight partials) are [K][K][C] at offset `woff` of the layer's.
struct Group {
  int64_t c0, C, K, pad, woff;
};

// The groups of weights[i] (C_i, 1, k_i, k_i) with pads[i], in channel order.
std::vector<Group> layer_groups(at::TensorList weights, at::IntArrayRef pads) {
  std::vector<Group> gs;
  int64_t c0 = 0, woff = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t C = weights[i].size(0), K = weights[i].size(2);
    gs.push_back({c0, C, K, pads[i], woff});
    c0 += C;
    woff += K * K * C;
  }
  return gs;
}

// The number of taps of all groups (sum C_i k_i^2): the layer's MACs per output pixel.
int64_t layer_taps(const std::vector<Group>& gs) {
  return gs.empty() ? 0 : gs.back().woff + gs.back().K * gs.back().K * gs.back().C;
}

// The geometry of one group: the layer's with the group's channels, kernel and padding.
DwGeometry group_geometry(const DwGeometry& g, const Group& gr) {
  DwGeometry r = g;
  r.C = gr.C;
  r.K = gr.K;
  r.pad = gr.pad;
  return r;
}

// weights[i] (C_i, 1, K_i, K_i), any strides -> group i's [kh][kw][c] at its woff, in A, times
// scale[c0 + c] when given.
template <typename T>
std::vector<acc_type<T>> pack_weights(at::TensorList weights, const std::vector<Group>& gs,
                                      const acc_type<T>* scale) {
  using A = acc_type<T>;
  std::vector<A> w(layer_taps(gs));
  for (size_t gi = 0; gi < gs.size(); ++gi) {
    const Group& gr = gs[gi];
    const auto wa = weights[gi].accessor<T, 4>();
    A* wg = w.data() + gr.woff;
    for (int64_t c = 0; c < gr.C; ++c) {
      const A s = scale ? scale[gr.c0 + c] : A(1);
      for (int64_t i = 0; i < gr.K; ++i)
        for (int64_t j = 0; j < gr.K; ++j)
          wg[(i * gr.K + j) * gr.C + c] = static_cast<A>(wa[c][0][i][j]) * s;
    }
  }
  return w;
}

// Zeros covering an input row (ConvParams::zero_row), for any group's channel offset.
template <typename T>
std::vector<T> zero_row(const DwGeometry& g, const at::Tensor& xc) {
  return std::vector<T>(g.W * xc.stride(3) + g.C, T(0));
}

// One ConvParams per group; w: pack_weights' layout, shift: the layer's [C].
template <typename T>
std::vector<ConvParams<T>> conv_params(const DwGeometry& g, const std::vector<Group>& gs,
                                       const at::Tensor& xc, const acc_type<T>* w,
                                       const acc_type<T>* shift, Act act,
                                       const std::vector<T>& zeros) {
  std::vector<ConvParams<T>> ps;
  for (const Group& gr : gs)
    ps.push_back({group_geometry(g, gr), gr.c0, xc.data_ptr<T>() + gr.c0, xc.stride(0),
                  xc.stride(2), xc.stride(3), g.C, w + gr.woff, shift + gr.c0, act,
                  false, zeros.data()});
  return ps;
}

// Output row (n, oh) of every group, each into its channel slice of out[Wo][C].
template <typename T, typename O>
void conv_layer_row(const std::vector<ConvParams<T>>& ps, int64_t n, int64_t oh, O* out) {
  for (const ConvParams<T>& p : ps) conv_row(p, n, oh, out + p.c0);
}

// Rows per parallel task: at least ~16K outputs so that small layers do not pay for threads.
inline int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, row_elems));
}

// Rows per parallel task of a conv pass: ~16K outputs of a 3x3 conv, fewer for bigger kernels.
inline int64_t conv_row_grain(const DwGeometry& g, const std::vector<Group>& gs) {
  return row_grain(g.Wo * layer_taps(gs) / 9);
}

template <typename T>
void forward_impl(const DwGeometry& g, const std::vector<Group>& gs, const at::Tensor& xc,
                  at::TensorList weights, const at::Tensor& bn_weight,
                  const at::Tensor& bn_bias, Act act, bool training, double eps,
                  at::Tensor& mean, at::Tensor& var, at::Tensor& out) {
  using A = acc_type<T>;
  const int64_t rows = g.N * g.Ho, row_elems = g.Wo * g.C;
  const int64_t grain = conv_row_grain(g, gs);
  const std::vector<T> zrow = zero_row<T>(g, xc);
  at::Tensor ybuf;
  A* y = nullptr;
  if (training) {
    // Pass 1: y = conv(x) (into `out` itself for fp32/fp64) and its batch statistics. A chunk is
    // a run of consecutive output rows (about 32 chunks, at most 64K values each, so that
    // add_chunk finds them in L2): ChannelStats::finalize has a division per chunk and channel
    // and cost more than the conv with one chunk per row.
    if constexpr (std::is_same_v<T, A>) {
      y = out.data_ptr<A>();
    } else {
      ybuf = at::empty({rows * row_elems}, out.options().dtype(mean.scalar_type()));
      y = ybuf.data_ptr<A>();
    }
    const std::vector<A> w = pack_weights<T>(weights, gs, nullptr), zeros(g.C, A(0));
    const auto ps = conv_params<T>(g, gs, xc, w.data(), zeros.data(), Act::Identity, zrow);
    const int64_t per = std::clamp<int64_t>((rows + 31) / 32, 1,
                                            std::max<int64_t>(1, (int64_t(1) << 16) / row_elems));
    const int64_t chunks = (rows + per - 1) / per;
    ChannelStats stats(chunks, g.C);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * per, r1 = std::min(rows, r0 + per);
        for (int64_t r = r0; r < r1; ++r) conv_layer_row(ps, r / g.Ho, r % g.Ho, y + r * row_elems);
        add_stats_chunk(stats, k, y + r0 * row_elems, (r1 - r0) * g.Wo, g.C);
      }
    });
    stats.finalize(mean.data_ptr<A>(), var.data_ptr<A>());
  }
  const at::Tensor gamma = acc_vector(bn_weight, mean.scalar_type());
  const at::Tensor beta = acc_vector(bn_bias, mean.scalar_type());
  const A *gp = gamma.data_ptr<A>(), *bp = beta.data_ptr<A>();
  const A *mp = mean.data_ptr<A>(), *vp = var.data_ptr<A>();
  std::vector<A> scale(g.C), shift(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const BnAffine<A> f = fold_bn<A>(gp[c], bp[c], mp[c], vp[c], static_cast<A>(eps));
    scale[c] = f.scale;
    shift[c] = f.shift;
  }
  T* op = out.data_ptr<T>();
  if (training) {
    // Pass 2: out = act(y * scale + shift), elementwise (in place for fp32/fp64). Recomputing
    // the conv with folded weights instead reads x again: up to 4x more bytes at stride 2.
    at::parallel_for(0, rows, row_grain(row_elems), [&](int64_t r0, int64_t r1) {
      bn_act_rows<T>(y + r0 * row_elems, scale.data(), shift.data(), (r1 - r0) * g.Wo, g.C, act,
                     op + r0 * row_elems);
    });
    return;
  }
  // Eval: BN folded into the weights (scale) and the epilogue (shift).
  const std::vector<A> w = pack_weights<T>(weights, gs, scale.data());
  auto ps = conv_params<T>(g, gs, xc, w.data(), shift.data(), act, zrow);
  const bool stream = stream_results(rows * row_elems * static_cast<int64_t>(sizeof(T)));
  for (ConvParams<T>& p : ps) p.stream = stream;
  parallel_items(rows, grain, [&](const auto& next) {
    for (int64_t r = 0; next(r);) conv_layer_row(ps, r / g.Ho, r % g.Ho, op + r * row_elems);
    stream_fence();
  });
}

template <typename T>
void backward_impl(const DwGeometry& g, const std::vector<Group>& gs, const at::Tensor& goc,
                   const at::Tensor& xc, at::TensorList weights, const at::Tensor& bn_weight,
                   const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                   Act act, bool training, double eps, at::Tensor& grad_x,
                   std::vector<at::Tensor>& grad_weights, at::Tensor& grad_gamma,
                   at::Tensor& grad_beta) {
  using A = acc_type<T>;
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  const int64_t C = g.C;
  const int64_t rows = g.N * g.Ho, row_elems = g.Wo * C;
  const int64_t grain = conv_row_grain(g, gs);

  const at::Tensor gamma = acc_vector(bn_weight, acc), beta = acc_vector(bn_bias, acc);
  const at::Tensor mean_a = acc_vector(mean, acc), var_a = acc_vector(var, acc);
  std::vector<A> invstd(C), ca(C), cb(C), cc(C);
  for (int64_t c = 0; c < C; ++c)
    invstd[c] = inv_std<A>(var_a.data_ptr<A>()[c], static_cast<A>(eps));
  const BnGradParams<T> bp{C,
                           g.Wo,
                           act,
                           mean_a.data_ptr<A>(),
                           invstd.data(),
                           gamma.data_ptr<A>(),
                           beta.data_ptr<A>(),
                           ca.data(),
                           cb.data(),
                           cc.data()};

  const std::vector<A> w = pack_weights<T>(weights, gs, nullptr), zeros(C, A(0));
  const std::vector<T> zrow = zero_row<T>(g, xc);
  const auto cps = conv_params<T>(g, gs, xc, w.data(), zeros.data(), Act::Identity, zrow);
  const T* go = goc.data_ptr<T>();
  const int64_t gsn = goc.stride(0), gsh = goc.stride(2), gsw = goc.stride(3);
  auto go_row = [&](int64_t r) { return go + (r / g.Ho) * gsn + (r % g.Ho) * gsh; };

  // Pass 1: y = conv(x) into the buffer (every group); per-chunk sums of g and g * xhat.
  at::Tensor ybuf = at::empty({rows * row_elems}, xc.options().dtype(acc));
  A* y = ybuf.data_ptr<A>();
  const Chunking ch1(rows, 2 * C);
  std::vector<double> part1(ch1.count * 2 * C);
  at::parallel_for(0, ch1.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> sums(2 * C);
    for (int64_t k = k0; k < k1; ++k) {
      double* pk = &part1[k * 2 * C];
      for (int64_t r = ch1.begin(k); r < ch1.end(k); ++r) {
        conv_layer_row(cps, r / g.Ho, r % g.Ho, y + r * row_elems);
        std::fill(sums.begin(), sums.end(), A(0));
        bn_grad_row<false>(bp, y + r * row_elems, go_row(r), gsw, sums.data(), sums.data() + C);
        for (int64_t c = 0; c < 2 * C; ++c) pk[c] += sums[c];
      }
    }
  });
  std::vector<double> sum_g(C, 0.0), sum_gx(C, 0.0);
  for (int64_t k = 0; k < ch1.count; ++k)
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += part1[k * 2 * C + c];
      sum_gx[c] += part1[k * 2 * C + C + c];
    }
  const A count = static_cast<A>(rows * g.Wo);
  for (int64_t c = 0; c < C; ++c) {
    const BnBackwardCoeffs<A> k = bn_backward_coeffs<A>(
        bp.gamma[c], invstd[c], static_cast<A>(sum_g[c]), static_cast<A>(sum_gx[c]), count,
        training);
    ca[c] = k.a;
    cb[c] = k.b;
    cc[c] = k.c;
  }

  // Pass 2: y -> dy in place.
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      bn_grad_row<true>(bp, y + r * row_elems, go_row(r), gsw, nullptr, nullptr);
  });

  // Pass 3: grad_x and per-chunk dweight partials (every group), by input row.
  std::vector<GradInputParams<T>> ips;
  int64_t kmax = 1;
  for (const ConvParams<T>& p : cps) {
    ips.push_back({p.g, p.x, p.sn, p.sh, p.sw, C, p.w, y + p.c0});
    kmax = std::max(kmax, p.g.K);
  }
  const int64_t in_rows = g.N * g.H, taps = layer_taps(gs);
  const Chunking ch3(in_rows, taps);
  std::vector<A> part3(ch3.count * taps, A(0));
  T* gxp = grad_x.data_ptr<T>();
  at::parallel_for(0, ch3.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> gx(g.W * kLanes<A>), tail(kmax * kmax * kLanes<A>);
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t r = ch3.begin(k); r < ch3.end(k); ++r)
        for (size_t gi = 0; gi < gs.size(); ++gi)
          grad_input_row<T>(ips[gi], r / g.H, r % g.H, gx.data(), &part3[k * taps + gs[gi].woff],
                            tail.data(), gxp + r * g.W * C + gs[gi].c0);
  });

  // Combine in chunk order, in double, and cast to the parameters' dtypes.
  std::vector<double> dw(taps, 0.0);
  for (int64_t k = 0; k < ch3.count; ++k)
    for (int64_t i = 0; i < taps; ++i) dw[i] += part3[k * taps + i];
  const auto dopt = at::TensorOptions().dtype(at::kDouble);
  for (size_t gi = 0; gi < gs.size(); ++gi) {
    const Group& gr = gs[gi];
    const at::Tensor dwg = at::from_blob(dw.data() + gr.woff, {gr.K, gr.K, gr.C}, dopt);
    grad_weights[gi].copy_(dwg.permute({2, 0, 1}).unsqueeze(1));
  }
  grad_gamma.copy_(at::from_blob(sum_gx.data(), {C}, dopt));
  grad_beta.copy_(at::from_blob(sum_g.data(), {C}, dopt));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_groups_forward(
    const DwGeometry& g, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef pads, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    Act act, bool training, double eps) {
  auto [mean, var] = initial_stats(x, g.C, running_mean, running_var, training);
  at::Tensor out = empty_nhwc({g.N, g.C, g.Ho, g.Wo}, x.options());
  if (x.numel() > 0) {
    const at::Tensor xc = channels_innermost(x);
    const std::vector<Group> gs = layer_groups(weights, pads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_forward", [&] {
      forward_impl<scalar_t>(g, gs, xc, weights, bn_weight, bn_bias, act, training, eps, mean,
                             var, out);
    });
  }
  return {in_format(out, output_format(x)), mean, var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> depthwise_groups_backward(
    const DwGeometry& g, const at::Tensor& grad_out, const at::Tensor& x,
    at::TensorList weights, at::IntArrayRef pads, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, Act act,
    bool training, double eps) {
  at::Tensor grad_x = empty_nhwc(x.sizes(), x.options());
  std::vector<at::Tensor> grad_weights;
  for (const at::Tensor& w : weights) grad_weights.push_back(at::empty_like(w));
  at::Tensor grad_gamma = at::empty_like(bn_weight);
  at::Tensor grad_beta = at::empty_like(bn_bias);
  if (x.numel() == 0) {
    for (at::Tensor& gw : grad_weights) gw.zero_();
    grad_gamma.zero_();
    grad_beta.zero_();
  } else {
    const at::Tensor xc = channels_innermost(x);
    const at::Tensor goc = channels_innermost(grad_out);
    const std::vector<Group> gs = layer_groups(weights, pads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_backward", [&] {
      backward_impl<scalar_t>(g, gs, goc, xc, weights, bn_weight, bn_bias, mean, var, act,
                              training, eps, grad_x, grad_weights, grad_gamma, grad_beta);
    });
  }
  return {in_format(grad_x, output_format(x)), grad_weights, grad_gamma, grad_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, c10::string_view act, bool training, double eps) {
  constexpr const char* op = "dwconv_bn_act";
  const auto [g, a] = check_dwconv_forward(op, x, weight, bn_weight, bn_bias, running_mean,
                                           running_var, stride, padding, dilation, act,
                                           training);
  return depthwise_groups_forward(g, x, {weight}, {padding}, bn_weight, bn_bias,
                                  running_mean, running_var, a, training, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t padding, int64_t dilation,
    c10::string_view act, bool training, double eps) {
  constexpr const char* op = "dwconv_bn_act_backward";
  const auto [g, a] = check_dwconv_backward(op, grad_out, x, weight, bn_weight, bn_bias, mean,
                                            var, stride, padding, dilation, act, training);
  auto [grad_x, grad_weights, grad_gamma, grad_beta] = depthwise_groups_backward(
      g, grad_out, x, {weight}, {padding}, bn_weight, bn_bias, mean, var, a, training, eps);
  return {grad_x, grad_weights[0], grad_gamma, grad_beta};
}

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward);
}

}  // namespace effkernels::cpu
