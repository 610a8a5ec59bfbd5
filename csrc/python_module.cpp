// The Python module aerl_fast._C. Importing it runs the static registrations in ops.cpp
// (torch.ops.aerl_fast.grad_stats, torch.ops.aerl_fast.augment_gather); the functions here only
// describe the build.
#include <torch/extension.h>

#include "grad_stats.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "aerl_fast C++/CUDA kernels; the ops live in torch.ops.aerl_fast";
  module.def("cuda_compiled", &aerl_fast::cuda_compiled,
             "True when the CUDA kernel of torch.ops.aerl_fast.grad_stats was compiled in");
  module.def(
      "openmp_enabled",
      []() {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
      },
      "True when the CPU kernel was compiled with OpenMP (parallel over samples)");
}
