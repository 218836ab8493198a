// ctest for the C++ library: the shared host-device headers, and the CPU kernels called through
// the dispatcher (as a libtorch user would) against ATen's own conv + batch_norm + activation,
// with gradients from libtorch autograd. Usage: effkernels_tests <case>.
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/cpu/cpu_common.h"
#include "effkernels/activation.h"
#include "effkernels/conv_geometry.h"

namespace {

using namespace effkernels;
using OptT = std::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  const double err = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, b.abs().max().item<double>());
  expect(err <= tol * scale, what + ": max abs error " + std::to_string(err));
}

const Act kActs[] = {Act::Identity, Act::ReLU, Act::ReLU6, Act::HSwish,
                     Act::SiLU,     Act::HSigmoid, Act::Sigmoid};
const char* kActNames[] = {"identity", "relu", "relu6", "hswish", "silu", "hsigmoid", "sigmoid"};

at::Tensor aten_act(const at::Tensor& z, Act a) {
  switch (a) {
    case Act::ReLU: return torch::relu(z);
    case Act::ReLU6: return torch::hardtanh(z, 0, 6);
    case Act::HSwish: return torch::hardswish(z);
    case Act::SiLU: return torch::silu(z);
    case Act::HSigmoid: return torch::hardsigmoid(z);
    case Act::Sigmoid: return torch::sigmoid(z);
    default: return z;
  }
}

void test_headers() {
  // Activations and derivatives against ATen's forward and autograd, on the kinks too.
  auto z = torch::cat({torch::linspace(-7.9, 7.9, 317, torch::kDouble),
                       torch::tensor({-3.0, 0.0, 3.0, 6.0}, torch::kDouble)});
  for (int i = 0; i < 7; ++i) {
    auto zz = z.clone().requires_grad_();
    auto y = aten_act(zz, kActs[i]);
    auto dy = torch::autograd::grad({y.sum()}, {zz}, {}, false, false, true)[0];
    if (!dy.defined()) dy = torch::ones_like(z);
    auto ours = torch::empty_like(z), ours_d = torch::empty_like(z);
    for (int64_t j = 0; j < z.numel(); ++j) {
      const double v = z[j].item<double>();
      ours[j] = act_forward(kActs[i], v);
      ours_d[j] = act_derivative(kActs[i], v);
    }
    expect_close(ours, y.detach(), 1e-12, std::string("act_forward ") + kActNames[i]);
    // hardsigmoid's float 1/6 in double too, as ATen's backward has it.
    expect_close(ours_d, dy, 1e-12, std::string("act_derivative ") + kActNames[i]);
  }
  // Where the derivative is zero the backward selects 0, so a NaN or Inf gradient stays out
  // (ATen's threshold/hardtanh/hardswish/hardsigmoid backward do the same).
  const double nan = std::nan("");
  for (double g : {nan, double(INFINITY)}) {
    expect(act_backward<Act::ReLU>(g, -1.0) == 0.0, "relu backward of a NaN/Inf gradient");
    expect(act_backward<Act::ReLU6>(g, 7.0) == 0.0, "relu6 backward of a NaN/Inf gradient");
    expect(act_backward<Act::HSwish>(g, -4.0) == 0.0, "hswish backward of a NaN/Inf gradient");
    expect(act_backward<Act::HSigmoid>(g, 4.0) == 0.0, "hsigmoid backward of NaN/Inf");
  }
  expect(act_backward<Act::ReLU6>(2.0, nan) == 2.0 && act_backward<Act::HSigmoid>(2.0, nan) == 0.0,
         "relu6 passes the gradient at z = NaN, hsigmoid does not");
  // Output sizes equal ATen's conv2d for odd sizes, strides, paddings, dilations.
  for (int64_t h : {1, 7, 11, 16}) {
    for (int64_t k : {1, 3, 5}) {
      for (int64_t s : {1, 2}) {
        for (int64_t d : {1, 2}) {
          const int64_t p = d * (k - 1) / 2;
          if (h + 2 * p < d * (k - 1) + 1) continue;
          auto out = torch::conv2d(torch::zeros({1, 1, h, h}), torch::zeros({1, 1, k, k}), {},
                                   s, p, d);
          expect(out.size(2) == conv_out_size(h, k, s, p, d), "conv_out_size");
        }
      }
    }
  }
  // Index helpers of the CUDA tiles (conv_geometry.h), against brute-force enumeration.
  for (int64_t a = -23; a <= 23; ++a)
    for (int64_t b : {1, 2, 3, 7})
      expect(floor_div(a, b) == static_cast<int64_t>(std::floor(double(a) / double(b))),
             "floor_div " + std::to_string(a) + "/" + std::to_string(b));
  for (int64_t k : {1, 3, 4, 5, 11}) {
    for (int64_t s : {1, 2}) {
      for (int64_t d : {1, 2, 3}) {
        for (int64_t n : {1, 4, 8}) {
          // conv_in_extent: the span of inputs read by outputs [0, n).
          expect(conv_in_extent(n, k, s, d) == (n - 1) * s + (k - 1) * d + 1, "conv_in_extent");
          for (int64_t pad : {0, 1, 5}) {
            for (int64_t lo : {-3, 0, 5, 16}) {
              const int64_t hi = lo + n - 1;
              const IndexRange r = transposed_range(lo, hi, k, s, pad, d);
              int64_t emin = INT64_MAX, emax = INT64_MIN;
              for (int64_t i = lo; i <= hi; ++i)
                for (int64_t t = 0; t < k; ++t) {
                  const int64_t u = i + pad - t * d;  // = o * s
                  if (((u % s) + s) % s != 0) continue;
                  emin = std::min(emin, u / s);  // exact: u is a multiple of s
                  emax = std::max(emax, u / s);
                }
              // Every contributing output lies inside the range, and the range is tight up to
              // stride rounding (the kernels size their dy halo from it). No output at all can
              // meet the inputs (k = 1, stride 2, one input of the other parity): nothing to hold.
              if (emin > emax) continue;
              expect(emin >= r.lo && emax <= r.hi && r.hi - r.lo <= (emax - emin) + 2 * s,
                     "transposed_range");
            }
          }
        }
      }
    }
  }
  // chan_merge: parts of a sample merged in order give its mean and M2 (biased var * n).
  {
    auto v = torch::randn({103}, torch::kDouble) * 3 + 5;
    double n = 0, mean = 0, m2 = 0;
    const int64_t bounds[] = {0, 1, 17, 50, 99, 103};
    for (int i = 0; i + 1 < 6; ++i) {
      const int64_t lo = bounds[i], hi = bounds[i + 1];
      auto part = v.slice(0, lo, hi);
      const double pm = part.mean().item<double>();
      const double pm2 = (part - pm).pow(2).sum().item<double>();
      chan_merge(n, mean, m2, double(hi - lo), pm, pm2);
    }
    chan_merge(n, mean, m2, 0.0, 123.0, 456.0);  // empty parts are skipped
    expect(n == 103.0, "chan_merge count");
    expect(std::abs(mean - v.mean().item<double>()) < 1e-12, "chan_merge mean");
    expect(std::abs(m2 / n - v.var(0, false).item<double>()) < 1e-10, "chan_merge var");
  }
  // BN folding equals eval batch_norm; the backward coefficients equal autograd's.
  auto y = torch::randn({64, 3}, torch::kDouble);
  auto g = torch::rand({3}, torch::kDouble) + 0.5, b = torch::randn({3}, torch::kDouble);
  auto m = torch::randn({3}, torch::kDouble), v = torch::rand({3}, torch::kDouble) + 0.5;
  auto ref = torch::batch_norm(y, g, b, m, v, false, 0.1, 1e-5, false);
  for (int c = 0; c < 3; ++c) {
    const auto f = fold_bn(g[c].item<double>(), b[c].item<double>(), m[c].item<double>(),
                           v[c].item<double>(), 1e-5);
    expect_close(y.select(1, c) * f.scale + f.shift, ref.select(1, c), 1e-12, "fold_bn");
  }
  for (bool training : {true, false}) {
    auto yy = y.clone().requires_grad_();
    auto rm = m.clone(), rv = v.clone();
    auto z = torch::batch_norm(yy, g, b, rm, rv, training, 0.1, 1e-5, false);
    auto grad = torch::randn_like(z);
    auto dy = torch::autograd::grad({z}, {yy}, {grad})[0];
    auto mean = training ? y.mean(0) : m;
    auto var = training ? y.var(0, false) : v;
    for (int c = 0; c < 3; ++c) {
      const double invstd = 1.0 / std::sqrt(var[c].item<double>() + 1e-5);
      auto xhat = (y.select(1, c) - mean[c]) * invstd;
      auto gc = grad.select(1, c);
      const auto k = bn_backward_coeffs(g[c].item<double>(), invstd, gc.sum().item<double>(),
                                        (gc * xhat).sum().item<double>(), 64.0, training);
      expect_close(gc * k.a + xhat * k.b + k.c, dy.select(1, c), 1e-10, "bn_backward_coeffs");
    }
  }
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Runs `ours` (forward op + backward op) and `ref` (ATen + autograd) on the same leaves, in
// training and eval, for every activation, and compares output, stats and gradients.
void compare(const std::string& name, std::vector<at::Tensor> leaves,
             const std::function<Fwd(const std::vector<at::Tensor>&, const std::string&, bool)>&
                 ours_fwd,
             const std::function<std::vector<at::Tensor>(const at::Tensor&, const Fwd&,
                                                         const std::string&, bool)>& ours_bwd,
             const std::function<at::Tensor(const std::vector<at::Tensor>&, const std::string&,
                                            bool)>& ref_fwd) {
  for (bool training : {true, false}) {
    for (int i = 0; i < 5; ++i) {
      const std::string act = kActNames[i];
      const std::string tag = name + (training ? " train " : " eval ") + act;
      auto fwd = ours_fwd(leaves, act, training);
      std::vector<at::Tensor> ref_leaves;
      for (auto& t : leaves) ref_leaves.push_back(t.detach().to(at::kDouble).requires_grad_());
      auto ref = ref_fwd(ref_leaves, act, training);
      expect_close(std::get<0>(fwd), ref, 1e-5, tag + " out");
      auto grad = torch::randn_like(ref);
      auto ref_grads = torch::autograd::grad({ref}, ref_leaves, {grad});
      auto grads = ours_bwd(grad.to(leaves[0].scalar_type()), fwd, act, training);
      for (size_t j = 0; j < grads.size(); ++j)
        expect_close(grads[j], ref_grads[j], 1e-4, tag + " grad " + std::to_string(j));
    }
  }
}

at::Tensor bn_ref(const at::Tensor& y, const std::vector<at::Tensor>& l, size_t gi,
                  const at::Tensor& rm, const at::Tensor& rv, bool training) {
  return torch::batch_norm(y, l[gi], l[gi + 1], rm.to(at::kDouble), rv.to(at::kDouble),
                           training, 0.1, 1e-5, false);
}

Act act_of(const std::string& s) {
  for (int i = 0; i < 7; ++i)
    if (s == kActNames[i]) return kActs[i];
  return Act::Identity;
}

void test_dwconv() {
  auto dw = op<Fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const OptT&, const OptT&, int64_t, int64_t, int64_t, c10::string_view, bool,
                   double)>("effkernels::dwconv_bn_act");
  auto dw_bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
      c10::string_view, bool, double)>("effkernels::dwconv_bn_act_backward");
  const int64_t C = 13;
  auto rm = torch::randn({C}) * 0.2, rv = torch::rand({C}) + 0.5;
  std::vector<at::Tensor> leaves = {
      torch::randn({2, C, 9, 11}).contiguous(at::MemoryFormat::ChannelsLast),
      torch::randn({C, 1, 5, 5}) * 0.2, torch::rand({C}) + 0.5, torch::randn({C}) * 0.2};
  compare(
      "dwconv", leaves,
      [&](const std::vector<at::Tensor>& l, const std::string& act, bool tr) {
        return dw.call(l[0], l[1], l[2], l[3], rm, rv, 2, 2, 1, act, tr, 1e-5);
      },
      [&](const at::Tensor& g, const Fwd& f, const std::string& act, bool tr) {
        auto r = dw_bwd.call(g, leaves[0], leaves[1], leaves[2], leaves[3], std::get<1>(f),
                             std::get<2>(f), 2, 2, 1, act, tr, 1e-5);
        return std::vector<at::Tensor>{std::get<0>(r), std::get<1>(r), std::get<2>(r),
                                       std::get<3>(r)};
      },
      [&](const std::vector<at::Tensor>& l, const std::string& act, bool tr) {
        auto y = torch::conv2d(l[0], l[1], {}, 2, 2, 1, C);
        return aten_act(bn_ref(y, l, 2, rm, rv, tr), act_of(act));
      });
}

void test_pwconv() {
  // The forward's fourth result, conv_out (y, in training), goes to the backward as autograd
  // passes it.
  auto pw = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
      const OptT&, const OptT&, c10::string_view, bool, double, bool)>(
      "effkernels::pwconv_bn_act");
  auto pw_bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, c10::string_view,
      bool, double, const OptT&)>("effkernels::pwconv_bn_act_backward");
  at::Tensor conv_out;
  const int64_t Cin = 19, Cout = 19;
  auto rm = torch::randn({Cout}) * 0.2, rv = torch::rand({Cout}) + 0.5;
  std::vector<at::Tensor> leaves = {
      torch::randn({2, Cin, 7, 5}).contiguous(at::MemoryFormat::ChannelsLast),
      torch::randn({Cout, Cin, 1, 1}) * 0.2, torch::rand({Cout}) + 0.5,
      torch::randn({Cout}) * 0.2, torch::randn({2, Cout, 7, 5})};
  compare(
      "pwconv", leaves,
      [&](const std::vector<at::Tensor>& l, const std::string& act, bool tr) {
        auto r = pw.call(l[0], l[1], l[2], l[3], rm, rv, l[4], act, tr, 1e-5, true);
        conv_out = std::get<3>(r);
        if (conv_out.numel() != (tr ? l[0].size(0) * 19 * 7 * 5 : 0))
          throw std::runtime_error("pwconv: conv_out of " + std::to_string(conv_out.numel()) +
                                   " elements");
        return Fwd{std::get<0>(r), std::get<1>(r), std::get<2>(r)};
      },
      [&](const at::Tensor& g, const Fwd& f, const std::string& act, bool tr) {
        auto r = pw_bwd.call(g, leaves[0], leaves[1], leaves[2], leaves[3], std::get<1>(f),
                             std::get<2>(f), leaves[4], act, tr, 1e-5, conv_out);
        return std::vector<at::Tensor>{std::get<0>(r), std::get<1>(r), std::get<2>(r),
                                       std::get<3>(r), std::get<4>(r)};
      },
      [&](const std::vector<at::Tensor>& l, const std::string& act, bool tr) {
        auto y = torch::conv2d(l[0], l[1]);
        return aten_act(bn_ref(y, l, 2, rm, rv, tr) + l[4], act_of(act));
      });
}

void test_mixconv() {
  auto mix = op<Fwd(const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&,
                    const OptT&, const OptT&, int64_t, int64_t, c10::string_view, bool,
                    double)>("effkernels::mixconv_bn_act");
  const int64_t C = 9;
  auto x = torch::randn({2, C, 8, 7}), w0 = torch::randn({4, 1, 3, 3}) * 0.3,
       w1 = torch::randn({5, 1, 7, 7}) * 0.1;
  auto g = torch::rand({C}) + 0.5, b = torch::randn({C}) * 0.2;
  auto rm = torch::randn({C}) * 0.2, rv = torch::rand({C}) + 0.5;
  for (bool tr : {true, false}) {
    auto out = std::get<0>(mix.call(x, {w0, w1}, g, b, rm, rv, 2, 1, "silu", tr, 1e-5));
    auto parts = x.split_with_sizes({4, 5}, 1);
    auto y = torch::cat({torch::conv2d(parts[0], w0, {}, 2, 1, 1, 4),
                         torch::conv2d(parts[1], w1, {}, 2, 3, 1, 5)}, 1);
    auto ref = torch::silu(torch::batch_norm(y, g, b, rm.clone(), rv.clone(), tr, 0.1, 1e-5,
                                             false));
    expect_close(out, ref, 1e-5, std::string("mixconv ") + (tr ? "train" : "eval"));
  }
}

void test_inverted_residual() {
  auto ir = op<std::tuple<at::Tensor, std::vector<at::Tensor>>(
      const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
      int64_t, int64_t, c10::string_view, c10::string_view, c10::string_view, bool, bool,
      double)>("effkernels::inverted_residual");
  auto stage = [](int64_t cout, int64_t cin, int64_t k) {
    return std::vector<at::Tensor>{torch::randn({cout, cin, k, k}) * 0.3,
                                   torch::rand({cout}) + 0.5, torch::randn({cout}) * 0.2,
                                   torch::randn({cout}) * 0.2, torch::rand({cout}) + 0.5};
  };
  auto x = torch::randn({2, 8, 9, 9}).contiguous(at::MemoryFormat::ChannelsLast);
  auto e = stage(24, 8, 1), d = stage(24, 1, 3), p = stage(8, 24, 1);
  std::vector<at::Tensor> se = {torch::randn({6, 24, 1, 1}) * 0.3, torch::randn({6}),
                                torch::randn({24, 6, 1, 1}) * 0.3, torch::randn({24})};
  auto out = std::get<0>(ir.call(x, e, d, se, p, 1, 1, "hswish", "relu", "hsigmoid", true,
                                 false, 1e-5));
  auto bn = [](const at::Tensor& y, const std::vector<at::Tensor>& s) {
    return torch::batch_norm(y, s[1], s[2], s[3], s[4], false, 0.1, 1e-5, false);
  };
  auto h = torch::hardswish(bn(torch::conv2d(x, e[0]), e));
  h = torch::hardswish(bn(torch::conv2d(h, d[0], {}, 1, 1, 1, 24), d));
  auto s = torch::relu(torch::conv2d(h.mean({2, 3}, true), se[0], se[1]));
  h = h * torch::hardsigmoid(torch::conv2d(s, se[2], se[3]));
  auto ref = bn(torch::conv2d(h, p[0]), p) + x;
  expect_close(out, ref, 1e-5, "inverted_residual eval");
  // The fused inference kernel (csrc/cpu/inverted_residual.cpp) computes the same block.
  auto fused = op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                             at::TensorList, int64_t, int64_t, c10::string_view,
                             c10::string_view, c10::string_view, bool, double)>(
      "effkernels::inverted_residual_inference");
  expect_close(fused.call(x, e, d, se, p, 1, 1, "hswish", "relu", "hsigmoid", true, 1e-5), ref,
               1e-5, "inverted_residual_inference");
}

void test_parallel_items() {
  // Every item runs exactly once, for any item count, grain and thread count (more threads
  // than cores too), stealing or not, and inside a parallel region.
  const int before = at::get_num_threads();
  for (const char* steal : {"1", "0"}) {
    setenv("EFFK_CPU_STEAL", steal, 1);
    for (const int threads : {1, 2, 3}) {
      at::set_num_threads(threads);
      for (const int64_t items : {1, 2, 3, 7, 64, 1001}) {
        for (const int64_t grain : {1, 5}) {
          std::vector<std::atomic<int>> runs(items);
          cpu::parallel_items(items, grain, [&](const auto& next) {
            for (int64_t i = 0; next(i);) runs[i].fetch_add(1);
          });
          int64_t once = 0;
          for (auto& r : runs) once += r.load() == 1;
          expect(once == items, std::string("parallel_items steal=") + steal + " threads=" +
                                    std::to_string(threads) + " items=" +
                                    std::to_string(items) + " grain=" + std::to_string(grain));
        }
      }
    }
  }
  // A thread that sleeps in item 0: without stealing it runs the rest of its range (items
  // 1-7 of 16 on 2 threads) after waking; with stealing the other thread has taken them by
  // then (or took item 0 itself, when it started first and stole the whole range).
  at::set_num_threads(2);
  for (const char* steal : {"1", "0"}) {
    setenv("EFFK_CPU_STEAL", steal, 1);
    const int64_t items = 16;
    std::vector<int> by(items, -1), seq(items, -1);
    std::atomic<int> clock{0};
    cpu::parallel_items(items, 1, [&](const auto& next) {
      const int me = at::get_thread_num();
      for (int64_t i = 0; next(i);) {
        if (i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
        by[i] = me;
        seq[i] = clock.fetch_add(1);
      }
    });
    int64_t after_sleep = 0;  // items of range 0 the sleeper ran after item 0
    for (int64_t i = 1; i < items / 2; ++i) after_sleep += by[i] == by[0] && seq[i] > seq[0];
    std::string threads_by_item;
    for (const int t : by) threads_by_item += std::to_string(t);
    expect(std::string(steal) == "1" ? after_sleep < items / 2 - 1 : after_sleep == items / 2 - 1,
           std::string("parallel_items: the sleeping thread's range, steal=") + steal +
               ", thread by item " + threads_by_item);
  }
  setenv("EFFK_CPU_STEAL", "1", 1);
  // Nested in a parallel region: one thread, all items in order.
  std::vector<int64_t> order;
  at::parallel_for(0, 2, 1, [&](int64_t b, int64_t) {
    if (b != 0) return;
    cpu::parallel_items(10, 1, [&](const auto& next) {
      for (int64_t i = 0; next(i);) order.push_back(i);
    });
  });
  std::vector<int64_t> want(10);
  for (int64_t i = 0; i < 10; ++i) want[i] = i;
  expect(order == want, "parallel_items inside a parallel region runs the items in order");
  at::set_num_threads(before);
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"headers", test_headers}, {"dwconv", test_dwconv},   {"pwconv", test_pwconv},
      {"mixconv", test_mixconv}, {"inverted_residual", test_inverted_residual},
      {"parallel_items", test_parallel_items}};
  torch::manual_seed(0);
  if (argc != 2 || !cases.count(argv[1])) {
    std::printf(
        "usage: effkernels_tests headers|dwconv|pwconv|mixconv|inverted_residual|"
        "parallel_items\n");
    return 2;
  }
  try {
    cases.at(argv[1])();
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %s\n", argv[1], failures ? "FAILED" : "passed");
  return failures ? 1 : 0;
}
