// Tests of the public calls. Validation tests run everywhere (no CUDA call may happen before
// validation); the GPU tests skip themselves when no device is present.
#include <gtest/gtest.h>

#include <instnorm/instnorm.cuh>
#include <instnorm/reference.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <future>
#include <thread>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace instnorm;

bool has_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define REQUIRE_GPU() \
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device"

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

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

/// Compares y with the float64 reference: fp32 by relative norm and max abs error, 16-bit
/// types element by element within one ulp of T at the reference's magnitude, plus 2^-20: fp32
/// math has an absolute error of ~1e-7 (outputs are in units of the std), which exceeds the
/// ulp of T only for outputs within ~1e-3 of zero.
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
    const bool bad = std::is_same<T, float>::value ? !(err <= 1e-5)
                                                   : !(err <= ulp_of<T>(ref[i]) + 0x1p-20);
    if (bad && r.first_bad.empty())
      r.first_bad = "plane " + std::to_string(int64_t(i) / len) + " index " +
                    std::to_string(int64_t(i) % len) + " expected " + std::to_string(ref[i]) +
                    " got " + std::to_string(got);
  }
  r.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return r;
}

/// Runs forward (optionally with a forced plan), checks every element against the reference,
/// reruns and checks the bits are identical.
template <class T>
void run_and_check(int64_t n, int64_t c, int64_t s, double offset, const PlanOverride& ov,
                   const Options& opt = Options{}, uint64_t seed = 42) {
  const int64_t groups = opt.groups ? opt.groups : c;
  const int64_t planes = n * groups, len = (c / groups) * s;
  const size_t total = size_t(n * c * s);
  const std::vector<T> hx = random_planes<T>(planes, len, offset, seed);
  DeviceBuffer<T> dx(total), dy(total);
  ASSERT_NE(dx.ptr, nullptr);
  ASSERT_NE(dy.ptr, nullptr);
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));  // NaN in every type
  Plan plan;
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr, &plan));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> hy(total), hy2(total);
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<double> ref(total);
  reference::forward(hx.data(), ref.data(), n, c, s, opt);
  const CheckResult r = compare(hy, ref, len);
  const std::string where = std::string(type_name<T>()) + " n=" + std::to_string(n) +
                            " c=" + std::to_string(c) + " S=" + std::to_string(s) +
                            " plan=" + to_string(plan.strategy) + "/" +
                            std::to_string(plan.threads) + "x" + std::to_string(plan.items) +
                            "v" + std::to_string(plan.vec) + " G=" +
                            std::to_string(plan.blocks_per_plane);
  EXPECT_TRUE(r.first_bad.empty()) << where << ": " << r.first_bad;
  if (std::is_same<T, float>::value) {
    EXPECT_LE(r.rel, 1e-6) << where;
    EXPECT_LE(r.max_abs, 1e-5) << where;
  }
  // Bit-identical rerun.
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(hy2.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(hy.data(), hy2.data(), total * sizeof(T)), 0) << where << ": rerun differs";
}

// ---------------------------------------------------------------- GPU: sizes x strategies

struct SizeCase {
  int64_t s;
};

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
  if (s >= 64) {
    PlanOverride ov;
    ov.strategy = int(Strategy::kSplit);
    ov.blocks_per_plane = 3;
    run_and_check<T>(2, 3, s, 0.0, ov);
    run_and_check<T>(1, 3, s, 1e3, ov);
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

TEST(Gpu, InPlaceMatchesOutOfPlace) {
  REQUIRE_GPU();
  for (int64_t s : {49, 4096, 65536, 1048576}) {
    const int64_t total = 4 * s;
    const auto hx = random_planes<float>(4, s, 0.0, 5);
    DeviceBuffer<float> a(static_cast<size_t>(total)), b(static_cast<size_t>(total));
    CUDA_OK(cudaMemcpy(a.ptr, hx.data(), total * 4, cudaMemcpyHostToDevice));
    CUDA_OK(forward(a.ptr, b.ptr, 2, 2, s));
    CUDA_OK(forward(a.ptr, a.ptr, 2, 2, s));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> ha(static_cast<size_t>(total)), hb(static_cast<size_t>(total));
    CUDA_OK(cudaMemcpy(ha.data(), a.ptr, total * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hb.data(), b.ptr, total * 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(ha.data(), hb.data(), total * 4), 0) << "S=" << s;
  }
}

TEST(Gpu, MisalignedPointersTakeTheScalarPath) {
  REQUIRE_GPU();
  const int64_t s = 4096, total = 8 * s;
  const auto hx = random_planes<float>(8, s, 0.0, 9);
  DeviceBuffer<float> dx(static_cast<size_t>(total + 4)), dy(static_cast<size_t>(total + 4));
  for (int off = 1; off < 4; ++off) {
    CUDA_OK(cudaMemcpy(dx.ptr + off, hx.data(), total * 4, cudaMemcpyHostToDevice));
    Plan plan;
    CUDA_OK(detail::forward_tuned(dx.ptr + off, dy.ptr + off, 2, 4, s, Options{}, PlanOverride{},
                                  nullptr, nullptr, &plan));
    EXPECT_EQ(plan.vec, 1);
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> hy(static_cast<size_t>(total));
    CUDA_OK(cudaMemcpy(hy.data(), dy.ptr + off, total * 4, cudaMemcpyDeviceToHost));
    std::vector<double> ref(static_cast<size_t>(total));
    reference::forward(hx.data(), ref.data(), 2, 4, s, Options{});
    const CheckResult r = compare(hy, ref, s);
    EXPECT_LE(r.rel, 1e-6) << "offset " << off;
    EXPECT_TRUE(r.first_bad.empty()) << r.first_bad;
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

TEST(Gpu, StreamsAndGraphCaptureGiveTheSameBits) {
  REQUIRE_GPU();
  const int64_t n = 1, c = 64, s = 1 << 16, total = n * c * s;
  const auto hx = random_planes<float>(c, s, 0.0, 13);
  DeviceBuffer<float> dx(static_cast<size_t>(total)), a(static_cast<size_t>(total)), b(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * 4, cudaMemcpyHostToDevice));
  CUDA_OK(forward(dx.ptr, a.ptr, n, c, s));
  cudaStream_t st;
  CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  ASSERT_EQ(forward(dx.ptr, b.ptr, n, c, s, 1e-5f, st), cudaSuccess);
  CUDA_OK(cudaStreamEndCapture(st, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<float> ha(static_cast<size_t>(total)), hb(static_cast<size_t>(total));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(ha.data(), a.ptr, total * 4, cudaMemcpyDeviceToHost));
  for (int rep = 0; rep < 100; ++rep) {
    CUDA_OK(cudaMemsetAsync(b.ptr, 0xff, total * 4, st));
    CUDA_OK(cudaGraphLaunch(exec, st));
    CUDA_OK(cudaStreamSynchronize(st));
    CUDA_OK(cudaMemcpy(hb.data(), b.ptr, total * 4, cudaMemcpyDeviceToHost));
    ASSERT_EQ(std::memcmp(ha.data(), hb.data(), total * 4), 0) << "replay " << rep;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
}

// 8 host threads, each with its own stream, call every strategy (the cooperative split too)
// while the others' kernels run; a watchdog turns a hang into a failure.
TEST(Gpu, ConcurrentStreamsAllStrategiesNoHang) {
  REQUIRE_GPU();
  struct Case {
    int64_t n, c, s;
  };
  const Case cases[] = {{64, 16, 49}, {8, 32, 1024}, {4, 16, 16384}, {2, 8, 262144}, {1, 4, 1 << 20}};
  std::vector<std::vector<float>> inputs;
  std::vector<std::vector<double>> refs;
  for (const Case& k : cases) {
    inputs.push_back(random_planes<float>(k.n * k.c, k.s, 0.0, 23 + inputs.size()));
    refs.emplace_back(size_t(k.n * k.c * k.s));
    reference::forward(inputs.back().data(), refs.back().data(), k.n, k.c, k.s, Options{});
  }
  constexpr int kThreads = 8, kCalls = 40;
  std::atomic<int> bad{0};
  auto worker = [&](int t) {
    cudaStream_t st;
    if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) {
      ++bad;
      return;
    }
    const Case& k = cases[t % 5];
    const size_t total = size_t(k.n * k.c * k.s);
    float *dx = nullptr, *dy = nullptr;
    cudaMalloc(&dx, total * 4);
    cudaMalloc(&dy, total * 4);
    cudaMemcpy(dx, inputs[t % 5].data(), total * 4, cudaMemcpyHostToDevice);
    for (int i = 0; i < kCalls; ++i)
      if (forward(dx, dy, k.n, k.c, k.s, 1e-5f, st) != cudaSuccess) ++bad;
    std::vector<float> hy(total);
    if (cudaStreamSynchronize(st) != cudaSuccess ||
        cudaMemcpy(hy.data(), dy, total * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
      ++bad;
    for (size_t i = 0; i < total; ++i)
      if (!(std::fabs(hy[i] - refs[t % 5][i]) <= 1e-5)) {
        ++bad;
        break;
      }
    cudaFree(dx);
    cudaFree(dy);
    cudaStreamDestroy(st);
  };
  auto all = std::async(std::launch::async, [&] {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (auto& th : threads) th.join();
  });
  if (all.wait_for(std::chrono::seconds(120)) != std::future_status::ready) {
    ADD_FAILURE() << "watchdog: concurrent calls did not finish in 120 s (hang)";
    std::fflush(nullptr);
    std::_Exit(1);  // a hung kernel cannot be cancelled; fail instead of hanging the suite
  }
  EXPECT_EQ(bad.load(), 0);
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
  for (int64_t s : {49, 1024, 16384, 262144}) {
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
}

}  // namespace
