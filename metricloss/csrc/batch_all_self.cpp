// Batch-all over the batch itself for the CPU path of metricloss (metricloss/ops/native.py builds and loads
// it; metricloss/ops/triplet.py calls it, the "self-pair" path).
//
// Every unordered pair {i, j} once, for both of its anchors.
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
//      clamped at 0 and replaced by the exact ‖x_i − x_j‖² (cosine: 1 − x_i·x_j) where it is small
//      (cancellation-prone: u < slack_i + slack_j, as the chunked path's refinement tests it);
//   3. the hinge of each view against its anchor's thresholds t_p = d_ap + margin (d_ap as the chunked
//      path takes it): a slot is active when u < b_p (sqrt_compare_bound: the exact decision
//      t_p − √u > 0 without the root); the active slots (c of them; counts per slot k_p, packed), the
//      hinge terms themselves for the loss sum, Σ_{p active} (t_p − d) (each term exact where d <= t_p <=
//      2d, Sterbenz; never Σ_p t_p·k_p − Σ c·d, whose two large sums cancel when the hinges are small
//      against the distances: near-equidistant embeddings lost a quarter of the loss), and the cell's gradient
//      weight s_ij = ρ_i·W~(−c_ij, d_ij) + ρ_j·W~(−c_ji, d_ji) (W~ as scale_weight, ρ the optional
//      per-anchor upstream scale; one √ and one division per cell, see self_pair_cell), written over G,
//      and its row and column sums (ws);
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

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "triplet_common.h"

namespace {

using namespace metricloss_native;

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
  const T* bnd;    // (4·GROUPS, N) bounds on u of the thresholds d_ap + margin (sqrt_compare_bound), slot-major;
                   // 0 (never active) for padding and invalid slots
  const T* thr;    // (4·GROUPS, N) the thresholds t_p = d_ap + margin, slot-major; -inf for padding and invalid slots
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

// Four slots of one view of a cell: the active count, the hinge terms t_p − d of the active slots and the
// packed active bits. A slot is active when u < b_p, b_p the slot's bound on the squared distance (see
// sqrt_compare_bound): the same decision as t_p − √u > 0, without the square root. Branch-free: it runs
// inside the vectorised cell loop (inactive slots select 0, never t_p − d: t_p is -inf for invalid ones).
template <typename T>
inline void active4(T u, T d, bool neg, T b0, T b1, T b2, T b3, T t0, T t1, T t2, T t3, T& count, T& hinge,
                    typename PackedCounts<T>::type& packed) {
  using Cnt = typename PackedCounts<T>::type;
  constexpr int kBits = PackedCounts<T>::kBits;
  const bool a0 = neg & (u < b0), a1 = neg & (u < b1), a2 = neg & (u < b2), a3 = neg & (u < b3);
  count += ((a0 ? T(1) : T(0)) + (a1 ? T(1) : T(0))) + ((a2 ? T(1) : T(0)) + (a3 ? T(1) : T(0)));
  hinge += ((a0 ? t0 - d : T(0)) + (a1 ? t1 - d : T(0))) + ((a2 ? t2 - d : T(0)) + (a3 ? t3 - d : T(0)));
  packed = ((a0 ? Cnt(1) : Cnt(0)) | (a1 ? (Cnt(1) << kBits) : Cnt(0))) |
           ((a2 ? (Cnt(1) << (2 * kBits)) : Cnt(0)) | (a3 ? (Cnt(1) << (3 * kBits)) : Cnt(0)));
}

// The bound b on u >= 0 (or NaN) with u < b exactly when t − d > 0, d = √u rounded (SQRT) or d = u:
// the smallest b with fl(√b) >= t. √ rounds correctly, so fl(√·) is monotone and the set of u it puts
// below t is [0, b). Found from fl(t²) by a step or two of one ulp; where that is far off (t² underflows,
// or denormals are flushed to zero, so that every denormal has √ = 0) by bisecting the bit patterns of
// [0, ∞], over which fl(√·) is still monotone: at most 32 or 64 steps instead of up to 2²³ or 2⁵² ulp walks.
// t <= 0 or NaN: 0 (nothing is below).
template <typename T, bool SQRT>
inline T sqrt_compare_bound(T t) {
  using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  const T inf = std::numeric_limits<T>::infinity();
  if (!(t > T(0))) return T(0);
  if (!SQRT || t == inf) return t;
  T b = t * t;
  if (b == inf) return inf;  // every finite u has √u < t
  for (int step = 0; step < 4; ++step) {
    if (b > T(0) && std::sqrt(std::nextafter(b, T(0))) >= t) {
      b = std::nextafter(b, T(0));
    } else if (std::sqrt(b) < t) {
      b = std::nextafter(b, inf);
    } else {
      return b;
    }
  }
  // invariant: fl(√lo) < t <= fl(√hi); lo = +0 (√0 = 0 < t), hi = +∞
  auto from_bits = [](Bits v) { T f; std::memcpy(&f, &v, sizeof(T)); return f; };
  Bits lo = 0, hi;
  std::memcpy(&hi, &inf, sizeof(T));
  while (hi - lo > 1) {
    const Bits mid = lo + (hi - lo) / 2;
    if (std::sqrt(from_bits(mid)) >= t) hi = mid; else lo = mid;
  }
  return from_bits(hi);
}

// A cell's two Gram values, clamped at 0: u_ij (row view) and u_ji (column view) from G = x_i·(−2x_j)
// (cosine: x_i·(−x_j), one value G + 1), in the chunked path's order of the norm terms (step 2 above).
template <typename T, int64_t KIND>
inline void view_values(T g, T ni, T nj, T& ur, T& uc) {
  if (KIND == kCosine) {
    ur = g + T(1);
    uc = ur;
  } else {
    ur = (g + ni) + nj;
    uc = (g + nj) + ni;
  }
  ur = ur < T(0) ? T(0) : ur;
  uc = uc < T(0) ? T(0) : uc;
}

// The per-column arrays of one block (cb columns) and the per-cell row results of one row segment.
template <typename T>
struct SelfPairBlockArrays {
  T* csum;                                // (cb,) column hinge sums
  T* cws;                                 // (cb,) column weight sums
  typename PackedCounts<T>::type* cpack;  // (GROUPS, cb) column packed counts
  T* rowh;                                // (cb,) the row's hinge terms per cell
  T* rowws;                               // (cb,) the row's weight per cell
  typename PackedCounts<T>::type* rowpk;  // (GROUPS, cb) the row's packed bits per cell
};

// A row's bounds b and thresholds t for 4·GROUPS slots (a column's are slot-major in SelfPairArgs::bnd, ::thr).
template <typename T>
struct RowSlots {
  T b[12];
  T t[12];
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
                           const T* __restrict cls, const T* __restrict bnd, const T* __restrict thr,
                           const T* __restrict scale, int64_t n, T* __restrict prow, int64_t i, int64_t j, int64_t jc,
                           int64_t cb, T ni, T si, T ci, T rsi, const RowSlots<T>& R, const SelfPairBlockArrays<T>& B) {
  using Cnt = typename PackedCounts<T>::type;
  T ur, uc;
  view_values<T, KIND>(prow[j], ni, sq[j], ur, uc);
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
  const T* bc = bnd + j;  // the column anchor's bounds and thresholds, slot-major
  const T* tc = thr + j;
  T crow = 0, ccol = 0, hrow = 0, hcol = 0;
  Cnt r0, c0;
  active4(ur, dr, neg, R.b[0], R.b[1], R.b[2], R.b[3], R.t[0], R.t[1], R.t[2], R.t[3], crow, hrow, r0);
  active4(uc, dc, neg, bc[0], bc[n], bc[2 * n], bc[3 * n], tc[0], tc[n], tc[2 * n], tc[3 * n], ccol, hcol, c0);
  B.rowpk[jc] = r0;
  B.cpack[jc] += c0;
  if (GROUPS > 1) {
    Cnt r1, c1;
    active4(ur, dr, neg, R.b[4], R.b[5], R.b[6], R.b[7], R.t[4], R.t[5], R.t[6], R.t[7], crow, hrow, r1);
    active4(uc, dc, neg, bc[4 * n], bc[5 * n], bc[6 * n], bc[7 * n], tc[4 * n], tc[5 * n], tc[6 * n], tc[7 * n],
            ccol, hcol, c1);
    B.rowpk[cb + jc] = r1;
    B.cpack[cb + jc] += c1;
  }
  if (GROUPS > 2) {
    Cnt r2, c2;
    active4(ur, dr, neg, R.b[8], R.b[9], R.b[10], R.b[11], R.t[8], R.t[9], R.t[10], R.t[11], crow, hrow, r2);
    active4(uc, dc, neg, bc[8 * n], bc[9 * n], bc[10 * n], bc[11 * n], tc[8 * n], tc[9 * n], tc[10 * n],
            tc[11 * n], ccol, hcol, c2);
    B.rowpk[2 * cb + jc] = r2;
    B.cpack[2 * cb + jc] += c2;
  }
  // the hinge terms of each view, Σ_{p active} (t_p − d)
  B.rowh[jc] = hrow;
  B.csum[jc] += hcol;
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
  double* sum;   // (N,) the anchor's hinge sum, Σ (t_p − d) over its active cells and slots
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
  const T* __restrict thr = A.thr;
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
    for (int k = 0; k < 12; ++k) {
      R.b[k] = k < kSlots ? bnd[k * n + i] : T(0);
      R.t[k] = k < kSlots ? thr[k * n + i] : -std::numeric_limits<T>::infinity();
    }
    // a. is any negative entry of the segment small, in either view? (rare: then the scalar loop)
    int small = 0;
#pragma omp simd reduction(| : small)
    for (int64_t j = jb; j < j1; ++j) {
      T ur, uc;
      view_values<T, KIND>(prow[j], ni, sq[j], ur, uc);
      const T b = si + slack[j];
      small |= ((cls[j] != ci) & ((ur < b) | (uc < b))) ? 1 : 0;
    }
    // b. both views of every cell. The row's per-cell results go to small arrays (reduced below), so the
    //    cell loop carries no value from one cell to the next and vectorises as an element-wise loop.
    if (!small) {
#pragma omp simd
      for (int64_t j = jb; j < j1; ++j)
        self_pair_cell<T, GROUPS, KIND, WEIGHTS, false>(A, sq, slack, cls, bnd, thr, scale, n, prow, i, j, j - j0, cb,
                                                          ni, si, ci, rsi, R, B);
    } else {
      for (int64_t j = jb; j < j1; ++j)
        self_pair_cell<T, GROUPS, KIND, WEIGHTS, true>(A, sq, slack, cls, bnd, thr, scale, n, prow, i, j, j - j0, cb,
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
// has, up to the caller's `max_isa` (float32; float64 runs the baseline build). All give the same counts (no FMA contraction: -ffp-contract=off;
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
        if constexpr (std::is_same<T, float>::value) {  // fp64 keeps the baseline build (a third of the build)
          if (isa == 2) {
            self_pair_block_avx512<T, GROUPS, KIND, WEIGHTS>(A, pp, s, t, mp, j0, j1, sc, tot);
            continue;
          }
          if (isa == 1) {
            self_pair_block_avx2<T, GROUPS, KIND, WEIGHTS>(A, pp, s, t, mp, j0, j1, sc, tot);
            continue;
          }
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
    SelfPairArgs<T> A{x.data_ptr<T>(), sq.data_ptr<T>(), slack.data_ptr<T>(), cls.data_ptr<T>(), bnd.data(),
                      thr.data(), rs, n, dim};
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

TORCH_LIBRARY_FRAGMENT(metricloss_native, m) {
  m.def("batch_all_self(Tensor x, Tensor sq, Tensor slack, Tensor cls, Tensor members, Tensor valid, Tensor d_ap, "
        "float margin, int distance, Tensor? scale, bool want_grad, int tile_rows, int col_block, int max_isa) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metricloss_native, CPU, m) {
  m.impl("batch_all_self", &batch_all_self);
}
