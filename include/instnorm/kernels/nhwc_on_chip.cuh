#pragma once
/// \file kernels/nhwc_on_chip.cuh
/// The on-chip channels-last kernel (one DRAM read): image slices held in registers and shared
/// memory by G co-resident blocks that exchange per-channel partials (NhwcPlan, plan.cuh).

#include <type_traits>
#include "../arch.cuh"
#include "../block/layout.cuh"
#include "../block/reduce.cuh"
#include "../debug/trace.cuh"
#include "../epilogue/epilogue.cuh"
#include "../grid/channel_exchange.cuh"
#include "../grid/exchange.cuh"
#include "../thread/group_walk.cuh"
#include "../thread/local_moments.cuh"
#include "nhwc_params.cuh"

namespace instnorm {
namespace detail {

/// y = act((x - center) * scale + shift) for a thread's rows: the `rvalid` first of its
/// registers (unrolled: register arrays must not be indexed at run time), then `svalid` rows of
/// shared memory. `dst(q)` is where row q goes; `value(k, c, a, b)` gives channel k's centre,
/// scale and shift. With kPart < kVec the registers are rewritten in place kPart channels at a
/// time (3 * kPart values live, not 3 * kVec), then stored; the shared-memory rows follow once
/// the registers are free.
template <Activation kAct, int kPart, class T, int kVec, int kMaxItems, class Dst, class Value>
__device__ __forceinline__ void nhwc_store_rows(Vector<T, kVec> (&regs)[kMaxItems], int rvalid,
                                                const Vector<T, kVec>* smem, int svalid, Dst dst,
                                                Value value) {
  static_assert(kVec % kPart == 0, "parts of whole vectors");
  if constexpr (kPart < kVec) {
    using Part = Vector<T, kPart>;
#pragma unroll
    for (int k0 = 0; k0 < kVec; k0 += kPart) {
      float c[kPart], a[kPart], b[kPart];
#pragma unroll
      for (int i = 0; i < kPart; ++i) value(k0 + i, c[i], a[i], b[i]);
#pragma unroll
      for (int q = 0; q < kMaxItems; ++q) {
        if (q < rvalid) {
          Part part;
          memcpy(&part, &regs[q].v[k0], sizeof(Part));
          float f[kPart];
          unpack(part, f);
#pragma unroll
          for (int i = 0; i < kPart; ++i) f[i] = activate<kAct>(fmaf(f[i] - c[i], a[i], b[i]));
          part = pack<T, kPart>(f);
          memcpy(&regs[q].v[k0], &part, sizeof(Part));
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kMaxItems; ++q)
      if (q < rvalid) store_vector(dst(q), regs[q]);
    if (svalid <= 0) return;
  }
  float cen[kVec], scale[kVec], shift[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) value(k, cen[k], scale[k], shift[k]);
  const auto one = [&](const Vector<T, kVec>& v, Vector<T, kVec>* out) {
    float f[kVec];
    unpack(v, f);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f[k] = activate<kAct>(fmaf(f[k] - cen[k], scale[k], shift[k]));
    store_vector(out, pack<T, kVec>(f));
  };
  if constexpr (kPart == kVec) {
#pragma unroll
    for (int q = 0; q < kMaxItems; ++q)
      if (q < rvalid) one(regs[q], dst(q));
  }
  for (int j = 0; j < svalid; ++j) one(smem[j * kNhwcOnChipThreads], dst(kMaxItems + j));
}

/// The in-warp combine of kB channels' moments (mean hi + lo, var) over the row lanes of a
/// column (lanes cs, 2 cs, ... apart), by shares of their rows (SharesCombine): one shuffle
/// round serves all kB channels. `share` is this lane's share of its group's `group_rows`.
template <int kB>
__device__ __forceinline__ void warp_combine_row_lanes(float (&hi)[kB], float (&lo)[kB],
                                                       float (&var)[kB], float share,
                                                       int group_rows, int cs) {
  const auto sc = [&](int i) { return SharesCombine(share, Moments{hi[i], var[i], 0, lo[i]}); };
  float a[kB];
  ShareSums q[kB];
#pragma unroll
  for (int i = 0; i < kB; ++i) a[i] = sc(i).first();
  butterfly_sums<kB>(a, 32, cs);
#pragma unroll
  for (int i = 0; i < kB; ++i) q[i] = sc(i).second(a[i]);
  butterfly_sums2<kB>(q, 32, cs);
#pragma unroll
  for (int i = 0; i < kB; ++i) {
    const Moments m = SharesCombine::result(a[i], q[i], group_rows);
    hi[i] = m.mean;
    lo[i] = m.mean_lo;
    var[i] = m.var;
  }
}

/// A thread's kVec channels' moments from their sums, each relative to its pivot (its group's
/// first element in the image, see group_pivot; `record` stores them to `pivots`), combined over
/// the wl row lanes of its column in the warp (warp_combine_row_lanes, by `share` of the
/// `group_rows` rows) into the table's entries [k][lane_group][column] (the lead lane). What does
/// not depend on the channel is computed once (SumScale, the share, the walk over groups): per
/// channel, the reciprocals' slow-path calls kept ptxas from sharing them, and the pivot's
/// index cost a division.
template <int kVec, class T>
__device__ __forceinline__ void row_lane_partials(const float (&c)[kVec], const float (&s1)[kVec],
                                                  const float (&s2)[kVec], const SumScale& sums,
                                                  const T* ximg, int ch0, int cpg, bool record,
                                                  float* pivots, float share, int group_rows,
                                                  int wl, int cs, bool lead,
                                                  const ChannelPartials& red, int lane_group,
                                                  int column, int entries) {
  GroupWalk walk(ch0, cpg);
  // The channels' moments and in-warp combines kB at a time, side by side: one shuffle round
  // serves kB channels, so their shuffles' latencies overlap where a combine per channel waited
  // on each in turn. The vec-8 kernels keep one at a time: batches of 2, 4 or 8 spilled 36-44
  // bytes there (128 registers). The same operations per channel either way: the same bits.
  constexpr int kB = kVec <= 4 ? kVec : 1;
#pragma unroll
  for (int k0 = 0; k0 < kVec; k0 += kB) {
    float hi[kB], lo[kB], var[kB];
#pragma unroll
    for (int i = 0; i < kB; ++i, walk.next()) {
      const int k = k0 + i;
      const float pivot = to_float(ximg[walk.first]);
      if (record) pivots[k] = pivot;
      const Moments m = moments_from_sums(sums, c[k], s1[k], s2[k], pivot);
      hi[i] = m.mean;
      lo[i] = m.mean_lo;
      var[i] = m.var;
    }
    if (wl > 1) warp_combine_row_lanes<kB>(hi, lo, var, share, group_rows, cs);
    if (lead) {
#pragma unroll
      for (int i = 0; i < kB; ++i)
        red.set((k0 + i) * entries + lane_group * cs + column, Moments{hi[i], var[i], 0, lo[i]});
    }
  }
}

/// The row-lane groups' partials of each (channel k, column) pair of the table combined into
/// group 0's entry, one thread per pair (ChannelPartials::combine_groups); the in-warp combine
/// leaves 8 groups to walk where a slice has fewer than 32 columns. (Splitting the walk over
/// several threads per pair made ptxas spill at the kernel's 128 registers.) Ends with a barrier.
__device__ __forceinline__ void combine_row_lane_groups(const ChannelPartials& red,
                                                        const RowLaneGroups& rg, int t, int chs,
                                                        int cs, int entries, int64_t block_rows) {
  const int groups = entries / cs;
  const float inv_rows = block_rows > 0 ? 1.f / float(block_rows) : 0.f;
  const auto combine = [&](int lane0) {
    red.combine_groups(lane0, groups, cs, rg, inv_rows, block_rows);
  };
  // Pair j = k * cs + column: thread t < chs takes (k = t / cs, t % cs); wider slices loop.
  if (t < chs) combine((t / cs) * entries + t % cs);
#pragma unroll 1
  for (int j = t + kNhwcOnChipThreads; j < chs; j += kNhwcOnChipThreads)
    combine((j / cs) * entries + j % cs);
  __syncthreads();
}

/// Each group's statistics (groups of one channel for instance norm; a GroupNorm group's
/// channels merge in order) and its channels' centre, scale and shift, into those channels' slots
/// of the table (mean, lo and var hold them then): the row lanes of a column read them, where
/// each computed its kVec channels' before, 4-32 times over. Slices hold whole groups, so a
/// group's slots are its thread's alone. Thread g of the block takes group g. `pivots` are the
/// slice's as read before the exchange (in place, the block holding the image's first row may
/// have overwritten the image's since); `slice_first` is the slice's first channel in the image;
/// `writer` stores the saved statistics (one block of the unit).
/// Without parameters (kParams false: no gamma, beta, scale or shift) thread g writes its
/// channels' scale and shift itself. With them, `af` is channel t's affine map, loaded by the
/// kernel as the unit began (t < chs), so that its loads' latency hid behind the rows' and the
/// exchange's: GroupNorm's thread g leaves rstd and the residual in the slots of its channels
/// below 256, and after a barrier thread j folds channel j's own; channels past the block's 256
/// threads (wide slices) are folded by thread g itself, with their maps loaded there. (Thread g
/// taking its cpg channels' maps one at a time after the exchange cost 2x640x32x32 GN32 (cpg 20)
/// 2.6 us of its 27 us with scale and shift on the H200. A loop over channels t, t + 256, ...
/// after the barrier left the bf16 vec-8 kernel spilling 4 bytes on sm_90; nvcc 13.0.)
template <bool kParams, class T, class SlotOf>
__device__ __forceinline__ void nhwc_group_coefficients(const NhwcParams<T>& p,
                                                        const ChannelPartials& red,
                                                        SlotOf slot_of, const float* pivots,
                                                        const ChannelAffine& af,
                                                        int64_t count, int chs, int cpg, int t,
                                                        bool writer, int64_t image,
                                                        int slice_first) {
#pragma unroll 1
  for (int g = t; g * cpg < chs; g += kNhwcOnChipThreads) {
    const int j0 = g * cpg;
    Moments m = red.get(slot_of(j0), count);
    for (int j = j0 + 1; j < j0 + cpg; ++j) m = merge(m, red.get(slot_of(j), count));
    const PlaneStats st = plane_stats(pivots[j0], m, p);
    if (writer) store_plane_stats(p, image * p.groups + (slice_first + j0) / cpg, st);
#pragma unroll 1
    for (int j = j0; j < j0 + cpg; ++j) {
      ScaleShift ss{st.rstd, st.residual};  // kParams: folded below by thread j
      if (!kParams || cpg == 1 || j >= kNhwcOnChipThreads)
        ss = scale_shift(kParams && j == t ? af : channel_affine<T>(p, image, slice_first + j),
                         st.rstd, st.residual);
      red.mean[slot_of(j)] = st.center;
      red.lo[slot_of(j)] = ss.scale;
      red.var[slot_of(j)] = ss.shift;
    }
  }
  // The launch takes this instance for GroupNorm only (cpg > 1), so the cpg == 1 cases above
  // and here, and has_channel_params in the kernel, never decide there; they stay so that the
  // machine code is the one the device suite ran (e78b542), until a device run checks another.
  if constexpr (kParams) {
    if (cpg == 1) return;  // uniform over the block
    __syncthreads();
    if (t < chs) {
      const int i = slot_of(t);
      const ScaleShift ss = scale_shift(af, red.lo[i], red.var[i]);
      red.lo[i] = ss.scale;
      red.var[i] = ss.shift;
    }
  }
}

/// On chip: a unit is (image, column slice) x all rows, shared by G blocks that each hold
/// `slice_rows` rows in registers (`items` per thread) and shared memory (`smem_items`, filled by
/// cp.async). A thread owns one column vector (kVec channels) and rows rl, rl + row_lanes, ...
/// of its block's rows; its per-channel moments (two passes, as chunk_moments) merge over the
/// row lanes in a fixed tree in shared memory. With G > 1 the blocks exchange per-channel
/// partials through tagged slots (as the NCHW split plans: reduce.cuh), double-buffered by
/// round parity; every block merges all G in the same order. Deadlock-free: a block publishes
/// before it waits, and the G blocks are co-resident (cooperative launch).
/// kParams: a GroupNorm call with gamma, beta or a modulation, whose maps the kernel loads as
/// each unit begins (nhwc_group_coefficients); the launch's choice is
/// nhwc_on_chip_folds_params (plan/nhwc.cuh). Every other call keeps the code from before.
template <class T, int kVec, int kMaxItems, bool kParams = false>
__global__ void __launch_bounds__(kNhwcOnChipThreads, 2) nhwc_on_chip(const NhwcParams<T> p) {
  using V = Vector<T, kVec>;
  constexpr int kThreads = kNhwcOnChipThreads;
  __shared__ Moments wsm[kThreads / 32];   // merge_channels' per-warp results
  constexpr int kBatch = kVec == 8 ? 4 : 2;  // exchange loads in flight: the most without spills
  extern __shared__ uint4 dyn_smem[];
  const int t = threadIdx.x;
  const int cs = p.cols_per_block, row_lanes = p.row_lanes;
  // Row lanes of a column combined inside a warp (plan.cuh's nhwc_warp_row_lanes), and entries
  // per channel of the partials' table, [k][row-lane group][column] (nhwc_partial_entries).
  const int wl = cs < 32 && (cs & (cs - 1)) == 0 ? 32 / cs : 1;
  const int entries = (kThreads / cs) / wl * cs;
  // Dynamic shared memory (plan.cuh's nhwc_prefix_bytes): the slice's pivots, the partials'
  // table, then the rows.
  float* pivots = reinterpret_cast<float*>(dyn_smem);
  float* table = pivots + (cs * kVec + 3) / 4 * 4;
  const ChannelPartials red{table, table + kVec * entries, table + 2 * kVec * entries};
  V* sdata = reinterpret_cast<V*>(dyn_smem + (cs * kVec + 3) / 4 + (3 * kVec * entries + 3) / 4) +
             t;  // rows: [j * kThreads]
  const int rl = t / cs, cl = t % cs;
  const bool on = rl < row_lanes;
  const int chs = cs * kVec;  // channels of a slice
  // 32-bit offsets inside a block's rows and channel indices (the planner checks
  // slice_rows * C < 2^31): 64-bit ones spilled registers.
  const int64_t S = p.spatial;
  const int C = int(p.c), cv = C / kVec, cpg = int(p.cpg);
  const int G = p.blocks_per_unit;
  const SliceRows sr(G, S, p.slice_rows);
  const int rank = sr.rank, block_group = sr.group, block_groups = sr.groups;
  const int64_t units = p.img_count * p.col_slices;
  const int64_t row_begin = sr.begin, block_rows = sr.count;
  const int rows = sr.lane_rows(on, rl, row_lanes);
  const int rvalid = rows < p.items ? rows : p.items;
  const int svalid = rows - rvalid;

  unsigned round = 0;  // parity and exchange tag (which may wrap)
  // Phase shift (reduce.cuh): with the default two phases, odd groups of blocks start one load
  // phase behind the even ones.
  // The vector kernels only where the table row of the compiled architecture says so (sm_89:
  // the wait made ptxas spill them at 128 registers).
  constexpr bool kPhaseShift = kVec == 1 || CompiledArch::nhwc_vector_phase_shift;
  trace_stamp(0, 0);
  if (kPhaseShift && G > 1 && (block_group & (p.phases - 1)) != 0 && units > block_groups)
    wait_for_partner_inline(&p.slots[(size_t(block_group - 1) * G + rank) * chs].var_word);
  for (int64_t unit = block_group; unit < units; unit += block_groups, ++round) {
    trace_stamp(round, 1);
    const int64_t image = p.img_first + unit / p.col_slices;
    const int col = int(unit % p.col_slices) * cs + cl;
    const T* ximg = p.x + image * S * C;
    const int rstep = row_lanes * cv;
    // Channel t's affine map (nhwc_group_coefficients), its loads issued before the rows'.
    ChannelAffine af{1.f, 0.f};
    if constexpr (kParams) {
      if (t < chs && has_channel_params(p)) af = channel_affine<T>(p, image, (col - cl) * kVec + t);
    }
    const V* xv = reinterpret_cast<const V*>(ximg + (row_begin + rl) * C) + col;

    V regs[kMaxItems];
#pragma unroll
    for (int q = 0; q < kMaxItems; ++q)
      if (q < rvalid) regs[q] = load_vector(xv + q * rstep);
    if constexpr (sizeof(V) == 16) {
#pragma unroll 1
      for (int j = 0; j < svalid; ++j) copy_async16(sdata + j * kThreads, xv + (p.items + j) * rstep);
    }

    float c[kVec], s1[kVec], s2[kVec];
    const int shift_k = channel_moments(regs, rvalid, sdata, kThreads, svalid, rows, c, s1, s2);

    // Row i of the block is on lane i % row_lanes; the wl row lanes of a column in one warp
    // combine into the table's entry of their group (row_lane_partials).
    const int ch0 = col * kVec;
    const RowLaneGroups rg{wl, int(block_rows / row_lanes), int(block_rows % row_lanes)};
    const int lane_group = rl / wl;
    const bool lead = on && rl == lane_group * wl;
    const int my_group_rows = rg.rows(lane_group);
    const SumScale sums(rows, shift_k);
    const float share = share_of(rows, my_group_rows);
    row_lane_partials<kVec>(c, s1, s2, sums, ximg, ch0, cpg, rl == 0, pivots + cl * kVec, share,
                            my_group_rows, wl, cs, lead, red, lane_group, cl, entries);
    __syncthreads();
    trace_stamp(round, 2);
    combine_row_lane_groups(red, rg, t, chs, cs, entries, block_rows);
    trace_stamp(round, 3);
    // Channel j = column * kVec + k of the slice lives at entry k * entries + column.
    const auto slot_of = [&](int j) { return (j % kVec) * entries + j / kVec; };
    int64_t count = block_rows;
    if (G > 1) {
      exchange_slice<kThreads, kBatch>(p.slots, round, chs, G, rank, block_group, block_groups, S,
                                       p.slice_rows, red, slot_of, wsm);
      count = S;
      __syncthreads();
    }
    trace_stamp(round, 4);
    nhwc_group_coefficients<kParams>(p, red, slot_of, pivots, af, count, chs, cpg, t, rank == 0,
                                     image, ch0 - cl * kVec);
    __syncthreads();
    // Channel k of this thread's column: its centre, scale and shift in the table.
    const auto param = [&](int k, float& c, float& a, float& b) {
      const int i = slot_of(cl * kVec + k);
      c = red.mean[i];
      a = red.lo[i];
      b = red.var[i];
    };
    // The 16-bit vec-8 kernels apply them four channels at a time, reading the table while
    // they store (all 24 values at once, or two channels at a time, left ptxas spilling 20-40
    // bytes at their 128 registers); the others hold all of theirs, read before the barrier
    // that frees the table (reading them after it, or in parts, spilled 4-32 bytes in the
    // fp32 vec-4 kernel on sm_90). nvcc 13.0.
    constexpr int kPart = sizeof(T) == 2 && kVec == 8 ? 4 : kVec;
    float cen[kVec], scale[kVec], shift[kVec];
    if constexpr (kPart == kVec) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) param(k, cen[k], scale[k], shift[k]);
      __syncthreads();  // red is rewritten by the next unit
    }
    if (p.y != nullptr) {  // else statistics only (uniform over the block)
      V* yv = reinterpret_cast<V*>(p.y + image * S * C + (row_begin + rl) * C) + col;
      // Row q < items is register q; row items + j is shared-memory row j (dst gets kMaxItems + j).
      const int items = p.items;
      const auto dst = [&](int q) {
        return yv + (q < kMaxItems ? q : items + (q - kMaxItems)) * rstep;
      };
      const auto value = [&](int k, float& c, float& a, float& b) {
        if constexpr (kPart == kVec) {
          c = cen[k];
          a = scale[k];
          b = shift[k];
        } else {
          param(k, c, a, b);
        }
      };
      with_activation(p.activation, [&](auto act) {
        nhwc_store_rows<decltype(act)::value, kPart>(regs, rvalid, sdata, svalid, dst, value);
      });
    }
    if constexpr (kPart != kVec) __syncthreads();  // red is rewritten by the next unit
    trace_stamp(round, 5);
  }
  trace_flush(round);
}

}  // namespace detail
}  // namespace instnorm
