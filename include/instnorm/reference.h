#pragma once
/// \file reference.h
/// The float64 CPU reference: two passes per plane (mean, then squared deviations), usable from
/// host code on a machine without a GPU. The tests and the benchmark check the kernels with it.
/// forward() is the ground truth of the forward kernels, backward() of a backward of the same
/// call (the gradients PyTorch's autograd gives).

#include <cmath>
#include <cstdint>
#include <vector>

#include "thread/vector.cuh"
#include "options.cuh"

namespace instnorm {
namespace reference {

inline double to_double(float v) { return v; }
inline double to_double(double v) { return v; }
inline double to_double(__half v) { return __half2float(v); }
inline double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

inline double activate(double v, Activation a) {
  switch (a) {
    case Activation::kRelu: return v > 0 ? v : 0;
    case Activation::kSilu: return v / (1 + std::exp(-v));
    default: return v;
  }
}

/// Moments of each normalized plane.
struct PlaneStats {
  double mean = 0, var = 0;
};

/// The grouping both references share: G groups of cpg channels, planes of len elements.
struct RefShape {
  int64_t c, spatial, groups, cpg, len;
  bool nhwc;
  RefShape(int64_t c_, int64_t spatial_, const Options& opt)
      : c(c_), spatial(spatial_), groups(opt.groups == 0 ? c_ : opt.groups), cpg(c_ / groups),
        len(cpg * spatial_), nhwc(opt.layout == Layout::kNHWC) {}
  struct RefPlane plane(int64_t p) const;
};

/// One normalized plane (an (n, group) pair) as both references walk it: element k's index in
/// x, and its statistics in float64 (two passes, biased variance; the running statistics of its
/// channel in eval mode).
struct RefPlane {
  int64_t i, g, cpg, spatial, c, len;
  bool nhwc;
  int64_t channel(int64_t k) const { return g * cpg + k / spatial; }
  int64_t index(int64_t k) const {
    const int64_t ch = channel(k), pos = k % spatial;
    return nhwc ? (i * spatial + pos) * c + ch : (i * c + ch) * spatial + pos;
  }
  template <class T>
  PlaneStats stats(const T* x, const Options& opt) const {
    double sum = 0;
    for (int64_t k = 0; k < len; ++k) sum += to_double(x[index(k)]);
    const double mean = sum / double(len);
    double m2 = 0;
    for (int64_t k = 0; k < len; ++k) {
      const double d = to_double(x[index(k)]) - mean;
      m2 += d * d;
    }
    if (!opt.use_input_stats) return PlaneStats{opt.running_mean[g], opt.running_var[g]};
    return PlaneStats{mean, m2 / double(len)};
  }
};

inline RefPlane RefShape::plane(int64_t p) const {
  return RefPlane{p / groups, p % groups, cpg, spatial, c, len, nhwc};
}

/// y (float64) for x in opt.layout (NCHW or NHWC) with `opt` (groups, gamma/beta of type P,
/// activation, eps, running statistics in eval mode). Returns the per-plane statistics in
/// `stats` (n * G entries) when it is non-null.
template <class T, class P = float>
void forward(const T* x, double* y, int64_t n, int64_t c, int64_t spatial, const Options& opt,
             std::vector<PlaneStats>* stats = nullptr) {
  const RefShape shape(c, spatial, opt);
  const int64_t groups = shape.groups, len = shape.len;
  const auto* gamma = static_cast<const P*>(opt.gamma);
  const auto* beta = static_cast<const P*>(opt.beta);
  if (stats) stats->assign(size_t(n * groups), PlaneStats{});
  for (int64_t plane = 0; plane < n * groups; ++plane) {
    const RefPlane pl = shape.plane(plane);
    const auto index = [&](int64_t k) { return pl.index(k); };
    const PlaneStats st = pl.stats(x, opt);
    const double mean = st.mean, var = st.var, rstd = 1.0 / std::sqrt(var + double(opt.eps));
    if (stats) (*stats)[size_t(plane)] = PlaneStats{mean, var};
    for (int64_t k = 0; k < len; ++k) {
      const int64_t ch = pl.channel(k);
      const double gm = gamma ? to_double(gamma[ch]) : 1.0;
      const double b = beta ? to_double(beta[ch]) : 0.0;
      y[index(k)] = activate((to_double(x[index(k)]) - mean) * rstd * gm + b, opt.activation);
    }
  }
}

/// Derivative of activate() at the pre-activation v, PyTorch's conventions: ReLU 1 for v > 0 and
/// 0 otherwise (relu'(0) = 0, as threshold_backward); SiLU s * (1 + v * (1 - s)), s = sigmoid(v).
inline double activate_derivative(double v, Activation a) {
  switch (a) {
    case Activation::kRelu: return v > 0 ? 1.0 : 0.0;
    case Activation::kSilu: {
      const double s = 1 / (1 + std::exp(-v));
      return s * (1 + v * (1 - s));
    }
    default: return 1.0;
  }
}

/// What backward() knows of each normalized plane (n * G entries, plane i * G + g), and the two
/// sums a backward kernel reduces per plane: with N = channels_per_group * spatial elements,
/// g_k = gamma_ch * dy_pre_k and xhat_k = (x_k - mean) * rstd,
///   dx_k = rstd * (g_k - sum_g / N - xhat_k * sum_g_xhat / N)   (use_input_stats)
///   dx_k = rstd * g_k                                            (running statistics)
struct PlaneGradSums {
  double mean = 0, rstd = 0;  ///< the statistics the forward normalized the plane with
  double sum_g = 0;           ///< sum over the plane of g
  double sum_g_xhat = 0;      ///< sum over the plane of g * xhat
};

/// Gradients (float64) of the call forward(x, ..., opt) computes, y = act(xhat * gamma + beta)
/// with xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), for the upstream gradient dy:
/// what PyTorch's autograd gives for instance norm / GroupNorm (+ affine + activation).
///  - Layout: x, dy and dx in opt.layout (NCHW or NHWC), n * c * spatial elements each.
///  - Statistics: mean and biased variance over each (n, group) plane of channels_per_group *
///    spatial elements, recomputed from x in two passes, exactly as forward(). They depend on x,
///    so with N elements and g = gamma * dy_pre:
///      dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
///    With use_input_stats = false (eval mode) the plane of channel j uses running_mean[j] and
///    running_var[j], constants: dx = rstd * g, no reduction.
///  - Activation: dy_pre = dy * act'(v) at the pre-activation v = xhat * gamma + beta recomputed
///    from x and the statistics (activate_derivative: relu'(0) = 0).
///  - dgamma[j] = sum of dy_pre * xhat, dbeta[j] = sum of dy_pre over n and spatial of channel j
///    (c entries each). Written only where the pointer is non-null and the call is affine in that
///    parameter (opt.gamma, resp. opt.beta, non-null); otherwise left untouched.
///  - sums: when non-null, resized to n * G and filled with each plane's PlaneGradSums (also in
///    eval mode, where dx does not use sum_g and sum_g_xhat).
/// gamma and beta have type P (float, or T for ParamType::kSameAsInput); T may also be double.
/// As in forward(), eps = 0 on a constant plane gives rstd = inf and non-finite gradients.
template <class T, class P = float>
void backward(const T* x, const T* dy, double* dx, int64_t n, int64_t c, int64_t spatial,
              const Options& opt, double* dgamma = nullptr, double* dbeta = nullptr,
              std::vector<PlaneGradSums>* sums = nullptr) {
  const RefShape shape(c, spatial, opt);
  const int64_t groups = shape.groups, len = shape.len;
  const auto* gamma = static_cast<const P*>(opt.gamma);
  const auto* beta = static_cast<const P*>(opt.beta);
  if (!gamma) dgamma = nullptr;
  if (!beta) dbeta = nullptr;
  if (dgamma)
    for (int64_t ch = 0; ch < c; ++ch) dgamma[ch] = 0;
  if (dbeta)
    for (int64_t ch = 0; ch < c; ++ch) dbeta[ch] = 0;
  if (sums) sums->assign(size_t(n * groups), PlaneGradSums{});
  for (int64_t plane = 0; plane < n * groups; ++plane) {
    const RefPlane pl = shape.plane(plane);
    const auto index = [&](int64_t k) { return pl.index(k); };
    // Statistics, as forward().
    const PlaneStats st = pl.stats(x, opt);
    const double mean = st.mean, var = st.var, rstd = 1.0 / std::sqrt(var + double(opt.eps));
    // Element k's xhat, and dy_pre (dy through the activation at the forward's pre-activation).
    auto xhat_dypre = [&](int64_t k, double& xhat, double& dy_pre) {
      const int64_t ch = pl.channel(k);
      const double gm = gamma ? to_double(gamma[ch]) : 1.0;
      const double b = beta ? to_double(beta[ch]) : 0.0;
      xhat = (to_double(x[index(k)]) - mean) * rstd;
      dy_pre = to_double(dy[index(k)]) * activate_derivative(xhat * gm + b, opt.activation);
      return gm;
    };
    // Pass 3: the plane's sums of g = gamma * dy_pre, and the per-channel parameter gradients.
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t k = 0; k < len; ++k) {
      const int64_t ch = pl.channel(k);
      double xhat, dy_pre;
      const double gm = xhat_dypre(k, xhat, dy_pre);
      if (dgamma) dgamma[ch] += dy_pre * xhat;
      if (dbeta) dbeta[ch] += dy_pre;
      sum_g += gm * dy_pre;
      sum_g_xhat += gm * dy_pre * xhat;
    }
    if (sums) (*sums)[size_t(plane)] = PlaneGradSums{mean, rstd, sum_g, sum_g_xhat};
    // Pass 4: dx.
    const double mean_g = sum_g / double(len), mean_g_xhat = sum_g_xhat / double(len);
    for (int64_t k = 0; k < len; ++k) {
      double xhat, dy_pre;
      const double g = xhat_dypre(k, xhat, dy_pre) * dy_pre;
      dx[index(k)] = opt.use_input_stats ? rstd * (g - mean_g - xhat * mean_g_xhat) : rstd * g;
    }
  }
}

/// The running-statistics update PyTorch applies after a training forward of instance norm:
/// per channel, r = (1 - momentum) r + momentum * (batch mean of the instances' mean, or of their
/// unbiased variance var * S / (S - 1)). `stats` from forward() (n * c planes).
inline void update_running(const std::vector<PlaneStats>& stats, int64_t n, int64_t c,
                           int64_t spatial, double momentum, double* running_mean,
                           double* running_var) {
  for (int64_t ch = 0; ch < c; ++ch) {
    double sm = 0, sv = 0;
    for (int64_t i = 0; i < n; ++i) {
      sm += stats[size_t(i * c + ch)].mean;
      sv += stats[size_t(i * c + ch)].var;
    }
    running_mean[ch] = (1 - momentum) * running_mean[ch] + momentum * sm / double(n);
    running_var[ch] = (1 - momentum) * running_var[ch] +
                      momentum * sv / double(n) * double(spatial) / double(spatial - 1);
  }
}

}  // namespace reference
}  // namespace instnorm
