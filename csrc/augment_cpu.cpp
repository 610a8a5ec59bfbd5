// CPU kernel of aerl_fast::augment_gather: the training loader's batch in one pass.
//
// augment_gather(images uint8 [N, C, H, W], index int64 [B], shift_y int64 [B], shift_x int64 [B],
//                vflip bool [B], hflip bool [B]) -> float32 [B, C, H, W] in [0, 1]
//
//   out[b, c, r, q] = images[index[b], c, sr, sq] / 255   (0 where (sr, sq) falls outside)
//   sr = vflip[b] ? H - 1 - r + shift_y[b] : r - shift_y[b]      (likewise sq with W, shift_x)
//
// i.e. the sample flipped, then moved by (shift_y, shift_x) pixels with zero fill: what
// aerl_fast.data.loader.augment_batch computes with index_select, zero padding, one gather and a
// float conversion (four passes over the batch), and bit for bit the same values (the division is
// the same IEEE float division). Parallel over (sample, channel) planes.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "augment.h"

namespace aerl_fast {

namespace {

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t batch) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "aerl_fast::augment_gather: ", name,
              " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "aerl_fast::augment_gather: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "aerl_fast::augment_gather: ", name,
              " must have shape [", batch, "], got ", t.sizes());
}

// one output row: dst[q] = src[sq] / 255 for sq = q - tx (or W - 1 - q + tx when flipped), 0 outside.
// Both maps keep sq in [0, W) exactly for q in [max(0, tx), min(W, W + tx)): zero fill around one
// branch-free loop the compiler vectorises.
inline void row(const uint8_t* src, float* dst, int64_t W, int64_t tx, bool flip, uint8_t* scratch) {
  const int64_t lo = std::min<int64_t>(W, std::max<int64_t>(0, tx));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(W, W + tx));
  std::fill(dst, dst + lo, 0.0f);
  const uint8_t* s = src - tx;  // dst[q] = s[q]
  if (flip) {  // dst[q] = src[W - 1 - q + tx]: reverse the row once (a byte shuffle), then read forward
    std::reverse_copy(src, src + W, scratch);
    s = scratch - tx;
  }
  for (int64_t q = lo; q < hi; ++q) dst[q] = static_cast<float>(s[q]) / 255.0f;  // vectorised
  std::fill(dst + hi, dst + W, 0.0f);
}

}  // namespace

at::Tensor augment_gather_cpu(const at::Tensor& images, const at::Tensor& index, const at::Tensor& shift_y,
                              const at::Tensor& shift_x, const at::Tensor& vflip, const at::Tensor& hflip) {
  TORCH_CHECK(images.defined() && images.device().is_cpu(),
              "aerl_fast::augment_gather: images must be a CPU tensor");
  TORCH_CHECK(images.scalar_type() == at::kByte, "aerl_fast::augment_gather: images must be uint8, got ",
              images.scalar_type());
  TORCH_CHECK(images.dim() == 4, "aerl_fast::augment_gather: images must be [N, C, H, W], got ",
              images.sizes());
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK(index.defined() && index.dim() == 1, "aerl_fast::augment_gather: index must be a 1-D tensor");
  const int64_t B = index.size(0);
  check_vector(index, "index", at::kLong, B);
  check_vector(shift_y, "shift_y", at::kLong, B);
  check_vector(shift_x, "shift_x", at::kLong, B);
  check_vector(vflip, "vflip", at::kBool, B);
  check_vector(hflip, "hflip", at::kBool, B);

  const at::Tensor img = images.contiguous();
  const at::Tensor idx = index.contiguous(), ty = shift_y.contiguous(), tx = shift_x.contiguous();
  const at::Tensor vf = vflip.contiguous(), hf = hflip.contiguous();
  const int64_t* pi = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pi[b] >= 0 && pi[b] < N, "aerl_fast::augment_gather: index[", b, "] = ", pi[b],
                " is out of range for ", N, " images");
  }
  at::Tensor out = at::empty({B, C, H, W}, images.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return out;
  }
  const uint8_t* src = img.data_ptr<uint8_t>();
  const int64_t* py = ty.data_ptr<int64_t>();
  const int64_t* px = tx.data_ptr<int64_t>();
  const bool* pv = vf.data_ptr<bool>();
  const bool* ph = hf.data_ptr<bool>();
  float* dst = out.data_ptr<float>();
  const int64_t plane = H * W;

  at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const uint8_t* s = src + (pi[b] * C + c) * plane;
      std::vector<uint8_t> scratch(static_cast<size_t>(W));
      float* d = dst + bc * plane;
      for (int64_t r = 0; r < H; ++r) {
        const int64_t sr = pv[b] ? H - 1 - r + py[b] : r - py[b];
        if (sr < 0 || sr >= H) {
          std::fill(d + r * W, d + (r + 1) * W, 0.0f);
        } else {
          row(s + sr * W, d + r * W, W, px[b], ph[b], scratch.data());
        }
      }
    }
  });
  return out;
}

}  // namespace aerl_fast
