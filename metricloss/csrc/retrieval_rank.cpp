// Rank histogram of one similarity tile for the CPU path of retrieval_metrics (metricloss/ops/native.py
// builds and loads it, in the same extension as triplet_epilogue.cpp).
//
// Per query row of the fp32 tile, the output is hist[row, p] = #{counted items whose rank key has exactly
// p of the row's relevant keys below it}, where the counted items are those scored at least as high as
// the row's lowest relevant item (the left-out own column excluded) and the key is the torch path's
// (metricloss/metrics.py::_rank_keys),
//     (row << (32 + b)) | (order-preserving fp32 bits << b) | (G - 1 - col),
// so p is torch.searchsorted's (side "left") position among the row's ascending relevant keys. Integer
// counts: bitwise the torch path's histogram.
//
// How, in about one streaming pass per row: the order bits of the items above the lowest relevant one
// are split into T equal buckets (T a power of two near G / 16); a bucket that holds no relevant key
// lies wholly between two consecutive relevant keys, so each of its items has the same p, known from a
// prefix count. The pass (vectorised: no branch on the data) computes each item's bucket, and counts it
// per bucket; only items in the few buckets that hold a relevant key are placed exactly, by their keys.
// Rows are independent, so they are split across threads (at::parallel_for, OpenMP).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Named heuristics: buckets per row (a power of two near G / 16, within these bounds: more buckets put
// fewer items into the buckets that need exact placement, but cost a per-row fill and sum), columns per
// vectorised chunk, and interleaved count tables (consecutive items often fall into one bucket; separate
// tables keep their increments from waiting on each other).
// After a chunk with fewer than one item in kSparse above the row's lowest relevant one, the next chunk is
// counted with a branch per item (rarely taken, so well predicted), after a denser one without branches.
constexpr int64_t kMinBuckets = 256, kMaxBuckets = 16384, kChunk = 2048, kLanes = 4, kSparse = 8;

int64_t bucket_count(int64_t g) {
  int64_t t = kMinBuckets;
  while (t < kMaxBuckets && t * 16 < g) t *= 2;
  return t;
}

// The order bits as uint32 (the same value as order_bits, which is < 2**32).
inline uint32_t order_bits32(float v) {
  v = v + 0.0f;
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits ^= (bits >> 31) & 0x7FFFFFFF;
  return static_cast<uint32_t>(bits) ^ 0x80000000u;  // + 2**31 modulo 2**32
}

// Bucket of each item of a chunk: min((bits - low_bits) >> shift, T) for items >= low (T: above every
// relevant key), `skip` for the others (NaN >= x is false, as in the torch path). No branches, so the
// compiler vectorises it. Returns the number of items >= low.
int64_t bucket_chunk(const float* __restrict values, int64_t len, float low, uint32_t low_bits, int shift,
                     uint32_t top, uint32_t skip, uint32_t* __restrict out) {
  uint32_t kept = 0;
  for (int64_t t = 0; t < len; ++t) {
    const float x = values[t];
    uint32_t b = (order_bits32(x) - low_bits) >> shift;
    b = b < top ? b : top;
    const uint32_t keep = 0u - static_cast<uint32_t>(x >= low);
    out[t] = (b & keep) | (skip & ~keep);
    kept -= keep;  // keep is 0 or 0xFFFFFFFF (-1)
  }
  return kept;
}

void rank_rows(const float* tile, const int64_t* rel, const float* lowest, int64_t own_start, int64_t n,
               int64_t g, int64_t width, int64_t index_bits, int64_t* hist) {
  const int64_t row_shift = 32 + index_bits;
  const int64_t n_buckets = bucket_count(g);
  const int64_t skip = n_buckets + 1, stride = n_buckets + 2;  // bucket T + 1: not counted
  std::atomic<bool> bad_operands{false};
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> counts(kLanes * stride), start(n_buckets + 2), exact(g);
    std::vector<uint8_t> mixed(stride);
    std::vector<uint32_t> chunk_buckets(kChunk);
    for (int64_t i = begin; i < end; ++i) {
      const float* row = tile + i * g;
      const int64_t* keys = rel + i * width;  // the row's relevant keys, ascending, padding first
      int64_t* bins = hist + i * (width + 1);
      const float low = lowest[i];
      const int64_t row_key = i << row_shift;
      const int64_t own = own_start >= 0 ? own_start + i : -1;
      auto key_of = [&](int64_t j) {
        return row_key | (static_cast<int64_t>(order_bits32(row[j])) << index_bits) | (g - 1 - j);
      };
      if (!(low >= low)) continue;  // a NaN relevant similarity: nothing is >= it
      int64_t padding = 0;
      while (padding < width && keys[padding] == row_key) ++padding;
      if (padding == width) {  // a lone query (lowest +inf): every counted item is above the padding
        int64_t c = 0;
        for (int64_t j = 0; j < g; ++j) c += (row[j] >= low) & (j != own);
        bins[width] += c;
        continue;
      }
      // buckets: order bits low_bits + [b << shift, (b + 1) << shift), b < T, cover every relevant key
      const uint32_t low_bits = order_bits32(low);
      auto key_bits = [&](int64_t r) { return static_cast<uint32_t>((keys[r] >> index_bits) & 0xFFFFFFFFLL); };
      uint32_t lo_key = 0xFFFFFFFFu, hi_key = 0;
      for (int64_t r = padding; r < width; ++r) {
        lo_key = std::min(lo_key, key_bits(r));
        hi_key = std::max(hi_key, key_bits(r));
      }
      if (lo_key < low_bits) {  // `lowest` above a relevant key: not this tile's operands
        bad_operands = true;
        continue;
      }
      const uint32_t span = hi_key - low_bits;
      int shift = 0;
      while ((static_cast<uint64_t>(span) >> shift) >= static_cast<uint64_t>(n_buckets)) ++shift;
      std::fill(counts.begin(), counts.end(), 0);
      std::fill(start.begin(), start.end(), 0);
      std::fill(mixed.begin(), mixed.end(), 0);
      for (int64_t r = padding; r < width; ++r) {
        const int64_t b = (key_bits(r) - low_bits) >> shift;
        mixed[b] = 1;
        ++start[b + 1];
      }
      // start[b] = #{relevant keys below bucket b} (start[T] = W: bucket T is above every key)
      start[0] = static_cast<int32_t>(padding);
      for (int64_t b = 1; b <= n_buckets; ++b) start[b] += start[b - 1];
      // 1. every item's bucket, counted; the items of buckets that hold a key listed for step 2
      int64_t n_exact = 0;
      bool sparse = true;  // the previous chunk had few items >= low: the next one likely too
      for (int64_t c0 = 0; c0 < g; c0 += kChunk) {
        const int64_t len = std::min(kChunk, g - c0);
        int64_t kept = 0;
        if (sparse) {  // a rarely taken branch per item, well predicted, and no pass for the skipped items
          const float* values = row + c0;
          for (int64_t t = 0; t < len; ++t) {
            const float x = values[t];
            if (!(x >= low)) continue;
            ++kept;
            uint32_t b = (order_bits32(x) - low_bits) >> shift;
            b = b < static_cast<uint32_t>(n_buckets) ? b : static_cast<uint32_t>(n_buckets);
            ++counts[b];
            if (mixed[b]) exact[n_exact++] = static_cast<int32_t>(c0 + t);
          }
        } else {  // many, unpredictable: the buckets by a vectorised pass, then counted without branches
          kept = bucket_chunk(row + c0, len, low, low_bits, shift, static_cast<uint32_t>(n_buckets),
                              static_cast<uint32_t>(skip), chunk_buckets.data());
          for (int64_t t = 0; t < len; ++t) {
            const uint32_t b = chunk_buckets[t];
            ++counts[(t & (kLanes - 1)) * stride + b];
            exact[n_exact] = static_cast<int32_t>(c0 + t);
            n_exact += mixed[b];
          }
        }
        sparse = kept * kSparse < len;
      }
      // 2. those placed by their keys among the bucket's keys (binary search); the left-out own column skipped
      for (int64_t q = 0; q < n_exact; ++q) {
        const int64_t j = exact[q];
        if (j == own) continue;
        const int64_t key = key_of(j);
        const int64_t b = (order_bits32(row[j]) - low_bits) >> shift;
        // binary search among the bucket's keys: a bucket may hold many (tied similarities put every
        // relevant key of the row into one bucket), and a linear scan made ties cost O(G·W) per row
        ++bins[std::lower_bound(keys + start[b], keys + start[b + 1], key) - keys];
      }
      // 3. every other bucket's items at the bucket's position
      for (int64_t b = 0; b <= n_buckets; ++b) {
        if (mixed[b]) continue;
        int64_t total = 0;
        for (int64_t l = 0; l < kLanes; ++l) total += counts[l * stride + b];
        bins[start[b]] += total;
      }
      if (own >= 0 && row[own] >= low) {  // the own column, counted in step 1 unless its bucket holds a key
        uint32_t b = (order_bits32(row[own]) - low_bits) >> shift;
        b = b < static_cast<uint32_t>(n_buckets) ? b : static_cast<uint32_t>(n_buckets);
        if (!mixed[b]) --bins[start[b]];
      }
    }
  });
  TORCH_CHECK(!bad_operands, "retrieval_rank_histogram: lowest must be the lowest relevant similarity of each row");
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
