#pragma once
/// \file grid/dependency.cuh
/// Programmatic dependent launch between the kernels of one call: a kernel launched with
/// LaunchShape::dependent may start while the kernel before it on the stream is finishing
/// (once every block of that one has called allow_dependent_launch, or exited), and waits in
/// wait_for_prerequisite until that kernel has completed and its stores are visible. The
/// launch and ramp of each kernel of a chain then overlap the tail of the one before.
///
/// The rules a kernel launched dependent keeps: it calls wait_for_prerequisite before its
/// first load or store of memory another kernel touches (so the wait also covers the kernels
/// before its predecessor: that one completed only after its own wait). One exception: a
/// kernel that is not its chain's first may load, before the wait, inputs that no kernel of
/// the chain writes (the channels-last backward's sums pass after a residual pass, its affine
/// maps): the kernel before the chain completed before the chain's first kernel let the
/// second start. Called in a kernel
/// launched without the attribute, or compiled for an architecture without griddepcontrol
/// (before sm_90), both are no-ops.

#include "../arch.cuh"

namespace instnorm {
namespace detail {

/// Blocks until the kernel this one depends on has completed and its memory is visible.
__device__ __forceinline__ void wait_for_prerequisite() {
  if constexpr (CompiledArch::dependent_launch) asm volatile("griddepcontrol.wait;" ::: "memory");
}

/// Lets the next kernel on the stream, if launched dependent, start its blocks.
__device__ __forceinline__ void allow_dependent_launch() {
  if constexpr (CompiledArch::dependent_launch)
    asm volatile("griddepcontrol.launch_dependents;" :::);
}

}  // namespace detail
}  // namespace instnorm
