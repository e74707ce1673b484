// Rank histogram of one similarity tile for the CPU path of retrieval_metrics (metricloss/ops/native.py
// builds and loads it, in the same extension as triplet_epilogue.cpp).
//
// One pass per query row over its (G,) fp32 similarity row while the row is in cache: the left-out own
// column is skipped; every item scored at least as high as the row's lowest relevant item gets the rank
// key of the torch path (metricloss/metrics.py::_rank_keys),
//     (row << (32 + b)) | (order-preserving fp32 bits << b) | (G - 1 - col),
// and is placed among the row's ascending relevant keys by a lower-bound binary search (the semantics of
// torch.searchsorted, side "left"), which increments hist[row, position]. No (n, G) temporary, no
// candidate list. The keys and positions are exact integers, so the histogram is bitwise the torch
// path's. Rows are independent, so they are split across threads (at::parallel_for, OpenMP).

#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// _order_bits: int64 in [0, 2**32) ordering fp32 values like the floats, -0.0 and +0.0 equal.
inline int64_t order_bits(float v) {
  v = v + 0.0f;  // -0.0 + 0.0 = +0.0 (IEEE; the build does not use -ffast-math)
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits ^= (bits >> 31) & 0x7FFFFFFF;  // negative floats: flip the magnitude bits
  return static_cast<int64_t>(bits) + (int64_t(1) << 31);
}

void rank_rows(const float* tile, const int64_t* rel, const float* lowest, int64_t own_start, int64_t n,
               int64_t g, int64_t width, int64_t index_bits, int64_t* hist) {
  const int64_t row_shift = 32 + index_bits;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = tile + i * g;
      const int64_t* keys = rel + i * width;  // the row's relevant keys, ascending
      int64_t* bins = hist + i * (width + 1);
      const float low = lowest[i];
      const int64_t row_key = i << row_shift;
      const int64_t own = own_start >= 0 ? own_start + i : -1;
      for (int64_t j = 0; j < g; ++j) {
        const float v = row[j];
        if (!(v >= low) || j == own) continue;  // NaN >= x is false, as in the torch path
        const int64_t key = row_key | (order_bits(v) << index_bits) | (g - 1 - j);
        ++bins[std::lower_bound(keys, keys + width, key) - keys];
      }
    }
  });
}

at::Tensor retrieval_rank_histogram(const at::Tensor& tile, const at::Tensor& rel, const at::Tensor& lowest,
                                    int64_t own_start, int64_t index_bits) {
  TORCH_CHECK(tile.device().is_cpu() && tile.dim() == 2 && tile.is_contiguous() &&
                  tile.scalar_type() == at::kFloat,
              "retrieval_rank_histogram: tile must be a contiguous 2-D float32 CPU tensor");
  const int64_t n = tile.size(0), g = tile.size(1);
  TORCH_CHECK(rel.dim() == 2 && rel.size(0) == n && rel.is_contiguous() && rel.scalar_type() == at::kLong,
              "retrieval_rank_histogram: rel must be a contiguous (n, W) int64 tensor");
  TORCH_CHECK(lowest.numel() == n && lowest.is_contiguous() && lowest.scalar_type() == at::kFloat,
              "retrieval_rank_histogram: lowest must be a contiguous (n,) float32 tensor");
  TORCH_CHECK(index_bits >= 1 && (g - 1) < (int64_t(1) << index_bits) &&
                  (n == 0 || 32 + index_bits + (64 - __builtin_clzll(static_cast<uint64_t>(n))) <= 63),
              "retrieval_rank_histogram: the keys of this tile do not fit in int64");
  TORCH_CHECK(own_start < 0 || own_start + n <= g, "retrieval_rank_histogram: own columns out of range");
  const int64_t width = rel.size(1);
  auto hist = at::zeros({n, width + 1}, tile.options().dtype(at::kLong));
  rank_rows(tile.data_ptr<float>(), rel.data_ptr<int64_t>(), lowest.data_ptr<float>(), own_start, n, g, width,
            index_bits, hist.data_ptr<int64_t>());
  return hist;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metricloss_native, m) {
  m.def("retrieval_rank_histogram(Tensor tile, Tensor rel, Tensor lowest, int own_start, int index_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(metricloss_native, CPU, m) {
  m.impl("retrieval_rank_histogram", &retrieval_rank_histogram);
}
