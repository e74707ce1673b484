// The sampling half of sampled WARP on CPU, for one positive label per row (metricloss/ops/native.py builds
// and loads it; metricloss/ops/warp.py::sample_violators calls it).
//
// The paper's loop draws negatives of a row uniformly with replacement until one violates
// (z_j = s_j + (m - s_p) > 0, strict), at most max_trials times. With r violators among the row's
// n = C - 1 negatives, its outcome has a known law: the trial of the first violator N is geometric with
// p = r / n, truncated at max_trials (beyond it nothing is drawn), and the violator is uniform among the r
// and independent of N. This op draws that outcome directly from two uniforms per row (u_trial, u_pick,
// drawn by the caller from its generator), so a row costs about 1.5 passes over its C scores whatever N is:
//   1. one branch-free pass: base = m - s_p and r = #{j != p : s_j + base > 0} in the accumulation dtype
//      (the torch path's rounding); a row holding NaN has no violator, as on the torch path;
//   2. N = 1 + floor(log(u) / log1p(-p)) with u = 1 - u_trial in (0, 1] (inversion: P(N = k) = (1-p)^(k-1) p),
//      N = 1 when every negative violates; N > max_trials: no violator drawn (trials 0, chosen -1);
//   3. the k-th violator in column order, k = floor(u_pick * r): blocks of scores counted branch-free until
//      the one that holds it, then that block searched: about half a pass more.
// Rows are independent: split across threads (at::parallel_for). The result depends on the uniforms only,
// never on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

// Named heuristics: rows per parallel task (a row is C scores, about 1.5 vectorised passes; at C = 1000 a
// task of 64 rows is tens of microseconds, enough to hide the task overhead and few enough to balance 2 to
// 16 threads at B = 4096), and the block the search for the k-th violator counts at once before it looks
// inside (a branch per score costs a misprediction on about half the scores of a random row; a branch-free
// block count does not).
constexpr int64_t kRowsPerTask = 64;
constexpr int64_t kBlock = 64;

// #{j in [lo, hi) : s_j + base > 0} and #{NaN}, branch-free (vectorised by the compiler).
template <typename scalar_t, typename acc_t>
inline void count_block(const scalar_t* row, int64_t lo, int64_t hi, acc_t base, int32_t& count, int32_t& nans) {
  int32_t c = 0, n = 0;
  for (int64_t j = lo; j < hi; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    c += (v + base > 0) ? 1 : 0;
    n += (v != v) ? 1 : 0;
  }
  count += c;
  nans += n;
}

template <typename scalar_t>
void sample_rows(const scalar_t* scores, int64_t C, const int64_t* labels, const double* uniforms,
                 double margin, int64_t max_trials, int64_t* trials, int64_t* chosen, int64_t begin,
                 int64_t end) {
  // the torch path's rounding: 16-bit scores are compared after an exact upcast to float
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_neg = C - 1;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = scores + i * C;
    const int64_t y = labels[i];
    trials[i] = 0;
    chosen[i] = -1;
    // 1. base and the violator count (the positive is no negative; NaN anywhere: no violator)
    const acc_t base = static_cast<acc_t>(margin) - static_cast<acc_t>(row[y]);
    const int32_t pos_counts = (static_cast<acc_t>(row[y]) + base > 0) ? 1 : 0;
    int32_t r = 0, nans = 0;
    count_block(row, 0, C, base, r, nans);
    r -= pos_counts;
    if (nans > 0 || base != base || r == 0 || num_neg == 0) continue;
    // 2. the trial of the first violator: geometric(p = r / n), truncated at max_trials
    int64_t n_trial = 1;
    if (r < num_neg) {
      const double p = static_cast<double>(r) / static_cast<double>(num_neg);
      const double u = 1.0 - uniforms[2 * i];  // (0, 1]
      const double k = std::floor(std::log(u) / std::log1p(-p));
      n_trial = k >= static_cast<double>(max_trials) ? max_trials + 1 : 1 + static_cast<int64_t>(k);
    }
    if (n_trial > max_trials) continue;
    // 3. the violator: uniform among the r, the k-th in column order. Skip whole blocks by their counts,
    //    then look inside the block that holds it.
    int64_t k = static_cast<int64_t>(uniforms[2 * i + 1] * static_cast<double>(r));
    k = k < r ? k : r - 1;
    int64_t lo = 0;
    for (; lo < C; lo += kBlock) {
      const int64_t hi = lo + kBlock < C ? lo + kBlock : C;
      int32_t c = 0, unused = 0;
      count_block(row, lo, hi, base, c, unused);
      if (y >= lo && y < hi) c -= pos_counts;
      if (k < c) break;
      k -= c;
    }
    for (int64_t j = lo; j < C; ++j) {
      if (j == y || !(static_cast<acc_t>(row[j]) + base > 0)) continue;
      if (k-- == 0) {
        chosen[i] = j;
        break;
      }
    }
    trials[i] = n_trial;
  }
}

std::tuple<at::Tensor, at::Tensor> warp_sample_single(const at::Tensor& scores, const at::Tensor& labels,
                                                      const at::Tensor& uniforms, double margin,
                                                      int64_t max_trials) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous(), "warp_sample_single: scores must be a contiguous (B, C) tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == scores.size(0),
              "warp_sample_single: labels must be a contiguous (B,) int64 tensor");
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous() &&
                  uniforms.numel() == 2 * scores.size(0),
              "warp_sample_single: uniforms must be a contiguous (B, 2) float64 tensor");
  TORCH_CHECK(max_trials >= 1, "warp_sample_single: max_trials must be >= 1");
  const int64_t B = scores.size(0), C = scores.size(1);
  at::Tensor trials = at::empty({B}, labels.options());
  at::Tensor chosen = at::empty({B}, labels.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "warp_sample_single", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const double* u = uniforms.data_ptr<double>();
    int64_t* t = trials.data_ptr<int64_t>();
    int64_t* c = chosen.data_ptr<int64_t>();
    at::parallel_for(0, B, kRowsPerTask, [&](int64_t begin, int64_t end) {
      sample_rows<scalar_t>(s, C, y, u, margin, max_trials, t, c, begin, end);
    });
  });
  return std::make_tuple(trials, chosen);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metricloss_native, m) {
  m.def("warp_sample_single(Tensor scores, Tensor labels, Tensor uniforms, float margin, int max_trials) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metricloss_native, CPU, m) {
  m.impl("warp_sample_single", &warp_sample_single);
}
