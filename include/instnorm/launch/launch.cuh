#pragma once
/// \file launch/launch.cuh
/// From a plan to launches: the workspace layout of each plan kind and its launch sequence.

#include <algorithm>
#include <cstdint>

#include "../kernels/nchw.cuh"
#include "../kernels/nhwc_on_chip.cuh"
#include "../kernels/nhwc_tiled.cuh"
#include "../kernels/running_stats.cuh"
#include "../options.cuh"
#include "../plan.cuh"
#include "../validate.cuh"
#include "device.cuh"

namespace instnorm {
namespace detail {

/// The option fields every kernel's parameters share (EpilogueFields, forward and backward,
/// both layouts), and the saved statistics each names in its own constness.
template <class Params>
inline void set_option_fields(Params& p, const Problem& prob, const Options& opt) {
  EpilogueFields& e = p;
  e.spatial = prob.spatial;
  e.groups = prob.groups;
  e.eps = opt.eps;
  e.var_scale = opt.unbiased && opt.use_input_stats && prob.plane_len > 1
                    ? float(double(prob.plane_len) / double(prob.plane_len - 1))
                    : 1.f;
  e.activation = opt.activation;
  e.params_float = opt.param_type == ParamType::kFloat;
  e.gamma = opt.gamma;
  e.beta = opt.beta;
  const Modulation& m = opt.modulation;
  e.mod_float = m.type == ParamType::kFloat;
  e.one_plus_scale = m.one_plus_scale;
  e.mod_scale = m.scale;
  e.mod_shift = m.shift;
  e.scale_stride = m.scale_stride != 0 ? m.scale_stride : prob.c;
  e.shift_stride = m.shift_stride != 0 ? m.shift_stride : prob.c;
  // Read only in eval mode (the NHWC normalize tells the modes apart by them).
  e.running_mean = opt.use_input_stats ? nullptr : opt.running_mean;
  e.running_var = opt.use_input_stats ? nullptr : opt.running_var;
  e.save_std = false;
  p.save_mean = opt.save_mean;
  p.save_rstd = opt.save_rstd;
}
template <class Params, class T>
inline void set_common_fields(Params& p, const T* x, T* y, const Problem& prob,
                              const Options& opt) {
  p.x = x;
  p.y = y;
  set_option_fields(p, prob, opt);
  p.save_std = y == nullptr;  // statistics(): no y, save_rstd receives the standard deviation
}

/// Where the kernel leaves each plane's mean and variance for a running-statistics update:
/// the layout's statistics part (none when the call updates no running statistics).
template <class Params>
inline void set_stats_outputs(Params& p, const WorkspaceLayout& w, void* workspace,
                              const Problem& prob) {
  if (w.stats_bytes == 0) return;
  p.stat_mean = WorkspaceLayout::at<float>(workspace, w.stats);
  p.stat_var = p.stat_mean + prob.planes;
}

/// NCHW: [tagged slots of cooperative plans][statistics].
inline WorkspaceLayout workspace_layout(const Plan& p, const Problem& prob, const Options& opt) {
  WorkspaceLayout w;
  if (!opt.use_input_stats) return w;  // eval: one elementwise pass, no workspace
  w.slots_bytes = p.cooperative ? 2 * size_t(p.grid) * sizeof(TaggedSlot) : 0;
  w.slots = w.add(w.slots_bytes);
  add_stats(w, prob, opt);
  return w;
}

inline cudaError_t to_cuda_error(Invalid v) {
  return v == Invalid::kOk || v == Invalid::kEmpty ? cudaSuccess
         : v == Invalid::kNotSupported            ? cudaErrorNotSupported
                                                  : cudaErrorInvalidValue;
}

/// Validation + planning for the current device, shared by every entry point.
template <class T>
inline Invalid prepare(const T* x, const T* y, int64_t n, int64_t c, int64_t spatial,
                       const Options& opt, Problem* prob) {
  static_assert(is_supported<T>::value, "instnorm supports float, __half and __nv_bfloat16");
  return validate(x, y, n, c, spatial, int(sizeof(T)), opt, prob);
}

inline cudaError_t current_plan(const Problem& prob, Plan* plan, const PlanOverride& ov = {},
                                const ArchPolicy* policy = nullptr) {
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  const ArchPolicy& pol = policy ? *policy : policy_for(d);
  return make_plan(prob, d, pol, plan, ov) ? cudaSuccess : cudaErrorInvalidConfiguration;
}

/// The one place where runtime choices become template arguments.
template <class T>
using KernelFn = void (*)(KernelParams<T>);
/// map_in_smem (map_in_smem_ok): block and split plans of 16-byte vectors in registers take
/// forward_kernel's kMap instance.
template <class T>
inline KernelFn<T> select_kernel(int vec, Strategy s, bool ragged = false,
                                 bool map_in_smem = false) {
  constexpr int kFull = 16 / int(sizeof(T));
  if (vec != kFull && vec != 1) return nullptr;
  if (ragged && vec != kFull) return nullptr;
  const bool full = vec == kFull;
  if (map_in_smem && full && !ragged && (s == Strategy::kBlock || s == Strategy::kSplit))
    return forward_kernel<T, kFull, max_items(kFull), false, false, true>;
  switch (s) {
    case Strategy::kSplitStream:
      return ragged ? forward_kernel<T, kFull, max_stream_items(kFull), true, true>
             : full ? forward_kernel<T, kFull, max_stream_items(kFull), true>
                    : forward_kernel<T, 1, max_stream_items(1), true>;
    default:
      return ragged ? forward_kernel<T, kFull, max_ragged_items(kFull), false, true>
             : full ? forward_kernel<T, kFull, max_items(kFull), false>
                    : forward_kernel<T, 1, max_items(1), false>;
  }
}

/// Whether a forward plan takes forward_kernel's kMap instance: one plane a block (block and
/// split plans) of instance norm with a per-sample modulation, its maps float (cp.async copies
/// 4 bytes at least).
inline bool map_in_smem_ok(const Plan& plan, const Problem& prob, const Options& opt) {
  const Modulation& m = opt.modulation;
  const bool modulated = m.scale != nullptr || m.shift != nullptr;
  const bool params = opt.gamma != nullptr || opt.beta != nullptr;
  return modulated && prob.channels_per_group == 1 && plan.lanes == plan.threads &&
         plan.lanes > 32 && (!params || opt.param_type == ParamType::kFloat) &&
         m.type == ParamType::kFloat;
}

/// The kernel parameters that come from the problem and the options (the plan adds the rest).
template <class T>
inline KernelParams<T> make_params(const T* x, T* y, const Problem& prob, const Options& opt) {
  KernelParams<T> kp{};
  set_common_fields(kp, x, y, prob, opt);
  kp.planes = prob.planes;
  kp.plane_len = prob.plane_len;
  kp.channels_per_group = prob.channels_per_group;
  return kp;
}

/// The geometry an NCHW plan gives its kernel, forward and backward.
template <class Params>
inline void set_plan_fields(Params& p, const Plan& plan) {
  p.lanes = plan.lanes;
  p.items = plan.items;
  p.smem_items = plan.smem_items;
  p.blocks_per_plane = plan.blocks_per_plane;
  p.slice_len = plan.slice_len;
}

/// How an NCHW plan's kernel launches: its grid and block, dynamic shared memory and whether
/// its blocks wait on each other, with the kernel's static shared memory.
inline LaunchShape plan_launch_shape(const Plan& plan, size_t static_smem) {
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(plan.grid));
  shape.block = dim3(static_cast<unsigned>(plan.threads));
  shape.dyn_smem = size_t(plan.smem_bytes);
  shape.static_smem = static_smem;
  shape.cooperative = plan.cooperative;
  return shape;
}

/// After a training forward: the per-channel running-statistics update from the per-plane
/// statistics the forward kernel kept.
inline cudaError_t update_running(const float* stat_mean, const float* stat_var,
                                  const Problem& prob, const Options& opt, cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = (prob.c + threads - 1) / threads;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(blocks < 65535 ? blocks : 65535));
  shape.block = dim3(threads);
  return launch_kernel(running_stats_kernel, shape, stream, stat_mean, stat_var, prob.n, prob.c,
                       prob.spatial, opt.momentum, opt.running_mean, opt.running_var);
}

/// use_input_stats == false: one elementwise pass with the running statistics.
template <class T>
inline cudaError_t launch_inference(const T* x, T* y, const Problem& prob, const Options& opt,
                                    cudaStream_t stream) {
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  const KernelParams<T> kp = make_params(x, y, prob, opt);
  constexpr int kFull = 16 / int(sizeof(T));
  const int vec = prob.vector_ok ? kFull : 1;
  const int64_t chunk = int64_t(kInferenceThreads) * kInferenceItems * vec;
  const int64_t units = prob.planes * ((prob.plane_len + chunk - 1) / chunk);
  const int64_t cap = int64_t(d.sm_count) * (d.max_threads_per_sm / kInferenceThreads);
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(units, cap))));
  shape.block = dim3(kInferenceThreads);
  return launch_kernel(vec == kFull ? inference_kernel<T, kFull> : inference_kernel<T, 1>, shape,
                       stream, kp);
}

/// Launches a validated problem with a plan and a workspace laid out as workspace_layout says.
template <class T>
inline cudaError_t launch(const T* x, T* y, const Problem& prob, const Options& opt,
                          const Plan& plan, void* workspace, cudaStream_t stream) {
  if (plan.direction != Direction::kForward) return cudaErrorInvalidConfiguration;
  KernelFn<T> kernel =
      select_kernel<T>(plan.vec, plan.strategy, plan.ragged, map_in_smem_ok(plan, prob, opt));
  if (plan.strategy == Strategy::kStaged)
    kernel = staged_in_registers(plan, prob) ? staged_kernel<T, false, true, kStagedRegItems>
                                       : staged_kernel<T>;
  if (kernel == nullptr) return cudaErrorInvalidConfiguration;
  const WorkspaceLayout w = workspace_layout(plan, prob, opt);
  KernelParams<T> kp = make_params(x, y, prob, opt);
  set_plan_fields(kp, plan);
  kp.phases = plan.phases;
  kp.unit_planes = plan.unit_planes;
  set_stats_outputs(kp, w, workspace, prob);
  if (w.slots_bytes > 0) kp.slots = WorkspaceLayout::at<TaggedSlot>(workspace, w.slots);
  INSTNORM_RETURN_IF_ERROR(clear_slots(w, workspace, stream));
  INSTNORM_RETURN_IF_ERROR(
      launch_kernel(kernel, plan_launch_shape(plan, sizeof(BlockReduceStorage)), stream, kp));
  return kp.stat_mean ? update_running(kp.stat_mean, kp.stat_var, prob, opt, stream) : cudaSuccess;
}

// ---------------------------------------------------------------- channels-last

/// The NHWC plan for the current device. Eval mode (running statistics) is one elementwise pass
/// of the tiled plan's normalize kernel.
inline cudaError_t current_nhwc_plan(const Problem& prob, const Options& opt, NhwcPlan* plan,
                                     PlanOverride ov = {}, const ArchPolicy* policy = nullptr) {
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  if (!opt.use_input_stats) ov.nhwc_on_chip = 0;
  return make_nhwc_plan(prob, d, plan, ov, policy) ? cudaSuccess : cudaErrorInvalidConfiguration;
}

/// NHWC. On chip: [tagged partials of plans that split units (G > 1), double-buffered][statistics].
/// Tiled: [tile partials of a batch][per-(image, group) statistics][statistics]. Eval: nothing.
inline WorkspaceLayout workspace_layout(const NhwcPlan& p, const Problem& prob, const Options& opt) {
  WorkspaceLayout w;
  if (!opt.use_input_stats) return w;
  if (p.staged) {
    // Staged: no partials, only the statistics of a running update.
  } else if (p.on_chip) {
    w.slots_bytes = p.cooperative ? 2 * size_t(p.grid + p.block_groups) * size_t(p.cols_per_block) *
                                        size_t(p.vec) * sizeof(TaggedSlot)
                                  : 0;
    w.slots = w.add(w.slots_bytes);
  } else {
    w.partials_bytes = size_t(p.batch_images) * size_t(p.tiles) * size_t(prob.c) * sizeof(Moments);
    w.partials = w.add(w.partials_bytes);
    w.group_stats_bytes = size_t(prob.planes) * sizeof(float4);
    w.group_stats = w.add(w.group_stats_bytes);
  }
  add_stats(w, prob, opt);
  return w;
}

template <class T>
inline cudaError_t launch_nhwc(const T* x, T* y, const Problem& prob, const Options& opt,
                               const NhwcPlan& plan, void* workspace, cudaStream_t stream) {
  const WorkspaceLayout w = workspace_layout(plan, prob, opt);
  NhwcParams<T> np{};
  set_common_fields(np, x, y, prob, opt);
  np.c = prob.c;
  np.cpg = prob.channels_per_group;
  np.tile_rows = plan.tile_rows;
  np.tiles = plan.tiles;
  np.cols_per_block = plan.cols_per_block;
  np.row_lanes = plan.row_lanes;
  np.finalize_lanes = int(std::min<int64_t>(32, pow2_ceil(plan.tiles * prob.channels_per_group)));
  set_stats_outputs(np, w, workspace, prob);
  const bool eval = !opt.use_input_stats;
  constexpr int kFull = 16 / int(sizeof(T));
  const bool full = plan.vec == kFull;
  if (plan.staged) {  // the NCHW staged kernel on units of whole images
    if (eval) return cudaErrorInvalidConfiguration;
    KernelParams<T> kp = make_params(x, y, prob, opt);
    kp.lanes = plan.lanes;
    kp.unit_planes = int(plan.unit_images * prob.c);
    kp.channel_stride = int(prob.c);
    set_stats_outputs(kp, w, workspace, prob);
    LaunchShape shape;
    shape.grid = dim3(static_cast<unsigned>(plan.grid));
    shape.block = dim3(kStagedThreads);
    shape.dyn_smem = size_t(plan.smem_bytes);
    // One round of the block's groups over a unit's planes, or rounds of them.
    const bool rounds = kp.unit_planes > kStagedThreads / kp.lanes;
    INSTNORM_RETURN_IF_ERROR(launch_kernel(rounds ? staged_kernel<T, true, true>
                                                  : staged_kernel<T, true, false>,
                                           shape, stream, kp));
    return kp.stat_mean ? update_running(kp.stat_mean, kp.stat_var, prob, opt, stream)
                        : cudaSuccess;
  }
  if (plan.on_chip) {
    if (eval) return cudaErrorInvalidConfiguration;  // eval runs the tiled normalize
    np.img_first = 0;
    np.img_count = prob.n;
    np.col_slices = plan.col_chunks;
    np.slice_rows = plan.slice_rows;
    np.items = plan.items;
    np.smem_items = plan.smem_items;
    np.blocks_per_unit = int(plan.blocks_per_unit);
    np.phases = plan.phases;
    np.slots = WorkspaceLayout::at<TaggedSlot>(workspace, w.slots);
    INSTNORM_RETURN_IF_ERROR(clear_slots(w, workspace, stream));
    LaunchShape shape;
    shape.grid = dim3(static_cast<unsigned>(plan.grid));
    shape.block = dim3(kNhwcOnChipThreads);
    shape.dyn_smem = size_t(plan.smem_bytes);
    shape.static_smem = size_t(nhwc_on_chip_static_smem(plan.vec));
    shape.cooperative = plan.cooperative;
    const bool params = nhwc_on_chip_folds_params(prob, opt);
    constexpr int kFullItems = nhwc_max_items(kFull), kOneItems = nhwc_max_items(1);
    INSTNORM_RETURN_IF_ERROR(launch_kernel(
        full ? (params ? nhwc_on_chip<T, kFull, kFullItems, true>
                       : nhwc_on_chip<T, kFull, kFullItems, false>)
             : (params ? nhwc_on_chip<T, 1, kOneItems, true> : nhwc_on_chip<T, 1, kOneItems, false>),
        shape, stream, np));
    return np.stat_mean ? update_running(np.stat_mean, np.stat_var, prob, opt, stream)
                        : cudaSuccess;
  }
  if (!eval) {
    np.partials = WorkspaceLayout::at<Moments>(workspace, w.partials);
    np.group_stats = WorkspaceLayout::at<float4>(workspace, w.group_stats);
  }
  const int64_t batch = eval ? prob.n : plan.batch_images;
  for (int64_t first = 0; first < prob.n; first += batch) {
    np.img_first = first;
    np.img_count = std::min(batch, prob.n - first);
    LaunchShape tiles;
    tiles.grid = dim3(static_cast<unsigned>(std::min(np.img_count * plan.tiles, plan.max_grid_x)),
                      static_cast<unsigned>(plan.col_chunks));
    tiles.block = dim3(kNhwcThreads);
    if (!eval) {
      INSTNORM_RETURN_IF_ERROR(launch_kernel(
          full ? nhwc_partials<T, kFull> : nhwc_partials<T, 1>, tiles, stream, np));
      const int64_t units = np.img_count * prob.groups;
      const int64_t per_block = kNhwcThreads / np.finalize_lanes;
      LaunchShape fin;
      fin.grid = dim3(
          static_cast<unsigned>(std::min((units + per_block - 1) / per_block, plan.max_grid_x)));
      fin.block = dim3(kNhwcThreads);
      INSTNORM_RETURN_IF_ERROR(launch_kernel(nhwc_finalize<T>, fin, stream, np));
    }
    if (y == nullptr) continue;  // statistics only: the finalize stored them
    INSTNORM_RETURN_IF_ERROR(launch_kernel(
        full ? nhwc_normalize<T, kFull> : nhwc_normalize<T, 1>, tiles, stream, np));
  }
  return np.stat_mean ? update_running(np.stat_mean, np.stat_var, prob, opt, stream) : cudaSuccess;
}

}  // namespace detail

}  // namespace instnorm
