#pragma once
/// \file kernels/nhwc_params.cuh
/// What the channels-last (NHWC) kernels read: an image is an S x C matrix; a thread owns one
/// column vector (vec consecutive channels) and walks rows, so every load is a coalesced
/// 16-byte vector along C. The plans are in plan.cuh (NhwcPlan): on chip (nhwc_on_chip.cuh)
/// or tiled (nhwc_tiled.cuh).

#include "../contract.cuh"
#include "../epilogue/epilogue.cuh"
#include "../grid/exchange.cuh"
#include "../moments.cuh"
#include "../options.cuh"
#include "../thread/vector.cuh"

namespace instnorm {
namespace detail {

template <class T>
struct NhwcParams : EpilogueFields {
  const T* x;
  T* y;                          ///< null: statistics only
  int64_t c, cpg;
  int64_t img_first;   ///< first image of this batch
  int64_t img_count;   ///< images in this batch
  int64_t tile_rows, tiles;
  int cols_per_block, row_lanes;
  int finalize_lanes;            ///< threads per (image, group) in nhwc_finalize: 1..32
  float* save_mean;
  float* save_rstd;
  float* stat_mean;              ///< [n][c] (G == c) for the running-statistics update, or null
  float* stat_var;
  Moments* partials;             ///< [img_count][tiles][c]
  float4* group_stats;           ///< [n][groups]: center, residual, rstd
  // On-chip plans (nhwc_on_chip).
  int64_t col_slices;            ///< column slices per image
  int64_t slice_rows;            ///< rows per block of a unit
  int items, smem_items;         ///< rows per thread in registers / in shared memory
  int blocks_per_unit;           ///< G
  TaggedSlot* slots;             ///< [2 parities][grid][channels of a slice] block partials
  int phases;                    ///< NhwcPlan::phases
};

template <class T>
__device__ __forceinline__ float group_pivot(const NhwcParams<T>& p, int64_t image, int64_t g) {
  return to_float(p.x[image * p.spatial * p.c + g * p.cpg]);
}


}  // namespace detail
}  // namespace instnorm
