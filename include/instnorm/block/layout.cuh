#pragma once
/// \file block/layout.cuh
/// How a block's threads split into lane groups and a grid's blocks into groups of G, by shifts
/// and masks where the plan allows it: a 32-bit division by a run-time value is about 20 SASS
/// instructions, and the forward kernel's prologue and valid-item counts held eight of them,
/// per thread and per plane on plans whose blocks live for one plane (4x512x64x64: 64 threads,
/// one plane each; docs/perf-notes.md).

#include "../thread/vector.cuh"  // lanes_log2

namespace instnorm {
namespace detail {

/// Thread threadIdx.x as lane `lane` of lane group `group`, among `per_block` groups of `lanes`
/// (a power of two) threads per block.
struct LaneGroups {
  int lane, group, per_block;
};
__device__ __forceinline__ LaneGroups lane_groups(int lanes) {
  const int sh = lanes_log2(lanes);
  return LaneGroups{int(threadIdx.x) & (lanes - 1), int(threadIdx.x) >> sh,
                    int(blockDim.x) >> sh};
}

/// Block blockIdx.x as rank `rank` of group `group` among `groups` groups of G consecutive blocks
/// (G <= the grid size, so 32 bits). G is any count; the usual G = 1 takes no division.
struct BlockRank {
  int rank, group, groups;
};
__device__ __forceinline__ BlockRank block_rank(int G) {
  if (G == 1) return BlockRank{0, int(blockIdx.x), int(gridDim.x)};
  return BlockRank{int(blockIdx.x) % G, int(blockIdx.x) / G, int(gridDim.x) / G};
}

/// A block's rows of an on-chip channels-last unit (an image slice by S rows shared by G blocks
/// of `slice_rows` rows each; the last ones may hold fewer, or none): its rank and group of
/// blocks by divisions (with block_rank's G = 1 branch ptxas left the forward's fp32 kernel
/// spilling 32 bytes on sm_90, nvcc 13.0), its first row and its row count. The forward's and
/// the backward's on-chip kernels (kernels/nhwc_on_chip.cuh, kernels/backward_nhwc_on_chip.cuh).
struct SliceRows {
  int rank, group, groups;
  int64_t begin, count;
  __device__ __forceinline__ SliceRows(int G, int64_t S, int64_t slice_rows)
      : rank(int(blockIdx.x) % G), group(int(blockIdx.x) / G), groups(int(gridDim.x) / G) {
    begin = int64_t(rank) * slice_rows;
    count = begin < S ? (S - begin < slice_rows ? S - begin : slice_rows) : 0;
  }
  /// The rows row lane rl of row_lanes holds (rows rl, rl + row_lanes, ...); 0 where !on.
  __device__ __forceinline__ int lane_rows(bool on, int rl, int row_lanes) const {
    return on && count > rl ? int((count - rl + row_lanes - 1) / row_lanes) : 0;
  }
};

}  // namespace detail
}  // namespace instnorm
