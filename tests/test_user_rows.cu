// A consumer's own table rows (INSTNORM_USER_ARCH_ROWS, set for this whole target in
// tests/CMakeLists.txt: every translation unit of a program must see the same rows) come ahead
// of the built-in table, for the device they describe only.
#include <gtest/gtest.h>
#include <instnorm/plan.cuh>

#include <string>

using namespace instnorm;

TEST(UserArchRows, TakeTheirDeviceAheadOfTheBuiltInTable) {
  EXPECT_EQ(std::string(policy_for_arch(90, 6144).name), "example card");
  EXPECT_EQ(policy_for_arch(90, 6144).split_threads, 512);
  EXPECT_EQ(std::string(policy_for_arch(90, 5120).name), "sm_90");  // an H100's bus
  EXPECT_EQ(std::string(policy_for_arch(89, 6144).name), "sm_89");
  EXPECT_EQ(std::string(policy_for_arch(100, 8192).name), "example card");
  EXPECT_NE(policy_named("example card"), nullptr);
  DeviceProps d;
  d.cc_major = 9;
  d.code_arch = 90;
  d.mem_bus_bits = 6144;
  EXPECT_EQ(std::string(policy_for(d).name), "example card");
  static_assert(ArchTraits<90>::nhwc_vector_phase_shift, "");
}
