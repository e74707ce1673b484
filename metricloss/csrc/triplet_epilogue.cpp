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
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

enum DistanceKind : int64_t { kEuclidean = 0, kSquaredEuclidean = 1, kCosine = 2 };

// scale_distance_weights_ on one entry: W/d then nan/±inf -> 0 (Euclidean), 2W (squared), W (cosine).
template <typename T>
inline T scale_weight(T w, T d, int64_t kind) {
  if (kind == kEuclidean) {
    const T q = w / d;
    return (q - q) == T(0) ? q : T(0);  // finite test without a library call, so loops over it vectorise
  }
  if (kind == kSquaredEuclidean) return w * T(2);
  return w;
}

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
          row_count += (s != T(0));
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
// lim_k = nearest_k * (1 + rtol) (+ rtol for cosine), the first index; else the first farthest negative.
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
                          int64_t self_col, double rtol, bool cosine, int64_t* o) {
  const T inf = std::numeric_limits<T>::infinity();
  const T scale = static_cast<T>(1.0 + rtol);
  const T offset = cosine ? static_cast<T>(rtol) : T(0);
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
    if (rtol > 0) {
      const T t = best * scale;
      lim = t + offset;
    }
    for (int64_t j = 0; j < m; ++j) {
      const T d = row[j];
      if (d > b && d <= lim) { o[k] = j; break; }
    }
  }
}

template <typename T>
void semi_hard_rows(T* dist, const T* bound, const int64_t* members, const bool* in_class, const int64_t* self_cols,
                    int64_t c, int64_t m, int64_t width, double rtol, bool cosine, int64_t* out) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      semi_hard_row(dist + i * m, m, bound + i * width, members + i * width, in_class + i * width, width,
                    self_cols != nullptr ? self_cols[i] : int64_t(-1), rtol, cosine, out + i * width);
  });
}

at::Tensor semi_hard_select(at::Tensor dist, const at::Tensor& bound, const at::Tensor& members,
                            const at::Tensor& in_class, const c10::optional<at::Tensor>& self_cols, double rtol,
                            bool cosine) {
  TORCH_CHECK(dist.device().is_cpu() && dist.dim() == 2 && dist.is_contiguous(),
              "semi_hard_select: dist must be a contiguous 2-D CPU tensor");
  const int64_t c = dist.size(0), m = dist.size(1), width = members.size(1);
  TORCH_CHECK(bound.is_contiguous() && bound.scalar_type() == dist.scalar_type() && bound.size(0) == c &&
                  bound.size(1) == width,
              "semi_hard_select: bound must be contiguous (c, W) of dist's dtype");
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
                             in_class.data_ptr<bool>(), self_ptr, c, m, width, rtol, cosine,
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
// The bound of a slot is tie_bound(d_ap) = d_ap * (1 + rtol) (+ rtol for cosine) of the block's own
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
                          int64_t own_start, bool take_sqrt, const T* d_ap_exact, double rtol, bool cosine,
                          int64_t* out, bool* redo) {
  const T inf = std::numeric_limits<T>::infinity();
  const T scale = static_cast<T>(1.0 + rtol);
  const T offset = static_cast<T>(rtol);
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
        const T b = d * scale;
        bound[k] = cosine ? b + offset : b;
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
          if (rtol > 0) {
            const T tl = best[k] * scale;
            lim[k] = cosine ? tl + offset : tl;
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
                                                   bool take_sqrt, const at::Tensor& d_ap_exact, double rtol,
                                                   bool cosine, int64_t tile_rows) {
  const int64_t* self_ptr = check_fused_operands("semi_hard_fused", a_factors, r_factors, a_slack, r_slack, members,
                                                  in_class, self_cols, own_start, d_ap_exact, tile_rows);
  const int64_t c = a_factors.size(0), m = r_factors.size(0), width = members.size(1);
  auto out = at::empty({c, width}, members.options());
  auto redo = at::empty({c}, members.options().dtype(at::kBool));
  for_each_gram_tile(a_factors, r_factors, c10::nullopt, tile_rows, [&](at::Tensor& tile, int64_t s, int64_t t) {
    AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "semi_hard_fused", [&] {
      semi_hard_fused_rows<scalar_t>(tile.data_ptr<scalar_t>(), s, t, m, width, a_slack.data_ptr<scalar_t>(),
                                     r_slack.data_ptr<scalar_t>(), members.data_ptr<int64_t>(),
                                     in_class.data_ptr<bool>(), self_ptr, own_start, take_sqrt,
                                     d_ap_exact.data_ptr<scalar_t>(), rtol, cosine, out.data_ptr<int64_t>(),
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


// ----------------------------------------------------------------------------------------------------
// Batch-all over the batch itself (the reference set is the batch; metricloss/ops/triplet.py, the
// "self-pair" native path): every unordered pair {i, j} once, for both of its anchors.
//
// The distance matrix is symmetric, so the chunked path's three GEMMs per ordered pair (the block, W~·r,
// W~ᵀ·a) are wasteful: here the anchors are walked in panels I = [s, s + t) against the columns j >= s
// only (the upper triangle), and one cell (i, j), i < j, serves anchor i (negative j: the "row view") and
// anchor j (negative i: the "column view"). Per panel:
//
//   1. G = x_I · (−2x_{s:})ᵀ (cosine: −x), one GEMM of t × (N − s) × D;
//   2. every cell gives the two Gram values the chunked path would have computed for (i, j) and (j, i),
//      u_ij = (G + ‖x_i‖²) + ‖x_j‖² and u_ji = (G + ‖x_j‖²) + ‖x_i‖² (cosine: G + 1 for both): the GEMM
//      factors there are [x, ‖x‖², 1] and [−2x, 1, ‖x‖²], whose products for (i, j) and (j, i) are the same
//      numbers but for the order of the last two, so these are bitwise the chunked path's values where the
//      BLAS sums each dot product in index order (MKL does: tests/ops/test_native.py checks it). Each is
//      clamped at 0, replaced by the exact ‖x_i − x_j‖² (cosine: 1 − x_i·x_j) where it is small
//      (cancellation-prone: u < slack_i + slack_j, as the chunked path's refinement tests it), and √'d;
//   3. the hinge of each view against its anchor's thresholds t_p = d_ap + margin (d_ap as the chunked
//      path takes it): the active slots (c of them; counts per slot k_p, packed), c·d for the loss sum
//      (Σ_p t_p·k_p − Σ c·d once the counts are complete), and the cell's gradient weight
//      s_ij = ρ_i·W~(−c_ij, d_ij) + ρ_j·W~(−c_ji, d_ji) (c: active slots of the view, W~ as scale_weight,
//      ρ the optional per-anchor upstream scale), written over G, and its row and column sums (ws);
//   4. the gradient of the negatives by two GEMMs over the panel: acc_I += S·x_{s:} and
//      acc_{s:} += Sᵀ·x_I, so acc_i = Σ_j s_ij·x_j.
//
// Flops: the block and each gradient GEMM cover half the pairs, 1.5 GEMMs of N × N × D against the
// chunked path's 3. After the panels the positive pairs (few per anchor) add their weights
// ρ_i·W~(k_p, d_ap) to acc, and grad = ws·x − acc (cosine: −acc), ws the rows' weight sums.
//
// Inside a panel the columns are cut into blocks of `col_block` that threads take whole: a column's
// running sums are the block's own; a row's (the panel's t anchors) are per thread, added up after the
// block loop. Active counts are packed 4 slots per integer (8-bit fields for float, 16-bit for double):
// one add per cell per 4 slots instead of four; a field counts at most col_block (row) or t (column)
// cells before it is flushed, so both are bounded by the field width (checked by the op).

// The fewest rows of a panel GEMM: the BLAS computes a GEMM of very few rows with another kernel, whose
// rounding differs from the wide one's (MKL: 1 to 5 rows), and every cell's Gram value must be the
// chunked path's. The driver passes panels of at least this many rows; a short last panel is merged.
constexpr int64_t kMinPanelRows = 32;

template <typename T>
struct PackedCounts;
template <>
struct PackedCounts<float> {
  using type = uint32_t;
  static constexpr int kBits = 8;
};
template <>
struct PackedCounts<double> {
  using type = uint64_t;
  static constexpr int kBits = 16;
};

template <typename T>
struct SelfPairArgs {
  const T* x;      // (N, D) rows, for exact small entries
  const T* sq;     // (N,) squared norms (the chunked path's Gram factors)
  const T* slack;  // (N,) small-entry bound halves
  const T* cls;    // (N,) class ids, as T (exact: checked by the driver)
  const T* thr;    // (4·GROUPS, N) thresholds d_ap + margin, slot-major; -inf for padding and invalid slots
  const T* bnd;    // (4·GROUPS, N) their bounds on u (sqrt_compare_bound), slot-major
  const T* scale;  // (N,) upstream scale per anchor (ones without one)
  int64_t n, dim;
};

// The exact value of a small entry (i, j): ‖x_i − x_j‖² (cosine: 1 − x_i·x_j), clamped at 0.
template <typename T, int64_t KIND>
inline T exact_entry(const SelfPairArgs<T>& A, int64_t i, int64_t j) {
  const T* xi = A.x + i * A.dim;
  const T* xj = A.x + j * A.dim;
  T acc = 0;
  if (KIND == kCosine) {
    for (int64_t k = 0; k < A.dim; ++k) acc += xi[k] * xj[k];
    acc = T(1) - acc;
  } else {
    for (int64_t k = 0; k < A.dim; ++k) {
      const T e = xi[k] - xj[k];
      acc += e * e;
    }
  }
  return acc < T(0) ? T(0) : acc;
}

// Four slots of one view of a cell: the active count and the packed active bits. A slot is active when
// u < b_p, b_p the slot's bound on the squared distance (see sqrt_compare_bound): the same decision as
// t_p − √u > 0, without the square root. Branch-free: it runs inside the vectorised cell loop.
template <typename T>
inline void active4(T u, bool neg, T b0, T b1, T b2, T b3, T& count, typename PackedCounts<T>::type& packed) {
  using Cnt = typename PackedCounts<T>::type;
  constexpr int kBits = PackedCounts<T>::kBits;
  const bool a0 = neg & (u < b0), a1 = neg & (u < b1), a2 = neg & (u < b2), a3 = neg & (u < b3);
  count += ((a0 ? T(1) : T(0)) + (a1 ? T(1) : T(0))) + ((a2 ? T(1) : T(0)) + (a3 ? T(1) : T(0)));
  packed = ((a0 ? Cnt(1) : Cnt(0)) | (a1 ? (Cnt(1) << kBits) : Cnt(0))) |
           ((a2 ? (Cnt(1) << (2 * kBits)) : Cnt(0)) | (a3 ? (Cnt(1) << (3 * kBits)) : Cnt(0)));
}

// The bound b on u >= 0 (or NaN) with u < b exactly when t − d > 0, d = √u rounded (SQRT) or d = u:
// the smallest b with fl(√b) >= t. √ rounds correctly, so fl(√·) is monotone and the set of u it puts
// below t is [0, b). Found from fl(t²) by a step or two of one ulp; t <= 0 or NaN: 0 (nothing is below).
template <typename T, bool SQRT>
inline T sqrt_compare_bound(T t) {
  const T inf = std::numeric_limits<T>::infinity();
  if (!(t > T(0))) return T(0);
  if (!SQRT || t == inf) return t;
  T b = t * t;
  if (b == inf) return inf;  // every finite u has √u < t
  while (b > T(0) && std::sqrt(std::nextafter(b, T(0))) >= t) b = std::nextafter(b, T(0));
  while (std::sqrt(b) < t) b = std::nextafter(b, inf);
  return b;
}

// The per-column arrays of one block (cb columns) and the per-cell row results of one row segment.
template <typename T>
struct SelfPairBlockArrays {
  T* csum;                                // (cb,) column hinge sums
  T* cws;                                 // (cb,) column weight sums
  typename PackedCounts<T>::type* cpack;  // (GROUPS, cb) column packed counts
  T* rowh;                                // (cb,) the row's hinge sum per cell
  T* rowws;                               // (cb,) the row's weight per cell
  typename PackedCounts<T>::type* rowpk;  // (GROUPS, cb) the row's packed bits per cell
};

// A row's bounds b for 4·GROUPS slots (a column's are slot-major in SelfPairArgs::bnd).
template <typename T>
struct RowSlots {
  T b[12];
};

// One cell (i, j), i < j: both views (steps 2-3 above), results into the block arrays at jc = j − j0.
// Every array comes in as a plain pointer (not through SelfPairArgs), so the vectoriser sees
// loop-invariant bases.
//
// The vectorised cell (REFINE false) takes one square root: the row view's d_ij = √u_ij. Its decisions
// are exact for both views (each compares its own u with its own anchor's bounds); the column view's hinge
// terms and both views' weight use d_ij for d_ji, which differs from it by the rounding of u (the two sums
// of the same three numbers), so sums and the gradient differ from the chunked path's at rounding level
// and counts not at all. The scalar cell (REFINE, rows with a small entry) takes both roots.
template <typename T, int GROUPS, int64_t KIND, bool WEIGHTS, bool REFINE>
inline void self_pair_cell(const SelfPairArgs<T>& A, const T* __restrict sq, const T* __restrict slack,
                           const T* __restrict cls, const T* __restrict bnd,
                           const T* __restrict scale, int64_t n, T* __restrict prow, int64_t i, int64_t j, int64_t jc,
                           int64_t cb, T ni, T si, T ci, T rsi, const RowSlots<T>& R, const SelfPairBlockArrays<T>& B) {
  using Cnt = typename PackedCounts<T>::type;
  const T g = prow[j];
  T ur, uc;
  if (KIND == kCosine) {
    ur = g + T(1);
    uc = ur;
  } else {
    const T nj = sq[j];
    ur = (g + ni) + nj;
    uc = (g + nj) + ni;
  }
  ur = ur < T(0) ? T(0) : ur;
  uc = uc < T(0) ? T(0) : uc;
  const bool neg = cls[j] != ci;
  if (REFINE) {
    const T b = si + slack[j];
    if (neg && (ur < b || uc < b)) {
      const T e = exact_entry<T, KIND>(A, i, j);
      if (ur < b) ur = e;
      if (uc < b) uc = e;
    }
  }
  const T dr = KIND == kEuclidean ? std::sqrt(ur) : ur;
  const T dc = KIND == kEuclidean ? (REFINE ? std::sqrt(uc) : dr) : uc;
  const T* bc = bnd + j;  // the column anchor's bounds, slot-major
  T crow = 0, ccol = 0;
  Cnt r0, c0;
  active4(ur, neg, R.b[0], R.b[1], R.b[2], R.b[3], crow, r0);
  active4(uc, neg, bc[0], bc[n], bc[2 * n], bc[3 * n], ccol, c0);
  B.rowpk[jc] = r0;
  B.cpack[jc] += c0;
  if (GROUPS > 1) {
    Cnt r1, c1;
    active4(ur, neg, R.b[4], R.b[5], R.b[6], R.b[7], crow, r1);
    active4(uc, neg, bc[4 * n], bc[5 * n], bc[6 * n], bc[7 * n], ccol, c1);
    B.rowpk[cb + jc] = r1;
    B.cpack[cb + jc] += c1;
  }
  if (GROUPS > 2) {
    Cnt r2, c2;
    active4(ur, neg, R.b[8], R.b[9], R.b[10], R.b[11], crow, r2);
    active4(uc, neg, bc[8 * n], bc[9 * n], bc[10 * n], bc[11 * n], ccol, c2);
    B.rowpk[2 * cb + jc] = r2;
    B.cpack[2 * cb + jc] += c2;
  }
  // the distance part of the hinge sums, Σ c·d per view (the threshold part, Σ_p t_p·k_p, comes from the
  // counts after the panels)
  B.rowh[jc] = crow * dr;
  B.csum[jc] += ccol * dc;
  if (WEIGHTS) {
    // s = ρ_i·W~(−c_ij, d_ij) + ρ_j·W~(−c_ji, d_ji), with W~ as scale_weight (0 where not finite: a zero
    // distance, the subgradient); Euclidean over one division (REFINE: each view over its own root)
    T w;
    if (KIND == kEuclidean) {
      if (REFINE) {
        w = rsi * scale_weight(-crow, dr, KIND) + scale[j] * scale_weight(-ccol, dc, KIND);
      } else {
        const T q = -(rsi * crow + scale[j] * ccol) / dr;
        w = (q - q) == T(0) ? q : T(0);
      }
    } else {
      w = -(rsi * crow + scale[j] * ccol);
      if (KIND == kSquaredEuclidean) w = w * T(2);
    }
    prow[j] = w;
    B.rowws[jc] = w;
    B.cws[jc] += w;
  }
}

// Unpack 4 slot counts of one packed counter into int64 counts.
template <typename T>
inline void add_packed(int64_t* out, typename PackedCounts<T>::type packed) {
  constexpr int kBits = PackedCounts<T>::kBits;
  using Cnt = typename PackedCounts<T>::type;
  const Cnt mask = (Cnt(1) << kBits) - 1;
  for (int p = 0; p < 4; ++p) out[p] += static_cast<int64_t>((packed >> (kBits * p)) & mask);
}

// Per-thread scratch of the panel epilogue: the block's per-column and per-cell arrays, and the running
// sums and counts of the panel's rows.
template <typename T>
struct SelfPairScratch {
  std::vector<T> csum, cws, rowh, rowws;
  std::vector<typename PackedCounts<T>::type> cpack, rowpk;
  std::vector<double> row_sum, row_ws;
  std::vector<int64_t> row_cnt;
};

// Global per-anchor results of the column views (each block owns its columns) and of the rows.
struct SelfPairTotals {
  double* sum;   // (N,) Σ c·d over the anchor's cells (the distance part of its hinge sum)
  double* ws;    // (N,) weight sums (the rowsum/colsum term of the gradient)
  int64_t* cnt;  // (N, slots) active counts per slot
  int64_t slots;
};

// The cells of panel rows [s, s + t) in columns [j0, j1) (one block): both views, column results into
// the totals (the block owns its columns), row results into the thread's scratch.
template <typename T, int GROUPS, int64_t KIND, bool WEIGHTS>
inline __attribute__((always_inline)) void self_pair_block_impl(const SelfPairArgs<T>& A, T* panel, int64_t s,
                                                                 int64_t t, int64_t mp, int64_t j0, int64_t j1,
                                                                 SelfPairScratch<T>& sc, const SelfPairTotals& tot) {
  using Cnt = typename PackedCounts<T>::type;
  const int64_t cb = j1 - j0;
  SelfPairBlockArrays<T> B{sc.csum.data(), sc.cws.data(), sc.cpack.data(), sc.rowh.data(), sc.rowws.data(),
                           sc.rowpk.data()};
  std::fill(B.csum, B.csum + cb, T(0));
  std::fill(B.cws, B.cws + cb, T(0));
  std::fill(B.cpack, B.cpack + GROUPS * cb, Cnt(0));
  constexpr int kSlots = 4 * GROUPS;
  const T* __restrict sq = A.sq;
  const T* __restrict slack = A.slack;
  const T* __restrict cls = A.cls;
  const T* __restrict bnd = A.bnd;
  const T* __restrict scale = A.scale;
  const int64_t n = A.n;
  for (int64_t ii = 0; ii < t; ++ii) {
    const int64_t i = s + ii;
    T* __restrict prow = panel + ii * mp - s;  // prow[j]: cell (i, j), j >= s
    const int64_t jb = std::max(j0, i + 1);
    if (WEIGHTS)
      for (int64_t j = j0; j < std::min(jb, j1); ++j) prow[j] = T(0);  // j <= i: the lower triangle and the own cell
    if (jb >= j1) continue;
    const T ni = sq[i], si = slack[i], ci = cls[i];
    const T rsi = scale[i];
    RowSlots<T> R;
    for (int k = 0; k < 12; ++k) R.b[k] = k < kSlots ? bnd[k * n + i] : T(0);
    // a. is any negative entry of the segment small, in either view? (rare: then the scalar loop)
    int small = 0;
#pragma omp simd reduction(| : small)
    for (int64_t j = jb; j < j1; ++j) {
      const T g = prow[j];
      T ur, uc;
      if (KIND == kCosine) {
        ur = g + T(1);
        uc = ur;
      } else {
        ur = (g + ni) + sq[j];
        uc = (g + sq[j]) + ni;
      }
      ur = ur < T(0) ? T(0) : ur;
      uc = uc < T(0) ? T(0) : uc;
      const T b = si + slack[j];
      small |= ((cls[j] != ci) & ((ur < b) | (uc < b))) ? 1 : 0;
    }
    // b. both views of every cell. The row's per-cell results go to small arrays (reduced below), so the
    //    cell loop carries no value from one cell to the next and vectorises as an element-wise loop.
    if (!small) {
#pragma omp simd
      for (int64_t j = jb; j < j1; ++j)
        self_pair_cell<T, GROUPS, KIND, WEIGHTS, false>(A, sq, slack, cls, bnd, scale, n, prow, i, j, j - j0, cb,
                                                          ni, si, ci, rsi, R, B);
    } else {
      for (int64_t j = jb; j < j1; ++j)
        self_pair_cell<T, GROUPS, KIND, WEIGHTS, true>(A, sq, slack, cls, bnd, scale, n, prow, i, j, j - j0, cb,
                                                         ni, si, ci, rsi, R, B);
    }
    T rsum = 0, rws = 0;
    Cnt rp0 = 0, rp1 = 0, rp2 = 0;
#pragma omp simd reduction(+ : rsum, rws, rp0, rp1, rp2)
    for (int64_t jc = jb - j0; jc < cb; ++jc) {
      rsum += B.rowh[jc];
      if (WEIGHTS) rws += B.rowws[jc];
      rp0 += B.rowpk[jc];
      if (GROUPS > 1) rp1 += B.rowpk[cb + jc];
      if (GROUPS > 2) rp2 += B.rowpk[2 * cb + jc];
    }
    sc.row_sum[ii] += rsum;
    sc.row_ws[ii] += rws;
    int64_t* rc = sc.row_cnt.data() + ii * kSlots;
    add_packed<T>(rc, rp0);
    if (GROUPS > 1) add_packed<T>(rc + 4, rp1);
    if (GROUPS > 2) add_packed<T>(rc + 8, rp2);
  }
  for (int64_t jc = 0; jc < cb; ++jc) {
    const int64_t j = j0 + jc;
    tot.sum[j] += B.csum[jc];
    tot.ws[j] += B.cws[jc];
    for (int g4 = 0; g4 < GROUPS; ++g4) {
      int64_t tmp[4] = {0, 0, 0, 0};
      add_packed<T>(tmp, B.cpack[g4 * cb + jc]);
      for (int p = 0; p < 4; ++p) tot.cnt[j * tot.slots + 4 * g4 + p] += tmp[p];
    }
  }
}

// The block loop compiled three times: for the baseline ISA the extension is built for, for AVX2 (twice
// the vector width), and for AVX-512 (256-bit vectors, but 32 registers and mask registers: no spills in
// the cell loop; measured faster than 512-bit vectors on this loop), chosen at run time by what the CPU
// has, up to the caller's `max_isa`. All give the same counts (no FMA contraction: -ffp-contract=off;
// √ and division round correctly); sums and gradients agree up to summation order.
template <typename T, int GROUPS, int64_t KIND, bool WEIGHTS>
void self_pair_block_base(const SelfPairArgs<T>& A, T* panel, int64_t s, int64_t t, int64_t mp, int64_t j0,
                          int64_t j1, SelfPairScratch<T>& sc, const SelfPairTotals& tot) {
  self_pair_block_impl<T, GROUPS, KIND, WEIGHTS>(A, panel, s, t, mp, j0, j1, sc, tot);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define METRICLOSS_X86_CLONES 1
template <typename T, int GROUPS, int64_t KIND, bool WEIGHTS>
__attribute__((target("avx2"))) void self_pair_block_avx2(const SelfPairArgs<T>& A, T* panel, int64_t s, int64_t t,
                                                          int64_t mp, int64_t j0, int64_t j1, SelfPairScratch<T>& sc,
                                                          const SelfPairTotals& tot) {
  self_pair_block_impl<T, GROUPS, KIND, WEIGHTS>(A, panel, s, t, mp, j0, j1, sc, tot);
}

template <typename T, int GROUPS, int64_t KIND, bool WEIGHTS>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=256"))) void self_pair_block_avx512(
    const SelfPairArgs<T>& A, T* panel, int64_t s, int64_t t, int64_t mp, int64_t j0, int64_t j1,
    SelfPairScratch<T>& sc, const SelfPairTotals& tot) {
  self_pair_block_impl<T, GROUPS, KIND, WEIGHTS>(A, panel, s, t, mp, j0, j1, sc, tot);
}
#endif

// The widest clone the CPU runs: 0 baseline, 1 AVX2, 2 AVX-512 (F, VL, BW, DQ).
inline int64_t cpu_isa() {
#ifdef METRICLOSS_X86_CLONES
  static const int64_t isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                                 ? 2
                                 : (__builtin_cpu_supports("avx2") ? 1 : 0);
  return isa;
#else
  return 0;
#endif
}

template <typename T, int GROUPS, int64_t KIND, bool WEIGHTS>
void self_pair_panels(const SelfPairArgs<T>& A, const at::Tensor& x, at::Tensor& acc, int64_t tile_rows,
                      int64_t col_block, int64_t max_isa, const SelfPairTotals& tot) {
  const int64_t n = A.n;
  constexpr int kSlots = 4 * GROUPS;
  // the block GEMM's right factor: −2x (cosine −x), the chunked path's R = [−2x, 1, ‖x‖²] without its tail
  const at::Tensor right = KIND == kCosine ? x.neg() : x.mul(-2.0);
  const int64_t max_rows = std::min(tile_rows + kMinPanelRows - 1, n);
  at::Tensor buffer = at::empty({max_rows * n}, x.options());
  const int threads = at::get_num_threads();
  std::vector<SelfPairScratch<T>> scratch(threads);
  for (auto& sc : scratch) {
    sc.csum.resize(col_block);
    sc.cws.resize(col_block);
    sc.rowh.resize(col_block);
    sc.rowws.resize(col_block);
    sc.cpack.resize(GROUPS * col_block);
    sc.rowpk.resize(GROUPS * col_block);
    sc.row_sum.resize(max_rows);
    sc.row_ws.resize(max_rows);
    sc.row_cnt.resize(max_rows * kSlots);
  }
  const int64_t isa = std::min(max_isa, cpu_isa());
  for (int64_t s = 0, t = 0; s < n; s += t) {
    // a last panel shorter than kMinPanelRows joins this one
    t = n - s < tile_rows + kMinPanelRows ? n - s : tile_rows;
    const int64_t mp = n - s;
    at::Tensor panel = buffer.narrow(0, 0, t * mp).view({t, mp});
    at::mm_out(panel, x.narrow(0, s, t), right.narrow(0, s, mp).t());  // 1. G
    for (auto& sc : scratch) {
      std::fill(sc.row_sum.begin(), sc.row_sum.end(), 0.0);
      std::fill(sc.row_ws.begin(), sc.row_ws.end(), 0.0);
      std::fill(sc.row_cnt.begin(), sc.row_cnt.end(), int64_t(0));
    }
    T* pp = panel.data_ptr<T>();
    const int64_t blocks = (mp + col_block - 1) / col_block;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {  // 2-3. both views, S over G
      SelfPairScratch<T>& sc = scratch[at::get_thread_num()];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = s + b * col_block, j1 = std::min(n, j0 + col_block);
#ifdef METRICLOSS_X86_CLONES
        if (isa == 2) {
          self_pair_block_avx512<T, GROUPS, KIND, WEIGHTS>(A, pp, s, t, mp, j0, j1, sc, tot);
          continue;
        }
        if (isa == 1) {
          self_pair_block_avx2<T, GROUPS, KIND, WEIGHTS>(A, pp, s, t, mp, j0, j1, sc, tot);
          continue;
        }
#endif
        self_pair_block_base<T, GROUPS, KIND, WEIGHTS>(A, pp, s, t, mp, j0, j1, sc, tot);
      }
    });
    (void)isa;
    for (const auto& sc : scratch)
      for (int64_t ii = 0; ii < t; ++ii) {
        tot.sum[s + ii] += sc.row_sum[ii];
        tot.ws[s + ii] += sc.row_ws[ii];
        for (int k = 0; k < kSlots; ++k) tot.cnt[(s + ii) * kSlots + k] += sc.row_cnt[ii * kSlots + k];
      }
    if (WEIGHTS) {  // 4. the negatives' gradient: acc_I += S·x_{s:}, acc_{s:} += Sᵀ·x_I
      at::Tensor acc_rows = acc.narrow(0, s, t);
      acc_rows.addmm_(panel, x.narrow(0, s, mp));
      at::Tensor acc_cols = acc.narrow(0, s, mp);
      acc_cols.addmm_(panel.t(), x.narrow(0, s, t));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_all_self(
    const at::Tensor& x, const at::Tensor& sq, const at::Tensor& slack, const at::Tensor& cls,
    const at::Tensor& members, const at::Tensor& valid, const at::Tensor& d_ap, double margin, int64_t distance,
    const c10::optional<at::Tensor>& scale, bool want_grad, int64_t tile_rows, int64_t col_block, int64_t max_isa) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "batch_all_self: x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "batch_all_self: x must be float32 or float64");
  const int64_t n = x.size(0), dim = x.size(1), width = members.size(1);
  auto vec_ok = [&](const at::Tensor& v) {
    return v.is_contiguous() && v.scalar_type() == x.scalar_type() && v.dim() == 1 && v.size(0) == n;
  };
  TORCH_CHECK(vec_ok(sq) && vec_ok(slack) && vec_ok(cls), "batch_all_self: sq, slack and cls must be contiguous (N,) of x's dtype");
  TORCH_CHECK(members.is_contiguous() && members.scalar_type() == at::kLong && members.dim() == 2 && members.size(0) == n,
              "batch_all_self: members must be contiguous (N, W) int64");
  TORCH_CHECK(valid.is_contiguous() && valid.scalar_type() == at::kBool && valid.sizes() == members.sizes(),
              "batch_all_self: valid must be contiguous (N, W) bool");
  TORCH_CHECK(d_ap.is_contiguous() && d_ap.scalar_type() == x.scalar_type() && d_ap.sizes() == members.sizes(),
              "batch_all_self: d_ap must be contiguous (N, W) of x's dtype");
  TORCH_CHECK(width >= 1 && width <= 12, "batch_all_self: 1 to 12 positive slots");
  TORCH_CHECK(distance >= 0 && distance <= 2, "batch_all_self: unknown distance kind");
  const int64_t field_max = x.scalar_type() == at::kFloat ? 255 : 65535;
  TORCH_CHECK(tile_rows >= kMinPanelRows && tile_rows + kMinPanelRows - 1 <= field_max && col_block >= 1 &&
                  col_block <= field_max,
              "batch_all_self: tile_rows must be in [", kMinPanelRows, ", ", field_max - kMinPanelRows + 1,
              "] and col_block in [1, ", field_max, "]");
  TORCH_CHECK(n >= kMinPanelRows, "batch_all_self: at least ", kMinPanelRows, " rows");
  if (scale.has_value()) TORCH_CHECK(vec_ok(*scale), "batch_all_self: scale must be contiguous (N,) of x's dtype");
  const int groups = static_cast<int>((width + 3) / 4);
  const int64_t slots = 4 * groups;
  auto sums = at::zeros({n}, x.options().dtype(at::kDouble));
  auto wsum = at::zeros({n}, x.options().dtype(at::kDouble));
  auto counts = at::zeros({n, slots}, members.options());
  at::Tensor acc = want_grad ? at::zeros({n, dim}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_all_self", [&] {
    using T = scalar_t;
    const T inf = std::numeric_limits<T>::infinity();
    // the thresholds, slot-major: t_p = d_ap + margin for valid slots, -inf (never active) otherwise
    std::vector<T> thr(static_cast<size_t>(slots) * n, -inf);
    const T* dap = d_ap.data_ptr<T>();
    const bool* val = valid.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < width; ++k)
        if (val[i * width + k]) thr[k * n + i] = dap[i * width + k] + static_cast<T>(margin);
    std::vector<T> bnd(thr.size());
    for (size_t k = 0; k < thr.size(); ++k)
      bnd[k] = distance == kEuclidean ? sqrt_compare_bound<T, true>(thr[k]) : sqrt_compare_bound<T, false>(thr[k]);
    std::vector<T> ones;
    if (!scale.has_value()) ones.assign(n, T(1));
    const T* rs = scale.has_value() ? scale->data_ptr<T>() : ones.data();
    SelfPairArgs<T> A{x.data_ptr<T>(), sq.data_ptr<T>(), slack.data_ptr<T>(), cls.data_ptr<T>(), thr.data(),
                      bnd.data(), rs, n, dim};
    SelfPairTotals tot{sums.data_ptr<double>(), wsum.data_ptr<double>(), counts.data_ptr<int64_t>(), slots};
    auto run = [&](auto groups_c, auto kind_c) {
      constexpr int G = decltype(groups_c)::value;
      constexpr int64_t K = decltype(kind_c)::value;
      if (want_grad)
        self_pair_panels<T, G, K, true>(A, x, acc, tile_rows, col_block, max_isa, tot);
      else
        self_pair_panels<T, G, K, false>(A, x, acc, tile_rows, col_block, max_isa, tot);
    };
    auto by_kind = [&](auto groups_c) {
      if (distance == kEuclidean)
        run(groups_c, std::integral_constant<int64_t, kEuclidean>());
      else if (distance == kSquaredEuclidean)
        run(groups_c, std::integral_constant<int64_t, kSquaredEuclidean>());
      else
        run(groups_c, std::integral_constant<int64_t, kCosine>());
    };
    if (groups == 1)
      by_kind(std::integral_constant<int, 1>());
    else if (groups == 2)
      by_kind(std::integral_constant<int, 2>());
    else
      by_kind(std::integral_constant<int, 3>());
    // the hinge sums: Σ_p Σ_{n active} (t_p − d_n) = Σ_p t_p·k_p − Σ_n c_n·d_n, the panels gave the second
    for (int64_t i = 0; i < n; ++i) {
      double thresholds = 0.0;
      for (int64_t k = 0; k < width; ++k) {
        const int64_t c = tot.cnt[i * slots + k];
        if (c > 0) thresholds += static_cast<double>(thr[k * n + i]) * static_cast<double>(c);
      }
      tot.sum[i] = thresholds - tot.sum[i];
    }
    if (want_grad) {
      // the positive pairs: weight ρ_i·W~(k_p, d_ap) on (i, p), into both rows' accumulators
      T* ac = acc.data_ptr<T>();
      double* ws = tot.ws;
      const T* xs = x.data_ptr<T>();
      const int64_t* mem = members.data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < width; ++k) {
          if (!val[i * width + k]) continue;
          const int64_t p = mem[i * width + k];
          const T w = rs[i] * scale_weight(static_cast<T>(tot.cnt[i * slots + k]), dap[i * width + k], distance);
          if (w == T(0)) continue;
          T* ai = ac + i * dim;
          T* ap = ac + p * dim;
          const T* xi = xs + i * dim;
          const T* xp = xs + p * dim;
          for (int64_t d = 0; d < dim; ++d) {
            ai[d] += w * xp[d];
            ap[d] += w * xi[d];
          }
          ws[i] += w;
          ws[p] += w;
        }
    }
  });
  at::Tensor grad;
  if (want_grad) {
    // grad_i = Σ_j s_ij·(x_i − x_j) = (Σ_j s_ij)·x_i − acc_i (Euclidean kinds); cosine (∂d/∂x_i = −x_j): −acc_i
    grad = acc.neg_();
    if (distance != kCosine) grad.addcmul_(wsum.to(x.scalar_type()).unsqueeze(1), x);
  }
  auto nonzero = counts.sum(1);
  return {sums.to(x.scalar_type()), nonzero, want_grad ? grad : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY(metricloss_native, m) {
  m.def("batch_all_epilogue(Tensor(a!) dist, Tensor d_ap, Tensor members, Tensor in_class, Tensor valid, "
        "Tensor? self_cols, float margin, bool soft, int distance, bool sorted, bool want_weights) "
        "-> (Tensor, Tensor)");
  m.def("prepare_block(Tensor(a!) u, Tensor a_slack, Tensor r_slack, Tensor members, Tensor in_class, "
        "Tensor? self_cols, int own_start, bool take_sqrt) -> Tensor");
  m.def("semi_hard_select(Tensor(a!) dist, Tensor bound, Tensor members, Tensor in_class, Tensor? self_cols, "
        "float rtol, bool cosine) -> Tensor");
  m.def("batch_all_fused(Tensor a_factors, Tensor r_factors, Tensor a_slack, Tensor r_slack, Tensor members, "
        "Tensor in_class, Tensor valid, Tensor? self_cols, int own_start, bool take_sqrt, Tensor d_ap_exact, "
        "float margin, bool soft, int distance, bool sorted, Tensor(a!)? weights, int tile_rows) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("semi_hard_fused(Tensor a_factors, Tensor r_factors, Tensor a_slack, Tensor r_slack, Tensor members, "
        "Tensor in_class, Tensor? self_cols, int own_start, bool take_sqrt, Tensor d_ap_exact, float rtol, "
        "bool cosine, int tile_rows) -> (Tensor, Tensor)");
  m.def("batch_all_self(Tensor x, Tensor sq, Tensor slack, Tensor cls, Tensor members, Tensor valid, Tensor d_ap, "
        "float margin, int distance, Tensor? scale, bool want_grad, int tile_rows, int col_block, int max_isa) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metricloss_native, CPU, m) {
  m.impl("batch_all_epilogue", &batch_all_epilogue);
  m.impl("semi_hard_select", &semi_hard_select);
  m.impl("prepare_block", &prepare_block);
  m.impl("semi_hard_fused", &semi_hard_fused);
  m.impl("batch_all_fused", &batch_all_fused);
  m.impl("batch_all_self", &batch_all_self);
}
