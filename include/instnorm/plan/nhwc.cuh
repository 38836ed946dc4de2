#pragma once
/// \file plan/nhwc.cuh
/// The channels-last planner: on chip (an image slice by all rows over G blocks), staged (whole
/// small images through shared memory) or tiled.

#include "common.cuh"

namespace instnorm {

/// Tensors from which NHWC rows that are not 16-byte aligned leave the on-chip plan for the
/// staged or the tiled one (make_nhwc_plan); below, one launch of the on-chip kernel is cheaper.
constexpr int64_t kNhwcScalarPlanBytes = int64_t(4) << 20;
/// Fewest of its kStagedThreads threads a staged NHWC unit keeps busy.
constexpr int64_t kNhwcStagedMinThreads = 64;
/// Most values a staged NHWC lane walks where fewer lanes per plane would keep an image's
/// planes in one round of the block's groups (make_nhwc_staged_plan).
constexpr int64_t kNhwcStagedMaxLaneItems = 256;
/// Longest staged NHWC plane that keeps one lane (make_nhwc_staged_plan). H100, same-run A/B
/// against one lane per plane: 1110x70x1x71 fp16 at 2 lanes 1.41x the time, 3067x133x5x47 bf16
/// at 8 lanes (5 rounds) 1.12x; 89278x3x14x15 (210 values) at 8 lanes 0.60x, 66279x4x1x193
/// 0.63x, 20124x3x18x29 bf16 (522) at 32 lanes 0.45x.
constexpr int64_t kNhwcStagedOneLaneItems = 128;

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
  /// Staged (instance norm, rows not 16-byte aligned, images small enough): the NCHW staged
  /// kernel with units of `unit_images` whole images and `lanes` threads per plane (a power of
  /// two up to a warp; the block's groups of lanes take the unit's planes in turns).
  /// `smem_bytes` holds its two stages, `grid` its persistent blocks.
  bool staged = false;
  int64_t unit_images = 0;
  int lanes = 1;
  int vec = 1;                   ///< channels per vector (16 bytes, or 1)
  int cols_per_block = 0;        ///< column vectors a block covers
  int row_lanes = 0;             ///< threads per column (threads / cols_per_block)
  int64_t col_chunks = 0;        ///< column slices of an image (tiled: grid.y)
  // Tiled plans.
  int64_t tile_rows = 0;         ///< spatial positions per block
  int64_t tiles = 0;             ///< tiles per image
  int64_t batch_images = 0;      ///< images per batch of the three kernels
  int64_t max_grid_x = 0;        ///< the device's grid limit, which the tiled launches respect
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

/// Bytes of one stage of an NHWC staged unit of `images` whole images, rounded to 16 bytes.
/// Saturated at 2^40 (no device's shared memory), so that no image count overflows.
inline int64_t staged_unit_bytes(int64_t images, const Problem& prob) {
  constexpr int64_t kCap = int64_t(1) << 40;
  const int64_t image = prob.spatial * prob.c * prob.elem_bytes;  // <= the tensor's bytes
  if (images < 0 || image <= 0 || images > kCap / image) return kCap;
  return (images * image + 15) / 16 * 16;
}

/// Bytes of a batch that the second read of x expects to find in L2 (ArchPolicy::nhwc_l2_percent).
inline int64_t nhwc_l2_budget(const DeviceProps& d, const ArchPolicy& pol) {
  return d.l2_bytes * pol.nhwc_l2_percent / 100;
}

inline bool nhwc_plan_is_valid(const NhwcPlan& p, const Problem& prob, const DeviceProps& d) {
  if (p.vec != 1 && (p.vec * prob.elem_bytes != 16 || !prob.vector_ok)) return false;
  if (p.staged) {
    const int64_t planes = p.unit_images * prob.c;
    return !p.on_chip && p.vec == 1 && prob.channels_per_group == 1 && p.unit_images >= 1 &&
           p.lanes >= 1 && p.lanes <= 32 && (p.lanes & (p.lanes - 1)) == 0 &&
           planes * prob.spatial < (int64_t(1) << 31) &&
           p.smem_bytes >= 2 * staged_unit_bytes(p.unit_images, prob) &&
           p.smem_bytes <= d.smem_per_block_optin && p.grid >= 1 && p.grid <= d.max_grid_x &&
           d.max_threads_per_block >= kStagedThreads && staged_blocks_per_sm(d, p.smem_bytes) >= 1;
  }
  if (prob.c % p.vec != 0) return false;
  const int64_t cv = prob.c / p.vec;
  if (!p.on_chip) {
    if (p.cols_per_block < 1 || p.cols_per_block > kNhwcThreads) return false;
    if (p.row_lanes != kNhwcThreads / p.cols_per_block) return false;
    if (p.col_chunks < 1 || p.col_chunks * p.cols_per_block < cv || p.col_chunks > 65535)
      return false;
    if (p.tile_rows < 1 || p.tiles < 1 || p.tiles * p.tile_rows < prob.spatial) return false;
    if (p.batch_images < 1 || p.batch_images > prob.n) return false;
    if (p.max_grid_x < 1 || p.max_grid_x > d.max_grid_x) return false;
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

/// Whether an on-chip NHWC call runs the kernel's kParams instance (nhwc_on_chip): GroupNorm with
/// gamma, beta or a modulation, whose channels' maps it loads as each unit begins and folds one
/// channel per thread. Every other call (no parameters; instance norm, whose group thread loads
/// its one channel's map anyway) runs the instance without it. Same results either way (the same
/// operations per channel); the rule decides speed only, so it is tested here, on the host.
inline bool nhwc_on_chip_folds_params(const Problem& prob, const Options& opt) {
  const bool params = opt.gamma != nullptr || opt.beta != nullptr ||
                      opt.modulation.scale != nullptr || opt.modulation.shift != nullptr;
  return params && prob.channels_per_group > 1;
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

/// The staged plan for instance norm with rows that are not 16-byte aligned or at most one
/// 16-byte vector wide (where the on-chip plan spends a block on one column), or false: units
/// of whole images through two stages of shared memory, as the NCHW staged plan sizes them
/// (size_staged, plan/nchw.cuh): `lanes` threads per plane for about kStagedLaneItems values
/// each, and images per unit for about kStagedUnitBytes, the groups of lanes taking the unit's
/// planes in turns. With one lane per plane and at most a block's planes per unit (the plan
/// before), 3067x133x5x47 bf16 ran at 0.13 of copy on the H200 (133 threads of a block, each
/// walking 235 rows alone) and 11713171x3x2x3 fp16 at 0.21 (units of 3 KB: 12 KB in flight
/// per SM).
inline bool make_nhwc_staged_plan(const Problem& prob, const DeviceProps& d, NhwcPlan* out) {
  if ((prob.vector_ok && prob.c * prob.elem_bytes > 16) || prob.channels_per_group != 1)
    return false;
  const int64_t S = prob.spatial;
  // One lane per plane up to kNhwcStagedOneLaneItems values; longer planes take lanes for
  // about kStagedLaneItems values each, fewer where an image's planes would not fit one round
  // of the block's groups, unless a lane would then walk more than kNhwcStagedMaxLaneItems
  // values: rounds whose last is partly idle cost more than the lanes save.
  int lanes = S <= kNhwcStagedOneLaneItems
                  ? 1
                  : int(pow2_ceil(clamp64(ceil_div(S, kStagedLaneItems), 1, 32)));
  while (lanes > 1 && prob.c * lanes > kStagedThreads &&
         ceil_div(S, lanes / 2) <= kNhwcStagedMaxLaneItems)
    lanes /= 2;
  const int64_t groups = kStagedThreads / lanes;
  const int64_t image_bytes = S * prob.c * prob.elem_bytes;
  const auto fits = [&](int64_t k) {
    const int64_t smem = 2 * staged_unit_bytes(k, prob);
    return smem <= d.smem_per_block_optin && staged_blocks_per_sm(d, smem) >= 1;
  };
  if (image_bytes <= 0 || !fits(1)) return false;  // not one image fits
  // The aim: the NCHW staged plan's (staged_unit_aim, in images), but a plane for every group
  // of lanes (k_min) where that many images stay near kStagedUnitBytes, within n and shared
  // memory; never fewer than kNhwcStagedMinThreads busy threads (k_floor).
  const int64_t k_min =
      std::min(ceil_div(groups, prob.c), std::max<int64_t>(1, staged_items_by_bytes(image_bytes)));
  const int64_t k_floor = ceil_div(kNhwcStagedMinThreads, lanes * prob.c);
  const int64_t resident = int64_t(kStagedBlocksPerSm) * std::max(1, d.sm_count);
  int64_t aim = clamp64(staged_unit_aim(image_bytes, prob.n, d), k_min, prob.n);
  while (aim > k_floor && !fits(aim)) --aim;
  if (aim < k_floor || !fits(aim)) return false;
  // Candidates from half the aim to the aim rounded up to a whole number of 16 bytes (cp.async
  // copies; only such counts where one lies there): the one whose last round of planes leaves
  // the fewest groups idle (busy / slots, compared as cross products); on a tie the larger
  // with one lane per plane (larger units; 11713171x3x2x3 fp16, 6 full rounds, 0.81x the time
  // of the 3 KB units before), the smaller (fewer rounds) with several.
  // 89278x3x210 fp32 (8 lanes, 32 groups): 10 images (30 planes, one round) rather than 11-12
  // (two rounds, the second a tenth busy).
  int64_t align = 1;
  while (align < 16 && (align * image_bytes) % 16 != 0) align *= 2;
  // Rounded up only while every resident block still gets a unit (1110x70x1x71 fp16: 1 -> 4
  // images left 278 units for 528 block slots).
  int64_t hi = ceil_div(aim, align) * align;
  if (hi > prob.n || !fits(hi) || (hi > aim && ceil_div(prob.n, hi) < resident)) hi = aim;
  const int64_t lo = std::max(k_floor, aim / 2);
  const int64_t step = hi / align * align >= lo ? align : 1;
  int64_t k = 0, best_busy = 0, best_slots = 1;
  for (int64_t i = hi / step * step; i >= lo; i -= step) {
    const int64_t busy = i * prob.c, slots = ceil_div(busy, groups) * groups;
    if (k == 0 || busy * best_slots > best_busy * slots ||
        (lanes > 1 && busy * best_slots == best_busy * slots)) {
      k = i;
      best_busy = busy;
      best_slots = slots;
    }
  }
  if (k == 0) return false;
  // Few units: whole rounds of the resident blocks. Where k leaves two to four rounds of units
  // over the blocks that fit at once, the count that needs a round fewer wins when a block's
  // work (rounds times images) shrinks: 1110x70x1x71 fp16 at k2 (555 units over 528 block
  // slots, a second round for 27 of them) took 1.27x the time of k3 (370 units, one round;
  // H100, same-run A/B). Larger units can fit fewer blocks per SM: each count by its own. A
  // unit of whole 16-byte vectors keeps them (cp.async copies; element by element the copy
  // ran at 0.74 of copy where 16-byte copies reached 0.87, 128x512x7x7 on the H100).
  const auto slots = [&](int64_t i) {  // blocks of units of i images that fit at once
    return std::max<int64_t>(1, int64_t(staged_blocks_per_sm(d, 2 * staged_unit_bytes(i, prob))) *
                                    std::max(1, d.sm_count));
  };
  const auto rounds = [&](int64_t i) { return ceil_div(ceil_div(prob.n, i), slots(i)); };
  const int64_t r = rounds(k);
  if (r >= 2 && r <= 4) {
    int64_t k2 = ceil_div(prob.n, (r - 1) * slots(k));
    if ((k * image_bytes) % 16 == 0) k2 = ceil_div(k2, align) * align;
    if (k2 > k && k2 <= prob.n && fits(k2) && rounds(k2) * k2 < r * k) k = k2;
  }
  NhwcPlan p;
  p.staged = true;
  p.vec = 1;
  p.unit_images = k;
  p.lanes = lanes;
  p.smem_bytes = 2 * staged_unit_bytes(k, prob);
  p.grid = std::min({ceil_div(prob.n, k),
                     int64_t(std::max(1, staged_blocks_per_sm(d, p.smem_bytes))) * d.sm_count,
                     d.max_grid_x});
  p.block_groups = p.grid;
  if (!nhwc_plan_is_valid(p, prob, d)) return false;  // *out untouched
  *out = p;
  return true;
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
  p.max_grid_x = d.max_grid_x;
  *out = p;
  return nhwc_plan_is_valid(p, prob, d);
}

}  // namespace detail


/// The NHWC plan: on chip where a plan fits (unless `ov` forbids it), else tiled; tiled first
/// for large tensors whose rows are not 16-byte aligned.
/// `policy` forces a table row (null: the device's, policy_for(d)).
inline bool make_nhwc_plan(const Problem& prob, const DeviceProps& d, NhwcPlan* out,
                           const PlanOverride& ov = {}, const ArchPolicy* policy = nullptr) {
  const ArchPolicy& pol = policy ? *policy : policy_for(d);
  // Vectors hold channels of one row: a problem whose rows they do not tile (one validated as
  // NCHW, where the layouts coincide) has no NHWC plan.
  if (prob.c < 1 || prob.elem_bytes < 1 || (prob.vector_ok && prob.c % (16 / prob.elem_bytes) != 0))
    return false;
  // From a few MiB on (below, one launch of the on-chip kernel is cheapest), rows that are not
  // 16-byte aligned or one vector wide leave the on-chip plan, which then spends 256 threads on
  // a column: scalar rows ran at 125 registers, 25% occupancy, 6% of DRAM bandwidth. Small
  // images are staged, units of whole images through shared memory (make_nhwc_staged_plan;
  // 89278x3x14x15, 11713171x3x2x3 fp16, 49950x20x2x5 bf16, 66279x4x1x193 fp32 ran at
  // 0.001-0.05 of copy on chip); other scalar rows are tiled, x read twice, which beat the
  // on-chip plan on every scalar row measured (H200, forward): 3067x133x5x47 bf16 1221 -> 776
  // us (staged since), 38x387x19x27 bf16 172 -> 75 us, 47x150x60x75 fp32 413 -> 308 us,
  // 4x1111x27x39 bf16 100 -> 51 us, 89278x3x14x15 fp32 2532 -> 1309 us (staged since).
  const bool big = prob.n * prob.spatial * prob.c * prob.elem_bytes >= kNhwcScalarPlanBytes;
  const bool scalar_rows = !prob.vector_ok;
  if (big && ov.nhwc_on_chip < 0 && (scalar_rows || prob.c * prob.elem_bytes <= 16) &&
      detail::make_nhwc_staged_plan(prob, d, out))
    return true;
  if (big && scalar_rows && ov.nhwc_on_chip != 1 &&
      detail::make_nhwc_tiled_plan(prob, d, pol, out, ov.nhwc_l2_budget, ov.nhwc_chunks))
    return true;
  if (ov.nhwc_on_chip != 0 && detail::make_nhwc_on_chip_plan(prob, d, pol, ov, out)) return true;
  if (ov.nhwc_on_chip == 1) return false;
  return detail::make_nhwc_tiled_plan(prob, d, pol, out, ov.nhwc_l2_budget, ov.nhwc_chunks);
}

}  // namespace instnorm
