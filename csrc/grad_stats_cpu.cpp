// CPU kernel of aerl_fast::grad_stats: OpenMP over samples, one read of each row from memory.
//
// Each thread takes a contiguous block of samples. Per row, pass 1 reads g_i (and g_prev_i) from
// memory once and reduces ||g||^2, ||p||^2, <g, p> and the sign-agreement count; then, for groups
// of 8 rows still in L1/L2, one sweep adds g_i / ||g_i|| into the thread's own mean-direction
// buffer (double). Thread buffers are summed in a fixed order at the end, so a result depends
// only on the thread count (and, in the last bits, on the SIMD width of the CPU).
#include "grad_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// Function multiversioning: the wheel is built for baseline x86-64 (SSE2); the row kernels are
// also compiled for AVX2+FMA and AVX-512 and picked at load time (glibc ifunc), so the hot loop
// is wide without -march=native.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AERL_FAST_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AERL_FAST_MULTIVERSION
#endif

namespace aerl_fast {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace

at::ScalarType check_grad_stats_inputs(const at::Tensor& g, const std::optional<at::Tensor>& g_prev,
                                       c10::DeviceType kernel_device) {
  TORCH_CHECK(g.defined(), "aerl_fast::grad_stats: g is an undefined tensor");
  const at::ScalarType st = g.scalar_type();
  // Explicit list: at::isFloatingType also accepts float8 types, which have no kernel here.
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "aerl_fast::grad_stats: g must be a floating-point tensor "
              "(float16, bfloat16, float32 or float64), got ", g.scalar_type());
  TORCH_CHECK(g.dim() == 2,
              "aerl_fast::grad_stats: g must be 2-D [B, D] (one flattened gradient per sample; "
              "aerl_fast.analysis.grad_stats flattens [B, ...] for you), got shape ", shape_str(g));
  TORCH_CHECK(g.size(0) > 0 && g.size(1) > 0,
              "aerl_fast::grad_stats: g needs at least one sample and one element, got shape ",
              shape_str(g));
  TORCH_CHECK(g.device().type() == kernel_device,
              "aerl_fast::grad_stats: g is on ", g.device(), " but this kernel runs on ",
              kernel_device);
  if (g_prev.has_value() && g_prev->defined()) {
    const at::Tensor& p = *g_prev;
    TORCH_CHECK(p.device() == g.device(),
                "aerl_fast::grad_stats: g is on ", g.device(), " but g_prev is on ", p.device(),
                "; both must be on the same device");
    TORCH_CHECK(p.scalar_type() == g.scalar_type(),
                "aerl_fast::grad_stats: g_prev has dtype ", p.scalar_type(), " but g has ",
                g.scalar_type(), "; keep the previous step's gradient in the same dtype");
    TORCH_CHECK(p.dim() == 2 && p.size(0) == g.size(0) && p.size(1) == g.size(1),
                "aerl_fast::grad_stats: g_prev has shape ", shape_str(p), " but g has shape ",
                shape_str(g), "; g_prev must be the previous step's gradient of the same batch "
                "(a state from another batch? reset the tracker between batches)");
  }
  return g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// Block sums use the wider of float and the input type (so fp16/bf16/fp32 rows are reduced in
// 16-wide float vectors on AVX-512) over blocks of kBlock elements, and the blocks are added in
// double: error ~1e-7 relative for any row length, at float speed.
constexpr int64_t kBlock = 512;
// Rows handled together: their unit vectors are added into m in one sweep, which cuts the
// read-modify-write traffic on m (D doubles, often larger than L1) by this factor.
constexpr int kRowsPerSweep = 8;

template <typename T>
using block_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline block_t<T> load(const T* ptr, int64_t k) {
  return static_cast<block_t<T>>(ptr[k]);
}

struct RowOut {
  double norm;
  double cos;
  double sign_agree;
};

// Pass 1 over one row: ||g||^2, ||p||^2, <g, p> and the sign-agreement count, read once.
// sgn is in {-1, 0, +1} via compare-and-mask (vectorises; NaN compares false both ways and so
// counts as 0). The 32-bit count per block is exact.
template <typename T, bool kPrev>
inline RowOut row_stats(const T* __restrict g, const T* __restrict p, int64_t D) {
  using acc_t = block_t<T>;
  double gg = 0.0, pp = 0.0, gp = 0.0;
  int64_t n_same = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
    const int64_t d1 = std::min(D, d0 + kBlock);
    acc_t sgg = 0, spp = 0, sgp = 0;
    int32_t count = 0;
    if constexpr (kPrev) {
#pragma omp simd reduction(+ : sgg, spp, sgp, count)
      for (int64_t d = d0; d < d1; ++d) {
        const acc_t a = load(g, d);
        const acc_t b = load(p, d);
        sgg += a * a;
        spp += b * b;
        sgp += a * b;
        count += static_cast<int32_t>((a > acc_t(0)) == (b > acc_t(0))) &
                 static_cast<int32_t>((a < acc_t(0)) == (b < acc_t(0)));
      }
    } else {
#pragma omp simd reduction(+ : sgg)
      for (int64_t d = d0; d < d1; ++d) {
        const acc_t a = load(g, d);
        sgg += a * a;
      }
    }
    gg += sgg;
    pp += spp;
    gp += sgp;
    n_same += count;
  }
  RowOut out;
  out.norm = std::sqrt(gg);
  if constexpr (kPrev) {
    const double pn = std::sqrt(pp);
    if (out.norm > 0.0 && pn > 0.0) {
      const double c = gp / (out.norm * pn);
      out.cos = std::isnan(c) ? c : std::min(1.0, std::max(-1.0, c));
    } else {
      out.cos = 0.0;  // a zero gradient has no direction
    }
    out.sign_agree = static_cast<double>(n_same) / static_cast<double>(D);
  } else {
    out.cos = std::numeric_limits<double>::quiet_NaN();  // first step: no previous direction
    out.sign_agree = std::numeric_limits<double>::quiet_NaN();
  }
  return out;
}

// R rows: pass 1 on each, then one sweep m[k] += sum_r g_r[k] / ||g_r|| while the R rows are
// still in L1/L2. A zero row has unit vector 0 (inverse norm 0).
template <typename T, bool kPrev, int R>
inline void rows_body(const T* __restrict g, int64_t gs, const T* __restrict p, int64_t ps,
                      int64_t D, double* __restrict m, RowOut* __restrict out) {
  double inv[R];
  for (int r = 0; r < R; ++r) {
    out[r] = row_stats<T, kPrev>(g + r * gs, kPrev ? p + r * ps : nullptr, D);
    inv[r] = out[r].norm > 0.0 ? 1.0 / out[r].norm : 0.0;
  }
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) {
    double s = 0.0;
    for (int r = 0; r < R; ++r) s += static_cast<double>(load(g, r * gs + k)) * inv[r];
    m[k] += s;
  }
}

// Non-template entry points so that target_clones applies (it does not apply to templates).
#define AERL_FAST_ROWS_FN(NAME, T, PREV, R)                                                     \
  AERL_FAST_MULTIVERSION void NAME(const T* g, int64_t gs, const T* p, int64_t ps, int64_t D, \
                                   double* m, RowOut* out) {                                 \
    rows_body<T, PREV, R>(g, gs, p, ps, D, m, out);                                          \
  }
#define AERL_FAST_ROWS_FNS(SUFFIX, T)                                       \
  AERL_FAST_ROWS_FN(rows8_prev_##SUFFIX, T, true, kRowsPerSweep)            \
  AERL_FAST_ROWS_FN(rows8_first_##SUFFIX, T, false, kRowsPerSweep)          \
  AERL_FAST_ROWS_FN(rows1_prev_##SUFFIX, T, true, 1)                        \
  AERL_FAST_ROWS_FN(rows1_first_##SUFFIX, T, false, 1)                      \
  template <>                                                               \
  struct RowsFns<T> {                                                       \
    static constexpr auto block_prev = &rows8_prev_##SUFFIX;                \
    static constexpr auto block_first = &rows8_first_##SUFFIX;              \
    static constexpr auto single_prev = &rows1_prev_##SUFFIX;               \
    static constexpr auto single_first = &rows1_first_##SUFFIX;             \
  };

template <typename T>
struct RowsFns;
AERL_FAST_ROWS_FNS(f32, float)
AERL_FAST_ROWS_FNS(f64, double)
AERL_FAST_ROWS_FNS(f16, c10::Half)
AERL_FAST_ROWS_FNS(bf16, c10::BFloat16)
#undef AERL_FAST_ROWS_FNS
#undef AERL_FAST_ROWS_FN

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelElems = 1 << 15;

template <typename T, typename out_t>
void run_cpu(const at::Tensor& g, const at::Tensor* p, at::Tensor& norm, at::Tensor& cos,
             at::Tensor& sign, at::Tensor& mean_dir) {
  const int64_t B = g.size(0), D = g.size(1);
  const int64_t gs = g.stride(0);
  const int64_t ps = p ? p->stride(0) : 0;
  const T* gptr = g.const_data_ptr<T>();
  const T* pptr = p ? p->const_data_ptr<T>() : nullptr;
  out_t* norm_ptr = norm.data_ptr<out_t>();
  out_t* cos_ptr = cos.data_ptr<out_t>();
  out_t* sign_ptr = sign.data_ptr<out_t>();
  const auto block_fn = p ? RowsFns<T>::block_prev : RowsFns<T>::block_first;
  const auto single_fn = p ? RowsFns<T>::single_prev : RowsFns<T>::single_first;

  int nthreads = 1;
#ifdef _OPENMP
  if (B > 1 && B * D >= kMinParallelElems && !omp_in_parallel()) {
    nthreads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), B));
  }
#endif
  std::vector<double> partial(static_cast<size_t>(nthreads) * static_cast<size_t>(D), 0.0);
  double* partial_ptr = partial.data();

  auto rows = [&](int tid, int64_t begin, int64_t end) {
    double* m = partial_ptr + static_cast<int64_t>(tid) * D;
    RowOut out[kRowsPerSweep];
    for (int64_t i = begin; i < end;) {
      const T* gi = gptr + i * gs;
      const T* pi = pptr ? pptr + i * ps : nullptr;
      const int n = end - i >= kRowsPerSweep ? kRowsPerSweep : 1;
      (n == kRowsPerSweep ? block_fn : single_fn)(gi, gs, pi, ps, D, m, out);
      for (int r = 0; r < n; ++r, ++i) {
        norm_ptr[i] = static_cast<out_t>(out[r].norm);
        cos_ptr[i] = static_cast<out_t>(out[r].cos);
        sign_ptr[i] = static_cast<out_t>(out[r].sign_agree);
      }
    }
  };

  if (nthreads == 1) {
    rows(0, 0, B);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
    {
      // Contiguous, equal blocks of samples per thread (deterministic for a given thread count).
      const int tid = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      const int64_t chunk = (B + nt - 1) / nt;
      const int64_t begin = std::min<int64_t>(B, tid * chunk);
      const int64_t end = std::min<int64_t>(B, begin + chunk);
      rows(tid, begin, end);
    }
#endif
  }

  out_t* m_out = mean_dir.data_ptr<out_t>();
  const double inv_b = 1.0 / static_cast<double>(B);
  for (int64_t k = 0; k < D; ++k) {
    double s = 0.0;
    for (int t = 0; t < nthreads; ++t) s += partial_ptr[static_cast<int64_t>(t) * D + k];
    m_out[k] = static_cast<out_t>(s * inv_b);
  }
}

}  // namespace

GradStatsResult grad_stats_cpu(const at::Tensor& g_in, const std::optional<at::Tensor>& g_prev) {
  const at::ScalarType out_dtype = check_grad_stats_inputs(g_in, g_prev, c10::DeviceType::CPU);
  // Rows may be strided (e.g. a column slice); elements within a row must be contiguous.
  const at::Tensor g = g_in.stride(1) == 1 ? g_in : g_in.contiguous();
  at::Tensor p;
  const bool has_prev = g_prev.has_value() && g_prev->defined();
  if (has_prev) p = g_prev->stride(1) == 1 ? *g_prev : g_prev->contiguous();

  const int64_t B = g.size(0), D = g.size(1);
  const auto opts = g.options().dtype(out_dtype);
  at::Tensor norm = at::empty({B}, opts);
  at::Tensor cos = at::empty({B}, opts);
  at::Tensor sign = at::empty({B}, opts);
  at::Tensor mean_dir = at::empty({D}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_stats_cpu", [&] {
    if (out_dtype == at::kDouble) {
      run_cpu<scalar_t, double>(g, has_prev ? &p : nullptr, norm, cos, sign, mean_dir);
    } else {
      run_cpu<scalar_t, float>(g, has_prev ? &p : nullptr, norm, cos, sign, mean_dir);
    }
  });
  return {norm, cos, sign, mean_dir};
}

}  // namespace aerl_fast
