#pragma once
/// \file epilogue/epilogue.cuh
/// From merged moments to the stores: the activation, a plane's (center, residual, rstd) and
/// the per-channel scale and shift of y = act((x - center) * scale + shift), the saved and
/// running-update statistics, and the channel tracking of GroupNorm's affine parameters. The
/// functions take any parameter struct with the fields they read (the NCHW and NHWC kernels').

#include "../moments.cuh"
#include "../options.cuh"
#include "../thread/vector.cuh"

namespace instnorm {
namespace detail {

template <Activation kAct>
__device__ __forceinline__ float activate(float v) {
  if constexpr (kAct == Activation::kRelu) return fmaxf(v, 0.f);
  else if constexpr (kAct == Activation::kSilu) return __fdividef(v, 1.f + __expf(-v));
  else return v;
}

template <class T>
__device__ __forceinline__ float load_param(const void* p, bool is_float, int64_t i) {
  return is_float ? static_cast<const float*>(p)[i] : to_float(static_cast<const T*>(p)[i]);
}

/// The plane's statistics folded into y = act((x - center) * scale + shift): `center` is the mean
/// rounded to fp32 and `residual` the rest of it (center_of, moments.cuh), so that x - center is
/// exact when |mean| >> std and the residual is not lost.
template <class T>
struct Epilogue {
  float center, residual, rstd, scale, shift;
  template <class Params>
  __device__ __forceinline__ void set_channel(const Params& p, int64_t ch) {
    scale = p.gamma ? rstd * load_param<T>(p.gamma, p.params_float, ch) : rstd;
    const float beta = p.beta ? load_param<T>(p.beta, p.params_float, ch) : 0.f;
    shift = fmaf(-residual, scale, beta);
  }
};

/// A plane's epilogue from its merged moments (relative to `pivot`); thread `writer` of the
/// plane also stores the saved statistics.
template <class T, template <class> class Params>
__device__ __forceinline__ Epilogue<T> plane_epilogue(const Params<T>& p, float pivot,
                                                      const Moments& m, int64_t plane,
                                                      bool writer) {
  Epilogue<T> ep;
  const CenterResidual cr = center_of(pivot, m);
  ep.center = cr.center;
  ep.residual = cr.residual;
  ep.rstd = 1.f / sqrtf(variance(m) + p.eps);
  if (writer) {
    if (p.save_mean) p.save_mean[plane] = ep.center + ep.residual;
    if (p.save_rstd) p.save_rstd[plane] = ep.rstd;
    if (p.stat_mean) {
      p.stat_mean[plane] = ep.center + ep.residual;
      p.stat_var[plane] = variance(m);
    }
  }
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
  /// Sets ep's channel for vector j (called for j = 0, 1, 2, ... in order).
  template <class Params>
  __device__ __forceinline__ void visit(int j, Epilogue<T>& ep, const Params& p) {
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
