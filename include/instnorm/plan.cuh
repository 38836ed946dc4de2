#pragma once
/// \file plan.cuh
/// The planner: a pure host function from (problem, device properties, tuning table) to a launch
/// plan. No CUDA call happens here; the CPU tests drive it with hand-made property sets and the
/// benchmark overrides its knobs to sweep configurations.

#include <algorithm>
#include <cstdint>

#include "arch.cuh"
#include "contract.cuh"
#include "validate.cuh"

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

/// Largest items per thread a strategy's kernel accepts.
inline int max_items_for(Strategy s, int vec) {
  if (s == Strategy::kStaged) return 1 << 30;  // values per lane live in shared memory
  return s == Strategy::kSplitStream ? max_stream_items(vec) : max_items(vec);
}
/// Problems smaller than this are not split across blocks just to fill the GPU: the cooperative
/// launch, its workspace and the exchange cost more than idle SMs there.
constexpr int64_t kMinFillSplitBytes = int64_t(16) << 20;
/// Values per lane the staged plan aims for when it chooses how many lanes share a plane
/// (kStagedThreads, contract.cuh).
constexpr int kStagedLaneItems = 32;
/// Bytes of one stage of the staged kernel's two-stage buffer: its unit, rounded to 16 bytes;
/// saturated at 2^40 (no device's shared memory), so that any plane length stays overflow-free.
inline int64_t staged_stage_bytes(int planes_per_unit, int64_t plane_len, int elem_bytes) {
  constexpr int64_t kCap = int64_t(1) << 40;
  const int64_t per_plane = int64_t(std::max(1, planes_per_unit)) * std::max(1, elem_bytes);
  if (plane_len > kCap / per_plane) return kCap;
  return (plane_len * per_plane + 15) / 16 * 16;
}

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
  int phases = 0;                ///< split plans: start phases of the groups of blocks (0: table)
};

/// A launch plan.
struct Plan {
  Strategy strategy = Strategy::kBlock;
  int threads = 0;               ///< threads per block
  int lanes = 0;                 ///< threads sharing one plane slice (<= 32, or == threads)
  int items = 0;                 ///< vectors per thread per chunk
  int vec = 1;                   ///< elements per vector (16 bytes, or 1)
  int64_t blocks_per_plane = 1;  ///< G
  int64_t slice_len = 0;         ///< elements per block slice (multiple of vec)
  int64_t block_groups = 0;      ///< groups of G blocks in the grid
  int64_t grid = 0;              ///< blocks launched (= block_groups * G)
  int smem_items = 0;            ///< vectors per thread held in dynamic shared memory (split)
  int64_t smem_bytes = 0;        ///< dynamic shared memory per block
  bool cooperative = false;      ///< blocks wait on each other: cooperative launch
  /// Co-resident blocks per SM this plan assumes (split plans), from registers and threads.
  int blocks_per_sm = 0;
  /// Split plans with several rounds: group g of blocks starts when group g - 1 has published
  /// its first partial, unless g is a multiple of `phases`, a power of two (1: every group starts
  /// at once; 2^30: one chain).
  int phases = 2;
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

/// Checks a plan against the kernels' contract and the device's limits.
inline bool plan_is_valid(const Plan& p, const Problem& prob, const DeviceProps& d) {
  if (p.threads < 32 || p.threads > std::min(kMaxThreads, d.max_threads_per_block)) return false;
  if (p.threads % 32 != 0) return false;
  if (p.lanes <= 0 || (p.lanes & (p.lanes - 1)) != 0) return false;
  if (p.lanes > 32 && p.lanes != p.threads) return false;
  if (p.lanes > p.threads) return false;
  if (p.vec != 1 && (p.vec * prob.elem_bytes != 16 || !prob.vector_ok)) return false;
  if (p.items < 1 || p.items > max_items_for(p.strategy, p.vec)) return false;
  if (p.blocks_per_plane < 1 || p.slice_len < 1 || p.slice_len % p.vec != 0) return false;
  if (p.slice_len * p.blocks_per_plane < prob.plane_len) return false;
  if (p.blocks_per_plane > 1 && p.lanes != p.threads) return false;
  if (p.grid < 1 || p.grid > d.max_grid_x || p.grid != p.block_groups * p.blocks_per_plane)
    return false;
  if (p.cooperative != (p.blocks_per_plane > 1) || p.phases < 1 || (p.phases & (p.phases - 1)) != 0)
    return false;
  if (p.smem_items < 0 || p.smem_bytes < 0 || p.smem_bytes > d.smem_per_block_optin) return false;
  // The staged kernel: its block size, whole planes per block, two stages of one unit.
  if (p.strategy == Strategy::kStaged &&
      (p.threads != kStagedThreads || p.vec != 1 || p.blocks_per_plane != 1 || p.lanes > 32 ||
       p.smem_bytes < 2 * staged_stage_bytes(p.threads / p.lanes, prob.plane_len, prob.elem_bytes)))
    return false;
  // smem_items <= 2 * items: the register part's mean centres the whole slice's moments
  // (chunk_moments in kernels/nchw.cuh), accurate while it holds at least a third of it.
  if (p.smem_items > 0 && (p.strategy != Strategy::kSplit || p.lanes != p.threads ||
                           p.smem_items > 2 * p.items || p.smem_bytes > d.smem_per_block_optin ||
                           p.smem_bytes < int64_t(p.smem_items) * p.threads * p.vec * prob.elem_bytes))
    return false;
  if (p.slice_len > int64_t(p.items + p.smem_items) * p.threads * p.vec &&
      p.strategy != Strategy::kSplitStream)
    return false;
  // At least one block fits on an SM (threads, registers at the kernels' bound, shared memory).
  if (resident_blocks_per_sm(d, p.threads, p.smem_bytes) < 1) return false;
  if (p.cooperative) {
    if (!d.cooperative) return false;
    const int64_t resident =
        int64_t(resident_blocks_per_sm(d, p.threads, p.smem_bytes)) * d.sm_count;
    if (p.grid > resident) return false;
  }
  return true;
}

/// Chooses the plan for `prob` on a device with `d`, using `pol` (normally policy_for(d)).
/// Returns false if no valid plan exists (then the call reports cudaErrorInvalidConfiguration).
inline bool make_plan(const Problem& prob, const DeviceProps& d, const ArchPolicy& pol,
                      Plan* out, const PlanOverride& ov = {}) {
  using namespace detail;
  Plan p;
  p.vec = ov.vec > 0 ? ov.vec : (prob.vector_ok ? 16 / prob.elem_bytes : 1);
  const int max_i = max_items(p.vec);
  const int64_t L = prob.plane_len;
  const int64_t vecs = ceil_div(L, p.vec);
  const int64_t warp_cap = 32 * int64_t(max_i);  // vectors a warp holds
  const int64_t block_cap = int64_t(kMaxThreads) * max_i;
  const int split_threads = ov.threads > 0 ? ov.threads : pol.split_threads;
  const int bps = std::max(1, resident_blocks_per_sm(d, split_threads));
  const int64_t resident = int64_t(bps) * d.sm_count;
  // Shared-memory vectors per thread that extend a split block's slice (16-byte slots): the
  // blocks that fit by registers share the SM's shared memory.
  const bool use_smem = ov.split_smem >= 0 ? ov.split_smem != 0 : pol.split_smem;
  const auto smem_cap_for = [&](int threads) -> int {
    if (!use_smem || d.smem_per_block_optin <= 0) return 0;
    const int by_regs = std::max(1, resident_blocks_per_sm(d, threads));
    const int64_t budget =
        std::min(d.smem_per_block_optin, d.smem_per_sm / by_regs - kSmemPerBlockOverhead);
    return int(clamp64(budget / (int64_t(threads) * 16), 0, 32));
  };

  Strategy s;
  if (ov.strategy >= 0) {
    s = static_cast<Strategy>(ov.strategy);
  } else if (vecs <= warp_cap && !(prob.planes < ceil_div(d.sm_count, 4) && vecs > 4 * 32)) {
    // Scalar planes (not 16-byte aligned: 7x7, 3x3, odd lengths) are staged: the block moves
    // its planes as one contiguous unit, with 16-byte copies.
    s = p.vec == 1 ? Strategy::kStaged : Strategy::kSubWarp;
  } else {
    // Few planes leave SMs idle unless each plane is split across blocks (for problems large
    // enough to pay for the cooperative launch).
    const int64_t total_bytes = prob.planes * L * prob.elem_bytes;
    const int64_t g_cap =
        ceil_div(vecs, int64_t(split_threads) * (max_items(p.vec) + smem_cap_for(split_threads)));
    const int64_t g_fill = prob.planes < resident && total_bytes >= kMinFillSplitBytes
                               ? ceil_div(resident, prob.planes) : 1;
    const int64_t g_min_work = std::max<int64_t>(1, vecs / (int64_t(split_threads) * 2));
    if (vecs <= block_cap && std::min(g_fill, g_min_work) <= 1) s = Strategy::kBlock;
    else if (g_cap <= resident) s = Strategy::kSplit;
    else s = Strategy::kSplitStream;
  }
  p.strategy = s;

  switch (s) {
    case Strategy::kSubWarp: {
      const int sub_threads = ov.threads > 0 ? ov.threads : pol.subwarp_threads;
      const int aim = std::min(pol.subwarp_items, max_i);
      p.lanes = int(clamp64(pow2_ceil(ceil_div(vecs, aim)), 1, 32));
      if (ov.items > 0) p.lanes = int(clamp64(pow2_ceil(ceil_div(vecs, ov.items)), 1, 32));
      p.items = int(std::max<int64_t>(1, ceil_div(vecs, p.lanes)));
      p.threads = std::max(p.lanes, sub_threads);
      p.blocks_per_plane = 1;
      p.slice_len = vecs * p.vec;
      p.block_groups = std::min(ceil_div(prob.planes, p.threads / p.lanes), d.max_grid_x);
      break;
    }
    case Strategy::kStaged: {
      // Lanes per plane for kStagedLaneItems values each: a power of two up to a warp. Two
      // stages of one unit (the block's planes) each, so the next unit's copy is in flight
      // while this one is reduced and stored; a persistent grid of the blocks that fit walks
      // the units. Aligned planes stay in registers (sub-warp and block plans): staged, on the
      // H100, 4x512x64x64 ran at 0.64 of copy (block plan 0.87), 32x256x32x32 at 0.73 (0.93).
      p.vec = 1;
      p.threads = kStagedThreads;
      const int64_t want = ceil_div(L, ov.items > 0 ? ov.items : kStagedLaneItems);
      p.lanes = int(pow2_ceil(clamp64(want, 1, 32)));
      p.items = int(clamp64(ceil_div(L, p.lanes), 1, int64_t(1) << 30));
      p.blocks_per_plane = 1;
      p.slice_len = L;
      const int64_t units = ceil_div(prob.planes, p.threads / p.lanes);
      p.smem_bytes = 2 * staged_stage_bytes(p.threads / p.lanes, L, prob.elem_bytes);
      // __launch_bounds__(kStagedThreads, kStagedBlocksPerSm) caps the kernel's registers.
      const int bps = std::min(
          kStagedBlocksPerSm,
          resident_blocks_per_sm(d, p.threads, p.smem_bytes, kSmemRuntimeReserve,
                                 65536 / (kStagedThreads * kStagedBlocksPerSm)));
      p.blocks_per_sm = bps;
      p.block_groups = std::min({units, int64_t(std::max(1, bps)) * d.sm_count, d.max_grid_x});
      break;
    }
    case Strategy::kBlock: {
      const int items = ov.items > 0 ? ov.items : pol.block_items;
      p.threads = ov.threads > 0 ? ov.threads
                                 : int(clamp64(pow2_ceil(ceil_div(vecs, items)),
                                               pol.min_block_threads, kMaxThreads));
      p.lanes = p.threads;
      p.items = int(std::max<int64_t>(1, ceil_div(vecs, p.threads)));
      p.blocks_per_plane = 1;
      p.slice_len = vecs * p.vec;
      p.block_groups = std::min(prob.planes, d.max_grid_x);
      break;
    }
    case Strategy::kSplit:
    case Strategy::kSplitStream: {
      p.threads = split_threads;
      // A plane that one block of twice the size holds whole needs no exchange at all
      // (16x64x256x256 fp32 on the H100: 512 threads, 128 KB of registers and 128 KB of shared
      // memory).
      if (ov.threads <= 0 && s == Strategy::kSplit &&
          2 * split_threads <= std::min(kMaxThreads, d.max_threads_per_block) &&
          vecs > int64_t(split_threads) * (max_i + smem_cap_for(split_threads)) &&
          vecs <= int64_t(2 * split_threads) * (max_i + smem_cap_for(2 * split_threads)))
        p.threads = 2 * split_threads;
      p.lanes = p.threads;
      // Shared memory extends each block's slice beyond its registers (split only): the
      // blocks that fit by registers share the SM's shared memory. Fewer blocks per plane mean
      // fewer, longer rounds per exchange, and the exchange's wait for the slowest block of the
      // group is what split plans lose (without it, 0.94 of copy on 112x64x512x512): G 8 -> 3
      // took that row from 0.82 to 0.91-0.92 on the H100 once the shared part was copied by
      // cp.async (see smem_fill).
      const int smem_cap = s == Strategy::kSplit ? smem_cap_for(p.threads) : 0;
      const int64_t resident_t =
          int64_t(std::max(1, resident_blocks_per_sm(
                                  d, p.threads,
                                  int64_t(smem_cap) * p.threads * p.vec * prob.elem_bytes))) *
          d.sm_count;
      int64_t g;
      if (ov.blocks_per_plane > 0) {
        g = ov.blocks_per_plane;
      } else if (s != Strategy::kSplitStream) {
        const int64_t total_bytes = prob.planes * L * prob.elem_bytes;
        const int64_t g_cap =
            ceil_div(vecs, int64_t(p.threads) * (max_items_for(s, p.vec) + smem_cap));
        const int64_t g_fill = prob.planes < resident_t && total_bytes >= kMinFillSplitBytes
                                   ? ceil_div(resident_t, prob.planes) : 1;
        const int64_t g_min_work = std::max<int64_t>(1, vecs / (int64_t(p.threads) * 2));
        // Slices are rounded to 512 bytes (32 vectors) before they must fit on chip.
        const int64_t cap_vecs = int64_t(p.threads) * (max_items_for(s, p.vec) + smem_cap);
        g = choose_group_size(prob.planes, resident_t, g_cap, std::min(g_fill, g_min_work),
                              [&](int64_t c) {
                                return ceil_div(ceil_div(vecs, c), 32) * 32 <= cap_vecs;
                              });
        if (g == 0) g = resident_t;  // nothing fits: streamed below
      } else {
        g = resident_t;
      }
      g = clamp64(g, 1, std::max<int64_t>(1, std::min(resident_t, vecs)));
      p.blocks_per_plane = g;
      // Slices start on 512-byte boundaries: unaligned slices (G = 11 on 1 MB planes) cost
      // 20% on the H100.
      const int64_t slice_vecs = ceil_div(ceil_div(vecs, g), 32) * 32;
      p.slice_len = slice_vecs * p.vec;
      p.items = int(clamp64(ceil_div(slice_vecs, p.threads), 1, max_items_for(s, p.vec)));
      if (ov.items > 0) p.items = ov.items;
      if (s == Strategy::kSplit && smem_cap > 0) {
        const int64_t rest = ceil_div(slice_vecs, p.threads) - p.items;
        if (rest > 0 && rest <= smem_cap) {
          p.smem_items = int(rest);
          p.smem_bytes = int64_t(p.smem_items) * p.threads * p.vec * prob.elem_bytes;
        }
      }
      if (s != Strategy::kSplitStream &&
          slice_vecs > int64_t(p.items + p.smem_items) * p.threads) {
        p.strategy = Strategy::kSplitStream;
        p.items = std::min(p.items, max_stream_items(p.vec));
      }
      const int64_t resident_final =
          int64_t(std::max(1, resident_blocks_per_sm(d, p.threads, p.smem_bytes))) * d.sm_count;
      p.block_groups = std::max<int64_t>(1, std::min(prob.planes, resident_final / g));
      p.blocks_per_sm = resident_blocks_per_sm(d, p.threads, p.smem_bytes);
      break;
    }
  }
  p.cooperative = p.blocks_per_plane > 1;
  p.phases = ov.phases > 0 ? ov.phases : pol.phases;
  p.grid = p.block_groups * p.blocks_per_plane;
  *out = p;
  return plan_is_valid(p, prob, d);
}

// ---------------------------------------------------------------- channels-last (NHWC)

/// Co-resident on-chip NHWC blocks per SM with `smem_bytes` of dynamic shared memory (its
/// static storage is counted exactly, so only the runtime's reserve is added).
inline int nhwc_on_chip_per_sm(const DeviceProps& d, int64_t smem_bytes, int vec) {
  return resident_blocks_per_sm(d, kNhwcOnChipThreads, smem_bytes + nhwc_on_chip_static_smem(vec),
                                kSmemRuntimeReserve);
}

/// A launch plan for NHWC, where each image is an S x C matrix read along C in 16-byte vectors.
///
/// On chip (`on_chip`): the unit of work is an image slice of `cols_per_block` column vectors by
/// all S rows; G blocks share a unit, each holding `slice_rows` rows in registers and shared
/// memory, and exchange per-channel partial moments (cooperative launch when G > 1) before they
/// normalize what they hold: one DRAM read. Images too large for the chip are cut into narrower
/// column slices.
///
/// Tiled (the fallback): three kernels per batch of images: per-tile partial moments of every
/// channel, a merge per (image, group), and the normalize. A batch is sized to stay in L2
/// between the first and the second read of x.
struct NhwcPlan {
  bool on_chip = false;
  int vec = 1;                   ///< channels per vector (16 bytes, or 1)
  int cols_per_block = 0;        ///< column vectors a block covers
  int row_lanes = 0;             ///< threads per column (threads / cols_per_block)
  int64_t col_chunks = 0;        ///< column slices of an image (tiled: grid.y)
  // Tiled plans.
  int64_t tile_rows = 0;         ///< spatial positions per block
  int64_t tiles = 0;             ///< tiles per image
  int64_t batch_images = 0;      ///< images per batch of the three kernels
  // On-chip plans.
  int64_t blocks_per_unit = 1;   ///< G
  int64_t slice_rows = 0;        ///< rows per block (a multiple of row_lanes)
  int items = 0;                 ///< rows per thread in registers
  int smem_items = 0;            ///< further rows per thread in dynamic shared memory
  int64_t smem_bytes = 0;        ///< dynamic shared memory per block
  int64_t block_groups = 0;      ///< groups of G blocks in the grid
  int64_t grid = 0;
  bool cooperative = false;
  int phases = 2;                ///< as Plan::phases
};

/// Bytes of a batch that the second read of x expects to find in L2 (ArchPolicy::nhwc_l2_percent).
inline int64_t nhwc_l2_budget(const DeviceProps& d, const ArchPolicy& pol) {
  return d.l2_bytes * pol.nhwc_l2_percent / 100;
}

inline bool nhwc_plan_is_valid(const NhwcPlan& p, const Problem& prob, const DeviceProps& d) {
  if (p.vec != 1 && (p.vec * prob.elem_bytes != 16 || !prob.vector_ok)) return false;
  if (prob.c % p.vec != 0) return false;
  const int64_t cv = prob.c / p.vec;
  if (!p.on_chip) {
    if (p.cols_per_block < 1 || p.cols_per_block > kNhwcThreads) return false;
    if (p.row_lanes != kNhwcThreads / p.cols_per_block) return false;
    if (p.col_chunks < 1 || p.col_chunks * p.cols_per_block < cv || p.col_chunks > 65535)
      return false;
    if (p.tile_rows < 1 || p.tiles < 1 || p.tiles * p.tile_rows < prob.spatial) return false;
    if (p.batch_images < 1 || p.batch_images > prob.n) return false;
    if (d.max_threads_per_block < kNhwcThreads) return false;
    return resident_blocks_per_sm(d, kNhwcThreads) >= 1;
  }
  const int threads = kNhwcOnChipThreads;
  if (d.max_threads_per_block < threads) return false;
  if (p.cols_per_block < 1 || p.cols_per_block > threads || cv % p.cols_per_block != 0)
    return false;
  if ((int64_t(p.cols_per_block) * p.vec) % prob.channels_per_group != 0) return false;
  if (p.row_lanes != threads / p.cols_per_block || p.col_chunks != cv / p.cols_per_block)
    return false;
  if (p.items < 1 || p.items > nhwc_max_items(p.vec) || p.smem_items < 0) return false;
  if (prob.c >= (int64_t(1) << 31) || p.slice_rows * prob.c >= (int64_t(1) << 31))
    return false;  // the kernel's offsets inside a block's rows are 32-bit
  if (p.smem_items > 0 && p.vec * prob.elem_bytes != 16) return false;
  if (p.smem_bytes < int64_t(p.smem_items) * threads * 16 + nhwc_prefix_bytes(p.cols_per_block, p.vec))
    return false;
  if (p.smem_bytes < 0 || p.smem_bytes + nhwc_on_chip_static_smem(p.vec) > d.smem_per_block_optin)
    return false;
  if (p.slice_rows < 1 || p.slice_rows > int64_t(p.row_lanes) * (p.items + p.smem_items))
    return false;
  if (p.blocks_per_unit < 1 || p.slice_rows * p.blocks_per_unit < prob.spatial) return false;
  if (p.block_groups < 1 || p.grid != p.block_groups * p.blocks_per_unit || p.grid > d.max_grid_x)
    return false;
  if (p.cooperative != (p.blocks_per_unit > 1) || p.phases < 1 || (p.phases & (p.phases - 1)) != 0)
    return false;
  const int per_sm = nhwc_on_chip_per_sm(d, p.smem_bytes, p.vec);
  if (per_sm < 1) return false;
  if (p.cooperative && (!d.cooperative || p.grid > int64_t(per_sm) * d.sm_count)) return false;
  return true;
}

namespace detail {

/// The on-chip plan, or false where none fits (a unit larger than the chip at every slice
/// width, no cooperative launch for a split, or no slice width that keeps groups whole).
inline bool make_nhwc_on_chip_plan(const Problem& prob, const DeviceProps& d, const ArchPolicy& pol,
                                 const PlanOverride& ov, NhwcPlan* out) {
  NhwcPlan p;
  p.on_chip = true;
  p.vec = prob.vector_ok ? 16 / prob.elem_bytes : 1;
  const int threads = kNhwcOnChipThreads;
  const int64_t cv = prob.c / p.vec, S = prob.spatial;
  const int by_regs = resident_blocks_per_sm(d, threads);
  if (d.max_threads_per_block < threads || by_regs < 1 || d.sm_count < 1) return false;
  const int max_i = nhwc_max_items(p.vec);
  const int64_t static_smem = nhwc_on_chip_static_smem(p.vec);
  // Rows beyond the registers go to shared memory by cp.async (16-byte vectors, sm_80+), as in
  // the NCHW split plans: the blocks that fit by registers share the SM's shared memory.
  const bool use_smem = (ov.split_smem >= 0 ? ov.split_smem != 0 : pol.split_smem) &&
                        p.vec * prob.elem_bytes == 16;
  // Shared-memory rows per thread next to a slice of `cs` columns' pivots and partials.
  const int64_t budget = std::min(d.smem_per_block_optin - static_smem,
                                  d.smem_per_sm / by_regs - kSmemRuntimeReserve - static_smem);
  const auto smem_cap_for = [&](int64_t cs) {
    if (!use_smem) return 0;
    return int(clamp64((budget - nhwc_prefix_bytes(cs, p.vec)) / (int64_t(threads) * 16), 0, 64));
  };
  const int64_t total_bytes = prob.n * S * prob.c * prob.elem_bytes;
  // Every slice width that divides the row and keeps GroupNorm groups whole, widest first; the
  // most busy block slots (within 5%) wins, then the smallest G (G = 1 needs no exchange at
  // all), then the widest slice.
  int64_t best_cs = 0, best_g = 0, best_used = 0;
  struct Cand { int64_t cs, g, used; };
  Cand cands[64];
  int ncand = 0;
  for (int64_t cs = std::min<int64_t>(cv, threads); cs >= 1 && ncand < 64; --cs) {
    if (cv % cs != 0 || (cs * p.vec) % prob.channels_per_group != 0) continue;
    if (ov.nhwc_cols > 0 ? cs != ov.nhwc_cols
                         : cs < cv && cs * p.vec * prob.elem_bytes < pol.nhwc_min_slice_bytes)
      continue;
    const int64_t row_lanes = threads / cs;
    const int smem_cap = smem_cap_for(cs);
    const int64_t resident =
        int64_t(std::max(1, nhwc_on_chip_per_sm(d, int64_t(smem_cap) * threads * 16 +
                                                     nhwc_prefix_bytes(cs, p.vec),
                                              p.vec))) *
        d.sm_count;
    const int64_t cap_rows = row_lanes * (max_i + smem_cap);
    const int64_t units = prob.n * (cv / cs);
    const int64_t slots = d.cooperative ? resident : 1;
    const int64_t want = units < resident && total_bytes >= kMinFillSplitBytes
                             ? ceil_div(resident, units) : 1;
    const int64_t min_work = std::max<int64_t>(1, S / (row_lanes * 2));
    int64_t g = ov.blocks_per_plane > 0
                    ? ov.blocks_per_plane
                    : choose_group_size(units, slots, ceil_div(S, cap_rows), std::min(want, min_work),
                                        [&](int64_t c) {
                                          return ceil_div(ceil_div(S, c), row_lanes) * row_lanes <=
                                                 cap_rows;
                                        },
                                        true);
    if (g < 1 || g > slots || ceil_div(ceil_div(S, g), row_lanes) > max_i + smem_cap) continue;
    const int64_t groups = std::min(units, resident / g);
    cands[ncand++] = Cand{cs, g, busy_slots(units, groups, g)};
    best_used = std::max(best_used, cands[ncand - 1].used);
  }
  for (int i = 0; i < ncand; ++i)
    if (cands[i].used * 20 >= best_used * 19 && (best_g == 0 || cands[i].g < best_g)) {
      best_cs = cands[i].cs;
      best_g = cands[i].g;
    }
  if (best_g == 0) return false;
  p.cols_per_block = int(best_cs);
  p.row_lanes = threads / p.cols_per_block;
  p.col_chunks = cv / best_cs;
  const int64_t rows_per_thread = ceil_div(ceil_div(S, best_g), p.row_lanes);
  p.slice_rows = rows_per_thread * p.row_lanes;
  // Rounding slices up to whole row lanes can leave the last blocks without rows: drop them
  // (a forced G keeps them, which the tests use).
  if (ov.blocks_per_plane <= 0) best_g = ceil_div(S, p.slice_rows);
  p.blocks_per_unit = best_g;
  p.items = int(std::min<int64_t>(rows_per_thread, max_i));
  p.smem_items = int(rows_per_thread - p.items);
  p.smem_bytes = int64_t(p.smem_items) * threads * 16 + nhwc_prefix_bytes(best_cs, p.vec);
  const int64_t per_sm = std::max(1, nhwc_on_chip_per_sm(d, p.smem_bytes, p.vec));
  p.block_groups = std::max<int64_t>(
      1, std::min({prob.n * p.col_chunks, per_sm * d.sm_count / best_g, d.max_grid_x / best_g}));
  p.grid = p.block_groups * best_g;
  p.cooperative = best_g > 1;
  p.phases = ov.phases > 0 ? ov.phases : pol.phases;
  *out = p;
  return nhwc_plan_is_valid(p, prob, d);
}

/// The tiled plan (x read twice, the second time from L2 where a batch fits).
inline bool make_nhwc_tiled_plan(const Problem& prob, const DeviceProps& d, const ArchPolicy& pol,
                                 NhwcPlan* out, int64_t l2_budget, int min_chunks) {
  NhwcPlan p;
  p.vec = prob.vector_ok ? 16 / prob.elem_bytes : 1;
  const int64_t cv = prob.c / p.vec;
  p.cols_per_block = int(std::min<int64_t>(cv, kNhwcThreads));
  p.row_lanes = kNhwcThreads / p.cols_per_block;
  p.col_chunks = ceil_div(cv, p.cols_per_block);
  const int64_t image_bytes = prob.spatial * prob.c * prob.elem_bytes;
  const int64_t budget = l2_budget >= 0 ? l2_budget : nhwc_l2_budget(d, pol);
  // Images of up to half the budget go in batches that fit it; larger ones gain less from L2
  // than the launches of one batch per image cost (112x64x512x512 bf16 NHWC, 32 MB images:
  // 11.2 ms in batches of one, 5.7 ms as one batch), so the whole tensor is one batch.
  p.batch_images = image_bytes <= budget / 2
                       ? clamp64(budget / std::max<int64_t>(1, image_bytes), 1, prob.n)
                       : prob.n;
  // Enough blocks per batch to fill every resident slot twice, but at least nhwc_min_chunks
  // chunks of kNhwcRows rows per thread: a block's fixed cost (pivots, the reduction over row
  // lanes, the partials' merge) must be spread over enough rows.
  const int64_t want_blocks = 2 * int64_t(std::max(1, d.sm_count)) *
                              std::max(1, resident_blocks_per_sm(d, kNhwcThreads));
  const int64_t min_rows =
      int64_t(p.row_lanes) * kNhwcRows * (min_chunks > 0 ? min_chunks : pol.nhwc_min_chunks);
  const int64_t max_tiles = std::max<int64_t>(1, ceil_div(prob.spatial, min_rows));
  p.tiles = clamp64(ceil_div(want_blocks, p.batch_images * p.col_chunks), 1, max_tiles);
  p.tile_rows = ceil_div(prob.spatial, p.tiles);
  p.tiles = ceil_div(prob.spatial, p.tile_rows);
  *out = p;
  return nhwc_plan_is_valid(p, prob, d);
}

}  // namespace detail

/// The NHWC plan: on chip where a plan fits (unless `ov` forbids it), else tiled.
/// `policy` forces a table row (null: the device's, policy_for(d)).
inline bool make_nhwc_plan(const Problem& prob, const DeviceProps& d, NhwcPlan* out,
                           const PlanOverride& ov = {}, const ArchPolicy* policy = nullptr) {
  const ArchPolicy& pol = policy ? *policy : policy_for(d);
  if (ov.nhwc_on_chip != 0 && detail::make_nhwc_on_chip_plan(prob, d, pol, ov, out)) return true;
  if (ov.nhwc_on_chip == 1) return false;
  return detail::make_nhwc_tiled_plan(prob, d, pol, out, ov.nhwc_l2_budget, ov.nhwc_chunks);
}

}  // namespace instnorm
