#pragma once
/// \file epilogue/grad_partials.cuh
/// The backward's per-plane quantities (pivot, residual, rstd and the two coefficients of dx),
/// the channel's gamma/beta a lane tracks, and the partials of dgamma/dbeta: GroupNorm's
/// per-channel sums cut from per-vector sums in shared memory, and their fixed-order reduction
/// over images and blocks.

#include "../block/layout.cuh"
#include "../block/reduce.cuh"
#include "../grid/dependency.cuh"
#include "epilogue.cuh"

namespace instnorm {
namespace detail {

/// The affine map (gamma and beta, the modulation of `image` folded in: channel_affine) of the
/// channel a lane's vector lies in (the cursor of epilogue.cuh sets it).
template <class T>
struct GradChannel {
  float gamma = 1.f, beta = 0.f;
  int64_t image = 0;  ///< the plane's sample (read by a modulated call only)
  __device__ __forceinline__ void set_channel(const EpilogueFields& p, int64_t ch) {
    const ChannelAffine a = channel_affine<T>(p, image, ch);
    gamma = a.gamma;
    beta = a.beta;
  }
};

/// What a round knows about its plane: the pivot c (saved or running mean), the residual
/// r = mean - c, rstd, and the two coefficients of dx = rstd * (gamma * d - k1 - xhat * k2).
struct GradPlane {
  float c = 0.f, r = 0.f, rstd = 0.f, k1 = 0.f, k2 = 0.f;
};

/// What channel_partial_sums does with a channel's sums.
enum class PartialMode : int {
  kStore,          ///< first chunk of a streamed slice: store the raw sums (relative to c)
  kAdd,            ///< later chunks: add them
  kFinish,         ///< streamed, after the exchange: turn the stored raw sums into the result
  kStoreFinished,  ///< slice in registers, after the exchange: store the result
};

/// GroupNorm's per-channel partials of dgamma/dbeta: channel ch's part of the chunk [first,
/// first + clen) of the plane is a run of vectors in vec_sums (group g's at g * items * lanes);
/// team t of the group sums channels t, t + teams, ... over its lanes, then a butterfly, so a
/// channel's slot is always written by the same thread. The result is (sum of d, sum of d * xhat)
/// = (a, rstd * (b - r * a)) of the raw sums (a, b) relative to c. Every lane of a warp calls it
/// (inactive groups too), with the same channel count.
template <int kVec, class Params>
__device__ __forceinline__ void channel_partial_sums(const Params& p,
                                                  const float2* vec_sums, int held,
                                                  int64_t plane,
                                                  int64_t first, int64_t clen, int rank,
                                                  bool active, PartialMode mode,
                                                  const GradPlane& pl) {
  const int64_t S = p.spatial, cpg = p.channels_per_group, c = p.groups * cpg;
  const int G = int(p.blocks_per_plane), lanes = p.lanes;
  const LaneGroups lg = lane_groups(lanes);
  const int lane = lg.lane, group = lg.group;
  // Teams: the warps of a block plan, the lane group otherwise.
  const int team_width = lanes < 32 ? lanes : 32;
  const int teams = lanes < 32 ? 1 : lanes / 32;
  const int team = lanes < 32 ? 0 : lane / 32;
  const int64_t image = plane / p.groups, channel_base = (plane % p.groups) * cpg;
  const int tl = lane % team_width;
  const float2* mine = vec_sums + int64_t(group) * held * p.lanes;
#pragma unroll 1
  for (int64_t k = team; k < cpg; k += teams) {
    float2* slot = p.partials + ((image * c + channel_base + k) * G + rank);
    float a = 0.f, b = 0.f;
    if (mode != PartialMode::kFinish) {
      const int64_t lo = k * S > first ? k * S : first;
      const int64_t hi = (k + 1) * S < first + clen ? (k + 1) * S : first + clen;
      if (hi > lo) {
        const int64_t vlo = (lo - first) / kVec, vhi = (hi - first) / kVec;
        for (int64_t v = vlo + tl; v < vhi; v += team_width) {
          a += mine[v].x;
          b += mine[v].y;
        }
      }
      a = butterfly_sum(a, team_width);
      b = butterfly_sum(b, team_width);
    }
    if (!active || tl != 0) continue;
    if (mode == PartialMode::kStore) {
      *slot = make_float2(a, b);
    } else if (mode == PartialMode::kAdd) {
      const float2 o = *slot;
      *slot = make_float2(o.x + a, o.y + b);
    } else {
      if (mode == PartialMode::kFinish) {
        const float2 o = *slot;
        a = o.x;
        b = o.y;
      }
      *slot = make_float2(a, pl.rstd * fmaf(-pl.r, a, b));
    }
  }
}

/// The parameter gradients from the partials (sum of d, sum of d * xhat) of each (image,
/// channel, block): one warp per channel, and one launch for all of them.
///  - dbeta[ch], dgamma[ch]: over images and blocks. With a modulation each image's part is
///    weighted by its factor m (pre = xhat * gamma * m + ...): dgamma by m, dbeta by m where the
///    factor is 1 + scale and multiplies beta too.
///  - dshift[i * c + ch] = B, dscale[i * c + ch] = gamma * A (+ beta * B with 1 + scale:
///    pre = (xhat * gamma + beta) * (1 + scale) + shift), A and B image i's sums of d * xhat
///    and d over its G blocks.
/// Fixed orders, so reruns give the same bits: without dscale/dshift, lanes take entries lane,
/// lane + 32, ... of the n * G; with them, lanes take whole images (their G blocks in order);
/// then a butterfly.
template <class T>
__global__ void grad_params_kernel(const float2* partials, int64_t n, int64_t c, int64_t G,
                                   const EpilogueFields f, Gradients g) {
  wait_for_prerequisite();  // launched dependent after the channels-last dx
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const bool per_image = g.dscale != nullptr || g.dshift != nullptr;
  for (int64_t ch = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); ch < c;
       ch += warps) {
    float a = 0.f, b = 0.f;
    if (!per_image) {
      for (int64_t i = lane; i < n * G; i += 32) {
        const float2 v = partials[((i / G) * c + ch) * G + i % G];
        const float m = modulation_factor<T>(f, i / G, ch);  // fmaf(1, v, s) == v + s
        a = fmaf(f.one_plus_scale ? m : 1.f, v.x, a);
        b = fmaf(m, v.y, b);
      }
    } else {
      const float g0 = f.gamma ? load_param<T>(f.gamma, f.params_float, ch) : 1.f;
      const float b0 = f.beta ? load_param<T>(f.beta, f.params_float, ch) : 0.f;
      for (int64_t i = lane; i < n; i += 32) {
        // The factor is loaded before the stores below: after them the compiler must assume
        // they may alias the map, and each image's factor round trip would wait on them.
        const float m = modulation_factor<T>(f, i, ch);
        float sd = 0.f, sdx = 0.f;
        for (int64_t r = 0; r < G; ++r) {
          const float2 v = partials[(i * c + ch) * G + r];
          sd += v.x;
          sdx += v.y;
        }
        if (g.dshift) g.dshift[i * c + ch] = sd;
        if (g.dscale) g.dscale[i * c + ch] = f.one_plus_scale ? fmaf(g0, sdx, b0 * sd) : g0 * sdx;
        a = fmaf(f.one_plus_scale ? m : 1.f, sd, a);
        b = fmaf(m, sdx, b);
      }
    }
    a = butterfly_sum(a, 32);
    b = butterfly_sum(b, 32);
    if (lane == 0) {
      if (g.dbeta) g.dbeta[ch] = a;
      if (g.dgamma) g.dgamma[ch] = b;
    }
  }
}

}  // namespace detail
}  // namespace instnorm
