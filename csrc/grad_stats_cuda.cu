// CUDA kernel of aerl_fast::grad_stats.
//
// Kernel 1: one block per row reads g_i and g_prev_i once, reduces ||g||^2, ||p||^2, <g, p> and
//           the sign-agreement count (warp shuffles, then one shared-memory step), writes the
//           per-sample outputs and 1/||g_i||.
// Kernel 2: column sums of g_i / ||g_i|| over slices of rows into a [splits, D] buffer
//           (coalesced along D; g is usually still in L2 after kernel 1).
// Kernel 3: sums the slices in a fixed order and divides by B, so the result is deterministic
//           (no float atomics).
// Accumulation type: at::acc_type (fp32 for half/bfloat16/float, fp64 for double).
#include "grad_stats.h"

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace aerl_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kRowsPerSplit = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block; the result is valid in thread 0. `scratch` holds kWarps values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kWarps) ? scratch[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // scratch is reused by the next call
  return v;
}

// sgn in {-1, 0, +1}; NaN counts as 0 (both comparisons are false), as on the CPU.
template <typename acc_t>
__device__ __forceinline__ int sgn(acc_t x) {
  return static_cast<int>(x > acc_t(0)) - static_cast<int>(x < acc_t(0));
}

template <typename scalar_t, typename acc_t, bool kPrev>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ g, int64_t g_stride,
                     const scalar_t* __restrict__ p, int64_t p_stride, int64_t D,
                     acc_t* __restrict__ norm, acc_t* __restrict__ cos,
                     acc_t* __restrict__ sign_agree, acc_t* __restrict__ inv_norm) {
  __shared__ acc_t scratch[kWarps];
  __shared__ long long scratch_count[kWarps];
  const int64_t row = blockIdx.x;
  const scalar_t* gr = g + row * g_stride;
  acc_t gg = 0, pp = 0, gp = 0;
  long long same = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t a = static_cast<acc_t>(gr[d]);
    gg += a * a;
    if constexpr (kPrev) {
      const acc_t b = static_cast<acc_t>(p[row * p_stride + d]);
      pp += b * b;
      gp += a * b;
      same += static_cast<long long>(sgn(a) == sgn(b));
    }
  }
  gg = block_sum(gg, scratch);
  if constexpr (kPrev) {
    pp = block_sum(pp, scratch);
    gp = block_sum(gp, scratch);
    same = block_sum(same, scratch_count);
  }
  if (threadIdx.x == 0) {
    const acc_t n = ::sqrt(gg);
    norm[row] = n;
    inv_norm[row] = n > acc_t(0) ? acc_t(1) / n : acc_t(0);
    if constexpr (kPrev) {
      const acc_t pn = ::sqrt(pp);
      acc_t c = acc_t(0);
      if (n > acc_t(0) && pn > acc_t(0)) {
        c = gp / (n * pn);
        c = c > acc_t(1) ? acc_t(1) : (c < acc_t(-1) ? acc_t(-1) : c);  // NaN stays NaN
      }
      cos[row] = c;
      sign_agree[row] = static_cast<acc_t>(same) / static_cast<acc_t>(D);
    } else {
      cos[row] = static_cast<acc_t>(NAN);
      sign_agree[row] = static_cast<acc_t>(NAN);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mean_dir_partial_kernel(const scalar_t* __restrict__ g, int64_t g_stride, int64_t B,
                            int64_t D, const acc_t* __restrict__ inv_norm,
                            acc_t* __restrict__ partial) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= D) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kRowsPerSplit;
  const int64_t end = begin + kRowsPerSplit < B ? begin + kRowsPerSplit : B;
  acc_t s = 0;
  for (int64_t i = begin; i < end; ++i) {
    s += static_cast<acc_t>(g[i * g_stride + d]) * inv_norm[i];
  }
  partial[static_cast<int64_t>(blockIdx.y) * D + d] = s;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mean_dir_final_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t B, int64_t D,
                          acc_t* __restrict__ mean_dir) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= D) return;
  acc_t s = 0;
  for (int64_t k = 0; k < splits; ++k) s += partial[k * D + d];
  mean_dir[d] = s / static_cast<acc_t>(B);
}

}  // namespace

GradStatsResult grad_stats_cuda(const at::Tensor& g_in, const std::optional<at::Tensor>& g_prev) {
  const at::ScalarType out_dtype = check_grad_stats_inputs(g_in, g_prev, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(g_in.device());
  const at::Tensor g = g_in.stride(1) == 1 ? g_in : g_in.contiguous();
  const bool has_prev = g_prev.has_value() && g_prev->defined();
  at::Tensor p;
  if (has_prev) p = g_prev->stride(1) == 1 ? *g_prev : g_prev->contiguous();

  const int64_t B = g.size(0), D = g.size(1);
  TORCH_CHECK(B <= 0x7fffffffLL, "aerl_fast::grad_stats: batch of ", B, " rows is too large");
  const auto opts = g.options().dtype(out_dtype);
  at::Tensor norm = at::empty({B}, opts);
  at::Tensor cos = at::empty({B}, opts);
  at::Tensor sign = at::empty({B}, opts);
  at::Tensor mean_dir = at::empty({D}, opts);
  at::Tensor inv_norm = at::empty({B}, opts);
  const int64_t splits = (B + kRowsPerSplit - 1) / kRowsPerSplit;
  TORCH_CHECK(splits <= 65535, "aerl_fast::grad_stats: batch of ", B, " rows is too large");
  at::Tensor partial = at::empty({splits, D}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 col_grid(static_cast<unsigned>((D + kThreads - 1) / kThreads));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    TORCH_CHECK(c10::CppTypeToScalarType<acc_t>::value == out_dtype,
                "aerl_fast::grad_stats: internal accumulation type mismatch");
    const scalar_t* gptr = g.const_data_ptr<scalar_t>();
    if (has_prev) {
      row_stats_kernel<scalar_t, acc_t, true><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          gptr, g.stride(0), p.const_data_ptr<scalar_t>(), p.stride(0), D,
          norm.mutable_data_ptr<acc_t>(), cos.mutable_data_ptr<acc_t>(),
          sign.mutable_data_ptr<acc_t>(), inv_norm.mutable_data_ptr<acc_t>());
    } else {
      row_stats_kernel<scalar_t, acc_t, false><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          gptr, g.stride(0), nullptr, 0, D, norm.mutable_data_ptr<acc_t>(),
          cos.mutable_data_ptr<acc_t>(), sign.mutable_data_ptr<acc_t>(),
          inv_norm.mutable_data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 partial_grid(col_grid.x, static_cast<unsigned>(splits));
    mean_dir_partial_kernel<scalar_t, acc_t><<<partial_grid, kThreads, 0, stream>>>(
        gptr, g.stride(0), B, D, inv_norm.const_data_ptr<acc_t>(),
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_dir_final_kernel<acc_t><<<col_grid, kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), splits, B, D, mean_dir.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {norm, cos, sign, mean_dir};
}

}  // namespace aerl_fast
