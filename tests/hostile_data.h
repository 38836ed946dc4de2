#pragma once
// Planes of data that are hard for fp32 moments: outliers far from the rest at any position,
// heavy tails, far-apart clusters, large offsets and constants. Host only: the CPU tests of the
// moments algebra and the device tests of every plan draw from the same kinds.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace instnorm_test {

enum class Hostile {
  kOutlierFirst,     ///< N(0, 1) with one value of +-magnitude as the plane's first element
  kOutlierLast,      ///< ... as its last element
  kOutlierRandom,    ///< ... at a random position
  kOutliersSeveral,  ///< the first element and 1% of the others (at least 3) at +-magnitude
  kStudentT1,        ///< Student-t with 1 degree of freedom (Cauchy), scaled by magnitude
  kStudentT2,        ///< Student-t with 2 degrees of freedom
  kTwoClusters,      ///< half near -magnitude, half near +magnitude (unit spread), interleaved
  kSmallCluster,     ///< 1% near +magnitude, the rest near 0 (first element in the small one)
  kOffset,           ///< N(+-magnitude, 1)
  kConstant,         ///< every value = magnitude
};

struct HostileCase {
  Hostile kind;
  double magnitude;
  std::string name() const {
    static const char* names[] = {"outlier-first", "outlier-last",  "outlier-random",
                                  "outliers",      "student-t1",    "student-t2",
                                  "two-clusters",  "small-cluster", "offset",
                                  "constant"};
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", magnitude);
    return std::string(names[int(kind)]) + "(" + buf + ")";
  }
};

/// `planes` planes of `len` values of one kind; values are clamped to +-limit (the range of the
/// element type the caller converts to: 6e4 for fp16).
inline std::vector<double> hostile_planes(const HostileCase& k, int64_t planes, int64_t len,
                                          uint64_t seed, double limit = 1e30) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  std::chi_squared_distribution<double> chi1(1.0), chi2(2.0);
  const double m = k.magnitude;
  std::vector<double> v(size_t(planes * len));
  for (int64_t p = 0; p < planes; ++p) {
    double* x = v.data() + p * len;
    const double sign = ud(rng) < 0.5 ? -1.0 : 1.0;
    for (int64_t i = 0; i < len; ++i) {
      switch (k.kind) {
        case Hostile::kStudentT1: x[i] = m * nd(rng) / std::sqrt(chi1(rng)); break;
        case Hostile::kStudentT2: x[i] = m * nd(rng) / std::sqrt(chi2(rng) / 2.0); break;
        case Hostile::kTwoClusters: x[i] = (i % 2 ? m : -m) + nd(rng); break;
        case Hostile::kSmallCluster: x[i] = (i % 100 == 0 ? m : 0.0) + nd(rng); break;
        case Hostile::kOffset: x[i] = sign * m + nd(rng); break;
        case Hostile::kConstant: x[i] = m; break;
        default: x[i] = nd(rng); break;
      }
    }
    const auto outlier = [&](int64_t i) { x[i] = (ud(rng) < 0.5 ? -m : m) * (1 + 0.1 * ud(rng)); };
    switch (k.kind) {
      case Hostile::kOutlierFirst: outlier(0); break;
      case Hostile::kOutlierLast: outlier(len - 1); break;
      case Hostile::kOutlierRandom: outlier(int64_t(ud(rng) * double(len)) % len); break;
      case Hostile::kOutliersSeveral: {
        outlier(0);
        const int64_t extra = std::max<int64_t>(3, len / 100);
        for (int64_t e = 0; e < extra && len > 1; ++e) outlier(1 + int64_t(ud(rng) * double(len - 1)) % (len - 1));
        break;
      }
      default: break;
    }
    for (int64_t i = 0; i < len; ++i) x[i] = std::max(-limit, std::min(limit, x[i]));
  }
  return v;
}

/// The kinds every plan must keep within the accuracy bounds. fp32 also gets offsets of 1e4
/// and 1e6 std; 16-bit types keep magnitudes their range holds (fp16: below 6.5e4).
inline std::vector<HostileCase> hostile_cases(bool fp32) {
  std::vector<HostileCase> v;
  for (double m : {1e3, 1e6})
    for (Hostile h : {Hostile::kOutlierFirst, Hostile::kOutlierLast, Hostile::kOutlierRandom,
                      Hostile::kOutliersSeveral})
      v.push_back({h, fp32 ? m : std::min(m, 3e4)});
  v.push_back({Hostile::kStudentT1, 1.0});
  v.push_back({Hostile::kStudentT2, 1.0});
  v.push_back({Hostile::kTwoClusters, 1e4});
  v.push_back({Hostile::kSmallCluster, fp32 ? 1e5 : 3e4});
  if (fp32) {
    v.push_back({Hostile::kOffset, 1e4});
    v.push_back({Hostile::kOffset, 1e6});
  }
  return v;
}

}  // namespace instnorm_test
