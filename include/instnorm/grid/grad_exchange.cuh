#pragma once
/// \file grid/grad_exchange.cuh
/// The exchange of the backward's partials among the G co-resident blocks of a plane: tagged
/// words in global memory, as the forward's (grid/exchange.cuh), four a block.

#include "../block/grad_reduce.cuh"
#include "exchange.cuh"

namespace instnorm {
namespace detail {

/// A block's partial in the exchange: four tagged words [tag: 16 bits][a float: 32][0: 16], so
/// that, as in the forward's TaggedSlot, the data is its own arrival flag.
struct GradSlot {
  unsigned long long w[4];
};

__device__ __forceinline__ void publish_grad(GradSlot& slot, const GradSums& v, unsigned tag) {
  const float f[4] = {v.s0_hi, v.s0_lo, v.a, v.b};
#pragma unroll
  for (int k = 0; k < 4; ++k)
    TaggedWord(slot.w[k]).store(tag_word(tag, f[k], 0), cuda::memory_order_relaxed);
}

__device__ __forceinline__ GradSums load_grad(GradSlot& slot, unsigned tag) {
  unsigned long long w[4];
  for (;;) {
    bool ready = true;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = TaggedWord(slot.w[k]).load(cuda::memory_order_relaxed);
      ready = ready && word_tag(w[k]) == (tag & 0xffffu);
    }
    if (ready) break;
    __nanosleep(32);
  }
  GradSums r;
  r.s0_hi = __uint_as_float(unsigned(w[0] >> 16));
  r.s0_lo = __uint_as_float(unsigned(w[1] >> 16));
  r.a = __uint_as_float(unsigned(w[2] >> 16));
  r.b = __uint_as_float(unsigned(w[3] >> 16));
  return r;
}

/// The G blocks of a plane publish their partials and all of them add the G partials in the
/// same order (lane i of warp 0 takes slots i, i + 32, ..., then a butterfly), so every block
/// computes the same bits. Slots are double-buffered by the parity of the exchange's tag: a
/// block publishes exchange k only after it read every slot of exchange k - 1, which every
/// block published only after reading exchange k - 2, the one whose buffer it overwrites.
__device__ __forceinline__ GradSums group_exchange(const GradSums& mine, GradSlot* slots,
                                                   int rank, int G, unsigned tag,
                                                   GradReduceStorage& st) {
  if (threadIdx.x == 0) publish_grad(slots[rank], mine, tag);
  if (threadIdx.x < 32) {
    GradSums acc;
#pragma unroll 1
    for (int i = threadIdx.x; i < G; i += 32) acc = combine(acc, load_grad(slots[i], tag));
    acc = warp_allreduce(acc, 32);
    if (threadIdx.x == 0) st.exchanged = acc;
  }
  __syncthreads();
  const GradSums r = st.exchanged;
  __syncthreads();  // st.exchanged is rewritten by the next exchange
  return r;
}

}  // namespace detail
}  // namespace instnorm
