#pragma once
/// \file moments.cuh
/// Moments of a set of values (count, mean, mean squared deviation) and Chan's parallel merge.
/// Host and device: the CPU tests exercise exactly the code the kernels run.
///
/// Overflow: the partials carry the variance (m2 / count), not m2, so merging never grows a
/// value beyond the largest squared deviation; and a thread adds its squares in small groups (one
/// vector's) scaled by an exact power of two (deviation_shift), so that its sum of n squares
/// stays below one square: one multiply-add per vector. Values up to +-1e18 (squares 1e36, near
/// fp32's 3.4e38) keep finite statistics on planes of any length.

#include <cmath>
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
  const float fb = static_cast<float>(b.count) / static_cast<float>(r.count);
  const float fa = 1.f - fb;  // one division: merges sit on the exchange's critical path
  const float delta = b.mean - a.mean;
  r.mean = a.mean + delta * fb;
  // (delta*fa)*(delta*fb): never larger than delta^2, so no intermediate overflow.
  r.var = fa * a.var + fb * b.var + (delta * fa) * (delta * fb);
  return r;
}

/// Biased variance of the merged set, clamped at 0 (NaN stays NaN: a plane holding NaN or Inf
/// must come out NaN).
INSTNORM_HD float variance(const Moments& m) { return m.count > 0 && m.var < 0.f ? 0.f : m.var; }

/// k with 4^k >= n: a sum of n squares scaled by h^2 = 4^-k is no larger than the largest
/// unscaled square, so it cannot overflow where the squares themselves do not; and scaling by a
/// power of two adds no rounding. k = ceil(bits / 2) with n <= 2^bits; on the device bits comes
/// from one count-leading-zeros (it sits between a plane's last load and its exchange).
INSTNORM_HD int deviation_shift(int n) {
#if defined(__CUDA_ARCH__)
  const int bits = 32 - __clz(n > 1 ? n - 1 : 0);
#else
  int bits = 0;
  while (bits < 31 && (int64_t(1) << bits) < int64_t(n)) ++bits;
#endif
  return (bits + 1) >> 1;
}

/// Moments of n values from the sums of a two-pass local computation: c is the local centre
/// (plain mean of the values), s1 = sum(d) and s2 = h^2 * sum(d^2) over d = x - c, with
/// h = 2^-k (k = deviation_shift(n); the caller scales each small group of squares, e.g. one
/// vector's, before adding it). mean and var are relative to `pivot`.
INSTNORM_HD Moments moments_from_sums(int n, float c, int k, float s1, float s2, float pivot) {
  Moments m;
  if (n <= 0) return m;
  const float inv_n = 1.f / static_cast<float>(n);
  const float h = ldexpf(1.f, -k), inv_h2 = ldexpf(1.f, 2 * k);  // exact
  const float dm = s1 * inv_n;
  m.mean = (c - pivot) + dm;
  // var = (sum(d^2) - s1*dm) / n, in the scaled domain: s1*dm <= sum(d^2), and (s1*h)*(dm*h)
  // keeps each factor small.
  const float v = (s2 - (s1 * h) * (dm * h)) * inv_n * inv_h2;
  m.var = v < 0.f ? 0.f : v;
  m.count = n;
  return m;
}

/// Moments of `n` values held by one thread, computed in two passes over them (mean, then squared
/// deviations from that mean), which keeps var accurate for any offset. `get(i)` returns value i
/// already shifted by the pivot.
template <class Get>
INSTNORM_HD Moments local_moments(int n, Get get) {
  if (n <= 0) return Moments{};
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += get(i);
  const float c = sum / static_cast<float>(n);
  const int k = deviation_shift(n);
  const float h2 = ldexpf(1.f, -2 * k);
  float s1 = 0.f, s2 = 0.f;
  for (int i = 0; i < n; ++i) {
    const float d = get(i) - c;
    s1 += d;
    s2 = fmaf(d * d, h2, s2);
  }
  return moments_from_sums(n, c, k, s1, s2, 0.f);
}

}  // namespace instnorm
