// Fused batch-all epilogue and semi-hard selection for the CPU path of metricloss (metricloss/ops/native.py builds and loads it).
//
// One pass per anchor row over its (M,) distance row while the row is in cache: the own class and the
// anchor's own column are hidden (as +inf), every negative is compared with the anchor's positive
// thresholds t_p = d_ap + margin, and the row's hinge sum, its nonzero count and (optionally) the
// scaled weight row W~ of gram_backward are produced, written over the distance row. Rows are
// independent, so they are split across threads (at::parallel_for, OpenMP).
//
// The per-element formulas are those of the torch path (metricloss/ops/triplet.py::_batch_all_block):
// few positives: [t_p - d]_+ per (positive, negative); many positives ("sorted"): the thresholds sorted
// once per row and Σ_{t_p > d} t_p - c·d per negative from their prefix sums; soft margin: softplus and
// sigmoid of d_ap - d per (positive, negative). Counts are exact integers; sums differ from the torch
// path only in summation order.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "triplet_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using namespace metricloss_native;


// torch's softplus (beta 1, threshold 20) and sigmoid
template <typename T>
inline T softplus(T z) { return z > T(20) ? z : std::log1p(std::exp(z)); }
template <typename T>
inline T sigmoid(T z) { return T(1) / (T(1) + std::exp(-z)); }

// Positive slots handled together by one branch-free pass (the batch-all hinge pass, the semi-hard
// reduction pass): their thresholds/bounds and running sums stay in registers.
constexpr int64_t kSlotGroup = 4;
// Entries summed in T (vectorised) before the running sum moves to double.
constexpr int64_t kSumBlock = 1024;

// One pass over a batch-all row for kSlotGroup thresholds t_p = d_ap + margin (spare ones -inf): per
// threshold the hinge sum Σ_n [t_p - d_n]_+ and the active count, and (WEIGHTS) the row overwritten by
// the negatives' scaled weights scale_weight(-#{p : t_p - d_n > 0}, d_n). Hidden cells (+inf) and NaN
// are never active. Sums run in T over blocks of kSumBlock entries, then in double.
template <typename T, bool WEIGHTS, int64_t KIND>
inline void hinge_group_pass_impl(T* row, int64_t m, const T* t, double* sum, int64_t* count) {
  const T t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3];
  double S0 = 0, S1 = 0, S2 = 0, S3 = 0;
  int64_t C0 = 0, C1 = 0, C2 = 0, C3 = 0;
  for (int64_t s = 0; s < m; s += kSumBlock) {
    const int64_t e = std::min(m, s + kSumBlock);
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int c0 = 0, c1 = 0, c2 = 0, c3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, c0, c1, c2, c3)
    for (int64_t j = s; j < e; ++j) {
      const T d = row[j];
      const T h0 = t0 - d, h1 = t1 - d, h2 = t2 - d, h3 = t3 - d;
      const bool a0 = h0 > T(0), a1 = h1 > T(0), a2 = h2 > T(0), a3 = h3 > T(0);
      s0 += a0 ? h0 : T(0);
      s1 += a1 ? h1 : T(0);
      s2 += a2 ? h2 : T(0);
      s3 += a3 ? h3 : T(0);
      c0 += a0 ? 1 : 0;
      c1 += a1 ? 1 : 0;
      c2 += a2 ? 1 : 0;
      c3 += a3 ? 1 : 0;
      if (WEIGHTS) {
        const T w = -((a0 ? T(1) : T(0)) + (a1 ? T(1) : T(0)) + (a2 ? T(1) : T(0)) + (a3 ? T(1) : T(0)));
        row[j] = scale_weight(w, d, KIND);
      }
    }
    S0 += s0; S1 += s1; S2 += s2; S3 += s3;
    C0 += c0; C1 += c1; C2 += c2; C3 += c3;
  }
  sum[0] = S0; sum[1] = S1; sum[2] = S2; sum[3] = S3;
  count[0] = C0; count[1] = C1; count[2] = C2; count[3] = C3;
}

template <typename T>
inline void hinge_group_pass(T* row, int64_t m, const T* t, int64_t kind, bool weights, double* sum,
                             int64_t* count) {
  if (!weights) return hinge_group_pass_impl<T, false, kEuclidean>(row, m, t, sum, count);
  if (kind == kEuclidean) return hinge_group_pass_impl<T, true, kEuclidean>(row, m, t, sum, count);
  if (kind == kSquaredEuclidean) return hinge_group_pass_impl<T, true, kSquaredEuclidean>(row, m, t, sum, count);
  return hinge_group_pass_impl<T, true, kCosine>(row, m, t, sum, count);
}

// Scratch of one thread for batch_all_row (W = the table width).
template <typename T>
struct BatchAllScratch {
  std::vector<T> thr, prefix, pos_w;
  std::vector<int64_t> slot, hist;
  explicit BatchAllScratch(int64_t width)
      : thr(width), prefix(width + 1), pos_w(width), slot(width), hist(width + 1) {}
};

// The batch-all epilogue of one anchor row (its (M,) distances, overwritten; `ap` its (W,) d_ap): the
// hinge sum and nonzero count, and with want_weights the scaled weight row W~ written over the row.
template <typename T>
inline void batch_all_row(T* row, int64_t m, const T* ap, const int64_t* mem, const bool* inc, const bool* val,
                          int64_t width, int64_t self_col, T margin, bool soft, int64_t kind, bool sorted,
                          bool want_weights, BatchAllScratch<T>& sc, T* sum_out, int64_t* count_out) {
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T>& thr = sc.thr;
  std::vector<T>& prefix = sc.prefix;
  std::vector<T>& pos_w = sc.pos_w;
  std::vector<int64_t>& slot = sc.slot;
  std::vector<int64_t>& hist = sc.hist;
  // hide the own class and the own column from the negatives
  for (int64_t k = 0; k < width; ++k)
    if (inc[k]) row[mem[k]] = inf;
  if (self_col >= 0) row[self_col] = inf;
  // the valid positive slots, in slot order
  int64_t nv = 0;
  for (int64_t k = 0; k < width; ++k)
    if (val[k]) slot[nv++] = k;
  std::fill(pos_w.begin(), pos_w.end(), T(0));
  double row_sum = 0.0;
  int64_t row_count = 0;
  if (soft) {
    for (int64_t v = 0; v < nv; ++v) thr[v] = ap[slot[v]];
    std::vector<double> pos_acc(nv, 0.0);
    for (int64_t j = 0; j < m; ++j) {
      const T d = row[j];
      T neg_w = T(0);
      if (d != inf) {
        for (int64_t v = 0; v < nv; ++v) {
          const T z = thr[v] - d;
          const T s = softplus(z);
          row_sum += s;
          row_count += (z == z);  // softplus(z) > 0 for every z: counted whether or not exp(z) underflowed
          if (want_weights) {
            const T g = sigmoid(z);
            pos_acc[v] += g;
            neg_w -= g;
          }
        }
      }
      if (want_weights) row[j] = scale_weight(neg_w, d, kind);
    }
    for (int64_t v = 0; v < nv; ++v) pos_w[slot[v]] = static_cast<T>(pos_acc[v]);
  } else if (sorted) {
    for (int64_t v = 0; v < nv; ++v) thr[v] = ap[slot[v]] + margin;
    std::vector<int64_t> order(nv);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return thr[x] < thr[y]; });
    std::vector<T> t_sorted(nv);
    for (int64_t v = 0; v < nv; ++v) t_sorted[v] = thr[order[v]];
    prefix[0] = T(0);
    for (int64_t v = 0; v < nv; ++v) prefix[v + 1] = prefix[v] + t_sorted[v];
    std::fill(hist.begin(), hist.end(), 0);
    const T* tb = t_sorted.data();
    for (int64_t j = 0; j < m; ++j) {
      const T d = row[j];
      // q = #{t_p <= d}: the thresholds above d are the last nv - q
      const int64_t q = std::upper_bound(tb, tb + nv, d) - tb;
      const int64_t above = nv - q;
      if (above > 0) {
        row_sum += (prefix[nv] - prefix[q]) - static_cast<T>(above) * d;
        hist[q] += 1;
        row_count += above;
      }
      if (want_weights) row[j] = scale_weight(static_cast<T>(-above), d, kind);
    }
    // k_p = #{n : q_n <= rank of t_p}
    int64_t cum = 0;
    for (int64_t v = 0; v < nv; ++v) {
      cum += hist[v];
      pos_w[slot[order[v]]] = static_cast<T>(cum);
    }
  } else {
    // Few positives: branch-free (vectorised) passes over the row. Up to kSlotGroup valid slots: one
    // pass gives every slot's hinge sum and active count and writes the negatives' weights. More
    // (up to the sorted path's threshold): one reduction per slot, then one pass for the weights.
    for (int64_t v = 0; v < nv; ++v) thr[v] = ap[slot[v]] + margin;
    if (nv <= kSlotGroup) {
      T t4[kSlotGroup];
      double s4[kSlotGroup];
      int64_t c4[kSlotGroup];
      for (int64_t v = 0; v < kSlotGroup; ++v) t4[v] = v < nv ? thr[v] : -inf;
      hinge_group_pass(row, m, t4, kind, want_weights, s4, c4);
      for (int64_t v = 0; v < nv; ++v) {
        row_sum += s4[v];
        row_count += c4[v];
        pos_w[slot[v]] = static_cast<T>(c4[v]);
      }
    } else {
      for (int64_t v = 0; v < nv; ++v) {
        const T t = thr[v];
        double slot_sum = 0.0;
        int64_t slot_count = 0;
#pragma omp simd reduction(+ : slot_sum, slot_count)
        for (int64_t j = 0; j < m; ++j) {
          const T h = t - row[j];  // [t_p - d]_+
          const bool active = h > T(0);
          slot_sum += active ? static_cast<double>(h) : 0.0;
          slot_count += active ? 1 : 0;
        }
        row_sum += slot_sum;
        row_count += slot_count;
        pos_w[slot[v]] = static_cast<T>(slot_count);
      }
      if (want_weights) {
        const T* tv = thr.data();
        for (int64_t j = 0; j < m; ++j) {
          const T d = row[j];
          T above = T(0);
          for (int64_t v = 0; v < nv; ++v) above += (tv[v] - d > T(0)) ? T(1) : T(0);
          row[j] = scale_weight(-above, d, kind);
        }
      }
    }
  }
  *sum_out = static_cast<T>(row_sum);
  *count_out = row_count;
  if (want_weights) {
    // the positives' weights scaled by d_ap, added into their columns (own-class cells carry 0)
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t k = slot[v];
      row[mem[k]] += scale_weight(pos_w[k], ap[k], kind);
    }
  }
}

template <typename T>
void batch_all_rows(T* dist, const T* d_ap, const int64_t* members, const bool* in_class, const bool* valid,
                    const int64_t* self_cols, int64_t c, int64_t m, int64_t width, T margin, bool soft,
                    int64_t kind, bool sorted, bool want_weights, T* sums, int64_t* nonzero) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    BatchAllScratch<T> sc(width);
    for (int64_t i = begin; i < end; ++i)
      batch_all_row(dist + i * m, m, d_ap + i * width, members + i * width, in_class + i * width,
                    valid + i * width, width, self_cols != nullptr ? self_cols[i] : int64_t(-1), margin, soft, kind,
                    sorted, want_weights, sc, sums + i, nonzero + i);
  });
}

std::tuple<at::Tensor, at::Tensor> batch_all_epilogue(at::Tensor dist, const at::Tensor& d_ap,
                                                      const at::Tensor& members, const at::Tensor& in_class,
                                                      const at::Tensor& valid,
                                                      const c10::optional<at::Tensor>& self_cols, double margin,
                                                      bool soft, int64_t distance, bool sorted,
                                                      bool want_weights) {
  TORCH_CHECK(dist.device().is_cpu() && dist.dim() == 2 && dist.is_contiguous(),
              "batch_all_epilogue: dist must be a contiguous 2-D CPU tensor");
  const int64_t c = dist.size(0), m = dist.size(1), width = members.size(1);
  TORCH_CHECK(d_ap.is_contiguous() && d_ap.scalar_type() == dist.scalar_type() && d_ap.size(0) == c &&
                  d_ap.size(1) == width,
              "batch_all_epilogue: d_ap must be contiguous (c, W) of dist's dtype");
  TORCH_CHECK(members.is_contiguous() && members.scalar_type() == at::kLong && members.size(0) == c,
              "batch_all_epilogue: members must be contiguous (c, W) int64");
  TORCH_CHECK(in_class.is_contiguous() && in_class.scalar_type() == at::kBool && valid.is_contiguous() &&
                  valid.scalar_type() == at::kBool,
              "batch_all_epilogue: in_class and valid must be contiguous bool");
  TORCH_CHECK(distance >= 0 && distance <= 2, "batch_all_epilogue: unknown distance kind");
  const int64_t* self_ptr = nullptr;
  if (self_cols.has_value()) {
    TORCH_CHECK(self_cols->is_contiguous() && self_cols->scalar_type() == at::kLong && self_cols->numel() == c,
                "batch_all_epilogue: self_cols must be contiguous (c,) int64");
    self_ptr = self_cols->data_ptr<int64_t>();
  }
  auto sums = at::empty({c}, dist.options());
  auto nonzero = at::empty({c}, dist.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "batch_all_epilogue", [&] {
    batch_all_rows<scalar_t>(dist.data_ptr<scalar_t>(), d_ap.data_ptr<scalar_t>(), members.data_ptr<int64_t>(),
                             in_class.data_ptr<bool>(), valid.data_ptr<bool>(), self_ptr, c, m, width,
                             static_cast<scalar_t>(margin), soft, distance, sorted, want_weights,
                             sums.data_ptr<scalar_t>(), nonzero.data_ptr<int64_t>());
  });
  return {sums, nonzero};
}

// Semi-hard selection (metricloss/ops/mining.py::semi_hard_negative_idx, few-positives branch): per
// (anchor, positive slot k) the nearest negative farther than the positive's tie bound, d_j > bound_k
// (bound = tie_bound(d_ap), computed by the caller); among those within the tie bound of the nearest one,
// lim_k = nearest_k * (1 + rtol_k) (+ rtol_k for cosine; rtol_k the slot's tie tolerance,
// metricloss/ops/mining.py::tie_rtol_slots), the first index; else the first farthest negative.
// The own class and own column are hidden (+inf, as the torch path leaves them).
//
// Each value is a branch-free reduction over the row (vectorised: `omp simd`), followed by a search for
// its first index that stops at the first match: the farthest negative (max over the visible entries),
// then per valid slot the nearest beyond its bound (min) and the first index within its tie limit. A
// single pass comparing each entry with every slot's running best is branchy and does not vectorise
// (measured: 4–8× slower at W = 3); the row stays in L1/L2 across the passes. Padding slots (not in
// the class) are left to the farthest negative: the caller masks them.
template <typename T>
inline void semi_hard_row(T* row, int64_t m, const T* bd, const int64_t* mem, const bool* inc, int64_t width,
                          int64_t self_col, const T* rt, bool cosine, int64_t* o) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < width; ++k)
    if (inc[k]) row[mem[k]] = inf;
  if (self_col >= 0) row[self_col] = inf;
  // 1. the farthest negative: hidden (+inf) and NaN entries count as -inf; its first index
  T far = -inf;
#pragma omp simd reduction(max : far)
  for (int64_t j = 0; j < m; ++j) {
    const T d = row[j];
    const T v = d < inf ? d : -inf;
    far = v > far ? v : far;
  }
  int64_t far_idx = 0;
  if (far > -inf)
    for (int64_t j = 0; j < m; ++j)
      if (row[j] == far) { far_idx = j; break; }
  for (int64_t k = 0; k < width; ++k) {
    o[k] = far_idx;
    if (!inc[k]) continue;
    // 2. the nearest negative beyond the slot's bound (hidden cells are +inf: never below a finite best)
    const T b = bd[k];
    T best = inf;
#pragma omp simd reduction(min : best)
    for (int64_t j = 0; j < m; ++j) {
      const T d = row[j];
      const T v = d > b ? d : inf;
      best = v < best ? v : best;
    }
    if (!(best < inf)) continue;  // none beyond the bound: the farthest negative
    // 3. the first index beyond the bound within the tie limit of the nearest (rtol 0: the nearest itself)
    T lim = best;
    if (rt[k] > T(0)) {  // as tie_bound: best * (1 + rtol) (+ rtol for cosine), each step rounded in T
      const T t = best * (T(1) + rt[k]);
      lim = cosine ? t + rt[k] : t;
    }
    for (int64_t j = 0; j < m; ++j) {
      const T d = row[j];
      if (d > b && d <= lim) { o[k] = j; break; }
    }
  }
}

template <typename T>
void semi_hard_rows(T* dist, const T* bound, const int64_t* members, const bool* in_class, const int64_t* self_cols,
                    int64_t c, int64_t m, int64_t width, const T* rtol, bool cosine, int64_t* out) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      semi_hard_row(dist + i * m, m, bound + i * width, members + i * width, in_class + i * width, width,
                    self_cols != nullptr ? self_cols[i] : int64_t(-1), rtol + i * width, cosine, out + i * width);
  });
}

at::Tensor semi_hard_select(at::Tensor dist, const at::Tensor& bound, const at::Tensor& members,
                            const at::Tensor& in_class, const c10::optional<at::Tensor>& self_cols,
                            const at::Tensor& rtol, bool cosine) {
  TORCH_CHECK(dist.device().is_cpu() && dist.dim() == 2 && dist.is_contiguous(),
              "semi_hard_select: dist must be a contiguous 2-D CPU tensor");
  const int64_t c = dist.size(0), m = dist.size(1), width = members.size(1);
  TORCH_CHECK(bound.is_contiguous() && bound.scalar_type() == dist.scalar_type() && bound.size(0) == c &&
                  bound.size(1) == width,
              "semi_hard_select: bound must be contiguous (c, W) of dist's dtype");
  TORCH_CHECK(rtol.is_contiguous() && rtol.scalar_type() == dist.scalar_type() && rtol.size(0) == c &&
                  rtol.size(1) == width,
              "semi_hard_select: rtol must be contiguous (c, W) of dist's dtype");
  TORCH_CHECK(members.is_contiguous() && members.scalar_type() == at::kLong && members.size(0) == c &&
                  in_class.is_contiguous() && in_class.scalar_type() == at::kBool,
              "semi_hard_select: members (c, W) int64 and in_class bool, contiguous");
  const int64_t* self_ptr = nullptr;
  if (self_cols.has_value()) {
    TORCH_CHECK(self_cols->is_contiguous() && self_cols->scalar_type() == at::kLong && self_cols->numel() == c,
                "semi_hard_select: self_cols must be contiguous (c,) int64");
    self_ptr = self_cols->data_ptr<int64_t>();
  }
  auto out = at::empty({c, width}, members.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "semi_hard_select", [&] {
    semi_hard_rows<scalar_t>(dist.data_ptr<scalar_t>(), bound.data_ptr<scalar_t>(), members.data_ptr<int64_t>(),
                             in_class.data_ptr<bool>(), self_ptr, c, m, width, rtol.data_ptr<scalar_t>(), cosine,
                             out.data_ptr<int64_t>());
  });
  return out;
}

// The block preparation of a chunk (metricloss/ops/distance.py::GramFactors.squared_block, the
// cancellation test of metricloss/ops/triplet.py::_BlockTripletPlan.chunk and GramFactors.finish) in one
// pass per row: clamp at 0; redo_i = min over the row's negatives (own class and own column hidden) of
// u_ij - r_slack_j < a_slack_i; then the own column (own_start >= 0: column own_start + i) to 0 and the
// square root for the Euclidean distance.
// One pass over a raw row: clamp at 0, write it back (SQRT: its square root), and return the smallest
// slack v - r_slack_j of the clamped entries (the cancellation test; NaN and +inf cells never count).
template <typename T, bool SQRT>
inline T prepare_pass(T* row, int64_t m, const T* r_slack) {
  T lowest = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : lowest)
  for (int64_t j = 0; j < m; ++j) {
    const T v = row[j] < T(0) ? T(0) : row[j];
    const T slack = v - r_slack[j];
    lowest = slack < lowest ? slack : lowest;
    row[j] = SQRT ? std::sqrt(v) : v;
  }
  return lowest;
}

// The small-entry test of each positive's own Gram entry, on the clamped raw entry before the row is
// prepared: u_ap < a_slack_i + r_slack_p (the own cell +inf: never small), as the unfused path takes it.
template <typename T>
inline void small_positive_entries(const T* row, const int64_t* mem, int64_t width, int64_t own_col, T a_slack_i,
                                   const T* r_slack, char* small) {
  for (int64_t k = 0; k < width; ++k) {
    T v = row[mem[k]] < T(0) ? T(0) : row[mem[k]];
    if (own_col >= 0 && mem[k] == own_col) v = std::numeric_limits<T>::infinity();
    small[k] = v < a_slack_i + r_slack[mem[k]];
  }
}

template <typename T>
inline bool prepare_row(T* row, int64_t m, T a_slack_i, const T* r_slack, const int64_t* mem, const bool* inc,
                        int64_t width, int64_t self_col, int64_t own_col, bool take_sqrt,
                        std::vector<int64_t>& hidden_col, std::vector<T>& hidden_val) {
  const T inf = std::numeric_limits<T>::infinity();
  hidden_col.clear();
  hidden_val.clear();
  auto hide = [&](int64_t j) {
    if (row[j] == inf) return;  // already hidden (a duplicate entry): keep the saved value
    hidden_col.push_back(j);
    hidden_val.push_back(row[j]);
    row[j] = inf;
  };
  for (int64_t k = 0; k < width; ++k)
    if (inc[k]) hide(mem[k]);
  if (self_col >= 0) hide(self_col);
  // clamp, the small-entry test (a vectorised min reduction) and the square root, in one pass
  const T lowest = take_sqrt ? prepare_pass<T, true>(row, m, r_slack) : prepare_pass<T, false>(row, m, r_slack);
  for (size_t h = 0; h < hidden_col.size(); ++h) {
    const T v = hidden_val[h] < T(0) ? T(0) : hidden_val[h];
    row[hidden_col[h]] = take_sqrt ? std::sqrt(v) : v;
  }
  if (own_col >= 0) row[own_col] = T(0);
  return lowest < a_slack_i;
}

template <typename T>
void prepare_rows(T* u, const T* a_slack, const T* r_slack, const int64_t* members, const bool* in_class,
                  const int64_t* self_cols, int64_t own_start, int64_t c, int64_t m, int64_t width, bool take_sqrt,
                  bool* redo) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hidden_col;
    std::vector<T> hidden_val;
    for (int64_t i = begin; i < end; ++i)
      redo[i] = prepare_row(u + i * m, m, a_slack[i], r_slack, members + i * width, in_class + i * width, width,
                            self_cols != nullptr ? self_cols[i] : int64_t(-1), own_start >= 0 ? own_start + i : -1,
                            take_sqrt, hidden_col, hidden_val);
  });
}

at::Tensor prepare_block(at::Tensor u, const at::Tensor& a_slack, const at::Tensor& r_slack,
                         const at::Tensor& members, const at::Tensor& in_class,
                         const c10::optional<at::Tensor>& self_cols, int64_t own_start, bool take_sqrt) {
  TORCH_CHECK(u.device().is_cpu() && u.dim() == 2 && u.is_contiguous(),
              "prepare_block: u must be a contiguous 2-D CPU tensor");
  const int64_t c = u.size(0), m = u.size(1), width = members.size(1);
  TORCH_CHECK(a_slack.is_contiguous() && a_slack.numel() == c && a_slack.scalar_type() == u.scalar_type() &&
                  r_slack.is_contiguous() && r_slack.numel() == m && r_slack.scalar_type() == u.scalar_type(),
              "prepare_block: a_slack (c,) and r_slack (M,) contiguous, of u's dtype");
  TORCH_CHECK(members.is_contiguous() && members.scalar_type() == at::kLong && members.size(0) == c &&
                  in_class.is_contiguous() && in_class.scalar_type() == at::kBool,
              "prepare_block: members (c, W) int64 and in_class bool, contiguous");
  TORCH_CHECK(own_start < 0 || own_start + c <= m, "prepare_block: own columns out of range");
  const int64_t* self_ptr = nullptr;
  if (self_cols.has_value()) {
    TORCH_CHECK(self_cols->is_contiguous() && self_cols->scalar_type() == at::kLong && self_cols->numel() == c,
                "prepare_block: self_cols must be contiguous (c,) int64");
    self_ptr = self_cols->data_ptr<int64_t>();
  }
  auto redo = at::empty({c}, u.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "prepare_block", [&] {
    prepare_rows<scalar_t>(u.data_ptr<scalar_t>(), a_slack.data_ptr<scalar_t>(), r_slack.data_ptr<scalar_t>(),
                           members.data_ptr<int64_t>(), in_class.data_ptr<bool>(), self_ptr, own_start, c, m, width,
                           take_sqrt, redo.data_ptr<bool>());
  });
  return redo;
}


// The operand checks both fused ops share; returns the own-column pointer (or nullptr).
const int64_t* check_fused_operands(const char* op, const at::Tensor& a_factors, const at::Tensor& r_factors,
                                    const at::Tensor& a_slack, const at::Tensor& r_slack, const at::Tensor& members,
                                    const at::Tensor& in_class, const c10::optional<at::Tensor>& self_cols,
                                    int64_t own_start, const at::Tensor& d_ap_exact, int64_t tile_rows) {
  TORCH_CHECK(a_factors.device().is_cpu() && a_factors.dim() == 2 && r_factors.dim() == 2 &&
                  a_factors.size(1) == r_factors.size(1) && a_factors.scalar_type() == r_factors.scalar_type(),
              op, ": a_factors (c, K) and r_factors (M, K) CPU tensors of one dtype");
  const int64_t c = a_factors.size(0), m = r_factors.size(0), width = members.size(1);
  TORCH_CHECK(tile_rows >= 1, op, ": tile_rows must be >= 1");
  TORCH_CHECK(a_slack.is_contiguous() && a_slack.numel() == c && a_slack.scalar_type() == a_factors.scalar_type() &&
                  r_slack.is_contiguous() && r_slack.numel() == m && r_slack.scalar_type() == a_factors.scalar_type(),
              op, ": a_slack (c,) and r_slack (M,) contiguous, of the factors' dtype");
  TORCH_CHECK(members.is_contiguous() && members.scalar_type() == at::kLong && members.size(0) == c &&
                  in_class.is_contiguous() && in_class.scalar_type() == at::kBool && in_class.size(0) == c &&
                  in_class.size(1) == width,
              op, ": members (c, W) int64 and in_class (c, W) bool, contiguous");
  TORCH_CHECK(d_ap_exact.is_contiguous() && d_ap_exact.scalar_type() == a_factors.scalar_type() &&
                  d_ap_exact.size(0) == c && d_ap_exact.size(1) == width,
              op, ": d_ap_exact must be contiguous (c, W) of the factors' dtype");
  TORCH_CHECK(own_start < 0 || own_start + c <= m, op, ": own columns out of range");
  if (!self_cols.has_value()) return nullptr;
  TORCH_CHECK(self_cols->is_contiguous() && self_cols->scalar_type() == at::kLong && self_cols->numel() == c, op,
              ": self_cols must be contiguous (c,) int64");
  return self_cols->data_ptr<int64_t>();
}

// The Gram block of a fused chunk, one GEMM a_factors[s:s+t] @ r_factors.T per tile of at most `tile_rows`
// rows, each handed to fn(tile, s, t) before the next is computed. The tiles are the rows s:s+t of `block`
// when it is given ((c, M)), else one reused (tile_rows, M) buffer.
template <typename F>
void for_each_gram_tile(const at::Tensor& a_factors, const at::Tensor& r_factors,
                        const c10::optional<at::Tensor>& block, int64_t tile_rows, F&& fn) {
  const int64_t c = a_factors.size(0);
  const int64_t rows = std::min(tile_rows, std::max<int64_t>(c, 1));
  const at::Tensor buffer = block.has_value() ? *block : at::empty({rows, r_factors.size(0)}, a_factors.options());
  const at::Tensor r_t = r_factors.t();
  for (int64_t s = 0; s < c; s += rows) {
    const int64_t t = std::min(rows, c - s);
    at::Tensor tile = buffer.narrow(0, block.has_value() ? s : 0, t);
    at::mm_out(tile, a_factors.narrow(0, s, t), r_t);
    fn(tile, s, t);
  }
}

// Semi-hard, fused (metricloss/ops/triplet.py::_BlockTripletPlan, the native fused path): the chunk's Gram
// block is computed here by one GEMM per tile of `tile_rows` anchors (sized by the caller to stay in
// cache), and each row is then prepared and searched while it is still in cache, in two passes:
//
//   1. one branch-free (vectorised) pass that prepares the row (clamp at 0, the small-entry test, the
//      square root) and reduces it to the farthest negative (of the finite or +inf distances, as the
//      torch path's argmax) and, for up to kSlotGroup positive slots
//      at once, the nearest negative beyond each slot's bound (further groups of slots: one more
//      reduction pass each, over the prepared row);
//   2. one scan for the first indices: of the farthest value, and per slot of the first negative
//      beyond the bound within the tie limit of the nearest; it stops once every one is found.
//
// The bound of a slot is tie_bound(d_ap) = d_ap * (1 + rtol_k) (+ rtol_k for cosine) of the block's own
// anchor-positive distance, or of the exact one `d_ap_exact` where the positive's Gram entry is small
// (u_ap < a_slack_i + r_slack_p on the clamped raw entry, the own cell +inf), as the unfused path takes
// it. The own class and the own column stay hidden (as NaN) throughout. The result equals prepare_block,
// the gather of d_ap and semi_hard_select run one after the other (tested against them).

template <typename T, bool PREPARE, bool SQRT>
inline void slot_group_pass(T* row, int64_t m, const T* r_slack, const T* b, T* best, T& far, T& lowest) {
  const T inf = std::numeric_limits<T>::infinity();
  const T b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
  T m0 = inf, m1 = inf, m2 = inf, m3 = inf, fa = -inf, lo = inf;
#pragma omp simd reduction(min : m0, m1, m2, m3, lo) reduction(max : fa)
  for (int64_t j = 0; j < m; ++j) {
    T d = row[j];
    if (PREPARE) {  // clamp, the cancellation slack, √, the farthest (hidden cells are NaN: never above)
      const T v = d < T(0) ? T(0) : d;
      const T slack = v - r_slack[j];
      lo = slack < lo ? slack : lo;
      d = SQRT ? std::sqrt(v) : v;
      row[j] = d;
      fa = d > fa ? d : fa;
    }
    const T c0 = d > b0 ? d : inf;
    m0 = c0 < m0 ? c0 : m0;
    const T c1 = d > b1 ? d : inf;
    m1 = c1 < m1 ? c1 : m1;
    const T c2 = d > b2 ? d : inf;
    m2 = c2 < m2 ? c2 : m2;
    const T c3 = d > b3 ? d : inf;
    m3 = c3 < m3 ? c3 : m3;
  }
  if (PREPARE) {
    far = fa;
    lowest = lo;
  }
  best[0] = m0;
  best[1] = m1;
  best[2] = m2;
  best[3] = m3;
}

// Entries tested together by the block scans below (one vectorised test, then a scalar look inside the
// block that holds the match).
constexpr int64_t kScanBlock = 64;

// The first j with lo < row[j] <= hi (NaN never matches), or -1.
template <typename T>
inline int64_t first_in_range(const T* row, int64_t m, T lo, T hi) {
  for (int64_t s = 0; s < m; s += kScanBlock) {
    const int64_t e = std::min(m, s + kScanBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = s; j < e; ++j) hit |= (row[j] > lo && row[j] <= hi) ? 1 : 0;
    if (hit)
      for (int64_t j = s; j < e; ++j)
        if (row[j] > lo && row[j] <= hi) return j;
  }
  return -1;
}

// The first j with row[j] == value, or 0.
template <typename T>
inline int64_t first_equal(const T* row, int64_t m, T value) {
  for (int64_t s = 0; s < m; s += kScanBlock) {
    const int64_t e = std::min(m, s + kScanBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = s; j < e; ++j) hit |= row[j] == value ? 1 : 0;
    if (hit)
      for (int64_t j = s; j < e; ++j)
        if (row[j] == value) return j;
  }
  return 0;
}

template <typename T>
void semi_hard_fused_rows(T* tile, int64_t row0, int64_t t, int64_t m, int64_t width, const T* a_slack,
                          const T* r_slack, const int64_t* members, const bool* in_class, const int64_t* self_cols,
                          int64_t own_start, bool take_sqrt, const T* d_ap_exact, const T* rtol, bool cosine,
                          int64_t* out, bool* redo) {
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const int64_t groups = (width + kSlotGroup - 1) / kSlotGroup;
  const int64_t padded = groups * kSlotGroup;
  at::parallel_for(0, t, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> bound(padded), best(padded), lim(padded);
    std::vector<int64_t> found(padded);
    std::vector<char> small(width);
    for (int64_t ii = begin; ii < end; ++ii) {
      const int64_t i = row0 + ii;
      T* row = tile + ii * m;
      const int64_t* mem = members + i * width;
      const bool* inc = in_class + i * width;
      const int64_t own_col = own_start >= 0 ? own_start + i : -1;
      const int64_t self_col = self_cols != nullptr ? self_cols[i] : int64_t(-1);
      // 1. the bounds, from the raw entries before the pass overwrites them: the block's d_ap is the
      //    clamped (square-rooted) entry, 0 in the own column; small entries take the exact d_ap.
      //    Padding slots (and the group's spare ones) get +inf: nothing is beyond it.
      small_positive_entries(row, mem, width, own_col, a_slack[i], r_slack, small.data());
      for (int64_t k = 0; k < padded; ++k) bound[k] = inf;
      for (int64_t k = 0; k < width; ++k) {
        if (!inc[k]) continue;
        const int64_t col = mem[k];
        const T v = row[col] < T(0) ? T(0) : row[col];
        T d = own_col >= 0 && col == own_col ? T(0) : (take_sqrt ? std::sqrt(v) : v);
        if (small[k]) d = d_ap_exact[i * width + k];
        const T rk = rtol[i * width + k];
        const T b = d * (T(1) + rk);  // tie_bound(d_ap, rtol_k), each step rounded in T
        bound[k] = cosine ? b + rk : b;
      }
      // 2. hide the own class and the own column, then the reduction passes. The hidden cells hold NaN,
      //    which every comparison below rejects: no small-entry slack, never the farthest, never beyond a
      //    bound (a NaN needs no test of its own in the pass; an `x < inf` test there costs 4x the pass).
      for (int64_t k = 0; k < width; ++k)
        if (inc[k]) row[mem[k]] = nan;
      if (self_col >= 0) row[self_col] = nan;
      T far = -inf, lowest = inf;
      if (take_sqrt)
        slot_group_pass<T, true, true>(row, m, r_slack, bound.data(), best.data(), far, lowest);
      else
        slot_group_pass<T, true, false>(row, m, r_slack, bound.data(), best.data(), far, lowest);
      for (int64_t g = 1; g < groups; ++g)  // further slots, over the prepared row
        slot_group_pass<T, false, false>(row, m, r_slack, bound.data() + g * kSlotGroup,
                                         best.data() + g * kSlotGroup, far, lowest);
      redo[i] = lowest < a_slack[i];
      // 3. the first indices: of the farthest value, and per slot beyond its bound within its tie limit
      for (int64_t k = 0; k < width; ++k) {
        found[k] = -1;
        lim[k] = best[k];
        if (best[k] < inf) {
          const T rk = rtol[i * width + k];
          if (rk > T(0)) {
            const T tl = best[k] * (T(1) + rk);
            lim[k] = cosine ? tl + rk : tl;
          }
        }
      }
      // (one early-exit scan per value, vectorised by blocks: a scan testing every open value per entry
      // is branchy and slower). The farthest negative is only looked up when a slot needs it; padding
      // slots get it, or index 0 when no slot needed it (any in-range index: the caller masks them).
      int64_t far_idx = 0;
      bool need_far = false;
      for (int64_t k = 0; k < width; ++k) {
        if (!inc[k]) continue;
        if (best[k] < inf)
          found[k] = first_in_range(row, m, bound[k], lim[k]);
        else
          need_far = true;
      }
      if (need_far && far > -inf) far_idx = first_equal(row, m, far);
      int64_t* o = out + i * width;
      for (int64_t k = 0; k < width; ++k) o[k] = found[k] >= 0 ? found[k] : far_idx;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> semi_hard_fused(const at::Tensor& a_factors, const at::Tensor& r_factors,
                                                   const at::Tensor& a_slack, const at::Tensor& r_slack,
                                                   const at::Tensor& members, const at::Tensor& in_class,
                                                   const c10::optional<at::Tensor>& self_cols, int64_t own_start,
                                                   bool take_sqrt, const at::Tensor& d_ap_exact, const at::Tensor& rtol,
                                                   bool cosine, int64_t tile_rows) {
  const int64_t* self_ptr = check_fused_operands("semi_hard_fused", a_factors, r_factors, a_slack, r_slack, members,
                                                  in_class, self_cols, own_start, d_ap_exact, tile_rows);
  const int64_t c = a_factors.size(0), m = r_factors.size(0), width = members.size(1);
  TORCH_CHECK(rtol.is_contiguous() && rtol.scalar_type() == a_factors.scalar_type() && rtol.dim() == 2 &&
                  rtol.size(0) == c && rtol.size(1) == width,
              "semi_hard_fused: rtol must be contiguous (c, W) of the factors' dtype");
  auto out = at::empty({c, width}, members.options());
  auto redo = at::empty({c}, members.options().dtype(at::kBool));
  for_each_gram_tile(a_factors, r_factors, c10::nullopt, tile_rows, [&](at::Tensor& tile, int64_t s, int64_t t) {
    AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "semi_hard_fused", [&] {
      semi_hard_fused_rows<scalar_t>(tile.data_ptr<scalar_t>(), s, t, m, width, a_slack.data_ptr<scalar_t>(),
                                     r_slack.data_ptr<scalar_t>(), members.data_ptr<int64_t>(),
                                     in_class.data_ptr<bool>(), self_ptr, own_start, take_sqrt,
                                     d_ap_exact.data_ptr<scalar_t>(), rtol.data_ptr<scalar_t>(), cosine,
                                     out.data_ptr<int64_t>(),
                                     redo.data_ptr<bool>());
    });
  });
  return {out, redo};
}


// Batch-all, fused (metricloss/ops/triplet.py::_BlockTripletPlan, the native fused path): the chunk's
// Gram block is computed here, one GEMM per tile of `tile_rows` anchors (sized by the caller to stay in
// cache), into the rows of `weights` (the chunk's (c, M) weight block, which the gradient's GEMMs read
// next) or, without weights, into one tile buffer; each row is then prepared (prepare_row) and its
// epilogue run (batch_all_row) while it is in cache. The anchor-positive distance of a slot is the
// block's value, or the exact `d_ap_exact` where the positive's own Gram entry is small (u_ap < a_slack_i
// + r_slack_p on the clamped raw entry, the own cell +inf), as the unfused path takes it. The result
// equals prepare_block, the gather of d_ap and batch_all_epilogue run one after the other.
template <typename T>
void batch_all_fused_rows(T* tile, int64_t row0, int64_t t, int64_t m, int64_t width, const T* a_slack,
                          const T* r_slack, const int64_t* members, const bool* in_class, const bool* valid,
                          const int64_t* self_cols, int64_t own_start, bool take_sqrt, const T* d_ap_exact, T margin,
                          bool soft, int64_t kind, bool sorted, bool want_weights, T* sums, int64_t* nonzero,
                          bool* redo) {
  at::parallel_for(0, t, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hidden_col;
    std::vector<T> hidden_val;
    std::vector<T> ap(width);
    std::vector<char> small(width);
    BatchAllScratch<T> sc(width);
    for (int64_t ii = begin; ii < end; ++ii) {
      const int64_t i = row0 + ii;
      T* row = tile + ii * m;
      const int64_t* mem = members + i * width;
      const bool* inc = in_class + i * width;
      const int64_t own_col = own_start >= 0 ? own_start + i : -1;
      const int64_t self_col = self_cols != nullptr ? self_cols[i] : int64_t(-1);
      // 1. the positives' small-entry test on their raw entries
      small_positive_entries(row, mem, width, own_col, a_slack[i], r_slack, small.data());
      // 2. the row as distances, and its cancellation test
      redo[i] = prepare_row(row, m, a_slack[i], r_slack, mem, inc, width, self_col, own_col, take_sqrt, hidden_col,
                            hidden_val);
      // 3. d_ap: the block's value, or the exact one for small entries; 4. the epilogue
      for (int64_t k = 0; k < width; ++k) ap[k] = small[k] ? d_ap_exact[i * width + k] : row[mem[k]];
      batch_all_row(row, m, ap.data(), mem, inc, valid + i * width, width, self_col, margin, soft, kind, sorted,
                    want_weights, sc, sums + i, nonzero + i);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_fused(
    const at::Tensor& a_factors, const at::Tensor& r_factors, const at::Tensor& a_slack, const at::Tensor& r_slack,
    const at::Tensor& members, const at::Tensor& in_class, const at::Tensor& valid,
    const c10::optional<at::Tensor>& self_cols, int64_t own_start, bool take_sqrt, const at::Tensor& d_ap_exact,
    double margin, bool soft, int64_t distance, bool sorted, const c10::optional<at::Tensor>& weights,
    int64_t tile_rows) {
  const int64_t* self_ptr = check_fused_operands("batch_all_fused", a_factors, r_factors, a_slack, r_slack, members,
                                                  in_class, self_cols, own_start, d_ap_exact, tile_rows);
  const int64_t c = a_factors.size(0), m = r_factors.size(0), width = members.size(1);
  TORCH_CHECK(distance >= 0 && distance <= 2, "batch_all_fused: unknown distance kind");
  TORCH_CHECK(valid.is_contiguous() && valid.scalar_type() == at::kBool && valid.size(0) == c && valid.size(1) == width,
              "batch_all_fused: valid must be contiguous (c, W) bool");
  const bool want_weights = weights.has_value();
  if (want_weights)
    TORCH_CHECK(weights->is_contiguous() && weights->scalar_type() == a_factors.scalar_type() &&
                    weights->size(0) == c && weights->size(1) == m,
                "batch_all_fused: weights must be a contiguous (c, M) buffer of the factors' dtype");
  auto sums = at::empty({c}, a_factors.options());
  auto nonzero = at::empty({c}, members.options());
  auto redo = at::empty({c}, members.options().dtype(at::kBool));
  for_each_gram_tile(a_factors, r_factors, weights, tile_rows, [&](at::Tensor& tile, int64_t s, int64_t t) {
    AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "batch_all_fused", [&] {
      batch_all_fused_rows<scalar_t>(tile.data_ptr<scalar_t>(), s, t, m, width, a_slack.data_ptr<scalar_t>(),
                                     r_slack.data_ptr<scalar_t>(), members.data_ptr<int64_t>(),
                                     in_class.data_ptr<bool>(), valid.data_ptr<bool>(), self_ptr, own_start,
                                     take_sqrt, d_ap_exact.data_ptr<scalar_t>(), static_cast<scalar_t>(margin), soft,
                                     distance, sorted, want_weights, sums.data_ptr<scalar_t>(),
                                     nonzero.data_ptr<int64_t>(), redo.data_ptr<bool>());
    });
  });
  return {sums, nonzero, redo};
}


}  // namespace

TORCH_LIBRARY_FRAGMENT(metricloss_native, m) {
  m.def("batch_all_epilogue(Tensor(a!) dist, Tensor d_ap, Tensor members, Tensor in_class, Tensor valid, "
        "Tensor? self_cols, float margin, bool soft, int distance, bool sorted, bool want_weights) "
        "-> (Tensor, Tensor)");
  m.def("prepare_block(Tensor(a!) u, Tensor a_slack, Tensor r_slack, Tensor members, Tensor in_class, "
        "Tensor? self_cols, int own_start, bool take_sqrt) -> Tensor");
  m.def("semi_hard_select(Tensor(a!) dist, Tensor bound, Tensor members, Tensor in_class, Tensor? self_cols, "
        "Tensor rtol, bool cosine) -> Tensor");
  m.def("batch_all_fused(Tensor a_factors, Tensor r_factors, Tensor a_slack, Tensor r_slack, Tensor members, "
        "Tensor in_class, Tensor valid, Tensor? self_cols, int own_start, bool take_sqrt, Tensor d_ap_exact, "
        "float margin, bool soft, int distance, bool sorted, Tensor(a!)? weights, int tile_rows) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("semi_hard_fused(Tensor a_factors, Tensor r_factors, Tensor a_slack, Tensor r_slack, Tensor members, "
        "Tensor in_class, Tensor? self_cols, int own_start, bool take_sqrt, Tensor d_ap_exact, Tensor rtol, "
        "bool cosine, int tile_rows) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metricloss_native, CPU, m) {
  m.impl("batch_all_epilogue", &batch_all_epilogue);
  m.impl("semi_hard_select", &semi_hard_select);
  m.impl("prepare_block", &prepare_block);
  m.impl("semi_hard_fused", &semi_hard_fused);
  m.impl("batch_all_fused", &batch_all_fused);
}
