#pragma once
/// \file kernels/backward_nhwc.cuh
/// The channels-last backward, a tiled fallback in three steps: tile sums (each block a tile of
/// rows of one image and a range of channel columns; per channel the float-float sum of x - c
/// and the sums of d and d * (x - c), relative to the saved mean c), a per-(image, group)
/// finalize that adds the tiles in a fixed order into the plane coefficients of dx (and the
/// per-(image, channel) partials of dgamma/dbeta, and dx's coefficients per (image, channel):
/// GradCoef), then dx elementwise. x and dy are read twice
/// (three times with an activation, whose pre-activation needs the mean's residual first): not
/// the one-pass floor of the NCHW kernel (docs/design.md).

#include "../grid/dependency.cuh"
#include "backward.cuh"

namespace instnorm {
namespace detail {

template <class T>
struct NhwcGradParams : EpilogueFields, GradTensors<T> {
  int64_t n, c, cpg;
  const float* save_mean;
  const float* save_rstd;
  bool use_input_stats;
  int64_t tiles;      ///< row tiles per image
  int64_t tile_rows;  ///< rows per tile
  int cols;           ///< column vectors per block (blockDim.x / cols row lanes)
  float4* tile_sums;  ///< [n][tiles][c]: (s0_hi, s0_lo, a, b)
  float4* unit;       ///< [n * groups]: (c, r, rstd, 0), for the sums after the residual pass
  float2* partials;   ///< [n * c]: (sum of d, sum of d * xhat), or null
  float4* coef;       ///< [n * c]: GradCoef's (a, b, c, e)
  float* coef_pre;    ///< [n * c]: GradCoef's p0 (with an activation)
  int fin_warps;      ///< warps per unit in the finalize (1, or a block of up to 8 of them)
  int coef_vec;       ///< channels per column vector of the dx step (coef_slot)
  /// Neither dgamma nor dbeta asked (launch/backward.cuh: nhwc_direct_scale_shift): the
  /// finalize stores dscale/dshift ([n * c]) itself, and grad_params_kernel is not launched.
  float* dscale;
  float* dshift;
};

/// Where the GradCoef of channel `ch` sits among its image's c entries of coef and coef_pre:
/// channel k of column vector v at k * (c / coef_vec) + v. A warp's lanes (consecutive column
/// vectors) then load their k-th coefficients from consecutive addresses, where in channel
/// order (lanes kVec entries apart) each load instruction of the dx step touched 32 lines: with
/// 8 float4 and 8 float loads per image a thread visits, ncu (H200, 2x320x64x64 fp16 GN32 SiLU)
/// put the dx kernel at 83% of L1 throughput and 11% of DRAM's.
/// By column vector and channel within it (the dx step, whose kVec is the coef_vec).
__host__ __device__ __forceinline__ int64_t coef_slot(int64_t c, int vec, int64_t column,
                                                      int64_t k) {
  return k * (c / vec) + column;
}
template <class T>
__host__ __device__ __forceinline__ int64_t coef_slot(const NhwcGradParams<T>& p, int64_t ch) {
  return coef_slot(p.c, p.coef_vec, ch / p.coef_vec, ch % p.coef_vec);
}

/// dx of channel ch in image i, folded by the finalize from its unit's plane quantities and the
/// channel's affine map (gamma and beta with the modulation of image i: channel_affine):
/// with xc = x - c (c the saved mean, so xc keeps full accuracy at any |mean|),
///   pre = a * xc + p0,   dx = a * d + b * xc + e,   d = dy * act'(pre),
/// a = rstd * gamma, p0 = beta - r * a, b = -rstd^2 * k2, e = -rstd * k1 - b * r: the
/// dx = rstd * (gamma * d - k1 - xhat * k2) of GradPlane. One (or, with an activation, two)
/// coalesced loads per channel and image, where the dx step otherwise reloaded the unit and,
/// modulated, gamma, beta, scale and shift of every channel in every image a thread visits.
struct GradCoef {
  float a, b, c, e, p0;
};
__device__ __forceinline__ GradCoef grad_coef(const GradPlane& pl, const ChannelAffine& af) {
  GradCoef k;
  k.a = pl.rstd * af.gamma;
  k.p0 = fmaf(-pl.r, k.a, af.beta);
  k.b = -pl.rstd * pl.rstd * pl.k2;
  k.c = pl.c;
  k.e = fmaf(-k.b, pl.r, -pl.rstd * pl.k1);
  return k;
}

/// Where neither dgamma nor dbeta is asked (nhwc_direct_scale_shift), the per-(image, channel)
/// dshift and dscale from the channel's sums (sum of d, sum of d * xhat), as grad_params_kernel
/// forms them from one block's partials (0 + v as its sums start).
template <class T>
__device__ __forceinline__ void store_direct_scale_shift(const NhwcGradParams<T>& p,
                                                         int64_t image, int64_t ch, float sd0,
                                                         float sdx) {
  if (p.dshift != nullptr) p.dshift[image * p.c + ch] = 0.f + sd0;
  if (p.dscale != nullptr) {
    const float g0 = p.gamma ? load_param<T>(p.gamma, p.params_float, ch) : 1.f;
    const float b0 = p.beta ? load_param<T>(p.beta, p.params_float, ch) : 0.f;
    const float sd = 0.f + sd0, sg = 0.f + sdx;
    p.dscale[image * p.c + ch] = p.one_plus_scale ? fmaf(g0, sg, b0 * sd) : g0 * sg;
  }
}

/// The pivot, residual and rstd of the unit channel `ch` of image `i` belongs to: the saved
/// statistics, or as the residual pass's finalize left them.
template <class T>
__device__ __forceinline__ GradPlane nhwc_unit(const NhwcGradParams<T>& p, int64_t i, int64_t ch,
                                               bool finalized) {
  GradPlane pl;
  if (!p.use_input_stats) {
    pl.c = p.running_mean[ch];
    pl.rstd = 1.f / sqrtf(p.running_var[ch] + p.eps);
    return pl;
  }
  const int64_t u = i * p.groups + ch / p.cpg;
  if (!finalized) {
    pl.c = p.save_mean[u];
    pl.rstd = p.save_rstd[u];
    return pl;
  }
  const float4 a = p.unit[u];
  pl.c = a.x;
  pl.r = a.y;
  pl.rstd = a.z;
  return pl;
}

/// A block's table of per-thread, per-channel partials (the tile sums here, the on-chip
/// backward's reduce_slice_sums): the entry of thread t's partial of its channel k, in thread
/// t's row of kVec float4s, the channels rotated by t (k ^ (t mod kVec)). In row order
/// (t * kVec + k) a quarter warp's float4 stores of one channel lie kVec * 16 bytes apart, in
/// the same four banks: 8-way conflicts for kVec = 8, 32 wavefronts a store instead of 4.
/// Rotated, they fall in distinct banks (kVec = 4: 2-way, from 4-way), and the threads that
/// add a row lane's channels still read one row each, conflict-free. kVec = 1: row order.
template <int kVec>
__device__ __forceinline__ int table_entry(int t, int k) {
  static_assert((kVec & (kVec - 1)) == 0, "a rotation within the row needs a power of two");
  return t * kVec + (k ^ (t & (kVec - 1)));
}
/// Step 1: the tile sums. kResidualOnly: only s0 (the first pass of an activation's backward).
/// Dynamic shared memory: blockDim.x * kVec float4.
template <class T, int kVec, bool kResidualOnly>
__global__ void __launch_bounds__(256) nhwc_grad_sums(const NhwcGradParams<T> p) {
  using V = Vector<T, kVec>;
  extern __shared__ uint4 dyn_smem[];
  float4* red = reinterpret_cast<float4*>(dyn_smem);
  const int col = threadIdx.x % p.cols, rl = threadIdx.x / p.cols;
  const int row_lanes = blockDim.x / p.cols;
  const int64_t image = blockIdx.x / p.tiles, tile = blockIdx.x % p.tiles;
  const int64_t colv = int64_t(blockIdx.y) * p.cols + col;
  const bool valid = colv * kVec < p.c && rl < row_lanes;
  const int64_t j0 = valid ? colv * kVec : 0;
  GradPlane pl[kVec];
  GradChannel<T> gc[kVec];
  GradSums s[kVec];
  const bool finalized = p.activation != Activation::kNone && !kResidualOnly && p.use_input_stats;
  const auto load_maps = [&] {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      gc[k].image = image;
      gc[k].set_channel(p, j0 + k);
    }
  };
  // After a residual pass (finalized) this kernel is not the chain's first: the affine maps,
  // which no kernel of the chain writes, are loaded before the wait, while the finalize before
  // it drains (the kernel before the chain completed before that finalize could start). Loaded
  // after it, each block waited their round trip before its first row (2x320x64x64 fp16 GN32
  // SiLU :ss :cl :bwd: this pass 1.3 us longer than without the modulation, ncu, H100). The
  // chain's first kernel waits first: the kernel before it may be writing them.
  if (finalized) load_maps();
  wait_for_prerequisite();
  allow_dependent_launch();
  if (!finalized) load_maps();
#pragma unroll
  for (int k = 0; k < kVec; ++k) pl[k] = nhwc_unit(p, image, j0 + k, finalized);
  const int64_t r0 = tile * p.tile_rows;
  const int64_t r1 = r0 + p.tile_rows < p.spatial ? r0 + p.tile_rows : p.spatial;
  // The residual pass (an activation's) brings the image's affine maps into L2 for the sums
  // pass, which folds them before its first row (pre needs them): from DRAM, each of its
  // blocks waited a round trip there (2x320x64x64 fp16 GN32 SiLU :ss :cl :bwd 3.6% over the
  // row without modulation, H100). One row lane of each image's first tile.
  if (kResidualOnly && has_channel_params(p) && valid && tile == 0 && rl == 0) {
    const int64_t at = image * p.scale_stride + j0;
    const size_t t = p.params_float ? sizeof(float) : sizeof(T);
    const size_t m = p.mod_float ? sizeof(float) : sizeof(T);
    if (p.gamma) prefetch_l2(static_cast<const char*>(p.gamma) + j0 * t);
    if (p.beta) prefetch_l2(static_cast<const char*>(p.beta) + j0 * t);
    if (p.mod_scale) prefetch_l2(static_cast<const char*>(p.mod_scale) + at * m);
    if (p.mod_shift)
      prefetch_l2(static_cast<const char*>(p.mod_shift) + (image * p.shift_stride + j0) * m);
  }
  with_activation(p.activation, [&](auto act_tag) {
    constexpr Activation kAct = decltype(act_tag)::value;
    if (!valid) return;
#pragma unroll 4
    for (int64_t row = r0 + rl; row < r1; row += row_lanes) {
      const int64_t at = (image * p.spatial + row) * p.c + j0;
      float xc[kVec], d[kVec];
      unpack(load_vector(reinterpret_cast<const V*>(p.x + at)), xc);
      if (!kResidualOnly) unpack(load_vector(reinterpret_cast<const V*>(p.dy + at)), d);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        xc[k] -= pl[k].c;
        if (kResidualOnly || (kAct == Activation::kNone && p.use_input_stats))
          add_compensated(s[k], xc[k]);
        if (!kResidualOnly) {
          if constexpr (kAct != Activation::kNone)
            d[k] *= activate_derivative<kAct>(
                fmaf((xc[k] - pl[k].r) * pl[k].rstd, gc[k].gamma, gc[k].beta));
          s[k].a += d[k];
          s[k].b = fmaf(d[k], xc[k], s[k].b);
        }
      }
    }
  });
#pragma unroll
  for (int k = 0; k < kVec; ++k)
    red[table_entry<kVec>(threadIdx.x, k)] = make_float4(s[k].s0_hi, s[k].s0_lo, s[k].a, s[k].b);
  __syncthreads();
  // The block's cols * kVec channels, one per thread (several rounds where they outnumber the
  // threads), each adding its row lanes in order: where the row-lane-0 threads took their kVec
  // channels one after another, 48 dependent shared loads and adds on 40 threads for 320 fp16
  // channels.
  const int64_t c0 = int64_t(blockIdx.y) * p.cols * kVec;
#pragma unroll 1
  for (int e = threadIdx.x; e < p.cols * kVec && c0 + e < p.c; e += blockDim.x) {
    GradSums t;
#pragma unroll 1
    for (int l = 0; l < row_lanes; ++l) {
      const float4 v = red[table_entry<kVec>(l * p.cols + e / kVec, e % kVec)];
      t = combine(t, GradSums{v.x, v.y, v.z, v.w});
    }
    p.tile_sums[(image * p.tiles + tile) * p.c + c0 + e] = make_float4(t.s0_hi, t.s0_lo, t.a, t.b);
  }
}

/// Step 2: the unit coefficients, one unit per (image, group), or per (image, channel) with
/// running statistics. A unit has `fin_warps` warps (NhwcGradParams): warp w adds the tiles of
/// channels w, w + fin_warps, ... (lanes over the tiles, channel after channel), then the
/// warps' sums are added in warp order; the block holds 256 / 32 units of one warp (instance
/// norm) or one unit of min(8, cpg) warps (GroupNorm: a warp per unit walked its cpg channels
/// one after another, ~3 dependent L2 loads each). Fixed order, so reruns give the same bits.
/// The unit's threads then fold its channels' GradCoef and correct their dgamma/dbeta partials;
/// kResidualOnly stores the residual only. With no tiles (eval mode without parameter
/// gradients) it only folds the GradCoef.
template <class T, bool kResidualOnly>
__global__ void __launch_bounds__(256) nhwc_grad_finalize(const NhwcGradParams<T> p) {
  __shared__ GradReduceStorage st;
  wait_for_prerequisite();
  allow_dependent_launch();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int fw = p.fin_warps;
  const int per_block = int(blockDim.x >> 5) / fw;  // units per block
  const int uw = warp % fw;                          // the warp's rank in its unit
  const int ut = uw * 32 + lane, unit_threads = fw * 32;
  const int64_t units = p.n * p.groups;
  const int64_t stride = int64_t(gridDim.x) * per_block;
  const bool act = p.activation != Activation::kNone;
  const float inv_len = 1.f / float(p.cpg * p.spatial);
  // Every thread of the block runs the same number of iterations (fw > 1: one unit per block),
  // so the block's barriers below are reached by all of it.
  for (int64_t u = int64_t(blockIdx.x) * per_block + warp / fw; u - warp / fw < units;
       u += stride) {
    const bool live = u < units;
    const int64_t image = live ? u / p.groups : 0, ch0 = live ? (u % p.groups) * p.cpg : 0;
    GradPlane pl;
    if (live) pl = nhwc_unit(p, image, ch0, act && !kResidualOnly && p.use_input_stats);
    const float4* ts = p.tile_sums + image * p.tiles * p.c;
    // The affine map of the thread's first channel in the fold below, its loads issued before
    // the tile sums': loaded after the reduction, gamma, beta, scale and shift held up every
    // unit's fold (the :ss rows' backward cost 3-4% more than without).
    ChannelAffine af{1.f, 0.f};
    if (!kResidualOnly && live && ut < p.cpg) af = channel_affine<T>(p, image, ch0 + ut);
    GradSums s;
    float sg = 0.f, sgb = 0.f;
#pragma unroll 1
    for (int64_t k = uw; live && k < p.cpg; k += fw) {
      const int64_t ch = ch0 + k;
      float a = 0.f, b = 0.f;
      for (int64_t t = lane; t < p.tiles; t += 32) {
        const float4 v = ts[t * p.c + ch];
        s = combine(s, GradSums{v.x, v.y, 0.f, 0.f});
        a += v.z;
        b += v.w;
      }
      if constexpr (kResidualOnly) continue;
      const float g = channel_affine<T>(p, image, ch).gamma;
      sg = fmaf(g, a, sg);
      sgb = fmaf(g, b, sgb);
      if (p.partials != nullptr) {
        a = butterfly_sum(a, 32);
        b = butterfly_sum(b, 32);
        // Corrected below, once the residual is known.
        if (lane == 0) p.partials[image * p.c + ch] = make_float2(a, b);
      }
    }
    s.a = sg;
    s.b = sgb;
    // The barrier of block_allreduce (or __syncwarp) also orders the partials' stores above
    // before the correction's loads below, made by other threads of the unit.
    if (fw > 1) {
      s = block_allreduce(s, st);
    } else {
      s = warp_allreduce(s, 32);
      __syncwarp();
    }
    if (!live) continue;
    if (p.use_input_stats && (kResidualOnly || !act)) pl.r = (s.s0_hi + s.s0_lo) * inv_len;
    if (!kResidualOnly && p.use_input_stats) {
      pl.k1 = s.a * inv_len;
      pl.k2 = pl.rstd * fmaf(-pl.r, s.a, s.b) * inv_len * p.var_scale;
    }
    if (kResidualOnly && ut == 0) p.unit[u] = make_float4(pl.c, pl.r, pl.rstd, 0.f);
    if constexpr (!kResidualOnly) {
      for (int64_t k = ut; k < p.cpg; k += unit_threads) {
        const int64_t ch = ch0 + k;
        const GradCoef f = grad_coef(pl, k == ut ? af : channel_affine<T>(p, image, ch));
        const int64_t slot = image * p.c + coef_slot(p, ch);
        p.coef[slot] = make_float4(f.a, f.b, f.c, f.e);
        if (act) p.coef_pre[slot] = f.p0;
        if (p.partials != nullptr) {
          float2* slot = p.partials + image * p.c + ch;
          const float2 v = *slot;
          const float sdx = pl.rstd * fmaf(-pl.r, v.x, v.y);
          *slot = make_float2(v.x, sdx);
          // grad_params_kernel's per-image values of one block (0 + v as its sums start),
          // here: its launch was ~3% of the :ss rows' backward (2x320x64x64 fp16 GN32 SiLU).
          store_direct_scale_shift<T>(p, image, ch, v.x, sdx);
        }
      }
    }
  }
}

/// Step 3: dx elementwise from the GradCoef of each (image, channel). The threads sit as in
/// step 1 (a column vector each, row lanes over the rows of all images); a thread loads its
/// channels' coefficients once per image it visits.
template <class T, int kVec>
__global__ void __launch_bounds__(256) nhwc_grad_dx(const NhwcGradParams<T> p) {
  using V = Vector<T, kVec>;
  wait_for_prerequisite();
  allow_dependent_launch();
  const int col = threadIdx.x % p.cols, rl = threadIdx.x / p.cols;
  const int row_lanes = blockDim.x / p.cols;
  const int64_t colv = int64_t(blockIdx.y) * p.cols + col;
  if (colv * kVec >= p.c || rl >= row_lanes) return;
  const int64_t j0 = colv * kVec, rows = p.n * p.spatial;
  float4 cf[kVec];
  float p0[kVec];
  int64_t image_end = 0;  // rows [.., image_end) belong to the image cf was loaded for
  with_activation(p.activation, [&](auto act_tag) {
    constexpr Activation kAct = decltype(act_tag)::value;
    for (int64_t row = int64_t(blockIdx.x) * row_lanes + rl; row < rows;
         row += int64_t(gridDim.x) * row_lanes) {
      if (row >= image_end) {
        const int64_t image = row / p.spatial;
        image_end = (image + 1) * p.spatial;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const int64_t slot = image * p.c + coef_slot(p.c, kVec, colv, k);
          cf[k] = p.coef[slot];
          if constexpr (kAct != Activation::kNone) p0[k] = p.coef_pre[slot];
        }
      }
      const int64_t at = row * p.c + j0;
      float xc[kVec], d[kVec];
      unpack(load_vector(reinterpret_cast<const V*>(p.x + at)), xc);
      unpack(load_vector(reinterpret_cast<const V*>(p.dy + at)), d);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        xc[k] -= cf[k].z;
        if constexpr (kAct != Activation::kNone)
          d[k] *= activate_derivative<kAct>(fmaf(cf[k].x, xc[k], p0[k]));
        d[k] = fmaf(cf[k].x, d[k], fmaf(cf[k].y, xc[k], cf[k].w));
      }
      store_vector(reinterpret_cast<V*>(p.dx + at), pack<T, kVec>(d));
    }
  });
}

}  // namespace detail
}  // namespace instnorm
