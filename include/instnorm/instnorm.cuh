#pragma once
/// \file instnorm.cuh
/// Umbrella header of instnorm: instance normalization (and GroupNorm) for NCHW tensors in
/// float, __half and __nv_bfloat16 with fp32 math, one DRAM read and one write per element.
///
///   cudaError_t err = instnorm::forward(x, y, n, c, h * w, 1e-5f, stream);

#include "api.cuh"

#define INSTNORM_VERSION_MAJOR 0
#define INSTNORM_VERSION_MINOR 1
#define INSTNORM_VERSION_PATCH 0
