#pragma once
/// \file debug/trace.cuh
/// Optional timeline of the kernels that exchange partials between blocks (compile with
/// -DINSTNORM_TRACE; off by default, and then every call below compiles to nothing): thread 0 of
/// each of the first kTraceBlocks blocks records %globaltimer at the phase boundaries of its
/// first kTraceRounds rounds, so the benchmark (`--trace=1` in a build with the macro) can show
/// where a round's time goes: loading, the in-block reduction, the wait for the other blocks,
/// the epilogue, the stores.

namespace instnorm {
namespace detail {

constexpr int kTraceBlocks = 2048;
constexpr int kTraceRounds = 8;
/// Stamps per round: 0 kernel entry (round 0 only), 1 round start, 2 data loaded and block
/// synchronized, 3 in-block reduction done, 4 exchange done, 5 stores issued.
constexpr int kTraceStamps = 6;

#ifdef INSTNORM_TRACE
static __device__ unsigned long long g_trace[kTraceBlocks * kTraceRounds * kTraceStamps];

/// The block's stamps, kept in shared memory until trace_flush (global addresses in the stamps
/// made the on-chip NHWC kernels spill).
__device__ __forceinline__ unsigned long long* trace_block_stamps() {
  __shared__ unsigned long long stamps[kTraceRounds * kTraceStamps];
  return stamps;
}

__device__ __forceinline__ void trace_stamp(unsigned round, int stamp) {
  if (threadIdx.x == 0 && round < unsigned(kTraceRounds)) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    trace_block_stamps()[round * kTraceStamps + stamp] = t;
  }
}

/// At the kernel's end: thread 0 copies the block's stamps out.
__device__ __forceinline__ void trace_flush(unsigned rounds) {
  if (threadIdx.x == 0 && blockIdx.x < unsigned(kTraceBlocks)) {
    for (unsigned i = 0; i < kTraceRounds * kTraceStamps; ++i)
      g_trace[blockIdx.x * kTraceRounds * kTraceStamps + i] =
          i / kTraceStamps < rounds ? trace_block_stamps()[i] : 0ull;
  }
}
#else
__device__ __forceinline__ void trace_stamp(unsigned, int) {}
__device__ __forceinline__ void trace_flush(unsigned) {}
#endif

}  // namespace detail
}  // namespace instnorm
