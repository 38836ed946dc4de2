// Hostile inputs and hard conditions (docs/reliability.md): 64-bit sizes, misalignment,
// aliasing, extreme values, NaN/Inf isolation, concurrency under load, graph capture and
// determinism. The overlap rules run everywhere; the rest skip without a GPU.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>

#include "gpu_util.h"
#include "hostile_data.h"

namespace {
using namespace instnorm_test;

// ---------------------------------------------------------------- aliasing rules (no GPU needed)

TEST(Aliasing, PartialOverlapIsRefusedBeforeAnyCudaCall) {
  Problem prob;
  const Options opt;
  auto* x = reinterpret_cast<float*>(uintptr_t(1) << 30);
  const int64_t n = 2, c = 3, s = 100, total = n * c * s;
  for (int64_t shift : {int64_t(1), int64_t(7), total - 1, int64_t(-1), -(total - 1)}) {
    EXPECT_EQ(validate(x, x + shift, n, c, s, 4, opt, &prob), Invalid::kOverlap) << shift;
    EXPECT_EQ(forward<float>(x, x + shift, n, c, s), cudaErrorInvalidValue) << shift;
    // Overlap counted in bytes: a half buffer starting mid-way through an fp32 buffer.
    EXPECT_EQ(validate(x, reinterpret_cast<char*>(x + shift) + 2, n, c, s, 4, opt, &prob),
              Invalid::kOverlap)
        << shift;
  }
  // Same buffer (in place) and buffers that only touch are accepted.
  EXPECT_EQ(validate(x, x, n, c, s, 4, opt, &prob), Invalid::kOk);
  EXPECT_EQ(validate(x, x + total, n, c, s, 4, opt, &prob), Invalid::kOk);
  EXPECT_EQ(validate(x + total, x, n, c, s, 4, opt, &prob), Invalid::kOk);
}

// ---------------------------------------------------------------- device-side helpers

/// Deterministic pseudo-random value in [-1, 1) for index i (a 64-bit mix of it).
__device__ __forceinline__ float hash_unit(int64_t i, uint64_t seed) {
  uint64_t z = uint64_t(i) * 0x9e3779b97f4a7c15ull + seed;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return float(z >> 40) * 0x1p-23f - 1.f;
}

/// hash_unit values written on the device (the large tests would spend minutes generating on
/// the host), plus 0.25 * (i / len % 7): with len the plane length, an offset per NCHW plane;
/// with `channels` > 0, 0.25 * (i % channels % 7) instead: an offset per NHWC channel.
template <class T>
__global__ void fill_hash(T* x, int64_t total, int64_t len, uint64_t seed, int64_t channels = 0) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = channels > 0 ? i % channels : i / len;
    x[i] = detail::from_float<T>(hash_unit(i, seed) + 0.25f * float(k % 7));
  }
}

/// Sum and sum of squares of each plane in float64, and the count of NaN elements over all
/// planes: checks every plane of a tensor too large for the host reference. One block per chunk
/// of kSumChunk elements of a plane; the host adds the chunks of a plane in order.
constexpr int64_t kSumChunk = int64_t(1) << 20;

template <class T>
__global__ void chunk_sums(const T* y, int64_t planes, int64_t len, int64_t chunks, double* sums,
                           unsigned long long* nans) {
  __shared__ double s1[256], s2[256];
  __shared__ unsigned long long sn[256];
  for (int64_t u = blockIdx.x; u < planes * chunks; u += gridDim.x) {
    const int64_t p = u / chunks, lo = (u % chunks) * kSumChunk;
    const int64_t hi = std::min(len, lo + kSumChunk);
    double a = 0, b = 0;
    unsigned long long bad = 0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      const double v = detail::to_float(y[p * len + i]);
      if (v != v) ++bad;
      a += v;
      b += v * v;
    }
    s1[threadIdx.x] = a;
    s2[threadIdx.x] = b;
    sn[threadIdx.x] = bad;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
      if (int(threadIdx.x) < o) {
        s1[threadIdx.x] += s1[threadIdx.x + o];
        s2[threadIdx.x] += s2[threadIdx.x + o];
        sn[threadIdx.x] += sn[threadIdx.x + o];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      sums[2 * u] = s1[0];
      sums[2 * u + 1] = s2[0];
      atomicAdd(nans, sn[0]);
    }
    __syncthreads();
  }
}

struct PlaneSummary {
  std::vector<double> mean, var;
  unsigned long long nans = 0;
};

template <class T>
PlaneSummary summarize(const T* d, int64_t planes, int64_t len) {
  PlaneSummary r;
  const int64_t chunks = (len + kSumChunk - 1) / kSumChunk;
  DeviceBuffer<double> sums(static_cast<size_t>(2 * planes * chunks));
  DeviceBuffer<unsigned long long> nans(1);
  cudaMemset(nans.ptr, 0, sizeof(unsigned long long));
  chunk_sums<T><<<int(std::min<int64_t>(planes * chunks, 8192)), 256>>>(d, planes, len, chunks,
                                                                       sums.ptr, nans.ptr);
  std::vector<double> h(static_cast<size_t>(2 * planes * chunks));
  cudaMemcpy(h.data(), sums.ptr, h.size() * sizeof(double), cudaMemcpyDeviceToHost);
  cudaMemcpy(&r.nans, nans.ptr, sizeof(r.nans), cudaMemcpyDeviceToHost);
  for (int64_t p = 0; p < planes; ++p) {
    double a = 0, b = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += h[static_cast<size_t>(2 * (p * chunks + k))];
      b += h[static_cast<size_t>(2 * (p * chunks + k) + 1)];
    }
    const double m = a / double(len);
    r.mean.push_back(m);
    r.var.push_back(std::max(0.0, b / double(len) - m * m));
  }
  return r;
}

/// Compares downloaded elements [first, first + count) of y with (x - mean[j]) * rstd[j] in
/// float64, j = element % c: the channel of an NHWC tensor (c = 1: one plane).
template <class T>
void expect_normalized_channels(const T* dx, const T* dy, int64_t first, int64_t count, int64_t c,
                                const std::vector<double>& mean, const std::vector<double>& rstd,
                                const char* what) {
  std::vector<T> hx(static_cast<size_t>(count)), hy(static_cast<size_t>(count));
  ASSERT_EQ(cudaMemcpy(hx.data(), dx + first, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(hy.data(), dy + first, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t i = 0; i < count; ++i) {
    const size_t j = static_cast<size_t>((first + i) % c);
    const double want = (reference::to_double(hx[static_cast<size_t>(i)]) - mean[j]) * rstd[j];
    const double got = reference::to_double(hy[static_cast<size_t>(i)]);
    ASSERT_NEAR(got, want, 2 * ulp_of<T>(want) + 1e-4) << what << " element " << first + i;
  }
}

/// The same for one plane's mean and rstd.
template <class T>
void expect_normalized(const T* dx, const T* dy, int64_t first, int64_t count, double mean,
                       double rstd, const char* what) {
  expect_normalized_channels(dx, dy, first, count, 1, {mean}, {rstd}, what);
}

bool enough_memory(size_t bytes) {
  size_t free_b = 0, total_b = 0;
  return cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && free_b > bytes + (static_cast<size_t>(1) << 30);
}

// ---------------------------------------------------------------- 64-bit sizes

/// The input and output of a large test: x from fill_hash (len, seed, channels as there), y
/// filled with NaN, so that an element left unwritten shows.
template <class T>
void fill_large_pair(DeviceBuffer<T>& dx, DeviceBuffer<T>& dy, int64_t total, int64_t len,
                     uint64_t seed, int64_t channels = 0) {
  ASSERT_NE(dx.ptr, nullptr);
  ASSERT_NE(dy.ptr, nullptr);
  fill_hash<<<4096, 256>>>(dx.ptr, total, len, seed, channels);
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
}

// 2^31 + 2^20 fp16 elements in one call (2049 planes of 2^20): every plane is checked through
// its float64 moments on the device (mean 0, variance 1 up to fp16 rounding, no NaN left of
// the NaN-filled output), three planes element by element against the input's own moments.
TEST(Large, TensorBeyond2To31Elements) {
  REQUIRE_GPU();
  using T = __half;
  const int64_t n = 1, c = 2049, s = int64_t(1) << 20, total = n * c * s;
  ASSERT_GT(total, int64_t(1) << 31);
  if (!enough_memory(2 * static_cast<size_t>(total) * sizeof(T))) GTEST_SKIP() << "needs 9 GB of free GPU memory";
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  fill_large_pair(dx, dy, total, s, 1);
  if (HasFatalFailure()) return;
  CUDA_OK(forward(dx.ptr, dy.ptr, n, c, s));
  CUDA_OK(cudaDeviceSynchronize());
  const auto in = summarize(dx.ptr, c, s), out = summarize(dy.ptr, c, s);
  EXPECT_EQ(out.nans, 0u) << "elements left unwritten (or NaN)";
  for (int64_t p = 0; p < c; ++p) {
    ASSERT_NEAR(out.mean[static_cast<size_t>(p)], 0.0, 1e-3) << "plane " << p;
    ASSERT_NEAR(out.var[static_cast<size_t>(p)], 1.0, 2e-3) << "plane " << p;
  }
  for (int64_t p : {int64_t(0), int64_t(1024), c - 1})
    expect_normalized(dx.ptr, dy.ptr, p * s, s, in.mean[static_cast<size_t>(p)],
                      1 / std::sqrt(in.var[static_cast<size_t>(p)] + 1e-5), "tensor > 2^31");
}

// One plane of 2^31 + 2^20 fp16 elements, normalized in place: the saved statistics match the
// input's float64 moments, and elements on both sides of 2^31 match the float64 formula.
TEST(Large, PlaneBeyond2To31ElementsInPlace) {
  REQUIRE_GPU();
  using T = __half;
  const int64_t s = (int64_t(1) << 31) + (int64_t(1) << 20);
  if (!enough_memory(2 * static_cast<size_t>(s) * sizeof(T))) GTEST_SKIP() << "needs 9 GB of free GPU memory";
  DeviceBuffer<T> dx(static_cast<size_t>(s)), keep(static_cast<size_t>(s));
  DeviceBuffer<float> stats(2);
  ASSERT_NE(dx.ptr, nullptr);
  ASSERT_NE(keep.ptr, nullptr);
  fill_hash<<<4096, 256>>>(dx.ptr, s, s, 2);
  CUDA_OK(cudaMemcpy(keep.ptr, dx.ptr, s * sizeof(T), cudaMemcpyDeviceToDevice));
  const auto in = summarize(dx.ptr, 1, s);
  Options opt;
  opt.save_mean = stats.ptr;
  opt.save_rstd = stats.ptr + 1;
  CUDA_OK(forward(dx.ptr, dx.ptr, 1, 1, s, opt));
  CUDA_OK(cudaDeviceSynchronize());
  float h[2];
  CUDA_OK(cudaMemcpy(h, stats.ptr, sizeof(h), cudaMemcpyDeviceToHost));
  const double rstd = 1 / std::sqrt(in.var[0] + 1e-5);
  EXPECT_NEAR(h[0], in.mean[0], 1e-5);
  EXPECT_NEAR(h[1], rstd, 1e-5 * rstd);
  const int64_t edge = int64_t(1) << 31;
  expect_normalized(keep.ptr, dx.ptr, 0, 1 << 16, in.mean[0], rstd, "plane start");
  expect_normalized(keep.ptr, dx.ptr, edge - (1 << 16), 1 << 17, in.mean[0], rstd, "around 2^31");
  expect_normalized(keep.ptr, dx.ptr, s - (1 << 16), 1 << 16, in.mean[0], rstd, "plane end");
  EXPECT_EQ(summarize(dx.ptr, 1, s).nans, 0u);
}

// ---------------------------------------------------------------- 64-bit sizes, NHWC

/// Float64 sum and sum of squares of each channel of an NHWC tensor (all images pooled), and the
/// NaN count. The grid's stride is a multiple of c, so a thread stays on one channel.
template <class T>
__global__ void channel_sums(const T* y, int64_t total, int64_t c, double* acc,
                             unsigned long long* nans) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;  // a multiple of c (checked by the caller)
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  double a = 0, b = 0;
  unsigned long long bad = 0;
  for (int64_t i = first; i < total; i += stride) {
    const double v = double(detail::to_float(y[i]));
    if (v != v) ++bad;
    a += v;
    b += v * v;
  }
  atomicAdd(&acc[2 * (first % c)], a);
  atomicAdd(&acc[2 * (first % c) + 1], b);
  if (bad) atomicAdd(nans, bad);
}

template <class T>
PlaneSummary summarize_channels(const T* d, int64_t total, int64_t c) {
  PlaneSummary r;
  const int blocks = 4096, threads = 256;
  EXPECT_EQ((int64_t(blocks) * threads) % c, 0);
  DeviceBuffer<double> acc(static_cast<size_t>(2 * c));
  DeviceBuffer<unsigned long long> nans(1);
  cudaMemset(acc.ptr, 0, 2 * c * sizeof(double));
  cudaMemset(nans.ptr, 0, sizeof(unsigned long long));
  channel_sums<T><<<blocks, threads>>>(d, total, c, acc.ptr, nans.ptr);
  std::vector<double> h(static_cast<size_t>(2 * c));
  cudaMemcpy(h.data(), acc.ptr, h.size() * sizeof(double), cudaMemcpyDeviceToHost);
  cudaMemcpy(&r.nans, nans.ptr, sizeof(r.nans), cudaMemcpyDeviceToHost);
  const double len = double(total / c);
  for (int64_t j = 0; j < c; ++j) {
    const double m = h[static_cast<size_t>(2 * j)] / len;
    r.mean.push_back(m);
    r.var.push_back(std::max(0.0, h[static_cast<size_t>(2 * j + 1)] / len - m * m));
  }
  return r;
}

// One NHWC image of 2^31 + 2^23 fp16 elements (8 channels of 2^28 + 2^20 rows: too large for
// the chip, so the tiled plan): every channel comes out with mean 0 and variance 1 (float64
// sums on the device), the saved statistics match the input's float64 moments, and rows at the
// start, around element 2^31 and at the end match (x - mean) * rstd.
TEST(Large, NhwcImageBeyond2To31Elements) {
  REQUIRE_GPU();
  using T = __half;
  const int64_t c = 8, s = (int64_t(1) << 28) + (int64_t(1) << 20), total = c * s;
  ASSERT_GT(total, int64_t(1) << 31);
  if (!enough_memory(2 * static_cast<size_t>(total) * sizeof(T))) GTEST_SKIP() << "needs 10 GB of free GPU memory";
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  DeviceBuffer<float> stats(static_cast<size_t>(2 * c));
  fill_large_pair(dx, dy, total, 1, 3, c);
  if (HasFatalFailure()) return;
  Options opt;
  opt.layout = Layout::kNHWC;
  opt.save_mean = stats.ptr;
  opt.save_rstd = stats.ptr + c;
  NhwcPlan plan;  // forward(dx, dy, 1, c, s, opt)'s plan
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, 1, c, s, opt, PlanOverride{}, nullptr, nullptr,
                                nullptr, &plan));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_FALSE(plan.on_chip) << "an image too large for the chip runs the tiled plan";
  const auto in = summarize_channels(dx.ptr, total, c), out = summarize_channels(dy.ptr, total, c);
  EXPECT_EQ(out.nans, 0u) << "elements left unwritten (or NaN)";
  std::vector<float> h(static_cast<size_t>(2 * c));
  CUDA_OK(cudaMemcpy(h.data(), stats.ptr, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<double> rstd;
  for (int64_t j = 0; j < c; ++j) {
    const size_t u = static_cast<size_t>(j);
    rstd.push_back(1 / std::sqrt(in.var[u] + 1e-5));
    EXPECT_NEAR(out.mean[u], 0.0, 1e-3) << "channel " << j;
    EXPECT_NEAR(out.var[u], 1.0, 2e-3) << "channel " << j;
    EXPECT_NEAR(h[u], in.mean[u], 1e-5) << "saved mean, channel " << j;
    EXPECT_NEAR(h[static_cast<size_t>(c) + u], rstd[u], 1e-5 * rstd[u]) << "saved rstd, channel " << j;
  }
  const int64_t edge = int64_t(1) << 31;
  expect_normalized_channels(dx.ptr, dy.ptr, 0, 1 << 16, c, in.mean, rstd, "start");
  expect_normalized_channels(dx.ptr, dy.ptr, edge - (1 << 16), 1 << 17, c, in.mean, rstd, "around 2^31");
  expect_normalized_channels(dx.ptr, dy.ptr, total - (1 << 16), 1 << 16, c, in.mean, rstd, "end");
}

// 2049 NHWC images of 64 channels x 16384 rows (2^31 + 2^20 fp16 elements; the on-chip plan):
// no element left unwritten, each pooled channel at mean 0 and variance 1, and three images
// element by element against their own float64 channel moments.
TEST(Large, NhwcTensorBeyond2To31Elements) {
  REQUIRE_GPU();
  using T = __half;
  const int64_t n = 2049, c = 64, s = 16384, img = c * s, total = n * img;
  ASSERT_GT(total, int64_t(1) << 31);
  if (!enough_memory(2 * static_cast<size_t>(total) * sizeof(T))) GTEST_SKIP() << "needs 10 GB of free GPU memory";
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  fill_large_pair(dx, dy, total, 1, 4, c);
  if (HasFatalFailure()) return;
  Options opt;
  opt.layout = Layout::kNHWC;
  NhwcPlan plan;  // forward(dx, dy, n, c, s, opt)'s plan
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, PlanOverride{}, nullptr, nullptr,
                                nullptr, &plan));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_TRUE(plan.on_chip) << "images of 2 MB run the on-chip plan";
  const auto out = summarize_channels(dy.ptr, total, c);
  EXPECT_EQ(out.nans, 0u) << "elements left unwritten (or NaN)";
  for (int64_t j = 0; j < c; ++j) {
    EXPECT_NEAR(out.mean[static_cast<size_t>(j)], 0.0, 1e-3) << "channel " << j;
    EXPECT_NEAR(out.var[static_cast<size_t>(j)], 1.0, 2e-3) << "channel " << j;
  }
  for (int64_t i : {int64_t(0), int64_t(1024), n - 1}) {
    const auto one = summarize_channels(dx.ptr + i * img, img, c);
    std::vector<double> rstd;
    for (double v : one.var) rstd.push_back(1 / std::sqrt(v + 1e-5));
    expect_normalized_channels(dx.ptr + i * img, dy.ptr + i * img, 0, img, c, one.mean, rstd,
                               i == 0 ? "image 0" : i == 1024 ? "image 1024" : "last image");
  }
}

// ---------------------------------------------------------------- strategies

/// A shape that the planner (or a forced plan) runs with each strategy. `strategy` is what must
/// run (on 16-byte aligned buffers): the tests check it, so that a case keeps the path it names.
struct StrategyCase {
  const char* name;
  int64_t n, c, s;
  PlanOverride ov;
  Strategy strategy;
  bool ragged = false;  ///< Plan::ragged must hold (odd plane lengths: 16-byte bodies)
};

std::vector<StrategyCase> strategy_cases() {
  // 7x7 planes are staged by the planner (scalar planes); the sub-warp plan runs them forced.
  PlanOverride subwarp;
  subwarp.strategy = int(Strategy::kSubWarp);
  PlanOverride split;
  split.strategy = int(Strategy::kSplit);
  split.blocks_per_plane = 3;
  PlanOverride block;
  block.strategy = int(Strategy::kBlock);
  PlanOverride stream;
  stream.strategy = int(Strategy::kSplitStream);
  stream.blocks_per_plane = 2;
  stream.items = 1;
  stream.threads = 64;
  return {{"subwarp", 64, 8, 49, subwarp, Strategy::kSubWarp},
          {"subwarp-aligned", 16, 8, 1024, {}, Strategy::kSubWarp},
          {"staged", 64, 8, 49, {}, Strategy::kStaged},
          {"block", 4, 4, 16384, {}, Strategy::kBlock},
          {"split", 2, 3, 65536, split, Strategy::kSplit},
          {"split-stream", 1, 3, 65536, stream, Strategy::kSplitStream},
          {"split-auto", 1, 4, 1 << 20, {}, Strategy::kSplit},
          // Odd plane lengths: every plane but the first starts off a 16-byte boundary.
          {"block-ragged", 5, 3, 16383, block, Strategy::kBlock, true},
          {"split-ragged", 2, 3, 65535, split, Strategy::kSplit, true},
          {"split-stream-ragged", 1, 3, 65537, stream, Strategy::kSplitStream, true}};
}

/// The plan that ran has the strategy the case names.
void expect_strategy(const StrategyCase& k, const Plan& ran, const char* type) {
  EXPECT_EQ(ran.strategy, k.strategy) << type << " " << k.name << ": " << to_string(ran.strategy)
                                      << " ran";
  EXPECT_EQ(ran.ragged, k.ragged) << type << " " << k.name;
}

// ---------------------------------------------------------------- alignment

/// The element just after y[0, total) (and with `before`, the one just before it) still holds
/// the NaN the buffer was filled with.
template <class T>
void expect_untouched_around(const T* y, int64_t total, bool before) {
  T guard[2];
  CUDA_OK(cudaMemcpy(&guard[0], y - (before ? 1 : 0), sizeof(T), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&guard[1], y + total, sizeof(T), cudaMemcpyDeviceToHost));
  if (before) EXPECT_TRUE(std::isnan(reference::to_double(guard[0])));
  EXPECT_TRUE(std::isnan(reference::to_double(guard[1])));
}

// x and y offset by 1, 2, 3 elements (independently) from any 16-byte alignment: the scalar,
// staged or (equal offsets, block and split plans) ragged path, checked against the reference;
// aligned buffers keep 16-byte vectors. Adds the strategies that ran to `seen` (a bit per
// Strategy, bit 16 for a ragged plan).
template <class T>
void offsets_case(int64_t n, int64_t c, int64_t s, unsigned* seen, const PlanOverride& ov = {}) {
  const int64_t total = n * c * s;
  const auto hx = random_planes<T>(n * c, s, 0.0, 31);
  std::vector<double> ref(static_cast<size_t>(total));
  reference::forward(hx.data(), ref.data(), n, c, s, Options{});
  DeviceBuffer<T> dx(static_cast<size_t>(total + 8)), dy(static_cast<size_t>(total + 8));
  const int pairs[][2] = {{0, 0}, {1, 1}, {2, 3}, {3, 0}, {0, 1}, {1, 2}};
  for (const auto& pr : pairs) {
    T* x = dx.ptr + pr[0];
    T* y = dy.ptr + pr[1];
    CUDA_OK(cudaMemcpy(x, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dy.ptr, 0xff, (total + 8) * sizeof(T)));
    Plan plan;
    CUDA_OK(detail::forward_tuned(x, y, n, c, s, Options{}, ov, nullptr, nullptr, &plan));
    CUDA_OK(cudaDeviceSynchronize());
    *seen |= 1u << int(plan.strategy);
    const int full = 16 / int(sizeof(T));
    const bool aligned = pr[0] == 0 && pr[1] == 0 && s % full == 0;
    // Equal offsets keep 16-byte bodies on the block and split plans (Plan::ragged).
    const bool ragged = !aligned && pr[0] == pr[1] && plan.strategy != Strategy::kStaged &&
                        plan.strategy != Strategy::kSubWarp;
    EXPECT_EQ(plan.ragged, ragged) << type_name<T>() << " offsets " << pr[0] << "," << pr[1];
    EXPECT_EQ(plan.vec, aligned || ragged ? full : 1)
        << type_name<T>() << " offsets " << pr[0] << "," << pr[1];
    *seen |= ragged ? 1u << 16 : 0u;
    std::vector<T> hy(static_cast<size_t>(total));
    CUDA_OK(cudaMemcpy(hy.data(), y, total * sizeof(T), cudaMemcpyDeviceToHost));
    const CheckResult r = compare(hy, ref, s);
    EXPECT_TRUE(r.first_bad.empty()) << type_name<T>() << " S=" << s << " offsets " << pr[0]
                                     << "," << pr[1] << ": " << r.first_bad;
    expect_untouched_around<T>(y, total, pr[1] > 0);
  }
}

// The planner's plans for these shapes (staged, sub-warp, block, split), and the streaming
// split plan forced: every strategy must have run.
TEST(Alignment, OffsetsOf1To3ElementsEveryTypeAndStrategy) {
  REQUIRE_GPU();
  unsigned seen = 0;
  for (int64_t s : {int64_t(49), int64_t(1000), int64_t(4096), int64_t(65536), int64_t(1) << 20}) {
    const int64_t c = s >= 65536 ? 3 : 8;
    offsets_case<float>(2, c, s, &seen);
    offsets_case<__half>(2, c, s, &seen);
    offsets_case<__nv_bfloat16>(2, c, s, &seen);
  }
  PlanOverride stream;
  stream.strategy = int(Strategy::kSplitStream);
  stream.blocks_per_plane = 2;
  stream.items = 1;
  stream.threads = 64;
  offsets_case<float>(1, 3, 65536, &seen, stream);
  offsets_case<__half>(1, 3, 65536, &seen, stream);
  offsets_case<__nv_bfloat16>(1, 3, 65536, &seen, stream);
  for (Strategy st : {Strategy::kSubWarp, Strategy::kBlock, Strategy::kSplit,
                      Strategy::kSplitStream, Strategy::kStaged})
    EXPECT_TRUE(seen & (1u << int(st))) << to_string(st) << " never ran";
  EXPECT_TRUE(seen & (1u << 16)) << "no ragged plan ran";
}

// ---------------------------------------------------------------- in place

template <class T>
void in_place_case(const StrategyCase& k) {
  const int64_t total = k.n * k.c * k.s;
  const auto hx = random_planes<T>(k.n * k.c, k.s, 0.0, 5);
  DeviceBuffer<T> a(static_cast<size_t>(total)), b(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(a.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  Plan p1, p2;
  CUDA_OK(detail::forward_tuned(a.ptr, b.ptr, k.n, k.c, k.s, Options{}, k.ov, nullptr, nullptr, &p1));
  CUDA_OK(detail::forward_tuned(a.ptr, a.ptr, k.n, k.c, k.s, Options{}, k.ov, nullptr, nullptr, &p2));
  CUDA_OK(cudaDeviceSynchronize());
  expect_strategy(k, p1, type_name<T>());
  EXPECT_EQ(int(p1.strategy), int(p2.strategy));
  std::vector<T> ha(static_cast<size_t>(total)), hb(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(ha.data(), a.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(hb.data(), b.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(ha.data(), hb.data(), total * sizeof(T)), 0)
      << type_name<T>() << " " << k.name << " (" << to_string(p1.strategy) << ")";
}

TEST(Aliasing, InPlaceEqualsOutOfPlaceForEveryStrategy) {
  REQUIRE_GPU();
  for (const auto& k : strategy_cases()) {
    in_place_case<float>(k);
    in_place_case<__half>(k);
    in_place_case<__nv_bfloat16>(k);
  }
}

// ---------------------------------------------------------------- extreme values

/// Uniform planes in [-scale, scale] (plus a per-plane shift), for the range tests.
template <class T>
std::vector<T> uniform_planes(int64_t planes, int64_t len, double lo, double hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> ud(lo, hi);
  std::vector<T> h(static_cast<size_t>(planes * len));
  for (auto& v : h) v = to_t<T>(float(ud(rng)));
  return h;
}

TEST(Extreme, Fp32ValuesOf1e18EveryStrategy) {
  REQUIRE_GPU();
  for (const auto& k : strategy_cases()) {
    SCOPED_TRACE(k.name);
    expect_strategy(k, check_input<float>(uniform_planes<float>(k.n * k.c, k.s, -1e18, 1e18, 3),
                                          k.n, k.c, k.s, k.ov).plan, "fp32");
    expect_strategy(k, check_input<float>(uniform_planes<float>(k.n * k.c, k.s, 5e17, 1e18, 4),
                                          k.n, k.c, k.s, k.ov).plan, "fp32");
  }
}

TEST(Extreme, Fp32MeanOf1e6TimesStdEveryStrategy) {
  REQUIRE_GPU();
  for (const auto& k : strategy_cases()) {
    SCOPED_TRACE(k.name);
    expect_strategy(k, run_and_check<float>(k.n, k.c, k.s, 1e6, k.ov).plan, "fp32");
  }
}

TEST(Extreme, Fp16NearItsLargestValueInPlanesOf2To20) {
  REQUIRE_GPU();
  const int64_t s = int64_t(1) << 20;
  // The whole range, and values packed just under 65504 (|mean| ~ 100 std).
  check_input<__half>(uniform_planes<__half>(3, s, -65504, 65504, 5), 1, 3, s, PlanOverride{});
  check_input<__half>(uniform_planes<__half>(3, s, 63000, 65504, 6), 1, 3, s, PlanOverride{});
  PlanOverride stream;
  stream.strategy = int(Strategy::kSplitStream);
  stream.blocks_per_plane = 2;
  check_input<__half>(uniform_planes<__half>(2, s, -65504, 65504, 7), 1, 2, s, stream);
}

/// NaN or +-Inf anywhere in a plane makes that plane's output all NaN; every other plane has
/// the bits of the same call without the poison.
template <class T>
void poison_case(const StrategyCase& k) {
  const int64_t planes = k.n * k.c, total = planes * k.s;
  auto hx = random_planes<T>(planes, k.s, 0.0, 8);
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  Plan plan;
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, k.n, k.c, k.s, Options{}, k.ov, nullptr, nullptr,
                                &plan));
  expect_strategy(k, plan, type_name<T>());
  std::vector<T> clean(static_cast<size_t>(total)), hy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(clean.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  const float poisons[] = {std::nanf(""), INFINITY, -INFINITY};
  std::vector<bool> poisoned(static_cast<size_t>(planes), false);
  for (int i = 0; i < 3 && i < planes; ++i) {
    const int64_t p = (i * 5 + 1) % planes;
    if (poisoned[static_cast<size_t>(p)]) continue;
    poisoned[static_cast<size_t>(p)] = true;
    hx[static_cast<size_t>(p * k.s + (k.s * (i + 1)) / 4)] = to_t<T>(poisons[i]);
  }
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, k.n, k.c, k.s, Options{}, k.ov, nullptr, nullptr));
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  for (int64_t p = 0; p < planes; ++p) {
    const size_t off = static_cast<size_t>(p * k.s);
    if (poisoned[static_cast<size_t>(p)]) {
      for (int64_t i = 0; i < k.s; ++i)
        ASSERT_TRUE(std::isnan(reference::to_double(hy[off + static_cast<size_t>(i)])))
            << type_name<T>() << " " << k.name << " plane " << p << " index " << i;
    } else {
      ASSERT_EQ(std::memcmp(hy.data() + off, clean.data() + off, k.s * sizeof(T)), 0)
          << type_name<T>() << " " << k.name << " clean plane " << p << " changed";
    }
  }
}

TEST(Extreme, NanOrInfPoisonsOnlyItsOwnPlane) {
  REQUIRE_GPU();
  for (const auto& k : strategy_cases()) {
    poison_case<float>(k);
    poison_case<__half>(k);
    poison_case<__nv_bfloat16>(k);
  }
}

// eps = 0 on a constant plane: 0 * (1 / sqrt(0)) is NaN, exactly what PyTorch computes for
// (x - mean) / sqrt(var + 0); a non-constant plane with eps = 0 is exact.
TEST(Extreme, EpsZeroBehavesAsPyTorch) {
  REQUIRE_GPU();
  const int64_t s = 4096;
  std::vector<float> hx(static_cast<size_t>(2 * s), 3.f);
  for (int64_t i = 0; i < s; ++i) hx[static_cast<size_t>(s + i)] = float(i % 17);
  DeviceBuffer<float> dx(static_cast<size_t>(2 * s)), dy(static_cast<size_t>(2 * s));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), 2 * s * 4, cudaMemcpyHostToDevice));
  CUDA_OK(forward(dx.ptr, dy.ptr, 1, 2, s, 0.f));
  std::vector<float> hy(static_cast<size_t>(2 * s));
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, 2 * s * 4, cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < s; ++i) ASSERT_TRUE(std::isnan(hy[static_cast<size_t>(i)])) << i;
  Options opt;
  opt.eps = 0.f;
  std::vector<double> ref(static_cast<size_t>(2 * s));
  reference::forward(hx.data(), ref.data(), 1, 2, s, opt);
  for (int64_t i = s; i < 2 * s; ++i) ASSERT_NEAR(hy[static_cast<size_t>(i)], ref[static_cast<size_t>(i)], 1e-5) << i;
}

// ---------------------------------------------------------------- channels-last (NHWC)

/// NHWC shapes the planner runs on chip (with the G it picks: two images leave SMs idle, so more
/// than one block per slice on the H100), forced onto G = 6 blocks per slice (the exchange, and
/// its phase shift over several rounds), forced onto the tiled plan, and GroupNorm (groups of 8
/// channels) on chip. expect_nhwc_plan checks that each ran the plan it names.
struct NhwcCase {
  const char* name;
  int64_t n, c, s, groups;
  PlanOverride ov;
};

std::vector<NhwcCase> nhwc_cases() {
  PlanOverride tiled;
  tiled.nhwc_on_chip = 0;
  PlanOverride shared;
  shared.nhwc_on_chip = 1;
  shared.blocks_per_plane = 6;
  return {{"on-chip", 2, 64, 1000, 0, {}},
          {"on-chip-G6", 4, 64, 384, 0, shared},  // 64 rows per block: scalars fit too
          {"tiled", 2, 64, 1000, 0, tiled},
          {"groupnorm", 2, 64, 1000, 8, {}}};
}

/// Calls f(T{}, case) for every NHWC case and the three element types.
template <class F>
void for_nhwc_cases_and_types(F f) {
  for (const auto& k : nhwc_cases()) {
    f(float{}, k);
    f(__half{}, k);
    f(__nv_bfloat16{}, k);
  }
}

Options nhwc_options(int64_t groups) {
  Options opt;
  opt.layout = Layout::kNHWC;
  opt.groups = groups;
  return opt;
}

/// The NHWC plan that ran is the one the case names: on chip unless it forces the tiled plan,
/// with the G it forces.
void expect_nhwc_plan(const NhwcCase& k, const NhwcPlan& ran, const char* type) {
  EXPECT_EQ(ran.on_chip, k.ov.nhwc_on_chip != 0)
      << type << " NHWC " << k.name << ": the " << (ran.on_chip ? "on-chip" : "tiled") << " plan ran";
  if (k.ov.blocks_per_plane > 0)
    EXPECT_EQ(ran.blocks_per_unit, k.ov.blocks_per_plane) << type << " NHWC " << k.name;
}

// x and y offset by 1-3 elements from 16-byte alignment, NHWC: every plan stays exact and
// leaves the elements around y untouched.
template <class T>
void nhwc_offsets_case(const NhwcCase& k) {
  const int64_t total = k.n * k.c * k.s;
  const Options opt = nhwc_options(k.groups);
  const auto hx = random_planes<T>(k.n * k.s, k.c, 0.0, 17);  // rows of C values
  std::vector<double> ref(static_cast<size_t>(total));
  reference::forward(hx.data(), ref.data(), k.n, k.c, k.s, opt);
  DeviceBuffer<T> dx(static_cast<size_t>(total + 8)), dy(static_cast<size_t>(total + 8));
  const int pairs[][2] = {{0, 0}, {1, 1}, {2, 3}, {0, 1}};
  for (const auto& pr : pairs) {
    T* x = dx.ptr + pr[0];
    T* y = dy.ptr + pr[1];
    CUDA_OK(cudaMemcpy(x, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dy.ptr, 0xff, (total + 8) * sizeof(T)));
    NhwcPlan plan;
    CUDA_OK(
        detail::forward_tuned(x, y, k.n, k.c, k.s, opt, k.ov, nullptr, nullptr, nullptr, &plan));
    CUDA_OK(cudaDeviceSynchronize());
    expect_nhwc_plan(k, plan, type_name<T>());
    std::vector<T> hy(static_cast<size_t>(total));
    CUDA_OK(cudaMemcpy(hy.data(), y, total * sizeof(T), cudaMemcpyDeviceToHost));
    const CheckResult r = compare(hy, ref, k.c);
    EXPECT_TRUE(r.first_bad.empty()) << type_name<T>() << " NHWC " << k.name << " offsets "
                                     << pr[0] << "," << pr[1] << ": " << r.first_bad;
    expect_untouched_around<T>(y, total, pr[1] > 0);
  }
}

TEST(Alignment, NhwcOffsetsOf1To3ElementsEveryTypeAndPlan) {
  REQUIRE_GPU();
  for_nhwc_cases_and_types([](auto t, const NhwcCase& k) { nhwc_offsets_case<decltype(t)>(k); });
}

// y == x gives the bits of y != x, NHWC. In place, a block may overwrite the first row of an
// image (where every channel's pivot lives) while another block of the slice still needs it.
template <class T>
void nhwc_in_place_case(const NhwcCase& k) {
  const int64_t total = k.n * k.c * k.s;
  const Options opt = nhwc_options(k.groups);
  const auto hx = random_planes<T>(k.n * k.s, k.c, 3.0, 5);
  DeviceBuffer<T> a(static_cast<size_t>(total)), b(static_cast<size_t>(total));
  for (int rep = 0; rep < 3; ++rep) {  // the race, if any, depends on timing: several tries
    CUDA_OK(cudaMemcpy(a.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
    NhwcPlan out_of_place, in_place;
    CUDA_OK(detail::forward_tuned(a.ptr, b.ptr, k.n, k.c, k.s, opt, k.ov, nullptr, nullptr,
                                  nullptr, &out_of_place));
    CUDA_OK(detail::forward_tuned(a.ptr, a.ptr, k.n, k.c, k.s, opt, k.ov, nullptr, nullptr,
                                  nullptr, &in_place));
    CUDA_OK(cudaDeviceSynchronize());
    expect_nhwc_plan(k, out_of_place, type_name<T>());
    expect_nhwc_plan(k, in_place, type_name<T>());
    std::vector<T> ha(static_cast<size_t>(total)), hb(static_cast<size_t>(total));
    CUDA_OK(cudaMemcpy(ha.data(), a.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hb.data(), b.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
    ASSERT_EQ(std::memcmp(ha.data(), hb.data(), total * sizeof(T)), 0)
        << type_name<T>() << " NHWC " << k.name << " try " << rep;
  }
}

TEST(Aliasing, NhwcInPlaceEqualsOutOfPlaceForEveryPlan) {
  REQUIRE_GPU();
  for_nhwc_cases_and_types([](auto t, const NhwcCase& k) { nhwc_in_place_case<decltype(t)>(k); });
}

/// NaN or +-Inf in one element of an NHWC image makes every output of its (image, group) NaN;
/// every other output keeps the bits of the clean call.
template <class T>
void nhwc_poison_case(const NhwcCase& k) {
  const int64_t total = k.n * k.c * k.s, groups = k.groups ? k.groups : k.c;
  const int64_t cpg = k.c / groups;
  const Options opt = nhwc_options(k.groups);
  auto hx = random_planes<T>(k.n * k.s, k.c, 0.0, 8);
  DeviceBuffer<T> dx(static_cast<size_t>(total)), dy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  NhwcPlan plan;
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, k.n, k.c, k.s, opt, k.ov, nullptr, nullptr, nullptr,
                                &plan));
  expect_nhwc_plan(k, plan, type_name<T>());
  std::vector<T> clean(static_cast<size_t>(total)), hy(static_cast<size_t>(total));
  CUDA_OK(cudaMemcpy(clean.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  const float poisons[] = {std::nanf(""), INFINITY, -INFINITY};
  std::vector<bool> poisoned(static_cast<size_t>(k.n * groups), false);
  for (int i = 0; i < 3; ++i) {
    const int64_t image = i % k.n, row = (k.s * (i + 1)) / 4, ch = (i * 19 + 3) % k.c;
    poisoned[static_cast<size_t>(image * groups + ch / cpg)] = true;
    hx[static_cast<size_t>((image * k.s + row) * k.c + ch)] = to_t<T>(poisons[i]);
  }
  CUDA_OK(cudaMemcpy(dx.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, k.n, k.c, k.s, opt, k.ov, nullptr, nullptr));
  CUDA_OK(cudaMemcpy(hy.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < total; ++i) {
    const int64_t image = i / (k.s * k.c), ch = i % k.c;
    const double v = reference::to_double(hy[static_cast<size_t>(i)]);
    if (poisoned[static_cast<size_t>(image * groups + ch / cpg)])
      ASSERT_TRUE(std::isnan(v)) << type_name<T>() << " NHWC " << k.name << " index " << i;
    else
      ASSERT_EQ(std::memcmp(&hy[static_cast<size_t>(i)], &clean[static_cast<size_t>(i)], sizeof(T)), 0)
          << type_name<T>() << " NHWC " << k.name << " clean index " << i << " changed";
  }
}

/// NCHW planes (n x c planes of s values) laid out as NHWC images: (i, j, r) at (i*s + r)*c + j.
template <class T>
std::vector<T> nhwc_of(const std::vector<T>& planes, int64_t n, int64_t c, int64_t s) {
  std::vector<T> h(planes.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j)
      for (int64_t r = 0; r < s; ++r)
        h[static_cast<size_t>((i * s + r) * c + j)] = planes[static_cast<size_t>((i * c + j) * s + r)];
  return h;
}

// NHWC with values up to +-1e18 (squares near fp32's limit) and channels whose mean is 1e6 of
// their std: finite statistics within fp32's 1e-6 of the float64 reference on every plan (the
// on-chip kernel's row-lane sums and exchange, the tiled kernels' merges), bit-identical reruns.
TEST(Extreme, NhwcFp32ValuesOf1e18AndMeanOf1e6TimesStdEveryPlan) {
  REQUIRE_GPU();
  for (const auto& k : nhwc_cases()) {
    SCOPED_TRACE(k.name);
    const Options opt = nhwc_options(k.groups);
    expect_nhwc_plan(k, check_input<float>(uniform_planes<float>(k.n * k.s, k.c, -1e18, 1e18, 3),
                                           k.n, k.c, k.s, k.ov, opt).nhwc, "fp32");
    expect_nhwc_plan(k, check_input<float>(uniform_planes<float>(k.n * k.s, k.c, 5e17, 1e18, 4),
                                           k.n, k.c, k.s, k.ov, opt).nhwc, "fp32");
    if (k.groups == 0)  // one plane per (image, channel): each at +-1e6 std
      expect_nhwc_plan(k,
                       check_input<float>(
                           nhwc_of(random_planes<float>(k.n * k.c, k.s, 1e6, 9), k.n, k.c, k.s),
                           k.n, k.c, k.s, k.ov, opt).nhwc,
                       "fp32");
  }
}

TEST(Extreme, NhwcNanOrInfPoisonsOnlyItsOwnChannelOrGroup) {
  REQUIRE_GPU();
  for_nhwc_cases_and_types([](auto t, const NhwcCase& k) { nhwc_poison_case<decltype(t)>(k); });
}

// ---------------------------------------------------------------- concurrency

/// Spins for about `ns` nanoseconds on every SM it lands on: other work on the GPU while the
/// library's kernels (the cooperative ones too) are launched.
__global__ void busy_kernel(long long ns) {
  const long long start = clock64();
  // clock64 counts SM cycles; 1.5 cycles per ns is close enough for "busy for a while".
  while (clock64() - start < ns * 3 / 2) {
  }
}

// 10 host threads, each with its own stream, 1000 calls each over every strategy and all three
// types (GroupNorm with affine too; channels-last on one block per slice and on 16 co-resident
// blocks per slice), while another thread keeps launching spinning kernels on its own stream;
// each thread's final output must have the bits of a direct call. A watchdog turns a hang into
// a failure.
TEST(Concurrency, TenThreadsThousandCallsUnderLoadNoHang) {
  REQUIRE_GPU();
  struct Case {
    int64_t n, c, s, groups;
    int type;  // 0 fp32, 1 fp16, 2 bf16
    bool nhwc;
  };
  const Case cases[] = {{64, 16, 49, 0, 0, false},   {8, 32, 1024, 0, 1, false},
                        {4, 16, 16384, 0, 2, false}, {2, 8, 262144, 0, 0, false},
                        {1, 4, 1 << 20, 0, 1, false}, {1, 1, 1 << 24, 0, 0, false},
                        {2, 64, 4096, 8, 2, false},  {1, 8, 1 << 20, 2, 0, false},
                        {4, 64, 4096, 0, 0, true},   {2, 64, 65536, 8, 1, true}};
  constexpr int kThreads = 10, kCalls = 1000;
  std::vector<float> gamma(64), beta(64);
  for (int i = 0; i < 64; ++i) {
    gamma[static_cast<size_t>(i)] = 1.f + 0.01f * float(i);
    beta[static_cast<size_t>(i)] = 0.1f * float(i % 5);
  }
  DeviceBuffer<float> dg(64), db(64);
  CUDA_OK(cudaMemcpy(dg.ptr, gamma.data(), 64 * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db.ptr, beta.data(), 64 * 4, cudaMemcpyHostToDevice));
  auto options_of = [&](const Case& k) {
    Options opt;
    opt.layout = k.nhwc ? Layout::kNHWC : Layout::kNCHW;
    opt.groups = k.groups;
    if (k.groups) {
      opt.gamma = dg.ptr;
      opt.beta = db.ptr;
      opt.activation = Activation::kSilu;
    }
    return opt;
  };
  // Inputs and golden outputs from direct calls on the default stream.
  std::vector<std::vector<unsigned char>> golden(kThreads);
  std::vector<unsigned char*> inputs(kThreads);
  std::vector<size_t> bytes(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    const Case& k = cases[t];
    const size_t total = static_cast<size_t>(k.n * k.c * k.s), esz = k.type == 0 ? 4 : 2;
    bytes[static_cast<size_t>(t)] = total * esz;
    CUDA_OK(cudaMalloc(&inputs[static_cast<size_t>(t)], bytes[static_cast<size_t>(t)]));
    unsigned char* out = nullptr;
    CUDA_OK(cudaMalloc(&out, bytes[static_cast<size_t>(t)]));
    const Options opt = options_of(k);
    if (k.type == 0) {
      fill_hash<<<1024, 256>>>(reinterpret_cast<float*>(inputs[static_cast<size_t>(t)]), int64_t(total), k.s, t);
      CUDA_OK(forward(reinterpret_cast<float*>(inputs[static_cast<size_t>(t)]), reinterpret_cast<float*>(out), k.n, k.c, k.s, opt));
    } else if (k.type == 1) {
      fill_hash<<<1024, 256>>>(reinterpret_cast<__half*>(inputs[static_cast<size_t>(t)]), int64_t(total), k.s, t);
      CUDA_OK(forward(reinterpret_cast<__half*>(inputs[static_cast<size_t>(t)]), reinterpret_cast<__half*>(out), k.n, k.c, k.s, opt));
    } else {
      fill_hash<<<1024, 256>>>(reinterpret_cast<__nv_bfloat16*>(inputs[static_cast<size_t>(t)]), int64_t(total), k.s, t);
      CUDA_OK(forward(reinterpret_cast<__nv_bfloat16*>(inputs[static_cast<size_t>(t)]), reinterpret_cast<__nv_bfloat16*>(out), k.n, k.c, k.s, opt));
    }
    golden[static_cast<size_t>(t)].resize(bytes[static_cast<size_t>(t)]);
    CUDA_OK(cudaMemcpy(golden[static_cast<size_t>(t)].data(), out, bytes[static_cast<size_t>(t)], cudaMemcpyDeviceToHost));
    CUDA_OK(cudaFree(out));
  }
  std::atomic<int> bad{0};
  std::atomic<bool> stop{false};
  auto worker = [&](int t) {
    cudaStream_t st;
    if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) {
      ++bad;
      return;
    }
    const Case& k = cases[t];
    const Options opt = options_of(k);
    void* out = nullptr;
    if (cudaMalloc(&out, bytes[static_cast<size_t>(t)]) != cudaSuccess) ++bad;
    for (int i = 0; i < kCalls && out; ++i) {
      cudaError_t e;
      if (k.type == 0)
        e = forward(reinterpret_cast<const float*>(inputs[static_cast<size_t>(t)]), static_cast<float*>(out), k.n, k.c, k.s, opt, st);
      else if (k.type == 1)
        e = forward(reinterpret_cast<const __half*>(inputs[static_cast<size_t>(t)]), static_cast<__half*>(out), k.n, k.c, k.s, opt, st);
      else
        e = forward(reinterpret_cast<const __nv_bfloat16*>(inputs[static_cast<size_t>(t)]), static_cast<__nv_bfloat16*>(out), k.n, k.c, k.s, opt, st);
      if (e != cudaSuccess) ++bad;
    }
    std::vector<unsigned char> h(bytes[static_cast<size_t>(t)]);
    if (cudaStreamSynchronize(st) != cudaSuccess ||
        cudaMemcpy(h.data(), out, h.size(), cudaMemcpyDeviceToHost) != cudaSuccess ||
        h != golden[static_cast<size_t>(t)])
      ++bad;
    cudaFree(out);
    cudaStreamDestroy(st);
  };
  auto load = [&] {
    cudaStream_t st;
    if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) return;
    while (!stop.load()) {
      busy_kernel<<<64, 128, 0, st>>>(50000);
      cudaStreamSynchronize(st);
    }
    cudaStreamDestroy(st);
  };
  auto all = std::async(std::launch::async, [&] {
    std::thread loader(load);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (auto& th : threads) th.join();
    stop = true;
    loader.join();
  });
  if (all.wait_for(std::chrono::seconds(300)) != std::future_status::ready) {
    ADD_FAILURE() << "watchdog: concurrent calls did not finish in 300 s (hang)";
    std::fflush(nullptr);
    std::_Exit(1);  // a hung kernel cannot be cancelled; fail instead of hanging the suite
  }
  EXPECT_EQ(bad.load(), 0);
  for (auto* p : inputs) cudaFree(p);
}

// ---------------------------------------------------------------- graphs and determinism

/// Captures `enqueue(stream)` (the calls writing `out`, `total` floats) in a CUDA graph and
/// replays it `reps` times, `out` reset to NaN before each: every replay must give the bits of
/// `want`, a device buffer written by direct calls.
template <class Enqueue>
void expect_graph_replays(Enqueue enqueue, const float* want, float* out, int64_t total, int reps,
                          const std::string& where) {
  cudaStream_t st;
  CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  const cudaError_t captured = enqueue(st);
  CUDA_OK(cudaStreamEndCapture(st, &graph));
  ASSERT_EQ(captured, cudaSuccess) << where;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<float> ha(static_cast<size_t>(total)), hb(static_cast<size_t>(total));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(ha.data(), want, total * 4, cudaMemcpyDeviceToHost));
  for (int rep = 0; rep < reps; ++rep) {
    CUDA_OK(cudaMemsetAsync(out, 0xff, total * 4, st));
    CUDA_OK(cudaGraphLaunch(exec, st));
    CUDA_OK(cudaStreamSynchronize(st));
    CUDA_OK(cudaMemcpy(hb.data(), out, total * 4, cudaMemcpyDeviceToHost));
    ASSERT_EQ(std::memcmp(ha.data(), hb.data(), total * 4), 0) << where << " replay " << rep;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
}

// The simple call and the options call, captured in a CUDA graph with the workspace they take
// stream-ordered (split plans need one), replayed 100 times: the bits of a direct call on the
// default stream, every time. Each shape is one the planner runs with the strategy it names
// (on the H100/H200), which the direct call checks.
TEST(Graph, CapturedCallsReplayBitIdenticalForEveryStrategy) {
  REQUIRE_GPU();
  struct Shape {
    int64_t n, c, s;
    Strategy strategy;
  };
  for (const Shape& k :
       {Shape{16, 8, 1024, Strategy::kSubWarp}, Shape{64, 16, 49, Strategy::kStaged},
        Shape{4, 4, 16384, Strategy::kBlock}, Shape{1, 64, 1 << 16, Strategy::kSplit},
        Shape{1, 8, 1 << 20, Strategy::kSplit}, Shape{1, 1, 1 << 24, Strategy::kSplitStream}}) {
    const int64_t total = k.n * k.c * k.s;
    size_t ws = 0;
    CUDA_OK(workspace_size<float>(k.n, k.c, k.s, Options{}, &ws));
    DeviceBuffer<float> dx(static_cast<size_t>(total)), a(static_cast<size_t>(total)), b(static_cast<size_t>(total)), m(static_cast<size_t>(k.n * k.c));
    fill_hash<<<1024, 256>>>(dx.ptr, total, k.s, 9);
    Options opt;
    opt.save_mean = m.ptr;
    Plan plan;  // forward(dx, a, n, c, s)'s plan
    CUDA_OK(detail::forward_tuned(dx.ptr, a.ptr, k.n, k.c, k.s, Options{}, PlanOverride{}, nullptr,
                                  nullptr, &plan));
    EXPECT_EQ(plan.strategy, k.strategy)
        << "S=" << k.s << ": " << to_string(plan.strategy) << " ran";
    expect_graph_replays(
        [&](cudaStream_t st) {
          const cudaError_t e = forward(dx.ptr, b.ptr, k.n, k.c, k.s, 1e-5f, st);
          return e != cudaSuccess ? e : forward(dx.ptr, b.ptr, k.n, k.c, k.s, opt, st);
        },
        a.ptr, b.ptr, total, 100, "S=" + std::to_string(k.s) + " workspace " + std::to_string(ws));
  }
}

// Channels-last in a graph: the options call with its stream-ordered workspace (the exchange
// slots of the blocks of a slice, or the tiled plan's partials), captured and replayed 20 times,
// with the bits of a direct call; on chip with one block per slice (forced) and with several
// (the planner's choice for the larger shapes, on the H100/H200), and tiled (forced).
TEST(Graph, NhwcCapturedCallsReplayBitIdentical) {
  REQUIRE_GPU();
  PlanOverride one;
  one.nhwc_on_chip = 1;
  one.blocks_per_plane = 1;
  PlanOverride tiled;
  tiled.nhwc_on_chip = 0;
  struct Shape {
    int64_t n, c, s;
    PlanOverride ov;
    bool on_chip, several;  ///< must run on chip; with more than one block per slice
  };
  for (const Shape& k : {Shape{4, 64, 256, one, true, false}, Shape{4, 64, 4096, {}, true, true},
                         Shape{2, 64, 65536, {}, true, true}, Shape{1, 32, 1 << 18, {}, true, true},
                         Shape{1, 32, 1 << 18, tiled, false, false}}) {
    const int64_t total = k.n * k.c * k.s;
    DeviceBuffer<float> dx(static_cast<size_t>(total)), a(static_cast<size_t>(total)),
        b(static_cast<size_t>(total)), m(static_cast<size_t>(k.n * k.c));
    fill_hash<<<1024, 256>>>(dx.ptr, total, k.s, 11);
    Options opt;
    opt.layout = Layout::kNHWC;
    opt.save_mean = m.ptr;
    const std::string where = "NHWC S=" + std::to_string(k.s) + (k.on_chip ? "" : " tiled");
    NhwcPlan plan;
    CUDA_OK(detail::forward_tuned(dx.ptr, a.ptr, k.n, k.c, k.s, opt, k.ov, nullptr, nullptr,
                                  nullptr, &plan));
    EXPECT_EQ(plan.on_chip, k.on_chip) << where;
    EXPECT_EQ(plan.blocks_per_unit > 1, k.several) << where << ": G=" << plan.blocks_per_unit;
    expect_graph_replays(
        [&](cudaStream_t st) {
          return detail::forward_tuned(dx.ptr, b.ptr, k.n, k.c, k.s, opt, k.ov, nullptr, st);
        },
        a.ptr, b.ptr, total, 20, where);
  }
}

// The backward in a graph: forward (saving the statistics), then the backward's stream-ordered
// call with dx, dgamma and dbeta in one buffer, captured and replayed 20 times, with the bits
// of a direct call. Channels-last GroupNorm with SiLU runs the tiled chain (residual sums and
// finalize, sums, finalize over a block of warps, dx, parameter gradients), launched as
// programmatic dependents on sm_90; the NCHW row runs the one-pass kernel.
TEST(Graph, BackwardCapturedCallsReplayBitIdentical) {
  REQUIRE_GPU();
  struct Shape {
    int64_t n, c, s, groups;
    Layout layout;
    Activation act;
  };
  for (const Shape& k : {Shape{8, 32, 4096, 0, Layout::kNCHW, Activation::kNone},
                         Shape{2, 320, 4096, 32, Layout::kNHWC, Activation::kSilu},
                         Shape{3, 96, 1000, 8, Layout::kNHWC, Activation::kNone},
                         Shape{4, 64, 1024, 0, Layout::kNHWC, Activation::kRelu}}) {
    const int64_t total = k.n * k.c * k.s, out_len = total + 2 * k.c;
    const int64_t units = k.n * (k.groups == 0 ? k.c : k.groups);
    DeviceBuffer<float> x(static_cast<size_t>(total)), y(static_cast<size_t>(total)),
        dy(static_cast<size_t>(total)), a(static_cast<size_t>(out_len)),
        b(static_cast<size_t>(out_len)), mean(static_cast<size_t>(units)),
        rstd(static_cast<size_t>(units)), params(static_cast<size_t>(2 * k.c));
    fill_hash<<<1024, 256>>>(x.ptr, total, k.s, 21);
    fill_hash<<<1024, 256>>>(dy.ptr, total, k.s, 22);
    fill_hash<<<64, 256>>>(params.ptr, 2 * k.c, k.c, 23);
    Options opt;
    opt.layout = k.layout;
    opt.groups = k.groups;
    opt.activation = k.act;
    opt.gamma = params.ptr;
    opt.beta = params.ptr + k.c;
    opt.save_mean = mean.ptr;
    opt.save_rstd = rstd.ptr;
    CUDA_OK(forward(x.ptr, y.ptr, k.n, k.c, k.s, opt));
    const auto grads_in = [&](float* out) {
      Gradients g;
      g.dgamma = out + total;
      g.dbeta = out + total + k.c;
      return g;
    };
    CUDA_OK(backward(x.ptr, dy.ptr, a.ptr, k.n, k.c, k.s, opt, grads_in(a.ptr)));
    const std::string where = std::string(k.layout == Layout::kNHWC ? "NHWC" : "NCHW") +
                              " backward " + std::to_string(k.n) + "x" + std::to_string(k.c) +
                              "x" + std::to_string(k.s) + " G" + std::to_string(k.groups);
    expect_graph_replays(
        [&](cudaStream_t st) {
          return backward(x.ptr, dy.ptr, b.ptr, k.n, k.c, k.s, opt, grads_in(b.ptr), st);
        },
        a.ptr, b.ptr, out_len, 20, where);
    if (k.layout != Layout::kNHWC) continue;
    // The on-chip channels-last backward (opt-in), whose exchange slots live in the
    // stream-ordered workspace: asserted to run, then captured and replayed.
    PlanOverride chip;
    chip.nhwc_bwd_on_chip = 1;
    bool ran = false;
    CUDA_OK(detail::backward_tuned(x.ptr, dy.ptr, a.ptr, k.n, k.c, k.s, opt, grads_in(a.ptr),
                                   chip, nullptr, nullptr, 0, true, nullptr, nullptr, &ran));
    EXPECT_TRUE(ran) << where << ": the on-chip backward ran";
    expect_graph_replays(
        [&](cudaStream_t st) {
          return detail::backward_tuned(x.ptr, dy.ptr, b.ptr, k.n, k.c, k.s, opt,
                                        grads_in(b.ptr), chip, nullptr, nullptr, 0, true, st);
        },
        a.ptr, b.ptr, out_len, 20, where + " on chip");
  }
}

// ---------------------------------------------------------------- accuracy on hostile data

template <class T>
std::vector<T> to_type(const std::vector<double>& d) {
  std::vector<T> h(d.size());
  for (size_t i = 0; i < d.size(); ++i) h[i] = to_t<T>(float(d[i]));
  return h;
}

/// Largest magnitude the hostile data of T may take (fp16 overflows at 65504).
template <class T>
double limit_of() {
  return std::is_same<T, __half>::value ? 6e4 : 1e30;
}

/// NCHW plans for the accuracy suite: every strategy forced (the split-with-shared-memory plan
/// sized so that a slice of T extends past the registers), and GroupNorm on the block and
/// staged plans. `strategy` is what must run.
struct AccuracyCase {
  const char* name;
  int64_t n, c, s, groups;
  PlanOverride ov;
  Strategy strategy;
  bool smem;  ///< the split plan must hold part of its slice in shared memory
  bool ragged = false;  ///< Plan::ragged must hold
};

template <class T>
std::vector<AccuracyCase> accuracy_cases() {
  const auto forced = [](Strategy s, int64_t g = 0, int smem = -1) {
    PlanOverride ov;
    ov.strategy = int(s);
    ov.blocks_per_plane = g;
    ov.split_smem = smem;
    return ov;
  };
  PlanOverride stream = forced(Strategy::kSplitStream, 2);
  stream.items = 1;
  stream.threads = 64;
  // 128 KB slices of a 2^18-element plane: past a 256-thread block's registers, within its
  // registers and shared memory (the sm_90 table's split blocks).
  const int64_t g_smem = 2 * int64_t(sizeof(T));
  return {{"subwarp", 64, 8, 49, 0, forced(Strategy::kSubWarp), Strategy::kSubWarp, false},
          {"subwarp-aligned", 16, 8, 1024, 0, forced(Strategy::kSubWarp), Strategy::kSubWarp, false},
          {"staged", 64, 8, 49, 0, forced(Strategy::kStaged), Strategy::kStaged, false},
          {"block", 4, 4, 16384, 0, forced(Strategy::kBlock), Strategy::kBlock, false},
          {"split", 2, 3, 65536, 0, forced(Strategy::kSplit, 3), Strategy::kSplit, false},
          {"split-smem", 1, 2, 1 << 18, 0, forced(Strategy::kSplit, g_smem, 1), Strategy::kSplit, true},
          {"split-stream", 1, 3, 65536, 0, stream, Strategy::kSplitStream, false},
          {"groupnorm-block", 2, 32, 4096, 4, forced(Strategy::kBlock), Strategy::kBlock, false},
          {"groupnorm-staged", 4, 64, 49, 16, forced(Strategy::kStaged), Strategy::kStaged, false},
          {"groupnorm-split", 1, 8, 65536, 2, forced(Strategy::kSplit, 8), Strategy::kSplit, false},
          // Odd plane lengths: 16-byte bodies with scalar heads and tails, whose values (first
          // and last positions included) join the moments by the two-pass sums.
          {"block-ragged", 4, 4, 16383, 0, forced(Strategy::kBlock), Strategy::kBlock, false, true},
          {"split-ragged", 2, 3, 65535, 0, forced(Strategy::kSplit, 3), Strategy::kSplit, false, true},
          {"split-stream-ragged", 1, 3, 65537, 0, stream, Strategy::kSplitStream, false, true},
          {"groupnorm-ragged", 2, 8, 4097, 4, forced(Strategy::kBlock), Strategy::kBlock, false, true}};
}

template <class T>
void accuracy_nchw() {
  for (const auto& k : accuracy_cases<T>()) {
    for (const auto& h : hostile_cases(std::is_same<T, float>::value)) {
      SCOPED_TRACE(std::string(type_name<T>()) + " " + k.name + " " + h.name());
      const int64_t groups = k.groups ? k.groups : k.c;
      Options opt;
      opt.groups = k.groups;
      const auto x = to_type<T>(hostile_planes(h, k.n * groups, (k.c / groups) * k.s, 5, limit_of<T>()));
      const PlansRun run = check_input<T>(x, k.n, k.c, k.s, k.ov, opt);
      ASSERT_EQ(run.plan.strategy, k.strategy);
      ASSERT_EQ(run.plan.ragged, k.ragged);
      if (k.smem) ASSERT_GT(run.plan.smem_items, 0);
    }
  }
}

// Outliers of 1e3 to 1e6 std at the first, last, a random or several positions, Student-t with
// 1 and 2 degrees of freedom, two far-apart clusters, a small far cluster, and (fp32) means of
// 1e4 and 1e6 std: every strategy, every type, GroupNorm, within the bounds (fp32 1e-5
// absolute and 1e-6 relative; 16-bit one ulp plus 2^-20) and bit-identical on a rerun.
TEST(Accuracy, HostileDataEveryStrategyAndType) {
  REQUIRE_GPU();
  accuracy_nchw<float>();
  accuracy_nchw<__half>();
  accuracy_nchw<__nv_bfloat16>();
}

template <class T>
void accuracy_nhwc() {
  for (const auto& k : nhwc_cases()) {
    for (const auto& h : hostile_cases(std::is_same<T, float>::value)) {
      SCOPED_TRACE(std::string(type_name<T>()) + " " + k.name + " " + h.name());
      const auto planes = to_type<T>(hostile_planes(h, k.n * k.c, k.s, 6, limit_of<T>()));
      const PlansRun run =
          check_input<T>(nhwc_of(planes, k.n, k.c, k.s), k.n, k.c, k.s, k.ov, nhwc_options(k.groups));
      ASSERT_EQ(run.nhwc.on_chip, k.ov.nhwc_on_chip != 0) << "on-chip plan expected: " << k.name;
      if (k.ov.blocks_per_plane > 0) ASSERT_EQ(run.nhwc.blocks_per_unit, k.ov.blocks_per_plane);
    }
  }
}

// The same data channels-last: the on-chip plan (the planner's G, and G = 6 blocks exchanging
// per-channel partials), the tiled plan and GroupNorm.
TEST(Accuracy, NhwcHostileDataEveryPlanAndType) {
  REQUIRE_GPU();
  accuracy_nhwc<float>();
  accuracy_nhwc<__half>();
  accuracy_nhwc<__nv_bfloat16>();
}

/// Writes the plans that ran to `ran`.
template <class T>
void constant_case(int64_t n, int64_t c, int64_t s, const PlanOverride& ov, const Options& opt,
                   float value, PlansRun* ran) {
  const size_t total = size_t(n * c * s);
  const T v = to_t<T>(value);
  std::vector<T> h(total, v);
  DeviceBuffer<T> dx(total), dy(total);
  ASSERT_NE(dx.ptr, nullptr);
  CUDA_OK(cudaMemcpy(dx.ptr, h.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dy.ptr, 0xff, total * sizeof(T)));
  CUDA_OK(detail::forward_tuned(dx.ptr, dy.ptr, n, c, s, opt, ov, nullptr, nullptr, &ran->plan,
                                &ran->nhwc));
  CUDA_OK(cudaMemcpy(h.data(), dy.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < total; ++i)
    ASSERT_EQ(reference::to_double(h[i]), 0.0) << type_name<T>() << " constant " << value
                                                << " element " << i;
}

// A constant plane (eps > 0, no affine) gives exactly 0 on every plan and layout.
TEST(Accuracy, ConstantPlanesGiveExactZerosEveryPlan) {
  REQUIRE_GPU();
  for (float value : {0.1f, -7.77f, 1e4f + 0.3f, 3e4f}) {
    for (const auto& k : accuracy_cases<float>()) {
      SCOPED_TRACE(k.name);
      Options opt;
      opt.groups = k.groups;
      PlansRun ran[3];
      constant_case<float>(k.n, k.c, k.s, k.ov, opt, value, &ran[0]);
      constant_case<__half>(k.n, k.c, k.s, k.ov, opt, value, &ran[1]);
      constant_case<__nv_bfloat16>(k.n, k.c, k.s, k.ov, opt, value, &ran[2]);
      for (const PlansRun& r : ran)
        EXPECT_EQ(r.plan.strategy, k.strategy) << to_string(r.plan.strategy) << " ran";
    }
    for (const auto& k : nhwc_cases()) {
      SCOPED_TRACE(k.name);
      PlansRun ran[2];
      constant_case<float>(k.n, k.c, k.s, k.ov, nhwc_options(k.groups), value, &ran[0]);
      constant_case<__half>(k.n, k.c, k.s, k.ov, nhwc_options(k.groups), value, &ran[1]);
      expect_nhwc_plan(k, ran[0].nhwc, "fp32");
      expect_nhwc_plan(k, ran[1].nhwc, "fp16");
    }
  }
}

}  // namespace
