// Helpers shared by the CPU kernels: layouts, accumulation types, BatchNorm parameters in the
// accumulation type, and deterministic per-channel batch statistics.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include "effkernels/checks.h"
#include "effkernels/conv_geometry.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <unistd.h>
#include <xmmintrin.h>
#define EFFK_CPU_STREAM_STORES 1
#else
#define EFFK_CPU_STREAM_STORES 0
#endif

namespace effkernels::cpu {

// ---- packed weights buffers ------------------------------------------------------------------

// The header of a packed weights buffer (inverted_residual_pack, pwconv_bn_act_pack: a header H
// whose first fields are int64 magic and version, then its parts): `packed` checked to be the
// 1-d uint8 CPU tensor `packer` returns, at least a header long, of that magic and version.
template <class H>
H read_packed_header(const char* op, const char* packer, const at::Tensor& packed,
                     int64_t magic, int64_t version) {
  EFFK_CHECK(op, packed.device().is_cpu() && packed.scalar_type() == at::kByte &&
                     packed.dim() == 1 && packed.is_contiguous(),
             "packed must be the contiguous 1-d uint8 CPU tensor that ", packer, " returns; got ",
             packed.scalar_type(), " ", packed.sizes(), " on ", packed.device());
  H h{};
  EFFK_CHECK(op, packed.numel() >= static_cast<int64_t>(sizeof(h)), "packed is ",
             packed.numel(), " bytes, shorter than its header");
  std::memcpy(&h, packed.const_data_ptr<uint8_t>(), sizeof(h));
  EFFK_CHECK(op, h.magic == magic && h.version == version,
             "packed does not start with the header of ", packer, "'s version ", version,
             ": pack again");
  return h;
}

// ---- work items over the threads, with stealing ----------------------------------------------

// The items [0, items) of a parallel loop split into one contiguous range per thread, as
// at::parallel_for splits them; a thread takes its own range's items in order, then items from
// the end of the range with the most left. So a thread that starts late or runs slower (on a
// shared VM: a preempted vCPU, a busy sibling hyperthread) hands its last items to the others
// instead of being waited for, while balanced threads keep the static split (and its cache
// locality: a thread's consecutive items share packed panels). EFFK_CPU_STEAL=0: static.
class ItemRanges {
 public:
  ItemRanges(int64_t items, int64_t parts) : ranges_(parts), steal_(stealing()) {
    const int64_t chunk = (items + parts - 1) / parts;  // at::parallel_for's split
    for (int64_t t = 0; t < parts; ++t)
      ranges_[t].v.store(pack(std::min(items, t * chunk), std::min(items, (t + 1) * chunk)),
                         std::memory_order_relaxed);
  }

  // The next item for the thread that owns range `own`; false when every range is empty.
  bool claim(int64_t own, int64_t& item) {
    Range& mine = ranges_[own];
    uint64_t cur = mine.v.load(std::memory_order_relaxed);
    while (front(cur) < back(cur))
      if (mine.v.compare_exchange_weak(cur, pack(front(cur) + 1, back(cur)),
                                       std::memory_order_relaxed)) {
        item = front(cur);
        return true;
      }
    if (!steal_) return false;
    for (;;) {
      int64_t victim = -1, most = 0;
      for (int64_t t = 0; t < static_cast<int64_t>(ranges_.size()); ++t) {
        const uint64_t r = ranges_[t].v.load(std::memory_order_relaxed);
        if (back(r) - front(r) > most) {
          most = back(r) - front(r);
          victim = t;
        }
      }
      if (victim < 0) return false;
      Range& theirs = ranges_[victim];
      uint64_t r = theirs.v.load(std::memory_order_relaxed);
      if (front(r) < back(r) &&
          theirs.v.compare_exchange_strong(r, pack(front(r), back(r) - 1),
                                           std::memory_order_relaxed)) {
        item = back(r) - 1;
        return true;
      }
    }
  }

 private:
  struct alignas(64) Range {  // [front, back) in one word, a cache line each
    std::atomic<uint64_t> v{0};
  };
  static uint64_t pack(int64_t f, int64_t b) {
    return (static_cast<uint64_t>(f) << 32) | static_cast<uint64_t>(b);
  }
  static int64_t front(uint64_t r) { return static_cast<int64_t>(r >> 32); }
  static int64_t back(uint64_t r) { return static_cast<int64_t>(r & 0xFFFFFFFFu); }
  static bool stealing() {  // read per loop (A/B comparisons switch it in one process)
    const char* env = std::getenv("EFFK_CPU_STEAL");
    return env == nullptr || env[0] != '0';
  }
  std::vector<Range> ranges_;
  const bool steal_;
};

// Runs body(next) once per thread of the intra-op pool (at most items / grain threads, as
// at::parallel_for), where next(item) sets the thread's next item (ItemRanges) and returns
// false when there is none: per-thread set-up (scratch, packed panels) goes before the loop
// `while (next(item))`. Only for items whose results do not depend on the thread or the order
// they run in. Inside a parallel region, one thread runs them all in order.
template <class Body>
void parallel_items(int64_t items, int64_t grain, const Body& body) {
  if (items <= 0) return;
  EFFK_CHECK("parallel_items", items < (int64_t(1) << 31), "too many work items: ", items);
  const int64_t parts =
      at::in_parallel_region()
          ? 1
          : std::min<int64_t>(std::max(1, at::get_num_threads()),
                              (items + grain - 1) / std::max<int64_t>(grain, 1));
  ItemRanges ranges(items, parts);
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      body([&ranges, t](int64_t& item) { return ranges.claim(t, item); });
  });
}

// ---- non-temporal (streaming) result stores ---------------------------------------------------

// Whether a pass that writes `bytes` of results (and does not read them back) writes them
// around the caches: when they exceed what the working threads' caches can keep for the next
// layer anyway (each thread's L2 plus a typical 2 MB share of the L3), a normal store costs a
// read for ownership of every line from memory too. Measured (dwconv eval, N=8, 2 threads,
// by an ad-hoc script alternating the setting, not in bench/): 1.35-1.8x on 9.6-14.4 MB
// outputs; 1.03-1.09x on 1-2 MB ones, which stay cached for the next layer instead. (The
// pointwise epilogue, whose 64-column blocks were streamed the same way, ran 1.6-3x slower on
// 14-38 MB outputs, with or without its write prefetches; not understood, not used there.)
// EFFK_CPU_STREAM=0 turns it off, =1 on for every size.
inline bool stream_results(int64_t bytes) {
#if EFFK_CPU_STREAM_STORES
  static const int64_t mode = [] {
    const char* env = std::getenv("EFFK_CPU_STREAM");
    return env == nullptr ? int64_t(-1) : int64_t(env[0] == '1');
  }();
  if (mode >= 0) return mode == 1;
  static const int64_t per_thread = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return (l2 > 0 ? int64_t(l2) : int64_t(1) << 20) + (int64_t(2) << 20);
  }();
  return bytes > per_thread * at::get_num_threads();
#else
  (void)bytes;
  return false;
#endif
}

// out[0, 16) = v[0, 16) with streaming stores, when out is 64-byte aligned (one cache line);
// returns false (nothing written) otherwise. SSE2 stores, which every build has: the four
// fill one line's write-combining buffer.
EFFK_INLINE bool stream_line(float* out, const float* v) {
#if EFFK_CPU_STREAM_STORES
  if (reinterpret_cast<uintptr_t>(out) % 64 != 0) return false;
  for (int i = 0; i < 16; i += 4) _mm_stream_ps(out + i, _mm_loadu_ps(v + i));
  return true;
#else
  (void)out;
  (void)v;
  return false;
#endif
}

// Orders a task's streaming stores before whatever the task's end publishes.
inline void stream_fence() {
#if EFFK_CPU_STREAM_STORES
  _mm_sfence();
#endif
}

// dst[0, L) = c10::BFloat16(src[0, L)): its rounding (to nearest even; NaN -> 0x7FC0) on GCC
// vectors, compiled in the caller's ISA (the scalar conversion does not vectorise).
template <class U, int L>
struct GccVec {
  typedef U type __attribute__((vector_size(L * sizeof(U))));
};

template <int L>
EFFK_INLINE void round_to_bf16(const float* src, c10::BFloat16* dst) {
  using F = typename GccVec<float, L>::type;
  using U32 = typename GccVec<uint32_t, L>::type;
  using U16 = typename GccVec<uint16_t, L>::type;
  F v;
  std::memcpy(&v, src, sizeof(v));
  U32 bits;
  std::memcpy(&bits, src, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const U32 quiet_nan = U32{} + 0x7FC0u;
  bits = v != v ? quiet_nan : bits;
  const U16 h = __builtin_convertvector(bits, U16);
  std::memcpy(dst, &h, sizeof(h));
}

// dst[0, L) = T(src[0, L)): bf16 from fp32 by round_to_bf16 (L a multiple of 16), anything else
// element by element.
template <int L, class T, class A>
EFFK_INLINE void store_lanes(const A* src, T* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float> && L % 16 == 0) {
    for (int i = 0; i < L; i += 16) round_to_bf16<16>(src + i, dst + i);
  } else {
#pragma omp simd
    for (int i = 0; i < L; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// out[l] = bf16(value(l)) for l < n, rounded 16 at a time (store_lanes): the epilogues' bf16
// stores (c10's scalar conversion does not vectorise). fp32/fp64 epilogues keep their own loops.
template <class F>
EFFK_INLINE void store_bf16_row(int64_t n, c10::BFloat16* out, const F& value) {
  constexpr int L = 16;
  float z[L];
  int64_t l = 0;
  for (; l + L <= n; l += L) {
#pragma omp simd
    for (int i = 0; i < L; ++i) z[i] = value(l + i);
    store_lanes<L>(z, out + l);
  }
  for (; l < n; ++l) out[l] = static_cast<c10::BFloat16>(value(l));
}

// fp32 accumulation for fp32/fp16/bf16, fp64 for fp64 (gradcheck).
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A fresh `dtype` (fp32/fp64) copy of a per-channel vector (never an alias of an input). On
// the CPU converted by a loop here: Tensor::copy_'s dispatch and TensorIterator set-up cost a
// few us per call, a part of a small eval layer's fixed cost.
inline at::Tensor stat_copy(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor out = at::empty({t.size(0)}, t.options().dtype(dtype));
  if (!t.is_cpu() || (dtype != at::kFloat && dtype != at::kDouble)) return out.copy_(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "stat_copy", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    const int64_t n = t.size(0), step = t.stride(0);
    auto convert = [&](auto* dst) {
      using D = std::remove_pointer_t<decltype(dst)>;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(src[i * step]);
    };
    if (dtype == at::kFloat)
      convert(out.data_ptr<float>());
    else
      convert(out.data_ptr<double>());
  });
  return out;
}

// The (mean, var) a forward op starts from: in eval mode the running statistics; for an empty
// training batch the running statistics too, so the caller's momentum update leaves them
// unchanged (zeros when there are none); otherwise zeros for the kernel to fill.
inline std::pair<at::Tensor, at::Tensor> initial_stats(
    const at::Tensor& x, int64_t channels, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training) {
  const at::ScalarType sd = stat_dtype(x);
  const bool has_running = running_mean.has_value() && running_mean->defined();
  if (!training || (has_running && x.numel() == 0))
    return {stat_copy(*running_mean, sd), stat_copy(*running_var, sd)};
  return {at::zeros({channels}, x.options().dtype(sd)),
          at::zeros({channels}, x.options().dtype(sd))};
}

// The memory format outputs are returned in: the input's (contiguous or channels_last).
inline at::MemoryFormat output_format(const at::Tensor& x) { return x.suggest_memory_format(); }

// A view of x whose channels are innermost (stride(1) == 1), copying only when needed.
// N/H/W strides stay arbitrary, so channel slices of an NHWC tensor are used in place.
inline at::Tensor channels_innermost(const at::Tensor& x) {
  if (x.stride(1) == 1 || x.size(1) == 1) return x;
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

// A fresh NHWC (channels_last) tensor of the given NCHW sizes.
inline at::Tensor empty_nhwc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast));
}

// Returns t (computed NHWC) in memory format `fmt`.
inline at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// A 1-D tensor as a contiguous tensor of the accumulation dtype (itself when it is one: no
// dispatch for the common case).
inline at::Tensor acc_vector(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc && t.is_contiguous()) return t;
  return t.to(acc).contiguous();
}

// Deterministic per-channel mean and biased variance. The caller splits the M = count
// positions into chunks fixed by the problem (never by the thread count), fills each chunk's
// partials with add_chunk (any thread, any order), then finalize combines them in chunk order
// with Chan's formula in double precision: the same bits for any number of threads.
struct ChannelStats {
  int64_t channels = 0;
  std::vector<double> count, mean, m2;  // [chunk][channel]

  ChannelStats(int64_t num_chunks, int64_t channels_)
      : channels(channels_),
        count(num_chunks, 0.0),
        mean(num_chunks * channels_, 0.0),
        m2(num_chunks * channels_, 0.0) {}

  // values: `n` positions x `channels`, row stride `ld` (elements); two passes over the chunk.
  template <typename A>
  void add_chunk(int64_t chunk, const A* values, int64_t n, int64_t ld) {
    count[chunk] = static_cast<double>(n);
    double* mu = &mean[chunk * channels];
    double* s2 = &m2[chunk * channels];
    if (n == 0) return;
    std::vector<A> sum(channels, A(0));
    for (int64_t i = 0; i < n; ++i) {
      const A* row = values + i * ld;
      for (int64_t c = 0; c < channels; ++c) sum[c] += row[c];
    }
    std::vector<A> chunk_mean(channels);
    for (int64_t c = 0; c < channels; ++c) chunk_mean[c] = sum[c] / A(n);
    std::vector<A> sq(channels, A(0));
    for (int64_t i = 0; i < n; ++i) {
      const A* row = values + i * ld;
      for (int64_t c = 0; c < channels; ++c) {
        const A d = row[c] - chunk_mean[c];
        sq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      mu[c] = chunk_mean[c];
      s2[c] = sq[c];
    }
  }

  // mean_out, var_out: `channels` values each (biased variance).
  template <typename A>
  void finalize(A* mean_out, A* var_out) const {
    const int64_t chunks = static_cast<int64_t>(count.size());
    for (int64_t c = 0; c < channels; ++c) {
      double n = 0.0, mu = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < chunks; ++k)
        chan_merge(n, mu, s2, count[k], mean[k * channels + c], m2[k * channels + c]);
      mean_out[c] = static_cast<A>(mu);
      var_out[c] = static_cast<A>(n > 0.0 ? s2 / n : 0.0);
    }
  }
};

}  // namespace effkernels::cpu
