// C++ test of aerl_fast::grad_stats against plain libtorch (built by CMakeLists.txt, run by ctest).
// Calls the op through the dispatcher, as Python and torch.compile do, and checks it against a
// double-precision reference written with scalar loops; then checks that bad input throws
// c10::Error with a message instead of crashing.
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "../grad_stats.h"

namespace {

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Result call_op(const at::Tensor& g, const std::optional<at::Tensor>& p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aerl_fast::grad_stats", "")
                       .typed<Result(const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(g, p);
}

struct Ref {
  std::vector<double> norm, cos, sign, mean_dir;
};

double sgn(double x) { return (x > 0) - (x < 0); }

Ref reference(const at::Tensor& g_in, const at::Tensor* p_in) {
  const at::Tensor g = g_in.to(at::kDouble).contiguous();
  const int64_t B = g.size(0), D = g.size(1);
  const double* gd = g.const_data_ptr<double>();
  at::Tensor p;
  const double* pd = nullptr;
  if (p_in) {
    p = p_in->to(at::kDouble).contiguous();
    pd = p.const_data_ptr<double>();
  }
  Ref r;
  r.mean_dir.assign(D, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    double gg = 0, pp = 0, gp = 0, same = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double a = gd[i * D + d];
      gg += a * a;
      if (pd) {
        const double b = pd[i * D + d];
        pp += b * b;
        gp += a * b;
        same += sgn(a) == sgn(b);
      }
    }
    const double n = std::sqrt(gg), pn = std::sqrt(pp);
    r.norm.push_back(n);
    r.cos.push_back(pd ? (n > 0 && pn > 0 ? gp / (n * pn) : 0.0) : NAN);
    r.sign.push_back(pd ? same / D : NAN);
    if (n > 0) {
      for (int64_t d = 0; d < D; ++d) r.mean_dir[d] += gd[i * D + d] / n / B;
    }
  }
  return r;
}

bool close_vec(const at::Tensor& got, const std::vector<double>& want, double tol) {
  const at::Tensor t = got.to(at::kDouble).contiguous();
  if (t.numel() != static_cast<int64_t>(want.size())) return false;
  const double* v = t.const_data_ptr<double>();
  for (size_t k = 0; k < want.size(); ++k) {
    if (std::isnan(want[k]) != std::isnan(v[k])) return false;
    if (!std::isnan(want[k]) && std::abs(v[k] - want[k]) > tol * (1.0 + std::abs(want[k]))) {
      return false;
    }
  }
  return true;
}

void check_case(const std::string& name, const at::Tensor& g, const std::optional<at::Tensor>& p,
                double tol) {
  const auto [norm, cos, sign, mean_dir] = call_op(g, p);
  const Ref r = reference(g, p ? &*p : nullptr);
  const auto want_dtype = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check(norm.scalar_type() == want_dtype && mean_dir.scalar_type() == want_dtype,
        name + ": output dtype");
  check(close_vec(norm, r.norm, tol), name + ": norm");
  check(close_vec(cos, r.cos, tol), name + ": cos");
  check(close_vec(sign, r.sign, 1e-7), name + ": sign_agree");
  check(close_vec(mean_dir, r.mean_dir, tol), name + ": mean_dir");
}

void expect_error(const std::string& name, const std::function<void()>& fn,
                  const std::string& needle) {
  try {
    fn();
    check(false, name + ": no error raised");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos, name + ": message lacks '" + needle + "': " + msg);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  {
    const at::Tensor g = at::randn({37, 1001});
    const at::Tensor p = 0.6 * g + 0.4 * at::randn({37, 1001});
    check_case("float32", g, p, 1e-5);
    check_case("float32 first step", g, std::nullopt, 1e-5);
  }
  {
    const at::Tensor g = at::randn({9, 5003}, at::kDouble);
    const at::Tensor p = at::randn({9, 5003}, at::kDouble);
    check_case("float64", g, p, 1e-12);
  }
  {
    const at::Tensor g = at::randn({20, 300}).to(at::kHalf);
    const at::Tensor p = at::randn({20, 300}).to(at::kHalf);
    check_case("float16", g, p, 1e-5);
  }
  {
    at::Tensor g = at::randn({8, 64});
    at::Tensor p = at::randn({8, 64});
    g[2].zero_();
    p[5].zero_();
    g[6].zero_();
    p[6].zero_();
    g.select(1, 3).zero_();
    p.select(1, 3).zero_();
    check_case("zero rows and elements", g, p, 1e-5);
    const auto [norm, cos, sign, mean_dir] = call_op(g, p);
    check(cos[2].item<float>() == 0.f && cos[5].item<float>() == 0.f, "zero rows: cos is 0");
    check(sign[6].item<float>() == 1.f, "zero rows: 0 agrees with 0");
  }
  {
    const at::Tensor wide = at::randn({50, 130});
    const at::Tensor g = wide.slice(1, 3, 120);        // row stride > D
    const at::Tensor p = at::randn({117, 50}).t();     // column stride > 1
    check_case("non-contiguous", g, p, 1e-5);
  }

  const at::Tensor g = at::randn({4, 5});
  expect_error("integer g", [] { call_op(at::ones({4, 5}, at::kLong), std::nullopt); },
               "floating-point");
  expect_error("3-D g", [] { call_op(at::ones({4, 5, 2}), std::nullopt); }, "2-D");
  expect_error("empty g", [] { call_op(at::ones({0, 5}), std::nullopt); }, "at least one");
  expect_error("other batch size", [&] { call_op(g, at::ones({8, 5})); }, "another batch");
  expect_error("other width", [&] { call_op(g, at::ones({4, 6})); }, "shape");
  expect_error("other dtype", [&] { call_op(g, at::ones({4, 5}, at::kDouble)); }, "dtype");
  // The CPU kernel itself must refuse a tensor on another device (the dispatcher would route a
  // CUDA g_prev to the CUDA kernel, which runs the same check).
  expect_error("other device",
               [&] { aerl_fast::grad_stats_cpu(g, at::empty({4, 5}, at::device(at::kMeta))); },
               "same device");

  std::printf("grad_stats_cpp: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
