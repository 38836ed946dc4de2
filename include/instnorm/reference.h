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
  /// Calls f(plane, its RefPlane, its statistics, rstd) for each of the n * G planes of x.
  template <class T, class F>
  void each_plane(const T* x, int64_t n, const Options& opt, F&& f) const;
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
  /// 1 / sqrt(var + eps) of the call: the unbiased variance var * len / (len - 1) where
  /// opt.unbiased asks for it (input statistics only).
  double rstd(const PlaneStats& st, const Options& opt) const {
    const double v = opt.unbiased && opt.use_input_stats ? st.var * double(len) / double(len - 1)
                                                         : st.var;
    return 1.0 / std::sqrt(v + double(opt.eps));
  }
};

/// The affine map after the normalize of channel ch of sample i, pre = xhat * gamma + beta, with
/// the per-sample modulation (Modulation, options.cuh; elements of type M) folded in, and the
/// modulation's factor m and the un-modulated gamma/beta (for the gradients).
struct RefAffine {
  double gamma, beta;  ///< the folded map
  double m;            ///< the factor of gamma: 1 + scale, scale, or 1
  double g0, b0;       ///< the per-channel gamma and beta alone
};
template <class P, class M>
RefAffine affine_of(const Options& opt, int64_t c, int64_t i, int64_t ch) {
  const auto* gamma = static_cast<const P*>(opt.gamma);
  const auto* beta = static_cast<const P*>(opt.beta);
  const Modulation& md = opt.modulation;
  RefAffine a;
  a.g0 = gamma ? to_double(gamma[ch]) : 1.0;
  a.b0 = beta ? to_double(beta[ch]) : 0.0;
  const int64_t ss = md.scale_stride ? md.scale_stride : c, hs = md.shift_stride ? md.shift_stride : c;
  const double s = md.scale ? to_double(static_cast<const M*>(md.scale)[i * ss + ch]) : 0.0;
  const double t = md.shift ? to_double(static_cast<const M*>(md.shift)[i * hs + ch]) : 0.0;
  a.m = !md.scale ? 1.0 : md.one_plus_scale ? 1.0 + s : s;
  a.gamma = a.g0 * a.m;
  a.beta = (md.one_plus_scale ? a.b0 * a.m : a.b0) + t;
  return a;
}

inline RefPlane RefShape::plane(int64_t p) const {
  return RefPlane{p / groups, p % groups, cpg, spatial, c, len, nhwc};
}
template <class T, class F>
void RefShape::each_plane(const T* x, int64_t n, const Options& opt, F&& f) const {
  for (int64_t p = 0; p < n * groups; ++p) {
    const RefPlane pl = plane(p);
    const PlaneStats st = pl.stats(x, opt);
    f(p, pl, st, pl.rstd(st, opt));
  }
}

/// y (float64) for x in opt.layout (NCHW or NHWC) with `opt` (groups, gamma/beta of type P,
/// the modulation of type M, activation, eps, unbiased, running statistics in eval mode).
/// Returns the per-plane statistics in `stats` (n * G entries, biased variance) when non-null.
template <class T, class P = float, class M = float>
void forward(const T* x, double* y, int64_t n, int64_t c, int64_t spatial, const Options& opt,
             std::vector<PlaneStats>* stats = nullptr) {
  const RefShape shape(c, spatial, opt);
  const int64_t groups = shape.groups, len = shape.len;
  if (stats) stats->assign(size_t(n * groups), PlaneStats{});
  shape.each_plane(x, n, opt, [&](int64_t plane, const RefPlane& pl, const PlaneStats& st,
                                  double rstd) {
    if (stats) (*stats)[size_t(plane)] = st;
    for (int64_t k = 0; k < len; ++k) {
      const RefAffine a = affine_of<P, M>(opt, c, pl.i, pl.channel(k));
      y[pl.index(k)] =
          activate((to_double(x[pl.index(k)]) - st.mean) * rstd * a.gamma + a.beta,
                   opt.activation);
    }
  });
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
///  - Modulation (elements of type M): gamma and beta above are the folded map of affine_of;
///    dgamma[j] sums dy_pre * xhat * m, dbeta[j] dy_pre * m (1 + scale) or dy_pre; dscale[i * c
///    + j] sums dy_pre * (xhat * gamma_j + beta_j) (1 + scale) or dy_pre * xhat * gamma_j, and
///    dshift[i * c + j] dy_pre, over the spatial positions (n * c entries each, written where
///    non-null). Unbiased (opt.unbiased): mean(g * xhat) becomes sum(g * xhat) / (N - 1).
/// gamma and beta have type P (float, or T for ParamType::kSameAsInput); T may also be double.
/// As in forward(), eps = 0 on a constant plane gives rstd = inf and non-finite gradients.
template <class T, class P = float, class M = float>
void backward(const T* x, const T* dy, double* dx, int64_t n, int64_t c, int64_t spatial,
              const Options& opt, double* dgamma = nullptr, double* dbeta = nullptr,
              std::vector<PlaneGradSums>* sums = nullptr, double* dscale = nullptr,
              double* dshift = nullptr) {
  const RefShape shape(c, spatial, opt);
  const int64_t groups = shape.groups, len = shape.len;
  if (!opt.gamma) dgamma = nullptr;
  if (!opt.beta) dbeta = nullptr;
  if (dgamma)
    for (int64_t ch = 0; ch < c; ++ch) dgamma[ch] = 0;
  if (dbeta)
    for (int64_t ch = 0; ch < c; ++ch) dbeta[ch] = 0;
  for (double* d : {dscale, dshift})
    if (d)
      for (int64_t e = 0; e < n * c; ++e) d[e] = 0;
  if (sums) sums->assign(size_t(n * groups), PlaneGradSums{});
  // Statistics, as forward().
  shape.each_plane(x, n, opt, [&](int64_t plane, const RefPlane& pl, const PlaneStats& st,
                                  double rstd) {
    const double mean = st.mean;
    const auto index = [&](int64_t k) { return pl.index(k); };
    // Element k's xhat, and dy_pre (dy through the activation at the forward's pre-activation).
    auto xhat_dypre = [&](int64_t k, double& xhat, double& dy_pre) {
      const RefAffine a = affine_of<P, M>(opt, c, pl.i, pl.channel(k));
      xhat = (to_double(x[index(k)]) - mean) * rstd;
      dy_pre = to_double(dy[index(k)]) * activate_derivative(xhat * a.gamma + a.beta, opt.activation);
      return a;
    };
    // Pass 3: the plane's sums of g = gamma * dy_pre, and the per-channel parameter gradients.
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t k = 0; k < len; ++k) {
      const int64_t ch = pl.channel(k);
      double xhat, dy_pre;
      const RefAffine a = xhat_dypre(k, xhat, dy_pre);
      const double gm = a.gamma;
      const bool one_plus = opt.modulation.one_plus_scale;
      if (dgamma) dgamma[ch] += dy_pre * xhat * a.m;
      if (dbeta) dbeta[ch] += one_plus ? dy_pre * a.m : dy_pre;
      const size_t e = size_t(pl.i * c + ch);
      if (dscale) dscale[e] += one_plus ? dy_pre * (xhat * a.g0 + a.b0) : dy_pre * xhat * a.g0;
      if (dshift) dshift[e] += dy_pre;
      sum_g += gm * dy_pre;
      sum_g_xhat += gm * dy_pre * xhat;
    }
    if (sums) (*sums)[size_t(plane)] = PlaneGradSums{mean, rstd, sum_g, sum_g_xhat};
    // Pass 4: dx.
    const double mean_g = sum_g / double(len);
    const double mean_g_xhat = sum_g_xhat / double(opt.unbiased ? len - 1 : len);
    for (int64_t k = 0; k < len; ++k) {
      double xhat, dy_pre;
      const double g = xhat_dypre(k, xhat, dy_pre).gamma * dy_pre;
      dx[index(k)] = opt.use_input_stats ? rstd * (g - mean_g - xhat * mean_g_xhat) : rstd * g;
    }
  });
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
