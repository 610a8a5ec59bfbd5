// Per-sample input-gradient statistics in one pass: shared declarations of aerl_fast._C.
//
// grad_stats(g [B, D], g_prev [B, D] or None) -> (norm [B], cos [B], sign_agree [B], mean_dir [D])
//
// Conventions (the Python fallback in aerl_fast/analysis/gradient_stats.py follows the same ones):
//   norm_i       = ||g_i||_2.
//   cos_i        = <g_i, p_i> / (||g_i|| ||p_i||), clamped to [-1, 1]; 0 when either norm is 0;
//                  NaN on the first step (g_prev None): there is no previous direction.
//   sign_agree_i = (1/D) #{d : sgn(g_id) == sgn(p_id)} with sgn in {-1, 0, +1}, so an exact zero
//                  agrees only with an exact zero (NaN counts as 0); NaN on the first step.
//   u_i          = g_i / ||g_i||, and 0 for a zero row;  mean_dir = (1/B) sum_i u_i.
//                  Within-batch dispersion = 1 - ||mean_dir|| (a zero row has no direction and
//                  pulls ||mean_dir|| down).
// Accumulation: on CPU, blocks of 512 elements in float (double for double input) added in
// double; on CUDA, at::acc_type (fp32, fp64 for double input). Outputs are float32, or float64
// when g is float64.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace aerl_fast {

using GradStatsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates shapes, dtypes and devices with TORCH_CHECK (never crashes on bad input) and returns
// the output dtype. `kernel_device` is the device type the calling kernel can handle.
at::ScalarType check_grad_stats_inputs(const at::Tensor& g, const std::optional<at::Tensor>& g_prev,
                                       c10::DeviceType kernel_device);

GradStatsResult grad_stats_cpu(const at::Tensor& g, const std::optional<at::Tensor>& g_prev);

#ifdef AERL_FAST_WITH_CUDA
GradStatsResult grad_stats_cuda(const at::Tensor& g, const std::optional<at::Tensor>& g_prev);
#endif

// True when this build registered the CUDA kernel.
bool cuda_compiled();

}  // namespace aerl_fast
