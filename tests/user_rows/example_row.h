// A table row of the kind `instnorm_bench --tune=... --emit-row=FILE` writes, for the test of
// INSTNORM_USER_ARCH_ROWS (test_user_rows.cu): an sm_90 card with a 6144-bit memory bus.
#pragma once
namespace instnorm {
constexpr ArchPolicy kUserArchRows[] = {[] {
  ArchPolicy p;
  p.name = "example card";
  p.cc = 90;
  p.min_bus_bits = 6144;
  p.split_threads = 512;
  p.nhwc_l2_percent = 60;
  p.source = "test: an emitted row";
  return p;
}()};
}  // namespace instnorm
