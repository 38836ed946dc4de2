#pragma once
/// \file launch/launch.cuh
/// From a plan to launches: the device's properties (cached), the workspace layout of a plan,
/// the one launch path (cudaLaunchKernelEx) and the launch sequence of each plan kind.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>

#include "../kernels/nchw.cuh"
#include "../kernels/nhwc_on_chip.cuh"
#include "../kernels/nhwc_tiled.cuh"
#include "../kernels/running_stats.cuh"
#include "../options.cuh"
#include "../plan.cuh"
#include "../validate.cuh"

/// Returns from the enclosing function with the error of a failed CUDA call.
#define INSTNORM_RETURN_IF_ERROR(expr)          \
  do {                                          \
    const cudaError_t instnorm_err_ = (expr);   \
    if (instnorm_err_ != cudaSuccess) return instnorm_err_; \
  } while (0)

namespace instnorm {

namespace detail {
/// An empty kernel whose attributes tell which architecture the library's kernels were built
/// for on the current device.
template <int>
__global__ void arch_probe() {}
}  // namespace detail

/// Properties of `device`, read once with cudaGetDeviceProperties and cached.
inline cudaError_t device_props(int device, DeviceProps* out) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static DeviceProps cache[kMaxDevices];
  static bool filled[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mu);
  if (!filled[device]) {
    cudaDeviceProp prop;
    INSTNORM_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
    DeviceProps d;
    d.sm_count = prop.multiProcessorCount;
    d.cc_major = prop.major;
    d.cc_minor = prop.minor;
    d.max_threads_per_sm = prop.maxThreadsPerMultiProcessor;
    d.max_threads_per_block = prop.maxThreadsPerBlock;
    d.max_blocks_per_sm = prop.maxBlocksPerMultiProcessor;
    d.regs_per_sm = prop.regsPerMultiprocessor;
    d.smem_per_sm = int64_t(prop.sharedMemPerMultiprocessor);
    d.smem_per_block_optin = int64_t(prop.sharedMemPerBlockOptin) - 1024;  // static storage
    d.l2_bytes = prop.l2CacheSize;
    d.max_grid_x = prop.maxGridSize[0];
    d.cooperative = prop.cooperativeLaunch != 0;
    INSTNORM_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&d.mem_bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
    // The architecture the kernels were compiled for, as the driver loaded them on this device
    // (the PTX version also where it JIT-compiled that PTX for a newer GPU).
    int current = 0;
    INSTNORM_RETURN_IF_ERROR(cudaGetDevice(&current));
    if (current == device) {
      cudaFuncAttributes fa;
      INSTNORM_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, detail::arch_probe<0>));
      d.code_arch = fa.ptxVersion;
    }
    cache[device] = d;
    filled[device] = true;
  }
  *out = cache[device];
  return cudaSuccess;
}

namespace detail {

/// Properties of the current device (cached per device).
inline cudaError_t current_device_props(DeviceProps* d) {
  int dev = 0;
  INSTNORM_RETURN_IF_ERROR(cudaGetDevice(&dev));
  return device_props(dev, d);
}

/// Runs `launch(workspace)` with `bytes` of stream-ordered scratch memory (none when 0), freed
/// on the same stream: asynchronous and graph-capturable.
template <class Launch>
inline cudaError_t with_scratch(size_t bytes, cudaStream_t stream, Launch&& launch) {
  void* ws = nullptr;
  if (bytes > 0) INSTNORM_RETURN_IF_ERROR(cudaMallocAsync(&ws, bytes, stream));
  const cudaError_t err = launch(ws);
  if (ws != nullptr) {
    const cudaError_t free_err = cudaFreeAsync(ws, stream);
    if (err == cudaSuccess) return free_err;
  }
  return err;
}

constexpr size_t kWorkspaceAlign = 256;
inline size_t align_up(size_t v) { return (v + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

/// Where each part of a call's workspace lies, in bytes from its start (each part aligned to
/// 256 bytes; a part of size 0 is absent). Computed once per plan, by workspace_size and by the
/// launch alike.
struct WorkspaceLayout {
  size_t slots = 0, slots_bytes = 0;              ///< tagged block partials (cooperative plans,
                                                  ///< double-buffered by round parity)
  size_t partials = 0, partials_bytes = 0;        ///< NHWC tiled: per-tile Moments of a batch
  size_t group_stats = 0, group_stats_bytes = 0;  ///< NHWC tiled: (center, residual, rstd) per
                                                  ///< (image, group)
  size_t stats = 0, stats_bytes = 0;              ///< per-plane mean and variance kept for the
                                                  ///< running-statistics update
  size_t total = 0;

  /// Appends a part of `bytes` at the end; returns its offset.
  size_t add(size_t bytes) {
    const size_t at = total;
    total += align_up(bytes);
    return at;
  }
  template <class P>
  static P* at(void* workspace, size_t offset) {
    return reinterpret_cast<P*>(static_cast<unsigned char*>(workspace) + offset);
  }
};

/// The statistics part, last in every layout.
inline void add_stats(WorkspaceLayout& w, const Problem& prob, const Options& opt) {
  w.stats_bytes = updates_running_stats(opt) ? 2 * size_t(prob.planes) * sizeof(float) : 0;
  w.stats = w.add(w.stats_bytes);
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
template <class T>
inline KernelFn<T> select_kernel(int vec, Strategy s) {
  constexpr int kFull = 16 / int(sizeof(T));
  if (vec != kFull && vec != 1) return nullptr;
  const bool full = vec == kFull;
  switch (s) {
    case Strategy::kSplitStream:
      return full ? forward_kernel<T, kFull, max_stream_items(kFull), true>
                  : forward_kernel<T, 1, max_stream_items(1), true>;
    default:
      return full ? forward_kernel<T, kFull, max_items(kFull), false>
                  : forward_kernel<T, 1, max_items(1), false>;
  }
}

/// The kernel parameters that come from the problem and the options (the plan adds the rest).
template <class T>
inline KernelParams<T> make_params(const T* x, T* y, const Problem& prob, const Options& opt) {
  KernelParams<T> kp{};
  kp.x = x;
  kp.y = y;
  kp.planes = prob.planes;
  kp.plane_len = prob.plane_len;
  kp.spatial = prob.spatial;
  kp.groups = prob.groups;
  kp.channels_per_group = prob.channels_per_group;
  kp.eps = opt.eps;
  kp.gamma = opt.gamma;
  kp.beta = opt.beta;
  kp.params_float = opt.param_type == ParamType::kFloat;
  kp.save_mean = opt.save_mean;
  kp.save_rstd = opt.save_rstd;
  kp.activation = opt.activation;
  kp.running_mean = opt.running_mean;
  kp.running_var = opt.running_var;
  return kp;
}

/// Lets `kernel` use `bytes` of dynamic shared memory on the current device: one
/// cudaFuncSetAttribute per kernel, device and size increase, not one per launch.
inline cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes) {
  struct Entry {
    int device;
    const void* kernel;
    size_t bytes;
  };
  constexpr int kEntries = 64;
  static std::mutex mu;
  static Entry cache[kEntries];
  static int used = 0;
  int dev = 0;
  INSTNORM_RETURN_IF_ERROR(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  Entry* e = nullptr;
  for (int i = 0; i < used && e == nullptr; ++i)
    if (cache[i].device == dev && cache[i].kernel == kernel) e = &cache[i];
  if (e != nullptr && e->bytes >= bytes) return cudaSuccess;
  INSTNORM_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  if (e == nullptr && used < kEntries) e = &cache[used++];
  if (e != nullptr) *e = Entry{dev, kernel, bytes};
  return cudaSuccess;
}

/// How a kernel is launched: geometry, shared memory and whether its blocks wait on each other.
struct LaunchShape {
  dim3 grid, block;
  size_t dyn_smem = 0;     ///< dynamic shared memory per block
  size_t static_smem = 0;  ///< the kernel's static shared memory (for the 48 KB opt-in rule)
  /// The blocks wait on each other through tagged slots: the launch is cooperative, which
  /// guarantees they are co-resident (it fails rather than deadlocks if they cannot be).
  bool cooperative = false;
};

/// The one launch path of every kernel of the library: cudaLaunchKernelEx with the attributes
/// the shape asks for (cooperative today; a cluster dimension or programmatic dependent launch
/// would be one more attribute here), dynamic shared memory opted into above 48 KB.
template <class... Params, class... Args>
inline cudaError_t launch_kernel(void (*kernel)(Params...), const LaunchShape& shape,
                                 cudaStream_t stream, Args&&... args) {
  if (shape.dyn_smem + shape.static_smem > 48 * 1024)
    INSTNORM_RETURN_IF_ERROR(allow_dynamic_smem(reinterpret_cast<const void*>(kernel), shape.dyn_smem));
  cudaLaunchAttribute attrs[1];
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = shape.grid;
  cfg.blockDim = shape.block;
  cfg.dynamicSmemBytes = shape.dyn_smem;
  cfg.stream = stream;
  if (shape.cooperative) {
    attrs[0].id = cudaLaunchAttributeCooperative;
    attrs[0].val.cooperative = 1;
    cfg.attrs = attrs;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

/// Tags start at 1: the slots of a cooperative launch are zeroed on its stream first.
inline cudaError_t clear_slots(const WorkspaceLayout& w, void* workspace, cudaStream_t stream) {
  if (w.slots_bytes == 0) return cudaSuccess;
  return cudaMemsetAsync(WorkspaceLayout::at<unsigned char>(workspace, w.slots), 0, w.slots_bytes,
                         stream);
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
  KernelFn<T> kernel = select_kernel<T>(plan.vec, plan.strategy);
  if (plan.strategy == Strategy::kStaged) kernel = staged_kernel<T>;
  if (kernel == nullptr) return cudaErrorInvalidConfiguration;
  const WorkspaceLayout w = workspace_layout(plan, prob, opt);
  KernelParams<T> kp = make_params(x, y, prob, opt);
  kp.lanes = plan.lanes;
  kp.items = plan.items;
  kp.smem_items = plan.smem_items;
  kp.blocks_per_plane = plan.blocks_per_plane;
  kp.slice_len = plan.slice_len;
  kp.phases = plan.phases;
  if (w.stats_bytes > 0) {
    kp.stat_mean = WorkspaceLayout::at<float>(workspace, w.stats);
    kp.stat_var = kp.stat_mean + prob.planes;
  }
  if (w.slots_bytes > 0) kp.slots = WorkspaceLayout::at<TaggedSlot>(workspace, w.slots);
  INSTNORM_RETURN_IF_ERROR(clear_slots(w, workspace, stream));
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(plan.grid));
  shape.block = dim3(static_cast<unsigned>(plan.threads));
  shape.dyn_smem = size_t(plan.smem_bytes);
  shape.static_smem = sizeof(BlockReduceStorage);
  shape.cooperative = plan.cooperative;
  INSTNORM_RETURN_IF_ERROR(launch_kernel(kernel, shape, stream, kp));
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
  if (p.on_chip) {
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
  DeviceProps d;
  INSTNORM_RETURN_IF_ERROR(current_device_props(&d));
  const WorkspaceLayout w = workspace_layout(plan, prob, opt);
  NhwcParams<T> np{};
  np.x = x;
  np.y = y;
  np.spatial = prob.spatial;
  np.c = prob.c;
  np.groups = prob.groups;
  np.cpg = prob.channels_per_group;
  np.tile_rows = plan.tile_rows;
  np.tiles = plan.tiles;
  np.cols_per_block = plan.cols_per_block;
  np.row_lanes = plan.row_lanes;
  np.finalize_lanes = int(std::min<int64_t>(32, pow2_ceil(plan.tiles * prob.channels_per_group)));
  np.eps = opt.eps;
  np.gamma = opt.gamma;
  np.beta = opt.beta;
  np.params_float = opt.param_type == ParamType::kFloat;
  np.save_mean = opt.save_mean;
  np.save_rstd = opt.save_rstd;
  np.activation = opt.activation;
  if (w.stats_bytes > 0) {
    np.stat_mean = WorkspaceLayout::at<float>(workspace, w.stats);
    np.stat_var = np.stat_mean + prob.planes;
  }
  const bool eval = !opt.use_input_stats;
  constexpr int kFull = 16 / int(sizeof(T));
  const bool full = plan.vec == kFull;
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
    INSTNORM_RETURN_IF_ERROR(launch_kernel(full ? nhwc_on_chip<T, kFull, nhwc_max_items(kFull)>
                                                : nhwc_on_chip<T, 1, nhwc_max_items(1)>,
                                           shape, stream, np));
    return np.stat_mean ? update_running(np.stat_mean, np.stat_var, prob, opt, stream)
                        : cudaSuccess;
  }
  if (eval) {
    np.running_mean = opt.running_mean;
    np.running_var = opt.running_var;
  } else {
    np.partials = WorkspaceLayout::at<Moments>(workspace, w.partials);
    np.group_stats = WorkspaceLayout::at<float4>(workspace, w.group_stats);
  }
  const int64_t batch = eval ? prob.n : plan.batch_images;
  for (int64_t first = 0; first < prob.n; first += batch) {
    np.img_first = first;
    np.img_count = std::min(batch, prob.n - first);
    LaunchShape tiles;
    tiles.grid = dim3(static_cast<unsigned>(std::min(np.img_count * plan.tiles, d.max_grid_x)),
                      static_cast<unsigned>(plan.col_chunks));
    tiles.block = dim3(kNhwcThreads);
    if (!eval) {
      INSTNORM_RETURN_IF_ERROR(launch_kernel(
          full ? nhwc_partials<T, kFull> : nhwc_partials<T, 1>, tiles, stream, np));
      const int64_t units = np.img_count * prob.groups;
      const int64_t per_block = kNhwcThreads / np.finalize_lanes;
      LaunchShape fin;
      fin.grid = dim3(static_cast<unsigned>(std::min((units + per_block - 1) / per_block, d.max_grid_x)));
      fin.block = dim3(kNhwcThreads);
      INSTNORM_RETURN_IF_ERROR(launch_kernel(nhwc_finalize<T>, fin, stream, np));
    }
    INSTNORM_RETURN_IF_ERROR(launch_kernel(
        full ? nhwc_normalize<T, kFull> : nhwc_normalize<T, 1>, tiles, stream, np));
  }
  return np.stat_mean ? update_running(np.stat_mean, np.stat_var, prob, opt, stream) : cudaSuccess;
}

}  // namespace detail

}  // namespace instnorm
