// CPU pointwise (1x1) conv + BatchNorm + activation (+ residual), forward and backward.
//
// A 1x1 conv on NHWC data is a GEMM: out[M = N*H*W][Cout] = x[M][Cin] @ W^T. The GEMM is ours:
//   * W (BN scale folded in) is packed into panels [Cin][NR] of NR output channels (a transpose
//     in registers), per thread and per group of panels, so that a panel stays in cache;
//   * a register-blocked micro-kernel keeps MR x NR fp32 (fp64 for double) accumulators in
//     vector registers and reads x rows in place (dense fp32/fp64 NHWC; other dtypes and
//     strides are copied per tile): per k, NR/VW vector loads of W and MR broadcast-FMAs each;
//   * each (tile x panel) block of results goes from L1 to the epilogue (BN shift, residual,
//     activation, cast, store), so the output is written once.
// The micro-kernel and the epilogues are written once with GCC vector extensions and compiled
// for AVX-512, AVX2+FMA and the baseline (SSE2) by `flatten` wrappers carrying a target
// attribute; the ISA is chosen at run time (cpu_isa()). No -march flag is needed.
// bf16 on CPUs with AVX-512 BF16: the x @ W GEMMs (forward, training statistics, the backward's
// recompute) run cpu_gemm.h's bf16 kernels instead (AMX tiles where the CPU has AMX, else the
// vdpbf16ps pair kernel), bf16 x rows read in place and W packed as bf16 k pairs (twice the
// multiply-adds per instruction of an fp32 FMA for the pair kernel, half the bytes), the BN scale
// applied to the fp32 results. Elsewhere bf16 is converted to fp32 per tile. The backward's
// dx and grad_weight GEMMs read the fp32 dy and stay fp32.
//
// Training: the batch statistics are needed before the first output is written: a statistics
// pass runs the GEMM (unscaled W; two-pass moments of the fp32/fp64 accumulators through
// ChannelStats, one chunk per pixel tile) and keeps y = x @ W (the op's conv_out), then the
// output is act(y * scale + shift). The backward reads that y instead of running the GEMM again
// (given conv_out; without it, e.g. for an eval-mode forward, it recomputes y). The statistics
// never see fp16/bf16 values.

// Determinism: the tiles depend on M only; every output element is one FMA chain over k in a
// fixed order whatever the panel shape, block or thread; every reduction (BN statistics,
// gradient sums, grad_weight over pixel chunks) combines fixed partials in a fixed order. So
// the bits do not depend on the thread count (the work split may: it only balances threads).
// They may differ between ISAs (vector width of the epilogues' math, FMA contraction).
//
// Layout: NHWC first. x (any N/H/W strides with unit channel stride) is read in place; an NCHW
// x is first copied to NHWC (one extra read+write of x), and an NCHW result costs one more
// transposing copy of the output (in_format), as do NCHW residual/grad_out inputs.
#include "pwconv_bn_act.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "cpu_gemm.h"
#include "effkernels/activation.h"
#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"
#include "effkernels/op_checks.h"

namespace effkernels::cpu {
namespace {

constexpr const char* kOp = "pwconv_bn_act";
constexpr const char* kBwdOp = "pwconv_bn_act_backward";

// Rows of a channels-innermost 4-D tensor (or a dense matrix) at `base` (PixelRows: the
// offsets, shared with the CUDA GEMM).
template <class S>
struct Rows {
  S* base = nullptr;
  PixelRows at;

  S* row(int64_t p) const { return base + at.off(p); }
};

template <class S>
Rows<S> rows_of(const at::Tensor& t) {
  return {static_cast<S*>(t.data_ptr()),
          pixel_rows(t.size(0), t.size(2), t.size(3), t.stride(0), t.stride(2), t.stride(3))};
}

// A dense [rows][ld] matrix viewed as Rows.
template <class S>
Rows<S> dense_rows(S* base, int64_t ld) {
  return {base, effkernels::dense_rows(ld)};
}

// Panels j in [j0, j1) of B[K][ncols], whose rows are source rows (row(k) -> B[k][0], columns
// cs elements apart), -> dst[j - j0][K][NR], zero past ncols. A copy: no transpose needed.
template <class S, class A, class RowFn>
void rows_to_panels(const RowFn& row, int64_t cs, int64_t K, int64_t ncols, int NR, int64_t j0,
                    int64_t j1, A* dst) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t c0 = j * NR, n = std::min<int64_t>(NR, ncols - c0);
    for (int64_t k = 0; k < K; ++k) {
      const S* s = row(k) + c0 * cs;
      A* d = dst + ((j - j0) * K + k) * NR;
      if (cs == 1) {
        for (int64_t l = 0; l < n; ++l) d[l] = static_cast<A>(s[l]);
      } else {
        for (int64_t l = 0; l < n; ++l) d[l] = static_cast<A>(s[l * cs]);
      }
      for (int64_t l = n; l < NR; ++l) d[l] = A(0);
    }
  }
}

// Prefetches a rows x ncols block of a channels-innermost tensor (write: for ownership). Called
// before a block's GEMM, so that the epilogue's residual/grad_out reads and output stores,
// scattered over `rows` rows, find their lines in cache (as they would not for a
// hardware prefetcher) instead of stalling once per line.
template <class S>
void prefetch_block(const Rows<S>& t, int64_t row0, int64_t rows, int64_t col0, int64_t ncols,
                    bool write) {
  if (t.base == nullptr) return;
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(S));
  for (int64_t r = 0; r < rows; ++r) {
    const S* p = t.row(row0 + r) + col0;
    // The last element too: a block may straddle one more line. (__builtin_prefetch wants a
    // constant read/write argument, also at -O0: two spelled-out branches.)
    if (write) {
      for (int64_t l = 0; l < ncols; l += kLine) __builtin_prefetch(p + l, 1);
      __builtin_prefetch(p + ncols - 1, 1);
    } else {
      for (int64_t l = 0; l < ncols; l += kLine) __builtin_prefetch(p + l, 0);
      __builtin_prefetch(p + ncols - 1, 0);
    }
  }
}

// ---- tiling over pixel rows ------------------------------------------------------------------

constexpr int64_t kMaxTileRows = 96;  // a tile of x rows stays in L2 even for Cin ~ 1000

// Work decomposition of C[M][ncols] = rows @ B: tiles of pixel rows x groups of panels.
// Statistics passes need tiles that depend on M only (they are the BN/gradient-sum chunks);
// otherwise the tiles, the panel shape and the grouping only balance the threads' work, and
// cannot change any bit of the result.
struct TilePlan {
  int64_t M = 0, K = 0, ncols = 0;
  int MR = 1, NR = 1;
  int64_t tile_rows = 0, ntiles = 0, npanels = 0, panels_per_item = 1, col_items = 1, items = 0;
};

template <class A, class In = A>
struct Plan {
  GemmPlan<A, In> gemm;
  TilePlan tiles;
};

// Rows the micro-kernels compute for `rows` rows: full MR blocks and one MR, MR/2 or MR/4 tail.
int64_t computed_rows(int64_t rows, int MR) {
  const int64_t rem = rows % MR, mr2 = (MR + 1) / 2, mr4 = (MR + 3) / 4;
  return rows - rem + (rem == 0 ? 0 : rem > mr2 ? MR : rem > mr4 ? mr2 : mr4);
}

// The largest per-thread share of the work when parallel_items splits `items` (group-major:
// item = group * ntiles + tile) into equal contiguous ranges (before any stealing), in units
// of computed row x column.
double max_share(const TilePlan& t, int64_t threads) {
  const int64_t chunk = ceil_div(t.items, std::min(threads, t.items));
  double worst = 0.0;
  for (int64_t b = 0; b < t.items; b += chunk) {
    double work = 0.0;
    for (int64_t i = b; i < std::min(t.items, b + chunk); ++i) {
      const int64_t g = i / t.ntiles, tile = i % t.ntiles;
      const int64_t rows = std::min(t.tile_rows, t.M - tile * t.tile_rows);
      const int64_t panels = std::min(t.panels_per_item, t.npanels - g * t.panels_per_item);
      work += static_cast<double>(computed_rows(rows, t.MR) * panels * t.NR);
    }
    worst = std::max(worst, work);
  }
  return worst;
}

// The tile plan of the least estimated time (only panels `nr` wide when nr > 0: packed weights).
template <class A, class In = A>
Plan<A, In> search_tiles(Isa isa, int64_t M, int64_t K, int64_t ncols, bool chunk_tiles,
                         int nr) {
  const int64_t threads = std::max(1, at::get_num_threads());
  // Chunk tiles: even, a multiple of 12 rows, at most kMaxTileRows. Free tiles may also split
  // a small M evenly over the threads.
  std::vector<int64_t> heights{round_up(ceil_div(M, ceil_div(M, kMaxTileRows)), kRowQuantum)};
  if (!chunk_tiles)
    for (const int64_t n : {threads, 2 * threads, 4 * threads})
      if (ceil_div(M, n) >= 12 && ceil_div(M, n) < heights[0]) heights.push_back(ceil_div(M, n));
  Plan<A, In> best{};
  double best_cost = 0.0;
  for (const GemmPlan<A, In>& g : panel_shapes<A, In>(isa)) {
    if (nr > 0 && g.NR != nr) continue;
    for (const int64_t h : heights) {
      TilePlan t;
      t.M = M;
      t.K = K;
      t.ncols = ncols;
      t.MR = g.MR;
      t.NR = g.NR;
      t.tile_rows = h;
      t.ntiles = ceil_div(M, h);
      t.npanels = ceil_div(ncols, g.NR);
      // Many tiles: one group of all panels. Few: also try one panel per group.
      for (const int64_t groups : {int64_t(1), t.npanels}) {
        // (From 4 tiles per thread on, not: each group re-reads x, which the cost below
        // undercounts. 384->64 14x14 N=8 took 2 groups of 32 columns, one per thread, and ran
        // no faster on 2 threads than on 1; with 17 tiles of all 64 columns, 0.74x the time,
        // 64->384 / 96->576 N=8 0.91x / 0.94x, 32->192 28x28 N=1 0.84x, the other MobileNetV2
        // layers 0.97-1.02x: in-process A/B, ad-hoc, bench/NOTES.md.)
        if (groups > 1 && t.ntiles >= 4 * threads) break;
        t.col_items = groups;
        t.panels_per_item = ceil_div(t.npanels, groups);
        t.items = groups * t.ntiles;
        const double cost = max_share(t, threads) * g.cost *
                            (groups > 1 ? 1.02 : 1.0);  // x is re-read per group
        if (best_cost == 0.0 || cost < best_cost) {
          best_cost = cost;
          best = {g, t};
        }
      }
    }
  }
  return best;
}

constexpr size_t kRecentPlans = 64;

// search_tiles' plan, kept per thread for the last kRecentPlans argument sets: the search costs
// max_share for each of ~20 candidates, a few us per call (3% of 96->576 14x14 at N=1 in perf).
// A plan depends only on its arguments, the thread count and this CPU.
template <class A, class In = A>
Plan<A, In> plan_tiles(Isa isa, int64_t M, int64_t K, int64_t ncols, bool chunk_tiles,
                       int nr = 0) {
  using Key = std::array<int64_t, 7>;
  const Key key{M, K, ncols, at::get_num_threads(), static_cast<int64_t>(isa), nr, chunk_tiles};
  thread_local std::vector<std::pair<Key, Plan<A, In>>> recent;
  for (const auto& [k, plan] : recent)
    if (k == key) return plan;
  if (recent.size() >= kRecentPlans) recent.erase(recent.begin());
  recent.emplace_back(key, search_tiles<A, In>(isa, M, K, ncols, chunk_tiles, nr));
  return recent.back().second;
}

// Runs C = rows(src) @ B and hands every tile_rows x NR block to
// consume(tile, row0, rows, panel, block) while it is still in L1/L2; prepare(row0, rows,
// col0, ncols) runs before the block's GEMM (to prefetch what the epilogue will touch).
// Items run column group by column group: each thread packs the panels of its group
// (pack(j0, j1, dst)) once into its own buffer, which stays in cache, and a big W is read once
// overall rather than packed to memory and read back. Dense rows of the operand type In
// (fp32/fp64 NHWC; bf16 NHWC for the pair kernel) are read in place; other tiles (fp16, bf16
// without the pair kernel, strided rows, a last tile whose final block would read past the
// end) are first copied, converted and zero-padded.
// kr (when not empty): each panel's nonzero input channels (panel_k_ranges), the only ones
// its GEMM reads for a tile whose x values are all finite: the same bits as the full K.
// A pack with col_scale() (WeightPanels, Bf16PairPanels) supplies the kernel's per-column
// factors (null when folded into the panels); a plain packing function has none.
template <class Src>
struct RowElem {  // a row source's element type: S of Rows<const S>; void for a fill source
  using type = void;
};
template <class S>
struct RowElem<Rows<const S>> {
  using type = S;
};

template <class Src, class A, class In, class Pack, class Prepare, class Consume>
void tiled_gemm(const TilePlan& p, const Src& src, const Pack& pack,
                const GemmPlan<A, In>& gemm, const Prepare& prepare, const Consume& consume,
                const PanelK& kr = {}) {
  using S = typename RowElem<Src>::type;
  // A source with fill(row0, rows, dst, ld) makes its rows on demand (DyRows), per tile.
  constexpr bool kFill = std::is_void_v<S>;
  constexpr int64_t kStep = kPackedStep<A, In>;
  const int64_t Kp = round_up(p.K, kStep);
  const A* col_scale = nullptr;
  if constexpr (requires { pack.col_scale(); }) col_scale = pack.col_scale();
  // Padded copy stride: K*sizeof(In) a multiple of 4 KiB would put all rows in one cache set.
  const int64_t ldp = p.K % 64 == 0 ? p.K + 16 : p.K;
  // A pack with panels() holds all panels packed already (pwconv_bn_act_packed).
  constexpr bool kPrepacked = requires { pack.panels(); };
  parallel_items(p.items, 1, [&](const auto& next) {
    In* scratch = kPrepacked ? nullptr : thread_scratch<In>(0, p.panels_per_item * Kp * p.NR);
    const In* panels = scratch;
    // A tile's GEMM writes (and a copied tile holds) whole blocks: round_up(rows, MR) rows.
    const int64_t rows_alloc = round_up(p.tile_rows, p.MR);
    A* block = thread_scratch<A>(1, rows_alloc * p.NR);
    In* copy = nullptr;
    int64_t packed = -1, copied = -1;
    for (int64_t item = 0; next(item);) {
      const int64_t ci = item / p.ntiles, t = item % p.ntiles;
      const int64_t j0 = ci * p.panels_per_item;
      const int64_t j1 = std::min(p.npanels, j0 + p.panels_per_item);
      if (ci != packed) {
        if constexpr (kPrepacked) {
          panels = pack.panels() + j0 * Kp * p.NR;
        } else {
          pack(j0, j1, scratch);
        }
        packed = ci;
      }
      const int64_t row0 = t * p.tile_rows, rows = std::min(p.tile_rows, p.M - row0);
      const int64_t rows_pad = round_up(rows, p.MR);
      const In* a = nullptr;
      int64_t lda = 0;
      if constexpr (!kFill && std::is_same_v<S, In>) {
        if (src.at.flat && row0 + rows_pad <= p.M) {
          a = src.row(row0);
          lda = src.at.step;
        }
      }
      if (a == nullptr) {
        if (!copy) copy = thread_scratch<In>(2, rows_alloc * ldp);
        if (t != copied) {
          if constexpr (kFill) src.fill(row0, rows, copy, ldp);
          In* d = copy;
          for (int64_t r = 0; r < rows_pad; ++r, d += ldp) {
            if (r >= rows) {
              std::fill(d, d + p.K, In(0));
            } else if constexpr (!kFill) {
              const S* s = src.row(row0 + r);
              for (int64_t k = 0; k < p.K; ++k) d[k] = static_cast<In>(s[k]);
            }
          }
          copied = t;
        }
        a = copy;
        lda = ldp;
      }
      const bool skip = !kr.empty() && all_finite<A>(a, lda, rows, p.K);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t cols = std::min<int64_t>(p.NR, p.ncols - j * p.NR);
        prepare(row0, rows, j * p.NR, cols);
        const auto [k0, k1] = kr.span(j, skip, p.K, kStep);
        gemm.fn_for(cols)({k1 - k0, a + k0, lda, rows, panels + (j - j0) * Kp * p.NR + k0 * p.NR,
                           block, p.NR, col_scale ? col_scale + j * p.NR : nullptr});
        consume(t, row0, rows, j, block);
      }
    }
  });
}

// ---- epilogues -------------------------------------------------------------------------------

// Epilogue arguments e (Fwd/BwdEpilogueArgs) for one GEMM block: panel j's NR columns (of
// ncols in all) of rows [row0, row0 + rows), results in `block` (row stride NR).
template <class Args, class A>
Args for_block(Args e, const A* block, int NR, int64_t row0, int64_t rows, int64_t j,
               int64_t ncols) {
  e.c = block;
  e.ldc = NR;
  e.row0 = row0;
  e.rows = rows;
  e.col0 = j * NR;
  e.ncols = std::min<int64_t>(NR, ncols - e.col0);
  return e;
}

// out = act(c + shift (+ residual)) for a block of rows x ncols results at column col0.
template <class T, class A>
struct FwdEpilogueArgs {
  const A* c;
  int64_t ldc, row0, rows, col0, ncols;
  const A* shift;  // per output channel
  Rows<T> out;
  Rows<const T> res;
};

// One row of the epilogue. GCC honours __restrict on parameters (not on local pointers), which
// is what lets these loops vectorise without run-time alias checks.
template <Act ACT, bool RES, class T, class A>
EFFK_INLINE void fwd_epilogue_row(int64_t n, const A* __restrict c, const A* __restrict shift,
                                  const T* __restrict res, T* __restrict out) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return store_bf16_row(n, out, [&](int64_t l) {
      A z = c[l] + shift[l];
      if constexpr (RES) z += static_cast<A>(res[l]);
      return act_forward<ACT>(z);
    });
  }
  for (int64_t l = 0; l < n; ++l) {
    A z = c[l] + shift[l];
    if constexpr (RES) z += static_cast<A>(res[l]);
    out[l] = static_cast<T>(act_forward<ACT>(z));
  }
}

template <class T, Act ACT, bool RES>
struct FwdEpilogue {
  using A = acc_type<T>;
  using Args = FwdEpilogueArgs<T, A>;
  template <Isa>
  static void run(const Args& e) {
    for (int64_t r = 0; r < e.rows; ++r) {
      const int64_t p = e.row0 + r;
      fwd_epilogue_row<ACT, RES>(e.ncols, e.c + r * e.ldc, e.shift + e.col0,
                                 RES ? e.res.row(p) + e.col0 : nullptr, e.out.row(p) + e.col0);
    }
  }
};

template <class T>
using FwdEpilogueFn = void (*)(const FwdEpilogueArgs<T, acc_type<T>>&);

// Kernel K<T, ACT, RES> for the run-time activation and residual flag, on the CPU's ISA.
template <template <class, Act, bool> class K, class T>
auto select_act_res(Isa isa, Act act, bool res) {
  return EFFK_DISPATCH_ACT(act, [&] {
    // (parenthesised: the template commas would split the macro argument)
    return (res ? select_kernel<K<T, ACT, true>>(isa) : select_kernel<K<T, ACT, false>>(isa));
  });
}

template <class T>
FwdEpilogueFn<T> select_fwd_epilogue(Isa isa, Act act, bool res) {
  return select_act_res<FwdEpilogue, T>(isa, act, res);
}

// Backward, first pass, on a block of y = conv(x): xhat = (y - mean) * invstd,
// z = gamma * xhat + beta (+ residual), g = grad_out * act'(z). Stores g as grad_residual, xhat
// (fp32/fp64) unless xhat is null (y itself is kept: the forward's conv_out), and adds this
// block's rows to the tile's sums of g and g * xhat. (g itself is not stored: the second pass
// recomputes it, which costs a read of grad_out instead of a write and a read of an fp32
// M x Cout buffer.)
template <class T, class A>
struct BwdEpilogueArgs {
  const A* c;
  int64_t ldc, row0, rows, col0, ncols;
  const A *mean, *invstd, *gamma, *beta;  // per output channel
  Rows<const T> grad_out, res;
  Rows<T> grad_res;
  A* xhat;  // [M][ld], or null: not stored
  int64_t ld;
  A *sum_g, *sum_gx;  // this tile's partial sums, per output channel
};

template <Act ACT, bool RES, bool STORE_XHAT, class T, class A>
EFFK_INLINE void bwd_epilogue_row(int64_t n, const A* __restrict y, const A* __restrict mean,
                                  const A* __restrict invstd, const A* __restrict gamma,
                                  const A* __restrict beta, const T* __restrict grad_out,
                                  const T* __restrict res, A* __restrict xhat_out,
                                  T* __restrict grad_res,
                                  A* __restrict sum_g, A* __restrict sum_gx) {
  for (int64_t l = 0; l < n; ++l) {
    const A xh = (y[l] - mean[l]) * invstd[l];
    A z = gamma[l] * xh + beta[l];
    if constexpr (RES) z += static_cast<A>(res[l]);
    const A g = act_backward<ACT>(static_cast<A>(grad_out[l]), z);
    if constexpr (STORE_XHAT) xhat_out[l] = xh;
    if constexpr (RES) grad_res[l] = static_cast<T>(g);
    sum_g[l] += g;
    sum_gx[l] += g * xh;
  }
}

// Backward, second pass, pixel rows [m0, m1): g as in the first pass (the same expression on the
// same xhat: the same bits), then dy = a * g + b * xhat + c, from the stored xhat (in place of
// it: y null) or from y (the forward's conv_out: xhat recomputed as the first pass does) into
// dst, whose first row is row m0's.
template <class T, class A>
struct DyPassArgs {
  int64_t m0, m1, n;
  const A* y;  // [M][ldy], or null
  int64_t ldy;
  const A *mean, *invstd;  // per output channel (with y)
  A* dst;                  // [m1 - m0][ldd]: xhat in (without y), dy out
  int64_t ldd;
  Rows<const T> grad_out, res;
  const A *gamma, *beta, *a, *b, *c;  // per output channel
};

template <Act ACT, bool RES, class T, class A>
EFFK_INLINE A dy_value(A xh, T grad_out, const T* res, A gamma, A beta, A a, A b, A c) {
  A z = gamma * xh + beta;
  if constexpr (RES) z += static_cast<A>(*res);
  return bn_dy(a, b, c, act_backward<ACT>(static_cast<A>(grad_out), z), xh);
}

template <Act ACT, bool RES, class T, class A>
EFFK_INLINE void dy_row(int64_t n, A* __restrict xhat_dy, const T* __restrict grad_out,
                        const T* __restrict res, const A* __restrict gamma,
                        const A* __restrict beta, const A* __restrict a, const A* __restrict b,
                        const A* __restrict c) {
  for (int64_t l = 0; l < n; ++l)
    xhat_dy[l] = dy_value<ACT, RES>(xhat_dy[l], grad_out[l], res + l, gamma[l], beta[l], a[l],
                                    b[l], c[l]);
}

template <Act ACT, bool RES, class T, class A>
EFFK_INLINE void dy_row_from_y(int64_t n, const A* __restrict y, const A* __restrict mean,
                               const A* __restrict invstd, A* __restrict dy,
                               const T* __restrict grad_out, const T* __restrict res,
                               const A* __restrict gamma, const A* __restrict beta,
                               const A* __restrict a, const A* __restrict b,
                               const A* __restrict c) {
  for (int64_t l = 0; l < n; ++l)
    dy[l] = dy_value<ACT, RES>((y[l] - mean[l]) * invstd[l], grad_out[l], res + l, gamma[l],
                               beta[l], a[l], b[l], c[l]);
}

template <class T, Act ACT, bool RES>
struct DyPass {
  using A = acc_type<T>;
  using Args = DyPassArgs<T, A>;
  template <Isa>
  static void run(const Args& e) {
    for (int64_t m = e.m0; m < e.m1; ++m) {
      A* dst = e.dst + (m - e.m0) * e.ldd;
      const T* res = RES ? e.res.row(m) : nullptr;
      if (e.y != nullptr) {
        dy_row_from_y<ACT, RES>(e.n, e.y + m * e.ldy, e.mean, e.invstd, dst, e.grad_out.row(m),
                                res, e.gamma, e.beta, e.a, e.b, e.c);
      } else {
        dy_row<ACT, RES>(e.n, dst, e.grad_out.row(m), res, e.gamma, e.beta, e.a, e.b, e.c);
      }
    }
  }
};

template <class T, class A>
using DyPassFn = void (*)(const DyPassArgs<T, A>&);

// dy rows made on demand from the forward's y (DyPass), never stored whole: the grad_x and
// grad_weight GEMMs take them tile by tile (tiled_gemm's fill, grad_weight_gemm's chunks).
template <class T, class A>
struct DyRows {
  DyPassFn<T, A> pass;
  DyPassArgs<T, A> base;  // everything but the rows and dst
  void fill(int64_t row0, int64_t rows, A* dst, int64_t ld) const {
    DyPassArgs<T, A> e = base;
    e.m0 = row0;
    e.m1 = row0 + rows;
    e.dst = dst;
    e.ldd = ld;
    pass(e);
  }
};

template <class T, Act ACT, bool RES>
struct BwdEpilogue {
  using A = acc_type<T>;
  using Args = BwdEpilogueArgs<T, A>;
  template <Isa>
  static void run(const Args& e) {
    const int64_t c0 = e.col0;
    auto rows = [&](auto store_xhat) {
      for (int64_t r = 0; r < e.rows; ++r) {
        const int64_t p = e.row0 + r;
        bwd_epilogue_row<ACT, RES, decltype(store_xhat)::value>(
            e.ncols, e.c + r * e.ldc, e.mean + c0, e.invstd + c0, e.gamma + c0, e.beta + c0,
            e.grad_out.row(p) + c0, RES ? e.res.row(p) + c0 : nullptr,
            store_xhat ? e.xhat + p * e.ld + c0 : nullptr,
            RES ? e.grad_res.row(p) + c0 : nullptr, e.sum_g + c0, e.sum_gx + c0);
      }
    };
    if (e.xhat != nullptr) {
      rows(std::true_type{});
    } else {
      rows(std::false_type{});
    }
  }
};

template <class T>
using BwdEpilogueFn = void (*)(const BwdEpilogueArgs<T, acc_type<T>>&);

template <class T>
BwdEpilogueFn<T> select_bwd_epilogue(Isa isa, Act act, bool res) {
  return select_act_res<BwdEpilogue, T>(isa, act, res);
}

// ---- forward ---------------------------------------------------------------------------------

using Problem = PwProblem;  // op_checks.h

template <class A>
at::Tensor stat_tensor(const std::vector<A>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  std::copy(v.begin(), v.end(), t.data_ptr<A>());
  return t;
}

// Batch mean and biased variance of y = conv(x), from the fp32/fp64 GEMM accumulators; with
// `keep`, y itself too (pb.M x pb.Cout, dense).
template <class T, class A>
void batch_stats(const Problem& pb, const Rows<const T>& xr, const at::Tensor& weight, Isa isa,
                 std::vector<A>& mean, std::vector<A>& var, A* keep) {
  with_gemm_operand<T, A>(isa, [&](auto operand) {
    using In = decltype(operand);
    const auto [gemm, tp] = plan_tiles<A, In>(isa, pb.M, pb.Cin, pb.Cout, /*chunk_tiles=*/true);
    const ConvPanels<T, A, In> wp(weight, isa, gemm.NR, nullptr);
    // One ChannelStats per panel (chunk = tile): a channel's result depends only on the tiles.
    std::vector<ChannelStats> stats;
    stats.reserve(tp.npanels);
    for (int64_t j = 0; j < tp.npanels; ++j)
      stats.emplace_back(tp.ntiles, std::min<int64_t>(gemm.NR, pb.Cout - j * gemm.NR));
    tiled_gemm(
        tp, xr, wp, gemm, [](int64_t, int64_t, int64_t, int64_t) {},
        [&](int64_t t, int64_t row0, int64_t rows, int64_t j, const A* block) {
          stats[j].add_chunk(t, block, rows, gemm.NR);
          if (keep == nullptr) return;
          const int64_t col0 = j * gemm.NR, ncols = std::min<int64_t>(gemm.NR, pb.Cout - col0);
          for (int64_t r = 0; r < rows; ++r)
            std::copy_n(block + r * gemm.NR, ncols, keep + (row0 + r) * pb.Cout + col0);
        },
        panel_k_ranges<T>(weight, gemm.NR));
    for (int64_t j = 0; j < tp.npanels; ++j)
      stats[j].finalize(mean.data() + j * gemm.NR, var.data() + j * gemm.NR);
  });
}

// BN folded: scale (into the packed weights; the bf16 pair kernel applies it to its fp32 results)
// and shift (the epilogue's), from the statistics mean / var.
template <class A>
void fold_pw(const Problem& pb, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
             const A* mean, const A* var, std::vector<A>& scale, std::vector<A>& shift) {
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  const at::Tensor gamma = acc_vector(bn_weight, acc), beta = acc_vector(bn_bias, acc);
  const A* gd = gamma.const_data_ptr<A>();
  const A* bd = beta.const_data_ptr<A>();
  scale.assign(static_cast<size_t>(pb.Cout), A(0));
  shift.assign(static_cast<size_t>(pb.Cout), A(0));
  for (int64_t c = 0; c < pb.Cout; ++c) {
    const BnAffine<A> f = fold_bn<A>(gd[c], bd[c], mean[c], var[c], static_cast<A>(pb.eps));
    scale[c] = f.scale;
    shift[c] = f.shift;
  }
}

// The forward epilogue's arguments common to all blocks: shift, output rows and residual rows
// (res_i keeps the residual's channels-innermost copy alive).
template <class T, class A>
FwdEpilogueArgs<T, A> fwd_epilogue_base(const Problem& pb, const at::Tensor& out, const A* shift,
                                        const std::optional<at::Tensor>& residual,
                                        at::Tensor& res_i) {
  FwdEpilogueArgs<T, A> base{};
  base.shift = shift;
  base.out = dense_rows<T>(out.data_ptr<T>(), pb.Cout);
  if (residual.has_value() && residual->defined()) {
    res_i = channels_innermost(*residual);
    base.res = rows_of<const T>(res_i);
  }
  return base;
}

// The eval pass: out = act(x @ W' + shift (+ residual)), W' (the BN scale folded in) packed by
// `pack` in panels plan.gemm.NR wide (packed per call, or prepacked: pwconv_bn_act_packed).
template <class T, class A, class In, class Pack>
void eval_pass(const Problem& pb, const Rows<const T>& xr, const at::Tensor& out, const A* shift,
               const std::optional<at::Tensor>& residual, Isa isa, const Plan<A, In>& plan,
               const Pack& pack, const PanelK& kr) {
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor res_i;
  const FwdEpilogueArgs<T, A> base = fwd_epilogue_base<T, A>(pb, out, shift, residual, res_i);
  const FwdEpilogueFn<T> epilogue = select_fwd_epilogue<T>(isa, pb.act, has_res);
  auto prefetch = [&](int64_t row0, int64_t rows, int64_t col0, int64_t ncols) {
    prefetch_block(base.out, row0, rows, col0, ncols, /*write=*/true);
    if (has_res) prefetch_block(base.res, row0, rows, col0, ncols, /*write=*/false);
  };
  const int NR = plan.gemm.NR;
  tiled_gemm(
      plan.tiles, xr, pack, plan.gemm, prefetch,
      [&](int64_t, int64_t row0, int64_t rows, int64_t j, const A* block) {
        epilogue(for_block(base, block, NR, row0, rows, j, pb.Cout));
      },
      kr);
}

// Training keeps y = x @ W from the statistics' GEMM, in the op's conv_out result (acc dtype,
// dense NHWC), and makes the output from it (apply_pass) rather than running the GEMM again;
// the backward reads it rather than running the GEMM a third time. (For the forward alone,
// keeping y paid from 64 input channels or a y within 16 MiB: in-process A/B on an AMD EPYC,
// N=8, 576->96 14x14 0.53x the time, 24->144 56x56 0.86x, but 16->96 112x112 (38 MB) 1.12x;
// with the backward's GEMM saved too it pays everywhere.)

// out = act(y * scale + shift (+ residual)) from the kept y (M x Cout, dense; may be `out`'s
// own memory: each block of rows is scaled into a scratch copy before its outputs are written).
template <class T, class A>
void apply_pass(const Problem& pb, const A* y, const at::Tensor& out, const A* scale,
                const A* shift, const std::optional<at::Tensor>& residual, Isa isa) {
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor res_i;
  const FwdEpilogueArgs<T, A> base = fwd_epilogue_base<T, A>(pb, out, shift, residual, res_i);
  const FwdEpilogueFn<T> epilogue = select_fwd_epilogue<T>(isa, pb.act, has_res);
  constexpr int64_t kRows = 16;
  parallel_items(ceil_div(pb.M, kRows), 1, [&](const auto& next) {
    A* scaled = thread_scratch<A>(0, kRows * pb.Cout);
    for (int64_t item = 0; next(item);) {
      FwdEpilogueArgs<T, A> e = base;
      e.c = scaled;
      e.ldc = pb.Cout;
      e.row0 = item * kRows;
      e.rows = std::min(kRows, pb.M - e.row0);
      e.ncols = pb.Cout;
      for (int64_t r = 0; r < e.rows; ++r) {
        const A* __restrict src = y + (e.row0 + r) * pb.Cout;
        A* __restrict dst = scaled + r * pb.Cout;
        for (int64_t c = 0; c < pb.Cout; ++c) dst[c] = src[c] * scale[c];
      }
      epilogue(e);
    }
  });
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const Problem& pb, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    bool keep_conv_out) {
  using A = acc_type<T>;
  const at::ScalarType acc = stat_dtype(x);
  at::Tensor out = empty_nhwc({pb.N, pb.Cout, pb.H, pb.W}, x.options());
  const at::Tensor xi = channels_innermost(x);
  const Rows<const T> xr = rows_of<const T>(xi);
  const Isa isa = cpu_isa();

  std::vector<A> mean(static_cast<size_t>(pb.Cout), A(0)), var(mean);
  at::Tensor mean_t, var_t;
  // y = x @ W, kept by the statistics' pass in training (dense NHWC: M x Cout): in conv_out
  // for the backward; else (no backward will read it) in fp32/fp64 output's own memory, or a
  // temporary for fp16/bf16.
  const bool keep = pb.training && keep_conv_out;
  const at::Tensor conv_out = keep ? empty_nhwc({pb.N, pb.Cout, pb.H, pb.W}, x.options().dtype(acc))
                                   : at::empty({0}, x.options().dtype(acc));
  at::Tensor y_tmp;
  A* y = nullptr;
  if (keep) {
    y = conv_out.data_ptr<A>();
  } else if (pb.training) {
    if constexpr (std::is_same_v<T, A>) {
      y = out.data_ptr<A>();
    } else {
      y_tmp = at::empty({pb.M, pb.Cout}, x.options().dtype(acc));
      y = y_tmp.data_ptr<A>();
    }
  }
  if (pb.training) {
    if (pb.M > 0) batch_stats<T, A>(pb, xr, weight, isa, mean, var, y);
    mean_t = stat_tensor(mean);
    var_t = stat_tensor(var);
  } else {
    mean_t = stat_copy(*running_mean, acc);
    var_t = stat_copy(*running_var, acc);
    std::copy_n(mean_t.const_data_ptr<A>(), pb.Cout, mean.begin());
    std::copy_n(var_t.const_data_ptr<A>(), pb.Cout, var.begin());
  }
  if (pb.M == 0 || pb.Cout == 0)
    return {in_format(out, output_format(x)), mean_t, var_t, conv_out};

  std::vector<A> scale, shift;
  fold_pw<A>(pb, bn_weight, bn_bias, mean.data(), var.data(), scale, shift);
  if (y != nullptr) {
    apply_pass<T, A>(pb, y, out, scale.data(), shift.data(), residual, isa);
    return {in_format(out, output_format(x)), mean_t, var_t, conv_out};
  }
  with_gemm_operand<T, A>(isa, [&](auto operand) {
    using In = decltype(operand);
    const Plan<A, In> plan = plan_tiles<A, In>(isa, pb.M, pb.Cin, pb.Cout, /*chunk_tiles=*/false);
    const ConvPanels<T, A, In> wp(weight, isa, plan.gemm.NR, scale.data());
    eval_pass<T, A, In>(pb, xr, out, shift.data(), residual, isa, plan, wp,
                        panel_k_ranges<T>(weight, plan.gemm.NR));
  });
  return {in_format(out, output_format(x)), mean_t, var_t, conv_out};
}

// ---- backward --------------------------------------------------------------------------------

constexpr int64_t kGradWeightChunk = 256;  // pixel rows per grad_weight partial

// grad_weight[co][ci] = sum_m dy[m][co] * x[m][ci]: a GEMM with the pixels as the reduction,
// rows = output channels (dy^T of a chunk, transposed once per chunk), panels = x's input
// channels (rows of x copied). Partials per fixed chunk of pixels are summed in chunk order.
// dy_rows(m0, rows) -> the chunk's dense dy rows (row stride Cout): stored ones, or made into
// the thread's scratch (DyRows).
template <class T, class A, class DyRowsFn>
void grad_weight_gemm(const Problem& pb, const Rows<const T>& xr, const DyRowsFn& dy_rows,
                      Isa isa, A* grad_w) {
  const GemmPlan<A> gemm = plan_gemm<A>(isa, pb.Cin);
  const int NR = gemm.NR;
  const int64_t cin_pad = round_up(pb.Cin, NR), cout_pad = round_up(pb.Cout, gemm.MR);
  const int64_t npanels = cin_pad / NR;
  int64_t chunk = kGradWeightChunk;  // grown (by problem size only) to bound partials memory
  while (ceil_div(pb.M, chunk) * cout_pad * cin_pad > (int64_t(1) << 24)) chunk *= 2;
  const int64_t nchunks = ceil_div(pb.M, chunk), ldt = chunk + 16;
  Scratch<A> partial(nchunks * cout_pad * cin_pad);
  const auto transpose = select_kernel<TransposeKernel<A, A>>(isa);

  at::parallel_for(0, nchunks * npanels, 1, [&](int64_t begin, int64_t end) {
    A* dyt = thread_scratch<A>(0, cout_pad * ldt);
    A* xpanel = thread_scratch<A>(1, chunk * NR);
    int64_t transposed = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ch = item / npanels, j = item % npanels;
      const int64_t m0 = ch * chunk, rows = std::min(chunk, pb.M - m0);
      if (ch != transposed) {
        const A* dy = dy_rows(m0, rows);
        transpose({dy, pb.Cout, rows, pb.Cout, nullptr, dyt, ldt, rows, cout_pad});
        transposed = ch;
      }
      rows_to_panels<T, A>([&](int64_t k) { return xr.row(m0 + k); }, 1, rows, pb.Cin, NR, j,
                           j + 1, xpanel);
      gemm.fn({rows, dyt, ldt, pb.Cout, xpanel,
               partial.get() + ch * cout_pad * cin_pad + j * NR, cin_pad});
    }
  });
  at::parallel_for(0, pb.Cout, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co)
      for (int64_t ci = 0; ci < pb.Cin; ++ci) {
        A s = A(0);
        for (int64_t ch = 0; ch < nchunks; ++ch)
          s += partial.get()[(ch * cout_pad + co) * cin_pad + ci];
        grad_w[co * pb.Cin + ci] = s;
      }
  });
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Problem& pb, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean_in,
    const at::Tensor& var_in, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& conv_out) {
  using A = acc_type<T>;
  const at::ScalarType acc = stat_dtype(x);
  const bool has_res = residual.has_value() && residual->defined();
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor grad_x = empty_nhwc({pb.N, pb.Cin, pb.H, pb.W}, x.options());
  at::Tensor grad_res = has_res ? empty_nhwc({pb.N, pb.Cout, pb.H, pb.W}, x.options())
                                : at::empty({0}, x.options());
  at::Tensor grad_w = at::zeros({pb.Cout, pb.Cin}, acc_opts);
  at::Tensor grad_gamma = at::zeros({pb.Cout}, acc_opts);
  at::Tensor grad_beta = at::zeros({pb.Cout}, acc_opts);
  auto finish = [&] {
    return std::make_tuple(
        in_format(grad_x, output_format(x)),
        grad_w.to(weight.scalar_type()).view({pb.Cout, pb.Cin, 1, 1}),
        grad_gamma.to(bn_weight.scalar_type()), grad_beta.to(bn_bias.scalar_type()),
        has_res ? in_format(grad_res, output_format(*residual)) : grad_res);
  };
  if (pb.M == 0 || pb.Cout == 0) {
    grad_x.zero_();
    return finish();
  }
  const Isa isa = cpu_isa();
  const at::Tensor gamma = acc_vector(bn_weight, acc), beta = acc_vector(bn_bias, acc);
  const at::Tensor mean = acc_vector(mean_in, acc), var = acc_vector(var_in, acc);
  std::vector<A> invstd(static_cast<size_t>(pb.Cout));
  const A* vd = var.const_data_ptr<A>();
  for (int64_t c = 0; c < pb.Cout; ++c) invstd[c] = inv_std<A>(vd[c], static_cast<A>(pb.eps));

  // Pass 1: y = conv(x) tile by tile (the forward's conv_out, or recomputed); xhat,
  // grad_residual and per-tile sums of g and g * xhat.
  const at::Tensor xi = channels_innermost(x);
  const Rows<const T> xr = rows_of<const T>(xi);
  // xhat, then dy in its place; with conv_out neither is stored (DyRows makes dy from y).
  at::Tensor xhat_buf = pb.has_conv_out ? at::Tensor() : at::empty({pb.M, pb.Cout}, acc_opts);
  at::Tensor sums;  // [2][tiles][Cout]: the tiles' sums of g and g * xhat
  const at::Tensor go_i = channels_innermost(grad_out);
  at::Tensor res_i;
  BwdEpilogueArgs<T, A> base{};
  base.mean = mean.const_data_ptr<A>();
  base.invstd = invstd.data();
  base.gamma = gamma.const_data_ptr<A>();
  base.beta = beta.const_data_ptr<A>();
  base.grad_out = rows_of<const T>(go_i);
  if (has_res) {
    res_i = channels_innermost(*residual);
    base.res = rows_of<const T>(res_i);
    base.grad_res = dense_rows<T>(grad_res.data_ptr<T>(), pb.Cout);
  }
  base.xhat = pb.has_conv_out ? nullptr : xhat_buf.data_ptr<A>();
  base.ld = pb.Cout;
  const BwdEpilogueFn<T> epilogue = select_bwd_epilogue<T>(isa, pb.act, has_res);
  auto prefetch = [&](int64_t row0, int64_t rows, int64_t col0, int64_t ncols) {
    prefetch_block(base.grad_out, row0, rows, col0, ncols, /*write=*/false);
    if (has_res) prefetch_block(base.res, row0, rows, col0, ncols, /*write=*/false);
  };
  with_gemm_operand<T, A>(isa, [&](auto operand) {
    using In = decltype(operand);
    const auto [gemm, tp] = plan_tiles<A, In>(isa, pb.M, pb.Cin, pb.Cout, /*chunk_tiles=*/true);
    sums = at::zeros({2, tp.ntiles, pb.Cout}, acc_opts);
    A* sum_g = sums.data_ptr<A>();
    A* sum_gx = sum_g + tp.ntiles * pb.Cout;
    if (pb.has_conv_out) {
      // The same tiles and panel blocks the GEMM would hand over, so the same sums' bits.
      const A* y = conv_out->const_data_ptr<A>();
      parallel_items(tp.ntiles, 1, [&](const auto& next) {
        for (int64_t t = 0; next(t);) {
          const int64_t row0 = t * tp.tile_rows, rows = std::min(tp.tile_rows, pb.M - row0);
          for (int64_t j = 0; j < tp.npanels; ++j) {
            BwdEpilogueArgs<T, A> e = for_block(base, y + row0 * pb.Cout + j * gemm.NR,
                                                gemm.NR, row0, rows, j, pb.Cout);
            e.ldc = pb.Cout;
            e.sum_g = sum_g + t * pb.Cout;
            e.sum_gx = sum_gx + t * pb.Cout;
            epilogue(e);
          }
        }
      });
      return;
    }
    const ConvPanels<T, A, In> wp(weight, isa, gemm.NR, nullptr);
    tiled_gemm(
        tp, xr, wp, gemm, prefetch,
        [&](int64_t t, int64_t row0, int64_t rows, int64_t j, const A* block) {
          BwdEpilogueArgs<T, A> e = for_block(base, block, gemm.NR, row0, rows, j, pb.Cout);
          e.sum_g = sum_g + t * pb.Cout;
          e.sum_gx = sum_gx + t * pb.Cout;
          epilogue(e);
        },
        panel_k_ranges<T>(weight, gemm.NR));
  });
  const int64_t ntiles = sums.size(1);
  const A* sum_g = sums.const_data_ptr<A>();
  const A* sum_gx = sum_g + ntiles * pb.Cout;

  // dbeta = sum g, dgamma = sum g * xhat (tile partials in tile order), then the coefficients
  // of dy = a * g + b * xhat + c.
  std::vector<A> ca(static_cast<size_t>(pb.Cout)), cb(ca), cc(ca);
  A* dgamma = grad_gamma.data_ptr<A>();
  A* dbeta = grad_beta.data_ptr<A>();
  for (int64_t c = 0; c < pb.Cout; ++c) {
    double sg = 0.0, sgx = 0.0;
    for (int64_t t = 0; t < ntiles; ++t) {
      sg += sum_g[t * pb.Cout + c];
      sgx += sum_gx[t * pb.Cout + c];
    }
    dbeta[c] = static_cast<A>(sg);
    dgamma[c] = static_cast<A>(sgx);
    const BnBackwardCoeffs<A> k = bn_backward_coeffs<A>(
        base.gamma[c], invstd[c], static_cast<A>(sg), static_cast<A>(sgx),
        static_cast<A>(pb.M), pb.training);
    ca[c] = k.a;
    cb[c] = k.b;
    cc[c] = k.c;
  }
  if (pb.Cin == 0) return finish();
  // grad_x = dy @ W: the forward machinery with panels over input channels and a plain store.
  const auto [gx, tx] = plan_tiles<A>(isa, pb.M, pb.Cout, pb.Cin, /*chunk_tiles=*/false);

  // Pass 2: dy. Stored, in place of xhat or (from conv_out) into a buffer; or, from conv_out,
  // made tile by tile inside the GEMMs, never stored, where the grad_x GEMM takes each tile
  // once (one column group; else each group would make it again).
  const DyPassFn<T, A> dy_pass = select_act_res<DyPass, T>(isa, pb.act, has_res);
  DyPassArgs<T, A> dy_args{0, 0, pb.Cout, nullptr, pb.Cout, base.mean, base.invstd, nullptr,
                           pb.Cout, base.grad_out, base.res, base.gamma, base.beta, ca.data(),
                           cb.data(), cc.data()};
  if (pb.has_conv_out) dy_args.y = conv_out->const_data_ptr<A>();
  const DyRows<T, A> dy_rows{dy_pass, dy_args};
  at::Tensor dy_buf;
  A* dy = nullptr;
  if (!pb.has_conv_out || tx.col_items > 1) {
    dy_buf = pb.has_conv_out ? at::empty({pb.M, pb.Cout}, acc_opts) : xhat_buf;
    dy = dy_buf.data_ptr<A>();
    at::parallel_for(0, pb.M, std::max<int64_t>(1, 32768 / pb.Cout),
                     [&](int64_t m0, int64_t m1) {
                       dy_rows.fill(m0, m1 - m0, dy + m0 * pb.Cout, pb.Cout);
                     });
  }

  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  const T* w = weight.const_data_ptr<T>();
  // B[k = co][col = ci]: rows of W, copied.
  auto wt_panels = [&](int64_t j0, int64_t j1, A* dst) {
    rows_to_panels<T, A>([&](int64_t k) { return w + k * s0; }, s1, pb.Cout, pb.Cin, gx.NR,
                         j0, j1, dst);
  };
  const std::vector<A> zero(static_cast<size_t>(pb.Cin), A(0));
  FwdEpilogueArgs<T, A> xbase{};
  xbase.shift = zero.data();
  xbase.out = dense_rows<T>(grad_x.data_ptr<T>(), pb.Cin);
  const FwdEpilogueFn<T> store = select_fwd_epilogue<T>(isa, Act::Identity, false);
  auto prefetch_out = [&](int64_t row0, int64_t rows, int64_t col0, int64_t ncols) {
    prefetch_block(xbase.out, row0, rows, col0, ncols, /*write=*/true);
  };
  auto store_block = [&](int64_t, int64_t row0, int64_t rows, int64_t j, const A* block) {
    store(for_block(xbase, block, gx.NR, row0, rows, j, pb.Cin));
  };
  if (dy != nullptr) {
    tiled_gemm(tx, dense_rows<const A>(dy, pb.Cout), wt_panels, gx, prefetch_out, store_block);
    grad_weight_gemm<T, A>(
        pb, xr, [&](int64_t m0, int64_t) -> const A* { return dy + m0 * pb.Cout; }, isa,
        grad_w.data_ptr<A>());
  } else {
    tiled_gemm(tx, dy_rows, wt_panels, gx, prefetch_out, store_block);
    grad_weight_gemm<T, A>(
        pb, xr,
        [&](int64_t m0, int64_t rows) -> const A* {
          A* scratch = thread_scratch<A>(2, rows * pb.Cout);  // slots 0-1: grad_weight_gemm's
          dy_rows.fill(m0, rows, scratch, pb.Cout);
          return scratch;
        },
        isa, grad_w.data_ptr<A>());
  }
  return finish();
}

// ---- packed weights (inference) ----------------------------------------------------------------
//
// pwconv_bn_act_pack folds the BatchNorm from the running statistics and packs the weight's
// panels once (the width the per-call path would choose for these channels on this CPU);
// pwconv_bn_act_packed runs the eval pass from the buffer. The per-call path packs on every
// call: ~1/3 of MobileNetV2's 320 -> 1280 head at batch 1 (its 1.6 MB of weights transposed
// per call). Same bits as the per-call path: the same panels, tiles of the same shapes.

constexpr int64_t kPwPackMagic = 0x4b50575046464645;  // "EFFPWPK"
constexpr int64_t kPwPackVersion = 1;

struct PwPackHeader {
  int64_t magic, version;
  int64_t dtype;  // x's c10::ScalarType
  int64_t pairs;  // the bf16 pair kernel's panels rather than the FMA kernel's
  int64_t NR, Cin, Cout;
  double eps;
};

// Byte offsets (64-byte aligned, after the header): the shift [Cout], the pair kernel's column
// scales [npanels * NR], the panels' k ranges (a flag, then lo/hi per panel), the panels.
struct PwPackLayout {
  int64_t shift, col_scale, kr, panels, bytes;
};

template <class A, class In>
PwPackLayout pw_pack_layout(const PwPackHeader& h) {
  const int64_t npanels = ceil_div(h.Cout, h.NR), Kp = round_up(h.Cin, kPackedStep<A, In>);
  PwPackLayout l{};
  int64_t off = round_up(sizeof(PwPackHeader), 64);
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off = round_up(off + bytes, 64);
    return at;
  };
  l.shift = take(h.Cout * sizeof(A));
  l.col_scale = take(npanels * h.NR * sizeof(A));
  l.kr = take((1 + 2 * npanels) * sizeof(int64_t));
  l.panels = take(npanels * Kp * h.NR * sizeof(In));
  l.bytes = off;
  return l;
}

// The prepacked panels, as tiled_gemm takes them.
template <class A, class In>
struct PackedPanels {
  const In* all;
  const A* scale;  // the pair kernel's column factors, or null
  const In* panels() const { return all; }
  const A* col_scale() const { return scale; }
};

template <class T>
at::Tensor pack_impl(const Problem& pb, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                     const at::Tensor& running_mean, const at::Tensor& running_var) {
  using A = acc_type<T>;
  const Isa isa = cpu_isa();
  const at::ScalarType acc = stat_dtype(x);
  const at::Tensor mean = running_mean.to(acc).contiguous(), var = running_var.to(acc).contiguous();
  std::vector<A> scale, shift;
  fold_pw<A>(pb, bn_weight, bn_bias, mean.const_data_ptr<A>(), var.const_data_ptr<A>(), scale,
             shift);
  at::Tensor packed;
  with_gemm_operand<T, A>(isa, [&](auto operand) {
    using In = decltype(operand);
    const GemmPlan<A, In> gemm = plan_gemm<A, In>(isa, pb.Cout);
    const PwPackHeader h{kPwPackMagic, kPwPackVersion,
                         static_cast<int64_t>(c10::CppTypeToScalarType<T>::value),
                         std::is_same_v<In, A> ? 0 : 1, gemm.NR, pb.Cin, pb.Cout, pb.eps};
    const PwPackLayout l = pw_pack_layout<A, In>(h);
    packed = at::zeros({l.bytes}, x.options().dtype(at::kByte).memory_format(
                                      at::MemoryFormat::Contiguous));
    uint8_t* base = packed.data_ptr<uint8_t>();
    std::memcpy(base, &h, sizeof(h));
    std::memcpy(base + l.shift, shift.data(), pb.Cout * sizeof(A));
    const int64_t npanels = ceil_div(pb.Cout, gemm.NR);
    const ConvPanels<T, A, In> wp(weight, isa, gemm.NR, scale.data());
    if (const A* cs = wp.col_scale())
      std::memcpy(base + l.col_scale, cs, npanels * gemm.NR * sizeof(A));
    const PanelK kr = panel_k_ranges<T>(weight, gemm.NR);
    int64_t* r = reinterpret_cast<int64_t*>(base + l.kr);
    r[0] = kr.empty() ? 0 : 1;
    for (size_t j = 0; j < kr.lo.size(); ++j) {
      r[1 + 2 * j] = kr.lo[j];
      r[2 + 2 * j] = kr.hi[j];
    }
    wp(0, npanels, reinterpret_cast<In*>(base + l.panels));
  });
  return packed;
}

template <class T>
at::Tensor packed_impl(const char* op, const Problem& pb, const PwPackHeader& h,
                       const at::Tensor& x, const at::Tensor& packed,
                       const std::optional<at::Tensor>& residual) {
  using A = acc_type<T>;
  const Isa isa = cpu_isa();
  at::Tensor out = empty_nhwc({pb.N, pb.Cout, pb.H, pb.W}, x.options());
  with_gemm_operand<T, A>(isa, [&](auto operand) {
    using In = decltype(operand);
    constexpr int64_t kPairs = std::is_same_v<In, A> ? 0 : 1;
    const PwPackLayout l = pw_pack_layout<A, In>(h);
    const Plan<A, In> plan = plan_tiles<A, In>(isa, std::max<int64_t>(pb.M, 1), pb.Cin,
                                               pb.Cout, /*chunk_tiles=*/false, h.NR);
    EFFK_CHECK(op, h.pairs == kPairs && plan.gemm.NR == h.NR && packed.numel() == l.bytes,
               "packed was made for other GEMM kernels (panels ", h.NR,
               h.pairs ? ", bf16 pairs" : "", ") or is damaged (", packed.numel(),
               " bytes, expected ", l.bytes, "): pack the weights again on this machine");
    if (pb.M == 0) return;
    const uint8_t* base = packed.const_data_ptr<uint8_t>();
    const int64_t npanels = ceil_div(h.Cout, h.NR);
    PanelK kr;
    const int64_t* r = reinterpret_cast<const int64_t*>(base + l.kr);
    if (r[0] != 0)
      for (int64_t j = 0; j < npanels; ++j) {
        kr.lo.push_back(r[1 + 2 * j]);
        kr.hi.push_back(r[2 + 2 * j]);
      }
    const PackedPanels<A, In> pp{reinterpret_cast<const In*>(base + l.panels),
                                 h.pairs ? reinterpret_cast<const A*>(base + l.col_scale)
                                         : nullptr};
    const at::Tensor xi = channels_innermost(x);
    eval_pass<T, A, In>(pb, rows_of<const T>(xi), out,
                        reinterpret_cast<const A*>(base + l.shift), residual, isa, plan, pp, kr);
  });
  return in_format(out, output_format(x));
}

}  // namespace

at::Tensor pwconv_bn_act_pack(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                              const at::Tensor& running_mean, const at::Tensor& running_var,
                              double eps) {
  constexpr const char* op = "pwconv_bn_act_pack";
  const Problem pb = check_pwconv_forward(op, x, weight, bn_weight, bn_bias, running_mean,
                                          running_var, std::nullopt, "identity", false, eps);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    return pack_impl<scalar_t>(pb, x, weight, bn_weight, bn_bias, running_mean, running_var);
  });
}

at::Tensor pwconv_bn_act_packed(const at::Tensor& x, const at::Tensor& packed,
                                int64_t out_channels, c10::string_view act,
                                const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "pwconv_bn_act_packed";
  const PwPackHeader h = read_packed_header<PwPackHeader>(op, "pwconv_bn_act_pack", packed,
                                                          kPwPackMagic, kPwPackVersion);
  EFFK_CHECK(op, out_channels == h.Cout, "packed holds ", h.Cout,
             " output channels; got out_channels ", out_channels);
  const Problem pb = check_pwconv_input(op, x, h.Cout, residual, act, false, h.eps);
  EFFK_CHECK(op, x.scalar_type() == static_cast<c10::ScalarType>(h.dtype) && pb.Cin == h.Cin,
             "x must be ", static_cast<c10::ScalarType>(h.dtype), " with ", h.Cin,
             " channels, as the weights were packed for; got ", x.scalar_type(), " of shape ",
             x.sizes());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    return packed_impl<scalar_t>(op, pb, h, x, packed, residual);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    c10::string_view act, bool training, double eps, bool keep_conv_out) {
  const Problem pb = check_pwconv_forward(kOp, x, weight, bn_weight, bn_bias, running_mean,
                                          running_var, residual, act, training, eps);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    return forward_impl<scalar_t>(pb, x, weight, bn_weight, bn_bias, running_mean, running_var,
                                  residual, keep_conv_out);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pwconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& residual, c10::string_view act,
    bool training, double eps, const std::optional<at::Tensor>& conv_out) {
  const Problem pb = check_pwconv_backward(kBwdOp, grad_out, x, weight, bn_weight, bn_bias, mean,
                                           var, residual, act, training, eps, conv_out);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdOp, [&] {
    return backward_impl<scalar_t>(pb, grad_out, x, weight, bn_weight, bn_bias, mean, var,
                                   residual, conv_out);
  });
}

}  // namespace effkernels::cpu

TORCH_LIBRARY_IMPL(effkernels, CPU, m) {
  m.impl("pwconv_bn_act", &effkernels::cpu::pwconv_bn_act);
  m.impl("pwconv_bn_act_backward", &effkernels::cpu::pwconv_bn_act_backward);
  m.impl("pwconv_bn_act_pack", &effkernels::cpu::pwconv_bn_act_pack);
  m.impl("pwconv_bn_act_packed", &effkernels::cpu::pwconv_bn_act_packed);
}
