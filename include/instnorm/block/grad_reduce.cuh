#pragma once
/// \file block/grad_reduce.cuh
/// The backward's partial (GradSums: the float-float sum of x - c and the sums of g and
/// g * (x - c)) and its all-reductions across a group of lanes and across a block, in a fixed
/// order, every lane ending with the same bits.

#include "../moments.cuh"

namespace instnorm {
namespace detail {

/// The sums of one backward unit (or part of one): s0 = sum of (x - c) as the float-float pair
/// (s0_hi, s0_lo); a = sum of w * d and b = sum of w * d * (x - c), with w the element's gamma in
/// GroupNorm (1 in instance norm, whose gamma multiplies the plane's sums afterwards).
struct GradSums {
  float s0_hi = 0.f, s0_lo = 0.f, a = 0.f, b = 0.f;
};

/// The sum of two partials. Symmetric to the bit (TwoSum's error term is the exact rounding
/// error whatever the order), so both partners of a butterfly end with the same bits.
INSTNORM_HD GradSums combine(const GradSums& x, const GradSums& y) {
  GradSums r;
  float e;
  two_sum(x.s0_hi, y.s0_hi, r.s0_hi, e);
  r.s0_lo = (x.s0_lo + y.s0_lo) + e;
  r.a = x.a + y.a;
  r.b = x.b + y.b;
  return r;
}

/// Adds v to the float-float s0: x - c of an outlier 1e6 std from c would otherwise take the
/// other values' low bits with it.
INSTNORM_HD void add_compensated(GradSums& s, float v) {
  float e;
  two_sum(s.s0_hi, v, s.s0_hi, e);
  s.s0_lo += e;
}

__device__ __forceinline__ GradSums shfl_xor(const GradSums& v, int o) {
  GradSums r;
  r.s0_hi = __shfl_xor_sync(0xffffffffu, v.s0_hi, o);
  r.s0_lo = __shfl_xor_sync(0xffffffffu, v.s0_lo, o);
  r.a = __shfl_xor_sync(0xffffffffu, v.a, o);
  r.b = __shfl_xor_sync(0xffffffffu, v.b, o);
  return r;
}

/// Butterfly all-reduce over aligned groups of `lanes` (a power of two <= 32) lanes.
__device__ __forceinline__ GradSums warp_allreduce(GradSums v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v = combine(v, shfl_xor(v, o));
  return v;
}

/// Shared storage of the backward's block reductions and exchange.
struct GradReduceStorage {
  GradSums warp[32];
  GradSums exchanged;
};

/// All-reduce over the block: warp butterflies, then every thread adds the warps' sums in order.
__device__ __forceinline__ GradSums block_allreduce(GradSums v, GradReduceStorage& st) {
  v = warp_allreduce(v, 32);
  if ((threadIdx.x & 31) == 0) st.warp[threadIdx.x >> 5] = v;
  __syncthreads();
  GradSums r = st.warp[0];
#pragma unroll 1
  for (int w = 1; w < int(blockDim.x >> 5); ++w) r = combine(r, st.warp[w]);
  __syncthreads();  // st.warp is reused by the next reduction
  return r;
}

}  // namespace detail
}  // namespace instnorm
