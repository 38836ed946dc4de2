// Tests of the public calls. Validation tests run everywhere (no CUDA call may happen before
// validation); the GPU tests skip themselves when no device is present.
#include <gtest/gtest.h>

#include "gpu_util.h"
#include "path_matrix.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {
using namespace instnorm_test;

using namespace instnorm;

// ---------------------------------------------------------------- validation (no GPU needed)

// Without a GPU, a call that reached the CUDA runtime would fail with a driver or device
// error, not cudaErrorInvalidValue/cudaSuccess: these prove validation comes first.
float* fake_ptr() { return reinterpret_cast<float*>(uintptr_t(1) << 24); }
float* fake_ptr2() { return reinterpret_cast<float*>(uintptr_t(1) << 40); }

TEST(ApiValidation, EmptyProblemsSucceedWithNullPointers) {
  EXPECT_EQ(forward<float>(nullptr, nullptr, 0, 3, 5), cudaSuccess);
  EXPECT_EQ(forward<__half>(nullptr, nullptr, 2, 0, 5), cudaSuccess);
  EXPECT_EQ(forward<__nv_bfloat16>(nullptr, nullptr, 2, 3, 0), cudaSuccess);
}

TEST(ApiValidation, InvalidArgumentsAreRefused) {
  float* x = fake_ptr();
  float* y = fake_ptr2();
  EXPECT_EQ(forward<float>(nullptr, y, 1, 1, 8), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(x, nullptr, 1, 1, 8), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(x, y, -1, 1, 8), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(x, y, 1, 1, 8, -1.f), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(x, y, 1, 1, 8, std::nanf("")), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(x, y, int64_t(1) << 40, int64_t(1) << 40, 8), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(x, x + 1, 1, 1, 8), cudaErrorInvalidValue);  // partial overlap
  Options opt;
  opt.groups = 3;
  EXPECT_EQ(forward<float>(x, y, 1, 4, 8, opt), cudaErrorInvalidValue);
  Options act;
  act.activation = static_cast<Activation>(3);  // out of range: refused, not run as none
  EXPECT_EQ(forward<float>(x, y, 1, 4, 8, act), cudaErrorInvalidValue);
  Options param;
  param.param_type = static_cast<ParamType>(-1);
  EXPECT_EQ(forward<float>(x, y, 1, 4, 8, param), cudaErrorInvalidValue);
}

TEST(ApiValidation, WorkspaceCallsValidateToo) {
  size_t bytes = 1;
  EXPECT_EQ(workspace_size<float>(1, 1, 8, Options{}, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(workspace_size<float>(0, 1, 8, Options{}, &bytes), cudaSuccess);
  EXPECT_EQ(bytes, 0u);
  EXPECT_EQ(workspace_size<float>(-1, 1, 8, Options{}, &bytes), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(nullptr, fake_ptr2(), 1, 1, 8, Options{}, nullptr, 0, nullptr),
            cudaErrorInvalidValue);
}

// ---------------------------------------------------------------- GPU: sizes x strategies

class GpuSizes : public ::testing::TestWithParam<int64_t> {};

// n*c per plane length: many planes for short planes, few for long ones (keeps each case a
// few million elements so the float64 reference stays quick).
std::vector<int64_t> plane_counts(int64_t s) {
  std::vector<int64_t> v;
  for (int64_t nc : {int64_t(1), int64_t(3), int64_t(67), int64_t(1000), int64_t(100000)})
    if (nc == 1 || nc * s <= (int64_t(1) << 23)) v.push_back(nc);
  return v;
}

template <class T>
void sweep_size(int64_t s) {
  for (int64_t nc : plane_counts(s)) {
    const int64_t n = nc % 2 == 0 ? 2 : 1, c = nc / n;
    run_and_check<T>(n, c, s, 0.0, PlanOverride{});
    if (::testing::Test::HasFatalFailure()) return;
  }
  // |mean| = 1e4 * std meets the same bounds.
  run_and_check<T>(1, 3, s, std::is_same<T, float>::value ? 1e4 : 100.0, PlanOverride{});
  // Force the other strategies where the plane allows them.
  const int64_t full = 16 / int64_t(sizeof(T));
  const int64_t vec = s % full == 0 ? full : 1;  // what the planner picks for aligned buffers
  const int64_t vecs = (s + vec - 1) / vec;
  if (vecs <= int64_t(kMaxThreads) * max_items(int(vec))) {
    PlanOverride ov;
    ov.strategy = int(Strategy::kBlock);
    run_and_check<T>(1, 5, s, 0.0, ov);
  }
  // Staged through shared memory (the planner's choice for scalar planes), also for aligned
  // planes: 1..32 lanes per plane, several units per block.
  if (s * int64_t(sizeof(T)) <= (int64_t(4) << 10)) {
    PlanOverride ov;
    ov.strategy = int(Strategy::kStaged);
    const int64_t planes = std::max<int64_t>(6, std::min<int64_t>(2000, (int64_t(1) << 23) / s));
    run_and_check<T>(2, planes / 2, s, 0.0, ov);
    run_and_check<T>(1, 3, s, 1e3, ov);
    ov.items = 1;  // the most lanes per plane
    run_and_check<T>(1, planes - 1, s, 0.0, ov);
  }
  if (s >= 64) {
    PlanOverride ov;
    ov.strategy = int(Strategy::kSplit);
    ov.blocks_per_plane = 3;
    run_and_check<T>(2, 3, s, 0.0, ov);
    run_and_check<T>(1, 3, s, 1e3, ov);
    // Many planes, so that groups walk several rounds and reuse both buffers of exchange slots.
    const int64_t planes = std::max<int64_t>(6, std::min<int64_t>(600, (int64_t(1) << 23) / s));
    run_and_check<T>(2, planes / 2, s, 0.0, ov);
    // Start phases: all groups at once, and one chain (group g waits for group g - 1).
    ov.phases = 1;
    run_and_check<T>(1, planes - 1, s, 0.0, ov);
    ov.phases = 1 << 30;
    run_and_check<T>(1, planes - 1, s, 0.0, ov);
    ov.phases = 0;
    ov.strategy = int(Strategy::kSplitStream);
    ov.items = 1;
    ov.threads = 64;
    run_and_check<T>(1, 3, s, 0.0, ov);
  }
}

TEST_P(GpuSizes, Fp32) {
  REQUIRE_GPU();
  sweep_size<float>(GetParam());
}
TEST_P(GpuSizes, Fp16) {
  REQUIRE_GPU();
  sweep_size<__half>(GetParam());
}
TEST_P(GpuSizes, Bf16) {
  REQUIRE_GPU();
  sweep_size<__nv_bfloat16>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(S, GpuSizes,
                         ::testing::Values(1, 2, 3, 31, 32, 33, 49, 196, 255, 256, 257, 1023,
                                           1024, 1025, 4095, 4096, 4097, 9973, 16383, 16384,
                                           16385, 65536, 65537, 262144, 1048576, 4194304),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return std::to_string(info.param);  // S/GpuSizes.Fp32/4097
                         });

// ---------------------------------------------------------------- GPU: specific properties

TEST(Gpu, ManyTinyPlanes) {
  REQUIRE_GPU();
  run_and_check<float>(1000, 100, 7, 0.0, PlanOverride{});
  run_and_check<__half>(100000, 1, 49, 0.0, PlanOverride{});
  // Enough planes for staged units of several planes per group of lanes (Plan::unit_planes).
  for (const PlansRun& r : {run_and_check<float>(2000, 1000, 1, 0.0, PlanOverride{}),
                            run_and_check<__nv_bfloat16>(4000, 500, 2, 0.0, PlanOverride{}),
                            run_and_check<__half>(4000, 500, 3, 3.0, PlanOverride{})}) {
    EXPECT_EQ(r.plan.strategy, Strategy::kStaged);
    EXPECT_GT(r.plan.unit_planes, r.plan.threads / r.plan.lanes);
  }
}

// The staged kernel's register instance (staged_in_registers): planes of 9-14 values, a lane's
// values read once into registers; offsets of 1e3 std, activations; every element against the
// float64 reference and a bit-identical rerun (run_and_check); parameters in
// GpuOptions.GroupNormAffineSilu, modulations in ModulationDevice.
TEST(GpuStaged, PlanesInRegisters) {
  REQUIRE_GPU();
  struct Case {
    int64_t n, c, s;
    double offset;
    Activation act;
  };
  int ran = 0;
  for (const Case& k : {Case{600, 100, 9, 0.0, Activation::kRelu},
                        Case{3, 20000, 11, 1e3, Activation::kNone},
                        Case{40, 1000, 14, 0.0, Activation::kSilu},
                        Case{7, 3001, 10, 1e3, Activation::kNone}}) {
    Options opt;
    opt.activation = k.act;
    const auto check = [&](auto tag) {
      using T = decltype(tag);
      const PlansRun r = run_and_check<T>(k.n, k.c, k.s, k.offset, PlanOverride{}, opt);
      Problem prob;  // the pointers matter only to alignment, which the instance ignores
      const T* x = reinterpret_cast<const T*>(uintptr_t(1) << 20);
      ASSERT_EQ(validate(x, x, k.n, k.c, k.s, int(sizeof(T)), opt, &prob), Invalid::kOk);
      EXPECT_TRUE(detail::staged_in_registers(r.plan, prob))
          << type_name<T>() << " " << k.n << "x" << k.c << "x" << k.s << " lanes "
          << r.plan.lanes << " items " << r.plan.items;
      ++ran;
    };
    check(float{});
    check(__half{});
    check(__nv_bfloat16{});
    if (::testing::Test::HasFailure()) return;
  }
  EXPECT_EQ(ran, 12);
}

template <class T>
void constant_plane_is_zero(int64_t s) {
  const int64_t total = 3 * s;
  std::vector<T> hx(size_t(total), to_t<T>(7.5f));
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
  CUDA_OK(forward(dx.ptr, dy.ptr, 1, 3, s));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> hy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < total; ++i)
    ASSERT_EQ(reference::to_double(hy[size_t(i)]), 0.0) << type_name<T>() << " S=" << s << " i=" << i;
}

TEST(Gpu, ConstantPlaneGivesExactZero) {
  REQUIRE_GPU();
  for (int64_t s : {1, 49, 4096, 262144, 1048576}) {
    constant_plane_is_zero<float>(s);
    constant_plane_is_zero<__half>(s);
    constant_plane_is_zero<__nv_bfloat16>(s);
  }
}

TEST(Gpu, InvalidArgumentsWriteNothing) {
  REQUIRE_GPU();
  DeviceBuffer<float> d(64);
  CUDA_OK(cudaMemset(d.ptr, 0x5a, 64 * 4));
  EXPECT_EQ(forward<float>(d.ptr, d.ptr + 1, 1, 1, 32), cudaErrorInvalidValue);
  EXPECT_EQ(forward<float>(d.ptr, d.ptr + 32, 1, 1, 32, -1.f), cudaErrorInvalidValue);
  Options opt;
  opt.groups = 3;
  EXPECT_EQ(forward<float>(d.ptr, d.ptr + 32, 1, 2, 16, opt), cudaErrorInvalidValue);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<unsigned char> h(64 * 4);
  CUDA_OK(cudaMemcpy(h.data(), d.ptr, 64 * 4, cudaMemcpyDeviceToHost));
  for (unsigned char b : h) ASSERT_EQ(b, 0x5a);
}

TEST(Gpu, CallerWorkspaceMatchesSimpleCall) {
  REQUIRE_GPU();
  const int64_t n = 1, c = 8, s = 1 << 20, total = n * c * s;
  size_t bytes = 0;
  CUDA_OK(workspace_size<float>(n, c, s, Options{}, &bytes));
  EXPECT_GT(bytes, 0u) << "a few huge planes need the cross-block workspace";
  const auto hx = random_planes<float>(c, s, 0.0, 11);
  DeviceBuffer<float> dx(static_cast<size_t>(total)), a(static_cast<size_t>(total)), b(static_cast<size_t>(total));
  DeviceBuffer<unsigned char> ws(bytes);
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * 4, cudaMemcpyHostToDevice));
  EXPECT_EQ(forward(dx.ptr, a.ptr, n, c, s, Options{}, ws.ptr, bytes - 1, nullptr),
            cudaErrorInvalidValue);
  CUDA_OK(forward(dx.ptr, a.ptr, n, c, s, Options{}, ws.ptr, bytes, nullptr));
  CUDA_OK(forward(dx.ptr, b.ptr, n, c, s));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> ha(static_cast<size_t>(total)), hb(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(ha.data(), a.ptr, total * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(hb.data(), b.ptr, total * 4, cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(ha.data(), hb.data(), total * 4), 0);
}

template <class T, class P>
void options_case(int64_t n, int64_t c, int64_t s, int64_t groups, Activation act, bool affine,
                  bool save) {
  const int64_t G = groups ? groups : c;
  const int64_t total = n * c * s, planes = n * G;
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<P> gamma(static_cast<size_t>(c)), beta(static_cast<size_t>(c));
  for (auto& g : gamma) g = detail::from_float<P>(1.f + 0.5f * nd(rng));
  for (auto& b : beta) b = detail::from_float<P>(nd(rng));
  DeviceBuffer<P> dg(static_cast<size_t>(c)), db(static_cast<size_t>(c));
  DeviceBuffer<float> dm(static_cast<size_t>(planes)), dr(static_cast<size_t>(planes));
  CUDA_OK(cudaMemcpy(dg.ptr, gamma.data(), c * sizeof(P), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db.ptr, beta.data(), c * sizeof(P), cudaMemcpyHostToDevice));
  Options opt;
  opt.groups = groups;
  opt.activation = act;
  if (affine) {
    opt.gamma = dg.ptr;
    opt.beta = db.ptr;
    opt.param_type = std::is_same<P, float>::value ? ParamType::kFloat : ParamType::kSameAsInput;
  }
  if (save) {
    opt.save_mean = dm.ptr;
    opt.save_rstd = dr.ptr;
  }
  const auto hx = random_planes<T>(planes, total / planes, 0.0, 19);
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
  CUDA_OK(forward(dx.ptr, dy.ptr, n, c, s, opt));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> hy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  Options host_opt = opt;
  if (affine) {
    host_opt.gamma = gamma.data();
    host_opt.beta = beta.data();
  }
  std::vector<double> ref(static_cast<size_t>(total));
  std::vector<reference::PlaneStats> stats;
  reference::forward<T, P>(hx.data(), ref.data(), n, c, s, host_opt, &stats);
  // SiLU uses the fast exponential: allow 2 ulp for 16-bit types, 1e-5 relative for fp32.
  const std::string where = std::string(type_name<T>()) + " G=" + std::to_string(G) +
                            " S=" + std::to_string(s) + " act=" + std::to_string(int(act));
  for (int64_t i = 0; i < total; ++i) {
    const double got = reference::to_double(hy[size_t(i)]), want = ref[size_t(i)];
    const double tol = std::is_same<T, float>::value ? 2e-5 * std::max(1.0, std::fabs(want))
                                                     : 2 * ulp_of<T>(want) + 0x1p-20;
    ASSERT_NEAR(got, want, tol) << where << " index " << i;
  }
  if (save) {
    std::vector<float> hm(static_cast<size_t>(planes)), hr(static_cast<size_t>(planes));
    CUDA_OK(cudaMemcpy(hm.data(), dm.ptr, planes * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hr.data(), dr.ptr, planes * 4, cudaMemcpyDeviceToHost));
    for (int64_t p = 0; p < planes; ++p) {
      ASSERT_NEAR(hm[size_t(p)], stats[size_t(p)].mean, 1e-5) << where << " plane " << p;
      const double rstd = 1 / std::sqrt(stats[size_t(p)].var + 1e-5);
      ASSERT_NEAR(hr[size_t(p)], rstd, 1e-5 * rstd) << where << " plane " << p;
    }
  }
}

TEST(GpuOptions, AffineSaveStatsActivations) {
  REQUIRE_GPU();
  // 16383: odd planes on the ragged block and split plans (16-byte bodies, scalar head and tail).
  for (int64_t s : {49, 1024, 16383, 16384, 262144}) {
    options_case<float, float>(2, 8, s, 0, Activation::kNone, true, true);
    options_case<float, float>(2, 8, s, 0, Activation::kRelu, true, false);
    options_case<__half, float>(2, 8, s, 0, Activation::kSilu, true, true);
    options_case<__nv_bfloat16, __nv_bfloat16>(2, 8, s, 0, Activation::kNone, true, true);
  }
}

TEST(GpuOptions, GroupNormAffineSilu) {
  REQUIRE_GPU();
  options_case<__half, __half>(2, 320, 64 * 64, 32, Activation::kSilu, true, true);
  options_case<__nv_bfloat16, float>(2, 64, 256, 32, Activation::kSilu, true, true);
  options_case<float, float>(2, 64, 49, 8, Activation::kNone, true, true);
  options_case<float, float>(1, 16, 4096, 1, Activation::kRelu, true, true);  // G = 1
  // Odd groups of several channels with gamma: scalar plans (a vector could straddle two
  // channels); without gamma, a ragged plan (Accuracy.HostileDataEveryStrategyAndType).
  options_case<__half, float>(2, 16, 1001, 4, Activation::kSilu, true, true);
  // Staged units of several tiny planes (or groups) per group of lanes, with parameters.
  options_case<float, float>(2000, 1000, 1, 0, Activation::kSilu, true, true);
  // The staged register instance (9-14 values a lane) with gamma and beta; and GroupNorm of one
  // channel a group (no map change inside a plane) on it too.
  options_case<__half, float>(600, 100, 9, 0, Activation::kSilu, true, true);
  options_case<__nv_bfloat16, __nv_bfloat16>(300, 64, 13, 64, Activation::kRelu, true, true);
  options_case<__half, float>(60000, 64, 3, 32, Activation::kSilu, true, true);
}

}  // namespace

namespace {
using namespace instnorm_test;

// Running statistics: the training forward updates them as PyTorch does (checked against the
// float64 reference and its update formula), eval mode normalizes with them and leaves them
// untouched; both give the same bits when repeated from the same state.
template <class T>
void running_case(int64_t n, int64_t c, int64_t s, bool affine, Activation act, bool eval,
                  bool caller_workspace) {
  const int64_t total = n * c * s;
  const auto hx = random_planes<T>(n * c, s, 0.0, 29);
  std::vector<float> rm0(static_cast<size_t>(c)), rv0(static_cast<size_t>(c)),
      gamma(static_cast<size_t>(c)), beta(static_cast<size_t>(c));
  for (int64_t ch = 0; ch < c; ++ch) {
    rm0[size_t(ch)] = 0.1f * float(ch) - 0.2f;
    rv0[size_t(ch)] = 1.f + 0.05f * float(ch);
    gamma[size_t(ch)] = 1.f + 0.1f * float(ch % 3);
    beta[size_t(ch)] = 0.25f * float(ch % 4) - 0.5f;
  }
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  DeviceBuffer<float> drm(static_cast<size_t>(c)), drv(static_cast<size_t>(c)),
      dg(static_cast<size_t>(c)), db(static_cast<size_t>(c));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dg.ptr, gamma.data(), c * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db.ptr, beta.data(), c * 4, cudaMemcpyHostToDevice));
  Options opt;
  opt.running_mean = drm.ptr;
  opt.running_var = drv.ptr;
  opt.momentum = 0.3f;
  opt.use_input_stats = !eval;
  opt.activation = act;
  if (affine) {
    opt.gamma = dg.ptr;
    opt.beta = db.ptr;
  }
  std::vector<T> hy[2];
  std::vector<float> hrm[2], hrv[2];
  for (int rep = 0; rep < 2; ++rep) {
    CUDA_OK(cudaMemcpy(drm.ptr, rm0.data(), c * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(drv.ptr, rv0.data(), c * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
    if (caller_workspace) {
      size_t bytes = 0;
      CUDA_OK(workspace_size<T>(n, c, s, opt, &bytes));
      if (!eval) EXPECT_GE(bytes, 2 * size_t(n * c) * sizeof(float));
      DeviceBuffer<unsigned char> ws(bytes);
      if (bytes > 0)
        EXPECT_EQ(forward(dx.ptr, dy.ptr, n, c, s, opt, ws.ptr, bytes - 1, nullptr),
                  cudaErrorInvalidValue);
      CUDA_OK(forward(dx.ptr, dy.ptr, n, c, s, opt, ws.ptr, bytes, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
    } else {
      CUDA_OK(forward(dx.ptr, dy.ptr, n, c, s, opt));
      CUDA_OK(cudaDeviceSynchronize());
    }
    hy[rep].resize(static_cast<size_t>(total));
    hrm[rep].resize(static_cast<size_t>(c));
    hrv[rep].resize(static_cast<size_t>(c));
    CUDA_OK(cudaMemcpy(hy[rep].data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hrm[rep].data(), drm.ptr, c * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hrv[rep].data(), drv.ptr, c * 4, cudaMemcpyDeviceToHost));
  }
  const std::string where = std::string(type_name<T>()) + (eval ? " eval" : " train") +
                            " n=" + std::to_string(n) + " c=" + std::to_string(c) +
                            " S=" + std::to_string(s);
  EXPECT_EQ(std::memcmp(hy[0].data(), hy[1].data(), total * sizeof(T)), 0) << where;
  EXPECT_EQ(hrm[0], hrm[1]) << where;
  EXPECT_EQ(hrv[0], hrv[1]) << where;
  Options host_opt = opt;
  host_opt.running_mean = rm0.data();
  host_opt.running_var = rv0.data();
  host_opt.gamma = affine ? gamma.data() : nullptr;
  host_opt.beta = affine ? beta.data() : nullptr;
  std::vector<double> ref(static_cast<size_t>(total));
  std::vector<reference::PlaneStats> stats;
  reference::forward<T, float>(hx.data(), ref.data(), n, c, s, host_opt, &stats);
  for (int64_t i = 0; i < total; ++i) {
    const double got = reference::to_double(hy[0][size_t(i)]), want = ref[size_t(i)];
    const double tol = std::is_same<T, float>::value ? 2e-5 * std::max(1.0, std::fabs(want))
                                                     : 2 * ulp_of<T>(want) + 0x1p-20;
    ASSERT_NEAR(got, want, tol) << where << " index " << i;
  }
  if (eval) {
    EXPECT_EQ(hrm[0], rm0) << where << ": eval mode changed running_mean";
    EXPECT_EQ(hrv[0], rv0) << where << ": eval mode changed running_var";
    return;
  }
  std::vector<double> erm(rm0.begin(), rm0.end()), erv(rv0.begin(), rv0.end());
  reference::update_running(stats, n, c, s, opt.momentum, erm.data(), erv.data());
  for (int64_t ch = 0; ch < c; ++ch) {
    EXPECT_NEAR(hrm[0][size_t(ch)], erm[size_t(ch)], 1e-6 + 1e-5 * std::fabs(erm[size_t(ch)]))
        << where << " channel " << ch;
    EXPECT_NEAR(hrv[0][size_t(ch)], erv[size_t(ch)], 1e-5 * erv[size_t(ch)])
        << where << " channel " << ch;
  }
}

TEST(GpuOptions, RunningStatisticsTrainingUpdate) {
  REQUIRE_GPU();
  for (int64_t s : {int64_t(2), int64_t(49), int64_t(4096), int64_t(65536), int64_t(1) << 20}) {
    running_case<float>(3, 5, s, true, Activation::kNone, false, false);
    running_case<__half>(3, 5, s, false, Activation::kNone, false, s == 4096);
    running_case<__nv_bfloat16>(3, 5, s, true, Activation::kRelu, false, s >= 65536);
  }
  running_case<float>(1, 64, 4096, true, Activation::kSilu, false, true);  // n = 1
}

TEST(GpuOptions, RunningStatisticsEvalMode) {
  REQUIRE_GPU();
  for (int64_t s : {int64_t(1), int64_t(49), int64_t(1000), int64_t(4096), int64_t(65537),
                    int64_t(1) << 20}) {
    running_case<float>(2, 6, s, true, Activation::kSilu, true, false);
    running_case<__half>(2, 6, s, false, Activation::kNone, true, true);
    running_case<__nv_bfloat16>(2, 6, s, true, Activation::kRelu, true, false);
  }
}

TEST(ApiValidation, RunningStatisticsArgumentsAreRefused) {
  float* x = reinterpret_cast<float*>(uintptr_t(1) << 24);
  float* y = reinterpret_cast<float*>(uintptr_t(1) << 40);
  Options opt;
  opt.momentum = -0.1f;
  EXPECT_EQ(forward<float>(x, y, 1, 2, 8, opt), cudaErrorInvalidValue);
  opt.momentum = 0.1f;
  opt.use_input_stats = false;  // eval without running statistics
  EXPECT_EQ(forward<float>(x, y, 1, 2, 8, opt), cudaErrorInvalidValue);
  size_t bytes = 0;
  EXPECT_EQ(workspace_size<float>(1, 2, 8, opt, &bytes), cudaErrorInvalidValue);
}

}  // namespace

namespace {
using namespace instnorm_test;

// Channels-last: every feature against the float64 reference in NHWC. mode 0: input
// statistics (saved too), 1: plus the running-statistics update, 2: eval with running stats.
// A plan forced by `ov` must be the one that ran; `ran` (if not null) receives it.
template <class T>
void nhwc_case(int64_t n, int64_t c, int64_t s, int64_t groups, bool affine, Activation act,
               int mode, double offset = 0.0, const PlanOverride& ov = {},
               NhwcPlan* ran = nullptr) {
  const int64_t total = n * c * s, G = groups ? groups : c, planes = n * G;
  std::mt19937_64 rng(c * 131 + s);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> chan_mean(static_cast<size_t>(n * c));
  for (auto& m : chan_mean) m = offset + nd(rng);
  std::vector<T> hx(static_cast<size_t>(total));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < s; ++p)
      for (int64_t ch = 0; ch < c; ++ch)
        hx[size_t((i * s + p) * c + ch)] = to_t<T>(float(chan_mean[size_t(i * c + ch)] + nd(rng)));
  std::vector<float> gamma(static_cast<size_t>(c)), beta(static_cast<size_t>(c)),
      rm0(static_cast<size_t>(c)), rv0(static_cast<size_t>(c));
  for (int64_t ch = 0; ch < c; ++ch) {
    gamma[size_t(ch)] = 1.f + 0.1f * float(ch % 5);
    beta[size_t(ch)] = 0.2f * float(ch % 3) - 0.2f;
    rm0[size_t(ch)] = 0.05f * float(ch % 7);
    rv0[size_t(ch)] = 1.f + 0.1f * float(ch % 4);
  }
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  DeviceBuffer<float> dg(static_cast<size_t>(c)), db(static_cast<size_t>(c)),
      drm(static_cast<size_t>(c)), drv(static_cast<size_t>(c)), dm(static_cast<size_t>(planes)),
      dr(static_cast<size_t>(planes));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dg.ptr, gamma.data(), c * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db.ptr, beta.data(), c * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(drm.ptr, rm0.data(), c * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(drv.ptr, rv0.data(), c * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
  Options opt;
  opt.layout = Layout::kNHWC;
  opt.groups = groups;
  opt.activation = act;
  opt.save_mean = dm.ptr;
  opt.save_rstd = dr.ptr;
  if (affine) {
    opt.gamma = dg.ptr;
    opt.beta = db.ptr;
  }
  if (mode > 0) {
    opt.running_mean = drm.ptr;
    opt.running_var = drv.ptr;
    opt.use_input_stats = mode == 1;
  }
  NhwcPlan plan;
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr, nullptr,
                                &plan));
  CUDA_OK(cudaDeviceSynchronize());
  if (ran) *ran = plan;
  std::vector<T> hy(static_cast<size_t>(total)), hy2(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  Options host = opt;
  host.gamma = affine ? gamma.data() : nullptr;
  host.beta = affine ? beta.data() : nullptr;
  host.running_mean = mode > 0 ? rm0.data() : nullptr;
  host.running_var = mode > 0 ? rv0.data() : nullptr;
  std::vector<double> ref(static_cast<size_t>(total));
  std::vector<reference::PlaneStats> stats;
  reference::forward<T, float>(hx.data(), ref.data(), n, c, s, host, &stats);
  const std::string where = std::string(type_name<T>()) + " NHWC n=" + std::to_string(n) +
                            " c=" + std::to_string(c) + " S=" + std::to_string(s) +
                            " G=" + std::to_string(G) + " mode=" + std::to_string(mode);
  if (opt.use_input_stats) {  // eval mode always runs the tiled plan's normalize
    if (ov.nhwc_on_chip >= 0) EXPECT_EQ(plan.on_chip, ov.nhwc_on_chip == 1) << where;
    if (plan.on_chip && ov.blocks_per_plane > 0)
      EXPECT_EQ(plan.blocks_per_unit, ov.blocks_per_plane) << where;
    if (plan.on_chip && ov.nhwc_cols > 0) EXPECT_EQ(plan.cols_per_block, ov.nhwc_cols) << where;
  }
  for (int64_t i = 0; i < total; ++i) {
    const double got = reference::to_double(hy[size_t(i)]), want = ref[size_t(i)];
    const double tol = std::is_same<T, float>::value ? 2e-5 * std::max(1.0, std::fabs(want))
                                                     : 2 * ulp_of<T>(want) + 0x1p-20;
    ASSERT_NEAR(got, want, tol) << where << " index " << i;
  }
  std::vector<float> hm(static_cast<size_t>(planes)), hr(static_cast<size_t>(planes));
  CUDA_OK(cudaMemcpy(hm.data(), dm.ptr, planes * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(hr.data(), dr.ptr, planes * 4, cudaMemcpyDeviceToHost));
  for (int64_t p = 0; p < planes; ++p) {
    const double rstd = 1 / std::sqrt(stats[size_t(p)].var + 1e-5);
    ASSERT_NEAR(hm[size_t(p)], stats[size_t(p)].mean, 1e-5 * std::max(1.0, std::fabs(offset))) << where;
    ASSERT_NEAR(hr[size_t(p)], rstd, 1e-5 * rstd) << where << " plane " << p;
  }
  if (mode == 1) {
    std::vector<double> erm(rm0.begin(), rm0.end()), erv(rv0.begin(), rv0.end());
    reference::update_running(stats, n, c, s, opt.momentum, erm.data(), erv.data());
    std::vector<float> hrm(static_cast<size_t>(c)), hrv(static_cast<size_t>(c));
    CUDA_OK(cudaMemcpy(hrm.data(), drm.ptr, c * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hrv.data(), drv.ptr, c * 4, cudaMemcpyDeviceToHost));
    for (int64_t ch = 0; ch < c; ++ch) {
      ASSERT_NEAR(hrm[size_t(ch)], erm[size_t(ch)], 1e-5) << where;
      ASSERT_NEAR(hrv[size_t(ch)], erv[size_t(ch)], 1e-5 * erv[size_t(ch)]) << where;
    }
  }
  if (mode != 1) {  // bit-identical rerun (the running update would move the state)
    CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemcpy(hy2.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(hy.data(), hy2.data(), total * sizeof(T)), 0) << where;
  }
}

TEST(GpuNhwc, ChannelCountsAndPlaneLengths) {
  REQUIRE_GPU();
  for (int64_t c : {1, 3, 4, 5, 8, 32, 33, 64, 320, 1280}) {
    for (int64_t s : {1, 7, 49, 1000, 4096}) {
      if (c * s > (int64_t(1) << 21)) continue;
      nhwc_case<float>(2, c, s, 0, c % 2 == 0, Activation::kNone, 0);
      nhwc_case<__half>(2, c, s, 0, true, Activation::kNone, 0);
      nhwc_case<__nv_bfloat16>(1, c, s, 0, false, Activation::kRelu, 0);
    }
  }
  nhwc_case<float>(1, 8, 262144, 0, true, Activation::kNone, 0);  // many tiles per image
  nhwc_case<__half>(3, 64, 65536, 0, false, Activation::kNone, 0);  // batches of images
}

// Channels-last rows that are not 16-byte aligned, tensors of 4 MiB or more, small images:
// the staged plan (units of whole images through shared memory, lanes per plane), with and
// without 16-byte aligned units, every type, affine and activations, the running update, a
// large mean; eval mode runs the tiled normalize.
TEST(GpuNhwc, StagedSmallImages) {
  REQUIRE_GPU();
  NhwcPlan ran;
  for (int mode : {0, 1, 2}) {
    nhwc_case<float>(20000, 3, 21, 0, true, Activation::kSilu, mode, 0.0, {}, &ran);
    EXPECT_EQ(ran.staged, mode != 2) << "fp32 20000x3x21 mode " << mode;
  }
  nhwc_case<float>(20000, 3, 21, 0, false, Activation::kNone, 0, 1e4, {}, &ran);
  EXPECT_TRUE(ran.staged);
  // One lane per plane, more planes per unit than the block's lanes: rounds of them, and a
  // last unit of fewer images (4002 = 1000 units of 4 and one of 2).
  nhwc_case<__half>(4002, 70, 9, 0, true, Activation::kRelu, 0, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);
  EXPECT_EQ(ran.lanes, 1);
  EXPECT_GT(ran.unit_images * 70, kStagedThreads);
  EXPECT_NE(4002 % ran.unit_images, 0);
  // More channels than a block has threads: one image's 301 planes in two rounds.
  nhwc_case<float>(1000, 301, 19, 0, true, Activation::kNone, 0, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);
  EXPECT_EQ(ran.lanes, 1);
  EXPECT_EQ(ran.unit_images, 1);
  nhwc_case<__nv_bfloat16>(70, 133, 235, 0, false, Activation::kNone, 0, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);  // a unit of one image: 62510 bytes, not 16-byte aligned
  EXPECT_EQ(ran.unit_images, 1);
  EXPECT_EQ(ran.lanes, 1);  // 133 planes of 235 rows: one lane each, one round
  // Long planes: 16 lanes per plane, 13 planes in one round of the block's 16 groups; the
  // running update, and a large mean.
  nhwc_case<__half>(130, 13, 1296, 0, true, Activation::kSilu, 1, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);
  EXPECT_EQ(ran.lanes, 16);
  nhwc_case<__half>(130, 13, 1296, 0, false, Activation::kNone, 0, 1e4, {}, &ran);
  EXPECT_TRUE(ran.staged);
  // Several rounds of 32-lane groups over a unit (4 images of 3 planes, 8 groups), and a last
  // unit of fewer images (8450 = 2112 units of 4 and one of 2).
  nhwc_case<__nv_bfloat16>(8450, 3, 522, 0, true, Activation::kNone, 0, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);
  EXPECT_EQ(ran.lanes, 32);
  EXPECT_GT(ran.unit_images * 3, kStagedThreads / 32);
  EXPECT_NE(8450 % ran.unit_images, 0);
  // Rows of one 16-byte vector: staged too.
  nhwc_case<float>(2000, 4, 193, 0, true, Activation::kNone, 0, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);
  nhwc_case<__half>(4000, 8, 100, 0, false, Activation::kSilu, 0, 0.0, {}, &ran);
  EXPECT_TRUE(ran.staged);
  // Below 4 MiB the on-chip plan keeps them (one launch).
  nhwc_case<float>(2000, 3, 21, 0, true, Activation::kNone, 0, 0.0, {}, &ran);
  EXPECT_FALSE(ran.staged);
}

PlanOverride nhwc_plan(int on_chip, int cols = 0, int64_t g = 0) {
  PlanOverride ov;
  ov.nhwc_on_chip = on_chip;
  ov.nhwc_cols = cols;
  ov.blocks_per_plane = g;
  return ov;
}

// The on-chip plan with forced slice widths and G: uneven rows per block, blocks with no rows
// (G * slice_rows well beyond S), rows in shared memory, the two-hop exchange, GroupNorm groups
// inside narrow slices, running statistics; and the tiled plan kept for when nothing fits.
TEST(GpuNhwc, OnChipSlicesAndExchange) {
  REQUIRE_GPU();
  nhwc_case<float>(2, 64, 65536, 0, true, Activation::kNone, 0, 0.0, nhwc_plan(1, 4, 30));
  nhwc_case<float>(2, 64, 65536, 0, false, Activation::kRelu, 0, 0.0, nhwc_plan(1, 16, 130));
  nhwc_case<float>(1, 16, 30000, 0, false, Activation::kNone, 0, 1e4, nhwc_plan(1, 2, 8));
  nhwc_case<float>(1, 16, 3000, 4, true, Activation::kNone, 0, 1e4, nhwc_plan(1, 1, 3));
  NhwcPlan planner;
  nhwc_case<__half>(2, 320, 16384, 32, true, Activation::kSilu, 0, 0.0, {}, &planner);
  EXPECT_TRUE(planner.on_chip && planner.blocks_per_unit > 1)
      << "the planner's plan for 2x320x128x128 GroupNorm: on chip with G > 1, got "
      << (planner.on_chip ? "on chip, G=" + std::to_string(planner.blocks_per_unit) : "tiled");
  nhwc_case<__half>(2, 320, 16384, 32, true, Activation::kSilu, 0, 0.0, nhwc_plan(1, 20, 50));
  nhwc_case<__nv_bfloat16>(2, 64, 20000, 0, true, Activation::kNone, 0, 0.0, nhwc_plan(1, 8, 25));
  nhwc_case<__nv_bfloat16>(1, 8, 300000, 1, false, Activation::kNone, 0, 0.0, nhwc_plan(1));
  nhwc_case<float>(2, 33, 20000, 0, true, Activation::kNone, 0, 0.0, nhwc_plan(1, 11, 60));
  nhwc_case<float>(2, 32, 65536, 0, true, Activation::kNone, 1, 0.0, nhwc_plan(1, 4, 30));
  PlanOverride chain = nhwc_plan(1, 4, 100);  // 2 groups, 3 rounds, started as one chain
  chain.phases = 1 << 30;
  nhwc_case<float>(3, 32, 20000, 0, false, Activation::kNone, 0, 0.0, chain);
  chain.phases = 1;
  nhwc_case<__half>(3, 64, 20000, 0, false, Activation::kNone, 0, 0.0, chain);
  nhwc_case<float>(2, 64, 4096, 0, true, Activation::kSilu, 0, 0.0, nhwc_plan(0));
  nhwc_case<__half>(2, 320, 1024, 32, true, Activation::kSilu, 0, 0.0, nhwc_plan(0));
  // Slices of 160 column vectors: one row lane per column, hence one row-lane group (the
  // epilogue's coefficients then use the spare entries nhwc_partial_entries adds), and more
  // channels than threads (640 and 1280) in the per-channel loops; GroupNorm of 40 channels.
  nhwc_case<float>(2, 640, 600, 0, true, Activation::kNone, 0, 1e4, nhwc_plan(1, 160, 30));
  nhwc_case<__half>(2, 1280, 400, 32, true, Activation::kSilu, 0, 0.0, nhwc_plan(1, 160, 20));
}

TEST(GpuNhwc, OffsetMeanStaysAccurate) {
  REQUIRE_GPU();
  nhwc_case<float>(2, 16, 4096, 0, false, Activation::kNone, 0, 1e4);
  nhwc_case<float>(2, 16, 4096, 4, false, Activation::kNone, 0, 1e4);
}

TEST(GpuNhwc, GroupNormAffineSiluAndRunningStatistics) {
  REQUIRE_GPU();
  nhwc_case<__half>(2, 320, 256, 32, true, Activation::kSilu, 0);
  nhwc_case<__nv_bfloat16>(2, 64, 1024, 32, true, Activation::kSilu, 0);
  nhwc_case<float>(2, 30, 99, 3, true, Activation::kRelu, 0);  // odd channels per group
  nhwc_case<float>(2, 64, 49, 1, false, Activation::kNone, 0);  // G = 1
  for (int mode : {1, 2}) {
    nhwc_case<float>(3, 32, 1000, 0, true, Activation::kNone, mode);
    nhwc_case<__half>(2, 64, 4096, 0, true, Activation::kSilu, mode);
    nhwc_case<__nv_bfloat16>(2, 5, 49, 0, false, Activation::kNone, mode);
  }
}


// The launch runs the plan the planner makes for this GPU, for every case of the path matrix
// that fits in 512 MB; on a 132-SM sm_90 card (H100, H200) that is the path the matrix names.
TEST(PathMatrix, LaunchRunsThePlannersPath) {
  REQUIRE_GPU();
  using namespace instnorm_paths;
  DeviceProps d;
  CUDA_OK(detail::current_device_props(&d));
  const bool named = d.cc_major == 9 && d.cc_minor == 0 && d.sm_count == 132;
  int ran = 0;
  for (const PathCase& k : kPathCases) {
    const int64_t total = k.n * k.c * k.s;
    if (total * k.elem_bytes > (int64_t(512) << 20)) continue;
    DeviceBuffer<float> x{size_t(total)}, y{size_t(total)};  // fp32 storage: 16-bit cases use half
    ASSERT_NE(x.ptr, nullptr);
    ASSERT_NE(y.ptr, nullptr);
    CUDA_OK(cudaMemset(x.ptr, 0, size_t(total) * 4));
    const Options opt = options_of(k);
    Plan used;
    NhwcPlan used_nhwc;
    if (k.elem_bytes == 4)
      CUDA_OK(detail::forward_tuned(x.ptr, y.ptr, k.n, k.c, k.s, opt, PlanOverride{}, nullptr,
                                    nullptr, &used, &used_nhwc));
    else
      CUDA_OK(detail::forward_tuned(reinterpret_cast<const __half*>(x.ptr),
                                    reinterpret_cast<__half*>(y.ptr), k.n, k.c, k.s, opt,
                                    PlanOverride{}, nullptr, nullptr, &used, &used_nhwc));
    CUDA_OK(cudaDeviceSynchronize());
    Problem prob;
    ASSERT_EQ(validate(x.ptr, y.ptr, k.n, k.c, k.s, k.elem_bytes, opt, &prob), Invalid::kOk);
    std::string planned, got;
    if (prob.nhwc) {  // NHWC with one channel or position plans as NCHW
      NhwcPlan q;
      ASSERT_TRUE(make_nhwc_plan(prob, d, &q)) << k.name;
      planned = path_of(q);
      got = path_of(used_nhwc);
      EXPECT_EQ(used_nhwc.blocks_per_unit, q.blocks_per_unit) << k.name;
      EXPECT_EQ(used_nhwc.cols_per_block, q.cols_per_block) << k.name;
    } else {
      Plan p;
      ASSERT_TRUE(make_plan(prob, d, policy_for(d), &p)) << k.name;
      planned = path_of(p);
      got = path_of(used);
      EXPECT_EQ(used.blocks_per_plane, p.blocks_per_plane) << k.name;
      EXPECT_EQ(used.threads, p.threads) << k.name;
    }
    EXPECT_EQ(got, planned) << k.name;
    if (named) EXPECT_EQ(got, k.sm90) << k.name;
    ++ran;
  }
  EXPECT_GE(ran, 10);
}

}  // namespace
