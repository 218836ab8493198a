// The fused CPU inverted-residual block for inference (effkernels::inverted_residual_inference):
//   expand 1x1 + BN + act -> depthwise kxk + BN + act -> [SE] -> project 1x1 + BN [+ x]
// with every BatchNorm folded from its running statistics (scale into the conv weights, shift
// into the epilogues). The expanded (hidden, t x Cin channels) activations never exist as a
// tensor: each task owns a band of output rows of one image and keeps only the hidden rows its
// depthwise window needs. The folded and packed weights are built per call, or once by
// effkernels::inverted_residual_pack and passed to effkernels::inverted_residual_packed
// (see "packed weights" below).
//
// Per task (image n, band of output rows), in a per-thread scratch ring of hidden rows:
//   1. the hidden rows a group of G output rows needs that are not in the ring yet are computed
//      by the expand GEMM (x rows copied to a dense fp32 tile, the pwconv micro-kernel against
//      the packed, BN-scaled weight panels, then shift + act from L1 into the ring). Without an
//      expand stage the x rows are copied in, or, after a stem (stem_inverted_residual_packed:
//      the models' stem and first block in one pass), computed there by the stem's row kernel
//      (DenseConv), the skip then read from the ring. Ring rows are padded: `pad` zero columns
//      on each side and the hidden channels padded with zeros to a whole 64-byte vector
//      (16 fp32 / 8 fp64; zero depthwise weights there, and the project GEMM reads only the C
//      real channels), so the depthwise kernel has no borders and no channel tails; image rows
//      above/below read a zero row.
//   2. the depthwise rows (sliding-window micro-kernel over 4 output pixels x 16 channels for
//      k = 3/5/7, stride 1/2, dilation 1; a plain tap loop otherwise) + shift + act go to a
//      small buffer of G output rows;
//   3. the project GEMM on those G*Wo pixels + shift (+ the residual x) stores the output rows.
// G is chosen so that a step has >= 48 pixels (small feature maps batch several rows into one
// GEMM). The ring holds (G-1)*stride + dilation*(k-1) + 1 rows: 100 KB for the MobileNetV2
// 56x56x144 block, a few hundred KB at most for the common blocks (L2).
//
// MixNet's split convolutions arrive as their parts (a stage [parts..., bn_weight, bn_bias,
// running_mean, running_var]: the 1x1 groups' diagonal blocks of a block-diagonal weight, the
// MixConv kernels centred in the largest; effkernels.nn on the CPU), or as those dense weights
// (the public op): both pack to the same bytes, the parts without a dense copy (building it
// per call in PyTorch was ~12% of a batch-1 mixnet_s forward, ad-hoc). Packing records each
// GEMM panel's nonzero k range and, per run of channel vectors, the smallest centred kernel that
// holds its nonzero depthwise taps (DwSegment); the GEMMs and the depthwise read only those for
// rows that are all finite (all_finite; a zero weight times Inf/NaN is NaN, as the dense
// reference computes it), so the block does the grouped convolutions' multiply-adds.
//
// Squeeze-excite needs the global mean of the depthwise output before any output pixel can be
// projected. We keep the depthwise output of the images in flight (at most one image per thread
// at a time) rather than recompute it: recomputing costs the expand GEMM and the depthwise conv
// a second time (~60% of the block's FLOPs for t = 6), while storing writes and reads back
// Ho*Wo*C floats once (from L2/L3), ~10x cheaper. Phase A runs steps 1-2 per band and writes
// the depthwise rows into the image buffer plus per-row channel sums; the gates are computed per
// image (double precision, from the row sums in row order) and folded into that image's project
// weights (W[o][c] * bn_scale[o] * gate[c]), or, on maps with fewer pixels than output channels
// (7x7), multiplied into its depthwise rows, the cheaper of the two (the late MobileNetV3 / MixNet
// blocks 4-10% faster, ad-hoc); phase B runs the project GEMM over the buffer.
//
// Threads: OpenMP (parallel_items: a static split, then stealing) over (image, band); bands are
// only cut when there are fewer images than the work split wants (one boundary costs
// dilation*(k-1) recomputed hidden rows).
// With fewer images than threads on small maps, where those recomputed rows would be more than
// 1/8 of the image (batch 1 from 28x28 down), phase A is split by slices of the hidden channels
// instead and the block takes the two-phase path even without SE; phase B splits the output
// channel panels too when the pixel chunks alone would leave a thread idle (a 7x7 map is one
// chunk). Every value is computed by the same code in the same order whatever the band or thread (the
// GEMMs are one FMA chain over k per output; the SE sums are per row, combined in row order), so
// the results are bitwise independent of the thread count.
//
// ISA: the micro-kernels are compiled for AVX-512, AVX2+FMA and the x86-64 baseline through
// cpu_gemm.h's `flatten` wrappers and chosen at run time (cpu_isa(); EFFK_CPU_ISA caps it).
// dtypes: fp32 and fp64 natively; fp16 (and bf16 without AVX-512 BF16) are widened to fp32
// when x rows are copied in and rounded once at the output (the hidden activations stay fp32,
// more accurate than PyTorch's half-precision composite). bf16 on CPUs with AVX-512 BF16: both
// GEMMs run cpu_gemm.h's pair kernel (vdpbf16ps) on bf16 operands, x rows copied as they are
// and the depthwise output rounded to bf16 (times SE's gates) before the project GEMM, as
// PyTorch's bf16 layers round it; the expanded activations in the ring stay fp32 (Plan::kPairs).
#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "conv_bn_act_inference.h"
#include "cpu_common.h"
#include "cpu_gemm.h"
#include "effkernels/activation.h"
#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"
#include "effkernels/op_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The 64-byte vectors never cross a call boundary (their helpers are always_inline).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace effkernels::cpu {
namespace {

constexpr const char* kOp = "inverted_residual_inference";
constexpr int kMaxK = 11;
constexpr int64_t kChunkPixels = 96;  // rows of one expand GEMM call (tile and block in L1/L2)
constexpr int64_t kStepPixels = 48;   // output pixels per depthwise + project step, at least
constexpr int64_t kPackGrainElems = 16384;  // weight elements per packing task, at least
constexpr int64_t kGrainMacs = 16384;       // SE multiply-adds / gated panel elements per task

// Per-thread scratch slots (cpu_gemm.h's thread_scratch; pwconv uses 0-2, the GEMM kernels
// 12): 3-6, 9 and 11 in the tasks, 7, 8 and 10 on the calling thread.
enum Slot : int {
  kRing = 3, kTileA = 4, kBlock = 5, kDwRows = 6,
  kImages = 7, kPacked = 8, kStemStrip = 9, kGatedPanels = 10, kProjectRows = 11
};

// ---- vectors of channels ---------------------------------------------------------------------

template <class A>
constexpr int kLanes = 64 / static_cast<int>(sizeof(A));  // hidden channels are padded to this
template <class A>
using CV = typename Vec<A, 64>::type;

template <class A>
EFFK_INLINE CV<A> vload(const A* p) {
  CV<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[0..L) = act(acc + shift[0..L)).
template <Act ACT, class A>
EFFK_INLINE void store_act(A* __restrict out, const CV<A>& acc, const A* __restrict shift) {
  constexpr int L = kLanes<A>;
  A z[L];
  const CV<A> v = acc + vload(shift);
  std::memcpy(z, &v, sizeof(v));
#pragma omp simd
  for (int i = 0; i < L; ++i) out[i] = act_forward<ACT>(z[i]);
}

// ---- depthwise row kernels -------------------------------------------------------------------

template <class A>
struct DwArgs {
  const A* rows[kMaxK];  // the k window rows (padded rows; a zero row outside the image)
  const A* w;            // [k][k][ldw] for channels [cw, cw + ldw), BN scale folded in
  int64_t ldw, cw;
  const A* shift;        // [Cp]
  A* out;                // [Wo][Cp]
  A* sums;               // [Cp]: sum over the row of out (SE), or null
  int64_t Wo, Cp, K, stride, dil;
  int64_t c0, c1;        // the channels to compute (whole vectors; [0, Cp) or a slice)
  Act act;
};

// Row sums of the output for SE, per channel in column order (deterministic).
template <class A>
EFFK_INLINE void row_sums(const DwArgs<A>& a) {
  constexpr int L = kLanes<A>;
  for (int64_t c = a.c0; c < a.c1; c += L) {
    CV<A> s = {};
    for (int64_t ow = 0; ow < a.Wo; ++ow) s += vload(a.out + ow * a.Cp + c);
    std::memcpy(a.sums + c, &s, sizeof(s));
  }
}

// k x k, stride S, dilation 1: per channel block the k*k weight vectors are loaded once per row,
// and each input vector once per window row for 4 output pixels (as dwconv_bn_act's interior
// path). Every output is the taps in (row, column) order, as in the 1-pixel tail.
template <class A, int K, int S>
struct DwRowFast {
  using Args = DwArgs<A>;
  template <Isa>
  static void run(const Args& a) {
    constexpr int L = kLanes<A>, P = 4;
    const int64_t Cp = a.Cp, Wo4 = a.Wo / P * P;
    for (int64_t c = a.c0; c < a.c1; c += L) {
      CV<A> w[K][K];
#pragma GCC unroll 16
      for (int i = 0; i < K; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < K; ++j) w[i][j] = vload(a.w + (i * K + j) * a.ldw + (c - a.cw));
      for (int64_t ow = 0; ow < Wo4; ow += P) {
        CV<A> acc[P] = {};
#pragma GCC unroll 16
        for (int i = 0; i < K; ++i) {
          const A* x = a.rows[i] + ow * S * Cp + c;
#pragma GCC unroll 32
          for (int col = 0; col < (P - 1) * S + K; ++col) {
            const CV<A> xv = vload(x + col * Cp);
#pragma GCC unroll 8
            for (int q = 0; q < P; ++q) {
              const int j = col - q * S;
              if (j >= 0 && j < K) acc[q] += xv * w[i][j];
            }
          }
        }
        EFFK_DISPATCH_ACT(a.act, [&] {
          for (int q = 0; q < P; ++q) store_act<ACT>(a.out + (ow + q) * Cp + c, acc[q], a.shift + c);
        });
      }
      for (int64_t ow = Wo4; ow < a.Wo; ++ow) {
        CV<A> acc = {};
#pragma GCC unroll 16
        for (int i = 0; i < K; ++i) {
          const A* x = a.rows[i] + ow * S * Cp + c;
#pragma GCC unroll 16
          for (int j = 0; j < K; ++j) acc += vload(x + j * Cp) * w[i][j];
        }
        EFFK_DISPATCH_ACT(a.act, [&] { store_act<ACT>(a.out + ow * Cp + c, acc, a.shift + c); });
      }
    }
    if (a.sums) row_sums(a);
  }
};

// Any k, stride and dilation: run-time tap loops, 1 pixel x 1 channel block per step.
template <class A>
struct DwRowGeneric {
  using Args = DwArgs<A>;
  template <Isa>
  static void run(const Args& a) {
    constexpr int L = kLanes<A>;
    const int64_t Cp = a.Cp;
    for (int64_t c = a.c0; c < a.c1; c += L) {
      for (int64_t ow = 0; ow < a.Wo; ++ow) {
        CV<A> acc = {};
        for (int64_t i = 0; i < a.K; ++i) {
          const A* x = a.rows[i] + ow * a.stride * Cp + c;
          const A* w = a.w + i * a.K * a.ldw + (c - a.cw);
          for (int64_t j = 0; j < a.K; ++j) acc += vload(x + j * a.dil * Cp) * vload(w + j * a.ldw);
        }
        EFFK_DISPATCH_ACT(a.act, [&] { store_act<ACT>(a.out + ow * Cp + c, acc, a.shift + c); });
      }
    }
    if (a.sums) row_sums(a);
  }
};

template <class A>
using DwFn = KernelFn<DwRowFast<A, 3, 1>>;  // all DwArgs<A> kernels share this signature

template <class A, int K>
DwFn<A> select_dw_k(Isa isa, int64_t stride) {
  return stride == 1 ? select_kernel<DwRowFast<A, K, 1>>(isa)
                     : select_kernel<DwRowFast<A, K, 2>>(isa);
}

template <class A>
DwFn<A> select_dw(Isa isa, int64_t K, int64_t stride, int64_t dil) {
  if (dil == 1 && (stride == 1 || stride == 2)) {
    switch (K) {
      case 3: return select_dw_k<A, 3>(isa, stride);
      case 5: return select_dw_k<A, 5>(isa, stride);
      case 7: return select_dw_k<A, 7>(isa, stride);
      default: break;
    }
  }
  return select_kernel<DwRowGeneric<A>>(isa);
}

// ---- GEMM epilogues --------------------------------------------------------------------------

// Expand: dst[r][col0 + l] = act(c[r][l] + shift[col0 + l]) for l < ncols, into the ring.
template <class A>
struct ExpandEpiArgs {
  const A* c;
  int64_t ldc, rows, col0, ncols;
  const A* shift;
  A* const* dst;  // per row: the hidden pixel's channel 0 in the ring
  Act act;
};

template <Act ACT, class A>
EFFK_INLINE void expand_row(int64_t n, const A* __restrict c, const A* __restrict shift,
                            A* __restrict out) {
  for (int64_t l = 0; l < n; ++l) out[l] = act_forward<ACT>(c[l] + shift[l]);
}

template <class A>
struct ExpandEpi {
  using Args = ExpandEpiArgs<A>;
  template <Isa>
  static void run(const Args& e) {
    EFFK_DISPATCH_ACT(e.act, [&] {
      for (int64_t r = 0; r < e.rows; ++r)
        expand_row<ACT>(e.ncols, e.c + r * e.ldc, e.shift + e.col0, e.dst[r] + e.col0);
    });
  }
};

// Project: out[r][col0 + l] = T(c[r][l] + shift[col0 + l] (+ res[r][col0 + l])).
template <class T, class A>
struct ProjectEpiArgs {
  const A* c;
  int64_t ldc, rows, col0, ncols;
  const A* shift;
  T* out;  // row r at out + r * ldo
  int64_t ldo;
  const T* const* res;  // per row: the residual pixel's channel 0 (unit channel stride)
};

template <bool RES, class T, class A>
EFFK_INLINE void project_row(int64_t n, const A* __restrict c, const A* __restrict shift,
                             const T* __restrict res, T* __restrict out) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return store_bf16_row(n, out, [&](int64_t l) {
      A z = c[l] + shift[l];
      if constexpr (RES) z += static_cast<A>(res[l]);
      return z;
    });
  }
  for (int64_t l = 0; l < n; ++l) {
    A z = c[l] + shift[l];
    if constexpr (RES) z += static_cast<A>(res[l]);
    out[l] = static_cast<T>(z);
  }
}

template <class T, class A, bool RES>
struct ProjectEpi {
  using Args = ProjectEpiArgs<T, A>;
  template <Isa>
  static void run(const Args& e) {
    for (int64_t r = 0; r < e.rows; ++r)
      project_row<RES>(e.ncols, e.c + r * e.ldc, e.shift + e.col0,
                       RES ? e.res[r] + e.col0 : nullptr, e.out + r * e.ldo + e.col0);
  }
};

// Pairs, before the project GEMM: dst[r][c] = bf16(a[r][c] * gate[c]) (gate may be null) for
// r < rows, c < C, and zero rows up to rows_pad (the GEMM's last block).
struct RoundRowsArgs {
  const float* a;
  int64_t lda, rows, rows_pad, C;
  const float* gate;
  c10::BFloat16* dst;
  int64_t ldd;
};

struct RoundRows {
  using Args = RoundRowsArgs;
  template <Isa>
  static void run(const Args& e) {
    for (int64_t r = 0; r < e.rows; ++r) {
      const float* src = e.a + r * e.lda;
      c10::BFloat16* dst = e.dst + r * e.ldd;
      if (e.gate) {
        store_bf16_row(e.C, dst, [&](int64_t c) { return src[c] * e.gate[c]; });
      } else {
        store_bf16_row(e.C, dst, [&](int64_t c) { return src[c]; });
      }
    }
    std::fill(e.dst + e.rows * e.ldd, e.dst + e.rows_pad * e.ldd, c10::BFloat16(0.0f));
  }
};

// ---- the block -------------------------------------------------------------------------------

// The checked problem (op_checks.h) plus this kernel's ring / step sizes.
struct Geometry : IrProblem {
  int64_t Cr;         // SE's reduced channels (0 without SE)
  int64_t Cp;         // hidden channels padded to whole vectors
  int64_t Wp;         // padded ring row width (pixels)
  int64_t G;          // output rows per step
  int64_t ring_rows;  // (G-1)*stride + dil*(K-1) + 1
};

// A run of whole vectors of hidden channels [c0, c1) whose depthwise taps are zero outside the
// centred k x k (as int64s in the packed buffer).
struct DwSegment {
  int64_t c0, c1, k, woff;
};

// Everything the tasks read; built once per call (the weights' parts point into a packed
// buffer: attach()). In: the GEMMs' operand type (A, or bf16 for
// cpu_gemm.h's pair kernel: x tiles and the rounded hidden rows in bf16, the BN scales applied
// to the GEMMs' fp32 results instead of folded into the weights).
template <class T, class A, class In = A>
struct Plan {
  static constexpr bool kPairs = !std::is_same_v<In, A>;
  Geometry g;
  Isa isa;
  const T* x;  // channels innermost: x(n, c, h, w) = x[n*sN + h*sH + w*sW + c]
  int64_t sN, sH, sW;
  // Or (fp32, no expand stage): x is the output of this stem convolution, whose rows are
  // computed into the ring (stem_inverted_residual_packed); the skip reads them there.
  const DenseConv* stem = nullptr;
  T* out;      // NHWC, dense
  GemmPlan<A, In> ge, gp;  // expand / project GEMM shapes
  int64_t npe = 0, npp = 0, ldx = 0;
  int64_t kpe = 0, kpp = 0;  // packed K of the expand / project panels (even for pairs)
  const In* pe = nullptr;  // expand panels [npe][kpe][NR], BN scale folded in (pairs: not)
  const In* pp = nullptr;  // project panels [npp][kpp][NR], the same (SE: no gates)
  const A* col_scale_e = nullptr;  // pairs: the BN scales, per output column (padded)
  const A* col_scale_p = nullptr;
  KernelFn<RoundRows> round_rows = nullptr;  // pairs: the hidden rows to bf16 (times SE's gates)
  const A* shift_e = nullptr;  // [C], the expand epilogue's
  const A* shift_p = nullptr;  // [Cout]
  const A* wd = nullptr;       // depthwise [k][k][Cp], BN scale folded in, zero past C
  const A* shift_d = nullptr;  // [Cp]
  // Grouped (block-diagonal: MixNet's split 1x1 convs) weights: per expand / project panel
  // its nonzero k range (lo, hi), or null where every panel is dense. The GEMMs read only that
  // range of finite rows (all_finite), for which the skipped products are exact zeros.
  const int64_t* kr_e = nullptr;
  const int64_t* kr_p = nullptr;
  // MixConv (kernels zero-padded to K x K): runs of whole vectors whose nonzero taps fit a
  // smaller centred k x k (DwSegment), computed with that k for finite window rows (the skipped
  // taps' products are exact zeros); nseg == 0 when none is smaller than K.
  int64_t nseg = 0;
  const DwSegment* segs = nullptr;
  const A* wseg = nullptr;  // each segment's [k][k][c1 - c0] weights at its woff
  DwFn<A> dw_k[kMaxK + 1] = {};  // the depthwise kernel per segment kernel size
  DwFn<A> dw;
  KernelFn<ExpandEpi<A>> expand_epi;
  KernelFn<ProjectEpi<T, A, false>> project_epi;
};

// BN folded from the running statistics: scale and shift of the stage's channels (the vectors
// keep their sizes; entries past the channels stay as they are, zero).
template <class A>
void fold(at::TensorList stage, double eps, std::vector<A>& scale, std::vector<A>& shift) {
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  const at::TensorList bn = stage.slice(stage.size() - 4);
  const int64_t C = bn[0].size(0);
  const at::Tensor gamma = acc_vector(bn[0], acc), beta = acc_vector(bn[1], acc);
  const at::Tensor mean = acc_vector(bn[2], acc), var = acc_vector(bn[3], acc);
  const A *g = gamma.const_data_ptr<A>(), *b = beta.const_data_ptr<A>();
  const A *m = mean.const_data_ptr<A>(), *v = var.const_data_ptr<A>();
  for (int64_t c = 0; c < C; ++c) {
    const BnAffine<A> f = fold_bn<A>(g[c], b[c], m[c], v[c], static_cast<A>(eps));
    scale[c] = f.scale;
    shift[c] = f.shift;
  }
}

// A stage's weight: its one tensor or its parts (all but the 4 BatchNorm tensors).
at::TensorList weight_parts(at::TensorList stage) {
  return stage.slice(0, stage.size() - 4);
}

// A slice of the hidden channels: depthwise channels [c0, c1) (whole vectors) and the expand
// panels [j0, j1) that produce them.
struct HiddenSlice {
  int64_t c0, c1, j0, j1;
};

// One task's working set.
template <class T, class A, class In>
class Worker {
 public:
  // bands: also the ring, x tile and depthwise rows (not needed by SE's project-only phase).
  Worker(const Plan<T, A, In>& p, bool bands) : p_(p), g_(p.g) {
    const int64_t step_rows = std::max(kChunkPixels, g_.G * g_.Wo) + 12;
    block_ = thread_scratch<A>(kBlock, step_rows * std::max(p_.ge.NR, p_.gp.NR));
    res_.resize(step_rows);
    if constexpr (Plan<T, A, In>::kPairs) {
      ldq_ = g_.C % 64 == 0 ? g_.C + 16 : g_.C;  // no 4 KiB-aliased rows
      project_rows_ = thread_scratch<In>(kProjectRows, step_rows * ldq_);
    }
    if (!bands) return;
    ring_ = thread_scratch<A>(kRing, (g_.ring_rows + 1) * g_.Wp * g_.Cp);
    zero_row_ = ring_ + g_.ring_rows * g_.Wp * g_.Cp;
    clear_ring_borders();
    ring_finite_.assign(g_.ring_rows, 1);
    if (g_.has_expand) tile_ = thread_scratch<In>(kTileA, (kChunkPixels + 12) * p_.ldx);
    if (p_.stem) stem_strip_ = thread_scratch<float>(kStemStrip, p_.stem->strip_size());
    if (!g_.has_se) dw_rows_ = thread_scratch<A>(kDwRows, step_rows * g_.Cp);
    ptrs_.resize(step_rows);
  }

  // Output rows [oh0, oh1) of image n, the hidden channels of `slice`. One-phase (dw_image
  // null; all channels): they are projected and stored. Two-phase: the depthwise rows go to
  // dw_image (image n's [Ho*Wo][Cp] buffer) and, with SE, their channel sums to row_sums
  // ([Ho][Cp]).
  void band(int64_t n, int64_t oh0, int64_t oh1, A* dw_image, A* row_sums,
            const HiddenSlice& slice) {
    int64_t next_ih = std::numeric_limits<int64_t>::min();
    const int64_t reach = g_.dil * (g_.K - 1);
    for (int64_t oh = oh0; oh < oh1; oh += g_.G) {
      const int64_t rows = std::min(g_.G, oh1 - oh);
      const int64_t lo = oh * g_.stride - g_.pad, hi = (oh + rows - 1) * g_.stride - g_.pad + reach;
      const int64_t r0 = std::max({lo, next_ih, int64_t(0)}), r1 = std::min(hi, g_.H - 1);
      if (r0 <= r1) {
        hidden_rows(n, r0, r1, slice);
        next_ih = r1 + 1;
      }
      A* dst = dw_image ? dw_image + oh * g_.Wo * g_.Cp : dw_rows_;
      DwArgs<A> a{};
      a.w = p_.wd;
      a.ldw = g_.Cp;
      a.cw = 0;
      a.shift = p_.shift_d;
      a.Wo = g_.Wo;
      a.Cp = g_.Cp;
      a.K = g_.K;
      a.stride = g_.stride;
      a.dil = g_.dil;
      a.act = g_.act;
      a.c0 = slice.c0;
      a.c1 = slice.c1;
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t ih0 = (oh + q) * g_.stride - g_.pad;
        bool finite = true;
        for (int64_t i = 0; i < g_.K; ++i) {
          const int64_t ih = ih0 + i * g_.dil;
          const bool inside = ih >= 0 && ih < g_.H;
          a.rows[i] = inside ? ring_row(ih) : zero_row_;
          if (p_.nseg) finite = finite && (!inside || ring_finite_[ih % g_.ring_rows]);
        }
        a.out = dst + q * g_.Wo * g_.Cp;
        a.sums = row_sums ? row_sums + (oh + q) * g_.Cp : nullptr;
        if (p_.nseg && finite) {
          depthwise_segments(a);
        } else {
          p_.dw(a);
        }
      }
      if (!dw_image) {
        // The GEMM's last block reads rows past the step's pixels: keep them finite.
        const int64_t M = rows * g_.Wo;
        std::fill(dw_rows_ + M * g_.Cp, dw_rows_ + round_up(M, kRowQuantum) * g_.Cp, A(0));
        project(n, oh * g_.Wo, M, dw_rows_, p_.pp, 0, p_.npp);
      }
    }
  }

  // The depthwise row `a` (all K window rows finite) segment by segment, each with its own
  // kernel size: the window rows and columns of its centred k x k inside the K x K one.
  void depthwise_segments(const DwArgs<A>& a) const {
    for (int64_t i = 0; i < p_.nseg; ++i) {
      const DwSegment& sg = p_.segs[i];
      DwArgs<A> b = a;
      b.c0 = std::max(a.c0, sg.c0);
      b.c1 = std::min(a.c1, sg.c1);
      if (b.c0 >= b.c1) continue;
      const int64_t o = (g_.K - sg.k) / 2;
      for (int64_t r = 0; r < sg.k; ++r) b.rows[r] = a.rows[r + o] + o * g_.dil * g_.Cp;
      b.K = sg.k;
      b.w = p_.wseg + sg.woff;
      b.ldw = sg.c1 - sg.c0;
      b.cw = sg.c0;
      p_.dw_k[sg.k](b);
    }
  }

  // Output pixels [p0, p0 + M) of image n (row-major over Ho x Wo), the output channels of
  // panels [j0, j1) = project(a rows) + shift (+ x). `a` is readable (finite) for
  // round_up(M, 12) rows of Cp. Pairs: the rows are first rounded to bf16, times `gate` (SE;
  // else null: the fp32 path folds the gates into `panels`).
  // skip_ok: false when the image's SE gates (folded into `panels`) are not all finite, so that
  // the zero weights' products are not zeros.
  void project(int64_t n, int64_t p0, int64_t M, const A* a, const In* panels, int64_t j0,
               int64_t j1, const A* gate = nullptr, bool skip_ok = true) {
    const int NR = p_.gp.NR;
    const In* rows;
    int64_t ld;
    if constexpr (Plan<T, A, In>::kPairs) {
      p_.round_rows({a, g_.Cp, M, round_up(M, 12), g_.C, gate, project_rows_, ldq_});
      rows = project_rows_;
      ld = ldq_;
    } else {
      rows = a;
      ld = g_.Cp;
    }
    T* out = p_.out + (n * g_.Ho * g_.Wo + p0) * g_.Cout;
    if (g_.skip) {
      for (int64_t r = 0; r < M; ++r) {
        const int64_t h = (p0 + r) / g_.Wo, w = (p0 + r) % g_.Wo;
        if constexpr (std::is_same_v<T, A>) {
          // A stem's output rows: in the ring (one phase: this step's rows are still there).
          if (p_.stem) {
            res_[r] = ring_row(h) + (g_.pad + w) * g_.Cp;
            continue;
          }
        }
        res_[r] = p_.x + n * p_.sN + h * p_.sH + w * p_.sW;
      }
    }
    const bool skip = p_.kr_p && skip_ok && all_finite<A>(rows, ld, M, g_.C);
    for (int64_t j = j0; j < j1; ++j) {
      const auto [k0, k1] = span(p_.kr_p, j, skip, g_.C);
      const int64_t cols = std::min<int64_t>(NR, g_.Cout - j * NR);
      p_.gp.fn_for(cols)({k1 - k0, rows + k0, ld, M, panels + j * p_.kpp * NR + k0 * NR, block_,
                          NR, p_.col_scale_p ? p_.col_scale_p + j * NR : nullptr});
      ProjectEpiArgs<T, A> e{block_, NR, M, j * NR, cols, p_.shift_p, out, g_.Cout,
                             res_.data()};
      p_.project_epi(e);
    }
  }

 private:
  A* ring_row(int64_t ih) const { return ring_ + (ih % g_.ring_rows) * g_.Wp * g_.Cp; }

  // Zeroes what the depthwise reads and no hidden row writes: the padding columns, the
  // channels past C and the zero row. (The whole ring, zeroed per call, was ~6% of a 7x7
  // block's samples at batch 1 in perf: 350 KB per thread.)
  void clear_ring_borders() {
    const int64_t row = g_.Wp * g_.Cp, left = g_.pad * g_.Cp, right = (g_.pad + g_.W) * g_.Cp;
    for (int64_t r = 0; r < g_.ring_rows; ++r) {
      A* q = ring_ + r * row;
      std::fill(q, q + left, A(0));
      for (int64_t w = 0; g_.Cp > g_.C && w < g_.W; ++w)
        std::fill(q + left + w * g_.Cp + g_.C, q + left + (w + 1) * g_.Cp, A(0));
      std::fill(q + right, q + row, A(0));
    }
    std::fill(zero_row_, zero_row_ + row, A(0));
  }

  // Hidden rows [r0, r1] of image n into the ring (the slice's channels; all of them without
  // an expand stage).
  void hidden_rows(int64_t n, int64_t r0, int64_t r1, const HiddenSlice& slice) {
    if constexpr (std::is_same_v<A, float>) {
      if (p_.stem) {  // no expand: the stem's rows are the hidden rows
        for (int64_t ih = r0; ih <= r1; ++ih)
          p_.stem->row(n, ih, stem_strip_, ring_row(ih) + g_.pad * g_.Cp, g_.Cp);
        mark_finite(r0, r1, slice);
        return;
      }
    }
    const int64_t total = (r1 - r0 + 1) * g_.W;
    const T* xn = p_.x + n * p_.sN;
    for (int64_t p0 = 0; p0 < total; p0 += kChunkPixels) {
      const int64_t M = std::min(kChunkPixels, total - p0);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t ih = r0 + (p0 + r) / g_.W, iw = (p0 + r) % g_.W;
        ptrs_[r] = ring_row(ih) + (g_.pad + iw) * g_.Cp;
        const T* src = xn + ih * p_.sH + iw * p_.sW;
        if (g_.has_expand) {
          copy_row(src, tile_ + r * p_.ldx, g_.Cin);
        } else {
          copy_row(src, ptrs_[r], g_.Cin);
        }
      }
      if (!g_.has_expand) continue;
      const int NR = p_.ge.NR;
      std::fill(tile_ + M * p_.ldx, tile_ + (M + 12) * p_.ldx, In(0));
      const bool skip = p_.kr_e && all_finite<A>(tile_, p_.ldx, M, g_.Cin);
      for (int64_t j = slice.j0; j < slice.j1; ++j) {
        const auto [k0, k1] = span(p_.kr_e, j, skip, g_.Cin);
        const int64_t cols = std::min<int64_t>(NR, g_.C - j * NR);
        p_.ge.fn_for(cols)({k1 - k0, tile_ + k0, p_.ldx, M, p_.pe + j * p_.kpe * NR + k0 * NR,
                            block_, NR, p_.col_scale_e ? p_.col_scale_e + j * NR : nullptr});
        p_.expand_epi({block_, NR, M, j * NR, cols, p_.shift_e, ptrs_.data(), g_.act});
      }
    }
    mark_finite(r0, r1, slice);
  }

  // With MixConv segments: whether the slice's values of ring rows [r0, r1] are all finite.
  void mark_finite(int64_t r0, int64_t r1, const HiddenSlice& slice) {
    for (int64_t ih = r0; p_.nseg && ih <= r1; ++ih)
      ring_finite_[ih % g_.ring_rows] = all_finite<A>(
          ring_row(ih) + g_.pad * g_.Cp + slice.c0, g_.Cp, g_.W, slice.c1 - slice.c0);
  }

  template <class D>
  static void copy_row(const T* src, D* dst, int64_t n) {
    if constexpr (std::is_same_v<T, D>) {
      std::memcpy(dst, src, n * sizeof(D));
    } else {
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<D>(src[c]);
    }
  }

  // Panel j's k range (kr: Plan::kr_e / kr_p, not null when `skip`).
  static std::pair<int64_t, int64_t> span(const int64_t* kr, int64_t j, bool skip, int64_t K) {
    return skip ? k_span(kr[2 * j], kr[2 * j + 1], true, K, kPackedStep<A, In>)
                : std::pair<int64_t, int64_t>{0, K};
  }

  const Plan<T, A, In>& p_;
  const Geometry& g_;
  A* ring_ = nullptr;
  A* zero_row_ = nullptr;
  std::vector<char> ring_finite_;  // per ring row, with segments: its slice's values all finite
  In* tile_ = nullptr;
  float* stem_strip_ = nullptr;
  In* project_rows_ = nullptr;  // pairs: the rounded (gated) hidden rows of one project call
  int64_t ldq_ = 0;
  A* block_ = nullptr;
  A* dw_rows_ = nullptr;
  std::vector<A*> ptrs_;
  std::vector<const T*> res_;
};

// Bands per image for `images` images: enough tasks to balance the threads (a multiple of the
// thread count, or >= 4 per thread), as few cuts as possible.
int64_t bands_per_image(int64_t images, int64_t rows) {
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t nb = 1;
  while (nb < rows && (images * nb) % threads != 0 && images * nb < 4 * threads) ++nb;
  return nb;
}

// out[r] = b[r] + sum_c w[r][c] * in[c] for rows [r0, r1), in double: kSeLanes partial sums
// over the inputs (input c into partial c % kSeLanes: independent chains, two AVX-512 vectors
// of doubles), then the bias plus the tail, plus the partials summed pairwise. One fixed order
// of adds per output whatever the thread (the ISA builds may contract differently). Compiled
// per ISA: the baseline build (2 doubles per SSE2 instruction, no FMA) and the partials added
// in one dependent chain made MobileNetV3's 960-channel SE a quarter of its 7x7 blocks at
// batch 8 (perf, ad-hoc).
constexpr int kSeLanes = 16;

template <class T>
struct SeDenseArgs {
  const T *w, *b;  // [rows][cols], [rows]
  const double* in;
  int64_t cols, r0, r1;
  double* out;
};

template <class T>
struct SeDense {
  using Args = SeDenseArgs<T>;

  // Rows [r, r + R): R rows at once, so that 2R vector chains are in flight.
  template <int R>
  EFFK_INLINE static void rows(const Args& a, int64_t r) {
    const int64_t body = a.cols / kSeLanes * kSeLanes;
    double part[R][kSeLanes] = {};
    for (int64_t c = 0; c < body; c += kSeLanes)
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const T* wr = a.w + (r + i) * a.cols + c;
#pragma omp simd
        for (int j = 0; j < kSeLanes; ++j) part[i][j] += static_cast<double>(wr[j]) * a.in[c + j];
      }
    for (int i = 0; i < R; ++i) {
      const T* wr = a.w + (r + i) * a.cols;
      double acc = static_cast<double>(a.b[r + i]);
      for (int64_t c = body; c < a.cols; ++c) acc += static_cast<double>(wr[c]) * a.in[c];
      // The partials pairwise (a fixed tree, vector adds), not one chain of dependent adds.
      for (int h = kSeLanes / 2; h >= 1; h /= 2)
#pragma omp simd
        for (int j = 0; j < h; ++j) part[i][j] += part[i][j + h];
      a.out[r + i] = acc + part[i][0];
    }
  }

  template <Isa>
  static void run(const Args& a) {
    int64_t r = a.r0;
    for (; r + 4 <= a.r1; r += 4) rows<4>(a, r);
    for (; r < a.r1; ++r) rows<1>(a, r);
  }
};

// Squeeze-excite's two small layers on one image's pooled means, in double:
// gate = se_gate(W2 @ se_act(W1 @ pooled + b1) + b2), by SeDense (rows over the threads). The
// weights are read in their own dtype (no per-call converted copies): the contiguous tensors
// of the call, or their copies in a packed buffer.
template <class T>
struct SeLayer {
  const T *reduce_w, *reduce_b, *expand_w, *expand_b;  // [Cr][C], [Cr], [C][Cr], [C]
  int64_t C, Cr;
  Act act, gate_act;

  template <class A>
  void gates(const double* pooled, A* gate) const {
    std::vector<double> s(static_cast<size_t>(Cr)), z(static_cast<size_t>(C));
    dense(reduce_w, reduce_b, pooled, Cr, C, s.data());
    for (int64_t r = 0; r < Cr; ++r) s[r] = act_forward(act, s[r]);
    dense(expand_w, expand_b, s.data(), C, Cr, z.data());
    for (int64_t c = 0; c < C; ++c) gate[c] = static_cast<A>(act_forward(gate_act, z[c]));
  }

 private:
  static void dense(const T* w, const T* b, const double* in, int64_t rows, int64_t cols,
                    double* out) {
    const KernelFn<SeDense<T>> kernel = select_kernel<SeDense<T>>(cpu_isa());
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainMacs / cols), [&](int64_t r0, int64_t r1) {
      kernel({w, b, in, cols, r0, r1, out});
    });
  }
};

// The hidden channels are sliced in units of whole expand panels and whole vectors.
template <class T, class A, class In>
int64_t slice_unit(const Plan<T, A, In>& p) {
  return p.g.has_expand ? std::lcm<int64_t>(p.ge.NR, kLanes<A>) : kLanes<A>;
}

// Slice `part` of `parts` of the hidden channels: contiguous runs of whole units, the last one
// up to Cp.
template <class T, class A, class In>
HiddenSlice hidden_slice(const Plan<T, A, In>& p, int64_t part, int64_t parts) {
  const Geometry& g = p.g;
  const int64_t unit = slice_unit(p);
  const int64_t units = ceil_div(g.Cp, unit);
  const int64_t u0 = units * part / parts, u1 = units * (part + 1) / parts;
  HiddenSlice s{u0 * unit, std::min(u1 * unit, g.Cp), 0, 0};
  if (g.has_expand) {
    s.j0 = s.c0 / p.ge.NR;
    s.j1 = std::min(ceil_div(s.c1, p.ge.NR), p.npe);
  }
  return s;
}

// How the first phase splits a group of `images` images over the threads: row bands (each cut
// recomputes the dil*(k-1) hidden rows under it), or, when the images are fewer than the threads
// and the cuts would recompute more than 1/8 of the hidden rows (late, small feature maps at
// batch 1: a 7x7 map cut in two recomputes 4 of its 7 rows for k = 5), slices of the hidden
// channels (0 = bands; else the slice count). Slices need the two-phase path: the project GEMM
// reads all hidden channels.
template <class T, class A, class In>
int64_t channel_slices(const Plan<T, A, In>& p, int64_t images) {
  const Geometry& g = p.g;
  const int64_t threads = std::max(1, at::get_num_threads());
  // A stem's rows would be computed once per slice, and its skip read from the ring needs
  // the one-phase path.
  if (images >= threads || p.stem) return 0;
  const int64_t recomputed = (bands_per_image(images, g.Ho) - 1) * g.dil * (g.K - 1);
  if (recomputed * 8 <= g.H) return 0;
  const int64_t slices = std::min(threads, ceil_div(g.Cp, slice_unit(p)));
  return slices > 1 ? slices : 0;
}

// row[c] *= gate[c] for c < C.
template <class A>
void scale_row(int64_t C, A* __restrict row, const A* __restrict gate) {
  for (int64_t c = 0; c < C; ++c) row[c] *= gate[c];
}

template <class T, class A, class In>
void run_block(const Plan<T, A, In>& p, const SeLayer<T>* layer) {
  const Geometry& g = p.g;
  const HiddenSlice all{0, g.Cp, 0, p.npe};
  const int64_t threads = std::max(1, at::get_num_threads());
  if (!g.has_se && channel_slices(p, g.N) == 0) {
    // One phase: each task projects the depthwise rows it computes.
    const int64_t nb = bands_per_image(g.N, g.Ho), per = ceil_div(g.Ho, nb);
    parallel_items(g.N * nb, 1, [&](const auto& next) {
      Worker<T, A, In> wk(p, /*bands=*/true);
      for (int64_t item = 0; next(item);) {
        const int64_t n = item / nb, oh0 = (item % nb) * per;
        if (oh0 < g.Ho) wk.band(n, oh0, std::min(g.Ho, oh0 + per), nullptr, nullptr, all);
      }
    });
    return;
  }
  // Two phases (SE, or channel slices): images in groups of (at most) one per thread; phase A
  // writes their depthwise output to image buffers, phase B projects the buffers.
  const int64_t group = std::min(g.N, threads);
  const int64_t HW = g.Ho * g.Wo, img_stride = (round_up(HW, 12) + 12) * g.Cp;
  A* images = thread_scratch<A>(kImages, group * (img_stride + g.Ho * g.Cp));
  A* sums = images + group * img_stride;
  for (int64_t i = 0; i < group; ++i)  // rows past HW: finite, read by the last GEMM block
    std::fill(images + i * img_stride + HW * g.Cp, images + (i + 1) * img_stride, A(0));
  const int NR = p.gp.NR;
  // SE's gates: applied to the hidden rows as they are rounded (pairs); fp32: multiplied into
  // the image's depthwise rows (HW x C products) when that is less work than into a copy of its
  // project panels (C x Cout, and the project GEMM then shares one set of panels: late 7x7
  // maps), else folded into per-image copies of the panels.
  constexpr bool kGatedRows = Plan<T, A, In>::kPairs;
  const bool gate_rows = g.has_se && !kGatedRows && HW < p.npp * NR;
  const int64_t panel_elems = p.npp * p.kpp * NR;
  In* panels = g.has_se && !kGatedRows && !gate_rows
                   ? thread_scratch<In>(kGatedPanels, group * panel_elems)
                   : nullptr;
  std::vector<A> gates(group * g.C);
  std::vector<char> gates_finite(group, 1);
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    const int64_t m = std::min(group, g.N - n0);
    // Phase A: hidden rows and depthwise rows into the image buffers, by (image, band, slice).
    const int64_t ns = channel_slices(p, m), slices = std::max<int64_t>(ns, 1);
    const int64_t nb = ns ? 1 : bands_per_image(m, g.Ho), per = ceil_div(g.Ho, nb);
    parallel_items(m * nb * slices, 1, [&](const auto& next) {
      Worker<T, A, In> wk(p, /*bands=*/true);
      for (int64_t item = 0; next(item);) {
        const int64_t i = item / (nb * slices), band = item / slices % nb, oh0 = band * per;
        if (oh0 < g.Ho)
          wk.band(n0 + i, oh0, std::min(g.Ho, oh0 + per), images + i * img_stride,
                  g.has_se ? sums + i * g.Ho * g.Cp : nullptr,
                  ns ? hidden_slice(p, item % slices, slices) : all);
      }
    });
    // SE: each image's gates (then applied below). With an image per thread, one thread per
    // image (SeLayer's row-parallel loops run inline inside a parallel region): fewer
    // synchronisations than splitting each image's small layers over the threads.
    auto image_gates = [&](int64_t i) {
      const A* si = sums + i * g.Ho * g.Cp;
      std::vector<double> pooled(g.C);
      for (int64_t c = 0; c < g.C; ++c) {
        double acc = 0.0;
        for (int64_t r = 0; r < g.Ho; ++r) acc += si[r * g.Cp + c];
        pooled[c] = acc / static_cast<double>(HW);
      }
      layer->gates(pooled.data(), gates.data() + i * g.C);
      gates_finite[i] = all_finite<A>(gates.data() + i * g.C, g.C, 1, g.C);
    };
    if (g.has_se && m >= threads) {
      at::parallel_for(0, m, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) image_gates(i);
      });
    } else {
      for (int64_t i = 0; g.has_se && i < m; ++i) image_gates(i);
    }
    if (gate_rows) {
      at::parallel_for(0, m * HW, std::max<int64_t>(1, kGrainMacs / g.C),
                       [&](int64_t b, int64_t e) {
                         for (int64_t item = b; item < e; ++item) {
                           const int64_t i = item / HW;
                           scale_row(g.C, images + i * img_stride + item % HW * g.Cp,
                                     gates.data() + i * g.C);
                         }
                       });
    } else if (panels != nullptr) {
      at::parallel_for(0, m * p.npp, std::max<int64_t>(1, kGrainMacs / (g.C * NR)),
                       [&](int64_t b, int64_t e) {
                         for (int64_t item = b; item < e; ++item) {
                           const int64_t i = item / p.npp, j = item % p.npp;
                           const A* gate = gates.data() + i * g.C;
                           const In* src = p.pp + j * p.kpp * NR;
                           In* dst = panels + i * panel_elems + j * p.kpp * NR;
                           for (int64_t k = 0; k < g.C; ++k)
                             for (int l = 0; l < NR; ++l)
                               dst[k * NR + l] = src[k * NR + l] * gate[k];
                         }
                       });
    }
    // Phase B: the project GEMM over the image buffers, by (image, pixel chunk, panel group).
    // Chunks of equal size. When the chunks alone would leave a thread idle or uneven, the
    // output panels are split too (a 7x7 map is one chunk), or, with fewer panels than
    // threads, the pixels in more chunks (a 14x14 map with 64 output channels at batch 1: four
    // chunks of 49 rows, not three of 66 on two threads).
    int64_t chunks = ceil_div(HW, kChunkPixels), pg = 1;
    if ((m * chunks) % threads != 0) {
      int64_t c = chunks;
      while ((m * c) % threads != 0 && ceil_div(HW, c + 1) >= kRowQuantum) ++c;
      if (p.npp < threads && (m * c) % threads == 0)
        chunks = c;
      else
        pg = std::min<int64_t>(p.npp, threads);
    }
    const int64_t chunk = ceil_div(HW, chunks);
    parallel_items(m * chunks * pg, 1, [&](const auto& next) {
      Worker<T, A, In> wk(p, /*bands=*/false);
      for (int64_t item = 0; next(item);) {
        const int64_t i = item / (chunks * pg), q = item % pg;
        const int64_t p0 = item / pg % chunks * chunk;
        wk.project(n0 + i, p0, std::min(chunk, HW - p0), images + i * img_stride + p0 * g.Cp,
                   panels ? panels + i * panel_elems : p.pp, p.npp * q / pg,
                   p.npp * (q + 1) / pg,
                   g.has_se && kGatedRows ? gates.data() + i * g.C : nullptr,
                   gate_rows || gates_finite[i] != 0);
      }
    });
  }
}

// ---- packed weights --------------------------------------------------------------------------
//
// Everything a call derives from the block's weights and BatchNorm statistics (BN folded, the
// GEMM panels packed, the depthwise weights scaled and padded), in one buffer: packed per call
// into the calling thread's scratch, or once by inverted_residual_pack into a uint8 tensor that
// the caller keeps and passes to inverted_residual_packed (effkernels.nn.prepack_for_inference),
// which checks x against the header and runs the block the buffer describes (the stored pack
// also holds SE's weights). At batch 1 the packing was ~9% of a MobileNetV2 forward (its 14 MB
// of weights read and written each call).

constexpr int64_t kPackMagic = 0x4b50524945464645;  // "EFFEIRPK"
constexpr int64_t kPackVersion = 4;

// The block a packed buffer holds: with its parts it describes the whole block, so that a call
// passes only x and the buffer (a call with the block's ~20 tensors in lists cost ~20 us of
// argument conversion in torch.ops, more than a 14x14 block's kernel at batch 1).
struct PackHeader {
  int64_t magic, version;
  int64_t dtype;     // x's c10::ScalarType
  int64_t pairs;     // the bf16 pair kernel's panels (cpu_gemm.h) rather than the FMA kernel's
  int64_t NRe, NRp;  // panel widths, chosen from the CPU's ISA
  int64_t Cin, C, Cout, K, has_expand;
  int64_t stride, dil, skip, has_se, Cr;
  int64_t act, se_act, se_gate;  // Act
  double eps;
  bool operator==(const PackHeader&) const = default;
};

// Byte offsets of the parts (64-byte aligned, after the header) and the total size.
struct PackLayout {
  int64_t pe, pp, col_e, col_p, shift_e, shift_p, wd, shift_d, kr_e, kr_p, segs, wseg;
  int64_t se;  // SE's weights in x's dtype: reduce [Cr][C], [Cr], expand [C][Cr], [C]
  int64_t bytes;
};

// The call's dimensions, GEMM shapes and kernels; x, its strides and out are set by the caller.
template <class T, class A, class In>
Plan<T, A, In> make_plan(const Geometry& g) {
  Plan<T, A, In> p;
  p.g = g;
  p.isa = cpu_isa();
  p.ge = plan_gemm<A, In>(p.isa, g.C);
  p.gp = plan_gemm<A, In>(p.isa, g.Cout);
  p.npe = ceil_div(g.C, p.ge.NR);
  p.npp = ceil_div(g.Cout, p.gp.NR);
  p.kpe = round_up(g.Cin, kPackedStep<A, In>);
  p.kpp = round_up(g.C, kPackedStep<A, In>);
  p.ldx = g.Cin % 64 == 0 ? g.Cin + 16 : g.Cin;  // no 4 KiB-aliased tile rows
  p.dw = select_dw<A>(p.isa, g.K, g.stride, g.dil);
  for (int64_t k = 1; k <= g.K; k += 2) p.dw_k[k] = select_dw<A>(p.isa, k, g.stride, g.dil);
  p.expand_epi = select_kernel<ExpandEpi<A>>(p.isa);
  p.project_epi = g.skip ? select_kernel<ProjectEpi<T, A, true>>(p.isa)
                         : select_kernel<ProjectEpi<T, A, false>>(p.isa);
  if constexpr (Plan<T, A, In>::kPairs) p.round_rows = select_kernel<RoundRows>(p.isa);
  return p;
}

template <class T, class A, class In>
PackHeader pack_header(const Plan<T, A, In>& p, double eps) {
  const Geometry& g = p.g;
  return {kPackMagic, kPackVersion, static_cast<int64_t>(c10::CppTypeToScalarType<T>::value),
          Plan<T, A, In>::kPairs, p.ge.NR, p.gp.NR, g.Cin, g.C, g.Cout, g.K, g.has_expand,
          g.stride, g.dil, g.skip, g.has_se, g.Cr, static_cast<int64_t>(g.act),
          static_cast<int64_t>(g.se_act), static_cast<int64_t>(g.se_gate), eps};
}

template <class T, class A, class In>
PackLayout pack_layout(const Plan<T, A, In>& p) {
  const Geometry& g = p.g;
  PackLayout l{};
  int64_t off = round_up(sizeof(PackHeader), 64);
  auto take = [&](int64_t elems, int64_t elem_bytes) {
    const int64_t at = off;
    off = round_up(off + elems * elem_bytes, 64);
    return at;
  };
  constexpr bool kPairs = Plan<T, A, In>::kPairs;
  l.pe = take(g.has_expand ? p.npe * p.kpe * p.ge.NR : 0, sizeof(In));
  l.pp = take(p.npp * p.kpp * p.gp.NR, sizeof(In));
  l.col_e = take(kPairs && g.has_expand ? p.npe * p.ge.NR : 0, sizeof(A));
  l.col_p = take(kPairs ? p.npp * p.gp.NR : 0, sizeof(A));
  l.shift_e = take(g.C, sizeof(A));
  l.shift_p = take(g.Cout, sizeof(A));
  l.wd = take(g.K * g.K * g.Cp, sizeof(A));
  l.shift_d = take(g.Cp, sizeof(A));
  // k ranges: a flag (any panel narrower than K), then (lo, hi) per panel.
  l.kr_e = take(g.has_expand ? 1 + 2 * p.npe : 0, sizeof(int64_t));
  l.kr_p = take(1 + 2 * p.npp, sizeof(int64_t));
  // Depthwise segments: a count, then (c0, c1, k, woff) per run of vectors; their weights.
  l.segs = take(1 + 4 * (g.Cp / kLanes<A>), sizeof(int64_t));
  l.wseg = take(g.K * g.K * g.Cp, sizeof(A));
  l.se = take(g.has_se ? (2 * g.C + 1) * g.Cr + g.C : 0, sizeof(T));
  l.bytes = off;
  return l;
}

// Points the plan at the parts of a packed buffer.
template <class T, class A, class In>
void attach(Plan<T, A, In>& p, const PackLayout& l, const uint8_t* base) {
  auto at = [&](int64_t off) { return base + off; };
  p.pe = p.g.has_expand ? reinterpret_cast<const In*>(at(l.pe)) : nullptr;
  p.pp = reinterpret_cast<const In*>(at(l.pp));
  if constexpr (Plan<T, A, In>::kPairs) {
    p.col_scale_e = p.g.has_expand ? reinterpret_cast<const A*>(at(l.col_e)) : nullptr;
    p.col_scale_p = reinterpret_cast<const A*>(at(l.col_p));
  }
  p.shift_e = reinterpret_cast<const A*>(at(l.shift_e));
  p.shift_p = reinterpret_cast<const A*>(at(l.shift_p));
  p.wd = reinterpret_cast<const A*>(at(l.wd));
  p.shift_d = reinterpret_cast<const A*>(at(l.shift_d));
  auto ranges = [&](int64_t off) {
    const int64_t* r = reinterpret_cast<const int64_t*>(at(off));
    return r[0] ? r + 1 : nullptr;
  };
  p.kr_e = p.g.has_expand ? ranges(l.kr_e) : nullptr;
  p.kr_p = ranges(l.kr_p);
  const int64_t* segs = reinterpret_cast<const int64_t*>(at(l.segs));
  p.nseg = segs[0];
  p.segs = reinterpret_cast<const DwSegment*>(segs + 1);
  p.wseg = reinterpret_cast<const A*>(at(l.wseg));
}

// The depthwise segments of the folded weights wd ([K][K][Cp]): per vector of channels the
// smallest odd k whose centred k x k holds all its nonzero taps, runs of equal k, and their
// weights cut to k x k. segs[0] = 0 (none) unless some run has k < K.
template <class A>
void pack_segments(const Geometry& g, const A* wd, int64_t* segs, A* wseg) {
  constexpr int L = kLanes<A>;
  const int64_t K = g.K, nvec = g.Cp / L;
  // Per vector, the largest distance from the centre (rings of taps) of a nonzero tap (NaN
  // counts); one pass over the taps. Even K: no centre, no segments.
  std::vector<int64_t> reach(nvec, K % 2 == 1 ? 0 : K / 2);
  for (int64_t t = 0; t < K * K && K % 2 == 1; ++t) {
    const int64_t d = std::max(std::abs(t / K - K / 2), std::abs(t % K - K / 2));
    const A* tap = wd + t * g.Cp;
    for (int64_t v = 0; v < nvec; ++v)
      if (d > reach[v] && std::any_of(tap + v * L, tap + (v + 1) * L,
                                      [](A w) { return w != A(0); }))
        reach[v] = d;
  }
  std::vector<int64_t> kv(nvec);
  for (int64_t v = 0; v < nvec; ++v) kv[v] = K % 2 == 1 ? 2 * reach[v] + 1 : K;
  int64_t n = 0, woff = 0;
  bool smaller = false;
  DwSegment* out = reinterpret_cast<DwSegment*>(segs + 1);
  for (int64_t v = 0; v < nvec;) {
    int64_t e = v;
    while (e < nvec && kv[e] == kv[v]) ++e;
    const DwSegment sg{v * L, e * L, kv[v], woff};
    const int64_t o = (K - sg.k) / 2, width = sg.c1 - sg.c0;
    for (int64_t i = 0; i < sg.k; ++i)
      for (int64_t j = 0; j < sg.k; ++j)
        std::copy_n(wd + ((i + o) * K + (j + o)) * g.Cp + sg.c0, width,
                    wseg + woff + (i * sg.k + j) * width);
    woff += sg.k * sg.k * width;
    smaller = smaller || sg.k < K;
    out[n++] = sg;
    v = e;
  }
  segs[0] = smaller ? n : 0;
}

// Writes the header and every part into base[0, l.bytes); SE's weights only when `se` is given
// (the stored pack: the per-call packing reads the call's tensors instead).
template <class T, class A, class In>
void pack_block(const Plan<T, A, In>& p, const PackLayout& l, at::TensorList expand,
                at::TensorList depthwise, at::TensorList se, at::TensorList project, double eps,
                uint8_t* base) {
  const Geometry& g = p.g;
  const PackHeader h = pack_header(p, eps);
  std::memcpy(base, &h, sizeof(h));
  auto part = [&](int64_t off) { return base + off; };
  // BN folded: scales into the packed weights (pairs: the column scales), shifts into the
  // epilogues.
  std::vector<A> scale_e(g.C, A(0)), scale_p(g.Cout, A(0)), shift_e(g.C, A(0));
  std::vector<A> shift_p(g.Cout, A(0));
  std::optional<ConvPanels<T, A, In>> panels_e;
  if (g.has_expand) {
    fold<A>(expand, eps, scale_e, shift_e);
    panels_e.emplace(weight_parts(expand), p.isa, p.ge.NR, scale_e.data());
  }
  fold<A>(project, eps, scale_p, shift_p);
  const ConvPanels<T, A, In> panels_p(weight_parts(project), p.isa, p.gp.NR, scale_p.data());
  std::memcpy(part(l.shift_e), shift_e.data(), g.C * sizeof(A));
  std::memcpy(part(l.shift_p), shift_p.data(), g.Cout * sizeof(A));
  if constexpr (Plan<T, A, In>::kPairs) {
    if (g.has_expand)
      std::memcpy(part(l.col_e), panels_e->col_scale(), p.npe * p.ge.NR * sizeof(A));
    std::memcpy(part(l.col_p), panels_p.col_scale(), p.npp * p.gp.NR * sizeof(A));
  }
  // The threads pack the expand and project panels together (at batch 1 packing alone on the
  // calling thread left the other threads waiting), split by weight elements: a panel of the
  // project's is K/Cin times one of the expand's (6x at t = 6), so a split by panel count left
  // one thread most of the work.
  In* pe = reinterpret_cast<In*>(part(l.pe));
  In* pp = reinterpret_cast<In*>(part(l.pp));
  const int64_t npe = g.has_expand ? p.npe : 0;
  const int64_t size_e = p.kpe * p.ge.NR, size_p = p.kpp * p.gp.NR;
  const int64_t total = npe * size_e + p.npp * size_p, off_p = npe * size_e;
  const int64_t tasks = std::clamp<int64_t>(total / kPackGrainElems, 1, at::get_num_threads());
  // The panels (of n, size elements each, the first at element `first`) that start in [lo, hi).
  auto starting_in = [](int64_t lo, int64_t hi, int64_t first, int64_t size, int64_t n) {
    auto index = [&](int64_t at) {
      return n == 0 ? n : std::min(n, ceil_div(std::max<int64_t>(at - first, 0), size));
    };
    return std::pair<int64_t, int64_t>{index(lo), index(hi)};
  };
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = total * t / tasks, hi = total * (t + 1) / tasks;
      const auto [e0, e1] = starting_in(lo, hi, 0, size_e, npe);
      if (e0 < e1) (*panels_e)(e0, e1, pe + e0 * size_e);
      const auto [j0, j1] = starting_in(lo, hi, off_p, size_p, p.npp);
      if (j0 < j1) panels_p(j0, j1, pp + j0 * size_p);
    }
  });
  auto write_ranges = [&](at::TensorList weight, int64_t Cout, int64_t NR, int64_t off) {
    const PanelK kr = panel_k_ranges<T>(weight, NR);
    int64_t* r = reinterpret_cast<int64_t*>(part(off));
    std::fill(r, r + 1 + 2 * ceil_div(Cout, NR), int64_t(0));
    r[0] = kr.empty() ? 0 : 1;
    for (size_t j = 0; j < kr.lo.size(); ++j) {
      r[1 + 2 * j] = kr.lo[j];
      r[2 + 2 * j] = kr.hi[j];
    }
  };
  if (g.has_expand) write_ranges(weight_parts(expand), g.C, p.ge.NR, l.kr_e);
  write_ranges(weight_parts(project), g.Cout, p.gp.NR, l.kr_p);
  std::vector<A> scale(g.Cp, A(0)), shift_d(g.Cp, A(0));
  fold<A>(depthwise, eps, scale, shift_d);
  std::memcpy(part(l.shift_d), shift_d.data(), g.Cp * sizeof(A));
  // Tap-major and scaled; parts (MixConv's kernels) centred in K x K, their zero taps scaled as
  // a dense weight's would be.
  const int64_t KK = g.K * g.K;
  A* wd = reinterpret_cast<A*>(part(l.wd));
  std::fill(wd, wd + KK * g.Cp, A(0));  // zero for the padding channels
  int64_t c0 = 0;
  for (const at::Tensor& dw : weight_parts(depthwise)) {
    const at::Tensor w = dw.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const A* wp = w.const_data_ptr<A>();
    const int64_t k = w.size(2), o = (g.K - k) / 2;
    for (int64_t c = 0; c < w.size(0); ++c)
      for (int64_t ty = 0; ty < g.K; ++ty)
        for (int64_t tx = 0; tx < g.K; ++tx) {
          const int64_t iy = ty - o, ix = tx - o;
          const A v = iy >= 0 && iy < k && ix >= 0 && ix < k ? wp[(c * k + iy) * k + ix] : A(0);
          wd[(ty * g.K + tx) * g.Cp + c0 + c] = v * scale[c0 + c];
        }
    c0 += w.size(0);
  }
  pack_segments(g, wd, reinterpret_cast<int64_t*>(part(l.segs)),
                reinterpret_cast<A*>(part(l.wseg)));
  T* se_out = reinterpret_cast<T*>(part(l.se));
  for (const at::Tensor& t : se) {
    const at::Tensor c = t.contiguous();
    std::memcpy(se_out, c.const_data_ptr<T>(), c.numel() * sizeof(T));
    se_out += c.numel();
  }
}

// SE's layers: from the call's tensors (kept alive in `keep`), or from a packed buffer.
template <class T>
SeLayer<T> se_layer(const Geometry& g, at::TensorList se, std::vector<at::Tensor>& keep) {
  for (const at::Tensor& t : se) keep.push_back(t.contiguous());
  return {keep[0].const_data_ptr<T>(), keep[1].const_data_ptr<T>(), keep[2].const_data_ptr<T>(),
          keep[3].const_data_ptr<T>(), g.C, g.Cr, g.se_act, g.se_gate};
}
template <class T>
SeLayer<T> se_layer(const Geometry& g, const uint8_t* part) {
  const T* w = reinterpret_cast<const T*>(part);
  const int64_t n = g.Cr * g.C;
  return {w, w + n, w + n + g.Cr, w + 2 * n + g.Cr, g.C, g.Cr, g.se_act, g.se_gate};
}

// The block's weights: a packed buffer (checked header `packed_header`), or the call's tensors,
// packed into the calling thread's scratch (a fresh buffer per call costs page faults).
struct Weights {
  at::TensorList expand, depthwise, se, project;
  double eps = 0.0;
  const at::Tensor* packed = nullptr;
  const PackHeader* packed_header = nullptr;
};

// x: the block's input (channels innermost), or the stem's input when `stem` is given.
template <class T, class In>
void forward_with(const Geometry& g, const at::Tensor& xc, const Weights& w, const char* op,
                  at::Tensor& out, const DenseConv* stem = nullptr) {
  using A = acc_type<T>;
  Plan<T, A, In> p = make_plan<T, A, In>(g);
  if (stem) {
    p.stem = stem;
  } else {
    p.x = xc.const_data_ptr<T>();
    p.sN = xc.stride(0);
    p.sH = xc.stride(2);
    p.sW = xc.stride(3);
  }
  p.out = out.data_ptr<T>();
  const PackLayout l = pack_layout(p);
  std::optional<SeLayer<T>> layer;
  std::vector<at::Tensor> keep;
  if (w.packed != nullptr) {
    // The header describes the block; the panel widths and kernel kind are this CPU's.
    EFFK_CHECK(op, pack_header(p, w.packed_header->eps) == *w.packed_header &&
                       w.packed->numel() == l.bytes,
               "packed was made for other GEMM kernels (panels ", w.packed_header->NRe, "/",
               w.packed_header->NRp, w.packed_header->pairs ? ", bf16 pairs" : "",
               "; this CPU: ", p.ge.NR, "/", p.gp.NR, Plan<T, A, In>::kPairs ? ", bf16 pairs" : "",
               ") or is damaged (", w.packed->numel(), " bytes, expected ", l.bytes,
               "): pack the block again on this machine");
    const uint8_t* base = w.packed->const_data_ptr<uint8_t>();
    attach(p, l, base);
    if (g.has_se) layer.emplace(se_layer<T>(g, base + l.se));
  } else {
    uint8_t* buf = thread_scratch<uint8_t>(kPacked, l.bytes);
    pack_block(p, l, w.expand, w.depthwise, {}, w.project, w.eps, buf);
    attach(p, l, buf);
    if (g.has_se) layer.emplace(se_layer<T>(g, w.se, keep));
  }
  run_block(p, layer ? &*layer : nullptr);
}

// The ring / step sizes of the checked problem.
void size_steps(Geometry& g, c10::ScalarType dtype) {
  const int64_t lanes = dtype == at::kDouble ? 8 : 16;
  g.Cp = round_up(g.C, lanes);
  const int64_t reach = g.dil * (g.K - 1);
  g.Wp = std::max(g.pad + g.W, (g.Wo - 1) * g.stride + reach + 1);
  g.G = std::max<int64_t>(1, std::min(g.Ho, ceil_div(kStepPixels, g.Wo)));
  g.ring_rows = (g.G - 1) * g.stride + reach + 1;
}

at::Tensor run(const char* op, const Geometry& g, const at::Tensor& x, const Weights& w) {
  at::Tensor out = empty_nhwc({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return in_format(out, output_format(x));
  const at::Tensor xc = channels_innermost(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    with_gemm_operand<scalar_t, acc_type<scalar_t>>(cpu_isa(), [&](auto operand) {
      forward_with<scalar_t, decltype(operand)>(g, xc, w, op, out);
    });
  });
  return in_format(out, output_format(x));
}

// The checked problem of a call with the block's tensors, plus the ring / step sizes.
Geometry geometry(const char* op, const at::Tensor& x, at::TensorList expand,
                  at::TensorList depthwise, at::TensorList se, at::TensorList project,
                  int64_t stride, int64_t dilation, c10::string_view act,
                  c10::string_view se_act, c10::string_view se_gate, bool skip, double eps) {
  Geometry g{};
  static_cast<IrProblem&>(g) = check_inverted_residual_inference(
      op, x, expand, depthwise, se, project, stride, dilation, act, se_act, se_gate, skip, eps,
      /*weight_parts=*/true);
  g.Cr = g.has_se ? se[0].size(0) : 0;
  size_steps(g, x.scalar_type());
  return g;
}

// The problem of an input of N x (the block's Cin) x H x W on the block a packed buffer
// describes (the weights were checked when packing; the caller checked the input).
Geometry packed_geometry(const char* op, int64_t N, int64_t H, int64_t W, const PackHeader& h,
                         int64_t out_channels, int64_t kernel_size, int64_t stride,
                         int64_t dilation) {
  EFFK_CHECK(op, out_channels == h.Cout && kernel_size == h.K && stride == h.stride &&
                     dilation == h.dil,
             "packed holds a block with out_channels ", h.Cout, ", kernel_size ", h.K,
             ", stride ", h.stride, ", dilation ", h.dil, "; got out_channels ", out_channels,
             ", kernel_size ", kernel_size, ", stride ", stride, ", dilation ", dilation);
  Geometry g{};
  g.N = N;
  g.Cin = h.Cin;
  g.H = H;
  g.W = W;
  g.C = h.C;
  g.Cout = h.Cout;
  g.K = h.K;
  g.stride = h.stride;
  g.dil = h.dil;
  g.pad = h.dil * (h.K - 1) / 2;
  g.Ho = conv_out_size(g.H, g.K, g.stride, g.pad, g.dil);
  g.Wo = conv_out_size(g.W, g.K, g.stride, g.pad, g.dil);
  EFFK_CHECK(op, g.Ho > 0 && g.Wo > 0, "x (", g.H, "x", g.W, ") is smaller than the ", g.K,
             "x", g.K, " depthwise kernel's dilated extent");
  g.has_expand = h.has_expand != 0;
  g.has_se = h.has_se != 0;
  g.skip = h.skip != 0;
  EFFK_CHECK(op, !g.skip || (g.Ho == g.H && g.Wo == g.W),
             "the block's skip needs an output as large as x; got ", g.Ho, "x", g.Wo, " from ",
             g.H, "x", g.W);
  g.Cr = h.Cr;
  g.act = static_cast<Act>(h.act);
  g.se_act = static_cast<Act>(h.se_act);
  g.se_gate = static_cast<Act>(h.se_gate);
  size_steps(g, static_cast<c10::ScalarType>(h.dtype));
  return g;
}

// packed_geometry for x, checked as the call with the block's tensors checks it.
Geometry packed_geometry(const char* op, const at::Tensor& x, const PackHeader& h,
                         int64_t out_channels, int64_t kernel_size, int64_t stride,
                         int64_t dilation) {
  check_float_input(op, "x", x, 4);
  EFFK_CHECK(op, x.scalar_type() == static_cast<c10::ScalarType>(h.dtype) && x.size(1) == h.Cin,
             "x must be ", static_cast<c10::ScalarType>(h.dtype), " with ", h.Cin,
             " channels, as the block was packed for; got ", x.scalar_type(), " of shape ",
             x.sizes());
  EFFK_CHECK(op, x.size(2) > 0 && x.size(3) > 0, "x must have non-empty H and W; got shape ",
             x.sizes());
  return packed_geometry(op, x.size(0), x.size(2), x.size(3), h, out_channels, kernel_size,
                         stride, dilation);
}

}  // namespace

at::Tensor inverted_residual_inference(const at::Tensor& x, at::TensorList expand,
                                       at::TensorList depthwise, at::TensorList se,
                                       at::TensorList project, int64_t stride, int64_t dilation,
                                       c10::string_view act, c10::string_view se_act,
                                       c10::string_view se_gate, bool skip, double eps) {
  const Geometry g = geometry(kOp, x, expand, depthwise, se, project, stride, dilation, act,
                              se_act, se_gate, skip, eps);
  return run(kOp, g, x, Weights{expand, depthwise, se, project, eps});
}

at::Tensor inverted_residual_packed(const at::Tensor& x, const at::Tensor& packed,
                                    int64_t out_channels, int64_t kernel_size, int64_t stride,
                                    int64_t dilation) {
  constexpr const char* op = "inverted_residual_packed";
  const PackHeader h = read_packed_header<PackHeader>(op, "inverted_residual_pack", packed,
                                                      kPackMagic, kPackVersion);
  const Geometry g = packed_geometry(op, x, h, out_channels, kernel_size, stride, dilation);
  Weights w;
  w.packed = &packed;
  w.packed_header = &h;
  return run(op, g, x, w);
}

// The stem (conv_bn_act_inference's convolution) and the first block (inverted_residual_packed)
// in one pass: the stem's output rows are computed into the block's ring as its hidden rows
// (the block has no expand stage) and never stored. At batch 1 the stem's output is the
// largest tensor of the MobileNets (112x112x32 fp32, 1.6 MB), written and read back from
// L3/DRAM between the two layers.
at::Tensor stem_inverted_residual_packed(
    const at::Tensor& x, const at::Tensor& packed, int64_t out_channels, int64_t kernel_size,
    int64_t stride, int64_t dilation, const at::Tensor& stem_weight,
    const std::optional<at::Tensor>& stem_bias, const at::Tensor& stem_bn_weight,
    const at::Tensor& stem_bn_bias, const at::Tensor& stem_running_mean,
    const at::Tensor& stem_running_var, at::IntArrayRef stem_stride,
    at::IntArrayRef stem_padding, double stem_eps, c10::string_view stem_act) {
  constexpr const char* op = "stem_inverted_residual_packed";
  const int64_t no_dilation[2] = {1, 1};
  const DenseConv stem(op, "stem_", x, stem_weight, stem_bias, stem_bn_weight, stem_bn_bias,
                       stem_running_mean, stem_running_var, stem_stride, stem_padding,
                       no_dilation, stem_eps, stem_act);
  const PackHeader h = read_packed_header<PackHeader>(op, "inverted_residual_pack", packed,
                                                      kPackMagic, kPackVersion);
  const DenseConvGeometry& sg = stem.geometry();
  EFFK_CHECK(op, static_cast<c10::ScalarType>(h.dtype) == at::kFloat && h.has_expand == 0,
             "packed must hold a float32 block without an expand stage (the stem's output is "
             "its hidden rows); got ", static_cast<c10::ScalarType>(h.dtype),
             h.has_expand ? " with an expand stage" : "");
  EFFK_CHECK(op, sg.Cout == h.Cin, "stem_weight must have the block's ", h.Cin,
             " input channels as out_channels; got ", stem_weight.sizes());
  EFFK_CHECK(op, !(h.skip && h.has_se),
             "a block with both a skip and squeeze-excite cannot follow the stem in one pass "
             "(its skip is read from the rows in flight); call conv_bn_act_inference and "
             "inverted_residual_packed");
  const Geometry g = packed_geometry(op, sg.N, sg.OH, sg.OW, h, out_channels, kernel_size,
                                     stride, dilation);
  at::Tensor out = empty_nhwc({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return in_format(out, output_format(x));
  Weights w;
  w.packed = &packed;
  w.packed_header = &h;
  forward_with<float, float>(g, x, w, op, out, &stem);
  return in_format(out, output_format(x));
}

at::Tensor inverted_residual_pack(const at::Tensor& x, at::TensorList expand,
                                  at::TensorList depthwise, at::TensorList se,
                                  at::TensorList project, int64_t stride, int64_t dilation,
                                  c10::string_view act, c10::string_view se_act,
                                  c10::string_view se_gate, bool skip, double eps) {
  constexpr const char* op = "inverted_residual_pack";
  const Geometry g = geometry(op, x, expand, depthwise, se, project, stride, dilation, act,
                              se_act, se_gate, skip, eps);
  at::Tensor packed;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "inverted_residual_pack", [&] {
    using T = scalar_t;
    with_gemm_operand<T, acc_type<T>>(cpu_isa(), [&](auto operand) {
      const auto p = make_plan<T, acc_type<T>, decltype(operand)>(g);
      const PackLayout l = pack_layout(p);
      packed = at::empty({l.bytes}, x.options().dtype(at::kByte).memory_format(
                                                  at::MemoryFormat::Contiguous));
      pack_block(p, l, expand, depthwise, se, project, eps, packed.data_ptr<uint8_t>());
    });
  });
  return packed;
}

}  // namespace effkernels::cpu

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("inverted_residual_inference", &effkernels::cpu::inverted_residual_inference);
  m.impl("inverted_residual_pack", &effkernels::cpu::inverted_residual_pack);
  m.impl("inverted_residual_packed", &effkernels::cpu::inverted_residual_packed);
  m.impl("stem_inverted_residual_packed", &effkernels::cpu::stem_inverted_residual_packed);
}
