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
#include <limits>
#include <numeric>
#include <vector>

namespace {

enum DistanceKind : int64_t { kEuclidean = 0, kSquaredEuclidean = 1, kCosine = 2 };

// scale_distance_weights_ on one entry: W/d then nan/±inf -> 0 (Euclidean), 2W (squared), W (cosine).
template <typename T>
inline T scale_weight(T w, T d, int64_t kind) {
  if (kind == kEuclidean) {
    T q = w / d;
    return std::isfinite(q) ? q : T(0);
  }
  if (kind == kSquaredEuclidean) return w * T(2);
  return w;
}

// torch's softplus (beta 1, threshold 20) and sigmoid
template <typename T>
inline T softplus(T z) { return z > T(20) ? z : std::log1p(std::exp(z)); }
template <typename T>
inline T sigmoid(T z) { return T(1) / (T(1) + std::exp(-z)); }

template <typename T>
void batch_all_rows(T* dist, const T* d_ap, const int64_t* members, const bool* in_class, const bool* valid,
                    const int64_t* self_cols, int64_t c, int64_t m, int64_t width, T margin, bool soft,
                    int64_t kind, bool sorted, bool want_weights, T* sums, int64_t* nonzero) {
  const T inf = std::numeric_limits<T>::infinity();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> thr(width), prefix(width + 1), pos_w(width);
    std::vector<int64_t> slot(width), hist(width + 1);
    for (int64_t i = begin; i < end; ++i) {
      T* row = dist + i * m;
      const T* ap = d_ap + i * width;
      const int64_t* mem = members + i * width;
      const bool* inc = in_class + i * width;
      const bool* val = valid + i * width;
      // hide the own class and the own column from the negatives
      for (int64_t k = 0; k < width; ++k)
        if (inc[k]) row[mem[k]] = inf;
      if (self_cols != nullptr && self_cols[i] >= 0) row[self_cols[i]] = inf;
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
        for (int64_t v = 0; v < nv; ++v) thr[v] = ap[slot[v]] + margin;
        std::vector<int64_t> counts(nv, 0);
        for (int64_t j = 0; j < m; ++j) {
          const T d = row[j];
          int64_t above = 0;
          for (int64_t v = 0; v < nv; ++v) {
            const T h = thr[v] - d;  // [t_p - d]_+
            const bool active = h > T(0);
            row_sum += active ? h : T(0);
            counts[v] += active;
            above += active;
          }
          row_count += above;
          if (want_weights) row[j] = scale_weight(static_cast<T>(-above), d, kind);
        }
        for (int64_t v = 0; v < nv; ++v) pos_w[slot[v]] = static_cast<T>(counts[v]);
      }
      sums[i] = static_cast<T>(row_sum);
      nonzero[i] = row_count;
      if (want_weights) {
        // the positives' weights scaled by d_ap, added into their columns (own-class cells carry 0)
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t k = slot[v];
          row[mem[k]] += scale_weight(pos_w[k], ap[k], kind);
        }
      }
    }
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
void semi_hard_rows(T* dist, const T* bound, const int64_t* members, const bool* in_class, const int64_t* self_cols,
                    int64_t c, int64_t m, int64_t width, double rtol, bool cosine, int64_t* out) {
  const T inf = std::numeric_limits<T>::infinity();
  const T scale = static_cast<T>(1.0 + rtol);
  const T offset = cosine ? static_cast<T>(rtol) : T(0);
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = dist + i * m;
      const T* bd = bound + i * width;
      const int64_t* mem = members + i * width;
      const bool* inc = in_class + i * width;
      for (int64_t k = 0; k < width; ++k)
        if (inc[k]) row[mem[k]] = inf;
      if (self_cols != nullptr && self_cols[i] >= 0) row[self_cols[i]] = inf;
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
      int64_t* o = out + i * width;
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
template <typename T>
void prepare_rows(T* u, const T* a_slack, const T* r_slack, const int64_t* members, const bool* in_class,
                  const int64_t* self_cols, int64_t own_start, int64_t c, int64_t m, int64_t width, bool take_sqrt,
                  bool* redo) {
  const T inf = std::numeric_limits<T>::infinity();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hidden_col;
    std::vector<T> hidden_val;
    for (int64_t i = begin; i < end; ++i) {
      T* row = u + i * m;
      const int64_t* mem = members + i * width;
      const bool* inc = in_class + i * width;
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
      if (self_cols != nullptr && self_cols[i] >= 0) hide(self_cols[i]);
      T lowest = inf;
      for (int64_t j = 0; j < m; ++j) {
        T v = row[j];
        v = v < T(0) ? T(0) : v;
        const T slack = v - r_slack[j];
        lowest = slack < lowest ? slack : lowest;
        row[j] = take_sqrt ? std::sqrt(v) : v;
      }
      redo[i] = lowest < a_slack[i];
      for (size_t h = 0; h < hidden_col.size(); ++h) {
        const T v = hidden_val[h] < T(0) ? T(0) : hidden_val[h];
        row[hidden_col[h]] = take_sqrt ? std::sqrt(v) : v;
      }
      if (own_start >= 0) row[own_start + i] = T(0);
    }
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

}  // namespace

TORCH_LIBRARY(metricloss_native, m) {
  m.def("batch_all_epilogue(Tensor(a!) dist, Tensor d_ap, Tensor members, Tensor in_class, Tensor valid, "
        "Tensor? self_cols, float margin, bool soft, int distance, bool sorted, bool want_weights) "
        "-> (Tensor, Tensor)");
  m.def("prepare_block(Tensor(a!) u, Tensor a_slack, Tensor r_slack, Tensor members, Tensor in_class, "
        "Tensor? self_cols, int own_start, bool take_sqrt) -> Tensor");
  m.def("semi_hard_select(Tensor(a!) dist, Tensor bound, Tensor members, Tensor in_class, Tensor? self_cols, "
        "float rtol, bool cosine) -> Tensor");
}

TORCH_LIBRARY_IMPL(metricloss_native, CPU, m) {
  m.impl("batch_all_epilogue", &batch_all_epilogue);
  m.impl("semi_hard_select", &semi_hard_select);
  m.impl("prepare_block", &prepare_block);
}
