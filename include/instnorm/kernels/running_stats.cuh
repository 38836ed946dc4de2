#pragma once
/// \file kernels/running_stats.cuh
/// Running statistics (PyTorch's track_running_stats): the per-channel update after a training
/// forward, and the inference normalize that uses them instead of the input's statistics.

#include "nchw.cuh"

namespace instnorm {
namespace detail {

/// One thread per channel: averages the n instances' mean and unbiased variance in index order
/// (float64 sums: the same bits on every run, no atomics) and moves the running values by
/// `momentum` toward them, as PyTorch does for instance norm.
__global__ void running_stats_kernel(const float* __restrict__ mean,
                                     const float* __restrict__ var, int64_t n, int64_t c,
                                     int64_t spatial, float momentum, float* running_mean,
                                     float* running_var) {
  const double bessel = double(spatial) / double(spatial - 1);  // spatial > 1 (validated)
  for (int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ch < c;
       ch += int64_t(gridDim.x) * blockDim.x) {
    double sm = 0, sv = 0;
    for (int64_t i = 0; i < n; ++i) {
      sm += mean[i * c + ch];
      sv += var[i * c + ch];
    }
    const double m = momentum;
    running_mean[ch] = float((1 - m) * running_mean[ch] + m * (sm / double(n)));
    running_var[ch] = float((1 - m) * running_var[ch] + m * (sv / double(n)) * bessel);
  }
}


/// Normalize with the running statistics: y = act((x - rm) * rsqrt(rv + eps) * gamma + beta).
/// A block takes a chunk of one plane (one channel: instance norm only), so the channel's
/// parameters are loaded once per chunk; grid-stride over (plane, chunk) units.
/// The chunk's loads are issued first, then the running statistics' and the map's, and the
/// saved statistics are stored only after all of them: the compiler may not move a load of x
/// above a store it cannot prove disjoint, so with the statistics (and their store) first, x
/// waited for the running variance's round trip and rsqrt (8x512x64x64 bf16 :eval, 1.7% over
/// a0a6a37 on the H100 in every run, 2026-12-08).
template <class T, int kVec>
__global__ void __launch_bounds__(kInferenceThreads) inference_kernel(const KernelParams<T> p) {
  using V = Vector<T, kVec>;
  constexpr int kChunk = kInferenceThreads * kInferenceItems * kVec;
  const int64_t chunks = (p.plane_len + kChunk - 1) / kChunk;
  for (int64_t u = blockIdx.x; u < p.planes * chunks; u += gridDim.x) {
    const int64_t plane = u / chunks, begin = (u % chunks) * kChunk;
    const int64_t ch = plane % p.groups;
    const int len = int(p.plane_len - begin < kChunk ? p.plane_len - begin : kChunk);
    const int valid = valid_items<kVec>(len, threadIdx.x, kInferenceThreads, kInferenceItems);
    V r[kInferenceItems];
    const T* xs = p.x + plane * p.plane_len + begin;
    load_chunk<T, kVec, kInferenceItems>(r, xs, valid, threadIdx.x, kInferenceThreads);
    const PlaneStats st = running_plane_stats(p, ch);
    Epilogue<T> ep;
    ep.center = st.center;
    ep.residual = 0.f;
    ep.rstd = st.rstd;
    if (is_modulated(p)) ep.image = image_of(p, plane);
    ep.set_channel(p, ch);
    if (begin == 0 && threadIdx.x == 0) store_plane_stats(p, plane, st);
    auto* d = reinterpret_cast<V*>(p.y + plane * p.plane_len + begin) + threadIdx.x;
#pragma unroll
    for (int j = 0; j < kInferenceItems; ++j) {
      if (j < valid) {
        with_activation(p.activation, [&](auto act) {
          store_vector(d + j * kInferenceThreads, normalize_vector<decltype(act)::value>(r[j], ep));
        });
      }
    }
  }
}

}  // namespace detail
}  // namespace instnorm
