#pragma once
/// \file reference.h
/// The float64 CPU reference: two passes per plane (mean, then squared deviations), usable from
/// host code on a machine without a GPU. The tests and the benchmark check the kernels with it.

#include <cmath>
#include <cstdint>
#include <vector>

#include "detail/convert.cuh"
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

/// y (float64) for x in opt.layout (NCHW or NHWC) with `opt` (groups, gamma/beta of type P,
/// activation, eps, running statistics in eval mode). Returns the per-plane statistics in
/// `stats` (n * G entries) when it is non-null.
template <class T, class P = float>
void forward(const T* x, double* y, int64_t n, int64_t c, int64_t spatial, const Options& opt,
             std::vector<PlaneStats>* stats = nullptr) {
  const int64_t groups = opt.groups == 0 ? c : opt.groups;
  const int64_t cpg = c / groups;
  const int64_t len = cpg * spatial;
  const bool nhwc = opt.layout == Layout::kNHWC;
  const auto* gamma = static_cast<const P*>(opt.gamma);
  const auto* beta = static_cast<const P*>(opt.beta);
  if (stats) stats->assign(size_t(n * groups), PlaneStats{});
  for (int64_t plane = 0; plane < n * groups; ++plane) {
    const int64_t i = plane / groups, g = plane % groups;
    // Element k of the plane: channel g*cpg + k / spatial, position k % spatial.
    auto index = [&](int64_t k) {
      const int64_t ch = g * cpg + k / spatial, pos = k % spatial;
      return nhwc ? (i * spatial + pos) * c + ch : (i * c + ch) * spatial + pos;
    };
    double sum = 0;
    for (int64_t k = 0; k < len; ++k) sum += to_double(x[index(k)]);
    double mean = sum / double(len);
    double m2 = 0;
    for (int64_t k = 0; k < len; ++k) {
      const double d = to_double(x[index(k)]) - mean;
      m2 += d * d;
    }
    double var = m2 / double(len);
    if (!opt.use_input_stats) {  // eval mode: the running statistics of the plane's channel
      mean = opt.running_mean[g];
      var = opt.running_var[g];
    }
    const double rstd = 1.0 / std::sqrt(var + double(opt.eps));
    if (stats) (*stats)[size_t(plane)] = PlaneStats{mean, var};
    for (int64_t k = 0; k < len; ++k) {
      const int64_t ch = g * cpg + k / spatial;
      const double gm = gamma ? to_double(gamma[ch]) : 1.0;
      const double b = beta ? to_double(beta[ch]) : 0.0;
      y[index(k)] = activate((to_double(x[index(k)]) - mean) * rstd * gm + b, opt.activation);
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
