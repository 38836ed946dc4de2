// Hand-made device properties of the two tuned GPUs, as cudaGetDeviceProperties reports them
// (less the 1 KB of static shared memory the runtime keeps per block), for the CPU tests and the
// fuzz target, and the benchmark's --sweep-list: the planner is tested against the limits it
// must respect without a GPU.
#pragma once
#include <instnorm/plan.cuh>

namespace instnorm_tables {

/// H100 SXM (sm_90): 132 SMs, 228 KB shared memory per SM, 50 MB L2.
inline instnorm::DeviceProps sm90() {
  instnorm::DeviceProps d;
  d.sm_count = 132;
  d.cc_major = 9;
  d.cc_minor = 0;
  d.max_threads_per_sm = 2048;
  d.max_threads_per_block = 1024;
  d.max_blocks_per_sm = 32;
  d.regs_per_sm = 65536;
  d.smem_per_sm = 228 * 1024;
  d.smem_per_block_optin = 227 * 1024 - 1024;
  d.l2_bytes = 50 << 20;
  d.max_grid_x = 2147483647;
  d.cooperative = true;
  return d;
}

/// H200 (sm_90): an H100's SMs, shared memory and L2 with a 6144-bit bus, running sm_90 code
/// (the benchmark's --sweep-list plans shapes for it without a GPU).
inline instnorm::DeviceProps h200() {
  instnorm::DeviceProps d = sm90();
  d.mem_bus_bits = 6144;
  d.code_arch = 90;
  return d;
}

/// RTX 4090 (sm_89): 128 SMs, 1536 threads and 100 KB shared memory per SM, 72 MB L2.
inline instnorm::DeviceProps sm89() {
  instnorm::DeviceProps d = sm90();
  d.sm_count = 128;
  d.cc_major = 8;
  d.cc_minor = 9;
  d.max_threads_per_sm = 1536;
  d.max_blocks_per_sm = 24;
  d.smem_per_sm = 100 * 1024;
  d.smem_per_block_optin = 99 * 1024 - 1024;
  d.l2_bytes = 72 << 20;
  return d;
}

}  // namespace instnorm_tables
