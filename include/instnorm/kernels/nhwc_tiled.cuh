#pragma once
/// \file kernels/nhwc_tiled.cuh
/// Channels-last (NHWC) kernels. An image is an S x C matrix; a thread owns one column vector
/// (vec consecutive channels) and walks rows, so every load is a coalesced 16-byte vector along
/// C. Two plans (plan.cuh, NhwcPlan):
/// - On chip, one kernel (nhwc_on_chip, at the end of this file): image slices held in registers
///   and shared memory by G co-resident blocks that exchange per-channel partials; one read.
/// - Tiled, three kernels per batch of images (sized by the planner to stay in L2), for eval
///   mode and where nothing fits on chip:
///   1. nhwc_partials: each block reduces a tile of rows to one Moments per channel,
///   2. nhwc_finalize: one thread per (image, group) merges the tiles and channels of its group
///      in a fixed order (bit-identical reruns) into (center, residual, rstd),
///   3. nhwc_normalize: y = act((x - center) * rstd * gamma + (beta - residual * ...)), the second
///      read of x hitting L2 where the batch fits.
/// Moments are relative to a pivot per (image, group), the group's first element, as in NCHW.

#include "../block/reduce.cuh"
#include "../epilogue/epilogue.cuh"
#include "nhwc_params.cuh"

namespace instnorm {
namespace detail {

/// Phase 1: per-tile, per-channel partial moments (two passes over kNhwcRows rows held in
/// registers, merged chunk by chunk), then a fixed-order merge over the block's row lanes.
template <class T, int kVec>
__global__ void __launch_bounds__(kNhwcThreads) nhwc_partials(const NhwcParams<T> p) {
  using V = Vector<T, kVec>;
  // The row lanes' partials: (mean, var, mean_lo) per channel and one count per thread (the same
  // for its kVec channels), 12 * kVec + 8 bytes a thread instead of 24 * kVec.
  __shared__ float3 sm[kNhwcThreads * kVec];
  __shared__ int64_t sm_count[kNhwcThreads];
  const int cpb = p.cols_per_block;
  const int t = threadIdx.x;
  const int rl = t / cpb;
  const int64_t cv = p.c / kVec;
  const int64_t col = blockIdx.y * int64_t(cpb) + t % cpb;
  const bool active = rl < p.row_lanes && col < cv;
  for (int64_t u = blockIdx.x; u < p.img_count * p.tiles; u += gridDim.x) {
    const int64_t li = u / p.tiles, tile = u % p.tiles, image = p.img_first + li;
    const int64_t r_begin = tile * p.tile_rows;
    const int64_t r_end = r_begin + p.tile_rows < p.spatial ? r_begin + p.tile_rows : p.spatial;
    Moments acc[kVec];
    if (active) {
      float pivot[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) pivot[k] = group_pivot(p, image, (col * kVec + k) / p.cpg);
      const V* xs = reinterpret_cast<const V*>(p.x + image * p.spatial * p.c) + col;
      const int64_t step = int64_t(p.row_lanes) * kNhwcRows;
      for (int64_t r0 = r_begin + rl; r0 < r_end; r0 += step) {
        V v[kNhwcRows];
        int valid = 0;
#pragma unroll
        for (int q = 0; q < kNhwcRows; ++q) {
          const int64_t r = r0 + int64_t(q) * p.row_lanes;
          if (r < r_end) {
            v[q] = load_vector(xs + r * cv);
            valid = q + 1;
          }
        }
        float f[kNhwcRows][kVec];
#pragma unroll
        for (int q = 0; q < kNhwcRows; ++q)
          if (q < valid) unpack(v[q], f[q]);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          float sum = 0.f;
#pragma unroll
          for (int q = 0; q < kNhwcRows; ++q)
            if (q < valid) sum += f[q][k];
          const float cen = sum / float(valid);
          float s1 = 0.f, s2 = 0.f;
#pragma unroll
          for (int q = 0; q < kNhwcRows; ++q) {
            if (q < valid) {
              const float d = f[q][k] - cen;
              s1 += d;
              s2 = fmaf(d, d, s2);
            }
          }
          acc[k] = merge(acc[k], moments_from_sums(valid, cen, 0, s1, s2, pivot[k]));
        }
      }
    }
    const auto from_smem = [&](int i, int k) {
      const float3 v = sm[i * kVec + k];
      return Moments{v.x, v.y, sm_count[i], v.z};
    };
#pragma unroll
    for (int k = 0; k < kVec; ++k) sm[t * kVec + k] = make_float3(acc[k].mean, acc[k].var, acc[k].mean_lo);
    sm_count[t] = acc[0].count;
    __syncthreads();
    // Tree over the row lanes (slot rl * cpb + column), lower lane first: log2(row_lanes)
    // merges deep instead of row_lanes (a serial walk made the block's tail dominate).
    for (int stride = 1; stride < p.row_lanes; stride <<= 1) {
      if (rl % (2 * stride) == 0 && rl + stride < p.row_lanes) {
        const int o = t + stride * cpb;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const Moments m = merge(from_smem(t, k), from_smem(o, k));
          sm[t * kVec + k] = make_float3(m.mean, m.var, m.mean_lo);
        }
        sm_count[t] += sm_count[o];
      }
      __syncthreads();
    }
    if (rl == 0 && col < cv) {
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        p.partials[(li * p.tiles + tile) * p.c + col * kVec + k] = from_smem(t, k);
    }
    __syncthreads();
  }
}

/// Phase 2: L lanes (a power of two <= 32 near the entry count) per (image, group). Lane l merges
/// entries l, l + L, ... of the group's tiles x channels (tile-major, 4 loads in flight), then
/// the lanes merge their partials in a fixed order: the same bits every run. A single thread per
/// group walking the partials serially spent ~600 cycles of L2 latency per entry (0.18 ms per
/// 16 MB image on the H100); a block per group left 65536 nearly empty blocks on 128x512x7x7.
template <class T>
__global__ void __launch_bounds__(kNhwcThreads) nhwc_finalize(const NhwcParams<T> p) {
  const int L = p.finalize_lanes;  // power of two <= 32, about the entries per group
  const int per_block = kNhwcThreads / L;
  const int lane = threadIdx.x % L;
  const int64_t units = p.img_count * p.groups;
  const int64_t entries = p.tiles * p.cpg;
  for (int64_t u0 = blockIdx.x * int64_t(per_block); u0 < units;
       u0 += int64_t(gridDim.x) * per_block) {
    const int64_t u = u0 + threadIdx.x / L;
    const bool active = u < units;
    const int64_t li = active ? u / p.groups : 0, g = active ? u % p.groups : 0;
    const Moments* part = p.partials + li * p.tiles * p.c + g * p.cpg;
    auto entry = [&](int64_t e) { return part[(e / p.cpg) * p.c + e % p.cpg]; };
    Moments m;
    int64_t e = lane;
    for (; active && e + 3 * L < entries; e += 4 * L) {
      const Moments a = entry(e), b = entry(e + L), c = entry(e + 2 * L), d = entry(e + 3 * L);
      m = merge(merge(merge(merge(m, a), b), c), d);
    }
    for (; active && e < entries; e += L) m = merge(m, entry(e));
    m = warp_allreduce(m, L);
    if (active && lane == 0) {
      const int64_t image = p.img_first + li;
      const PlaneStats st = plane_stats(group_pivot(p, image, g), m, p);
      const int64_t plane = image * p.groups + g;
      p.group_stats[plane] = make_float4(st.center, st.residual, st.rstd, 0.f);
      store_plane_stats(p, plane, st);
    }
  }
}

/// Phase 3: normalize; each thread keeps its column's kVec (center, scale, shift) for the tile.
template <Activation kAct, class T, int kVec>
__device__ __forceinline__ void nhwc_normalize_rows(const NhwcParams<T>& p, const Vector<T, kVec>* xs,
                                                    Vector<T, kVec>* ys, int64_t cv, int64_t r_begin,
                                                    int64_t r_end, int rl, const float (&cen)[kVec],
                                                    const float (&scale)[kVec],
                                                    const float (&shift)[kVec]) {
  constexpr int kInFlight = 4;
  const int64_t step = int64_t(p.row_lanes);
  for (int64_t r0 = r_begin + rl; r0 < r_end; r0 += step * kInFlight) {
    Vector<T, kVec> v[kInFlight];
#pragma unroll
    for (int q = 0; q < kInFlight; ++q) {
      const int64_t r = r0 + q * step;
      if (r < r_end) v[q] = load_vector(xs + r * cv);
    }
#pragma unroll
    for (int q = 0; q < kInFlight; ++q) {
      const int64_t r = r0 + q * step;
      if (r < r_end) {
        float f[kVec];
        unpack(v[q], f);
#pragma unroll
        for (int k = 0; k < kVec; ++k) f[k] = activate<kAct>(fmaf(f[k] - cen[k], scale[k], shift[k]));
        store_vector(ys + r * cv, pack<T, kVec>(f));
      }
    }
  }
}

/// The minimum of one block per SM in the bounds lets ptxas use the registers it needs: with the
/// default bounds the bf16 instantiation spilled 8 bytes on sm_90 at 80 registers.
template <class T, int kVec>
__global__ void __launch_bounds__(kNhwcThreads, 1) nhwc_normalize(const NhwcParams<T> p) {
  using V = Vector<T, kVec>;
  const int cpb = p.cols_per_block;
  const int t = threadIdx.x;
  const int rl = t / cpb;
  const int64_t cv = p.c / kVec;
  const int64_t col = blockIdx.y * int64_t(cpb) + t % cpb;
  if (rl >= p.row_lanes || col >= cv) return;
  for (int64_t u = blockIdx.x; u < p.img_count * p.tiles; u += gridDim.x) {
    const int64_t li = u / p.tiles, tile = u % p.tiles, image = p.img_first + li;
    const int64_t r_begin = tile * p.tile_rows;
    const int64_t r_end = r_begin + p.tile_rows < p.spatial ? r_begin + p.tile_rows : p.spatial;
    float cen[kVec], scale[kVec], shift[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t ch = col * kVec + k;
      float residual = 0.f, rstd;
      if (p.running_mean) {
        const PlaneStats st = running_plane_stats(p, ch);
        if (tile == 0 && rl == 0) store_plane_stats(p, image * p.c + ch, st);
        cen[k] = st.center;
        rstd = st.rstd;
      } else {
        const float4 gs = p.group_stats[image * p.groups + ch / p.cpg];
        cen[k] = gs.x;
        residual = gs.y;
        rstd = gs.z;
      }
      const ScaleShift ss = scale_shift<T>(p, image, ch, rstd, residual);
      scale[k] = ss.scale;
      shift[k] = ss.shift;
    }
    const V* xs = reinterpret_cast<const V*>(p.x + image * p.spatial * p.c) + col;
    V* ys = reinterpret_cast<V*>(p.y + image * p.spatial * p.c) + col;
    with_activation(p.activation, [&](auto act) {
      nhwc_normalize_rows<decltype(act)::value>(p, xs, ys, cv, r_begin, r_end, rl, cen, scale, shift);
    });
  }
}



}  // namespace detail
}  // namespace instnorm
