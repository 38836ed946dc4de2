// Helpers shared by the GPU test files: device buffers, random planes, comparison with the
// float64 reference, and the run-twice-and-check routine. GPU tests skip without a device.
#pragma once
#include <gtest/gtest.h>

#include <instnorm/instnorm.cuh>
#include <instnorm/reference.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace instnorm_test {

using namespace instnorm;

inline bool has_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define REQUIRE_GPU() \
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device"

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// ---------------------------------------------------------------- GPU helpers

template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    if (cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

template <class T>
T to_t(float v) {
  return detail::from_float<T>(v);
}

/// One unit in the last place of T at the magnitude of v.
template <class T>
double ulp_of(double v) {
  const int mant = std::is_same<T, __half>::value ? 10 : std::is_same<T, float>::value ? 23 : 7;
  const int min_exp = std::is_same<T, __half>::value ? -14 : -126;
  int e = 0;
  std::frexp(std::fabs(v), &e);  // |v| in [2^(e-1), 2^e)
  return std::ldexp(1.0, std::max(e - 1, min_exp) - mant);
}

template <class T>
const char* type_name() {
  return std::is_same<T, float>::value ? "fp32" : std::is_same<T, __half>::value ? "fp16" : "bf16";
}

/// Fills planes with N(mean_p, std) data, mean_p random up to offset * std.
template <class T>
std::vector<T> random_planes(int64_t planes, int64_t len, double offset, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<T> h(size_t(planes * len));
  std::uniform_real_distribution<double> md(-1.0, 1.0);
  for (int64_t p = 0; p < planes; ++p) {
    const double mean = offset == 0 ? md(rng) : offset * (md(rng) > 0 ? 1 : -1);
    std::normal_distribution<double> nd(mean, 1.0);
    for (int64_t i = 0; i < len; ++i) h[size_t(p * len + i)] = to_t<T>(float(nd(rng)));
  }
  return h;
}

struct CheckResult {
  double rel = 0, max_abs = 0;
  std::string first_bad;
};

/// Compares y with the float64 reference: fp32 element by element within 1e-5 absolute plus
/// 1e-6 relative (an output of 500 std, an outlier's, has an fp32 ulp of 3e-5) and by relative
/// norm; 16-bit types element by element within one ulp of T at the reference's magnitude,
/// plus 2^-20: fp32 math has an absolute error of ~1e-7 (outputs are in units of the std),
/// which exceeds the ulp of T only for outputs within ~1e-3 of zero.
template <class T>
CheckResult compare(const std::vector<T>& y, const std::vector<double>& ref, int64_t len) {
  CheckResult r;
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double got = reference::to_double(y[i]);
    const double err = std::fabs(got - ref[i]);
    num += err * err;
    den += ref[i] * ref[i];
    r.max_abs = std::max(r.max_abs, std::isnan(got) ? INFINITY : err);
    const bool bad = std::is_same<T, float>::value ? !(err <= 1e-5 + 1e-6 * std::fabs(ref[i]))
                                                   : !(err <= ulp_of<T>(ref[i]) + 0x1p-20);
    if (bad && r.first_bad.empty())
      r.first_bad = "plane " + std::to_string(int64_t(i) / len) + " index " +
                    std::to_string(int64_t(i) % len) + " expected " + std::to_string(ref[i]) +
                    " got " + std::to_string(got);
  }
  r.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return r;
}

/// The plans a checked call ran (NCHW or NHWC, per opt.layout).
struct PlansRun {
  Plan plan;
  NhwcPlan nhwc;
};

/// check_input's body (gtest's ASSERTs need a void function).
template <class T>
void check_input_into(const std::vector<T>& hx, int64_t n, int64_t c, int64_t s,
                      const PlanOverride& ov, const Options& opt, PlansRun* run) {
  const int64_t groups = opt.groups ? opt.groups : c;
  const int64_t len = (c / groups) * s;
  const size_t total = size_t(n * c * s);
  DeviceBuffer<T> dx(total), dy(total);
  ASSERT_NE(dx.ptr, nullptr);
  ASSERT_NE(dy.ptr, nullptr);
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));  // NaN in every type
  Plan& plan = run->plan;
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr, &plan,
                                &run->nhwc));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> hy(total), hy2(total);
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<double> ref(total);
  reference::forward(hx.data(), ref.data(), n, c, s, opt);
  const CheckResult r = compare(hy, ref, len);
  const std::string where = std::string(type_name<T>()) + " n=" + std::to_string(n) +
                            " c=" + std::to_string(c) + " S=" + std::to_string(s) +
                            " plan=" + to_string(plan.strategy) + (plan.ragged ? "+ragged/" : "/") +
                            std::to_string(plan.threads) + "x" + std::to_string(plan.items) +
                            "v" + std::to_string(plan.vec) + " G=" +
                            std::to_string(plan.blocks_per_plane);
  EXPECT_TRUE(r.first_bad.empty()) << where << ": " << r.first_bad;
  if (std::is_same<T, float>::value) EXPECT_LE(r.rel, 1e-6) << where;
  // Bit-identical rerun.
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(hy2.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(hy.data(), hy2.data(), total * sizeof(T)), 0) << where << ": rerun differs";
}

/// Runs forward (optionally with a forced plan), checks every element against the reference,
/// reruns and checks the bits are identical. Returns the plan that ran (a failed launch fails
/// the test and returns default plans).
template <class T>
PlansRun check_input(const std::vector<T>& hx, int64_t n, int64_t c, int64_t s,
                     const PlanOverride& ov, const Options& opt = Options{}) {
  PlansRun run;
  check_input_into(hx, n, c, s, ov, opt, &run);
  return run;
}

/// check_input on random planes (N(mean_p, 1), see random_planes); returns the plans that ran.
template <class T>
PlansRun run_and_check(int64_t n, int64_t c, int64_t s, double offset, const PlanOverride& ov,
                       const Options& opt = Options{}, uint64_t seed = 42) {
  const int64_t groups = opt.groups ? opt.groups : c;
  return check_input<T>(random_planes<T>(n * groups, (c / groups) * s, offset, seed), n, c, s,
                        ov, opt);
}

}  // namespace instnorm_test
