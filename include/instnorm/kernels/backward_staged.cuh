#pragma once
/// \file kernels/backward_staged.cuh
/// The backward of staged plans (misaligned planes), on the NCHW backward's parameters and
/// per-plane quantities (kernels/backward.cuh).

#include "backward.cuh"

namespace instnorm {
namespace detail {

/// Staged plans (misaligned planes: 7x7, 3x3, odd lengths): a block's planes are one contiguous
/// unit of x and one of dy, copied into shared memory with coalesced (16-byte, where aligned)
/// copies; each group of `lanes` threads (up to a warp) reduces its plane there and writes dx
/// over its dy, and the unit goes back out the same way. One stage: the plan's second stage is
/// unused (the forward's kernel double-buffers; this one has not been measured to need it).
/// Two blocks per SM (128 registers): at the forward's four (64 registers) it spilled 16-124
/// bytes.
template <class T>
__global__ void __launch_bounds__(kStagedThreads, 2) staged_backward_kernel(const BackwardParams<T> p) {
  extern __shared__ uint4 dyn_smem[];
  const int lanes = p.lanes;
  const LaneGroups lg = lane_groups(lanes);
  const int lane = lg.lane, group = lg.group, per_block = lg.per_block;
  const int64_t L = p.plane_len, S = p.spatial, cpg = p.channels_per_group;
  const int64_t units = (p.planes + per_block - 1) / per_block;
  const bool vec_ok = ((reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.dy) |
                        reinterpret_cast<uintptr_t>(p.dx)) & 15) == 0;
  const int stage_elems = int((per_block * L * int64_t(sizeof(T)) + 15) / 16 * 16 / sizeof(T));
  T* const sx = reinterpret_cast<T*>(dyn_smem);
  T* const sd = sx + stage_elems;
  const float inv_len = 1.f / float(L);
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t first_plane = unit * per_block;
    const int n = int((p.planes - first_plane < per_block ? p.planes - first_plane : per_block) * L);
    stage_in(sx, p.x + first_plane * L, n, vec_ok);
    stage_in(sd, p.dy + first_plane * L, n, vec_ok);
    if (vec_ok) copy_async_wait_all();
    __syncthreads();

    const int64_t nplanes = n / L;
    const bool active = group < nplanes;
    const int64_t plane = first_plane + (active ? group : 0);
    const T* xp = sx + (active ? group : 0) * L;
    T* dp = sd + (active ? group : 0) * L;
    const int mine = active && lane < L ? int((L - lane + lanes - 1) >> lanes_log2(lanes)) : 0;
    const int64_t channel_base = (plane % p.groups) * cpg;
    GradPlane pl;
    GradChannel<T> plane_ch;
    if (is_modulated(p)) plane_ch.image = image_of(p, plane);
    plane_ch.set_channel(p, channel_base);
    if (p.use_input_stats) {
      pl.c = active ? p.save_mean[plane] : 0.f;
      pl.rstd = active ? p.save_rstd[plane] : 0.f;
    } else {
      pl.c = p.running_mean[channel_base];
      pl.rstd = 1.f / sqrtf(p.running_var[channel_base] + p.eps);
    }
    // Element i of the plane: its channel's gamma/beta (GroupNorm), x - c and d.
    GradChannel<T> ch = plane_ch;
    int64_t loaded = channel_base;
    const auto terms = [&](auto act_tag, int i, float& xc, float& d) {
      constexpr Activation kAct = decltype(act_tag)::value;
      if (cpg > 1) {
        const int64_t c_i = channel_base + i / S;
        if (c_i != loaded) {
          ch.set_channel(p, c_i);
          loaded = c_i;
        }
      }
      xc = to_float(xp[i]) - pl.c;
      d = to_float(dp[i]);
      if constexpr (kAct != Activation::kNone)
        d *= activate_derivative<kAct>(fmaf((xc - pl.r) * pl.rstd, ch.gamma, ch.beta));
    };
    with_activation(p.activation, [&](auto act_tag) {
      constexpr Activation kAct = decltype(act_tag)::value;
      if (p.use_input_stats && kAct != Activation::kNone) {
        GradSums s;
        for (int k = 0; k < mine; ++k) add_compensated(s, to_float(xp[lane + k * lanes]) - pl.c);
        s = warp_allreduce(s, lanes);
        pl.r = (s.s0_hi + s.s0_lo) * inv_len;
      }
      GradSums s;
      for (int k = 0; k < mine; ++k) {
        float xc, d;
        terms(act_tag, lane + k * lanes, xc, d);
        if (p.use_input_stats && kAct == Activation::kNone) add_compensated(s, xc);
        const float w = cpg > 1 ? ch.gamma : 1.f;
        s.a = fmaf(w, d, s.a);
        s.b = fmaf(w * d, xc, s.b);
      }
      s = warp_allreduce(s, lanes);
      if (p.use_input_stats) {
        if (kAct == Activation::kNone) pl.r = (s.s0_hi + s.s0_lo) * inv_len;
        const float w = cpg > 1 ? 1.f : plane_ch.gamma;
        pl.k1 = w * s.a * inv_len;
        pl.k2 = pl.rstd * w * fmaf(-pl.r, s.a, s.b) * inv_len * p.var_scale;
      }
      if (p.param_sums()) {
        if (cpg == 1) {
          if (active && lane == 0)
            store_plane_sums<true>(p, plane, 0, s.a, pl.rstd * fmaf(-pl.r, s.a, s.b));
        } else {
#pragma unroll 1
          for (int64_t k = 0; k < cpg; ++k) {  // each channel's own sums, lanes over its run
            float a = 0.f, b = 0.f;
            for (int64_t i = k * S + lane; active && i < (k + 1) * S; i += lanes) {
              float xc, d;
              terms(act_tag, int(i), xc, d);
              a += d;
              b = fmaf(d, xc, b);
            }
            a = butterfly_sum(a, lanes);
            b = butterfly_sum(b, lanes);
            if (active && lane == 0)
              p.partials[(plane / p.groups) * p.groups * cpg + channel_base + k] =
                  make_float2(a, pl.rstd * fmaf(-pl.r, a, b));
          }
        }
      }
      for (int k = 0; k < mine; ++k) {
        const int i = lane + k * lanes;
        float xc, d;
        terms(act_tag, i, xc, d);
        const float xhat = (xc - pl.r) * pl.rstd;
        dp[i] = from_float<T>(pl.rstd * (fmaf(ch.gamma, d, -pl.k1) - xhat * pl.k2));
      }
    });
    __syncthreads();
    stage_out(p.dx + first_plane * L, sd, n, vec_ok);
    __syncthreads();  // the next unit's copies overwrite the stage
  }
}

}  // namespace detail
}  // namespace instnorm
