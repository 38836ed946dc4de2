#pragma once
/// \file detail/reduce.cuh
/// All-reductions of Moments across a group of lanes, a block, and the blocks of a plane.
///
/// Hand-written rather than cub::WarpReduce / cub::BlockReduce: the group width is a runtime
/// value here (1..32 lanes, or the whole block), which keeps the library at six kernels per
/// architecture, while CUB needs it at compile time; and every lane must end with the same bits
/// (an all-reduce in a fixed order), where CUB's reductions leave the result in lane 0 only.

#include <cuda/atomic>

#include "../moments.cuh"

namespace instnorm {
namespace detail {

__device__ __forceinline__ Moments shfl_xor(const Moments& m, int offset) {
  Moments r;
  r.mean = __shfl_xor_sync(0xffffffffu, m.mean, offset);
  r.var = __shfl_xor_sync(0xffffffffu, m.var, offset);
  r.count = static_cast<int64_t>(
      __shfl_xor_sync(0xffffffffu, static_cast<long long>(m.count), offset));
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
  float var_sum[32] = {};
  Moments exchanged;
};

/// Sum over aligned groups of `lanes` (a power of two <= 32) lanes of a warp. Both partners of a
/// step add the same two values and IEEE addition is commutative, so every lane of a group ends
/// with the same bits. All 32 lanes must call it.
__device__ __forceinline__ float butterfly_sum(float v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// A partial's share of `total` values (0 for an empty one).
__device__ __forceinline__ float share_of(int64_t count, int64_t total) {
  return count > 0 ? static_cast<float>(count) / static_cast<float>(total) : 0.f;
}

/// All-reduce of partials that together hold `total` values (every caller knows it), by their
/// shares f = count / total instead of pairwise merges: mean = sum(f * mean_i), then var =
/// sum(f * (var_i + (mean_i - mean)^2)); the same two-level formula as Chan's merge, as two
/// butterfly sums of one float each. log2(lanes) Chan merges (64-bit counts and a division at
/// every level) took 2.5-4 us per block reduction on the H100 (trace, detail/trace.cuh). Means
/// are relative to the caller's pivot, so the weighted sum does not cancel; the shares add up to
/// 1, so no sum exceeds the largest term (values up to 1e18 stay finite). Empty partials add 0.
__device__ __forceinline__ Moments warp_allreduce_shares(const Moments& m, int64_t total,
                                                         int lanes) {
  const float f = share_of(m.count, total);
  const float mean = butterfly_sum(f * m.mean, lanes);
  const float d = m.mean - mean;
  const float var = butterfly_sum(f * fmaf(d, d, m.var), lanes);
  return Moments{mean, var, total > 0 ? total : 0};
}

/// The same over the whole block (blockDim.x a multiple of 32): warp sums, then every thread adds
/// the warps' sums in order (two barriers).
__device__ __forceinline__ Moments block_allreduce_shares(const Moments& m, int64_t total,
                                                          BlockReduceStorage& s) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = int(blockDim.x >> 5);
  const float f = share_of(m.count, total);
  const float a = butterfly_sum(f * m.mean, 32);
  if (lane == 0) s.mean_sum[warp] = a;
  __syncthreads();
  float mean = 0.f;
#pragma unroll 1
  for (int w = 0; w < warps; ++w) mean += s.mean_sum[w];
  const float d = m.mean - mean;
  const float b = butterfly_sum(f * fmaf(d, d, m.var), 32);
  if (lane == 0) s.var_sum[warp] = b;
  __syncthreads();
  float var = 0.f;
#pragma unroll 1
  for (int w = 0; w < warps; ++w) var += s.var_sum[w];
  return Moments{mean, var, total > 0 ? total : 0};
}

/// Exchange of block partials among the G co-resident blocks of one plane (cooperative launch),
/// without atomics or fences: each 8-byte word of a slot carries the round's tag beside its
/// value, so the data is its own arrival flag, and a block neither waits for its outstanding
/// loads and stores (a release would) nor round-trips an atomic through L2. Slots are
/// double-buffered by round parity (a block overwrites a slot of round r only after every block
/// of the plane published round r + 1, hence finished reading round r) and zeroed once per
/// launch (tags start at 1). A reader of round r finds in its slot either round r - 2's tag or
/// round r's, which differ modulo 2^32, so the 32-bit tag may wrap: only the zero of the launch's
/// first two rounds must differ from their tags (1 and 2). The count of each partial is not sent: every block knows the slice
/// lengths.
struct TaggedSlot {
  unsigned long long mean_word;
  unsigned long long var_word;
};

__device__ __forceinline__ unsigned long long tag_word(float v, unsigned tag) {
  return (static_cast<unsigned long long>(tag) << 32) | __float_as_uint(v);
}

using TaggedWord = cuda::atomic_ref<unsigned long long, cuda::thread_scope_device>;

/// Publishes (mean, var) with round `tag` (one relaxed store per word).
__device__ __forceinline__ void store_tagged(TaggedSlot& slot, float mean, float var,
                                             unsigned tag) {
  TaggedWord(slot.mean_word).store(tag_word(mean, tag), cuda::memory_order_relaxed);
  TaggedWord(slot.var_word).store(tag_word(var, tag), cuda::memory_order_relaxed);
}

/// Waits until both words of `slot` carry `tag`; returns (mean, var).
__device__ __forceinline__ float2 load_tagged(TaggedSlot& slot, unsigned tag) {
  unsigned long long wa = TaggedWord(slot.mean_word).load(cuda::memory_order_relaxed);
  unsigned long long wb = TaggedWord(slot.var_word).load(cuda::memory_order_relaxed);
  while (unsigned(wa >> 32) != tag || unsigned(wb >> 32) != tag) {
    __nanosleep(32);
    wa = TaggedWord(slot.mean_word).load(cuda::memory_order_relaxed);
    wb = TaggedWord(slot.var_word).load(cuda::memory_order_relaxed);
  }
  return make_float2(__uint_as_float(unsigned(wa)), __uint_as_float(unsigned(wb)));
}

/// Phase shift of split plans: with two or more rounds, the blocks of a group of blocks that is
/// not a multiple of the plan's `phases` (2 by default: the odd groups) start once the block of
/// the same rank in the group before them has published its first partial (`word`: a tagged
/// word of that slot, zero until then), so that one group loads while the other waits in its
/// exchange; otherwise every group runs in step with all the others and DRAM idles during each
/// exchange. A fixed 8 us start delay of odd groups took 16x64x256x256 NHWC from 0.296 to 0.258
/// ms on the H100; 1, 4, 16 phases and one chain were slower than 2 (docs/perf-notes.md). A
/// group waits only on a lower one, down to a multiple of `phases`, which waits on none, and all
/// groups are co-resident (cooperative launch), so this cannot deadlock. Called at the kernel's
/// start by the whole block.
__device__ __forceinline__ void wait_for_partner_inline(unsigned long long* word) {
  if (threadIdx.x == 0) {
    while (TaggedWord(*word).load(cuda::memory_order_relaxed) >> 32 == 0) __nanosleep(256);
  }
  __syncthreads();
}
/// The NCHW kernel's start: group `block_group` of G-block groups waits for group
/// block_group - 1 (block `rank`) unless it is a multiple of `phases` (a power of two). A call:
/// costs the NCHW kernel no registers (inlined, it made two sm_89 kernels spill); in the NHWC
/// kernel the call's stack frame is what spills, so that one inlines wait_for_partner_inline.
__device__ __noinline__ void wait_for_partner(TaggedSlot* slots, int block_group, int rank, int G,
                                              int phases) {
  if ((block_group & (phases - 1)) != 0)
    wait_for_partner_inline(&slots[(block_group - 1) * G + rank].var_word);
}

/// Block `rank` publishes its partial (thread 0).
__device__ __forceinline__ void group_publish(const Moments& m, TaggedSlot* slots, int rank,
                                              unsigned tag) {
  if (threadIdx.x == 0) store_tagged(slots[rank], m.mean, m.var, tag);
}

/// Warp 0 polls the G slots (lane i: slots i, i + 32, ...), merges them in a fixed order and
/// broadcasts, so every block of the plane computes the same bits. `count_of(i)` is the number
/// of values behind block i's partial.
template <class CountOf>
__device__ __forceinline__ Moments group_wait(TaggedSlot* slots, int blocks, unsigned tag,
                                              CountOf count_of, BlockReduceStorage& s) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    Moments v;
    for (int i = lane; i < blocks; i += 32) {
      const float2 w = load_tagged(slots[i], tag);
      Moments q;
      q.mean = w.x;
      q.var = w.y;
      q.count = count_of(i);
      v = merge(v, q);
    }
    v = warp_allreduce(v, 32);
    if (lane == 0) s.exchanged = v;
  }
  __syncthreads();
  return s.exchanged;
}

}  // namespace detail
}  // namespace instnorm
