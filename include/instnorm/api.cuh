#pragma once
/// \file api.cuh
/// The public calls: validation, planning, workspace and launch. Asynchronous on the caller's
/// stream; no device-wide or host synchronization.

#include <cuda_runtime.h>

#include <cstdint>

#include "launch/backward.cuh"
#include "launch/launch.cuh"
#include "options.cuh"
#include "plan.cuh"
#include "validate.cuh"

namespace instnorm {

/// Bytes of workspace `forward(..., workspace, bytes, stream)` needs for this problem on the
/// current device (0 for most shapes). Validates like forward; no launch.
template <class T>
cudaError_t workspace_size(int64_t n, int64_t c, int64_t spatial, const Options& opt,
                           size_t* bytes, const T* x = nullptr, const T* y = nullptr) {
  if (bytes == nullptr) return cudaErrorInvalidValue;
  *bytes = 0;
  Problem prob;
  // Alignment changes the plan only through the vector width, which never changes the
  // workspace; dummy aligned pointers stand in when the caller passes none.
  const T* px = x ? x : reinterpret_cast<const T*>(uintptr_t(256));
  const T* py = y ? y : reinterpret_cast<const T*>(uintptr_t(256));
  const Invalid v = detail::prepare(px, py, n, c, spatial, opt, &prob);
  if (v != Invalid::kOk) return detail::to_cuda_error(v);
  if (prob.nhwc) {
    NhwcPlan np;
    INSTNORM_RETURN_IF_ERROR(detail::current_nhwc_plan(prob, opt, &np));
    *bytes = detail::workspace_layout(np, prob, opt).total;
    return cudaSuccess;
  }
  if (!opt.use_input_stats) return cudaSuccess;
  Plan plan;
  INSTNORM_RETURN_IF_ERROR(detail::current_plan(prob, &plan));
  *bytes = detail::workspace_layout(plan, prob, opt).total;
  return cudaSuccess;
}

/// Full call with a caller-provided workspace of at least workspace_size() bytes (may be null
/// when that size is 0). Refuses a smaller workspace with cudaErrorInvalidValue.
template <class T>
cudaError_t forward(const T* x, T* y, int64_t n, int64_t c, int64_t spatial, const Options& opt,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Problem prob;
  const Invalid v = detail::prepare(x, y, n, c, spatial, opt, &prob);
  if (v != Invalid::kOk) return detail::to_cuda_error(v);
  if (prob.nhwc) {
    NhwcPlan np;
    INSTNORM_RETURN_IF_ERROR(detail::current_nhwc_plan(prob, opt, &np));
    const size_t need = detail::workspace_layout(np, prob, opt).total;
    if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
    return detail::launch_nhwc(x, y, prob, opt, np, workspace, stream);
  }
  if (!opt.use_input_stats) return detail::launch_inference(x, y, prob, opt, stream);
  Plan plan;
  INSTNORM_RETURN_IF_ERROR(detail::current_plan(prob, &plan));
  const size_t need = detail::workspace_layout(plan, prob, opt).total;
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  return detail::launch(x, y, prob, opt, plan, workspace, stream);
}

namespace detail {
/// A validated forward (y null: statistics only) on the plan the planner makes with the
/// overrides `ov` and table `policy`; `used` / `used_nhwc` receive the plan that ran.
template <class T>
cudaError_t run_forward(const T* x, T* y, const Problem& prob, const Options& opt,
                        const PlanOverride& ov, const ArchPolicy* policy, cudaStream_t stream,
                        Plan* used, NhwcPlan* used_nhwc) {
  if (prob.nhwc) {
    NhwcPlan np;
    INSTNORM_RETURN_IF_ERROR(current_nhwc_plan(prob, opt, &np, ov, policy));
    if (used_nhwc) *used_nhwc = np;
    return with_scratch(workspace_layout(np, prob, opt).total, stream,
                        [&](void* ws) { return launch_nhwc(x, y, prob, opt, np, ws, stream); });
  }
  if (!opt.use_input_stats) return launch_inference(x, y, prob, opt, stream);
  Plan plan;
  INSTNORM_RETURN_IF_ERROR(current_plan(prob, &plan, ov, policy));
  if (used) *used = plan;
  return with_scratch(workspace_layout(plan, prob, opt).total, stream,
                      [&](void* ws) { return launch(x, y, prob, opt, plan, ws, stream); });
}

/// The full call with the planner's knobs exposed: `ov` forces strategy, block size, items,
/// vector width or blocks per plane, `policy` forces an architecture's table (the benchmark's
/// tuning mode and the tests use both); `used` / `used_nhwc` receive the plan that ran.
template <class T>
cudaError_t forward_tuned(const T* x, T* y, int64_t n, int64_t c, int64_t spatial,
                          const Options& opt, const PlanOverride& ov, const ArchPolicy* policy,
                          cudaStream_t stream, Plan* used = nullptr,
                          NhwcPlan* used_nhwc = nullptr) {
  Problem prob;
  const Invalid v = prepare(x, y, n, c, spatial, opt, &prob);
  if (v != Invalid::kOk) return to_cuda_error(v);
  return run_forward(x, y, prob, opt, ov, policy, stream, used, used_nhwc);
}

/// The options statistics() runs the forward's planner and kernels with: the grouping, layout,
/// eps and variance of `opt`, and its outputs in place of the saved statistics.
inline Options statistics_options(const Options& opt, float* mean, float* stddev) {
  Options s;
  s.eps = opt.eps;
  s.groups = opt.groups;
  s.layout = opt.layout;
  s.unbiased = opt.unbiased;
  s.save_mean = mean;
  s.save_rstd = stddev;
  return s;
}

/// statistics() with the planner's knobs exposed (as forward_tuned).
template <class T>
cudaError_t statistics_tuned(const T* x, float* mean, float* stddev, int64_t n, int64_t c,
                             int64_t spatial, const Options& opt, const PlanOverride& ov,
                             const ArchPolicy* policy, cudaStream_t stream, Plan* used = nullptr,
                             NhwcPlan* used_nhwc = nullptr) {
  const Options s = statistics_options(opt, mean, stddev);
  Problem prob;
  const Invalid v = validate_statistics(x, mean, stddev, n, c, spatial, int(sizeof(T)), s, &prob);
  if (v != Invalid::kOk) return to_cuda_error(v);
  return run_forward(x, static_cast<T*>(nullptr), prob, s, ov, policy, stream, used, used_nhwc);
}
}  // namespace detail

/// The statistics of each normalized plane (or group) without the normalize: mean[i * G + g]
/// and stddev[i * G + g] = sqrt(var + eps), var the biased variance or, with opt.unbiased, the
/// unbiased one (AdaIN's style statistics: opt.unbiased, eps 1e-5), n*G floats each, where
/// G = opt.groups (0: c, one entry per (sample, channel)). Reads opt.eps, groups, layout and
/// unbiased only; one read of x, no workspace beyond the forward's.
template <class T>
cudaError_t statistics(const T* x, float* mean, float* stddev, int64_t n, int64_t c,
                       int64_t spatial, const Options& opt = {}, cudaStream_t stream = nullptr) {
  return detail::statistics_tuned(x, mean, stddev, n, c, spatial, opt, PlanOverride{}, nullptr,
                                  stream);
}

/// Full call; takes any scratch memory it needs stream-ordered (cudaMallocAsync/cudaFreeAsync),
/// so it stays asynchronous and can be captured in a CUDA graph.
template <class T>
cudaError_t forward(const T* x, T* y, int64_t n, int64_t c, int64_t spatial, const Options& opt,
                    cudaStream_t stream = nullptr) {
  return detail::forward_tuned(x, y, n, c, spatial, opt, PlanOverride{}, nullptr, stream);
}

/// Instance normalization of contiguous NCHW x into y (y == x allowed): each of the n*c planes
/// of `spatial` elements becomes (x - mean) / sqrt(var + eps), biased variance, fp32 math.
template <class T>
cudaError_t forward(const T* x, T* y, int64_t n, int64_t c, int64_t spatial, float eps = 1e-5f,
                    cudaStream_t stream = nullptr) {
  Options opt;
  opt.eps = eps;
  return forward(x, y, n, c, spatial, opt, stream);
}

// ---------------------------------------------------------------- backward

/// The gradient of forward(x, y, n, c, spatial, opt): dx from dy, and dgamma/dbeta where
/// `grads` asks for them. Pass the Options of the forward call: its save_mean and save_rstd
/// (which the forward must have written, when use_input_stats) are read, not written, and its
/// running statistics are read (use_input_stats false), not updated. The backward needs x as
/// the forward read it: a forward run in place (y == x) destroys it. dx may be dy or x (same
/// buffer), never a part of either. ReLU/SiLU: the derivative is taken at the pre-activation
/// recomputed from x, so y need not be kept. Asynchronous and graph-capturable; dgamma/dbeta
/// are reduced in a fixed order (bit-identical reruns).

/// Bytes of workspace the backward needs (validates like backward; no launch).
template <class T>
cudaError_t backward_workspace_size(int64_t n, int64_t c, int64_t spatial, const Options& opt,
                                    const Gradients& grads, size_t* bytes, const T* x = nullptr,
                                    const T* dy = nullptr, const T* dx = nullptr) {
  if (bytes == nullptr) return cudaErrorInvalidValue;
  *bytes = 0;
  const T* aligned = reinterpret_cast<const T*>(uintptr_t(256));
  Problem prob;
  const Invalid v = validate_backward(x ? x : aligned, dy ? dy : aligned + 0,
                                      dx ? dx : aligned, n, c, spatial, int(sizeof(T)), opt,
                                      grads, &prob);
  if (v != Invalid::kOk) return detail::to_cuda_error(v);
  if (prob.nhwc) return detail::nhwc_backward_workspace(prob, opt, grads, bytes);
  Plan plan;
  INSTNORM_RETURN_IF_ERROR(detail::current_backward_plan(prob, grads, &plan));
  *bytes = detail::backward_workspace_layout(plan, prob, opt, grads).total;
  return cudaSuccess;
}

namespace detail {
/// The backward with the planner's knobs exposed (tests and the benchmark); `used` receives
/// the NCHW plan that ran, `nhwc_on_chip` whether a channels-last call ran on chip
/// (PlanOverride::nhwc_bwd_on_chip = 1 asks for it; it is refused where no on-chip plan fits).
template <class T>
cudaError_t backward_tuned(const T* x, const T* dy, T* dx, int64_t n, int64_t c,
                           int64_t spatial, const Options& opt, const Gradients& grads,
                           const PlanOverride& ov, const ArchPolicy* policy, void* workspace,
                           size_t workspace_bytes, bool own_workspace, cudaStream_t stream,
                           Plan* used = nullptr, bool* nhwc_on_chip = nullptr) {
  Problem prob;
  const Invalid v = validate_backward(x, dy, dx, n, c, spatial, int(sizeof(T)), opt, grads, &prob);
  if (v != Invalid::kOk) return to_cuda_error(v);
  if (prob.nhwc) {
    NhwcBackwardPlan np;
    INSTNORM_RETURN_IF_ERROR(current_nhwc_backward_plan(prob, opt, grads, &np, ov, policy));
    if (nhwc_on_chip) *nhwc_on_chip = np.on_chip;
    const size_t need = np.workspace_bytes;
    if (own_workspace)
      return with_scratch(need, stream, [&](void* ws) {
        return launch_nhwc_backward(x, dy, dx, prob, opt, grads, np, ws, stream);
      });
    if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
    return launch_nhwc_backward(x, dy, dx, prob, opt, grads, np, workspace, stream);
  }
  Plan plan;
  INSTNORM_RETURN_IF_ERROR(current_backward_plan(prob, grads, &plan, ov, policy));
  if (used) *used = plan;
  const size_t need = backward_workspace_layout(plan, prob, opt, grads).total;
  if (own_workspace)
    return with_scratch(need, stream, [&](void* ws) {
      return launch_backward(x, dy, dx, prob, opt, grads, plan, ws, stream);
    });
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  return launch_backward(x, dy, dx, prob, opt, grads, plan, workspace, stream);
}
}  // namespace detail

/// The backward with a caller-provided workspace of at least backward_workspace_size() bytes
/// (may be null when that is 0); a smaller one is refused with cudaErrorInvalidValue.
template <class T>
cudaError_t backward(const T* x, const T* dy, T* dx, int64_t n, int64_t c, int64_t spatial,
                     const Options& opt, const Gradients& grads, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream) {
  return detail::backward_tuned(x, dy, dx, n, c, spatial, opt, grads, PlanOverride{}, nullptr,
                                workspace, workspace_bytes, false, stream);
}

/// The backward taking its scratch memory stream-ordered (cudaMallocAsync/cudaFreeAsync).
template <class T>
cudaError_t backward(const T* x, const T* dy, T* dx, int64_t n, int64_t c, int64_t spatial,
                     const Options& opt, const Gradients& grads = {},
                     cudaStream_t stream = nullptr) {
  return detail::backward_tuned(x, dy, dx, n, c, spatial, opt, grads, PlanOverride{}, nullptr,
                                nullptr, 0, true, stream);
}

}  // namespace instnorm
