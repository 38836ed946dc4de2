#pragma once
/// \file plan/common.cuh
/// What both planners use: the strategies, the overrides the bench and tests force, the
/// choice of G (blocks per unit), and how many blocks fit on an SM.

#include <algorithm>
#include <cstdint>
#include "../arch.cuh"
#include "../contract.cuh"
#include "../validate.cuh"

namespace instnorm {

/// How a plane is mapped onto the GPU.
enum class Strategy : int {
  kSubWarp = 0,  ///< 1..32 lanes per plane, several planes per block, plane in registers
  kBlock = 1,    ///< one block per plane, plane in registers, one DRAM read
  kSplit = 2,    ///< G co-resident blocks per plane (cooperative launch), slices in registers,
                 ///< partial moments exchanged through a small workspace: one DRAM read
  kSplitStream = 3,  ///< as kSplit, but slices too large for the chip: streamed twice
  kStaged = 4,   ///< a block's planes move as one contiguous unit through shared memory,
                 ///< two units in flight (any alignment; 1..32 lanes per plane)
};

inline const char* to_string(Strategy s) {
  switch (s) {
    case Strategy::kSubWarp: return "subwarp";
    case Strategy::kBlock: return "block";
    case Strategy::kSplit: return "split";
    case Strategy::kSplitStream: return "split-stream";
    case Strategy::kStaged: return "staged";
  }
  return "?";
}

/// Problems smaller than this are not split across blocks just to fill the GPU: the cooperative
/// launch, its workspace and the exchange cost more than idle SMs there.
constexpr int64_t kMinFillSplitBytes = int64_t(16) << 20;
/// Which pass a plan is for. The backward holds x and dy on chip where the forward holds x, so
/// its plans keep half the vectors per thread (in registers and shared memory) and split planes
/// across more blocks; the NCHW planner sizes both (as Apex's group_norm_v2 planner does with
/// (1 + BWD) * sizeof(T)); the NHWC planner sizes the forward.
enum class Direction : int { kForward = 0, kBackward = 1 };

inline const char* to_string(Direction d) { return d == Direction::kBackward ? "backward" : "forward"; }

/// Tensors a pass holds on chip per element.
constexpr int tensors_on_chip(Direction d) { return d == Direction::kBackward ? 2 : 1; }

/// Knobs the benchmark's tuning mode can force; 0 (or a negative strategy) means "planner's
/// choice". A forced plan is still checked against the device limits.
struct PlanOverride {
  int strategy = -1;
  int threads = 0;
  int items = 0;
  int vec = 0;
  int64_t blocks_per_plane = 0;
  int64_t nhwc_l2_budget = -1;  ///< NHWC: bytes of a batch of images (-1: the row's nhwc_l2_percent)
  int nhwc_chunks = 0;           ///< NHWC: least chunks of kNhwcRows rows per thread per tile
  int split_smem = -1;           ///< split slices extend into shared memory: -1 table, 0 no, 1 yes
  int nhwc_on_chip = -1;           ///< NHWC: -1 planner, 0 tiled plan (x read twice), 1 on chip only
  int nhwc_cols = 0;             ///< NHWC on chip: column vectors per image slice
  int nhwc_bwd_on_chip = -1;     ///< NHWC backward: -1 planner, 0 tiled, 1 on chip only
  int phases = 0;                ///< split plans: start phases of the groups of blocks (0: table)
};

namespace detail {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

/// G, the blocks that share one unit of work (a plane, or an NHWC image slice), for `units`
/// units on `resident` co-resident blocks: from `lo` (fewest blocks whose slices might fit) up
/// to what filling the GPU asks for (`want`), the smallest G whose slices fit and whose whole
/// groups keep at least 95% of the best busy-slot count: 1 MB fp32 planes on the H100 take G = 6
/// (44 groups on 264 slots), 4 MB planes on the 4090 G = 21 (126 of 128 SMs) rather than 19
/// (114). Returns 0 if no G up to `resident` fits. (At most 4096 candidates: the planner stays
/// O(1) on made-up devices in the fuzz test.)
/// Block slots kept busy on average when `units` units run on `groups` groups of `g` blocks, the
/// last round possibly part-full: units * g / rounds (in double: units may be near 2^63).
inline int64_t busy_slots(int64_t units, int64_t groups, int64_t g) {
  return int64_t(double(units) * double(g) / double(ceil_div(units, std::max<int64_t>(1, groups))));
}

/// With `count_tail`, a G is judged by its busy slots averaged over all rounds, so that a last
/// round with few units counts against it (NHWC: 64 units on 9 groups ran 8 rounds for 7.1 of
/// work).
template <class Fits>
inline int64_t choose_group_size(int64_t units, int64_t resident, int64_t lo, int64_t want,
                                 Fits fits, bool count_tail = false) {
  lo = std::max<int64_t>(1, lo);
  while (lo <= resident && !fits(lo)) ++lo;
  if (lo > resident) return 0;
  const int64_t hi = std::min({resident, lo + 4096, std::max(2 * lo, want)});
  const auto used = [&](int64_t c) {
    const int64_t groups = std::min(units, resident / c);
    return count_tail ? busy_slots(units, groups, c) : groups * c;
  };
  int64_t best = 0;
  for (int64_t c = lo; c <= hi; ++c) best = std::max(best, used(c));
  for (int64_t c = lo; c <= hi; ++c)
    if (fits(c) && used(c) * 20 >= best * 19) return c;
  return lo;
}
}  // namespace detail

/// Blocks of `threads` threads that fit on one SM, counting the worst-case register use the
/// kernels are compiled for.
/// Shared memory the runtime reserves per block, plus the kernels' static reduction storage.
constexpr int64_t kSmemPerBlockOverhead = 2048;

/// What the runtime itself reserves per block (cudaDevAttrReservedSharedMemoryPerBlock: 1 KB on
/// sm_80 to sm_90); kernels that count their static storage themselves add only this.
constexpr int64_t kSmemRuntimeReserve = 1024;

/// Blocks of `threads` threads that fit on one SM by threads, registers (at `regs_per_thread`,
/// the kernel's bound), the block limit and shared memory.
inline int resident_blocks_per_sm(const DeviceProps& d, int threads, int64_t smem_bytes = 0,
                                  int64_t overhead = kSmemPerBlockOverhead,
                                  int regs_per_thread = kMaxRegsPerThread) {
  const int by_threads = d.max_threads_per_sm / threads;
  const int by_regs = d.regs_per_sm / (threads * regs_per_thread);
  const int by_blocks = d.max_blocks_per_sm > 0 ? d.max_blocks_per_sm : by_threads;
  int r = std::min({by_threads, by_regs, by_blocks});
  if (smem_bytes > 0 && d.smem_per_sm > 0)
    r = std::min<int64_t>(r, d.smem_per_sm / (smem_bytes + overhead));
  return std::max(0, r);
}

/// Values per lane the staged plans (NCHW and NHWC) aim for when they choose how many lanes
/// share a plane (kStagedThreads, contract.cuh).
constexpr int kStagedLaneItems = 32;
/// Bytes a forward staged unit aims for: short planes take several per group of lanes, until
/// the unit holds this much (two stages of it for each of kStagedBlocksPerSm blocks fit in an
/// sm_90 SM's shared memory). H200, by unit size at one plane per group: 8-10 KB units ran at
/// 0.35-0.45 of copy (53061x29x1x263 fp16, 3870x1690x3x13 bf16, 105582x12x6x11 fp16), 17-37
/// KB units at 0.76-0.84 (47x995x9x15, 946x227x1x509, 4711x16x23x51).
constexpr int64_t kStagedUnitBytes = 24 * 1024;
/// Co-resident staged blocks (kStagedThreads threads, `smem_bytes` of two stages) per SM: the
/// kernel's __launch_bounds__(kStagedThreads, kStagedBlocksPerSm) caps its registers, and no
/// more than kStagedBlocksPerSm are counted on.
inline int staged_blocks_per_sm(const DeviceProps& d, int64_t smem_bytes) {
  return std::min(kStagedBlocksPerSm,
                  resident_blocks_per_sm(d, kStagedThreads, smem_bytes, kSmemRuntimeReserve,
                                         65536 / (kStagedThreads * kStagedBlocksPerSm)));
}

/// Items (a group of lanes' planes, or whole images) of `item_bytes` each that make about
/// kStagedUnitBytes, to the nearest (0 where one item exceeds twice that).
inline int64_t staged_items_by_bytes(int64_t item_bytes) {
  const int64_t b = std::max<int64_t>(1, item_bytes);
  return (kStagedUnitBytes + b / 2) / b;
}
/// The forward staged plans' aim for a unit, in items (NCHW: planes per group of lanes; NHWC:
/// images): about kStagedUnitBytes, while every resident block (kStagedBlocksPerSm per SM) still
/// gets four units of the problem's `items` (fewer left the last round unbalanced: 59x212x9x83
/// bf16 at 1.5 units a block ran 12% slower). Not clamped: callers bound it.
inline int64_t staged_unit_aim(int64_t item_bytes, int64_t items, const DeviceProps& d) {
  const int64_t fill = std::max<int64_t>(1, 4 * int64_t(kStagedBlocksPerSm) * d.sm_count);
  return std::min(staged_items_by_bytes(item_bytes), items / fill);
}

}  // namespace instnorm
