// The CPU GEMM machinery shared by pwconv_bn_act and the fused inverted-residual block:
// run-time ISA dispatch (Isa, cpu_isa, select_kernel), scratch buffers, the register-blocked
// FMA micro-kernel over packed weight panels and the panel packing (design notes in
// pwconv_bn_act.cpp), the bf16 pair kernel for CPUs with AVX-512 BF16 (bf16_micro_kernel,
// Bf16PairPanels, with_gemm_operand) and the AMX tile kernel that reads the same bf16 panels
// (AmxGemmKernel). Everything is inline or a template, so each translation
// unit instantiates what it uses, compiled for each ISA by the `flatten` wrappers.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/core/impl/alloc_cpu.h>

#include "effkernels/macros.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace effkernels::cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- run-time ISA dispatch -------------------------------------------------------------------

// Avx512Bf16 adds AVX-512 BF16's vdpbf16ps (bf16 pair products summed into fp32) to AVX-512:
// only the bf16 GEMM kernel uses it; every other kernel runs its AVX-512 build there. Amx adds
// AMX tiles (TDPBF16PS, with the kernel's permission to use their state): the bf16 GEMMs run
// the tile kernel there.
enum class Isa : int { Base = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };

// Vector width in bytes and number of vector registers the micro-kernel may plan for.
constexpr int isa_bytes(Isa isa) { return isa >= Isa::Avx512 ? 64 : isa == Isa::Avx2 ? 32 : 16; }
constexpr int isa_regs(Isa isa) { return isa >= Isa::Avx512 ? 32 : 16; }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define EFFK_PW_X86 1
#define EFFK_PW_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"), flatten))
#define EFFK_PW_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2"), flatten))
#define EFFK_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2")))
#else
#define EFFK_PW_X86 0
#endif

// Whether this process may use AMX's bf16 tiles: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7,
// EDX bits 24 and 22) and Linux grants the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, Linux 5.16+; without it the first tile instruction raises SIGILL).
inline bool amx_bf16_usable() {
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!((edx >> 24) & 1) || !((edx >> 22) & 1)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

inline Isa detect_isa() {
  Isa isa = Isa::Base;
#if EFFK_PW_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::Avx2;
  if (isa == Isa::Avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    isa = Isa::Avx512;
  if (isa == Isa::Avx512 && __builtin_cpu_supports("avx512bf16")) isa = Isa::Avx512Bf16;
#endif
  // EFFK_CPU_ISA=base|avx2|avx512|avx512bf16|amx caps the choice, so that tests can cover the
  // narrower paths (AMX's permission is asked for only where it may be used).
  Isa cap = Isa::Amx;
  if (const char* env = std::getenv("EFFK_CPU_ISA")) {
    const std::string_view want(env);
    cap = want == "base"         ? Isa::Base
          : want == "avx2"       ? Isa::Avx2
          : want == "avx512"     ? Isa::Avx512
          : want == "avx512bf16" ? Isa::Avx512Bf16
                                 : Isa::Amx;
    isa = std::min(isa, cap);
  }
  if (isa == Isa::Avx512Bf16 && cap == Isa::Amx && amx_bf16_usable()) isa = Isa::Amx;
  return isa;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// EFFK_CPU_ISA's spelling of an Isa (effkernels.cpu_isa()).
constexpr const char* isa_name(Isa isa) {
  constexpr const char* kNames[] = {"base", "avx2", "avx512", "avx512bf16", "amx"};
  return kNames[static_cast<int>(isa)];
}

// A kernel K is a struct with `using Args = ...;` and `template <Isa> static void run(const
// Args&)`. The wrappers below compile K::run for one ISA: `flatten` inlines everything it
// calls, so the whole body (vector-extension code, auto-vectorised loops) is generated with
// that ISA's instructions.
template <class K>
using KernelFn = void (*)(const typename K::Args&);

#if EFFK_PW_X86
template <class K>
EFFK_PW_AVX512 void run_avx512(const typename K::Args& args) {
  K::template run<Isa::Avx512>(args);
}
template <class K>
EFFK_PW_AVX2 void run_avx2(const typename K::Args& args) {
  K::template run<Isa::Avx2>(args);
}
template <class K>
EFFK_BF16_TARGET __attribute__((flatten)) void run_avx512bf16(const typename K::Args& args) {
  K::template run<Isa::Avx512Bf16>(args);
}
template <class K>
EFFK_BF16_TARGET __attribute__((flatten)) void run_amx(const typename K::Args& args) {
  K::template run<Isa::Amx>(args);
}
#endif
template <class K>
__attribute__((flatten)) void run_base(const typename K::Args& args) {
  K::template run<Isa::Base>(args);
}

// The entry point of kernel K compiled for ISA I (only valid pairs are instantiated).
template <Isa I, class K>
KernelFn<K> isa_entry() {
#if EFFK_PW_X86
  if constexpr (I == Isa::Amx)
    return &run_amx<K>;
  else if constexpr (I == Isa::Avx512Bf16)
    return &run_avx512bf16<K>;
  else if constexpr (I == Isa::Avx512)
    return &run_avx512<K>;
  else if constexpr (I == Isa::Avx2)
    return &run_avx2<K>;
  else
#endif
    return &run_base<K>;
}

// Kernel K's entry for the CPU's ISA (its AVX-512 build on AVX-512 BF16 CPUs).
template <class K>
KernelFn<K> select_kernel(Isa isa) {
#if EFFK_PW_X86
  if (isa >= Isa::Avx512) return isa_entry<Isa::Avx512, K>();
  if (isa == Isa::Avx2) return isa_entry<Isa::Avx2, K>();
#endif
  return isa_entry<Isa::Base, K>();
}

// ---- small helpers ---------------------------------------------------------------------------

// A 64-byte aligned buffer owned by one call.
template <class A>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<A*>(c10::alloc_cpu(static_cast<size_t>(std::max<int64_t>(n, 1)) *
                                          sizeof(A)))) {}
  Scratch(Scratch&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  ~Scratch() { c10::free_cpu(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  A* get() const { return p_; }

 private:
  A* p_;
};

// Per-thread scratch memory, grown on demand and kept across calls: a fresh large buffer per
// call is a fresh mmap, whose page faults cost as much as a small layer's GEMM. kScratchSlots
// slots, one per concurrent use inside a parallel region (pwconv uses 0-2, the fused
// inverted-residual block 3-11, the GEMM kernels 12).
constexpr int kScratchSlots = 13;
constexpr int kGemmKernelSlot = 12;  // a GEMM kernel's own copies (it calls nothing that uses one)

template <class A>
A* thread_scratch(int slot, int64_t n) {
  struct Buffers {
    std::array<void*, kScratchSlots> ptr{};
    std::array<size_t, kScratchSlots> bytes{};
    ~Buffers() {
      for (void* q : ptr) c10::free_cpu(q);
    }
  };
  thread_local Buffers b;
  const size_t want = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(A);
  if (b.bytes[slot] < want) {
    c10::free_cpu(std::exchange(b.ptr[slot], nullptr));
    b.bytes[slot] = 0;
    b.ptr[slot] = c10::alloc_cpu(want);  // may throw: the slot is empty, not dangling
    b.bytes[slot] = want;
  }
  return static_cast<A*>(b.ptr[slot]);
}

// ---- the micro-kernel ------------------------------------------------------------------------

template <class A, int Bytes>
struct Vec {
  typedef A type __attribute__((vector_size(Bytes)));
};

// Accumulator rows of a block for a panel of NV vectors: what the register file holds next to
// the NV loaded W vectors and one broadcast, and no more than 12 so that the 12 row offsets of
// the in-place x rows stay in general registers (no spills in the k loop).
constexpr int micro_rows(int regs, int nv) {
  return nv == 1   ? 12
         : nv == 2 ? (regs == 32 ? 12 : 6)
         : nv == 3 ? (regs == 32 ? 8 : 4)
                   : (regs == 32 ? 6 : 3);
}
// Tile heights are multiples of 12: whole blocks for MR 12, 6 and 4 (MR 8 ends a tile with a
// tail block), and finer than 24 so that the tiles of small problems stay even.
constexpr int64_t kRowQuantum = 12;

// The register block of the FMA micro-kernels (the GEMM's below, the dense convolution's in
// conv_bn_act_inference.cpp): MR rows x NV vectors of VW accumulators.
template <int MR, int NV, class V>
EFFK_INLINE void acc_zero(V (&acc)[MR][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = V{};
}

// One k: acc[r][:] += a[r * lda] * b[0, NV * VW) (NV vector loads, MR broadcasts, MR*NV FMAs).
template <int VW, int MR, int NV, class V, class A>
EFFK_INLINE void acc_step(V (&acc)[MR][NV], const A* __restrict a, int64_t lda,
                          const A* __restrict b) {
  V w[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) std::memcpy(&w[j], b + j * VW, sizeof(V));
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const A s = a[r * lda];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] += s * w[j];  // contracted to FMA
  }
}

template <int VW, int MR, int NV, class V, class A>
EFFK_INLINE void acc_store(const V (&acc)[MR][NV], A* __restrict c, int64_t ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(c + r * ldc + j * VW, &acc[r][j], sizeof(V));
}

// c[MR][NR] (row stride ldc) = a[MR][K] (row stride lda) @ b[K][NR] (a packed W panel).
// x rows are read in place and broadcast; each k costs NV vector loads and MR*NV FMAs.
// Once per cache line of k it also prefetches that line of the next block's rows (`next`,
// same stride, reusing the row offsets of the broadcasts): the hardware prefetcher does not
// follow MR short strided streams, and x streamed from L3 or memory otherwise halves the FMA
// rate.
// PanelNV: the vectors of the panel's rows (its packed width); the kernel computes the first NV.
template <class A, int Bytes, int MR, int NV, int PanelNV = NV>
inline void micro_kernel(int64_t K, const A* __restrict a, int64_t lda, const A* __restrict b,
                         A* __restrict c, int64_t ldc, const A* next) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(A));
  using V = typename Vec<A, Bytes>::type;
  constexpr int VW = Bytes / static_cast<int>(sizeof(A));
  constexpr int NR = PanelNV * VW;
  V acc[MR][NV];
  acc_zero(acc);
  for (int64_t k = 0; k < K; ++k, b += NR) {
    if (k % kLine == 0) {
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) __builtin_prefetch(next + r * lda + k, 0, 3);
    }
    acc_step<VW>(acc, a + k, lda, b);
  }
  acc_store<VW>(acc, c, ldc);
}

// The operands of a GEMM micro-kernel: A, the accumulation type (fp32/fp64); In, the type of x
// rows and packed weights: A itself, or bf16 for the pair kernel below.
template <class A, class In = A>
struct GemmArgs {
  int64_t K;      // reduction length
  const In* a;    // rows x K, row stride lda; readable up to round_up(rows, MR) rows
  int64_t lda, rows;
  const In* b;    // one packed panel: [K][NR] (A), [ceil(K/2)][NR][2] (bf16 pairs)
  A* c;           // round_up(rows, MR) x NR results, row stride ldc
  int64_t ldc;
  // Pair kernel: NR per-column factors of the results (the BN scale), or null. The FMA kernels
  // take the scale folded into their panels (WeightPanels) and require null.
  const A* col_scale = nullptr;
};

// k per packed panel row: 1 for the FMA kernels, 2 for the pair kernel (panels [ceil(K/2)][NR]
// [2]; a range of k handed to it starts at an even k).
template <class A, class In>
constexpr int64_t kPackedStep = std::is_same_v<In, A> ? 1 : 2;

// The rows of a block of 1, 1/2 or 1/4 of MR that cover `rem` (< MR) remaining rows, so that a
// 49-row tile computes 51 rows rather than 60.
template <int MR, class Block>
EFFK_INLINE void row_blocks(int64_t rows, const Block& block) {
  constexpr int MR2 = (MR + 1) / 2, MR4 = (MR + 3) / 4;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) block(r, std::integral_constant<int, MR>{});
  const int64_t rem = rows - r;
  if (rem > MR2)
    block(r, std::integral_constant<int, MR>{});
  else if (rem > MR4)
    block(r, std::integral_constant<int, MR2>{});
  else if (rem > 0)
    block(r, std::integral_constant<int, MR4>{});
}

// All rows of a tile against one panel: full MR blocks, then one block for the remainder.
// `next` (the following block's rows) may point past the tile or the tensor: prefetches never
// fault. NV < PanelNV: the first NV vectors of a panel of PanelNV (a last panel with fewer
// columns), in the full kernel's row blocks (the same rows read), each output the same FMA
// chain, so the same bits.
template <class A, int Bytes, int NV, int PanelNV = NV>
struct GemmKernel {
  using Args = GemmArgs<A>;
  template <Isa I>
  static void run(const Args& g) {
    TORCH_INTERNAL_ASSERT(g.col_scale == nullptr, "the FMA GEMM takes its scale in the panels");
    row_blocks<micro_rows(isa_regs(I), PanelNV)>(g.rows, [&](int64_t r, auto rows) {
      constexpr int R = decltype(rows)::value;
      const A* a = g.a + r * g.lda;
      micro_kernel<A, Bytes, R, NV, PanelNV>(g.K, a, g.lda, g.b, g.c + r * g.ldc, g.ldc,
                                             a + R * g.lda);
    });
  }
};

#if EFFK_PW_X86
// acc[r][n] += x[r][0] w[n][0] + x[r][1] w[n][1] (x[r][1] = 0 for the odd last k: kLast).
// (A function rather than a lambda: a lambda would not carry the target attribute.)
template <int MR, int NV, bool kLast>
EFFK_BF16_TARGET EFFK_INLINE void bf16_pair_step(__m512 (&acc)[MR][NV], const uint16_t* a,
                                                 int64_t lda, const uint16_t* b) {
  __m512bh w[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) w[j] = (__m512bh)_mm512_loadu_si512(b + j * 32);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    uint32_t pair = a[r * lda];
    if constexpr (!kLast) std::memcpy(&pair, a + r * lda, sizeof(pair));
    const __m512bh s = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], s, w[j]);
  }
}

// The bf16 micro-kernel (AVX-512 BF16): c[MR][16 NV] = (a[MR][K] @ b) * scale, with x rows of
// bf16 read in place two k at a time (one 32-bit broadcast) and a panel packed as k pairs,
// b[k / 2][n][k % 2], so that one vdpbf16ps adds x[k] w[n][k] + x[k+1] w[n][k+1] to 16 fp32
// accumulators: twice the multiply-adds of an fp32 FMA per instruction, half the bytes. An odd
// last k broadcasts (x[k], 0) and reads nothing past the row. vdpbf16ps treats bf16 subnormals
// as zero and rounds each of its two additions in fp32: one fixed order per output, so the bits
// still depend only on the data.
template <int MR, int NV>
EFFK_BF16_TARGET inline void bf16_micro_kernel(int64_t K, const uint16_t* __restrict a,
                                               int64_t lda, const uint16_t* __restrict b,
                                               const float* __restrict scale,
                                               float* __restrict c, int64_t ldc,
                                               const uint16_t* next) {
  constexpr int NR = 16 * NV;
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= K; k += 2, b += 2 * NR) {
    if (k % 32 == 0) {  // one 64-byte line of each next row
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) __builtin_prefetch(next + r * lda + k, 0, 3);
    }
    bf16_pair_step<MR, NV, false>(acc, a + k, lda, b);
  }
  if (k < K) bf16_pair_step<MR, NV, true>(acc, a + k, lda, b);
  __m512 sv[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) sv[j] = scale ? _mm512_loadu_ps(scale + 16 * j) : _mm512_set1_ps(1);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j] * sv[j]);
}
#endif

template <int NV>
struct Bf16GemmKernel {
  using Args = GemmArgs<float, c10::BFloat16>;
  template <Isa I>
  static void run(const Args& g) {
#if EFFK_PW_X86
    if constexpr (I == Isa::Avx512Bf16) {
      const auto* a0 = reinterpret_cast<const uint16_t*>(g.a);
      const auto* b = reinterpret_cast<const uint16_t*>(g.b);
      row_blocks<micro_rows(32, NV)>(g.rows, [&](int64_t r, auto rows) {
        constexpr int R = decltype(rows)::value;
        const uint16_t* a = a0 + r * g.lda;
        bf16_micro_kernel<R, NV>(g.K, a, g.lda, b, g.col_scale, g.c + r * g.ldc, g.ldc,
                                 a + R * g.lda);
      });
      return;
    }
#endif
    TORCH_INTERNAL_ASSERT(false, "the bf16 GEMM kernel needs AVX-512 BF16");
  }
};

#if EFFK_PW_X86
// ---- the AMX tile kernel ---------------------------------------------------------------------
// The same product as the pair kernel, c[rows][16 NV] = (a[rows][K] @ b) * scale on the same
// panels b[k / 2][n][k % 2], in AMX tiles: every tile is 16 rows of 64 bytes, so an A tile is
// 16 x rows by 32 k (bf16), a B tile 16 k pairs by 16 columns (rows NR * 4 bytes apart in the
// panel: loaded in place), a C tile 16 x 16 fp32 accumulators; one TDPBF16PS does 8192
// multiply-adds. A block of MT row tiles x NV column tiles keeps MT * NV C tiles, MT A and NV B
// tiles in the 8 tile registers. x rows are loaded in place, 32 k at a time; the last K % 32 k
// (A and B) and the last rows % 16 rows (A and C) go through small zero-padded copies, so the
// kernel reads and writes exactly rows x K of a and rows x NR of c and needs no padding from
// its callers (MR 1). Each output is one chain over k in the same order wherever its row lies
// (tiles of 32 k, then the tail): the bits depend on the data only. Like vdpbf16ps, TDPBF16PS
// treats bf16 subnormal inputs as zero.
// The tile instructions are written as inline assembly (GCC's intrinsics stringify the tile
// number, which a template parameter cannot be), so no AMX target attribute is needed.
namespace amx {

constexpr int kTileRows = 16;
constexpr int kTileK = 32;  // bf16 k per A tile row (64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline const TileConfig& all_tiles_16x64() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = kTileRows;
    }
    return c;
  }();
  return cfg;
}

EFFK_INLINE void configure(const TileConfig& cfg) {
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}
EFFK_INLINE void release() { __asm__ volatile("tilerelease" ::); }
template <int T>
EFFK_INLINE void zero() {
  __asm__ volatile("tilezero %%tmm%c0" ::"n"(T));
}
template <int T>
EFFK_INLINE void load(const void* p, int64_t stride_bytes) {
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride_bytes), "n"(T)
                   : "memory");
}
template <int T>
EFFK_INLINE void store(void* p, int64_t stride_bytes) {
  __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride_bytes), "n"(T)
                   : "memory");
}
template <int C, int A, int B>  // tmm C += tmm A (rows x k) @ tmm B (k pairs x columns)
EFFK_INLINE void dot() {
  __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
}

// Calls f(integral_constant<i>) for i in [0, N).
template <int N, class F, int... I>
EFFK_INLINE void unrolled(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
EFFK_INLINE void unrolled(const F& f) {
  unrolled<N>(f, std::make_integer_sequence<int, N>{});
}

// One block of MT row tiles x NV column tiles: tiles [0, MT NV) hold C (row tile i, column tile
// j at i NV + j), then MT A tiles, then NV B tiles. a: the rows' first K32 * 32 k (row stride
// lda); tail: their last k, zero-padded to 32 (row stride ldt; null when K % 32 == 0); b: the
// panel (NR columns), btail: its last k pairs per column tile, zero-padded ([NV][16][32]).
template <int MT, int NV>
EFFK_INLINE void block(int64_t K32, const uint16_t* a, int64_t lda, const uint16_t* tail,
                       int64_t ldt, const uint16_t* b, const uint16_t* btail, float* c,
                       int64_t ldc) {
  constexpr int kA = MT * NV, kB = kA + MT;
  constexpr int64_t NR = 16 * NV;
  static_assert(kB + NV <= 8, "8 tile registers");
  unrolled<MT * NV>([&](auto t) { zero<t>(); });
  auto step = [&](const uint16_t* ak, int64_t lda_k, const uint16_t* bk, int64_t ldb_bytes,
                  int64_t b_tile_step) {
    unrolled<MT>([&](auto i) { load<kA + i>(ak + i * kTileRows * lda_k, lda_k * 2); });
    unrolled<NV>([&](auto j) { load<kB + j>(bk + j * b_tile_step, ldb_bytes); });
    unrolled<MT>([&](auto i) {
      unrolled<NV>([&](auto j) { dot<i * NV + j, kA + i, kB + j>(); });
    });
  };
  for (int64_t kc = 0; kc < K32; ++kc)
    step(a + kc * kTileK, lda, b + kc * kTileRows * NR * 2, NR * 4, 32);
  if (tail) step(tail, ldt, btail, 64, kTileRows * kTileK);
  const int64_t ldc_bytes = ldc * static_cast<int64_t>(sizeof(float));
  unrolled<MT>([&](auto i) {
    unrolled<NV>([&](auto j) { store<i * NV + j>(c + i * kTileRows * ldc + j * 16, ldc_bytes); });
  });
}

// Copies rows [0, rows) of k [k0, k0 + n) (n <= 32) of a (row stride lda) to dst[r][32], zero
// past n and for rows [rows, rows_pad): one masked 64-byte load and one store per row.
EFFK_BF16_TARGET inline void copy_k32(const uint16_t* a, int64_t lda, int64_t rows,
                                      int64_t rows_pad, int64_t k0, int64_t n, uint16_t* dst,
                                      int64_t ldd) {
  const __mmask32 mask = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
  for (int64_t r = 0; r < rows_pad; ++r)
    _mm512_store_si512(dst + r * ldd, r < rows ? _mm512_maskz_loadu_epi16(mask, a + r * lda + k0)
                                               : _mm512_setzero_si512());
}

}  // namespace amx

template <int NV>
struct AmxGemmKernel {
  using Args = GemmArgs<float, c10::BFloat16>;
  // Row tiles per block: MT NV C tiles, MT A and NV B tiles fit the 8 tile registers.
  static constexpr int MT = NV == 1 ? 3 : NV == 2 ? 2 : 1;
  static constexpr int64_t NR = 16 * NV;

  template <Isa I>
  static void run(const Args& g) {
    if constexpr (I == Isa::Amx) {
      using namespace amx;
      const auto* a = reinterpret_cast<const uint16_t*>(g.a);
      const auto* b = reinterpret_cast<const uint16_t*>(g.b);
      const int64_t K32 = g.K / kTileK, kt = g.K % kTileK, k_main = K32 * kTileK;
      const int64_t full = g.rows / kTileRows * kTileRows, m = g.rows - full;
      // The copies are made before the first tile load, so that no tile load waits for the
      // stores that made its data (AMX loads do not take data forwarded from pending stores).
      // B's last kt k (ceil(kt / 2) pairs, the packing's zero after an odd K), zero-padded.
      alignas(64) uint16_t btail[NV][kTileRows * kTileK];
      if (kt) {
        const int64_t pairs = ceil_div(kt, 2);
        for (int j = 0; j < NV; ++j)
          copy_k32(b + (K32 * kTileRows * NR + j * 16) * 2, NR * 2, pairs, kTileRows, 0, 32,
                   btail[j], kTileK);
      }
      // x's last kt k of every row ([rows up to a whole tile][32]), and the first k_main k of
      // the last m rows ([16][k_main]), zero-padded.
      const int64_t rows_pad = full + (m ? kTileRows : 0);
      const int64_t tail_elems = kt ? rows_pad * kTileK : 0;
      uint16_t* buf = thread_scratch<uint16_t>(
          kGemmKernelSlot, tail_elems + (m && K32 ? kTileRows * k_main : 0));
      uint16_t* tail = kt ? buf : nullptr;
      uint16_t* last_rows = buf + tail_elems;
      if (kt) copy_k32(a, g.lda, g.rows, rows_pad, k_main, kt, tail, kTileK);
      if (m)
        for (int64_t kc = 0; kc < K32; ++kc)
          copy_k32(a + full * g.lda, g.lda, m, kTileRows, kc * kTileK, kTileK,
                   last_rows + kc * kTileK, k_main);
      alignas(64) float out[kTileRows * NR];  // the last m rows' results
      auto tail_at = [&](int64_t r) { return kt ? tail + r * kTileK : nullptr; };
      configure(all_tiles_16x64());
      int64_t r = 0;
      for (; r + MT * kTileRows <= full; r += MT * kTileRows)
        block<MT, NV>(K32, a + r * g.lda, g.lda, tail_at(r), kTileK, b, btail[0],
                      g.c + r * g.ldc, g.ldc);
      for (; r < full; r += kTileRows)
        block<1, NV>(K32, a + r * g.lda, g.lda, tail_at(r), kTileK, b, btail[0], g.c + r * g.ldc,
                     g.ldc);
      if (m) block<1, NV>(K32, last_rows, k_main, tail_at(full), kTileK, b, btail[0], out, NR);
      release();
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(g.c + (full + i) * g.ldc, out + i * NR, NR * sizeof(float));
      if (g.col_scale) {
        for (int64_t i = 0; i < g.rows; ++i) {
          float* __restrict ci = g.c + i * g.ldc;
          for (int64_t n = 0; n < NR; ++n) ci[n] *= g.col_scale[n];
        }
      }
      return;
    }
    TORCH_INTERNAL_ASSERT(false, "the AMX GEMM kernel needs AMX-BF16");
  }
};
#endif

template <class A, class In = A>
struct GemmPlan {
  using Fn = void (*)(const GemmArgs<A, In>&);
  Fn fn;
  int MR, NR;
  double cost;  // relative time per output column (planning only; shapes_for)
  // narrower[v]: fn computing only the first v of the panel's vectors of VW columns (null:
  // none); for a last panel with fewer columns (160 = 3 x 48 + 16: 32 of the 192 columns
  // computed were zero padding).
  std::array<Fn, 4> narrower{};
  int VW = 0;

  // The kernel for a panel of which the first `cols` columns are wanted.
  Fn fn_for(int64_t cols) const {
    const int64_t v = VW > 0 ? (cols + VW - 1) / VW : 0;
    return v > 0 && v < 4 && narrower[v] ? narrower[v] : fn;
  }
};

// Whether data of type T runs a bf16 GEMM kernel on this CPU (bf16 data; AVX-512 BF16's pair
// kernel, or AMX's tile kernel); otherwise its x tiles and packed weights are converted to the
// accumulation type.
template <class T>
bool bf16_gemm(Isa isa) {
  return std::is_same_v<T, c10::BFloat16> && isa >= Isa::Avx512Bf16;
}

// Runs f(In{}) with the operand type In of the GEMMs over data of type T on this CPU: bf16
// (the pair kernel) where bf16_gemm, else the accumulation type A.
template <class T, class A, class F>
void with_gemm_operand(Isa isa, const F& f) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_gemm<T>(isa)) return f(c10::BFloat16{});
  }
  f(A{});
}

template <class A, Isa I, int Bytes, int NV>
GemmPlan<A> make_plan(double cost) {
  constexpr int VW = Bytes / static_cast<int>(sizeof(A));
  GemmPlan<A> plan{isa_entry<I, GemmKernel<A, Bytes, NV>>(), micro_rows(isa_regs(I), NV),
                   NV * VW, cost};
  plan.VW = VW;
  if constexpr (NV > 1) plan.narrower[1] = isa_entry<I, GemmKernel<A, Bytes, 1, NV>>();
  if constexpr (NV > 2) plan.narrower[2] = isa_entry<I, GemmKernel<A, Bytes, 2, NV>>();
  if constexpr (NV > 3) plan.narrower[3] = isa_entry<I, GemmKernel<A, Bytes, 3, NV>>();
  return plan;
}
template <int NV>
GemmPlan<float, c10::BFloat16> make_bf16_plan(double cost) {
  return {isa_entry<Isa::Avx512Bf16, Bf16GemmKernel<NV>>(), micro_rows(32, NV), 16 * NV, cost};
}
#if EFFK_PW_X86
template <int NV>
GemmPlan<float, c10::BFloat16> make_amx_plan(double cost) {
  return {isa_entry<Isa::Amx, AmxGemmKernel<NV>>(), 1, 16 * NV, cost};
}
#endif

// Candidate panel shapes, used where they pad less than they cost. Every shape gives the same
// bits: each output is one FMA chain over k. Equal costs go to the earlier shape. On AVX-512:
// 3 vectors x 8 rows (8 broadcasts and 3 loads per 24 FMAs), 4 x 6 (64 columns), 2 x 12, one
// vector x 12 (half the FMAs per broadcast) and 3 x 256-bit (24 columns for fp32).
// Costs per column (bench/NOTES.md, 2026-11-29 and 2026-11-30): on AMD Zen 4, whose 512-bit
// FMAs are two 256-bit halves, 2 x 12 as 3 x 8, one vector 1.3, 256-bit 1.12. On an Ice Lake
// Xeon (two 512-bit FMA ports) the whole pointwise op ran 1.3-1.5x longer per column with
// 2 x 12 than with 3 x 8 (pixels x 32/160 columns at K = 192/576/960) and 1.6-1.8x with
// 256-bit vectors: there a 960->160 projection takes 4 panels of 48 (0.8x the time of 5 of
// 32) and 24->72 takes 2 of 48 (the micro-kernel alone: 53 against 95 GMAC/s at K = 64).
constexpr size_t kPanelShapes = 5;

// Whether 512-bit FMAs cost two 256-bit ones (AMD Zen 4): the costs measured there.
inline bool zmm_split_fma() {
#if EFFK_PW_X86
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

template <class A, Isa I>
std::array<GemmPlan<A>, kPanelShapes> shapes_for() {
  constexpr int B = isa_bytes(I);
  if constexpr (I == Isa::Avx512) {
    const bool split = zmm_split_fma();
    return {make_plan<A, I, B, 3>(1.0), make_plan<A, I, B, 4>(1.0),
            make_plan<A, I, B, 2>(split ? 1.0 : 1.35), make_plan<A, I, B, 1>(split ? 1.3 : 2.0),
            make_plan<A, I, 32, 3>(split ? 1.12 : 1.7)};
  } else {  // (the last entry repeats the first: the arrays have one length)
    return {make_plan<A, I, B, 2>(1.0), make_plan<A, I, B, 3>(1.0), make_plan<A, I, B, 1>(1.3),
            make_plan<A, I, B, 2>(1.0), make_plan<A, I, B, 2>(1.0)};
  }
}

// In == A: the FMA kernels of the CPU's ISA; In == bf16 (only where bf16_gemm): the AMX tile
// kernel or the pair kernel at 16, 32 and 48 columns (the last entry repeated).
template <class A, class In = A>
std::array<GemmPlan<A, In>, kPanelShapes> panel_shapes(Isa isa) {
  if constexpr (!std::is_same_v<A, In>) {
    TORCH_INTERNAL_ASSERT(isa >= Isa::Avx512Bf16);
#if EFFK_PW_X86
    if (isa == Isa::Amx)
      return {make_amx_plan<2>(1.0), make_amx_plan<3>(1.1), make_amx_plan<1>(1.2),
              make_amx_plan<2>(1.0), make_amx_plan<2>(1.0)};
#endif
    return {make_bf16_plan<2>(1.0), make_bf16_plan<3>(1.0), make_bf16_plan<1>(1.3),
            make_bf16_plan<2>(1.0), make_bf16_plan<2>(1.0)};
  } else {
#if EFFK_PW_X86
    if (isa >= Isa::Avx512) return shapes_for<A, Isa::Avx512>();
    if (isa == Isa::Avx2) return shapes_for<A, Isa::Avx2>();
#endif
    return shapes_for<A, Isa::Base>();
  }
}

// The fastest shape for `ncols` columns, ignoring thread balance.
template <class A, class In = A>
GemmPlan<A, In> plan_gemm(Isa isa, int64_t ncols) {
  const std::array<GemmPlan<A, In>, kPanelShapes> opts = panel_shapes<A, In>(isa);
  auto cost = [&](const GemmPlan<A, In>& o) {
    return static_cast<double>(round_up(ncols, o.NR)) * o.cost;
  };
  GemmPlan<A, In> best = opts[0];
  for (const GemmPlan<A, In>& o : opts)
    if (cost(o) < cost(best)) best = o;
  return best;
}

// ---- packing ---------------------------------------------------------------------------------

// In-register transpose of VW vectors of VW lanes: log2(VW) rounds of two-source shuffles that
// swap the off-diagonal HxH blocks of each pair of rows i, i+H.
// (Results through references: a function returning a 64-byte vector by value draws a
// -Wpsabi note where it is also instantiated outside the AVX-512 code.)
template <int VW, int H, class V, size_t... L>
EFFK_INLINE void shuffle_pair(const V& a, const V& b, V& lo, V& hi, std::index_sequence<L...>) {
  lo = __builtin_shufflevector(a, b, ((L & H) ? VW + L - H : L)...);
  hi = __builtin_shufflevector(a, b, ((L & H) ? VW + L : L + H)...);
}
template <int VW, int H, class V>
EFFK_INLINE void transpose_rounds(V* v) {
  if constexpr (H >= 1) {
#pragma GCC unroll 16
    for (int i = 0; i < VW; ++i) {
      if (i & H) continue;
      const V a = v[i], b = v[i + H];
      shuffle_pair<VW, H>(a, b, v[i], v[i + H], std::make_index_sequence<VW>{});
    }
    transpose_rounds<VW, H / 2>(v);
  }
}

// dst[c][r] = scale[r] * src[r][c] for r < R, c < C (src row stride lds, unit column stride),
// zero elsewhere in dst's Cp x Rp (row stride ldd). Packs W into panels (r = output channel,
// c = k) and dy^T for grad_weight. VW x VW register blocks; scalar code on the edges.
template <class S, class A>
struct TransposeArgs {
  const S* src;
  int64_t lds, R, C;
  const A* scale;  // may be null
  A* dst;
  int64_t ldd, Rp, Cp;
};

template <class S, class A>
struct TransposeKernel {
  using Args = TransposeArgs<S, A>;
  template <Isa I>
  static void run(const Args& t) {
    constexpr int VW = isa_bytes(I) / static_cast<int>(sizeof(A));
    using V = typename Vec<A, isa_bytes(I)>::type;
    for (int64_t r0 = 0; r0 < t.Rp; r0 += VW) {
      for (int64_t c0 = 0; c0 < t.Cp; c0 += VW) {
        if (r0 + VW <= t.R && c0 + VW <= t.C && r0 + VW <= t.Rp && c0 + VW <= t.Cp) {
          V v[VW];
          const S* s = t.src + r0 * t.lds + c0;  // running pointers: no per-row addresses
#pragma GCC unroll 16
          for (int i = 0; i < VW; ++i, s += t.lds) {
            if constexpr (std::is_same_v<S, A>) {
              std::memcpy(&v[i], s, sizeof(V));
            } else {
              A lanes[VW];
              for (int l = 0; l < VW; ++l) lanes[l] = static_cast<A>(s[l]);
              std::memcpy(&v[i], lanes, sizeof(V));
            }
          }
          if (t.scale) {
#pragma GCC unroll 16
            for (int i = 0; i < VW; ++i) v[i] *= t.scale[r0 + i];
          }
          transpose_rounds<VW, VW / 2>(v);
          A* d = t.dst + c0 * t.ldd + r0;
#pragma GCC unroll 16
          for (int i = 0; i < VW; ++i, d += t.ldd) std::memcpy(d, &v[i], sizeof(V));
        } else {
          for (int64_t c = c0; c < std::min<int64_t>(c0 + VW, t.Cp); ++c)
            for (int64_t r = r0; r < std::min<int64_t>(r0 + VW, t.Rp); ++r) {
              A v = A(0);
              if (r < t.R && c < t.C) {
                v = static_cast<A>(t.src[r * t.lds + c]);
                if (t.scale) v *= t.scale[r];
              }
              t.dst[c * t.ldd + r] = v;
            }
        }
      }
    }
  }
};

// A 1x1 conv weight (Cout, Cin, 1, 1), whole or as its parts: the diagonal blocks
// (Cout_i, Cin_i, 1, 1) of a block-diagonal weight that is zero elsewhere (MixNet's split 1x1
// convolutions, packed without a dense copy). Blocks with unit stride over Cin.
struct BlockDiagonal {
  struct Block {
    at::Tensor w;
    int64_t row0, col0;
  };
  std::vector<Block> blocks;
  int64_t rows = 0, cols = 0;

  explicit BlockDiagonal(at::TensorList parts) {
    for (const at::Tensor& p : parts) {
      blocks.push_back({p.stride(1) == 1 ? p : p.contiguous(), rows, cols});
      rows += p.size(0);
      cols += p.size(1);
    }
  }
  // The dense weight, for the packers that take one tensor.
  at::Tensor dense() const {
    if (blocks.size() == 1) return blocks[0].w;
    at::Tensor d = at::zeros({rows, cols, 1, 1}, blocks[0].w.options());
    for (const Block& b : blocks)
      d.narrow(0, b.row0, b.w.size(0)).narrow(1, b.col0, b.w.size(1)).copy_(b.w);
    return d;
  }
};

// Packs panels of the conv weight (Cout, Cin, 1, 1) on demand: panel j = B[k = ci][NR output
// channels] (a transpose of W's rows), each output channel multiplied by scale[co] when given
// (the folded BatchNorm). A weight in parts packs the same bytes as its dense weight would.
template <class T, class A>
struct WeightPanels {
  BlockDiagonal w;
  const A* scale;
  void (*transpose)(const TransposeArgs<T, A>&);
  int NR;

  WeightPanels(at::TensorList weight, Isa isa, int nr, const A* scale_)
      : w(weight),
        scale(scale_),
        transpose(select_kernel<TransposeKernel<T, A>>(isa)),
        NR(nr) {}
  const A* col_scale() const { return nullptr; }  // folded into the panels

  // Panels [j0, j1) -> dst[j - j0][Cin][NR].
  void operator()(int64_t j0, int64_t j1, A* dst) const {
    const int64_t Cout = w.rows, Cin = w.cols;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c0 = j * NR, n = std::min<int64_t>(NR, Cout - c0);
      A* d = dst + (j - j0) * Cin * NR;
      if (w.blocks.size() == 1) {
        const at::Tensor& b = w.blocks[0].w;
        transpose({b.const_data_ptr<T>() + c0 * b.stride(0), b.stride(0), n, Cin,
                   scale ? scale + c0 : nullptr, d, NR, NR, Cin});
        continue;
      }
      // The zeros as the dense weight's are packed (0 * scale, sign included; none past
      // Cout), then each block's rows in this panel.
      for (int64_t l = 0; l < NR; ++l) d[l] = l < n && scale ? A(0) * scale[c0 + l] : A(0);
      for (int64_t k = 1; k < Cin; ++k) std::memcpy(d + k * NR, d, NR * sizeof(A));
      for (const BlockDiagonal::Block& b : w.blocks) {
        const int64_t r0 = std::max(c0, b.row0), r1 = std::min(c0 + n, b.row0 + b.w.size(0));
        if (r0 >= r1) continue;
        const int64_t cols = b.w.size(1), s0 = b.w.stride(0);
        transpose({b.w.const_data_ptr<T>() + (r0 - b.row0) * s0, s0, r1 - r0, cols,
                   scale ? scale + r0 : nullptr, d + b.col0 * NR + (r0 - c0), NR, r1 - r0,
                   cols});
      }
    }
  }
};

inline at::Tensor unit_stride_cin(const at::Tensor& w) {
  return w.stride(1) == 1 ? w : w.contiguous();
}

// Packs panels of a bf16 conv weight (Cout, Cin, 1, 1) for the pair kernel: panel j =
// B[k / 2][NR output channels][k % 2], zero past Cout and past an odd Cin. A k pair is one
// 32-bit word of a weight row, so with an even Cin this is WeightPanels' transpose, of words.
// The BN scale stays out of the bf16 weights (folding it in would round them once more): the
// kernel multiplies the fp32 results by it (col_scale(), padded to whole panels).
struct Bf16PairPanels {
  at::Tensor w;  // unit stride over Cin
  std::vector<float> scale;  // empty: none
  void (*transpose)(const TransposeArgs<uint32_t, uint32_t>&);
  int NR;

  // (A weight in parts is packed from its dense weight.)
  Bf16PairPanels(at::TensorList weight, Isa isa, int nr, const float* scale_)
      : w(unit_stride_cin(BlockDiagonal(weight).dense())),
        transpose(select_kernel<TransposeKernel<uint32_t, uint32_t>>(isa)),
        NR(nr) {
    if (scale_) {
      scale.assign(static_cast<size_t>(round_up(w.size(0), NR)), 0.0f);
      std::copy_n(scale_, w.size(0), scale.begin());
    }
  }
  const float* col_scale() const { return scale.empty() ? nullptr : scale.data(); }

  // Panels [j0, j1) -> dst[j - j0][ceil(Cin / 2)][NR][2].
  void operator()(int64_t j0, int64_t j1, c10::BFloat16* dst) const {
    const int64_t Cout = w.size(0), Cin = w.size(1), s0 = w.stride(0), K2 = ceil_div(Cin, 2);
    const auto* src = reinterpret_cast<const uint16_t*>(w.const_data_ptr<c10::BFloat16>());
    auto* out = reinterpret_cast<uint16_t*>(dst);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c0 = j * NR, n = std::min<int64_t>(NR, Cout - c0);
      uint16_t* d = out + (j - j0) * K2 * 2 * NR;
      if (Cin % 2 == 0 && s0 % 2 == 0) {
        transpose({reinterpret_cast<const uint32_t*>(src + c0 * s0), s0 / 2, n, K2, nullptr,
                   reinterpret_cast<uint32_t*>(d), NR, NR, K2});
        continue;
      }
      for (int64_t k = 0; k < 2 * K2; ++k)
        for (int64_t l = 0; l < NR; ++l)
          d[((k / 2) * NR + l) * 2 + k % 2] = l < n && k < Cin ? src[(c0 + l) * s0 + k] : 0;
    }
  }
};

// The k range [k0, k1) a panel's GEMM reads: its nonzero range [lo, hi) (k0 a multiple of
// kStep, the pair kernel's) when `skip`, else all of [0, K).
inline std::pair<int64_t, int64_t> k_span(int64_t lo, int64_t hi, bool skip, int64_t K,
                                          int64_t kStep) {
  if (!skip) return {0, K};
  return {lo / kStep * kStep, std::min(K, round_up(hi, kStep))};
}

// Grouped (block-diagonal) weights: the input channels [lo, hi) outside of which a panel's
// weights are all exactly zero (MixNet's split pointwise convs, effkernels.nn's block-diagonal
// weight: half of such a GEMM's FMAs are with zeros). Per panel; empty when no panel has any.
struct PanelK {
  std::vector<int64_t> lo, hi;
  bool empty() const { return lo.empty(); }
  std::pair<int64_t, int64_t> span(int64_t j, bool skip, int64_t K, int64_t kStep) const {
    return empty() ? std::pair<int64_t, int64_t>{0, K} : k_span(lo[j], hi[j], skip, K, kStep);
  }
};

template <class T>
PanelK panel_k_ranges(at::TensorList weight, int64_t NR) {  // (Cout, Cin, 1, 1) of T, or parts
  int64_t Cout = 0, Cin = 0;
  for (const at::Tensor& part : weight) {
    Cout += part.size(0);
    Cin += part.size(1);
  }
  const int64_t npanels = ceil_div(Cout, NR);
  PanelK r{std::vector<int64_t>(npanels, Cin), std::vector<int64_t>(npanels, 0)};
  int64_t row0 = 0, col0 = 0;  // the part's block in the block-diagonal weight
  for (const at::Tensor& part : weight) {
    const auto w = part.accessor<T, 4>();
    const int64_t rows = part.size(0), cols = part.size(1);
    for (int64_t c = 0; c < rows; ++c) {
      int64_t lo = 0, hi = cols;  // stops at the first nonzero (NaN included) from either end
      while (lo < cols && static_cast<float>(w[c][lo][0][0]) == 0.0f) ++lo;
      while (hi > lo && static_cast<float>(w[c][hi - 1][0][0]) == 0.0f) --hi;
      if (lo < hi) {
        const int64_t j = (row0 + c) / NR;
        r.lo[j] = std::min(r.lo[j], col0 + lo);
        r.hi[j] = std::max(r.hi[j], col0 + hi);
      }
    }
    row0 += rows;
    col0 += cols;
  }
  bool narrower = false;
  for (int64_t j = 0; j < npanels; ++j) {
    if (r.lo[j] >= r.hi[j]) r.lo[j] = r.hi[j] = 0;
    narrower = narrower || r.hi[j] - r.lo[j] < Cin;
  }
  return narrower ? r : PanelK{};
}

// Whether `rows` rows of K values (row stride lda) are all finite: skipping a zero weight is
// exact only for a finite x (NaN * 0 = NaN), so a tile holding a NaN/Inf takes the full K.
template <class A, class In>
bool all_finite(const In* a, int64_t lda, int64_t rows, int64_t K) {
  A acc = A(0);
  for (int64_t r = 0; r < rows; ++r) {
    const In* row = a + r * lda;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) {
      const A v = static_cast<A>(row[k]);
      acc += v - v;  // NaN for an Inf or a NaN
    }
  }
  return acc == A(0);
}

// The packed panels of a conv weight for a GEMM with operands In: WeightPanels (scale folded
// into the weights) or Bf16PairPanels (scale applied to the results).
template <class T, class A, class In>
using ConvPanels = std::conditional_t<std::is_same_v<In, A>, WeightPanels<T, A>, Bf16PairPanels>;

}  // namespace effkernels::cpu
