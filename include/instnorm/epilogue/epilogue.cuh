#pragma once
/// \file epilogue/epilogue.cuh
/// From merged moments to the stores: the activation, a plane's (center, residual, rstd) and
/// the per-channel scale and shift of y = act((x - center) * scale + shift), the saved and
/// running-update statistics, and the channel tracking of GroupNorm's affine parameters. The
/// functions take any parameter struct with the fields they read (the NCHW and NHWC kernels').

#include <type_traits>

#include "../moments.cuh"
#include "../options.cuh"
#include "../thread/vector.cuh"

namespace instnorm {
namespace detail {

/// The activation after the normalize: its value, its derivative (for a backward: from the
/// pre-activation v), and the one switch from the runtime value to the compile-time one. A new
/// activation is an Activation value (options.cuh), these three, the reference and the package.
template <Activation kAct>
__device__ __forceinline__ float activate(float v) {
  if constexpr (kAct == Activation::kRelu) return fmaxf(v, 0.f);
  else if constexpr (kAct == Activation::kSilu) return __fdividef(v, 1.f + __expf(-v));
  else return v;
}
template <Activation kAct>
__device__ __forceinline__ float activate_derivative(float v) {
  if constexpr (kAct == Activation::kRelu) {
    return v > 0.f ? 1.f : 0.f;  // PyTorch's relu'(0) = 0
  } else if constexpr (kAct == Activation::kSilu) {
    const float s = __fdividef(1.f, 1.f + __expf(-v));
    return s * fmaf(v, 1.f - s, 1.f);
  } else {
    return 1.f;
  }
}
/// Calls f(std::integral_constant<Activation, a>{}) for the runtime value a (kNone for any value
/// validate would refuse).
template <class F>
__device__ __forceinline__ void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kRelu: f(std::integral_constant<Activation, Activation::kRelu>{}); break;
    case Activation::kSilu: f(std::integral_constant<Activation, Activation::kSilu>{}); break;
    default: f(std::integral_constant<Activation, Activation::kNone>{}); break;
  }
}

template <class T>
__device__ __forceinline__ float load_param(const void* p, bool is_float, int64_t i) {
  return is_float ? static_cast<const float*>(p)[i] : to_float(static_cast<const T*>(p)[i]);
}

/// A plane's (or group's) statistics as the normalize uses them: `center` is the mean rounded to
/// fp32 and `residual` the rest of it (center_of, moments.cuh), so that x - center is exact when
/// |mean| >> std and the residual is not lost; `var` the biased variance.
struct PlaneStats {
  float center, residual, rstd, var;
};
__device__ __forceinline__ PlaneStats plane_stats(float pivot, const Moments& m, float eps) {
  const CenterResidual cr = center_of(pivot, m);
  const float var = variance(m);
  return PlaneStats{cr.center, cr.residual, 1.f / sqrtf(var + eps), var};
}

/// Eval mode: the running statistics of channel ch stand for the plane's.
template <class Params>
__device__ __forceinline__ PlaneStats running_plane_stats(const Params& p, int64_t ch) {
  const float var = p.running_var[ch];
  return PlaneStats{p.running_mean[ch], 0.f, 1.f / sqrtf(var + p.eps), var};
}

/// The saved statistics (mean, rstd) and the running update's inputs (mean, biased variance) of
/// `plane`, where the call asks for them.
template <class Params>
__device__ __forceinline__ void store_plane_stats(const Params& p, int64_t plane,
                                                  const PlaneStats& s) {
  if (p.save_mean) p.save_mean[plane] = s.center + s.residual;
  if (p.save_rstd) p.save_rstd[plane] = s.rstd;
  if (p.stat_mean) {
    p.stat_mean[plane] = s.center + s.residual;
    p.stat_var[plane] = s.var;
  }
}

/// Channel ch's y = act((x - center) * scale + shift): scale = rstd * gamma_ch, shift = beta_ch -
/// residual * scale (gamma 1 and beta 0 where absent).
struct ScaleShift {
  float scale, shift;
};
template <class T, class Params>
__device__ __forceinline__ ScaleShift scale_shift(const Params& p, int64_t ch, float rstd,
                                                  float residual) {
  const float scale = p.gamma ? rstd * load_param<T>(p.gamma, p.params_float, ch) : rstd;
  const float beta = p.beta ? load_param<T>(p.beta, p.params_float, ch) : 0.f;
  return ScaleShift{scale, fmaf(-residual, scale, beta)};
}

/// A plane's statistics and its current channel's scale and shift, as a lane normalizes.
template <class T>
struct Epilogue {
  float center, residual, rstd, scale, shift;
  template <class Params>
  __device__ __forceinline__ void set_channel(const Params& p, int64_t ch) {
    const ScaleShift ss = scale_shift<T>(p, ch, rstd, residual);
    scale = ss.scale;
    shift = ss.shift;
  }
};

/// A plane's epilogue from its merged moments (relative to `pivot`); thread `writer` of the
/// plane also stores the saved statistics.
template <class T, template <class> class Params>
__device__ __forceinline__ Epilogue<T> plane_epilogue(const Params<T>& p, float pivot,
                                                      const Moments& m, int64_t plane,
                                                      bool writer) {
  const PlaneStats s = plane_stats(pivot, m, p.eps);
  if (writer) store_plane_stats(p, plane, s);
  Epilogue<T> ep;
  ep.center = s.center;
  ep.residual = s.residual;
  ep.rstd = s.rstd;
  return ep;
}

/// Position of a chunk's first element as (channel, offset in that channel): computed before the
/// chunk's data occupies registers, since 64-bit division needs many of them.
struct ChunkChannel {
  int64_t channel;
  uint32_t offset;
};
__device__ __forceinline__ ChunkChannel chunk_channel(int64_t channel_base, int64_t first,
                                                      int64_t spatial) {
  return ChunkChannel{channel_base + first / spatial, uint32_t(first % spatial)};
}

/// Channel of each of a lane's vectors when gamma/beta vary inside a plane (GroupNorm): tracked
/// incrementally from the chunk's first element (cc), vector j of the lane starting at element
/// (j * lanes + lane) * kVec of the chunk; gamma/beta are reloaded only when the channel changes
/// (a vector never straddles channels: vectors are used only when spatial % kVec == 0).
/// Reloading them per vector through a 32-bit division made GroupNorm+SiLU 2.6x slower than the
/// plain forward on the H100.
template <class T>
struct ChannelCursor {
  int64_t ch = 0, rem = 0, step_ch = 0, step_rem = 0, loaded = -1;
  bool on = false;
  __device__ __forceinline__ ChannelCursor(bool per_channel, ChunkChannel cc, int lane,
                                           int lanes, int vec, int64_t spatial)
      : on(per_channel) {
    if (!on) return;
    const int64_t first = int64_t(cc.offset) + int64_t(lane) * vec;
    ch = cc.channel + first / spatial;
    rem = first % spatial;
    const int64_t step = int64_t(lanes) * vec;
    step_ch = step / spatial;
    step_rem = step % spatial;
  }
  /// Sets ep's channel for vector j (called for j = 0, 1, 2, ... in order). `ep` is anything
  /// with set_channel(p, ch): the forward's Epilogue, the backward's GradChannel.
  template <class Ep, class Params>
  __device__ __forceinline__ void visit(int j, Ep& ep, const Params& p) {
    if (!on) return;
    if (j > 0) {
      ch += step_ch;
      rem += step_rem;
      if (rem >= p.spatial) {
        rem -= p.spatial;
        ++ch;
      }
    }
    if (ch != loaded) {
      ep.set_channel(p, ch);
      loaded = ch;
    }
  }
};

template <Activation kAct, class T, int kVec>
__device__ __forceinline__ Vector<T, kVec> normalize_vector(const Vector<T, kVec>& v,
                                                            const Epilogue<T>& ep) {
  float f[kVec];
  unpack(v, f);
#pragma unroll
  for (int k = 0; k < kVec; ++k) f[k] = activate<kAct>(fmaf(f[k] - ep.center, ep.scale, ep.shift));
  return pack<T, kVec>(f);
}


}  // namespace detail
}  // namespace instnorm
