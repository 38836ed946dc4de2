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

}  // namespace detail
}  // namespace instnorm
