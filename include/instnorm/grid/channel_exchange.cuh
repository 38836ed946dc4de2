#pragma once
/// \file grid/channel_exchange.cuh
/// The exchange of per-channel partials among the G blocks of an on-chip channels-last unit
/// (an image slice): the shared-memory table a block's partials sit in, and the fixed-order
/// merge of the G blocks' tagged partials of each channel (one hop, or two through owner
/// blocks where G x channels exceeds what one block loads).

#include <type_traits>

#include "../block/reduce.cuh"
#include "../contract.cuh"
#include "../moments.cuh"
#include "exchange.cuh"

namespace instnorm {
namespace detail {

/// Per-channel partials of the on-chip NHWC kernel in shared memory, [k][row-lane group][column]
/// for channel k of a column vector: the mean's two parts and the variance (the counts follow
/// from the block's rows, which every thread knows).
struct ChannelPartials {
  float* mean;
  float* lo;
  float* var;
  __device__ __forceinline__ Moments get(int i, int64_t count) const {
    return Moments{mean[i], var[i], count, lo[i]};
  }
  __device__ __forceinline__ void set(int i, const Moments& m) const {
    mean[i] = m.mean;
    lo[i] = m.mean_lo;
    var[i] = m.var;
  }
  /// Combines the `groups` row-lane groups' entries lane0 + g * cs of one (channel, column) pair
  /// by shares of the block's rows (see warp_allreduce_shares) into lane0's entry: the high
  /// parts of the means first, then the deviations from their sum, each walk in two chains
  /// (even and odd groups: two loads in flight), added at the end. A tree of Chan merges here
  /// took 2.5-4 us per round on the H100 (trace, debug/trace.cuh); one chain per walk over 32
  /// row lanes 2.3, two chains 1.8.
  template <class Groups>
  __device__ __forceinline__ void combine_groups(int lane0, int groups, int cs, const Groups& rg,
                                                 float inv_rows, int64_t block_rows) const {
    const auto f_of = [&](int g) { return float(rg.rows(g)) * inv_rows; };
    float a0 = 0.f, a1 = 0.f;
    int g = 0;
#pragma unroll 1
    for (; g + 1 < groups; g += 2) {
      a0 = fmaf(f_of(g), mean[lane0 + g * cs], a0);
      a1 = fmaf(f_of(g + 1), mean[lane0 + (g + 1) * cs], a1);
    }
    if (g < groups) a0 = fmaf(f_of(g), mean[lane0 + g * cs], a0);
    const float a = a0 + a1;
    ShareSums rq0, rq1;
    const auto add = [&](ShareSums& acc, int g) {
      const int i = lane0 + g * cs;
      const float d = (mean[i] - a) + lo[i];
      acc.res = fmaf(f_of(g), d, acc.res);
      acc.sq = fmaf(f_of(g), fmaf(d, d, var[i]), acc.sq);
    };
#pragma unroll 1
    for (g = 0; g + 1 < groups; g += 2) {
      add(rq0, g);
      add(rq1, g + 1);
    }
    if (g < groups) add(rq0, g);
    set(lane0, SharesCombine::result(a, rq0 += rq1, block_rows));
  }
};

/// The row-lane groups of an on-chip NHWC block: row i of the block is on row lane
/// i % row_lanes, and the `wl` row lanes of a column that share a warp form one group, so group
/// g holds wl * full + clamp(rem - g * wl, 0, wl) rows (full = rows / row_lanes, rem = the rest).
struct RowLaneGroups {
  int wl, full, rem;
  /// 32-bit (a block's rows fit, plan.cuh): a 64-bit count cost a slow conversion per group.
  __device__ __forceinline__ int rows(int g) const {
    const int extra = rem - g * wl;
    return wl * full + (extra < 0 ? 0 : extra < wl ? extra : wl);
  }
};

/// Merges, for `n` channels j = first + i * step (i < n), the G tagged partials
/// part[b * chs + j] (b = 0..G-1, rows_of(b) values each) in a fixed order: L lanes per channel
/// (a power of two up to the whole block) take blocks sub, sub + L, ... with kBatch loads in
/// flight, then combine by shares (SharesCombine) in a butterfly inside the warp and, for L > 32,
/// the warps' sums in order. The result of channel j goes to out.set(slot_of(j)) (Out =
/// ChannelPartials, shared memory) or is published as tagged out[j] (Out = TaggedSlot*). Called
/// by every thread of the block.
template <int kBatch, class RowsOf, class Out, class SlotOf>
__device__ __forceinline__ void merge_channels(TaggedSlot* part, int chs, int G, int first,
                                               int step, int n, unsigned tag, RowsOf rows_of,
                                               int64_t total, Out out, SlotOf slot_of,
                                               Moments* wsm) {
  constexpr int kThreads = kNhwcOnChipThreads;
  const int t = threadIdx.x;
  int L = kThreads / n < kThreads ? kThreads / n : kThreads;
  L = L < 1 ? 1 : 1 << (31 - __clz(L));
  const int sub = t % L, per_pass = kThreads / L;
  for (int i0 = 0; i0 < n; i0 += per_pass) {  // uniform: every thread reaches the barriers
    const int i = i0 + t / L;
    const int j = first + i * step;
    Moments m;
    for (int b0 = sub; i < n && b0 < G; b0 += L * kBatch) {
      TaggedWords w[kBatch];
      bool ready;
      do {  // the whole batch is reloaded until every word carries this round's tag
        ready = true;
#pragma unroll
        for (int k = 0; k < kBatch; ++k) w[k].load(part[(b0 + k * L < G ? b0 + k * L : b0) * chs + j]);
#pragma unroll
        for (int k = 0; k < kBatch; ++k) ready = ready && w[k].carry(tag);
        if (!ready) __nanosleep(64);
      } while (!ready);
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int b = b0 + k * L;
        if (b < G) m = merge(m, w[k].moments(rows_of(b)));
      }
    }
    // Across the lanes by shares of the unit's rows; for L > 32 the channel's warps add their
    // sums in order (wsm[warp]: mean for the first sum, var and mean_lo for the second).
    const SharesCombine sc(m, total);
    const int wbase = (t - sub) >> 5;
    float a = butterfly_sum(sc.first(), L < 32 ? L : 32);
    if (L > 32) {
      if ((t & 31) == 0) wsm[t >> 5].mean = a;
      __syncthreads();
      a = 0.f;
      for (int w = 0; w < L / 32; ++w) a += wsm[wbase + w].mean;
      __syncthreads();
    }
    ShareSums rq = butterfly_sum2(sc.second(a), L < 32 ? L : 32);
    if (L > 32) {
      if ((t & 31) == 0) {
        wsm[t >> 5].mean_lo = rq.res;
        wsm[t >> 5].var = rq.sq;
      }
      __syncthreads();
      rq = ShareSums{};
      for (int w = 0; w < L / 32; ++w) rq += ShareSums{wsm[wbase + w].mean_lo, wsm[wbase + w].var};
      __syncthreads();
    }
    m = SharesCombine::result(a, rq, total);
    if (sub == 0 && i < n) {
      if constexpr (std::is_same<Out, TaggedSlot*>::value)
        store_tagged(out[j], m, tag);
      else
        out.set(slot_of(j), m);
    }
  }
}


/// The exchange of an on-chip NHWC unit's per-channel partials among its G blocks, for round
/// `round` (its tag is round + 1; slots double-buffered by the round's parity): this block
/// (`rank` in group of blocks `block_group`) publishes its partials of the slice's chs channels
/// (red, channel j at slot_of(j)), then red receives every channel's merge of the G partials,
/// in the same order in every block: one hop where each block can load all G x chs partials
/// (at most kBatch per thread), else two, block `rank` merging channels rank, rank + G, ...
/// and publishing them for all. S rows in all, slice_rows per block. Called by every thread;
/// the caller synchronizes before red is read.
template <int kThreads, int kBatch, class SlotOf>
__device__ __forceinline__ void exchange_slice(TaggedSlot* slots, unsigned round, int chs, int G,
                                               int rank, int block_group, int block_groups,
                                               int64_t S, int64_t slice_rows,
                                               const ChannelPartials& red, SlotOf slot_of,
                                               Moments* wsm) {
  const int t = threadIdx.x;
  const unsigned tag = round + 1u;
  TaggedSlot* part = slots + size_t(round & 1) * size_t(gridDim.x + block_groups) * chs;
  TaggedSlot* merged = part + size_t(gridDim.x) * chs + size_t(block_group) * chs;
  part += size_t(block_group) * G * chs;
  for (int j = t; j < chs; j += kThreads) store_tagged(part[rank * chs + j], red.get(slot_of(j), 0), tag);
  __syncthreads();  // red is read above and rewritten below
  const auto rows_of = [=](int b) -> int64_t {
    const int64_t left = S - int64_t(b) * slice_rows;
    return left < 0 ? 0 : left < slice_rows ? left : slice_rows;
  };
  if (G * chs <= kThreads * kBatch) {
    // One hop: every block merges the G partials of every channel, in the same order, hence to
    // the same bits.
    merge_channels<kBatch>(part, chs, G, 0, 1, chs, tag, rows_of, S, red, slot_of, wsm);
  } else {
    // Two hops. Every block reading G x channels slots instead cost 21 us per round on
    // 112x64x512x512 NHWC with G = 249 (H100): 31 dependent loads per thread.
    const int owned = rank < chs ? (chs - 1 - rank) / G + 1 : 0;
    if (owned > 0)
      merge_channels<kBatch>(part, chs, G, rank, G, owned, tag, rows_of, S, merged, 0, wsm);
    for (int j = t; j < chs; j += kThreads) red.set(slot_of(j), load_tagged(merged[j], tag, S));
  }
}

}  // namespace detail
}  // namespace instnorm
