#pragma once
/// \file moments.cuh
/// Moments of a set of values (count, mean, mean squared deviation) and Chan's parallel merge.
/// Host and device: the CPU tests exercise exactly the code the kernels run.
///
/// Overflow: the partials carry the variance (m2 / count), not m2, so merging never grows a
/// value beyond the largest squared deviation; and the per-thread sums of squares are taken of
/// deviations scaled by an exact power of two (deviation_scale), so that a thread's sum of up to
/// n squares stays below one square. Values up to +-1e18 (squares 1e36, near fp32's 3.4e38) keep
/// finite statistics on planes of any length.

#include <cstdint>

#if defined(__CUDACC__)
#define INSTNORM_HD __host__ __device__ __forceinline__
#else
#define INSTNORM_HD inline
#endif

namespace instnorm {

/// Partial moments of `count` values, relative to a shift (pivot) chosen by the caller: `mean` is
/// the mean of (x - pivot), `var` the mean of (x - mean)^2 (the biased variance). The count is
/// 64-bit and exact far beyond 2^24; mean and var are fp32, which is accurate because the pivot
/// removes the large common offset before anything is summed.
struct Moments {
  float mean = 0.f;
  float var = 0.f;
  int64_t count = 0;
};

/// Chan et al.'s pairwise merge, in variance form: var = fa*var_a + fb*var_b + fa*fb*delta^2
/// with fa, fb the two shares of the count. Empty partials are skipped, so a thread, warp or
/// block that saw no values contributes nothing. Not symmetric in rounding: callers that need
/// bit-identical results everywhere merge in a fixed order (lower index first).
INSTNORM_HD Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  Moments r;
  r.count = a.count + b.count;
  const float n = static_cast<float>(r.count);
  const float fa = static_cast<float>(a.count) / n, fb = static_cast<float>(b.count) / n;
  const float delta = b.mean - a.mean;
  r.mean = a.mean + delta * fb;
  // (delta*fa)*(delta*fb): never larger than delta^2, so no intermediate overflow.
  r.var = fa * a.var + fb * b.var + (delta * fa) * (delta * fb);
  return r;
}

/// Biased variance of the merged set, clamped at 0 (NaN stays NaN: a plane holding NaN or Inf
/// must come out NaN).
INSTNORM_HD float variance(const Moments& m) { return m.count > 0 && m.var < 0.f ? 0.f : m.var; }

/// The exact power of two h = 2^-ceil(log2(n)/2) (1 for n <= 1): a sum of n squares of
/// deviations scaled by h is at most the largest unscaled square, so it cannot overflow where the
/// squares themselves do not; and scaling by a power of two adds no rounding.
INSTNORM_HD float deviation_scale(int n) {
  int k = 0;
  while ((int64_t(1) << (2 * k)) < int64_t(n)) ++k;  // 4^k >= n
  float h = 1.f;
  for (int i = 0; i < k; ++i) h *= 0.5f;
  return h;
}

/// Moments of n values from the running sums of a two-pass local computation: c is the local
/// centre (plain mean of the values, minus nothing), s1 = sum(h*d) and s2 = sum((h*d)^2) over
/// d = x - c with h = deviation_scale(n). mean and var are relative to `pivot`.
INSTNORM_HD Moments moments_from_sums(int n, float c, float h, float s1, float s2, float pivot) {
  Moments m;
  if (n <= 0) return m;
  const float inv_n = 1.f / static_cast<float>(n);
  const float dm = s1 * inv_n;  // mean deviation, scaled by h
  m.mean = (c - pivot) + dm / h;
  // var = (s2 - s1*dm) / (n*h^2): divide by n first and by h twice, which stays finite.
  const float v = (s2 - s1 * dm) * inv_n / h / h;
  m.var = v < 0.f ? 0.f : v;
  m.count = n;
  return m;
}

/// Moments of `n` values held by one thread, computed in two passes over them (mean, then scaled
/// squared deviations from that mean), which keeps var accurate for any offset. `get(i)` returns
/// value i already shifted by the pivot.
template <class Get>
INSTNORM_HD Moments local_moments(int n, Get get) {
  if (n <= 0) return Moments{};
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += get(i);
  const float c = sum / static_cast<float>(n);
  const float h = deviation_scale(n);
  float s1 = 0.f, s2 = 0.f;
  for (int i = 0; i < n; ++i) {
    const float d = (get(i) - c) * h;
    s1 += d;
    s2 += d * d;
  }
  return moments_from_sums(n, c, h, s1, s2, 0.f);
}

}  // namespace instnorm
