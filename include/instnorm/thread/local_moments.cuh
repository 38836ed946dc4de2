#pragma once
/// \file thread/local_moments.cuh
/// A thread's moments of the values it holds (registers and its shared-memory part), in two
/// passes, relative to the plane's pivot (moments.cuh).

#include "../moments.cuh"
#include "vector.cuh"

namespace instnorm {
namespace detail {

/// Local moments in two passes over a thread's values, relative to the pivot: a plain sum gives a
/// local centre c, then the deviations d = x - c give sum(d) and sum(d^2) (moments_from_sums);
/// accurate for any offset, since c is within rounding of the local mean. Each vector's squares
/// join s2 scaled by 4^-k (4^k >= n), so s2 stays finite for |x| up to ~1e18.
/// The helpers are shared by the register and shared-memory parts.
template <class T, int kVec>
__device__ __forceinline__ void add_values(const Vector<T, kVec>& v, float& sum) {
  float f[kVec];
  unpack(v, f);
#pragma unroll
  for (int k = 0; k < kVec; ++k) sum += f[k];
}
template <class T, int kVec>
__device__ __forceinline__ void add_deviations(const Vector<T, kVec>& v, float c, float h2,
                                               float& s1, float& s2) {
  float f[kVec];
  unpack(v, f);
  float q = 0.f;  // this vector's squares, scaled once (h2 = 4^-k) before joining s2
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const float d = f[k] - c;
    s1 += d;
    q = fmaf(d, d, q);
  }
  s2 = fmaf(q, h2, s2);
}

/// This thread's moments of the valid vectors of a chunk held in registers and, when `svalid`
/// > 0, of its shared-memory part (sm[j * lanes], j < svalid, filled by smem_fill), without a
/// merge: the register part's mean c is the centre of both (its two passes run while the
/// shared-memory copies are in flight). The register part holds at least a third of the values
/// (plan_is_valid: smem_items <= 2 * items), so c lies within sqrt(2) standard deviations of
/// the whole (a subset of share q is within sqrt((1 - q) / q) of the mean), and s2 - s1 * dm
/// carries at most 3 times the rounding of the variance (s2 / n <= 3 var).
/// `extra` (when `has_extra`) is one more value held in a register: a ragged slice's head or
/// tail scalar (RaggedSlice, kernels/nchw.cuh), taken in both passes like the vectors' values;
/// a Chan merge of it afterwards made the register-resident kernels spill.
template <class T, int kVec, int kMaxItems>
__device__ __forceinline__ Moments chunk_moments(const Vector<T, kVec> (&r)[kMaxItems],
                                                 int valid, float pivot,
                                                 const Vector<T, kVec>* sm = nullptr,
                                                 int svalid = 0, int lanes = 0,
                                                 bool has_extra = false, float extra = 0.f) {
  // The shared-memory part follows a full register part.
  if (valid == 0 && !has_extra) return Moments{};
  const int n = (valid + svalid) * kVec + (has_extra ? 1 : 0);
  float sum = has_extra ? extra : 0.f;
#pragma unroll
  for (int j = 0; j < kMaxItems; ++j)
    if (j < valid) add_values(r[j], sum);
  // The centre need only lie near the mean: moments_from_sums takes c - pivot exactly and the
  // deviations' sums carry the rest (on a constant plane, c within 2 ulp of the value makes
  // each deviation exact, Sterbenz, so the mean is still exactly the pivot). So an approximate
  // quotient (two instructions), not an IEEE division with its slow-path check.
  const float c = __fdividef(sum, static_cast<float>(valid * kVec + (has_extra ? 1 : 0)));
  const int k = deviation_shift(n);
  const float h2 = exp2i(-2 * k);
  float s1 = 0.f, s2 = 0.f;
  if (has_extra) {
    s1 = extra - c;
    s2 = s1 * s1 * h2;
  }
#pragma unroll
  for (int j = 0; j < kMaxItems; ++j)
    if (j < valid) add_deviations(r[j], c, h2, s1, s2);
  if (svalid > 0) {
    if constexpr (sizeof(Vector<T, kVec>) == 16) copy_async_wait_all();
    for (int j = 0; j < svalid; ++j) add_deviations(sm[j * lanes], c, h2, s1, s2);
  }
  return moments_from_sums(SumScale::by_bits(n, k), c, s1, s2, pivot);
}

/// chunk_moments' two passes over the first `valid` of a thread's values, already converted to
/// float and held in registers, with the count's constants `sc` (SumScale::by_bits of valid and
/// deviation_shift(valid)) computed by the caller: where every plane of a launch gives a lane
/// the same count (the staged kernel's register instance), once per launch instead of once per
/// plane. A plain sum gives the local centre, the deviations sum(d) and 4^-k * sum(d^2).
template <int kMaxItems>
__device__ __forceinline__ Moments register_moments(const float (&v)[kMaxItems], int valid,
                                                    const SumScale& sc, float pivot) {
  if (valid <= 0) return Moments{};
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxItems; ++j)
    if (j < valid) sum += v[j];
  const float c = sum * sc.inv_n;  // need only lie near the mean (see chunk_moments)
  const float h2 = sc.h * sc.h;    // 4^-k, exactly
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxItems; ++j) {
    if (j < valid) {
      const float d = v[j] - c;
      s1 += d;
      s2 = fmaf(d * d, h2, s2);
    }
  }
  return moments_from_sums(sc, c, s1, s2, pivot);
}

/// Per-channel moments of the kVec channels of a thread's rows (channels-last: a vector is one
/// row's kVec channels), in the same two passes: `rvalid` rows in registers, then `svalid` in
/// shared memory (sm[j * stride], filled by cp.async and waited for here). Gives each channel's
/// local centre c, sum(d) in s1 and sum(d^2) * h^2 in s2 (h = 2^-k), and returns
/// k = deviation_shift(rows).
template <class T, int kVec, int kMaxItems>
__device__ __forceinline__ int channel_moments(const Vector<T, kVec> (&regs)[kMaxItems],
                                               int rvalid, const Vector<T, kVec>* sm, int stride,
                                               int svalid, int rows, float (&c)[kVec],
                                               float (&s1)[kVec], float (&s2)[kVec]) {
  using V = Vector<T, kVec>;
  float acc[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) acc[k] = 0.f;
  const auto add = [&](const V& v) {
    float f[kVec];
    unpack(v, f);
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc[k] += f[k];
  };
#pragma unroll
  for (int q = 0; q < kMaxItems; ++q)
    if (q < rvalid) add(regs[q]);
  if constexpr (sizeof(V) == 16) {
    if (svalid > 0) copy_async_wait_all();
  }
  for (int j = 0; j < svalid; ++j) add(sm[j * stride]);
  const float inv_n = rows > 0 ? 1.f / float(rows) : 0.f;
  const int shift = deviation_shift(rows);
  const float h2 = ldexpf(1.f, -2 * shift);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    c[k] = acc[k] * inv_n;
    s1[k] = 0.f;
    s2[k] = 0.f;
  }
  const auto dev = [&](const V& v) {
    float f[kVec];
    unpack(v, f);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float d = f[k] - c[k];
      s1[k] += d;
      s2[k] = fmaf(d * d, h2, s2[k]);
    }
  };
#pragma unroll
  for (int q = 0; q < kMaxItems; ++q)
    if (q < rvalid) dev(regs[q]);
  for (int j = 0; j < svalid; ++j) dev(sm[j * stride]);
  return shift;
}

}  // namespace detail
}  // namespace instnorm
