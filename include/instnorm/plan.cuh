#pragma once
/// \file plan.cuh
/// The planner: a pure host function from (problem, device properties, tuning table) to a launch
/// plan. No CUDA call happens here; the CPU tests drive it with hand-made property sets and the
/// benchmark overrides its knobs to sweep configurations.

#include "plan/common.cuh"
#include "plan/nchw.cuh"
#include "plan/nhwc.cuh"
