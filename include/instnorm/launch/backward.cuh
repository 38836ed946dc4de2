#pragma once
/// \file launch/backward.cuh
/// The backward's plan, workspace and launches (NCHW: kernels/backward.cuh).

#include <algorithm>
#include <cstdint>

#include "../kernels/backward.cuh"
#include "../kernels/backward_nhwc.cuh"
#include "../kernels/backward_nhwc_on_chip.cuh"
#include "../kernels/backward_staged.cuh"
#include "launch.cuh"
#include "../options.cuh"
#include "../plan.cuh"
#include "../validate.cuh"
#include "device.cuh"

namespace instnorm {
namespace detail {

/// The fields both backward parameter structs take from the call: the tensors, the options
/// (as the forward's), and the statistics the backward reads.
template <class Params, class T>
inline void set_backward_fields(Params& p, const T* x, const T* dy, T* dx, const Problem& prob,
                                const Options& opt) {
  p.x = x;
  p.dy = dy;
  p.dx = dx;
  set_option_fields(p, prob, opt);
  p.use_input_stats = opt.use_input_stats;
}

/// Whether the call asks for a parameter's gradient (so the kernel leaves per-block partials).
inline bool wants_param_grads(const Gradients& g) {
  return g.dgamma != nullptr || g.dbeta != nullptr || g.dscale != nullptr || g.dshift != nullptr;
}

/// After the backward kernels: the parameter gradients the call asks for, from the kernels'
/// per-(image, channel, block) partials (G blocks per plane). `dependent`: launched as a
/// programmatic dependent of the kernel before it (grid/dependency.cuh).
template <class T>
inline cudaError_t launch_grad_params(const float2* partials, const Problem& prob, int64_t G,
                                      const EpilogueFields& f, const Gradients& g,
                                      cudaStream_t stream, bool dependent = false) {
  LaunchShape fin;  // a warp per channel, 8 per block
  fin.grid = dim3(static_cast<unsigned>(std::min<int64_t>((prob.c + 7) / 8, 65535)));
  fin.block = dim3(256);
  fin.dependent = dependent;
  return launch_kernel(grad_params_kernel<T>, fin, stream, partials, prob.n, prob.c, G, f, g);
}

/// The backward's NCHW plan: the forward's planner sized for two tensors on chip (registers,
/// and for split plans the shared-memory extension, x's part and dy's; staged units of x and
/// dy), and, for GroupNorm's per-channel partials, a float2 of shared memory per vector a block
/// holds (without the extension if both do not fit).
inline bool make_backward_plan(const Problem& prob, const DeviceProps& d, const ArchPolicy& pol,
                               bool param_grads, Plan* out, PlanOverride ov = {}) {
  if (!prob.vector_ok) ov.split_smem = 0;  // the kernel extends 16-byte vectors only
  const auto plan_with = [&](const PlanOverride& o) {
    bool ok = make_plan(prob, d, pol, out, o, Direction::kBackward);
    if (param_grads && prob.channels_per_group > 1 && out->strategy != Strategy::kStaged) {
      out->smem_bytes +=
          int64_t(out->threads) * (out->items + out->smem_items) * int64_t(sizeof(float2));
      ok = ok && plan_is_valid(*out, prob, d);
    }
    return ok;
  };
  if (plan_with(ov)) {
    // A plane a block holds in registers runs faster as a split plan of one block with fewer
    // threads and the slice extended into shared memory: more planes in flight per SM (two
    // 256-thread blocks of 128 registers otherwise). H200, fraction of the copy floor, block
    // plan -> split G 1 of 64/128 threads: 4x512x64x64 0.69 -> 0.79/0.82, 32x256x32x32 0.75 ->
    // 0.79 (64), 8x512x64x64 bf16 0.61 -> 0.71 (64). About 8 vectors per thread. Instance
    // norm only: those were the rows measured (forced plans, dx checked by the bench).
    if (out->strategy == Strategy::kBlock && ov.strategy < 0 && ov.threads == 0 &&
        ov.blocks_per_plane == 0 && prob.vector_ok && prob.channels_per_group == 1) {
      const Plan block = *out;
      PlanOverride small = ov;
      small.strategy = int(Strategy::kSplit);
      small.blocks_per_plane = 1;
      const int64_t vecs = ceil_div(prob.plane_len, 16 / prob.elem_bytes);
      small.threads = int(clamp64(pow2_ceil(ceil_div(vecs, 8)), 64, kMaxThreads));
      if (!plan_with(small)) *out = block;
    }
    return true;
  }
  // The partials' shared memory beside the extension can leave a block too large to be
  // co-resident: more blocks per plane, smaller slices, until it fits (GroupNorm
  // 1x256x256x256 fp16 ran register-only slices on 52 blocks per group, 0.22 of the floor).
  if (param_grads && prob.channels_per_group > 1 && ov.blocks_per_plane == 0 &&
      out->strategy == Strategy::kSplit && out->smem_items > 0) {
    const int64_t g0 = out->blocks_per_plane;
    for (int64_t g = g0 + 1; g <= 2 * g0 + 8; ++g) {
      PlanOverride more = ov;
      more.blocks_per_plane = g;
      if (plan_with(more) && out->smem_items > 0) return true;
    }
  }
  if (ov.split_smem == 0) return false;
  ov.split_smem = 0;
  return plan_with(ov);
}

inline cudaError_t current_backward_plan(const Problem& prob, const Gradients& g, Plan* plan,
                                         const PlanOverride& ov = {},
                                         const ArchPolicy* policy = nullptr) {
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  const ArchPolicy& pol = policy ? *policy : policy_for(d);
  return make_backward_plan(prob, d, pol, wants_param_grads(g), plan, ov)
             ? cudaSuccess
             : cudaErrorInvalidConfiguration;
}

/// Whether the NCHW kernel stores dscale/dshift itself (BackwardParams::dscale): instance norm
/// without gamma and beta (AdaIN's content side), one block per plane and not streamed, neither
/// dgamma nor dbeta asked; then dshift = sum of d and dscale = sum of d * xhat in either
/// convention. (H200, 8x512x64x64 bf16 AdaIN backward: the partials and grad_params_kernel's
/// launch cost about 3.5 us of a 30 us call.)
inline bool direct_scale_shift(const Plan& p, const Problem& prob, const Options& opt,
                               const Gradients& g) {
  return prob.channels_per_group == 1 && p.blocks_per_plane == 1 &&
         p.strategy != Strategy::kSplitStream && opt.gamma == nullptr &&
         opt.beta == nullptr && g.dgamma == nullptr && g.dbeta == nullptr &&
         (g.dscale != nullptr || g.dshift != nullptr);
}

/// [tagged slots of cooperative plans][per-(image, channel, block) partials of the parameter
/// gradients, unless the kernel stores them directly].
inline WorkspaceLayout backward_workspace_layout(const Plan& p, const Problem& prob,
                                                 const Options& opt, const Gradients& g) {
  WorkspaceLayout w;
  w.slots_bytes = p.cooperative ? 2 * size_t(p.grid) * sizeof(GradSlot) : 0;
  w.slots = w.add(w.slots_bytes);
  w.partials_bytes = wants_param_grads(g) && !direct_scale_shift(p, prob, opt, g)
                         ? size_t(prob.n) * size_t(prob.c) *
                                                size_t(p.blocks_per_plane) * sizeof(float2)
                                          : 0;
  w.partials = w.add(w.partials_bytes);
  return w;
}

template <class T>
using BackwardFn = void (*)(BackwardParams<T>);
template <class T>
inline BackwardFn<T> select_backward_kernel(int vec, Strategy s) {
  constexpr int kFull = 16 / int(sizeof(T));
  if (vec != kFull && vec != 1) return nullptr;
  const bool full = vec == kFull;
  if (s == Strategy::kSplitStream)
    return full ? backward_kernel<T, kFull, max_backward_stream_items(kFull), true>
                : backward_kernel<T, 1, max_backward_stream_items(1), true>;
  return full ? backward_kernel<T, kFull, max_backward_items(kFull), false>
              : backward_kernel<T, 1, max_backward_items(1), false>;
}

template <class T>
inline cudaError_t launch_backward(const T* x, const T* dy, T* dx, const Problem& prob,
                                   const Options& opt, const Gradients& g, const Plan& plan,
                                   void* workspace, cudaStream_t stream) {
  if (plan.direction != Direction::kBackward) return cudaErrorInvalidConfiguration;
  const BackwardFn<T> kernel = plan.strategy == Strategy::kStaged
                                   ? staged_backward_kernel<T>
                                   : select_backward_kernel<T>(plan.vec, plan.strategy);
  if (kernel == nullptr) return cudaErrorInvalidConfiguration;
  const WorkspaceLayout w = backward_workspace_layout(plan, prob, opt, g);
  BackwardParams<T> bp{};
  set_backward_fields(bp, x, dy, dx, prob, opt);
  bp.planes = prob.planes;
  bp.plane_len = prob.plane_len;
  bp.channels_per_group = prob.channels_per_group;
  set_plan_fields(bp, plan);
  if (w.slots_bytes > 0) bp.slots = WorkspaceLayout::at<GradSlot>(workspace, w.slots);
  if (w.partials_bytes > 0) bp.partials = WorkspaceLayout::at<float2>(workspace, w.partials);
  if (direct_scale_shift(plan, prob, opt, g)) {
    bp.dscale = g.dscale;
    bp.dshift = g.dshift;
  }
  INSTNORM_RETURN_IF_ERROR(clear_slots(w, workspace, stream));
  INSTNORM_RETURN_IF_ERROR(
      launch_kernel(kernel, plan_launch_shape(plan, sizeof(GradReduceStorage)), stream, bp));
  if (bp.partials == nullptr) return cudaSuccess;
  return launch_grad_params<T>(bp.partials, prob, plan.blocks_per_plane, bp, g, stream);
}

// ---------------------------------------------------------------- channels-last

/// The tiled NHWC backward's geometry: `cols` column vectors per 256-thread block, `tiles` row
/// tiles per image so that about four blocks per SM run each pass.
struct NhwcGradShape {
  int vec = 1, cols = 1;
  int64_t col_chunks = 1, tiles = 1, tile_rows = 1;
};
constexpr int kNhwcGradThreads = 256;
/// Least rows per thread of a tile of the sums step. 4 (twice the tiles on small images) was
/// 4% faster on 2x640x32x32 fp16 GN32 SiLU and 2-3% slower on 2x320x64x64 and its training
/// step (H100, docs/perf-notes.md): the finalize walks the tiles.
constexpr int kNhwcGradMinRows = 8;

inline NhwcGradShape nhwc_grad_shape(const Problem& prob, const DeviceProps& d) {
  NhwcGradShape s;
  s.vec = prob.vector_ok ? 16 / prob.elem_bytes : 1;
  const int64_t cvec = prob.c / s.vec;
  s.cols = int(std::min<int64_t>(cvec, 128));
  s.col_chunks = ceil_div(cvec, s.cols);
  const int64_t row_lanes = kNhwcGradThreads / s.cols;
  // About two blocks per SM, each thread at least kNhwcGradMinRows rows (a tile's sums are
  // what the finalize walks: fewer tiles, a shorter walk).
  const int64_t want = ceil_div(2 * int64_t(std::max(1, d.sm_count)), prob.n * s.col_chunks);
  s.tiles = clamp64(want, 1, std::max<int64_t>(1, prob.spatial / (kNhwcGradMinRows * row_lanes)));
  s.tile_rows = ceil_div(prob.spatial, s.tiles);
  s.tiles = ceil_div(prob.spatial, s.tile_rows);
  return s;
}

/// [per-(image, channel) partials of dgamma/dbeta][unit coefficients][tile sums][dx's GradCoef
/// per (image, channel): float4s, then the floats p0].
inline WorkspaceLayout nhwc_backward_layout(const NhwcGradShape& s, const Problem& prob,
                                            const Gradients& g) {
  WorkspaceLayout w;
  w.partials_bytes = wants_param_grads(g) ? size_t(prob.n) * size_t(prob.c) * sizeof(float2) : 0;
  w.partials = w.add(w.partials_bytes);
  w.group_stats_bytes = size_t(prob.planes) * sizeof(float4);
  w.group_stats = w.add(w.group_stats_bytes);
  w.slots_bytes = size_t(prob.n) * size_t(s.tiles) * size_t(prob.c) * sizeof(float4);
  w.slots = w.add(w.slots_bytes);
  w.coef_bytes = size_t(prob.n) * size_t(prob.c) * (sizeof(float4) + sizeof(float));
  w.coef = w.add(w.coef_bytes);
  return w;
}

/// Whether the channels-last finalize stores dscale/dshift itself (NhwcGradParams::dscale):
/// neither dgamma nor dbeta asked, as in scale-shift GroupNorm with frozen or no affine
/// parameters; its partials are per (image, channel) already (one block's, G = 1).
inline bool nhwc_direct_scale_shift(const Gradients& g) {
  return g.dgamma == nullptr && g.dbeta == nullptr && (g.dscale != nullptr || g.dshift != nullptr);
}

/// The fields both channels-last backwards (tiled and on chip) take from the call: tensors,
/// options, sizes, the slice's column vectors, the per-(image, channel) partials of the
/// parameter gradients where the layout has them, and dscale/dshift where the kernels store
/// them directly (returned: then grad_params_kernel is not launched).
template <class T>
inline bool set_nhwc_grad_fields(NhwcGradParams<T>& p, const T* x, const T* dy, T* dx,
                                 const Problem& prob, const Options& opt, const Gradients& g,
                                 int cols, int vec, const WorkspaceLayout& w, void* workspace) {
  set_backward_fields(p, x, dy, dx, prob, opt);
  p.n = prob.n;
  p.c = prob.c;
  p.cpg = prob.channels_per_group;
  p.cols = cols;
  p.coef_vec = vec;
  if (w.partials_bytes > 0) p.partials = WorkspaceLayout::at<float2>(workspace, w.partials);
  const bool direct = nhwc_direct_scale_shift(g);
  if (direct) {
    p.dscale = g.dscale;
    p.dshift = g.dshift;
  }
  return direct;
}

/// The on-chip channels-last backward's plan (kernels/backward_nhwc_on_chip.cuh): slices of
/// `cols` column vectors by all rows, G blocks per slice, each thread `rows` rows of x and dy
/// in shared memory.
struct NhwcGradChipPlan {
  int vec = 1, cols = 0, row_lanes = 0, rows = 0;
  int64_t col_slices = 0, G = 0, slice_rows = 0, smem_bytes = 0, block_groups = 0, grid = 0;
  bool cooperative = false;
};

/// Blocks of the on-chip backward that fit an SM with `smem` bytes of dynamic shared memory.
inline int nhwc_grad_chip_per_sm(const DeviceProps& d, int64_t smem) {
  return resident_blocks_per_sm(d, kNhwcGradChipThreads, smem, kSmemRuntimeReserve);
}

inline bool nhwc_grad_chip_plan_is_valid(const NhwcGradChipPlan& p, const Problem& prob,
                                         const Options& opt, const DeviceProps& d) {
  if (!prob.nhwc || !prob.vector_ok || !opt.use_input_stats) return false;
  if (p.vec * prob.elem_bytes != 16 || prob.c % p.vec != 0) return false;
  const int64_t cv = prob.c / p.vec, chs = int64_t(p.cols) * p.vec;
  if (p.cols < 1 || p.cols > kNhwcGradChipThreads || cv % p.cols != 0) return false;
  if (chs > kNhwcGradChipMaxChannels || chs % prob.channels_per_group != 0) return false;
  if (p.row_lanes != kNhwcGradChipThreads / p.cols || p.col_slices != cv / p.cols) return false;
  if (p.rows < 1 || p.slice_rows != int64_t(p.rows) * p.row_lanes) return false;
  if (p.G < 1 || p.slice_rows * p.G < prob.spatial || p.G > (int64_t(1) << 30)) return false;
  if (p.G > 1 && nhwc_grad_chip_merge_loads(p.G, chs) > kNhwcGradChipMaxLoads) return false;
  if (p.smem_bytes != nhwc_grad_chip_prefix_bytes(p.cols, p.vec) +
                          int64_t(p.rows) * nhwc_grad_chip_row_bytes())
    return false;
  if (p.smem_bytes > d.smem_per_block_optin || d.max_threads_per_block < kNhwcGradChipThreads)
    return false;
  const int per_sm = nhwc_grad_chip_per_sm(d, p.smem_bytes);
  if (per_sm < 1 || p.block_groups < 1 || p.grid != p.block_groups * p.G ||
      p.grid > d.max_grid_x || p.block_groups > prob.n * p.col_slices)
    return false;
  if (p.cooperative != (p.G > 1)) return false;
  if (p.cooperative && (!d.cooperative || p.grid > int64_t(per_sm) * d.sm_count)) return false;
  return true;
}

/// The on-chip backward's plan, or false where none fits (eval mode, rows not 16-byte aligned,
/// groups wider than kNhwcGradChipMaxChannels, a unit whose exchange would exceed
/// kNhwcGradChipMaxLoads per thread). For each slice width that divides the row, keeps groups
/// whole and (as the forward's, ArchPolicy::nhwc_min_slice_bytes) covers whole lines, and for
/// one or two blocks per SM: the fewest blocks G whose slices fit, raised towards filling the
/// GPU (but at least two rows a thread); the plan with the fewest rounds of units, then the
/// fewest exchange loads per thread, then more blocks per SM wins. A first rule, not yet tuned
/// on a device (docs/perf-notes.md).
inline bool make_nhwc_grad_chip_plan(const Problem& prob, const Options& opt,
                                     const DeviceProps& d, const ArchPolicy& pol,
                                     const PlanOverride& ov, NhwcGradChipPlan* out) {
  if (!prob.nhwc || !prob.vector_ok || !opt.use_input_stats || d.sm_count < 1) return false;
  const int vec = 16 / prob.elem_bytes;
  if (prob.c % vec != 0) return false;
  constexpr int threads = kNhwcGradChipThreads;
  const int64_t cv = prob.c / vec, S = prob.spatial;
  bool found = false;
  NhwcGradChipPlan best;
  int64_t best_rounds = 0, best_loads = 0;
  int best_per_sm = 0;
  for (int64_t cs = std::min<int64_t>(cv, threads); cs >= 1; --cs) {
    const int64_t chs = cs * vec;
    if (cv % cs != 0 || chs % prob.channels_per_group != 0 || chs > kNhwcGradChipMaxChannels)
      continue;
    if (ov.nhwc_cols > 0 ? cs != ov.nhwc_cols
                         : cs < cv && cs * 16 < pol.nhwc_min_slice_bytes)
      continue;
    const int64_t row_lanes = threads / cs;
    const int64_t prefix = nhwc_grad_chip_prefix_bytes(cs, vec);
    const int64_t units = prob.n * (cv / cs);
    for (int want_per_sm = 2; want_per_sm >= 1; --want_per_sm) {
      const int64_t cap = std::min(d.smem_per_block_optin,
                                   d.smem_per_sm / want_per_sm - kSmemRuntimeReserve);
      const int64_t rows_cap = (cap - prefix) / nhwc_grad_chip_row_bytes();
      if (rows_cap < 1) continue;
      int64_t g;
      if (ov.blocks_per_plane > 0) {
        g = ov.blocks_per_plane;
      } else {
        const int64_t g_min = ceil_div(S, row_lanes * rows_cap);
        const int64_t resident = int64_t(want_per_sm) * d.sm_count;
        const int64_t g_fill = std::max<int64_t>(1, resident / units);
        const int64_t g_work = std::max<int64_t>(1, ceil_div(S, row_lanes * 2));
        g = std::max(g_min, std::min(g_fill, g_work));
        while (g > g_min && nhwc_grad_chip_merge_loads(g, chs) > kNhwcGradChipMaxLoads) --g;
      }
      NhwcGradChipPlan p;
      p.vec = vec;
      p.cols = int(cs);
      p.row_lanes = int(row_lanes);
      p.col_slices = cv / cs;
      const int64_t rows = ceil_div(ceil_div(S, g), row_lanes);
      if (rows > rows_cap) continue;
      p.rows = int(rows);
      p.slice_rows = rows * row_lanes;
      // Rounding slices up to whole row lanes can leave the last blocks without rows: drop
      // them (a forced G keeps them, which the tests use).
      p.G = ov.blocks_per_plane > 0 ? g : ceil_div(S, p.slice_rows);
      p.smem_bytes = prefix + rows * nhwc_grad_chip_row_bytes();
      const int per_sm = nhwc_grad_chip_per_sm(d, p.smem_bytes);
      if (per_sm < 1) continue;
      const int64_t resident = int64_t(per_sm) * d.sm_count;
      if (p.G > 1 && (!d.cooperative || p.G > resident)) continue;
      p.block_groups = std::max<int64_t>(1, std::min({units, resident / p.G, d.max_grid_x / p.G}));
      p.grid = p.block_groups * p.G;
      p.cooperative = p.G > 1;
      if (!nhwc_grad_chip_plan_is_valid(p, prob, opt, d)) continue;
      const int64_t rounds = ceil_div(units, p.block_groups);
      const int64_t loads = p.G > 1 ? nhwc_grad_chip_merge_loads(p.G, chs) : 0;
      if (!found || rounds < best_rounds || (rounds == best_rounds && loads < best_loads) ||
          (rounds == best_rounds && loads == best_loads && per_sm > best_per_sm)) {
        found = true;
        best = p;
        best_rounds = rounds;
        best_loads = loads;
        best_per_sm = per_sm;
      }
    }
  }
  if (found) *out = best;
  return found;
}

/// Whether the channels-last backward runs on chip: only where asked
/// (PlanOverride::nhwc_bwd_on_chip = 1) until a device run has checked and timed it; the tiled
/// chain otherwise.
inline bool nhwc_backward_on_chip(const Problem& prob, const Options& opt, const DeviceProps& d,
                                  const ArchPolicy& pol, const PlanOverride& ov,
                                  NhwcGradChipPlan* plan) {
  return ov.nhwc_bwd_on_chip == 1 && make_nhwc_grad_chip_plan(prob, opt, d, pol, ov, plan);
}

/// [per-(image, channel) partials of dgamma/dbeta][tagged slots: 2 x grid x slice channels].
inline WorkspaceLayout nhwc_grad_chip_layout(const NhwcGradChipPlan& p, const Problem& prob,
                                             const Gradients& g) {
  WorkspaceLayout w;
  w.partials_bytes = wants_param_grads(g) ? size_t(prob.n) * size_t(prob.c) * sizeof(float2) : 0;
  w.partials = w.add(w.partials_bytes);
  w.slots_bytes =
      p.G > 1 ? 2 * size_t(p.grid) * size_t(p.cols) * size_t(p.vec) * sizeof(GradSlot) : 0;
  w.slots = w.add(w.slots_bytes);
  return w;
}

template <class T>
inline cudaError_t launch_nhwc_grad_chip(const T* x, const T* dy, T* dx, const Problem& prob,
                                         const Options& opt, const Gradients& g,
                                         const NhwcGradChipPlan& plan, void* workspace,
                                         cudaStream_t stream) {
  const WorkspaceLayout w = nhwc_grad_chip_layout(plan, prob, g);
  NhwcGradChipParams<T> p{};
  const bool direct =
      set_nhwc_grad_fields<T>(p, x, dy, dx, prob, opt, g, plan.cols, plan.vec, w, workspace);
  p.row_lanes = plan.row_lanes;
  p.rows = plan.rows;
  p.G = int(plan.G);
  p.col_slices = plan.col_slices;
  p.slice_rows = plan.slice_rows;
  if (w.slots_bytes > 0) p.slots = WorkspaceLayout::at<GradSlot>(workspace, w.slots);
  INSTNORM_RETURN_IF_ERROR(clear_slots(w, workspace, stream));
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(plan.grid));
  shape.block = dim3(kNhwcGradChipThreads);
  shape.dyn_smem = size_t(plan.smem_bytes);
  shape.cooperative = plan.cooperative;
  constexpr int kFull = 16 / int(sizeof(T));
  INSTNORM_RETURN_IF_ERROR(launch_kernel(nhwc_grad_on_chip<T, kFull>, shape, stream, p));
  if (p.partials == nullptr || direct) return cudaSuccess;
  return launch_grad_params<T>(p.partials, prob, 1, p, g, stream);
}

/// The channels-last backward's plan, made once per call: on chip (where `ov` asks for it and a
/// plan fits: nhwc_backward_on_chip) or the tiled chain's shape, and the workspace it takes.
struct NhwcBackwardPlan {
  bool on_chip = false;
  NhwcGradChipPlan chip;
  NhwcGradShape tiled;
  size_t workspace_bytes = 0;
};

inline cudaError_t make_nhwc_backward_plan(const Problem& prob, const Options& opt,
                                           const Gradients& g, const DeviceProps& d,
                                           const ArchPolicy& pol, const PlanOverride& ov,
                                           NhwcBackwardPlan* out) {
  NhwcBackwardPlan b;
  b.on_chip = nhwc_backward_on_chip(prob, opt, d, pol, ov, &b.chip);
  if (b.on_chip) {
    b.workspace_bytes = nhwc_grad_chip_layout(b.chip, prob, g).total;
  } else {
    if (ov.nhwc_bwd_on_chip == 1) return cudaErrorInvalidConfiguration;  // asked for, none fits
    b.tiled = nhwc_grad_shape(prob, d);
    if (prob.n * b.tiled.tiles > d.max_grid_x || b.tiled.col_chunks > 65535)
      return cudaErrorInvalidConfiguration;
    b.workspace_bytes = nhwc_backward_layout(b.tiled, prob, g).total;
  }
  *out = b;
  return cudaSuccess;
}

/// make_nhwc_backward_plan on the current device (`policy`: a forced table row, or null).
inline cudaError_t current_nhwc_backward_plan(const Problem& prob, const Options& opt,
                                              const Gradients& g, NhwcBackwardPlan* out,
                                              const PlanOverride& ov = {},
                                              const ArchPolicy* policy = nullptr) {
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  return make_nhwc_backward_plan(prob, opt, g, d, policy ? *policy : policy_for(d), ov, out);
}

inline cudaError_t nhwc_backward_workspace(const Problem& prob, const Options& opt,
                                           const Gradients& g, size_t* bytes,
                                           const PlanOverride& ov = {},
                                           const ArchPolicy* policy = nullptr) {
  NhwcBackwardPlan b;
  INSTNORM_RETURN_IF_ERROR(current_nhwc_backward_plan(prob, opt, g, &b, ov, policy));
  *bytes = b.workspace_bytes;
  return cudaSuccess;
}

/// The channels-last backward of `plan` (current_nhwc_backward_plan): the on-chip kernel, or the
/// tiled chain.
template <class T>
inline cudaError_t launch_nhwc_backward(const T* x, const T* dy, T* dx, const Problem& prob,
                                        const Options& opt, const Gradients& g,
                                        const NhwcBackwardPlan& plan, void* workspace,
                                        cudaStream_t stream) {
  if (plan.on_chip)
    return launch_nhwc_grad_chip(x, dy, dx, prob, opt, g, plan.chip, workspace, stream);
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  const NhwcGradShape& s = plan.tiled;
  const WorkspaceLayout w = nhwc_backward_layout(s, prob, g);
  NhwcGradParams<T> p{};
  const bool direct =
      set_nhwc_grad_fields(p, x, dy, dx, prob, opt, g, s.cols, s.vec, w, workspace);
  p.tiles = s.tiles;
  p.tile_rows = s.tile_rows;
  p.tile_sums = WorkspaceLayout::at<float4>(workspace, w.slots);
  p.unit = WorkspaceLayout::at<float4>(workspace, w.group_stats);
  p.coef = WorkspaceLayout::at<float4>(workspace, w.coef);
  p.coef_pre = reinterpret_cast<float*>(p.coef + prob.n * prob.c);
  constexpr int kFull = 16 / int(sizeof(T));
  const bool full = s.vec == kFull;
  // Every kernel of the chain waits for the one before it at its start (grid/dependency.cuh):
  // where the kernels running were compiled for sm_90 or newer, each launches while the one
  // before drains.
  const bool dependent = dependent_launch(d);
  LaunchShape sums;
  sums.grid = dim3(static_cast<unsigned>(prob.n * s.tiles), static_cast<unsigned>(s.col_chunks));
  sums.block = dim3(kNhwcGradThreads);
  sums.dyn_smem = size_t(kNhwcGradThreads) * size_t(s.vec) * sizeof(float4);
  sums.dependent = dependent;
  // The finalize: a block of min(8, cpg) warps per GroupNorm unit, or 8 units of a warp each.
  p.fin_warps = opt.use_input_stats && p.cpg > 1 ? int(std::min<int64_t>(8, p.cpg)) : 1;
  const int fin_units = p.fin_warps > 1 ? 1 : 8;
  LaunchShape fin;
  fin.grid = dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(prob.planes, fin_units), 65535)));
  fin.block = dim3(32 * p.fin_warps * fin_units);
  fin.dependent = dependent;
  // The sums and the finalize need the statistics (or, eval, the partials of dgamma/dbeta).
  const bool sums_needed = opt.use_input_stats || p.partials != nullptr;
  if (sums_needed) {
    if (opt.use_input_stats && opt.activation != Activation::kNone) {
      INSTNORM_RETURN_IF_ERROR(launch_kernel(full ? nhwc_grad_sums<T, kFull, true>
                                                  : nhwc_grad_sums<T, 1, true>,
                                             sums, stream, p));
      INSTNORM_RETURN_IF_ERROR(launch_kernel(nhwc_grad_finalize<T, true>, fin, stream, p));
    }
    INSTNORM_RETURN_IF_ERROR(launch_kernel(
        full ? nhwc_grad_sums<T, kFull, false> : nhwc_grad_sums<T, 1, false>, sums, stream, p));
    INSTNORM_RETURN_IF_ERROR(launch_kernel(nhwc_grad_finalize<T, false>, fin, stream, p));
  } else {
    NhwcGradParams<T> fold = p;  // no tiles: the finalize only folds dx's coefficients
    fold.tiles = 0;
    INSTNORM_RETURN_IF_ERROR(launch_kernel(nhwc_grad_finalize<T, false>, fin, stream, fold));
  }
  // dx: blocks over rows (about eight per SM in all), each thread one column vector.
  const int64_t row_blocks = ceil_div(prob.n * prob.spatial, kNhwcGradThreads / s.cols);
  LaunchShape el;
  el.grid = dim3(static_cast<unsigned>(std::max<int64_t>(
                     1, std::min<int64_t>(row_blocks, ceil_div(int64_t(d.sm_count) * 8,
                                                               s.col_chunks)))),
                 static_cast<unsigned>(s.col_chunks));
  el.block = dim3(kNhwcGradThreads);
  el.dependent = dependent;
  INSTNORM_RETURN_IF_ERROR(
      launch_kernel(full ? nhwc_grad_dx<T, kFull> : nhwc_grad_dx<T, 1>, el, stream, p));
  if (p.partials == nullptr || direct) return cudaSuccess;
  return launch_grad_params<T>(p.partials, prob, 1, p, g, stream, dependent);
}

}  // namespace detail
}  // namespace instnorm
