#!/usr/bin/env bash
# On the device machine: build with the machine's own GoogleTest, run the whole ctest suite,
# compute-sanitizer over every strategy and type, and ncu's DRAM bytes for the headline shape.
# Logs go to $OUT. Usage: bash bench/device_check.sh
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
source bench/device_env.sh
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  > "$out/configure.log" 2>&1 || { tail -20 "$out/configure.log"; exit 1; }
cmake --build build-dev -j 16 > "$out/build.log" 2>&1 || { grep -m 20 error "$out/build.log"; exit 1; }
(cd build-dev && timeout 300 ctest -j 4 --output-on-failure > "$out/ctest.log" 2>&1)
grep -E "tests passed|tests failed|Skipped|Failed" "$out/ctest.log" | tail -8
filter='S/GpuSizes.*/1:S/GpuSizes.*/49:S/GpuSizes.*/1024:S/GpuSizes.*/1025:S/GpuSizes.*/4096:S/GpuSizes.*/16385:S/GpuSizes.*/65536:S/GpuSizes.*/65537:Gpu.ManyTinyPlanes:Gpu.CallerWorkspaceMatchesSimpleCall:GpuOptions.GroupNormAffineSilu'
timeout 240 compute-sanitizer --tool memcheck --print-limit 5 ${TEST_DEVICE:-build-dev/tests/test_device} \
  --gtest_brief=1 --gtest_filter="$filter" > "$out/memcheck.log" 2>&1
grep -E "ERROR SUMMARY|PASSED|FAILED" "$out/memcheck.log" | tail -3
timeout 200 compute-sanitizer --tool racecheck --print-limit 5 ${TEST_DEVICE:-build-dev/tests/test_device} \
  --gtest_brief=1 --gtest_filter='S/GpuSizes.*/49:S/GpuSizes.*/4096:S/GpuSizes.*/65536:S/GpuSizes.*/65537' \
  > "$out/racecheck.log" 2>&1
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED" "$out/racecheck.log" | tail -3
timeout 120 ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
  -k regex:forward_kernel --launch-skip 3 --launch-count 1 \
  build-dev/bench/instnorm_bench --shape=112x64x512x512 --benchmark_filter=instnorm > "$out/ncu.log" 2>&1
grep -E "dram__bytes|gpu__time" "$out/ncu.log"
