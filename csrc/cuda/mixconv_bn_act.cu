// CUDA MixNet mixed depthwise conv + BatchNorm + activation: every group (kernel size) in ONE
// launch per pass, on the depthwise kernels (dw_kernels.cuh) driven by a per-channel-block table.
//
// Channel blocks of CB channels (16; 8 for fp64) start at multiples of CB. A block takes the
// largest kernel size k_b among the groups it overlaps; the kernels of smaller groups in it are
// centred in the k_b x k_b window with zero taps, which with padding dil*(k_b-1)/2 computes
// exactly their own conv (all k_i are odd and every group pads dil*(k_i-1)/2). The table holds
// (k_b, pad_b, woff_b) per block; the packed weights are the blocks' [k_b*k_b][CB] slabs, made
// by one gather through an index map (and the weight gradient unpacked by the inverse gather).
// When every block has the same k the table is dropped and the uniform kernel for that k runs.
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include "dw_host.h"
#include "effkernels/checks.h"
#include "effkernels/op_checks.h"

namespace effkernels::cuda {
namespace {

struct MixLayout {
  DwLayer L;
  at::Tensor pack_idx;    // [P]: index into cat(weights) ++ [0] for each packed slot
  at::Tensor unpack_idx;  // [sum C_i k_i^2]: packed slot of each element of cat(weights)
};

at::Tensor to_device(std::vector<int64_t>& v, const at::Device& device) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, opts).to(device);
}

// The packing of the groups' weights into channel blocks; g: the layer's geometry from
// check_mixconv_* (K the largest kernel, pad its padding: every block's when uniform).
MixLayout mix_layout(const at::Tensor& x, at::TensorList weights, const DwGeometry& g) {
  const int64_t C = g.C, dilation = g.dil, cb = channel_block(x.scalar_type());
  MixLayout m;
  DwLayer& L = m.L;
  L.g = g;
  L.cblocks = (C + cb - 1) / cb;
  std::vector<int64_t> kc(C);  // kernel size of each channel
  int64_t c0 = 0;
  for (const at::Tensor& w : weights) {
    for (int64_t j = 0; j < w.size(0); ++j) kc[c0 + j] = w.size(2);
    c0 += w.size(0);
  }
  std::vector<int64_t> table(3 * L.cblocks);
  bool uniform = true;
  int64_t woff = 0;
  for (int64_t b = 0; b < L.cblocks; ++b) {
    int64_t kb = 1;
    for (int64_t c = b * cb; c < std::min(C, (b + 1) * cb); ++c) kb = std::max(kb, kc[c]);
    table[3 * b] = kb;
    table[3 * b + 1] = dilation * (kb - 1) / 2;
    table[3 * b + 2] = woff;
    woff += kb * kb * cb;
    uniform = uniform && kb == table[0];
    L.has_k[kb] = true;
  }
  L.P = woff;
  // Element (c, u, v) of group i's (C_i, 1, k_i, k_i) weight -> its packed slot.
  std::vector<int64_t> unpack, pack(L.P, -1);
  unpack.reserve(static_cast<size_t>(std::max<int64_t>(0, woff)));
  c0 = 0;
  for (const at::Tensor& w : weights) {
    const int64_t k = w.size(2);
    for (int64_t j = 0; j < w.size(0); ++j) {
      const int64_t c = c0 + j, b = c / cb, kb = table[3 * b], off = (kb - k) / 2;
      for (int64_t u = 0; u < k; ++u)
        for (int64_t v = 0; v < k; ++v)
          unpack.push_back(table[3 * b + 2] + ((u + off) * kb + (v + off)) * cb + c % cb);
    }
    c0 += w.size(0);
  }
  const int64_t n_src = static_cast<int64_t>(unpack.size());
  for (int64_t e = 0; e < n_src; ++e) pack[unpack[e]] = e;
  for (int64_t& s : pack)
    if (s < 0) s = n_src;  // the appended zero
  m.unpack_idx = to_device(unpack, x.device());
  m.pack_idx = to_device(pack, x.device());
  if (!uniform) L.table = to_device(table, x.device());
  return m;
}

// mix_layout, made once per (device, channel block, dilation, groups) and kept: its index
// tensors then cost no host-to-device copy per call. Those copies (pageable memory) made the op
// wait for the host and could not be captured in a CUDA graph (H200: 0.22-0.36 ms per call from
// run to run, bench/NOTES.md). A network has a few distinct layouts; past kMaxCached, layouts
// are made per call rather than evicted (a tensor freed here could still be read by a kernel on
// another stream).
MixLayout cached_layout(const at::Tensor& x, at::TensorList weights, const DwGeometry& g) {
  constexpr size_t kMaxCached = 1024;
  using Key = std::tuple<int, int64_t, int64_t, std::vector<int64_t>>;
  static std::mutex mutex;
  static std::map<Key, MixLayout> cache;
  std::vector<int64_t> groups;
  for (const at::Tensor& w : weights) {
    groups.push_back(w.size(0));
    groups.push_back(w.size(2));
  }
  Key key{x.device().index(), channel_block(x.scalar_type()), g.dil, std::move(groups)};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      MixLayout m = it->second;
      m.L.g = g;
      return m;
    }
  }
  MixLayout m = mix_layout(x, weights, g);
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() < kMaxCached) cache.emplace(std::move(key), m);
  return m;
}

at::Tensor pack_weights(at::TensorList weights, const MixLayout& m, at::ScalarType acc) {
  std::vector<at::Tensor> flat;
  for (const at::Tensor& w : weights) flat.push_back(w.reshape({-1}).to(acc));
  flat.push_back(at::zeros({1}, weights[0].options().dtype(acc)));
  return at::cat(flat).index_select(0, m.pack_idx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixconv_bn_act(
    const at::Tensor& x, at::TensorList weights, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t dilation,
    c10::string_view act, bool training, double eps) {
  const MixProblem mp = check_mixconv_forward("mixconv_bn_act", x, weights, bn_weight, bn_bias,
                                              running_mean, running_var, stride, dilation, act,
                                              training);
  const c10::cuda::CUDAGuard guard(x.device());
  const MixLayout m = cached_layout(x, weights, mp.g);
  const at::Tensor wpack = pack_weights(weights, m, acc_dtype(x.scalar_type()));
  return dw_forward(x, wpack, m.L, bn_weight, bn_bias, running_mean, running_var, mp.act,
                    training, eps);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t dilation, c10::string_view act,
    bool training, double eps) {
  const MixProblem mp =
      check_mixconv_backward("mixconv_bn_act_backward", grad_out, x, weights, bn_weight,
                             bn_bias, mean, var, stride, dilation, act, training);
  const c10::cuda::CUDAGuard guard(x.device());
  const MixLayout m = cached_layout(x, weights, mp.g);
  const at::Tensor wpack = pack_weights(weights, m, acc_dtype(x.scalar_type()));
  auto [grad_x, grad_packed, grad_gamma, grad_beta] =
      dw_backward(grad_out, x, wpack, m.L, bn_weight, bn_bias, mean, var, mp.act, training, eps);
  const at::Tensor flat = grad_packed.index_select(0, m.unpack_idx);
  std::vector<at::Tensor> grad_weights;
  int64_t e0 = 0;
  for (const at::Tensor& w : weights) {
    grad_weights.push_back(at::empty_like(w).copy_(flat.narrow(0, e0, w.numel()).view(w.sizes())));
    e0 += w.numel();
  }
  return {grad_x, grad_weights, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(effkernels, CUDA, m) {
  m.impl("mixconv_bn_act", &mixconv_bn_act);
  m.impl("mixconv_bn_act_backward", &mixconv_bn_act_backward);
}

}  // namespace effkernels::cuda
