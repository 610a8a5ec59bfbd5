// The training loader's fused augmentation (index_select + flips + translation with zero fill +
// uint8 -> float / 255 in one pass); see augment_cpu.cpp for the exact definition.
#pragma once

#include <ATen/core/Tensor.h>

namespace aerl_fast {

at::Tensor augment_gather_cpu(const at::Tensor& images, const at::Tensor& index, const at::Tensor& shift_y,
                              const at::Tensor& shift_x, const at::Tensor& vflip, const at::Tensor& hflip);

}  // namespace aerl_fast
