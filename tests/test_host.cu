// CPU tests (run in CI): the float64 reference, Chan's merge, the planner and validation.
#include <gtest/gtest.h>

#include <array>

#include <instnorm/moments.cuh>
#include <instnorm/thread/group_walk.cuh>
#include <instnorm/plan.cuh>
#include <instnorm/reference.h>
#include <instnorm/validate.cuh>

#include "device_tables.h"
#include "path_matrix.h"
#include "hostile_data.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace instnorm;

// ---------------------------------------------------------------- reference

// An independent long-double computation: one-pass sums, then normalize.
std::vector<long double> long_double_reference(const std::vector<double>& x, int64_t planes,
                                               int64_t len, long double eps) {
  std::vector<long double> y(x.size());
  for (int64_t p = 0; p < planes; ++p) {
    long double s = 0, s2 = 0;
    for (int64_t i = 0; i < len; ++i) s += x[p * len + i];
    const long double mean = s / len;
    for (int64_t i = 0; i < len; ++i) s2 += (x[p * len + i] - mean) * (x[p * len + i] - mean);
    const long double rstd = 1.0L / std::sqrt(s2 / len + eps);
    for (int64_t i = 0; i < len; ++i) y[p * len + i] = (x[p * len + i] - mean) * rstd;
  }
  return y;
}

TEST(Reference, MatchesLongDoubleOnOffsetData) {
  std::mt19937_64 rng(1);
  for (int64_t len : {1, 2, 7, 49, 1000, 4097}) {
    const int64_t planes = 5;
    std::normal_distribution<double> nd(1e4, 1.0);
    std::vector<double> x(size_t(planes * len));
    for (auto& v : x) v = nd(rng);
    std::vector<double> y(x.size());
    Options opt;
    reference::forward(x.data(), y.data(), 1, planes, len, opt);
    const auto ref = long_double_reference(x, planes, len, opt.eps);
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_NEAR(y[i], double(ref[i]), 1e-9) << "len " << len << " index " << i;
  }
}

TEST(Reference, ConstantPlaneGivesZero) {
  std::vector<float> x(300, 3.25f);
  std::vector<double> y(300, 1.0);
  reference::forward(x.data(), y.data(), 2, 3, 50, Options{});
  for (double v : y) ASSERT_EQ(v, 0.0);
}

TEST(Reference, GroupNormAffineSiluByHand) {
  // n=1, c=4, G=2, spatial=2: groups {ch0,ch1} and {ch2,ch3}.
  const std::vector<float> x = {1, 2, 3, 4, 10, 10, 20, 20};
  const std::vector<float> gamma = {1, 2, 3, 4}, beta = {0, 1, 0, -1};
  Options opt;
  opt.groups = 2;
  opt.gamma = gamma.data();
  opt.beta = beta.data();
  opt.activation = Activation::kSilu;
  opt.eps = 0;
  std::vector<double> y(8);
  std::vector<reference::PlaneStats> st;
  reference::forward(x.data(), y.data(), 1, 4, 2, opt, &st);
  ASSERT_EQ(st.size(), 2u);
  EXPECT_DOUBLE_EQ(st[0].mean, 2.5);
  EXPECT_DOUBLE_EQ(st[0].var, 1.25);
  EXPECT_DOUBLE_EQ(st[1].mean, 15.0);
  EXPECT_DOUBLE_EQ(st[1].var, 25.0);
  auto silu = [](double v) { return v / (1 + std::exp(-v)); };
  const double r0 = 1 / std::sqrt(1.25);
  EXPECT_NEAR(y[0], silu((1 - 2.5) * r0 * 1 + 0), 1e-15);
  EXPECT_NEAR(y[3], silu((4 - 2.5) * r0 * 2 + 1), 1e-15);
  EXPECT_NEAR(y[4], silu((10 - 15.0) / 5 * 3 + 0), 1e-15);
  EXPECT_NEAR(y[7], silu((20 - 15.0) / 5 * 4 - 1), 1e-15);
}

TEST(Reference, HalfAndBfloat16Inputs) {
  std::vector<__half> h = {__float2half_rn(1.f), __float2half_rn(3.f)};
  std::vector<__nv_bfloat16> b = {__float2bfloat16_rn(1.f), __float2bfloat16_rn(3.f)};
  std::vector<double> yh(2), yb(2);
  Options opt;
  opt.eps = 0;
  reference::forward(h.data(), yh.data(), 1, 1, 2, opt);
  reference::forward(b.data(), yb.data(), 1, 1, 2, opt);
  EXPECT_DOUBLE_EQ(yh[0], -1.0);
  EXPECT_DOUBLE_EQ(yh[1], 1.0);
  EXPECT_DOUBLE_EQ(yb[0], -1.0);
  EXPECT_DOUBLE_EQ(yb[1], 1.0);
}

// ---------------------------------------------------------------- moments

Moments moments_of(const std::vector<float>& v, size_t lo, size_t hi, float pivot) {
  return local_moments(int(hi - lo), [&](int i) { return v[lo + size_t(i)]; }, pivot);
}

TEST(Moments, MergeOfAnyPartitionInAnyOrderEqualsWhole) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> v(5000);
  for (auto& x : v) x = 1e4f + nd(rng);
  const float pivot = v[0];
  double sum = 0;
  for (float x : v) sum += double(x) - pivot;
  const double mean = sum / double(v.size());
  double m2 = 0;
  for (float x : v) m2 += (double(x) - pivot - mean) * (double(x) - pivot - mean);
  for (int trial = 0; trial < 50; ++trial) {
    // Random cut points, then merge the parts in a random order.
    std::vector<size_t> cuts = {0, v.size()};
    const int parts = 1 + int(rng() % 40);
    for (int i = 0; i < parts; ++i) cuts.push_back(rng() % v.size());
    std::sort(cuts.begin(), cuts.end());
    std::vector<Moments> pieces;
    for (size_t i = 0; i + 1 < cuts.size(); ++i)
      pieces.push_back(moments_of(v, cuts[i], cuts[i + 1], pivot));
    std::shuffle(pieces.begin(), pieces.end(), rng);
    Moments all;
    for (const auto& p : pieces) all = merge(all, p);
    ASSERT_EQ(all.count, int64_t(v.size()));
    ASSERT_NEAR(all.mean, mean, 1e-5 * 2.0) << "trial " << trial;
    ASSERT_NEAR(all.var, m2 / double(v.size()), 1e-5 * 4.0) << "trial " << trial;
  }
}

TEST(Moments, EmptyPartialsMergeExactly) {
  Moments a{1.5f, 2.25f, 3};
  Moments e;
  const Moments l = merge(e, a), r = merge(a, e);
  EXPECT_EQ(l.mean, a.mean);
  EXPECT_EQ(l.var, a.var);
  EXPECT_EQ(l.count, a.count);
  EXPECT_EQ(r.mean, a.mean);
  EXPECT_EQ(r.var, a.var);
  EXPECT_EQ(r.count, a.count);
  EXPECT_EQ(merge(e, e).count, 0);
}

TEST(Moments, CountsStayExactBeyond2To24) {
  const int64_t big = (int64_t(1) << 40) + 3;
  Moments a{1.f, 0.f, big}, b{1.f, 0.f, big + 1};
  const Moments m = merge(a, b);
  EXPECT_EQ(m.count, 2 * big + 1);
  EXPECT_FLOAT_EQ(m.mean, 1.f);
  EXPECT_FLOAT_EQ(m.var, 0.f);
}

TEST(Moments, MergeFormulaOnTwoSets) {
  // {1,2,3} and {10}: mean 4, m2 = 9+4+1+36 = 50, var 12.5.
  const Moments a{2.f, 2.f / 3.f, 3}, b{10.f, 0.f, 1};
  const Moments m = merge(a, b);
  EXPECT_EQ(m.count, 4);
  EXPECT_FLOAT_EQ(m.mean, 4.f);
  EXPECT_FLOAT_EQ(m.var, 12.5f);
}

TEST(Moments, VarianceClampedAtZeroAndEmptyIsZero) {
  EXPECT_EQ(variance(Moments{0.f, -1e-9f, 4}), 0.f);
  EXPECT_EQ(variance(Moments{}), 0.f);
  EXPECT_FLOAT_EQ(variance(Moments{0.f, 2.f, 4}), 2.f);
  EXPECT_TRUE(std::isnan(variance(Moments{0.f, std::nanf(""), 4})));
}

TEST(Moments, PivotKeepsFp32AccurateAtMean1e4TimesStd) {
  // Naive fp32 sum/sum-of-squares loses everything here; pivoted two-pass does not.
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd(1e4, 1.0);
  std::vector<float> v(4096);
  for (auto& x : v) x = float(nd(rng));
  double s = 0;
  for (float x : v) s += x;
  const double mean = s / v.size();
  double m2 = 0;
  for (float x : v) m2 += (x - mean) * (x - mean);
  const Moments m = moments_of(v, 0, v.size(), v[0]);
  EXPECT_NEAR(double(v[0]) + m.mean + m.mean_lo, mean, 1e-6);
  EXPECT_NEAR(variance(m), m2 / v.size(), 1e-5 * (m2 / v.size()));
}

TEST(Moments, DeviationShiftBoundsTheSumOfSquares) {
  for (int n : {0, 1, 2, 3, 4, 5, 16, 17, 64, 100, 128, 129, 4096, 1 << 20, (1 << 30) + 1,
                std::numeric_limits<int>::max()}) {
    const double h = std::ldexp(1.0, -deviation_shift(n));
    EXPECT_LE(double(n) * h * h, 1.0) << n;                 // n squares scaled stay below one
    if (n > 1) EXPECT_GT(4.0 * double(n) * h * h, 1.0) << n;  // and h is the largest such
  }
}

TEST(Moments, ValuesOf1e18StayFiniteAndAccurate) {
  // Squares of 1e18 are 1e36; a plain fp32 sum of a few hundred of them overflows (3.4e38).
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> ud(-1e18, 1e18);
  std::vector<float> v(1 << 16);
  for (auto& x : v) x = float(ud(rng));
  double s = 0;
  for (float x : v) s += x;
  const double mean = s / v.size();
  double m2 = 0;
  for (float x : v) m2 += (x - mean) * (x - mean);
  const double var = m2 / v.size();
  // Merged from per-thread chunks of 128, as a kernel would.
  Moments all;
  for (size_t lo = 0; lo < v.size(); lo += 128) all = merge(all, moments_of(v, lo, lo + 128, v[0]));
  ASSERT_TRUE(std::isfinite(all.mean) && std::isfinite(all.var));
  EXPECT_NEAR(double(v[0]) + double(all.mean), mean, 1e-5 * std::sqrt(var));
  EXPECT_NEAR(variance(all), var, 1e-5 * var);
  const Moments one = moments_of(v, 0, 4096, 0.f);  // one thread holding 4096 such values
  ASSERT_TRUE(std::isfinite(one.var));
}

TEST(Moments, NanOrInfMakesTheStatisticsNan) {
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    std::vector<float> v(300, 1.f);
    v[123] = bad;
    Moments all;
    for (size_t lo = 0; lo < v.size(); lo += 64)
      all = merge(all, moments_of(v, lo, std::min(v.size(), lo + 64), v[0]));
    EXPECT_TRUE(std::isnan(all.mean) || std::isnan(variance(all))) << bad;
  }
}

// ---------------------------------------------------------------- moments algebra on hostile data

using instnorm_test::Hostile;
using instnorm_test::HostileCase;

/// How the kernels combine a plane's partials, replayed on the CPU with the same functions.
enum class Combine {
  kShares,  ///< threads -> block by shares (block_allreduce_shares), blocks by shares (group_wait)
  kChan,    ///< Chan merges in index order, in runs of 32 (nhwc_finalize, GroupNorm channels)
  kTree,    ///< Chan merges in a butterfly tree (warp_allreduce, the tiled NHWC row-lane tree)
};

/// The sums of SharesCombine over `parts`, added pairwise as the kernels' butterflies do.
Moments combine_by_shares(const std::vector<Moments>& parts, int64_t total) {
  const auto pairwise = [](auto&& term, size_t n) {
    std::vector<ShareSums> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = term(i);
    for (size_t w = 1; w < n; w *= 2)
      for (size_t i = 0; i + w < n; i += 2 * w) {
        v[i] += v[i + w];
      }
    return n ? v[0] : ShareSums{};
  };
  const float a = pairwise([&](size_t i) {
    return ShareSums{SharesCombine(parts[i], total).first(), 0.f};
  }, parts.size()).res;
  const ShareSums rq = pairwise([&](size_t i) { return SharesCombine(parts[i], total).second(a); },
                                parts.size());
  return SharesCombine::result(a, rq, total);
}

/// y of one plane through the kernels' algebra: thread partials of `per_thread` values (two
/// passes, relative to the pivot x[0]), `blocks` slices combined as `how` says, then the
/// epilogue (center_of, rstd, y = (x - center) * rstd - residual * rstd).
std::vector<float> normalize_like_kernels(const std::vector<float>& x, int per_thread, int blocks,
                                          Combine how, float eps) {
  const int64_t n = int64_t(x.size());
  const float pivot = x[0];
  const int64_t slice = (n + blocks - 1) / blocks;
  std::vector<Moments> block_parts;
  for (int b = 0; b < blocks; ++b) {
    const int64_t lo = std::min(n, b * slice), hi = std::min(n, lo + slice);
    std::vector<Moments> threads;
    for (int64_t t = lo; t < hi; t += per_thread)
      threads.push_back(moments_of(x, size_t(t), size_t(std::min(hi, t + per_thread)), pivot));
    Moments m;
    if (how == Combine::kShares) {
      m = combine_by_shares(threads, hi - lo);
    } else if (how == Combine::kChan) {
      // Runs of 32 in index order (as a finalize lane or a GroupNorm channel merge walks
      // its partials), then the runs in a tree (the lanes' butterfly).
      std::vector<Moments> runs;
      for (size_t r = 0; r < threads.size(); r += 32) {
        Moments run;
        for (size_t i = r; i < std::min(threads.size(), r + 32); ++i) run = merge(run, threads[i]);
        runs.push_back(run);
      }
      threads.swap(runs);
    }
    if (how != Combine::kShares) {
      while (threads.size() > 1) {
        std::vector<Moments> next;
        for (size_t i = 0; i < threads.size(); i += 2)
          next.push_back(i + 1 < threads.size() ? merge(threads[i], threads[i + 1]) : threads[i]);
        threads.swap(next);
      }
      m = threads.empty() ? Moments{} : threads[0];
    }
    block_parts.push_back(m);
  }
  Moments all;
  if (how == Combine::kShares) {
    all = combine_by_shares(block_parts, n);
  } else {
    for (const auto& q : block_parts) all = merge(all, q);
  }
  const CenterResidual cr = center_of(pivot, all);
  const float rstd = 1.f / std::sqrt(variance(all) + eps);
  const float shift = std::fma(-cr.residual, rstd, 0.f);
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = std::fma(x[i] - cr.center, rstd, shift);
  return y;
}

/// Largest error of y against the float64 normalize of x in units of the fp32 bound
/// (1e-5 + 1e-6 * |ref|: an output of 500 has an ulp of 3e-5), and the relative norm.
std::pair<double, double> error_of(const std::vector<float>& x, const std::vector<float>& y,
                                   double eps) {
  double s = 0;
  for (float v : x) s += v;
  const double mean = s / double(x.size());
  double m2 = 0;
  for (float v : x) m2 += (v - mean) * (v - mean);
  const double rstd = 1 / std::sqrt(m2 / double(x.size()) + eps);
  double worst = 0, num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = (x[i] - mean) * rstd, err = std::fabs(y[i] - ref);
    worst = std::max(worst, std::isnan(y[i]) ? INFINITY : err / (1e-5 + 1e-6 * std::fabs(ref)));
    num += err * err;
    den += ref * ref;
  }
  return {worst, den > 0 ? std::sqrt(num / den) : std::sqrt(num)};
}

// Every hostile kind, through every way the kernels combine partials: within fp32's bounds
// (1e-5 + 1e-6 |ref| per element, 1e-6 relative norm). With a single-float mean relative to
// the pivot, an outlier of 1e6 std as the first element put 6e-2 std of error into every output.
// The on-chip NHWC kernel's walk over a thread's kVec channels: the group's first channel (its
// pivot and its slot) and the group boundaries, for instance norm and GroupNorm, from any start.
TEST(GroupWalk, FirstChannelOfEveryGroup) {
  for (int cpg : {1, 2, 3, 4, 5, 8, 16, 40}) {
    for (int ch0 = 0; ch0 < 96; ch0 += 3) {
      instnorm::detail::GroupWalk w(ch0, cpg);
      for (int k = 0; k < 16; ++k, w.next()) {
        const int ch = ch0 + k;
        ASSERT_EQ(w.first, ch / cpg * cpg) << "cpg " << cpg << " ch " << ch;
        ASSERT_EQ(w.left, cpg - ch % cpg) << "cpg " << cpg << " ch " << ch;
      }
    }
  }
}

TEST(MomentsAlgebra, HostileDataStaysWithinFp32Bounds) {
  auto cases = instnorm_test::hostile_cases(true);
  for (Hostile h : {Hostile::kOutlierFirst, Hostile::kOutliersSeveral})
    for (double m : {1e4, 1e5}) cases.push_back({h, m});
  for (const auto& k : cases) {
    for (int64_t len : {int64_t(49), int64_t(4096), int64_t(1) << 18}) {
      const std::vector<double> d = instnorm_test::hostile_planes(k, 1, len, 17 + uint64_t(len));
      std::vector<float> x(d.begin(), d.end());
      for (Combine how : {Combine::kShares, Combine::kChan, Combine::kTree}) {
        for (int blocks : {1, 7}) {
          const auto y = normalize_like_kernels(x, 16, blocks, how, 1e-5f);
          const auto e = error_of(x, y, 1e-5);
          SCOPED_TRACE(k.name() + " S=" + std::to_string(len) + " combine=" +
                       std::to_string(int(how)) + " blocks=" + std::to_string(blocks));
          EXPECT_LE(e.first, 1.0);
          EXPECT_LE(e.second, 1e-6);
        }
      }
    }
  }
}

// A constant plane normalizes to exactly 0 (eps > 0, no affine), whatever the constant and
// however the partials combine.
TEST(MomentsAlgebra, ConstantPlanesGiveExactZeros) {
  for (float c : {0.f, 0.1f, -7.77f, 1e4f + 0.3f, 3.14159e-20f, 1.234567e17f}) {
    for (int64_t len : {int64_t(1), int64_t(49), int64_t(5000)}) {
      const std::vector<float> x(size_t(len), c);
      for (Combine how : {Combine::kShares, Combine::kChan, Combine::kTree}) {
        for (int blocks : {1, 3}) {
          const auto y = normalize_like_kernels(x, 13, blocks, how, 1e-5f);
          for (float v : y) ASSERT_EQ(v, 0.f) << c << " S=" << len << " combine=" << int(how);
        }
      }
    }
  }
}

// A thread's centre c need not equal a constant x (the kernels take it as sum * (1 / n)): the
// deviations d = x - c are then all equal, and s1 / n must come back as exactly d so that the
// mean relative to the pivot x is exactly 0.
TEST(MomentsAlgebra, EqualDeviationsGiveAnExactMean) {
  for (float x : {0.1f, -7.77f, 1e4f + 0.3f, 3.3e-7f}) {
    for (int n : {3, 7, 13, 31, 33, 100, 1000}) {
      const float c = std::nextafter(x, 2 * x + 1);
      const float d = x - c;
      const int k = deviation_shift(n);
      const float s1 = float(n) * d, s2 = float(n) * (d * d) * std::ldexp(1.f, -2 * k);
      const Moments m = moments_from_sums(n, c, k, s1, s2, x);
      EXPECT_EQ(m.mean, 0.f) << x << " n=" << n;
      EXPECT_EQ(m.mean_lo, 0.f) << x << " n=" << n;
      EXPECT_EQ(m.var, 0.f) << x << " n=" << n;
    }
  }
}

// The float-float mean: the low part holds what the high part rounds away, so the mean of a
// plane with one huge value beside many small ones is exact to fp32's resolution of the std.
TEST(MomentsAlgebra, MergeKeepsTheLowPartOfTheMean) {
  // {3000} and 65535 values of 0: mean 3000/65536 relative to any pivot.
  Moments big{0.f, 0.f, 65535};
  Moments one{0.f, 0.f, 1};
  one = moments_from_sums(1, 3000.f, 0, 0.f, 0.f, 3000.f);  // its own pivot: mean 0
  big = moments_from_sums(65535, 0.f, deviation_shift(65535), 0.f, 0.f, 3000.f);
  EXPECT_EQ(big.mean, -3000.f);
  const Moments m = merge(one, big);
  const double want = 3000.0 / 65536.0 - 3000.0;
  EXPECT_NEAR(double(m.mean) + double(m.mean_lo), want, 1e-10);
  const Moments r = merge(big, one);  // the roles swap exactly
  EXPECT_EQ(r.mean, m.mean);
  EXPECT_EQ(r.mean_lo, m.mean_lo);
  EXPECT_EQ(r.var, m.var);
  const CenterResidual cr = center_of(3000.f, m);
  EXPECT_NEAR(double(cr.center) + double(cr.residual), 3000.0 / 65536.0, 1e-12);
}

// Shares that do not add up to exactly 1 (here 3 x 1/3) leave no error in the mean: the
// second stage's sum of deviations carries it.
TEST(MomentsAlgebra, SharesCombineCorrectsTheRoundingOfItsShares) {
  std::vector<Moments> parts(3);
  for (auto& p : parts) p = moments_from_sums(1, 1e6f + 0.5f, 0, 0.f, 0.f, 0.f);
  float a = 0.f;
  for (const auto& q : parts) a += SharesCombine(q, 3).first();
  ShareSums rq;
  for (const auto& q : parts) {
    rq += SharesCombine(q, 3).second(a);
  }
  const Moments m = SharesCombine::result(a, rq, 3);
  EXPECT_NEAR(double(m.mean) + double(m.mean_lo), 1e6 + 0.5, 1e-6);
  EXPECT_NEAR(variance(m), 0.0, 1e-9);
}

// ---------------------------------------------------------------- planner

using instnorm_tables::sm89;
using instnorm_tables::sm90;

Problem problem(int64_t n, int64_t c, int64_t s, int elem_bytes = 4, bool aligned = true) {
  Problem p;
  Options opt;
  const uintptr_t base = aligned ? 1 << 20 : (1 << 20) + elem_bytes;
  const void* x = reinterpret_cast<const void*>(base);
  const void* y = reinterpret_cast<const void*>(base + (uintptr_t(1) << 44));
  EXPECT_EQ(validate(x, y, n, c, s, elem_bytes, opt, &p), Invalid::kOk);
  return p;
}

struct PlannerCase {
  const char* arch;
  int64_t n, c, s;
  int elem_bytes;
};

class PlannerThresholds : public ::testing::TestWithParam<PlannerCase> {};

TEST_P(PlannerThresholds, PlanIsValidAndCoversThePlane) {
  const PlannerCase pc = GetParam();
  const DeviceProps d = std::string(pc.arch) == "sm_89" ? sm89() : sm90();
  const Problem prob = problem(pc.n, pc.c, pc.s, pc.elem_bytes);
  Plan plan;
  ASSERT_TRUE(make_plan(prob, d, policy_for(d.cc_major, d.cc_minor), &plan));
  EXPECT_TRUE(plan_is_valid(plan, prob, d));
  EXPECT_GE(plan.slice_len * plan.blocks_per_plane, prob.plane_len);
  const int64_t vecs = (prob.plane_len + plan.vec - 1) / plan.vec;
  const int64_t per_thread = int64_t(max_items(plan.vec));
  // Where the slice fits on chip, it is held there (one DRAM read).
  if (plan.strategy != Strategy::kSplitStream)
    EXPECT_LE(plan.slice_len / plan.vec, int64_t(plan.lanes) * (plan.items + plan.smem_items));
  // Ragged plans (16-byte bodies of unaligned planes) are what the scalar plans leave to
  // whole blocks.
  if (plan.ragged)
    EXPECT_TRUE(plan.strategy == Strategy::kBlock || plan.strategy == Strategy::kSplit ||
                plan.strategy == Strategy::kSplitStream);
  else if (vecs <= 32 * per_thread && prob.planes >= d.sm_count)
    EXPECT_EQ(plan.strategy, plan.vec == 1 ? Strategy::kStaged : Strategy::kSubWarp);
  if (vecs > int64_t(kMaxThreads) * per_thread)
    EXPECT_TRUE(plan.strategy == Strategy::kSplit || plan.strategy == Strategy::kSplitStream);
  if (plan.cooperative) {
    EXPECT_LE(plan.grid, int64_t(resident_blocks_per_sm(d, plan.threads)) * d.sm_count);
  }
}

std::vector<PlannerCase> planner_cases() {
  std::vector<PlannerCase> v;
  const int64_t sizes[] = {1,     2,     3,     31,    32,     33,     49,     196,    255,
                           256,   257,   1023,  1024,  1025,   4095,   4096,   4097,   9973,
                           16383, 16384, 16385, 65536, 65537,  262144, 1048576, 4194304};
  for (const char* arch : {"sm_89", "sm_90"})
    for (int64_t s : sizes)
      for (int eb : {4, 2}) {
        v.push_back({arch, 8, 64, s, eb});
        v.push_back({arch, 1, 3, s, eb});
      }
  v.push_back({"sm_90", 1, 1, int64_t(1) << 31, 2});
  v.push_back({"sm_90", 100000, 1, 49, 4});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Sizes, PlannerThresholds, ::testing::ValuesIn(planner_cases()));

// The highest row at or below the architecture: newer GPUs run sm_90's row, older ones the
// generic row; the table is ordered newest first and ends with a row that takes every device.
TEST(ArchTable, HighestRowAtOrBelowTheArchitecture) {
  EXPECT_STREQ(policy_for(9, 0).name, "sm_90");
  EXPECT_STREQ(policy_for(8, 9).name, "sm_89");
  EXPECT_STREQ(policy_for(8, 6).name, "generic");
  EXPECT_STREQ(policy_for(8, 0).name, "generic");
  EXPECT_STREQ(policy_for(10, 0).name, "sm_90");
  EXPECT_STREQ(policy_for(12, 0).name, "sm_90");
  const int rows = int(sizeof(kArchTable) / sizeof(kArchTable[0]));
  for (int i = 1; i < rows; ++i) EXPECT_GT(kArchTable[i - 1].cc, kArchTable[i].cc) << i;
  EXPECT_EQ(kArchTable[rows - 1].cc, 0);
  for (const ArchPolicy& r : kArchTable) {
    EXPECT_NE(std::string(r.source), "") << r.name;
    EXPECT_EQ(policy_named(r.name), &r);
  }
  EXPECT_EQ(policy_named("sm_75"), nullptr);
}

// The row follows the architecture the kernels were compiled for where that is known: PTX for
// sm_90 JIT-compiled on a newer GPU runs sm_90's row, and sm_89 code on an sm_90 device sm_89's
// (so the host's plan and the kernels' device traits come from one row).
TEST(ArchTable, KeyedOnTheCompiledArchitecture) {
  DeviceProps d = sm90();
  EXPECT_STREQ(policy_for(d).name, "sm_90");
  d.code_arch = 89;
  EXPECT_STREQ(policy_for(d).name, "sm_89");
  d.cc_major = 12;
  d.code_arch = 90;
  EXPECT_STREQ(policy_for(d).name, "sm_90");
  d.code_arch = 0;  // unknown: the device's own
  EXPECT_STREQ(policy_for(d).name, "sm_90");
  static_assert(ArchTraits<89>::nhwc_vector_phase_shift == kPolicySm89.nhwc_vector_phase_shift, "");
  static_assert(ArchTraits<90>::nhwc_vector_phase_shift == kPolicySm90.nhwc_vector_phase_shift, "");
  static_assert(ArchTraits<100>::nhwc_vector_phase_shift == kPolicySm90.nhwc_vector_phase_shift, "");
}

// A row refined by the memory bus (two cards of one capability) applies only where the bus is
// at least that wide, and is skipped where the width is unknown.
TEST(ArchTable, RowsRefinedByMemoryBus) {
  constexpr ArchPolicy wide = [] {
    ArchPolicy p;
    p.name = "wide";
    p.cc = 90;
    p.min_bus_bits = 6144;
    p.source = "test";
    return p;
  }();
  constexpr ArchPolicy table[] = {wide, kPolicySm90, kPolicyGeneric};
  EXPECT_STREQ(table[detail::find_row(table, 90, 6144)].name, "wide");
  EXPECT_STREQ(table[detail::find_row(table, 90, 5120)].name, "sm_90");
  EXPECT_STREQ(table[detail::find_row(table, 90, 0)].name, "sm_90");
  EXPECT_STREQ(table[detail::find_row(table, 80, 6144)].name, "generic");
}

// Every planner takes the row it is given: a forced row's NHWC knobs reach the NHWC planner.
TEST(ArchTable, ForcedRowReachesTheNhwcPlanner) {
  const DeviceProps d = sm90();
  Options opt;
  opt.layout = Layout::kNHWC;
  Problem prob;  // 16 images of 4 MB
  const void* x = reinterpret_cast<const void*>(uintptr_t(1) << 20);
  const void* y = reinterpret_cast<const void*>(uintptr_t(1) << 40);
  ASSERT_EQ(validate(x, y, 16, 64, 16384, 4, opt, &prob), Invalid::kOk);
  PlanOverride tiled;
  tiled.nhwc_on_chip = 0;
  NhwcPlan a, b;
  ASSERT_TRUE(make_nhwc_plan(prob, d, &a, tiled));
  ArchPolicy half = kPolicySm90;
  half.nhwc_l2_percent = 40;
  ASSERT_TRUE(make_nhwc_plan(prob, d, &b, tiled, &half));
  const int64_t image = 16384 * 64 * 4;
  EXPECT_EQ(a.batch_images, nhwc_l2_budget(d, kPolicySm90) / image);
  EXPECT_EQ(b.batch_images, nhwc_l2_budget(d, half) / image);
  EXPECT_LT(b.batch_images, a.batch_images);
  ArchPolicy phases = kPolicySm90;
  phases.phases = 4;
  Plan p;
  ASSERT_TRUE(make_plan(problem(112, 64, 262144), d, phases, &p));
  EXPECT_EQ(p.phases, 4);
}

TEST(Planner, StrategyByPlaneLength) {
  const DeviceProps d = sm90();
  const ArchPolicy& pol = kPolicySm90;
  Plan p;
  ASSERT_TRUE(make_plan(problem(128, 512, 49), d, pol, &p));
  EXPECT_EQ(p.strategy, Strategy::kStaged);
  EXPECT_EQ(p.vec, 1);  // 49 is not a multiple of 4
  // Staged (scalar) planes: the fewest lanes that hold a plane, so 128 planes per block.
  EXPECT_EQ(p.lanes, 2);
  EXPECT_EQ(p.items, 25);
  EXPECT_EQ(p.threads, kStagedThreads);
  // Two stages of one 128-plane unit; 512 units, one per block of a grid that fits at once.
  EXPECT_EQ(p.smem_bytes, 2 * staged_stage_bytes(128, 49, 4));
  EXPECT_EQ(p.smem_bytes, 2 * 25088);
  EXPECT_EQ(p.grid, 512);
  // Twice the planes: the persistent grid is what fits (4 blocks per SM), each walking units.
  ASSERT_TRUE(make_plan(problem(256, 512, 49), d, pol, &p));
  EXPECT_EQ(p.grid, kStagedBlocksPerSm * d.sm_count);
  // A plan whose stages do not fit the block's shared memory is refused.
  Plan bad = p;
  bad.smem_bytes = 2 * staged_stage_bytes(128, 49, 4) - 16;
  EXPECT_FALSE(plan_is_valid(bad, problem(256, 512, 49), d));
  // Forced on planes too long for any shared memory: refused, the stage size saturated (the
  // fuzzer found 2 * stage bytes overflowing int64 for a 2^62-element plane).
  PlanOverride staged;
  staged.strategy = int(Strategy::kStaged);
  EXPECT_FALSE(make_plan(problem(1, 1, int64_t(1) << 40), d, pol, &p, staged));
  EXPECT_EQ(staged_stage_bytes(8, int64_t(1) << 62, 2), int64_t(1) << 40);
  ASSERT_TRUE(make_plan(problem(32, 256, 1024), d, pol, &p));
  EXPECT_EQ(p.strategy, Strategy::kSubWarp);
  EXPECT_EQ(p.vec, 4);
  ASSERT_TRUE(make_plan(problem(8, 256, 16384), d, pol, &p));
  EXPECT_EQ(p.strategy, Strategy::kBlock);
  ASSERT_TRUE(make_plan(problem(112, 64, 262144), d, pol, &p));
  EXPECT_EQ(p.strategy, Strategy::kSplit);
  ASSERT_TRUE(make_plan(problem(1, 1, int64_t(1) << 28), d, pol, &p));
  EXPECT_EQ(p.strategy, Strategy::kSplitStream);
}

// Every named case of the path matrix takes its path on both tuned device tables.
TEST(PathMatrix, PlannerTakesTheNamedPath) {
  using namespace instnorm_paths;
  for (const PathCase& k : kPathCases) {
    for (const DeviceProps& d : {sm90(), sm89()}) {
      const char* want = d.cc_major == 9 ? k.sm90 : k.sm89;
      Problem prob;
      const void* x = reinterpret_cast<const void*>(uintptr_t(1) << 20);
      const void* y = reinterpret_cast<const void*>(uintptr_t(1) << 44);
      ASSERT_EQ(validate(x, y, k.n, k.c, k.s, k.elem_bytes, options_of(k), &prob), Invalid::kOk)
          << k.name;
      std::string got;
      if (prob.nhwc) {  // NHWC with one channel or position plans as NCHW
        NhwcPlan q;
        ASSERT_TRUE(make_nhwc_plan(prob, d, &q)) << k.name;
        got = path_of(q);
      } else {
        Plan p;
        ASSERT_TRUE(make_plan(prob, d, policy_for(d), &p)) << k.name;
        got = path_of(p);
      }
      EXPECT_EQ(got, want) << k.name << " on " << policy_for(d).name;
    }
  }
}

// The backward holds x and dy on chip: its plans keep at most half the vectors per thread of
// the forward's (registers and shared memory alike), so the same planes split across at least
// as many blocks; every plan stays valid for its direction and the forward's are unchanged.
TEST(Planner, BackwardPlansHoldTwoTensors) {
  for (const DeviceProps& d : {sm90(), sm89()}) {
    const ArchPolicy& pol = policy_for(d);
    for (const auto& shape : {std::array<int64_t, 4>{112, 64, 262144, 4}, {16, 64, 65536, 4},
                              {1, 64, 1 << 20, 4}, {8, 256, 16384, 4}, {4, 512, 4096, 4},
                              {32, 256, 1024, 4}, {128, 512, 49, 4}, {8, 512, 4096, 2},
                              {1, 128, 20 * 65536, 2}, {1, 1, int64_t(1) << 28, 4}}) {
      const Problem prob = problem(shape[0], shape[1], shape[2], int(shape[3]));
      Plan f, b;
      ASSERT_TRUE(make_plan(prob, d, pol, &f));
      ASSERT_TRUE(make_plan(prob, d, pol, &b, {}, Direction::kBackward));
      const std::string where = std::to_string(shape[0]) + "x" + std::to_string(shape[1]) + "x" +
                                std::to_string(shape[2]) + " on " + pol.name;
      EXPECT_EQ(f.direction, Direction::kForward);
      EXPECT_EQ(b.direction, Direction::kBackward) << where;
      if (b.strategy != Strategy::kStaged) {
        EXPECT_LE(b.items, max_items_for(b.strategy, b.vec) / 2) << where;
        EXPECT_LE(int64_t(b.items + b.smem_items) * b.threads,
                  std::max<int64_t>(int64_t(f.items + f.smem_items) * f.threads, 32 * 8))
            << where;
      } else {  // twice the lanes per plane, half the planes per unit: the same stage bytes
        EXPECT_LE(b.smem_bytes, f.smem_bytes) << where;
      }
      if (f.strategy == Strategy::kSplit && b.strategy == Strategy::kSplit)
        EXPECT_GE(b.blocks_per_plane, f.blocks_per_plane) << where;
      // A forward plan is not a valid backward plan where it holds more than half the registers.
      Plan f_as_b = f;
      f_as_b.direction = Direction::kBackward;
      if (f.strategy != Strategy::kStaged && f.items > max_items_for(f.strategy, f.vec) / 2)
        EXPECT_FALSE(plan_is_valid(f_as_b, prob, d)) << where;
    }
  }
}

TEST(Planner, SubWarpThresholdIsTheWarpCapacity) {
  const DeviceProps d = sm90();
  Plan p;
  const int64_t cap = 32 * 16 * 4;  // lanes x vectors x floats
  ASSERT_TRUE(make_plan(problem(64, 64, cap), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kSubWarp);
  ASSERT_TRUE(make_plan(problem(64, 64, cap + 4), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kBlock);
}

TEST(Planner, BlockThresholdIsTheBlockCapacity) {
  const DeviceProps d = sm90();
  Plan p;
  const int64_t cap = int64_t(kMaxThreads) * 16 * 4;
  ASSERT_TRUE(make_plan(problem(64, 64, cap), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kBlock);
  ASSERT_TRUE(make_plan(problem(64, 64, cap + 4), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kSplit);
}

TEST(Planner, FewPlanesStillFillEverySm) {
  for (const DeviceProps& d : {sm89(), sm90()}) {
    Plan p;
    ASSERT_TRUE(make_plan(problem(1, 64, 1 << 20), d, policy_for(d.cc_major, d.cc_minor), &p));
    EXPECT_GE(p.grid * 10, d.sm_count * 9) << "1x64x1024x1024 must not run on 64 SMs";
    EXPECT_TRUE(p.cooperative);
  }
}

TEST(Planner, MisalignedPlanesUseScalarsOrRaggedVectors) {
  const DeviceProps d = sm90();
  Plan p;
  ASSERT_TRUE(make_plan(problem(8, 8, 4096, 2), d, kPolicySm90, &p));
  EXPECT_EQ(p.vec, 8);
  EXPECT_FALSE(p.ragged);
  ASSERT_TRUE(make_plan(problem(8, 8, 4100, 2), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kStaged);  // 4100 % 8 != 0; two stages fit
  EXPECT_EQ(p.vec, 1);
  // x and y offset by one element: planes too long to stage keep 16-byte vectors for each
  // slice's body (Plan::ragged), with scalar heads and tails.
  ASSERT_TRUE(make_plan(problem(8, 8, 4096, 4, /*aligned=*/false), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kBlock);
  EXPECT_EQ(p.vec, 4);
  EXPECT_TRUE(p.ragged);
}

// Short staged planes: several per group of lanes, for units of about kStagedUnitBytes, while
// every resident block still gets a unit; the backward's kernel takes one plane per group.
TEST(Planner, StagedUnitsOfShortPlanes) {
  for (const DeviceProps& d : {sm90(), sm89()}) {
    const ArchPolicy& pol = policy_for(d);
    Plan p;
    ASSERT_TRUE(make_plan(problem(20057, 323, 1), d, pol, &p));  // 6.5M one-element planes
    ASSERT_EQ(p.strategy, Strategy::kStaged);
    const int groups = p.threads / p.lanes;
    EXPECT_EQ(p.unit_planes % groups, 0);
    EXPECT_GT(p.unit_planes, groups);
    EXPECT_LE(p.unit_planes * 4, 2 * kStagedUnitBytes);
    EXPECT_GE(detail::ceil_div(int64_t(20057) * 323, p.unit_planes),
              int64_t(p.blocks_per_sm) * d.sm_count);
    // Fewer planes: one per group, so that every SM has units.
    ASSERT_TRUE(make_plan(problem(256, 512, 49), d, pol, &p));
    EXPECT_EQ(p.unit_planes, p.threads / p.lanes);
    // Long staged planes: one per group (the unit is already large).
    ASSERT_TRUE(make_plan(problem(4711, 16, 1173), d, pol, &p));
    ASSERT_EQ(p.strategy, Strategy::kStaged);
    EXPECT_EQ(p.unit_planes, p.threads / p.lanes);
    // The backward: one plane per group, and a plan that says otherwise is refused.
    const Problem tiny = problem(20057, 323, 1);
    ASSERT_TRUE(make_plan(tiny, d, pol, &p, {}, Direction::kBackward));
    ASSERT_EQ(p.strategy, Strategy::kStaged);
    EXPECT_EQ(p.unit_planes, p.threads / p.lanes);
    Plan bad = p;
    bad.unit_planes *= 2;
    bad.smem_bytes *= 2;
    EXPECT_FALSE(plan_is_valid(bad, tiny, d));
    // A unit whose stages do not fit the plan's shared memory is refused.
    ASSERT_TRUE(make_plan(tiny, d, pol, &p));
    bad = p;
    bad.unit_planes *= 2;
    EXPECT_FALSE(plan_is_valid(bad, tiny, d));
  }
}

// The staged kernel's register instance (staged_in_registers): forward staged plans whose lanes
// hold kStagedRegMinItems to kStagedRegItems values of a plane, one map a plane; plans keep
// kStagedLaneItems' lanes (doubling them for the instance measured slower).
TEST(Planner, StagedPlanesInRegisters) {
  for (const DeviceProps& d : {sm90(), sm89()}) {
    const ArchPolicy& pol = policy_for(d);
    Plan p;
    // A forward staged plan of `lanes` lanes of `items` values, and its instance.
    const auto expect_staged = [&](const Problem& prob, int lanes, int items, bool regs) {
      ASSERT_TRUE(make_plan(prob, d, pol, &p));
      ASSERT_EQ(p.strategy, Strategy::kStaged);
      EXPECT_EQ(p.lanes, lanes);
      EXPECT_EQ(p.items, items);
      EXPECT_EQ(detail::staged_in_registers(p, prob), regs);
    };
    const Problem nine = problem(31777361, 1, 9, 2);
    expect_staged(nine, 1, 9, true);                        // 3x3 planes
    expect_staged(problem(36167, 1643, 1), 1, 1, false);    // one-value planes
    expect_staged(problem(53061, 29, 263, 2), 16, 17, false);  // kStagedLaneItems' lanes
    // GroupNorm with gamma (the map changes inside a plane): the shared-memory instance.
    Options gn;
    gn.groups = 32;
    Problem grouped;
    const void* x = reinterpret_cast<const void*>(uintptr_t(1) << 20);
    const void* y = reinterpret_cast<const void*>((uintptr_t(1) << 20) + (uintptr_t(1) << 44));
    gn.gamma = x;  // only its presence matters here
    ASSERT_EQ(validate(x, y, 6000, 64, 5, 4, gn, &grouped), Invalid::kOk);
    EXPECT_TRUE(grouped.channel_runs);
    ASSERT_TRUE(make_plan(grouped, d, pol, &p));
    ASSERT_EQ(p.strategy, Strategy::kStaged);
    EXPECT_EQ(p.items, 10);
    EXPECT_FALSE(detail::staged_in_registers(p, grouped));
    gn.gamma = nullptr;
    ASSERT_EQ(validate(x, y, 6000, 64, 5, 4, gn, &grouped), Invalid::kOk);
    EXPECT_FALSE(grouped.channel_runs);
    ASSERT_TRUE(make_plan(grouped, d, pol, &p));
    EXPECT_TRUE(detail::staged_in_registers(p, grouped));
    // The backward keeps its own staged kernel.
    ASSERT_TRUE(make_plan(nine, d, pol, &p, {}, Direction::kBackward));
    EXPECT_FALSE(detail::staged_in_registers(p, nine));
    // Over lengths and counts: the instance exactly where a lane holds 9-14 values (one lane,
    // since more lanes than one hold over 16 each), and the plan is kStagedLaneItems' lanes.
    int in_registers = 0;
    for (int64_t L : {1, 2, 3, 8, 9, 11, 14, 15, 16, 17, 29, 33, 49, 100, 263, 449}) {
      for (int64_t planes : {int64_t(3000), int64_t(3000000)}) {
        const Problem prob = problem(1, planes, L, 2, false);
        if (!make_plan(prob, d, pol, &p) || p.strategy != Strategy::kStaged) continue;
        EXPECT_EQ(p.lanes, detail::pow2_ceil(std::min<int64_t>(
                               32, (L + kStagedLaneItems - 1) / kStagedLaneItems)))
            << L;
        const bool want = L >= kStagedRegMinItems && L <= kStagedRegItems;
        EXPECT_EQ(detail::staged_in_registers(p, prob), want) << L << " " << planes;
        in_registers += want;
      }
    }
    EXPECT_EQ(in_registers, 6);  // 9, 11 and 14 values, at both plane counts
  }
}

// Ragged plans (vector bodies, scalar heads and tails) only where the kernel can run them:
// forward block and split plans, x and y equally misaligned, no vector across two channels
// with their own parameters, NCHW.
TEST(Planner, RaggedPlansWhereTheKernelCanRunThem) {
  const DeviceProps d = sm90();
  const auto at = [](uintptr_t off) { return reinterpret_cast<const void*>((uintptr_t(1) << 20) + off); };
  const auto plan_of = [&](int64_t n, int64_t c, int64_t s, int eb, uintptr_t xo, uintptr_t yo,
                           const Options& opt, Plan* p, Direction dir = Direction::kForward) {
    Problem prob;
    EXPECT_EQ(validate(at(xo), at((uintptr_t(1) << 40) + yo), n, c, s, eb, opt, &prob), Invalid::kOk);
    EXPECT_TRUE(make_plan(prob, d, kPolicySm90, p, {}, dir)) << n << "x" << c << "x" << s;
    return prob;
  };
  const Options none;
  Plan p;
  // The sweep's rows that staged cannot hold: a block (or split) plan with 16-byte bodies.
  for (auto k : {std::array<int64_t, 4>{2080, 3, 4871, 4}, {219, 44, 11718, 2},
                 {1, 711, 7827, 2}, {1, 1, (int64_t(1) << 22) + 1, 4} /* few planes: split */}) {
    plan_of(k[0], k[1], k[2], int(k[3]), 0, 0, none, &p);
    EXPECT_TRUE(p.ragged) << k[0] << "x" << k[1] << "x" << k[2];
    EXPECT_EQ(p.vec * k[3], 16);
    EXPECT_TRUE(p.strategy == Strategy::kBlock || p.strategy == Strategy::kSplit ||
                p.strategy == Strategy::kSplitStream);
    EXPECT_GE(p.lanes, 32);
  }
  // Few short planes: fewer vectors than scalars, still whole blocks.
  plan_of(2, 3, 999, 4, 0, 0, none, &p);
  EXPECT_TRUE(p.ragged);
  EXPECT_EQ(p.strategy, Strategy::kBlock);
  // Equal misalignment of x and y is enough; different misalignments are not.
  plan_of(2080, 3, 4871, 4, 4, 4, none, &p);
  EXPECT_TRUE(p.ragged);
  const Problem differ = plan_of(2080, 3, 4871, 4, 4, 8, none, &p);
  EXPECT_FALSE(differ.ragged_ok);
  EXPECT_EQ(p.vec, 1);
  // GroupNorm: without parameters a plane of several channels is one run of values; with gamma,
  // a vector could straddle two channels.
  Options gn;
  gn.groups = 1;
  plan_of(2080, 3, 4871, 4, 0, 0, gn, &p);
  EXPECT_TRUE(p.ragged);
  const float g = 1.f;
  gn.gamma = &g;
  plan_of(2080, 3, 4871, 4, 0, 0, gn, &p);
  EXPECT_FALSE(p.ragged);
  EXPECT_EQ(p.vec, 1);
  // Instance norm with parameters: one channel per plane.
  Options affine;
  affine.gamma = &g;
  plan_of(2080, 3, 4871, 4, 0, 0, affine, &p);
  EXPECT_TRUE(p.ragged);
  // The backward and channels-last keep their plans.
  Options nhwc;
  nhwc.layout = Layout::kNHWC;
  Problem prob_nhwc;
  ASSERT_EQ(validate(at(0), at(uintptr_t(1) << 40), 64, 3, 4871, 4, nhwc, &prob_nhwc), Invalid::kOk);
  EXPECT_FALSE(prob_nhwc.ragged_ok);
  plan_of(2080, 3, 4871, 4, 0, 0, none, &p, Direction::kBackward);
  EXPECT_FALSE(p.ragged);
  // A ragged plan the kernel cannot run is refused: sub-warp lanes, aligned planes.
  const Problem prob = plan_of(2080, 3, 4871, 4, 0, 0, none, &p);
  ASSERT_TRUE(p.ragged);
  Plan bad = p;
  bad.strategy = Strategy::kSubWarp;
  EXPECT_FALSE(plan_is_valid(bad, prob, d));
  bad = p;
  bad.lanes = 4;
  EXPECT_FALSE(plan_is_valid(bad, prob, d));
  Plan aligned;
  const Problem prob_aligned = plan_of(2080, 3, 4872, 4, 0, 0, none, &aligned);
  aligned.ragged = true;
  EXPECT_FALSE(plan_is_valid(aligned, prob_aligned, d));
  // Forced vectors on a ragged problem make a ragged plan; forced scalars keep scalars.
  PlanOverride scalars;
  scalars.vec = 1;
  ASSERT_TRUE(make_plan(prob, d, kPolicySm90, &p, scalars));
  EXPECT_FALSE(p.ragged);
}

TEST(Planner, OverridesAreHonouredOrRefused) {
  const DeviceProps d = sm90();
  const Problem prob = problem(16, 64, 65536);
  PlanOverride ov;
  ov.strategy = int(Strategy::kSplit);
  ov.blocks_per_plane = 8;
  Plan p;
  ASSERT_TRUE(make_plan(prob, d, kPolicySm90, &p, ov));
  EXPECT_EQ(p.blocks_per_plane, 8);
  ov.threads = 2048;  // beyond the kernels' limit
  EXPECT_FALSE(make_plan(prob, d, kPolicySm90, &p, ov));
}

TEST(Planner, StartPhasesArePowersOfTwo) {
  const DeviceProps d = sm90();
  const Problem prob = problem(112, 64, 262144);
  Plan p;
  ASSERT_TRUE(make_plan(prob, d, kPolicySm90, &p));
  EXPECT_EQ(p.phases, 2);  // the default, measured (docs/perf-notes.md)
  PlanOverride ov;
  for (int ph : {1, 4, 1 << 30}) {
    ov.phases = ph;
    ASSERT_TRUE(make_plan(prob, d, kPolicySm90, &p, ov)) << ph;
    EXPECT_EQ(p.phases, ph);
  }
  ov.phases = 3;  // the kernels test a group's phase with a mask
  EXPECT_FALSE(make_plan(prob, d, kPolicySm90, &p, ov));
  NhwcPlan np;
  ov.phases = 4;
  ASSERT_TRUE(make_nhwc_plan(problem(16, 64, 65536), d, &np, ov));
  EXPECT_EQ(np.phases, 4);
  np.phases = 6;
  EXPECT_FALSE(nhwc_plan_is_valid(np, problem(16, 64, 65536), d));
  np.phases = 0;
  EXPECT_FALSE(nhwc_plan_is_valid(np, problem(16, 64, 65536), d));
}

TEST(Planner, CooperativePlansFitTheResidentBlocks) {
  DeviceProps d = sm89();
  Plan p;
  ASSERT_TRUE(make_plan(problem(112, 64, 262144), d, kPolicySm89, &p));
  EXPECT_TRUE(p.cooperative);
  EXPECT_EQ(p.blocks_per_sm, resident_blocks_per_sm(d, p.threads, p.smem_bytes));
  EXPECT_LE(p.grid, int64_t(p.blocks_per_sm) * d.sm_count);
  // 1 MB planes: 128 KB of registers and up to 97 KB of shared memory per 4090 block, so 5
  // blocks per plane (8 with registers alone), on 125 of the 128 SMs.
  EXPECT_EQ(p.blocks_per_plane, 5);
  EXPECT_GT(p.smem_items, 0);
  EXPECT_LE(p.smem_bytes, d.smem_per_block_optin);
  EXPECT_GE(p.grid * 20, int64_t(d.sm_count) * 19);
  d.cooperative = false;  // without cooperative launch, a cooperative plan is invalid
  EXPECT_FALSE(plan_is_valid(p, problem(112, 64, 262144), d));
}

TEST(Planner, SplitPlansUseTheChipAndFillTheGpu) {
  const DeviceProps d = sm90();
  Plan p;
  // 1 MB fp32 planes on the H100: two 256-thread blocks per SM, each with 64 KB of registers
  // and 27 x 4 KB of shared memory: 6 blocks per plane, 44 groups on all 264 slots.
  ASSERT_TRUE(make_plan(problem(112, 64, 262144), d, kPolicySm90, &p));
  EXPECT_EQ(p.strategy, Strategy::kSplit);
  EXPECT_EQ(p.threads, 256);
  EXPECT_EQ(p.blocks_per_plane, 6);
  EXPECT_EQ(p.smem_items, 27);
  EXPECT_EQ(p.grid, 264);
  // bf16: half the bytes, half the blocks.
  ASSERT_TRUE(make_plan(problem(112, 64, 262144, 2), d, kPolicySm90, &p));
  EXPECT_EQ(p.blocks_per_plane, 3);
  // Registers only (the override): 16 blocks of 64 KB.
  PlanOverride ov;
  ov.split_smem = 0;
  ASSERT_TRUE(make_plan(problem(112, 64, 262144), d, kPolicySm90, &p, ov));
  EXPECT_EQ(p.smem_items, 0);
  EXPECT_EQ(p.blocks_per_plane, 16);
  // 256 KB planes fit one 512-thread block with shared memory: no exchange at all.
  ASSERT_TRUE(make_plan(problem(16, 64, 65536), d, kPolicySm90, &p));
  EXPECT_EQ(p.threads, 512);
  EXPECT_EQ(p.blocks_per_plane, 1);
  EXPECT_GT(p.smem_items, 0);
  EXPECT_LE(p.smem_bytes, d.smem_per_block_optin);
  EXPECT_FALSE(p.cooperative);
  // Slices always fit what the blocks hold (no silent fall back to re-reading), and whole
  // groups keep at least 95% of the resident blocks busy.
  for (const DeviceProps& dev : {sm89(), sm90()})
    for (int64_t s : {int64_t(262144), int64_t(1) << 20, int64_t(20) * 65536 * 4})
      for (int eb : {4, 2}) {
        ASSERT_TRUE(make_plan(problem(1, 64, s, eb), dev, policy_for(dev.cc_major, dev.cc_minor), &p));
        EXPECT_EQ(p.strategy, Strategy::kSplit) << s;
        EXPECT_LE(p.slice_len / p.vec, int64_t(p.threads) * (p.items + p.smem_items));
        EXPECT_GE(p.grid * 20, int64_t(p.blocks_per_sm) * dev.sm_count * 19) << s << " " << eb;
      }
}

TEST(Planner, ResidentBlocksFollowTheLimits) {
  EXPECT_EQ(resident_blocks_per_sm(sm90(), 256), 2);   // 128 registers x 256 = 32K of 64K
  EXPECT_EQ(resident_blocks_per_sm(sm90(), 512), 1);
  EXPECT_EQ(resident_blocks_per_sm(sm89(), 64), 8);    // registers bind before 24 blocks
  DeviceProps few = sm90();
  few.max_blocks_per_sm = 1;
  EXPECT_EQ(resident_blocks_per_sm(few, 64), 1);
}

// ---------------------------------------------------------------- validation

const void* const kX = reinterpret_cast<const void*>(uintptr_t(1) << 20);
const void* const kY = reinterpret_cast<const void*>(uintptr_t(1) << 40);

Invalid check(int64_t n, int64_t c, int64_t s, Options opt = {}, const void* x = kX,
              const void* y = kY, int eb = 4) {
  Problem p;
  return validate(x, y, n, c, s, eb, opt, &p);
}

TEST(Validate, EmptyIsOkEvenWithNullPointers) {
  EXPECT_EQ(check(0, 3, 4, {}, nullptr, nullptr), Invalid::kEmpty);
  EXPECT_EQ(check(2, 0, 4, {}, nullptr, nullptr), Invalid::kEmpty);
  EXPECT_EQ(check(2, 3, 0, {}, nullptr, nullptr), Invalid::kEmpty);
}

TEST(Validate, NegativeSizes) {
  EXPECT_EQ(check(-1, 3, 4), Invalid::kNegativeSize);
  EXPECT_EQ(check(1, -3, 4), Invalid::kNegativeSize);
  EXPECT_EQ(check(1, 3, -4), Invalid::kNegativeSize);
  EXPECT_EQ(check(0, -3, 4), Invalid::kNegativeSize);
  Options opt;
  opt.groups = -1;
  EXPECT_EQ(check(1, 3, 4, opt), Invalid::kNegativeSize);
}

TEST(Validate, NullPointers) {
  EXPECT_EQ(check(1, 3, 4, {}, nullptr, kY), Invalid::kNullPointer);
  EXPECT_EQ(check(1, 3, 4, {}, kX, nullptr), Invalid::kNullPointer);
}

TEST(Validate, BadEps) {
  for (float eps : {-1e-5f, std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    Options opt;
    opt.eps = eps;
    EXPECT_EQ(check(1, 3, 4, opt), Invalid::kBadEps) << eps;
  }
  Options zero;
  zero.eps = 0.f;
  EXPECT_EQ(check(1, 3, 4, zero), Invalid::kOk);
}

TEST(Validate, SizeOverflow) {
  const int64_t big = int64_t(1) << 32;
  EXPECT_EQ(check(big, big, 1), Invalid::kOverflow);
  EXPECT_EQ(check(1, big, big), Invalid::kOverflow);
  EXPECT_EQ(check(int64_t(1) << 62, 1, 1), Invalid::kOverflow);  // bytes overflow
}

TEST(Validate, GroupsMustDivideChannels) {
  Options opt;
  opt.groups = 3;
  EXPECT_EQ(check(1, 8, 4, opt), Invalid::kBadGroups);
  opt.groups = 4;
  EXPECT_EQ(check(1, 8, 4, opt), Invalid::kOk);
}

TEST(Validate, PartialOverlapRefusedInPlaceAllowed) {
  const auto* base = reinterpret_cast<const char*>(kX);
  EXPECT_EQ(check(1, 3, 4, {}, base, base), Invalid::kOk);
  EXPECT_EQ(check(1, 3, 4, {}, base, base + 4), Invalid::kOverlap);
  EXPECT_EQ(check(1, 3, 4, {}, base + 44, base), Invalid::kOverlap);
  EXPECT_EQ(check(1, 3, 4, {}, base + 48, base), Invalid::kOk);  // adjacent, no overlap
}

TEST(Validate, NhwcVectorsFollowTheChannelCount) {
  Options opt;
  opt.layout = Layout::kNHWC;
  Problem p;
  ASSERT_EQ(validate(kX, kY, 2, 8, 3, 2, opt, &p), Invalid::kOk);
  EXPECT_TRUE(p.nhwc);
  EXPECT_TRUE(p.vector_ok);  // rows of 8 halves: 16 bytes, whatever S is
  ASSERT_EQ(validate(kX, kY, 2, 12, 16, 2, opt, &p), Invalid::kOk);
  EXPECT_FALSE(p.vector_ok);  // 12 % 8 != 0
  opt.layout = static_cast<Layout>(7);
  EXPECT_EQ(check(1, 3, 4, opt), Invalid::kNotSupported);
}

TEST(Validate, ActivationAndParamTypeOutOfRangeAreRefused) {
  for (int a : {-1, 3, 100}) {
    Options opt;
    opt.activation = static_cast<Activation>(a);
    EXPECT_EQ(check(1, 3, 4, opt), Invalid::kBadActivation) << a;
  }
  for (int t : {-1, 2}) {
    Options opt;
    opt.param_type = static_cast<ParamType>(t);
    EXPECT_EQ(check(1, 3, 4, opt), Invalid::kBadParamType) << t;
  }
  Options ok;
  ok.activation = Activation::kSilu;
  ok.param_type = ParamType::kSameAsInput;
  EXPECT_EQ(check(1, 3, 4, ok), Invalid::kOk);
}

// Every reason has its own sentence, which names what it checks.
TEST(Validate, EveryReasonHasItsOwnSentence) {
  const std::pair<Invalid, const char*> reasons[] = {
      {Invalid::kOk, "valid"},           {Invalid::kEmpty, "nothing"},
      {Invalid::kNegativeSize, ">= 0"},  {Invalid::kNullPointer, "null"},
      {Invalid::kBadEps, "eps"},         {Invalid::kOverflow, "overflow"},
      {Invalid::kBadGroups, "groups"},   {Invalid::kOverlap, "overlap"},
      {Invalid::kNotSupported, "layout"}, {Invalid::kBadRunningStats, "running_mean"},
      {Invalid::kBadMomentum, "momentum"}, {Invalid::kBadActivation, "activation"},
      {Invalid::kBadParamType, "param_type"}, {Invalid::kNoSavedStats, "save_mean"},
      {Invalid::kBadGradients, "dgamma"}};
  std::vector<std::string> seen;
  for (const auto& r : reasons) {
    const std::string s = to_string(r.first);
    EXPECT_NE(s.find(r.second), std::string::npos) << s;
    EXPECT_EQ(std::count(seen.begin(), seen.end(), s), 0) << "shared sentence: " << s;
    seen.push_back(s);
  }
  EXPECT_EQ(std::string(to_string(static_cast<Invalid>(99))), "unknown reason");
}

// The typed validate<T> is the check forward<T> runs: the same reason for the same arguments.
TEST(Validate, TypedOverloadMatchesTheCallsChecks) {
  const auto* x = static_cast<const float*>(kX);
  const auto* y = static_cast<const float*>(kY);
  Options opt;
  EXPECT_EQ(validate(x, y, 2, 3, 4, opt), Invalid::kOk);
  EXPECT_EQ(validate(x, x + 1, 2, 3, 4, opt), Invalid::kOverlap);
  EXPECT_EQ(validate<float>(nullptr, y, 2, 3, 4, opt), Invalid::kNullPointer);
  EXPECT_EQ(validate<float>(nullptr, nullptr, 0, 3, 4, opt), Invalid::kEmpty);
  opt.eps = -1.f;
  EXPECT_EQ(validate(x, y, 2, 3, 4, opt), Invalid::kBadEps);
  opt = Options{};
  opt.momentum = 2.f;
  opt.running_mean = opt.running_var = reinterpret_cast<float*>(uintptr_t(1) << 30);
  EXPECT_EQ(validate(x, y, 2, 3, 4, opt), Invalid::kBadMomentum);
}

TEST(NhwcPlan, CoversEveryShapeWithinLimits) {
  for (const DeviceProps& d : {sm90(), sm89()}) {
    for (int64_t c : {1, 3, 4, 8, 32, 64, 320, 1280, 4099}) {
      for (int64_t s : {1, 7, 49, 4096, 262144}) {
        for (int eb : {2, 4}) {
          Options opt;
          opt.layout = Layout::kNHWC;
          Problem prob;
          ASSERT_EQ(validate(kX, kY, 3, c, s, eb, opt, &prob), Invalid::kOk);
          // One channel or one position: the layouts coincide and the NCHW planner serves it.
          ASSERT_EQ(prob.nhwc, c > 1 && s > 1) << c << " " << s;
          if (!prob.nhwc) continue;
          PlanOverride tiled;
          tiled.nhwc_on_chip = 0;
          NhwcPlan p;
          ASSERT_TRUE(make_nhwc_plan(prob, d, &p, tiled)) << c << " " << s;
          EXPECT_FALSE(p.on_chip);
          EXPECT_EQ(p.vec, c % (16 / eb) == 0 ? 16 / eb : 1);
          EXPECT_GE(p.col_chunks * p.cols_per_block * p.vec, c);
          EXPECT_LT((p.col_chunks - 1) * p.cols_per_block * p.vec, c);  // no empty chunk
          EXPECT_GE(p.tiles * p.tile_rows, s);
          EXPECT_LT((p.tiles - 1) * p.tile_rows, s);  // no empty tile
          EXPECT_EQ(p.row_lanes * p.cols_per_block <= kNhwcThreads, true);
          // The planner's own choice: on chip wherever a plan fits, covering C and S exactly.
          ASSERT_TRUE(make_nhwc_plan(prob, d, &p)) << c << " " << s;
          EXPECT_TRUE(nhwc_plan_is_valid(p, prob, d));
          if (p.on_chip) {
            EXPECT_EQ(p.col_chunks * p.cols_per_block * p.vec, c);
            EXPECT_GE(p.blocks_per_unit * p.slice_rows, s);
            EXPECT_LT((p.blocks_per_unit - 1) * p.slice_rows, s) << c << " " << s;
            EXPECT_LE(p.slice_rows, p.row_lanes * (p.items + p.smem_items));
            EXPECT_LE(p.items, nhwc_max_items(p.vec));
            EXPECT_EQ(p.cooperative, p.blocks_per_unit > 1);
            EXPECT_LE(p.grid, int64_t(nhwc_on_chip_per_sm(d, p.smem_bytes, p.vec)) * d.sm_count);
            // Dynamic shared memory: the slice's pivots, then the shared-memory rows.
            EXPECT_EQ(p.smem_bytes, int64_t(p.smem_items) * kNhwcOnChipThreads * 16 +
                                        nhwc_prefix_bytes(p.cols_per_block, p.vec));
          }
        }
      }
    }
  }
}

// The staged NHWC plan: instance norm, rows not 16-byte aligned or one vector wide, 4 MiB or
// more; lanes per plane for about kStagedLaneItems values each, units of whole images of about
// kStagedUnitBytes (one image where an image is larger) keeping at least kNhwcStagedMinThreads
// threads busy, two stages in shared memory, a whole number of 16 bytes where such a unit fits.
TEST(NhwcPlan, StagedUnitsOfWholeImages) {
  struct Case { int64_t n, c, s; int eb; int64_t groups; bool staged; };
  const Case cases[] = {
      {11713171, 3, 6, 2, 0, true},  {682537, 2, 6, 4, 0, true},   {89278, 3, 210, 4, 0, true},
      {66279, 4, 193, 4, 0, true},   {49950, 20, 10, 2, 0, true},  {3067, 133, 235, 2, 0, true},
      {20000, 3, 21, 4, 0, true},    {4000, 8, 100, 2, 0, true},   // one 16-byte vector: staged
      {4000, 16, 100, 2, 0, false},  // two vectors wide: on chip
      {2000, 3, 21, 4, 0, false},    // under 4 MiB
      {3000, 64, 9, 2, 32, false},   // GroupNorm
      {314, 13, 1296, 2, 0, true},   // one image per unit, 16 lanes per plane (32 would need two rounds)
      {1110, 70, 71, 2, 0, true},    // one lane (71 values); 3 images: one round of the blocks
      {1000, 301, 19, 4, 0, true},   // more planes than a block has threads: rounds of them
      {100, 300, 99, 4, 0, false},   // two stages of one image exceed shared memory
  };
  const DeviceProps d = sm90();
  for (const Case& k : cases) {
    Options opt;
    opt.layout = Layout::kNHWC;
    opt.groups = k.groups;
    Problem prob;
    ASSERT_EQ(validate(kX, kY, k.n, k.c, k.s, k.eb, opt, &prob), Invalid::kOk);
    NhwcPlan p;
    ASSERT_TRUE(make_nhwc_plan(prob, d, &p)) << k.n << "x" << k.c << "x" << k.s;
    EXPECT_EQ(p.staged, k.staged) << k.n << "x" << k.c << "x" << k.s;
    if (!p.staged) continue;
    EXPECT_TRUE(nhwc_plan_is_valid(p, prob, d));
    // One lane up to kNhwcStagedOneLaneItems values; beyond, lanes for about kStagedLaneItems
    // values each, halved while an image's planes need more than one round of the block's
    // groups and a lane keeps at most kNhwcStagedMaxLaneItems.
    const int64_t want = k.s <= kNhwcStagedOneLaneItems ? 1 : std::min<int64_t>(32, detail::pow2_ceil((k.s + kStagedLaneItems - 1) / kStagedLaneItems));
    const int64_t lanes = p.lanes;
    EXPECT_LE(lanes, want) << k.n << "x" << k.c << "x" << k.s;
    if (lanes < want) {
      EXPECT_GT(k.c * 2 * lanes, kStagedThreads) << k.n << "x" << k.c << "x" << k.s;
      EXPECT_LE((k.s + lanes - 1) / lanes, kNhwcStagedMaxLaneItems) << k.n << "x" << k.c << "x" << k.s;
    }
    if (lanes > 1 && k.c * lanes > kStagedThreads)
      EXPECT_GT((k.s + lanes / 2 - 1) / (lanes / 2), kNhwcStagedMaxLaneItems);
    EXPECT_GE(std::min<int64_t>(p.unit_images * k.c, kStagedThreads / lanes) * lanes,
              kNhwcStagedMinThreads);
    const int64_t unit = p.unit_images * k.c * k.s * k.eb;
    // About kStagedUnitBytes: not over it unless one image is, and at least half of what the
    // aim allows (the balance of four units per resident block aside).
    const int64_t by_bytes = (kStagedUnitBytes + k.c * k.s * k.eb / 2) / (k.c * k.s * k.eb);
    const int64_t k_min = std::min<int64_t>(
        {k.n, (kStagedThreads / lanes + k.c - 1) / k.c, std::max<int64_t>(1, by_bytes)});
    const int64_t image = k.c * k.s * k.eb;
    int64_t align = 1;
    while (align < 16 && (align * image) % 16 != 0) align *= 2;
    const int64_t aim = std::max<int64_t>(k_min, std::min<int64_t>(
        by_bytes, k.n / (4 * kStagedBlocksPerSm * d.sm_count)));
    // Two to four rounds of units over the resident blocks: no count up to twice as large
    // needs fewer rounds for less work a block (rounds times images).
    const auto rounds = [&](int64_t i) {
      const int64_t res =
          int64_t(staged_blocks_per_sm(d, 2 * staged_unit_bytes(i, prob))) * d.sm_count;
      return res > 0 ? ((k.n + i - 1) / i + res - 1) / res : int64_t(1) << 40;
    };
    const int64_t r = rounds(p.unit_images);
    if (r >= 2 && r <= 4)
      for (int64_t i = p.unit_images + 1; i <= std::min<int64_t>(k.n, 2 * p.unit_images); ++i)
        if (2 * staged_unit_bytes(i, prob) <= d.smem_per_block_optin &&
            (unit % 16 != 0 || (i * image) % 16 == 0))  // 16-byte units stay so
          EXPECT_GE(rounds(i) * i, r * p.unit_images) << k.n << "x" << k.c << "x" << k.s << " " << i;
    if (k.n == 1110) EXPECT_EQ(p.unit_images, 3);  // k2: 555 units over 528 block slots
    // Unless taken for whole rounds of the blocks (above): between half the aim and the aim
    // rounded up to 16 bytes, the fullest last round of planes: no count in that range leaves
    // fewer of a round's groups idle.
    const bool by_rounds =
        r == 1 && p.unit_images > (aim + 1) / 2 && rounds(p.unit_images - 1) > 1;
    EXPECT_GE(2 * p.unit_images, aim) << k.n << "x" << k.c << "x" << k.s;
    if (!by_rounds) EXPECT_LT(p.unit_images, aim + align) << k.n << "x" << k.c << "x" << k.s;
    const auto idle = [&](int64_t i) {  // as a fraction of the slots, times a common factor
      const int64_t g = kStagedThreads / lanes, busy = i * k.c, slots = (busy + g - 1) / g * g;
      return double(slots - busy) / double(slots);
    };
    for (int64_t i = (aim + 1) / 2; i <= p.unit_images && !by_rounds; ++i)
      if (unit % 16 == 0 ? (i * image) % 16 == 0 : true)
        EXPECT_GE(idle(i) + 1e-12, idle(p.unit_images)) << k.n << "x" << k.c << "x" << k.s << " " << i;
    EXPECT_EQ(p.smem_bytes, 2 * ((unit + 15) / 16 * 16));
    EXPECT_LE(p.smem_bytes, d.smem_per_block_optin);
    EXPECT_LE(p.grid, (k.n + p.unit_images - 1) / p.unit_images);
    // 16-byte units wherever a count near the aim makes one.
    if (aim / align * align >= (aim + 1) / 2 && !by_rounds)
      EXPECT_EQ(unit % 16, 0) << k.n << "x" << k.c << "x" << k.s;
    // Forcing the on-chip or the tiled plan still works.
    PlanOverride on_chip, tiled;
    on_chip.nhwc_on_chip = 1;
    tiled.nhwc_on_chip = 0;
    NhwcPlan q;
    if (make_nhwc_plan(prob, d, &q, on_chip)) EXPECT_TRUE(q.on_chip && !q.staged);
    ASSERT_TRUE(make_nhwc_plan(prob, d, &q, tiled));
    EXPECT_TRUE(!q.on_chip && !q.staged);
  }
}

TEST(NhwcPlan, StandardShapesRunOnChip) {
  const DeviceProps d = sm90();
  Options opt;
  opt.layout = Layout::kNHWC;
  Problem prob;
  NhwcPlan p;
  // 64 MB fp32 images are more than the chip holds (~40 MB in 264 blocks): cut into column
  // slices of at least the row's nhwc_min_slice_bytes, each shared by G blocks that fill the GPU.
  ASSERT_EQ(validate(kX, kY, 112, 64, 512 * 512, 4, opt, &prob), Invalid::kOk);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p));
  EXPECT_TRUE(p.on_chip);
  EXPECT_GT(p.col_chunks, 1);
  EXPECT_GE(p.cols_per_block * p.vec * 4, kPolicySm90.nhwc_min_slice_bytes);
  EXPECT_TRUE(p.cooperative);
  EXPECT_GE(p.grid * 10, 264 * 9);  // >= 90% of the block slots busy
  // 100 KB images (128x512x7x7): no exchange at all, one unit per block.
  ASSERT_EQ(validate(kX, kY, 128, 512, 49, 4, opt, &prob), Invalid::kOk);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p));
  EXPECT_TRUE(p.on_chip);
  EXPECT_EQ(p.blocks_per_unit, 1);
  EXPECT_FALSE(p.cooperative);
  // GroupNorm(32) on 320 channels: slices hold whole groups of 10 channels.
  ASSERT_EQ(validate(kX, kY, 2, 320, 64 * 64, 2, [] {
              Options o;
              o.layout = Layout::kNHWC;
              o.groups = 32;
              return o;
            }(), &prob),
            Invalid::kOk);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p));
  EXPECT_TRUE(p.on_chip);
  EXPECT_EQ(p.cols_per_block * p.vec % 10, 0);
  // Without cooperative launch a unit is never split across blocks.
  DeviceProps nc = d;
  nc.cooperative = false;
  ASSERT_EQ(validate(kX, kY, 16, 64, 256 * 256, 4, opt, &prob), Invalid::kOk);
  ASSERT_TRUE(make_nhwc_plan(prob, nc, &p));
  EXPECT_TRUE(!p.on_chip || p.blocks_per_unit == 1);
  // Forcing the slice width and G.
  PlanOverride ov;
  ov.nhwc_cols = 4;
  ov.blocks_per_plane = 100;
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, ov));
  EXPECT_TRUE(p.on_chip);
  EXPECT_EQ(p.cols_per_block, 4);
  EXPECT_EQ(p.blocks_per_unit, 100);
  ov.nhwc_on_chip = 0;
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, ov));
  EXPECT_FALSE(p.on_chip);
  // The tiled launches clamp their grids to the device's limit, carried by the plan (the
  // launch reads no device properties); a plan without it is not valid.
  EXPECT_EQ(p.max_grid_x, d.max_grid_x);
  NhwcPlan unlimited = p;
  unlimited.max_grid_x = 0;
  EXPECT_FALSE(nhwc_plan_is_valid(unlimited, prob, d));
}

// The on-chip kernel's kParams instance (the channels' maps folded in parallel) is taken by
// GroupNorm calls with parameters only: the two instances give the same results, so no device
// test would notice a wrong choice; this one does.
TEST(NhwcPlan, OnChipFoldsParametersForGroupNormOnly) {
  Options opt;
  opt.layout = Layout::kNHWC;
  Problem prob;
  const float param = 1.f;
  ASSERT_EQ(validate(kX, kY, 2, 320, 64 * 64, 2, opt, &prob), Invalid::kOk);
  EXPECT_FALSE(nhwc_on_chip_folds_params(prob, opt));  // instance norm, no parameters
  opt.gamma = &param;
  ASSERT_EQ(validate(kX, kY, 2, 320, 64 * 64, 2, opt, &prob), Invalid::kOk);
  EXPECT_FALSE(nhwc_on_chip_folds_params(prob, opt));  // instance norm, affine
  opt.groups = 32;
  ASSERT_EQ(validate(kX, kY, 2, 320, 64 * 64, 2, opt, &prob), Invalid::kOk);
  EXPECT_TRUE(nhwc_on_chip_folds_params(prob, opt));  // GroupNorm, gamma
  opt.gamma = nullptr;
  ASSERT_EQ(validate(kX, kY, 2, 320, 64 * 64, 2, opt, &prob), Invalid::kOk);
  EXPECT_FALSE(nhwc_on_chip_folds_params(prob, opt));  // GroupNorm, no parameters
  opt.beta = &param;
  EXPECT_TRUE(nhwc_on_chip_folds_params(prob, opt));
  opt.beta = nullptr;
  opt.modulation.shift = &param;  // the scale-shift rows' shift alone
  EXPECT_TRUE(nhwc_on_chip_folds_params(prob, opt));
  opt.modulation.shift = nullptr;
  opt.modulation.scale = &param;
  EXPECT_TRUE(nhwc_on_chip_folds_params(prob, opt));
}

TEST(NhwcPlan, BatchesStayInTheL2Budget) {
  const DeviceProps d = sm90();
  Options opt;
  opt.layout = Layout::kNHWC;
  Problem prob;
  PlanOverride ov;
  ov.nhwc_on_chip = 0;  // the tiled plan's batches
  const auto budget = [&](int64_t bytes) {
    PlanOverride o = ov;
    o.nhwc_l2_budget = bytes;
    return o;
  };
  // 16 MB fp32 images: two per batch under the default budget (0.8 x 50 MB), 3 under 50 MB,
  // and the whole tensor at once under 25 MB (an image is more than half of it).
  ASSERT_EQ(validate(kX, kY, 16, 64, 256 * 256, 4, opt, &prob), Invalid::kOk);
  NhwcPlan p;
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, ov));
  EXPECT_EQ(p.batch_images, 2);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, budget(int64_t(50) << 20)));
  EXPECT_EQ(p.batch_images, 3);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, budget(int64_t(25) << 20)));
  EXPECT_EQ(p.batch_images, 16);
  // 64 MB images never fit: the whole tensor is one batch.
  ASSERT_EQ(validate(kX, kY, 112, 64, 512 * 512, 4, opt, &prob), Invalid::kOk);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, ov));
  EXPECT_EQ(p.batch_images, 112);
  // Small images: many per batch, never more than n.
  ASSERT_EQ(validate(kX, kY, 128, 512, 49, 4, opt, &prob), Invalid::kOk);
  ASSERT_TRUE(make_nhwc_plan(prob, d, &p, ov));
  EXPECT_EQ(p.batch_images, 128);
}

TEST(Reference, NhwcIsTheTransposeOfNchw) {
  const int64_t n = 2, c = 6, s = 10;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(3.f, 2.f);
  std::vector<float> nchw(static_cast<size_t>(n * c * s)), nhwc(nchw.size());
  std::vector<float> gamma(static_cast<size_t>(c)), beta(static_cast<size_t>(c));
  for (auto& v : nchw) v = nd(rng);
  for (auto& v : gamma) v = nd(rng);
  for (auto& v : beta) v = nd(rng);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t p = 0; p < s; ++p) nhwc[size_t((i * s + p) * c + ch)] = nchw[size_t((i * c + ch) * s + p)];
  for (int64_t groups : {0, 2, 1}) {
    Options opt;
    opt.groups = groups;
    opt.gamma = gamma.data();
    opt.beta = beta.data();
    opt.activation = Activation::kSilu;
    std::vector<double> a(nchw.size()), b(nchw.size());
    reference::forward(nchw.data(), a.data(), n, c, s, opt);
    opt.layout = Layout::kNHWC;
    reference::forward(nhwc.data(), b.data(), n, c, s, opt);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t p = 0; p < s; ++p)
          ASSERT_EQ(b[size_t((i * s + p) * c + ch)], a[size_t((i * c + ch) * s + p)]) << groups;
  }
}

TEST(Validate, RunningStatistics) {
  float rm[8], rv[8];
  Options opt;
  opt.running_mean = rm;
  EXPECT_EQ(check(2, 8, 4, opt), Invalid::kBadRunningStats);  // mean without var
  opt.running_mean = nullptr;
  opt.running_var = rv;
  EXPECT_EQ(check(2, 8, 4, opt), Invalid::kBadRunningStats);  // var without mean
  opt.running_mean = rm;
  EXPECT_EQ(check(2, 8, 4, opt), Invalid::kOk);
  EXPECT_EQ(check(2, 8, 1, opt), Invalid::kBadRunningStats);  // unbiased variance of 1 value
  opt.groups = 4;
  EXPECT_EQ(check(2, 8, 4, opt), Invalid::kBadRunningStats);  // GroupNorm has none
  opt.groups = 8;
  EXPECT_EQ(check(2, 8, 4, opt), Invalid::kOk);  // G = c is instance norm
  Options eval;
  eval.use_input_stats = false;
  EXPECT_EQ(check(2, 8, 4, eval), Invalid::kBadRunningStats);  // eval needs running stats
  eval.running_mean = rm;
  eval.running_var = rv;
  EXPECT_EQ(check(2, 8, 1, eval), Invalid::kOk);  // no update, so S = 1 is fine
  EXPECT_FALSE(updates_running_stats(eval));
  EXPECT_TRUE(updates_running_stats(opt));
  EXPECT_FALSE(updates_running_stats(Options{}));
}

TEST(Validate, Momentum) {
  for (float m : {-0.1f, 1.5f, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::infinity()}) {
    Options opt;
    opt.momentum = m;
    EXPECT_EQ(check(1, 3, 4, opt), Invalid::kBadMomentum) << m;
  }
  for (float m : {0.f, 0.1f, 1.f}) {
    Options opt;
    opt.momentum = m;
    EXPECT_EQ(check(1, 3, 4, opt), Invalid::kOk) << m;
  }
}

TEST(Reference, RunningUpdateMatchesPyTorchFormula) {
  // Two instances of one channel, S = 4: means 1 and 3, biased variances 2 and 4.
  const std::vector<reference::PlaneStats> stats = {{1, 2}, {3, 4}};
  double rm = 10, rv = 20;
  reference::update_running(stats, 2, 1, 4, 0.25, &rm, &rv);
  EXPECT_DOUBLE_EQ(rm, 0.75 * 10 + 0.25 * 2);                // batch mean of means: 2
  EXPECT_DOUBLE_EQ(rv, 0.75 * 20 + 0.25 * (3.0 * 4 / 3));    // mean var 3, unbiased x 4/3
}

TEST(Validate, ProblemFolding) {
  Problem p;
  Options opt;
  opt.groups = 4;
  ASSERT_EQ(validate(kX, kY, 2, 8, 16, 2, opt, &p), Invalid::kOk);
  EXPECT_EQ(p.planes, 8);
  EXPECT_EQ(p.channels_per_group, 2);
  EXPECT_EQ(p.plane_len, 32);
  EXPECT_TRUE(p.vector_ok);
  ASSERT_EQ(validate(kX, kY, 2, 8, 12, 2, Options{}, &p), Invalid::kOk);
  EXPECT_FALSE(p.vector_ok);  // 12 % 8 != 0 for 16-bit elements
  EXPECT_EQ(p.planes, 16);
}

}  // namespace
