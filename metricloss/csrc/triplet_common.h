// Shared by the native triplet sources (triplet_epilogue.cpp, batch_all_self.cpp): the distance kinds and
// the one-entry form of metricloss.ops.distance.scale_distance_weights_.
#pragma once

#include <cstdint>

namespace metricloss_native {

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

}  // namespace metricloss_native
