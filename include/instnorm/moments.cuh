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

/// Partial moments of `count` values, relative to a shift (pivot) chosen by the caller: the mean
/// of (x - pivot) is the unevaluated sum mean + mean_lo (a float-float pair), `var` the mean of
/// (x - mean)^2 (the biased variance). The count is 64-bit and exact far beyond 2^24.
///
/// Why two floats for the mean: the pivot (a value of the plane) removes a large common offset,
/// but it can itself lie far from the mean (an outlier; by Samuelson's inequality at most
/// sqrt(count - 1) standard deviations), and a single fp32 mean relative to it would then carry
/// |mean - pivot| * 2^-24 of error into every output. The low part keeps what the high part
/// rounds away, at every step (thread, block, exchange), so the error of the mean stays a few
/// ulps of the standard deviation for any data. mean_lo is last so that {mean, var, count}
/// initializers keep their meaning.
struct Moments {
  float mean = 0.f;
  float var = 0.f;
  int64_t count = 0;
  float mean_lo = 0.f;
};

/// s + e == a + b exactly, s = fl(a + b) (Knuth's TwoSum; no ordering of |a|, |b| needed).
INSTNORM_HD void two_sum(float a, float b, float& s, float& e) {
  s = a + b;
  const float bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

/// Chan et al.'s pairwise merge, in variance form, where `a` holds at least as many values as
/// `b` (a running accumulation of pieces that do not grow, e.g. a thread's chunks):
/// var = fa*var_a + fb*var_b + fa*fb*delta^2 with fa, fb the two shares of the count, and the
/// mean moves from a by fb * delta, so the rounding of that step is at most
/// 2^-24 * fb * |delta| <= 2^-24 * sqrt(fa * fb) * |delta| <= 2^-24 * std of the merged set;
/// TwoSum keeps the rest in mean_lo. Empty partials are skipped. `Count` converts the counts:
/// int where the caller knows they fit (a thread's chunks; the 64-bit conversions made the
/// streamed kernels spill), int64_t otherwise.
template <class Count = int64_t>
INSTNORM_HD Moments merge_into(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  Moments r;
  r.count = a.count + b.count;
  // Each share from its own count: fa = 1 - fb would carry fb's rounding as a large relative
  // error when fa is small. One reciprocal, correctly rounded on both sides (the same bits):
  // __frcp_rn has no slow path, where a division's made the streamed kernels spill.
#if defined(__CUDA_ARCH__)
  const float inv = __frcp_rn(static_cast<float>(static_cast<Count>(r.count)));
#else
  const float inv = 1.f / static_cast<float>(static_cast<Count>(r.count));
#endif
  const float fa = static_cast<float>(static_cast<Count>(a.count)) * inv;
  const float fb = static_cast<float>(static_cast<Count>(b.count)) * inv;
  const float delta = (b.mean - a.mean) + (b.mean_lo - a.mean_lo);
  float e;
  two_sum(a.mean, delta * fb, r.mean, e);
  r.mean_lo = a.mean_lo + e;
  // (delta*fa)*(delta*fb): never larger than delta^2, so no intermediate overflow.
  r.var = fa * a.var + fb * b.var + (delta * fa) * (delta * fb);
  return r;
}

/// Chan's merge of any two partials: from the larger one (merge_into), so the mean's step is
/// rounded at most 2^-24 std. The roles swap exactly (negated delta, commuted sums and
/// products), so the result depends only on the order in which callers pass the partials:
/// callers that need bit-identical results everywhere merge in a fixed order (lower index
/// first). Empty partials are skipped, so a thread, warp or block that saw no values
/// contributes nothing.
INSTNORM_HD Moments merge(const Moments& a, const Moments& b) {
  return b.count > a.count ? merge_into(b, a) : merge_into(a, b);
}

/// A partial's share of `total` values (0 for an empty one).
INSTNORM_HD float share_of(int64_t count, int64_t total) {
  // A correctly rounded reciprocal times the count (the same bits on both sides): a division's
  // slow path made the exchange's registers spill.
#if defined(__CUDA_ARCH__)
  const float inv = __frcp_rn(static_cast<float>(total));
#else
  const float inv = 1.f / static_cast<float>(total);
#endif
  return count > 0 ? static_cast<float>(count) * inv : 0.f;
}

/// The two stages of a combine by shares f_i = count_i / total (the same two-level formula as
/// Chan's merge, as sums instead of pairwise merges): first a = sum(f_i * mean_i) (high parts),
/// then, from each partial's deviation d_i = (mean_i - a) + mean_lo_i, r = sum(f_i * d_i) and
/// q = sum(f_i * (var_i + d_i^2)); the result is mean a + r and var q - r^2. The deviations
/// are small next to the means (the same offset is in a and mean_i), so r carries what a
/// rounds away, including the error of shares that do not add up to exactly 1; and r is the
/// rounding of a, so r^2 is negligible next to q (no cancellation). Empty partials add 0.
/// The second stage's two sums of SharesCombine.
struct ShareSums {
  float res = 0.f;  ///< sum(f_i * d_i)
  float sq = 0.f;   ///< sum(f_i * (var_i + d_i^2))
  INSTNORM_HD ShareSums& operator+=(const ShareSums& o) {
    res += o.res;
    sq += o.sq;
    return *this;
  }
};
struct SharesCombine {
  float f, hi, lo, var;
  INSTNORM_HD SharesCombine(const Moments& m, int64_t total)
      : SharesCombine(share_of(m.count, total), m) {}
  /// With the share f = share_of(m.count, total) computed by the caller (once for several
  /// partials of one count).
  INSTNORM_HD SharesCombine(float f_, const Moments& m)
      : f(f_), hi(m.mean), lo(m.mean_lo), var(m.var) {}
  INSTNORM_HD float first() const { return f * hi; }
  INSTNORM_HD ShareSums second(float a) const {
    const float d = (hi - a) + lo;
    return ShareSums{f * d, f * fmaf(d, d, var)};
  }
  static INSTNORM_HD Moments result(float a, ShareSums s, int64_t total) {
    return Moments{a, s.sq - s.res * s.res, total > 0 ? total : 0, s.res};
  }
};

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

/// 2^e for |e| <= 126, exactly: on the device built from its bits (ldexpf's range checks cost
/// instructions on every plane of the staged kernel, where planes have a few elements).
INSTNORM_HD float exp2i(int e) {
#if defined(__CUDA_ARCH__)
  return __int_as_float((127 + e) << 23);
#else
  return ldexpf(1.f, e);
#endif
}

/// 1 / n correctly rounded (the same bits as the division; on the device without its slow path).
INSTNORM_HD float reciprocal(float n) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(n);
#else
  return 1.f / n;
#endif
}

/// What turning a thread's sums into moments needs of its count n alone (1 / n, h = 2^-k and
/// 1 / h^2, k = deviation_shift(n)): computed once where a thread turns several channels' sums
/// into moments. Computed per channel, the reciprocal's slow-path check (a call) kept ptxas from
/// sharing it across channels, one of the per-channel costs behind the on-chip NHWC kernel's
/// 26-30% more executed instructions since the float-float moments (docs/perf-notes.md).
struct SumScale {
  int n;
  float inv_n, h, inv_h2;
  INSTNORM_HD SumScale(int n_, float h_, float inv_h2_)
      : n(n_), inv_n(reciprocal(static_cast<float>(n_))), h(h_), inv_h2(inv_h2_) {}
  /// From k = deviation_shift(n). ldexpf, not exp2i: with exp2i, ptxas (nvcc 13.0) left
  /// nhwc_on_chip spilling 28-36 bytes on sm_90.
  INSTNORM_HD SumScale(int n_, int k) : SumScale(n_, ldexpf(1.f, -k), ldexpf(1.f, 2 * k)) {}
  /// The same from exp2i (no range checks): where ptxas keeps it spill-free.
  static INSTNORM_HD SumScale by_bits(int n_, int k) {
    return SumScale(n_, exp2i(-k), exp2i(2 * k));
  }
  /// by_bits(n, deviation_shift(n)) with 1 / n from the caller (reciprocal(n), kept where one
  /// count serves many sums).
  static INSTNORM_HD SumScale with_reciprocal(int n_, float inv_n_) {
    const int k = deviation_shift(n_);
    SumScale s(n_, exp2i(-k), exp2i(2 * k), inv_n_);
    return s;
  }

 private:
  INSTNORM_HD SumScale(int n_, float h_, float inv_h2_, float inv_n_)
      : n(n_), inv_n(inv_n_), h(h_), inv_h2(inv_h2_) {}
};

/// Moments of n values from the sums of a two-pass local computation: c is the local centre
/// (plain mean of the values), s1 = sum(d) and s2 = h^2 * sum(d^2) over d = x - c, with
/// h = 2^-k (k = deviation_shift(n); the caller scales each small group of squares, e.g. one
/// vector's, before adding it). The mean is relative to `pivot`, as the exact pair
/// (c - pivot) + s1 / n rounded once into mean + mean_lo: values all equal to the pivot give
/// exactly 0 (a constant plane normalizes to exactly 0).
INSTNORM_HD Moments moments_from_sums(const SumScale& sc, float c, float s1, float s2,
                                      float pivot) {
  Moments m;
  if (sc.n <= 0) return m;
  // s1 / n, correctly rounded by one Newton step on the reciprocal's quotient (a division's
  // slow path costs registers): exact where the deviations are all equal, as on a constant
  // plane, so that its mean relative to a pivot of its own value is exactly 0.
  const float q0 = s1 * sc.inv_n;
  const float dm = fmaf(fmaf(-q0, static_cast<float>(sc.n), s1), sc.inv_n, q0);
  float hi, e;
  two_sum(c, -pivot, hi, e);  // c - pivot exactly
  two_sum(hi, e + dm, m.mean, m.mean_lo);
  // var = (sum(d^2) - s1*dm) / n, in the scaled domain: s1*dm <= sum(d^2), and (s1*h)*(dm*h)
  // keeps each factor small.
  const float v = (s2 - (s1 * sc.h) * (dm * sc.h)) * sc.inv_n * sc.inv_h2;
  m.var = v < 0.f ? 0.f : v;
  m.count = sc.n;
  return m;
}
INSTNORM_HD Moments moments_from_sums(int n, float c, int k, float s1, float s2, float pivot) {
  return moments_from_sums(SumScale(n, k), c, s1, s2, pivot);
}

/// Moments of `n` values held by one thread, relative to `pivot`, computed in two passes over
/// them (local mean, then deviations from it), which keeps var accurate for any offset. `get(i)`
/// returns value i (not shifted).
template <class Get>
INSTNORM_HD Moments local_moments(int n, Get get, float pivot) {
  if (n <= 0) return Moments{};
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += get(i);
  const float c = sum / static_cast<float>(n);
  const int k = deviation_shift(n);
  const float h2 = exp2i(-2 * k);
  float s1 = 0.f, s2 = 0.f;
  for (int i = 0; i < n; ++i) {
    const float d = get(i) - c;
    s1 += d;
    s2 = fmaf(d * d, h2, s2);
  }
  return moments_from_sums(SumScale::by_bits(n, k), c, s1, s2, pivot);
}

/// The statistics a normalize uses, from moments relative to `pivot`: center is the mean
/// rounded to fp32 and residual the rest (pivot + mean + mean_lo - center, to fp32), so that
/// x - center is exact where x is near the mean and y = (x - center - residual) * rstd keeps
/// the residual when |mean| >> std.
struct CenterResidual {
  float center, residual;
};
INSTNORM_HD CenterResidual center_of(float pivot, const Moments& m) {
  float hi, e;
  two_sum(pivot, m.mean, hi, e);
  CenterResidual r;
  two_sum(hi, e + m.mean_lo, r.center, r.residual);
  return r;
}

}  // namespace instnorm
