#pragma once
/// \file block/reduce.cuh
/// All-reductions of Moments across a group of lanes of a warp and across a block (the
/// exchange among the blocks of a plane is grid/exchange.cuh).
///
/// Hand-written rather than cub::WarpReduce / cub::BlockReduce: the group width is a runtime
/// value here (1..32 lanes, or the whole block), which keeps the library at six kernels per
/// architecture, while CUB needs it at compile time; and every lane must end with the same bits
/// (an all-reduce in a fixed order), where CUB's reductions leave the result in lane 0 only.

#include "../moments.cuh"

namespace instnorm {
namespace detail {

__device__ __forceinline__ Moments shfl_xor(const Moments& m, int offset) {
  Moments r;
  r.mean = __shfl_xor_sync(0xffffffffu, m.mean, offset);
  r.var = __shfl_xor_sync(0xffffffffu, m.var, offset);
  r.count = static_cast<int64_t>(
      __shfl_xor_sync(0xffffffffu, static_cast<long long>(m.count), offset));
  r.mean_lo = __shfl_xor_sync(0xffffffffu, m.mean_lo, offset);
  return r;
}

/// Butterfly all-reduce over aligned groups of `lanes` (a power of two <= 32) lanes of a warp.
/// Both partners merge (lower lane, higher lane), so every lane ends with identical bits.
/// All 32 lanes of the warp must call it.
__device__ __forceinline__ Moments warp_allreduce(Moments m, int lanes) {
  const int lane = threadIdx.x & 31;
  for (int o = 1; o < lanes; o <<= 1) {
    const Moments other = shfl_xor(m, o);
    m = (lane & o) ? merge(other, m) : merge(m, other);
  }
  return m;
}

/// Shared storage of a block's reductions: the warps' sums of block_allreduce_shares and
/// group_wait's broadcast.
struct BlockReduceStorage {
  float mean_sum[32] = {};
  float res_sum[32] = {};
  float var_sum[32] = {};
  Moments exchanged;
};

/// Sums over aligned groups of `lanes` (a power of two <= 32) lanes of a warp, or, with `stride`
/// (a power of two), over the lanes of such a group that are a multiple of `stride` apart, of n
/// independent values in one loop: each step's n shuffles are in flight together (the on-chip
/// NHWC kernel's kVec channels). Both partners of a step add the same two values and IEEE
/// addition is commutative, so every lane of a group ends with the same bits; each value sees
/// the same additions in the same order as alone. All 32 lanes must call it.
template <int n>
__device__ __forceinline__ void butterfly_sums(float (&v)[n], int lanes, int stride = 1) {
  for (int o = stride; o < lanes; o <<= 1) {
    float w[n];
#pragma unroll
    for (int k = 0; k < n; ++k) w[k] = __shfl_xor_sync(0xffffffffu, v[k], o);
#pragma unroll
    for (int k = 0; k < n; ++k) v[k] += w[k];
  }
}
/// The same for n ShareSums: their 2n floats in one butterfly (registers, after unrolling).
template <int n>
__device__ __forceinline__ void butterfly_sums2(ShareSums (&v)[n], int lanes, int stride = 1) {
  float f[2 * n];
#pragma unroll
  for (int k = 0; k < n; ++k) {
    f[2 * k] = v[k].res;
    f[2 * k + 1] = v[k].sq;
  }
  butterfly_sums(f, lanes, stride);
#pragma unroll
  for (int k = 0; k < n; ++k) v[k] = ShareSums{f[2 * k], f[2 * k + 1]};
}
/// One value, and one ShareSums (two independent sums whose shuffles overlap).
__device__ __forceinline__ float butterfly_sum(float v, int lanes, int stride = 1) {
  float a[1] = {v};
  butterfly_sums(a, lanes, stride);
  return a[0];
}
__device__ __forceinline__ ShareSums butterfly_sum2(ShareSums v, int lanes, int stride = 1) {
  ShareSums a[1] = {v};
  butterfly_sums2(a, lanes, stride);
  return a[0];
}

/// All-reduce of partials that together hold `total` values (every caller knows it), by shares
/// (SharesCombine): one butterfly of one float, then one of two. log2(lanes) Chan merges (64-bit
/// counts and a division at every level) took 2.5-4 us per block reduction on the H100 (trace,
/// debug/trace.cuh). Means are relative to the caller's pivot; the shares add up to 1, so no
/// sum exceeds the largest term (values up to 1e18 stay finite).
/// `share`: m's share of the total, share_of(m.count, total), where the caller keeps it (the
/// staged kernel's register instance: every plane of a launch gives a lane the same count).
__device__ __forceinline__ Moments warp_allreduce_shares(const Moments& m, float share,
                                                         int64_t total, int lanes) {
  const SharesCombine s(share, m);
  const float a = butterfly_sum(s.first(), lanes);
  return SharesCombine::result(a, butterfly_sum2(s.second(a), lanes), total);
}
__device__ __forceinline__ Moments warp_allreduce_shares(const Moments& m, int64_t total,
                                                         int lanes) {
  return warp_allreduce_shares(m, share_of(m.count, total), total, lanes);
}

/// The same over the whole block (blockDim.x a multiple of 32): warp sums, then every thread adds
/// the warps' sums in order (two barriers).
__device__ __forceinline__ Moments block_allreduce_shares(const Moments& m, int64_t total,
                                                          BlockReduceStorage& st) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = int(blockDim.x >> 5);
  const SharesCombine s(m, total);
  const float wa = butterfly_sum(s.first(), 32);
  if (lane == 0) st.mean_sum[warp] = wa;
  __syncthreads();
  float a = 0.f;
#pragma unroll 1
  for (int w = 0; w < warps; ++w) a += st.mean_sum[w];
  const ShareSums wrq = butterfly_sum2(s.second(a), 32);
  if (lane == 0) {
    st.res_sum[warp] = wrq.res;
    st.var_sum[warp] = wrq.sq;
  }
  __syncthreads();
  ShareSums rq;
#pragma unroll 1
  for (int w = 0; w < warps; ++w) rq += ShareSums{st.res_sum[w], st.var_sum[w]};
  return SharesCombine::result(a, rq, total);
}


}  // namespace detail
}  // namespace instnorm
