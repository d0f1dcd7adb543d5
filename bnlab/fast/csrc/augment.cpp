// The CPU batch maker of the in-memory loader: gather images by index, zero-pad, crop at an
// offset, flip, and normalize uint8 -> float32 in one pass, written channels_last.
//
//   out[b, c, i, j] = float(p[c, off_r + i, col_j]) * scale[c] + shift[c]
//   p = src[idx[b]] zero-padded by `pad` on each side; col_j = off_c + (flip ? W-1-j : j)
//
// The multiply and the add round separately (compiled with -ffp-contract=off), as torch's
// x.float().mul_(scale).add_(shift) does, so both paths give the same floats.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: a quarter of the first build
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

at::Tensor crop_flip_normalize(const at::Tensor& src, const at::Tensor& idx,
                               const std::optional<at::Tensor>& offsets,
                               const std::optional<at::Tensor>& flips, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t pad) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kByte && src.dim() == 4 &&
                  src.is_contiguous(),
              "crop_flip_normalize: src must be a contiguous uint8 (N, C, H, W) CPU tensor");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
              "crop_flip_normalize: idx must be a contiguous int64 vector");
  const int64_t n = idx.size(0), c = src.size(1), h = src.size(2), w = src.size(3);
  const int64_t total = src.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == c && scale.is_contiguous() &&
                  shift.scalar_type() == at::kFloat && shift.numel() == c &&
                  shift.is_contiguous(),
              "crop_flip_normalize: scale and shift must be float32 with one value per channel");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK(ip[b] >= 0 && ip[b] < total, "crop_flip_normalize: index ", ip[b],
                " out of range for ", total, " images");
  }
  const int64_t* op = nullptr;
  const bool* fp = nullptr;
  if (offsets) {
    TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->is_contiguous() &&
                    offsets->dim() == 2 && offsets->size(0) == n && offsets->size(1) == 2,
                "crop_flip_normalize: offsets must be a contiguous int64 (n, 2) tensor");
    TORCH_CHECK(flips && flips->scalar_type() == at::kBool && flips->is_contiguous() &&
                    flips->numel() == n,
                "crop_flip_normalize: flips must be a contiguous bool vector of n values");
    op = offsets->data_ptr<int64_t>();
    fp = flips->data_ptr<bool>();
    const int64_t* o = op;
    for (int64_t k = 0; k < 2 * n; ++k) {
      TORCH_CHECK(o[k] >= 0 && o[k] <= 2 * pad, "crop_flip_normalize: offset ", o[k],
                  " outside [0, ", 2 * pad, "]");
    }
  }
  at::Tensor out = at::empty({n, c, h, w}, src.options().dtype(at::kFloat),
                             at::MemoryFormat::ChannelsLast);
  const uint8_t* sp = src.data_ptr<uint8_t>();
  const float* sc = scale.data_ptr<float>();
  const float* sh = shift.data_ptr<float>();
  float* dp = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* img = sp + ip[b] * c * h * w;
      const int64_t r0 = op ? op[2 * b] - pad : 0, c0 = op ? op[2 * b + 1] - pad : 0;
      const bool flip = fp ? fp[b] : false;
      float* o = dp + b * h * w * c;  // (h, w, c) block of image b
      for (int64_t i = 0; i < h; ++i) {
        const int64_t r = r0 + i;
        const bool row_in = r >= 0 && r < h;
        for (int64_t j = 0; j < w; ++j) {
          const int64_t col = c0 + (flip ? w - 1 - j : j);
          const bool in = row_in && col >= 0 && col < w;
          for (int64_t k = 0; k < c; ++k) {
            const float u = in ? float(img[(k * h + r) * w + col]) : 0.f;
            const float v = u * sc[k];
            o[(i * w + j) * c + k] = v + sh[k];
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnlab_cpu, m) {
  m.def("crop_flip_normalize(Tensor src, Tensor idx, Tensor? offsets, Tensor? flips, "
        "Tensor scale, Tensor shift, int pad) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab_cpu, CPU, m) { m.impl("crop_flip_normalize", crop_flip_normalize); }
