#pragma once
/// \file kernels/backward_nhwc_on_chip.cuh
/// The on-chip channels-last backward: one DRAM read of x and dy and one write of dx, where the
/// tiled chain (kernels/backward_nhwc.cuh) reads both twice (three times with an activation)
/// in four or five launches. A unit is an image slice of `cols` column vectors by all S rows,
/// shared by G co-resident blocks (cooperative launch when G > 1) that each hold `slice_rows`
/// rows of x and dy in shared memory (cp.async) and exchange per-channel sums (GradSums)
/// through tagged slots:
///  1. with an activation, the sums of x - c (c the saved mean), exchanged, give each group's
///     residual r = mean - c, hence the pre-activation of every element;
///  2. the sums of d and d * (x - c) (d = dy * act'(pre)), and without an activation those of
///     x - c too, exchanged: each group's k1 and k2, folded with each channel's affine map into
///     dx's coefficients (GradCoef), and the per-(image, channel) partials of dgamma/dbeta;
///  3. dx = a * d + b * (x - c) + e from the rows in shared memory.
/// Every block of a unit merges the G partials of a channel in the same order, so all of them,
/// and reruns, get the same bits. The planner (make_nhwc_grad_chip_plan, launch/backward.cuh)
/// keeps slices of whole groups and at most kNhwcGradChipMaxChannels channels.

#include "../block/layout.cuh"
#include "../contract.cuh"
#include "../grid/grad_exchange.cuh"
#include "backward_nhwc.cuh"

namespace instnorm {
namespace detail {

template <class T>
struct NhwcGradChipParams : NhwcGradParams<T> {
  int row_lanes;       ///< threads per column vector (kNhwcGradChipThreads / cols)
  int rows;            ///< rows of x and dy per thread in shared memory
  int G;               ///< blocks per unit
  int64_t col_slices;  ///< column slices of an image
  int64_t slice_rows;  ///< rows per block (rows * row_lanes)
  GradSlot* slots;     ///< [2][gridDim.x][channels of a slice], zeroed before the launch
};

/// The slice's per-channel values in shared memory, `chs` floats each (channel j of the slice
/// at [j]): written by one thread per channel or per group, read by the row lanes.
struct GradChipChannels {
  float* c;      ///< the saved mean of the channel's group (the pivot)
  float* rstd;
  float* gamma;  ///< the affine map with the image's modulation folded in (channel_affine)
  float* beta;
  float* r;      ///< the group's residual mean - c
  float* a;      ///< GradCoef a = rstd * gamma (the pre-activation's slope, then dx's)
  float* p0;     ///< GradCoef p0 = beta - r * a
  float* b;      ///< GradCoef b
  float* e;      ///< GradCoef e
};

/// Where the sums of channel j (column j / kVec, channel j % kVec of it) sit once
/// reduce_slice_sums returns: its row lane 0's entry, which only its own thread reads.
template <int kVec>
__device__ __forceinline__ int channel_entry(int j) {
  return table_entry<kVec>(j / kVec, j % kVec);
}

/// Merges, for every channel j < chs, the G tagged partials part[b * chs + j] in a fixed
/// order into out[slot(j)]: L lanes per channel (nhwc_grad_chip_merge_lanes, a power of two up
/// to a warp) take blocks sub, sub + L, ... with kBatch slots in flight, then a butterfly over
/// the L lanes. Called by every thread of the block (the butterflies' shuffles).
template <int kThreads, int kBatch, class Slot>
__device__ __forceinline__ void merge_grad_channels(GradSlot* part, int chs, int G,
                                                    unsigned tag, float4* out, Slot slot) {
  static_assert(kThreads == kNhwcGradChipThreads, "the merge's lanes assume this block");
  const int t = threadIdx.x;
  const int L = nhwc_grad_chip_merge_lanes(chs);
  const int sub = t % L, per_pass = kThreads / L;
  for (int i0 = 0; i0 < chs; i0 += per_pass) {  // uniform: every lane reaches the shuffles
    const int j = i0 + t / L;
    GradSums acc;
#pragma unroll 1
    for (int b0 = sub; j < chs && b0 < G; b0 += L * kBatch) {
      unsigned long long w[kBatch][4];
      bool ready;
      do {  // the whole batch is reloaded until every word carries this exchange's tag
        ready = true;
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int b = b0 + k * L < G ? b0 + k * L : b0;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            w[k][q] = TaggedWord(part[size_t(b) * chs + j].w[q]).load(cuda::memory_order_relaxed);
            ready = ready && word_tag(w[k][q]) == (tag & 0xffffu);
          }
        }
        if (!ready) __nanosleep(64);
      } while (!ready);
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        if (b0 + k * L >= G) break;
        GradSums v;
        v.s0_hi = __uint_as_float(unsigned(w[k][0] >> 16));
        v.s0_lo = __uint_as_float(unsigned(w[k][1] >> 16));
        v.a = __uint_as_float(unsigned(w[k][2] >> 16));
        v.b = __uint_as_float(unsigned(w[k][3] >> 16));
        acc = combine(acc, v);
      }
    }
    acc = warp_allreduce(acc, L);
    if (sub == 0 && j < chs) out[slot(j)] = make_float4(acc.s0_hi, acc.s0_lo, acc.a, acc.b);
  }
}

/// The sums of the block's threads (red[table_entry(t, k)]: thread t's channel k) added over
/// the row lanes of each channel in row-lane order, then, with G > 1, over the unit's G blocks
/// (exchange `ex`: tag ex + 1, slots double-buffered by its parity, as group_exchange argues):
/// red[channel_entry(j)] holds channel j's sums for the unit when it returns, in every block
/// the same bits. Called by every thread.
template <int kThreads, int kVec, class T>
__device__ __forceinline__ void reduce_slice_sums(const NhwcGradChipParams<T>& p,
                                                  const GradSums (&s)[kVec], float4* red,
                                                  int chs, int rank, int block_group,
                                                  unsigned ex) {
  const int t = threadIdx.x;
#pragma unroll
  for (int k = 0; k < kVec; ++k)
    red[table_entry<kVec>(t, k)] = make_float4(s[k].s0_hi, s[k].s0_lo, s[k].a, s[k].b);
  __syncthreads();
  const unsigned tag = ex + 1u;
  GradSlot* part = nullptr;  // this group's slots of the exchange's buffer (G > 1 only)
  if (p.G > 1)
    part = p.slots + size_t(ex & 1u) * gridDim.x * size_t(chs) +
           size_t(block_group) * size_t(p.G) * chs;
  // Channel j's entry of row lane l is thread l * cs + j / kVec's; only its thread reads them,
  // so it may overwrite its lane 0's (channel_entry) with the block's sum. Four chains (lanes l,
  // l + 4, ...: four loads in flight, where one chain waited on each of up to 32 in turn), added
  // in a fixed order.
  const int cs = chs / kVec;
  const auto entry = [&](int l, int j) {
    const float4 v = red[table_entry<kVec>(l * cs + j / kVec, j % kVec)];
    return GradSums{v.x, v.y, v.z, v.w};
  };
#pragma unroll 1
  for (int j = t; j < chs; j += kThreads) {
    GradSums c0, c1, c2, c3;
    int l = 0;
#pragma unroll 1
    for (; l + 3 < p.row_lanes; l += 4) {
      c0 = combine(c0, entry(l, j));
      c1 = combine(c1, entry(l + 1, j));
      c2 = combine(c2, entry(l + 2, j));
      c3 = combine(c3, entry(l + 3, j));
    }
    if (l < p.row_lanes) c0 = combine(c0, entry(l, j));
    if (l + 1 < p.row_lanes) c1 = combine(c1, entry(l + 1, j));
    if (l + 2 < p.row_lanes) c2 = combine(c2, entry(l + 2, j));
    const GradSums acc = combine(combine(c0, c1), combine(c2, c3));
    if (p.G > 1)
      publish_grad(part[size_t(rank) * chs + j], acc, tag);
    else
      red[channel_entry<kVec>(j)] = make_float4(acc.s0_hi, acc.s0_lo, acc.a, acc.b);
  }
  __syncthreads();
  if (p.G > 1) {
    merge_grad_channels<kThreads, 4>(part, chs, p.G, tag, red,
                                     [](int j) { return channel_entry<kVec>(j); });
    __syncthreads();
  }
}

/// Calls f(q, xc, d) for each of a thread's `rows` rows q in shared memory: xc = x - cen and
/// d = dy, per channel of its column vector.
template <int kVec, class V, class F>
__device__ __forceinline__ void for_each_row(const V* xs, const V* ds, int rows,
                                             const float (&cen)[kVec], F f) {
#pragma unroll 1
  for (int q = 0; q < rows; ++q) {
    float xc[kVec], d[kVec];
    unpack(xs[q * kNhwcGradChipThreads], xc);
    unpack(ds[q * kNhwcGradChipThreads], d);
#pragma unroll
    for (int k = 0; k < kVec; ++k) xc[k] -= cen[k];
    f(q, xc, d);
  }
}

/// One launch per call: persistent groups of G blocks take units block_group, block_group +
/// groups, ... (all G blocks of a group the same units, so their exchanges pair up).
template <class T, int kVec>
__global__ void __launch_bounds__(kNhwcGradChipThreads, 2)
    nhwc_grad_on_chip(const NhwcGradChipParams<T> p) {
  using V = Vector<T, kVec>;
  constexpr int kThreads = kNhwcGradChipThreads;
  extern __shared__ uint4 dyn_smem[];
  const int t = threadIdx.x;
  const int cs = p.cols, row_lanes = p.row_lanes;
  const int chs = cs * kVec;
  const int cstride = (chs + 3) / 4 * 4;
  // Dynamic shared memory (contract.cuh's nhwc_grad_chip_prefix_bytes): the reduction table,
  // the per-channel arrays, then the rows, x's and dy's, row q of thread t at [q * kThreads + t].
  float4* red = reinterpret_cast<float4*>(dyn_smem);
  float* arr = reinterpret_cast<float*>(red + kThreads * kVec);
  const GradChipChannels ch{arr,               arr + cstride,     arr + 2 * cstride,
                            arr + 3 * cstride, arr + 4 * cstride, arr + 5 * cstride,
                            arr + 6 * cstride, arr + 7 * cstride, arr + 8 * cstride};
  V* xs = reinterpret_cast<V*>(arr + kNhwcGradChipChannelFloats * cstride) + t;
  V* ds = xs + p.rows * kThreads;
  const int rl = t / cs, cl = t % cs;
  const bool on = rl < row_lanes;
  const int64_t S = p.spatial, C = p.c;
  const int cpg = int(p.cpg);
  const SliceRows sr(p.G, S, p.slice_rows);
  const int rank = sr.rank, block_group = sr.group, block_groups = sr.groups;
  const int64_t units = p.n * p.col_slices;
  const int64_t row_begin = sr.begin;
  const int my_rows = sr.lane_rows(on, rl, row_lanes);
  const bool act = p.activation != Activation::kNone;
  const float inv_len = 1.f / float(int64_t(cpg) * S);
  const int64_t rstep = int64_t(row_lanes) * (C / kVec);  // vectors from one row of a thread to its next
  unsigned ex = 0;  // exchanges so far: tag and buffer parity
  for (int64_t unit = block_group; unit < units; unit += block_groups) {
    const int64_t image = unit / p.col_slices;
    const int64_t slice0 = (unit % p.col_slices) * chs;  // the slice's first channel
    const int64_t colv = slice0 / kVec + cl;
    // The thread's first row, in vectors (0 for a thread without rows: no pointer past x).
    const int64_t first = my_rows > 0 ? (image * S + row_begin + rl) * (C / kVec) + colv : 0;
    // The rows first: theirs are the long loads.
    const V* xv = reinterpret_cast<const V*>(p.x) + first;
    const V* dv = reinterpret_cast<const V*>(p.dy) + first;
#pragma unroll 1
    for (int q = 0; q < my_rows; ++q) {
      copy_async16(xs + q * kThreads, xv + q * rstep);
      copy_async16(ds + q * kThreads, dv + q * rstep);
    }
    copy_async_commit();
    // The slice's channels: their group's saved statistics and their affine maps.
#pragma unroll 1
    for (int j = t; j < chs; j += kThreads) {
      const int64_t chn = slice0 + j;
      const int64_t u = image * p.groups + chn / cpg;
      ch.c[j] = p.save_mean[u];
      ch.rstd[j] = p.save_rstd[u];
      const ChannelAffine af = channel_affine<T>(p, image, chn);
      ch.gamma[j] = af.gamma;
      ch.beta[j] = af.beta;
    }
    copy_async_wait<0>();
    __syncthreads();
    const int j0 = cl * kVec;  // this thread's first channel in the slice
    float cen[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) cen[k] = on ? ch.c[j0 + k] : 0.f;

    // 1. With an activation: the residual of each group, from the sums of x - c.
    if (act) {
      GradSums s[kVec];
#pragma unroll 1
      for (int q = 0; q < my_rows; ++q) {
        float xf[kVec];
        unpack(xs[q * kThreads], xf);
#pragma unroll
        for (int k = 0; k < kVec; ++k) add_compensated(s[k], xf[k] - cen[k]);
      }
      reduce_slice_sums<kThreads, kVec>(p, s, red, chs, rank, block_group, ex++);
#pragma unroll 1
      for (int g0 = t * cpg; g0 < chs; g0 += kThreads * cpg) {
        GradSums tot;
        for (int j = g0; j < g0 + cpg; ++j) {
          const float4 v = red[channel_entry<kVec>(j)];
          tot = combine(tot, GradSums{v.x, v.y, 0.f, 0.f});
        }
        const float r = (tot.s0_hi + tot.s0_lo) * inv_len;
        for (int j = g0; j < g0 + cpg; ++j) {
          const float a = ch.rstd[j] * ch.gamma[j];
          ch.r[j] = r;
          ch.a[j] = a;
          ch.p0[j] = fmaf(-r, a, ch.beta[j]);
        }
      }
      __syncthreads();
    }

    // 2. The sums of d and d * (x - c) (and of x - c without an activation).
    {
      float sa[kVec], sp[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        sa[k] = act && on ? ch.a[j0 + k] : 0.f;
        sp[k] = act && on ? ch.p0[j0 + k] : 0.f;
      }
      GradSums s[kVec];
      with_activation(p.activation, [&](auto act_tag) {
        constexpr Activation kAct = decltype(act_tag)::value;
        for_each_row(xs, ds, my_rows, cen, [&](int, float(&xc)[kVec], float(&d)[kVec]) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            if constexpr (kAct == Activation::kNone)
              add_compensated(s[k], xc[k]);
            else
              d[k] *= activate_derivative<kAct>(fmaf(sa[k], xc[k], sp[k]));
            s[k].a += d[k];
            s[k].b = fmaf(d[k], xc[k], s[k].b);
          }
        });
      });
      reduce_slice_sums<kThreads, kVec>(p, s, red, chs, rank, block_group, ex++);
    }
    // Each group's k1 and k2, its channels' GradCoef, and the partials of dgamma/dbeta (or
    // dscale/dshift directly), one thread per group, its channels in order.
#pragma unroll 1
    for (int g0 = t * cpg; g0 < chs; g0 += kThreads * cpg) {
      GradPlane pl;
      pl.rstd = ch.rstd[g0];
      float sg = 0.f, sgb = 0.f;
      GradSums tot;
      for (int j = g0; j < g0 + cpg; ++j) {
        const float4 v = red[channel_entry<kVec>(j)];
        tot = combine(tot, GradSums{v.x, v.y, 0.f, 0.f});
        sg = fmaf(ch.gamma[j], v.z, sg);
        sgb = fmaf(ch.gamma[j], v.w, sgb);
      }
      pl.r = act ? ch.r[g0] : (tot.s0_hi + tot.s0_lo) * inv_len;
      pl.k1 = sg * inv_len;
      pl.k2 = pl.rstd * fmaf(-pl.r, sg, sgb) * inv_len * p.var_scale;
      for (int j = g0; j < g0 + cpg; ++j) {
        pl.c = ch.c[j];
        const GradCoef f = grad_coef(pl, ChannelAffine{ch.gamma[j], ch.beta[j]});
        ch.a[j] = f.a;
        ch.p0[j] = f.p0;
        ch.b[j] = f.b;
        ch.e[j] = f.e;
        if (rank == 0 && p.partials != nullptr) {
          const float4 v = red[channel_entry<kVec>(j)];
          const float sdx = pl.rstd * fmaf(-pl.r, v.z, v.w);
          p.partials[image * C + slice0 + j] = make_float2(v.z, sdx);
          store_direct_scale_shift<T>(p, image, slice0 + j, v.z, sdx);
        }
      }
    }
    __syncthreads();

    // 3. dx from the rows on chip.
    {
      float ca[kVec], cp[kVec], cb[kVec], ce[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        ca[k] = on ? ch.a[j0 + k] : 0.f;
        cp[k] = on ? ch.p0[j0 + k] : 0.f;
        cb[k] = on ? ch.b[j0 + k] : 0.f;
        ce[k] = on ? ch.e[j0 + k] : 0.f;
      }
      V* dxv = reinterpret_cast<V*>(p.dx) + first;
      with_activation(p.activation, [&](auto act_tag) {
        constexpr Activation kAct = decltype(act_tag)::value;
        for_each_row(xs, ds, my_rows, cen, [&](int q, float(&xc)[kVec], float(&d)[kVec]) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            if constexpr (kAct != Activation::kNone)
              d[k] *= activate_derivative<kAct>(fmaf(ca[k], xc[k], cp[k]));
            d[k] = fmaf(ca[k], d[k], fmaf(cb[k], xc[k], ce[k]));
          }
          store_vector(dxv + q * rstep, pack<T, kVec>(d));
        });
      });
    }
    __syncthreads();  // the table and the arrays are rewritten by the next unit
  }
}

}  // namespace detail
}  // namespace instnorm
