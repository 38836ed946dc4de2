// CPU tests (run in CI): the float64 reference backward, the ground truth of a GPU backward.
// Checked against central differences of the float64 forward reference, and against the
// invariances of the normalization.
#include <gtest/gtest.h>

#include <instnorm/reference.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "finite_diff.h"

namespace {

using namespace instnorm;
using instnorm_test::central;
using instnorm_test::max_abs;

struct Case {
  int64_t n, c, spatial, groups;
  Layout layout;
  bool affine;
  Activation act;
  bool eval;  // use_input_stats = false, running statistics
};

std::string describe(const Case& k) {
  const char* acts[] = {"none", "relu", "silu"};
  return "n=" + std::to_string(k.n) + " c=" + std::to_string(k.c) +
         " spatial=" + std::to_string(k.spatial) + " groups=" + std::to_string(k.groups) +
         (k.layout == Layout::kNHWC ? " NHWC" : " NCHW") + (k.affine ? " affine" : "") +
         " act=" + acts[int(k.act)] + (k.eval ? " eval" : " train");
}

// The data of one case: x, the loss weights w (= dy), gamma/beta (float64, P = double), running
// statistics (float, as Options holds them).
struct Data {
  std::vector<double> x, w, gamma, beta;
  std::vector<float> running_mean, running_var;
  Options opt;
};

Data make_data(const Case& k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.5, 1.5);
  Data d;
  const size_t size = size_t(k.n * k.c * k.spatial);
  d.x.resize(size);
  d.w.resize(size);
  for (auto& v : d.x) v = 0.7 + 1.3 * nd(rng);
  for (auto& v : d.w) v = nd(rng);
  d.opt.groups = k.groups;
  d.opt.layout = k.layout;
  d.opt.activation = k.act;
  if (k.affine) {
    d.gamma.resize(size_t(k.c));
    d.beta.resize(size_t(k.c));
    for (auto& v : d.gamma) v = (rng() & 1 ? 1 : -1) * ud(rng);
    for (auto& v : d.beta) v = 0.3 * nd(rng);
    d.opt.gamma = d.gamma.data();
    d.opt.beta = d.beta.data();
  }
  if (k.eval) {
    d.running_mean.resize(size_t(k.c));
    d.running_var.resize(size_t(k.c));
    for (auto& v : d.running_mean) v = float(0.5 * nd(rng));
    for (auto& v : d.running_var) v = float(ud(rng) * 1.5);
    d.opt.running_mean = d.running_mean.data();
    d.opt.running_var = d.running_var.data();
    d.opt.use_input_stats = false;
  }
  return d;
}

// L = sum(y * w) with the float64 forward reference.
double loss(const std::vector<double>& x, const std::vector<double>& w, int64_t n, int64_t c,
            int64_t spatial, const Options& opt) {
  std::vector<double> y(x.size());
  reference::forward<double, double>(x.data(), y.data(), n, c, spatial, opt);
  double l = 0;
  for (size_t i = 0; i < y.size(); ++i) l += y[i] * w[i];
  return l;
}

// Smallest |pre-activation| of the case (forward without the activation).
double min_abs_pre(const Data& d, const Case& k) {
  Options o = d.opt;
  o.activation = Activation::kNone;
  std::vector<double> v(d.x.size());
  reference::forward<double, double>(d.x.data(), v.data(), k.n, k.c, k.spatial, o);
  double m = INFINITY;
  for (double e : v) m = std::min(m, std::fabs(e));
  return m;
}

// Checks dx, dgamma, dbeta of backward() against central differences of L: each component to
// `rel` times the largest magnitude of its vector. `h` is relative to max(1, |parameter|).
void check_against_finite_differences(const Case& k, Data& d, double h, double rel) {
  const size_t size = d.x.size();
  std::vector<double> dx(size), dgamma(size_t(k.c), NAN), dbeta(size_t(k.c), NAN);
  reference::backward<double, double>(d.x.data(), d.w.data(), dx.data(), k.n, k.c, k.spatial, d.opt,
                                      dgamma.data(), dbeta.data());
  auto L = [&] { return loss(d.x, d.w, k.n, k.c, k.spatial, d.opt); };

  std::vector<double> fd(size);
  for (size_t i = 0; i < size; ++i)
    fd[i] = central(d.x[i], h * std::max(1.0, std::fabs(d.x[i])), L);
  const double tol = rel * std::max(max_abs(fd), 1e-300);
  for (size_t i = 0; i < size; ++i)
    ASSERT_NEAR(dx[i], fd[i], tol) << describe(k) << " dx[" << i << "]";

  if (!k.affine) {  // no affine parameters: dgamma and dbeta are left untouched
    for (int64_t ch = 0; ch < k.c; ++ch) {
      EXPECT_TRUE(std::isnan(dgamma[size_t(ch)])) << describe(k);
      EXPECT_TRUE(std::isnan(dbeta[size_t(ch)])) << describe(k);
    }
    return;
  }
  std::vector<double> fg(size_t(k.c)), fb(size_t(k.c));
  for (size_t ch = 0; ch < size_t(k.c); ++ch) {
    fg[ch] = central(d.gamma[ch], h * std::max(1.0, std::fabs(d.gamma[ch])), L);
    fb[ch] = central(d.beta[ch], h * std::max(1.0, std::fabs(d.beta[ch])), L);
  }
  const double tol_g = rel * std::max(max_abs(fg), 1e-300);
  const double tol_b = rel * std::max(max_abs(fb), 1e-300);
  for (size_t ch = 0; ch < size_t(k.c); ++ch) {
    ASSERT_NEAR(dgamma[ch], fg[ch], tol_g) << describe(k) << " dgamma[" << ch << "]";
    ASSERT_NEAR(dbeta[ch], fb[ch], tol_b) << describe(k) << " dbeta[" << ch << "]";
  }
}

std::vector<Case> small_cases() {
  std::vector<Case> cases;
  for (int64_t spatial : {5, 7})
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (int64_t groups : {0, 2})
        for (bool affine : {false, true})
          for (Activation act : {Activation::kNone, Activation::kRelu, Activation::kSilu})
            for (bool eval : {false, true}) {
              if (eval && groups != 0) continue;  // running statistics: instance norm only
              cases.push_back(Case{2, 4, spatial, groups, layout, affine, act, eval});
            }
  return cases;
}

// Data for the case whose pre-activations all lie away from ReLU's kink (so that no central
// difference straddles it); the seed search is deterministic.
Data data_away_from_kink(const Case& k, uint64_t seed) {
  for (uint64_t s = seed;; ++s) {
    Data d = make_data(k, s);
    if (k.act != Activation::kRelu || min_abs_pre(d, k) > 1e-3) return d;
  }
}

TEST(BackwardReference, MatchesFiniteDifferences) {
  int checked = 0;
  for (const Case& k : small_cases()) {
    Data d = data_away_from_kink(k, 1000 + uint64_t(checked));
    check_against_finite_differences(k, d, 1e-6, 1e-6);
    if (HasFatalFailure()) return;
    ++checked;
  }
  EXPECT_EQ(checked, 72);
}

TEST(BackwardReference, MatchesFiniteDifferencesOnLargerPlanes) {
  // Odd sizes, groups of 3 channels, both layouts.
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
    for (Activation act : {Activation::kNone, Activation::kSilu}) {
      const Case k{3, 6, 13, 2, layout, true, act, false};
      Data d = make_data(k, 7);
      check_against_finite_differences(k, d, 1e-6, 1e-6);
      if (HasFatalFailure()) return;
    }
}

// With eps = 0, dx of a plane is rstd * P(g), P the orthogonal projection off span{1, xhat}
// (mean(xhat^2) = 1): the plane's dx sums to 0 and is orthogonal to xhat, and dy + a + b * xhat
// per plane gives the same dx (no affine, no activation, input statistics). With eps > 0,
// mean(xhat^2) = var / (var + eps) < 1 and only the sum and the constant shift stay exact:
// sum(dx * xhat) = rstd * sum(g * xhat) * (1 - mean(xhat^2)), checked as well.
TEST(BackwardReference, NormalizationInvariances) {
  for (float eps : {0.0f, 1e-5f, 0.5f})
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (int64_t groups : {0, 2}) {
        const Case k{2, 4, 33, groups, layout, false, Activation::kNone, false};
        Data d = make_data(k, 42);
        d.opt.eps = eps;
        const int64_t G = groups == 0 ? k.c : groups, cpg = k.c / G, len = cpg * k.spatial;
        std::vector<double> dx(d.x.size());
        std::vector<reference::PlaneGradSums> sums;
        reference::backward<double, double>(d.x.data(), d.w.data(), dx.data(), k.n, k.c, k.spatial,
                                            d.opt, nullptr, nullptr, &sums);
        ASSERT_EQ(sums.size(), size_t(k.n * G));
        auto index = [&](int64_t i, int64_t grp, int64_t e) {
          const int64_t ch = grp * cpg + e / k.spatial, pos = e % k.spatial;
          return size_t(layout == Layout::kNHWC ? (i * k.spatial + pos) * k.c + ch
                                                : (i * k.c + ch) * k.spatial + pos);
        };
        const double scale = max_abs(dx);
        ASSERT_GT(scale, 0.1);
        // dy + a_plane + b_plane * xhat, different constants per plane.
        std::vector<double> dy2 = d.w;
        std::mt19937_64 rng(3);
        std::normal_distribution<double> nd(0.0, 5.0);
        std::vector<double> dy3 = d.w;
        for (int64_t i = 0; i < k.n; ++i)
          for (int64_t grp = 0; grp < G; ++grp) {
            const auto& s = sums[size_t(i * G + grp)];
            const double a = nd(rng), b = nd(rng);
            double sum_dx = 0, sum_dx_xhat = 0, sum_xhat2 = 0;
            for (int64_t e = 0; e < len; ++e) {
              const size_t at = index(i, grp, e);
              const double xhat = (d.x[at] - s.mean) * s.rstd;
              sum_dx += dx[at];
              sum_dx_xhat += dx[at] * xhat;
              sum_xhat2 += xhat * xhat;
              dy2[at] += a;
              dy3[at] += a + b * xhat;
            }
            const double want_dx_xhat = s.rstd * s.sum_g_xhat * (1 - sum_xhat2 / double(len));
            EXPECT_NEAR(sum_dx, 0.0, 1e-13 * double(len) * scale) << describe(k) << " eps " << eps;
            EXPECT_NEAR(sum_dx_xhat, want_dx_xhat, 1e-13 * double(len) * scale)
                << describe(k) << " eps " << eps;
          }
        std::vector<double> dx2(dx.size()), dx3(dx.size());
        reference::backward<double, double>(d.x.data(), dy2.data(), dx2.data(), k.n, k.c, k.spatial,
                                            d.opt);
        reference::backward<double, double>(d.x.data(), dy3.data(), dx3.data(), k.n, k.c, k.spatial,
                                            d.opt);
        for (size_t at = 0; at < dx.size(); ++at) {
          ASSERT_NEAR(dx2[at], dx[at], 1e-12 * scale) << describe(k) << " constant, at " << at;
          if (eps == 0)
            ASSERT_NEAR(dx3[at], dx[at], 1e-12 * scale) << describe(k) << " a + b xhat, at " << at;
        }
      }
}

// The exposed per-plane sums and statistics rebuild dx with the documented formula, match the
// forward's statistics, and (instance norm, no activation) give dgamma and dbeta.
TEST(BackwardReference, PlaneSumsRebuildTheGradients) {
  for (bool eval : {false, true}) {
    const Case k{3, 5, 11, 0, Layout::kNCHW, true, Activation::kNone, eval};
    const Data d = make_data(k, 9);
    std::vector<double> dx(d.x.size()), dgamma(size_t(k.c)), dbeta(size_t(k.c)), y(d.x.size());
    std::vector<reference::PlaneGradSums> sums;
    std::vector<reference::PlaneStats> stats;
    reference::backward<double, double>(d.x.data(), d.w.data(), dx.data(), k.n, k.c, k.spatial,
                                        d.opt, dgamma.data(), dbeta.data(), &sums);
    reference::forward<double, double>(d.x.data(), y.data(), k.n, k.c, k.spatial, d.opt, &stats);
    ASSERT_EQ(sums.size(), size_t(k.n * k.c));
    std::vector<double> dg(size_t(k.c), 0), db(size_t(k.c), 0);
    for (int64_t i = 0; i < k.n; ++i)
      for (int64_t ch = 0; ch < k.c; ++ch) {
        const auto& s = sums[size_t(i * k.c + ch)];
        EXPECT_EQ(s.mean, stats[size_t(i * k.c + ch)].mean);
        EXPECT_EQ(s.rstd, 1.0 / std::sqrt(stats[size_t(i * k.c + ch)].var + double(d.opt.eps)));
        const double gm = d.gamma[size_t(ch)];
        dg[size_t(ch)] += s.sum_g_xhat / gm;
        db[size_t(ch)] += s.sum_g / gm;
        for (int64_t p = 0; p < k.spatial; ++p) {
          const size_t at = size_t((i * k.c + ch) * k.spatial + p);
          const double g = gm * d.w[at], xhat = (d.x[at] - s.mean) * s.rstd;
          const double want = eval ? s.rstd * g
                                   : s.rstd * (g - s.sum_g / double(k.spatial) -
                                               xhat * s.sum_g_xhat / double(k.spatial));
          EXPECT_NEAR(dx[at], want, 1e-14 * std::max(1.0, std::fabs(want)));
        }
      }
    for (int64_t ch = 0; ch < k.c; ++ch) {
      EXPECT_NEAR(dgamma[size_t(ch)], dg[size_t(ch)],
                  1e-12 * std::max(1.0, std::fabs(dg[size_t(ch)])));
      EXPECT_NEAR(dbeta[size_t(ch)], db[size_t(ch)],
                  1e-12 * std::max(1.0, std::fabs(db[size_t(ch)])));
    }
  }
}

// x with |mean| = 1e4 std: shifting x by an exactly representable constant leaves dx, dgamma,
// dbeta unchanged to 1e-9 (two-pass statistics lose nothing), and dx still matches central
// differences of the forward on the shifted data.
TEST(BackwardReference, AccurateOnLargeOffset) {
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
    for (Activation act : {Activation::kNone, Activation::kSilu})
      for (int64_t groups : {0, 2}) {
        const Case k{2, 4, 7, groups, layout, true, act, false};
        Data d = make_data(k, 77);
        // x on a 2^-20 grid, so that x + 1e4 is exact in float64.
        for (auto& v : d.x) v = std::round(v * 1048576.0) / 1048576.0;
        std::vector<double> dx(d.x.size()), dg(size_t(k.c)), db(size_t(k.c));
        reference::backward<double, double>(d.x.data(), d.w.data(), dx.data(), k.n, k.c, k.spatial,
                                            d.opt, dg.data(), db.data());
        Data s = d;
        for (auto& v : s.x) v += 1e4;
        std::vector<double> sdx(d.x.size()), sdg(size_t(k.c)), sdb(size_t(k.c));
        reference::backward<double, double>(s.x.data(), s.w.data(), sdx.data(), k.n, k.c, k.spatial,
                                            s.opt, sdg.data(), sdb.data());
        for (size_t i = 0; i < dx.size(); ++i)
          ASSERT_NEAR(sdx[i], dx[i], 1e-9 * max_abs(dx)) << describe(k) << " dx[" << i << "]";
        for (size_t ch = 0; ch < size_t(k.c); ++ch) {
          ASSERT_NEAR(sdg[ch], dg[ch], 1e-9 * max_abs(dg)) << describe(k);
          ASSERT_NEAR(sdb[ch], db[ch], 1e-9 * max_abs(db)) << describe(k);
        }
        // Central differences on the shifted data: a step of 1e-4 absolute (1e-8 relative to x),
        // since the forward's y carries ~1e-12 absolute error there.
        auto L = [&] { return loss(s.x, s.w, k.n, k.c, k.spatial, s.opt); };
        std::vector<double> fd(s.x.size());
        for (size_t i = 0; i < s.x.size(); ++i) fd[i] = central(s.x[i], 1e-4, L);
        for (size_t i = 0; i < s.x.size(); ++i)
          ASSERT_NEAR(sdx[i], fd[i], 1e-6 * max_abs(fd)) << describe(k) << " fd dx[" << i << "]";
      }
}

// Every element type instantiates (P = float, or T for kSameAsInput), and gives exactly the
// float64 result on the same (converted) values.
template <class T, class P>
void check_type_matches_double(T (*from)(float), P (*from_p)(float)) {
  const Case k{2, 4, 9, 2, Layout::kNHWC, true, Activation::kSilu, false};
  const Data d = make_data(k, 5);
  std::vector<T> x(d.x.size()), dy(d.x.size());
  std::vector<P> gamma(size_t(k.c)), beta(size_t(k.c));
  std::vector<double> xd(d.x.size()), dyd(d.x.size()), gd(size_t(k.c)), bd(size_t(k.c));
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = from(float(d.x[i]));
    dy[i] = from(float(d.w[i]));
    xd[i] = reference::to_double(x[i]);
    dyd[i] = reference::to_double(dy[i]);
  }
  for (size_t ch = 0; ch < size_t(k.c); ++ch) {
    gamma[ch] = from_p(float(d.gamma[ch]));
    beta[ch] = from_p(float(d.beta[ch]));
    gd[ch] = reference::to_double(gamma[ch]);
    bd[ch] = reference::to_double(beta[ch]);
  }
  Options o = d.opt, od = d.opt;
  o.gamma = gamma.data();
  o.beta = beta.data();
  od.gamma = gd.data();
  od.beta = bd.data();
  std::vector<double> dx(x.size()), dg(size_t(k.c)), db(size_t(k.c));
  std::vector<double> dxd(x.size()), dgd(size_t(k.c)), dbd(size_t(k.c));
  reference::backward<T, P>(x.data(), dy.data(), dx.data(), k.n, k.c, k.spatial, o, dg.data(),
                            db.data());
  reference::backward<double, double>(xd.data(), dyd.data(), dxd.data(), k.n, k.c, k.spatial, od,
                                      dgd.data(), dbd.data());
  EXPECT_EQ(dx, dxd);
  EXPECT_EQ(dg, dgd);
  EXPECT_EQ(db, dbd);
}

float to_f(float v) { return v; }
__half to_h(float v) { return __float2half_rn(v); }
__nv_bfloat16 to_b(float v) { return __float2bfloat16_rn(v); }

TEST(BackwardReference, ElementTypesMatchDouble) {
  check_type_matches_double<float, float>(to_f, to_f);
  check_type_matches_double<__half, float>(to_h, to_f);
  check_type_matches_double<__half, __half>(to_h, to_h);
  check_type_matches_double<__nv_bfloat16, float>(to_b, to_f);
  check_type_matches_double<__nv_bfloat16, __nv_bfloat16>(to_b, to_b);
}

// Activation derivatives: PyTorch's relu'(0) = 0, and SiLU's against a central difference.
TEST(BackwardReference, ActivationDerivatives) {
  EXPECT_EQ(reference::activate_derivative(0.0, Activation::kRelu), 0.0);
  EXPECT_EQ(reference::activate_derivative(-1e-300, Activation::kRelu), 0.0);
  EXPECT_EQ(reference::activate_derivative(1e-300, Activation::kRelu), 1.0);
  EXPECT_EQ(reference::activate_derivative(-3.0, Activation::kNone), 1.0);
  EXPECT_EQ(reference::activate_derivative(0.0, Activation::kSilu), 0.5);
  EXPECT_EQ(reference::activate_derivative(-800.0, Activation::kSilu), 0.0);  // exp overflows
  for (double v : {-30.0, -4.0, -1.0, -0.1, 0.3, 2.0, 9.0, 40.0}) {
    const double h = 1e-6 * std::max(1.0, std::fabs(v));
    const double fd = (reference::activate(v + h, Activation::kSilu) -
                       reference::activate(v - h, Activation::kSilu)) /
                      ((v + h) - (v - h));
    EXPECT_NEAR(reference::activate_derivative(v, Activation::kSilu), fd, 1e-8) << v;
  }
}

// ReLU with a zero pre-activation: dx gets no contribution through that element (relu'(0) = 0).
TEST(BackwardReference, ReluAtZeroPassesNoGradient) {
  // One plane of 4, eval mode with mean 1, var 1 - eps: xhat = x - 1, pre-activation 0 at x = 1.
  std::vector<double> x = {1.0, 2.0, 0.5, 1.0}, dy = {3.0, 5.0, 7.0, 11.0}, dx(4);
  std::vector<float> rm = {1.0f}, rv = {1.0f};
  Options o;
  o.eps = 0;
  o.activation = Activation::kRelu;
  o.running_mean = rm.data();
  o.running_var = rv.data();
  o.use_input_stats = false;
  reference::backward<double, double>(x.data(), dy.data(), dx.data(), 1, 1, 4, o);
  EXPECT_EQ(dx, (std::vector<double>{0.0, 5.0, 0.0, 0.0}));
}

}  // namespace
