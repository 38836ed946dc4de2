// The backward (instnorm::backward): its validation and plans on the CPU, and on the device
// every strategy x type x layout x feature against the float64 reference backward
// (reference.h), with these accuracy bounds:
//  - fp32: ||dx - ref|| / ||rstd * g|| <= 1e-5 per plane (g = gamma * dy through the
//    activation's derivative; dx itself may be near 0);
//  - fp16/bf16: each element within 2 ulp of T at the reference's magnitude plus
//    2^-20 * max|rstd * g| of its plane, and the plane's error norm at most 1.5x that of the
//    float64 answer rounded to T (plus the fp32 floor);
//  - dgamma, dbeta: within 1e-5 of the sum of the magnitudes of their terms;
//  - bit-identical reruns.
// Also at |mean| = 1e4 std and with outliers, in place (dx == dy), and with the plan checked:
// a case named after a strategy asserts that strategy ran.
#include "device_tables.h"
#include "gpu_util.h"
#include "hostile_data.h"

namespace {

using namespace instnorm;
using namespace instnorm_test;

// ---------------------------------------------------------------- CPU: validation and plans

const void* const kX = reinterpret_cast<const void*>(uintptr_t(1) << 32);
const void* const kDy = reinterpret_cast<const void*>(uintptr_t(2) << 32);
void* const kDx = reinterpret_cast<void*>(uintptr_t(3) << 32);
float* const kStats = reinterpret_cast<float*>(uintptr_t(4) << 32);
float* const kGrad = reinterpret_cast<float*>(uintptr_t(5) << 32);

Invalid check_bwd(const void* x, const void* dy, const void* dx, const Options& opt,
                  const Gradients& g = {}) {
  Problem prob;
  return validate_backward(x, dy, dx, 2, 3, 16, 4, opt, g, &prob);
}

int64_t ceil_div_test(int64_t a, int64_t b) { return (a + b - 1) / b; }

Options trained() {
  Options opt;
  opt.save_mean = kStats;
  opt.save_rstd = kStats + 1024;
  return opt;
}

TEST(BackwardValidate, RefusesWithAReasonBeforeAnyLaunch) {
  const Options ok = trained();
  EXPECT_EQ(check_bwd(kX, kDy, kDx, ok), Invalid::kOk);
  // dx may be dy or x, never a part of either.
  EXPECT_EQ(check_bwd(kX, kDy, const_cast<void*>(kDy), ok), Invalid::kOk);
  EXPECT_EQ(check_bwd(kX, kDy, const_cast<void*>(kX), ok), Invalid::kOk);
  EXPECT_EQ(check_bwd(kX, kDy, static_cast<const char*>(kDy) + 4, ok), Invalid::kOverlap);
  EXPECT_EQ(check_bwd(kX, kDy, static_cast<const char*>(kX) + 4, ok), Invalid::kOverlap);
  EXPECT_EQ(check_bwd(kX, nullptr, kDx, ok), Invalid::kNullPointer);
  EXPECT_EQ(check_bwd(kX, kDy, nullptr, ok), Invalid::kNullPointer);
  // The saved statistics are required with use_input_stats, not in eval mode.
  Options no_stats;
  EXPECT_EQ(check_bwd(kX, kDy, kDx, no_stats), Invalid::kNoSavedStats);
  Options eval;
  eval.use_input_stats = false;
  eval.running_mean = kStats;
  eval.running_var = kStats + 64;
  EXPECT_EQ(check_bwd(kX, kDy, kDx, eval), Invalid::kOk);
  // Gradient buffers: distinct, and not inside a tensor.
  EXPECT_EQ(check_bwd(kX, kDy, kDx, ok, Gradients{kGrad, kGrad + 3}), Invalid::kOk);
  EXPECT_EQ(check_bwd(kX, kDy, kDx, ok, Gradients{kGrad, kGrad}), Invalid::kBadGradients);
  EXPECT_EQ(check_bwd(kX, kDy, kDx, ok, Gradients{kGrad, kGrad + 1}), Invalid::kBadGradients);
  EXPECT_EQ(check_bwd(kX, kDy, kDx, ok, Gradients{static_cast<float*>(kDx) + 8, nullptr}),
            Invalid::kBadGradients);
  // The forward's rules carry over.
  Options bad = ok;
  bad.eps = -1.f;
  EXPECT_EQ(check_bwd(kX, kDy, kDx, bad), Invalid::kBadEps);
  bad = ok;
  bad.groups = 2;
  EXPECT_EQ(check_bwd(kX, kDy, kDx, bad), Invalid::kBadGroups);
  // The public calls map the reasons before any CUDA call (no device needed).
  Options none;
  EXPECT_EQ(backward(static_cast<const float*>(kX), static_cast<const float*>(kDy),
                     static_cast<float*>(kDx), 2, 3, 16, none),
            cudaErrorInvalidValue);
  size_t bytes = 1;
  EXPECT_EQ(backward_workspace_size<float>(2, 3, 16, none, Gradients{}, &bytes),
            cudaErrorInvalidValue);
  EXPECT_EQ(backward_workspace_size<float>(0, 3, 16, none, Gradients{}, &bytes), cudaSuccess);
  EXPECT_EQ(bytes, 0u);
}


// Backward plans: sized for two tensors within the kernel's item limits, staged units of x
// and dy for misaligned planes, per-channel shared memory for GroupNorm's parameter gradients,
// and valid for every shape of a sweep.
TEST(BackwardPlan, HoldsTwoTensors) {
  const DeviceProps d = instnorm_tables::sm90();
  const ArchPolicy& pol = policy_for(d);
  std::mt19937_64 rng(7);
  int checked = 0, staged = 0;
  for (int i = 0; i < 3000; ++i) {
    const int64_t n = 1 + rng() % 64, g = 1 + rng() % 8, cpg = 1 + rng() % 6;
    const int64_t s = 1 + (i % 2 ? rng() % 20000 : rng() % 64);  // half of them small planes
    const int eb = (rng() & 1) ? 4 : 2;
    Problem prob;
    Options opt = trained();
    opt.groups = cpg > 1 ? g : 0;
    const int64_t c = opt.groups ? g * cpg : g;
    if (validate(kX, kDx, n, c, s, eb, opt, &prob) != Invalid::kOk) continue;
    const bool grads = rng() & 1;
    Plan plan;
    ASSERT_TRUE(detail::make_backward_plan(prob, d, pol, grads, &plan))
        << n << "x" << c << "x" << s << " eb " << eb;
    EXPECT_EQ(plan.direction, Direction::kBackward);
    ++checked;
    if (plan.strategy == Strategy::kStaged) {
      ++staged;
      EXPECT_GE(plan.smem_bytes, 2 * ((plan.threads / plan.lanes) * prob.plane_len * eb));
      continue;
    }
    EXPECT_LE(plan.items, plan.strategy == Strategy::kSplitStream
                              ? max_backward_stream_items(plan.vec)
                              : max_backward_items(plan.vec));
    // Shared memory: x's and dy's extension, then the per-vector sums of GroupNorm's partials.
    const int64_t ext = int64_t(plan.smem_items) * plan.threads * plan.vec * eb * 2;
    const int64_t sums = grads && prob.channels_per_group > 1
                             ? int64_t(plan.threads) * (plan.items + plan.smem_items) * 8
                             : 0;
    EXPECT_EQ(plan.smem_bytes, ext + sums);
    if (plan.smem_items > 0) EXPECT_EQ(plan.strategy, Strategy::kSplit);
  }
  EXPECT_GT(checked, 2000);
  EXPECT_GT(staged, 50);
  // GroupNorm with dgamma/dbeta keeps its slices extended into shared memory (more blocks per
  // group rather than register-only slices).
  {
    Problem gp;
    Options go = trained();
    go.groups = 32;
    ASSERT_EQ(validate(kX, kDx, 1, 256, 256 * 256, 2, go, &gp), Invalid::kOk);
    Plan gplan;
    ASSERT_TRUE(detail::make_backward_plan(gp, d, pol, true, &gplan));
    EXPECT_EQ(gplan.strategy, Strategy::kSplit);
    EXPECT_GT(gplan.smem_items, 0);
    EXPECT_LT(gplan.blocks_per_plane, 52);
  }
  // An instance-norm plane a block would hold runs as one smaller split block with its slice
  // extended into shared memory (more planes in flight per SM); GroupNorm keeps its block plan.
  {
    Problem ip;
    ASSERT_EQ(validate(kX, kDx, 4, 512, 64 * 64, 4, trained(), &ip), Invalid::kOk);
    Plan iplan;
    ASSERT_TRUE(detail::make_backward_plan(ip, d, pol, false, &iplan));
    EXPECT_EQ(iplan.strategy, Strategy::kSplit);
    EXPECT_EQ(iplan.blocks_per_plane, 1);
    EXPECT_EQ(iplan.threads, 128);
    EXPECT_GT(iplan.smem_items, 0);
    EXPECT_FALSE(iplan.cooperative);
    Problem gp;
    Options go = trained();
    go.groups = 256;
    ASSERT_EQ(validate(kX, kDx, 4, 512, 64 * 64, 4, go, &gp), Invalid::kOk);
    Plan gplan;
    ASSERT_TRUE(detail::make_backward_plan(gp, d, pol, false, &gplan));
    EXPECT_EQ(gplan.strategy, Strategy::kBlock);
  }
  // A misaligned 7x7 plane is staged.
  Problem prob;
  ASSERT_EQ(validate(kX, kDx, 4, 8, 49, 4, trained(), &prob), Invalid::kOk);
  Plan plan;
  EXPECT_TRUE(detail::make_backward_plan(prob, d, pol, false, &plan));
  EXPECT_EQ(plan.strategy, Strategy::kStaged);
}


// The on-chip channels-last backward's plan (make_nhwc_grad_chip_plan): asked for only
// (the tiled chain stays the default until a device run has timed it); where it exists, valid
// on the device (co-resident groups, shared memory, one-hop exchange) with slices of whole
// groups; none for eval mode, rows that are not 16-byte aligned, or groups wider than a slice
// may be. The diffusion U-Net and channels-last affine rows of the backward table fit one
// round of units on the H100/H200.
TEST(BackwardPlan, NhwcOnChipWhereAskedAndValid) {
  // The merge's lanes per channel and loads per thread, as the kernel walks them: 80 channels
  // get 2 lanes (128 channels a pass), 40 get 4 (L rounded down from 6), 512 one lane in two
  // passes, one channel a whole warp.
  EXPECT_EQ(nhwc_grad_chip_merge_lanes(80), 2);
  EXPECT_EQ(nhwc_grad_chip_merge_lanes(40), 4);
  EXPECT_EQ(nhwc_grad_chip_merge_lanes(512), 1);
  EXPECT_EQ(nhwc_grad_chip_merge_lanes(1), 32);
  EXPECT_EQ(nhwc_grad_chip_merge_loads(15, 80), 8);
  EXPECT_EQ(nhwc_grad_chip_merge_loads(102, 40), 26);
  EXPECT_EQ(nhwc_grad_chip_merge_loads(3, 512), 6);
  for (const DeviceProps& d : {instnorm_tables::sm90(), instnorm_tables::h200(),
                               instnorm_tables::sm89()}) {
    const ArchPolicy& pol = policy_for(d);
    PlanOverride ask;
    ask.nhwc_bwd_on_chip = 1;
    const auto plan_of = [&](int64_t n, int64_t c, int64_t s, int eb, Options opt,
                             detail::NhwcGradChipPlan* p, const PlanOverride& ov) {
      opt.layout = Layout::kNHWC;
      Problem prob;
      if (validate_backward(kX, kDy, kDx, n, c, s, eb, opt, {}, &prob) != Invalid::kOk)
        return false;
      const bool ok = detail::make_nhwc_grad_chip_plan(prob, opt, d, pol, ov, p);
      if (ok) {
        EXPECT_TRUE(detail::nhwc_grad_chip_plan_is_valid(*p, prob, opt, d));
        // The kernel's carve-up, counted here from its pieces: a float4 per thread and channel
        // of its vector, nine float arrays of the slice's channels (each rounded to 4 floats),
        // and each thread's rows of x and dy, 16 bytes each; two 256-thread blocks per SM at
        // most (128 registers), and every block of a cooperative grid resident at once.
        const int64_t chs = int64_t(p->cols) * p->vec;
        const int64_t carve = 256 * p->vec * 16 + 9 * ((chs + 3) / 4 * 4) * 4 +
                              2 * int64_t(p->rows) * 256 * 16;
        EXPECT_EQ(p->smem_bytes, carve);
        EXPECT_EQ(p->vec * eb, 16);
        EXPECT_EQ(p->row_lanes, 256 / p->cols);
        EXPECT_EQ(p->col_slices * p->cols * p->vec, c) << "slices cover the row";
        const int64_t per_sm = std::min<int64_t>(2, d.smem_per_sm / (p->smem_bytes + 1024));
        EXPECT_GE(per_sm, 1);
        if (p->G > 1) EXPECT_LE(p->grid, per_sm * d.sm_count) << "co-resident";
        EXPECT_EQ(p->grid, p->block_groups * p->G);
        EXPECT_EQ(int64_t(p->cols) * p->vec % prob.channels_per_group, 0) << "whole groups";
        EXPECT_LE(int64_t(p->cols) * p->vec, kNhwcGradChipMaxChannels);
        if (p->G > 1)
          EXPECT_LE(nhwc_grad_chip_merge_loads(p->G, int64_t(p->cols) * p->vec),
                    kNhwcGradChipMaxLoads);
        EXPECT_GE(p->slice_rows * p->G, s);
        EXPECT_LE(p->smem_bytes, d.smem_per_block_optin);
        // The default keeps the tiled chain; asked, this plan runs.
        detail::NhwcGradChipPlan q;
        EXPECT_FALSE(detail::nhwc_backward_on_chip(prob, opt, d, pol, PlanOverride{}, &q));
        EXPECT_EQ(detail::nhwc_backward_on_chip(prob, opt, d, pol, ov, &q), ov.nhwc_bwd_on_chip == 1);
      }
      return ok;
    };
    Options gn = trained();
    gn.groups = 32;
    detail::NhwcGradChipPlan p;
    ASSERT_TRUE(plan_of(2, 320, 64 * 64, 2, gn, &p, ask)) << d.sm_count;
    // Hopper's 228 KB per SM hold the whole tensor in one round of units; the 4090's 100 KB
    // take two or three.
    const bool hopper = d.smem_per_sm > 200 * 1024;
    if (hopper) EXPECT_EQ(ceil_div_test(2 * p.col_slices, p.block_groups), 1) << "one round";
    ASSERT_TRUE(plan_of(2, 640, 32 * 32, 2, gn, &p, ask));
    ASSERT_TRUE(plan_of(8, 128, 64 * 64, 2, trained(), &p, ask));
    if (hopper) EXPECT_EQ(ceil_div_test(8 * p.col_slices, p.block_groups), 1) << "one round";
    ASSERT_TRUE(plan_of(16, 64, 128 * 128, 4, trained(), &p, ask));
    // A forced G is kept, blocks without rows included.
    PlanOverride g7 = ask;
    g7.blocks_per_plane = 7;
    ASSERT_TRUE(plan_of(1, 16, 5 * 5, 4, trained(), &p, g7));
    EXPECT_EQ(p.G, 7);
    // None: eval mode, rows not 16-byte aligned, a group wider than a slice may be.
    Options ev;
    ev.use_input_stats = false;
    ev.running_mean = kStats;
    ev.running_var = kStats + 1024;
    EXPECT_FALSE(plan_of(2, 64, 16 * 16, 4, ev, &p, ask));
    EXPECT_FALSE(plan_of(2, 5, 16 * 16, 4, trained(), &p, ask));
    Options wide = trained();
    wide.groups = 1;
    EXPECT_FALSE(plan_of(2, 1024, 8 * 8, 4, wide, &p, ask));
    // A sweep: every plan found is valid (checked inside plan_of).
    std::mt19937_64 rng(11);
    int found = 0;
    for (int i = 0; i < 2000; ++i) {
      const int eb = (rng() & 1) ? 4 : 2;
      const int64_t vec = 16 / eb;
      const int64_t n = 1 + rng() % 32, cpg = int64_t(1) << (rng() % 5);
      const int64_t c = vec * (1 + rng() % 64) * cpg;
      Options o = trained();
      o.groups = cpg > 1 && c % cpg == 0 ? c / cpg : 0;
      const int64_t s = 2 + rng() % (i % 2 ? 20000 : 300);
      PlanOverride ov = ask;
      if (rng() % 4 == 0) ov.blocks_per_plane = 1 + rng() % 40;
      found += plan_of(n, c, s, eb, o, &p, ov);
    }
    EXPECT_GT(found, 1000);
  }
}

// The channels-last backward's kernels launch as programmatic dependents only where the code
// that runs waits for its prerequisite: compiled for sm_90 or newer, on an sm_90 device. PTX of
// sm_80 JIT-compiled on an H100 has no griddepcontrol.wait, so an early launch would read the
// previous kernel's results before they exist.
TEST(BackwardPlan, DependentLaunchOnlyWhereTheKernelsWait) {
  DeviceProps d = instnorm_tables::sm90();
  d.code_arch = 90;
  EXPECT_TRUE(dependent_launch(d));
  d.code_arch = 0;  // unknown: the device's own
  EXPECT_TRUE(dependent_launch(d));
  d.code_arch = 80;
  EXPECT_FALSE(dependent_launch(d));
  d.code_arch = 89;
  EXPECT_FALSE(dependent_launch(d));
  DeviceProps ada = instnorm_tables::sm89();
  EXPECT_FALSE(dependent_launch(ada));
  ada.code_arch = 90;  // never so in practice: the device's capability still rules it out
  EXPECT_FALSE(dependent_launch(ada));
}

// dx's coefficients of the channels-last backward sit by coef_slot (channel k of column
// vector v at k * (c / vec) + v): every channel of an image gets its own slot among the c, for
// each vector width the dx step runs with, so no two channels' coefficients overwrite each
// other; and a column vector's k-th channels sit side by side (consecutive v, consecutive
// slots), which is what makes the dx step's loads coalesced.
TEST(BackwardWorkspace, NhwcCoefficientSlotsArePermutationsOfTheChannels) {
  for (const int vec : {1, 2, 4, 8}) {
    for (const int64_t c : {int64_t(8), int64_t(40), int64_t(320), int64_t(1024)}) {
      detail::NhwcGradParams<float> p{};
      p.c = c;
      p.coef_vec = vec;
      std::vector<int> hits(static_cast<size_t>(c), 0);
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t slot = detail::coef_slot(p, ch);
        ASSERT_GE(slot, 0) << "vec " << vec << " c " << c << " channel " << ch;
        ASSERT_LT(slot, c) << "vec " << vec << " c " << c << " channel " << ch;
        ++hits[static_cast<size_t>(slot)];
        if (ch >= vec)  // the same channel of the next column vector: the next slot
          EXPECT_EQ(detail::coef_slot(p, ch), detail::coef_slot(p, ch - vec) + 1) << ch;
      }
      for (int64_t i = 0; i < c; ++i) EXPECT_EQ(hits[static_cast<size_t>(i)], 1) << "slot " << i;
    }
  }
}

// The workspace of the parameter gradients. AdaIN's backward (instance norm, no gamma or beta,
// only dscale/dshift) on a one-block-per-plane plan takes no partials: the kernel stores
// dscale/dshift itself. Anything that needs the cross-image or cross-block sums keeps them.
// The NHWC backward keeps dx's folded coefficients: a float4 and a float per (image, channel).
TEST(BackwardWorkspace, PartialsOnlyWhereSumsAreReduced) {
  const DeviceProps d = instnorm_tables::sm90();
  const ArchPolicy& pol = policy_for(d);
  float* const scale = kGrad + 4096;
  Options adain = trained();
  adain.modulation.scale = scale;
  adain.modulation.shift = scale + 8 * 512;
  adain.unbiased = true;
  const Gradients only{nullptr, nullptr, kGrad, kGrad + 8 * 512};
  Problem prob;
  ASSERT_EQ(validate_backward(kX, kDy, kDx, 8, 512, 64 * 64, 2, adain, only, &prob), Invalid::kOk);
  Plan plan;
  ASSERT_TRUE(detail::make_backward_plan(prob, d, pol, true, &plan));
  ASSERT_EQ(plan.blocks_per_plane, 1) << "a 4096-element plane fits one block";
  ASSERT_NE(plan.strategy, Strategy::kSplitStream);
  EXPECT_TRUE(detail::direct_scale_shift(plan, prob, adain, only));
  EXPECT_EQ(detail::backward_workspace_layout(plan, prob, adain, only).partials_bytes, 0u);

  const size_t per_plane = size_t(8) * 512 * sizeof(float2);
  // dgamma asked: its sums run over images, so the partials stay.
  const Gradients with_dgamma{kGrad + 2 * 8 * 512, nullptr, kGrad, kGrad + 8 * 512};
  EXPECT_FALSE(detail::direct_scale_shift(plan, prob, adain, with_dgamma));
  EXPECT_EQ(detail::backward_workspace_layout(plan, prob, adain, with_dgamma).partials_bytes,
            per_plane);
  // gamma present: dscale = gamma * sum(d * xhat) (+ beta * sum(d)), formed from the partials.
  Options affine = adain;
  affine.gamma = kStats + 4096;
  EXPECT_FALSE(detail::direct_scale_shift(plan, prob, affine, only));
  EXPECT_EQ(detail::backward_workspace_layout(plan, prob, affine, only).partials_bytes,
            per_plane);
  // Streamed or several blocks per plane: partials per block.
  Plan split = plan;
  split.strategy = Strategy::kSplitStream;
  EXPECT_FALSE(detail::direct_scale_shift(split, prob, adain, only));
  split = plan;
  split.blocks_per_plane = 3;
  EXPECT_EQ(detail::backward_workspace_layout(split, prob, adain, only).partials_bytes,
            3 * per_plane);
  // GroupNorm: a group's blocks cover several channels.
  Options gn = adain;
  gn.groups = 32;
  Problem gprob;
  ASSERT_EQ(validate_backward(kX, kDy, kDx, 8, 512, 64 * 64, 2, gn, only, &gprob), Invalid::kOk);
  EXPECT_FALSE(detail::direct_scale_shift(plan, gprob, gn, only));

  // Channels-last: dx's coefficients per (image, channel), the unit record per (image, group).
  Options cl = gn;
  cl.layout = Layout::kNHWC;
  Problem cprob;
  ASSERT_EQ(validate_backward(kX, kDy, kDx, 8, 512, 64 * 64, 2, cl, only, &cprob), Invalid::kOk);
  const detail::WorkspaceLayout w =
      detail::nhwc_backward_layout(detail::nhwc_grad_shape(cprob, d), cprob, only);
  EXPECT_EQ(w.coef_bytes, size_t(8) * 512 * (sizeof(float4) + sizeof(float)));
  EXPECT_EQ(w.group_stats_bytes, size_t(8) * 32 * sizeof(float4));
  EXPECT_GE(w.total, w.coef + w.coef_bytes);
  EXPECT_EQ(w.coef % alignof(float4), 0u);
}

// ---------------------------------------------------------------- device

struct BwdCase {
  int64_t n, c, s;
  int64_t groups = 0;
  Layout layout = Layout::kNCHW;
  Activation act = Activation::kNone;
  bool affine = false;
  bool eval = false;
  bool grads = true;     // ask for dgamma/dbeta
  bool in_place = false; // dx == dy
  int strategy = -1;     // forced (and asserted) NCHW strategy
  int64_t blocks = 0;    // forced G
  int items = 0;         // forced items
  bool expect_smem = false;  // the plan extends its slices into shared memory
  bool on_chip = false;      // channels-last: the on-chip backward, forced (and asserted)
  std::string describe() const {
    const char* acts[] = {"none", "relu", "silu"};
    return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(s) +
           (groups ? " gn" + std::to_string(groups) : "") +
           (layout == Layout::kNHWC ? " NHWC" : " NCHW") + (affine ? " affine" : "") +
           " act=" + acts[int(act)] + (eval ? " eval" : "") + (in_place ? " in-place" : "") +
           (strategy >= 0 ? std::string(" ") + to_string(Strategy(strategy)) : "") +
           (on_chip ? " on-chip" : "") + (blocks > 0 ? " G" + std::to_string(blocks) : "");
  }
};

struct BwdData {
  std::vector<double> x, dy;  // values before rounding to T
  double offset = 0;
};

BwdData normal_data(const BwdCase& k, double offset, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  BwdData d;
  const size_t size = size_t(k.n * k.c * k.s);
  d.x.resize(size);
  d.dy.resize(size);
  for (auto& v : d.x) v = offset + nd(rng);
  for (auto& v : d.dy) v = nd(rng);
  return d;
}

template <class T>
std::vector<T> to_type(const std::vector<double>& v) {
  std::vector<T> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = to_t<T>(float(v[i]));
  return r;
}

template <class T>
void run_case(const BwdCase& k, const BwdData& data, const std::string& what) {
  SCOPED_TRACE(std::string(type_name<T>()) + " " + k.describe() + " " + what);
  const size_t total = size_t(k.n * k.c * k.s);
  const std::vector<T> hx = to_type<T>(data.x), hdy = to_type<T>(data.dy);
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> ud(0.5, 1.5);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<float> gamma(size_t(k.c)), beta(size_t(k.c)), rm(size_t(k.c)), rv(size_t(k.c));
  for (auto& v : gamma) v = float((rng() & 1 ? 1 : -1) * ud(rng));
  for (auto& v : beta) v = float(0.3 * nd(rng));
  for (auto& v : rm) v = float(0.2 * nd(rng) + data.offset);
  for (auto& v : rv) v = float(ud(rng));
  const int64_t G = k.groups ? k.groups : k.c;

  DeviceBuffer<T> x(total), y(total), dy(total), dx(total);
  DeviceBuffer<float> dgamma(size_t(k.c)), dbeta(size_t(k.c)), dg2(size_t(k.c)), db2(size_t(k.c));
  DeviceBuffer<float> mean(size_t(k.n * G)), rstd(size_t(k.n * G));
  DeviceBuffer<float> g_d(size_t(k.c)), b_d(size_t(k.c)), rm_d(size_t(k.c)), rv_d(size_t(k.c));
  ASSERT_TRUE(x.ptr && y.ptr && dy.ptr && dx.ptr && mean.ptr && rstd.ptr);
  CUDA_OK(cudaMemcpy(x.ptr, hx.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dy.ptr, hdy.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(g_d.ptr, gamma.data(), gamma.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(b_d.ptr, beta.data(), beta.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(rm_d.ptr, rm.data(), rm.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(rv_d.ptr, rv.data(), rv.size() * 4, cudaMemcpyHostToDevice));

  Options opt;
  opt.groups = k.groups;
  opt.layout = k.layout;
  opt.activation = k.act;
  if (k.affine) {
    opt.gamma = g_d.ptr;
    opt.beta = b_d.ptr;
  }
  if (k.eval) {
    opt.use_input_stats = false;
    opt.running_mean = rm_d.ptr;
    opt.running_var = rv_d.ptr;
  } else {
    opt.save_mean = mean.ptr;
    opt.save_rstd = rstd.ptr;
    CUDA_OK(forward(x.ptr, y.ptr, k.n, k.c, k.s, opt));
  }
  PlanOverride ov;
  ov.strategy = k.strategy;
  ov.blocks_per_plane = k.blocks;
  ov.items = k.items;
  if (k.on_chip) ov.nhwc_bwd_on_chip = 1;
  const Gradients grads = k.grads ? Gradients{dgamma.ptr, dbeta.ptr} : Gradients{};
  T* out = k.in_place ? dy.ptr : dx.ptr;
  Plan used;
  bool ran_on_chip = false;
  CUDA_OK(detail::backward_tuned(x.ptr, dy.ptr, out, k.n, k.c, k.s, opt, grads, ov, nullptr,
                                 nullptr, 0, true, nullptr, &used, &ran_on_chip));
  CUDA_OK(cudaDeviceSynchronize());
  if (k.layout == Layout::kNHWC) EXPECT_EQ(ran_on_chip, k.on_chip) << "the on-chip backward ran";
  if (k.layout == Layout::kNCHW) {
    EXPECT_EQ(used.direction, Direction::kBackward);
    if (k.strategy >= 0) EXPECT_EQ(int(used.strategy), k.strategy) << "the forced strategy ran";
    if (k.blocks > 0) EXPECT_EQ(used.blocks_per_plane, k.blocks);
    if (k.expect_smem) EXPECT_GT(used.smem_items, 0) << "the slices extend into shared memory";
  }
  std::vector<T> hdx(total);
  CUDA_OK(cudaMemcpy(hdx.data(), out, total * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> hdg(size_t(k.c)), hdb(size_t(k.c));
  if (k.grads) {
    CUDA_OK(cudaMemcpy(hdg.data(), dgamma.ptr, hdg.size() * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(hdb.data(), dbeta.ptr, hdb.size() * 4, cudaMemcpyDeviceToHost));
  }

  // The reference, from the values the kernel read.
  Options ref_opt = opt;
  std::vector<float> one(size_t(k.c), 1.f), zero(size_t(k.c), 0.f);
  ref_opt.gamma = k.affine ? gamma.data() : one.data();  // dgamma exists without gamma too
  ref_opt.beta = k.affine ? beta.data() : zero.data();
  ref_opt.running_mean = rm.data();
  ref_opt.running_var = rv.data();
  std::vector<double> ref(total), rdg(size_t(k.c)), rdb(size_t(k.c));
  std::vector<reference::PlaneGradSums> sums;
  reference::backward<T, float>(hx.data(), hdy.data(), ref.data(), k.n, k.c, k.s, ref_opt,
                                rdg.data(), rdb.data(), &sums);

  // Per plane: the scale ||rstd * g|| and the bounds.
  const reference::RefShape shape(k.c, k.s, ref_opt);
  std::vector<double> dg_scale(size_t(k.c), 0.0), db_scale(size_t(k.c), 0.0);
  int bad = 0;
  for (int64_t plane = 0; plane < k.n * G; ++plane) {
    const reference::RefPlane pl = shape.plane(plane);
    const double mu = sums[size_t(plane)].mean, rs = sums[size_t(plane)].rstd;
    double g2 = 0, gmax = 0, err2 = 0, round2 = 0;
    for (int64_t e = 0; e < pl.len; ++e) {
      const int64_t i = pl.index(e), ch = pl.channel(e);
      const double xhat = (reference::to_double(hx[size_t(i)]) - mu) * rs;
      const double gm = ref_opt.gamma ? double(static_cast<const float*>(ref_opt.gamma)[ch]) : 1;
      const double bt = ref_opt.beta ? double(static_cast<const float*>(ref_opt.beta)[ch]) : 0;
      const double dpre = reference::to_double(hdy[size_t(i)]) *
                          reference::activate_derivative(xhat * gm + bt, k.act);
      g2 += (rs * gm * dpre) * (rs * gm * dpre);
      gmax = std::max(gmax, std::fabs(rs * gm * dpre));
      dg_scale[size_t(ch)] += std::fabs(dpre * xhat);
      db_scale[size_t(ch)] += std::fabs(dpre);
      const double got = reference::to_double(hdx[size_t(i)]);
      const double err = std::fabs(got - ref[size_t(i)]);
      err2 += err * err;
      const double rounded = reference::to_double(to_t<T>(float(ref[size_t(i)])));
      round2 += (rounded - ref[size_t(i)]) * (rounded - ref[size_t(i)]);
      if (!std::is_same<T, float>::value) {
        const double tol = 2 * ulp_of<T>(ref[size_t(i)]) + 0x1p-20 * gmax + 1e-6 * rs;
        if (!(err <= tol) && bad++ < 3)
          ADD_FAILURE() << "plane " << plane << " element " << e << ": " << got << " vs "
                        << ref[size_t(i)];
      }
    }
    const double norm = std::sqrt(g2);
    if (std::is_same<T, float>::value) {
      EXPECT_LE(std::sqrt(err2), 1e-5 * norm + 1e-30) << "plane " << plane;
    } else {
      EXPECT_LE(std::sqrt(err2), 1.5 * std::sqrt(round2) + 1e-5 * norm) << "plane " << plane;
    }
  }
  if (k.grads) {
    for (int64_t ch = 0; ch < k.c; ++ch) {
      EXPECT_NEAR(hdg[size_t(ch)], rdg[size_t(ch)], 1e-5 * dg_scale[size_t(ch)] + 1e-30)
          << "dgamma " << ch;
      EXPECT_NEAR(hdb[size_t(ch)], rdb[size_t(ch)], 1e-5 * db_scale[size_t(ch)] + 1e-30)
          << "dbeta " << ch;
    }
  }
  // Bit-identical rerun (not in place: dy was overwritten).
  if (!k.in_place) {
    DeviceBuffer<T> dx2(total);
    const Gradients g2 = k.grads ? Gradients{dg2.ptr, db2.ptr} : Gradients{};
    CUDA_OK(detail::backward_tuned(x.ptr, dy.ptr, dx2.ptr, k.n, k.c, k.s, opt, g2, ov, nullptr,
                                   nullptr, 0, true, nullptr));
    std::vector<T> again(total);
    CUDA_OK(cudaMemcpy(again.data(), dx2.ptr, total * sizeof(T), cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(again.data(), hdx.data(), total * sizeof(T)), 0) << "rerun differs";
    if (k.grads) {
      std::vector<float> a(size_t(k.c)), b(size_t(k.c));
      CUDA_OK(cudaMemcpy(a.data(), dg2.ptr, a.size() * 4, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(b.data(), db2.ptr, b.size() * 4, cudaMemcpyDeviceToHost));
      EXPECT_EQ(std::memcmp(a.data(), hdg.data(), a.size() * 4), 0) << "dgamma rerun differs";
      EXPECT_EQ(std::memcmp(b.data(), hdb.data(), b.size() * 4), 0) << "dbeta rerun differs";
    }
  }
}

template <class T>
void run_normal(const BwdCase& k, double offset = 0, uint64_t seed = 1) {
  run_case<T>(k, normal_data(k, offset, seed), "offset " + std::to_string(offset));
}

BwdCase with(BwdCase k, int strategy, int64_t blocks = 0, int items = 0) {
  k.strategy = strategy;
  k.blocks = blocks;
  k.items = items;
  return k;
}

constexpr int kSub = int(Strategy::kSubWarp), kBlk = int(Strategy::kBlock),
              kSpl = int(Strategy::kSplit), kStr = int(Strategy::kSplitStream),
              kStg = int(Strategy::kStaged);

// The NCHW strategies, instance norm and GroupNorm, with and without affine and activation.
template <class T>
void strategies_for() {
  const Activation acts[] = {Activation::kNone, Activation::kRelu, Activation::kSilu};
  for (const Activation a : acts) {
    for (const bool affine : {false, true}) {
      BwdCase in{4, 6, 256};
      in.act = a;
      in.affine = affine;
      run_normal<T>(with(in, kSub));
      BwdCase big{2, 3, 64 * 64};
      big.act = a;
      big.affine = affine;
      run_normal<T>(with(big, kBlk));
      run_normal<T>(with(big, kSpl, 3));
      run_normal<T>(with(big, kStr, 2, 2));
      BwdCase gn_small{2, 12, 8 * 8, 3};
      gn_small.act = a;
      gn_small.affine = affine;
      run_normal<T>(with(gn_small, kSub));
      BwdCase gn{2, 12, 20 * 20, 3};
      gn.act = a;
      gn.affine = affine;
      run_normal<T>(with(gn, kBlk));
      run_normal<T>(with(gn, kSpl, 4));
      run_normal<T>(with(gn, kStr, 3, 1));
      // Slices extended into shared memory, with and without GroupNorm's partials beside.
      BwdCase ext{2, 8, 128 * 128, 2};
      ext.act = a;
      ext.affine = affine;
      // (16-bit slices of this size fit a 512-thread block's registers: the planner's choice.)
      ext.expect_smem = std::is_same<T, float>::value;
      run_normal<T>(with(ext, kSpl, 4));
      ext.groups = 0;
      run_normal<T>(with(ext, kSpl, 1));
    }
  }
  // Misaligned planes: staged (7x7, odd lengths, GroupNorm of them), or the scalar kernel
  // (sub-warp, and a block-sized odd plane).
  for (const Activation a : acts) {
    BwdCase odd{3, 5, 49};
    odd.affine = true;
    odd.act = a;
    run_normal<T>(with(odd, kStg));
    run_normal<T>(with(odd, kSub));
    BwdCase odd_gn{2, 12, 7 * 7, 3};
    odd_gn.affine = true;
    odd_gn.act = a;
    run_normal<T>(with(odd_gn, kStg));
    BwdCase many{33, 7, 3 * 3};  // several units per block, a last part-full unit
    many.act = a;
    run_normal<T>(with(many, kStg));
  }
  BwdCase ev_odd{3, 5, 49};
  ev_odd.eval = true;
  ev_odd.affine = true;
  run_normal<T>(with(ev_odd, kStg));
  BwdCase odd_big{2, 3, 65 * 65};
  odd_big.affine = true;
  run_normal<T>(with(odd_big, kBlk));
  run_normal<T>(with(odd_big, kSpl, 2));
  // Eval mode (running statistics), planner's choice and forced split.
  BwdCase ev{3, 4, 32 * 32};
  ev.eval = true;
  ev.affine = true;
  ev.act = Activation::kRelu;
  run_normal<T>(ev);
  run_normal<T>(with(ev, kSpl, 2));
  // In place, and without parameter gradients.
  BwdCase ip{2, 8, 32 * 32, 4};
  ip.affine = true;
  ip.in_place = true;
  run_normal<T>(ip);
  ip.in_place = false;
  ip.grads = false;
  run_normal<T>(ip);
}

TEST(BackwardDevice, EveryStrategyFp32) {
  REQUIRE_GPU();
  strategies_for<float>();
}
TEST(BackwardDevice, EveryStrategyFp16) {
  REQUIRE_GPU();
  strategies_for<__half>();
}
TEST(BackwardDevice, EveryStrategyBf16) {
  REQUIRE_GPU();
  strategies_for<__nv_bfloat16>();
}

// Channels-last (the tiled fallback): instance norm, GroupNorm (10 channels per group: the
// finalize's 8 warps of a group take 2 or 1 channels; 12 per group of 36 channels, not a
// multiple of a 16-bit vector; 4 per group, in place), a channel count that is not a multiple
// of a vector, eval mode.
template <class T>
void channels_last_for() {
  for (const Activation a : {Activation::kNone, Activation::kSilu}) {
    BwdCase in{2, 64, 16 * 16};
    in.layout = Layout::kNHWC;
    in.affine = true;
    in.act = a;
    run_normal<T>(in);
    BwdCase gn{2, 320, 8 * 8, 32};
    gn.layout = Layout::kNHWC;
    gn.affine = true;
    gn.act = a;
    run_normal<T>(gn);
    BwdCase odd{3, 5, 7 * 9};
    odd.layout = Layout::kNHWC;
    odd.act = a;
    run_normal<T>(odd);
    BwdCase gn12{3, 36, 5 * 10, 3};
    gn12.layout = Layout::kNHWC;
    gn12.affine = true;
    gn12.act = a;
    run_normal<T>(gn12);
  }
  BwdCase ev{2, 16, 12 * 12};
  ev.layout = Layout::kNHWC;
  ev.eval = true;
  ev.affine = true;
  run_normal<T>(ev);
  BwdCase big{1, 32, 96 * 96, 8};
  big.layout = Layout::kNHWC;
  big.affine = true;
  big.in_place = true;
  run_normal<T>(big);
}

TEST(BackwardDevice, ChannelsLastFp32) {
  REQUIRE_GPU();
  channels_last_for<float>();
}
TEST(BackwardDevice, ChannelsLastFp16) {
  REQUIRE_GPU();
  channels_last_for<__half>();
}
TEST(BackwardDevice, ChannelsLastBf16) {
  REQUIRE_GPU();
  channels_last_for<__nv_bfloat16>();
}

// A channels-last case that forces the on-chip backward (and G, where blocks > 0).
BwdCase on_chip_case(int64_t n, int64_t c, int64_t s, int64_t groups, bool affine, Activation a,
                     int64_t blocks = 0) {
  BwdCase k{n, c, s, groups};
  k.layout = Layout::kNHWC;
  k.affine = affine;
  k.act = a;
  k.on_chip = true;
  k.blocks = blocks;
  return k;
}

// The on-chip channels-last backward (kernels/backward_nhwc_on_chip.cuh), forced: instance
// norm and GroupNorm (10 and 12 channels per group), affine or not, each activation; one block
// per slice, the planner's G and forced G (exchanges, blocks without rows, several rounds of
// units per group of blocks); in place; without parameter gradients.
template <class T>
void channels_last_on_chip_for() {
  const Activation acts[] = {Activation::kNone, Activation::kRelu, Activation::kSilu};
  for (const Activation a : acts) {
    for (const bool affine : {false, true}) {
      // One block per slice (no exchange, non-cooperative: the block's sums in place), the
      // planner's G, and a forced one.
      run_normal<T>(on_chip_case(2, 64, 16 * 16, 0, affine, a, 1));
      run_normal<T>(on_chip_case(2, 64, 16 * 16, 0, affine, a));
      run_normal<T>(on_chip_case(2, 64, 16 * 16, 0, affine, a, 3));
      run_normal<T>(on_chip_case(2, 320, 12 * 12, 32, affine, a, 1));
      run_normal<T>(on_chip_case(2, 320, 12 * 12, 32, affine, a));
      run_normal<T>(on_chip_case(2, 320, 12 * 12, 32, affine, a, 5));
      run_normal<T>(on_chip_case(3, 48, 10 * 10, 4, affine, a, 2));  // 12 channels a group
    }
  }
  // Many units over few groups of blocks: several rounds, each with its exchanges; and the
  // planner's plan of the same (one block a slice, many units).
  run_normal<T>(on_chip_case(96, 32, 9 * 9, 0, true, Activation::kSilu, 40));
  run_normal<T>(on_chip_case(96, 32, 9 * 9, 0, true, Activation::kSilu));
  // More blocks than a slice has rows for: the last ones hold none.
  run_normal<T>(on_chip_case(1, 16, 5 * 5, 0, false, Activation::kNone, 7));
  // In place (dx == dy), and without parameter gradients.
  BwdCase ip = on_chip_case(2, 64, 24 * 24, 8, true, Activation::kSilu);
  ip.in_place = true;
  run_normal<T>(ip);
  ip.in_place = false;
  ip.grads = false;
  ip.blocks = 4;
  run_normal<T>(ip);
  // A diffusion U-Net row, the planner's G.
  run_normal<T>(on_chip_case(2, 320, 32 * 32, 32, true, Activation::kSilu));
}

TEST(BackwardDevice, ChannelsLastOnChipFp32) {
  REQUIRE_GPU();
  channels_last_on_chip_for<float>();
}
TEST(BackwardDevice, ChannelsLastOnChipFp16) {
  REQUIRE_GPU();
  channels_last_on_chip_for<__half>();
}
TEST(BackwardDevice, ChannelsLastOnChipBf16) {
  REQUIRE_GPU();
  channels_last_on_chip_for<__nv_bfloat16>();
}

// Far from zero (|mean| = 1e4 std: the saved fp32 mean alone would be 60x the bound off) and
// hostile planes (outliers at any position, heavy tails, clusters), every strategy and layout.
TEST(BackwardDevice, AccurateAtLargeMeansAndWithOutliers) {
  REQUIRE_GPU();
  std::vector<BwdCase> cases;
  BwdCase sub{4, 6, 256};
  BwdCase blk{2, 3, 64 * 64};
  BwdCase gn{2, 12, 20 * 20, 3};
  BwdCase cl{2, 16, 24 * 24};
  cl.layout = Layout::kNHWC;
  BwdCase odd{4, 6, 49};
  // The on-chip channels-last backward, exchanging over 3 blocks, and GroupNorm at its G.
  const BwdCase chip = on_chip_case(2, 16, 24 * 24, 0, false, Activation::kNone, 3);
  const BwdCase chip_gn = on_chip_case(2, 32, 12 * 12, 4, false, Activation::kNone);
  for (BwdCase k : {with(sub, kSub), with(blk, kBlk), with(blk, kSpl, 3), with(blk, kStr, 2, 2),
                    with(gn, kBlk), with(gn, kSpl, 4), with(odd, kStg), cl, chip, chip_gn}) {
    k.affine = true;
    for (const Activation a : {Activation::kNone, Activation::kSilu}) {
      k.act = a;
      run_normal<float>(k, 1e4);
      for (const HostileCase& h : hostile_cases(true)) {
        if (h.kind == Hostile::kConstant) continue;  // eps-limited: the forward's tests
        const int64_t G = k.groups ? k.groups : k.c;
        const int64_t len = k.c / G * k.s;
        BwdData d = normal_data(k, 0, 3);
        const std::vector<double> planes = hostile_planes(h, k.n * G, len, 5);
        // Plane p's element e goes where the reference's plane p, element e lies.
        Options o;
        o.groups = k.groups;
        o.layout = k.layout;
        const reference::RefShape shape(k.c, k.s, o);
        for (int64_t p = 0; p < k.n * G; ++p) {
          const reference::RefPlane pl = shape.plane(p);
          for (int64_t e = 0; e < len; ++e) d.x[size_t(pl.index(e))] = planes[size_t(p * len + e)];
        }
        run_case<float>(k, d, h.name());
      }
    }
  }
}

}  // namespace
