#pragma once
/// \file plan/nchw.cuh
/// The NCHW planner: a strategy from the plane length (NchwSizing, choose_strategy), then its
/// geometry (size_subwarp, size_staged, size_block, size_split), checked against the kernels'
/// contract and the device (plan_is_valid).

#include "common.cuh"

namespace instnorm {

/// Largest items per thread a strategy's kernel accepts.
inline int max_items_for(Strategy s, int vec, Direction dir = Direction::kForward,
                         bool ragged = false) {
  if (s == Strategy::kStaged) return 1 << 30;  // values per lane live in shared memory
  if (dir == Direction::kBackward)
    return s == Strategy::kSplitStream ? max_backward_stream_items(vec) : max_backward_items(vec);
  if (s == Strategy::kSplitStream) return max_stream_items(vec);
  return ragged ? max_ragged_items(vec) : max_items(vec);
}
/// Bytes of one stage of the staged kernel's two-stage buffer: its unit, rounded to 16 bytes;
/// saturated at 2^40 (no device's shared memory), so that any plane length stays overflow-free.
inline int64_t staged_stage_bytes(int planes_per_unit, int64_t plane_len, int elem_bytes) {
  constexpr int64_t kCap = int64_t(1) << 40;
  const int64_t per_plane = int64_t(std::max(1, planes_per_unit)) * std::max(1, elem_bytes);
  if (plane_len > kCap / per_plane) return kCap;
  return (plane_len * per_plane + 15) / 16 * 16;
}

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
  /// 16-byte vectors on planes that are not 16-byte aligned (Problem::ragged_ok): each slice's
  /// body in vectors, its head and tail as one scalar per lane (forward block and split plans).
  bool ragged = false;
  /// Staged plans: planes per unit, a multiple of threads / lanes (the groups of a block take
  /// them in turns; the backward's kernel takes exactly one each).
  int unit_planes = 0;
  bool cooperative = false;      ///< blocks wait on each other: cooperative launch
  /// Co-resident blocks per SM this plan assumes (split plans), from registers and threads.
  int blocks_per_sm = 0;
  /// Split plans with several rounds: group g of blocks starts when group g - 1 has published
  /// its first partial, unless g is a multiple of `phases`, a power of two (1: every group starts
  /// at once; 2^30: one chain).
  int phases = 2;
  Direction direction = Direction::kForward;  ///< the pass it sizes (tensors held on chip)
};

/// Checks a plan against the kernels' contract and the device's limits.
inline bool plan_is_valid(const Plan& p, const Problem& prob, const DeviceProps& d) {
  if (p.threads < 32 || p.threads > std::min(kMaxThreads, d.max_threads_per_block)) return false;
  if (p.threads % 32 != 0) return false;
  if (p.lanes <= 0 || (p.lanes & (p.lanes - 1)) != 0) return false;
  if (p.lanes > 32 && p.lanes != p.threads) return false;
  if (p.lanes > p.threads) return false;
  if (p.vec != 1 && (p.vec * prob.elem_bytes != 16 || !(prob.vector_ok || p.ragged))) return false;
  // Ragged plans: a head and a tail of at most vec - 1 scalars each, one per lane, so at least
  // 2 * (vec - 1) lanes (<= 14; block and split plans have >= 32).
  if (p.ragged && (p.vec == 1 || prob.vector_ok || !prob.ragged_ok ||
                   p.direction != Direction::kForward || p.lanes != p.threads ||
                   p.lanes < 2 * (p.vec - 1) ||
                   !(p.strategy == Strategy::kBlock || p.strategy == Strategy::kSplit ||
                     p.strategy == Strategy::kSplitStream)))
    return false;
  if (p.items < 1 || p.items > max_items_for(p.strategy, p.vec, p.direction, p.ragged)) return false;
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
       p.unit_planes < p.threads / p.lanes || p.unit_planes % (p.threads / p.lanes) != 0 ||
       (p.direction == Direction::kBackward && p.unit_planes != p.threads / p.lanes) ||
       p.smem_bytes < 2 * tensors_on_chip(p.direction) *
                          staged_stage_bytes(p.unit_planes, prob.plane_len, prob.elem_bytes)))
    return false;
  // Forward: smem_items <= 2 * items, the register part's mean centres the whole slice's
  // moments (chunk_moments in kernels/nchw.cuh), accurate while it holds at least a third of
  // it. The backward centres on the saved mean.
  if (p.smem_items > 0 && (p.strategy != Strategy::kSplit || p.lanes != p.threads ||
                           (p.direction == Direction::kForward && p.smem_items > 2 * p.items) ||
                           p.smem_bytes > d.smem_per_block_optin ||
                           p.smem_bytes < int64_t(p.smem_items) * p.threads * p.vec *
                                              prob.elem_bytes * tensors_on_chip(p.direction)))
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

namespace detail {

/// What every NCHW strategy's sizing reads: the problem, the device, the row and the overrides,
/// and the quantities derived from them once.
struct NchwSizing {
  const Problem& prob;
  const DeviceProps& d;
  const ArchPolicy& pol;
  const PlanOverride& ov;
  Direction dir = Direction::kForward;
  int vec = 1, max_i = 0;
  bool ragged = false;      ///< vectors on planes that are not 16-byte aligned (Plan::ragged)
  int64_t L = 0, vecs = 0;  ///< plane length in elements and in vectors
  int split_threads = 0;
  int64_t resident = 0;     ///< split blocks that fit on the GPU at split_threads
  bool use_smem = false;    ///< split slices extend into shared memory

  NchwSizing(const Problem& prob_, const DeviceProps& d_, const ArchPolicy& pol_,
             const PlanOverride& ov_, Direction dir_)
      : prob(prob_), d(d_), pol(pol_), ov(ov_), dir(dir_) {
    vec = ov.vec > 0 ? ov.vec : (prob.vector_ok ? 16 / prob.elem_bytes : 1);
    ragged = vec > 1 && !prob.vector_ok;
    max_i = max_items_for(Strategy::kBlock, vec, dir, ragged);
    L = prob.plane_len;
    vecs = ceil_div(L, vec);
    split_threads = ov.threads > 0 ? ov.threads : pol.split_threads;
    resident = int64_t(std::max(1, resident_blocks_per_sm(d, split_threads))) * d.sm_count;
    use_smem = ov.split_smem >= 0 ? ov.split_smem != 0 : pol.split_smem;
  }
  /// Shared-memory vectors per thread that extend a split block's slice (16-byte slots): the
  /// blocks that fit by registers share the SM's shared memory.
  int smem_cap_for(int threads) const {
    if (!use_smem || d.smem_per_block_optin <= 0) return 0;
    const int by_regs = std::max(1, resident_blocks_per_sm(d, threads));
    const int64_t budget =
        std::min(d.smem_per_block_optin, d.smem_per_sm / by_regs - kSmemPerBlockOverhead);
    return int(clamp64(budget / (int64_t(threads) * 16 * tensors_on_chip(dir)), 0, 32));
  }
  /// Blocks of a group wanted to fill the GPU (1: the problem is too small to pay for the
  /// cooperative launch, or has enough planes) and at most for 2 vectors per thread of work.
  int64_t fill_groups(int threads, int64_t resident_at) const {
    const int64_t total_bytes = prob.planes * L * prob.elem_bytes;
    const int64_t g_fill = prob.planes < resident_at && total_bytes >= kMinFillSplitBytes
                               ? ceil_div(resident_at, prob.planes) : 1;
    return std::min(g_fill, std::max<int64_t>(1, vecs / (int64_t(threads) * 2)));
  }
};

inline void size_staged(const NchwSizing& z, Plan& p);

/// Whether the staged plan for `z` is valid: two stages of its unit fit in shared memory.
inline bool staged_fits(const NchwSizing& z) {
  Plan st;
  st.direction = z.dir;
  st.strategy = Strategy::kStaged;
  size_staged(z, st);
  st.grid = st.block_groups;
  return plan_is_valid(st, z.prob, z.d);
}

/// The strategy for a plane of `vecs` vectors, unless forced: in a warp's registers (sub-warp,
/// or staged where not 16-byte aligned), a block's, or split across blocks (streamed where the
/// GPU cannot hold it). Few planes leave SMs idle unless each plane is split across blocks.
inline Strategy choose_strategy(const NchwSizing& z) {
  if (z.ov.strategy >= 0) return static_cast<Strategy>(z.ov.strategy);
  const int64_t warp_cap = 32 * int64_t(z.max_i);  // vectors a warp holds
  const int64_t block_cap = int64_t(kMaxThreads) * z.max_i;
  const bool few_planes = z.prob.planes < ceil_div(z.d.sm_count, 4);
  // Scalar planes (not 16-byte aligned: 7x7, 3x3, odd lengths) are staged: the block moves its
  // planes as one contiguous unit, with 16-byte copies.
  if (z.vecs <= warp_cap && !(few_planes && z.vecs > 4 * 32))
    return z.vec == 1 ? Strategy::kStaged : Strategy::kSubWarp;
  // Longer scalar planes too, forward, wherever two stages of a unit fit in shared memory: the
  // scalar block kernel keeps the plane in 128 registers per thread, 25% occupancy, 16% of DRAM
  // bandwidth. H200 forward, block -> staged: 4711x16x23x51 869 -> 204 us, 2213x8x2x1429 bf16
  // 462 -> 110 us, 29x28x34x89 30.5 -> 17.6 us, 118x544x7x17 bf16 GroupNorm(32) SiLU 87 -> 41
  // us. The backward was not measured. A forced geometry keeps the plans it was written for.
  if (z.vec == 1 && z.dir == Direction::kForward && !few_planes && z.ov.threads == 0 &&
      z.ov.items == 0 && z.ov.blocks_per_plane == 0 && staged_fits(z))
    return Strategy::kStaged;
  const int64_t g_cap = ceil_div(
      z.vecs, int64_t(z.split_threads) * (z.max_i + z.smem_cap_for(z.split_threads)));
  if (z.vecs <= block_cap && z.fill_groups(z.split_threads, z.resident) <= 1)
    return Strategy::kBlock;
  return g_cap <= z.resident ? Strategy::kSplit : Strategy::kSplitStream;
}

/// 1-32 lanes per plane, several planes per block, the plane in registers.
inline void size_subwarp(const NchwSizing& z, Plan& p) {
  const int sub_threads = z.ov.threads > 0 ? z.ov.threads : z.pol.subwarp_threads;
  const int aim = std::min(z.pol.subwarp_items, z.max_i);
  p.lanes = int(clamp64(pow2_ceil(ceil_div(z.vecs, aim)), 1, 32));
  if (z.ov.items > 0) p.lanes = int(clamp64(pow2_ceil(ceil_div(z.vecs, z.ov.items)), 1, 32));
  p.items = int(std::max<int64_t>(1, ceil_div(z.vecs, p.lanes)));
  p.threads = std::max(p.lanes, sub_threads);
  p.blocks_per_plane = 1;
  p.slice_len = z.vecs * p.vec;
  p.block_groups = std::min(ceil_div(z.prob.planes, p.threads / p.lanes), z.d.max_grid_x);
}

/// Lanes per plane for kStagedLaneItems values each: a power of two up to a warp. Two stages of
/// one unit (the block's planes) each, so the next unit's copy is in flight while this one is
/// reduced and stored; a persistent grid of the blocks that fit walks the units. Aligned planes
/// stay in registers (sub-warp and block plans): staged, on the H100, 4x512x64x64 ran at 0.64
/// of copy (block plan 0.87), 32x256x32x32 at 0.73 (0.93).
inline void size_staged(const NchwSizing& z, Plan& p) {
  p.vec = 1;
  p.threads = kStagedThreads;
  // The backward's unit holds x and dy: half the values per lane, twice the lanes, so a stage
  // keeps the forward's bytes.
  const int64_t want =
      ceil_div(z.L, z.ov.items > 0 ? z.ov.items : kStagedLaneItems / tensors_on_chip(z.dir));
  p.lanes = int(pow2_ceil(clamp64(want, 1, 32)));
  p.items = int(clamp64(ceil_div(z.L, p.lanes), 1, int64_t(1) << 30));
  p.blocks_per_plane = 1;
  p.slice_len = z.L;
  // Forward: several planes per group, for a unit of about kStagedUnitBytes while every
  // resident block still gets four units (staged_unit_aim; the item is one plane for each
  // group); and only 3 planes a group or more (at 2, -12% to +3%; at 3-24, +3% to +30%, H200).
  const int groups = p.threads / p.lanes;
  int64_t per_group = 1;
  if (z.dir == Direction::kForward) {
    const int64_t group_bytes =
        int64_t(groups) * std::min<int64_t>(z.L, kStagedUnitBytes) * z.prob.elem_bytes;
    per_group = clamp64(staged_unit_aim(group_bytes, z.prob.planes / groups, z.d), 1, 1024);
    if (per_group < 3) per_group = 1;
  }
  p.unit_planes = int(groups * per_group);
  const int64_t units = ceil_div(z.prob.planes, p.unit_planes);
  p.smem_bytes = 2 * tensors_on_chip(z.dir) *
                 staged_stage_bytes(p.unit_planes, z.L, z.prob.elem_bytes);
  const int bps = staged_blocks_per_sm(z.d, p.smem_bytes);
  p.blocks_per_sm = bps;
  p.block_groups = std::min({units, int64_t(std::max(1, bps)) * z.d.sm_count, z.d.max_grid_x});
}

/// Whether a plan runs the staged kernel's register instance (staged_kernel<T, false, true,
/// kStagedRegItems>): NCHW forward staged plans whose lanes hold kStagedRegMinItems to
/// kStagedRegItems values of a plane, one map a plane (not Problem::channel_runs). The
/// instance's loops run to kStagedRegItems with the lane's count as a predicate, so few values
/// a lane pay for the empty slots. H100, same plan, old -> register instance (same-run A/B):
/// 9, 10 and 14 values a lane 0.938, 0.966, 0.853 of the time (31777361x1x3x3 fp16,
/// 4393x493x2x5, 5532753x1x2x7 bf16); 1 and 2 values 1.30-1.34 (36167x1643x1x1,
/// 20057x323x1x1, 71126x32x1x2 GN32). Doubling a plan's lanes so that a lane holds at most 14
/// values made all five such plans of sweep seed 19 slower (1.14-1.78: more shuffle levels
/// and fewer planes at a time), so plans keep kStagedLaneItems' lanes.
inline bool staged_in_registers(const Plan& p, const Problem& prob) {
  return p.strategy == Strategy::kStaged && p.direction == Direction::kForward &&
         p.items >= kStagedRegMinItems && p.items <= kStagedRegItems && !prob.channel_runs;
}

/// One block per plane, the plane in registers.
inline void size_block(const NchwSizing& z, Plan& p) {
  const int items = z.ov.items > 0 ? z.ov.items : std::min(z.pol.block_items, z.max_i);
  p.threads = z.ov.threads > 0 ? z.ov.threads
                               : int(clamp64(pow2_ceil(ceil_div(z.vecs, items)),
                                             z.pol.min_block_threads, kMaxThreads));
  p.lanes = p.threads;
  p.items = int(std::max<int64_t>(1, ceil_div(z.vecs, p.threads)));
  p.blocks_per_plane = 1;
  p.slice_len = z.vecs * p.vec;
  p.block_groups = std::min(z.prob.planes, z.d.max_grid_x);
}

/// G co-resident blocks per plane (split), or the plane streamed twice (split-stream).
inline void size_split(const NchwSizing& z, Strategy s, Plan& p) {
  p.threads = z.split_threads;
  // A plane that one block of twice the size holds whole needs no exchange at all
  // (16x64x256x256 fp32 on the H100: 512 threads, 128 KB of registers and 128 KB of shared
  // memory).
  if (z.ov.threads <= 0 && s == Strategy::kSplit &&
      2 * z.split_threads <= std::min(kMaxThreads, z.d.max_threads_per_block) &&
      z.vecs > int64_t(z.split_threads) * (z.max_i + z.smem_cap_for(z.split_threads)) &&
      z.vecs <= int64_t(2 * z.split_threads) * (z.max_i + z.smem_cap_for(2 * z.split_threads)))
    p.threads = 2 * z.split_threads;
  p.lanes = p.threads;
  // Shared memory extends each block's slice beyond its registers (split only): the blocks
  // that fit by registers share the SM's shared memory. Fewer blocks per plane mean fewer,
  // longer rounds per exchange, and the exchange's wait for the slowest block of the group is
  // what split plans lose (without it, 0.94 of copy on 112x64x512x512): G 8 -> 3 took that row
  // from 0.82 to 0.91-0.92 on the H100 once the shared part was copied by cp.async (see
  // smem_fill).
  const int smem_cap = s == Strategy::kSplit ? z.smem_cap_for(p.threads) : 0;
  const int64_t resident_t =
      int64_t(std::max(1, resident_blocks_per_sm(
                              z.d, p.threads,
                              int64_t(smem_cap) * p.threads * p.vec * z.prob.elem_bytes *
                                  tensors_on_chip(z.dir)))) *
      z.d.sm_count;
  int64_t g;
  if (z.ov.blocks_per_plane > 0) {
    g = z.ov.blocks_per_plane;
  } else if (s != Strategy::kSplitStream) {
    // Slices are rounded to 512 bytes (32 vectors) before they must fit on chip.
    const int64_t cap_vecs = int64_t(p.threads) * (max_items_for(s, p.vec, z.dir, z.ragged) + smem_cap);
    const int64_t g_cap = ceil_div(z.vecs, cap_vecs);
    g = choose_group_size(z.prob.planes, resident_t, g_cap, z.fill_groups(p.threads, resident_t),
                          [&](int64_t c) {
                            return ceil_div(ceil_div(z.vecs, c), 32) * 32 <= cap_vecs;
                          });
    if (g == 0) g = resident_t;  // nothing fits: streamed below
  } else {
    g = resident_t;
  }
  g = clamp64(g, 1, std::max<int64_t>(1, std::min(resident_t, z.vecs)));
  p.blocks_per_plane = g;
  // Slices start on 512-byte boundaries: unaligned slices (G = 11 on 1 MB planes) cost 20% on
  // the H100.
  const int64_t slice_vecs = ceil_div(ceil_div(z.vecs, g), 32) * 32;
  p.slice_len = slice_vecs * p.vec;
  p.items = int(clamp64(ceil_div(slice_vecs, p.threads), 1, max_items_for(s, p.vec, z.dir, z.ragged)));
  if (z.ov.items > 0) p.items = z.ov.items;
  if (s == Strategy::kSplit && smem_cap > 0) {
    const int64_t rest = ceil_div(slice_vecs, p.threads) - p.items;
    if (rest > 0 && rest <= smem_cap) {
      p.smem_items = int(rest);
      p.smem_bytes = int64_t(p.smem_items) * p.threads * p.vec * z.prob.elem_bytes *
                     tensors_on_chip(z.dir);
    }
  }
  if (s != Strategy::kSplitStream && slice_vecs > int64_t(p.items + p.smem_items) * p.threads) {
    p.strategy = Strategy::kSplitStream;
    p.items = std::min(p.items, max_items_for(Strategy::kSplitStream, p.vec, z.dir, z.ragged));
  }
  const int64_t resident_final =
      int64_t(std::max(1, resident_blocks_per_sm(z.d, p.threads, p.smem_bytes))) * z.d.sm_count;
  p.block_groups = std::max<int64_t>(1, std::min(z.prob.planes, resident_final / g));
  p.blocks_per_sm = resident_blocks_per_sm(z.d, p.threads, p.smem_bytes);
}

}  // namespace detail

/// Chooses the plan for `prob` on a device with `d`, using `pol` (normally policy_for(d)), for
/// the forward or (sizes only, before its kernels exist) the backward pass. Returns false if no
/// valid plan exists (then the call reports cudaErrorInvalidConfiguration).
inline bool make_plan(const Problem& prob, const DeviceProps& d, const ArchPolicy& pol,
                      Plan* out, const PlanOverride& ov = {},
                      Direction dir = Direction::kForward) {
  const detail::NchwSizing z0(prob, d, pol, ov, dir);
  Plan p;
  p.direction = dir;
  p.strategy = detail::choose_strategy(z0);
  // Scalar planes that the staged and sub-warp plans leave to a block or a split plan take 16-byte
  // vectors for the body of each slice (Plan::ragged) where x and y allow it: the scalar
  // kernel held them at 128 registers per thread and 25% occupancy.
  const bool ragged = dir == Direction::kForward && prob.ragged_ok && z0.vec == 1 &&
                      ov.vec <= 0 &&
                      (p.strategy == Strategy::kBlock || p.strategy == Strategy::kSplit ||
                       p.strategy == Strategy::kSplitStream);
  PlanOverride vov = ov;
  if (ragged) vov.vec = 16 / prob.elem_bytes;
  const detail::NchwSizing z(prob, d, pol, vov, dir);
  if (ragged) {
    p.strategy = detail::choose_strategy(z);
    // Fewer vectors than scalars can look like a sub-warp plane; ragged plans need whole blocks.
    if (p.strategy == Strategy::kSubWarp || p.strategy == Strategy::kStaged)
      p.strategy = Strategy::kBlock;
  }
  p.vec = z.vec;
  p.ragged = z.ragged;
  switch (p.strategy) {
    case Strategy::kSubWarp: detail::size_subwarp(z, p); break;
    case Strategy::kStaged: detail::size_staged(z, p); break;
    case Strategy::kBlock: detail::size_block(z, p); break;
    case Strategy::kSplit:
    case Strategy::kSplitStream: detail::size_split(z, p.strategy, p); break;
  }
  p.cooperative = p.blocks_per_plane > 1;
  p.phases = ov.phases > 0 ? ov.phases : pol.phases;
  p.grid = p.block_groups * p.blocks_per_plane;
  *out = p;
  return plan_is_valid(p, prob, d);
}

}  // namespace instnorm
