// libFuzzer target over the host side of the library: validation and the planner, with
// arbitrary sizes, pointers, eps, options, plan overrides and device-property sets (the real
// sm_89 / sm_90 tables, or arbitrary limits). Built with clang's ASan + UBSan by
// tests/fuzz/run_fuzz.sh; any property below that fails aborts with a message.
//
// Properties:
//  - validate() never crashes; on kOk the problem it fills is consistent with the arguments.
//  - make_plan() never crashes; a plan it accepts is within the device's limits (threads,
//    registers, shared memory, grid, co-residency of cooperative grids) and covers the plane.
//  - on a real device's properties with no override, every valid problem gets a plan, forward
//    and backward (the backward's sizing holds x and dy: half the vectors per thread).
//  - NHWC problems get a channels-last plan that covers every channel and position within the
//    grid limits (any L2 budget).
//  - Chan's merge of arbitrary finite partials keeps the count exact and never makes the
//    variance negative.
#include <fuzzer/FuzzedDataProvider.h>

#include <instnorm/moments.cuh>
#include <instnorm/plan.cuh>
#include <instnorm/validate.cuh>

#include "../device_tables.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace instnorm;

namespace {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz property violated: %s\n", what);
  std::abort();
}
#define REQUIRE(cond) \
  do {                \
    if (!(cond)) fail(#cond); \
  } while (0)

int64_t size_value(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return in.ConsumeIntegral<int64_t>();                      // anything
    case 1: return in.ConsumeIntegralInRange<int64_t>(-2, 70000);      // realistic
    case 2: return int64_t(1) << in.ConsumeIntegralInRange<int>(0, 62);  // powers of two
    default: return (int64_t(1) << in.ConsumeIntegralInRange<int>(0, 40)) +
                    in.ConsumeIntegralInRange<int64_t>(-3, 3);
  }
}

uintptr_t pointer_value(FuzzedDataProvider& in, uintptr_t other) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return in.ConsumeIntegral<uintptr_t>();
    case 1: return 0;
    case 2: return other + uintptr_t(in.ConsumeIntegralInRange<int64_t>(-4096, 4096));
    default: return uintptr_t(1) << in.ConsumeIntegralInRange<int>(4, 47);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int64_t n = size_value(in), c = size_value(in), spatial = size_value(in);
  const int elem_bytes = in.ConsumeBool() ? 4 : 2;
  const uintptr_t xb = pointer_value(in, uintptr_t(1) << 32);
  const uintptr_t yb = in.ConsumeBool() ? xb : pointer_value(in, xb);
  Options opt;
  const uint32_t eps_bits = in.ConsumeIntegral<uint32_t>();
  if (in.ConsumeBool()) std::memcpy(&opt.eps, &eps_bits, sizeof(float));
  if (in.ConsumeBool()) opt.groups = in.ConsumeBool() ? size_value(in) : in.ConsumeIntegralInRange<int64_t>(0, 64);
  opt.layout = static_cast<Layout>(in.ConsumeIntegralInRange<int>(0, 2));

  const int device_kind = in.ConsumeIntegralInRange<int>(0, 2);
  DeviceProps d = device_kind == 0 ? instnorm_tables::sm90() : instnorm_tables::sm89();
  if (device_kind == 2) {
    d.sm_count = in.ConsumeIntegralInRange<int>(0, 1024);
    d.cc_major = in.ConsumeIntegralInRange<int>(0, 12);
    d.cc_minor = in.ConsumeIntegralInRange<int>(0, 9);
    d.max_threads_per_sm = in.ConsumeIntegralInRange<int>(0, 4096);
    d.max_threads_per_block = in.ConsumeIntegralInRange<int>(0, 2048);
    d.max_blocks_per_sm = in.ConsumeIntegralInRange<int>(0, 64);
    d.regs_per_sm = in.ConsumeIntegralInRange<int>(0, 1 << 18);
    d.smem_per_sm = in.ConsumeIntegralInRange<int64_t>(0, 1 << 20);
    d.smem_per_block_optin = in.ConsumeIntegralInRange<int64_t>(-1024, 1 << 20);
    d.l2_bytes = in.ConsumeIntegralInRange<int64_t>(0, int64_t(1) << 30);
    d.max_grid_x = in.ConsumeIntegralInRange<int64_t>(0, 2147483647);
    d.cooperative = in.ConsumeBool();
  }
  const int policy_kind = in.ConsumeIntegralInRange<int>(0, 3);
  const ArchPolicy& pol = policy_kind == 0   ? kPolicySm90
                          : policy_kind == 1 ? kPolicySm89
                          : policy_kind == 2 ? kPolicyGeneric
                                             : policy_for(d.cc_major, d.cc_minor);
  PlanOverride ov;
  const bool overridden = in.ConsumeBool();
  if (overridden) {
    ov.strategy = in.ConsumeIntegralInRange<int>(-1, 5);
    ov.threads = in.ConsumeIntegralInRange<int>(-1, 2048);
    ov.items = in.ConsumeIntegralInRange<int>(-1, 64);
    ov.vec = in.ConsumeIntegralInRange<int>(-1, 16);
    ov.blocks_per_plane = in.ConsumeBool() ? in.ConsumeIntegral<int64_t>()
                                           : in.ConsumeIntegralInRange<int64_t>(-1, 4096);
    ov.nhwc_on_chip = in.ConsumeIntegralInRange<int>(-1, 1);
    ov.nhwc_cols = in.ConsumeIntegralInRange<int>(0, 300);
  }

  Problem prob;
  const Invalid v = validate(reinterpret_cast<const void*>(xb), reinterpret_cast<const void*>(yb),
                             n, c, spatial, elem_bytes, opt, &prob);
  if (v == Invalid::kOk) {
    REQUIRE(n > 0 && c > 0 && spatial > 0 && xb != 0 && yb != 0);
    REQUIRE(opt.eps >= 0.f && std::isfinite(opt.eps));
    REQUIRE(prob.groups > 0 && c % prob.groups == 0);
    REQUIRE(prob.planes == n * prob.groups);
    REQUIRE(prob.plane_len == prob.channels_per_group * spatial);
    REQUIRE(prob.planes * prob.plane_len == n * c * spatial);
    if (prob.vector_ok)
      REQUIRE(xb % 16 == 0 && yb % 16 == 0 && (prob.nhwc ? c : spatial) % (16 / elem_bytes) == 0);
    // With one channel or one position the layouts coincide: validated as NCHW.
    REQUIRE(prob.nhwc == (opt.layout == Layout::kNHWC && c > 1 && spatial > 1));

    if (prob.nhwc) {
      NhwcPlan q;
      const bool ok = make_nhwc_plan(prob, d, &q, ov);
      if (ok) {
        REQUIRE(nhwc_plan_is_valid(q, prob, d));
        if (q.staged) {  // units of whole images through the staged kernel
          REQUIRE(!q.on_chip && prob.channels_per_group == 1 && q.unit_images >= 1 &&
                  q.unit_images <= n && q.lanes >= 1 && q.lanes <= 32 &&
                  (q.lanes & (q.lanes - 1)) == 0 &&
                  q.unit_images * c * spatial < (int64_t(1) << 31));  // the kernel's int offsets
          REQUIRE(q.grid >= 1 && q.grid <= d.max_grid_x && q.smem_bytes <= d.smem_per_block_optin);
        } else if (q.on_chip) {
          REQUIRE(q.col_chunks * q.cols_per_block * q.vec == c);
          REQUIRE(q.blocks_per_unit * q.slice_rows >= spatial && q.grid >= 1);
          REQUIRE(q.cooperative == (q.blocks_per_unit > 1) && (!q.cooperative || d.cooperative));
        } else {
          REQUIRE(q.col_chunks * q.cols_per_block * q.vec >= c);
          REQUIRE(q.col_chunks <= 65535);
          REQUIRE(q.tiles * q.tile_rows >= spatial && q.batch_images >= 1 && q.batch_images <= n);
          REQUIRE(kNhwcThreads <= d.max_threads_per_block);
        }
      }
      if (device_kind < 2 && ov.nhwc_on_chip != 1 &&
          c / std::max(1, q.vec) <= int64_t(65535) * kNhwcThreads)
        REQUIRE(ok);
    }

    Plan p;
    const bool ok = make_plan(prob, d, pol, &p, ov);
    if (ok) {
      REQUIRE(plan_is_valid(p, prob, d));
      REQUIRE(p.threads >= 32 && p.threads <= kMaxThreads && p.threads <= d.max_threads_per_block);
      REQUIRE(int64_t(p.threads) * kMaxRegsPerThread <= d.regs_per_sm);
      REQUIRE(p.grid >= 1 && p.grid <= d.max_grid_x);
      REQUIRE(p.smem_bytes >= 0 && p.smem_bytes <= std::max<int64_t>(0, d.smem_per_block_optin));
      REQUIRE(p.slice_len * p.blocks_per_plane >= prob.plane_len);
      if (p.cooperative)
        REQUIRE(d.cooperative &&
                p.grid <= int64_t(resident_blocks_per_sm(d, p.threads, p.smem_bytes)) * d.sm_count);
    }
    if (!overridden && device_kind < 2) REQUIRE(ok);
    // The backward's sizing (x and dy on chip): valid where accepted, half the registers.
    Plan pb;
    if (make_plan(prob, d, pol, &pb, ov, Direction::kBackward)) {
      REQUIRE(plan_is_valid(pb, prob, d));
      REQUIRE(pb.direction == Direction::kBackward);
      REQUIRE(pb.strategy == Strategy::kStaged ||
              pb.items <= max_items_for(pb.strategy, pb.vec, Direction::kBackward));
    } else if (!overridden && device_kind < 2) {
      REQUIRE(false);  // every valid problem gets a backward plan on the tuned devices too
    }
  } else if (v == Invalid::kEmpty) {
    REQUIRE(n == 0 || c == 0 || spatial == 0);
  }

  // Chan's merge on arbitrary finite partials.
  Moments a, b;
  a.mean = in.ConsumeFloatingPointInRange<float>(-1e18f, 1e18f);
  a.var = in.ConsumeFloatingPointInRange<float>(0.f, 1e36f);
  a.count = in.ConsumeIntegralInRange<int64_t>(0, int64_t(1) << 40);
  b.mean = in.ConsumeFloatingPointInRange<float>(-1e18f, 1e18f);
  b.var = in.ConsumeFloatingPointInRange<float>(0.f, 1e36f);
  b.count = in.ConsumeIntegralInRange<int64_t>(0, int64_t(1) << 40);
  const Moments m = merge(a, b);
  REQUIRE(m.count == a.count + b.count);
  REQUIRE(!(variance(m) < 0.f));
  REQUIRE(std::isfinite(m.mean) && std::isfinite(m.var));
  return 0;
}
