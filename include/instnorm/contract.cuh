#pragma once
/// \file contract.cuh
/// What the host planner and the kernels must agree on: block sizes the kernels are compiled for,
/// the per-thread register arrays, and the NHWC kernels' shared-memory layout. Device code
/// includes this, never the planner.

#include <cstdint>

#ifndef INSTNORM_HD_CONSTEXPR  // as arch.cuh: host and device where CUDA compiles, host otherwise
#if defined(__CUDACC__)
#define INSTNORM_HD_CONSTEXPR __host__ __device__ constexpr
#else
#define INSTNORM_HD_CONSTEXPR constexpr
#endif
#endif

namespace instnorm {

/// The kernels keep at most this many vectors per thread in registers (compile-time array size).
/// 16 x 16 bytes = 64 registers of data out of 128 (__launch_bounds__(512)): 128 KB per SM on
/// chip, the size that ran at 0.95 of memcpy in the H100 probes. With 1024-thread blocks
/// (64 registers) even 8 vectors spilled: the strided 16-byte loads need their own addresses.
constexpr int max_items(int vec) { return vec > 1 ? 16 : 32; }
/// The streaming kernel (planes larger than the chip) holds half as many 16-byte vectors: it
/// re-reads anyway, and the full array left it a few bytes of spill for 16-bit types. Scalars
/// (misaligned planes): 24, since the per-sample modulation's loads spilled 12-20 bytes at 32.
constexpr int max_stream_items(int vec) { return vec > 1 ? max_items(vec) / 2 : 24; }
/// Ragged plans (16-byte bodies of planes that are not 16-byte aligned, a scalar head and tail):
/// the cut of each slice and its scalar left the register-resident kernel 12-20 bytes of spill
/// at 16 vectors on sm_90 (nvcc 13.0).
constexpr int max_ragged_items(int vec) { return vec > 1 ? 14 : max_items(vec); }
/// The backward kernel holds x and dy: vectors per thread of each, in registers and streamed.
/// Half the forward's would be 8 16-byte vectors (16 scalars); beside the backward's sums,
/// per-channel state and shared-memory extension, ptxas (nvcc 13.0) spilled 16-252 bytes at 8,
/// 8 bytes on sm_89 at 6 (16 scalars: 4-12 bytes), none at 5 and 12; with the per-sample
/// modulation's loads 12 scalars (16 streamed) spilled 4-24 bytes, 10 (12) none.
constexpr int max_backward_items(int vec) { return vec > 1 ? 5 : 10; }
constexpr int max_backward_stream_items(int vec) { return vec > 1 ? 4 : 12; }
/// Registers per thread the kernels may use (ptxas: 101-128, 0 spills, sm_89 and sm_90).
constexpr int kMaxRegsPerThread = 128;
/// Largest block the kernels are compiled for (__launch_bounds__).
constexpr int kMaxThreads = 512;
/// Block size of the staged kernel (Strategy::kStaged: kernels/nchw.cuh), its
/// blocks per SM (__launch_bounds__: 64 registers), and the values per lane it aims for when it
/// chooses how many lanes share a plane. The planes of a block form one contiguous unit, so
/// fewer lanes mean larger units: on the H100, 128x512x7x7 fp32 ran at 0.874 of copy with 2
/// lanes (25 KB units), 0.74 with 4 and 0.52 with 8 (too few bytes in flight per SM), 0.77 with
/// 1 (half the blocks per SM).
constexpr int kStagedThreads = 256;
constexpr int kStagedBlocksPerSm = 4;
/// Values of a plane per lane that the staged kernel's register instance holds (forward,
/// staged_in_registers in plan/nchw.cuh): 14 floats beside its per-launch constants fit the 64
/// registers of kStagedBlocksPerSm blocks per SM without spilling; 16 spilled 4 bytes on sm_89
/// and sm_90 (nvcc 13.0).
constexpr int kStagedRegItems = 14;
/// The fewest values per lane for which the register instance runs (staged_in_registers: with
/// fewer, its predicated slots cost more than the shared-memory instance's reads).
constexpr int kStagedRegMinItems = 9;
/// Threads of the tiled NHWC kernels, and the rows each thread holds in registers per chunk.
constexpr int kNhwcThreads = 256;
constexpr int kNhwcRows = 8;
/// Block of the on-chip NHWC kernel: two per SM at the 128 registers per thread it may use.
constexpr int kNhwcOnChipThreads = 256;
/// Rows per thread the on-chip NHWC kernel keeps in registers: the most that ptxas fits in its
/// 128 registers without spilling beside the per-channel sums (4 or 8 channels per thread) and
/// the exchange's loads in flight, on sm_89 and sm_90 (nvcc 13.0).
constexpr int nhwc_max_items(int vec) { return vec == 1 ? 16 : vec == 4 ? 11 : 8; }
/// Row lanes of one column that the on-chip NHWC kernel combines inside a warp before its
/// shared-memory walk: 32 / cs where a slice's cs column vectors are a power of two below 32
/// (lane i and lane i ^ (cs * 2^j) then hold the same column), else 1.
constexpr int nhwc_warp_row_lanes(int64_t cols) {
  return cols < 32 && (cols & (cols - 1)) == 0 ? int(32 / cols) : 1;
}
/// Entries per channel of a thread's column vector in the on-chip NHWC kernel's table of
/// partials: one per (row-lane group, column).
constexpr int64_t nhwc_partial_entries(int64_t cols) {
  return (kNhwcOnChipThreads / cols) / nhwc_warp_row_lanes(cols) * cols;
}
/// Dynamic shared memory ahead of the on-chip NHWC kernel's rows, for a slice of `cols` column
/// vectors: the pivot of each channel (kept there, not re-read from x after the exchange: in
/// place, the block holding an image's first row may already have overwritten it), then the
/// partials' table, three floats (the mean's two parts and the variance) per entry and channel.
/// With the in-warp combine a slice of 8 columns of bf16 needs 6 KB of partials where one entry
/// per thread of two floats took 16 KB.
constexpr int64_t nhwc_pivot_bytes(int64_t cols, int vec) {
  return (cols * vec * 4 + 15) / 16 * 16;
}
constexpr int64_t nhwc_prefix_bytes(int64_t cols, int vec) {
  return nhwc_pivot_bytes(cols, vec) + (12 * vec * nhwc_partial_entries(cols) + 15) / 16 * 16;
}
/// Static shared memory of the on-chip NHWC kernel: a Moments per warp.
constexpr int64_t nhwc_on_chip_static_smem(int) { return 24 * (kNhwcOnChipThreads / 32); }
/// Block of the on-chip channels-last backward (kernels/backward_nhwc_on_chip.cuh): up to two
/// per SM at 128 registers per thread. Its rows of x and dy sit in shared memory only (the
/// three passes re-read them there), so its registers hold per-channel state, not rows.
constexpr int kNhwcGradChipThreads = 256;
/// Most channels of one slice of that kernel: its per-channel arrays (nine floats a channel)
/// stay a small part of the block's shared memory, and a group thread's walk short.
constexpr int kNhwcGradChipMaxChannels = 512;
/// Most tagged partials one of its threads loads per exchange (nhwc_grad_chip_merge_loads): the
/// exchange is one hop, every block merging all G partials of every channel.
constexpr int kNhwcGradChipMaxLoads = 16;
/// Lanes its exchange's merge gives each channel of a slice of `chs` channels: the block's
/// threads over the channels, rounded down to a power of two, 1 to 32 (a butterfly in a warp).
INSTNORM_HD_CONSTEXPR int nhwc_grad_chip_merge_lanes(int64_t chs) {
  const int64_t share = kNhwcGradChipThreads / (chs > 0 ? chs : 1);
  int lanes = 1;
  while (lanes < 32 && 2 * lanes <= share) lanes *= 2;
  return lanes;
}
/// Tagged partials one thread of that merge loads per exchange of G blocks: its channels (one
/// per pass of the block) times its share of each channel's G partials.
INSTNORM_HD_CONSTEXPR int64_t nhwc_grad_chip_merge_loads(int64_t G, int64_t chs) {
  const int lanes = nhwc_grad_chip_merge_lanes(chs);
  const int64_t per_pass = kNhwcGradChipThreads / lanes;
  return (chs + per_pass - 1) / per_pass * ((G + lanes - 1) / lanes);
}
/// Floats per channel in that kernel's per-channel arrays: centre, rstd, gamma, beta, residual
/// and dx's coefficients a, p0, b, e (GradCoef).
constexpr int kNhwcGradChipChannelFloats = 9;
/// Its dynamic shared memory ahead of the rows for a slice of `cols` column vectors of `vec`
/// channels: the reduction table (a float4 per thread and channel of its column vector), then
/// the per-channel arrays, each rounded to 16 bytes.
constexpr int64_t nhwc_grad_chip_prefix_bytes(int64_t cols, int vec) {
  return int64_t(kNhwcGradChipThreads) * vec * 16 +
         int64_t(kNhwcGradChipChannelFloats) * ((cols * vec + 3) / 4 * 16);
}
/// Its shared memory per row a thread holds: one 16-byte vector of x and one of dy.
constexpr int64_t nhwc_grad_chip_row_bytes() { return int64_t(kNhwcGradChipThreads) * 32; }
/// Threads and vectors per thread of the inference kernel: 4 16-byte loads in flight per thread.
constexpr int kInferenceThreads = 256;
constexpr int kInferenceItems = 4;

}  // namespace instnorm
