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

/// y[i] (float64) for NCHW x with `opt` (groups, gamma/beta of type P, activation; eps from opt).
/// Returns the per-plane statistics in `stats` when it is non-null.
template <class T, class P = float>
void forward(const T* x, double* y, int64_t n, int64_t c, int64_t spatial, const Options& opt,
             std::vector<PlaneStats>* stats = nullptr) {
  const int64_t groups = opt.groups == 0 ? c : opt.groups;
  const int64_t cpg = c / groups;
  const int64_t len = cpg * spatial;
  const auto* gamma = static_cast<const P*>(opt.gamma);
  const auto* beta = static_cast<const P*>(opt.beta);
  if (stats) stats->assign(size_t(n * groups), PlaneStats{});
  for (int64_t plane = 0; plane < n * groups; ++plane) {
    const T* xp = x + plane * len;
    double sum = 0;
    for (int64_t i = 0; i < len; ++i) sum += to_double(xp[i]);
    double mean = sum / double(len);
    double m2 = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double d = to_double(xp[i]) - mean;
      m2 += d * d;
    }
    double var = m2 / double(len);
    if (!opt.use_input_stats) {  // eval mode: the running statistics of the plane's channel
      mean = opt.running_mean[plane % c];
      var = opt.running_var[plane % c];
    }
    const double rstd = 1.0 / std::sqrt(var + double(opt.eps));
    if (stats) (*stats)[size_t(plane)] = PlaneStats{mean, var};
    for (int64_t i = 0; i < len; ++i) {
      const int64_t ch = (plane % groups) * cpg + i / spatial;
      const double g = gamma ? to_double(gamma[ch]) : 1.0;
      const double b = beta ? to_double(beta[ch]) : 0.0;
      y[plane * len + i] = activate((to_double(xp[i]) - mean) * rstd * g + b, opt.activation);
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
