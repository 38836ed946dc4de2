#pragma once
/// \file moments.cuh
/// Moments of a set of values (count, mean, sum of squared deviations) and Chan's parallel
/// merge. Host and device: the CPU tests exercise exactly the code the kernels run.

#include <cstdint>

#if defined(__CUDACC__)
#define INSTNORM_HD __host__ __device__ __forceinline__
#else
#define INSTNORM_HD inline
#endif

namespace instnorm {

/// Partial moments of `count` values, relative to a shift (pivot) chosen by the caller: `mean` is
/// the mean of (x - pivot), `m2` the sum of (x - mean)^2. The count is 64-bit and exact far
/// beyond 2^24; mean and m2 are fp32, which is accurate because the pivot removes the large
/// common offset before anything is summed.
struct Moments {
  float mean = 0.f;
  float m2 = 0.f;
  int64_t count = 0;
};

/// Chan et al.'s pairwise merge. Empty partials are skipped, so a thread, warp or block that saw
/// no values contributes nothing. Not symmetric in rounding: callers that need bit-identical
/// results everywhere merge in a fixed order (lower index first).
INSTNORM_HD Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  Moments r;
  r.count = a.count + b.count;
  const float fb = static_cast<float>(b.count) / static_cast<float>(r.count);
  const float delta = b.mean - a.mean;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * static_cast<float>(a.count) * fb;
  return r;
}

/// Biased variance of the merged set, clamped at 0 (m2 cannot be negative in exact arithmetic).
INSTNORM_HD float variance(const Moments& m) {
  const float v = m.count > 0 ? m.m2 / static_cast<float>(m.count) : 0.f;
  return v > 0.f ? v : 0.f;
}

/// Moments of `n` values held by one thread, computed in two passes over them (mean, then squared
/// deviations from that mean), which keeps m2 accurate for any offset. `get(i)` returns value i
/// already shifted by the pivot.
template <class Get>
INSTNORM_HD Moments local_moments(int n, Get get) {
  Moments m;
  if (n <= 0) return m;
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += get(i);
  const float mean = sum / static_cast<float>(n);
  float m2 = 0.f;
  for (int i = 0; i < n; ++i) {
    const float d = get(i) - mean;
    m2 += d * d;
  }
  m.mean = mean;
  m.m2 = m2;
  m.count = n;
  return m;
}

}  // namespace instnorm
