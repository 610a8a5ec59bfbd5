// Operator registration: torch.ops.aerl_fast.grad_stats and torch.ops.aerl_fast.augment_gather,
// visible to the dispatcher and so to torch.compile. Python-free, so that the CMake build links it
// into plain libtorch programs. grad_stats' fake (meta) kernel is registered from Python
// (aerl_fast/analysis/gradient_stats.py), which is what torch.compile and torch.library.opcheck need
// for shape propagation; augment_gather is the CPU loader's eager batch and has none.
#include <torch/library.h>

#include "augment.h"
#include "grad_stats.h"

namespace aerl_fast {

bool cuda_compiled() {
#ifdef AERL_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace aerl_fast

TORCH_LIBRARY(aerl_fast, m) {
  m.set_python_module("aerl_fast.analysis.gradient_stats");
  m.def(
      "grad_stats(Tensor g, Tensor? g_prev) -> "
      "(Tensor norm, Tensor cos, Tensor sign_agree, Tensor mean_dir)");
  m.def(
      "augment_gather(Tensor images, Tensor index, Tensor shift_y, Tensor shift_x, Tensor vflip, "
      "Tensor hflip) -> Tensor");
}

TORCH_LIBRARY_IMPL(aerl_fast, CPU, m) {
  m.impl("grad_stats", &aerl_fast::grad_stats_cpu);
  m.impl("augment_gather", &aerl_fast::augment_gather_cpu);
}

#ifdef AERL_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(aerl_fast, CUDA, m) {
  m.impl("grad_stats", &aerl_fast::grad_stats_cuda);
}
#endif
