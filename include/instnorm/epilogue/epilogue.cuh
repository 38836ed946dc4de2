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

/// The options every kernel reads through the epilogue, forward and backward, both layouts:
/// each kernel's parameter struct derives from it, and set_option_fields (launch.cuh) fills it.
struct EpilogueFields {
  int64_t spatial;
  int64_t groups;               ///< G
  float eps;
  /// The factor of the variance the normalize uses: S / (S - 1) for the unbiased variance of
  /// planes of S elements, else 1 (exact: the biased path's bits do not change).
  float var_scale;
  Activation activation;
  bool params_float;            ///< gamma/beta are float (else T)
  bool mod_float;               ///< mod_scale/mod_shift are float (else T)
  bool one_plus_scale;          ///< Modulation::one_plus_scale
  bool save_std;                ///< save_rstd receives sqrt(var + eps) instead (statistics())
  const void* gamma;            ///< per channel, or null
  const void* beta;
  const void* mod_scale;        ///< per (image, channel): [image * scale_stride + channel], or null
  const void* mod_shift;
  int64_t scale_stride, shift_stride;
  const float* running_mean;    ///< per channel (eval mode)
  const float* running_var;
};

template <class T>
__device__ __forceinline__ float load_param(const void* p, bool is_float, int64_t i) {
  return is_float ? static_cast<const float*>(p)[i] : to_float(static_cast<const T*>(p)[i]);
}

/// Whether the call has per-channel (gamma, beta) or per-sample (scale, shift) parameters, so
/// that a lane must know the channel (and the image) of its elements.
__device__ __forceinline__ bool has_channel_params(const EpilogueFields& p) {
  return p.gamma != nullptr || p.beta != nullptr || p.mod_scale != nullptr ||
         p.mod_shift != nullptr;
}
__device__ __forceinline__ bool is_modulated(const EpilogueFields& p) {
  return p.mod_scale != nullptr || p.mod_shift != nullptr;
}

/// The sample of plane `plane` (n * G planes) in a modulated call, where validate guarantees
/// n * G < 2^31: a 32-bit division, whose 64-bit form left the staged kernel spilling on sm_89.
__device__ __forceinline__ int64_t image_of(const EpilogueFields& p, int64_t plane) {
  return int64_t(uint32_t(plane) / uint32_t(p.groups));
}

/// The affine map of channel ch of image `image` after the normalize, pre = xhat * gamma + beta,
/// with the per-sample modulation folded in (Modulation, options.cuh): scale m (1 + scale with
/// one_plus_scale; 1 where absent) and shift t give gamma * m and beta * m + t (one_plus_scale)
/// or beta + t. The forward's epilogue and the backward's channel both read it.
struct ChannelAffine {
  float gamma, beta;
};
/// The modulation's factor of channel ch of image `image`: 1 + scale, scale, or 1 without one.
template <class T>
__device__ __forceinline__ float modulation_factor(const EpilogueFields& p, int64_t image,
                                                   int64_t ch) {
  if (p.mod_scale == nullptr) return 1.f;
  const float s = load_param<T>(p.mod_scale, p.mod_float, image * p.scale_stride + ch);
  return p.one_plus_scale ? 1.f + s : s;
}

/// channel_affine's four loads, not yet combined (1 and 0 where absent). A consumer that needs
/// the map only late (the backward's instance norm without an activation: after its reduction)
/// issues the loads early and folds late, so that no warp waits on a parameter's round trip
/// before it issues its data's loads.
struct AffineLoads {
  float gamma, beta, scale, shift;
};
template <class T>
__device__ __forceinline__ AffineLoads load_affine(const EpilogueFields& p, int64_t image,
                                                   int64_t ch) {
  AffineLoads l;
  l.gamma = p.gamma ? load_param<T>(p.gamma, p.params_float, ch) : 1.f;
  l.beta = p.beta ? load_param<T>(p.beta, p.params_float, ch) : 0.f;
  l.scale = p.mod_scale ? load_param<T>(p.mod_scale, p.mod_float, image * p.scale_stride + ch)
                        : 0.f;
  l.shift = p.mod_shift ? load_param<T>(p.mod_shift, p.mod_float, image * p.shift_stride + ch)
                        : 0.f;
  return l;
}
/// The map from the loads: the factor of modulation_factor, spelled out.
__device__ __forceinline__ ChannelAffine fold_affine(const EpilogueFields& p,
                                                     const AffineLoads& l) {
  float g = l.gamma, b = l.beta;
  if (p.mod_scale != nullptr) {
    const float m = p.one_plus_scale ? 1.f + l.scale : l.scale;
    g *= m;
    if (p.one_plus_scale) b *= m;
  }
  if (p.mod_shift != nullptr) b += l.shift;
  return ChannelAffine{g, b};
}
template <class T>
__device__ __forceinline__ ChannelAffine channel_affine(const EpilogueFields& p, int64_t image,
                                                        int64_t ch) {
  // fold_affine(p, load_affine<T>(p, image, ch)) in effect, written out: that form changed the
  // machine code of every kernel that reads a map (sm_90), forward ones included, whose timings
  // are measured; the backward's instance norm alone takes the two steps.
  float g = p.gamma ? load_param<T>(p.gamma, p.params_float, ch) : 1.f;
  float b = p.beta ? load_param<T>(p.beta, p.params_float, ch) : 0.f;
  if (p.mod_scale != nullptr) {
    const float s = load_param<T>(p.mod_scale, p.mod_float, image * p.scale_stride + ch);
    const float m = p.one_plus_scale ? 1.f + s : s;
    g *= m;
    if (p.one_plus_scale) b *= m;
  }
  if (p.mod_shift != nullptr) b += load_param<T>(p.mod_shift, p.mod_float, image * p.shift_stride + ch);
  return ChannelAffine{g, b};
}

/// A plane's (or group's) statistics as the normalize uses them: `center` is the mean rounded to
/// fp32 and `residual` the rest of it (center_of, moments.cuh), so that x - center is exact when
/// |mean| >> std and the residual is not lost; `var` the biased variance; rstd from var *
/// var_scale (the unbiased variance where the call asks for it).
struct PlaneStats {
  float center, residual, rstd, var;
};
__device__ __forceinline__ PlaneStats plane_stats(float pivot, const Moments& m,
                                                  const EpilogueFields& p) {
  const CenterResidual cr = center_of(pivot, m);
  const float var = variance(m);
  return PlaneStats{cr.center, cr.residual, 1.f / sqrtf(var * p.var_scale + p.eps), var};
}

/// Eval mode: the running statistics of channel ch stand for the plane's.
template <class Params>
__device__ __forceinline__ PlaneStats running_plane_stats(const Params& p, int64_t ch) {
  const float var = p.running_var[ch];
  return PlaneStats{p.running_mean[ch], 0.f, 1.f / sqrtf(var + p.eps), var};
}

/// The saved statistics (mean, rstd; or the standard deviation for statistics()) and the
/// running update's inputs (mean, biased variance) of `plane`, where the call asks for them.
template <class Params>
__device__ __forceinline__ void store_plane_stats(const Params& p, int64_t plane,
                                                  const PlaneStats& s) {
  if (p.save_mean) p.save_mean[plane] = s.center + s.residual;
  if (p.save_rstd) p.save_rstd[plane] = p.save_std ? sqrtf(s.var * p.var_scale + p.eps) : s.rstd;
  if (p.stat_mean) {
    p.stat_mean[plane] = s.center + s.residual;
    p.stat_var[plane] = s.var;
  }
}

/// Channel ch's y = act((x - center) * scale + shift): scale = rstd * gamma, shift = beta -
/// residual * scale, of the channel's affine map (channel_affine: gamma 1 and beta 0 where
/// absent, the modulation of image `image` folded in).
struct ScaleShift {
  float scale, shift;
};
__device__ __forceinline__ ScaleShift scale_shift(const ChannelAffine& a, float rstd,
                                                  float residual) {
  const float scale = rstd * a.gamma;
  return ScaleShift{scale, fmaf(-residual, scale, a.beta)};
}
template <class T>
__device__ __forceinline__ ScaleShift scale_shift(const EpilogueFields& p, int64_t image,
                                                  int64_t ch, float rstd, float residual) {
  return scale_shift(channel_affine<T>(p, image, ch), rstd, residual);
}

/// A plane's statistics and its current channel's scale and shift, as a lane normalizes;
/// `image` (the plane's sample) matters only to a modulated call.
template <class T>
struct Epilogue {
  float center, residual, rstd, scale, shift;
  int64_t image = 0;
  __device__ __forceinline__ void set_channel(const EpilogueFields& p, int64_t ch) {
    const ScaleShift ss = scale_shift<T>(p, image, ch, rstd, residual);
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
  const PlaneStats s = plane_stats(pivot, m, p);
  if (writer) store_plane_stats(p, plane, s);
  Epilogue<T> ep;
  ep.center = s.center;
  ep.residual = s.residual;
  ep.rstd = s.rstd;
  if (is_modulated(p)) ep.image = image_of(p, plane);
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
