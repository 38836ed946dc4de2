#pragma once
/// \file validate.cuh
/// Argument checks that run before any CUDA call, so that they hold on a machine with no GPU.
/// Each rule has its own reason code and a sentence for it (to_string); the public calls map
/// every reason but kOk/kEmpty to cudaErrorInvalidValue (kNotSupported: cudaErrorNotSupported).
/// A caller that wants the reason for a refused call runs the same checks itself:
///
///     const instnorm::Invalid why = instnorm::validate<float>(x, y, n, c, hw, opt);
///     if (why != instnorm::Invalid::kOk && why != instnorm::Invalid::kEmpty)
///       fprintf(stderr, "instnorm: %s\n", instnorm::to_string(why));

#include <cmath>
#include <cstdint>

#include "options.cuh"

namespace instnorm {

/// Why a call was refused.
enum class Invalid : int {
  kOk = 0,          ///< valid, there is work to do
  kEmpty,           ///< n, c or spatial is 0: valid, nothing to launch
  kNegativeSize,    ///< n, c, spatial or groups < 0
  kNullPointer,     ///< x or y is null
  kBadEps,          ///< eps negative, NaN or infinite
  kOverflow,        ///< n*c*spatial (or a derived size) overflows int64
  kBadGroups,       ///< groups does not divide c
  kOverlap,         ///< x and y overlap without being the same buffer
  kNotSupported,    ///< a layout not implemented yet
  kBadRunningStats, ///< only one of running_mean/running_var, none with use_input_stats=false,
                    ///< running statistics with GroupNorm, or an update with spatial == 1
  kBadMomentum,     ///< momentum outside [0, 1] or NaN
  kBadActivation,   ///< activation is not one of the Activation values
  kBadParamType,    ///< param_type is not one of the ParamType values
  kNoSavedStats,    ///< backward with use_input_stats but without save_mean and save_rstd
  kBadGradients,    ///< backward: two gradient buffers alias, or one overlaps a tensor
  kBadModulation,   ///< modulation: a stride below c, an unknown type, or a buffer overlapping y
  kBadUnbiased,     ///< unbiased variance of planes of one element
};

/// One sentence per reason, for error messages (never null; "unknown reason" for values outside
/// the enum).
inline const char* to_string(Invalid v) {
  switch (v) {
    case Invalid::kOk: return "the arguments are valid";
    case Invalid::kEmpty: return "n, c or spatial is 0: there is nothing to compute";
    case Invalid::kNegativeSize: return "n, c, spatial and groups must be >= 0";
    case Invalid::kNullPointer: return "x and y must not be null when there is work to do";
    case Invalid::kBadEps: return "eps must be finite and >= 0";
    case Invalid::kOverflow: return "n * c * spatial elements (in bytes) overflow int64";
    case Invalid::kBadGroups: return "groups must divide c";
    case Invalid::kOverlap: return "x and y must be the same buffer or not overlap at all";
    case Invalid::kNotSupported: return "layout must be Layout::kNCHW or Layout::kNHWC";
    case Invalid::kBadRunningStats:
      return "running_mean and running_var go together, are required when use_input_stats is "
             "false, exist only for instance norm (groups 0 or c), and an update needs spatial > 1";
    case Invalid::kBadMomentum: return "momentum must be in [0, 1]";
    case Invalid::kBadActivation: return "activation must be kNone, kRelu or kSilu";
    case Invalid::kBadParamType: return "param_type must be kFloat or kSameAsInput";
    case Invalid::kNoSavedStats:
      return "the backward reads the forward's saved statistics: save_mean and save_rstd are "
             "required when use_input_stats is true";
    case Invalid::kBadGradients:
      return "dgamma, dbeta, dscale and dshift must be distinct buffers that overlap none of "
             "x, dy and dx";
    case Invalid::kBadModulation:
      return "modulation: strides must be 0 (contiguous) or >= c, type kFloat or kSameAsInput, "
             "n * c below 2^31, and scale and shift must not overlap y";
    case Invalid::kBadUnbiased:
      return "unbiased variance needs more than one element per plane (or group)";
  }
  return "unknown reason";
}

/// Whether the call updates running statistics (and so needs the per-plane mean and variance).
inline bool updates_running_stats(const Options& opt) {
  return opt.use_input_stats && opt.running_mean != nullptr;
}

/// The shape of one call, with GroupNorm folded in: `planes` normalized planes of `plane_len`
/// contiguous elements (NCHW), `channels_per_group` channels of `spatial` elements each.
struct Problem {
  int64_t n = 0, c = 0, spatial = 0;
  int64_t groups = 0;              ///< effective G (c for instance norm)
  int64_t planes = 0;              ///< n * G
  int64_t channels_per_group = 1;  ///< c / G
  int64_t plane_len = 0;           ///< channels_per_group * spatial
  int elem_bytes = 4;              ///< sizeof(T)
  bool vector_ok = false;          ///< x, y and every plane/channel (NHWC: row) start aligned to 16 bytes
  /// NCHW planes that are not 16-byte aligned, with x and y equally misaligned and no vector
  /// straddling two channels with different parameters: a 16-byte body per slice with a scalar
  /// head and tail (Plan::ragged; forward block and split plans).
  bool ragged_ok = false;
  bool nhwc = false;               ///< channels-last: element (i, j, s) at x[(i*spatial + s)*c + j]
                                   ///< (c > 1 and spatial > 1: otherwise the layouts coincide)
  /// Per-channel parameters (gamma, beta or a modulation) that change inside a plane: GroupNorm
  /// with channels_per_group > 1 and any of them.
  bool channel_runs = false;
};

namespace detail {
inline bool mul_overflows(int64_t a, int64_t b, int64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

/// Whether [a, a + a_bytes) and [b, b + b_bytes) overlap (false for a null pointer).
inline bool ranges_overlap(const void* a, const void* b, uint64_t a_bytes, uint64_t b_bytes) {
  const auto ab = reinterpret_cast<uintptr_t>(a), bb = reinterpret_cast<uintptr_t>(b);
  if (a == nullptr || b == nullptr) return false;
  return ab < bb + b_bytes && bb < ab + a_bytes;
}
/// ranges_overlap without being the same buffer (the in-place calls' rule).
inline bool partial_overlap(const void* a, const void* b, uint64_t a_bytes, uint64_t b_bytes) {
  return a != b && ranges_overlap(a, b, a_bytes, b_bytes);
}

/// Bytes one modulation tensor spans: n rows `stride` apart, c elements in the last (0 if the
/// stride is refused or the span overflows).
inline uint64_t modulation_span(int64_t n, int64_t c, int64_t stride, int elem_bytes) {
  const int64_t s = stride == 0 ? c : stride;
  int64_t rows = 0, elems = 0;
  if (s < c || mul_overflows(n - 1, s, &rows) || __builtin_add_overflow(rows, c, &elems))
    return 0;
  return uint64_t(elems) * uint64_t(elem_bytes);
}

/// The modulation's rules: a known type, strides 0 or >= c, buffers that leave y alone.
inline Invalid validate_modulation(const void* y, int64_t n, int64_t c, int elem_bytes,
                                   uint64_t y_bytes, const Options& opt) {
  const Modulation& m = opt.modulation;
  if (m.scale == nullptr && m.shift == nullptr) return Invalid::kOk;
  if (m.type != ParamType::kFloat && m.type != ParamType::kSameAsInput)
    return Invalid::kBadModulation;
  // The kernels find a plane's sample with a 32-bit division (image_of, epilogue.cuh).
  if (n * c >= (int64_t(1) << 31)) return Invalid::kBadModulation;
  const int mb = m.type == ParamType::kFloat ? 4 : elem_bytes;
  const void* bufs[2] = {m.scale, m.shift};
  const int64_t strides[2] = {m.scale_stride, m.shift_stride};
  for (int i = 0; i < 2; ++i) {
    if (bufs[i] == nullptr) continue;
    const uint64_t span = modulation_span(n, c, strides[i], mb);
    if (strides[i] < 0 || span == 0 || ranges_overlap(bufs[i], y, span, y_bytes))
      return Invalid::kBadModulation;
  }
  return Invalid::kOk;
}
}  // namespace detail

/// Checks sizes, pointers and options; on kOk fills `prob`. Touches no device state.
inline Invalid validate(const void* x, const void* y, int64_t n, int64_t c, int64_t spatial,
                        int elem_bytes, const Options& opt, Problem* prob) {
  if (n < 0 || c < 0 || spatial < 0 || opt.groups < 0) return Invalid::kNegativeSize;
  if (n == 0 || c == 0 || spatial == 0) return Invalid::kEmpty;
  if (x == nullptr || y == nullptr) return Invalid::kNullPointer;
  if (!(opt.eps >= 0.f) || !std::isfinite(opt.eps)) return Invalid::kBadEps;
  int64_t nc = 0, total = 0, bytes = 0;
  if (detail::mul_overflows(n, c, &nc) || detail::mul_overflows(nc, spatial, &total) ||
      detail::mul_overflows(total, elem_bytes, &bytes))
    return Invalid::kOverflow;
  const int64_t groups = opt.groups == 0 ? c : opt.groups;
  if (c % groups != 0) return Invalid::kBadGroups;
  const bool has_rm = opt.running_mean != nullptr, has_rv = opt.running_var != nullptr;
  if (has_rm != has_rv || (!opt.use_input_stats && !has_rm)) return Invalid::kBadRunningStats;
  if (has_rm && (groups != c || (opt.use_input_stats && spatial == 1)))
    return Invalid::kBadRunningStats;
  if (!(opt.momentum >= 0.f && opt.momentum <= 1.f)) return Invalid::kBadMomentum;
  if (opt.layout != Layout::kNCHW && opt.layout != Layout::kNHWC) return Invalid::kNotSupported;
  if (opt.activation != Activation::kNone && opt.activation != Activation::kRelu &&
      opt.activation != Activation::kSilu)
    return Invalid::kBadActivation;
  if (opt.param_type != ParamType::kFloat && opt.param_type != ParamType::kSameAsInput)
    return Invalid::kBadParamType;
  if (detail::partial_overlap(x, y, uint64_t(bytes), uint64_t(bytes))) return Invalid::kOverlap;
  const Invalid mod = detail::validate_modulation(y, n, c, elem_bytes, uint64_t(bytes), opt);
  if (mod != Invalid::kOk) return mod;
  if (opt.unbiased && opt.use_input_stats && (c / groups) * spatial == 1)
    return Invalid::kBadUnbiased;

  prob->n = n;
  prob->c = c;
  prob->spatial = spatial;
  prob->groups = groups;
  prob->planes = n * groups;
  prob->channels_per_group = c / groups;
  prob->plane_len = prob->channels_per_group * spatial;
  prob->elem_bytes = elem_bytes;
  // 16-byte vectors need x and y aligned and every channel start (a multiple of spatial
  // elements) aligned too, so that a vector never straddles two channels or two planes.
  const int64_t vec = 16 / elem_bytes;
  // With one channel or one position, NHWC is NCHW element for element: the NCHW planner and
  // kernels serve it (the NHWC ones spent a block on each tiny image: 36167x1643x1x1 and
  // 5532753x1x2x7 bf16 ran at 0.009 and 0.001 of copy on the H200).
  prob->nhwc = opt.layout == Layout::kNHWC && c > 1 && spatial > 1;
  // NHWC: a vector holds vec channels of one position, so rows of c elements must stay aligned.
  const auto xb = reinterpret_cast<uintptr_t>(x), yb = reinterpret_cast<uintptr_t>(y);
  prob->vector_ok = (xb % 16 == 0) && (yb % 16 == 0) && ((prob->nhwc ? c : spatial) % vec == 0);
  const bool channel_params = opt.gamma != nullptr || opt.beta != nullptr ||
                              opt.modulation.scale != nullptr || opt.modulation.shift != nullptr;
  prob->channel_runs = prob->channels_per_group > 1 && channel_params;
  prob->ragged_ok = !prob->vector_ok && !prob->nhwc && (y == nullptr || xb % 16 == yb % 16) &&
                    !prob->channel_runs;
  return Invalid::kOk;
}

/// The checks of forward<T> on their own: kOk (a launch follows), kEmpty (nothing to do, the call
/// returns cudaSuccess) or the reason the call is refused. No CUDA call; x and y are only compared.
template <class T>
inline Invalid validate(const T* x, const T* y, int64_t n, int64_t c, int64_t spatial,
                        const Options& opt) {
  Problem prob;
  return validate(x, y, n, c, spatial, int(sizeof(T)), opt, &prob);
}


/// The checks of statistics<T> (api.cuh): those of the forward with y = x, then the outputs:
/// mean and stddev non-null, n*G floats each, overlapping neither x nor each other. No CUDA call.
inline Invalid validate_statistics(const void* x, const float* mean, const float* stddev,
                                   int64_t n, int64_t c, int64_t spatial, int elem_bytes,
                                   const Options& opt, Problem* prob) {
  const Invalid v = validate(x, x, n, c, spatial, elem_bytes, opt, prob);
  if (v != Invalid::kOk) return v;
  if (mean == nullptr || stddev == nullptr) return Invalid::kNullPointer;
  const uint64_t bytes = uint64_t(n * c * spatial) * uint64_t(elem_bytes);
  const uint64_t sb = uint64_t(prob->planes) * sizeof(float);
  if (detail::ranges_overlap(mean, x, sb, bytes) || detail::ranges_overlap(stddev, x, sb, bytes) ||
      detail::ranges_overlap(mean, stddev, sb, sb))
    return Invalid::kOverlap;
  return Invalid::kOk;
}

/// The checks of backward<T>: those of the forward with the same Options (x and dx in the
/// roles of x and y), then dy (dx == dy and dx == x are allowed; any other overlap of dx with
/// x or dy is not), the saved statistics the backward reads (opt.save_mean and opt.save_rstd,
/// as the forward wrote them) and the gradient buffers. No CUDA call.
inline Invalid validate_backward(const void* x, const void* dy, const void* dx, int64_t n,
                                 int64_t c, int64_t spatial, int elem_bytes, const Options& opt,
                                 const Gradients& grads, Problem* prob) {
  Invalid v = validate(x, dx, n, c, spatial, elem_bytes, opt, prob);
  if (v != Invalid::kOk) return v;
  if (dy == nullptr) return Invalid::kNullPointer;
  const uint64_t bytes = uint64_t(n * c * spatial) * uint64_t(elem_bytes);
  if (detail::partial_overlap(dx, dy, bytes, bytes)) return Invalid::kOverlap;
  if (reinterpret_cast<uintptr_t>(dy) % 16 != 0) prob->vector_ok = false;  // dy is read in vectors too
  prob->ragged_ok = false;  // forward plans only
  if (opt.use_input_stats && (opt.save_mean == nullptr || opt.save_rstd == nullptr))
    return Invalid::kNoSavedStats;
  // The gradient buffers: c floats (dgamma, dbeta) or n*c floats (dscale, dshift) each, no two
  // of them and no tensor sharing a byte.
  const float* g[4] = {grads.dgamma, grads.dbeta, grads.dscale, grads.dshift};
  const uint64_t gb[4] = {uint64_t(c) * 4, uint64_t(c) * 4, uint64_t(n * c) * 4,
                          uint64_t(n * c) * 4};
  for (int i = 0; i < 4; ++i) {
    if (g[i] == nullptr) continue;
    for (const void* t : {x, dy, dx})
      if (detail::ranges_overlap(g[i], t, gb[i], bytes)) return Invalid::kBadGradients;
    for (int j = 0; j < i; ++j)
      if (detail::ranges_overlap(g[i], g[j], gb[i], gb[j])) return Invalid::kBadGradients;
  }
  return Invalid::kOk;
}

/// validate_backward for element type T: kOk, kEmpty (nothing to do) or the reason.
template <class T>
inline Invalid validate_backward(const T* x, const T* dy, const T* dx, int64_t n, int64_t c,
                                 int64_t spatial, const Options& opt, const Gradients& grads = {}) {
  Problem prob;
  return validate_backward(x, dy, dx, n, c, spatial, int(sizeof(T)), opt, grads, &prob);
}

}  // namespace instnorm
