// The path matrix: named shapes (the benchmark's standard rows and a few nobody tuned for) and
// the path each takes on the two tuned device tables. The CPU test (test_host.cu) checks the
// planner against it; the device test (test_device.cu) checks that the launch runs the plan the
// planner makes for the GPU at hand, and on a 132-SM sm_90 card the path named here.
#pragma once
#include <instnorm/plan.cuh>

#include <cstdint>
#include <string>

namespace instnorm_paths {

struct PathCase {
  const char* name;
  int64_t n, c, s;
  int elem_bytes;
  int groups;
  bool nhwc;
  /// NCHW (and NHWC with c or s 1): to_string(Strategy), "+ragged" for Plan::ragged; NHWC: "on-chip", "on-chip-G" (G > 1),
  /// "staged", "tiled"
  const char* sm90;
  const char* sm89;
};

inline const PathCase kPathCases[] = {
    {"112x64x512x512", 112, 64, 262144, 4, 0, false, "split", "split"},
    {"16x64x256x256", 16, 64, 65536, 4, 0, false, "split", "split"},
    {"1x64x1024x1024", 1, 64, 1048576, 4, 0, false, "split", "split"},
    {"8x256x128x128", 8, 256, 16384, 4, 0, false, "block", "block"},
    {"4x512x64x64", 4, 512, 4096, 4, 0, false, "block", "block"},
    {"32x256x32x32", 32, 256, 1024, 4, 0, false, "subwarp", "subwarp"},
    {"128x512x7x7", 128, 512, 49, 4, 0, false, "staged", "staged"},
    {"112x64x512x512:bf16", 112, 64, 262144, 2, 0, false, "split", "split"},
    {"8x512x64x64:bf16", 8, 512, 4096, 2, 0, false, "subwarp", "subwarp"},
    {"2x320x64x64:fp16:gn32", 2, 320, 4096, 2, 32, false, "block", "block"},
    {"1x128x20x256x256:bf16:gn32", 1, 128, 1310720, 2, 32, false, "split", "split"},
    {"1x1x2^28", 1, 1, 268435456, 4, 0, false, "split-stream", "split-stream"},
    {"112x64x512x512:cl", 112, 64, 262144, 4, 0, true, "on-chip-G", "tiled"},
    {"16x64x256x256:cl", 16, 64, 65536, 4, 0, true, "on-chip-G", "on-chip-G"},
    {"128x512x7x7:cl", 128, 512, 49, 4, 0, true, "on-chip", "on-chip"},
    {"8x512x64x64:bf16:cl", 8, 512, 4096, 2, 0, true, "on-chip-G", "on-chip-G"},
    {"2x320x64x64:fp16:gn32:cl", 2, 320, 4096, 2, 32, true, "on-chip-G", "on-chip-G"},
    {"3x5x7:cl", 3, 5, 7, 4, 0, true, "on-chip", "on-chip"},
    // Rows nobody tuned for (the random sweep's): scalar planes longer than a warp holds are
    // staged where two stages fit in shared memory, else one block per plane with 16-byte
    // bodies and scalar heads and tails.
    {"4711x16x23x51", 4711, 16, 1173, 4, 0, false, "staged", "staged"},
    {"2213x8x2x1429:bf16", 2213, 8, 2858, 2, 0, false, "staged", "staged"},
    {"2080x3x1x4871", 2080, 3, 4871, 4, 0, false, "block+ragged", "block+ragged"},
    {"1x711x3x2609:bf16", 1, 711, 7827, 2, 0, false, "block+ragged", "block+ragged"},
    // Channels-last rows that are not 16-byte aligned, from 4 MiB on: small images staged (whole
    // images per unit), larger ones tiled; with one position or one channel the layouts
    // coincide and the NCHW path serves them.
    {"3067x133x5x47:bf16:cl", 3067, 133, 235, 2, 0, true, "staged", "tiled"},
    {"47x150x60x75:cl", 47, 150, 4500, 4, 0, true, "tiled", "tiled"},
    {"89278x3x14x15:cl", 89278, 3, 210, 4, 0, true, "staged", "staged"},
    {"11713171x3x2x3:fp16:cl", 11713171, 3, 6, 2, 0, true, "staged", "staged"},
    {"66279x4x1x193:cl", 66279, 4, 193, 4, 0, true, "staged", "staged"},
    {"36167x1643x1x1:cl", 36167, 1643, 1, 4, 0, true, "staged", "staged"},
    {"5532753x1x2x7:bf16:cl", 5532753, 1, 14, 2, 0, true, "staged", "staged"},
};

inline instnorm::Options options_of(const PathCase& k) {
  instnorm::Options opt;
  opt.groups = k.groups;
  if (k.nhwc) opt.layout = instnorm::Layout::kNHWC;
  return opt;
}

/// The path name of a plan, as the matrix spells it.
inline std::string path_of(const instnorm::Plan& p) {
  return std::string(instnorm::to_string(p.strategy)) + (p.ragged ? "+ragged" : "");
}
inline std::string path_of(const instnorm::NhwcPlan& p) {
  return p.staged ? "staged" : !p.on_chip ? "tiled" : p.blocks_per_unit > 1 ? "on-chip-G" : "on-chip";
}

}  // namespace instnorm_paths
