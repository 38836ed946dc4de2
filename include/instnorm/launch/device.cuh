#pragma once
/// \file launch/device.cuh
/// The host side of a launch that does not depend on the plan: the device's properties (read
/// once per device), stream-ordered scratch memory, the workspace layout type, and the one
/// launch path of every kernel (cudaLaunchKernelEx).

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <utility>

#include "../arch.cuh"
#include "../options.cuh"
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
    cache[device] = d;
    filled[device] = true;
  }
  // The architecture the kernels were compiled for, as the driver loaded them on this device
  // (the PTX version also where it JIT-compiled that PTX for a newer GPU). Kernel attributes
  // are read for the current device only, so a device first queried while another one was
  // current gets it on its first query as the current one.
  if (cache[device].code_arch == 0) {
    int current = 0;
    INSTNORM_RETURN_IF_ERROR(cudaGetDevice(&current));
    if (current == device) {
      cudaFuncAttributes fa;
      INSTNORM_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, detail::arch_probe<0>));
      cache[device].code_arch = fa.ptxVersion;
    }
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
  size_t coef = 0, coef_bytes = 0;                ///< NHWC backward: dx's folded coefficients
                                                  ///< per (image, channel)
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
  /// Programmatic dependent launch (grid/dependency.cuh): the kernel may start before the one
  /// before it on the stream completes, and waits for it in wait_for_prerequisite.
  bool dependent = false;
};

/// The one launch path of every kernel of the library: cudaLaunchKernelEx with the attributes
/// the shape asks for (cooperative, programmatic dependent launch; a cluster dimension would be
/// one more attribute here), dynamic shared memory opted into above 48 KB.
template <class... Params, class... Args>
inline cudaError_t launch_kernel(void (*kernel)(Params...), const LaunchShape& shape,
                                 cudaStream_t stream, Args&&... args) {
  if (shape.dyn_smem + shape.static_smem > 48 * 1024)
    INSTNORM_RETURN_IF_ERROR(allow_dynamic_smem(reinterpret_cast<const void*>(kernel), shape.dyn_smem));
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = shape.grid;
  cfg.blockDim = shape.block;
  cfg.dynamicSmemBytes = shape.dyn_smem;
  cfg.stream = stream;
  if (shape.cooperative) {
    attrs[n].id = cudaLaunchAttributeCooperative;
    attrs[n++].val.cooperative = 1;
  }
  if (shape.dependent) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  cfg.attrs = n > 0 ? attrs : nullptr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

/// Tags start at 1: the slots of a cooperative launch are zeroed on its stream first.
inline cudaError_t clear_slots(const WorkspaceLayout& w, void* workspace, cudaStream_t stream) {
  if (w.slots_bytes == 0) return cudaSuccess;
  return cudaMemsetAsync(WorkspaceLayout::at<unsigned char>(workspace, w.slots), 0, w.slots_bytes,
                         stream);
}

}  // namespace detail
}  // namespace instnorm
