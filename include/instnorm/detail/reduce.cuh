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

/// Storage of block_allreduce: one partial per warp plus the broadcast slot.
struct BlockReduceStorage {
  Moments warp[32];
  Moments result;
};

/// All-reduce over the whole block (blockDim.x a multiple of 32): warps, then warp 0 over the
/// warp partials (absent warps are empty partials, which merge exactly), then a broadcast.
__device__ __forceinline__ Moments block_allreduce(Moments m, BlockReduceStorage& s) {
  m = warp_allreduce(m, 32);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) s.warp[warp] = m;
  __syncthreads();
  if (warp == 0) {
    Moments v = lane < int(blockDim.x >> 5) ? s.warp[lane] : Moments{};
    v = warp_allreduce(v, 32);
    if (lane == 0) s.result = v;
  }
  __syncthreads();
  return s.result;
}

/// Exchange of block partials among the G co-resident blocks of one plane (cooperative launch),
/// in two halves so that a block can issue its next loads between them. publish: block `rank`
/// stores its partial in `slots[rank]` (slots double-buffered by round parity by the caller) and
/// bumps the group's arrival counter with release semantics. The counter counts arrivals over
/// all rounds of the launch, so it is zeroed once per launch.
__device__ __forceinline__ void group_publish(const Moments& m, Moments* slots,
                                              unsigned long long* counter, int rank) {
  if (threadIdx.x == 0) {
    slots[rank] = m;
    cuda::atomic_ref<unsigned long long, cuda::thread_scope_device> arrived(*counter);
    arrived.fetch_add(1ull, cuda::memory_order_release);
  }
}

/// wait: thread 0 spins until all G blocks of this round have arrived, then warp 0 merges the G
/// partials in a fixed order, so every block of the plane computes the same bits.
__device__ __forceinline__ Moments group_wait(const Moments* slots, unsigned long long* counter,
                                              int blocks, unsigned long long round,
                                              BlockReduceStorage& s) {
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned long long, cuda::thread_scope_device> arrived(*counter);
    const unsigned long long target = (round + 1) * static_cast<unsigned long long>(blocks);
    // Back off while polling: G blocks spinning on the counter's L2 line slow down the very
    // atomics they wait for.
    unsigned sleep_ns = 32;
    while (arrived.load(cuda::memory_order_acquire) < target) {
      __nanosleep(sleep_ns);
      sleep_ns = sleep_ns < 256 ? 2 * sleep_ns : sleep_ns;
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    Moments v;
    for (int i = lane; i < blocks; i += 32) {
      Moments q;  // L1 bypass: other blocks wrote these in L2
      q.mean = __ldcg(&slots[i].mean);
      q.var = __ldcg(&slots[i].var);
      q.count = static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(&slots[i].count)));
      v = merge(v, q);
    }
    v = warp_allreduce(v, 32);
    if (lane == 0) s.result = v;
  }
  __syncthreads();
  return s.result;
}

/// Both halves at once.
__device__ __forceinline__ Moments group_exchange(Moments m, Moments* slots,
                                                  unsigned long long* counter, int rank,
                                                  int blocks, unsigned long long round,
                                                  BlockReduceStorage& s) {
  group_publish(m, slots, counter, rank);
  return group_wait(slots, counter, blocks, round, s);
}

}  // namespace detail
}  // namespace instnorm
