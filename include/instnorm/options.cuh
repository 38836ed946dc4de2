#pragma once
/// \file options.cuh
/// Everything a call can ask for beyond the bare normalize. Defaults reproduce the simple call
/// `forward(x, y, n, c, spatial, eps, stream)`; later features are new fields with inert defaults,
/// so existing callers never break.

#include <cstdint>

namespace instnorm {

/// Memory layout of x and y.
enum class Layout : int {
  kNCHW = 0,  ///< plane (i, j) is x[(i*c + j)*spatial, ... + spatial)
  kNHWC = 1,  ///< channels-last: element (i, j, s) is x[(i*spatial + s)*c + j]
};

/// Activation applied to the normalized (and affine-transformed) output.
enum class Activation : int { kNone = 0, kRelu = 1, kSilu = 2 };

/// Element type of gamma and beta.
enum class ParamType : int {
  kFloat = 0,       ///< gamma/beta are `const float*`
  kSameAsInput = 1, ///< gamma/beta have the element type T of x and y
};

/// Per-sample modulation of the normalized tensor (AdaIN, FiLM, the scale-shift GroupNorm of
/// diffusion U-Nets): scale and shift hold one value per (sample, channel), element (i, j) at
/// [i * stride + j], applied after the per-channel affine:
///   one_plus_scale:  y = act((xhat * gamma_j + beta_j) * (1 + scale_ij) + shift_ij)
///   otherwise:       y = act(xhat * gamma_j * scale_ij + beta_j + shift_ij)       (AdaIN)
/// A null scale is a factor of 1 in both conventions, a null shift 0.
struct Modulation {
  const void* scale = nullptr;  ///< n rows of c elements, rows scale_stride elements apart
  const void* shift = nullptr;  ///< n rows of c elements, rows shift_stride elements apart
  int64_t scale_stride = 0;     ///< elements between samples; 0 means c (contiguous)
  int64_t shift_stride = 0;     ///< elements between samples; 0 means c (contiguous)
  ParamType type = ParamType::kFloat;  ///< element type of scale and shift (float or T)
  bool one_plus_scale = false;  ///< the factor is 1 + scale (guided diffusion) instead of scale
};

/// Options of the full call. Zero-initialised fields mean "off".
struct Options {
  float eps = 1e-5f;            ///< added to the biased variance; finite and >= 0
  int64_t groups = 0;           ///< GroupNorm groups G (c % G == 0); 0 means G = c (instance norm)
  const void* gamma = nullptr;  ///< per-channel scale, c elements, or null for none
  const void* beta = nullptr;   ///< per-channel shift, c elements, or null for none
  ParamType param_type = ParamType::kFloat;
  float* save_mean = nullptr;   ///< n*G floats: mean of each normalized plane, or null
  float* save_rstd = nullptr;   ///< n*G floats: 1/sqrt(var + eps) of each plane, or null
  Activation activation = Activation::kNone;
  Layout layout = Layout::kNCHW;
  /// Per-channel running statistics (c floats each, both or neither; instance norm only, not
  /// with groups != c), as PyTorch's track_running_stats. With use_input_stats they are updated
  /// after the normalize: r = (1 - momentum) * r + momentum * s, s the batch average of the
  /// instances' mean and unbiased variance (var * S / (S - 1)), in a fixed order (no atomics).
  float* running_mean = nullptr;
  float* running_var = nullptr;
  float momentum = 0.1f;        ///< in [0, 1]
  /// false: normalize with running_mean/running_var instead of the input's statistics
  /// (PyTorch's eval mode of a module with track_running_stats): one read, one write, no update.
  bool use_input_stats = true;
  /// Per-sample scale and shift (none by default).
  Modulation modulation;
  /// true: normalize with the unbiased variance var * S / (S - 1) (S the elements of a plane or
  /// group; S > 1), as AdaIN's reference does; save_rstd then holds 1/sqrt(that + eps). The
  /// running-statistics update is unchanged (it always uses the unbiased variance).
  bool unbiased = false;
};

/// What the backward writes besides dx (backward, api.cuh). Both optional.
struct Gradients {
  float* dgamma = nullptr;  ///< c floats: the gradient of gamma (as if 1 where gamma is null), or null
  float* dbeta = nullptr;   ///< c floats: the gradient of beta, or null
  /// n*c floats each (contiguous, element (i, j) at [i * c + j]): the gradients of the
  /// modulation's scale and shift (as if present where the call's pointer is null), or null.
  float* dscale = nullptr;
  float* dshift = nullptr;
};

}  // namespace instnorm
