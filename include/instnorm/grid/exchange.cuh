#pragma once
/// \file grid/exchange.cuh
/// The exchange of partial moments among the G co-resident blocks of a plane or an NHWC unit
/// (cooperative launch): tagged slots in global memory, the phase shift of split plans, and the
/// fixed-order wait and combine every block of a group runs. A cluster/DSMEM exchange would be a
/// second backend here.

#include <cuda/atomic>
#include "../block/reduce.cuh"
#include "../moments.cuh"

namespace instnorm {
namespace detail {

/// Exchange of block partials among the G co-resident blocks of one plane (cooperative launch),
/// without atomics or fences: each 8-byte word of a slot carries the round's tag beside its
/// value, so the data is its own arrival flag, and a block neither waits for its outstanding
/// loads and stores (a release would) nor round-trips an atomic through L2. Slots are
/// double-buffered by round parity (a block overwrites a slot of round r only after every block
/// of the plane published round r + 1, hence finished reading round r) and zeroed once per
/// launch (tags start at 1). A reader of round r finds in its slot either round r - 2's tag or
/// round r's, which differ modulo 2^16, so the 16-bit tag may wrap: only the zero of the
/// launch's first two rounds must differ from their tags (1 and 2). The count of each partial
/// is not sent: every block knows the slice lengths.
/// A word is [tag: 16 bits][a float: 32][half of mean_lo: 16]: the mean, the variance and the
/// mean's low part (Moments) in two words, so a poll is two loads, as with one float a word.
struct TaggedSlot {
  unsigned long long mean_word;  ///< [tag][mean][high half of mean_lo]
  unsigned long long var_word;   ///< [tag][var][low half of mean_lo]
};

/// The 16 bits of a round's tag that a word carries.
__device__ __forceinline__ unsigned word_tag(unsigned long long w) { return unsigned(w >> 48); }
__device__ __forceinline__ unsigned long long tag_word(unsigned tag, float v, unsigned half) {
  return (static_cast<unsigned long long>(tag & 0xffffu) << 48) |
         (static_cast<unsigned long long>(__float_as_uint(v)) << 16) | (half & 0xffffu);
}

using TaggedWord = cuda::atomic_ref<unsigned long long, cuda::thread_scope_device>;

/// Publishes m's mean, mean_lo and var with round `tag` (one relaxed store per word).
__device__ __forceinline__ void store_tagged(TaggedSlot& slot, const Moments& m, unsigned tag) {
  const unsigned lo = __float_as_uint(m.mean_lo);
  TaggedWord(slot.mean_word).store(tag_word(tag, m.mean, lo >> 16), cuda::memory_order_relaxed);
  TaggedWord(slot.var_word).store(tag_word(tag, m.var, lo), cuda::memory_order_relaxed);
}

/// The two words of a slot as loaded (relaxed).
struct TaggedWords {
  unsigned long long mean, var;
  __device__ __forceinline__ void load(TaggedSlot& slot) {
    mean = TaggedWord(slot.mean_word).load(cuda::memory_order_relaxed);
    var = TaggedWord(slot.var_word).load(cuda::memory_order_relaxed);
  }
  __device__ __forceinline__ bool carry(unsigned tag) const {
    return word_tag(mean) == (tag & 0xffffu) && word_tag(var) == (tag & 0xffffu);
  }
  /// The partial they hold, of `count` values.
  __device__ __forceinline__ Moments moments(int64_t count) const {
    const unsigned lo = (unsigned(mean & 0xffffu) << 16) | unsigned(var & 0xffffu);
    return Moments{__uint_as_float(unsigned(mean >> 16)), __uint_as_float(unsigned(var >> 16)),
                   count, __uint_as_float(lo)};
  }
};

/// Waits until every word of `slot` carries `tag`; returns the partial (of `count` values).
__device__ __forceinline__ Moments load_tagged(TaggedSlot& slot, unsigned tag, int64_t count) {
  TaggedWords w;
  w.load(slot);
  while (!w.carry(tag)) {
    __nanosleep(32);
    w.load(slot);
  }
  return w.moments(count);
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
    while (word_tag(TaggedWord(*word).load(cuda::memory_order_relaxed)) == 0) __nanosleep(256);
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
  if (threadIdx.x == 0) store_tagged(slots[rank], m, tag);
}

/// Warp 0 polls the G slots (lane i: slots i, i + 32, ...) and combines them by shares of
/// `total` (SharesCombine) in a fixed order, then broadcasts, so every block of the plane
/// computes the same bits. The first stage sums each lane's high parts as its slots arrive; the
/// second reuses the lane's first slot from registers and reloads the others (groups of more
/// than 32 blocks), which are stable until every block of the group has read them (the slots
/// are double-buffered by round parity). Chan merges in the polling loop made the streamed
/// kernels spill (128 registers). `count_of(i)` is the number of values behind block i's
/// partial; they add up to `total`.
template <class CountOf>
__device__ __forceinline__ Moments group_wait(TaggedSlot* slots, int blocks, unsigned tag,
                                              CountOf count_of, int64_t total,
                                              BlockReduceStorage& s) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const SharesCombine first(lane < blocks ? load_tagged(slots[lane], tag, count_of(lane))
                                            : Moments{},
                              total);
    float a = first.first();
#pragma unroll 1
    for (int i = lane + 32; i < blocks; i += 32)
      a += SharesCombine(load_tagged(slots[i], tag, count_of(i)), total).first();
    a = butterfly_sum(a, 32);
    ShareSums rq = first.second(a);
#pragma unroll 1
    for (int i = lane + 32; i < blocks; i += 32) {
      TaggedWords w;
      w.load(slots[i]);
      rq += SharesCombine(w.moments(count_of(i)), total).second(a);
    }
    rq = butterfly_sum2(rq, 32);
    if (lane == 0) s.exchanged = SharesCombine::result(a, rq, total);
  }
  __syncthreads();
  return s.exchanged;
}

}  // namespace detail
}  // namespace instnorm
