// CUDA depthwise conv + BatchNorm + activation: the dwconv_bn_act ops' CUDA kernels. The
// kernels and the pass sequence are shared with mixconv (dw_kernels.cuh, dw_host.cu): a
// depthwise conv is the one-group case. Argument checks are the CPU op's (op_checks.cpp).
#include <torch/library.h>

#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

#include "dw_host.h"
#include "effkernels/checks.h"
#include "effkernels/op_checks.h"

namespace effkernels::cuda {
namespace {

// weight (C, 1, K, K) -> packed [cblocks][K*K][CB] in the accumulation dtype, zero-padded
// channels.
at::Tensor pack_weight(const at::Tensor& weight, const DwLayer& L, int64_t cb) {
  const int64_t C = L.g.C, KK = L.g.K * L.g.K;
  at::Tensor w = weight.reshape({C, KK}).to(acc_dtype(weight.scalar_type()));
  w = at::constant_pad_nd(w, {0, 0, 0, L.cblocks * cb - C});
  return w.view({L.cblocks, cb, KK}).transpose(1, 2).contiguous().view({-1});
}

DwLayer layer_of(const DwGeometry& g, at::ScalarType dtype) {
  DwLayer L;
  L.g = g;
  const int64_t cb = channel_block(dtype);
  L.cblocks = (g.C + cb - 1) / cb;
  L.P = L.cblocks * g.K * g.K * cb;
  L.has_k[g.K] = true;
  return L;
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
  const c10::cuda::CUDAGuard guard(x.device());
  const DwLayer L = layer_of(g, x.scalar_type());
  const at::Tensor wpack = pack_weight(weight, L, channel_block(x.scalar_type()));
  return dw_forward(x, wpack, L, bn_weight, bn_bias, running_mean, running_var, a, training, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, int64_t padding, int64_t dilation,
    c10::string_view act, bool training, double eps) {
  constexpr const char* op = "dwconv_bn_act_backward";
  const auto [g, a] = check_dwconv_backward(op, grad_out, x, weight, bn_weight, bn_bias, mean,
                                            var, stride, padding, dilation, act, training);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cb = channel_block(x.scalar_type());
  const DwLayer L = layer_of(g, x.scalar_type());
  const at::Tensor wpack = pack_weight(weight, L, cb);
  auto [grad_x, grad_packed, grad_gamma, grad_beta] =
      dw_backward(grad_out, x, wpack, L, bn_weight, bn_bias, mean, var, a, training, eps);
  // [cblocks][K*K][CB] (float64) -> (C, 1, K, K) in weight's dtype.
  const at::Tensor gw = grad_packed.view({L.cblocks, g.K * g.K, cb})
                            .transpose(1, 2)
                            .reshape({L.cblocks * cb, g.K * g.K})
                            .narrow(0, 0, g.C)
                            .reshape({g.C, 1, g.K, g.K});
  at::Tensor grad_weight = at::empty_like(weight).copy_(gw);
  return {grad_x, grad_weight, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(effkernels, CUDA, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act);
  m.impl("dwconv_bn_act_backward", &dwconv_bn_act_backward);
}

}  // namespace effkernels::cuda
