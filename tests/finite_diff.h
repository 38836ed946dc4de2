// Central differences for the CPU tests of the float64 reference backward (test_backward_reference,
// test_modulation): the derivative of a loss by one of its parameters, changed in place.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace instnorm_test {

/// Central difference of f around `p` (modified in place and restored), with the step actually
/// taken (exact in float64 by Sterbenz) in the denominator.
template <class F>
double central(double& p, double h, F f) {
  const double p0 = p, hp = p0 + h, hm = p0 - h;
  p = hp;
  const double lp = f();
  p = hm;
  const double lm = f();
  p = p0;
  return (lp - lm) / (hp - hm);
}

/// The largest magnitude of v (0 when empty).
inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::fabs(e));
  return m;
}

}  // namespace instnorm_test
