#pragma once
/// \file arch.cuh
/// The architecture table (docs/tuning.md): what a device is (DeviceProps), one row of tuning
/// per GPU family (ArchPolicy), the rows, and which row a device or a compiled kernel takes. Host
/// planner and device code both read it: the planner its sizes, kernel bodies its device traits.

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define INSTNORM_HD_CONSTEXPR __host__ __device__ constexpr
#else
#define INSTNORM_HD_CONSTEXPR constexpr
#endif

namespace instnorm {

/// The device limits the planner needs (filled from cudaGetDeviceProperties, or by hand in tests).
struct DeviceProps {
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  int max_threads_per_sm = 0;
  int max_threads_per_block = 0;
  int max_blocks_per_sm = 0;
  int regs_per_sm = 0;
  int64_t smem_per_sm = 0;           ///< shared memory per SM (bytes)
  int64_t smem_per_block_optin = 0;  ///< largest dynamic shared memory a block may opt into
  int64_t l2_bytes = 0;
  int64_t max_grid_x = 0;
  bool cooperative = false;
  int mem_bus_bits = 0;  ///< memory bus width (bits; 0: unknown), for rows refined by it
  /// The architecture the kernels were compiled for (their PTX version, major * 10 + minor; 0:
  /// take the device's): the table row follows it, as the kernels' device traits do.
  int code_arch = 0;
};

/// The first architecture with griddepcontrol (programmatic dependent launch).
constexpr int kDependentLaunchArch = 90;

/// One row of the architecture table (kArchTable below): the tuning of one GPU family, each
/// field named, each row saying which measurement or limit chose it (`source`; the numbers are
/// in docs/perf-notes.md). Rows are written as changes to the generic row, so a new field needs
/// one default and the rows that differ from it.
struct ArchPolicy {
  const char* name = "generic";
  /// Lowest compute capability (major * 10 + minor) the row serves: a device runs the first row
  /// of the table, newest first, at or below the architecture its kernels were compiled for.
  int cc = 0;
  /// Refinement for cards of one capability that want different plans: the row applies only
  /// where the memory bus is at least this wide (bits; 0: any).
  int min_bus_bits = 0;
  // NCHW plans.
  int subwarp_threads = 256;       ///< block size of sub-warp plans
  int subwarp_items = 16;          ///< vectors per thread aimed for in sub-warp plans
  int block_items = 16;            ///< vectors per thread aimed for in block-per-plane plans
  int min_block_threads = 64;      ///< smallest block of block-per-plane plans
  int split_threads = 256;         ///< block size of split plans
  bool split_smem = false;         ///< split slices extend into dynamic shared memory (sm_80+)
  int phases = 2;                  ///< split plans: start phases of the groups (Plan::phases)
  // Channels-last (NHWC) plans.
  /// Narrowest column slice of an on-chip plan that the planner picks by itself, in bytes of a
  /// row: a whole 128-byte line. On the H100 (exchange disabled, timing only), 112x64x512x512
  /// NHWC fp32 ran at 0.55 of copy with 64-byte slices and 0.85 with 128-byte ones.
  int64_t nhwc_min_slice_bytes = 128;
  /// Tiled: least chunks of kNhwcRows rows per thread in a tile (make_nhwc_tiled_plan).
  int nhwc_min_chunks = 4;
  /// Tiled: the bytes of a batch of images that the second read of x expects to find in L2, in
  /// percent of it. On the H100 (--nhwc-budget), 16x64x256x256 fp32 NHWC ran in 0.42 ms with
  /// 40 MB batches (80%), 0.52 ms with 25 MB.
  int nhwc_l2_percent = 80;
  /// Device trait: the vector (4- and 8-channel) on-chip NHWC kernels start odd groups of
  /// blocks one phase behind (Plan::phases); without it they start together.
  bool nhwc_vector_phase_shift = true;
  const char* source = "limits valid on every CUDA device since sm_70";
};

/// Any other GPU: sizes valid on every CUDA device since sm_70 (no shared-memory slices: their
/// copies use cp.async, sm_80 and later).
constexpr ArchPolicy kPolicyGeneric{};
/// sm_89 (RTX 4090), derived from its limits (it was never lent to us; the bench's --arch=sm_89
/// forces this row on other GPUs, with 0 spills). 64K registers at 128 per thread give 512
/// resident threads per SM (not its 1536), so 256-thread blocks give 2 blocks (128 KB of data)
/// per SM, the same on-chip bytes per SM as the H100; 72 MB of L2 changes nothing for
/// register-resident plans; 24 blocks per SM at most never binds with blocks of >= 64 threads.
/// Split slices take the 99 KB of shared memory a block may hold besides 128 KB of registers
/// (512 threads). The vector on-chip NHWC kernels start without phase shift: its wait made
/// ptxas spill them at 128 registers for sm_89.
constexpr ArchPolicy kPolicySm89 = [] {
  ArchPolicy p;
  p.name = "sm_89";
  p.cc = 89;
  p.split_threads = 512;
  p.split_smem = true;
  p.nhwc_vector_phase_shift = false;
  p.source = "RTX 4090 limits (128 SMs, 99 KB shared memory per block, 64K registers per SM)";
  return p;
}();
/// sm_90 (H100, and the H200 until it has its own row): chosen by the tuning sweep on the H100
/// (docs/perf-notes.md, "sm_90 table"). split_threads 256: two blocks per SM, each with 64 KB
/// of registers and ~110 KB of shared memory (112x64x512x512 bf16 0.918 of copy against 0.893
/// with one 512-thread block). Also the row of newer GPUs (sm_100, sm_120) until they have one.
constexpr ArchPolicy kPolicySm90 = [] {
  ArchPolicy p;
  p.name = "sm_90";
  p.cc = 90;
  p.split_smem = true;
  p.source = "H100 tuning sweep (instnorm_bench --tune), docs/perf-notes.md \"sm_90 table\"";
  return p;
}();

/// The built-in table, newest architecture first; the last row (cc 0) takes every device.
constexpr ArchPolicy kArchTable[] = {kPolicySm90, kPolicySm89, kPolicyGeneric};

}  // namespace instnorm

/// Rows of a consumer's own, ahead of the built-in table: define INSTNORM_USER_ARCH_ROWS to a
/// header (in quotes or brackets) that defines
/// `namespace instnorm { constexpr ArchPolicy kUserArchRows[] = {...}; }`, before including
/// instnorm (docs/tuning.md: how to make one for a GPU with the benchmark).
#ifdef INSTNORM_USER_ARCH_ROWS
#include INSTNORM_USER_ARCH_ROWS
#endif

namespace instnorm {

namespace detail {
/// Index of the first row of `table` for kernels compiled for `arch` on a bus of `bus_bits`
/// (0: unknown; rows that ask for a width are then skipped), or -1.
template <class Table>
INSTNORM_HD_CONSTEXPR int find_row(const Table& table, int arch, int bus_bits) {
  int i = 0;
  for (const ArchPolicy& r : table) {
    if (r.cc <= arch && (r.min_bus_bits == 0 || (bus_bits > 0 && bus_bits >= r.min_bus_bits)))
      return i;
    ++i;
  }
  return -1;
}
/// The row as a value, for device traits (constant-evaluated while compiling device code,
/// where the table's address cannot be taken).
INSTNORM_HD_CONSTEXPR ArchPolicy row_value(int arch) {
#ifdef INSTNORM_USER_ARCH_ROWS
  const int u = find_row(kUserArchRows, arch, 0);
  if (u >= 0) return kUserArchRows[u];
#endif
  const int i = find_row(kArchTable, arch, 0);
  return i >= 0 ? kArchTable[i] : kPolicyGeneric;
}
}  // namespace detail

/// The row for kernels compiled for `arch` (compute capability major * 10 + minor) on a device
/// whose memory bus is `bus_bits` wide (0: unknown, rows that ask for a width are skipped).
inline const ArchPolicy& policy_for_arch(int arch, int bus_bits = 0) {
#ifdef INSTNORM_USER_ARCH_ROWS
  const int u = detail::find_row(kUserArchRows, arch, bus_bits);
  if (u >= 0) return kUserArchRows[u];
#endif
  const int i = detail::find_row(kArchTable, arch, bus_bits);
  return i >= 0 ? kArchTable[i] : kPolicyGeneric;
}

/// The row for a compute capability (major, minor).
inline const ArchPolicy& policy_for(int cc_major, int cc_minor) {
  return policy_for_arch(cc_major * 10 + cc_minor);
}

/// The row for a device: by the architecture its kernels were compiled for (the device's own
/// where that is unknown) and its memory bus.
inline const ArchPolicy& policy_for(const DeviceProps& d) {
  return policy_for_arch(d.code_arch > 0 ? d.code_arch : d.cc_major * 10 + d.cc_minor,
                         d.mem_bus_bits);
}

/// Whether kernels may be launched as programmatic dependents on this device: only where the
/// code that runs was compiled with griddepcontrol (ArchTraits::dependent_launch), so that a
/// kernel launched early waits for the one before it. PTX of an older architecture JIT-compiled
/// for an sm_90 device has no such wait: its kernels keep the stream's full serialization.
inline bool dependent_launch(const DeviceProps& d) {
  const int arch = d.code_arch > 0 ? d.code_arch : d.cc_major * 10 + d.cc_minor;
  return d.cc_major * 10 + d.cc_minor >= kDependentLaunchArch && arch >= kDependentLaunchArch;
}

/// A row by its name ("sm_90", ...), or null.
inline const ArchPolicy* policy_named(const char* name) {
#ifdef INSTNORM_USER_ARCH_ROWS
  for (const ArchPolicy& r : kUserArchRows)
    if (std::strcmp(r.name, name) == 0) return &r;
#endif
  for (const ArchPolicy& r : kArchTable)
    if (std::strcmp(r.name, name) == 0) return &r;
  return nullptr;
}

/// Device code: the row of the architecture being compiled (__CUDA_ARCH__ / 10), the same one
/// the host picks from the kernels' PTX version (DeviceProps::code_arch), also where the driver
/// JIT-compiles that PTX for a newer GPU. Kernel bodies read device traits from it instead of
/// testing __CUDA_ARCH__ themselves.
template <int kArch>
struct ArchTraits {
  static constexpr bool nhwc_vector_phase_shift = detail::row_value(kArch).nhwc_vector_phase_shift;
  /// The kernels wait for their prerequisite in griddepcontrol.wait (grid/dependency.cuh).
  static constexpr bool dependent_launch = kArch >= kDependentLaunchArch;
};
#if defined(__CUDA_ARCH__)
using CompiledArch = ArchTraits<__CUDA_ARCH__ / 10>;
#else
using CompiledArch = ArchTraits<0>;  // host pass: never used for a decision
#endif

}  // namespace instnorm
